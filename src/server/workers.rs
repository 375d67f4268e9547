//! Thread-per-core serving: `server.workers` threads (one per core by default), each with
//! its own listening socket, its own current-thread tokio runtime and its own upstream
//! client, so a request is accepted, proxied and answered on one thread without handing
//! work to another (docs/architecture.md "Runtime layout").
//!
//! On Linux every worker binds its own socket to the address with `SO_REUSEPORT`, and the
//! kernel spreads new connections over them (by a hash of the connection's addresses,
//! `socket(7)`). Elsewhere `SO_REUSEPORT` does not balance (BSDs, macOS) or does not
//! exist (Windows), so the workers share one socket, each polling its own duplicate of it.
//!
//! Not here: what the workers share (the connection cap, the drain: [`super::Serving`]),
//! and what runs outside them — token renewal, reloads, the admin listener — on the
//! runtime that called [`crate::Proxy::run_until`].

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;

use super::Serving;
use crate::proxy::Pipeline;

/// Pending connections per listening socket (tokio's and Go's default as well).
const BACKLOG: u32 = 1024;
/// How long a stopping worker waits for its blocking tasks (name resolution) to end.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// How many workers `server.workers` asks for: the number given, else
/// `TOKIO_WORKER_THREADS` when set, else one per core the process may run on.
pub(crate) fn count(configured: Option<usize>) -> usize {
    configured
        .or_else(|| {
            std::env::var("TOKIO_WORKER_THREADS")
                .ok()
                .and_then(|n| n.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get))
}

/// `workers` listening sockets for `addr`, all on the same port (the first one's, when
/// `addr` asks for port 0). Must run inside a tokio runtime; the sockets are handed back
/// unregistered, for each worker's runtime to take up.
pub(crate) fn bind(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let first = listen(addr, workers > 1)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(if cfg!(target_os = "linux") {
            listen(addr, true)?
        } else {
            listeners[0].try_clone()?
        });
    }
    Ok(listeners)
}

/// One listening socket, as tokio's `TcpListener::bind` makes it (`SO_REUSEADDR` on Unix),
/// with `SO_REUSEPORT` when `shared` on Linux.
fn listen(addr: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    #[cfg(target_os = "linux")]
    if shared {
        socket.set_reuseport(true)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = shared;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}

/// A running worker thread; `stopped` resolves when its runtime is gone.
pub(crate) struct Worker {
    pub(crate) stopped: oneshot::Receiver<()>,
}

/// Starts worker `index` on a thread of its own: a current-thread runtime serving
/// `listener` with `pipelines` until `serving` says it is over. Log events go to
/// `dispatch`, the caller's subscriber (a thread-local one in tests).
pub(crate) fn spawn(
    index: usize,
    listener: std::net::TcpListener,
    pipelines: Arc<ArcSwap<Pipeline>>,
    serving: Arc<Serving>,
    dispatch: tracing::Dispatch,
) -> io::Result<Worker> {
    let (stopped, stopped_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("s2s-worker-{index}"))
        .spawn(move || {
            let _logging = tracing::dispatcher::set_default(&dispatch);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => {
                    runtime.block_on(async {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => serving.worker(listener, pipelines).await,
                            Err(error) => {
                                tracing::error!(worker = index, error = %error, "Worker cannot use its listening socket; it serves nothing.");
                            }
                        }
                    });
                    // Connections still open past the drain are dropped with their tasks.
                    runtime.shutdown_timeout(BLOCKING_GRACE);
                }
                Err(error) => {
                    tracing::error!(worker = index, error = %error, "Worker runtime did not start; it serves nothing.");
                }
            }
            let _ = stopped.send(());
        })?;
    Ok(Worker {
        stopped: stopped_rx,
    })
}
