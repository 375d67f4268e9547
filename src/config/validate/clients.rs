//! One entry of `clients:` (API key, Basic, certificate match), and the rule that no two
//! clients share a key.

use super::Validator;
use super::parse::parse_fingerprint;
use crate::config::raw::{RawBasic, RawCertificateMatch, RawClient};
use crate::config::{BasicCredential, CertificateMatch, Client};

impl Validator<'_> {
    pub(super) fn client(
        &mut self,
        name: &str,
        raw: &RawClient,
        client_ca: bool,
    ) -> Option<Client> {
        let at = format!("clients.{name}");
        let mut ok = self.name(&at, name, "client");

        let basic = raw.basic.as_ref().and_then(|basic| {
            let checked = self.basic(&at, basic);
            ok &= checked.is_some();
            checked
        });
        let api_key = raw.api_key.as_ref().and_then(|text| {
            let digest = self.inbound_secret(&format!("{at}.api_key"), text, true);
            ok &= digest.is_some();
            digest
        });
        let networks = self.networks(&format!("{at}.networks"), raw.networks.as_ref());
        let rate_limit = raw.rate_limit.as_ref().and_then(|text| {
            let limit = self.rate_limit(&format!("{at}.rate_limit"), text);
            ok &= limit.is_some();
            limit
        });
        let certificate = raw.certificate.as_ref().and_then(|certificate| {
            let checked = self.certificate_match(&at, certificate, client_ca);
            ok &= checked.is_some();
            checked
        });

        let has_credential = raw.basic.is_some()
            || raw.api_key.is_some()
            || raw.networks.as_ref().is_some_and(|n| !n.is_empty())
            || raw.certificate.is_some();
        if !has_credential {
            self.problem(
                &at,
                "needs at least one of `basic`, `api_key`, `networks` or `certificate` to \
                 say how it is recognised",
            );
            ok = false;
        }
        ok.then(|| Client {
            name: name.to_owned(),
            basic,
            api_key,
            networks,
            rate_limit,
            certificate,
        })
    }

    pub(super) fn basic(&mut self, at: &str, raw: &RawBasic) -> Option<BasicCredential> {
        let path = format!("{at}.basic.username");
        let username = self
            .required(
                &path,
                raw.username.as_ref(),
                "the user name the client sends",
            )
            .and_then(|text| self.string(&path, text))
            .and_then(|username| {
                if username.is_empty() {
                    self.problem(&path, "must not be empty");
                    None
                } else if username.contains(':') {
                    // RFC 7617 §2: the user-id cannot contain a colon.
                    self.problem(&path, "must not contain `:` (Basic auth splits on it)");
                    None
                } else if username.chars().any(char::is_control) {
                    self.problem(&path, "must not contain control characters");
                    None
                } else {
                    Some(username)
                }
            });
        let path = format!("{at}.basic.password");
        let password = self
            .required(
                &path,
                raw.password.as_ref(),
                "a `sha256:` hash from `s2s-proxy hash-secret`, or ${VAR}",
            )
            .and_then(|text| self.inbound_secret(&path, text, false));
        Some(BasicCredential {
            username: username?,
            password: password?,
        })
    }

    pub(super) fn certificate_match(
        &mut self,
        at: &str,
        raw: &RawCertificateMatch,
        client_ca: bool,
    ) -> Option<CertificateMatch> {
        let path = format!("{at}.certificate");
        if !client_ca {
            self.problem(
                &path,
                "needs server.tls.client_ca_file to verify client certificates; set \
                 server.tls.client_ca_file or remove this certificate",
            );
        }
        let given = [
            raw.subject_cn.is_some(),
            raw.san_dns.is_some(),
            raw.fingerprint_sha256.is_some(),
        ];
        let matched = if given.iter().filter(|g| **g).count() != 1 {
            self.problem(
                &path,
                "needs exactly one of `subject_cn`, `san_dns` or `fingerprint_sha256`",
            );
            None
        } else if let Some(cn) = &raw.subject_cn {
            let path = format!("{path}.subject_cn");
            self.non_empty(&path, cn).map(CertificateMatch::SubjectCn)
        } else if let Some(name) = &raw.san_dns {
            let path = format!("{path}.san_dns");
            self.non_empty(&path, name)
                .map(|name| CertificateMatch::SanDns(name.to_ascii_lowercase()))
        } else if let Some(fingerprint) = &raw.fingerprint_sha256 {
            let path = format!("{path}.fingerprint_sha256");
            let text = self.string(&path, fingerprint)?;
            match parse_fingerprint(&text) {
                Some(bytes) => Some(CertificateMatch::FingerprintSha256(bytes)),
                None => {
                    self.problem(
                        &path,
                        "expected 64 hex digits (colons allowed), as printed by \
                         `openssl x509 -noout -fingerprint -sha256`",
                    );
                    None
                }
            }
        } else {
            None
        };
        if client_ca { matched } else { None }
    }

    pub(super) fn unique_client_secrets(&mut self, clients: &[Client]) {
        for (index, client) in clients.iter().enumerate() {
            let earlier = &clients[..index];
            if let Some(basic) = &client.basic {
                let first = earlier.iter().find(|other| {
                    other
                        .basic
                        .as_ref()
                        .is_some_and(|b| b.username == basic.username)
                });
                if let Some(first) = first {
                    self.problem(
                        &format!("clients.{}.basic.username", client.name),
                        format!(
                            "`{}` is also the username of clients.{}; usernames must be unique",
                            basic.username, first.name
                        ),
                    );
                }
            }
            if let Some(certificate) = &client.certificate {
                let first = earlier
                    .iter()
                    .find(|other| other.certificate.as_ref() == Some(certificate));
                if let Some(first) = first {
                    self.problem(
                        &format!("clients.{}.certificate", client.name),
                        format!(
                            "matches the same certificates as clients.{}.certificate; give \
                             each client its own",
                            first.name
                        ),
                    );
                }
            }
            if let Some(key) = &client.api_key {
                let first = earlier
                    .iter()
                    .find(|other| other.api_key.as_ref().is_some_and(|k| k.matches(key)));
                if let Some(first) = first {
                    self.problem(
                        &format!("clients.{}.api_key", client.name),
                        format!(
                            "is the same key as clients.{}.api_key; give each client its own key",
                            first.name
                        ),
                    );
                }
            }
        }
    }
}
