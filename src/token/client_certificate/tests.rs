//! `client_certificate` against a strict fake Entra ID on 127.0.0.1 that checks what the
//! real one checks: the signature against the registered certificate (ring), the
//! thumbprint header, `aud` = the URL posted to, `iss` = `sub` = client id, a fresh `jti`
//! and the lifetime.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::Value;

use super::*;
use crate::config::{CertificateFile, Config, Source, TokenEndpoint};
use crate::secret::Secret;
use crate::token::fake::{self, FakeServer, Request};

const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const SCOPE: &str = "https://contoso.operations.dynamics.com/.default";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/creds")
        .join(name)
}

fn file(name: &str, password: Option<&str>) -> CertificateFile {
    CertificateFile {
        path: fixture(name),
        password: password.map(Secret::new),
        content: None,
    }
}

fn leaf(name: &str, password: Option<&str>) -> Vec<u8> {
    SigningCertificate::load(&file(name, password), AssertionAlg::Ps256)
        .unwrap()
        .leaf_der()
        .to_vec()
}

/// What the fake saw in each accepted assertion.
#[derive(Debug, Clone)]
struct Seen {
    header: Value,
    claims: Value,
}

/// A fake Entra token endpoint that accepts assertions signed by one of `registered`.
struct FakeEntra {
    server: FakeServer,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeEntra {
    async fn spawn(registered: Vec<Vec<u8>>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let jtis = Arc::new(Mutex::new(HashSet::new()));
        let record = Arc::clone(&seen);
        let server = FakeServer::spawn(Arc::new(move |request: &Request| {
            match verify(request, &registered, &jtis) {
                Ok(seen) => {
                    record.lock().unwrap().push(seen);
                    (200, fake::token_body("eyJ.cert-token.sig"))
                }
                Err(code) => fake::invalid_client(code),
            }
        }))
        .await;
        Self { server, seen }
    }

    fn url(&self) -> String {
        self.server.url("/tenant-guid/oauth2/v2.0/token")
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Entra's checks; `Err` is the AADSTS code it would answer with.
fn verify(
    request: &Request,
    registered: &[Vec<u8>],
    jtis: &Mutex<HashSet<String>>,
) -> Result<Seen, u64> {
    let field = |name: &str| request.field(name);
    assert_eq!(request.method, "POST");
    assert_eq!(field("grant_type").as_deref(), Some("client_credentials"));
    assert_eq!(field("client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(field("scope").as_deref(), Some(SCOPE));
    assert_eq!(
        field("client_assertion_type").as_deref(),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert!(field("client_secret").is_none());
    let assertion = field("client_assertion").ok_or(7_000_218_u64)?;
    let parts: Vec<&str> = assertion.split('.').collect();
    assert_eq!(parts.len(), 3);
    let decode = |part: &str| -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    };
    let (header, claims) = (decode(parts[0]), decode(parts[1]));
    let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    assert_eq!(header["typ"], "JWT");
    // The key is found by thumbprint: SHA-256 for PS256, SHA-1 for RS256.
    let (thumbprint, digest, algorithm): (&str, _, &dyn ring::signature::VerificationAlgorithm) =
        match header["alg"].as_str() {
            Some("PS256") => (
                "x5t#S256",
                &ring::digest::SHA256,
                &ring::signature::RSA_PSS_2048_8192_SHA256,
            ),
            Some("RS256") => (
                "x5t",
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            ),
            _ => return Err(700_027),
        };
    let wanted = header[thumbprint].as_str().ok_or(700_027_u64)?;
    let certificate = registered
        .iter()
        .find(|der| URL_SAFE_NO_PAD.encode(ring::digest::digest(digest, der)) == wanted)
        .ok_or(700_027_u64)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate).unwrap();
    let public_key = parsed.public_key().subject_public_key.data.to_vec();
    ring::signature::UnparsedPublicKey::new(algorithm, public_key)
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .map_err(|_| 700_027_u64)?;
    // aud is the endpoint actually posted to.
    let host = request.header("host").unwrap();
    let path = request.target.split('?').next().unwrap();
    assert_eq!(claims["aud"], format!("http://{host}{path}"));
    assert_eq!(claims["iss"], CLIENT_ID);
    assert_eq!(claims["sub"], CLIENT_ID);
    let jti = claims["jti"].as_str().unwrap().to_owned();
    assert_eq!(jti.len(), 36);
    assert!(jtis.lock().unwrap().insert(jti), "jti reused");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (nbf, iat, exp) = (
        claims["nbf"].as_u64().unwrap(),
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    if nbf > now + 60 || exp <= now {
        return Err(700_024);
    }
    assert!(now - nbf < 60 && iat == nbf);
    assert!((300..=600).contains(&(exp - nbf)), "lifetime {}", exp - nbf);
    Ok(Seen { header, claims })
}

fn settings(url: &str, files: Vec<CertificateFile>, alg: AssertionAlg) -> ClientCertificate {
    ClientCertificate {
        endpoint: TokenEndpoint::Generic {
            url: url.parse().unwrap(),
        },
        client_id: CLIENT_ID.to_owned(),
        certificates: files,
        assertion_alg: alg,
        send_certificate_chain: false,
    }
}

fn source(settings: &ClientCertificate) -> ClientCertificateSource {
    ClientCertificateSource::new("fo-cert", settings, fake::http(), None).unwrap()
}

/// A PS256 source for `files`, posting to `entra`.
fn source_for(entra: &FakeEntra, files: Vec<CertificateFile>) -> ClientCertificateSource {
    source(&settings(&entra.url(), files, AssertionAlg::Ps256))
}

#[tokio::test]
async fn ps256_assertion_from_pem_is_accepted_and_fresh_each_time() {
    let entra = FakeEntra::spawn(vec![leaf("a.pem", None)]).await;
    let source = source_for(&entra, vec![file("a.pem", None)]);
    for _ in 0..2 {
        let token = source.fetch(Some(SCOPE)).await.unwrap();
        assert_eq!(token.access_token.expose(), "eyJ.cert-token.sig");
    }
    let seen = entra.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header["alg"], "PS256");
    assert!(seen[0].header.get("x5t").is_none());
    assert!(seen[0].header.get("x5c").is_none());
    assert_ne!(seen[0].claims["jti"], seen[1].claims["jti"]);
}

#[tokio::test]
async fn rs256_sends_the_sha1_thumbprint_and_pkcs1_keys_load() {
    let entra = FakeEntra::spawn(vec![leaf("a.pem", None)]).await;
    let source = source(&settings(
        &entra.url(),
        vec![file("a-pkcs1.pem", None)],
        AssertionAlg::Rs256,
    ));
    source.fetch(Some(SCOPE)).await.unwrap();
    let seen = entra.seen();
    assert_eq!(seen[0].header["alg"], "RS256");
    assert!(seen[0].header.get("x5t#S256").is_none());
}

#[tokio::test]
async fn pkcs12_with_password_including_legacy_encryption() {
    let entra = FakeEntra::spawn(vec![leaf("a.pem", None), leaf("b.pem", None)]).await;
    for name in ["a.pfx", "b-legacy.pfx"] {
        let source = source_for(&entra, vec![file(name, Some("test-pass"))]);
        source.fetch(Some(SCOPE)).await.unwrap();
    }
    assert_eq!(entra.seen().len(), 2);
    let wrong =
        SigningCertificate::load(&file("a.pfx", Some("nope")), AssertionAlg::Ps256).unwrap_err();
    assert!(wrong.contains("wrong certificate_password"), "{wrong}");
    assert!(!wrong.contains("nope"));
}

/// A Key Vault certificate's secret (`${secret:STORE/NAME}` as `certificate_file`): PEM
/// text, or a PKCS#12 file in base64; nothing is read from disk.
#[tokio::test]
async fn a_certificate_from_a_secret_store_is_pem_text_or_base64_pkcs12() {
    let entra = FakeEntra::spawn(vec![leaf("a.pem", None)]).await;
    let pfx = std::fs::read(fixture("a.pfx")).unwrap();
    let pem = std::fs::read_to_string(fixture("a.pem")).unwrap();
    let stored = |content: String, password: Option<&str>| CertificateFile {
        path: PathBuf::from("kv/fo-cert (secret store)"),
        password: password.map(Secret::new),
        content: Some(Secret::new(content)),
    };
    for file in [
        stored(STANDARD.encode(&pfx), Some("test-pass")),
        stored(pem, None),
    ] {
        source_for(&entra, vec![file])
            .fetch(Some(SCOPE))
            .await
            .unwrap();
    }
    assert_eq!(entra.seen().len(), 2);
    let error = SigningCertificate::load(
        &stored("not base64 !".to_owned(), None),
        AssertionAlg::Ps256,
    )
    .unwrap_err();
    assert_eq!(
        error,
        "kv/fo-cert (secret store) is neither PEM nor a base64 PKCS#12 file"
    );
}

#[tokio::test]
async fn certificate_chain_is_sent_on_request() {
    let entra = FakeEntra::spawn(vec![leaf("a.pem", None)]).await;
    let mut settings = settings(&entra.url(), vec![file("a.pem", None)], AssertionAlg::Ps256);
    settings.send_certificate_chain = true;
    source(&settings).fetch(Some(SCOPE)).await.unwrap();
    let x5c = entra.seen()[0].header["x5c"].clone();
    assert_eq!(x5c[0], STANDARD.encode(leaf("a.pem", None)));
}

#[test]
fn ec_keys_are_refused_for_entra_with_a_clear_message() {
    let error = SigningCertificate::load(&file("ec.pem", None), AssertionAlg::Ps256).unwrap_err();
    assert!(
        error.contains("Entra ID accepts only RSA certificates"),
        "{error}"
    );
    // Other RFC 7523 servers may take ES256.
    let ec = SigningCertificate::load(&file("ec.pem", None), AssertionAlg::Es256).unwrap();
    let jwt = ec
        .assertion(
            AssertionAlg::Es256,
            "c",
            "https://idp/token",
            false,
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(jwt.rsplit('.').next().unwrap())
            .unwrap()
            .len(),
        64
    );
}

#[tokio::test]
async fn rotation_falls_back_to_the_next_certificate_and_stays_there() {
    // Only `a` is uploaded to the app registration.
    let entra = FakeEntra::spawn(vec![leaf("a.pem", None)]).await;
    let source = source_for(&entra, vec![file("b.pem", None), file("a.pem", None)]);
    source.fetch(Some(SCOPE)).await.unwrap();
    assert_eq!(entra.server.requests().len(), 2, "b refused, then a");
    source.fetch(Some(SCOPE)).await.unwrap();
    assert_eq!(entra.server.requests().len(), 3, "a is current now");

    // Nothing registered: every entry is refused and the error is the provider's.
    let none = FakeEntra::spawn(Vec::new()).await;
    let source = source_for(&none, vec![file("a.pem", None), file("b.pem", None)]);
    let error = source.fetch(Some(SCOPE)).await.unwrap_err();
    assert!(error.public_message().contains("AADSTS700027"), "{error}");
    assert_eq!(none.server.requests().len(), 2);
}

#[test]
fn config_loads_pfx_lists_cloud_and_reports_expiry() {
    let dir = fixture("");
    let yaml = format!(
        "credentials:\n  fo:\n    type: client_certificate\n    tenant_id: contoso.onmicrosoft.com\n    \
         client_id: {CLIENT_ID}\n    cloud: usgov\n    assertion_alg: RS256\n    \
         certificate_files:\n      - a.pem\n      - {{ file: b-legacy.pfx, password: \"${{PFX_PASS}}\" }}\n\
         clients:\n  c:\n    networks: [10.0.0.0/8]\nroutes:\n  - prefix: /fo/\n    \
         upstream: https://contoso.operations.dynamics.com/\n    credential: fo\n    clients: [c]\n"
    );
    let source = Source {
        name: "proxy.yaml".to_owned(),
        base_dir: dir,
        variables: crate::config::Variables::map(
            [("PFX_PASS".to_owned(), "test-pass".to_owned())].into(),
        ),
    };
    let config = Config::from_yaml_str(&yaml, &source).unwrap();
    let crate::config::CredentialKind::ClientCertificate(fo) = &config.credentials[0].kind else {
        panic!("not a certificate credential");
    };
    assert_eq!(
        fo.endpoint.url().to_string(),
        "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(fo.assertion_alg, AssertionAlg::Rs256);
    assert_eq!(fo.certificates.len(), 2);
    let expiries = crate::token::credential_expiries(&config);
    assert_eq!(expiries.len(), 2);
    assert_eq!(expiries[1].entry, "certificate_files[1]");
    assert!(expiries[0].expires > SystemTime::now() + Duration::from_secs(50 * 365 * 86_400));
    let far = SystemTime::now() + Duration::from_secs(200 * 365 * 86_400);
    assert_eq!(crate::token::warn_expiring(&expiries, far).len(), 2);
    assert!(crate::token::warn_expiring(&expiries, SystemTime::now()).is_empty());

    // A wrong password and an EC key are reported by `check`, with the entry's path.
    let bad = yaml
        .replace("${PFX_PASS}", "wrong")
        .replace("- a.pem", "- ec.pem");
    let problems = Config::from_yaml_str(&bad, &source)
        .unwrap_err()
        .problems()
        .into_iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("credentials.fo.certificate_files[0]: "));
    assert!(problems[0].contains("only RSA"));
    assert!(problems[1].starts_with("credentials.fo.certificate_files[1]: "));
    assert!(problems[1].contains("wrong certificate_password"));
}

/// A load reads and parses each certificate once, in the loader's second stage: neither
/// the token cache's source nor the expiry report reads the file again. Deleted after
/// loading, the file is not missed: the sources sign with the prepared certificate, also
/// after a reload (`reread_files` then `adopt_prepared`), where a source without it fails.
#[tokio::test]
async fn a_load_parses_each_certificate_once_and_sources_sign_from_it() {
    use crate::token::assertion::LOADS;
    let loads = || LOADS.with(std::cell::Cell::get);
    let entra = FakeEntra::spawn(vec![leaf("a.pem", None)]).await;
    let dir = crate::test_support::TempDir::new("once");
    let pem = dir.write(
        "fo.pem",
        &std::fs::read_to_string(fixture("a.pem")).unwrap(),
    );
    let yaml = format!(
        "credentials:\n  fo:\n    type: client_certificate\n    token_url: {}\n    \
         client_id: {CLIENT_ID}\n    certificate_file: fo.pem\n\
         clients:\n  c:\n    networks: [10.0.0.0/8]\nroutes:\n  - prefix: /fo/\n    \
         upstream: https://contoso.operations.dynamics.com/\n    credential: fo\n    \
         scope: {SCOPE}\n    clients: [c]\n",
        entra.url()
    );
    let source = Source {
        name: "proxy.yaml".to_owned(),
        base_dir: dir.path().to_owned(),
        variables: crate::config::Variables::map(Default::default()),
    };

    let before = loads();
    let config = Config::from_yaml_str(&yaml, &source).unwrap();
    assert_eq!(
        loads() - before,
        1,
        "the loader parses the certificate once"
    );
    std::fs::remove_file(&pem).unwrap();

    // Read from the file, the gone certificate would be left out of the report.
    let expiries = crate::token::credential_expiries(&config);
    assert_eq!(expiries.len(), 1, "{expiries:?}");
    assert_eq!(expiries[0].entry, "certificate_file");
    let cache = crate::token::TokenCache::new(&config, fake::tls());
    let token = cache.slot(&config.routes[0]).get().await.unwrap();
    assert_eq!(token.header(), "Bearer eyJ.cert-token.sig");

    // A reload keeps an unchanged source and hands it the newly prepared certificate.
    let crate::config::CredentialKind::ClientCertificate(settings) = &config.credentials[0].kind
    else {
        panic!("not a certificate credential");
    };
    let prepared = config.prepared.get::<PreparedCertificates>();
    let kept = ClientCertificateSource::new("fo", settings, fake::http(), prepared).unwrap();
    kept.reread_files();
    kept.adopt_prepared(prepared.unwrap());
    kept.fetch(Some(SCOPE)).await.unwrap();
    assert_eq!(
        loads() - before,
        1,
        "nothing after the loader parsed it again"
    );

    // Without the prepared certificate the file is read, and it is gone.
    let unprepared = ClientCertificateSource::new("fo", settings, fake::http(), None).unwrap();
    let error = unprepared.fetch(Some(SCOPE)).await.unwrap_err();
    assert!(error.to_string().contains("cannot read"), "{error}");
    assert_eq!(entra.seen().len(), 2);
}
