//! Outbound connections: the rustls client configuration and the pooled upstream client.
//!
//! One TLS configuration serves both the upstream client and the token client: the
//! webpki roots plus, optionally, `server.upstream_ca_file` for private CAs. Certificates
//! are always verified; there is no switch to turn that off. The upstream client is the
//! connection pool in [`pool`] on hyper's connection API; HTTP/2 is used when the upstream
//! offers it through ALPN, HTTP/1.1 otherwise. Plain `http://` is only reachable because
//! the configuration allows it for loopback hosts or an explicit `allow_plain_http` route.
//!
//! Names are resolved through [`GuardedResolver`]: an upstream name that resolves to a
//! link-local address (cloud metadata services) is refused, and so is one that resolves
//! to loopback unless the name is `localhost` — DNS must not turn a configured public
//! upstream into an internal one (SSRF by DNS rebinding, CWE-918).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use rustls::RootCertStore;
use tower_service::Service;

use crate::pem::{CertificateFileError, read_certificates};

mod pool;

pub(crate) use self::pool::{ResponseBody, UpstreamClient};

/// How long establishing a TCP connection to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled connections are closed after this long (below typical LB idle timeouts).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    Ca(#[from] CertificateFileError),
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
        let certificates = read_certificates(path)?;
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

/// The client TLS settings the configuration loader's second stage built from
/// `server.upstream_ca_file`, with the path they were read from (see `src/preflight.rs`).
#[derive(Debug)]
pub(crate) struct PreparedRoots {
    path: std::path::PathBuf,
    tls: rustls::ClientConfig,
}

impl PreparedRoots {
    /// Reads `path` as [`client_tls_config`] does.
    pub(crate) fn load(path: &Path) -> Result<Self, TlsSetupError> {
        Ok(Self {
            path: path.to_owned(),
            tls: client_tls_config(Some(path))?,
        })
    }
}

/// The client TLS settings for `config`: those its loader built when they are for the
/// same file, else built now (reading `server.upstream_ca_file`).
pub(crate) fn client_tls_for(
    config: &crate::config::Config,
) -> Result<rustls::ClientConfig, TlsSetupError> {
    let extra = config.server.upstream_ca_file.as_deref();
    match config.prepared.get::<PreparedRoots>() {
        Some(prepared) if extra == Some(prepared.path.as_path()) => Ok(prepared.tls.clone()),
        _ => client_tls_config(extra),
    }
}

/// Whether an address an upstream name resolved to may be connected to.
fn allowed(ip: IpAddr, loopback_ok: bool) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            !(v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast())
                && (loopback_ok || !v4.is_loopback())
        }
        IpAddr::V6(v6) => {
            !(v6.is_unicast_link_local() || v6.is_unspecified())
                && (loopback_ok || !v6.is_loopback())
        }
    }
}

/// A resolver that drops addresses upstreams must never reach (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct GuardedResolver<R> {
    inner: R,
}

impl<R> Service<Name> for GuardedResolver<R>
where
    R: Service<Name, Error = std::io::Error> + Send,
    R::Response: Iterator<Item = SocketAddr>,
    R::Future: Send + 'static,
{
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_ascii_lowercase();
        let loopback_ok = host == "localhost" || host.ends_with(".localhost");
        let resolving = self.inner.call(name);
        Box::pin(async move {
            let addresses: Vec<SocketAddr> = resolving
                .await?
                .filter(|address| allowed(address.ip(), loopback_ok))
                .collect();
            if addresses.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{host} resolves only to link-local, loopback or unspecified addresses, \
                     which are refused for upstreams"
                )));
            }
            Ok(addresses.into_iter())
        })
    }
}

/// The pooled upstream client.
pub(crate) fn client<B>(tls: rustls::ClientConfig) -> UpstreamClient<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    client_with(tls, POOL_IDLE_TIMEOUT)
}

/// The pooled upstream client, its idle connections kept `idle_timeout`.
pub(crate) fn client_with<B>(tls: rustls::ClientConfig, idle_timeout: Duration) -> UpstreamClient<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = HttpConnector::new_with_resolver(GuardedResolver {
        inner: GaiResolver::new(),
    });
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    UpstreamClient::new(connector, idle_timeout)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    /// Resolves every name to the given addresses.
    #[derive(Clone)]
    struct Fixed(Vec<SocketAddr>);

    impl Service<Name> for Fixed {
        type Response = std::vec::IntoIter<SocketAddr>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Name) -> Self::Future {
            std::future::ready(Ok(self.0.clone().into_iter()))
        }
    }

    async fn resolve(name: &str, addresses: &[&str]) -> Result<Vec<SocketAddr>, String> {
        let fixed = Fixed(addresses.iter().map(|a| a.parse().unwrap()).collect());
        let mut resolver = GuardedResolver { inner: fixed };
        resolver
            .call(Name::from_str(name).unwrap())
            .await
            .map(Iterator::collect)
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn names_never_resolve_to_metadata_or_loopback_addresses() {
        let public = ["20.190.1.1:443", "[2603:1030::1]:443"];
        assert_eq!(resolve("api.example.com", &public).await.unwrap().len(), 2);
        for refused in [
            "169.254.169.254:80",
            "[fe80::1]:80",
            "127.0.0.1:80",
            "[::1]:80",
            "0.0.0.0:80",
            "[::ffff:169.254.169.254]:80",
        ] {
            let error = resolve("rebind.example.com", &[refused]).await.unwrap_err();
            assert!(error.contains("refused"), "{refused}: {error}");
        }
        // Mixed answers keep only the safe addresses.
        let mixed = resolve(
            "api.example.com",
            &["169.254.169.254:443", "20.190.1.1:443"],
        )
        .await
        .unwrap();
        assert_eq!(mixed, ["20.190.1.1:443".parse::<SocketAddr>().unwrap()]);
        // `localhost` may be loopback (sidecars, tests), never link-local.
        assert!(resolve("localhost", &["127.0.0.1:80"]).await.is_ok());
        assert!(resolve("localhost", &["169.254.169.254:80"]).await.is_err());
    }

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

        let dir = crate::test_support::TempDir::new("upstream-ca");
        let path = dir.write("empty-ca.pem", "not a certificate\n");
        let error = client_tls_config(Some(&path)).unwrap_err().to_string();
        assert!(error.contains("contains no PEM certificate"), "{error}");
    }
}
