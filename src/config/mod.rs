//! Configuration: the YAML schema of `proxy.yaml`, `${…}` expansion and validation.
//!
//! Loading happens in two stages. [`raw`] mirrors the YAML one to one (serde, unknown
//! fields rejected); [`validate`] turns it into the typed [`Config`] below, reporting every
//! problem at once with its YAML path (`routes[2].upstream`). Nothing downstream parses a
//! string again: URLs are `http::Uri`, durations `Duration`, secrets [`Secret`] or digests.
//! The YAML parser sits behind [`Config::from_yaml_str`] alone.

mod expand;
mod raw;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use http::uri::{Authority, Scheme};
use ipnet::IpNet;

use crate::secret::{Secret, SecretDigest};

pub use expand::Variables;

/// Default `server.listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default Entra ID authority host.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";

/// A validated configuration. Built only by [`Config::load`] / [`Config::from_yaml_str`].
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub admin: Option<Admin>,
    /// Sorted by name.
    pub credentials: Vec<Credential>,
    /// In file order.
    pub clients: Vec<Client>,
    /// In file order.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub public_url: Option<http::Uri>,
    pub trusted_proxies: Vec<IpNet>,
    pub upstream_ca_file: Option<PathBuf>,
    pub api_key_header: HeaderName,
    pub workers: Option<usize>,
    pub tls: Option<ServerTls>,
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            max_body_bytes: 350 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
            max_connections: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub name: String,
    pub kind: CredentialKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialKind {
    ClientSecret(ClientSecret),
    ClientCertificate(ClientCertificate),
    ManagedIdentity(ManagedIdentity),
    WorkloadIdentity(WorkloadIdentity),
}

impl CredentialKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::ClientSecret(_) => "client_secret",
            Self::ClientCertificate(_) => "client_certificate",
            Self::ManagedIdentity(_) => "managed_identity",
            Self::WorkloadIdentity(_) => "workload_identity",
        }
    }

    /// Whether the identity provider is Microsoft Entra ID, which takes `scope=<resource>/.default`.
    pub fn is_entra(&self) -> bool {
        match self {
            Self::ClientSecret(c) => c.endpoint.is_entra(),
            Self::ClientCertificate(_) | Self::ManagedIdentity(_) | Self::WorkloadIdentity(_) => {
                true
            }
        }
    }
}

/// OAuth 2.0 client-credentials grant with a shared secret (RFC 6749 §4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSecret {
    pub endpoint: TokenEndpoint,
    pub client_id: String,
    pub client_secret: Secret,
    pub auth_method: ClientAuthMethod,
    /// Extra form fields, in file order.
    pub params: Vec<(String, String)>,
}

/// Where tokens are requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEndpoint {
    /// `{authority}/{tenant_id}/oauth2/v2.0/token`.
    Entra {
        authority: String,
        tenant_id: String,
        url: http::Uri,
    },
    /// Any RFC 6749 token endpoint (`token_url`).
    Generic { url: http::Uri },
}

impl TokenEndpoint {
    pub fn url(&self) -> &http::Uri {
        match self {
            Self::Entra { url, .. } | Self::Generic { url } => url,
        }
    }

    pub fn is_entra(&self) -> bool {
        matches!(self, Self::Entra { .. })
    }
}

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMethod {
    /// `client_id` and `client_secret` in the form body (default; what Entra documents).
    Post,
    /// `Authorization: Basic` with form-urlencoded id and secret.
    Basic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub authority: String,
    pub tenant_id: String,
    pub client_id: String,
    pub certificate_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedIdentity {
    pub client_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub token_file: Option<PathBuf>,
    pub authority: Option<String>,
}

/// A caller of the proxy.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    pub basic: Option<BasicCredential>,
    pub api_key: Option<SecretDigest>,
    /// Empty: any source address.
    pub networks: Vec<IpNet>,
    pub rate_limit: Option<RateLimit>,
    pub certificate: Option<CertificateMatch>,
}

#[derive(Debug, Clone)]
pub struct BasicCredential {
    pub username: String,
    pub password: SecretDigest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateMatch {
    SubjectCn(String),
    FingerprintSha256([u8; 32]),
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Starts and ends with `/`.
    pub prefix: String,
    pub upstream: Upstream,
    /// Name of an entry in [`Config::credentials`].
    pub credential: String,
    /// The scope requested for this route's token. `None` only for generic (non-Entra)
    /// token endpoints when the route sets none: then no `scope` is sent.
    pub scope: Option<String>,
    /// Names of entries in [`Config::clients`]; never empty.
    pub clients: Vec<String>,
    pub timeout: Duration,
    pub rewrite_links: bool,
    pub max_concurrent: Option<usize>,
    pub max_queue: Option<usize>,
    pub queue_timeout: Option<Duration>,
    pub retry_on_429: Option<RetryOn429>,
    pub allow_plain_http: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn429 {
    pub attempts: u32,
    pub max_wait: Duration,
}

/// A route's upstream base URL, split once so the hot path only concatenates.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub url: http::Uri,
    pub scheme: Scheme,
    pub authority: Authority,
    /// The host without port, for the default scope and for logs.
    pub host: String,
    /// Always ends with `/`.
    pub base_path: String,
}

/// Where a configuration comes from: its name in messages, the directory that relative
/// `${file:…}` paths resolve against, and the variables `${NAME}` reads.
pub struct Source {
    pub name: String,
    pub base_dir: PathBuf,
    pub variables: Variables,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("base_dir", &self.base_dir)
            .finish_non_exhaustive()
    }
}

impl Source {
    /// A file read with the process environment.
    pub fn file(path: &Path) -> Self {
        Self {
            name: path.display().to_string(),
            base_dir: path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            variables: Variables::process(),
        }
    }

    /// An in-memory document with the given variables (tests, the `dev` demo).
    pub fn inline(name: &str, variables: HashMap<String, String>) -> Self {
        Self {
            name: name.to_owned(),
            base_dir: PathBuf::from("."),
            variables: Variables::map(variables),
        }
    }
}

/// One problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// YAML path such as `routes[2].upstream`; empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}{}: {message}", location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Syntax {
        file: String,
        /// Line and column, 1-based.
        location: Option<(usize, usize)>,
        message: String,
    },
    #[error("{file}: {} problem{}:\n{}", problems.len(), if problems.len() == 1 { "" } else { "s" },
        problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem as `path: message` (syntax errors give one).
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            Self::Read { source, .. } => vec![Problem {
                path: String::new(),
                message: format!("cannot read: {source}"),
            }],
            Self::Syntax { message, .. } => vec![Problem {
                path: String::new(),
                message: message.clone(),
            }],
            Self::Invalid { problems, .. } => problems.clone(),
        }
    }
}

/// Largest configuration file accepted (a YAML bomb guard).
const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

impl Config {
    /// Reads and validates a configuration file, expanding variables from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = Source::file(path);
        let text = read_bounded(path).map_err(|source_err| ConfigError::Read {
            file: source.name.clone(),
            source: source_err,
        })?;
        Self::from_yaml_str(&text, &source)
    }

    /// Parses and validates a YAML document. The only place that knows the YAML parser.
    pub fn from_yaml_str(text: &str, source: &Source) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = raw::parse(text).map_err(|error| ConfigError::Syntax {
            file: source.name.clone(),
            location: error.location,
            message: error.message,
        })?;
        validate::validate(&raw, source).map_err(|problems| ConfigError::Invalid {
            file: source.name.clone(),
            problems,
        })
    }

    pub fn credential(&self, name: &str) -> Option<&Credential> {
        self.credentials.iter().find(|c| c.name == name)
    }

    pub fn route(&self, prefix: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.prefix == prefix)
    }
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_CONFIG_BYTES / 1024 / 1024
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests;
