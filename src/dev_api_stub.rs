//! TEMPORARY stub of the lead's `Proxy` API so `dev` compiles on its own branch.
//! Dropped at merge; `lib.rs` then provides the real `Proxy`, `StartError` and
//! `shutdown_signal`.

use std::future::Future;
use std::net::SocketAddr;

use crate::config::Config;

#[derive(Debug)]
pub struct Proxy {
    listener: tokio::net::TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Proxy {
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        let addr = config.server.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Proxy { listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        shutdown.await;
        Ok(())
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
