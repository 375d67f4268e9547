//! When configured secrets and certificates expire: a certificate's `notAfter`, a secret's
//! `expires:` date. [`credential_expiries`] reads them once per configuration generation
//! (start-up, reload), for the metric and reports, from the certificates the loader
//! already parsed; [`warn_expiring`] logs those due within
//! [`EXPIRY_WARNING`] then.

use std::time::{Duration, SystemTime};

use crate::config::{Config, CredentialKind};

/// How far ahead an expiry is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// One secret or certificate with a known expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialExpiry {
    /// The credential's name.
    pub credential: String,
    /// Which entry: `client_secret`, `client_secrets[1]`, `certificate_file`,
    /// `certificate_files[0]`. Never a value.
    pub entry: String,
    pub expires: SystemTime,
}

/// Every known expiry, in configuration order. Certificates that cannot be read are left
/// out (token requests report them).
pub fn credential_expiries(config: &Config) -> Vec<CredentialExpiry> {
    let mut out = Vec::new();
    for credential in &config.credentials {
        let mut push = |entry: String, expires: SystemTime| {
            out.push(CredentialExpiry {
                credential: credential.name.clone(),
                entry,
                expires,
            });
        };
        match &credential.kind {
            CredentialKind::ClientSecret(settings) => {
                let single = settings.client_secrets.len() == 1;
                for (index, secret) in settings.client_secrets.iter().enumerate() {
                    if let Some(expires) = secret.expires {
                        let entry = if single {
                            "client_secret".to_owned()
                        } else {
                            format!("client_secrets[{index}]")
                        };
                        push(entry, expires);
                    }
                }
            }
            CredentialKind::ClientCertificate(settings) => {
                let single = settings.certificates.len() == 1;
                for index in 0..settings.certificates.len() {
                    // Parsed by the loader's second stage; read here only when it did not.
                    if let Ok(certificate) = super::client_certificate::prepared_or_load(
                        config.prepared.get(),
                        &credential.name,
                        settings,
                        index,
                    ) {
                        let entry = if single {
                            "certificate_file".to_owned()
                        } else {
                            format!("certificate_files[{index}]")
                        };
                        push(entry, certificate.not_after());
                    }
                }
            }
            CredentialKind::ManagedIdentity(_) | CredentialKind::WorkloadIdentity(_) => {}
        }
    }
    out
}

/// Logs a warning for each of `expiries` within [`EXPIRY_WARNING`] of `now` (or past), and
/// returns them.
pub fn warn_expiring(expiries: &[CredentialExpiry], now: SystemTime) -> Vec<CredentialExpiry> {
    let due: Vec<CredentialExpiry> = expiries
        .iter()
        .filter(|e| e.expires <= now + EXPIRY_WARNING)
        .cloned()
        .collect();
    for expiry in &due {
        let expires = crate::civil_date::utc_at(expiry.expires);
        match expiry.expires.duration_since(now) {
            Ok(left) => tracing::warn!(
                credential = %expiry.credential,
                entry = %expiry.entry,
                expires = %expires,
                days_left = left.as_secs() / 86_400,
                "Credential expires soon; add the new one (rotation) and upload it to the app registration."
            ),
            Err(_) => tracing::warn!(
                credential = %expiry.credential,
                entry = %expiry.entry,
                expires = %expires,
                "Credential has expired; token requests with it will fail."
            ),
        }
    }
    due
}
