//! Upstreams over TLS: private CAs through `server.upstream_ca_file`, HTTP/2 by ALPN, and
//! certificate failures that must stop the request before any byte of it — or the token —
//! reaches the socket.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;
use tokio::net::TcpListener;

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> Pki {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let certificate = params.self_signed(&key).unwrap();
    Pki {
        ca_pem: certificate.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf certificate for `names`, valid now unless `expired`.
fn leaf(
    pki: &Pki,
    names: &[&str],
    expired: bool,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let certificate = params.signed_by(&key, &pki.issuer).unwrap();
    (
        certificate.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// The HTTP version and `Authorization` header of a request the upstream received.
type Seen = (http::Version, Option<String>);

/// A TLS upstream offering h2 and http/1.1; counts handshakes that completed and records
/// the HTTP version and Authorization header of every request.
#[derive(Clone, Default)]
struct TlsUpstream {
    handshakes: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Seen>>>,
}

impl TlsUpstream {
    async fn start(
        certificate: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> (Self, SocketAddr) {
        let acceptor = support::tls_acceptor(certificate, key);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Self::default();
        let state = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state) = (acceptor.clone(), state.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    state.handshakes.fetch_add(1, Ordering::SeqCst);
                    let service = service_fn(move |request: Request<Incoming>| {
                        let state = state.clone();
                        async move {
                            let auth = request
                                .headers()
                                .get("authorization")
                                .map(|v| v.to_str().unwrap().to_owned());
                            state
                                .requests
                                .lock()
                                .unwrap()
                                .push((request.version(), auth));
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"{}"),
                            )))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (upstream, addr)
    }
}

fn ca_file(pem: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "s2s-proxy-test-ca-{}-{}.pem",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, pem).unwrap();
    path
}

fn yaml(idp: &FakeIdp, upstream: SocketAddr, ca: Option<&PathBuf>) -> String {
    let ca = ca
        .map(|p| format!("  upstream_ca_file: {}\n", p.display()))
        .unwrap_or_default();
    format!(
        r#"
server:
  listen: 127.0.0.1:0
{ca}credentials:
  bc: {{ type: client_secret, tenant_id: {TENANT}, authority: "{authority}", client_id: app, client_secret: "${{BC_SECRET}}" }}
clients:
  erp: {{ basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }} }}
routes:
  - {{ prefix: /bc/, upstream: "https://localhost:{port}/v2.0/", credential: bc, clients: [erp] }}
"#,
        authority = idp.authority(),
        port = upstream.port(),
    )
}

async fn get(proxy: &ProxyHandle) -> Answer {
    send(
        proxy.addr,
        "GET",
        "/bc/companies",
        &[("authorization", &basic("erp", PASSWORD))],
        "",
    )
    .await
}

#[tokio::test]
async fn a_private_ca_upstream_is_reached_over_http2() {
    let pki = ca();
    let (certificate, key) = leaf(&pki, &["localhost"], false);
    let (upstream, addr) = TlsUpstream::start(certificate, key).await;
    let idp = FakeIdp::start().await;
    let ca = ca_file(&pki.ca_pem);
    let proxy = spawn_proxy(config(&yaml(&idp, addr, Some(&ca)), standard_vars())).await;
    let answer = get(&proxy).await;
    std::fs::remove_file(&ca).unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let requests = upstream.requests.lock().unwrap().clone();
    assert_eq!(
        requests,
        vec![(http::Version::HTTP_2, Some("Bearer tok-1".to_owned()))]
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn certificate_failures_are_502_before_any_request_is_sent() {
    let idp = FakeIdp::start().await;
    let pki = ca();
    let other = ca();
    let cases = [
        ("untrusted CA", leaf(&other, &["localhost"], false), &pki),
        ("wrong host", leaf(&pki, &["erp.example.test"], false), &pki),
        ("expired", leaf(&pki, &["localhost"], true), &pki),
    ];
    for (name, (certificate, key), trusted) in cases {
        let (upstream, addr) = TlsUpstream::start(certificate, key).await;
        let ca = ca_file(&trusted.ca_pem);
        let proxy = spawn_proxy(config(&yaml(&idp, addr, Some(&ca)), standard_vars())).await;
        let answer = get(&proxy).await;
        std::fs::remove_file(&ca).unwrap();
        assert_eq!(answer.status, 502, "{name}: {}", answer.text());
        assert_eq!(answer.json()["error"], "upstream_failed");
        assert_eq!(
            upstream.handshakes.load(Ordering::SeqCst),
            0,
            "{name}: handshake completed"
        );
        assert!(
            upstream.requests.lock().unwrap().is_empty(),
            "{name}: a request got through"
        );
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn without_the_private_ca_the_upstream_is_not_trusted() {
    let pki = ca();
    let (certificate, key) = leaf(&pki, &["localhost"], false);
    let (upstream, addr) = TlsUpstream::start(certificate, key).await;
    let idp = FakeIdp::start().await;
    let proxy = spawn_proxy(config(&yaml(&idp, addr, None), standard_vars())).await;
    assert_eq!(get(&proxy).await.status, 502);
    assert!(upstream.requests.lock().unwrap().is_empty());
    proxy.shutdown().await;
}
