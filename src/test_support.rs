//! Helpers for the unit tests of every module.

use std::path::{Path, PathBuf};

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// `tag` names the directory after the test that made it.
    pub(crate) fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "s2s-proxy-{tag}-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub(crate) fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real `redis-server` on a free loopback port (shared with the integration tests).
#[path = "../tests/support/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis_server;
pub(crate) use redis_server::RedisServer;

/// One fleet handle (what a replica holds) on the Redis at `url`, started (probe and
/// subscription running), with `timeout` per call; and its metric series.
pub(crate) fn cluster_handle(
    url: &str,
    key_prefix: &str,
    timeout: std::time::Duration,
) -> (crate::cluster::Cluster, crate::metrics::ClusterSeries) {
    let series = crate::metrics::ClusterSeries::default();
    let config = crate::config::Cluster {
        redis: crate::config::RedisUrl::new(crate::secret::Secret::new(url), url.to_owned()),
        key_prefix: key_prefix.to_owned(),
        timeout,
    };
    let cluster = crate::cluster::Cluster::new(&config, series.clone());
    cluster.start();
    (cluster, series)
}

/// A key prefix of its own for one test's fleet.
pub(crate) fn fresh_key_prefix() -> String {
    format!("test{:x}", fastrand::u32(..))
}

/// `replicas` handles on one fleet: the same Redis and key prefix, as replicas have.
pub(crate) fn fleet(url: &str, replicas: usize) -> Vec<crate::cluster::Cluster> {
    let key_prefix = fresh_key_prefix();
    (0..replicas)
        .map(|_| cluster_handle(url, &key_prefix, std::time::Duration::from_secs(2)).0)
        .collect()
}

/// Polls `condition` every 10 ms (real time: Redis is a real process) for up to 10 s.
pub(crate) async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits until every handle reaches Redis.
pub(crate) async fn available(clusters: &[crate::cluster::Cluster]) {
    until("Redis is available", || {
        clusters.iter().all(crate::cluster::Cluster::is_available)
    })
    .await;
}
