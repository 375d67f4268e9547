//! Attack catalogue regression tests (SECURITY.md catalogue ids in the test names): real
//! sockets, raw bytes where the attack needs bytes no well-behaved client would send, and
//! a hand-written upstream where the attack needs an upstream no well-behaved server would
//! be. Every test asserts the answer and what the upstream and the token endpoint received.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::BC_BASE as BASE;

fn erp() -> String {
    basic("erp", PASSWORD)
}

/// [`standard`], after [`quiet_global_dispatch`].
async fn setup() -> (FakeIdp, FakeUpstream, ProxyHandle) {
    quiet_global_dispatch();
    standard().await
}

/// The standard proxy set-up, but with every route pointing at `base` instead of a
/// [`FakeUpstream`]. Waits for the start-up token.
async fn proxy_to(base: &str) -> (FakeIdp, ProxyHandle) {
    quiet_global_dispatch();
    let idp = FakeIdp::start().await;
    let placeholder = FakeUpstream::start().await;
    let yaml = standard_yaml(&idp, &placeholder).replace(&placeholder.base(), base);
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    idp.wait_for_calls(1).await;
    (idp, proxy)
}

// ---------------------------------------------------------------------------------------
// A hand-written HTTP/1 upstream that can answer with bytes hyper would never produce.

/// How the raw upstream answers the next request.
#[derive(Clone)]
enum Script {
    /// 200, `Content-Length`, body `good:<target>`; the connection stays open.
    Good,
    /// 200 with body `id=<last path segment>`; of every ten requests, the 4th is answered
    /// by a TCP reset and the 8th by half a head and a reset.
    Echo,
    /// These bytes verbatim; then the connection stays open and is read further.
    Bytes(Arc<Vec<u8>>),
    /// These bytes verbatim, then close.
    BytesThenClose(Arc<Vec<u8>>),
    /// As `Good`, then a half-close while the connection is idle; the connection ends
    /// when the proxy closes its side (counted in `idle_closed`).
    GoodThenIdleClose,
    /// Read the whole request, then close without answering.
    Drop,
}

/// A request as the raw upstream read it: framing bytes included.
#[derive(Debug, Clone)]
struct RawSeen {
    conn: usize,
    method: String,
    target: String,
    head: String,
    /// The body as it crossed the wire (chunk sizes and trailers included).
    body: Vec<u8>,
}

#[derive(Clone)]
struct RawUpstream {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    seen: Arc<Mutex<Vec<RawSeen>>>,
    idle_closed: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Self {
            addr,
            script: Arc::new(Mutex::new(script)),
            seen: Arc::new(Mutex::new(Vec::new())),
            idle_closed: Arc::new(AtomicUsize::new(0)),
        };
        let this = upstream.clone();
        tokio::spawn(async move {
            let connections = AtomicUsize::new(0);
            let requests = Arc::new(AtomicUsize::new(0));
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(this.clone().connection(stream, conn, requests.clone()));
            }
        });
        upstream
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, script: Script) {
        *self.script.lock().unwrap() = script;
    }

    fn seen(&self) -> Vec<RawSeen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (10 s at most) until the proxy has closed `n` idle connections that this
    /// upstream half-closed.
    async fn wait_idle_closed(&self, n: usize) {
        eventually(
            Duration::from_secs(10),
            "the proxy to drop the closed connection",
            || {
                let closed = self.idle_closed.load(Ordering::SeqCst);
                async move { (closed >= n).then_some(()) }
            },
        )
        .await;
    }

    async fn connection(self, mut stream: TcpStream, conn: usize, requests: Arc<AtomicUsize>) {
        let mut buf = Vec::new();
        loop {
            let Some(seen) = read_request(&mut stream, &mut buf, conn).await else {
                return;
            };
            let target = seen.target.clone();
            self.seen.lock().unwrap().push(seen);
            let n = requests.fetch_add(1, Ordering::SeqCst);
            let script = self.script.lock().unwrap().clone();
            match script {
                Script::Good => {
                    if stream.write_all(&good_response(&target)).await.is_err() {
                        return;
                    }
                }
                Script::Echo => {
                    let id = target.rsplit('/').next().unwrap_or_default();
                    match n % 10 {
                        3 => return reset(stream),
                        7 => {
                            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").await;
                            return reset(stream);
                        }
                        _ => {
                            let body = format!("id={id}");
                            let response = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if stream.write_all(response.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Script::Bytes(bytes) => {
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Script::BytesThenClose(bytes) => {
                    let _ = stream.write_all(&bytes).await;
                    return;
                }
                Script::GoodThenIdleClose => {
                    if stream.write_all(&good_response(&target)).await.is_err() {
                        return;
                    }
                    let _ = stream.shutdown().await;
                    let mut rest = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(10), async {
                        while !matches!(stream.read(&mut rest).await, Ok(0) | Err(_)) {}
                    })
                    .await;
                    self.idle_closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Script::Drop => return,
            }
        }
    }
}

/// Closes with a TCP reset (SO_LINGER 0).
#[allow(deprecated)]
fn reset(stream: TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

fn good_response(target: &str) -> Vec<u8> {
    let body = format!("good:{target}");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads one complete request (head and body, by `Content-Length` or chunked) from
/// `stream`, keeping surplus bytes in `buf`; `None` when the stream ends first.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>, conn: usize) -> Option<RawSeen> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some((seen, used)) = parse_request(buf, conn) {
            buf.drain(..used);
            return Some(seen);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn parse_request(buf: &[u8], conn: usize) -> Option<(RawSeen, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head_len) = request.parse(buf).ok()? else {
        return None;
    };
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let rest = &buf[head_len..];
    let body_len = if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        chunked_len(rest)?
    } else {
        header("content-length").map_or(0, |cl| cl.trim().parse().unwrap())
    };
    if rest.len() < body_len {
        return None;
    }
    let seen = RawSeen {
        conn,
        method: request.method?.to_owned(),
        target: request.path?.to_owned(),
        head: String::from_utf8_lossy(&buf[..head_len]).into_owned(),
        body: rest[..body_len].to_vec(),
    };
    Some((seen, head_len + body_len))
}

/// Length of a complete chunked body (last chunk and trailers included) at the start of
/// `bytes`, or `None` while it is incomplete.
fn chunked_len(bytes: &[u8]) -> Option<usize> {
    let line_end = |from: usize| {
        bytes[from..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|i| from + i)
    };
    let mut pos = 0;
    loop {
        let end = line_end(pos)?;
        let line = std::str::from_utf8(&bytes[pos..end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        pos = end + 2;
        if size == 0 {
            loop {
                let end = line_end(pos)?;
                let empty = end == pos;
                pos = end + 2;
                if empty {
                    return Some(pos);
                }
            }
        }
        pos += size + 2;
        if pos > bytes.len() {
            return None;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Raw client side.

/// One response as read off the wire.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    body: Vec<u8>,
}

/// The complete responses at the start of `bytes`, interim (1xx) ones included.
fn parse_responses(mut bytes: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = response.parse(bytes) else {
            return out;
        };
        let status = response.code.unwrap_or(0);
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let rest = &bytes[head_len..];
        let (body, used) = if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            let Some(len) = chunked_len(rest) else {
                return out;
            };
            (decode_chunked(&rest[..len]), len)
        } else {
            let len = header("content-length").map_or(0, |cl| cl.trim().parse().unwrap_or(0));
            if rest.len() < len {
                return out;
            }
            (rest[..len].to_vec(), len)
        };
        out.push(RawResponse { status, body });
        bytes = &rest[used..];
    }
}

fn decode_chunked(mut bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = bytes.windows(2).position(|w| w == b"\r\n").unwrap();
        let line = std::str::from_utf8(&bytes[..end]).unwrap();
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&bytes[end + 2..end + 2 + size]);
        bytes = &bytes[end + 2 + size + 2..];
    }
}

/// Writes `bytes` (write errors ignored: the server may refuse early), optionally
/// half-closes, then reads until `finals` non-1xx responses are complete, the server
/// closes, or 5 s pass. Returns the raw bytes read.
async fn exchange(addr: SocketAddr, bytes: &[u8], finals: usize, half_close: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    if half_close {
        let _ = stream.shutdown().await;
    }
    read_until(&mut stream, finals).await
}

async fn read_until(stream: &mut TcpStream, finals: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 8192];
        loop {
            let done = parse_responses(&out)
                .iter()
                .filter(|r| r.status >= 200)
                .count();
            if done >= finals {
                return;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    out
}

/// The final (non-1xx) responses in `bytes`.
fn finals(bytes: &[u8]) -> Vec<RawResponse> {
    parse_responses(bytes)
        .into_iter()
        .filter(|r| r.status >= 200)
        .collect()
}

/// A GET over a fresh HTTP/1.1 connection; the body is an error when the response was
/// cut off.
async fn fetch(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> (u16, http::HeaderMap, Result<Bytes, String>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(target)
        .header("host", addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = sender
        .send_request(builder.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the body ends (completely or not) in time")
        .map(|collected| collected.to_bytes())
        .map_err(|error| error.to_string());
    (parts.status.as_u16(), parts.headers, body)
}

/// Every request the raw upstream saw carries exactly the proxy's token and no client
/// credential.
fn assert_only_the_token(seen: &[RawSeen]) {
    for request in seen {
        let head = request.head.to_ascii_lowercase();
        assert_eq!(
            head.matches("authorization:").count(),
            1,
            "{}",
            request.head
        );
        assert!(head.contains("authorization: bearer tok-1\r\n"), "{head}");
        assert!(!head.contains("basic "), "{head}");
        assert!(!head.contains("x-api-key"), "{head}");
    }
}

// ---------------------------------------------------------------------------------------
// D14, G3, G9, G10, D15: what an untrusted or broken upstream can do.

const SMUGGLED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: yes\r\n\r\nSMUGGLED";

#[tokio::test]
async fn d14_untrusted_upstream_framing_is_502_and_the_connection_is_not_reused() {
    let upstream = RawUpstream::start(Script::Good).await;
    let (idp, proxy) = proxy_to(&upstream.base()).await;
    let auth = erp();
    let continues = "HTTP/1.1 100 Continue\r\n\r\n".repeat(1000);
    // (name, response bytes (the smuggled response follows), 502 required?)
    let cases: Vec<(&str, String, bool)> = vec![
        (
            "content-length and transfer-encoding",
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_owned(),
            false,
        ),
        (
            "two different content-lengths",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 10\r\n\r\nok".to_owned(),
            true,
        ),
        (
            "crlf-split header",
            "HTTP/1.1 200 OK\r\nContent-\r\nLength: 2\r\n\r\nok".to_owned(),
            true,
        ),
        (
            "obs-fold header",
            "HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok".to_owned(),
            true,
        ),
        (
            "an unsolicited second response",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_owned(),
            false,
        ),
        (
            "four-digit status",
            "HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok".to_owned(),
            true,
        ),
        (
            "a thousand 100 Continue",
            format!("{continues}HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            false,
        ),
    ];
    let mut outcomes = Vec::new();
    for (i, (name, response, must_be_502)) in cases.iter().enumerate() {
        let mut bytes = response.clone().into_bytes();
        bytes.extend_from_slice(SMUGGLED);
        upstream.set(Script::Bytes(Arc::new(bytes)));
        let request =
            format!("GET /bc/d14/{i} HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n");
        let raw = exchange(proxy.addr, request.as_bytes(), 1, false).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let answers = finals(&raw);
        let answer = answers
            .first()
            .unwrap_or_else(|| panic!("{name}: no response: {text:?}"));
        outcomes.push(format!("{name}: {}", answer.status));
        assert!(!text.contains("SMUGGLED"), "{name}: {text}");
        assert!(
            !text.to_ascii_lowercase().contains("x-smuggled"),
            "{name}: {text}"
        );
        assert!(!text.contains("100 Continue"), "{name}: {text}");
        if *must_be_502 {
            assert_eq!(answer.status, 502, "{name}: {text}");
        } else {
            assert!(
                answer.status == 502 || (answer.status == 200 && answer.body.len() <= 2),
                "{name}: {text}"
            );
        }
        // The next request, to a well-behaved upstream, gets its own answer: nothing left
        // over from the broken exchange.
        upstream.set(Script::Good);
        let target = format!("/bc/d14/{i}/next");
        let (status, headers, body) =
            fetch(proxy.addr, "GET", &target, &[("authorization", &auth)], "").await;
        assert_eq!(status, 200, "{name}: next request");
        assert!(headers.get("x-smuggled").is_none(), "{name}: {headers:?}");
        assert_eq!(
            body.unwrap(),
            Bytes::from(format!("good:{BASE}d14/{i}/next")),
            "{name}: next request"
        );
    }
    eprintln!("D14 outcomes: {outcomes:?}");
    // Content-Length and chunked together with a body that fits only one of them: the
    // client never gets a length that disagrees with the bytes that follow.
    upstream.set(Script::Bytes(Arc::new(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
    )));
    let request = format!("GET /bc/d14/clte HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n");
    let raw = exchange(proxy.addr, request.as_bytes(), 1, false).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    eprintln!("D14 CL 100 + chunked: {text:?}");
    let answer = finals(&raw);
    let answer = answer
        .first()
        .unwrap_or_else(|| panic!("incomplete: {text:?}"));
    assert!(
        answer.status == 502 || (answer.status == 200 && answer.body == b"hello"),
        "{text}"
    );
    assert!(
        !text.to_ascii_lowercase().contains("content-length: 100"),
        "{text}"
    );

    let seen = upstream.seen();
    assert_eq!(
        seen.len(),
        2 * cases.len() + 1,
        "each request sent once: {seen:?}"
    );
    // Every broken exchange cost its upstream connection: the next request went out on
    // another one.
    let conn = |target: String| seen.iter().find(|r| r.target == target).unwrap().conn;
    for (i, (name, _, _)) in cases.iter().enumerate() {
        assert_ne!(
            conn(format!("{BASE}d14/{i}")),
            conn(format!("{BASE}d14/{i}/next")),
            "{name}: the connection was reused"
        );
    }
    assert_only_the_token(&seen);
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn g3_a_response_cut_short_is_never_a_complete_200() {
    let upstream = RawUpstream::start(Script::Good).await;
    let (idp, proxy) = proxy_to(&upstream.base()).await;
    let auth = erp();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("content-length 100, 50 sent", {
            let mut bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec();
            bytes.extend_from_slice(&[b'a'; 50]);
            bytes
        }),
        (
            "chunked, cut before the last chunk",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n19\r\naaaaaaaaaaaaaaaaaaaaaaaaa\r\n".to_vec(),
        ),
    ];
    for (name, bytes) in cases {
        upstream.set(Script::BytesThenClose(Arc::new(bytes)));
        let (status, headers, body) =
            fetch(proxy.addr, "GET", "/bc/g3", &[("authorization", &auth)], "").await;
        match (status, body) {
            (200, Ok(body)) => {
                panic!("{name}: a cut response looked complete: {headers:?} {body:?}")
            }
            (200, Err(error)) => eprintln!("G3 {name}: 200 with a failed body ({error})"),
            (status, body) => {
                assert_eq!(status, 502, "{name}: {body:?}");
            }
        }
        // The proxy is unharmed.
        upstream.set(Script::Good);
        let (status, _, body) = fetch(
            proxy.addr,
            "GET",
            "/bc/g3/next",
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body.unwrap(), Bytes::from(format!("good:{BASE}g3/next")));
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_only_the_token(&seen);
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn g9_a_megabyte_of_response_headers_is_502_and_the_proxy_stays_up() {
    let upstream = RawUpstream::start(Script::Good).await;
    let (idp, proxy) = proxy_to(&upstream.base()).await;
    let auth = erp();
    let mut bytes = b"HTTP/1.1 200 OK\r\n".to_vec();
    let filler = "a".repeat(64 * 1024);
    for i in 0..16 {
        bytes.extend_from_slice(format!("X-Fill-{i}: {filler}\r\n").as_bytes());
    }
    bytes.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
    assert!(bytes.len() > 1024 * 1024);
    upstream.set(Script::BytesThenClose(Arc::new(bytes)));
    let (status, headers, body) =
        fetch(proxy.addr, "GET", "/bc/g9", &[("authorization", &auth)], "").await;
    assert_eq!(status, 502, "{body:?}");
    assert!(
        headers
            .keys()
            .all(|name| !name.as_str().starts_with("x-fill"))
    );
    assert!(body.unwrap().len() < 4096);
    upstream.set(Script::Good);
    let (status, _, body) = fetch(
        proxy.addr,
        "GET",
        "/bc/g9/next",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body.unwrap(), Bytes::from(format!("good:{BASE}g9/next")));
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_only_the_token(&seen);
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn g10_an_idle_pooled_connection_closed_by_the_upstream_is_not_reused_and_posts_are_never_sent_twice()
 {
    let upstream = RawUpstream::start(Script::GoodThenIdleClose).await;
    let (idp, proxy) = proxy_to(&upstream.base()).await;
    let auth = erp();
    let headers = [("authorization", auth.as_str())];

    // The upstream closes the pooled connection once it is idle.
    let (status, _, body) = fetch(proxy.addr, "GET", "/bc/g10/a", &headers, "").await;
    assert_eq!(
        (status, body.unwrap()),
        (200, Bytes::from(format!("good:{BASE}g10/a")))
    );
    upstream.wait_idle_closed(1).await;
    upstream.set(Script::Good);
    let (status, _, body) = fetch(proxy.addr, "GET", "/bc/g10/b", &headers, "").await;
    assert_eq!(
        (status, body.unwrap()),
        (200, Bytes::from(format!("good:{BASE}g10/b")))
    );

    // Again, then a POST: delivered once, on a live connection.
    upstream.set(Script::GoodThenIdleClose);
    let (status, _, _) = fetch(proxy.addr, "GET", "/bc/g10/c", &headers, "").await;
    assert_eq!(status, 200);
    upstream.wait_idle_closed(2).await;
    upstream.set(Script::Good);
    let (status, _, body) = fetch(proxy.addr, "POST", "/bc/g10/post", &headers, "{\"n\":1}").await;
    assert_eq!(
        (status, body.unwrap()),
        (200, Bytes::from(format!("good:{BASE}g10/post")))
    );

    // An upstream that closes after reading the request: 502, and the POST (or GET) is
    // not sent again on another connection.
    upstream.set(Script::Drop);
    let (status, _, _) = fetch(
        proxy.addr,
        "POST",
        "/bc/g10/dropped-post",
        &headers,
        "{\"n\":2}",
    )
    .await;
    assert_eq!(status, 502);
    let (status, _, _) = fetch(proxy.addr, "GET", "/bc/g10/dropped-get", &headers, "").await;
    assert_eq!(status, 502);

    let seen = upstream.seen();
    let count = |target: &str| {
        seen.iter()
            .filter(|r| r.target == format!("{BASE}g10/{target}"))
            .count()
    };
    for target in ["a", "b", "c", "post", "dropped-post", "dropped-get"] {
        assert_eq!(count(target), 1, "{target}: {seen:?}");
    }
    let posts: Vec<_> = seen.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[0].body, b"{\"n\":1}");
    assert_eq!(posts[1].body, b"{\"n\":2}");
    // After an idle close the next request went out on a fresh connection.
    let conn = |target: &str| {
        seen.iter()
            .find(|r| r.target == format!("{BASE}g10/{target}"))
            .unwrap()
            .conn
    };
    assert_ne!(conn("a"), conn("b"));
    assert_ne!(conn("c"), conn("post"));
    assert_only_the_token(&seen);
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn d15_concurrent_keep_alive_clients_never_get_another_requests_response() {
    let upstream = RawUpstream::start(Script::Echo).await;
    let (idp, proxy) = proxy_to(&upstream.base()).await;
    let auth = erp();
    let mut clients = Vec::new();
    for c in 0..20 {
        let auth = auth.clone();
        let addr = proxy.addr;
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            let mut sender = None;
            for r in 0..10 {
                if sender.is_none() {
                    let stream = TcpStream::connect(addr).await.unwrap();
                    let (s, connection) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream))
                            .await
                            .unwrap();
                    tokio::spawn(connection);
                    sender = Some(s);
                }
                let id = format!("c{c}-r{r}");
                let request = Request::get(format!("/bc/d15/{id}"))
                    .header("host", "p")
                    .header("authorization", &auth)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let Ok(response) = sender.as_mut().unwrap().send_request(request).await else {
                    sender = None;
                    failed += 1;
                    continue;
                };
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.map(|b| b.to_bytes());
                match (status, body) {
                    (200, Ok(body)) => {
                        assert_eq!(body, Bytes::from(format!("id={id}")), "mixed-up response");
                        ok += 1;
                    }
                    (status, _) => {
                        assert_ne!(status, 200, "{id}: a 200 with a broken body");
                        assert_eq!(status, 502, "{id}");
                        failed += 1;
                    }
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for client in clients {
        let (o, f) = client.await.unwrap();
        ok += o;
        failed += f;
    }
    eprintln!("D15: {ok} answered, {failed} failed");
    assert_eq!(ok + failed, 200);
    assert!(ok >= 150, "{ok} answered");
    assert!(
        failed >= 10,
        "the fault injection must bite: {failed} failed"
    );
    let seen = upstream.seen();
    assert_eq!(seen.len(), 200, "each request sent once");
    assert_only_the_token(&seen);
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// C6, C8, C11/H10, D2-D8: what a hostile client can send.

/// Sends each raw request on its own connection; each must be refused with one of
/// `allowed` (or, when `closed_ok`, by closing without an answer).
async fn refused(addr: SocketAddr, cases: &[(&str, Vec<u8>)], allowed: &[u16], closed_ok: bool) {
    for (name, bytes) in cases {
        let raw = exchange(addr, bytes, 1, false).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        match finals(&raw).first() {
            Some(answer) => assert!(
                allowed.contains(&answer.status),
                "{name}: expected {allowed:?}: {text}"
            ),
            None => assert!(closed_ok, "{name}: no answer: {text:?}"),
        }
    }
}

/// Each raw request's first final status, as `name: Some(status)` lines for the log.
async fn outcomes(addr: SocketAddr, cases: &[(&str, Vec<u8>)]) -> Vec<String> {
    let mut outcomes = Vec::new();
    for (name, bytes) in cases {
        let status = first_status(&exchange(addr, bytes, 1, false).await);
        outcomes.push(format!("{name}: {status:?}"));
    }
    outcomes
}

/// The status of the first final response in raw response bytes.
fn first_status(raw: &[u8]) -> Option<u16> {
    finals(raw).first().map(|a| a.status)
}

/// The first final status of a raw `GET target` with `Authorization: auth`, sent on its
/// own connection with the target byte for byte.
async fn raw_get_status(addr: SocketAddr, target: &str, auth: &str) -> Option<u16> {
    let request = format!("GET {target} HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n");
    first_status(&exchange(addr, request.as_bytes(), 1, false).await)
}

fn head_with(auth: &str, extra: &str) -> Vec<u8> {
    format!("GET /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n{extra}\r\n").into_bytes()
}

#[tokio::test]
async fn c6_nul_obs_fold_and_bare_cr_in_header_values_are_400() {
    let (idp, upstream, proxy) = setup().await;
    let auth = erp();
    let cases = vec![
        ("NUL", head_with(&auth, "X-A: b\x00c\r\n")),
        ("obs-fold", head_with(&auth, "X-A: b\r\n c\r\n")),
        ("bare CR", head_with(&auth, "X-A: b\rc\r\n")),
        ("bare CR before the name", head_with(&auth, "\rX-A: b\r\n")),
    ];
    refused(proxy.addr, &cases, &[400], false).await;
    assert_eq!(upstream.count(), 0, "nothing may be forwarded");
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn c8_too_many_or_too_large_request_headers_are_431() {
    let (idp, upstream, proxy) = setup().await;
    let auth = erp();
    let many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let large = format!("X-Big: {}\r\n", "a".repeat(64 * 1024));
    let cases = vec![
        ("101 headers", head_with(&auth, &many)),
        ("64 KiB header block", head_with(&auth, &large)),
    ];
    refused(proxy.addr, &cases, &[431, 400], false).await;
    // The large head is 431 specifically.
    let raw = exchange(proxy.addr, &cases[1].1, 1, false).await;
    assert_eq!(finals(&raw)[0].status, 431);
    assert_eq!(upstream.count(), 0, "nothing may be forwarded");
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn c8_a_large_head_within_the_limit_is_forwarded_whole() {
    // 20 KiB: more than the proxy's first read (4 KiB, replayed to hyper) and hyper's
    // initial 8 KiB buffer, less than the 32 KiB limit. Sent in one write and in pieces.
    let (idp, upstream, proxy) = setup().await;
    let value = "v".repeat(20 * 1024);
    let head = head_with(&erp(), &format!("X-Big: {value}\r\n"));
    let raw = exchange(proxy.addr, &head, 1, false).await;
    assert_eq!(finals(&raw)[0].status, 200);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for piece in head.chunks(3000) {
        stream.write_all(piece).await.unwrap();
        tokio::task::yield_now().await;
    }
    let raw = read_until(&mut stream, 1).await;
    assert_eq!(finals(&raw)[0].status, 200);
    let received = upstream.requests();
    assert_eq!(received.len(), 2);
    for request in &received {
        assert_eq!(request.header("x-big"), Some(value.as_str()));
    }
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[test]
fn c11_h10_escape_sequences_and_newlines_never_reach_the_logs_raw() {
    quiet_global_dispatch();
    let ((), capture) = capture_logs(async {
        let (idp, upstream, proxy) = setup().await;
        let auth = erp();
        let forged = "\n2026-01-01T00:00:00.000000Z  INFO s2s_proxy: FORGED admin=true";
        let evil_user = basic(&format!("\x1b[31mFAKE\x1b[0m{forged}"), PASSWORD);
        let requests: Vec<(&str, Vec<u8>, u16)> = vec![
            (
                "ESC in User-Agent",
                head_with(&auth, "User-Agent: \x1b[31mFAKE\x1b[0m\r\n"),
                400,
            ),
            (
                "ESC in X-Request-Id",
                head_with(&auth, "X-Request-Id: \x1b[2K\rFAKE\r\n"),
                400,
            ),
            (
                "ESC and a newline in the Basic user name",
                head_with(&evil_user, ""),
                401,
            ),
            (
                "escape in the path",
                format!(
                    "GET /bc/%1b[31mFAKE%0a{} HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n",
                    "FORGED"
                )
                .into_bytes(),
                400,
            ),
            (
                "a harmless request id with spaces",
                head_with(
                    &auth,
                    "X-Request-Id: id FAKE FORGED=1\r\nUser-Agent: FAKE FORGED\r\n",
                ),
                200,
            ),
        ];
        for (name, bytes, expected) in &requests {
            let raw = exchange(proxy.addr, bytes, 1, false).await;
            let answers = finals(&raw);
            assert_eq!(
                answers.first().map(|a| a.status),
                Some(*expected),
                "{name}: {}",
                String::from_utf8_lossy(&raw)
            );
        }
        assert_eq!(
            upstream.count(),
            1,
            "only the harmless request is forwarded"
        );
        assert_eq!(idp.calls(), 1);
        proxy.shutdown().await;
    });
    let logs = capture.bytes();
    let text = String::from_utf8_lossy(&logs).into_owned();
    assert!(
        text.contains("Request."),
        "access log lines expected:\n{text}"
    );
    assert!(
        !logs.contains(&0x1b),
        "a raw ESC byte reached the logs:\n{text:?}"
    );
    for line in text.lines() {
        assert!(
            !line.trim_start().starts_with("2026-01-01") && !line.contains("FORGED admin"),
            "forged log line: {line:?}"
        );
    }
}

#[tokio::test]
async fn d2_obfuscated_transfer_encoding_is_refused_and_nothing_is_forwarded() {
    let (idp, upstream, proxy) = setup().await;
    let auth = erp();
    let post = |version: &str, te: &str| {
        format!(
            "POST /bc/x HTTP/{version}\r\nHost: p\r\nAuthorization: {auth}\r\n{te}\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        .into_bytes()
    };
    let cases = vec![
        ("xchunked", post("1.1", "Transfer-Encoding: xchunked\r\n")),
        (
            "chunked then identity",
            post(
                "1.1",
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            ),
        ),
        (
            "chunked, identity",
            post("1.1", "Transfer-Encoding: chunked, identity\r\n"),
        ),
        (
            "space before the colon",
            post("1.1", "Transfer-Encoding : chunked\r\n"),
        ),
        ("HTTP/1.0", post("1.0", "Transfer-Encoding: chunked\r\n")),
        (
            "chunked, chunked",
            post("1.1", "Transfer-Encoding: chunked, chunked\r\n"),
        ),
        (
            "chunked twice",
            post(
                "1.1",
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            ),
        ),
        (
            "gzip, chunked",
            post("1.1", "Transfer-Encoding: gzip, chunked\r\n"),
        ),
        (
            "vertical tab",
            post("1.1", "Transfer-Encoding: \x0bchunked\r\n"),
        ),
    ];
    refused(proxy.addr, &cases, &[400, 501], true).await;
    assert_eq!(
        upstream.count(),
        0,
        "nothing may be forwarded: {:?}",
        upstream.requests()
    );
    // Tab before and space after the value are optional whitespace (RFC 9110 §5.5), which
    // the parser strips: `chunked` is unambiguous. Refused, or forwarded with the body
    // decoded exactly.
    for (name, te) in [
        (
            "tab before, space after",
            "Transfer-Encoding:\tchunked \r\n",
        ),
        ("upper case", "Transfer-Encoding: CHUNKED\r\n"),
    ] {
        let before = upstream.count();
        let raw = exchange(proxy.addr, &post("1.1", te), 1, false).await;
        let status = first_status(&raw);
        eprintln!("D2 {name}: {status:?}");
        match status {
            Some(400) | None => assert_eq!(upstream.count(), before),
            Some(200) => {
                assert_eq!(upstream.count(), before + 1);
                let seen = upstream.requests().pop().unwrap();
                assert_eq!(seen.body, Bytes::from("abc"), "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(upstream.requests().iter().all(|r| r.body == "abc"));
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn d3_malformed_content_length_is_400_and_nothing_is_forwarded() {
    let (idp, upstream, proxy) = setup().await;
    let auth = erp();
    // After the 3-byte body comes a request without credentials: whoever treats the length
    // differently sees a different second request.
    let post = |cl: &str| {
        format!(
            "POST /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n{cl}\r\nabcGET /bc/smuggled HTTP/1.1\r\nHost: p\r\n\r\n"
        )
        .into_bytes()
    };
    let cases = vec![
        ("+3", post("Content-Length: +3\r\n")),
        ("3, 3", post("Content-Length: 3, 3\r\n")),
        (
            "3 and 4",
            post("Content-Length: 3\r\nContent-Length: 4\r\n"),
        ),
        ("empty", post("Content-Length: \r\n")),
        ("0x3", post("Content-Length: 0x3\r\n")),
        ("-3", post("Content-Length: -3\r\n")),
        ("3.0", post("Content-Length: 3.0\r\n")),
        ("03", post("Content-Length: 03\r\n")),
        (
            "20 digits",
            post("Content-Length: 00000000000000000003\r\n"),
        ),
        (
            "20 digits, overflowing",
            post("Content-Length: 99999999999999999999\r\n"),
        ),
        ("space before the colon", post("Content-Length : 3\r\n")),
    ];
    eprintln!("D3 outcomes: {:?}", outcomes(proxy.addr, &cases).await);
    refused(proxy.addr, &cases, &[400], true).await;
    assert_eq!(
        upstream.count(),
        0,
        "nothing may be forwarded: {:?}",
        upstream.requests()
    );

    // Extra optional whitespace around the value (RFC 9110 §5.5: not part of the value; the
    // parser strips it before anyone sees it) and two identical lines (RFC 9110 §8.6: may
    // be collapsed) are unambiguous. Either refuse them or forward exactly 3 bytes with one
    // length; the follow-up is then the client's own, unauthenticated, second request.
    for (name, cl) in [
        (" 3", "Content-Length:  3\r\n"),
        ("tab, 3, space", "Content-Length:\t3 \r\n"),
        ("3 and 3", "Content-Length: 3\r\nContent-Length: 3\r\n"),
    ] {
        let before = upstream.count();
        let raw = exchange(proxy.addr, &post(cl), 2, false).await;
        let statuses: Vec<u16> = finals(&raw).iter().map(|a| a.status).collect();
        eprintln!("D3 {name}: {statuses:?}");
        match statuses.first() {
            Some(400) | None => assert_eq!(upstream.count(), before),
            Some(200) => {
                assert_eq!(statuses.get(1), Some(&401), "{name}: {statuses:?}");
                assert_eq!(upstream.count(), before + 1);
                let seen = upstream.requests().pop().unwrap();
                assert_eq!(seen.body, Bytes::from("abc"), "{name}");
                let lengths: Vec<_> = seen.headers.get_all("content-length").iter().collect();
                assert_eq!(lengths, ["3"], "{name}: one normalised length");
            }
            Some(other) => panic!("{name}: {other}"),
        }
    }
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| !r.target.contains("smuggled"))
    );
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn d4_broken_chunked_bodies_never_reach_the_upstream_complete() {
    let (idp, upstream, proxy) = setup().await;
    let auth = erp();
    let head = format!(
        "POST /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let with = |body: &str| format!("{head}{body}").into_bytes();
    // Refused while the body is read.
    let cases = vec![
        (
            "overflowing chunk size",
            with("FFFFFFFFFFFFFFFFF1\r\nabc\r\n0\r\n\r\n"),
        ),
        ("bare LF after the size", with("3\nabc\r\n0\r\n\r\n")),
        ("bare LF after the data", with("3\r\nabc\n0\r\n\r\n")),
        ("no CRLF after the data", with("3\r\nabcX0\r\n\r\n")),
    ];
    eprintln!("D4 outcomes: {:?}", outcomes(proxy.addr, &cases).await);
    refused(proxy.addr, &cases, &[400], true).await;
    // Cut before the last chunk, then the client closes (half-close so an answer can
    // still be read): whatever the answer, no complete request upstream.
    for body in ["3\r\nabc\r\n", "3\r\nab"] {
        let raw = exchange(proxy.addr, &with(body), 1, true).await;
        if let Some(answer) = finals(&raw).first() {
            assert_ne!(answer.status, 200, "{body:?}");
        }
    }
    // A large streamed body cut off: the upstream request is aborted, never completed.
    {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let chunk = format!("10000\r\n{}\r\n", "a".repeat(0x10000));
        for _ in 0..4 {
            stream.write_all(chunk.as_bytes()).await.unwrap();
        }
        stream.shutdown().await.unwrap();
        let raw = read_until(&mut stream, 1).await;
        if let Some(answer) = finals(&raw).first() {
            assert_ne!(answer.status, 200);
        }
    }
    // A well-formed request afterwards (it also gives aborted requests time to land).
    let (status, _, _) = fetch(
        proxy.addr,
        "GET",
        "/bc/after",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let seen = upstream.requests();
    for request in &seen {
        if request.target != format!("{BASE}after") {
            assert_eq!(
                request.body, ABORTED,
                "a broken body was completed: {request:?}"
            );
        }
    }
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn d4_request_trailers_are_not_forwarded() {
    let upstream = RawUpstream::start(Script::Good).await;
    let (idp, proxy) = proxy_to(&upstream.base()).await;
    let auth = erp();
    for size in [3usize, 100_000] {
        let data = "a".repeat(size);
        let request = format!(
            "POST /bc/trailers HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nTrailer: Authorization\r\n\r\n{size:x}\r\n{data}\r\n0\r\nAuthorization: Bearer evil\r\nX-Api-Key: {API_KEY}\r\nX-Trailer: evil\r\n\r\n"
        );
        let raw = exchange(proxy.addr, request.as_bytes(), 1, false).await;
        let answers = finals(&raw);
        assert_eq!(answers.first().map(|a| a.status), Some(200), "{size}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        let everything = format!("{}{}", request.head, String::from_utf8_lossy(&request.body));
        assert!(!everything.contains("evil"), "{everything:.2000}");
        assert!(!everything.contains(API_KEY));
        assert!(
            !request.head.to_ascii_lowercase().contains("\ntrailer:"),
            "{}",
            request.head
        );
    }
    // The small body went out with a length, the large one chunked: either way it ends
    // where the data ends, with no trailer section.
    assert_eq!(seen[0].body, b"aaa");
    assert!(
        seen[1].body.len() == 100_000 || seen[1].body.ends_with(b"aaaa\r\n0\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&seen[1].body[seen[1].body.len().saturating_sub(40)..])
    );
    assert_only_the_token(&seen);
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn d5_a_pipelined_request_without_credentials_gets_its_own_401() {
    let (idp, upstream, proxy) = setup().await;
    let auth = erp();
    let bytes = format!(
        "GET /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\nGET /bc/y HTTP/1.1\r\nHost: p\r\n\r\n"
    );
    let raw = exchange(proxy.addr, bytes.as_bytes(), 2, false).await;
    let statuses: Vec<u16> = finals(&raw).iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 401], "{}", String::from_utf8_lossy(&raw));
    assert_eq!(upstream.count(), 1);
    assert_eq!(upstream.requests()[0].target, format!("{BASE}x"));
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some("Bearer tok-1")
    );
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn d7_a_refused_caller_gets_no_100_continue() {
    let (idp, upstream, proxy) = setup().await;
    let wrong = basic("erp", "wrong");
    for auth in [Some(wrong.as_str()), None] {
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "POST /bc/x HTTP/1.1\r\nHost: p\r\n{auth}Expect: 100-continue\r\nContent-Length: 10000000\r\n\r\n"
        );
        let raw = exchange(proxy.addr, head.as_bytes(), 1, false).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        assert!(text.starts_with("HTTP/1.1 401 "), "{text}");
        assert!(!text.contains("100 Continue"), "{text}");
        assert!(!text.contains(" 100 "), "{text}");
    }
    assert_eq!(upstream.count(), 0);
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn d8_an_h2c_upgrade_is_forwarded_as_a_plain_request_without_upgrade_headers() {
    let (idp, upstream, proxy) = setup().await;
    let auth = erp();
    let head = head_with(
        &auth,
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
    );
    let raw = exchange(proxy.addr, &head, 1, false).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(!text.contains(" 101 "), "{text}");
    assert!(!text.to_ascii_lowercase().contains("upgrade"), "{text}");
    assert_eq!(upstream.count(), 1);
    let seen = &upstream.requests()[0];
    assert_eq!(seen.target, format!("{BASE}x"));
    for name in ["upgrade", "http2-settings", "connection"] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name} forwarded: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("authorization"), Some("Bearer tok-1"));
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// B7, B18, A9, A6: targets.

#[tokio::test]
async fn b7_a_fragment_in_the_target_never_reaches_the_upstream() {
    let (idp, upstream, proxy) = setup().await;
    let auth = erp();
    for target in ["/bc/x#/../../crm", "/bc/x#frag", "/bc/x?a=1#/../crm"] {
        let status = raw_get_status(proxy.addr, target, &auth).await;
        eprintln!("B7 {target}: {status:?}");
        assert!(matches!(status, Some(200 | 400)), "{target}: {status:?}");
    }
    for seen in upstream.requests() {
        assert!(
            seen.target == format!("{BASE}x") || seen.target == format!("{BASE}x?a=1"),
            "{}",
            seen.target
        );
        assert!(!seen.target.contains('#') && !seen.target.to_ascii_lowercase().contains("%23"));
        assert!(!seen.target.contains("crm"));
    }
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn b18_a_16_kib_path_is_414_and_nothing_is_forwarded() {
    let (idp, upstream, proxy) = setup().await;
    let auth = erp();
    let path = format!("/bc/{}", "a".repeat(16 * 1024));
    let query = format!("/bc/x?q={}", "a".repeat(16 * 1024));
    for target in [path, query] {
        let status = raw_get_status(proxy.addr, &target, &auth).await;
        assert_eq!(status, Some(414));
    }
    assert_eq!(upstream.count(), 0);
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a9_health_paths_on_the_proxy_port_are_not_special() {
    let (idp, upstream, proxy) = setup().await;
    let auth = erp();
    for target in [
        "/healthz/../bc/x",
        "/metrics/../bc/x",
        "/readyz/%2e%2e/bc/x",
    ] {
        let status = raw_get_status(proxy.addr, target, &auth).await;
        assert_eq!(status, Some(400), "{target}");
    }
    for target in ["/healthz", "/readyz", "/metrics"] {
        let answer = send(proxy.addr, "GET", target, &[], "").await;
        assert_eq!(answer.status, 401, "{target}: {}", answer.text());
        assert!(answer.header("www-authenticate").is_some());
        let answer = send(proxy.addr, "GET", target, &[("authorization", &auth)], "").await;
        assert_eq!(answer.status, 404, "{target}: {}", answer.text());
    }
    assert_eq!(upstream.count(), 0);
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a6_api_keys_are_never_taken_from_the_query_and_queries_pass_byte_for_byte() {
    let (idp, upstream, proxy) = setup().await;
    for query in [
        format!("api_key={API_KEY}&$top=5"),
        format!("x-api-key={API_KEY}"),
        format!("apikey={API_KEY}"),
        format!("access_token={API_KEY}"),
        format!("code={API_KEY}"),
    ] {
        let answer = send(proxy.addr, "GET", &format!("/bc/x?{query}"), &[], "").await;
        assert_eq!(answer.status, 401, "{query}");
        assert!(!answer.text().contains(API_KEY));
    }
    assert_eq!(upstream.count(), 0);
    let query = "api_key=not-a-key&$top=5&$filter=Name%20eq%20'A%26B'&%24skip=1&x=a+b&y=%2F";
    let answer = send(
        proxy.addr,
        "GET",
        &format!("/bc/x?{query}"),
        &[("x-api-key", API_KEY)],
        "",
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.count(), 1);
    let seen = &upstream.requests()[0];
    assert_eq!(seen.target, format!("{BASE}x?{query}"));
    assert!(seen.headers.get("x-api-key").is_none());
    assert_eq!(seen.header("authorization"), Some("Bearer tok-1"));
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// F9: tokens stay on their route. E10: HTTP/2 stream limits.

#[tokio::test]
async fn f9_each_upstream_sees_only_its_own_routes_token() {
    quiet_global_dispatch();
    let idp_bc = FakeIdp::start_with(IdpMode::IssueToken("tok-for-bc".into())).await;
    let idp_crm = FakeIdp::start_with(IdpMode::IssueToken("tok-for-crm".into())).await;
    let bc = FakeUpstream::start().await;
    let crm = FakeUpstream::start().await;
    let yaml = format!(
        r#"
server:
  listen: 127.0.0.1:0
credentials:
  bc:
    type: client_secret
    tenant_id: {TENANT}
    authority: {bc_authority}
    client_id: app-bc
    client_secret: ${{BC_SECRET}}
  crm:
    type: client_secret
    tenant_id: {TENANT}
    authority: {crm_authority}
    client_id: app-crm
    client_secret: ${{BC_SECRET}}
clients:
  erp:
    basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }}
routes:
  - prefix: /bc/
    upstream: {bc_base}/bc/
    credential: bc
    clients: [erp]
  - prefix: /crm/
    upstream: {crm_base}/api/data/v9.2/
    credential: crm
    clients: [erp]
"#,
        bc_authority = idp_bc.authority(),
        crm_authority = idp_crm.authority(),
        bc_base = bc.base(),
        crm_base = crm.base(),
    );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    let auth = erp();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let auth = auth.clone();
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let target = if i % 2 == 0 {
                format!("/bc/item{i}")
            } else {
                format!("/crm/item{i}")
            };
            send(addr, "GET", &target, &[("authorization", &auth)], "")
                .await
                .status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(bc.count(), 50);
    assert_eq!(crm.count(), 50);
    for seen in bc.requests() {
        assert!(seen.target.starts_with("/bc/item"), "{}", seen.target);
        assert_eq!(seen.header("authorization"), Some("Bearer tok-for-bc"));
    }
    for seen in crm.requests() {
        assert!(
            seen.target.starts_with("/api/data/v9.2/item"),
            "{}",
            seen.target
        );
        assert_eq!(seen.header("authorization"), Some("Bearer tok-for-crm"));
    }
    let form = |request: &TokenRequest, key: &str| {
        request
            .form
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    for (idp, client_id) in [(&idp_bc, "app-bc"), (&idp_crm, "app-crm")] {
        assert!(idp.calls() >= 1);
        for request in idp.requests() {
            assert_eq!(form(&request, "client_id").as_deref(), Some(client_id));
        }
    }
    assert_eq!(idp_bc.calls(), 1, "one token per credential");
    assert_eq!(idp_crm.calls(), 1, "one token per credential");
    proxy.shutdown().await;
}

/// An upstream that holds every request for `delay` and records the highest number of
/// requests it held at once.
async fn slow_upstream(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (in_flight, peak, total) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (i, p, t) = (in_flight, peak.clone(), total.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (i, p, t) = (i.clone(), p.clone(), t.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let (i, p, t) = (i.clone(), p.clone(), t.clone());
                    async move {
                        let now = i.fetch_add(1, Ordering::SeqCst) + 1;
                        p.fetch_max(now, Ordering::SeqCst);
                        t.fetch_add(1, Ordering::SeqCst);
                        let _ = BodyExt::collect(request.into_body()).await;
                        tokio::time::sleep(delay).await;
                        i.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"slow"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, peak, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e10_one_http2_connection_gets_at_most_100_concurrent_upstream_requests() {
    quiet_global_dispatch();
    let (addr, peak, total) = slow_upstream(Duration::from_millis(300)).await;
    let (idp, proxy) = proxy_to(&format!("http://{addr}")).await;
    let auth = erp();
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = |path: String| {
        Request::get(format!("http://{}{path}", proxy.addr))
            .header("authorization", &auth)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // One request first, so the server's SETTINGS (its stream limit) are known.
    let mut warm = sender.clone();
    let response = warm
        .send_request(request("/bc/warm".to_owned()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    peak.store(0, Ordering::SeqCst);
    let mut streams = Vec::new();
    for n in 0..150 {
        let mut sender = sender.clone();
        let request = request(format!("/bc/e10/{n}"));
        streams.push(tokio::spawn(async move {
            let response = sender.send_request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        let mut out = Vec::new();
        for stream in streams {
            out.push(stream.await.unwrap());
        }
        out
    })
    .await
    .expect("all streams finish");
    for (status, body) in &all {
        assert_eq!((*status, body.as_ref()), (200, &b"slow"[..]));
    }
    assert_eq!(total.load(Ordering::SeqCst), 151);
    let peak = peak.load(Ordering::SeqCst);
    eprintln!("E10: peak upstream concurrency {peak}");
    assert!(
        peak <= 100,
        "{peak} concurrent upstream requests from one connection"
    );
    assert!(peak >= 50, "the streams did run concurrently ({peak})");
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}
