//! One entry of `credentials:`: its kind, token endpoint, scope parameters, and the
//! managed and workload identity variants.

use super::Validator;
use super::parse::{UrlUse, check_url};
use crate::config::raw::{RawClientSecret, RawCredential, RawManagedIdentity, RawWorkloadIdentity};
use crate::config::{
    ClientAuthMethod, ClientSecret, Credential, CredentialKind, IdentitySelector, ManagedIdentity,
    ManagedIdentityEndpoint, TokenEndpoint, WorkloadIdentity,
};
use crate::secret::Secret;

impl Validator<'_> {
    pub(super) fn credential(&mut self, name: &str, raw: &RawCredential) -> Option<Credential> {
        let at = format!("credentials.{name}");
        let named = self.name(&at, name, "credential");
        let kind = match raw {
            RawCredential::ClientSecret(c) => {
                self.client_secret(&at, c).map(CredentialKind::ClientSecret)
            }
            RawCredential::ClientCertificate(c) => self
                .client_certificate(&at, c)
                .map(CredentialKind::ClientCertificate),
            RawCredential::ManagedIdentity(c) => self
                .managed_identity(&at, c)
                .map(CredentialKind::ManagedIdentity),
            RawCredential::WorkloadIdentity(c) => self
                .workload_identity(&at, c)
                .map(CredentialKind::WorkloadIdentity),
        };
        named.then_some(Credential {
            name: name.to_owned(),
            kind: kind?,
        })
    }

    /// `tenant_id` (Entra ID, with `authority` or `cloud`) or `token_url` (any other
    /// OAuth 2.0 server), exactly one of them.
    pub(super) fn token_endpoint(
        &mut self,
        at: &str,
        tenant_id: Option<&String>,
        token_url: Option<&String>,
        authority: Option<&String>,
        cloud: Option<&String>,
    ) -> Option<TokenEndpoint> {
        match (tenant_id, token_url) {
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{at}.token_url"),
                    format!(
                        "set either {at}.tenant_id (Entra ID) or {at}.token_url (any other \
                         OAuth 2.0 server), not both"
                    ),
                );
                None
            }
            (None, None) => {
                self.problem(
                    at,
                    "needs `tenant_id` (Entra ID) or `token_url` (any other OAuth 2.0 server)",
                );
                None
            }
            (Some(tenant), None) => self.entra_endpoint(at, tenant, authority, cloud),
            (None, Some(url)) => self.generic_endpoint(at, url, authority, cloud),
        }
    }

    pub(super) fn client_secret(
        &mut self,
        at: &str,
        raw: &RawClientSecret,
    ) -> Option<ClientSecret> {
        let endpoint = self.token_endpoint(
            at,
            raw.tenant_id.as_ref(),
            raw.token_url.as_ref(),
            raw.authority.as_ref(),
            raw.cloud.as_ref(),
        );
        let client_id = self.client_id(at, raw.client_id.as_ref());
        let client_secrets = self.client_secrets(at, raw);
        let auth_method = match &raw.auth_method {
            None => Some(ClientAuthMethod::Post),
            Some(text) => {
                let path = format!("{at}.auth_method");
                match self.string(&path, text)?.as_str() {
                    "client_secret_post" => Some(ClientAuthMethod::Post),
                    "client_secret_basic" => Some(ClientAuthMethod::Basic),
                    other => {
                        self.problem(
                            &path,
                            format!(
                                "unknown method `{other}`; use `client_secret_post` (default) \
                                 or `client_secret_basic`"
                            ),
                        );
                        None
                    }
                }
            }
        };
        let params = self.params(at, raw.params.as_ref().map_or(&[][..], |p| &p.0[..]));
        Some(ClientSecret {
            endpoint: endpoint?,
            client_id: client_id?,
            client_secrets: client_secrets?,
            auth_method: auth_method?,
            params: params?,
        })
    }

    pub(super) fn params(
        &mut self,
        at: &str,
        raw: &[(String, String)],
    ) -> Option<Vec<(String, String)>> {
        const RESERVED: &[&str] = &[
            "grant_type",
            "client_id",
            "client_secret",
            "client_assertion",
            "client_assertion_type",
            "scope",
        ];
        let mut params = Some(Vec::with_capacity(raw.len()));
        for (key, value) in raw {
            let path = format!("{at}.params.{key}");
            if RESERVED.contains(&key.as_str()) {
                let hint = if key == "scope" {
                    "set `scope` on the route instead"
                } else {
                    "the proxy sets it"
                };
                self.problem(&path, format!("`{key}` cannot be overridden; {hint}"));
                params = None;
            } else if key.is_empty() {
                self.problem(&path, "a form field needs a name");
                params = None;
            } else if let Some(value) = self.string(&path, value) {
                if let Some(p) = &mut params {
                    p.push((key.clone(), value));
                }
            } else {
                params = None;
            }
        }
        params
    }

    /// `{authority}/{tenant_id}/oauth2/v2.0/token`.
    pub(super) fn entra_endpoint(
        &mut self,
        at: &str,
        tenant: &str,
        authority: Option<&String>,
        cloud: Option<&String>,
    ) -> Option<TokenEndpoint> {
        let tenant_id = self.tenant_id(&format!("{at}.tenant_id"), tenant);
        let authority = self.cloud_authority(at, authority, cloud);
        let (tenant_id, authority) = (tenant_id?, authority?);
        let url = format!("{authority}/{tenant_id}/oauth2/v2.0/token");
        match url.parse::<http::Uri>() {
            Ok(url) => Some(TokenEndpoint::Entra {
                authority,
                tenant_id,
                url,
            }),
            Err(error) => {
                self.problem(
                    &format!("{at}.tenant_id"),
                    format!("does not form a valid token URL with the authority: {error}"),
                );
                None
            }
        }
    }

    /// `token_url` for a generic OAuth 2.0 server; `authority` and `cloud` do not apply.
    pub(super) fn generic_endpoint(
        &mut self,
        at: &str,
        url: &str,
        authority: Option<&String>,
        cloud: Option<&String>,
    ) -> Option<TokenEndpoint> {
        for (field, set) in [
            ("authority", authority.is_some()),
            ("cloud", cloud.is_some()),
        ] {
            if set {
                self.problem(
                    &format!("{at}.{field}"),
                    format!("applies only with {at}.tenant_id; with {at}.token_url remove it"),
                );
            }
        }
        let path = format!("{at}.token_url");
        self.url(&path, url, UrlUse::TokenEndpoint)
            .map(|url| TokenEndpoint::Generic { url: url.uri })
    }

    pub(super) fn managed_identity(
        &mut self,
        at: &str,
        raw: &RawManagedIdentity,
    ) -> Option<ManagedIdentity> {
        let mut selectors = Vec::new();
        for (field, value) in [
            ("client_id", &raw.client_id),
            ("object_id", &raw.object_id),
            ("resource_id", &raw.resource_id),
        ] {
            if let Some(text) = value {
                let path = format!("{at}.{field}");
                let value = self.non_empty(&path, text)?;
                if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    self.problem(&path, "must not contain spaces or control characters");
                    return None;
                }
                selectors.push(match field {
                    "client_id" => IdentitySelector::ClientId(value),
                    "object_id" => IdentitySelector::ObjectId(value),
                    _ => IdentitySelector::ResourceId(value),
                });
            }
        }
        if selectors.len() > 1 {
            self.problem(
                at,
                "set at most one of `client_id`, `object_id` and `resource_id` (they select \
                 the same user-assigned identity)",
            );
            return None;
        }
        // App Service, Functions and Container Apps set both; otherwise this is a VM (IMDS).
        let variables = &self.source.variables;
        let endpoint = match (
            variables.get("IDENTITY_ENDPOINT"),
            variables.get("IDENTITY_HEADER"),
        ) {
            (Some(url), Some(header)) if !url.is_empty() => {
                let url = match check_url(&url, UrlUse::TokenEndpoint) {
                    Ok(url) => url.uri,
                    Err(message) => {
                        self.problem(
                            at,
                            format!("environment variable IDENTITY_ENDPOINT {message}"),
                        );
                        return None;
                    }
                };
                if http::HeaderValue::from_str(&header).is_err() {
                    self.problem(
                        at,
                        "environment variable IDENTITY_HEADER is not a valid header value",
                    );
                    return None;
                }
                ManagedIdentityEndpoint::AppService {
                    url,
                    header: Secret::new(header),
                }
            }
            (Some(_), None) => {
                self.problem(
                    at,
                    "IDENTITY_ENDPOINT is set but IDENTITY_HEADER is not; both come from the \
                     platform (App Service, Functions, Container Apps)",
                );
                return None;
            }
            _ => ManagedIdentityEndpoint::Imds,
        };
        Some(ManagedIdentity {
            selector: selectors.pop(),
            endpoint,
        })
    }

    /// Fields from the YAML, else from the variables the workload identity webhook injects.
    pub(super) fn workload_identity(
        &mut self,
        at: &str,
        raw: &RawWorkloadIdentity,
    ) -> Option<WorkloadIdentity> {
        let variables = &self.source.variables;
        let from_env = |field: &Option<String>, variable: &str| -> Option<String> {
            match field {
                Some(text) => Some(text.clone()),
                // `$${` keeps an environment value from being expanded again.
                None => variables.get(variable).map(|v| v.replace("${", "$${")),
            }
        };
        let missing = |field: &str, variable: &str| {
            format!(
                "is required: set {at}.{field} or the environment variable {variable} (the \
                 workload identity webhook injects it into labelled pods)"
            )
        };
        let tenant = from_env(&raw.tenant_id, "AZURE_TENANT_ID");
        let client = from_env(&raw.client_id, "AZURE_CLIENT_ID");
        let file = from_env(&raw.token_file, "AZURE_FEDERATED_TOKEN_FILE");
        let authority = match (&raw.authority, &raw.cloud) {
            (None, None) => from_env(&None, "AZURE_AUTHORITY_HOST"),
            (authority, _) => authority.clone(),
        };
        let endpoint = match &tenant {
            Some(tenant) => self.entra_endpoint(at, tenant, authority.as_ref(), raw.cloud.as_ref()),
            None => {
                self.problem(
                    &format!("{at}.tenant_id"),
                    missing("tenant_id", "AZURE_TENANT_ID"),
                );
                None
            }
        };
        let client_id = match &client {
            Some(_) => self.client_id(at, client.as_ref()),
            None => {
                self.problem(
                    &format!("{at}.client_id"),
                    missing("client_id", "AZURE_CLIENT_ID"),
                );
                None
            }
        };
        let token_file = match &file {
            // Not checked for existence: the platform mounts and rotates it.
            Some(text) => self.file_path(&format!("{at}.token_file"), text),
            None => {
                self.problem(
                    &format!("{at}.token_file"),
                    missing("token_file", "AZURE_FEDERATED_TOKEN_FILE"),
                );
                None
            }
        };
        Some(WorkloadIdentity {
            endpoint: endpoint?,
            client_id: client_id?,
            token_file: token_file?,
        })
    }
}
