//! Connections: what may hold one open, and for how long (docs/operations.md, SECURITY.md
//! "Resource exhaustion"). A connection that sends no request within
//! `header_read_timeout` is closed, HTTP/2 included; one whose requests keep failing
//! authentication is closed after the third refusal; at `max_connections` idle and
//! unauthenticated connections make room for new ones; the admin listener answers its
//! probes whatever other admin clients do; a caller that stops reading neither keeps its
//! route's queue slot past the route timeout nor its connection past `body_idle_timeout`;
//! and a request on an idle HTTP/1 connection during shutdown gets 503 `shutting_down`.
//!
//! All on real sockets; HTTP/2 attackers speak raw frames.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use support::{
    FakeIdp, FakeUpstream, PASSWORD, admin_yaml, basic, config, erp, eventually, get, send,
    spawn_ops_proxy, spawn_proxy, standard_vars, standard_yaml, with_limits,
};

const LIMIT: Duration = Duration::from_secs(10);

async fn proxy_with_limits(limits: &str) -> (FakeIdp, FakeUpstream, support::ProxyHandle) {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = with_limits(&standard_yaml(&idp, &upstream), limits);
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    idp.wait_for_calls(1).await;
    (idp, upstream, proxy)
}

/// One HTTP/1 response read off a kept-alive connection: its head (lowercased) and body.
/// `None` when the connection ends first.
async fn read_response(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + length {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return Some((head, buf[end + 4..end + 4 + length].to_vec()));
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Whether the peer closes `stream` within `limit` (bytes still arriving are read and
/// dropped).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut chunk = vec![0u8; 64 * 1024];
    timeout(limit, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

fn get_request(path: &str, authorization: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: p\r\nAuthorization: {authorization}\r\n\r\n").into_bytes()
}

// ---------------------------------------------------------------------------------------
// HTTP/2 frames, as much as an attacker needs.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

#[tokio::test]
async fn an_http2_connection_that_only_sends_its_preface_and_pings_is_closed_at_the_header_read_timeout()
 {
    let (_idp, _upstream, proxy) = proxy_with_limits("header_read_timeout: 1s").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(PREFACE).await.unwrap();
    stream.write_all(&frame(SETTINGS, 0, &[])).await.unwrap();
    let started = Instant::now();
    let mut seen_goaway = false;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut pings = tokio::time::interval(Duration::from_millis(200));
    // A well-behaved peer in every way but one: it answers the proxy's SETTINGS and
    // PINGs and pings it itself, but never sends a request.
    let ended = timeout(LIMIT, async {
        loop {
            tokio::select! {
                _ = pings.tick() => {
                    if stream.write_all(&frame(PING, 0, b"12345678")).await.is_err() {
                        return;
                    }
                }
                read = stream.read(&mut chunk) => {
                    let n = match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while buf.len() >= 9 {
                        let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
                        if buf.len() < 9 + len {
                            break;
                        }
                        let (kind, flags) = (buf[3], buf[4]);
                        let payload = buf[9..9 + len].to_vec();
                        buf.drain(..9 + len);
                        let answer = match kind {
                            SETTINGS if flags & ACK == 0 => Some(frame(SETTINGS, ACK, &[])),
                            PING if flags & ACK == 0 => Some(frame(PING, ACK, &payload)),
                            GOAWAY => {
                                seen_goaway = true;
                                None
                            }
                            _ => None,
                        };
                        if let Some(answer) = answer
                            && stream.write_all(&answer).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "a connection without a request stayed open for {LIMIT:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the header read timeout: {:?}",
        started.elapsed()
    );
    assert!(seen_goaway, "the proxy says goodbye with a GOAWAY");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_http1_connection_is_closed_after_three_failed_authentications() {
    let (idp, upstream, proxy) = proxy_with_limits("max_connections: 100").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let wrong = basic("erp", "guess");
    for attempt in 1..=3 {
        stream
            .write_all(&get_request("/bc/x", &wrong))
            .await
            .unwrap();
        let (head, _) = timeout(LIMIT, read_response(&mut stream))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("attempt {attempt}: connection closed early"));
        assert!(head.starts_with("http/1.1 401"), "{head}");
        assert_eq!(
            head.contains("connection: close"),
            attempt == 3,
            "attempt {attempt}: {head}"
        );
    }
    assert!(
        closed_within(&mut stream, Duration::from_secs(5)).await,
        "the connection stays open after three refusals"
    );
    // A fresh connection with the right password is served as ever.
    let (name, value) = erp();
    assert_eq!(
        send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "")
            .await
            .status,
        200
    );
    assert_eq!(upstream.count(), 1);
    assert_eq!(idp.calls(), 1, "refused callers cause no token request");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_http2_connection_gets_a_goaway_after_three_failed_authentications() {
    let (_idp, upstream, proxy) = proxy_with_limits("max_connections: 100").await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let wrong = basic("erp", "guess");
    for _ in 0..3 {
        let request = http::Request::get(format!("http://{}/bc/x", proxy.addr))
            .header("authorization", &wrong)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 401);
    }
    // The client would keep the connection (it answers pings); the proxy ends it.
    let ended = timeout(LIMIT, connection).await;
    assert!(
        ended.is_ok(),
        "the connection stays open after three refusals"
    );
    assert_eq!(upstream.count(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn at_max_connections_idle_and_unauthenticated_connections_make_room() {
    // One worker, so connections are accepted (and take their place) in the order they
    // were opened: with several, a busy worker could accept `silent` only after `refused`
    // had its answer, which would make `silent` the more recently active of the two.
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = with_limits(&standard_yaml(&idp, &upstream), "max_connections: 2").replacen(
        "  listen: 127.0.0.1:0\n",
        "  listen: 127.0.0.1:0\n  workers: 1\n",
        1,
    );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    idp.wait_for_calls(1).await;
    // Two places taken: one connection that says nothing, one that failed to
    // authenticate and keeps its connection open.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut refused = TcpStream::connect(proxy.addr).await.unwrap();
    refused
        .write_all(&get_request("/bc/x", &basic("erp", "guess")))
        .await
        .unwrap();
    let (head, _) = read_response(&mut refused).await.unwrap();
    assert!(head.starts_with("http/1.1 401"), "{head}");

    // A real client is served at once (not after the 10 s header read timeout), and the
    // silent connection, the older of the two, made room for it.
    let (name, value) = erp();
    let served = timeout(
        Duration::from_secs(3),
        send(proxy.addr, "GET", "/bc/x", &[(name, &value)], ""),
    )
    .await
    .expect("a real client waited behind idle connections");
    assert_eq!(served.status, 200);
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);

    // Authenticated but idle connections give way too, the longest idle first.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(&get_request("/bc/x", &value))
            .await
            .unwrap();
        let (head, _) = timeout(LIMIT, read_response(&mut stream))
            .await
            .unwrap()
            .unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        idle.push(stream);
    }
    assert!(
        closed_within(&mut refused, Duration::from_secs(5)).await,
        "the unauthenticated connection made room first"
    );
    let served = timeout(
        Duration::from_secs(3),
        send(proxy.addr, "GET", "/bc/y", &[(name, &value)], ""),
    )
    .await
    .expect("a real client waited behind idle connections");
    assert_eq!(served.status, 200);
    assert!(closed_within(&mut idle[0], Duration::from_secs(5)).await);
    proxy.shutdown().await;
}

#[tokio::test]
async fn admin_probes_answer_within_a_second_beside_70_silent_admin_connections() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_ops_proxy(config(&admin_yaml(&idp, &upstream), standard_vars()), None).await;
    eventually(LIMIT, "readiness", || async {
        (get(proxy.admin, "/readyz").await.status == 200).then_some(())
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..70 {
        silent.push(TcpStream::connect(proxy.admin).await.unwrap());
    }
    for path in ["/healthz", "/readyz"] {
        let answer = timeout(Duration::from_secs(1), get(proxy.admin, path))
            .await
            .unwrap_or_else(|_| panic!("{path} did not answer within a second"));
        assert_eq!(answer.status, 200, "{path}");
    }
    proxy.handle.shutdown().await;
}

/// The standard proxy with `/bc/` limited to one request at a time and a 2 s timeout, and
/// an upstream whose `/big` answers 64 MiB (far more than the sockets buffer).
async fn slow_reader_setup(limits: &str) -> (FakeIdp, FakeUpstream, support::ProxyHandle) {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let big = Bytes::from(vec![b'a'; 64 << 20]);
    upstream.respond(move |request| {
        let body = if request.target.ends_with("/big") {
            big.clone()
        } else {
            Bytes::from_static(b"{}")
        };
        http::Response::new(Full::new(body))
    });
    let yaml = with_limits(&standard_yaml(&idp, &upstream), limits).replacen(
        "    clients: [erp, scanner]\n",
        "    clients: [erp, scanner]\n    max_concurrent: 1\n    timeout: 2s\n",
        1,
    );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    idp.wait_for_calls(1).await;
    (idp, upstream, proxy)
}

/// Starts downloading `/bc/big` and stops reading once the response head is in.
async fn start_slow_reader(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&get_request("/bc/big", &basic("erp", PASSWORD)))
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = timeout(LIMIT, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the response head");
        head.extend_from_slice(&chunk[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    stream
}

#[tokio::test]
async fn a_caller_that_stops_reading_frees_the_route_slot_at_the_route_timeout() {
    let (_idp, _upstream, proxy) = slow_reader_setup("max_connections: 100").await;
    let started = Instant::now();
    let _reader = start_slow_reader(proxy.addr).await;
    // The slow reader holds the route's only slot. Each later caller waits in the queue
    // for at most its own 2 s timeout; one of them must get the slot once the first
    // request's 2 s are up, although nobody reads its body any more.
    let (name, value) = erp();
    let served = loop {
        let answer = send(proxy.addr, "GET", "/bc/small", &[(name, &value)], "").await;
        if answer.status == 200 {
            break started.elapsed();
        }
        // 503 while the slot is held; a caller that gets the slot just before its own 2 s
        // are up may run out of time upstream (504) on a loaded machine: try again.
        let error = answer.json()["error"].as_str().map(str::to_owned);
        assert!(
            matches!(
                (answer.status, error.as_deref()),
                (503, Some("queue_timeout")) | (504, Some("upstream_timeout"))
            ),
            "{} {}",
            answer.status,
            answer.text()
        );
        assert!(
            started.elapsed() < LIMIT,
            "the slot is still held after {:?}",
            started.elapsed()
        );
    };
    assert!(served >= Duration::from_millis(1900), "{served:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_caller_that_stops_reading_loses_its_connection_after_the_body_idle_timeout() {
    // One connection allowed: the next caller gets in only once the stalled one is gone
    // (a connection with a response in flight is never closed to make room).
    let (_idp, _upstream, proxy) =
        slow_reader_setup("max_connections: 1, body_idle_timeout: 1s").await;
    let mut reader = start_slow_reader(proxy.addr).await;
    let (name, value) = erp();
    let served = timeout(
        LIMIT,
        send(proxy.addr, "GET", "/bc/small", &[(name, &value)], ""),
    )
    .await
    .expect("the stalled connection kept its place");
    assert_eq!(served.status, 200);
    // The stalled download was cut off: what is still buffered arrives, then the end.
    let mut rest = Vec::new();
    timeout(LIMIT, reader.read_to_end(&mut rest))
        .await
        .unwrap()
        .ok();
    assert!(rest.len() < 64 << 20, "the whole body arrived");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_http2_caller_that_keeps_its_window_closed_loses_its_connection_after_the_body_idle_timeout()
 {
    // The client reads the socket (it answers pings) but never reads the body, so the
    // stream's flow-control window closes after 64 KiB and hyper stops asking for more.
    let (_idp, _upstream, proxy) =
        slow_reader_setup("max_connections: 1, body_idle_timeout: 1s").await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{}/bc/big", proxy.addr))
        .header("authorization", basic("erp", PASSWORD))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let (name, value) = erp();
    let served = timeout(
        LIMIT,
        send(proxy.addr, "GET", "/bc/small", &[(name, &value)], ""),
    )
    .await
    .expect("the stalled connection kept its place");
    assert_eq!(served.status, 200);
    assert!(
        timeout(LIMIT, connection).await.is_ok(),
        "the stalled HTTP/2 connection is still open"
    );
    drop(response);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_request_on_an_idle_keep_alive_connection_during_shutdown_gets_503_shutting_down() {
    let (_idp, upstream, proxy) = proxy_with_limits("max_connections: 100").await;
    let addr = proxy.addr;
    let (_, value) = erp();
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(&get_request("/bc/first", &value))
        .await
        .unwrap();
    let (head, _) = read_response(&mut kept).await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");

    // A slow request keeps the drain going meanwhile.
    upstream.set_delay(Duration::from_secs(5));
    let slow = tokio::spawn(async move {
        let (name, value) = erp();
        send(addr, "GET", "/bc/slow", &[(name, &value)], "")
            .await
            .status
    });
    eventually(LIMIT, "the slow request upstream", || async {
        (upstream.count() == 2).then_some(())
    })
    .await;
    let stopped = tokio::spawn(proxy.shutdown());
    eventually(LIMIT, "the listener to close", || async {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;

    kept.write_all(&get_request("/bc/second", &value))
        .await
        .unwrap();
    let (head, body) = timeout(LIMIT, read_response(&mut kept))
        .await
        .unwrap()
        .expect("no answer on a kept-alive connection during shutdown");
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "shutting_down");
    assert!(closed_within(&mut kept, Duration::from_secs(5)).await);

    assert_eq!(slow.await.unwrap(), 200, "the in-flight request finished");
    timeout(Duration::from_secs(40), stopped)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(upstream.count(), 2, "the refused request was not forwarded");
}
