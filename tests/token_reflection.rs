//! The route's bearer token never reaches the caller (SECURITY.md "Header handling"): an
//! upstream that reflects the request's headers into its answer (headers, JSON, HTML, tiny
//! chunked frames, gzip, on link-rewriting routes and not) has the token replaced by
//! `[redacted]`, while binary bodies and bodies without a token pass unchanged. And the
//! client secret never reaches the log when a token endpoint echoes the request form
//! (SECURITY.md "Secrets handling").

mod support;

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::*;

/// A JWT-shaped token, as Entra issues them (base64url segments and dots).
const JWT: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiIsIng1dCI6IkNBTkFSWSJ9.eyJhdWQiOiJodHRwczovL2FwaS5idXNpbmVzc2NlbnRyYWwuZHluYW1pY3MuY29tIiwicm9sZXMiOlsiQXV0b21hdGlvbi5SZWFkV3JpdGUuQWxsIl0sImV4cCI6MTc5OTk5OTk5OX0.Q0FOQVJZLXNpZ25hdHVyZS1ub3QtcmVhbC1fLWFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6MDEyMzQ1Njc4OQ";

/// Fake IdP issuing [`JWT`], fake upstream, and the proxy of [`yaml`] in front of them.
async fn setup() -> (FakeIdp, FakeUpstream, ProxyHandle) {
    quiet_global_dispatch();
    let idp = FakeIdp::start_with(IdpMode::IssueToken(JWT.to_owned())).await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_proxy(config(&yaml(&idp, &upstream.base()), standard_vars())).await;
    idp.wait_for_calls(1).await;
    (idp, upstream, proxy)
}

/// Client `erp`, route `/bc/` to `base`, and `/rw/` to the same with `rewrite_links`
/// (public URL `https://proxy.test`).
fn yaml(idp: &FakeIdp, base: &str) -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:0
  public_url: https://proxy.test
{credential}clients:
  erp:
    basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }}
routes:
  - prefix: /bc/
    upstream: {base}{BC_BASE}
    credential: bc
    clients: [erp]
  - prefix: /rw/
    upstream: {base}{BC_BASE}
    credential: bc
    clients: [erp]
    rewrite_links: true
"#,
        credential = bc_credential_yaml(TENANT, &idp.authority()),
    )
}

/// The request's headers, one `name: value` per line.
fn header_lines(request: &Recorded) -> String {
    request
        .headers
        .iter()
        .map(|(name, value)| format!("{name}: {}\n", value.to_str().unwrap()))
        .collect()
}

/// The bare token of the request (what a debug page shows as "your token").
fn bare_token(request: &Recorded) -> String {
    request
        .header("authorization")
        .unwrap_or_default()
        .trim_start_matches("Bearer ")
        .to_owned()
}

/// A JSON page reflecting every request header, the bare token and an OData link.
fn json_echo(request: &Recorded, base: &str) -> String {
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().into()))
        .collect();
    serde_json::json!({
        "@odata.context": format!("{base}{BC_BASE}$metadata#errors"),
        "error": { "code": "Internal", "message": "Debug echo" },
        "headers": headers,
        "token": bare_token(request),
    })
    .to_string()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// What a caller must never see: the token, or any long piece of it.
fn assert_no_token(answer: &Answer, body: &str) {
    for piece in JWT.split('.') {
        assert!(!body.contains(piece), "token in the body: {body}");
    }
    for (name, value) in &answer.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(!value.contains(JWT), "token in header {name}: {value}");
        assert!(!name.as_str().contains(&JWT[..20].to_ascii_lowercase()));
    }
}

#[tokio::test]
async fn reflected_token_in_json_and_headers_is_redacted() {
    let (_idp, upstream, proxy) = setup().await;
    let base = upstream.base();
    upstream.respond(move |request| {
        Response::builder()
            .status(500)
            .header("content-type", "application/json; charset=utf-8")
            .header(
                "x-echo-authorization",
                request.header("authorization").unwrap(),
            )
            .header("x-echo-token", bare_token(request))
            .body(Full::new(Bytes::from(json_echo(request, &base))))
            .unwrap()
    });
    let answer = send(proxy.addr, "GET", "/bc/companies", &[erp_auth()], "").await;
    assert_eq!(answer.status, 500);
    // The upstream did receive the token: it is the answer that is scrubbed.
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some(format!("Bearer {JWT}").as_str())
    );
    let body = answer.text();
    assert_no_token(&answer, &body);
    let json = answer.json();
    assert_eq!(json["headers"]["authorization"], "Bearer [redacted]");
    assert_eq!(json["token"], "[redacted]");
    assert_eq!(
        answer.header("x-echo-authorization"),
        Some("Bearer [redacted]")
    );
    assert_eq!(answer.header("x-echo-token"), Some("[redacted]"));
    // The length changed: the answer is chunked, not sent with the upstream's length.
    assert_eq!(answer.header("content-length"), None);
    proxy.shutdown().await;
}

#[tokio::test]
async fn reflected_token_in_html_and_text_is_redacted() {
    let (_idp, upstream, proxy) = setup().await;
    for content_type in ["text/html; charset=utf-8", "text/plain", "message/http", ""] {
        let content_type = content_type.to_owned();
        upstream.respond(move |request| {
            let page = format!(
                "<html><body><h1>400 Bad Request</h1><pre>{}</pre><p>token={}</p></body></html>",
                header_lines(request),
                bare_token(request)
            );
            let mut response = Response::builder().status(400);
            if !content_type.is_empty() {
                response = response.header("content-type", &content_type);
            }
            response.body(Full::new(Bytes::from(page))).unwrap()
        });
        let answer = send(proxy.addr, "GET", "/bc/x", &[erp_auth()], "").await;
        let body = answer.text();
        assert_no_token(&answer, &body);
        assert!(
            body.contains("authorization: Bearer [redacted]\n"),
            "{body}"
        );
        assert!(body.contains("token=[redacted]</p>"), "{body}");
    }
    proxy.shutdown().await;
}

/// A raw HTTP/1.1 upstream: reads one request head, answers with the head reflected into
/// a chunked JSON body cut into `size`-byte chunks (so the token straddles many of them),
/// gzip-compressed first when `gzip` is set.
async fn chunking_upstream(size: usize, gzip_it: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let body = serde_json::json!({ "echo": head }).to_string();
                let body = if gzip_it {
                    gzip(body.as_bytes())
                } else {
                    body.into_bytes()
                };
                let mut out = b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n".to_vec();
                if gzip_it {
                    out.extend_from_slice(b"Content-Encoding: gzip\r\n");
                }
                out.extend_from_slice(b"Connection: close\r\n\r\n");
                stream.write_all(&out).await.unwrap();
                for chunk in body.chunks(size) {
                    let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
                    frame.extend_from_slice(chunk);
                    frame.extend_from_slice(b"\r\n");
                    stream.write_all(&frame).await.unwrap();
                    stream.flush().await.unwrap();
                }
                stream.write_all(b"0\r\n\r\n").await.unwrap();
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_token_split_across_tiny_chunks_is_redacted() {
    quiet_global_dispatch();
    for (size, gzip_it) in [(7, false), (1, false), (5, true)] {
        let idp = FakeIdp::start_with(IdpMode::IssueToken(JWT.to_owned())).await;
        let addr = chunking_upstream(size, gzip_it).await;
        let proxy = spawn_proxy(config(
            &yaml(&idp, &format!("http://{addr}")),
            standard_vars(),
        ))
        .await;
        idp.wait_for_calls(1).await;
        for prefix in ["/bc/", "/rw/"] {
            let answer = send(
                proxy.addr,
                "GET",
                &format!("{prefix}x"),
                &[erp_auth(), ("accept-encoding", "gzip")],
                "",
            )
            .await;
            assert_eq!(answer.status, 502, "{size} {prefix}");
            // Compressed bodies are decoded to be searched and sent on decoded.
            assert_eq!(answer.header("content-encoding"), None);
            let body = answer.text();
            assert_no_token(&answer, &body);
            let echo = answer.json()["echo"].as_str().unwrap().to_ascii_lowercase();
            assert!(
                echo.contains("authorization: bearer [redacted]\r\n"),
                "{size} {prefix}: {echo}"
            );
        }
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn compressed_reflections_are_decoded_scrubbed_and_links_still_rewritten() {
    let (_idp, upstream, proxy) = setup().await;
    let base = upstream.base();
    let coding = Arc::new(Mutex::new("gzip"));
    let chosen = coding.clone();
    upstream.respond(move |request| {
        let json = json_echo(request, &base);
        let coding = *chosen.lock().unwrap();
        let body = match coding {
            "gzip" => gzip(json.as_bytes()),
            _ => {
                let mut out = Vec::new();
                {
                    let mut writer = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                    writer.write_all(json.as_bytes()).unwrap();
                }
                out
            }
        };
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header("content-encoding", coding)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    });
    for (coding_name, prefix) in [
        ("gzip", "/bc/"),
        ("gzip", "/rw/"),
        ("br", "/bc/"),
        ("br", "/rw/"),
    ] {
        *coding.lock().unwrap() = coding_name;
        let answer = send(
            proxy.addr,
            "GET",
            &format!("{prefix}companies"),
            &[erp_auth(), ("accept-encoding", "gzip, br")],
            "",
        )
        .await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("content-encoding"), None, "{coding_name}");
        assert_eq!(answer.header("content-length"), None);
        let body = answer.text();
        assert_no_token(&answer, &body);
        let json = answer.json();
        assert_eq!(json["token"], "[redacted]", "{coding_name} {prefix}");
        assert_eq!(json["headers"]["authorization"], "Bearer [redacted]");
        let context = json["@odata.context"].as_str().unwrap();
        if prefix == "/rw/" {
            assert_eq!(context, "https://proxy.test/rw/$metadata#errors");
        } else {
            assert!(context.starts_with(&upstream.base()), "{context}");
        }
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn binary_bodies_pass_unchanged_with_their_length_and_coding() {
    let (_idp, upstream, proxy) = setup().await;
    let picture: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let compressed = gzip(&picture);
    for (content_type, coding, body) in [
        ("image/png", None, picture.clone()),
        ("application/octet-stream", None, picture.clone()),
        ("application/pdf", Some("gzip"), compressed.clone()),
    ] {
        let sent = body.clone();
        upstream.respond(move |_| {
            let mut response = Response::builder()
                .header("content-type", content_type)
                .header("content-length", sent.len());
            if let Some(coding) = coding {
                response = response.header("content-encoding", coding);
            }
            response.body(Full::new(Bytes::from(sent.clone()))).unwrap()
        });
        let answer = send(proxy.addr, "GET", "/bc/picture", &[erp_auth()], "").await;
        assert_eq!(answer.status, 200);
        assert_eq!(&answer.body[..], &body[..], "{content_type}");
        assert_eq!(
            answer.header("content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(answer.header("content-encoding"), coding);
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn textual_bodies_without_the_token_are_byte_identical() {
    let (_idp, upstream, proxy) = setup().await;
    // Near-misses: pieces of the token's start, at chunk ends and everywhere.
    let mut page = String::from("{\"value\":[");
    for i in 0..20_000 {
        page.push_str(&format!(
            "{{\"id\":{i},\"name\":\"eyJ0eXAiOiJKV1Qi{}e\"}},",
            &JWT[..i % 60]
        ));
    }
    page.push_str("{}]}");
    assert!(!page.contains(JWT));
    let sent = page.clone();
    upstream.respond(move |_| {
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(sent.clone())))
            .unwrap()
    });
    for prefix in ["/bc/", "/rw/"] {
        let answer = send(
            proxy.addr,
            "GET",
            &format!("{prefix}items"),
            &[erp_auth()],
            "",
        )
        .await;
        assert_eq!(answer.status, 200);
        assert!(answer.body == page.as_bytes(), "{prefix}: body changed");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn head_204_and_304_answers_are_scrubbed_in_their_headers() {
    let (_idp, upstream, proxy) = setup().await;
    let status = Arc::new(Mutex::new(StatusCode::OK));
    let chosen = status.clone();
    upstream.respond(move |request| {
        Response::builder()
            .status(*chosen.lock().unwrap())
            .header("content-type", "text/plain")
            .header(
                "x-echo-authorization",
                request.header("authorization").unwrap(),
            )
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    for (method, code) in [
        ("HEAD", StatusCode::OK),
        ("GET", StatusCode::NO_CONTENT),
        ("GET", StatusCode::NOT_MODIFIED),
    ] {
        *status.lock().unwrap() = code;
        let answer = send(proxy.addr, method, "/bc/x", &[erp_auth()], "").await;
        assert_eq!(answer.status, code.as_u16());
        assert!(answer.body.is_empty());
        assert_eq!(
            answer.header("x-echo-authorization"),
            Some("Bearer [redacted]"),
            "{method} {code}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_token_rejected_with_401_and_its_successor_are_both_redacted() {
    // `tok-<n>` tokens: the first is refused, the retry carries the renewed one, and the
    // page reflects the authorization of every request it has seen.
    quiet_global_dispatch();
    let (_idp, upstream, proxy) = standard().await;
    let seen = upstream.clone();
    upstream.respond(move |_| {
        let requests = seen.requests();
        if requests.len() == 1 {
            return Response::builder()
                .status(401)
                .body(Full::new(Bytes::new()))
                .unwrap();
        }
        let all: Vec<String> = requests
            .iter()
            .filter_map(|r| r.header("authorization").map(str::to_owned))
            .collect();
        Response::builder()
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(all.join("\n"))))
            .unwrap()
    });
    let answer = send(proxy.addr, "GET", "/bc/x", &[erp_auth()], "").await;
    assert_eq!(answer.status, 200);
    let tokens: Vec<Option<String>> = upstream
        .requests()
        .iter()
        .map(|r| r.header("authorization").map(str::to_owned))
        .collect();
    assert_eq!(
        tokens,
        [
            Some("Bearer tok-1".to_owned()),
            Some("Bearer tok-2".to_owned())
        ]
    );
    assert_eq!(answer.text(), "Bearer [redacted]\nBearer [redacted]");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_textual_body_in_a_coding_the_proxy_cannot_read_is_not_sent() {
    let (_idp, upstream, proxy) = setup().await;
    upstream.respond(|request| {
        Response::builder()
            .header("content-type", "application/json")
            .header("content-encoding", "zstd")
            .body(Full::new(Bytes::from(bare_token(request))))
            .unwrap()
    });
    let answer = send(
        proxy.addr,
        "GET",
        "/bc/x",
        &[erp_auth(), ("accept-encoding", "zstd, gzip;q=0.5")],
        "",
    )
    .await;
    // Only codings the proxy can decode were asked for, on every route.
    assert_eq!(
        upstream.requests()[0].header("accept-encoding"),
        Some("gzip;q=0.5")
    );
    assert_eq!(answer.status, 502);
    assert_eq!(answer.json()["error"], "upstream_failed");
    assert_no_token(&answer, &answer.text());
    proxy.shutdown().await;
}

/// `erp()` as the `(&str, &str)` pair `send` takes.
fn erp_auth() -> (&'static str, &'static str) {
    let (name, value) = erp();
    (name, Box::leak(value.into_boxed_str()))
}

// ---------------------------------------------------------------------------------------
// Secret masking: a token endpoint that echoes the request form in its error.

/// Where the echoed secret starts in the error description: across the 600-character cut
/// the proxy applies to descriptions.
const SECRET_AT: usize = 590;

/// A token endpoint answering `invalid_client` with the request's form body echoed in
/// `error_description`, placed so that the secret starts at [`SECRET_AT`]; with
/// `lowercase`, its percent-escapes in lowercase hex (`%7e`).
async fn echoing_idp(lowercase: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| async move {
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let mut form = String::from_utf8_lossy(&body).into_owned();
                    if lowercase {
                        form = lowercase_escapes(&form);
                    }
                    let at = form.find("client_secret=").unwrap() + "client_secret=".len();
                    let description = format!(
                        "AADSTS7000215: Invalid client secret provided. Request was: {form}"
                    );
                    let shift = SECRET_AT - (description.len() - form.len() + at);
                    let description = description.replacen(
                        "Request was:",
                        &format!("Request was ({}):", "x".repeat(shift - 3)),
                        1,
                    );
                    let json = serde_json::json!({
                        "error": "invalid_client",
                        "error_description": description,
                        "error_codes": [7000215],
                    });
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(401)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(json.to_string())))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// `%7E` → `%7e`: percent-escapes in lowercase hex, as some stacks write them.
fn lowercase_escapes(form: &str) -> String {
    let mut out = String::with_capacity(form.len());
    let mut rest = form;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..(at + 3).min(rest.len())];
        out.push_str(&escape.to_ascii_lowercase());
        rest = &rest[at + escape.len()..];
    }
    out.push_str(rest);
    out
}

#[test]
fn a_client_secret_echoed_form_encoded_across_the_cut_never_reaches_the_log() {
    quiet_global_dispatch();
    // The planted secret has a `~` (form-encoded `%7E`) and a `+` (`%2B`).
    assert!(CLIENT_SECRET.contains('~') && CLIENT_SECRET.contains('+'));
    let (answers, logs) = capture_logs(async {
        let mut answers = Vec::new();
        for lowercase in [false, true] {
            let idp = echoing_idp(lowercase).await;
            let upstream = FakeUpstream::start().await;
            let yaml = format!(
                r#"
server:
  listen: 127.0.0.1:0
{credential}clients:
  erp:
    basic: {{ username: erp, password: "${{ERP_PASSWORD}}" }}
routes:
  - prefix: /bc/
    upstream: {base}{BC_BASE}
    credential: bc
    clients: [erp]
"#,
                credential = bc_credential_yaml(TENANT, &format!("http://{idp}")),
                base = upstream.base(),
            );
            let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
            let answer = send(proxy.addr, "GET", "/bc/x", &[erp_auth()], "").await;
            assert_eq!(answer.status, 503);
            answers.push(answer.text());
            proxy.shutdown().await;
        }
        answers
    });
    let logs = logs.text();
    // The provider's description did reach the log (so the sweep means something), with
    // the secret masked where it stood.
    assert!(logs.contains("AADSTS7000215"), "{logs}");
    assert!(logs.contains("client_secret=****"), "{logs}");
    assert!(!logs.contains("client_secret=cs_"), "{logs}");
    for text in answers.iter().chain([&logs]) {
        // Nothing of the secret, in any form, whole or in part.
        assert!(!text.contains("CANARY"), "{text}");
        assert!(!text.contains("7f3a"), "{text}");
    }
}
