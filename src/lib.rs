//! s2s-proxy: skeleton under construction.
pub mod config;
pub mod dev;
mod dev_api_stub;
pub mod secret;
pub mod token;

pub use dev_api_stub::{Proxy, StartError, shutdown_signal};
