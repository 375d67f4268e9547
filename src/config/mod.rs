//! Configuration: the YAML schema of `proxy.yaml`, `${…}` expansion and validation.
//!
//! Loading happens in two stages. [`raw`] mirrors the YAML one to one (serde, unknown
//! fields rejected); [`validate`] turns it into the typed [`Config`] below, reporting every
//! problem at once with its YAML path (`routes[2].upstream`). Nothing downstream parses a
//! string again: URLs are `http::Uri`, durations `Duration`, secrets [`Secret`] or digests.
//! The YAML parser sits behind [`Config::from_yaml_str`] alone. `${secret:STORE/NAME}`
//! references are recorded here with their paths; the values come from the second stage.

mod expand;
mod permissions;
mod raw;
mod schema;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use http::HeaderName;
use http::uri::{Authority, Scheme};
use ipnet::IpNet;

use crate::secret::{Secret, SecretDigest};

pub use expand::Variables;
pub use permissions::inline_secret_warning;
pub use schema::json_schema;
pub(crate) use validate::{is_guid, is_loopback_host};

/// Default `server.listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default Entra ID authority host.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";

/// A validated configuration. Built only by [`Config::load`] / [`Config::from_yaml_str`].
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub admin: Option<Admin>,
    /// Fleet mode (`cluster`), when configured.
    pub cluster: Option<Cluster>,
    /// Sorted by name.
    pub credentials: Vec<Credential>,
    /// In file order.
    pub clients: Vec<Client>,
    /// In file order.
    pub routes: Vec<Route>,
    /// `secret_stores`, the `${secret:STORE/NAME}` references and the values read.
    pub secret_stores: SecretStores,
    /// What the second stage parsed from the files named above; empty after stage one.
    pub(crate) prepared: Prepared,
}

/// What the second stage (`src/preflight.rs`) read and parsed from the files a
/// configuration names (client certificates, upstream CA roots), handed to the components
/// that use them so that each file is read and parsed once per load. Opaque here, since
/// configuration is data and knows none of the parsed types: each owner stores its own
/// type and finds it again by type. Cloning shares the parsed material.
#[derive(Clone, Default)]
pub(crate) struct Prepared(Vec<std::sync::Arc<dyn std::any::Any + Send + Sync>>);

impl Prepared {
    /// Adds (or replaces) the value of type `T`.
    pub(crate) fn insert<T: std::any::Any + Send + Sync>(&mut self, value: T) {
        self.0.retain(|held| !held.is::<T>());
        self.0.push(std::sync::Arc::new(value));
    }

    /// The value of type `T`, if the second stage stored one.
    pub(crate) fn get<T: std::any::Any + Send + Sync>(&self) -> Option<&T> {
        self.0.iter().find_map(|held| held.downcast_ref::<T>())
    }
}

impl fmt::Debug for Prepared {
    // Parsed key material never reaches Debug output: only how many items are held.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Prepared {{ items: {} }}", self.0.len())
    }
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub public_url: Option<http::Uri>,
    pub trusted_proxies: Vec<IpNet>,
    pub upstream_ca_file: Option<PathBuf>,
    pub api_key_header: HeaderName,
    /// Forward request headers whose names contain `_` (dropped by default).
    pub allow_underscore_headers: bool,
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
    /// Longest pause between two pieces of a request body (a slow-POST guard).
    pub body_idle_timeout: Duration,
    /// A connection with no request in flight for this long is closed (gracefully).
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            max_body_bytes: 350 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
            request_timeout: Duration::from_secs(600),
            max_connections: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Protects the status page (`/`, `/status.json`, `/status/test`); required when
    /// `listen` is not a loopback address.
    pub auth: Option<AdminAuth>,
}

/// `cluster`: the Redis that the replicas of a fleet share their limits through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub redis: RedisUrl,
    /// Prefix of every key (default `s2s-proxy`).
    pub key_prefix: String,
    /// Budget of one Redis round trip (default 5 ms); past it the replica uses its local
    /// limits until Redis answers again.
    pub timeout: std::time::Duration,
}

/// Default `cluster.key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "s2s-proxy";
/// Default `cluster.timeout`.
pub const DEFAULT_CLUSTER_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(5);

/// A validated Redis URL (`redis://` or `rediss://`). It may hold a password, so its
/// `Debug` and `Display` show [`RedisUrl::redacted`], never the URL itself.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    url: Secret,
    redacted: String,
}

impl RedisUrl {
    pub(crate) fn new(url: Secret, redacted: String) -> Self {
        Self { url, redacted }
    }

    /// The URL with its password, for the Redis client only.
    pub fn expose(&self) -> &str {
        self.url.expose()
    }

    /// The URL with any user information replaced by `****`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// `rediss://`: TLS with certificate verification.
    pub fn is_tls(&self) -> bool {
        self.redacted.starts_with("rediss://")
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({})", self.redacted)
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// `admin.auth`: either or both of Basic and an API key (in `server.api_key_header`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminAuth {
    /// User name and password digest.
    pub basic: Option<(String, SecretDigest)>,
    pub api_key: Option<SecretDigest>,
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
            Self::ClientCertificate(c) => c.endpoint.is_entra(),
            Self::ManagedIdentity(_) | Self::WorkloadIdentity(_) => true,
        }
    }
}

/// OAuth 2.0 client-credentials grant with a shared secret (RFC 6749 §4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSecret {
    pub endpoint: TokenEndpoint,
    pub client_id: String,
    /// `client_secret`, or the `client_secrets` list in file order: the first is tried
    /// first, the next after `invalid_client` (rotation). Never empty.
    pub client_secrets: Vec<ConfiguredSecret>,
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

/// A secret sent to an identity provider, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredSecret {
    pub value: Secret,
    /// The file when the value was written wholly as `${file:PATH}`: it is read again after
    /// `invalid_client` and on reload (a rotated secret file needs no restart).
    pub file: Option<PathBuf>,
    /// `expires:` as configured (the start of that UTC day), for expiry warnings.
    pub expires: Option<SystemTime>,
}

impl ConfiguredSecret {
    /// Reads [`ConfiguredSecret::file`] again, with the same rules as `${file:PATH}`.
    pub(crate) fn reread(file: &Path) -> Result<Secret, String> {
        expand::reread_file(file).map(Secret::new)
    }
}

/// `client_certificate`: a signed client assertion (RFC 7523, Entra "certificate
/// credentials").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// Entra (`tenant_id`) or any RFC 7523 server (`token_url`). The assertion's `aud` is
    /// this URL.
    pub endpoint: TokenEndpoint,
    pub client_id: String,
    /// `certificate_file`, or the `certificate_files` list: tried in order, the next after
    /// `invalid_client` (rotation). Never empty.
    pub certificates: Vec<CertificateFile>,
    pub assertion_alg: AssertionAlg,
    /// Add `x5c` (the chain) to the assertion header, for subject-name/issuer registration.
    pub send_certificate_chain: bool,
}

/// A PEM file (certificate and key) or a PKCS#12 / .pfx file with its password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFile {
    /// The file; for a certificate from a secret store, `STORE/NAME (secret store)`, shown
    /// in messages.
    pub path: PathBuf,
    /// PKCS#12 only; PEM keys must be unencrypted.
    pub password: Option<Secret>,
    /// The file's contents when they come from a secret store (`${secret:STORE/NAME}`, a
    /// Key Vault certificate's secret: PEM, or PKCS#12 in base64); `None`: read `path`.
    pub content: Option<Secret>,
}

/// The client assertion's signature algorithm and thumbprint header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssertionAlg {
    /// RSA-PSS SHA-256 with `x5t#S256` (Entra's current documentation; default).
    Ps256,
    /// RSA PKCS#1 v1.5 SHA-256 with `x5t` (SHA-1 thumbprint; older SDKs).
    Rs256,
    /// ECDSA P-256 SHA-256 with `x5t#S256`; generic `token_url` servers only (Entra ID
    /// takes RSA keys only).
    Es256,
}

impl AssertionAlg {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ps256 => "PS256",
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

/// `managed_identity`: the platform's token service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedIdentity {
    /// A user-assigned identity; `None`: the system-assigned one.
    pub selector: Option<IdentitySelector>,
    pub endpoint: ManagedIdentityEndpoint,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySelector {
    ClientId(String),
    ObjectId(String),
    /// The identity's Azure resource ID.
    ResourceId(String),
}

/// Where a managed identity gets its tokens, decided from the environment at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagedIdentityEndpoint {
    /// App Service, Functions, Container Apps: `IDENTITY_ENDPOINT` + `IDENTITY_HEADER`.
    AppService { url: http::Uri, header: Secret },
    /// Azure VM / VMSS instance metadata service (169.254.169.254).
    Imds,
}

/// `workload_identity`: the projected Kubernetes token as a client assertion. Resolved from
/// the YAML fields, else `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`
/// and `AZURE_AUTHORITY_HOST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub endpoint: TokenEndpoint,
    pub client_id: String,
    /// Read for every token request: the kubelet rotates it.
    pub token_file: PathBuf,
}

/// `secret_stores` and what the configuration takes from them. Data only: the second stage
/// (`crate::preflight`) reads the values with `crate::secret_store` and validates the
/// document again with them ([`Config::with_secret_values`]).
#[derive(Debug, Clone, Default)]
pub struct SecretStores {
    /// Sorted by name.
    pub stores: Vec<SecretStore>,
    /// Every `${secret:STORE/NAME}`, in document order, with the YAML path it stands at.
    pub references: Vec<SecretReference>,
    /// The values the second stage read; empty after stage one, when every reference
    /// stands for a placeholder.
    pub values: SecretValues,
    /// The parsed document, to validate again with new values (start-up, refresh).
    origin: Option<std::sync::Arc<Origin>>,
}

impl SecretStores {
    pub fn store(&self, name: &str) -> Option<&SecretStore> {
        self.stores.iter().find(|s| s.name == name)
    }

    /// The distinct (store, secret) pairs referenced, in first-use order.
    pub fn wanted(&self) -> Vec<(String, String)> {
        let mut wanted: Vec<(String, String)> = Vec::new();
        for r in &self.references {
            let key = (r.store.clone(), r.name.clone());
            if !wanted.contains(&key) {
                wanted.push(key);
            }
        }
        wanted
    }
}

/// `secret_stores.NAME` of `type: azure_key_vault`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretStore {
    pub name: String,
    /// The vault's base URL without a trailing `/` (`https://contoso-kv.vault.azure.net`).
    pub url: String,
    /// A `managed_identity`, `workload_identity` or `client_certificate` credential.
    pub credential: String,
    /// How often the referenced secrets are read again.
    pub refresh: Duration,
}

/// Default `secret_stores.*.refresh`.
pub const DEFAULT_SECRET_REFRESH: Duration = Duration::from_secs(10 * 60);

/// One `${secret:STORE/NAME}` in the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretReference {
    /// YAML path of the field, e.g. `credentials.bc.client_secret`.
    pub path: String,
    pub store: String,
    pub name: String,
}

/// A secret as read from a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSecret {
    pub value: Secret,
    /// The version (last segment of Key Vault's `id`).
    pub version: String,
    /// The secret's `exp` attribute, if set.
    pub expires: Option<SystemTime>,
}

/// Values read from the stores, by (store, secret name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretValues(pub std::collections::BTreeMap<(String, String), StoredSecret>);

impl SecretValues {
    pub fn get(&self, store: &str, name: &str) -> Option<&StoredSecret> {
        self.0.get(&(store.to_owned(), name.to_owned()))
    }
}

/// The parsed document and where it came from: what [`Config::with_secret_values`]
/// validates again.
struct Origin {
    raw: raw::RawConfig,
    name: String,
    base_dir: PathBuf,
    variables: Variables,
}

impl fmt::Debug for Origin {
    // The raw document may hold literal secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
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

impl RateLimit {
    /// The limit as GCRA sees it: the time between two requests at the sustained rate,
    /// and how far ahead of now the theoretical arrival time may run (the burst, so that
    /// `requests` may come at once).
    pub(crate) fn gcra(self) -> (Duration, Duration) {
        let interval = self.per / self.requests.max(1);
        (interval, self.per.saturating_sub(interval))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateMatch {
    SubjectCn(String),
    /// A DNS name among the certificate's subject alternative names (stored lowercase).
    SanDns(String),
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
    /// Set exactly when `max_concurrent` or `upstream_rate_limit` is: validation applies
    /// the default (or the preset's) here, once.
    pub max_queue: Option<usize>,
    /// Set exactly when `max_queue` is.
    pub queue_timeout: Option<Duration>,
    pub retry_on_429: Option<RetryOn429>,
    /// At most `requests` sent upstream in any window of length `per` (a sliding window);
    /// callers wait in the route's queue.
    pub upstream_rate_limit: Option<RateLimit>,
    pub allow_plain_http: bool,
    /// Request headers removed before forwarding, besides the built-in header policy.
    pub strip_request_headers: Vec<HeaderName>,
    /// What `s2s-proxy doctor` requests, relative to the upstream base; `None`: derived
    /// from the service (BC `companies`, Dataverse `WhoAmI`, F&O `$metadata`).
    pub doctor_path: Option<String>,
    /// The service preset `upstream:` was written as, if any; its defaults are applied.
    pub preset: Option<Preset>,
}

/// Longest wait in a route's queue when `queue_timeout` is not set.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);
/// Queue size of a route with `max_concurrent` but no `max_queue` (and no preset).
pub const DEFAULT_MAX_QUEUE: usize = 100;

/// `upstream: { businesscentral | dataverse | finance_operations: … }`: the URL and scope
/// are derived, and these defaults apply to whatever the route leaves unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    BusinessCentral,
    Dataverse,
    FinanceOperations,
}

/// What a preset sets unless the route says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresetDefaults {
    pub timeout: Option<Duration>,
    pub max_concurrent: Option<usize>,
    pub max_queue: Option<usize>,
    pub retry_on_429: Option<RetryOn429>,
    pub rewrite_links: bool,
}

impl Preset {
    /// The key written in the YAML.
    pub fn name(self) -> &'static str {
        match self {
            Self::BusinessCentral => "businesscentral",
            Self::Dataverse => "dataverse",
            Self::FinanceOperations => "finance_operations",
        }
    }

    /// Defaults from the services' documented limits (docs/dynamics.md "Presets"; Microsoft
    /// Learn: BC "Operational limits", F&O and Dataverse "Service protection API limits").
    pub fn defaults(self) -> PresetDefaults {
        // All three answer throttling with 429 + Retry-After (F&O's samples fall back to
        // 30 s); waiting it out in the proxy is what Microsoft asks clients to do.
        let retry = Some(RetryOn429 {
            attempts: 3,
            max_wait: Duration::from_secs(30),
        });
        match self {
            // 5 requests processed per user (app) at once, 95 queued, then 429; BC cancels
            // an operation after 8 min (408), its gateway after 10 min (504): 9 min lets
            // BC's own 408 through and still ends before its gateway does.
            Self::BusinessCentral => PresetDefaults {
                timeout: Some(Duration::from_secs(9 * 60)),
                max_concurrent: Some(5),
                max_queue: Some(95),
                retry_on_429: retry,
                rewrite_links: true,
            },
            // 52 concurrent requests per user per web server; beyond that Dataverse fails
            // at once with 429, so the proxy queues instead.
            Self::Dataverse => PresetDefaults {
                timeout: None,
                max_concurrent: Some(52),
                max_queue: Some(DEFAULT_MAX_QUEUE),
                retry_on_429: retry,
                rewrite_links: true,
            },
            // User-based concurrency limits were removed in 10.0.36; throttling is
            // resource-based (429 + Retry-After) only.
            Self::FinanceOperations => PresetDefaults {
                timeout: None,
                max_concurrent: None,
                max_queue: None,
                retry_on_429: retry,
                rewrite_links: true,
            },
        }
    }
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
    /// Stage one for a file: reads it and validates it (see [`Config::validate_yaml_str`]).
    /// Opens no other file than the document; [`Config::load`] runs both stages.
    pub fn validate_file(path: &Path) -> Result<Config, ConfigError> {
        let source = Source::file(path);
        let text = read_bounded(path).map_err(|source_err| ConfigError::Read {
            file: source.name.clone(),
            source: source_err,
        })?;
        Self::validate_yaml_str(&text, &source)
    }

    /// Stage one: parses and validates a YAML document into a typed `Config`. Pure but for
    /// checking that named files exist; their content is the preflight's (second stage,
    /// [`Config::from_yaml_str`]). The only place that knows the YAML parser.
    pub fn validate_yaml_str(text: &str, source: &Source) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = raw::parse(text).map_err(|error| ConfigError::Syntax {
            file: source.name.clone(),
            location: error.location,
            message: error.message,
        })?;
        let mut config =
            validate::validate(&raw, source, None).map_err(|problems| ConfigError::Invalid {
                file: source.name.clone(),
                problems,
            })?;
        if !config.secret_stores.stores.is_empty() {
            config.secret_stores.origin = Some(std::sync::Arc::new(Origin {
                raw,
                name: source.name.clone(),
                base_dir: source.base_dir.clone(),
                variables: source.variables.clone(),
            }));
        }
        Ok(config)
    }

    /// Stage one again, with `values` standing for the `${secret:STORE/NAME}` references
    /// instead of placeholders. The result carries `values` and has an empty `prepared`:
    /// run the second stage on it. `self` unchanged when it has no secret stores.
    pub fn with_secret_values(&self, values: SecretValues) -> Result<Config, ConfigError> {
        let Some(origin) = &self.secret_stores.origin else {
            return Ok(self.clone());
        };
        let source = Source {
            name: origin.name.clone(),
            base_dir: origin.base_dir.clone(),
            variables: origin.variables.clone(),
        };
        let mut config =
            validate::validate(&origin.raw, &source, Some(&values)).map_err(|problems| {
                ConfigError::Invalid {
                    file: origin.name.clone(),
                    problems,
                }
            })?;
        config.secret_stores.origin = Some(std::sync::Arc::clone(origin));
        config.secret_stores.values = values;
        Ok(config)
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
