//! Wrappers for secret material: client secrets, passwords, API keys, access tokens.
//!
//! Every type here prints `****` in `Debug` and `Display` and wipes its bytes on drop, so a
//! secret cannot reach a log line, an error body or a panic message by accident. Comparing
//! inbound credentials happens on SHA-256 digests in constant time ([`SecretDigest`]).

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// A secret string (client secret, plain password before hashing).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The plain value. Call sites are the few places that must send it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn digest(&self) -> SecretDigest {
        SecretDigest::of(self.0.as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// SHA-256 of an inbound credential (password or API key). Only digests are kept in memory
/// for inbound secrets; comparison is constant-time.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretDigest([u8; 32]);

impl SecretDigest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Constant-time equality.
    pub fn matches(&self, other: &SecretDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// The `sha256:<hex>` form printed by `s2s-proxy hash-secret`.
    pub fn to_config_form(self) -> String {
        format!("sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretDigest(****)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("cs_CANARY_7f3a");
        assert!(!format!("{secret:?} {secret}").contains("CANARY"));
        let digest = secret.digest();
        assert!(!format!("{digest:?}").contains(&hex::encode(digest.0)));
    }

    #[test]
    fn digest_compares_by_value() {
        let a = Secret::new("one").digest();
        assert!(a.matches(&Secret::new("one").digest()));
        assert!(!a.matches(&Secret::new("two").digest()));
        assert_eq!(
            SecretDigest::of(b"test").to_config_form(),
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
