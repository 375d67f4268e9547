//! `client_secret`: the OAuth 2.0 client-credentials grant with a shared secret (RFC 6749
//! §4.4), against Entra ID or any RFC 6749 token endpoint.
//!
//! The form is `grant_type=client_credentials`, the client authentication, `scope` when the
//! route has one, then the configured `params` in file order. Authentication is either
//! `client_id` + `client_secret` in the body (`client_secret_post`, Entra's documented
//! way) or `Authorization: Basic` over the form-urlencoded id and secret
//! (`client_secret_basic`, RFC 6749 §2.3.1). Entra secrets contain `~`, so everything is
//! properly form-encoded.

use std::sync::{Mutex, PoisonError};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;

use super::rotation::{self, Rotation};
use super::{IssuedToken, TokenError, TokenFuture, TokenHttp, TokenSource};
use crate::config::{ClientAuthMethod, ClientSecret, ConfiguredSecret};
use crate::secret::Secret;

pub(crate) struct ClientSecretSource {
    credential: String,
    url: reqwest::Url,
    client_id: String,
    /// The configured secrets (rotation order) and their current values: a `${file:…}`
    /// secret is read again after `invalid_client` and by [`TokenSource::reread_files`].
    secrets: Vec<(ConfiguredSecret, Mutex<Secret>)>,
    rotation: Rotation,
    auth_method: ClientAuthMethod,
    params: Vec<(String, String)>,
    http: Result<TokenHttp, TokenError>,
}

impl std::fmt::Debug for ClientSecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecretSource")
            .field("credential", &self.credential)
            .field("client_id", &self.client_id)
            .field("secrets", &self.secrets.len())
            .field("auth_method", &self.auth_method)
            .finish_non_exhaustive()
    }
}

impl ClientSecretSource {
    pub(crate) fn new(
        credential: &str,
        settings: &ClientSecret,
        http: Result<TokenHttp, TokenError>,
    ) -> Result<Self, TokenError> {
        let url = super::endpoint_url(credential, settings.endpoint.url())?;
        // Config validation refuses `params` that would replace the grant's own fields.
        let params = settings.params.clone();
        Ok(Self {
            credential: credential.to_owned(),
            url,
            client_id: settings.client_id.clone(),
            secrets: settings
                .client_secrets
                .iter()
                .map(|s| (s.clone(), Mutex::new(s.value.clone())))
                .collect(),
            rotation: Rotation::new(settings.client_secrets.len()),
            auth_method: settings.auth_method,
            params,
            http,
        })
    }

    fn secret(&self, index: usize) -> Secret {
        self.secrets[index]
            .1
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads secret `index` again if it came from a file; whether its value changed.
    fn reread(&self, index: usize) -> bool {
        let (configured, current) = &self.secrets[index];
        let Some(file) = &configured.file else {
            return false;
        };
        match ConfiguredSecret::reread(file) {
            Ok(value) if !value.expose().trim().is_empty() => {
                let mut current = current.lock().unwrap_or_else(PoisonError::into_inner);
                let changed = *current != value;
                if changed {
                    tracing::info!(credential = %self.credential, entry = index, "Read a changed client secret from its file.");
                    *current = value;
                }
                changed
            }
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(credential = %self.credential, entry = index, error = %error, "Cannot read the client secret file again.");
                false
            }
        }
    }

    /// One secret: a refused `${file:…}` secret is read again and, if it changed, retried.
    async fn with_secret(
        &self,
        index: usize,
        scope: Option<&str>,
    ) -> Result<IssuedToken, TokenError> {
        match self.send(&self.secret(index), scope).await {
            Err(error) if rotation::is_invalid_client(&error) && self.reread(index) => {
                self.send(&self.secret(index), scope).await
            }
            other => other,
        }
    }

    async fn request(&self, scope: Option<&str>) -> Result<IssuedToken, TokenError> {
        rotation::try_in_turn(
            &self.rotation,
            &self.credential,
            "client_secrets",
            |index| self.with_secret(index, scope),
        )
        .await
    }

    async fn send(&self, secret: &Secret, scope: Option<&str>) -> Result<IssuedToken, TokenError> {
        let http = self.http.as_ref().map_err(Clone::clone)?;
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        let mut authorization = None;
        match self.auth_method {
            ClientAuthMethod::Basic => {
                let pair = format!(
                    "{}:{}",
                    form_encode(&self.client_id),
                    form_encode(secret.expose())
                );
                let mut value = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(pair)))
                    .map_err(|_| {
                        TokenError::config(
                            &self.credential,
                            "cannot build the Basic authorization header",
                        )
                    })?;
                value.set_sensitive(true);
                authorization = Some(value);
            }
            ClientAuthMethod::Post => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", secret.expose()));
            }
        }
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        form.extend(self.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        http.post_form(&self.url, &form, authorization, secret.expose())
            .await
    }
}

impl TokenSource for ClientSecretSource {
    fn fetch<'a>(&'a self, scope: Option<&'a str>) -> TokenFuture<'a> {
        Box::pin(self.request(scope))
    }

    fn reread_files(&self) {
        for index in 0..self.secrets.len() {
            self.reread(index);
        }
    }
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 Appendix B), as
/// `client_secret_basic` requires before base64.
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(byte as char);
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests;
