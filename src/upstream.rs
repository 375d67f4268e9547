//! Outbound connections: the rustls client configuration and the pooled upstream client.
//!
//! One TLS configuration serves both the upstream client and the token client: the
//! webpki roots plus, optionally, `server.upstream_ca_file` for private CAs. Certificates
//! are always verified; there is no switch to turn that off. The upstream client is
//! hyper-util's pooled client; HTTP/2 is used when the upstream offers it through ALPN,
//! HTTP/1.1 otherwise. Plain `http://` is only reachable because the configuration allows
//! it for loopback hosts or an explicit `allow_plain_http` route.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// How long establishing a TCP connection to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled connections are closed after this long (below typical LB idle timeouts).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: cannot read CA certificates: {message}")]
    ReadCa { path: String, message: String },
    #[error("{path}: contains no PEM certificate")]
    EmptyCa { path: String },
    #[error("{path}: certificate rejected: {message}")]
    BadCa { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Client TLS settings shared by the upstream and token clients.
pub(crate) fn client_tls_config(
    extra_ca_file: Option<&Path>,
) -> Result<rustls::ClientConfig, TlsSetupError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca_file {
        let display = path.display().to_string();
        let certificates = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|error| TlsSetupError::ReadCa {
                path: display.clone(),
                message: error.to_string(),
            })?;
        if certificates.is_empty() {
            return Err(TlsSetupError::EmptyCa { path: display });
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|error| TlsSetupError::BadCa {
                    path: display.clone(),
                    message: error.to_string(),
                })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

pub(crate) type UpstreamClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// The pooled upstream client.
pub(crate) fn client<B>(tls: rustls::ClientConfig) -> UpstreamClient<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_while_idle(false)
        .build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_with_webpki_roots() {
        assert!(client_tls_config(None).is_ok());
    }

    #[test]
    fn reports_unreadable_and_empty_ca_files() {
        let missing = Path::new("/nonexistent/ca.pem");
        let error = client_tls_config(Some(missing)).unwrap_err().to_string();
        assert!(
            error.starts_with("/nonexistent/ca.pem: cannot read"),
            "{error}"
        );

        let path =
            std::env::temp_dir().join(format!("s2s-proxy-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let error = client_tls_config(Some(&path)).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(error.contains("contains no PEM certificate"), "{error}");
    }
}
