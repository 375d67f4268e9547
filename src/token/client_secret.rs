//! `client_secret`: the OAuth 2.0 client-credentials grant with a shared secret (RFC 6749
//! §4.4), against Entra ID or any RFC 6749 token endpoint.
//!
//! The form is `grant_type=client_credentials`, the client authentication, `scope` when the
//! route has one, then the configured `params` in file order. Authentication is either
//! `client_id` + `client_secret` in the body (`client_secret_post`, Entra's documented
//! way) or `Authorization: Basic` over the form-urlencoded id and secret
//! (`client_secret_basic`, RFC 6749 §2.3.1). Entra secrets contain `~`, so everything is
//! properly form-encoded.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;

use super::{IssuedToken, TokenError, TokenHttp, TokenSource};
use crate::config::{ClientAuthMethod, ClientSecret};
use crate::secret::Secret;

/// Form fields the grant itself sets; a `params` entry may not replace them.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "client_assertion",
    "client_assertion_type",
];

pub(crate) struct ClientSecretSource {
    credential: String,
    url: reqwest::Url,
    client_id: String,
    client_secret: Secret,
    /// `Basic …`, built once and marked sensitive; `None` for `client_secret_post`.
    basic: Option<HeaderValue>,
    params: Vec<(String, String)>,
    http: Result<TokenHttp, TokenError>,
}

impl std::fmt::Debug for ClientSecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecretSource")
            .field("credential", &self.credential)
            .field("client_id", &self.client_id)
            .field("basic", &self.basic.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientSecretSource {
    pub(crate) fn new(
        credential: &str,
        settings: &ClientSecret,
        http: Result<TokenHttp, TokenError>,
    ) -> Result<Self, TokenError> {
        let config_error =
            |what: &str| TokenError::Config(format!("credential `{credential}`: {what}"));
        let url = reqwest::Url::parse(&settings.endpoint.url().to_string())
            .map_err(|_| config_error("the token endpoint is not a valid URL"))?;
        let loopback = match url.host_str() {
            Some(host) if host.eq_ignore_ascii_case("localhost") => true,
            Some(host) => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
            None => false,
        };
        if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
            return Err(config_error(
                "the token endpoint must be https:// (plain http only on loopback)",
            ));
        }
        let basic = match settings.auth_method {
            ClientAuthMethod::Post => None,
            ClientAuthMethod::Basic => {
                let pair = format!(
                    "{}:{}",
                    form_encode(&settings.client_id),
                    form_encode(settings.client_secret.expose())
                );
                let mut value = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(pair)))
                    .map_err(|_| config_error("cannot build the Basic authorization header"))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let params = settings
            .params
            .iter()
            .filter(|(name, _)| {
                let reserved = RESERVED_PARAMS.contains(&name.as_str());
                if reserved {
                    tracing::warn!(credential = %credential, param = %name, "Ignoring a token parameter the grant sets itself.");
                }
                !reserved
            })
            .cloned()
            .collect();
        Ok(Self {
            credential: credential.to_owned(),
            url,
            client_id: settings.client_id.clone(),
            client_secret: settings.client_secret.clone(),
            basic,
            params,
            http,
        })
    }

    async fn request(&self, scope: Option<&str>) -> Result<IssuedToken, TokenError> {
        let http = self.http.as_ref().map_err(Clone::clone)?;
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        let mut request = http.client().post(self.url.clone());
        match &self.basic {
            Some(basic) => request = request.header(http::header::AUTHORIZATION, basic.clone()),
            None => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", self.client_secret.expose()));
            }
        }
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        form.extend(self.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let request = request
            .header(http::header::ACCEPT, "application/json")
            .form(&form);
        http.send(request, &self.url)
            .await?
            .into_issued(Some(self.client_secret.expose()))
    }
}

impl TokenSource for ClientSecretSource {
    fn fetch<'a>(
        &'a self,
        scope: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedToken, TokenError>> + Send + 'a>> {
        Box::pin(self.request(scope))
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
