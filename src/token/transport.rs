//! The one HTTP client for all token requests, and reading their answers safely.
//!
//! Rules (docs/credentials.md "Tokens", SECURITY.md catalogue F2, F3, F10): the caller's rustls
//! config (same roots as everything else, certificates always verified), no redirects (the
//! secret is in the body, and reqwest may re-send a body on 307/308), no HTTP proxy, a connect
//! and a total timeout, bodies read up to 64 KiB, and error texts that never carry the URL.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode};

use super::provider_error::ProviderError;
use super::{IssuedToken, TokenError, response};

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const TOTAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest token endpoint answer read (F3: a 100 MB body must not be buffered).
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A cheaply clonable client for token endpoints.
#[derive(Debug, Clone)]
pub(crate) struct TokenHttp {
    client: reqwest::Client,
    timeout: Duration,
}

/// A token endpoint's answer (2xx or 4xx/5xx; 3xx never gets this far).
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// The body was longer than [`MAX_BODY`]; `body` holds its start.
    pub(crate) truncated: bool,
}

impl TokenHttp {
    /// The production client: 10 s to connect, 30 s in all.
    pub(crate) fn new(tls: &rustls::ClientConfig) -> Result<Self, TokenError> {
        Self::with_timeouts(tls, CONNECT_TIMEOUT, TOTAL_TIMEOUT)
    }

    pub(crate) fn with_timeouts(
        tls: &rustls::ClientConfig,
        connect: Duration,
        total: Duration,
    ) -> Result<Self, TokenError> {
        // The shared config may offer h2; this client speaks HTTP/1.1 only.
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .connect_timeout(connect)
            .timeout(total)
            .user_agent(concat!("s2s-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                TokenError::Config(format!(
                    "cannot build the token HTTP client: {}",
                    error_chain(&e.without_url())
                ))
            })?;
        Ok(Self {
            client,
            timeout: total,
        })
    }

    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The client-credentials grant with a client assertion (RFC 7521 §4.2), as Entra takes
    /// it for certificates and federated (workload identity) tokens. The assertion is
    /// redacted from any error text the provider echoes.
    pub(crate) async fn post_assertion(
        &self,
        url: &reqwest::Url,
        client_id: &str,
        assertion: &str,
        scope: Option<&str>,
    ) -> Result<IssuedToken, TokenError> {
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        self.post_form(url, &form, None, assertion).await
    }

    /// POSTs a token request form (with `authorization` as the `Authorization` header, if
    /// any) and reads the answer. `secret`, whatever authenticated the request, and the
    /// credentials of a `Basic` authorization are masked in any error text the provider
    /// echoes.
    pub(crate) async fn post_form(
        &self,
        url: &reqwest::Url,
        form: &[(&str, &str)],
        authorization: Option<HeaderValue>,
        secret: &str,
    ) -> Result<IssuedToken, TokenError> {
        let mut secrets = vec![secret.to_owned()];
        let mut request = self.client().post(url.clone());
        if let Some(authorization) = authorization {
            if let Some(credentials) = authorization
                .to_str()
                .ok()
                .and_then(|value| value.strip_prefix("Basic "))
            {
                secrets.push(credentials.to_owned());
            }
            request = request.header(http::header::AUTHORIZATION, authorization);
        }
        let request = request
            .header(http::header::ACCEPT, "application/json")
            .form(form);
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        self.send(request, url).await?.into_issued(&secrets)
    }

    /// Sends a request and reads the answer. A 3xx is an error here; 4xx/5xx are returned
    /// for the caller to parse with [`RawResponse::into_issued`].
    pub(crate) async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &reqwest::Url,
    ) -> Result<RawResponse, TokenError> {
        self.exchange(request, url, "<token endpoint>").await
    }

    /// [`Self::send`] for a request to an upstream (`doctor`): transport errors name
    /// `<upstream>` where they would name the host. The caller says which step failed.
    pub(crate) async fn send_upstream(
        &self,
        request: reqwest::RequestBuilder,
        url: &reqwest::Url,
    ) -> Result<RawResponse, TokenError> {
        self.exchange(request, url, "<upstream>").await
    }

    /// [`Self::send`] for a request to a secret store (Key Vault): transport errors name
    /// `<vault>` where they would name the host.
    pub(crate) async fn send_vault(
        &self,
        request: reqwest::RequestBuilder,
        url: &reqwest::Url,
    ) -> Result<RawResponse, TokenError> {
        self.exchange(request, url, "<vault>").await
    }

    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        url: &reqwest::Url,
        peer: &str,
    ) -> Result<RawResponse, TokenError> {
        let exchange = async {
            let mut response = request
                .send()
                .await
                .map_err(|e| map_error(e, url, peer, self.timeout))?;
            let status = response.status();
            if status.is_redirection() {
                return Err(TokenError::Redirect {
                    status: status.as_u16(),
                });
            }
            let headers = std::mem::take(response.headers_mut());
            let mut body = BytesMut::new();
            let mut truncated = false;
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| map_error(e, url, peer, self.timeout))?
            {
                let room = MAX_BODY - body.len();
                if chunk.len() > room {
                    body.extend_from_slice(&chunk[..room]);
                    truncated = true;
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(RawResponse {
                status,
                headers,
                body: body.freeze(),
                truncated,
            })
        };
        // reqwest's own timeout covers the same span; this one makes the outcome exact.
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(TokenError::Timeout(self.timeout)))
    }
}

impl RawResponse {
    /// A 2xx becomes an [`IssuedToken`], anything else a [`ProviderError`]. `secrets` are
    /// masked in anything kept from the body, in whatever form it echoes them.
    pub(crate) fn into_issued(self, secrets: &[&str]) -> Result<IssuedToken, TokenError> {
        if self.status.is_success() {
            if self.truncated {
                return Err(TokenError::InvalidResponse(format!(
                    "response body larger than {} KiB",
                    MAX_BODY / 1024
                )));
            }
            return response::parse_success(&self.body, SystemTime::now());
        }
        let error =
            ProviderError::from_response_masked(self.status, &self.headers, &self.body, secrets);
        Err(TokenError::Provider(Box::new(error)))
    }
}

/// A transport error, without the URL (`without_url`, and the host scrubbed from the
/// source chain for good measure).
fn map_error(
    error: reqwest::Error,
    url: &reqwest::Url,
    peer: &str,
    timeout: Duration,
) -> TokenError {
    if error.is_timeout() {
        return TokenError::Timeout(timeout);
    }
    let mut text = error_chain(&error.without_url());
    for needle in [url.as_str(), url.host_str().unwrap_or_default()] {
        if !needle.is_empty() && text.contains(needle) {
            text = text.replace(needle, peer);
        }
    }
    TokenError::Network(text)
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
