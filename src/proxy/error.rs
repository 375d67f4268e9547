//! Errors the proxy itself answers with, and their one mapping to HTTP.
//!
//! Classified by who failed: the caller (4xx), the identity provider or upstream (502,
//! 503, 504). Bodies are short, stable JSON; the detail goes to the log. A body never
//! carries a secret, a token, an upstream or provider URL, or an upstream's own error text.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use super::batch::BatchError;
use super::body::{BodyIdle, BodyTooLarge, ProxyBody, ProxyBodyError};
use super::queue::QueueError;
use super::rate::RateError;
use crate::inbound::AuthError;
use crate::routing::PathError;
use crate::token::TokenError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("bad request path: {0}")]
    BadPath(#[from] PathError),
    #[error("$batch refused: {0}")]
    Batch(#[from] BatchError),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request target longer than 8 KiB")]
    UriTooLong,
    #[error("request head larger than server.limits.max_header_bytes")]
    HeadersTooLarge,
    #[error("not authenticated: {0}")]
    Unauthorized(AuthError),
    #[error("too many requests; retry in {0:?}")]
    TooManyRequests(Duration),
    #[error("client may not use this route")]
    Forbidden,
    #[error("no route matches")]
    NotFound,
    #[error("request body larger than server.limits.max_body_bytes")]
    PayloadTooLarge,
    #[error("the request body stalled longer than server.limits.body_idle_timeout")]
    RequestTimeout,
    #[error("no valid token: {0}")]
    TokenUnavailable(#[from] TokenError),
    #[error("upstream request failed: {0}")]
    UpstreamFailed(String),
    #[error("upstream answered 401 to a freshly renewed token")]
    UpstreamRejectedToken,
    #[error("upstream answered 101 Switching Protocols; the proxy performs no upgrades")]
    UpstreamSwitchedProtocols,
    #[error("upstream did not answer within the route timeout")]
    UpstreamTimeout,
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    QueueFull(QueueError),
    #[error("{0}")]
    QueueTimeout(QueueError),
    #[error("{0}")]
    UpstreamRate(#[from] RateError),
}

impl From<AuthError> for ProxyError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::LockedOut(retry_after) => Self::TooManyRequests(retry_after),
            AuthError::Missing
            | AuthError::Malformed
            | AuthError::BadPassword
            | AuthError::BadApiKey
            | AuthError::UnknownCertificate
            | AuthError::WrongNetwork => Self::Unauthorized(error),
        }
    }
}

impl From<QueueError> for ProxyError {
    fn from(error: QueueError) -> Self {
        match error {
            QueueError::Full(_) => Self::QueueFull(error),
            QueueError::TimedOut(_) => Self::QueueTimeout(error),
        }
    }
}

impl From<ProxyBodyError> for ProxyError {
    /// Reading the inbound body ahead (up to the replay limit) failed.
    fn from(error: ProxyBodyError) -> Self {
        match error {
            ProxyBodyError::TooLarge(_) => Self::PayloadTooLarge,
            ProxyBodyError::Idle(_) => Self::RequestTimeout,
            ProxyBodyError::Inbound(_) => Self::BadRequest("the request body could not be read"),
        }
    }
}

impl From<tokio::time::error::Elapsed> for ProxyError {
    /// The route's deadline passed while forwarding.
    fn from(_: tokio::time::error::Elapsed) -> Self {
        Self::UpstreamTimeout
    }
}

impl ProxyError {
    /// Why reading a `$batch` body ahead failed, as the caller is told.
    pub(crate) fn from_batch_body(error: &(dyn std::error::Error + 'static)) -> Self {
        if let Some(refused) = cause::<BatchError>(error) {
            Self::Batch(refused.clone())
        } else if caused_by::<BodyTooLarge>(error) {
            Self::PayloadTooLarge
        } else if caused_by::<BodyIdle>(error) {
            Self::RequestTimeout
        } else {
            Self::BadRequest("the request body could not be read")
        }
    }

    /// The upstream client's failure: the inbound body's own failure when that caused it
    /// (too large, stalled, a refused `$batch` part), else the upstream's, whose detail
    /// (the error chain) is for the log only.
    pub(crate) fn from_upstream(error: &(dyn std::error::Error + 'static)) -> Self {
        if caused_by::<BodyTooLarge>(error) {
            Self::PayloadTooLarge
        } else if caused_by::<BodyIdle>(error) {
            Self::RequestTimeout
        } else if caused_by::<BatchError>(error) {
            Self::from_batch_body(error)
        } else {
            Self::UpstreamFailed(error_chain(error))
        }
    }
}

/// The first of `error`'s sources that is an `E`.
fn cause<'e, E: std::error::Error + 'static>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<&'e E> {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(found) = cause.downcast_ref::<E>() {
            return Some(found);
        }
        source = cause.source();
    }
    None
}

/// Whether `E` is among `error`'s sources: the inbound body's own failure, seen through
/// the upstream client's error that it caused.
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    cause::<E>(error).is_some()
}

/// An error and its sources on one line, for the log (never for a response body).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What a caller turned away by a route's queue is told to wait.
const QUEUE_RETRY_AFTER: Duration = Duration::from_secs(5);

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::BadPath(_) => StatusCode::BAD_REQUEST,
            Self::Batch(error) if error.is_unsupported_media_type() => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Self::Batch(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::TokenUnavailable(_)
            | Self::ShuttingDown
            | Self::QueueFull(_)
            | Self::QueueTimeout(_)
            | Self::UpstreamRate(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamFailed(_)
            | Self::UpstreamRejectedToken
            | Self::UpstreamSwitchedProtocols => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// How loud the log line of a refused request is. A 5xx the proxy could not help is a
    /// warning; the others are debug: the caller's own mistakes, and the refusals that
    /// come in bursts and are logged where they arise — each failed token fetch once by
    /// the token cache, queue refusals under load, shutdown (the access log has each).
    pub(crate) fn log_level(&self) -> tracing::Level {
        match self {
            Self::UpstreamFailed(_)
            | Self::UpstreamRejectedToken
            | Self::UpstreamSwitchedProtocols
            | Self::UpstreamTimeout => tracing::Level::WARN,
            Self::TokenUnavailable(_)
            | Self::ShuttingDown
            | Self::QueueFull(_)
            | Self::QueueTimeout(_)
            | Self::UpstreamRate(_)
            | Self::BadRequest(_)
            | Self::BadPath(_)
            | Self::Batch(_)
            | Self::MethodNotAllowed
            | Self::UriTooLong
            | Self::HeadersTooLarge
            | Self::Unauthorized(_)
            | Self::TooManyRequests(_)
            | Self::Forbidden
            | Self::NotFound
            | Self::PayloadTooLarge
            | Self::RequestTimeout => tracing::Level::DEBUG,
        }
    }

    /// The stable `error` code of the JSON body.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) | Self::BadPath(_) => "bad_request",
            Self::Batch(error) if error.is_unsupported_media_type() => "unsupported_media_type",
            Self::Batch(_) => "batch_refused",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::UriTooLong => "uri_too_long",
            Self::HeadersTooLarge => "request_header_fields_too_large",
            Self::Unauthorized(_) => "unauthorized",
            Self::TooManyRequests(_) => "too_many_requests",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::TokenUnavailable(_) => "token_unavailable",
            Self::UpstreamFailed(_) => "upstream_failed",
            Self::UpstreamRejectedToken => "upstream_rejected_token",
            Self::UpstreamSwitchedProtocols => "upstream_switched_protocols",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::ShuttingDown => "shutting_down",
            // The same answers as the route's concurrency queue: the caller waited in the
            // same queue, for the upstream's rate instead of a slot.
            Self::QueueFull(_) | Self::UpstreamRate(RateError::Full(_)) => "queue_full",
            Self::QueueTimeout(_) | Self::UpstreamRate(RateError::TooLong { .. }) => {
                "queue_timeout"
            }
        }
    }

    /// The human message of the JSON body: safe to show to any caller.
    fn public_message(&self) -> String {
        match self {
            Self::BadRequest(reason) => (*reason).to_owned(),
            Self::BadPath(reason) => reason.to_string(),
            Self::Batch(reason) => reason.to_string(),
            Self::MethodNotAllowed => {
                "method not allowed; use GET, HEAD, POST, PUT, PATCH, DELETE or OPTIONS".to_owned()
            }
            // Identical for every cause: no hint whether the user exists.
            Self::UriTooLong => "the request target is longer than 8 KiB".to_owned(),
            Self::HeadersTooLarge => {
                "the request header section is too large (or has too many fields)".to_owned()
            }
            Self::Unauthorized(_) => "authentication required".to_owned(),
            Self::TooManyRequests(_) => {
                "too many requests; retry after the time in Retry-After".to_owned()
            }
            Self::Forbidden => "this client may not use this route".to_owned(),
            Self::NotFound => "no route matches this path".to_owned(),
            Self::PayloadTooLarge => "request body too large".to_owned(),
            Self::RequestTimeout => "the request body stopped arriving".to_owned(),
            Self::TokenUnavailable(error) => format!(
                "no valid access token for this route: {}",
                error.public_message()
            ),
            Self::UpstreamFailed(_) => "the upstream request failed".to_owned(),
            Self::UpstreamRejectedToken => "the upstream rejected this route's access token; \
                check that the app registration is enabled and consented for this service"
                .to_owned(),
            Self::UpstreamSwitchedProtocols => {
                "the upstream tried to switch protocols; the proxy performs no upgrades".to_owned()
            }
            Self::UpstreamTimeout => "the upstream did not answer in time".to_owned(),
            Self::ShuttingDown => "the proxy is shutting down; retry".to_owned(),
            Self::QueueFull(_) => {
                "too many requests are waiting for this route's upstream; retry later".to_owned()
            }
            Self::QueueTimeout(_) => {
                "this route's upstream stayed busy for too long; retry later".to_owned()
            }
            Self::UpstreamRate(RateError::Full(_)) => {
                "too many requests are waiting for this route's upstream; retry later".to_owned()
            }
            Self::UpstreamRate(RateError::TooLong { .. }) => {
                "this route's upstream request rate is used up for longer than the request \
                 may wait; retry after the time in Retry-After"
                    .to_owned()
            }
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::TokenUnavailable(error) => {
                Some(error.retry_after().unwrap_or(Duration::from_secs(5)))
            }
            Self::ShuttingDown => Some(Duration::from_secs(1)),
            Self::TooManyRequests(retry_after) => Some(*retry_after),
            Self::QueueFull(_) | Self::QueueTimeout(_) | Self::UpstreamRate(RateError::Full(_)) => {
                Some(QUEUE_RETRY_AFTER)
            }
            // When the window will admit a request again, at least a second.
            Self::UpstreamRate(RateError::TooLong { retry_after, .. }) => Some(*retry_after),
            Self::BadRequest(_)
            | Self::BadPath(_)
            | Self::Batch(_)
            | Self::MethodNotAllowed
            | Self::UriTooLong
            | Self::HeadersTooLarge
            | Self::Unauthorized(_)
            | Self::Forbidden
            | Self::NotFound
            | Self::PayloadTooLarge
            | Self::RequestTimeout
            | Self::UpstreamFailed(_)
            | Self::UpstreamRejectedToken
            | Self::UpstreamSwitchedProtocols
            | Self::UpstreamTimeout => None,
        }
    }

    /// The response for this error. `route` is the matched prefix, if any.
    pub(crate) fn into_response(
        self,
        route: Option<&str>,
        request_id: &HeaderValue,
    ) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.public_message(),
            "route": route,
            "request_id": request_id.to_str().unwrap_or_default(),
        });
        let mut response = Response::new(ProxyBody::full(body.to_string()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(retry_after) = self.retry_after() {
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        match self {
            Self::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"s2s-proxy\""),
                );
            }
            Self::MethodNotAllowed => {
                headers.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            Self::BadRequest(_)
            | Self::BadPath(_)
            | Self::UriTooLong
            | Self::HeadersTooLarge
            | Self::RequestTimeout
            | Self::ShuttingDown => {
                // The connection's framing or intent is suspect, or we are leaving.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::Batch(_)
            | Self::Forbidden
            | Self::TooManyRequests(_)
            | Self::NotFound
            | Self::PayloadTooLarge
            | Self::TokenUnavailable(_)
            | Self::UpstreamFailed(_)
            | Self::UpstreamRejectedToken
            | Self::UpstreamSwitchedProtocols
            | Self::UpstreamTimeout
            | Self::QueueFull(_)
            | Self::QueueTimeout(_)
            | Self::UpstreamRate(_) => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warning is a 5xx the proxy could not help; token, queue and shutdown refusals
    /// (logged where they arise) and every 4xx are debug.
    #[test]
    fn only_upstream_failures_are_warnings() {
        let quiet = [
            ProxyError::TokenUnavailable(TokenError::Config(String::new())),
            ProxyError::ShuttingDown,
            ProxyError::QueueFull(QueueError::Full(0)),
            ProxyError::QueueTimeout(QueueError::TimedOut(Duration::ZERO)),
            ProxyError::UpstreamRate(RateError::Full(0)),
            ProxyError::BadRequest("x"),
            ProxyError::NotFound,
            ProxyError::PayloadTooLarge,
            ProxyError::RequestTimeout,
        ];
        for error in quiet {
            assert_eq!(error.log_level(), tracing::Level::DEBUG, "{error}");
        }
        let loud = [
            ProxyError::UpstreamFailed(String::new()),
            ProxyError::UpstreamRejectedToken,
            ProxyError::UpstreamSwitchedProtocols,
            ProxyError::UpstreamTimeout,
        ];
        for error in loud {
            assert!(error.status().is_server_error(), "{error}");
            assert_eq!(error.log_level(), tracing::Level::WARN, "{error}");
        }
    }

    #[test]
    fn body_failures_become_the_callers_errors() {
        let too_large: Box<dyn std::error::Error + Send + Sync> = Box::new(BodyTooLarge);
        assert!(matches!(
            ProxyError::from_upstream(&*too_large),
            ProxyError::PayloadTooLarge
        ));
        assert!(matches!(
            ProxyError::from_batch_body(&*too_large),
            ProxyError::PayloadTooLarge
        ));
        let other = std::io::Error::other("connection reset");
        assert!(matches!(
            ProxyError::from_upstream(&other),
            ProxyError::UpstreamFailed(detail) if detail == "connection reset"
        ));
    }
}
