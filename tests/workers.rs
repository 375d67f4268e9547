//! Thread-per-core serving (docs/architecture.md "Runtime layout", docs/configuration.md
//! `server.workers`): N worker threads, each with its own listening socket and runtime,
//! and what must stay process-wide across them — the connection cap, the token cache
//! (one token request per credential and scope), reloads and the drain on shutdown.
//!
//! `workers: 4` runs on whatever the machine has (2 cores in CI), `workers` unset gives
//! one per core. The binary is driven where threads and signals are what is tested; the
//! library entry point elsewhere. All on real sockets.

mod support;

#[path = "support/cli.rs"]
#[allow(dead_code)]
mod cli;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use cli::{Running, TempDir, command, free_port};
use support::{
    FakeIdp, FakeUpstream, GatedUpstream, IdpMode, TENANT, admin_yaml, bc_credential_yaml, config,
    erp, eventually, spawn_ops_proxy, spawn_proxy, standard_vars, standard_yaml,
};

const LIMIT: Duration = Duration::from_secs(20);

/// `yaml` with `workers: <n>` under `server:` (nothing for `None`).
fn with_workers(yaml: &str, workers: Option<usize>) -> String {
    match workers {
        Some(n) => yaml.replacen(
            "  listen: 127.0.0.1:0\n",
            &format!("  listen: 127.0.0.1:0\n  workers: {n}\n"),
            1,
        ),
        None => yaml.to_owned(),
    }
}

/// One credential, client `erp`, route `/g/` to a [`GatedUpstream`].
fn gated_yaml(idp: &FakeIdp, gated: &GatedUpstream, server: &str) -> String {
    format!(
        "server:\n{server}{credential}clients:\n  erp:\n    basic: {{ username: erp, password: \"${{ERP_PASSWORD}}\" }}\nroutes:\n  - prefix: /g/\n    upstream: {base}/\n    credential: bc\n    clients: [erp]\n",
        credential = bc_credential_yaml(TENANT, &idp.authority()),
        base = gated.base(),
    )
}

fn get_request(path: &str) -> Vec<u8> {
    let (_, authorization) = erp();
    format!("GET {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: {authorization}\r\n\r\n")
        .into_bytes()
}

/// A GET of `path` on a new connection, answered in the background.
fn spawn_get(addr: SocketAddr, path: String) -> tokio::task::JoinHandle<Option<(u16, Vec<u8>)>> {
    tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&get_request(&path)).await.unwrap();
        read_response(&mut stream).await
    })
}

/// One HTTP/1 response off a kept-alive connection: status and body (`Content-Length`
/// or chunked). `None` when the connection ends first.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, Vec<u8>)> {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        fill(stream, &mut buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let mut rest = buf.split_off(end);
    if head.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let line = loop {
                if let Some(at) = rest.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                fill(stream, &mut rest).await?;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line]).unwrap().trim(), 16)
                    .unwrap();
            while rest.len() < line + 2 + size + 2 {
                fill(stream, &mut rest).await?;
            }
            body.extend_from_slice(&rest[line + 2..line + 2 + size]);
            rest.drain(..line + 2 + size + 2);
            if size == 0 {
                return Some((status, body));
            }
        }
    }
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while rest.len() < length {
        fill(stream, &mut rest).await?;
    }
    rest.truncate(length);
    Some((status, rest))
}

/// Appends what the next read brings; `None` at the end of the stream.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// `connections` concurrent keep-alive connections, `requests` GETs of `path` each;
/// every answer's status and body.
async fn load(
    addr: SocketAddr,
    connections: usize,
    requests: usize,
    path: &str,
) -> Vec<(u16, Vec<u8>)> {
    let clients: Vec<_> = (0..connections)
        .map(|_| {
            let request = get_request(path);
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let mut answers = Vec::new();
                for _ in 0..requests {
                    stream.write_all(&request).await.unwrap();
                    answers.push(read_response(&mut stream).await.expect("an answer"));
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(
            timeout(LIMIT, client)
                .await
                .expect("load finished")
                .unwrap(),
        );
    }
    answers
}

/// The worker threads of process `pid` (Linux): name and CPU time so far in ns.
#[cfg(target_os = "linux")]
fn worker_threads(pid: u32) -> Vec<(String, u64)> {
    let mut workers = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let name = name.trim().to_owned();
        if !name.starts_with("s2s-worker-") {
            continue;
        }
        let schedstat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        let ns = schedstat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        workers.push((name, ns));
    }
    workers.sort();
    workers
}

/// Runs the binary on `yaml` (whose `listen:` is replaced by a free port); waits until it
/// accepts and has its token.
async fn run_binary(yaml: &str, dir: &TempDir, idp: &FakeIdp) -> (Running, SocketAddr) {
    let addr = free_port();
    let yaml = yaml.replacen("listen: 127.0.0.1:0", &format!("listen: {addr}"), 1);
    let path = dir.write("proxy.yaml", &yaml);
    let mut cmd = command(["run", "--config"]);
    cmd.arg(&path)
        .envs(standard_vars())
        .env_remove("TOKIO_WORKER_THREADS");
    let mut proxy = Running::spawn(cmd);
    proxy.wait_until_accepting(addr).await;
    idp.wait_for_calls(1).await;
    (proxy, addr)
}

/// `workers: 4` on a machine with fewer cores: four worker threads, every one of them
/// takes connections (the kernel spreads them over the four sockets), 200 concurrent
/// keep-alive connections are all answered correctly, and the one token fetched at start
/// serves every worker.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_share_the_connections_and_one_token() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let dir = TempDir::new("workers-four");
    let yaml = with_workers(&standard_yaml(&idp, &upstream), Some(4));
    let (proxy, addr) = run_binary(&yaml, &dir, &idp).await;

    let before = worker_threads(proxy.pid());
    let names: Vec<&str> = before.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "s2s-worker-0",
            "s2s-worker-1",
            "s2s-worker-2",
            "s2s-worker-3"
        ]
    );
    let answers = load(addr, 200, 5, "/bc/companies").await;
    assert_eq!(answers.len(), 1000);
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
        assert_eq!(body, br#"{"value":[]}"#);
    }
    assert_eq!(upstream.count(), 1000);
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| r.header("authorization") == Some("Bearer tok-1")),
        "every worker injects the one token fetched"
    );
    assert_eq!(idp.calls(), 1, "one token request for all workers");

    let after = worker_threads(proxy.pid());
    let spent: Vec<u64> = before
        .iter()
        .zip(&after)
        .map(|((_, a), (_, b))| b - a)
        .collect();
    let total: u64 = spent.iter().sum();
    for (worker, ns) in spent.iter().enumerate() {
        assert!(
            *ns * 100 >= total * 3,
            "worker {worker} did {ns} ns of {total} ns of the work: {spent:?}"
        );
    }
}

/// Without `server.workers`: one worker per core, serving.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_unset_gives_one_worker_per_core() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let dir = TempDir::new("workers-default");
    let (proxy, addr) = run_binary(&standard_yaml(&idp, &upstream), &dir, &idp).await;
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(worker_threads(proxy.pid()).len(), cores);
    let answers = load(addr, 20, 3, "/bc/x").await;
    assert!(answers.iter().all(|(status, _)| *status == 200));
    assert_eq!(idp.calls(), 1);
}

/// Many requests arriving on every worker while the identity provider is slow to answer
/// the first token request: still exactly one token request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_token_is_fetched_once_for_all_workers() {
    for workers in [Some(4), None] {
        let idp = FakeIdp::start_with(IdpMode::Slow(Duration::from_millis(800))).await;
        let upstream = FakeUpstream::start().await;
        let yaml = with_workers(&standard_yaml(&idp, &upstream), workers);
        let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
        let answers = load(proxy.addr, 40, 2, "/bc/x").await;
        assert!(
            answers.iter().all(|(status, _)| *status == 200),
            "{workers:?}"
        );
        assert_eq!(idp.calls(), 1, "workers {workers:?}");
        proxy.shutdown().await;
    }
}

/// `max_connections` counts the connections of all workers together: with 6 taken by
/// requests in flight, a 7th connection is not served until one of them is done, whichever
/// worker it lands on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_across_workers() {
    for workers in [Some(4), None] {
        let idp = FakeIdp::start().await;
        let gated = GatedUpstream::start().await;
        let server = "  listen: 127.0.0.1:0\n  limits: { max_connections: 6 }\n";
        let yaml = with_workers(&gated_yaml(&idp, &gated, server), workers);
        let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
        idp.wait_for_calls(1).await;
        let addr = proxy.addr;

        let mut busy = Vec::new();
        for n in 0..6 {
            busy.push(spawn_get(addr, format!("/g/{n}")));
        }
        eventually(LIMIT, "six requests at the upstream", || async {
            (gated.in_flight() == 6).then_some(())
        })
        .await;
        let seventh = spawn_get(addr, "/g/7".to_owned());
        // Absence can only be observed for a while: the seventh must not get through.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(gated.max_in_flight(), 6, "workers {workers:?}");
        assert_eq!(gated.arrived().len(), 6, "workers {workers:?}");

        gated.release(7);
        for answer in busy {
            let (status, _) = timeout(LIMIT, answer).await.unwrap().unwrap().unwrap();
            assert_eq!(status, 200);
        }
        let (status, _) = timeout(LIMIT, seventh).await.unwrap().unwrap().unwrap();
        assert_eq!(status, 200);
        assert_eq!(gated.max_in_flight(), 6, "workers {workers:?}");
        proxy.shutdown().await;
    }
}

/// A reload reaches every worker: after it, new connections (spread over all workers by
/// the kernel) all route by the new table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_every_worker() {
    for workers in [Some(4), None] {
        let idp = FakeIdp::start().await;
        let upstream = FakeUpstream::start().await;
        let yaml = with_workers(&admin_yaml(&idp, &upstream), workers);
        let proxy = spawn_ops_proxy(config(&yaml, standard_vars()), None).await;
        idp.wait_for_calls(1).await;
        let addr = proxy.handle.addr;
        let before = load(addr, 40, 1, "/fresh/x").await;
        assert!(before.iter().all(|(status, _)| *status == 404));

        let renamed = yaml.replace("  - prefix: /bc/sandbox/\n", "  - prefix: /fresh/\n");
        proxy.reload.apply(config(&renamed, standard_vars()));
        let after = load(addr, 40, 1, "/fresh/x").await;
        assert!(
            after.iter().all(|(status, _)| *status == 200),
            "workers {workers:?}: {:?}",
            after.iter().map(|(s, _)| s).collect::<Vec<_>>()
        );
        assert!(
            upstream
                .requests()
                .iter()
                .all(|r| r.target == format!("/v2.0/{TENANT}/Sandbox/x")),
            "every request went by the new route"
        );
        assert_eq!(upstream.count(), 40);
        proxy.handle.shutdown().await;
    }
}

/// SIGTERM to the binary with `workers: 4` and requests in flight on several workers: new
/// connections are refused at once, every request in flight is answered, then the process
/// exits 0.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_worker() {
    for workers in [Some(4), None] {
        let idp = FakeIdp::start().await;
        let gated = GatedUpstream::start().await;
        let dir = TempDir::new("workers-drain");
        let yaml = with_workers(
            &gated_yaml(&idp, &gated, "  listen: 127.0.0.1:0\n"),
            workers,
        );
        let (mut proxy, addr) = run_binary(&yaml, &dir, &idp).await;

        let mut in_flight = Vec::new();
        for n in 0..12 {
            in_flight.push(spawn_get(addr, format!("/g/{n}")));
        }
        eventually(LIMIT, "twelve requests at the upstream", || async {
            (gated.in_flight() == 12).then_some(())
        })
        .await;
        proxy.signal("TERM");
        eventually(LIMIT, "the listener to close", || async {
            TcpStream::connect(addr).await.is_err().then_some(())
        })
        .await;
        gated.release(12);
        for answer in in_flight {
            let (status, _) = timeout(LIMIT, answer)
                .await
                .unwrap()
                .unwrap()
                .expect("answered before the connection closed");
            assert_eq!(status, 200, "workers {workers:?}");
        }
        let status = proxy.exit_within(LIMIT).await;
        assert!(status.success(), "{status:?}\n{}", proxy.stderr());
        assert!(
            proxy.stderr().contains("All connections drained."),
            "{}",
            proxy.stderr()
        );
    }
}
