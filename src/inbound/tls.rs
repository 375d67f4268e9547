//! Inbound TLS: the rustls server configuration behind `server.tls`, a server certificate
//! that can be swapped while the proxy runs, and what a verified client certificate says.
//!
//! TLS 1.2 and 1.3 only, ALPN `h2` and `http/1.1` (the connection builder serves either).
//! With `client_ca_file`, a client certificate is optional — Basic and API-key clients
//! keep working on the same port — but one that is presented must chain to that CA, or
//! the handshake fails. Matching a verified certificate to a client happens in
//! [`super::Authenticator`]; this module only extracts the fingerprint and subject CN.
//! The accept loop (handshake timeout, connection slots) lives in `crate::server`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConnection, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use crate::config::ServerTls;
use crate::pem::{CertificateFileError, read_certificates};

/// Protocols offered by ALPN, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why inbound TLS could not be set up or reloaded. Messages name files, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum InboundTlsError {
    #[error("{path}: cannot read: {message}")]
    Read { path: String, message: String },
    #[error(transparent)]
    Certificates(#[from] CertificateFileError),
    #[error("{path}: contains no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("{key}: the private key is unusable or does not belong to {cert}: {message}")]
    Key {
        cert: String,
        key: String,
        message: String,
    },
    #[error("{path}: client CA certificate rejected: {message}")]
    ClientCa { path: String, message: String },
    #[error("inbound TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server side of inbound TLS: the rustls configuration the listener uses, and the
/// handle that swaps its certificate.
#[derive(Debug, Clone)]
pub(crate) struct InboundTls {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) reloader: TlsReloader,
}

impl InboundTls {
    /// Reads the certificate, key and optional client CA named by `server.tls`.
    pub(crate) fn new(tls: &ServerTls) -> Result<Self, InboundTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = load_certified_key(&tls.cert_file, &tls.key_file, &provider)?;
        let verifier = tls
            .client_ca_file
            .as_deref()
            .map(|path| client_verifier(path, &provider))
            .transpose()?;
        Self::from_parts(tls, Arc::new(key), verifier, provider)
    }

    /// The listener's configuration for `config.server.tls`: from the files its loader
    /// already read when it prepared them (see `src/preflight.rs`), else read now.
    pub(crate) fn for_config(
        config: &crate::config::Config,
    ) -> Result<Option<Self>, InboundTlsError> {
        let Some(files) = &config.server.tls else {
            return Ok(None);
        };
        match config.prepared.get::<PreparedInbound>() {
            Some(prepared) if prepared.files == *files => Self::from_parts(
                files,
                Arc::clone(&prepared.key),
                prepared.verifier.clone(),
                Arc::clone(&prepared.provider),
            )
            .map(Some),
            _ => Self::new(files).map(Some),
        }
    }

    /// Builds the server configuration around a loaded key pair and client verifier; reads
    /// no file.
    fn from_parts(
        tls: &ServerTls,
        key: Arc<CertifiedKey>,
        verifier: Option<Arc<dyn ClientCertVerifier>>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, InboundTlsError> {
        let resolver = Arc::new(ReloadableCert {
            current: ArcSwap::new(key),
        });
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
        let builder = match verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            config: Arc::new(config),
            reloader: TlsReloader {
                resolver,
                provider,
                cert_file: tls.cert_file.clone(),
                key_file: tls.key_file.clone(),
            },
        })
    }
}

/// `server.tls` as the configuration loader read it: the key pair and the client
/// verifier, with the file names they came from, so that binding reads no file again.
/// Debug names the files only, never key material.
pub(crate) struct PreparedInbound {
    files: ServerTls,
    key: Arc<CertifiedKey>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for PreparedInbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedInbound")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Loads `server.tls` the way [`InboundTls::new`] does, for the configuration loader:
/// `check` and `run` must agree on whether a certificate, key and client CA are usable.
/// Each problem comes with the field it belongs to (`cert_file`, `key_file`,
/// `client_ca_file`); a key that does not belong to the certificate is the key's problem.
/// What loaded is kept for [`InboundTls::for_config`].
pub(crate) fn prepare(tls: &ServerTls) -> Result<PreparedInbound, Vec<(&'static str, String)>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut problems = Vec::new();
    let key = match load_certified_key(&tls.cert_file, &tls.key_file, &provider) {
        Ok(key) => Some(key),
        Err(error @ InboundTlsError::Certificates(_)) => {
            problems.push(("cert_file", error.to_string()));
            None
        }
        Err(
            error @ (InboundTlsError::Read { .. }
            | InboundTlsError::NoKey { .. }
            | InboundTlsError::Key { .. }
            | InboundTlsError::ClientCa { .. }
            | InboundTlsError::Rustls(_)),
        ) => {
            problems.push(("key_file", error.to_string()));
            None
        }
    };
    let verifier = match &tls.client_ca_file {
        None => Some(None),
        Some(path) => match client_verifier(path, &provider) {
            Ok(verifier) => Some(Some(verifier)),
            Err(error) => {
                problems.push(("client_ca_file", error.to_string()));
                None
            }
        },
    };
    match (key, verifier) {
        (Some(key), Some(verifier)) if problems.is_empty() => Ok(PreparedInbound {
            files: tls.clone(),
            key: Arc::new(key),
            verifier,
            provider,
        }),
        _ => Err(problems),
    }
}

/// The verifier of client certificates chaining to `path`'s CA; optional, since Basic and
/// API-key clients share the port and present no certificate.
fn client_verifier(
    path: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, InboundTlsError> {
    let roots = client_roots(path)?;
    WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|error| InboundTlsError::ClientCa {
            path: path.display().to_string(),
            message: error.to_string(),
        })
}

/// Re-reads `server.tls.cert_file` and `key_file` and serves the new pair to every
/// handshake from then on; connections already established keep theirs. Cheap to clone.
///
/// The configuration reload (SIGHUP) calls [`TlsReloader::reload`]; a failed reload keeps
/// the running certificate. `client_ca_file` is read once at start-up.
#[derive(Debug, Clone)]
pub struct TlsReloader {
    resolver: Arc<ReloadableCert>,
    provider: Arc<CryptoProvider>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl TlsReloader {
    /// Loads and checks the pair, then swaps it in. On error nothing changes.
    pub fn reload(&self) -> Result<(), InboundTlsError> {
        let key = load_certified_key(&self.cert_file, &self.key_file, &self.provider)?;
        self.resolver.current.store(Arc::new(key));
        tracing::info!(
            cert_file = %self.cert_file.display(),
            "Inbound TLS certificate reloaded."
        );
        Ok(())
    }
}

/// Hands every handshake the current certificate; [`TlsReloader`] replaces it.
#[derive(Debug)]
struct ReloadableCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, InboundTlsError> {
    let cert_path = cert_file.display().to_string();
    let key_path = key_file.display().to_string();
    let chain = read_certificates(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| match error {
        rustls_pki_types::pem::Error::NoItemsFound => InboundTlsError::NoKey {
            path: key_path.clone(),
        },
        other => InboundTlsError::Read {
            path: key_path.clone(),
            message: other.to_string(),
        },
    })?;
    // `from_der` also checks that the key belongs to the leaf certificate.
    CertifiedKey::from_der(chain, key, provider).map_err(|error| InboundTlsError::Key {
        cert: cert_path,
        key: key_path,
        message: error.to_string(),
    })
}

fn client_roots(path: &Path) -> Result<Arc<RootCertStore>, InboundTlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(path)? {
        roots
            .add(certificate)
            .map_err(|error| InboundTlsError::ClientCa {
                path: path.display().to_string(),
                message: error.to_string(),
            })?;
    }
    Ok(Arc::new(roots))
}

/// What the handshake established for one connection; every request on it carries this
/// as an extension (`Arc<TlsSession>`). Its presence means the request came over TLS.
#[derive(Debug)]
pub(crate) struct TlsSession {
    /// The client's certificate, verified against `client_ca_file`; `None` when the
    /// client presented none.
    pub(crate) peer_certificate: Option<PeerCertificate>,
}

impl TlsSession {
    pub(crate) fn of(connection: &ServerConnection) -> Self {
        Self {
            peer_certificate: connection
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| PeerCertificate::from_der(leaf)),
        }
    }
}

/// The identifying parts of a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerCertificate {
    /// SHA-256 of the DER encoding, as `openssl x509 -fingerprint -sha256` prints it.
    pub(crate) fingerprint_sha256: [u8; 32],
    /// The subject's common name; `None` when the subject has no CN, more than one, or
    /// one that is not a string.
    pub(crate) subject_cn: Option<String>,
    /// DNS names of the subject alternative name extension, lowercase.
    pub(crate) san_dns: Vec<String>,
}

impl PeerCertificate {
    pub(crate) fn from_der(der: &[u8]) -> Self {
        Self {
            fingerprint_sha256: Sha256::digest(der).into(),
            subject_cn: subject_cn(der),
            san_dns: san_dns(der),
        }
    }
}

/// rustls-webpki verifies the certificate but does not expose the subject name, hence
/// x509-parser (pure Rust) for this one field.
fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = certificate.subject().iter_common_name();
    let first = names.next()?;
    // Two CNs make "the" subject name ambiguous: match on neither.
    if names.next().is_some() {
        return None;
    }
    first.as_str().ok().map(str::to_owned)
}

/// The DNS names among the subject alternative names, lowercase (DNS is case-insensitive).
fn san_dns(der: &[u8]) -> Vec<String> {
    let Ok((_, certificate)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(extension)) = certificate.subject_alternative_name() else {
        return Vec::new();
    };
    extension
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair};

    use super::*;

    fn certificate(cns: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for cn in cns {
            params
                .distinguished_name
                .push(DnType::CommonName, cn.to_owned());
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn subject_cn_and_fingerprint() {
        let der = certificate(&["edi.contoso.com"]);
        let peer = PeerCertificate::from_der(&der);
        assert_eq!(peer.subject_cn.as_deref(), Some("edi.contoso.com"));
        assert_eq!(peer.san_dns, ["client.example"]);
        assert_eq!(
            peer.fingerprint_sha256,
            <[u8; 32]>::from(Sha256::digest(&der))
        );
    }

    #[test]
    fn start_up_errors_name_the_file() {
        let dir = crate::test_support::TempDir::new("inbound-tls");
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let write = |name: &str, contents: &str| dir.write(name, contents);
        let tls = ServerTls {
            cert_file: write("tls.crt", &cert.pem()),
            key_file: write("tls.key", &key.serialize_pem()),
            client_ca_file: Some(write("ca.pem", &cert.pem())),
        };
        let built = InboundTls::new(&tls).expect("valid pair and CA");
        assert_eq!(
            built.config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );

        let empty_ca = ServerTls {
            client_ca_file: Some(write("empty.pem", "")),
            ..tls.clone()
        };
        let error = InboundTls::new(&empty_ca).unwrap_err().to_string();
        assert!(
            error.ends_with("empty.pem: contains no PEM certificate"),
            "{error}"
        );

        let other_key = ServerTls {
            key_file: write("other.key", &KeyPair::generate().unwrap().serialize_pem()),
            ..tls.clone()
        };
        let error = InboundTls::new(&other_key).unwrap_err().to_string();
        assert!(
            error.contains("other.key: the private key is unusable or does not belong to"),
            "{error}"
        );
        assert!(!error.contains("PRIVATE KEY"), "{error}");

        let missing = ServerTls {
            cert_file: dir.path().join("missing.crt"),
            ..tls
        };
        let error = InboundTls::new(&missing).unwrap_err().to_string();
        assert!(error.contains("missing.crt: cannot read"), "{error}");
    }

    #[test]
    fn no_common_name_matches_nothing() {
        // (rcgen cannot write two CNs; `subject_cn` refuses those by construction.)
        assert_eq!(
            PeerCertificate::from_der(&certificate(&[])).subject_cn,
            None
        );
        assert_eq!(subject_cn(b"not a certificate"), None);
    }
}
