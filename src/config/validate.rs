//! From the raw YAML schema to the typed [`Config`]: `${…}` expansion, parsing of every
//! string setting, defaults, and the cross-field rules.
//!
//! Every problem is collected, none stops the walk; each carries the YAML path of the field
//! and says how to fix it. Messages never contain a secret value: they name variables,
//! files and fields instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use http::HeaderName;
use http::uri::{Authority, Scheme};
use ipnet::IpNet;

use super::expand::{self, Expanded};
use super::raw::{
    RawAdmin, RawBasic, RawCertificateMatch, RawClient, RawClientCertificate, RawClientSecret,
    RawConfig, RawCredential, RawLimits, RawManagedIdentity, RawRetryOn429, RawRoute, RawServer,
    RawTls, RawUpstream, RawWorkloadIdentity, StringOr,
};
use super::{
    Admin, AssertionAlg, BasicCredential, CertificateFile, CertificateMatch, Client,
    ClientAuthMethod, ClientCertificate, ClientSecret, Config, ConfiguredSecret, Credential,
    CredentialKind, DEFAULT_AUTHORITY, DEFAULT_LISTEN, DEFAULT_MAX_QUEUE, DEFAULT_QUEUE_TIMEOUT,
    IdentitySelector, Limits, ManagedIdentity, ManagedIdentityEndpoint, Preset, Problem, RateLimit,
    RetryOn429, Route, Server, ServerTls, Source, TokenEndpoint, Upstream, WorkloadIdentity,
};
use crate::secret::{Secret, SecretDigest};

/// Validates a parsed document. `Err` holds every problem found, in document order, with
/// the refusals of not-yet-supported settings last.
pub(super) fn validate(raw: &RawConfig, source: &Source) -> Result<Config, Vec<Problem>> {
    let mut v = Validator {
        source,
        problems: Vec::new(),
    };
    let default_server = RawServer::default();
    let server = v.server(raw.server.as_ref().unwrap_or(&default_server));
    let admin = raw.admin.as_ref().and_then(|admin| v.admin(admin, &server));

    let raw_credentials = raw.credentials.as_ref().map_or(&[][..], |c| &c.0[..]);
    let mut credentials: Vec<Credential> = raw_credentials
        .iter()
        .filter_map(|(name, credential)| v.credential(name, credential))
        .collect();
    credentials.sort_by(|a, b| a.name.cmp(&b.name));

    // Whether it is set, even if its file is missing: that is reported on its own.
    let client_ca = raw
        .server
        .as_ref()
        .and_then(|s| s.tls.as_ref())
        .is_some_and(|tls| tls.client_ca_file.is_some());
    let raw_clients = raw.clients.as_ref().map_or(&[][..], |c| &c.0[..]);
    let clients: Vec<Client> = raw_clients
        .iter()
        .filter_map(|(name, client)| v.client(name, client, client_ca))
        .collect();
    v.unique_client_secrets(&clients);

    let names = Names {
        credentials: raw_credentials.iter().map(|(n, _)| n.as_str()).collect(),
        clients: raw_clients.iter().map(|(n, _)| n.as_str()).collect(),
    };
    let raw_routes = raw.routes.as_deref().unwrap_or_default();
    let mut prefixes: Vec<String> = Vec::new();
    let mut routes: Vec<Option<Route>> = Vec::with_capacity(raw_routes.len());
    for (index, route) in raw_routes.iter().enumerate() {
        let prefix = v.unique_prefix(index, route, &mut prefixes);
        routes.push(v.route(index, route, prefix, &server, &names, &credentials));
    }

    if v.problems.is_empty() {
        Ok(Config {
            server,
            admin,
            credentials,
            clients,
            routes: routes.into_iter().flatten().collect(),
        })
    } else {
        Err(v.problems)
    }
}

/// Names defined in the document, valid or not, so that a broken definition does not also
/// make every reference to it "unknown".
struct Names<'a> {
    credentials: Vec<&'a str>,
    clients: Vec<&'a str>,
}

struct Validator<'s> {
    source: &'s Source,
    problems: Vec<Problem>,
}

// ---------------------------------------------------------------------------------------
// Sections

impl Validator<'_> {
    fn server(&mut self, raw: &RawServer) -> Server {
        let listen = match &raw.listen {
            Some(text) => self.socket_addr("server.listen", text),
            None => None,
        }
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));

        let public_url = raw
            .public_url
            .as_ref()
            .and_then(|text| self.public_url("server.public_url", text));

        let trusted_proxies = self.networks("server.trusted_proxies", raw.trusted_proxies.as_ref());

        let upstream_ca_file = raw
            .upstream_ca_file
            .as_ref()
            .and_then(|text| self.existing_file("server.upstream_ca_file", text))
            .filter(|path| {
                // Read now, as `run` does before it binds: `check` must refuse it too.
                let read = crate::upstream::client_tls_config(Some(path));
                if let Err(error) = &read {
                    self.problem("server.upstream_ca_file", error.to_string());
                }
                read.is_ok()
            });

        let api_key_header = match &raw.api_key_header {
            Some(text) => self.api_key_header("server.api_key_header", text),
            None => None,
        }
        .unwrap_or(HeaderName::from_static("x-api-key"));

        let allow_underscore_headers = raw.allow_underscore_headers.unwrap_or(false);

        let workers = raw
            .workers
            .and_then(|n| self.count("server.workers", n, 1, 1024));

        let tls = raw.tls.as_ref().and_then(|tls| self.tls(tls));

        let default_limits = RawLimits::default();
        let limits = self.limits(raw.limits.as_ref().unwrap_or(&default_limits));

        Server {
            listen,
            public_url,
            trusted_proxies,
            upstream_ca_file,
            api_key_header,
            allow_underscore_headers,
            workers,
            tls,
            limits,
        }
    }

    fn tls(&mut self, raw: &RawTls) -> Option<ServerTls> {
        let cert_file = self.required(
            "server.tls.cert_file",
            raw.cert_file.as_ref(),
            "the PEM certificate chain",
        );
        let key_file = self.required(
            "server.tls.key_file",
            raw.key_file.as_ref(),
            "the PEM private key",
        );
        let cert_file = cert_file.and_then(|t| self.existing_file("server.tls.cert_file", t));
        let key_file = key_file.and_then(|t| self.existing_file("server.tls.key_file", t));
        let client_ca_file = match &raw.client_ca_file {
            Some(text) => Some(self.existing_file("server.tls.client_ca_file", text)?),
            None => None,
        };
        let tls = ServerTls {
            cert_file: cert_file?,
            key_file: key_file?,
            client_ca_file,
        };
        // Read them now, as `run` does before it binds: `check` must refuse what `run` would.
        let problems = crate::inbound::tls::check_files(&tls);
        let usable = problems.is_empty();
        for (field, message) in problems {
            self.problem(&format!("server.tls.{field}"), message);
        }
        usable.then_some(tls)
    }

    fn limits(&mut self, raw: &RawLimits) -> Limits {
        let default = Limits::default();
        Limits {
            max_header_bytes: raw
                .max_header_bytes
                .and_then(|n| self.count("server.limits.max_header_bytes", n, 8192, 1024 * 1024))
                .unwrap_or(default.max_header_bytes),
            max_body_bytes: match raw.max_body_bytes {
                Some(0) => {
                    self.problem("server.limits.max_body_bytes", "must be at least 1");
                    default.max_body_bytes
                }
                Some(n) => n,
                None => default.max_body_bytes,
            },
            header_read_timeout: self.duration_or(
                "server.limits.header_read_timeout",
                raw.header_read_timeout.as_ref(),
                default.header_read_timeout,
            ),
            body_idle_timeout: self.duration_or(
                "server.limits.body_idle_timeout",
                raw.body_idle_timeout.as_ref(),
                default.body_idle_timeout,
            ),
            idle_timeout: self.duration_or(
                "server.limits.idle_timeout",
                raw.idle_timeout.as_ref(),
                default.idle_timeout,
            ),
            request_timeout: self.duration_or(
                "server.limits.request_timeout",
                raw.request_timeout.as_ref(),
                default.request_timeout,
            ),
            max_connections: raw
                .max_connections
                .and_then(|n| self.count("server.limits.max_connections", n, 1, 1_000_000))
                .unwrap_or(default.max_connections),
        }
    }

    fn admin(&mut self, raw: &RawAdmin, server: &Server) -> Option<Admin> {
        let text = self.required(
            "admin.listen",
            raw.listen.as_ref(),
            "an address such as 127.0.0.1:9090",
        )?;
        let listen = self.socket_addr("admin.listen", text)?;
        // Port 0 (any free port, as in tests) cannot clash.
        if listen == server.listen && listen.port() != 0 {
            self.problem(
                "admin.listen",
                format!(
                    "{listen} is also server.listen; give the admin listener its own port \
                     (e.g. 127.0.0.1:9090)"
                ),
            );
            return None;
        }
        Some(Admin { listen })
    }

    fn credential(&mut self, name: &str, raw: &RawCredential) -> Option<Credential> {
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
    fn token_endpoint(
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

    fn client_secret(&mut self, at: &str, raw: &RawClientSecret) -> Option<ClientSecret> {
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

    fn params(&mut self, at: &str, raw: &[(String, String)]) -> Option<Vec<(String, String)>> {
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
    fn entra_endpoint(
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
    fn generic_endpoint(
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

    /// `client_secret` (with `expires`) or the `client_secrets` list, not both.
    fn client_secrets(&mut self, at: &str, raw: &RawClientSecret) -> Option<Vec<ConfiguredSecret>> {
        match (&raw.client_secret, &raw.client_secrets) {
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{at}.client_secrets"),
                    format!(
                        "set either {at}.client_secret or {at}.client_secrets (rotation), not \
                         both"
                    ),
                );
                None
            }
            (None, None) => {
                self.problem(
                    &format!("{at}.client_secret"),
                    "is required: the app's secret, e.g. ${BC_CLIENT_SECRET} (or \
                     `client_secrets: [...]` to rotate)",
                );
                None
            }
            (Some(text), None) => {
                let path = format!("{at}.client_secret");
                let secret = self.configured_secret(&path, text);
                let expires = raw
                    .expires
                    .as_ref()
                    .map(|e| self.date(&format!("{at}.expires"), e));
                let expires = match expires {
                    Some(date) => Some(date?),
                    None => None,
                };
                Some(vec![ConfiguredSecret { expires, ..secret? }])
            }
            (None, Some(list)) => {
                if raw.expires.is_some() {
                    self.problem(
                        &format!("{at}.expires"),
                        format!(
                            "applies to {at}.client_secret; with {at}.client_secrets write \
                             `{{ value: ..., expires: ... }}` entries"
                        ),
                    );
                }
                self.rotation_list(
                    &format!("{at}.client_secrets"),
                    list,
                    "secret",
                    |this, path, entry| match entry {
                        StringOr::String(text) => this.configured_secret(path, text),
                        StringOr::Map(entry) => {
                            let value = this
                                .required(
                                    &format!("{path}.value"),
                                    entry.value.as_ref(),
                                    "the secret, e.g. ${BC_SECRET_NEW}",
                                )
                                .and_then(|t| this.configured_secret(&format!("{path}.value"), t));
                            let expires = match &entry.expires {
                                Some(e) => this.date(&format!("{path}.expires"), e).map(Some),
                                None => Some(None),
                            };
                            value
                                .zip(expires)
                                .map(|(value, expires)| ConfiguredSecret { expires, ..value })
                        }
                    },
                )
            }
        }
    }

    /// The entries of a rotation list (`client_secrets`, `certificate_files`) at
    /// `list_path`, each checked by `entry` at `list_path[i]` so that every bad entry is
    /// reported; `None` when the list is empty or any entry is bad.
    fn rotation_list<E, T>(
        &mut self,
        list_path: &str,
        list: &[StringOr<E>],
        what: &str,
        mut entry: impl FnMut(&mut Self, &str, &StringOr<E>) -> Option<T>,
    ) -> Option<Vec<T>> {
        if list.is_empty() {
            self.problem(list_path, format!("is empty; list at least one {what}"));
            return None;
        }
        let mut valid = Some(Vec::with_capacity(list.len()));
        for (index, item) in list.iter().enumerate() {
            match (
                entry(self, &format!("{list_path}[{index}]"), item),
                &mut valid,
            ) {
                (Some(value), Some(values)) => values.push(value),
                _ => valid = None,
            }
        }
        valid
    }

    /// A secret, remembering its file when written wholly as `${file:PATH}`.
    fn configured_secret(&mut self, path: &str, text: &str) -> Option<ConfiguredSecret> {
        let value = self.secret(path, text)?;
        let file = text
            .strip_prefix("${file:")
            .and_then(|t| t.strip_suffix('}'))
            .filter(|t| !t.contains('}'))
            .map(|file| self.source.base_dir.join(file));
        Some(ConfiguredSecret {
            value,
            file,
            expires: None,
        })
    }

    /// A calendar date `YYYY-MM-DD`, as the start of that day in UTC.
    fn date(&mut self, path: &str, text: &str) -> Option<SystemTime> {
        let value = self.string(path, text)?;
        match parse_date(value.trim()) {
            Some(time) => Some(time),
            None => {
                self.problem(path, "expected a date such as 2026-09-30 (YYYY-MM-DD)");
                None
            }
        }
    }

    fn client_certificate(
        &mut self,
        at: &str,
        raw: &RawClientCertificate,
    ) -> Option<ClientCertificate> {
        let endpoint = self.token_endpoint(
            at,
            raw.tenant_id.as_ref(),
            raw.token_url.as_ref(),
            raw.authority.as_ref(),
            raw.cloud.as_ref(),
        );
        let client_id = self.client_id(at, raw.client_id.as_ref());
        let assertion_alg = match &raw.assertion_alg {
            None => Some(AssertionAlg::Ps256),
            Some(text) => {
                let path = format!("{at}.assertion_alg");
                match self.string(&path, text)?.as_str() {
                    "PS256" => Some(AssertionAlg::Ps256),
                    "RS256" => Some(AssertionAlg::Rs256),
                    "ES256" if raw.tenant_id.is_some() => {
                        self.problem(
                            &path,
                            "Entra ID accepts only RSA certificates (PS256 or RS256); ES256 is \
                             for other servers (`token_url`)",
                        );
                        None
                    }
                    "ES256" => Some(AssertionAlg::Es256),
                    other => {
                        self.problem(
                            &path,
                            format!(
                                "unknown algorithm `{other}`; use `PS256` (default, sends \
                                 x5t#S256) or `RS256` (sends x5t)"
                            ),
                        );
                        None
                    }
                }
            }
        };
        let certificates = self.certificate_files(at, raw);
        let (endpoint, client_id, assertion_alg, certificates) =
            (endpoint?, client_id?, assertion_alg?, certificates?);
        // Load every certificate now, so that `check` reports a bad file or key.
        let mut usable = true;
        for (index, certificate) in certificates.iter().enumerate() {
            if let Err(message) = crate::token::check_certificate(certificate, assertion_alg) {
                let path = if raw.certificate_files.is_some() {
                    format!("{at}.certificate_files[{index}]")
                } else {
                    format!("{at}.certificate_file")
                };
                self.problem(&path, message);
                usable = false;
            }
        }
        usable.then_some(ClientCertificate {
            endpoint,
            client_id,
            certificates,
            assertion_alg,
            send_certificate_chain: raw.send_certificate_chain.unwrap_or(false),
        })
    }

    /// `certificate_file` (+ `certificate_password`) or the `certificate_files` list.
    fn certificate_files(
        &mut self,
        at: &str,
        raw: &RawClientCertificate,
    ) -> Option<Vec<CertificateFile>> {
        match (&raw.certificate_file, &raw.certificate_files) {
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{at}.certificate_files"),
                    format!(
                        "set either {at}.certificate_file or {at}.certificate_files \
                         (rotation), not both"
                    ),
                );
                None
            }
            (None, None) => {
                self.problem(
                    &format!("{at}.certificate_file"),
                    "is required: a PEM file with the certificate and its private key, or a \
                     PKCS#12 (.pfx) file with `certificate_password`",
                );
                None
            }
            (Some(file), None) => {
                let file = self.existing_file(&format!("{at}.certificate_file"), file);
                let password = match &raw.certificate_password {
                    Some(text) => Some(self.secret(&format!("{at}.certificate_password"), text)?),
                    None => None,
                };
                Some(vec![CertificateFile {
                    path: file?,
                    password,
                }])
            }
            (None, Some(list)) => {
                if raw.certificate_password.is_some() {
                    self.problem(
                        &format!("{at}.certificate_password"),
                        format!(
                            "applies to {at}.certificate_file; with {at}.certificate_files \
                             write `{{ file: ..., password: ... }}` entries"
                        ),
                    );
                }
                self.rotation_list(
                    &format!("{at}.certificate_files"),
                    list,
                    "certificate file",
                    |this, path, entry| match entry {
                        StringOr::String(text) => {
                            this.existing_file(path, text).map(|path| CertificateFile {
                                path,
                                password: None,
                            })
                        }
                        StringOr::Map(entry) => {
                            let file = this
                                .required(
                                    &format!("{path}.file"),
                                    entry.file.as_ref(),
                                    "a PEM or PKCS#12 (.pfx) file",
                                )
                                .and_then(|t| this.existing_file(&format!("{path}.file"), t));
                            let password = match &entry.password {
                                Some(t) => this.secret(&format!("{path}.password"), t).map(Some),
                                None => Some(None),
                            };
                            file.zip(password)
                                .map(|(path, password)| CertificateFile { path, password })
                        }
                    },
                )
            }
        }
    }

    fn managed_identity(&mut self, at: &str, raw: &RawManagedIdentity) -> Option<ManagedIdentity> {
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
    fn workload_identity(
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

    fn client(&mut self, name: &str, raw: &RawClient, client_ca: bool) -> Option<Client> {
        let at = format!("clients.{name}");
        let mut ok = self.name(&at, name, "client");

        let basic = raw.basic.as_ref().and_then(|basic| {
            let checked = self.basic(&at, basic);
            ok &= checked.is_some();
            checked
        });
        let api_key = raw.api_key.as_ref().and_then(|text| {
            let digest = self.inbound_secret(&format!("{at}.api_key"), text, true);
            ok &= digest.is_some();
            digest
        });
        let networks = self.networks(&format!("{at}.networks"), raw.networks.as_ref());
        let rate_limit = raw.rate_limit.as_ref().and_then(|text| {
            let limit = self.rate_limit(&format!("{at}.rate_limit"), text);
            ok &= limit.is_some();
            limit
        });
        let certificate = raw.certificate.as_ref().and_then(|certificate| {
            let checked = self.certificate_match(&at, certificate, client_ca);
            ok &= checked.is_some();
            checked
        });

        let has_credential = raw.basic.is_some()
            || raw.api_key.is_some()
            || raw.networks.as_ref().is_some_and(|n| !n.is_empty())
            || raw.certificate.is_some();
        if !has_credential {
            self.problem(
                &at,
                "needs at least one of `basic`, `api_key`, `networks` or `certificate` to \
                 say how it is recognised",
            );
            ok = false;
        }
        ok.then(|| Client {
            name: name.to_owned(),
            basic,
            api_key,
            networks,
            rate_limit,
            certificate,
        })
    }

    fn basic(&mut self, at: &str, raw: &RawBasic) -> Option<BasicCredential> {
        let path = format!("{at}.basic.username");
        let username = self
            .required(
                &path,
                raw.username.as_ref(),
                "the user name the client sends",
            )
            .and_then(|text| self.string(&path, text))
            .and_then(|username| {
                if username.is_empty() {
                    self.problem(&path, "must not be empty");
                    None
                } else if username.contains(':') {
                    // RFC 7617 §2: the user-id cannot contain a colon.
                    self.problem(&path, "must not contain `:` (Basic auth splits on it)");
                    None
                } else if username.chars().any(char::is_control) {
                    self.problem(&path, "must not contain control characters");
                    None
                } else {
                    Some(username)
                }
            });
        let path = format!("{at}.basic.password");
        let password = self
            .required(
                &path,
                raw.password.as_ref(),
                "a `sha256:` hash from `s2s-proxy hash-secret`, or ${VAR}",
            )
            .and_then(|text| self.inbound_secret(&path, text, false));
        Some(BasicCredential {
            username: username?,
            password: password?,
        })
    }

    fn certificate_match(
        &mut self,
        at: &str,
        raw: &RawCertificateMatch,
        client_ca: bool,
    ) -> Option<CertificateMatch> {
        let path = format!("{at}.certificate");
        if !client_ca {
            self.problem(
                &path,
                "needs server.tls.client_ca_file to verify client certificates; set \
                 server.tls.client_ca_file or remove this certificate",
            );
        }
        let given = [
            raw.subject_cn.is_some(),
            raw.san_dns.is_some(),
            raw.fingerprint_sha256.is_some(),
        ];
        let matched = if given.iter().filter(|g| **g).count() != 1 {
            self.problem(
                &path,
                "needs exactly one of `subject_cn`, `san_dns` or `fingerprint_sha256`",
            );
            None
        } else if let Some(cn) = &raw.subject_cn {
            let path = format!("{path}.subject_cn");
            self.non_empty(&path, cn).map(CertificateMatch::SubjectCn)
        } else if let Some(name) = &raw.san_dns {
            let path = format!("{path}.san_dns");
            self.non_empty(&path, name)
                .map(|name| CertificateMatch::SanDns(name.to_ascii_lowercase()))
        } else if let Some(fingerprint) = &raw.fingerprint_sha256 {
            let path = format!("{path}.fingerprint_sha256");
            let text = self.string(&path, fingerprint)?;
            match parse_fingerprint(&text) {
                Some(bytes) => Some(CertificateMatch::FingerprintSha256(bytes)),
                None => {
                    self.problem(
                        &path,
                        "expected 64 hex digits (colons allowed), as printed by \
                         `openssl x509 -noout -fingerprint -sha256`",
                    );
                    None
                }
            }
        } else {
            None
        };
        if client_ca { matched } else { None }
    }

    fn route(
        &mut self,
        index: usize,
        raw: &RawRoute,
        prefix: Option<String>,
        server: &Server,
        names: &Names<'_>,
        credentials: &[Credential],
    ) -> Option<Route> {
        let at = format!("routes[{index}]");
        let path = |field: &str| format!("{at}.{field}");
        let allow_plain_http = raw.allow_plain_http.unwrap_or(false);

        let upstream = match &raw.upstream {
            None => {
                self.problem(
                    &path("upstream"),
                    "is required: the base URL requests are forwarded to",
                );
                None
            }
            Some(upstream) => self.upstream(&path("upstream"), upstream, allow_plain_http),
        };

        let credential = self
            .required(
                &path("credential"),
                raw.credential.as_ref(),
                "the name of an entry under `credentials:`",
            )
            .and_then(|text| self.string(&path("credential"), text))
            .and_then(|name| {
                if names.credentials.contains(&name.as_str()) {
                    Some(name)
                } else {
                    let message = format!(
                        "unknown credential `{name}`; {}",
                        defined("credentials", &names.credentials)
                    );
                    self.problem(&path("credential"), message);
                    None
                }
            });

        let clients = self.route_clients(&path("clients"), raw.clients.as_ref(), names);

        let scope = match &raw.scope {
            Some(text) => self.non_empty(&path("scope"), text).map(Some),
            // Entra takes `<resource>/.default`; a generic server gets no scope unless set.
            None => match (&credential, &upstream) {
                (Some(name), Some(upstream)) => {
                    let entra = credentials
                        .iter()
                        .find(|c| c.name == *name)
                        .is_none_or(|c| c.kind.is_entra());
                    Some(entra.then(|| format!("https://{}/.default", upstream.host)))
                }
                _ => None,
            },
        };

        let preset = match &raw.upstream {
            Some(RawUpstream::BusinessCentral(_)) => Some(Preset::BusinessCentral),
            Some(RawUpstream::Dataverse(_)) => Some(Preset::Dataverse),
            Some(RawUpstream::FinanceOperations(_)) => Some(Preset::FinanceOperations),
            Some(RawUpstream::Url(_)) | None => None,
        };
        let defaults = preset.map(Preset::defaults);

        let timeout = match &raw.timeout {
            Some(text) => self.duration(&path("timeout"), text),
            None => Some(
                defaults
                    .and_then(|d| d.timeout)
                    .unwrap_or(server.limits.request_timeout),
            ),
        };

        let max_concurrent = match raw.max_concurrent {
            Some(n) => self.count(&path("max_concurrent"), n, 1, 100_000),
            None => defaults.and_then(|d| d.max_concurrent),
        };
        let max_queue = match raw.max_queue {
            Some(n) => self.count(&path("max_queue"), n, 0, 1_000_000),
            None => max_concurrent.map(|_| {
                defaults
                    .and_then(|d| d.max_queue)
                    .unwrap_or(DEFAULT_MAX_QUEUE)
            }),
        };
        let queue_timeout = match &raw.queue_timeout {
            Some(text) => self.duration(&path("queue_timeout"), text),
            None => max_concurrent.map(|_| DEFAULT_QUEUE_TIMEOUT),
        };
        if raw.max_concurrent.is_none() && defaults.is_none_or(|d| d.max_concurrent.is_none()) {
            for (field, set) in [
                ("max_queue", raw.max_queue.is_some()),
                ("queue_timeout", raw.queue_timeout.is_some()),
            ] {
                if set {
                    self.problem(
                        &path(field),
                        format!(
                            "applies only with {at}.max_concurrent; set {at}.max_concurrent \
                             or remove {at}.{field}"
                        ),
                    );
                }
            }
        }
        let retry_on_429 = match &raw.retry_on_429 {
            Some(retry) => self.retry_on_429(&path("retry_on_429"), retry),
            None => defaults.and_then(|d| d.retry_on_429),
        };

        let strip_request_headers = self.strip_request_headers(
            &path("strip_request_headers"),
            raw.strip_request_headers.as_ref(),
        );

        let doctor_path = match &raw.doctor_path {
            None => Some(None),
            Some(text) => self.string(&path("doctor_path"), text).and_then(|p| {
                let relative = p.trim_start_matches('/').to_owned();
                if relative.contains("..") || relative.contains("://") {
                    self.problem(
                        &path("doctor_path"),
                        "must be a path relative to the upstream URL, such as api/v2.0/companies",
                    );
                    None
                } else {
                    Some(Some(relative))
                }
            }),
        };

        Some(Route {
            prefix: prefix?,
            upstream: upstream?,
            credential: credential?,
            scope: scope?,
            clients: clients?,
            timeout: timeout?,
            rewrite_links: raw
                .rewrite_links
                .unwrap_or(defaults.is_some_and(|d| d.rewrite_links)),
            max_concurrent,
            max_queue,
            queue_timeout,
            retry_on_429,
            allow_plain_http,
            strip_request_headers,
            doctor_path: doctor_path?,
            preset,
        })
    }

    fn route_clients(
        &mut self,
        path: &str,
        raw: Option<&Vec<String>>,
        names: &Names<'_>,
    ) -> Option<Vec<String>> {
        let raw = raw.map_or(&[][..], |c| &c[..]);
        if raw.is_empty() {
            self.problem(
                path,
                "a route needs at least one client; list the names under `clients:` that may \
                 call it",
            );
            return None;
        }
        let mut clients = Some(Vec::with_capacity(raw.len()));
        for (i, text) in raw.iter().enumerate() {
            let path = format!("{path}[{i}]");
            let Some(name) = self.string(&path, text) else {
                clients = None;
                continue;
            };
            if !names.clients.contains(&name.as_str()) {
                let message = format!(
                    "unknown client `{name}`; {}",
                    defined("clients", &names.clients)
                );
                self.problem(&path, message);
                clients = None;
            } else if let Some(list) = &mut clients
                && !list.contains(&name)
            {
                list.push(name);
            }
        }
        clients
    }

    fn retry_on_429(&mut self, at: &str, raw: &RawRetryOn429) -> Option<RetryOn429> {
        let attempts_path = format!("{at}.attempts");
        let attempts = match raw.attempts {
            None => {
                self.problem(
                    &attempts_path,
                    "is required: how many times to retry, e.g. 3",
                );
                None
            }
            Some(0) => {
                self.problem(
                    &attempts_path,
                    "must be at least 1; remove retry_on_429 to never retry",
                );
                None
            }
            Some(n) => match u32::try_from(n) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.problem(&attempts_path, "is too large");
                    None
                }
            },
        };
        let wait_path = format!("{at}.max_wait");
        let max_wait = self
            .required(
                &wait_path,
                raw.max_wait.as_ref(),
                "the longest Retry-After to honour, e.g. 30s",
            )
            .and_then(|text| self.duration(&wait_path, text));
        Some(RetryOn429 {
            attempts: attempts?,
            max_wait: max_wait?,
        })
    }

    /// A route's prefix, checked on its own and against the routes before it (whether
    /// those are otherwise valid or not).
    fn unique_prefix(
        &mut self,
        index: usize,
        raw: &RawRoute,
        seen: &mut Vec<String>,
    ) -> Option<String> {
        let path = format!("routes[{index}].prefix");
        let prefix = self
            .required(&path, raw.prefix.as_ref(), "a path such as /bc/")
            .and_then(|text| self.prefix(&path, text))?;
        // `seen` holds every earlier route's prefix or an empty placeholder, by index.
        // Requests are routed with ASCII case ignored (docs/request-handling.md), so
        // prefixes that differ only in case would claim the same requests.
        let first = seen
            .iter()
            .position(|p| !p.is_empty() && p.eq_ignore_ascii_case(&prefix));
        seen.resize(index, String::new());
        seen.push(prefix.clone());
        if let Some(first) = first {
            let message = if seen[first] == prefix {
                format!(
                    "`{prefix}` is also the prefix of routes[{first}]; each prefix must be unique"
                )
            } else {
                format!(
                    "`{prefix}` differs from routes[{first}].prefix `{}` only in case; paths \
                     are matched without regard to case, so both would claim the same \
                     requests: make them differ in more than case",
                    seen[first]
                )
            };
            self.problem(&path, message);
            return None;
        }
        Some(prefix)
    }

    fn unique_client_secrets(&mut self, clients: &[Client]) {
        for (index, client) in clients.iter().enumerate() {
            let earlier = &clients[..index];
            if let Some(basic) = &client.basic {
                let first = earlier.iter().find(|other| {
                    other
                        .basic
                        .as_ref()
                        .is_some_and(|b| b.username == basic.username)
                });
                if let Some(first) = first {
                    self.problem(
                        &format!("clients.{}.basic.username", client.name),
                        format!(
                            "`{}` is also the username of clients.{}; usernames must be unique",
                            basic.username, first.name
                        ),
                    );
                }
            }
            if let Some(certificate) = &client.certificate {
                let first = earlier
                    .iter()
                    .find(|other| other.certificate.as_ref() == Some(certificate));
                if let Some(first) = first {
                    self.problem(
                        &format!("clients.{}.certificate", client.name),
                        format!(
                            "matches the same certificates as clients.{}.certificate; give \
                             each client its own",
                            first.name
                        ),
                    );
                }
            }
            if let Some(key) = &client.api_key {
                let first = earlier
                    .iter()
                    .find(|other| other.api_key.as_ref().is_some_and(|k| k.matches(key)));
                if let Some(first) = first {
                    self.problem(
                        &format!("clients.{}.api_key", client.name),
                        format!(
                            "is the same key as clients.{}.api_key; give each client its own key",
                            first.name
                        ),
                    );
                }
            }
        }
    }
}

fn defined(what: &str, names: &[&str]) -> String {
    if names.is_empty() {
        format!("no {what} are defined under `{what}:`")
    } else {
        let list: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
        format!("defined {what}: {}", list.join(", "))
    }
}

// ---------------------------------------------------------------------------------------
// Field types

impl Validator<'_> {
    fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn required<'r>(
        &mut self,
        path: &str,
        value: Option<&'r String>,
        what: &str,
    ) -> Option<&'r String> {
        if value.is_none() {
            self.problem(path, format!("is required: {what}"));
        }
        value
    }

    fn expand(&mut self, path: &str, text: &str) -> Option<Expanded> {
        match expand::expand(text, &self.source.variables, &self.source.base_dir) {
            Ok(expanded) => Some(expanded),
            Err(messages) => {
                for message in messages {
                    self.problem(path, message);
                }
                None
            }
        }
    }

    fn string(&mut self, path: &str, text: &str) -> Option<String> {
        self.expand(path, text).map(|e| e.value)
    }

    /// A string that must not be empty or blank after expansion.
    fn non_empty(&mut self, path: &str, text: &str) -> Option<String> {
        let expanded = self.expand(path, text)?;
        if expanded.value.trim().is_empty() {
            self.problem(path, empty_message(text, &expanded));
            return None;
        }
        Some(expanded.value)
    }

    /// A secret sent to an identity provider. A literal is allowed (the operator chose to
    /// write it into the file); empty is not: an empty secret must never reach the wire.
    fn secret(&mut self, path: &str, text: &str) -> Option<Secret> {
        let expanded = self.expand(path, text)?;
        if expanded.value.trim().is_empty() {
            self.problem(path, empty_message(text, &expanded));
            return None;
        }
        Some(Secret::new(expanded.value))
    }

    /// An inbound password or API key: a `sha256:` digest, or the plain secret wholly from
    /// `${VAR}` / `${file:PATH}` (hashed here). A literal plain secret in the YAML is refused.
    fn inbound_secret(
        &mut self,
        path: &str,
        text: &str,
        header_value: bool,
    ) -> Option<SecretDigest> {
        let expanded = self.expand(path, text)?;
        if expanded.whole_reference {
            if expanded.value.trim().is_empty() {
                self.problem(path, empty_message(text, &expanded));
                return None;
            }
            let secret = Secret::new(expanded.value);
            if header_value && !is_visible_ascii(secret.expose()) {
                self.problem(
                    path,
                    format!(
                        "the key from `{text}` must be printable ASCII without spaces to be \
                         sent in a header"
                    ),
                );
                return None;
            }
            return Some(secret.digest());
        }
        let value = Secret::new(expanded.value);
        if let Some(hex) = value.expose().strip_prefix("sha256:") {
            return match parse_hex32(hex) {
                Some(bytes) => Some(SecretDigest::from_bytes(bytes)),
                None => {
                    self.problem(
                        path,
                        "a `sha256:` value needs exactly 64 hex digits; get it from \
                         `s2s-proxy hash-secret`",
                    );
                    None
                }
            };
        }
        let message = if expanded.has_reference {
            "must be wholly one ${VAR} or ${file:PATH}, not mixed with other text, or a \
             `sha256:` hash from `s2s-proxy hash-secret`"
        } else {
            "a plaintext password must not be written into the YAML; use `s2s-proxy \
             hash-secret` to get its sha256: form, or ${VAR} / ${file:PATH}"
        };
        self.problem(path, message);
        None
    }

    fn duration(&mut self, path: &str, text: &str) -> Option<Duration> {
        let value = self.string(path, text)?;
        match parse_duration(&value) {
            Ok(duration) => Some(duration),
            Err(message) => {
                self.problem(path, message);
                None
            }
        }
    }

    /// An optional duration: `default` when absent or invalid (the problem is recorded).
    fn duration_or(&mut self, path: &str, text: Option<&String>, default: Duration) -> Duration {
        text.and_then(|text| self.duration(path, text))
            .unwrap_or(default)
    }

    fn count(&mut self, path: &str, value: u64, min: u64, max: u64) -> Option<usize> {
        if value < min {
            self.problem(path, format!("must be at least {min}"));
            return None;
        }
        if value > max {
            self.problem(path, format!("must be at most {max}"));
            return None;
        }
        match usize::try_from(value) {
            Ok(n) => Some(n),
            Err(_) => {
                self.problem(path, "is too large");
                None
            }
        }
    }

    fn socket_addr(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        let value = self.string(path, text)?;
        match value.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    path,
                    format!(
                        "`{value}` is not an address; write IP:port such as 127.0.0.1:8080, \
                         0.0.0.0:8080 or [::]:8080"
                    ),
                );
                None
            }
        }
    }

    fn networks(&mut self, path: &str, raw: Option<&Vec<String>>) -> Vec<IpNet> {
        let mut networks = Vec::new();
        for (i, text) in raw.into_iter().flatten().enumerate() {
            let path = format!("{path}[{i}]");
            let Some(value) = self.string(&path, text) else {
                continue;
            };
            match parse_network(&value) {
                Some(network) => networks.push(network),
                None => self.problem(
                    &path,
                    format!(
                        "`{value}` is not a network; write CIDR such as 10.0.0.0/8 or \
                         fd00::/8, or a single address"
                    ),
                ),
            }
        }
        networks
    }

    fn rate_limit(&mut self, path: &str, text: &str) -> Option<RateLimit> {
        let value = self.string(path, text)?;
        match parse_rate_limit(&value) {
            Ok(limit) => Some(limit),
            Err(message) => {
                self.problem(path, message);
                None
            }
        }
    }

    fn api_key_header(&mut self, path: &str, text: &str) -> Option<HeaderName> {
        // Besides the headers the proxy strips or sets itself, these carry the message's
        // own meaning; an API key in any of them would be lost or leaked.
        const CONTENT: &[&str] = &["content-length", "content-type", "cookie"];
        let value = self.string(path, text)?;
        let Ok(name) = HeaderName::from_str(&value) else {
            self.problem(
                path,
                format!("`{value}` is not a valid header name; use e.g. X-API-Key"),
            );
            return None;
        };
        if crate::proxy::headers::is_proxy_managed(&name) || CONTENT.contains(&name.as_str()) {
            self.problem(
                path,
                format!(
                    "`{value}` is a header the proxy sets or removes itself; use a dedicated \
                     one such as X-API-Key"
                ),
            );
            return None;
        }
        Some(name)
    }

    /// `routes[].strip_request_headers`: header names, each once. The headers the proxy
    /// sets itself cannot be stripped, nor `Content-Length`, which frames the body.
    fn strip_request_headers(&mut self, path: &str, raw: Option<&Vec<String>>) -> Vec<HeaderName> {
        let mut names: Vec<HeaderName> = Vec::new();
        for (i, text) in raw.into_iter().flatten().enumerate() {
            let path = format!("{path}[{i}]");
            let Some(value) = self.string(&path, text) else {
                continue;
            };
            let Ok(name) = HeaderName::from_str(value.trim()) else {
                self.problem(
                    &path,
                    format!("`{value}` is not a valid header name; write it as in X-Debug-User"),
                );
                continue;
            };
            if crate::proxy::headers::is_proxy_set(&name) || name == http::header::CONTENT_LENGTH {
                self.problem(
                    &path,
                    format!(
                        "`{value}` is set by the proxy itself or frames the body and cannot be \
                         stripped; remove it from the list"
                    ),
                );
                continue;
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    fn tenant_id(&mut self, path: &str, text: &str) -> Option<String> {
        let value = self.non_empty(path, text)?;
        if ["common", "consumers", "organizations"]
            .iter()
            .any(|t| value.eq_ignore_ascii_case(t))
        {
            self.problem(
                path,
                format!(
                    "`{value}` is not a tenant: the client-credentials grant needs the \
                     directory (tenant) ID GUID or a verified domain such as \
                     contoso.onmicrosoft.com"
                ),
            );
            return None;
        }
        let domain_like = value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if !(is_guid(&value) || domain_like) {
            self.problem(
                path,
                "expected the directory (tenant) ID GUID or a domain such as \
                 contoso.onmicrosoft.com",
            );
            return None;
        }
        Some(value)
    }

    fn client_id(&mut self, at: &str, raw: Option<&String>) -> Option<String> {
        let path = format!("{at}.client_id");
        let text = self.required(&path, raw, "the application (client) ID")?;
        let value = self.non_empty(&path, text)?;
        if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
            self.problem(&path, "must not contain spaces or control characters");
            return None;
        }
        Some(value)
    }

    /// An Entra authority (default [`DEFAULT_AUTHORITY`]), without a trailing `/`.
    fn authority(&mut self, path: &str, raw: Option<&String>) -> Option<String> {
        let Some(text) = raw else {
            return Some(DEFAULT_AUTHORITY.to_owned());
        };
        let value = self.string(path, text)?;
        let trimmed = value.trim_end_matches('/');
        self.checked_url(path, trimmed, UrlUse::Authority)?;
        Some(trimmed.to_owned())
    }

    /// `authority`, or `cloud` as its shorthand (docs/credentials.md; Microsoft Entra
    /// "National clouds"), not both.
    fn cloud_authority(
        &mut self,
        at: &str,
        authority: Option<&String>,
        cloud: Option<&String>,
    ) -> Option<String> {
        let Some(text) = cloud else {
            return self.authority(&format!("{at}.authority"), authority);
        };
        let path = format!("{at}.cloud");
        if authority.is_some() {
            self.problem(
                &path,
                format!("set either {at}.cloud or {at}.authority, not both"),
            );
            return None;
        }
        let host = match self.string(&path, text)?.as_str() {
            "public" => DEFAULT_AUTHORITY,
            "usgov" => "https://login.microsoftonline.us",
            "china" => "https://login.chinacloudapi.cn",
            other => {
                self.problem(
                    &path,
                    format!(
                        "unknown cloud `{other}`; use `public` (default), `usgov` or `china`,                          or set `authority` to the authority host"
                    ),
                );
                return None;
            }
        };
        Some(host.to_owned())
    }

    fn url(&mut self, path: &str, text: &str, usage: UrlUse) -> Option<CheckedUrl> {
        let value = self.string(path, text)?;
        self.checked_url(path, &value, usage)
    }

    fn checked_url(&mut self, path: &str, value: &str, usage: UrlUse) -> Option<CheckedUrl> {
        match check_url(value, usage) {
            Ok(url) => Some(url),
            Err(message) => {
                self.problem(path, message);
                None
            }
        }
    }

    fn public_url(&mut self, path: &str, text: &str) -> Option<http::Uri> {
        let value = self.string(path, text)?;
        let url = self.checked_url(path, value.trim_end_matches('/'), UrlUse::PublicUrl)?;
        Some(url.uri)
    }

    fn upstream(
        &mut self,
        path: &str,
        raw: &RawUpstream,
        allow_plain_http: bool,
    ) -> Option<Upstream> {
        let url = match raw {
            RawUpstream::Url(text) => self.string(path, text)?,
            RawUpstream::BusinessCentral(bc) => {
                let tenant = self
                    .required(
                        &format!("{path}.businesscentral.tenant"),
                        bc.tenant.as_ref(),
                        "the tenant ID",
                    )
                    .and_then(|t| self.tenant_id(&format!("{path}.businesscentral.tenant"), t));
                let env_path = format!("{path}.businesscentral.environment");
                let environment = self
                    .required(
                        &env_path,
                        bc.environment.as_ref(),
                        "the environment name, e.g. Production",
                    )
                    .and_then(|t| self.non_empty(&env_path, t))
                    .and_then(|env| {
                        if env
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                        {
                            Some(env)
                        } else {
                            self.problem(
                                &env_path,
                                "may contain only letters, digits, `-` and `_`",
                            );
                            None
                        }
                    });
                format!(
                    "https://api.businesscentral.dynamics.com/v2.0/{}/{}/",
                    tenant?, environment?
                )
            }
            RawUpstream::Dataverse(service) => {
                let base =
                    self.service_url(&format!("{path}.dataverse.url"), service.url.as_ref())?;
                format!("{base}/api/data/v9.2/")
            }
            RawUpstream::FinanceOperations(service) => {
                let base = self.service_url(
                    &format!("{path}.finance_operations.url"),
                    service.url.as_ref(),
                )?;
                format!("{base}/data/")
            }
        };
        let url = self.checked_url(path, &url, UrlUse::Upstream { allow_plain_http })?;
        let mut base_path = url.uri.path().to_owned();
        if !base_path.ends_with('/') {
            base_path.push('/');
        }
        let rebuilt = http::Uri::builder()
            .scheme(url.scheme.clone())
            .authority(url.authority.clone())
            .path_and_query(base_path.as_str())
            .build();
        match rebuilt {
            Ok(uri) => Some(Upstream {
                url: uri,
                scheme: url.scheme,
                authority: url.authority,
                host: url.host,
                base_path,
            }),
            Err(error) => {
                self.problem(path, format!("is not a valid URL: {error}"));
                None
            }
        }
    }

    /// A preset's environment URL (`https://contoso.crm4.dynamics.com`), without a path.
    fn service_url(&mut self, path: &str, raw: Option<&String>) -> Option<String> {
        let text = self.required(
            path,
            raw,
            "the environment URL, e.g. https://contoso.crm4.dynamics.com",
        )?;
        let value = self.string(path, text)?;
        let trimmed = value.trim_end_matches('/');
        let url = self.checked_url(path, trimmed, UrlUse::Authority)?;
        if url.uri.scheme() != Some(&Scheme::HTTPS) || url.uri.path() != "/" {
            self.problem(
                path,
                "expected the environment's https:// URL without a path",
            );
            return None;
        }
        Some(trimmed.to_owned())
    }

    fn prefix(&mut self, path: &str, text: &str) -> Option<String> {
        let value = self.string(path, text)?;
        match check_prefix(&value) {
            Ok(()) => Some(value),
            Err(message) => {
                self.problem(path, message);
                None
            }
        }
    }

    /// A name under `credentials:` or `clients:`; it shows up in logs and metric labels.
    fn name(&mut self, path: &str, name: &str, what: &str) -> bool {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            self.problem(
                path,
                format!("a {what} name may contain only letters, digits, `-` and `_` (up to 64)"),
            );
        }
        ok
    }

    /// A configured path; relative ones resolve against the configuration's directory.
    fn file_path(&mut self, path: &str, text: &str) -> Option<PathBuf> {
        let value = self.non_empty(path, text)?;
        Some(self.source.base_dir.join(value))
    }

    fn existing_file(&mut self, path: &str, text: &str) -> Option<PathBuf> {
        let file = self.file_path(path, text)?;
        match std::fs::metadata(&file) {
            Ok(meta) if meta.is_file() => Some(file),
            Ok(_) => {
                self.problem(path, format!("{} is not a file", file.display()));
                None
            }
            Err(error) => {
                self.problem(path, format!("cannot read {}: {error}", file.display()));
                None
            }
        }
    }
}

/// Says which reference gave an empty value, without any value.
fn empty_message(text: &str, expanded: &Expanded) -> String {
    if expanded.whole_reference {
        format!("`{text}` is empty; it must hold the value")
    } else {
        "must not be empty".to_owned()
    }
}

// ---------------------------------------------------------------------------------------
// Parsers (pure; messages may quote the value, callers only pass non-secrets)

/// `500ms`, `30s`, `5m`, `2h`: an integer and a unit. Zero is refused.
fn parse_duration(value: &str) -> Result<Duration, String> {
    const HINT: &str = "write a whole number and a unit: `500ms`, `30s`, `5m` or `2h`";
    if value.contains(char::is_whitespace) {
        return Err(format!("`{value}` is not a duration; {HINT}"));
    }
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = value.split_at(digits);
    if number.is_empty() {
        return Err(format!("`{value}` is not a duration; {HINT}"));
    }
    let Ok(n) = number.parse::<u64>() else {
        return Err(format!("`{value}` is too long a duration"));
    };
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("`{value}` has no unit; {HINT}")),
        _ => return Err(format!("`{value}` has an unknown unit `{unit}`; {HINT}")),
    };
    if n == 0 {
        return Err(format!("`{value}` is zero; give a positive duration"));
    }
    n.checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{value}` is too long a duration"))
}

/// `100/s`, `20/m`, `6000/5m`, `1000/h`.
/// `YYYY-MM-DD` as 00:00 UTC of that day.
fn parse_date(value: &str) -> Option<SystemTime> {
    let mut parts = value.splitn(3, '-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || d < 1
        || d > month_days[(m - 1) as usize]
    {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(days).ok()? * 86_400))
}

fn parse_rate_limit(value: &str) -> Result<RateLimit, String> {
    const HINT: &str = "write requests per period, such as `100/s`, `20/m` or `6000/5m`";
    let Some((requests, per)) = value.split_once('/') else {
        return Err(format!("`{value}` is not a rate; {HINT}"));
    };
    let requests = match requests.trim().parse::<u32>() {
        Ok(0) | Err(_) => {
            return Err(format!(
                "`{value}` needs a request count of at least 1; {HINT}"
            ));
        }
        Ok(n) => n,
    };
    let per = per.trim();
    let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
        parse_duration(per).map_err(|_| format!("`{value}` has an invalid period; {HINT}"))?
    } else {
        parse_duration(&format!("1{per}"))
            .map_err(|_| format!("`{value}` has an invalid period; {HINT}"))?
    };
    Ok(RateLimit { requests, per })
}

/// CIDR, or a bare address as a single-host network. Host bits are cleared.
fn parse_network(value: &str) -> Option<IpNet> {
    if let Ok(network) = value.parse::<IpNet>() {
        return Some(network.trunc());
    }
    value.parse::<IpAddr>().ok().map(IpNet::from)
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        return Err(format!(
            "`{prefix}` must start and end with `/`, such as `/bc/`"
        ));
    }
    if prefix.contains("//") {
        return Err(format!("`{prefix}` must not contain `//`"));
    }
    if prefix
        .split('/')
        .any(|segment| segment == "." || segment == "..")
        || prefix.contains("..")
    {
        return Err(format!("`{prefix}` must not contain `..` or `.` segments"));
    }
    // Requests with such segments are refused (Windows strips a trailing dot), so a
    // prefix holding one could never match.
    if prefix.split('/').any(|segment| segment.ends_with('.')) {
        return Err(format!(
            "`{prefix}` must not contain a segment ending in `.`"
        ));
    }
    for c in prefix.chars() {
        let problem = match c {
            '%' => "`%` (percent-encoding)",
            '\\' => "`\\`",
            '?' => "`?` (a query)",
            '#' => "`#` (a fragment)",
            ';' => "`;` (requests with it are refused)",
            c if c.is_control() => "a control character",
            c if c.is_whitespace() => "whitespace",
            c if !c.is_ascii() => {
                "a non-ASCII character (request paths carry those percent-encoded)"
            }
            _ => continue,
        };
        return Err(format!("a prefix must not contain {problem}"));
    }
    Ok(())
}

fn is_guid(value: &str) -> bool {
    let groups: Vec<&str> = value.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_visible_ascii(value: &str) -> bool {
    value.bytes().all(|b| b.is_ascii_graphic())
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex, &mut bytes).ok()?;
    Some(bytes)
}

fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    parse_hex32(&hex)
}

// ---------------------------------------------------------------------------------------
// URLs

#[derive(Debug, Clone, Copy)]
enum UrlUse {
    Upstream {
        allow_plain_http: bool,
    },
    TokenEndpoint,
    /// An Entra authority or a service's environment URL: no query.
    Authority,
    PublicUrl,
}

#[derive(Debug)]
struct CheckedUrl {
    uri: http::Uri,
    scheme: Scheme,
    authority: Authority,
    /// Without port; IPv6 in brackets.
    host: String,
}

/// Messages name the host at most: a URL may carry credentials.
fn check_url(value: &str, usage: UrlUse) -> Result<CheckedUrl, String> {
    const ABSOLUTE: &str = "must be an absolute URL such as https://host/path";
    if value.contains('#') {
        return Err("must not have a fragment (`#…`)".to_owned());
    }
    let uri: http::Uri = value
        .parse()
        .map_err(|error| format!("is not a valid URL ({error}); it {ABSOLUTE}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
        return Err(ABSOLUTE.to_owned());
    };
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(format!(
            "scheme `{scheme}` is not http or https; it {ABSOLUTE}"
        ));
    }
    if authority.as_str().contains('@') {
        return Err(
            "must not contain user info (`user:password@`); credentials belong under \
             `credentials:`"
                .to_owned(),
        );
    }
    if authority.port().is_some() && authority.port_u16().is_none_or(|p| p == 0) {
        return Err("has an invalid port".to_owned());
    }
    let host = authority.host().to_owned();
    if host.is_empty() {
        return Err(format!("has no host; it {ABSOLUTE}"));
    }
    if uri.query().is_some() && !matches!(usage, UrlUse::TokenEndpoint) {
        return Err("must not have a query (`?…`)".to_owned());
    }
    match classify_host(&host) {
        HostKind::LinkLocal => {
            return Err(format!(
                "host {host} is link-local (169.254.0.0/16, fe80::/10), which is refused: \
                 it reaches cloud metadata services"
            ));
        }
        HostKind::Unusable => {
            return Err(format!(
                "host {host} is not usable; write a DNS name or a dotted-quad IPv4 / bracketed \
                 IPv6 address"
            ));
        }
        HostKind::Loopback | HostKind::Other => {}
    }
    if scheme == Scheme::HTTP && classify_host(&host) != HostKind::Loopback {
        let message = match usage {
            UrlUse::Upstream {
                allow_plain_http: true,
            }
            | UrlUse::PublicUrl => None,
            UrlUse::Upstream {
                allow_plain_http: false,
            } => Some(
                "`http://` is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost); \
                 use https:// or set `allow_plain_http: true` on the route",
            ),
            UrlUse::TokenEndpoint | UrlUse::Authority => Some(
                "`http://` is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost); \
                 token endpoints need https://",
            ),
        };
        if let Some(message) = message {
            return Err(format!("{message} (host {host})"));
        }
    }
    Ok(CheckedUrl {
        uri,
        scheme,
        authority,
        host,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum HostKind {
    Loopback,
    LinkLocal,
    /// Unspecified addresses, and numbers that resolvers read as IPv4 (`2852039166`,
    /// `0xa9.254.169.254`) but a reader would not.
    Unusable,
    Other,
}

fn classify_host(host: &str) -> HostKind {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.parse::<Ipv6Addr>() {
            Ok(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => classify_v4(v4),
                None => classify_v6(ip),
            },
            Err(_) => HostKind::Unusable,
        };
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return classify_v4(ip);
    }
    if host.eq_ignore_ascii_case("localhost") {
        return HostKind::Loopback;
    }
    // WHATWG URL: a host whose last label is numeric is an IPv4 address in some notation.
    let last = host.trim_end_matches('.').rsplit('.').next().unwrap_or("");
    if last.starts_with(|c: char| c.is_ascii_digit()) {
        return HostKind::Unusable;
    }
    HostKind::Other
}

fn classify_v4(ip: Ipv4Addr) -> HostKind {
    if ip.is_loopback() {
        HostKind::Loopback
    } else if ip.is_link_local() {
        HostKind::LinkLocal
    } else if ip.is_unspecified() || ip.is_broadcast() {
        HostKind::Unusable
    } else {
        HostKind::Other
    }
}

fn classify_v6(ip: Ipv6Addr) -> HostKind {
    if ip.is_loopback() {
        HostKind::Loopback
    } else if ip.is_unicast_link_local() {
        HostKind::LinkLocal
    } else if ip.is_unspecified() {
        HostKind::Unusable
    } else {
        HostKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(
            parse_duration("30").unwrap_err(),
            "`30` has no unit; write a whole number and a unit: `500ms`, `30s`, `5m` or `2h`"
        );
        assert!(parse_duration("0s").unwrap_err().contains("is zero"));
        assert!(
            parse_duration("1.5s")
                .unwrap_err()
                .contains("unknown unit `.5s`")
        );
        assert!(
            parse_duration("s")
                .unwrap_err()
                .contains("is not a duration")
        );
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 m").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("9999999999999999h").is_err());
    }

    #[test]
    fn rate_limits() {
        let rate = |requests, secs| RateLimit {
            requests,
            per: Duration::from_secs(secs),
        };
        assert_eq!(parse_rate_limit("100/s"), Ok(rate(100, 1)));
        assert_eq!(parse_rate_limit("20/m"), Ok(rate(20, 60)));
        assert_eq!(parse_rate_limit("6000/5m"), Ok(rate(6000, 300)));
        assert_eq!(parse_rate_limit("10/h"), Ok(rate(10, 3600)));
        for bad in ["0/s", "100", "100/", "100/x", "/s", "-1/s", "100/0s"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        for good in ["/", "/bc/", "/bc-sandbox/v2.0/", "/a~b/"] {
            assert_eq!(check_prefix(good), Ok(()), "{good}");
        }
        for bad in [
            "bc/", "/bc", "", "/a//b/", "/../", "/a/../", "/./", "/a..b/", "/a%2f/", "/a\\b/",
            "/a?b/", "/a#b/", "/a\tb/", "/a b/", "/é/", "/a;b/", "/a./", "/v2./x/",
        ] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts() {
        for (host, kind) in [
            ("127.0.0.1", HostKind::Loopback),
            ("127.1.2.3", HostKind::Loopback),
            ("[::1]", HostKind::Loopback),
            ("LOCALHOST", HostKind::Loopback),
            ("[::ffff:127.0.0.1]", HostKind::Loopback),
            ("169.254.169.254", HostKind::LinkLocal),
            ("[fe80::1]", HostKind::LinkLocal),
            ("[febf::1]", HostKind::LinkLocal),
            ("[::ffff:169.254.169.254]", HostKind::LinkLocal),
            ("2852039166", HostKind::Unusable),
            ("0xa9.254.169.254", HostKind::Unusable),
            ("169.254.43518", HostKind::Unusable),
            ("0.0.0.0", HostKind::Unusable),
            ("[::]", HostKind::Unusable),
            ("api.businesscentral.dynamics.com", HostKind::Other),
            ("10.1.2.3", HostKind::Other),
            ("[fec0::1]", HostKind::Other),
        ] {
            assert_eq!(classify_host(host), kind, "{host}");
        }
    }

    #[test]
    fn urls() {
        let upstream = UrlUse::Upstream {
            allow_plain_http: false,
        };
        assert!(check_url("https://example.com/a/", upstream).is_ok());
        assert!(check_url("http://127.0.0.1:8081/", upstream).is_ok());
        assert!(check_url("http://example.com/", upstream).is_err());
        assert!(
            check_url(
                "http://example.com/",
                UrlUse::Upstream {
                    allow_plain_http: true
                }
            )
            .is_ok()
        );
        assert!(
            check_url("https://user:pw@example.com/", upstream)
                .unwrap_err()
                .contains("user info")
        );
        assert!(check_url("https://example.com/?a=1", upstream).is_err());
        assert!(check_url("https://example.com/?a=1", UrlUse::TokenEndpoint).is_ok());
        assert!(check_url("https://example.com/#x", UrlUse::TokenEndpoint).is_err());
        assert!(check_url("ftp://example.com/", upstream).is_err());
        assert!(check_url("/relative/", upstream).is_err());
        assert!(check_url("example.com", upstream).is_err());
        assert!(check_url("https://example.com:0/", upstream).is_err());
        assert!(check_url("https://169.254.169.254/", upstream).is_err());
        assert!(check_url("http://[::1]:9000/token", UrlUse::TokenEndpoint).is_ok());
        assert!(check_url("http://idp.example/token", UrlUse::TokenEndpoint).is_err());
    }

    #[test]
    fn networks() {
        assert_eq!(parse_network("10.0.0.0/8"), "10.0.0.0/8".parse().ok());
        assert_eq!(parse_network("10.1.2.3/8"), "10.0.0.0/8".parse().ok());
        assert_eq!(parse_network("10.1.2.3"), "10.1.2.3/32".parse().ok());
        assert_eq!(parse_network("::1"), "::1/128".parse().ok());
        assert_eq!(parse_network("10.0.0.0/33"), None);
        assert_eq!(parse_network("nope"), None);
    }

    #[test]
    fn guids() {
        assert!(is_guid("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        assert!(!is_guid("72f988bf-86f1-41af-91ab-2d7cd011db4"));
        assert!(!is_guid("contoso.onmicrosoft.com"));
    }
}
