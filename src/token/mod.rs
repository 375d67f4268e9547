//! Service-to-service tokens: obtaining them, caching them and renewing them ahead of expiry.
//!
//! A [`TokenSource`] is one credential type (`client_secret`, `client_certificate` with
//! [`assertion`] signing, `managed_identity`, `workload_identity`; one file each) and knows
//! how to ask an identity provider for one token; [`rotation`] walks a credential's several
//! secrets or certificates after `invalid_client`. The [`TokenCache`] keeps one [`TokenSlot`] per (credential,
//! scope) used by the routes. A slot hands out the cached [`Token`] lock-free while it is
//! usable, fetches at most once at a time when it is not (single-flight), backs off after
//! failures and, once [`TokenCache::start`] runs, renews every token in the background before
//! it expires (docs/credentials.md "Tokens"). Expiry is tracked on tokio's monotonic clock, so
//! wall-clock jumps do not matter and tests run with a paused clock.
//!
//! Provider errors are parsed into [`TokenError`]: `Display` is for logs (error code, AADSTS
//! codes, description, trace and correlation ids), [`TokenError::public_message`] for the
//! client-facing 503 (code and one-line hint only). Neither ever contains a secret, a token
//! or the token endpoint URL.
//!
//! Not here: which route uses which slot (the proxy pipeline asks [`TokenCache::slot`]),
//! readiness and metrics (they read [`TokenCache::status`]), and config validation.

mod assertion;
mod cache;
mod claims;
mod client_certificate;
mod client_secret;
mod expiry;
#[cfg(test)]
pub(crate) mod fake;
mod managed_identity;
mod provider_error;
mod response;
mod rotation;
mod transport;
mod workload_identity;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use crate::config::{Config, Credential, CredentialKind, Route};
use crate::secret::Secret;

pub use cache::{FetchCount, SlotStatus, TokenCache, TokenSlot};
pub use claims::{Claims, decode_claims};
pub use client_certificate::PreparedCertificates;
pub use expiry::{CredentialExpiry, EXPIRY_WARNING, credential_expiries, warn_expiring};
pub(crate) use provider_error::retry_after;
pub use provider_error::{ProviderError, aadsts_hint};

pub(crate) use transport::{RawResponse, TokenHttp};

/// What [`TokenSource::fetch`] returns: one token request in flight.
pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<IssuedToken, TokenError>> + Send + 'a>>;

/// One credential type: asks an identity provider for a token. No caching here.
pub trait TokenSource: Send + Sync + fmt::Debug {
    /// Requests one token for `scope` (`None`: send no scope).
    fn fetch<'a>(&'a self, scope: Option<&'a str>) -> TokenFuture<'a>;

    /// Reads file-backed secrets and certificates again (configuration reload, rotation).
    fn reread_files(&self) {}

    /// Takes the certificates a reload's loader just parsed, instead of reading them again
    /// on next use (after [`TokenSource::reread_files`]).
    fn adopt_prepared(&self, _prepared: &PreparedCertificates) {}
}

/// What a provider returned, before it becomes a cached [`Token`].
#[derive(Debug)]
pub struct IssuedToken {
    pub access_token: Secret,
    /// Lifetime as sent by the provider (`expires_in`, or derived from `expires_on`/`exp`).
    pub expires_in: Duration,
    /// The provider's hint to renew early (`refresh_in`), if it sent one.
    pub refresh_in: Option<Duration>,
}

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The provider answered with an error status (4xx/5xx).
    #[error("{0}")]
    Provider(Box<ProviderError>),
    /// The token endpoint answered 3xx. Never followed: the secret is in the body (F10).
    #[error("token endpoint answered with a redirect (HTTP {status}); redirects are not followed")]
    Redirect { status: u16 },
    /// Connection refused, DNS failure, TLS failure, reset. Never contains the URL.
    #[error("token request failed: {0}")]
    Network(String),
    #[error("token request timed out after {}s", .0.as_secs_f64())]
    Timeout(Duration),
    /// A 2xx answer that cannot be used (not JSON, no `access_token`, bad expiry, …). The
    /// text is ours; the body is never echoed.
    #[error("invalid token response: {0}")]
    InvalidResponse(String),
    /// A configuration problem found while building or using the credential.
    #[error("{0}")]
    Config(String),
    /// The credential's [`TokenSource`] itself failed (its fetch panicked). What it said is
    /// not kept: it could carry anything, secrets included.
    #[error("the token source failed unexpectedly")]
    SourceFailed,
    /// A request's deadline (its route's `timeout`) passed while it waited for a token
    /// request still in flight; that request goes on for the others. Handed to waiting
    /// callers only, never the outcome of a token request.
    #[error("no token within the request's deadline; the token request goes on (retry in {}s)", retry_after.as_secs())]
    Deadline { retry_after: Duration },
    /// The slot is backing off after `error`; the next attempt is due in `retry_after`.
    #[error("{error} (next attempt in {}s)", retry_after.as_secs())]
    Backoff {
        error: Box<TokenError>,
        retry_after: Duration,
    },
}

impl TokenError {
    /// Short text for the 503 body: `error` code, AADSTS code and hint; never the raw body.
    pub fn public_message(&self) -> String {
        match self {
            Self::Provider(e) => e.public_message(),
            Self::Redirect { .. } => {
                "token endpoint answered with a redirect; redirects are not followed".to_owned()
            }
            Self::Network(_) => "token endpoint unreachable".to_owned(),
            Self::Timeout(_) => "token endpoint did not answer in time".to_owned(),
            Self::InvalidResponse(reason) => {
                format!("token endpoint returned an unusable response: {reason}")
            }
            Self::Config(message) => message.clone(),
            Self::SourceFailed => "the token source failed unexpectedly".to_owned(),
            Self::Deadline { .. } => {
                "the identity provider did not issue a token within the route's timeout".to_owned()
            }
            Self::Backoff { error, .. } => error.public_message(),
        }
    }

    /// How long a caller should wait before trying again (503 `Retry-After`). Errors handed
    /// out by a [`TokenSlot`] always carry one (the slot's backoff, at least 1 s).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Provider(e) => e.retry_after,
            Self::Backoff { retry_after, .. } | Self::Deadline { retry_after } => {
                Some(*retry_after)
            }
            Self::Redirect { .. }
            | Self::Network(_)
            | Self::Timeout(_)
            | Self::InvalidResponse(_)
            | Self::Config(_)
            | Self::SourceFailed => None,
        }
    }

    /// A configuration error that retrying will not fix (`invalid_client`, redirects, …).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Provider(e) => e.is_permanent(),
            Self::Redirect { .. } | Self::Config(_) => true,
            Self::Network(_)
            | Self::Timeout(_)
            | Self::InvalidResponse(_)
            | Self::SourceFailed
            | Self::Deadline { .. } => false,
            Self::Backoff { error, .. } => error.is_permanent(),
        }
    }

    /// A stable label for metrics (`outcome`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Provider(_) => "provider_error",
            Self::Redirect { .. } => "redirect",
            Self::Network(_) => "network",
            Self::Timeout(_) => "timeout",
            Self::InvalidResponse(_) => "invalid_response",
            Self::Config(_) => "config",
            Self::SourceFailed => "source_failed",
            Self::Deadline { .. } => "deadline",
            Self::Backoff { error, .. } => error.kind(),
        }
    }

    /// A [`TokenError::Config`] about one credential: "credential `name`: what".
    pub(crate) fn config(credential: &str, what: impl fmt::Display) -> Self {
        Self::Config(format!("credential `{credential}`: {what}"))
    }

    /// The underlying error, looking through [`TokenError::Backoff`].
    pub fn cause(&self) -> &TokenError {
        match self {
            Self::Backoff { error, .. } => error.cause(),
            other => other,
        }
    }
}

/// A cached access token, ready to be injected.
pub struct Token {
    header: HeaderValue,
    /// The bare token's searcher, built once per token: responses are scrubbed of it.
    finder: memchr::memmem::Finder<'static>,
    issued_at: Instant,
    expires_at: Instant,
    usable_until: Instant,
    refresh_at: Instant,
}

/// Longest safety margin kept before expiry: a token is not handed out in its last
/// `min(MAX_SKEW, lifetime/10)`.
const MAX_SKEW: Duration = Duration::from_secs(30);
/// Renew at least this long before expiry (capped at half the lifetime). MSAL uses 5 min.
const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// From this lifetime on, renew at half-life (MSAL/azure-identity for long-lived tokens).
const LONG_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);

impl Token {
    /// Builds the `Bearer` header once. `issued_at` should be taken before the request was
    /// sent, so the expiry errs on the early side.
    pub fn new(issued: &IssuedToken, issued_at: Instant) -> Result<Self, TokenError> {
        let value = issued.access_token.expose();
        response::validate_access_token(value)?;
        let lifetime = issued.expires_in;
        if lifetime.is_zero() || lifetime > response::MAX_LIFETIME {
            return Err(TokenError::InvalidResponse(
                "token lifetime out of range".to_owned(),
            ));
        }
        let mut header = HeaderValue::from_str(&format!("Bearer {value}")).map_err(|_| {
            TokenError::InvalidResponse(
                "access_token contains characters not allowed in a header".to_owned(),
            )
        })?;
        header.set_sensitive(true);
        let expires_at = issued_at + lifetime;
        Ok(Self {
            header,
            finder: memchr::memmem::Finder::new(value.as_bytes()).into_owned(),
            issued_at,
            expires_at,
            usable_until: expires_at - MAX_SKEW.min(lifetime / 10),
            refresh_at: refresh_at(issued_at, lifetime, issued.refresh_in),
        })
    }

    /// `Bearer <token>`, marked sensitive.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// A searcher for the bare token (without `Bearer `), for scrubbing responses.
    pub(crate) fn finder(&self) -> &memchr::memmem::Finder<'static> {
        &self.finder
    }

    pub fn issued_at(&self) -> Instant {
        self.issued_at
    }

    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// The last instant this token is handed out (expiry minus skew).
    pub fn usable_until(&self) -> Instant {
        self.usable_until
    }

    /// When background renewal is due.
    pub fn refresh_at(&self) -> Instant {
        self.refresh_at
    }

    /// Time left until expiry (zero once expired).
    pub fn expires_in(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }

    /// Whole seconds left until expiry.
    pub fn expires_in_secs(&self) -> u64 {
        self.expires_in().as_secs()
    }

    /// Whether the token may still be injected at `now`.
    pub fn is_usable_at(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("header", &"Bearer ****")
            .field("expires_in", &self.expires_in())
            .finish_non_exhaustive()
    }
}

/// The renewal point (docs/credentials.md "Tokens"): the earliest of `issued + refresh_in`,
/// `expires − min(5 min, lifetime/2)` and, for lifetimes of 2 h or more, `issued +
/// lifetime/2`; minus up to 10 % of the lifetime of jitter so routes do not renew in
/// lockstep. Never earlier than a tenth of the lifetime, so a bogus `refresh_in: 0` cannot
/// cause a fetch loop.
fn refresh_at(issued_at: Instant, lifetime: Duration, refresh_in: Option<Duration>) -> Instant {
    let mut after = lifetime - RENEW_BEFORE_EXPIRY.min(lifetime / 2);
    if lifetime >= LONG_LIFETIME {
        after = after.min(lifetime / 2);
    }
    if let Some(refresh_in) = refresh_in {
        after = after.min(refresh_in);
    }
    let jitter = (lifetime / 10).mul_f64(fastrand::f64());
    let after = after.saturating_sub(jitter).max(lifetime / 10);
    issued_at + after
}

/// A token fetched once for `s2s-proxy token`.
#[derive(Debug)]
pub struct FetchedToken {
    pub access_token: Secret,
    pub expires_in: Duration,
    pub refresh_in: Option<Duration>,
    pub credential: String,
    pub scope: Option<String>,
    /// The decoded (unverified) JWT payload; `None` for opaque tokens.
    pub claims: Option<Claims>,
}

/// Fetches one token for `route` directly from its provider, without the cache (the
/// `s2s-proxy token` command).
pub async fn fetch_once(
    config: &Config,
    route: &Route,
    tls: Arc<rustls::ClientConfig>,
) -> Result<FetchedToken, TokenError> {
    let credential = config.credential(&route.credential).ok_or_else(|| {
        TokenError::Config(format!(
            "credential `{}` is not defined in `credentials`",
            route.credential
        ))
    })?;
    let http = TokenHttp::new(&tls);
    let source = build_source(credential, &http, config.prepared.get());
    let issued = source.fetch(route.scope.as_deref()).await?;
    let claims = decode_claims(issued.access_token.expose());
    Ok(FetchedToken {
        access_token: issued.access_token,
        expires_in: issued.expires_in,
        refresh_in: issued.refresh_in,
        credential: credential.name.clone(),
        scope: route.scope.clone(),
        claims,
    })
}

/// The [`TokenSource`] for one configured credential. A credential that cannot be set up
/// gets a source that always fails with a permanent error.
pub(crate) fn build_source(
    credential: &Credential,
    http: &Result<TokenHttp, TokenError>,
    prepared: Option<&PreparedCertificates>,
) -> Arc<dyn TokenSource> {
    let name = &credential.name;
    let http = http.clone();
    let source: Result<Arc<dyn TokenSource>, TokenError> = match &credential.kind {
        CredentialKind::ClientSecret(settings) => {
            client_secret::ClientSecretSource::new(name, settings, http).map(|s| Arc::new(s) as _)
        }
        CredentialKind::ClientCertificate(settings) => {
            client_certificate::ClientCertificateSource::new(name, settings, http, prepared)
                .map(|s| Arc::new(s) as _)
        }
        CredentialKind::ManagedIdentity(settings) => managed_identity::ManagedIdentitySource::new(
            name,
            settings,
            http,
            managed_identity::Imds::default(),
        )
        .map(|s| Arc::new(s) as _),
        CredentialKind::WorkloadIdentity(settings) => {
            workload_identity::WorkloadIdentitySource::new(name, settings, http)
                .map(|s| Arc::new(s) as _)
        }
    };
    source.unwrap_or_else(|error| Arc::new(FailingSource { error }))
}

/// A token endpoint as a `reqwest::Url`: https, or plain http on loopback only.
pub(crate) fn endpoint_url(
    credential: &str,
    endpoint: &http::Uri,
) -> Result<reqwest::Url, TokenError> {
    let url = reqwest::Url::parse(&endpoint.to_string())
        .map_err(|_| TokenError::config(credential, "the token endpoint is not a valid URL"))?;
    let loopback = url.host_str().is_some_and(crate::config::is_loopback_host);
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err(TokenError::config(
            credential,
            "the token endpoint must be https:// (plain http only on loopback)",
        ));
    }
    Ok(url)
}

/// A source that cannot work (unsupported type, unknown credential, broken setup).
#[derive(Debug)]
pub(crate) struct FailingSource {
    pub(crate) error: TokenError,
}

impl TokenSource for FailingSource {
    fn fetch<'a>(&'a self, _scope: Option<&'a str>) -> TokenFuture<'a> {
        let error = self.error.clone();
        Box::pin(async move { Err(error) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(token: &str, secs: u64, refresh_in: Option<u64>) -> IssuedToken {
        IssuedToken {
            access_token: Secret::new(token),
            expires_in: Duration::from_secs(secs),
            refresh_in: refresh_in.map(Duration::from_secs),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn header_is_sensitive_and_debug_hides_it() {
        let token = Token::new(&issued("eyJ.CANARY.sig", 3599, None), Instant::now()).unwrap();
        assert_eq!(token.header(), "Bearer eyJ.CANARY.sig");
        assert!(token.header().is_sensitive());
        assert!(!format!("{token:?}").contains("CANARY"));
        assert_eq!(token.expires_in_secs(), 3599);
    }

    #[tokio::test(start_paused = true)]
    async fn unsafe_access_tokens_are_refused() {
        for bad in ["a\r\nX-Evil: 1", "   ", "", "tok en", "tök", "a\tb"] {
            let result = Token::new(&issued(bad, 3599, None), Instant::now());
            assert!(
                matches!(result, Err(TokenError::InvalidResponse(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_point_follows_the_design() {
        let now = Instant::now();
        let at = |secs: u64, refresh_in: Option<u64>| {
            Token::new(&issued("t", secs, refresh_in), now)
                .unwrap()
                .refresh_at()
                .duration_since(now)
                .as_secs_f64()
        };
        for _ in 0..200 {
            let eight = at(8, None);
            assert!((3.2..=4.0).contains(&eight), "8 s token renews at {eight}");
            let hour = at(3600, None);
            assert!((49.0 * 60.0..=55.0 * 60.0).contains(&hour), "{hour}");
            let day = at(86_400, None);
            assert!((9.6 * 3600.0..=12.0 * 3600.0).contains(&day), "{day}");
            let hinted = at(3600, Some(1200));
            assert!((840.0..=1200.0).contains(&hinted), "{hinted}");
            let bogus = at(3600, Some(0));
            assert!(bogus >= 360.0, "refresh_in 0 renews at {bogus}");
        }
        let token = Token::new(&issued("t", 8, None), now).unwrap();
        assert_eq!(token.usable_until() - now, Duration::from_millis(7200));
        let token = Token::new(&issued("t", 3600, None), now).unwrap();
        assert_eq!(token.usable_until() - now, Duration::from_secs(3570));
    }

    #[test]
    fn config_errors_name_the_credential() {
        let error = endpoint_url("bc", &"http://idp.example/token".parse().unwrap()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "credential `bc`: the token endpoint must be https:// (plain http only on loopback)"
        );
        assert_eq!(error.public_message(), error.to_string());
    }

    #[test]
    fn backoff_wrapper_delegates() {
        let inner = TokenError::Config(
            "credential `x`: type `managed_identity` is not supported yet".to_owned(),
        );
        let error = TokenError::Backoff {
            error: Box::new(inner),
            retry_after: Duration::from_secs(7),
        };
        assert!(error.is_permanent());
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(error.kind(), "config");
        assert!(error.public_message().contains("not supported yet"));
        assert!(error.to_string().contains("next attempt in 7s"));
    }
}
