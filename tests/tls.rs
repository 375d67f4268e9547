//! Inbound TLS: HTTPS with HTTP/1.1 and h2 by ALPN, protocol versions, client certificates
//! (subject CN, fingerprint, foreign CA, unmatched), plain HTTP on the TLS port, the
//! handshake timeout and connection slots, and certificate reload.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use s2s_proxy::{Proxy, TlsReloader};
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

// ---------------------------------------------------------------------------------------
// Certificates

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> Pki {
    named_ca("s2s-proxy test CA")
}

fn named_ca(name: &str) -> Pki {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let certificate = params.self_signed(&key).unwrap();
    Pki {
        ca_pem: certificate.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A server certificate for `localhost`: PEM certificate, PEM key, DER certificate.
fn server_cert(pki: &Pki) -> (String, String, CertificateDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let certificate = params.signed_by(&key, &pki.issuer).unwrap();
    (
        certificate.pem(),
        key.serialize_pem(),
        certificate.der().clone(),
    )
}

/// A client certificate with subject `CN=cn`.
#[derive(Clone)]
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Identity {
    fn new(pki: &Pki, cn: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let certificate = params.signed_by(&key, &pki.issuer).unwrap();
        Self {
            chain: vec![certificate.der().clone()],
            key_der: key.serialize_der(),
        }
    }

    /// As `openssl x509 -noout -fingerprint -sha256` prints it: `AB:CD:…`.
    fn fingerprint(&self) -> String {
        Sha256::digest(&self.chain[0])
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "s2s-proxy-tls-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// The proxy with TLS

/// The standard set-up with `server.tls` (client CA = `pki`'s), the certificate clients
/// `edi` (subject CN `edi.contoso.com`) and `pinned` (by fingerprint) admitted on `/bc/`
/// but not on `/bc/sandbox/`, and `limits` (YAML flow mapping, may be empty).
struct Setup {
    _dir: TempDir,
    pki: Pki,
    server_der: CertificateDer<'static>,
    upstream: FakeUpstream,
    addr: SocketAddr,
    reloader: TlsReloader,
    cert_file: String,
    key_file: String,
    pinned: Identity,
}

async fn setup(limits: &str) -> Setup {
    let dir = TempDir::new();
    let pki = ca();
    let (cert_pem, key_pem, server_der) = server_cert(&pki);
    let cert_file = dir.write("tls.crt", &cert_pem);
    let key_file = dir.write("tls.key", &key_pem);
    let ca_file = dir.write("clients-ca.pem", &pki.ca_pem);
    let pinned = Identity::new(&pki, "pinned.contoso.com");

    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = standard_yaml(&idp, &upstream)
        .replace(
            "server:\n  listen: 127.0.0.1:0\n",
            &format!(
                "server:\n  listen: 127.0.0.1:0\n  tls:\n    cert_file: {cert_file}\n    \
                 key_file: {key_file}\n    client_ca_file: {ca_file}\n  limits: {{ {limits} }}\n"
            ),
        )
        .replace(
            "clients:\n",
            &format!(
                "clients:\n  edi:\n    certificate: {{ subject_cn: edi.contoso.com }}\n  \
                 pinned:\n    certificate: {{ fingerprint_sha256: \"{}\" }}\n",
                pinned.fingerprint()
            ),
        )
        .replace(
            "clients: [erp, scanner]",
            "clients: [erp, scanner, edi, pinned]",
        );
    let proxy = Proxy::bind(config(&yaml, standard_vars()))
        .await
        .expect("proxy binds");
    let addr = proxy.local_addr();
    let reloader = proxy.tls_reloader().expect("TLS is configured");
    tokio::spawn(async move { proxy.run_until(std::future::pending()).await });
    idp.wait_for_calls(1).await;
    Setup {
        _dir: dir,
        pki,
        server_der,
        upstream,
        addr,
        reloader,
        cert_file,
        key_file,
        pinned,
    }
}

// ---------------------------------------------------------------------------------------
// A TLS client

struct Client {
    config: Arc<rustls::ClientConfig>,
}

impl Client {
    /// Trusts `ca_pem`, offers `alpn`, and presents `identity` when given.
    fn new(ca_pem: &str, alpn: &[&str], identity: Option<&Identity>) -> Self {
        Self::with_versions(ca_pem, alpn, identity, rustls::DEFAULT_VERSIONS)
    }

    fn with_versions(
        ca_pem: &str,
        alpn: &[&str],
        identity: Option<&Identity>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(certificate.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match identity {
            Some(identity) => builder
                .with_client_auth_cert(
                    identity.chain.clone(),
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone())),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Self {
            config: Arc::new(config),
        }
    }

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(self.config.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    /// [`Client::get`] of `path` as client `erp` (Basic erp / PASSWORD).
    async fn get_as_erp(&self, addr: SocketAddr, path: &str) -> Result<(Version, Answer), String> {
        let auth = basic("erp", PASSWORD);
        self.get(addr, path, &[("authorization", &auth)]).await
    }

    /// One GET over a fresh connection, HTTP/2 when ALPN chose h2. Errors as text: with
    /// TLS 1.3 a refused client certificate surfaces only once the client reads.
    async fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Version, Answer), String> {
        let stream = self.connect(addr).await.map_err(|e| chain(&e))?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let mut builder = Request::builder().method("GET");
        builder = if h2 {
            builder.uri(format!("https://localhost:{}{path}", addr.port()))
        } else {
            builder
                .uri(path)
                .header("host", format!("localhost:{}", addr.port()))
        };
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(Bytes::new())).unwrap();
        let io = TokioIo::new(stream);
        let response = if h2 {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| chain(&e))?;
            tokio::spawn(connection);
            sender.send_request(request).await
        } else {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| chain(&e))?;
            tokio::spawn(connection);
            sender.send_request(request).await
        }
        .map_err(|e| chain(&e))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| chain(&e))?.to_bytes();
        Ok((
            parts.version,
            Answer {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            },
        ))
    }
}

/// An error with all its sources: hyper's "connection error" hides the TLS alert.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text.push_str(&format!(": {next}"));
        source = next.source();
    }
    text
}

/// Reads until the peer closes (or `limit` passes): what it sent, and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (out, closed)
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn basic_auth_over_https_with_http1_and_h2() {
    let s = setup("").await;
    for (alpn, version) in [("http/1.1", Version::HTTP_11), ("h2", Version::HTTP_2)] {
        let client = Client::new(&s.pki.ca_pem, &[alpn], None);
        let (seen, answer) = client.get_as_erp(s.addr, "/bc/companies").await.unwrap();
        assert_eq!((seen, answer.status), (version, 200), "{alpn}");
    }
    let requests = s.upstream.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.header("x-forwarded-proto"), Some("https"));
        assert_eq!(request.header("authorization"), Some("Bearer tok-1"));
    }
    // Without a credential, TLS alone is no identity.
    let client = Client::new(&s.pki.ca_pem, &["http/1.1"], None);
    let (_, answer) = client.get(s.addr, "/bc/companies", &[]).await.unwrap();
    assert_eq!(answer.status, 401);
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_served_and_older_versions_refused() {
    let s = setup("").await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let client = Client::with_versions(&s.pki.ca_pem, &["http/1.1"], None, &[version]);
        let (_, answer) = client.get_as_erp(s.addr, "/bc/x").await.unwrap();
        assert_eq!(answer.status, 200, "{version:?}");
    }
    // rustls cannot speak TLS 1.1, so this ClientHello is written by hand: version 3.2,
    // two CBC suites, no supported_versions; signature_algorithms only because rustls
    // checks for it before the version.
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[0x42; 32]);
    body.extend_from_slice(&[0x00, 0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f, 0x01, 0x00]);
    body.extend_from_slice(&[0x00, 0x0c, 0x00, 0x0d, 0x00, 0x08, 0x00, 0x06]);
    body.extend_from_slice(&[0x04, 0x03, 0x08, 0x04, 0x04, 0x01]);
    let mut handshake = vec![0x01, 0x00, 0x00, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(&record).await.unwrap();
    let (reply, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "the connection must be closed");
    // An alert record (21) carrying protocol_version (70), fatal (2).
    assert_eq!(reply.first(), Some(&0x15), "{reply:02x?}");
    assert!(reply.windows(2).any(|w| w == [0x02, 0x46]), "{reply:02x?}");
    assert_eq!(s.upstream.count(), 2);
}

#[tokio::test]
async fn client_certificate_by_subject_cn_authenticates_that_client() {
    let s = setup("").await;
    let edi = Identity::new(&s.pki, "edi.contoso.com");
    for alpn in ["http/1.1", "h2"] {
        let client = Client::new(&s.pki.ca_pem, &[alpn], Some(&edi));
        let (_, answer) = client.get(s.addr, "/bc/companies", &[]).await.unwrap();
        assert_eq!(answer.status, 200, "{alpn}: {}", answer.text());
        // Authenticated as `edi`, which /bc/sandbox/ does not admit.
        let (_, answer) = client
            .get(s.addr, "/bc/sandbox/companies", &[])
            .await
            .unwrap();
        assert_eq!(answer.status, 403, "{alpn}");
    }
    assert_eq!(s.upstream.count(), 2);
    let forwarded = &s.upstream.requests()[0];
    assert_eq!(forwarded.header("x-forwarded-proto"), Some("https"));
}

#[tokio::test]
async fn client_certificate_by_fingerprint() {
    let s = setup("").await;
    let client = Client::new(&s.pki.ca_pem, &["http/1.1"], Some(&s.pinned));
    let (_, answer) = client.get(s.addr, "/bc/x", &[]).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    // Same CA, same CN, other key: another certificate, another fingerprint.
    let lookalike = Identity::new(&s.pki, "pinned.contoso.com");
    let client = Client::new(&s.pki.ca_pem, &["http/1.1"], Some(&lookalike));
    let (_, answer) = client.get(s.addr, "/bc/x", &[]).await.unwrap();
    assert_eq!(answer.status, 401);
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn certificate_from_another_ca_fails_the_handshake() {
    let s = setup("").await;
    // Another CA, and an impostor CA with the very name of the trusted one.
    let strangers = [
        (
            Identity::new(&named_ca("other CA"), "edi.contoso.com"),
            "UnknownCA",
        ),
        (Identity::new(&ca(), "edi.contoso.com"), "DecryptError"),
    ];
    let auth = basic("erp", PASSWORD);
    for (stranger, alert) in &strangers {
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let client =
                Client::with_versions(&s.pki.ca_pem, &["http/1.1"], Some(stranger), &[version]);
            // Basic credentials do not rescue a connection whose certificate failed.
            let error = client
                .get(s.addr, "/bc/x", &[("authorization", &auth)])
                .await
                .expect_err("a certificate from another CA must be refused");
            assert!(
                error.contains(&format!("received fatal alert: {alert}")),
                "{version:?}: {error}"
            );
        }
    }
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn valid_certificate_matching_no_client_is_401_unless_other_credentials_decide() {
    let s = setup("").await;
    let nobody = Identity::new(&s.pki, "nobody.contoso.com");
    let client = Client::new(&s.pki.ca_pem, &["http/1.1"], Some(&nobody));
    let (_, answer) = client.get(s.addr, "/bc/x", &[]).await.unwrap();
    assert_eq!(answer.status, 401);
    assert_eq!(
        answer.header("www-authenticate"),
        Some(r#"Basic realm="s2s-proxy""#)
    );
    assert_eq!(s.upstream.count(), 0);
    // Basic is looked at before the certificate and decides alone.
    let (_, answer) = client.get_as_erp(s.addr, "/bc/x").await.unwrap();
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn plain_http_on_the_tls_port_fails_cleanly() {
    let s = setup("").await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    let auth = basic("erp", PASSWORD);
    let request = format!("GET /bc/x HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let (reply, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed && started.elapsed() < Duration::from_secs(5));
    assert!(
        !reply.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(s.upstream.count(), 0);
    // The listener is unharmed.
    let client = Client::new(&s.pki.ca_pem, &["http/1.1"], None);
    let (_, answer) = client.get_as_erp(s.addr, "/bc/x").await.unwrap();
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn silent_connection_is_closed_at_the_handshake_timeout_and_frees_its_slot() {
    let s = setup("header_read_timeout: 400ms, max_connections: 1").await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let (bytes, closed) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    let silent_for = started.elapsed();
    assert!(closed && bytes.is_empty(), "closed {closed}, got {bytes:?}");
    assert!(
        silent_for >= Duration::from_millis(350) && silent_for < Duration::from_secs(3),
        "closed after {silent_for:?}"
    );
    // Its slot is free again. (A new connection at the cap would not have waited for the
    // timeout either: a connection still in its handshake is the first to make room, see
    // tests/connections.rs.)
    let client = Client::new(&s.pki.ca_pem, &["h2"], None);
    let auth = basic("erp", PASSWORD);
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(s.addr, "/bc/x", &[("authorization", &auth)]),
    )
    .await
    .expect("the real request is served once the slot is free");
    assert_eq!(answer.unwrap().1.status, 200);
}

#[tokio::test]
async fn reloaded_certificate_is_served_to_new_handshakes() {
    let s = setup("").await;
    let client = Client::new(&s.pki.ca_pem, &["http/1.1"], None);
    let leaf =
        |stream: &TlsStream<TcpStream>| stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let before = client.connect(s.addr).await.unwrap();
    assert_eq!(leaf(&before), s.server_der);

    let (cert_pem, key_pem, new_der) = server_cert(&s.pki);
    std::fs::write(&s.cert_file, cert_pem).unwrap();
    std::fs::write(&s.key_file, key_pem).unwrap();
    s.reloader.reload().expect("reload");
    let after = client.connect(s.addr).await.unwrap();
    assert_eq!(leaf(&after), new_der);

    // A broken pair is refused and the running certificate stays.
    let (other_cert, _, _) = server_cert(&s.pki);
    std::fs::write(&s.cert_file, other_cert).unwrap();
    let error = s
        .reloader
        .reload()
        .expect_err("key does not match")
        .to_string();
    assert!(error.contains("does not belong"), "{error}");
    std::fs::write(&s.key_file, "not a key").unwrap();
    let error = s.reloader.reload().expect_err("no key").to_string();
    assert!(error.contains("no PEM private key"), "{error}");
    assert!(!error.contains("PRIVATE KEY"));
    let still = client.connect(s.addr).await.unwrap();
    assert_eq!(leaf(&still), new_der);

    drop(before);
    let (_, answer) = client.get_as_erp(s.addr, "/bc/x").await.unwrap();
    assert_eq!(answer.status, 200);
}
