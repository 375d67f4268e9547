//! The upstream connection pool, seen from the upstream's side of the wire: connections
//! are reused, a connection the upstream ended is not used again and the request arrives
//! once, a request that may have reached the upstream is never sent twice, HTTP/2 (ALPN
//! `h2`) multiplexes requests on one connection, and a response that was not read to its
//! end never leaves its connection in the pool. The proxy's workers run on runtimes of
//! their own, so what needs the pool on a runtime the test controls (a request handed back
//! unsent, idle expiry on tokio's paused clock) is in `src/upstream/pool/tests.rs`.

mod support;

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A proxy with one route `/bc/` to `upstream` (the path after the prefix goes as is).
fn yaml(idp: &FakeIdp, upstream: &str, extra_server: &str) -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:0
  workers: 1
{extra_server}credentials:
  bc: {{ type: client_secret, tenant_id: {TENANT}, authority: "{authority}", client_id: app, client_secret: "${{BC_SECRET}}" }}
clients:
  erp: {{ basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }} }}
routes:
  - {{ prefix: /bc/, upstream: "{upstream}/", credential: bc, clients: [erp] }}
"#,
        authority = idp.authority(),
    )
}

async fn proxy_to(upstream: &str) -> (FakeIdp, ProxyHandle) {
    let idp = FakeIdp::start().await;
    let proxy = spawn_proxy(config(&yaml(&idp, upstream, ""), standard_vars())).await;
    idp.wait_for_calls(1).await;
    (idp, proxy)
}

async fn get(proxy: &ProxyHandle, target: &str) -> Answer {
    send(
        proxy.addr,
        "GET",
        target,
        &[("authorization", &basic("erp", PASSWORD))],
        "",
    )
    .await
}

/// A request as an upstream saw it: on which of its connections (numbered from 1 in
/// accept order), and the method and target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    conn: usize,
    method: String,
    target: String,
}

/// A hyper HTTP/1.1 upstream that numbers its connections and records which ones ended.
/// `/empty` answers 204, `/chunked` a chunked body with trailers, `/endless` a body that
/// never ends; anything else a small JSON body naming the connection and the target.
#[derive(Clone, Default)]
struct CountingUpstream {
    accepted: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    closed: Arc<Mutex<Vec<usize>>>,
}

impl CountingUpstream {
    async fn start() -> (Self, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let upstream = Self::default();
        let state = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = state.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let state = state.clone();
                tokio::spawn(async move {
                    let recorder = state.clone();
                    let service = service_fn(move |request: Request<Incoming>| {
                        let state = recorder.clone();
                        async move { Ok::<_, Infallible>(state.answer(conn, &request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    state.closed.lock().unwrap().push(conn);
                });
            }
        });
        (upstream, base)
    }

    fn answer(
        &self,
        conn: usize,
        request: &Request<Incoming>,
    ) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
        let target = request.uri().path().to_owned();
        self.seen.lock().unwrap().push(Seen {
            conn,
            method: request.method().to_string(),
            target: target.clone(),
        });
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = match target.as_str() {
            "/empty" => {
                let mut response = Response::new(Full::new(Bytes::new()).boxed());
                *response.status_mut() = StatusCode::NO_CONTENT;
                return response;
            }
            "/chunked" => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-done", "1".parse().unwrap());
                vec![
                    Ok(Frame::data(Bytes::from_static(b"{\"part\":"))),
                    Ok(Frame::data(Bytes::from_static(b"1}"))),
                    Ok(Frame::trailers(trailers)),
                ]
            }
            "/endless" => {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let stream = futures_util::stream::repeat_with(move || {
                    Ok::<_, Infallible>(Frame::data(chunk.clone()))
                });
                return Response::new(StreamBody::new(stream).boxed());
            }
            _ => {
                let body = format!(r#"{{"conn":{conn},"target":"{target}"}}"#);
                return Response::new(Full::new(Bytes::from(body)).boxed());
            }
        };
        Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> Vec<usize> {
        self.closed.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let (upstream, base) = CountingUpstream::start().await;
    let (_idp, proxy) = proxy_to(&base).await;
    // Every way a response can end returns the connection: a length, chunks with
    // trailers, no body at all (204, HEAD).
    for target in [
        "/bc/a",
        "/bc/chunked",
        "/bc/empty",
        "/bc/b",
        "/bc/chunked",
        "/bc/c",
    ] {
        let answer = get(&proxy, target).await;
        assert!(answer.status == 200 || answer.status == 204, "{target}");
    }
    let head = send(
        proxy.addr,
        "HEAD",
        "/bc/d",
        &[("authorization", &basic("erp", PASSWORD))],
        "",
    )
    .await;
    assert_eq!(head.status, 200);
    let answer = get(&proxy, "/bc/e").await;
    assert_eq!(answer.json()["target"], "/e");
    assert_eq!(upstream.connections(), 1, "{:?}", upstream.seen());
    assert_eq!(upstream.seen().len(), 8);
    assert!(upstream.seen().iter().all(|seen| seen.conn == 1));
    proxy.shutdown().await;
}

/// An HTTP/1.1 upstream on plain threads and blocking sockets, so that a test decides
/// exactly when a connection closes, whatever the test's runtime is doing.
#[derive(Clone, Default)]
struct ThreadUpstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Each connection, to close it from the test.
    streams: Arc<Mutex<Vec<std::net::TcpStream>>>,
    /// Close the connection after reading the next request, without answering it.
    drop_next: Arc<AtomicBool>,
    /// Connections whose other end (the proxy) closed.
    ended: Arc<Mutex<Vec<usize>>>,
}

impl ThreadUpstream {
    fn start() -> (Self, SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Self::default();
        let state = upstream.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let conn = {
                    let mut streams = state.streams.lock().unwrap();
                    streams.push(stream.try_clone().unwrap());
                    streams.len()
                };
                let state = state.clone();
                std::thread::spawn(move || {
                    state.serve(conn, stream);
                    state.ended.lock().unwrap().push(conn);
                });
            }
        });
        (upstream, addr)
    }

    fn serve(&self, conn: usize, mut stream: std::net::TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let mut words = line.split_whitespace();
            let method = words.next().unwrap_or_default().to_owned();
            let target = words.next().unwrap_or_default().to_owned();
            // The rest of the head (the proxy sends GETs without a body).
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    return;
                }
                if header == "\r\n" {
                    break;
                }
            }
            self.seen.lock().unwrap().push(Seen {
                conn,
                method,
                target: target.clone(),
            });
            if self.drop_next.swap(false, Ordering::SeqCst) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            let body = format!(r#"{{"conn":{conn},"target":"{target}"}}"#);
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Ends the upstream's side of connection `conn` (FIN sent when this returns) and
    /// keeps reading it, to see when the proxy closes its side.
    fn half_close(&self, conn: usize) {
        self.streams.lock().unwrap()[conn - 1]
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
    }

    fn ended(&self) -> Vec<usize> {
        self.ended.lock().unwrap().clone()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.streams.lock().unwrap().len()
    }
}

/// A GET from client `erp`, as bytes.
fn request_bytes(target: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nhost: proxy.test\r\nauthorization: {}\r\n\r\n",
        basic("erp", PASSWORD)
    )
    .into_bytes()
}

/// The upstream ends an idle pooled connection (RFC 9112 §9.3): the proxy closes its
/// side, and the next request goes out once, on a new connection. (The race where the
/// request takes the connection just before hyper sees the close, and hyper hands the
/// request back unsent, is `src/upstream/pool/tests.rs`, on a runtime the test controls.)
#[tokio::test]
async fn an_idle_connection_the_upstream_ended_is_not_used_and_the_request_arrives_once() {
    let (upstream, addr) = ThreadUpstream::start();
    let (_idp, proxy) = proxy_to(&format!("http://{addr}")).await;
    let answer = get(&proxy, "/bc/a").await;
    assert_eq!(answer.text(), r#"{"conn":1,"target":"/a"}"#);
    upstream.half_close(1);
    eventually(
        Duration::from_secs(20),
        "the proxy closing its side",
        || async { upstream.ended().contains(&1).then_some(()) },
    )
    .await;
    let answer = get(&proxy, "/bc/b").await;
    assert_eq!(answer.text(), r#"{"conn":2,"target":"/b"}"#);
    let seen: Vec<_> = upstream
        .seen()
        .into_iter()
        .map(|s| (s.conn, s.target))
        .collect();
    assert_eq!(seen, [(1, "/a".to_owned()), (2, "/b".to_owned())]);
    proxy.shutdown().await;
}

/// Once a request was written the upstream may have processed it: a connection that
/// dies before the response is a 502, never a second delivery — on a pooled connection
/// and on a fresh one alike.
#[tokio::test]
async fn a_request_whose_connection_dies_after_it_was_sent_is_not_sent_again() {
    let (upstream, addr) = ThreadUpstream::start();
    let (_idp, proxy) = proxy_to(&format!("http://{addr}")).await;
    let auth = basic("erp", PASSWORD);
    let headers = [("authorization", auth.as_str())];
    assert_eq!(get(&proxy, "/bc/a").await.status, 200);

    // Pooled connection.
    upstream.drop_next.store(true, Ordering::SeqCst);
    let answer = send(proxy.addr, "POST", "/bc/pooled", &headers, "{}").await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(answer.json()["error"], "upstream_failed");
    // Fresh connection (the pool is empty now).
    upstream.drop_next.store(true, Ordering::SeqCst);
    let answer = send(proxy.addr, "GET", "/bc/fresh", &headers, "").await;
    assert_eq!(answer.status, 502, "{}", answer.text());

    let seen = upstream.seen();
    let targets: Vec<_> = seen.iter().map(|s| (s.conn, s.target.as_str())).collect();
    assert_eq!(targets, [(1, "/a"), (1, "/pooled"), (2, "/fresh")]);
    assert_eq!(upstream.connections(), 2);
    // And the pool recovers.
    let answer = get(&proxy, "/bc/after").await;
    assert_eq!(answer.json()["conn"], 3);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_response_not_read_to_its_end_does_not_return_its_connection() {
    let (upstream, base) = CountingUpstream::start().await;
    let (_idp, proxy) = proxy_to(&base).await;
    // The caller reads the head and a little of an endless body, then goes away.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(&request_bytes("/bc/endless"))
        .await
        .unwrap();
    let mut chunk = vec![0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await.unwrap();
    assert!(chunk[..n].starts_with(b"HTTP/1.1 200"));
    drop(stream);
    // The proxy closes the upstream connection (hyper cannot finish that response).
    eventually(
        Duration::from_secs(20),
        "the upstream connection closed",
        || async { upstream.closed().contains(&1).then_some(()) },
    )
    .await;
    let answer = get(&proxy, "/bc/next").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), r#"{"conn":2,"target":"/next"}"#);
    proxy.shutdown().await;
}

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn pki_for_localhost() -> (Pki, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let certificate = params.self_signed(&key).unwrap();
    let pki = Pki {
        ca_pem: certificate.pem(),
        issuer: Issuer::new(params, key),
    };
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let leaf = params.signed_by(&key, &pki.issuer).unwrap();
    let der = leaf.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (pki, der, key)
}

/// A TLS upstream offering `h2` (and `http/1.1`). While `wave` is set, every request waits
/// until that many are in flight at once, so a wave completes only when they are all
/// sent concurrently.
#[derive(Clone)]
struct H2Upstream {
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(usize, http::Version)>>>,
    wave: Arc<Mutex<Option<Arc<tokio::sync::Barrier>>>>,
    /// Aborts the connection tasks (the upstream goes away).
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl H2Upstream {
    async fn start(
        certificate: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> (Self, SocketAddr) {
        let acceptor = support::tls_acceptor(certificate, key);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Self {
            connections: Arc::default(),
            seen: Arc::default(),
            wave: Arc::default(),
            tasks: Arc::default(),
        };
        let state = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state) = (acceptor.clone(), state.clone());
                let tasks = state.tasks.clone();
                let task = tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let conn = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let service = service_fn(move |request: Request<Incoming>| {
                        let state = state.clone();
                        async move {
                            state.seen.lock().unwrap().push((conn, request.version()));
                            let wave = state.wave.lock().unwrap().clone();
                            if let Some(wave) = wave {
                                wave.wait().await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                                r#"{{"conn":{conn}}}"#
                            )))))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
                tasks.lock().unwrap().push(task.abort_handle());
            }
        });
        (upstream, addr)
    }
}

/// An HTTP/2 upstream over TLS (certificate for `localhost`) and a proxy trusting it.
async fn h2_upstream_and_proxy() -> (H2Upstream, FakeIdp, ProxyHandle) {
    let (pki, certificate, key) = pki_for_localhost();
    let (upstream, addr) = H2Upstream::start(certificate, key).await;
    let ca = std::env::temp_dir().join(format!(
        "s2s-proxy-pool-ca-{}-{}.pem",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let idp = FakeIdp::start().await;
    let extra = format!("  upstream_ca_file: {}\n", ca.display());
    let yaml = yaml(&idp, &format!("https://localhost:{}", addr.port()), &extra);
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    std::fs::remove_file(&ca).unwrap();
    (upstream, idp, proxy)
}

#[tokio::test]
async fn an_h2_upstream_gets_concurrent_requests_multiplexed_on_one_connection() {
    const WAVE: usize = 8;
    let (upstream, _idp, proxy) = h2_upstream_and_proxy().await;

    // The first request finds out that the upstream speaks HTTP/2.
    let first = get(&proxy, "/bc/first").await;
    assert_eq!(first.status, 200, "{}", first.text());
    // Then a wave of requests that the upstream answers only once all are in flight.
    *upstream.wave.lock().unwrap() = Some(Arc::new(tokio::sync::Barrier::new(WAVE)));
    let answers = wave(&proxy, WAVE).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
    let seen = upstream.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), WAVE + 1);
    assert!(
        seen.iter()
            .all(|&(conn, version)| conn == 1 && version == http::Version::HTTP_2),
        "{seen:?}"
    );

    // The upstream drops the connection: the next requests open a new one.
    *upstream.wave.lock().unwrap() = None;
    for task in upstream.tasks.lock().unwrap().drain(..) {
        task.abort();
    }
    let after = eventually(Duration::from_secs(20), "a new connection", || async {
        let answer = get(&proxy, "/bc/after").await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert_eq!(after.json()["conn"], 2);
    proxy.shutdown().await;
}

/// Requests that find no connection to an upstream that may speak HTTP/2 wait for the
/// one being made instead of each opening their own (which would serve one request and
/// then be dropped): a cold burst opens one connection.
#[tokio::test]
async fn a_cold_burst_to_an_h2_upstream_opens_one_connection() {
    const WAVE: usize = 8;
    let (upstream, _idp, proxy) = h2_upstream_and_proxy().await;
    // The upstream answers only once all are in flight: they are all cold.
    *upstream.wave.lock().unwrap() = Some(Arc::new(tokio::sync::Barrier::new(WAVE)));
    let answers = wave(&proxy, WAVE).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
    assert!(
        upstream
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|&(conn, _)| conn == 1),
        "{:?}",
        upstream.seen.lock().unwrap()
    );
    proxy.shutdown().await;
}

async fn wave(proxy: &ProxyHandle, n: usize) -> Vec<Answer> {
    let requests = (0..n).map(|i| {
        let addr = proxy.addr;
        tokio::spawn(async move {
            send(
                addr,
                "GET",
                &format!("/bc/wave/{i}"),
                &[("authorization", &basic("erp", PASSWORD))],
                "",
            )
            .await
        })
    });
    let mut answers = Vec::new();
    for request in requests.collect::<Vec<_>>() {
        answers.push(request.await.unwrap());
    }
    answers
}
