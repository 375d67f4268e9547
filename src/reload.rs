//! The running configuration and its hot reload (docs/operations.md "Reload").
//!
//! A [`Runtime`] holds what one configuration builds — the validated [`Config`], its
//! [`TokenCache`] and the request [`Pipeline`]s (one per worker, [`Pipelines`]) — behind
//! `ArcSwap`s, plus what outlives configurations: the upstream connection pools (one per
//! worker), the TLS roots, the metrics, and the limiters ([`Limiters`]: route queues by
//! prefix, the failed-authentication lockouts, client rate-limit buckets by name). A
//! reload validates the new file first and changes nothing when it is invalid. Otherwise
//! it builds a new cache that keeps the slots (and cached tokens) of every credential
//! whose settings are equal, new pipelines over the same upstream clients and the same
//! limiters (resized to the new limits), and swaps them, every worker's pipeline one after
//! the other. Requests already running keep the pipeline they started on; they share its
//! queues with the new one, so `max_concurrent` holds across the swap.
//!
//! Settings bound to the listener or the runtime (`server.listen`, `server.workers`,
//! `server.limits`, `server.tls`, `server.upstream_ca_file`, `admin`, `cluster` — the
//! Redis connection and the key namespace the limiters share) keep their
//! running values until a restart; a reload that changes them says so in a warning.
//!
//! A new version of a secret in a secret store is applied the same way (`secrets`).
//!
//! Triggers: SIGHUP, and a change of the file's modification time or length, polled
//! every [`POLL_INTERVAL`] (no file-system notification crate: ConfigMap volumes swap a
//! symlink, which polling sees as well).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tracing::{error, info, warn};

use crate::cluster::Cluster;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::proxy::body::UpstreamBody;
use crate::proxy::{Limiters, Pipeline};
use crate::token::{FetchCount, SlotStatus, TokenCache};
use crate::upstream::{self, UpstreamClient};

mod secrets;
pub(crate) use secrets::refresh as refresh_secrets;

/// How often the configuration file is checked for changes.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why a reload did not happen. The running configuration is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the proxy was started without a configuration file; there is nothing to reload")]
    NoConfigFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the proxy is shutting down; the configuration was not reloaded")]
    Draining,
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Changed settings that only a restart applies; their running values were kept.
    pub restart_required: Vec<&'static str>,
    /// Credentials whose settings did not change: their cached tokens were kept.
    pub kept_credentials: Vec<String>,
}

/// Reloads the configuration of a running [`crate::Proxy`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    pub(crate) runtime: Arc<Runtime>,
}

impl ReloadHandle {
    /// Re-reads the configuration file, as SIGHUP does.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.runtime.reload_file()
    }

    /// Switches to an already validated configuration.
    pub fn apply(&self, config: Config) -> ReloadReport {
        self.runtime.apply(config)
    }
}

/// One configuration's state: swapped whole by a reload.
#[derive(Debug)]
pub(crate) struct Generation {
    pub(crate) config: Config,
    pub(crate) tokens: TokenCache,
    /// Known expiry dates of secrets and certificates (read once per generation: loading
    /// a PKCS#12 file is not something to do on every scrape).
    pub(crate) credential_expiries: Vec<crate::token::CredentialExpiry>,
}

impl Generation {
    fn new(config: Config, tokens: TokenCache) -> Self {
        let credential_expiries = crate::token::credential_expiries(&config);
        crate::token::warn_expiring(&credential_expiries, std::time::SystemTime::now());
        Self {
            config,
            tokens,
            credential_expiries,
        }
    }
}

/// The current pipeline of every worker. Each worker's forwards through that worker's own
/// upstream client; everything else in them (token slots, limiters, metrics) is shared.
#[derive(Debug)]
pub(crate) struct Pipelines {
    workers: Vec<Arc<ArcSwap<Pipeline>>>,
}

impl Pipelines {
    /// The first worker's pipeline: what the admin listener reads (queue depths, routes),
    /// the same in every worker's.
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Pipeline>> {
        self.workers[0].load()
    }

    /// Worker `index`'s pipeline, swapped by reloads.
    pub(crate) fn worker(&self, index: usize) -> Arc<ArcSwap<Pipeline>> {
        Arc::clone(&self.workers[index])
    }
}

/// Everything a running proxy shares between its workers, its admin listener and reloads.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) pipelines: Pipelines,
    current: ArcSwap<Generation>,
    pub(crate) metrics: Metrics,
    /// One client (and connection pool) per worker: a worker's upstream connections are
    /// driven by its own runtime.
    upstreams: Vec<UpstreamClient<UpstreamBody>>,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    config_path: Option<PathBuf>,
    /// The file's stamp when the proxy was built: later changes are changes.
    initial_stamp: Option<Stamp>,
    /// One reload at a time (SIGHUP and the file poll may coincide).
    reloading: Mutex<()>,
    /// Set once shutdown starts; shared with every pipeline, which then answers 503.
    draining: Arc<AtomicBool>,
    /// Route queues, lockouts and rate-limit buckets, carried from pipeline to pipeline.
    limiters: Limiters,
}

impl Runtime {
    /// Builds the token cache and one pipeline per worker (at least one) for `config`;
    /// fetches nothing yet.
    pub(crate) fn new(
        config: Config,
        tls: rustls::ClientConfig,
        path: Option<PathBuf>,
        workers: usize,
    ) -> Self {
        let tls = Arc::new(tls);
        let metrics = Metrics::new();
        let tokens = TokenCache::new(&config, Arc::clone(&tls));
        let upstreams: Vec<_> = (0..workers.max(1))
            .map(|_| upstream::client((*tls).clone()))
            .collect();
        let draining = Arc::new(AtomicBool::new(false));
        let cluster = config
            .cluster
            .as_ref()
            .map(|cluster| Cluster::new(cluster, metrics.cluster_series()));
        let limiters = Limiters::new(cluster);
        let workers = upstreams
            .iter()
            .map(|upstream| {
                Arc::new(ArcSwap::from_pointee(Pipeline::new(
                    &config,
                    &tokens,
                    upstream.clone(),
                    &metrics,
                    Arc::clone(&draining),
                    &limiters,
                )))
            })
            .collect();
        Self {
            pipelines: Pipelines { workers },
            current: ArcSwap::from_pointee(Generation::new(config, tokens)),
            metrics,
            upstreams,
            tls,
            initial_stamp: path.as_deref().and_then(file_stamp),
            config_path: path,
            reloading: Mutex::new(()),
            draining,
            limiters,
        }
    }

    /// Starts fetching and renewing the tokens. Needs a tokio runtime.
    pub(crate) fn start(&self) {
        self.current.load().tokens.start();
        if let Some(cluster) = &self.limiters.cluster {
            cluster.start();
        }
    }

    /// Fleet mode's Redis handle, when `cluster` is configured.
    pub(crate) fn cluster(&self) -> Option<&Cluster> {
        self.limiters.cluster.as_ref()
    }

    pub(crate) fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub(crate) fn token_status(&self) -> Vec<SlotStatus> {
        self.current.load().tokens.status()
    }

    /// Provider calls by credential and outcome since start-up, for `/metrics`.
    pub(crate) fn token_fetches(&self) -> Vec<FetchCount> {
        self.current.load().tokens.fetch_counts()
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// Loads and validates the configuration file, then applies it. On error, logs every
    /// problem and keeps the running configuration.
    pub(crate) fn reload_file(&self) -> Result<ReloadReport, ReloadError> {
        let Some(path) = self.config_path.as_deref() else {
            return Err(ReloadError::NoConfigFile);
        };
        match Config::load(path) {
            // Shutdown began while the file was read: the watcher that asked is gone.
            Ok(_) if self.is_draining() => Err(ReloadError::Draining),
            Ok(config) => Ok(self.apply(config)),
            Err(error) => {
                self.metrics.record_reload("error");
                let file = path.display().to_string();
                for problem in error.problems() {
                    error!(file, problem = %problem, "Configuration problem.");
                }
                error!(
                    file,
                    "Configuration reload failed; keeping the running configuration."
                );
                Err(error.into())
            }
        }
    }

    /// Switches to `config`: keeps the tokens of unchanged credentials and the running
    /// values of settings that need a restart, then swaps the pipeline.
    pub(crate) fn apply(&self, config: Config) -> ReloadReport {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let report = self.swap(config, "Configuration reloaded.");
        self.metrics.record_reload("ok");
        report
    }

    /// Switches to `config`, the configuration of `expected` with new secret-store values
    /// (`secrets`), unless a reload replaced `expected` meanwhile: that reload read the
    /// stores itself, and its file must not be undone. Whether it was applied.
    pub(crate) fn apply_secrets(&self, expected: &Arc<Generation>, config: Config) -> bool {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&self.current.load_full(), expected) {
            return false;
        }
        self.swap(config, "New secret version applied.");
        true
    }

    /// The swap itself; the caller holds `reloading`.
    fn swap(&self, mut config: Config, message: &'static str) -> ReloadReport {
        let old = self.current.load_full();
        let restart_required = keep_restart_settings(&old.config, &mut config);
        for field in &restart_required {
            warn!(
                field,
                "Configuration change needs a restart; keeping the running value."
            );
        }
        let unchanged = |name: &str| {
            let new = config.credential(name);
            new.is_some() && new == old.config.credential(name)
        };
        let kept_credentials: Vec<String> = config
            .credentials
            .iter()
            .map(|c| c.name.clone())
            .filter(|name| unchanged(name))
            .collect();
        let tokens = old.tokens.reload(&config, &self.tls, unchanged);
        let pipelines: Vec<Pipeline> = self
            .upstreams
            .iter()
            .map(|upstream| {
                Pipeline::new(
                    &config,
                    &tokens,
                    upstream.clone(),
                    &self.metrics,
                    Arc::clone(&self.draining),
                    &self.limiters,
                )
            })
            .collect();
        tokens.start();
        info!(
            routes = config.routes.len(),
            credentials = config.credentials.len(),
            kept_tokens = ?kept_credentials,
            "{message}"
        );
        self.current
            .store(Arc::new(Generation::new(config, tokens)));
        for (worker, pipeline) in self.pipelines.workers.iter().zip(pipelines) {
            worker.store(Arc::new(pipeline));
        }
        ReloadReport {
            restart_required,
            kept_credentials,
        }
    }
}

/// Puts the running values of restart-only settings back into `next`; returns the names
/// of those that differed.
fn keep_restart_settings(running: &Config, next: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let (old, new) = (&running.server, &mut next.server);
    if new.listen != old.listen {
        changed.push("server.listen");
        new.listen = old.listen;
    }
    if new.workers != old.workers {
        changed.push("server.workers");
        new.workers = old.workers;
    }
    if new.limits != old.limits {
        changed.push("server.limits");
        new.limits = old.limits.clone();
    }
    if new.tls != old.tls {
        changed.push("server.tls");
        new.tls = old.tls.clone();
    }
    if new.upstream_ca_file != old.upstream_ca_file {
        changed.push("server.upstream_ca_file");
        new.upstream_ca_file = old.upstream_ca_file.clone();
    }
    if next.cluster != running.cluster {
        changed.push("cluster");
        next.cluster = running.cluster.clone();
    }
    if next.admin != running.admin {
        let listen = |c: &Config| c.admin.as_ref().map(|a| a.listen);
        changed.push(if listen(next) == listen(running) {
            "admin.auth"
        } else {
            "admin.listen"
        });
        next.admin = running.admin.clone();
    }
    changed
}

/// Reloads on a blocking thread: both configuration stages read files, and building the
/// token sources and reading expiry dates decrypt PKCS#12 files, which the serving threads
/// must never wait for. Once shutdown has begun the result is dropped.
async fn reload_off_thread(runtime: &Arc<Runtime>) {
    let reloading = Arc::clone(runtime);
    if let Err(error) = tokio::task::spawn_blocking(move || reloading.reload_file()).await {
        error!(
            error = %error,
            "Configuration reload failed; keeping the running configuration."
        );
    }
}

/// Reloads on SIGHUP and when the configuration file changes, until aborted.
/// On SIGHUP the inbound TLS certificate (`certificates`) is re-read too.
pub(crate) async fn watch(
    runtime: Arc<Runtime>,
    mut hangups: Hangups,
    certificates: Option<crate::TlsReloader>,
) {
    let path = runtime.config_path().map(Path::to_path_buf);
    let mut stamp = runtime.initial_stamp;
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = next_hangup(&mut hangups) => {
                if let Some(certificates) = &certificates {
                    match certificates.reload() {
                        Ok(()) => info!("SIGHUP received; inbound TLS certificate re-read."),
                        Err(error) => warn!(error = %error, "Inbound TLS certificate reload failed; keeping the running one."),
                    }
                }
                let Some(path) = path.as_deref() else {
                    warn!("SIGHUP received, but the proxy was started without a configuration file; nothing to reload.");
                    continue;
                };
                info!(file = %path.display(), "SIGHUP received; reloading the configuration.");
                stamp = file_stamp(path);
                reload_off_thread(&runtime).await;
            }
            _ = poll.tick(), if path.is_some() => {
                let Some(path) = path.as_deref() else { continue };
                let now = file_stamp(path);
                // A file missing for a moment (replaced by rename) is not a change yet.
                if now.is_some() && now != stamp {
                    stamp = now;
                    info!(file = %path.display(), "Configuration file changed; reloading.");
                    reload_off_thread(&runtime).await;
                }
            }
        }
    }
}

/// Modification time and length: what the poll compares.
type Stamp = (SystemTime, u64);

/// The file's [`Stamp`], following symlinks.
fn file_stamp(path: &Path) -> Option<Stamp> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// The SIGHUP stream, registered before serving so that a hangup can never take the
/// default action (terminating the process).
#[cfg(unix)]
pub(crate) type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub(crate) type Hangups = ();

pub(crate) fn hangups() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::hangup())
            .inspect_err(|error| warn!(error = %error, "Cannot listen for SIGHUP."))
            .ok()
    }
}

async fn next_hangup(hangups: &mut Hangups) {
    #[cfg(unix)]
    if let Some(signal) = hangups
        && signal.recv().await.is_some()
    {
        return;
    }
    #[cfg(not(unix))]
    let _ = hangups;
    std::future::pending::<()>().await;
}
