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
//! query string (it can carry `$filter` values and keys), never credentials. Every field
//! taken from the request is written through [`Printable`]: a byte outside printable ASCII
//! becomes `\xHH`, so no C0/C1 control, line or paragraph separator (U+2028, U+2029) or
//! bidirectional override (U+202E) reaches a log line, in text or JSON format.

use std::fmt;
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
        self.metrics
            .record_recent(self.status, self.error, self.request_id.as_bytes());
        tracing::info!(
            target: TARGET,
            request_id = %Printable(self.request_id.as_bytes()),
            client = self.client.as_deref().unwrap_or("-"),
            route = self.route.as_deref().unwrap_or("-"),
            method = %Printable(self.method.as_str().as_bytes()),
            path = %Printable(self.path.as_bytes()),
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

/// Request-derived bytes for a log line: printable ASCII as is, anything else (and `\`,
/// so the escapes stay unambiguous) as `\xHH`. Written without allocating.
struct Printable<'a>(&'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while !rest.is_empty() {
            let safe = rest
                .iter()
                .position(|&b| !(b' '..=b'~').contains(&b) || b == b'\\')
                .unwrap_or(rest.len());
            // Printable ASCII is valid UTF-8.
            f.write_str(std::str::from_utf8(&rest[..safe]).map_err(|_| fmt::Error)?)?;
            if let Some(&byte) = rest.get(safe) {
                write!(f, "\\x{byte:02x}")?;
                rest = &rest[safe + 1..];
            } else {
                rest = &[];
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anything_but_printable_ascii_is_escaped() {
        let shown = |bytes: &[u8]| Printable(bytes).to_string();
        assert_eq!(
            shown(b"/bc/companies('A%20B')?x"),
            "/bc/companies('A%20B')?x"
        );
        assert_eq!(shown(b""), "");
        assert_eq!(
            shown(b"\x1b[31m\n\r\t\x7f"),
            "\\x1b[31m\\x0a\\x0d\\x09\\x7f"
        );
        // NEL (C1), LINE SEPARATOR, RIGHT-TO-LEFT OVERRIDE, as UTF-8.
        assert_eq!(
            shown("a\u{85}b\u{2028}c\u{202e}".as_bytes()),
            "a\\xc2\\x85b\\xe2\\x80\\xa8c\\xe2\\x80\\xae"
        );
        // A literal backslash cannot pass for an escape.
        assert_eq!(shown(b"a\\xe2"), "a\\x5cxe2");
        assert_eq!(shown(&[0xff, b'/']), "\\xff/");
    }
}
