//! STUB — replaced by the token helper. Signatures here are the contract.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::config::{Config, Route};
use crate::secret::Secret;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("stub")]
    Stub,
}

impl TokenError {
    /// Short text for the 503 body: `error` code, AADSTS code and hint; never the raw body.
    pub fn public_message(&self) -> String {
        String::new()
    }
    /// How long a caller should wait before trying again (503 `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        None
    }
    pub fn is_permanent(&self) -> bool {
        false
    }
}

#[derive(Debug)]
pub struct Token {
    header: HeaderValue,
}

impl Token {
    /// `Bearer <token>`, marked sensitive.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }
}

#[derive(Debug)]
pub struct TokenSlot;

impl TokenSlot {
    pub async fn get(&self) -> Result<Arc<Token>, TokenError> {
        Err(TokenError::Stub)
    }
    /// Upstream answered 401 to `rejected`. Returns the token to retry with, or `None` when
    /// the request must not be retried.
    pub async fn renew_rejected(
        &self,
        _rejected: &Arc<Token>,
    ) -> Result<Option<Arc<Token>>, TokenError> {
        Ok(None)
    }
    pub fn credential(&self) -> &str {
        ""
    }
}

#[derive(Debug, Clone)]
pub struct TokenCache;

impl TokenCache {
    pub fn new(_config: &Config, _tls: Arc<rustls::ClientConfig>) -> Self {
        TokenCache
    }
    pub fn slot(&self, _route: &Route) -> Arc<TokenSlot> {
        Arc::new(TokenSlot)
    }
    pub fn start(&self) {}
}

/// A token fetched once for `s2s-proxy token`.
#[derive(Debug)]
pub struct FetchedToken {
    pub access_token: Secret,
    pub expires_in: Duration,
}

pub async fn fetch_once(
    _config: &Config,
    _route: &Route,
    _tls: Arc<rustls::ClientConfig>,
) -> Result<FetchedToken, TokenError> {
    Err(TokenError::Stub)
}
