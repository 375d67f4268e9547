//! Test support: a fake Entra ID token endpoint, a recording fake upstream, the proxy
//! spawned from YAML, and clients that send exactly the bytes a test wants.
//!
//! Everything listens on 127.0.0.1:0. The fakes record what crossed the wire so tests
//! assert on that, not on the proxy's internals.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use s2s_proxy::{Config, Proxy, Source};

/// Planted secrets: none of them may ever appear in logs, bodies or metrics.
pub const CLIENT_SECRET: &str = "cs_CANARY_7f3a~x+y";
pub const PASSWORD: &str = "pw_CANARY_55c1";
pub const API_KEY: &str = "ak_CANARY_0c2e";
pub const TENANT: &str = "00000000-0000-0000-0000-0000000000t1";

/// A TLS acceptor for a test upstream with this certificate, offering HTTP/2 and
/// HTTP/1.1 by ALPN (rustls with the ring provider, as the proxy uses).
pub fn tls_acceptor(
    certificate: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> tokio_rustls::TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certificate], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Serves `handler` on 127.0.0.1:0 (HTTP/1.1 and h2c) until the runtime ends.
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(request).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// How the fake identity provider answers.
#[derive(Debug, Clone)]
pub enum IdpMode {
    /// Issue `tok-<n>` tokens with this lifetime in seconds.
    Issue { expires_in: u64 },
    /// Answer with this status, body and optional Retry-After.
    Fail {
        status: u16,
        body: String,
        retry_after: Option<u64>,
    },
    /// Issue this exact access token (for canary sweeps).
    IssueToken(String),
    /// Wait this long, then issue like `Issue { expires_in: 3599 }`.
    Slow(Duration),
    /// Never answer.
    Stall,
}

impl IdpMode {
    /// Entra's answer to a wrong client secret: 401 with [`invalid_client_body`].
    pub fn invalid_client() -> Self {
        Self::Fail {
            status: 401,
            body: invalid_client_body(),
            retry_after: None,
        }
    }
}

/// A token request as the fake IdP received it.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub path: String,
    pub headers: HeaderMap,
    pub form: Vec<(String, String)>,
}

/// A fake Entra ID v2 token endpoint that counts and records requests.
#[derive(Clone)]
pub struct FakeIdp {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    mode: Arc<Mutex<IdpMode>>,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
}

impl FakeIdp {
    pub async fn start() -> Self {
        Self::start_with(IdpMode::Issue { expires_in: 3599 }).await
    }

    pub async fn start_with(mode: IdpMode) -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let mode = Arc::new(Mutex::new(mode));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (c, m, r) = (calls.clone(), mode.clone(), requests.clone());
        let addr = serve(move |request: Request<Incoming>| {
            let (calls, mode, requests) = (c.clone(), m.clone(), r.clone());
            async move {
                let path = request.uri().path().to_owned();
                let headers = request.headers().clone();
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let form = url_decode_form(&body);
                requests.lock().unwrap().push(TokenRequest { path, headers, form });
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                let mode = mode.lock().unwrap().clone();
                match mode {
                    IdpMode::Issue { expires_in } => issue(n, expires_in),
                    IdpMode::IssueToken(token) => json_response(
                        StatusCode::OK,
                        format!(r#"{{"token_type":"Bearer","expires_in":3599,"access_token":"{token}"}}"#),
                    ),
                    IdpMode::Slow(delay) => {
                        tokio::time::sleep(delay).await;
                        issue(n, 3599)
                    }
                    IdpMode::Stall => std::future::pending().await,
                    IdpMode::Fail {
                        status,
                        body,
                        retry_after,
                    } => {
                        let mut response =
                            json_response(StatusCode::from_u16(status).unwrap(), body);
                        if let Some(seconds) = retry_after {
                            response
                                .headers_mut()
                                .insert("retry-after", HeaderValue::from(seconds));
                        }
                        response
                    }
                }
            }
        })
        .await;
        Self {
            addr,
            calls,
            mode,
            requests,
        }
    }

    pub fn set_mode(&self, mode: IdpMode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// `authority:` for an Entra-style credential pointing here.
    pub fn authority(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits (bounded) until at least `n` token requests arrived.
    pub async fn wait_for_calls(&self, n: usize) {
        for _ in 0..500 {
            if self.calls() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("expected {n} token requests, saw {}", self.calls());
    }
}

fn issue(n: usize, expires_in: u64) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        format!(
            r#"{{"token_type":"Bearer","expires_in":{expires_in},"ext_expires_in":{expires_in},"access_token":"tok-{n}"}}"#
        ),
    )
}

/// The Entra answer to a wrong client secret (AADSTS7000215), as seen in real traces.
pub fn invalid_client_body() -> String {
    r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app 'app-1'. Trace ID: 0c1a Correlation ID: 9d2b Timestamp: 2026-11-28 05:00:00Z","error_codes":[7000215],"timestamp":"2026-11-28 05:00:00Z","trace_id":"0c1a","correlation_id":"9d2b","error_uri":"https://login.microsoftonline.com/error?code=7000215"}"#.to_owned()
}

pub fn url_decode_form(body: &[u8]) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }
    std::str::from_utf8(body)
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// The body recorded for a request whose body the proxy aborted.
pub const ABORTED: &[u8] = b"<aborted>";

/// A request as the fake upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync>;

/// A fake upstream that records every request and answers through a replaceable handler
/// (default: 200 with a small JSON body).
#[derive(Clone)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    handler: Arc<Mutex<Handler>>,
    delay: Arc<Mutex<Duration>>,
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Mutex<Handler>> = Arc::new(Mutex::new(Arc::new(|_: &Recorded| {
            json_response(StatusCode::OK, r#"{"value":[]}"#.to_owned())
        })));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let (rec, h, d) = (recorded.clone(), handler.clone(), delay.clone());
        let addr = serve(move |request: Request<Incoming>| {
            let (recorded, handler, delay) = (rec.clone(), h.clone(), d.clone());
            async move {
                let method = request.method().to_string();
                let target = request
                    .uri()
                    .path_and_query()
                    .map(|pq| pq.as_str().to_owned())
                    .unwrap_or_default();
                let headers = request.headers().clone();
                // A body the proxy aborted is recorded as such: never a complete request.
                let body = match request.into_body().collect().await {
                    Ok(body) => body.to_bytes(),
                    Err(_) => Bytes::from_static(ABORTED),
                };
                let entry = Recorded {
                    method,
                    target,
                    headers,
                    body,
                };
                recorded.lock().unwrap().push(entry.clone());
                let delay = *delay.lock().unwrap();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let handler = handler.lock().unwrap().clone();
                handler(&entry)
            }
        })
        .await;
        Self {
            addr,
            recorded,
            handler,
            delay,
        }
    }

    pub fn respond(
        &self,
        handler: impl Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) {
        *self.handler.lock().unwrap() = Arc::new(handler);
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.recorded.lock().unwrap().len()
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A running proxy; dropping the handle does not stop it, `shutdown` does.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyHandle {
    /// Signals shutdown and waits until the proxy has drained.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(40), &mut self.task)
            .await
            .expect("proxy did not stop")
            .unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// The `Authorization` header of client `erp` (Basic erp / [`PASSWORD`]).
pub fn erp() -> (&'static str, String) {
    ("authorization", basic("erp", PASSWORD))
}

/// The standard variables of [`standard_yaml`].
pub fn standard_vars() -> HashMap<String, String> {
    HashMap::from([
        ("BC_SECRET".to_owned(), CLIENT_SECRET.to_owned()),
        ("ERP_PASSWORD".to_owned(), PASSWORD.to_owned()),
        ("SCANNER_KEY".to_owned(), API_KEY.to_owned()),
    ])
}

/// The path under the fake upstream that the standard `/bc/` route points at.
pub const BC_BASE: &str = "/v2.0/00000000-0000-0000-0000-0000000000t1/Production/";

/// A `credentials:` block with one Entra-style credential `bc` (client `app-1`, secret
/// `${BC_SECRET}`) for `tenant` at `authority`.
pub fn bc_credential_yaml(tenant: &str, authority: &str) -> String {
    format!(
        r#"credentials:
  bc:
    type: client_secret
    tenant_id: {tenant}
    authority: {authority}
    client_id: app-1
    client_secret: ${{BC_SECRET}}
"#
    )
}

/// A config with one Entra-style credential `bc` pointing at `idp`, clients `erp` (Basic
/// erp / PASSWORD), `scanner` (API key) and `other` (Basic other / PASSWORD, no route),
/// and routes `/bc/` and `/bc/sandbox/` to `upstream`.
pub fn standard_yaml(idp: &FakeIdp, upstream: &FakeUpstream) -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:0
{credential}clients:
  erp:
    basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }}
  scanner:
    api_key: ${{SCANNER_KEY}}
  other:
    basic: {{ username: other, password: "${{ERP_PASSWORD}}" }}
routes:
  - prefix: /bc/
    upstream: {base}{BC_BASE}
    credential: bc
    clients: [erp, scanner]
  - prefix: /bc/sandbox/
    upstream: {base}/v2.0/{TENANT}/Sandbox/
    credential: bc
    clients: [erp]
"#,
        credential = bc_credential_yaml(TENANT, &idp.authority()),
        base = upstream.base(),
    )
}

pub fn config(yaml: &str, vars: HashMap<String, String>) -> Config {
    Config::from_yaml_str(yaml, &Source::inline("test.yaml", vars))
        .unwrap_or_else(|error| panic!("test config invalid: {error}"))
}

/// Starts the proxy for `config` on 127.0.0.1:0.
pub async fn spawn_proxy(config: Config) -> ProxyHandle {
    run(Proxy::bind(config).await.expect("proxy binds"))
}

/// Runs a bound proxy until its handle is shut down.
pub fn run(proxy: Proxy) -> ProxyHandle {
    let addr = proxy.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        proxy
            .run_until(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    ProxyHandle {
        addr,
        shutdown: Some(tx),
        task,
    }
}

/// The standard set-up: fake IdP, fake upstream, proxy; waits for the start-up token.
pub async fn standard() -> (FakeIdp, FakeUpstream, ProxyHandle) {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_proxy(config(&standard_yaml(&idp, &upstream), standard_vars())).await;
    idp.wait_for_calls(1).await;
    (idp, upstream, proxy)
}

/// A response as a test client saw it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Sends one HTTP/1.1 request over a fresh connection, exactly as given (no path
/// normalisation). `Host` is added unless the headers contain one.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut builder = Request::builder().method(method).uri(target);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", addr.to_string());
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body.into())).unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// `Authorization: Basic` for user:password.
pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Writes raw bytes and returns the first response: its head and, when it has a
/// `Content-Length`, that many body bytes; otherwise whatever arrives until the server
/// closes (at most 5 s).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(total) = complete_response_len(&out)
                && out.len() >= total
            {
                return;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Head length plus `Content-Length`, once the head is complete and has one.
fn complete_response_len(bytes: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = response.parse(bytes).ok()? else {
        return None;
    };
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))?;
    let length: usize = std::str::from_utf8(length.value)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(head + length)
}

/// The status code of the first response in raw response bytes.
pub fn raw_status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

pub mod dynamics;
pub mod windowed;

// ---------------------------------------------------------------------------------------
// Operations: admin listener, reload

/// [`standard_yaml`] with the admin listener on a free loopback port.
pub fn admin_yaml(idp: &FakeIdp, upstream: &FakeUpstream) -> String {
    standard_yaml(idp, upstream).replacen(
        "credentials:",
        "admin:\n  listen: 127.0.0.1:0\ncredentials:",
        1,
    )
}

/// `yaml` with `limits: { <limits> }` under `server:` (after the first `listen:` line,
/// which is the server's in [`standard_yaml`] and [`admin_yaml`]).
pub fn with_limits(yaml: &str, limits: &str) -> String {
    yaml.replacen(
        "  listen: 127.0.0.1:0\n",
        &format!("  listen: 127.0.0.1:0\n  limits: {{ {limits} }}\n"),
        1,
    )
}

/// A running proxy with its admin address and a handle to reload it.
pub struct OpsProxy {
    pub handle: ProxyHandle,
    pub admin: SocketAddr,
    pub reload: s2s_proxy::ReloadHandle,
}

/// Starts the proxy for `config` (which must configure `admin:`); with `path`, SIGHUP and
/// changes of that file reload it.
pub async fn spawn_ops_proxy(config: Config, path: Option<&std::path::Path>) -> OpsProxy {
    let proxy = match path {
        Some(path) => Proxy::bind_with_path(config, path).await,
        None => Proxy::bind(config).await,
    }
    .expect("proxy binds");
    let admin = proxy.admin_addr().expect("admin listener configured");
    let reload = proxy.reload_handle();
    OpsProxy {
        handle: run(proxy),
        admin,
        reload,
    }
}

/// Starts the proxy for [`admin_yaml`] with [`standard_vars`], without a config file.
pub async fn spawn_admin_proxy(idp: &FakeIdp, upstream: &FakeUpstream) -> OpsProxy {
    spawn_ops_proxy(config(&admin_yaml(idp, upstream), standard_vars()), None).await
}

/// A plain GET without credentials (admin endpoints).
pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    send(addr, "GET", path, &[], "").await
}

/// Polls `check` every 50 ms until it returns `Some`, at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `test` on a current-thread runtime under a TRACE subscriber that keeps every log
/// line (a current-thread runtime keeps every task on this thread, under the subscriber).
pub fn capture_logs<F: std::future::Future>(test: F) -> (F::Output, LogCapture) {
    let capture = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (runtime.block_on(test), capture)
}

/// A `tracing` writer that keeps everything written, for assertions on log output.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The raw bytes captured so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// ---------------------------------------------------------------------------------------
// Limits: an upstream the test paces

/// An upstream that holds every request until the test lets it go
/// ([`GatedUpstream::release`]), answering 200 then; it records the order requests
/// arrived in and the most it held at once.
#[derive(Clone)]
pub struct GatedUpstream {
    pub addr: SocketAddr,
    gate: Arc<tokio::sync::Semaphore>,
    arrived: Arc<Mutex<Vec<String>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

/// Counts a request out of [`GatedUpstream`]'s in-flight count however it ends (the
/// proxy may drop it half-way).
struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl GatedUpstream {
    pub async fn start() -> Self {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let arrived = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let (g, a, now, max) = (
            gate.clone(),
            arrived.clone(),
            in_flight.clone(),
            max_in_flight.clone(),
        );
        let addr = serve(move |request: Request<Incoming>| {
            let (gate, arrived, now, max) = (g.clone(), a.clone(), now.clone(), max.clone());
            async move {
                let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                let _held = Held(now);
                max.fetch_max(current, Ordering::SeqCst);
                let target = request.uri().path().to_owned();
                arrived.lock().unwrap().push(target);
                let _ = request.into_body().collect().await;
                gate.acquire().await.unwrap().forget();
                json_response(StatusCode::OK, r#"{"value":[]}"#.to_owned())
            }
        })
        .await;
        Self {
            addr,
            gate,
            arrived,
            in_flight,
            max_in_flight,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets `n` more requests (held now or arriving later) be answered.
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Paths of the requests received so far, in arrival order.
    pub fn arrived(&self) -> Vec<String> {
        self.arrived.lock().unwrap().clone()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

/// The value of the `/metrics` sample `series` (name and labels, exactly as rendered).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// A global dispatcher that records nothing but keeps every callsite's interest at
/// "sometimes". tracing-core caches interest process-wide: a callsite first hit by another
/// test thread while no dispatcher exists is cached as "never", which would hide it from a
/// test's log capture. Test files that capture logs call this first in every test.
pub fn quiet_global_dispatch() {
    use tracing::level_filters::LevelFilter;
    use tracing::subscriber::Interest;
    use tracing::{Event, Metadata, span};

    struct Quiet;
    impl tracing::Subscriber for Quiet {
        fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
            Interest::sometimes()
        }
        fn max_level_hint(&self) -> Option<LevelFilter> {
            Some(LevelFilter::TRACE)
        }
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            false
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Quiet);
    });
}

/// A real `redis-server` for fleet mode tests (tests/support/redis.rs).
mod redis;
#[allow(unused_imports)]
pub use self::redis::RedisServer;
