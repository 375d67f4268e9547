//! s2s-proxy: an authenticating reverse proxy that lets legacy integrations call OAuth 2.0
//! protected APIs (Dynamics 365 Business Central, Finance & Operations, Dataverse, …).
//!
//! Module map:
//! - `civil_date`: UTC dates (`expires:` parsing, printed timestamps), a leaf module.
//! - [`config`]: the YAML schema, `${…}` expansion and validation into a typed [`Config`].
//! - `server`: listener, connection limits, TLS handshakes, graceful drain.
//! - `proxy`: the request pipeline — check, authenticate, route, token, forward — with
//!   request-side `$batch` translation (`proxy::batch`).
//! - `inbound`: who the caller is and whether a route admits it; inbound TLS.
//! - `routing`: prefix table, path safety, upstream URIs.
//! - `rewrite`: streaming link rewriting of responses (`rewrite_links`).
//! - [`token`]: token sources per credential type and the single-flight cache.
//! - `upstream`: rustls client configuration and the pooled upstream client.
//! - `admin`: the admin listener (`/healthz`, `/readyz`, `/metrics`, the status page) and
//!   `healthcheck`.
//! - `cluster`: fleet mode, the Redis handle (fail-open calls, availability probe, release
//!   notifications) and the fleet-wide semaphore behind `max_concurrent`.
//! - `metrics`: the Prometheus registry and metric names.
//! - `reload`: the running configuration, swapped whole on SIGHUP, a changed file or a new
//!   secret version in a secret store.
//! - `pem`: reading PEM certificate files.
//! - `preflight`: the second configuration stage, reading the files a [`Config`] names.
//! - [`secret`]: redacting wrappers for secrets.
//! - `secret_store`: reading `${secret:STORE/NAME}` values from Azure Key Vault.
//! - `hardening`: no core dumps, not dumpable.
//! - `header_names`: which request header names the proxy owns (for config and `proxy`).
//! - [`dev`]: the self-contained demo behind `s2s-proxy dev`.
//! - [`report`]: what `check` and `token` print.
//! - [`doctor`]: `s2s-proxy doctor`, a token and one upstream call per route, explained.
//! - [`init`]: `s2s-proxy init`, the first-run dialogue that writes `proxy.yaml` and its env file.
//!
//! Request lifecycle: a connection is accepted by `server`, each request runs through
//! `proxy::Pipeline::handle`, which authenticates it with `inbound`, picks the route with
//! `routing`, takes the route's token from the [`token`] cache (renewed in the background
//! long before expiry) and streams the exchange through the `upstream` client. A reload
//! swaps the pipeline; each request finishes on the one it started with.

mod admin;
mod civil_date;
mod cluster;
pub mod config;
pub mod dev;
pub mod doctor;
#[doc(hidden)]
pub mod fuzzing;
mod hardening;
mod header_names;
mod inbound;
pub mod init;
mod metrics;
mod pem;
mod preflight;
mod proxy;
mod reload;
pub mod report;
mod rewrite;
mod routing;
pub mod secret;
mod secret_store;
mod server;
#[cfg(test)]
mod test_support;
pub mod token;
mod upstream;
mod waiting;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use admin::{DEFAULT_HEALTHCHECK_URL, HealthcheckError, healthcheck};
pub use config::{Config, ConfigError, Source};
pub use hardening::harden_process;
pub use inbound::tls::{InboundTlsError, TlsReloader};
pub use reload::{ReloadError, ReloadHandle, ReloadReport};
pub use upstream::TlsSetupError;

use crate::inbound::tls::InboundTls;
use crate::reload::Runtime;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error(transparent)]
    InboundTls(#[from] InboundTlsError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the worker threads")]
    Workers(#[source] std::io::Error),
}

/// A proxy bound to its listening address (and its admin address, if configured),
/// fetching its tokens, ready to serve.
#[derive(Debug)]
pub struct Proxy {
    /// One listening socket per worker (`server.workers`), all on the same address.
    listeners: Vec<std::net::TcpListener>,
    admin: Option<TcpListener>,
    runtime: Arc<Runtime>,
    /// `server.tls`: the listener's rustls configuration and its certificate reloader.
    inbound_tls: Option<InboundTls>,
}

impl Proxy {
    /// Builds the runtime pieces (TLS roots, token cache, one upstream pool per worker),
    /// binds `server.listen` once per worker (and `admin.listen`) and starts fetching
    /// every route's token on the calling runtime, which keeps renewing them.
    /// Without a file to re-read, SIGHUP only logs; see [`Proxy::bind_with_path`].
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        Self::bind_inner(config, None).await
    }

    /// Like [`Proxy::bind`] for a configuration loaded from `path`: SIGHUP and changes
    /// of that file reload it.
    pub async fn bind_with_path(
        config: Config,
        path: impl Into<PathBuf>,
    ) -> Result<Proxy, StartError> {
        Self::bind_inner(config, Some(path.into())).await
    }

    async fn bind_inner(config: Config, path: Option<PathBuf>) -> Result<Proxy, StartError> {
        let inbound_tls = InboundTls::for_config(&config)?;
        let tls = upstream::client_tls_for(&config)?;
        let listen = config.server.listen;
        let admin_listen = config.admin.as_ref().map(|admin| admin.listen);
        let workers = server::workers::count(config.server.workers);
        let runtime = Arc::new(Runtime::new(config, tls, path, workers));
        let listeners =
            server::workers::bind(listen, workers).map_err(|source| StartError::Bind {
                addr: listen,
                source,
            })?;
        let admin = match admin_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        runtime.start();
        Ok(Proxy {
            listeners,
            admin,
            runtime,
            inbound_tls,
        })
    }

    /// The state of every (credential, scope) token: for readiness reports and tests.
    pub fn token_status(&self) -> Vec<token::SlotStatus> {
        self.runtime.token_status()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listeners
            .first()
            .and_then(|listener| listener.local_addr().ok())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// How many workers serve `server.listen` (`server.workers`, by default one per core).
    pub fn workers(&self) -> usize {
        self.listeners.len()
    }

    /// Where the admin endpoints listen, when `admin.listen` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(server::local_addr)
    }

    /// A handle that re-reads `server.tls.cert_file` and `key_file` ([`TlsReloader::reload`]:
    /// new handshakes get the new pair; on error the running certificate stays), and
    /// outlives `run_until` taking the proxy. SIGHUP does this too while the proxy runs.
    /// `None` without `server.tls`.
    pub fn tls_reloader(&self) -> Option<TlsReloader> {
        self.inbound_tls.as_ref().map(|tls| tls.reloader.clone())
    }

    /// A handle to reload the configuration while the proxy runs.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            runtime: self.runtime.clone(),
        }
    }

    /// Serves until `shutdown` completes, then stops accepting and drains in-flight
    /// requests (at most 30 s). Reloads on SIGHUP and on changes of the configuration
    /// file meanwhile.
    ///
    /// The listener is served by [`Proxy::workers`] threads of their own, each with a
    /// current-thread runtime; this future drives what happens once per process — the
    /// admin listener, reloads, token renewal (started by [`Proxy::bind`]) and the drain
    /// — on the calling runtime, and resolves once every worker has stopped. Dropping it
    /// stops the workers at once.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let listen = self.local_addr();
        let runtime = self.runtime;
        // Registered before anything else: an unhandled SIGHUP would end the process.
        let hangups = reload::hangups();
        let generation = runtime.current();
        tracing::info!(
            listen = %listen,
            workers = self.listeners.len(),
            admin = self.admin.as_ref().map(|l| server::local_addr(l).to_string()),
            tls = self.inbound_tls.is_some(),
            routes = generation.config.routes.len(),
            "Listening."
        );
        let limits = generation.config.server.limits.clone();
        drop(generation);
        let serving = server::Serving::new(
            &limits,
            self.inbound_tls.as_ref().map(|tls| tls.config.clone()),
        );
        // Whatever ends this future, the workers end with it.
        let _stop = StopWorkers(Arc::clone(&serving));
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let mut workers = Vec::with_capacity(self.listeners.len());
        for (index, listener) in self.listeners.into_iter().enumerate() {
            let worker = server::workers::spawn(
                index,
                listener,
                runtime.pipelines.worker(index),
                Arc::clone(&serving),
                dispatch.clone(),
            )
            .map_err(StartError::Workers)?;
            workers.push(worker);
        }
        let certificates = self.inbound_tls.as_ref().map(|tls| tls.reloader.clone());
        let watcher = tokio::spawn(reload::watch(runtime.clone(), hangups, certificates));
        let secrets = tokio::spawn(reload::refresh_secrets(runtime.clone()));
        let admin = self
            .admin
            .map(|listener| tokio::spawn(admin::serve(listener, runtime.clone())));
        shutdown.await;
        // No reload may swap the pipeline once draining starts; readiness fails now.
        watcher.abort();
        secrets.abort();
        runtime.set_draining();
        serving.drain().await;
        for worker in workers {
            let _ = worker.stopped.await;
        }
        if let Some(admin) = admin {
            admin.abort();
        }
        Ok(())
    }
}

/// Stops the workers when [`Proxy::run_until`] ends, however it ends.
struct StopWorkers(Arc<server::Serving>);

impl Drop for StopWorkers {
    fn drop(&mut self) {
        self.0.finish();
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
