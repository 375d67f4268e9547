//! Proxy processes for the fleet tests (`tests/fleet.rs`, `tests/fleet_rates.rs`): one
//! `s2s-proxy run` per replica, on its own ports, with `cluster:` when a Redis URL is
//! given. Included by those crates beside `support` and `cli`.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use super::cli::{Running, TempDir, command, free_port};
use super::support::dynamics::yaml_with;
use super::support::{FakeIdp, eventually, get, standard_vars};

/// How long a process may take to notice what a test did (busy machine, real sockets).
pub const LIMIT: Duration = Duration::from_secs(30);

/// One `s2s-proxy run` process.
pub struct Replica {
    pub process: Running,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

/// What a replica's configuration adds to the standard one: lines under client `erp`,
/// lines on route `/bc/`, and `cluster` (with `key_prefix`) when `redis` is given.
pub struct Setup<'a> {
    pub redis: Option<&'a str>,
    pub key_prefix: &'a str,
    pub client: &'a str,
    pub route: &'a str,
}

/// A replica's configuration on two free ports: its YAML, its address and its admin
/// address. The cluster budget is generous: the machine is shared, and a late answer
/// would make the replica fall back to its local limits.
fn replica_yaml(
    idp: &FakeIdp,
    upstream: &str,
    setup: &Setup<'_>,
) -> (String, SocketAddr, SocketAddr) {
    let (addr, admin) = (free_port(), free_port());
    let cluster = setup.redis.map_or_else(String::new, |url| {
        format!(
            "cluster:\n  redis: {url}\n  key_prefix: {}\n  timeout: 1s\n",
            setup.key_prefix
        )
    });
    let erp = "    basic: { username: erp, password: \"${ERP_PASSWORD}\" }\n";
    let yaml = format!(
        "admin:\n  listen: {admin}\n{cluster}{}",
        yaml_with(idp, upstream, "", setup.route)
    )
    .replace("listen: 127.0.0.1:0", &format!("listen: {addr}"))
    .replace(erp, &format!("{erp}{}", setup.client));
    (yaml, addr, admin)
}

/// Starts replica `name` (its YAML written to `dir`) with `env` added to the standard
/// variables, and waits until it accepts on both ports.
pub async fn start_replica(
    dir: &TempDir,
    name: &str,
    idp: &FakeIdp,
    upstream: &str,
    setup: &Setup<'_>,
    env: &[(&str, &str)],
) -> Replica {
    let (yaml, addr, admin) = replica_yaml(idp, upstream, setup);
    let path = dir.write(&format!("{name}.yaml"), &yaml);
    let mut cmd = command(["run", "--config"]);
    cmd.arg(path)
        .envs(standard_vars())
        .envs(env.iter().copied());
    let mut process = Running::spawn(cmd);
    process.wait_until_accepting(addr).await;
    process.wait_until_accepting(admin).await;
    Replica {
        process,
        addr,
        admin,
    }
}

/// Waits until the replica is ready and, `clustered`, reaches Redis and its release
/// notifications.
pub async fn wait_ready(replica: &Replica, clustered: bool) {
    eventually(LIMIT, "the replica is ready (and connected)", || async {
        let answer = get(replica.admin, "/readyz").await;
        let body = answer.json();
        let connected = !clustered
            || (body["cluster"]["available"] == true && body["cluster"]["subscribed"] == true);
        (answer.status == 200 && connected).then_some(())
    })
    .await;
}

/// `count` replicas (`r0` …), each ready.
pub async fn start_fleet(
    count: usize,
    dir: &TempDir,
    idp: &FakeIdp,
    upstream: &str,
    setup: &Setup<'_>,
) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for n in 0..count {
        replicas.push(start_replica(dir, &format!("r{n}"), idp, upstream, setup, &[]).await);
    }
    for replica in &replicas {
        wait_ready(replica, setup.redis.is_some()).await;
    }
    replicas
}
