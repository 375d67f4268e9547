//! `secret_stores`: each store's URL, credential and refresh interval, and the rule that a
//! store's credential takes none of its own secrets from a store. The references
//! themselves (`${secret:STORE/NAME}`) are recorded by the secret fields (`fields`).

use http::uri::Scheme;

use super::parse::UrlUse;
use super::{Names, Validator};
use crate::config::raw::RawSecretStore;
use crate::config::{
    Credential, CredentialKind, DEFAULT_SECRET_REFRESH, SecretStore, SecretStores, is_loopback_host,
};

/// What a reference stands for before its value is read: unique per secret, so that two
/// clients whose keys come from different secrets are not taken for duplicates.
pub(super) fn placeholder(store: &str, name: &str) -> String {
    format!("secret-store-placeholder:{store}/{name}")
}

/// `STORE/NAME` of `${secret:STORE/NAME}`. Key Vault secret names are 1–127 letters, digits
/// and `-` (Microsoft Learn, "About Key Vault secrets").
pub(super) fn split_reference(reference: &str) -> Result<(&str, &str), String> {
    let malformed = || {
        format!(
            "`${{secret:{reference}}}` is not a valid reference; write \
             `${{secret:STORE/NAME}}` (a store under `secret_stores`, a secret name of \
             letters, digits and `-`)"
        )
    };
    let (store, name) = reference.split_once('/').ok_or_else(malformed)?;
    let store_ok = !store.is_empty()
        && store
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let name_ok = (1..=127).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if store_ok && name_ok {
        Ok((store, name))
    } else {
        Err(malformed())
    }
}

impl Validator<'_> {
    /// Validates `secret_stores` once every secret field has been read (so the references
    /// are known).
    pub(super) fn secret_stores(
        &mut self,
        raw: &[(String, RawSecretStore)],
        names: &Names<'_>,
        credentials: &[Credential],
    ) -> SecretStores {
        let mut stores = Vec::new();
        for (name, store) in raw {
            let at = format!("secret_stores.{name}");
            let named = self.name(&at, name, "secret store");
            let RawSecretStore::AzureKeyVault(vault) = store;
            let url = self
                .required(
                    &format!("{at}.url"),
                    vault.url.as_ref(),
                    "the vault's URL, e.g. https://contoso-kv.vault.azure.net",
                )
                .and_then(|text| self.vault_url(&format!("{at}.url"), text));
            let credential = self
                .required(
                    &format!("{at}.credential"),
                    vault.credential.as_ref(),
                    "a managed_identity, workload_identity or client_certificate credential",
                )
                .and_then(|c| self.store_credential(&at, c, names, credentials));
            let refresh = match &vault.refresh {
                Some(text) => self.duration(&format!("{at}.refresh"), text),
                None => Some(DEFAULT_SECRET_REFRESH),
            };
            let refresh = refresh.filter(|r| {
                let ok = r.as_secs() >= 1;
                if !ok {
                    self.problem(&format!("{at}.refresh"), "must be at least 1s");
                }
                ok
            });
            if let (true, Some(url), Some(credential), Some(refresh)) =
                (named, url, credential, refresh)
            {
                stores.push(SecretStore {
                    name: name.clone(),
                    url,
                    credential,
                    refresh,
                });
            }
        }
        stores.sort_by(|a, b| a.name.cmp(&b.name));
        SecretStores {
            stores,
            references: std::mem::take(&mut self.references),
            ..SecretStores::default()
        }
    }

    /// https, or http on a loopback host (tests); no path, query or fragment, and the
    /// checks every configured URL gets (`check_url`: no user info, a usable port, no
    /// link-local host): the proxy sends a token there.
    fn vault_url(&mut self, path: &str, text: &str) -> Option<String> {
        let value = self.non_empty(path, text)?;
        let trimmed = value.trim().trim_end_matches('/');
        // Plain http is refused below, with the vault's own reason.
        let url = self.checked_url(
            path,
            trimmed,
            UrlUse::Upstream {
                allow_plain_http: true,
            },
        )?;
        if url.scheme != Scheme::HTTPS && !is_loopback_host(&url.host) {
            self.problem(
                path,
                "must be https:// (plain http only on loopback hosts): the proxy sends a \
                 token to the vault",
            );
            return None;
        }
        if !matches!(url.uri.path(), "" | "/") {
            self.problem(
                path,
                "must be the vault's base URL without a path or query, e.g. \
                 https://contoso-kv.vault.azure.net",
            );
            return None;
        }
        Some(trimmed.to_owned())
    }

    /// The store's credential: defined, of a type that can read a vault, and taking none
    /// of its own secrets from a store (it is needed to read them).
    fn store_credential(
        &mut self,
        at: &str,
        name: &str,
        names: &Names<'_>,
        credentials: &[Credential],
    ) -> Option<String> {
        let path = format!("{at}.credential");
        if !names.credentials.contains(&name) {
            self.problem(
                &path,
                format!("credential `{name}` is not defined in `credentials`"),
            );
            return None;
        }
        // A credential that is itself invalid is reported on its own.
        let credential = credentials.iter().find(|c| c.name == name)?;
        match &credential.kind {
            CredentialKind::ManagedIdentity(_)
            | CredentialKind::WorkloadIdentity(_)
            | CredentialKind::ClientCertificate(_) => {}
            CredentialKind::ClientSecret(_) => {
                self.problem(
                    &path,
                    format!(
                        "credential `{name}` is a client_secret; a secret store is read with a \
                         managed_identity, workload_identity or client_certificate credential \
                         (a secret to read secrets would itself need storing)"
                    ),
                );
                return None;
            }
        }
        let own = format!("credentials.{name}.");
        if let Some(reference) = self.references.iter().find(|r| r.path.starts_with(&own)) {
            let field = reference.path.clone();
            self.problem(
                &path,
                format!(
                    "credential `{name}` takes `{field}` from a secret store, but it is the \
                     credential that reads the store; give it that value with ${{VAR}} or \
                     ${{file:PATH}}"
                ),
            );
            return None;
        }
        Some(name.to_owned())
    }
}
