//! The access log: one line per request, written when the response body is finished.
//! Writing it also records the request's metrics, so both count the same requests.
//!
//! A line is written even when no response ever is: an [`AccessLog`] dropped unwritten
//! belongs to a request whose handler was dropped before it answered — the caller closed
//! the connection (or reset its HTTP/2 stream) while it was queued or waiting for the
//! upstream — and is logged and counted with status 499 (nginx's "client closed
//! request"), `error=client_closed`, `complete=false`; during a panic, with status 500.
//!
//! Fields are structured (so `--log-format json` gives one JSON object per request) and
//! come from configuration or from the request line only: never header values, never the
//! query string (it can carry `$filter` values and keys), never credentials.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use crate::metrics::{InFlight, RouteMetrics};

/// Target of access-log events, to filter them with `RUST_LOG=s2s_proxy::access=off`.
pub(crate) const TARGET: &str = "s2s_proxy::access";

/// Status of a request whose caller went away before the answer (nginx's code; no
/// response carries it).
pub(crate) const CLIENT_CLOSED: u16 = 499;

/// One request's line, filled in as the request runs; written by [`AccessLog::write`] or,
/// failing that, when dropped (see the module header).
#[derive(Debug)]
pub(crate) struct AccessLog {
    pub(crate) request_id: HeaderValue,
    pub(crate) client: Option<Arc<str>>,
    pub(crate) route: Option<Arc<str>>,
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) status: u16,
    pub(crate) error: Option<&'static str>,
    pub(crate) started: Instant,
    pub(crate) upstream_ms: Option<u64>,
    pub(crate) bytes_in: u64,
    /// The series of the request's route (of no route until it is routed).
    pub(crate) metrics: Arc<RouteMetrics>,
    /// Held from routing until the line is written: `s2s_proxy_in_flight{route}`.
    pub(crate) in_flight: Option<InFlight>,
    /// Set by [`AccessLog::write`]: nothing left for `Drop` to do.
    pub(crate) written: bool,
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        if self.written {
            return;
        }
        if std::thread::panicking() {
            self.status = 500;
            self.error = Some("internal_error");
        } else {
            self.status = CLIENT_CLOSED;
            self.error = Some("client_closed");
        }
        self.emit(0, false);
    }
}

impl AccessLog {
    pub(crate) fn write(mut self, bytes_out: u64, complete: bool) {
        self.emit(bytes_out, complete);
    }

    fn emit(&mut self, bytes_out: u64, complete: bool) {
        self.written = true;
        let total = self.started.elapsed();
        let total_ms = total.as_millis() as u64;
        self.metrics.record(
            &self.method,
            self.status,
            total,
            self.upstream_ms.map(Duration::from_millis),
        );
        tracing::info!(
            target: TARGET,
            request_id = self.request_id.to_str().unwrap_or("-"),
            client = self.client.as_deref().unwrap_or("-"),
            route = self.route.as_deref().unwrap_or("-"),
            method = %self.method,
            path = %self.path,
            status = self.status,
            error = self.error.unwrap_or("-"),
            total_ms,
            upstream_ms = self.upstream_ms,
            bytes_in = self.bytes_in,
            bytes_out,
            complete,
            "Request."
        );
    }
}
