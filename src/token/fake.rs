//! Test-only HTTP server on 127.0.0.1 that records each request and answers through a
//! handler: the strict fake token services for the credential tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) method: String,
    /// Path and query as sent.
    pub(crate) target: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Request {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Form body or query string pairs, decoded.
    pub(crate) fn form(&self) -> Vec<(String, String)> {
        pairs(&self.body)
    }

    pub(crate) fn query(&self) -> Vec<(String, String)> {
        self.target
            .split_once('?')
            .map(|(_, q)| pairs(q))
            .unwrap_or_default()
    }

    pub(crate) fn field(&self, name: &str) -> Option<String> {
        self.form()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

fn pairs(text: &str) -> Vec<(String, String)> {
    url_pairs(text.as_bytes())
}

fn url_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{}", String::from_utf8_lossy(bytes)))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

pub(crate) type Handler = Arc<dyn Fn(&Request) -> (u16, String) + Send + Sync>;

/// How the fake answers one request.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// These exact response bytes, then close.
    Raw(String),
    /// Read the request, never answer.
    Stall,
}

/// A raw HTTP/1.1 response with a `Content-Length`, for [`Reply::Raw`].
pub(crate) fn response(status: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut text = format!("HTTP/1.1 {status}\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    Reply::Raw(text)
}

pub(crate) struct FakeServer {
    pub(crate) addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    connections: Arc<AtomicUsize>,
}

impl FakeServer {
    /// Answers every request with the JSON body and status `handler` gives.
    pub(crate) async fn spawn(handler: Handler) -> Self {
        Self::spawn_replies(Arc::new(move |request: &Request| {
            let (status, body) = handler(request);
            response(
                &format!("{status} X"),
                &[("Content-Type", "application/json")],
                &body,
            )
        }))
        .await
    }

    /// Answers every request with `reply`.
    pub(crate) async fn spawn_reply(reply: Reply) -> Self {
        Self::spawn_replies(Arc::new(move |_: &Request| reply.clone())).await
    }

    async fn spawn_replies(respond: Arc<dyn Fn(&Request) -> Reply + Send + Sync>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (recorded, counted) = (Arc::clone(&requests), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let (recorded, respond) = (Arc::clone(&recorded), Arc::clone(&respond));
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    recorded.lock().unwrap().push(request.clone());
                    match respond(&request) {
                        Reply::Raw(response) => {
                            let _ = stream.write_all(response.as_bytes()).await;
                            let _ = stream.shutdown().await;
                        }
                        Reply::Stall => std::future::pending::<()>().await,
                    }
                });
            }
        });
        Self {
            addr,
            requests,
            connections,
        }
    }

    /// TCP connections accepted so far.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let target = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap_or(0));
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        target,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A v2-style success body.
pub(crate) fn token_body(token: &str) -> String {
    format!(
        r#"{{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"{token}"}}"#
    )
}

/// Entra's `invalid_client` answer.
pub(crate) fn invalid_client(code: u64) -> (u16, String) {
    (
        401,
        format!(
            r#"{{"error":"invalid_client","error_description":"AADSTS{code}: refused.","error_codes":[{code}],"trace_id":"t","correlation_id":"c"}}"#
        ),
    )
}

pub(crate) fn tls() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

pub(crate) fn http() -> Result<super::TokenHttp, super::TokenError> {
    super::TokenHttp::new(&tls())
}
