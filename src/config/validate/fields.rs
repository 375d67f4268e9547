//! Field types shared by every section: `${…}` expansion, secrets, durations, counts,
//! addresses, header names, GUIDs, URLs, file paths. Each records a problem at its YAML
//! path and returns `None` when the value is unusable.

use super::Validator;
use super::parse::{
    CheckedUrl, UrlUse, check_prefix, check_url, is_guid, is_visible_ascii, parse_duration,
    parse_hex32, parse_network, parse_rate_limit,
};
use crate::config::expand::{self, Expanded};
use crate::config::raw::RawUpstream;
use crate::config::{DEFAULT_AUTHORITY, Problem, RateLimit, Upstream};
use crate::secret::{Secret, SecretDigest};
use http::HeaderName;
use http::uri::Scheme;
use ipnet::IpNet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

impl Validator<'_> {
    pub(super) fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn required<'r>(
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

    pub(super) fn expand(&mut self, path: &str, text: &str) -> Option<Expanded> {
        let result = expand::expand(text, &self.source.variables, &self.source.base_dir);
        self.expanded(path, result)
    }

    /// The expansion, or its messages as problems at `path`.
    fn expanded(&mut self, path: &str, result: Result<Expanded, Vec<String>>) -> Option<Expanded> {
        result
            .map_err(|messages| {
                for message in messages {
                    self.problem(path, message);
                }
            })
            .ok()
    }

    /// Expansion in a secret field: `${secret:STORE/NAME}` is allowed and recorded.
    pub(super) fn expand_secret(&mut self, path: &str, text: &str) -> Option<Expanded> {
        let (stores, values) = (&self.store_names, self.values);
        let mut found = Vec::new();
        let mut resolve = |reference: &str| -> Result<String, String> {
            let (store, name) = super::stores::split_reference(reference)?;
            if !stores.iter().any(|s| s == store) {
                return Err(format!(
                    "`${{secret:{reference}}}`: secret store `{store}` is not defined in \
                     `secret_stores`"
                ));
            }
            found.push((store.to_owned(), name.to_owned()));
            match values.map(|v| v.get(store, name)) {
                None => Ok(super::stores::placeholder(store, name)),
                Some(Some(stored)) => Ok(stored.value.expose().to_owned()),
                Some(None) => Err(format!(
                    "`${{secret:{reference}}}`: secret `{name}` was not read from store `{store}`"
                )),
            }
        };
        let result = expand::expand_with(
            text,
            &self.source.variables,
            &self.source.base_dir,
            Some(&mut resolve),
        );
        for (store, name) in found {
            self.references.push(crate::config::SecretReference {
                path: path.to_owned(),
                store,
                name,
            });
        }
        self.expanded(path, result)
    }

    pub(super) fn string(&mut self, path: &str, text: &str) -> Option<String> {
        self.expand(path, text).map(|e| e.value)
    }

    /// A string that must not be empty or blank after expansion.
    pub(super) fn non_empty(&mut self, path: &str, text: &str) -> Option<String> {
        let expanded = self.expand(path, text)?;
        if expanded.value.trim().is_empty() {
            self.problem(path, empty_message(text, &expanded));
            return None;
        }
        Some(expanded.value)
    }

    /// A secret sent to an identity provider. A literal is allowed (the operator chose to
    /// write it into the file); empty is not: an empty secret must never reach the wire.
    pub(super) fn secret(&mut self, path: &str, text: &str) -> Option<Secret> {
        let expanded = self.expand_secret(path, text)?;
        if expanded.value.trim().is_empty() {
            self.problem(path, empty_message(text, &expanded));
            return None;
        }
        Some(Secret::new(expanded.value))
    }

    /// An inbound password or API key: a `sha256:` digest, or the plain secret wholly from
    /// `${VAR}` / `${file:PATH}` (hashed here). A literal plain secret in the YAML is refused.
    pub(super) fn inbound_secret(
        &mut self,
        path: &str,
        text: &str,
        header_value: bool,
    ) -> Option<SecretDigest> {
        let expanded = self.expand_secret(path, text)?;
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

    pub(super) fn duration(&mut self, path: &str, text: &str) -> Option<Duration> {
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
    pub(super) fn duration_or(
        &mut self,
        path: &str,
        text: Option<&String>,
        default: Duration,
    ) -> Duration {
        text.and_then(|text| self.duration(path, text))
            .unwrap_or(default)
    }

    pub(super) fn count(&mut self, path: &str, value: u64, min: u64, max: u64) -> Option<usize> {
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

    pub(super) fn socket_addr(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
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

    pub(super) fn networks(&mut self, path: &str, raw: Option<&Vec<String>>) -> Vec<IpNet> {
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

    pub(super) fn rate_limit(&mut self, path: &str, text: &str) -> Option<RateLimit> {
        let value = self.string(path, text)?;
        match parse_rate_limit(&value) {
            Ok(limit) => Some(limit),
            Err(message) => {
                self.problem(path, message);
                None
            }
        }
    }

    pub(super) fn api_key_header(&mut self, path: &str, text: &str) -> Option<HeaderName> {
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
        if crate::header_names::is_proxy_managed(&name) || CONTENT.contains(&name.as_str()) {
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
    pub(super) fn strip_request_headers(
        &mut self,
        path: &str,
        raw: Option<&Vec<String>>,
    ) -> Vec<HeaderName> {
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
            if crate::header_names::is_proxy_set(&name) || name == http::header::CONTENT_LENGTH {
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

    pub(super) fn tenant_id(&mut self, path: &str, text: &str) -> Option<String> {
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

    pub(super) fn client_id(&mut self, at: &str, raw: Option<&String>) -> Option<String> {
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
    pub(super) fn authority(&mut self, path: &str, raw: Option<&String>) -> Option<String> {
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
    pub(super) fn cloud_authority(
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

    pub(super) fn url(&mut self, path: &str, text: &str, usage: UrlUse) -> Option<CheckedUrl> {
        let value = self.string(path, text)?;
        self.checked_url(path, &value, usage)
    }

    pub(super) fn checked_url(
        &mut self,
        path: &str,
        value: &str,
        usage: UrlUse,
    ) -> Option<CheckedUrl> {
        match check_url(value, usage) {
            Ok(url) => Some(url),
            Err(message) => {
                self.problem(path, message);
                None
            }
        }
    }

    pub(super) fn public_url(&mut self, path: &str, text: &str) -> Option<http::Uri> {
        let value = self.string(path, text)?;
        let url = self.checked_url(path, value.trim_end_matches('/'), UrlUse::PublicUrl)?;
        Some(url.uri)
    }

    pub(super) fn upstream(
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
    pub(super) fn service_url(&mut self, path: &str, raw: Option<&String>) -> Option<String> {
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

    pub(super) fn prefix(&mut self, path: &str, text: &str) -> Option<String> {
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
    pub(super) fn name(&mut self, path: &str, name: &str, what: &str) -> bool {
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
    pub(super) fn file_path(&mut self, path: &str, text: &str) -> Option<PathBuf> {
        let value = self.non_empty(path, text)?;
        Some(self.source.base_dir.join(value))
    }

    pub(super) fn existing_file(&mut self, path: &str, text: &str) -> Option<PathBuf> {
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
pub(super) fn empty_message(text: &str, expanded: &Expanded) -> String {
    if expanded.whole_reference {
        format!("`{text}` is empty; it must hold the value")
    } else {
        "must not be empty".to_owned()
    }
}
