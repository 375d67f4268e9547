//! Secret stores: reading the `${secret:STORE/NAME}` values of a configuration from Azure
//! Key Vault (README "Secrets from Azure Key Vault", docs/key-vault.md).
//!
//! A [`Vault`] reads one store with the credential the store names, through the token
//! sources of [`crate::token`]. It follows Key Vault's authentication challenge as the
//! Azure SDKs do (Microsoft Learn, "Azure Key Vault authentication"; RFC 6750 §3): the
//! first request goes without a token, the vault answers 401 with `WWW-Authenticate:
//! Bearer authorization="…", resource="…"` (or `scope="…"`), and the token is requested
//! for that resource, but only when its host is the vault's own domain or a parent of it,
//! so that a hostile URL cannot collect a token for another service. Without a usable
//! challenge the scope follows the credential's cloud (`https://vault.azure.net/.default`,
//! `vault.azure.cn`, `vault.usgovcloudapi.net`).
//!
//! [`read_at_start`] reads every referenced secret once, for the configuration's second
//! stage (start-up, `check`, reload); the periodic refresh is `crate::reload`'s, with
//! [`Vault::read`]. Errors name the store and the secret, never a value or a token.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::config::{
    Config, CredentialKind, Problem, SecretStore, SecretValues, StoredSecret, TokenEndpoint,
};
use crate::secret::Secret;
use crate::token::{TokenError, TokenHttp, TokenSource};

/// Key Vault REST API version used for `GET /secrets/{name}`.
pub(crate) const API_VERSION: &str = "7.4";
/// Bounds of one vault request: a slow vault must not hold up start-up or a refresh.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TOTAL_TIMEOUT: Duration = Duration::from_secs(15);
/// The shortest bound of a refresh's request (see [`refresh_timeout`]).
const MIN_REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// The bound of one request of a background refresh: the refresh interval, between 2 s and
/// 15 s, so that a slow vault never delays the next round.
pub(crate) fn refresh_timeout(refresh: Duration) -> Duration {
    refresh.clamp(MIN_REFRESH_TIMEOUT, TOTAL_TIMEOUT)
}
/// A vault token is renewed when less than this is left.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// Why a secret could not be read. Never carries a value or a token.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("secret `{name}` not found in store `{store}`")]
    NotFound { store: String, name: String },
    #[error(
        "store `{store}` refused to read secret `{name}` (HTTP {status}); grant the \
         credential's identity the role \"Key Vault Secrets User\" on the vault, or an access \
         policy with Get on secrets"
    )]
    Forbidden {
        store: String,
        name: String,
        status: u16,
    },
    #[error("store `{store}` answered HTTP {status} for secret `{name}`")]
    Status {
        store: String,
        name: String,
        status: u16,
    },
    #[error(
        "store `{store}`: the vault's authentication challenge names `{resource}`, which is not \
         the vault's domain; no token was requested for it"
    )]
    ForeignChallenge { store: String, resource: String },
    #[error("store `{store}`: no token for the vault: {error}")]
    Token { store: String, error: TokenError },
    #[error("store `{store}`: reading secret `{name}` failed: {reason}")]
    Transport {
        store: String,
        name: String,
        reason: String,
    },
    #[error("store `{store}`: unusable answer for secret `{name}`: {reason}")]
    InvalidResponse {
        store: String,
        name: String,
        reason: String,
    },
}

/// One secret store and the token source of its credential.
#[derive(Debug)]
pub(crate) struct Vault {
    store: SecretStore,
    url: reqwest::Url,
    http: Result<TokenHttp, TokenError>,
    source: Arc<dyn TokenSource>,
    /// The scope the credential's cloud implies, used when the vault sends no challenge.
    default_scope: String,
    /// The scope learnt from the vault's challenge and the token held for it.
    state: Mutex<VaultState>,
}

#[derive(Debug, Default)]
struct VaultState {
    scope: Option<String>,
    token: Option<(Secret, Instant)>,
}

impl Vault {
    /// The client for `store` of `config`, with `tls` for both the vault and the token
    /// requests. `None` when the store or its credential is not in `config`.
    /// Each vault request is bounded by `timeout` (token requests by the token client's own).
    pub(crate) fn new(
        config: &Config,
        store: &str,
        tls: &rustls::ClientConfig,
        timeout: Duration,
    ) -> Option<Self> {
        let store = config.secret_stores.store(store)?.clone();
        let credential = config.credential(&store.credential)?;
        let token_http = TokenHttp::new(tls);
        let source = crate::token::build_source(credential, &token_http, config.prepared.get());
        let url = reqwest::Url::parse(&store.url).ok()?;
        Some(Self {
            default_scope: default_scope(&credential.kind).to_owned(),
            http: TokenHttp::with_timeouts(tls, CONNECT_TIMEOUT.min(timeout), timeout),
            url,
            source,
            store,
            state: Mutex::new(VaultState::default()),
        })
    }

    pub(crate) fn store(&self) -> &SecretStore {
        &self.store
    }

    /// Reads the latest version of secret `name`.
    pub(crate) async fn read(&self, name: &str) -> Result<StoredSecret, StoreError> {
        let mut url = self.url.clone();
        url.set_path(&format!("secrets/{name}"));
        url.set_query(Some(&format!("api-version={API_VERSION}")));
        let token = self.held_token();
        let first = self.get(&url, name, token.as_ref()).await?;
        if first.status != http::StatusCode::UNAUTHORIZED {
            return self.answer(&first, name);
        }
        // No token yet, or the one held was refused: follow the challenge, once.
        let scope = self.challenge_scope(&first.headers)?;
        let token = self.fetch_token(&scope).await?;
        let second = self.get(&url, name, Some(&token)).await?;
        self.answer(&second, name)
    }

    fn held_token(&self) -> Option<Secret> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &state.token {
            Some((token, until)) if Instant::now() + TOKEN_MARGIN < *until => Some(token.clone()),
            _ => None,
        }
    }

    async fn fetch_token(&self, scope: &str) -> Result<Secret, StoreError> {
        let issued = self
            .source
            .fetch(Some(scope))
            .await
            .map_err(|error| StoreError::Token {
                store: self.store.name.clone(),
                error,
            })?;
        let until = Instant::now() + issued.expires_in;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.scope = Some(scope.to_owned());
        state.token = Some((issued.access_token.clone(), until));
        Ok(issued.access_token)
    }

    /// The scope to ask for after a 401: the challenge's, if its host is the vault's
    /// domain; the cloud's default when the vault sent no usable challenge.
    fn challenge_scope(&self, headers: &http::HeaderMap) -> Result<String, StoreError> {
        let challenge = headers
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_challenge);
        let Some(resource) = challenge else {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            return Ok(state
                .scope
                .clone()
                .unwrap_or_else(|| self.default_scope.clone()));
        };
        let vault_host = self.url.host_str().unwrap_or_default();
        if !same_domain(vault_host, &resource) {
            return Err(StoreError::ForeignChallenge {
                store: self.store.name.clone(),
                resource,
            });
        }
        Ok(scope_of(&resource))
    }

    async fn get(
        &self,
        url: &reqwest::Url,
        name: &str,
        token: Option<&Secret>,
    ) -> Result<crate::token::RawResponse, StoreError> {
        let http = self.http.as_ref().map_err(|error| StoreError::Token {
            store: self.store.name.clone(),
            error: error.clone(),
        })?;
        let mut request = http
            .client()
            .get(url.clone())
            .header(http::header::ACCEPT, "application/json");
        if let Some(token) = token {
            let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| StoreError::InvalidResponse {
                    store: self.store.name.clone(),
                    name: name.to_owned(),
                    reason: "the vault token cannot be sent in a header".to_owned(),
                })?;
            value.set_sensitive(true);
            request = request.header(http::header::AUTHORIZATION, value);
        }
        http.send_vault(request, url)
            .await
            .map_err(|error| StoreError::Transport {
                store: self.store.name.clone(),
                name: name.to_owned(),
                reason: error.to_string(),
            })
    }

    fn answer(
        &self,
        response: &crate::token::RawResponse,
        name: &str,
    ) -> Result<StoredSecret, StoreError> {
        let store = self.store.name.clone();
        let name = name.to_owned();
        match response.status.as_u16() {
            200 if !response.truncated => {
                parse_secret(&response.body).map_err(|reason| StoreError::InvalidResponse {
                    store,
                    name,
                    reason,
                })
            }
            200 => Err(StoreError::InvalidResponse {
                store,
                name,
                reason: "the answer is too large".to_owned(),
            }),
            404 => Err(StoreError::NotFound { store, name }),
            status @ (401 | 403) => Err(StoreError::Forbidden {
                store,
                name,
                status,
            }),
            status => Err(StoreError::Status {
                store,
                name,
                status,
            }),
        }
    }
}

/// Key Vault's DNS suffix in each cloud (Microsoft Learn, "Azure Key Vault: DNS suffixes
/// for the national clouds"), chosen by the credential's authority host.
fn default_scope(kind: &CredentialKind) -> &'static str {
    let authority = match kind {
        CredentialKind::ClientSecret(c) => authority_of(&c.endpoint),
        CredentialKind::ClientCertificate(c) => authority_of(&c.endpoint),
        CredentialKind::WorkloadIdentity(c) => authority_of(&c.endpoint),
        CredentialKind::ManagedIdentity(_) => "",
    };
    let host = authority
        .split("://")
        .nth(1)
        .unwrap_or(authority)
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    if host.ends_with(".cn") {
        "https://vault.azure.cn/.default"
    } else if host.ends_with(".us") || host.ends_with("usgovcloudapi.net") {
        "https://vault.usgovcloudapi.net/.default"
    } else {
        "https://vault.azure.net/.default"
    }
}

fn authority_of(endpoint: &TokenEndpoint) -> &str {
    match endpoint {
        TokenEndpoint::Entra { authority, .. } => authority,
        TokenEndpoint::Generic { .. } => "",
    }
}

/// The `scope` (preferred) or `resource` parameter of a `Bearer` challenge.
fn parse_challenge(header: &str) -> Option<String> {
    let rest = header.trim_start();
    let params = rest
        .get(..6)
        .filter(|scheme| scheme.eq_ignore_ascii_case("bearer"))
        .map(|_| &rest[6..])?;
    let mut scope = None;
    let mut resource = None;
    for part in params.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_owned();
        match key.trim().to_ascii_lowercase().as_str() {
            "scope" => scope = Some(value),
            "resource" => resource = Some(value),
            _ => {}
        }
    }
    scope.or(resource).filter(|v| !v.is_empty())
}

/// `resource` as a scope: `https://vault.azure.net` → `https://vault.azure.net/.default`.
fn scope_of(resource: &str) -> String {
    if resource.ends_with("/.default") {
        resource.to_owned()
    } else {
        format!("{}/.default", resource.trim_end_matches('/'))
    }
}

/// Whether the challenge's resource (or scope) names the vault's host or a parent domain
/// of it, as the Azure SDKs' challenge policies require.
fn same_domain(vault_host: &str, resource: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(resource) else {
        return false;
    };
    let Some(host) = url.host_str() else {
        return false;
    };
    let (vault, host) = (vault_host.to_ascii_lowercase(), host.to_ascii_lowercase());
    vault == host || vault.ends_with(&format!(".{host}"))
}

/// `value`, the version from `id` and `attributes.exp` of a secret bundle.
fn parse_secret(body: &[u8]) -> Result<StoredSecret, String> {
    #[derive(serde::Deserialize)]
    struct Bundle {
        value: Option<String>,
        id: Option<String>,
        attributes: Option<Attributes>,
    }
    #[derive(serde::Deserialize)]
    struct Attributes {
        exp: Option<u64>,
    }
    let bundle: Bundle =
        serde_json::from_slice(body).map_err(|_| "not a Key Vault secret (JSON)".to_owned())?;
    let value = bundle
        .value
        .ok_or_else(|| "the answer holds no `value`".to_owned())?;
    let version = bundle
        .id
        .as_deref()
        .and_then(|id| id.trim_end_matches('/').rsplit('/').next())
        .unwrap_or_default()
        .to_owned();
    let expires = bundle
        .attributes
        .and_then(|a| a.exp)
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    Ok(StoredSecret {
        value: Secret::new(value),
        version,
        expires,
    })
}

/// Reads every secret `config` references, for the second stage: problems name the
/// field, the store and the secret. Runs on a thread of its own with its own runtime, so
/// that it works from synchronous code and from inside a runtime alike.
pub(crate) fn read_at_start(config: &Config) -> Result<SecretValues, Vec<Problem>> {
    let tls = crate::upstream::client_tls_for(config).map_err(|error| {
        vec![Problem {
            path: "server.upstream_ca_file".to_owned(),
            message: error.to_string(),
        }]
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|error| {
                        vec![Problem {
                            path: "secret_stores".to_owned(),
                            message: format!("cannot start the secret store reader: {error}"),
                        }]
                    })?;
                runtime.block_on(read_all(config, &tls))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(vec![Problem {
                    path: "secret_stores".to_owned(),
                    message: "the secret store reader failed unexpectedly".to_owned(),
                }])
            })
    })
}

async fn read_all(
    config: &Config,
    tls: &rustls::ClientConfig,
) -> Result<SecretValues, Vec<Problem>> {
    let mut values = SecretValues::default();
    let mut problems = Vec::new();
    let mut vaults: Vec<Vault> = Vec::new();
    for (store, name) in config.secret_stores.wanted() {
        if !vaults.iter().any(|v| v.store.name == store) {
            match Vault::new(config, &store, tls, TOTAL_TIMEOUT) {
                Some(vault) => vaults.push(vault),
                None => {
                    // Validation makes this unreachable; never leave a reference unread.
                    problems.push(Problem {
                        path: format!("secret_stores.{store}"),
                        message: "cannot set up this store's client".to_owned(),
                    });
                    continue;
                }
            }
        }
        let Some(vault) = vaults.iter().find(|v| v.store.name == store) else {
            continue;
        };
        match vault.read(&name).await {
            Ok(stored) => {
                values.0.insert((store, name), stored);
            }
            Err(error) => {
                let path = config
                    .secret_stores
                    .references
                    .iter()
                    .find(|r| r.store == store && r.name == name)
                    .map(|r| r.path.clone())
                    .unwrap_or_default();
                problems.push(Problem {
                    path,
                    message: error.to_string(),
                });
            }
        }
    }
    if problems.is_empty() {
        Ok(values)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_parsed_and_scoped() {
        let header = r#"Bearer authorization="https://login.microsoftonline.com/t1", resource="https://vault.azure.net""#;
        assert_eq!(
            parse_challenge(header).as_deref(),
            Some("https://vault.azure.net")
        );
        assert_eq!(
            scope_of("https://vault.azure.net"),
            "https://vault.azure.net/.default"
        );
        let header = r#"Bearer authorization="https://login.microsoftonline.com/t1", scope="https://vault.azure.net/.default""#;
        assert_eq!(
            parse_challenge(header).as_deref(),
            Some("https://vault.azure.net/.default")
        );
        assert_eq!(parse_challenge(r#"Basic realm="x""#), None);
    }

    #[test]
    fn the_challenge_must_name_the_vaults_domain() {
        assert!(same_domain(
            "contoso.vault.azure.net",
            "https://vault.azure.net"
        ));
        assert!(same_domain(
            "contoso.vault.azure.cn",
            "https://vault.azure.cn/.default"
        ));
        assert!(!same_domain(
            "contoso.vault.azure.net",
            "https://graph.microsoft.com"
        ));
        assert!(!same_domain(
            "contoso.vault.azure.net",
            "https://evilvault.azure.net"
        ));
        assert!(!same_domain(
            "contoso.vault.azure.net",
            "https://azure.net.evil.example"
        ));
        assert!(!same_domain("contoso.vault.azure.net", "not a url"));
    }

    #[test]
    fn without_a_challenge_the_scope_follows_the_credentials_cloud() {
        let kind = |authority: &str| {
            CredentialKind::WorkloadIdentity(crate::config::WorkloadIdentity {
                endpoint: TokenEndpoint::Entra {
                    authority: authority.to_owned(),
                    tenant_id: "t1".to_owned(),
                    url: format!("{authority}/t1/oauth2/v2.0/token").parse().unwrap(),
                },
                client_id: "c".to_owned(),
                token_file: "/t".into(),
            })
        };
        for (authority, scope) in [
            (
                "https://login.microsoftonline.com",
                "https://vault.azure.net/.default",
            ),
            (
                "https://login.chinacloudapi.cn",
                "https://vault.azure.cn/.default",
            ),
            (
                "https://login.partner.microsoftonline.cn",
                "https://vault.azure.cn/.default",
            ),
            (
                "https://login.microsoftonline.us",
                "https://vault.usgovcloudapi.net/.default",
            ),
        ] {
            assert_eq!(default_scope(&kind(authority)), scope, "{authority}");
        }
        let imds = CredentialKind::ManagedIdentity(crate::config::ManagedIdentity {
            selector: None,
            endpoint: crate::config::ManagedIdentityEndpoint::Imds,
        });
        assert_eq!(default_scope(&imds), "https://vault.azure.net/.default");
    }

    #[test]
    fn bundles_give_value_version_and_expiry() {
        let body = br#"{"value":"s3cr3t","id":"https://kv.vault.azure.net/secrets/bc/0123abcd","attributes":{"enabled":true,"exp":1893456000}}"#;
        let stored = parse_secret(body).unwrap();
        assert_eq!(stored.value.expose(), "s3cr3t");
        assert_eq!(stored.version, "0123abcd");
        assert_eq!(
            stored.expires,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000))
        );
        assert!(parse_secret(b"{\"id\":\"x\"}").is_err());
    }
}
