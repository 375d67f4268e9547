//! s2s-proxy: skeleton under construction.
pub mod config;
pub mod secret;
pub mod token;
