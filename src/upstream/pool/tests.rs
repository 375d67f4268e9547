//! The pool on a runtime the test controls (the proxy's workers run on their own, see
//! `tests/upstream_pool.rs` for the pool behind the proxy): a request that a closed
//! pooled connection hands back unsent goes out once more on a new connection, idle
//! connections are closed after the idle timeout (tokio's paused clock), and one pool
//! shared by the threads of a multi-thread runtime stays correct.

use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

use super::{UpstreamClient, UpstreamError};

fn client(idle_timeout: Duration) -> UpstreamClient<Full<Bytes>> {
    let tls = crate::upstream::client_tls_config(None).unwrap();
    crate::upstream::client_with(tls, idle_timeout)
}

/// An HTTP/1.1 upstream on threads and blocking sockets, so that it closes a connection
/// exactly when a test says, whatever the test's runtime is doing. Answers every GET with
/// `<connection> <target>`, connections numbered from 1.
#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Vec<(usize, String)>>>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    /// Connections whose other end (the pool) closed.
    ended: Arc<Mutex<Vec<usize>>>,
}

impl Upstream {
    fn start() -> (Self, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
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

    fn serve(&self, conn: usize, mut stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let target = line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    return;
                }
                if header == "\r\n" {
                    break;
                }
            }
            self.seen.lock().unwrap().push((conn, target.clone()));
            let body = format!("{conn} {target}");
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Closes connection `conn`; its FIN is in the peer's socket when this returns
    /// (loopback delivers in the sending call).
    fn close(&self, conn: usize) {
        self.streams.lock().unwrap()[conn - 1]
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
    }

    fn seen(&self) -> Vec<(usize, String)> {
        self.seen.lock().unwrap().clone()
    }

    fn ended(&self) -> Vec<usize> {
        self.ended.lock().unwrap().clone()
    }
}

async fn get(
    client: &UpstreamClient<Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> Result<String, UpstreamError> {
    let request = Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await?;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Ok(String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn a_request_a_closed_pooled_connection_hands_back_unsent_goes_once_on_a_new_one() {
    let (upstream, addr) = Upstream::start();
    let client = client(Duration::from_secs(60));
    assert_eq!(get(&client, addr, "/a").await.unwrap(), "1 /a");
    // The upstream ends the idle connection. One turn of the runtime: its I/O driver
    // sees the FIN and queues hyper's connection task, but `block_on` polls this test's
    // future first, so the request takes the pooled connection (it still looks ready),
    // and hyper's task then finds the connection closed before writing a byte of the
    // request and hands it back.
    upstream.close(1);
    tokio::task::yield_now().await;
    assert_eq!(get(&client, addr, "/b").await.unwrap(), "2 /b");
    assert_eq!(upstream.seen(), [(1, "/a".into()), (2, "/b".into())]);
}

#[tokio::test(start_paused = true)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let (upstream, addr) = Upstream::start();
    let client = client(Duration::from_secs(60));
    assert_eq!(get(&client, addr, "/a").await.unwrap(), "1 /a");
    // Idle for less than the timeout: reused.
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert_eq!(get(&client, addr, "/b").await.unwrap(), "1 /b");
    // Idle past it: closed without a request coming.
    tokio::time::sleep(Duration::from_secs(61)).await;
    for _ in 0..2000 {
        if upstream.ended().contains(&1) {
            break;
        }
        // Let the connection task close its socket, and the upstream's thread see it.
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(upstream.ended(), [1], "the idle connection was not closed");
    assert_eq!(get(&client, addr, "/c").await.unwrap(), "2 /c");
}

/// Shared by a multi-thread runtime's threads, a response can end before hyper's
/// connection task is idle again (it runs on another thread): the connection then goes
/// back to the pool a moment later. Every request still reaches the upstream exactly once
/// and gets its own answer, and connections are reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_by_a_multi_thread_runtime_every_request_reaches_the_upstream_once() {
    let (upstream, addr) = Upstream::start();
    let client = client(Duration::from_secs(60));
    let tasks = (0..8).map(|t| {
        let client = client.clone();
        tokio::spawn(async move {
            for r in 0..10 {
                let path = format!("/t{t}-{r}");
                let answer = get(&client, addr, &path).await.unwrap();
                assert!(answer.ends_with(&format!(" {path}")), "{answer}");
            }
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        task.await.unwrap();
    }
    let seen = upstream.seen();
    let mut targets: Vec<_> = seen.iter().map(|(_, target)| target.clone()).collect();
    targets.sort();
    targets.dedup();
    assert_eq!((seen.len(), targets.len()), (80, 80));
    // About one connection per concurrent task (a few more when a request came before
    // the previous connection was back), far fewer than requests.
    let connections = upstream.streams.lock().unwrap().len();
    assert!(connections <= 24, "{connections} connections");
}

/// An upstream that answers before it has read the request body: the response ends
/// while hyper is still sending the body, so the connection cannot take the next request
/// yet. It goes back to the pool once the body is sent, not before.
#[tokio::test]
async fn a_connection_whose_response_ended_before_the_request_body_is_pooled_once_it_is_sent() {
    use http_body::Frame;

    let (upstream, addr) = Upstream::start();
    let tls = crate::upstream::client_tls_config(None).unwrap();
    let client: UpstreamClient<http_body_util::combinators::UnsyncBoxBody<Bytes, UpstreamError>> =
        crate::upstream::client_with(tls, Duration::from_secs(60));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok(Frame::data(data)), rx))
    });
    let request = Request::post(format!("http://{addr}/upload"))
        .header(http::header::CONTENT_LENGTH, "5")
        .body(http_body_util::StreamBody::new(body).boxed_unsync())
        .unwrap();
    let response = client.request(request).await.unwrap();
    let answer = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(answer, "1 /upload");
    let idle = || {
        let endpoints = super::lock(&client.shared.endpoints);
        super::lock(&endpoints[0].state).idle.len()
    };
    assert_eq!(
        idle(),
        0,
        "pooled while the request body was still being sent"
    );
    tx.send(Bytes::from_static(b"hello")).await.unwrap();
    drop(tx);
    for _ in 0..2000 {
        if idle() == 1 {
            break;
        }
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(idle(), 1, "not pooled after the request body was sent");
    let request = Request::get(format!("http://{addr}/next"))
        .body(
            http_body_util::Empty::new()
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .unwrap();
    let response = client.request(request).await.unwrap();
    let answer = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(answer, "1 /next");
    assert_eq!(
        upstream.seen(),
        [(1, "/upload".into()), (1, "/next".into())]
    );
}
