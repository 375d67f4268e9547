//! Business Central-shaped fakes for the Dynamics fidelity tests: absolute OData links,
//! `$batch` multipart answers, gzip bodies, and an upstream that measures how many
//! requests it holds at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::{
    BC_BASE, FakeIdp, ProxyHandle, TENANT, bc_credential_yaml, config, serve, spawn_proxy,
    standard_vars,
};

/// The standard config's credential and clients (see [`super::standard_yaml`]) with one
/// route `/bc/` to `{base}{BC_BASE}` for `erp` and `scanner`, `extra` lines (indented
/// four spaces) on that route and `server` lines (indented two) under `server:`.
pub fn yaml_with(idp: &FakeIdp, base: &str, server: &str, extra: &str) -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:0
{server}{credential}clients:
  erp:
    basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }}
  scanner:
    api_key: ${{SCANNER_KEY}}
routes:
  - prefix: /bc/
    upstream: {base}{BC_BASE}
    credential: bc
    clients: [erp, scanner]
{extra}"#,
        credential = bc_credential_yaml(TENANT, &idp.authority()),
    )
}

/// Starts the proxy for [`yaml_with`] and waits for its start-up token.
pub async fn spawn_with(idp: &FakeIdp, base: &str, server: &str, extra: &str) -> ProxyHandle {
    let proxy = spawn_proxy(config(
        &yaml_with(idp, base, server, extra),
        standard_vars(),
    ))
    .await;
    idp.wait_for_calls(1).await;
    proxy
}

/// A JSON response with the given headers.
pub fn json(status: u16, body: impl Into<String>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header(
            "content-type",
            "application/json; odata.metadata=minimal; charset=utf-8",
        )
        .body(Full::new(Bytes::from(body.into())))
        .unwrap()
}

/// gzip of `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// An upstream that answers 200 after `delay` and records the most requests it held at
/// once.
#[derive(Clone)]
pub struct CountingUpstream {
    pub addr: std::net::SocketAddr,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
}

impl CountingUpstream {
    pub async fn start(delay: Duration) -> Self {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let (now, max, done) = (in_flight.clone(), max_in_flight.clone(), served.clone());
        let addr = serve(move |request: Request<Incoming>| {
            let (now, max, done) = (now.clone(), max.clone(), done.clone());
            async move {
                let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(current, Ordering::SeqCst);
                let _ = request.into_body().collect().await;
                tokio::time::sleep(delay).await;
                now.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
                json(200, r#"{"value":[]}"#)
            }
        })
        .await;
        Self {
            addr,
            in_flight,
            max_in_flight,
            served,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}
