//! Fleet mode (`cluster:`): three proxy processes share one real `redis-server` on a free
//! loopback port and one gated upstream that records how many requests it holds at once.
//! The route's `max_concurrent` holds for the fleet (and without `cluster` for each
//! replica only), a Redis outage loses no request and the limit comes back with Redis, a
//! `kill -9`ed replica's slots come free within 30 s, and `rediss://` verifies the
//! server certificate.
//!
//! Processes need real time: every wait polls its condition against a generous deadline.

mod support;

#[path = "support/cli.rs"]
#[allow(dead_code)]
mod cli;

#[path = "support/replica.rs"]
mod replica;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use cli::{TempDir, command, run_to_end};
use replica::{LIMIT, Replica, Setup, start_fleet, wait_ready};
use support::dynamics::yaml_with;
use support::{
    FakeIdp, GatedUpstream, RedisServer, erp, eventually, get, metric, send, standard_vars,
};

const MAX_CONCURRENT: usize = 2;
const REPLICAS: usize = 3;
const QUEUED: &str = r#"s2s_proxy_queued{route="/bc/"}"#;

/// The route's limits on `/bc/`, and `cluster` when `redis` is given.
fn route() -> String {
    format!(
        "    max_concurrent: {MAX_CONCURRENT}\n    max_queue: 100\n    timeout: 5m\n    queue_timeout: 5m\n"
    )
}

async fn start_replica(
    dir: &TempDir,
    name: &str,
    idp: &FakeIdp,
    upstream: &str,
    redis: Option<&str>,
    env: &[(&str, &str)],
) -> Replica {
    let route = route();
    let setup = Setup {
        redis,
        key_prefix: "fleet-test",
        client: "",
        route: &route,
    };
    replica::start_replica(dir, name, idp, upstream, &setup, env).await
}

async fn readyz(replica: &Replica) -> (u16, Value) {
    let answer = get(replica.admin, "/readyz").await;
    (answer.status, answer.json())
}

async fn fleet(
    dir: &TempDir,
    idp: &FakeIdp,
    upstream: &GatedUpstream,
    redis: Option<&str>,
) -> Vec<Replica> {
    let route = route();
    let setup = Setup {
        redis,
        key_prefix: "fleet-test",
        client: "",
        route: &route,
    };
    start_fleet(REPLICAS, dir, idp, &upstream.base(), &setup).await
}

/// A GET from `erp` on its own connection, in the background; its status, or `None`
/// when the connection broke.
fn request(addr: SocketAddr, n: usize) -> tokio::task::JoinHandle<u16> {
    tokio::spawn(async move {
        let (name, value) = erp();
        send(addr, "GET", &format!("/bc/r{n}"), &[(name, &value)], "")
            .await
            .status
    })
}

/// `per_replica` requests to each replica, interleaved.
fn load(
    replicas: &[Replica],
    per_replica: usize,
    first: usize,
) -> Vec<tokio::task::JoinHandle<u16>> {
    (0..per_replica * replicas.len())
        .map(|n| request(replicas[n % replicas.len()].addr, first + n))
        .collect()
}

async fn metrics_of(replica: &Replica) -> String {
    get(replica.admin, "/metrics").await.text()
}

async fn queued_in_fleet(replicas: &[Replica]) -> usize {
    let mut total = 0;
    for replica in replicas {
        total += metric(&metrics_of(replica).await, QUEUED).unwrap_or(0.0) as usize;
    }
    total
}

/// Waits until `at_upstream` requests have arrived in all and the rest of `sent` wait in
/// the replicas' queues: the fleet is at its limit and holds still.
async fn wait_settled(
    replicas: &[Replica],
    upstream: &GatedUpstream,
    at_upstream: usize,
    sent: usize,
) {
    eventually(
        LIMIT,
        &format!(
            "{at_upstream} requests at the upstream and the other {} queued",
            sent - at_upstream
        ),
        || async {
            let arrived = upstream.arrived().len();
            let queued = queued_in_fleet(replicas).await;
            (arrived == at_upstream && queued == sent - at_upstream).then_some(())
        },
    )
    .await;
}

/// Lets the held requests go one at a time, each time waiting for the next to arrive,
/// and checks the upstream never holds more than `limit`; then waits for every answer.
/// Gives the upstream exactly one pass per request, so none is left for later requests.
async fn drain(
    upstream: &GatedUpstream,
    requests: Vec<tokio::task::JoinHandle<u16>>,
    limit: usize,
) {
    let total = upstream.arrived().len() - upstream.in_flight() + requests.len();
    let mut released = 0;
    while upstream.arrived().len() < total {
        let before = upstream.arrived().len();
        upstream.release(1);
        released += 1;
        eventually(LIMIT, "the next request reaches the upstream", || async {
            (upstream.arrived().len() > before).then_some(())
        })
        .await;
        assert!(
            upstream.in_flight() <= limit,
            "the upstream holds {} requests, more than {limit}",
            upstream.in_flight()
        );
    }
    upstream.release(requests.len() - released);
    for request in requests {
        let status = tokio::time::timeout(LIMIT, request)
            .await
            .expect("answered")
            .expect("no connection broke");
        assert_eq!(status, 200, "every request is answered 2xx");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_never_holds_more_than_max_concurrent_at_the_upstream() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let idp = FakeIdp::start().await;
    let upstream = GatedUpstream::start().await;
    let dir = TempDir::new("fleet-limit");
    let replicas = fleet(&dir, &idp, &upstream, Some(&redis.url())).await;

    let sent = 4 * REPLICAS;
    let requests = load(&replicas, 4, 0);
    wait_settled(&replicas, &upstream, MAX_CONCURRENT, sent).await;
    assert_eq!(upstream.in_flight(), MAX_CONCURRENT);
    assert_eq!(
        redis.integer(&["ZCARD", "fleet-test:slots:/bc/"]),
        Some(MAX_CONCURRENT as i64),
        "one lease per request at the upstream"
    );
    drain(&upstream, requests, MAX_CONCURRENT).await;
    assert_eq!(
        upstream.max_in_flight(),
        MAX_CONCURRENT,
        "the fleet used its whole allowance and never more"
    );
    for replica in &replicas {
        let text = metrics_of(replica).await;
        assert_eq!(metric(&text, "s2s_proxy_cluster_available"), Some(1.0));
        assert_eq!(
            metric(&text, "s2s_proxy_cluster_fallbacks_total"),
            Some(0.0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cluster_three_replicas_hold_three_times_max_concurrent() {
    let idp = FakeIdp::start().await;
    let upstream = GatedUpstream::start().await;
    let dir = TempDir::new("fleet-local");
    let replicas = fleet(&dir, &idp, &upstream, None).await;

    let sent = 4 * REPLICAS;
    let requests = load(&replicas, 4, 0);
    wait_settled(&replicas, &upstream, MAX_CONCURRENT * REPLICAS, sent).await;
    let (_, body) = readyz(&replicas[0]).await;
    assert!(
        body.get("cluster").is_none(),
        "no cluster, no cluster state"
    );
    assert!(
        metric(
            &metrics_of(&replicas[0]).await,
            "s2s_proxy_cluster_available"
        )
        .is_none()
    );
    drain(&upstream, requests, MAX_CONCURRENT * REPLICAS).await;
    assert_eq!(upstream.max_in_flight(), MAX_CONCURRENT * REPLICAS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_loses_no_request_and_the_fleet_limit_comes_back_with_it() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let idp = FakeIdp::start().await;
    let upstream = GatedUpstream::start().await;
    let dir = TempDir::new("fleet-outage");
    let replicas = fleet(&dir, &idp, &upstream, Some(&redis.url())).await;

    let sent = 4 * REPLICAS;
    let requests = load(&replicas, 4, 0);
    wait_settled(&replicas, &upstream, MAX_CONCURRENT, sent).await;

    // Redis dies mid-run: every replica falls back to its own max_concurrent.
    redis.kill();
    wait_settled(&replicas, &upstream, MAX_CONCURRENT * REPLICAS, sent).await;
    let mut fallbacks = 0.0;
    for replica in &replicas {
        // Also the replica whose requests all held leases, which had nothing to decide.
        let text = eventually(LIMIT, "the replica shows the outage", || async {
            let text = metrics_of(replica).await;
            (metric(&text, "s2s_proxy_cluster_available") == Some(0.0)).then_some(text)
        })
        .await;
        fallbacks += metric(&text, "s2s_proxy_cluster_fallbacks_total").unwrap();
        let (status, body) = readyz(replica).await;
        assert_eq!(status, 200, "still ready: {body}");
        assert_eq!(body["cluster"]["available"], false);
        assert_eq!(body["cluster"]["redis"], redis.url());
    }
    assert!(
        fallbacks >= (MAX_CONCURRENT * REPLICAS - MAX_CONCURRENT) as f64,
        "each request that went ahead without a lease was counted: {fallbacks}"
    );
    drain(&upstream, requests, MAX_CONCURRENT * REPLICAS).await;
    for replica in &replicas {
        let warnings = replica
            .process
            .stderr()
            .matches("Redis unavailable")
            .count();
        assert_eq!(
            warnings,
            1,
            "one warning per outage:\n{}",
            replica.process.stderr()
        );
    }

    // Redis is back on the same port, empty: the fleet limit holds again.
    redis.restart();
    for replica in &replicas {
        wait_ready(replica, true).await;
    }
    let before = upstream.arrived().len();
    let requests = load(&replicas, 4, 100);
    wait_settled(&replicas, &upstream, before + MAX_CONCURRENT, before + sent).await;
    assert_eq!(upstream.in_flight(), MAX_CONCURRENT);
    drain(&upstream, requests, MAX_CONCURRENT).await;
    for replica in &replicas {
        assert!(
            replica
                .process
                .stderr()
                .contains("fleet-wide limits in force"),
            "one line says the limits are back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_frees_its_slots_within_30_seconds() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let idp = FakeIdp::start().await;
    let upstream = GatedUpstream::start().await;
    let dir = TempDir::new("fleet-crash");
    let replicas = fleet(&dir, &idp, &upstream, Some(&redis.url())).await;
    let (doomed, survivors) = replicas.split_first().unwrap();

    // The doomed replica holds both slots; the others' requests wait for them.
    let held: Vec<_> = (0..MAX_CONCURRENT)
        .map(|n| request(doomed.addr, n))
        .collect();
    eventually(LIMIT, "both slots held by one replica", || async {
        (upstream.arrived().len() == MAX_CONCURRENT).then_some(())
    })
    .await;
    let waiting: Vec<_> = (0..MAX_CONCURRENT)
        .map(|n| request(survivors[n % survivors.len()].addr, 10 + n))
        .collect();
    eventually(LIMIT, "the survivors' requests queued", || async {
        (queued_in_fleet(survivors).await == MAX_CONCURRENT).then_some(())
    })
    .await;

    doomed.process.signal("KILL");
    let killed = Instant::now();
    eventually(
        Duration::from_secs(40),
        "the survivors took the freed slots",
        || async { (upstream.arrived().len() == 2 * MAX_CONCURRENT).then_some(()) },
    )
    .await;
    let freed_after = killed.elapsed();
    assert!(
        freed_after < Duration::from_secs(30),
        "slots freed after {freed_after:?}"
    );
    for request in held {
        let _ = request.await;
    }
    upstream.release(4 * MAX_CONCURRENT);
    for request in waiting {
        let status = tokio::time::timeout(LIMIT, request).await.unwrap().unwrap();
        assert_eq!(status, 200);
    }
}

/// A CA and a `localhost` certificate it signed, as PEM files in `dir`.
fn tls_files(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (
        dir.write("ca.pem", &ca.pem()),
        dir.write("redis.pem", &leaf.pem()),
        dir.write("redis.key", &key.serialize_pem()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_verifies_the_server_certificate() {
    let idp = FakeIdp::start().await;
    let upstream = GatedUpstream::start().await;
    let dir = TempDir::new("fleet-tls");
    let (ca, cert, key) = tls_files(&dir);
    let Some(redis) = RedisServer::start_tls(&cert, &key) else {
        return;
    };
    let url = redis.url();
    assert!(url.starts_with("rediss://localhost:"));

    // Trusting the CA (rustls-native-certs reads SSL_CERT_FILE): connected.
    let ca_path = ca.display().to_string();
    let trusting = start_replica(
        &dir,
        "trusting",
        &idp,
        &upstream.base(),
        Some(&url),
        &[("SSL_CERT_FILE", &ca_path)],
    )
    .await;
    wait_ready(&trusting, true).await;

    // The platform's roots only: the handshake fails, the replica serves on local limits.
    let other = dir.write("other-ca.pem", &{
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    });
    let other = other.display().to_string();
    let doubting = start_replica(
        &dir,
        "doubting",
        &idp,
        &upstream.base(),
        Some(&url),
        &[("SSL_CERT_FILE", &other)],
    )
    .await;
    eventually(LIMIT, "the doubting replica is ready", || async {
        (readyz(&doubting).await.0 == 200).then_some(())
    })
    .await;
    eventually(LIMIT, "its start-up warning", || async {
        doubting
            .process
            .stderr()
            .contains("Redis unavailable at start")
            .then_some(())
    })
    .await;
    // Several probes later it still has not accepted the certificate.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, body) = readyz(&doubting).await;
    assert_eq!(status, 200);
    assert_eq!(body["cluster"]["available"], false, "{body}");
    upstream.release(10);
    let (name, value) = erp();
    let answer = send(doubting.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(answer.status, 200, "served on local limits");
    let (status, body) = readyz(&trusting).await;
    assert_eq!(
        (status, body["cluster"]["available"].clone()),
        (200, Value::Bool(true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_reaches_redis_and_nothing_else() {
    const REDIS_PASSWORD: &str = "rp_CANARY_9d4e";
    let Some(mut redis) = RedisServer::start_with_password(REDIS_PASSWORD) else {
        return;
    };
    let idp = FakeIdp::start().await;
    let upstream = GatedUpstream::start().await;
    let dir = TempDir::new("fleet-password");
    let url = format!("redis://:${{REDIS_PASSWORD}}@127.0.0.1:{}", redis.port());
    let shown = format!("redis://****@127.0.0.1:{}", redis.port());
    let env = [("REDIS_PASSWORD", REDIS_PASSWORD)];
    let replica = start_replica(&dir, "r", &idp, &upstream.base(), Some(&url), &env).await;
    wait_ready(&replica, true).await;
    let (_, body) = readyz(&replica).await;
    assert_eq!(body["cluster"]["redis"], shown);

    // An outage puts the (redacted) URL in a warning.
    redis.kill();
    upstream.release(1);
    let (name, value) = erp();
    let answer = send(replica.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(answer.status, 200);
    eventually(LIMIT, "the outage warning", || async {
        replica
            .process
            .stderr()
            .contains("Redis unavailable")
            .then_some(())
    })
    .await;

    let mut check = command(["check", "--config"]);
    check
        .arg(dir.path().join("r.yaml"))
        .envs(standard_vars())
        .envs(env);
    let checked = run_to_end(check, None).await;
    assert_eq!(checked.code, Some(0), "{}", checked.all());
    assert!(
        checked
            .stdout
            .contains(&format!("fleet mode: limits shared through {shown}"))
    );

    // A wrong password is refused by Redis (the replica serves on local limits) and never
    // shown either.
    redis.restart();
    const WRONG: &str = "rp_CANARY_wrong";
    let refused = start_replica(
        &dir,
        "wrong",
        &idp,
        &upstream.base(),
        Some(&url),
        &[("REDIS_PASSWORD", WRONG)],
    )
    .await;
    wait_ready(&refused, false).await;
    eventually(LIMIT, "the refused replica's start-up warning", || async {
        refused
            .process
            .stderr()
            .contains("Redis unavailable at start")
            .then_some(())
    })
    .await;
    let (status, refused_body) = readyz(&refused).await;
    assert_eq!(status, 200);
    assert_eq!(refused_body["cluster"]["available"], false);
    let refused_output = format!("{}{}", refused.process.stderr(), refused_body);
    assert!(!refused_output.contains(WRONG), "{refused_output}");

    let everything = [
        replica.process.stderr(),
        replica.process.stdout(),
        body.to_string(),
        metrics_of(&replica).await,
        get(replica.admin, "/readyz").await.text(),
        checked.all(),
        refused_output,
    ]
    .join("\n");
    assert!(
        !everything.contains(REDIS_PASSWORD),
        "the Redis password leaked:\n{everything}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_changes_need_a_restart_and_a_reload_keeps_the_running_one() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let idp = FakeIdp::start().await;
    let upstream = GatedUpstream::start().await;
    let yaml = |prefix: &str| {
        format!(
            "cluster:\n  redis: {}\n  key_prefix: {prefix}\n{}",
            redis.url(),
            yaml_with(&idp, &upstream.base(), "", "    max_concurrent: 1\n")
        )
    };
    let proxy = s2s_proxy::Proxy::bind(support::config(&yaml("first"), standard_vars()))
        .await
        .unwrap();
    let reload = proxy.reload_handle();
    let handle = support::run(proxy);
    idp.wait_for_calls(1).await;
    let report = reload.apply(support::config(&yaml("second"), standard_vars()));
    assert_eq!(report.restart_required, ["cluster"]);

    // Still the first namespace: the request's lease is taken under `first` (once the
    // probe has reached Redis; a request before that goes on its local slot alone).
    let mut n = 0;
    eventually(LIMIT, "a lease under the running key prefix", || {
        n += 1;
        let (upstream, redis, addr) = (&upstream, &redis, handle.addr);
        async move {
            let held = request(addr, n);
            eventually(LIMIT, "the request at the upstream", || async {
                (upstream.in_flight() == 1).then_some(())
            })
            .await;
            let first = redis.integer(&["ZCARD", "first:slots:/bc/"]);
            let second = redis.integer(&["ZCARD", "second:slots:/bc/"]);
            upstream.release(1);
            assert_eq!(held.await.unwrap(), 200);
            (first == Some(1) && second == Some(0)).then_some(())
        }
    })
    .await;
    handle.shutdown().await;
}
