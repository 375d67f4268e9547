//! Client certificates and the signed client assertion JWT (RFC 7523 §2.2, Entra
//! "certificate credentials" on Microsoft Learn).
//!
//! [`SigningCertificate::load`] reads a PEM file (certificate chain and an unencrypted
//! PKCS#8 / PKCS#1 key) or a PKCS#12 / .pfx file with its password, finds the certificate
//! that matches the key, and precomputes both thumbprints. [`SigningCertificate::assertion`]
//! signs a fresh JWT for one token request: `aud` = the token endpoint posted to, `iss` =
//! `sub` = client id, a random `jti`, `nbf` = `iat` = now, `exp` 10 minutes later.
//!
//! Entra ID identifies the key by thumbprint only: PS256 goes with `x5t#S256`, RS256 with
//! the SHA-1 `x5t`. Entra accepts RSA keys only; ES256 exists for other RFC 7523 servers.
//! Signing uses ring; key bytes never leave this module.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{AssertionAlg, CertificateFile};

/// The assertion's lifetime: short (Entra: 5–10 minutes), fresh for every request.
pub(crate) const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);
/// Largest certificate file read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

#[cfg(test)]
thread_local! {
    /// How many times [`SigningCertificate::load`] ran on this thread: tests prove that a
    /// load parses each certificate once.
    pub(crate) static LOADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

enum SigningKey {
    Rsa(RsaKeyPair),
    EcP256(EcdsaKeyPair),
}

/// A certificate with its private key, ready to sign assertions.
pub(crate) struct SigningCertificate {
    key: SigningKey,
    /// DER, the certificate matching the key first.
    chain: Vec<Vec<u8>>,
    /// base64url SHA-256 of the leaf's DER (`x5t#S256`).
    x5t_s256: String,
    /// base64url SHA-1 of the leaf's DER (`x5t`).
    x5t: String,
    not_after: SystemTime,
    subject: String,
}

impl fmt::Debug for SigningCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningCertificate")
            .field("subject", &self.subject)
            .field("x5t#S256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

impl SigningCertificate {
    /// Loads `file` and checks that its key can sign with `alg`. Messages name the file and
    /// say how to fix it; they never contain key material or the password.
    pub(crate) fn load(file: &CertificateFile, alg: AssertionAlg) -> Result<Self, String> {
        #[cfg(test)]
        LOADS.with(|loads| loads.set(loads.get() + 1));
        let shown = file.path.display();
        let bytes = match &file.content {
            // A Key Vault certificate's secret: PEM text, or a PKCS#12 file in base64
            // (its `contentType` `application/x-pkcs12`).
            Some(content) if content.expose().contains("-----BEGIN ") => {
                zeroize::Zeroizing::new(content.expose().as_bytes().to_vec())
            }
            Some(content) => zeroize::Zeroizing::new(
                STANDARD
                    .decode(content.expose().trim())
                    .map_err(|_| format!("{shown} is neither PEM nor a base64 PKCS#12 file"))?,
            ),
            None => zeroize::Zeroizing::new(
                read_bounded(&file.path).map_err(|e| format!("cannot read {shown}: {e}"))?,
            ),
        };
        let (key, certs) = if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            if file.password.is_some() {
                return Err(format!(
                    "{shown} is PEM; a password applies to PKCS#12 (.pfx) files only, and PEM \
                     keys must be unencrypted"
                ));
            }
            pem_parts(&bytes).map_err(|e| format!("{shown}: {e}"))?
        } else {
            let password = file.password.as_ref().map_or("", |p| p.expose());
            pkcs12_parts(&bytes, password).map_err(|e| format!("{shown}: {e}"))?
        };
        let key = signing_key(&key, alg).map_err(|e| format!("{shown}: {e}"))?;
        let public = match &key {
            SigningKey::Rsa(pair) => pair.public().as_ref().to_vec(),
            SigningKey::EcP256(pair) => pair.public_key().as_ref().to_vec(),
        };
        let mut leaf = None;
        for (index, der) in certs.iter().enumerate() {
            let (_, cert) = x509_parser::parse_x509_certificate(der)
                .map_err(|_| format!("{shown}: certificate {} is not valid X.509", index + 1))?;
            if cert.public_key().subject_public_key.data.as_ref() == public.as_slice() {
                let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
                leaf = Some((
                    index,
                    SystemTime::UNIX_EPOCH + Duration::from_secs(not_after),
                    cert.subject().to_string(),
                ));
                break;
            }
        }
        let Some((index, not_after, subject)) = leaf else {
            return Err(format!(
                "{shown}: no certificate in the file matches the private key; put the \
                 certificate uploaded to the app registration next to its key"
            ));
        };
        let mut chain = certs;
        let leaf_der = chain.remove(index);
        chain.insert(0, leaf_der);
        let x5t_s256 =
            URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &chain[0]));
        let x5t = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            &chain[0],
        ));
        Ok(Self {
            key,
            chain,
            x5t_s256,
            x5t,
            not_after,
            subject,
        })
    }

    pub(crate) fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf certificate's DER.
    #[cfg(test)]
    pub(crate) fn leaf_der(&self) -> &[u8] {
        &self.chain[0]
    }

    /// A signed assertion for one token request to `audience` (the token endpoint URL).
    pub(crate) fn assertion(
        &self,
        alg: AssertionAlg,
        client_id: &str,
        audience: &str,
        send_chain: bool,
        now: SystemTime,
    ) -> Result<String, String> {
        let rng = SystemRandom::new();
        let mut header = serde_json::Map::new();
        header.insert("alg".to_owned(), alg.name().into());
        header.insert("typ".to_owned(), "JWT".into());
        match alg {
            AssertionAlg::Rs256 => header.insert("x5t".to_owned(), self.x5t.clone().into()),
            AssertionAlg::Ps256 | AssertionAlg::Es256 => {
                header.insert("x5t#S256".to_owned(), self.x5t_s256.clone().into())
            }
        };
        if send_chain {
            let chain: Vec<serde_json::Value> = self
                .chain
                .iter()
                .map(|der| STANDARD.encode(der).into())
                .collect();
            header.insert("x5c".to_owned(), chain.into());
        }
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| "the system clock is before 1970".to_owned())?
            .as_secs();
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid_v4(&rng)?,
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::Value::Object(header).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = match (&self.key, alg) {
            (SigningKey::Rsa(pair), AssertionAlg::Ps256 | AssertionAlg::Rs256) => {
                let padding: &'static dyn signature::RsaEncoding = match alg {
                    AssertionAlg::Rs256 => &signature::RSA_PKCS1_SHA256,
                    AssertionAlg::Ps256 | AssertionAlg::Es256 => &signature::RSA_PSS_SHA256,
                };
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(padding, &rng, signing_input.as_bytes(), &mut out)
                    .map_err(|_| "signing the client assertion failed".to_owned())?;
                out
            }
            (SigningKey::EcP256(pair), AssertionAlg::Es256) => pair
                .sign(&rng, signing_input.as_bytes())
                .map_err(|_| "signing the client assertion failed".to_owned())?
                .as_ref()
                .to_vec(),
            _ => return Err(format!("the key cannot sign {}", alg.name())),
        };
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other("larger than 1 MiB"));
    }
    Ok(bytes)
}

/// The key and the certificates of a PEM file.
fn pem_parts(bytes: &[u8]) -> Result<(PrivateKeyDer<'static>, Vec<Vec<u8>>), String> {
    if bytes
        .windows(27)
        .any(|w| w == b"BEGIN ENCRYPTED PRIVATE KEY")
    {
        return Err(
            "the private key is encrypted; decrypt it (`openssl pkcs8 -topk8 -nocrypt`) \
                    or use a PKCS#12 (.pfx) file with `certificate_password`"
                .to_owned(),
        );
    }
    let certs = CertificateDer::pem_slice_iter(bytes)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "a CERTIFICATE block is malformed (not valid PEM)".to_owned())?;
    if certs.is_empty() {
        return Err(
            "no CERTIFICATE block; the file needs the certificate and its private key".to_owned(),
        );
    }
    let key = PrivateKeyDer::from_pem_slice(bytes).map_err(|_| {
        "no PRIVATE KEY block; the file needs the certificate and its private key (PKCS#8 \
         `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`)"
            .to_owned()
    })?;
    Ok((key, certs))
}

/// The key and the certificates of a PKCS#12 archive.
fn pkcs12_parts(
    bytes: &[u8],
    password: &str,
) -> Result<(PrivateKeyDer<'static>, Vec<Vec<u8>>), String> {
    use p12_keystore::{KeyStore, KeyStoreEntry, Pkcs12ImportPolicy};
    let store =
        KeyStore::from_pkcs12(bytes, password, Pkcs12ImportPolicy::Relaxed).map_err(|error| {
            match error {
                p12_keystore::error::Error::MacError(_) => {
                    "wrong certificate_password for this PKCS#12 (.pfx) file".to_owned()
                }
                p12_keystore::error::Error::UnsupportedEncryptionScheme => {
                    "the PKCS#12 file uses an unsupported encryption scheme; re-export it with \
                 AES-256 (`openssl pkcs12 -export …`, the OpenSSL 3 default)"
                        .to_owned()
                }
                other => format!("neither PEM nor a readable PKCS#12 (.pfx) file ({other})"),
            }
        })?;
    let Some((_, chain)) = store.private_key_chain() else {
        return Err("the PKCS#12 file holds no private key; export it with the key".to_owned());
    };
    let mut certs: Vec<Vec<u8>> = chain.certs().iter().map(|c| c.as_der().to_vec()).collect();
    // Some exports keep the certificates apart from the key's chain.
    for (_, entry) in store.entries() {
        if let KeyStoreEntry::Certificate(cert) = entry
            && !certs.iter().any(|c| c == cert.as_der())
        {
            certs.push(cert.as_der().to_vec());
        }
    }
    let key = PrivateKeyDer::Pkcs8(chain.key().as_der().to_vec().into());
    Ok((key, certs))
}

fn signing_key(key: &PrivateKeyDer<'_>, alg: AssertionAlg) -> Result<SigningKey, String> {
    let rsa_needed = "the private key is not RSA; Entra ID accepts only RSA certificates for \
                      client assertions (PS256/RS256): create one with an RSA key, e.g. \
                      `openssl req -x509 -newkey rsa:2048 …`";
    let parsed = match key {
        PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der())
            .map(SigningKey::Rsa)
            .map_err(|e| format!("the RSA key is not usable: {e}")),
        PrivateKeyDer::Pkcs8(der) => match RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()) {
            Ok(pair) => Ok(SigningKey::Rsa(pair)),
            Err(rsa_error) => EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                der.secret_pkcs8_der(),
                &SystemRandom::new(),
            )
            .map(SigningKey::EcP256)
            .map_err(|_| {
                format!("the key is neither a usable RSA key ({rsa_error}) nor an EC P-256 key")
            }),
        },
        PrivateKeyDer::Sec1(_) => {
            return Err(match alg {
                AssertionAlg::Es256 => "the EC key is in SEC1 form; convert it to PKCS#8 \
                                        (`openssl pkcs8 -topk8 -nocrypt`)"
                    .to_owned(),
                AssertionAlg::Ps256 | AssertionAlg::Rs256 => rsa_needed.to_owned(),
            });
        }
        _ => Err("unsupported private key format".to_owned()),
    }?;
    match (&parsed, alg) {
        (SigningKey::Rsa(_), AssertionAlg::Ps256 | AssertionAlg::Rs256)
        | (SigningKey::EcP256(_), AssertionAlg::Es256) => Ok(parsed),
        (SigningKey::EcP256(_), _) => Err(rsa_needed.to_owned()),
        (SigningKey::Rsa(_), AssertionAlg::Es256) => Err(
            "assertion_alg ES256 needs an EC P-256 key; this key is RSA (use PS256 or RS256)"
                .to_owned(),
        ),
    }
}

/// A random (version 4) UUID for `jti`.
fn uuid_v4(rng: &SystemRandom) -> Result<String, String> {
    let mut b = [0u8; 16];
    rng.fill(&mut b)
        .map_err(|_| "the system random generator failed".to_owned())?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}
