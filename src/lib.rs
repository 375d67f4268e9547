//! s2s-proxy: an authenticating reverse proxy that lets legacy integrations call OAuth 2.0
//! protected APIs (Dynamics 365 Business Central, Finance & Operations, Dataverse, …).
//!
//! Module map:
//! - [`config`]: the YAML schema, `${…}` expansion and validation into a typed [`Config`].
//! - `server`: listener, connection limits, TLS handshakes, graceful drain.
//! - `proxy`: the request pipeline — check, authenticate, route, token, forward.
//! - `inbound`: who the caller is and whether a route admits it; inbound TLS.
//! - `routing`: prefix table, path safety, upstream URIs.
//! - `rewrite`: streaming link rewriting of responses (`rewrite_links`).
//! - [`token`]: token sources per credential type and the single-flight cache.
//! - `upstream`: rustls client configuration and the pooled upstream client.
//! - [`secret`]: redacting wrappers for secrets.
//! - [`dev`]: the self-contained demo behind `s2s-proxy dev`.
//! - `hardening`: no core dumps, not dumpable.
//! - [`report`]: what `check` and `token` print.
//! - [`doctor`]: `s2s-proxy doctor`, a token and one upstream call per route, explained.
//!
//! Request lifecycle: a connection is accepted by `server`, each request runs through
//! `proxy::Pipeline::handle`, which authenticates it with `inbound`, picks the route with
//! `routing`, takes the route's token from the [`token`] cache (renewed in the background
//! long before expiry) and streams the exchange through the `upstream` client.

pub mod config;
pub mod dev;
pub mod doctor;
#[doc(hidden)]
pub mod fuzzing;
mod hardening;
mod inbound;
mod proxy;
pub mod report;
mod rewrite;
mod routing;
pub mod secret;
mod server;
pub mod token;
mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::{Config, ConfigError, Source};
pub use hardening::harden_process;
pub use inbound::tls::{InboundTlsError, TlsReloader};
pub use upstream::TlsSetupError;

use crate::inbound::tls::InboundTls;
use crate::proxy::Pipeline;
use crate::token::TokenCache;

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
}

/// A proxy bound to its listening address, fetching its tokens, ready to serve.
#[derive(Debug)]
pub struct Proxy {
    listener: TcpListener,
    pipeline: Arc<Pipeline>,
    /// Keeps the background renewal tasks alive while the proxy runs.
    tokens: TokenCache,
    /// `server.tls`: the listener's rustls configuration and its certificate reloader.
    inbound_tls: Option<InboundTls>,
    config: Config,
}

impl Proxy {
    /// Builds the runtime pieces (TLS roots, token cache, upstream pool), binds
    /// `server.listen` and starts fetching every route's token.
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        let inbound_tls = config
            .server
            .tls
            .as_ref()
            .map(InboundTls::new)
            .transpose()?;
        let tls = upstream::client_tls_config(config.server.upstream_ca_file.as_deref())?;
        let tokens = TokenCache::new(&config, Arc::new(tls.clone()));
        let pipeline = Arc::new(Pipeline::new(&config, &tokens, upstream::client(tls)));
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        tokens.start();
        Ok(Proxy {
            listener,
            pipeline,
            tokens,
            inbound_tls,
            config,
        })
    }

    /// Re-reads `server.tls.cert_file` and `key_file`; new handshakes get the new pair.
    /// Nothing to do without `server.tls`. On error the running certificate stays.
    pub fn reload_tls(&self) -> Result<(), InboundTlsError> {
        match &self.inbound_tls {
            Some(tls) => tls.reloader.reload(),
            None => Ok(()),
        }
    }

    /// A handle for [`Proxy::reload_tls`] that outlives `run_until` taking the proxy:
    /// what the SIGHUP handler keeps. `None` without `server.tls`.
    pub fn tls_reloader(&self) -> Option<TlsReloader> {
        self.inbound_tls.as_ref().map(|tls| tls.reloader.clone())
    }

    /// The state of every (credential, scope) token: for readiness reports and tests.
    pub fn token_status(&self) -> Vec<token::SlotStatus> {
        self.tokens.status()
    }

    pub fn local_addr(&self) -> SocketAddr {
        server::local_addr(&self.listener)
    }

    /// Serves until `shutdown` completes, then stops accepting and drains in-flight
    /// requests (at most 30 s).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        tracing::info!(
            listen = %self.local_addr(),
            tls = self.inbound_tls.is_some(),
            routes = self.config.routes.len(),
            "Listening."
        );
        // SIGHUP would terminate the process by default; until reload exists, say so.
        #[cfg(unix)]
        let hangups = tokio::spawn(report_hangups());
        server::serve(
            self.listener,
            self.pipeline,
            &self.config.server.limits,
            self.inbound_tls.map(|tls| tls.config),
            shutdown,
        )
        .await;
        #[cfg(unix)]
        hangups.abort();
        Ok(())
    }
}

/// Logs each SIGHUP: configuration reload is not implemented yet, and SIGHUP must not
/// stop the proxy.
#[cfg(unix)]
async fn report_hangups() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        tracing::warn!(
            "SIGHUP received: configuration reload is not supported yet; restart to apply changes."
        );
    }
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
