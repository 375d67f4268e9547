//! The material of a credential: client-secret rotation lists (with their dates) and
//! client-certificate files.

use super::Validator;
use crate::civil_date::parse_date;
use crate::config::raw::{RawClientCertificate, RawClientSecret, StringOr};
use crate::config::{AssertionAlg, CertificateFile, ClientCertificate, ConfiguredSecret};
use std::time::SystemTime;

impl Validator<'_> {
    /// `client_secret` (with `expires`) or the `client_secrets` list, not both.
    pub(super) fn client_secrets(
        &mut self,
        at: &str,
        raw: &RawClientSecret,
    ) -> Option<Vec<ConfiguredSecret>> {
        match (&raw.client_secret, &raw.client_secrets) {
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{at}.client_secrets"),
                    format!(
                        "set either {at}.client_secret or {at}.client_secrets (rotation), not \
                         both"
                    ),
                );
                None
            }
            (None, None) => {
                self.problem(
                    &format!("{at}.client_secret"),
                    "is required: the app's secret, e.g. ${BC_CLIENT_SECRET} (or \
                     `client_secrets: [...]` to rotate)",
                );
                None
            }
            (Some(text), None) => {
                let path = format!("{at}.client_secret");
                let secret = self.configured_secret(&path, text);
                let expires = raw
                    .expires
                    .as_ref()
                    .map(|e| self.date(&format!("{at}.expires"), e));
                let expires = match expires {
                    Some(date) => Some(date?),
                    None => None,
                };
                let secret = secret?;
                // An `expires:` date wins over the vault's `exp` attribute.
                let expires = expires.or(secret.expires);
                Some(vec![ConfiguredSecret { expires, ..secret }])
            }
            (None, Some(list)) => {
                if raw.expires.is_some() {
                    self.problem(
                        &format!("{at}.expires"),
                        format!(
                            "applies to {at}.client_secret; with {at}.client_secrets write \
                             `{{ value: ..., expires: ... }}` entries"
                        ),
                    );
                }
                self.rotation_list(
                    &format!("{at}.client_secrets"),
                    list,
                    "secret",
                    |this, path, entry| match entry {
                        StringOr::String(text) => this.configured_secret(path, text),
                        StringOr::Map(entry) => {
                            let value = this
                                .required(
                                    &format!("{path}.value"),
                                    entry.value.as_ref(),
                                    "the secret, e.g. ${BC_SECRET_NEW}",
                                )
                                .and_then(|t| this.configured_secret(&format!("{path}.value"), t));
                            let expires = match &entry.expires {
                                Some(e) => this.date(&format!("{path}.expires"), e).map(Some),
                                None => Some(None),
                            };
                            value.zip(expires).map(|(value, expires)| ConfiguredSecret {
                                expires: expires.or(value.expires),
                                ..value
                            })
                        }
                    },
                )
            }
        }
    }

    /// The entries of a rotation list (`client_secrets`, `certificate_files`) at
    /// `list_path`, each checked by `entry` at `list_path[i]` so that every bad entry is
    /// reported; `None` when the list is empty or any entry is bad.
    pub(super) fn rotation_list<E, T>(
        &mut self,
        list_path: &str,
        list: &[StringOr<E>],
        what: &str,
        mut entry: impl FnMut(&mut Self, &str, &StringOr<E>) -> Option<T>,
    ) -> Option<Vec<T>> {
        if list.is_empty() {
            self.problem(list_path, format!("is empty; list at least one {what}"));
            return None;
        }
        let mut valid = Some(Vec::with_capacity(list.len()));
        for (index, item) in list.iter().enumerate() {
            match (
                entry(self, &format!("{list_path}[{index}]"), item),
                &mut valid,
            ) {
                (Some(value), Some(values)) => values.push(value),
                _ => valid = None,
            }
        }
        valid
    }

    /// A secret, remembering its file when written wholly as `${file:PATH}`; one written
    /// wholly as `${secret:STORE/NAME}` takes the stored secret's `exp` as its expiry.
    pub(super) fn configured_secret(&mut self, path: &str, text: &str) -> Option<ConfiguredSecret> {
        let value = self.secret(path, text)?;
        let expires = text
            .strip_prefix("${secret:")
            .and_then(|t| t.strip_suffix('}'))
            .and_then(|t| t.split_once('/'))
            .and_then(|(store, name)| self.values?.get(store, name))
            .and_then(|stored| stored.expires);
        let file = text
            .strip_prefix("${file:")
            .and_then(|t| t.strip_suffix('}'))
            .filter(|t| !t.contains('}'))
            .map(|file| self.source.base_dir.join(file));
        Some(ConfiguredSecret {
            value,
            file,
            expires,
        })
    }

    /// A certificate file, or wholly `${secret:STORE/NAME}`: a Key Vault certificate's
    /// secret (PEM, or PKCS#12 in base64), whose contents stand in for the file.
    fn certificate_source(
        &mut self,
        path: &str,
        text: &str,
    ) -> Option<(std::path::PathBuf, Option<crate::secret::Secret>)> {
        let reference = text
            .strip_prefix("${secret:")
            .and_then(|t| t.strip_suffix('}'))
            .filter(|t| !t.contains('}'));
        match reference {
            Some(reference) => {
                let content = self.secret(path, text)?;
                Some((
                    std::path::PathBuf::from(format!("{reference} (secret store)")),
                    Some(content),
                ))
            }
            None => self.existing_file(path, text).map(|file| (file, None)),
        }
    }

    /// A calendar date `YYYY-MM-DD`, as the start of that day in UTC.
    pub(super) fn date(&mut self, path: &str, text: &str) -> Option<SystemTime> {
        let value = self.string(path, text)?;
        match parse_date(value.trim()) {
            Some(time) => Some(time),
            None => {
                self.problem(path, "expected a date such as 2026-09-30 (YYYY-MM-DD)");
                None
            }
        }
    }

    pub(super) fn client_certificate(
        &mut self,
        at: &str,
        raw: &RawClientCertificate,
    ) -> Option<ClientCertificate> {
        let endpoint = self.token_endpoint(
            at,
            raw.tenant_id.as_ref(),
            raw.token_url.as_ref(),
            raw.authority.as_ref(),
            raw.cloud.as_ref(),
        );
        let client_id = self.client_id(at, raw.client_id.as_ref());
        let assertion_alg = match &raw.assertion_alg {
            None => Some(AssertionAlg::Ps256),
            Some(text) => {
                let path = format!("{at}.assertion_alg");
                match self.string(&path, text)?.as_str() {
                    "PS256" => Some(AssertionAlg::Ps256),
                    "RS256" => Some(AssertionAlg::Rs256),
                    "ES256" if raw.tenant_id.is_some() => {
                        self.problem(
                            &path,
                            "Entra ID accepts only RSA certificates (PS256 or RS256); ES256 is \
                             for other servers (`token_url`)",
                        );
                        None
                    }
                    "ES256" => Some(AssertionAlg::Es256),
                    other => {
                        self.problem(
                            &path,
                            format!(
                                "unknown algorithm `{other}`; use `PS256` (default, sends \
                                 x5t#S256) or `RS256` (sends x5t)"
                            ),
                        );
                        None
                    }
                }
            }
        };
        let certificates = self.certificate_files(at, raw);
        let (endpoint, client_id, assertion_alg, certificates) =
            (endpoint?, client_id?, assertion_alg?, certificates?);
        // Their content is read by the preflight (`crate::preflight`).
        Some(ClientCertificate {
            endpoint,
            client_id,
            certificates,
            assertion_alg,
            send_certificate_chain: raw.send_certificate_chain.unwrap_or(false),
        })
    }

    /// `certificate_file` (+ `certificate_password`) or the `certificate_files` list.
    pub(super) fn certificate_files(
        &mut self,
        at: &str,
        raw: &RawClientCertificate,
    ) -> Option<Vec<CertificateFile>> {
        match (&raw.certificate_file, &raw.certificate_files) {
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{at}.certificate_files"),
                    format!(
                        "set either {at}.certificate_file or {at}.certificate_files \
                         (rotation), not both"
                    ),
                );
                None
            }
            (None, None) => {
                self.problem(
                    &format!("{at}.certificate_file"),
                    "is required: a PEM file with the certificate and its private key, or a \
                     PKCS#12 (.pfx) file with `certificate_password`",
                );
                None
            }
            (Some(file), None) => {
                let file = self.certificate_source(&format!("{at}.certificate_file"), file);
                let password = match &raw.certificate_password {
                    Some(text) => Some(self.secret(&format!("{at}.certificate_password"), text)?),
                    None => None,
                };
                let (path, content) = file?;
                Some(vec![CertificateFile {
                    path,
                    password,
                    content,
                }])
            }
            (None, Some(list)) => {
                if raw.certificate_password.is_some() {
                    self.problem(
                        &format!("{at}.certificate_password"),
                        format!(
                            "applies to {at}.certificate_file; with {at}.certificate_files \
                             write `{{ file: ..., password: ... }}` entries"
                        ),
                    );
                }
                self.rotation_list(
                    &format!("{at}.certificate_files"),
                    list,
                    "certificate file",
                    |this, path, entry| match entry {
                        StringOr::String(text) => {
                            this.certificate_source(path, text).map(|(path, content)| {
                                CertificateFile {
                                    path,
                                    password: None,
                                    content,
                                }
                            })
                        }
                        StringOr::Map(entry) => {
                            let file = this
                                .required(
                                    &format!("{path}.file"),
                                    entry.file.as_ref(),
                                    "a PEM or PKCS#12 (.pfx) file",
                                )
                                .and_then(|t| this.certificate_source(&format!("{path}.file"), t));
                            let password = match &entry.password {
                                Some(t) => this.secret(&format!("{path}.password"), t).map(Some),
                                None => Some(None),
                            };
                            file.zip(password)
                                .map(|((path, content), password)| CertificateFile {
                                    path,
                                    password,
                                    content,
                                })
                        }
                    },
                )
            }
        }
    }
}
