//! The YAML schema of `proxy.yaml`, mirrored one to one by serde structs.
//!
//! Nothing here interprets a value: every setting that may carry `${…}` (URLs, durations,
//! addresses, rate limits) stays a `String` so that expansion and errors with a YAML path
//! happen in [`super::validate`]. Required fields are `Option` too, so that a missing one is
//! reported together with every other problem instead of stopping the parse. Unknown
//! fields are errors everywhere. [`parse`] is the only function that knows the YAML parser.

use std::fmt;
use std::marker::PhantomData;

use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

/// A syntax or schema error, as shown by `s2s-proxy check`.
#[derive(Debug)]
pub(super) struct ParseError {
    /// Line and column, 1-based.
    pub(super) location: Option<(usize, usize)>,
    /// Starts with the YAML path when the parser knows it (`routes[0]: unknown field …`).
    pub(super) message: String,
}

/// Parses a YAML document into the raw schema.
pub(super) fn parse(text: &str) -> Result<RawConfig, ParseError> {
    if is_blank(text) {
        return Err(ParseError {
            location: None,
            message: "the document is empty; a configuration needs at least `credentials`, \
                      `clients` and `routes`"
                .to_owned(),
        });
    }
    serde_yaml_ng::from_str(text).map_err(|error| {
        let location = error.location().map(|l| (l.line(), l.column()));
        let mut message = error.to_string();
        // The location is printed separately (`file:line:col`); drop the parser's own copy.
        if let Some((line, column)) = location {
            let suffix = format!(" at line {line} column {column}");
            if let Some(at) = message.find(&suffix) {
                message.replace_range(at..at + suffix.len(), "");
            }
        }
        match credential_error(text, &message) {
            Some(rewritten) => rewritten,
            None => ParseError { location, message },
        }
    })
}

/// Marks an error raised inside one credential; see [`Credentials`].
const CREDENTIAL_MARK: char = '\u{1}';

/// serde reads a credential's fields only after the whole mapping (it must find `type`
/// first), when the parser no longer knows where they were: such errors would name
/// `credentials` and point at its first entry. [`Credentials`] marks them with the entry's
/// name; this turns the mark into the path `credentials.<name>` and the line of that entry.
fn credential_error(text: &str, message: &str) -> Option<ParseError> {
    let rest = message
        .strip_prefix("credentials: ")?
        .strip_prefix(CREDENTIAL_MARK)?;
    let (name, error) = rest.split_once(CREDENTIAL_MARK)?;
    let error = error.split(" at line ").next().unwrap_or(error);
    Some(ParseError {
        location: entry_location(text, "credentials", name),
        message: format!("credentials.{name}: {error}"),
    })
}

/// Line and column of `name:` inside the top-level block mapping `section:`, if written in
/// block style.
fn entry_location(text: &str, section: &str, name: &str) -> Option<(usize, usize)> {
    let mut in_section = false;
    let mut entry_indent = None;
    for (index, line) in text.lines().enumerate() {
        let content = line.trim_start();
        let indent = line.len() - content.len();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if indent == 0 {
            in_section = content
                .strip_prefix(section)
                .is_some_and(|r| r.trim_start().starts_with(':'));
            continue;
        }
        if !in_section || *entry_indent.get_or_insert(indent) != indent {
            continue;
        }
        let key = content
            .strip_prefix(name)
            .or_else(|| content.strip_prefix(&format!("\"{name}\"")))
            .or_else(|| content.strip_prefix(&format!("'{name}'")));
        if key.is_some_and(|r| r.trim_start().starts_with(':')) {
            return Some((index + 1, indent + 1));
        }
    }
    None
}

/// Whether a document holds nothing but whitespace, comments and document markers.
fn is_blank(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line == "---" || line == "..."
    })
}

/// The configuration of s2s-proxy (`proxy.yaml`). Any string may hold `${NAME}` (an environment variable) or `${file:PATH}` (a file's contents); `$${` is a literal `${`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `server`, `admin`, `credentials`, `clients` and `routes`"
)]
#[schemars(rename = "Config")]
pub(super) struct RawConfig {
    /// The proxy listener, TLS and limits.
    pub(super) server: Option<RawServer>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub(super) admin: Option<RawAdmin>,
    /// Fleet mode: replicas share their limits through Redis.
    pub(super) cluster: Option<RawCluster>,
    /// Service-to-service identities by name; a route names one.
    pub(super) credentials: Option<Credentials>,
    /// Callers by name and how each authenticates; a route lists those it admits.
    pub(super) clients: Option<Named<RawClient>>,
    /// Path prefixes, each with its upstream, credential and allowed clients.
    pub(super) routes: Option<Vec<RawRoute>>,
    /// Secret stores by name (Azure Key Vault); `${secret:STORE/NAME}` reads from one.
    pub(super) secret_stores: Option<Named<RawSecretStore>>,
}

/// A secret store. Internally tagged by `type`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    expecting = "a secret store mapping with a `type`"
)]
#[schemars(
    rename = "SecretStore",
    description = "Where `${secret:STORE/NAME}` values come from; `type` chooses which."
)]
pub(super) enum RawSecretStore {
    AzureKeyVault(RawKeyVault),
}

/// An Azure Key Vault, read with one of the proxy's credentials.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "KeyVault")]
pub(super) struct RawKeyVault {
    /// The vault URL, e.g. `https://contoso-kv.vault.azure.net`.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) url: Option<String>,
    /// A `managed_identity`, `workload_identity` or `client_certificate` credential.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) credential: Option<String>,
    /// How often the secrets are read again (default `10m`).
    #[serde(default)]
    #[schemars(schema_with = "super::schema::duration")]
    pub(super) refresh: Option<String>,
}

/// The `server` section.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `server` section)")]
#[schemars(rename = "Server")]
pub(super) struct RawServer {
    /// `IP:port` to serve on (default `127.0.0.1:8080`).
    pub(super) listen: Option<String>,
    /// Base URL that clients see, for link rewriting.
    pub(super) public_url: Option<String>,
    /// Networks of load balancers whose `X-Forwarded-For` is believed.
    pub(super) trusted_proxies: Option<Vec<String>>,
    /// PEM file of extra root certificates for upstreams and token endpoints.
    pub(super) upstream_ca_file: Option<String>,
    /// Header that carries API keys (default `X-API-Key`).
    pub(super) api_key_header: Option<String>,
    /// Forward request headers whose names contain `_` (default false).
    pub(super) allow_underscore_headers: Option<bool>,
    /// Runtime worker threads (default: one per core).
    pub(super) workers: Option<u64>,
    /// Inbound TLS.
    pub(super) tls: Option<RawTls>,
    /// Sizes and timeouts of inbound requests.
    pub(super) limits: Option<RawLimits>,
}

/// Inbound TLS (`server.tls`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping (the `server.tls` section)"
)]
#[schemars(rename = "Tls")]
pub(super) struct RawTls {
    /// PEM certificate chain.
    pub(super) cert_file: Option<String>,
    /// PEM private key.
    pub(super) key_file: Option<String>,
    /// PEM roots that verify client certificates (optional).
    pub(super) client_ca_file: Option<String>,
}

/// Inbound limits (`server.limits`).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping (the `server.limits` section)"
)]
#[schemars(rename = "Limits")]
pub(super) struct RawLimits {
    /// Largest request head (default 32768).
    pub(super) max_header_bytes: Option<u64>,
    /// Largest request body (default 350 MiB).
    pub(super) max_body_bytes: Option<u64>,
    /// Time to receive the request headers (default `10s`).
    #[serde(default)]
    #[schemars(schema_with = "super::schema::duration")]
    pub(super) header_read_timeout: Option<String>,
    /// Longest pause inside a request body (default `60s`).
    #[serde(default)]
    #[schemars(schema_with = "super::schema::duration")]
    pub(super) body_idle_timeout: Option<String>,
    /// Idle connection lifetime (default `75s`).
    #[serde(default)]
    #[schemars(schema_with = "super::schema::duration")]
    pub(super) idle_timeout: Option<String>,
    /// Whole exchange (default `600s`).
    #[serde(default)]
    #[schemars(schema_with = "super::schema::duration")]
    pub(super) request_timeout: Option<String>,
    /// Inbound connections open at once (default 10000).
    pub(super) max_connections: Option<u64>,
}

/// The `admin` section.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `admin` section)")]
#[schemars(rename = "Admin")]
pub(super) struct RawAdmin {
    /// `IP:port` of the admin listener; off when absent.
    pub(super) listen: Option<String>,
    /// Protects the status page (`/`, `/status.json`, `/status/test`); required when
    /// `listen` is not a loopback address.
    pub(super) auth: Option<RawAdminAuth>,
}

/// Fleet mode (`cluster`): the replicas that share `key_prefix` on one Redis hold each
/// route's `max_concurrent` together. A restart applies changes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `cluster` section)")]
#[schemars(rename = "Cluster")]
pub(super) struct RawCluster {
    /// `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS (the certificate is verified); `${VAR}` for the password.
    pub(super) redis: Option<String>,
    /// Prefix of every Redis key (default `s2s-proxy`); replicas sharing it share limits.
    pub(super) key_prefix: Option<String>,
    /// Budget of one Redis round trip before the replica falls back to its local limits (default `5ms`).
    #[serde(default)]
    #[schemars(schema_with = "super::schema::duration")]
    pub(super) timeout: Option<String>,
}

/// `admin.auth`: how the status page's operator is recognised (as a client's `basic` or
/// `api_key`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `basic` or `api_key` (the `admin.auth` section)"
)]
#[schemars(rename = "AdminAuth")]
pub(super) struct RawAdminAuth {
    /// User name and password (a `sha256:` digest or `${VAR}`) the browser sends.
    pub(super) basic: Option<RawBasic>,
    /// A key sent in `server.api_key_header` (a `sha256:` digest or `${VAR}`).
    pub(super) api_key: Option<String>,
}

/// A service-to-service identity. Internally tagged by `type`.
///
/// serde buffers the variant's fields before deserializing them, so a scalar reaches the
/// variant already typed (`12345` as an integer). The string fields therefore use
/// [`opt_string`], which refuses non-strings without echoing the value: it may be a secret.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    expecting = "a credential mapping with a `type`"
)]
#[schemars(
    rename = "Credential",
    description = "A service-to-service identity; `type` chooses which."
)]
pub(super) enum RawCredential {
    ClientSecret(RawClientSecret),
    ClientCertificate(RawClientCertificate),
    ManagedIdentity(RawManagedIdentity),
    WorkloadIdentity(RawWorkloadIdentity),
}

/// An Entra ID app (or OAuth 2.0 client) with a client secret.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ClientSecret")]
pub(super) struct RawClientSecret {
    /// Directory (tenant) ID or domain.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) tenant_id: Option<String>,
    /// Token endpoint of a non-Entra OAuth 2.0 server (instead of `tenant_id`).
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) token_url: Option<String>,
    /// Entra authority (default `https://login.microsoftonline.com`).
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) authority: Option<String>,
    /// Named national cloud (instead of `authority`).
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) cloud: Option<String>,
    /// Application (client) ID.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) client_id: Option<String>,
    /// The secret value; write `${VAR}` or `${file:PATH}`.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) client_secret: Option<String>,
    /// Rotation: several secrets, tried in order (instead of `client_secret`).
    #[serde(default)]
    pub(super) client_secrets: Option<Vec<StringOr<RawSecretEntry>>>,
    /// Expiry date of `client_secret` (`2026-09-30`), for warnings.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) expires: Option<String>,
    /// `client_secret_post` (default) or `client_secret_basic`.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) auth_method: Option<String>,
    /// Extra form fields for the token request.
    #[serde(default)]
    pub(super) params: Option<Params>,
}

/// One entry of `client_secrets`: `"${A}"` or `{ value: "${A}", expires: 2026-09-30 }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a secret, or a mapping with `value` and `expires`"
)]
#[schemars(rename = "SecretEntry")]
pub(super) struct RawSecretEntry {
    /// The secret value; write `${VAR}` or `${file:PATH}`.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) value: Option<String>,
    /// Expiry date (`2026-09-30`), for warnings.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) expires: Option<String>,
}

/// An Entra ID app with a certificate (a signed client assertion).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ClientCertificate")]
pub(super) struct RawClientCertificate {
    /// Directory (tenant) ID or domain.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) tenant_id: Option<String>,
    /// Token endpoint of a non-Entra OAuth 2.0 server (instead of `tenant_id`).
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) token_url: Option<String>,
    /// Entra authority (default `https://login.microsoftonline.com`).
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) authority: Option<String>,
    /// Named national cloud (instead of `authority`).
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) cloud: Option<String>,
    /// Application (client) ID.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) client_id: Option<String>,
    /// PEM (certificate and key) or PKCS#12 (.pfx) file.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) certificate_file: Option<String>,
    /// Password of a PKCS#12 / .pfx `certificate_file`.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) certificate_password: Option<String>,
    /// Rotation: several certificates, tried in order (instead of `certificate_file`).
    #[serde(default)]
    pub(super) certificate_files: Option<Vec<StringOr<RawCertificateEntry>>>,
    /// Signature algorithm of the client assertion.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) assertion_alg: Option<String>,
    /// Send the certificate chain (`x5c`) in the assertion.
    #[serde(default)]
    pub(super) send_certificate_chain: Option<bool>,
}

/// One entry of `certificate_files`: `a.pem` or `{ file: a.pfx, password: "${P}" }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a file path, or a mapping with `file` and `password`"
)]
#[schemars(rename = "CertificateEntry")]
pub(super) struct RawCertificateEntry {
    /// PEM or PKCS#12 (.pfx) file.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) file: Option<String>,
    /// Password of a PKCS#12 file.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) password: Option<String>,
}

/// An Azure managed identity (IMDS).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ManagedIdentity")]
pub(super) struct RawManagedIdentity {
    /// Client ID of a user-assigned identity.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) client_id: Option<String>,
    /// Object ID of a user-assigned identity.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) object_id: Option<String>,
    /// Resource ID of a user-assigned identity.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) resource_id: Option<String>,
}

/// Workload identity federation (a projected service account token).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "WorkloadIdentity")]
pub(super) struct RawWorkloadIdentity {
    /// Directory (tenant) ID or domain.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) tenant_id: Option<String>,
    /// Application (client) ID.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) client_id: Option<String>,
    /// File holding the federated token.
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) token_file: Option<String>,
    /// Entra authority (default `https://login.microsoftonline.com`).
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) authority: Option<String>,
    /// Named national cloud (instead of `authority`).
    #[serde(default, deserialize_with = "opt_string")]
    pub(super) cloud: Option<String>,
}

/// A list entry written either as a plain string or as a mapping `T`.
#[derive(Debug)]
pub(super) enum StringOr<T> {
    String(String),
    Map(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for StringOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntryVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for EntryVisitor<T> {
            type Value = StringOr<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a mapping")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<StringOr<T>, E> {
                Ok(StringOr::String(value.to_owned()))
            }

            fn visit_string<E: de::Error>(self, value: String) -> Result<StringOr<T>, E> {
                Ok(StringOr::String(value))
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<StringOr<T>, E> {
                Err(not_a_string())
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<StringOr<T>, E> {
                Err(not_a_string())
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<StringOr<T>, E> {
                Err(not_a_string())
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<StringOr<T>, E> {
                Err(not_a_string())
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<StringOr<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(StringOr::Map)
            }
        }

        deserializer.deserialize_any(EntryVisitor(PhantomData))
    }
}

/// A caller. `basic`, `api_key` or `certificate` identify it; `networks` alone admits by address.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, expecting = "a client mapping")]
#[schemars(rename = "Client")]
pub(super) struct RawClient {
    /// HTTP Basic username and password.
    pub(super) basic: Option<RawBasic>,
    /// Key sent in the `server.api_key_header` header.
    pub(super) api_key: Option<String>,
    /// Networks (CIDR or address) the client must come from.
    pub(super) networks: Option<Vec<String>>,
    /// Requests per period: `6000/5m`, `100/s`, `20/m`.
    #[serde(default)]
    #[schemars(schema_with = "super::schema::rate_limit")]
    pub(super) rate_limit: Option<String>,
    /// The verified TLS client certificate that identifies this client.
    pub(super) certificate: Option<RawCertificateMatch>,
}

/// HTTP Basic credentials.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `username` and `password`"
)]
#[schemars(rename = "Basic")]
pub(super) struct RawBasic {
    /// Username (no `:`).
    pub(super) username: Option<String>,
    /// Password, or its `sha256:` form from `s2s-proxy hash-secret`.
    pub(super) password: Option<String>,
}

/// Which client certificate identifies the client.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `subject_cn`, `san_dns` or `fingerprint_sha256`"
)]
#[schemars(rename = "CertificateMatch")]
pub(super) struct RawCertificateMatch {
    /// Subject common name.
    pub(super) subject_cn: Option<String>,
    /// DNS subject alternative name.
    pub(super) san_dns: Option<String>,
    /// SHA-256 fingerprint of the certificate.
    pub(super) fingerprint_sha256: Option<String>,
}

/// A route.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, expecting = "a route mapping")]
#[schemars(rename = "Route")]
pub(super) struct RawRoute {
    /// Path prefix, starting and ending with `/`.
    pub(super) prefix: Option<String>,
    /// The upstream URL or a service preset.
    pub(super) upstream: Option<RawUpstream>,
    /// Name of an entry in `credentials`.
    pub(super) credential: Option<String>,
    /// OAuth scope of the route's token.
    pub(super) scope: Option<String>,
    /// Names of the clients allowed on this route.
    pub(super) clients: Option<Vec<String>>,
    /// Whole exchange for this route.
    #[serde(default)]
    #[schemars(schema_with = "super::schema::duration")]
    pub(super) timeout: Option<String>,
    /// Rewrite upstream URLs in bodies and headers to proxy URLs.
    pub(super) rewrite_links: Option<bool>,
    /// At most this many requests at the upstream at once.
    pub(super) max_concurrent: Option<u64>,
    /// How many may wait for a slot (or for the upstream rate).
    pub(super) max_queue: Option<u64>,
    /// Longest wait in the queue (default `60s`).
    #[serde(default)]
    #[schemars(schema_with = "super::schema::duration")]
    pub(super) queue_timeout: Option<String>,
    /// Wait out `Retry-After` and send again.
    pub(super) retry_on_429: Option<RawRetryOn429>,
    /// At most this many requests sent upstream in any window of this length
    /// (`6000/5m`); more wait in the route's queue.
    #[serde(default)]
    #[schemars(schema_with = "super::schema::rate_limit")]
    pub(super) upstream_rate_limit: Option<String>,
    /// Allow an `http://` upstream that is not on loopback.
    pub(super) allow_plain_http: Option<bool>,
    /// More request headers never forwarded on this route.
    pub(super) strip_request_headers: Option<Vec<String>>,
    /// Path that `s2s-proxy doctor` calls on the upstream.
    pub(super) doctor_path: Option<String>,
}

/// Retries of 429 answers.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `attempts` and `max_wait`"
)]
#[schemars(rename = "RetryOn429")]
pub(super) struct RawRetryOn429 {
    /// How many times to send again.
    pub(super) attempts: Option<u64>,
    /// Longest `Retry-After` to wait out.
    #[serde(default)]
    #[schemars(schema_with = "super::schema::duration")]
    pub(super) max_wait: Option<String>,
}

/// `upstream:` is a URL, or a service preset such as `{ businesscentral: { … } }`.
#[derive(Debug)]
pub(super) enum RawUpstream {
    Url(String),
    BusinessCentral(RawBusinessCentral),
    Dataverse(RawServiceUrl),
    FinanceOperations(RawServiceUrl),
}

/// The Business Central preset.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `tenant` and `environment`"
)]
#[schemars(rename = "BusinessCentral")]
pub(super) struct RawBusinessCentral {
    /// Tenant ID (GUID) or domain.
    pub(super) tenant: Option<String>,
    /// Environment name, such as `production`.
    pub(super) environment: Option<String>,
}

/// A preset of an environment URL.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, expecting = "a mapping with `url`")]
#[schemars(rename = "ServiceUrl")]
pub(super) struct RawServiceUrl {
    /// The environment URL (`https://…`).
    pub(super) url: Option<String>,
}

const PRESETS: &[&str] = &["businesscentral", "dataverse", "finance_operations"];

impl<'de> Deserialize<'de> for RawUpstream {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UpstreamVisitor;

        impl<'de> Visitor<'de> for UpstreamVisitor {
            type Value = RawUpstream;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an upstream URL, or a preset mapping `businesscentral`, `dataverse` \
                     or `finance_operations`",
                )
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawUpstream, E> {
                Ok(RawUpstream::Url(value.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawUpstream, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "empty preset; write one of `businesscentral`, `dataverse` or \
                         `finance_operations`",
                    ));
                };
                let upstream = match key.as_str() {
                    "businesscentral" => RawUpstream::BusinessCentral(map.next_value()?),
                    "dataverse" => RawUpstream::Dataverse(map.next_value()?),
                    "finance_operations" => RawUpstream::FinanceOperations(map.next_value()?),
                    _ => return Err(de::Error::unknown_variant(&key, PRESETS)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format_args!(
                        "preset `{extra}` after `{key}`; an upstream takes exactly one preset"
                    )));
                }
                Ok(upstream)
            }
        }

        deserializer.deserialize_any(UpstreamVisitor)
    }
}

/// `credentials:`, in file order. Each entry goes through a YAML value first so that an
/// error in its fields can be marked with the entry's name (see [`credential_error`]).
#[derive(Debug, Default)]
pub(super) struct Credentials(pub(super) Vec<(String, RawCredential)>);

impl<'de> Deserialize<'de> for Credentials {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CredentialsVisitor;

        impl<'de> Visitor<'de> for CredentialsVisitor {
            type Value = Credentials;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping from credential names to credentials")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Credentials, A::Error> {
                let mut entries: Vec<(String, RawCredential)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    unique_name(&entries, &name)?;
                    let value: serde_yaml_ng::Value = map.next_value()?;
                    let credential = RawCredential::deserialize(value).map_err(|error| {
                        de::Error::custom(format_args!(
                            "{CREDENTIAL_MARK}{name}{CREDENTIAL_MARK}{error}"
                        ))
                    })?;
                    entries.push((name, credential));
                }
                Ok(Credentials(entries))
            }
        }

        deserializer.deserialize_map(CredentialsVisitor)
    }
}

fn unique_name<T, E: de::Error>(entries: &[(String, T)], name: &str) -> Result<(), E> {
    if entries.iter().any(|(n, _)| n == name) {
        return Err(E::custom(format_args!(
            "`{name}` is defined twice; names must be unique"
        )));
    }
    Ok(())
}

/// A YAML mapping keyed by name, in file order; a repeated name is an error.
#[derive(Debug)]
pub(super) struct Named<T>(pub(super) Vec<(String, T)>);

impl<T> Default for Named<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Named<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NamedVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for NamedVisitor<T> {
            type Value = Named<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping from names to entries")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Named<T>, A::Error> {
                let mut entries: Vec<(String, T)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    unique_name(&entries, &name)?;
                    let value = map.next_value()?;
                    entries.push((name, value));
                }
                Ok(Named(entries))
            }
        }

        deserializer.deserialize_map(NamedVisitor(PhantomData))
    }
}

/// `params:` extra form fields, string to string, in file order.
#[derive(Debug, Default)]
pub(super) struct Params(pub(super) Vec<(String, String)>);

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ParamsVisitor;

        impl<'de> Visitor<'de> for ParamsVisitor {
            type Value = Params;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping from form field names to string values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
                let mut entries: Vec<(String, String)> = Vec::new();
                while let Some(StringOnly(name)) = map.next_key()? {
                    if entries.iter().any(|(n, _)| *n == name) {
                        return Err(de::Error::custom(format_args!(
                            "`params.{name}` is given twice"
                        )));
                    }
                    let StringOnly(value) = map.next_value()?;
                    entries.push((name, value));
                }
                Ok(Params(entries))
            }
        }

        deserializer.deserialize_map(ParamsVisitor)
    }
}

/// A string that refuses other scalars without echoing them (see [`RawCredential`]).
struct StringOnly(String);

impl<'de> Deserialize<'de> for StringOnly {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StringVisitor;

        impl Visitor<'_> for StringVisitor {
            type Value = StringOnly;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<StringOnly, E> {
                Ok(StringOnly(value.to_owned()))
            }

            fn visit_string<E: de::Error>(self, value: String) -> Result<StringOnly, E> {
                Ok(StringOnly(value))
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<StringOnly, E> {
                Err(not_a_string())
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<StringOnly, E> {
                Err(not_a_string())
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<StringOnly, E> {
                Err(not_a_string())
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<StringOnly, E> {
                Err(not_a_string())
            }
        }

        // `deserialize_any`: a buffered number reaches the visitor as a number, not as an
        // "invalid type" error quoting it.
        deserializer.deserialize_any(StringVisitor)
    }
}

fn not_a_string<E: de::Error>() -> E {
    E::custom("expected a string, found a number or boolean; put the value in quotes")
}

fn opt_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<StringOnly>::deserialize(deserializer)?.map(|s| s.0))
}
