//! The floor of `bench/run.sh`: the least a hyper 1 reverse proxy does. One worker (a
//! current-thread runtime), HTTP/1.1 in, hyper-util's pooled legacy client out, the
//! `/bench` prefix taken off the path and one static `Authorization` header added;
//! nothing else (no authentication, limits, logging or metrics).
//!
//!     s2s-floor 127.0.0.1:LISTEN 127.0.0.1:UPSTREAM

use std::net::SocketAddr;

use http::header::AUTHORIZATION;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Uri};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: s2s-floor LISTEN_ADDR UPSTREAM_HOST:PORT");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("listen address");
    let upstream: Authority = upstream.parse().expect("upstream host:port");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(serve(listen, upstream));
}

async fn serve(listen: SocketAddr, upstream: Authority) {
    let listener = TcpListener::bind(listen).await.expect("bind");
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let bearer = HeaderValue::from_static("Bearer bench");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, upstream, bearer) = (client.clone(), upstream.clone(), bearer.clone());
        tokio::spawn(async move {
            let service = service_fn(move |mut request: Request<Incoming>| {
                let path = request
                    .uri()
                    .path_and_query()
                    .map_or("/", PathAndQuery::as_str);
                let path = path.strip_prefix("/bench").unwrap_or(path);
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(Scheme::HTTP);
                parts.authority = Some(upstream.clone());
                parts.path_and_query = path.parse().ok();
                *request.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
                request.headers_mut().insert(AUTHORIZATION, bearer.clone());
                client.request(request)
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
