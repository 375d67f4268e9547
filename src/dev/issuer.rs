//! The demo's token issuer: a look-alike of the Microsoft Entra ID v2 token endpoint
//! (`POST /{tenant}/oauth2/v2.0/token`) for the client-credentials grant.
//!
//! It answers with Entra's success and error shapes (AADSTS codes, trace and correlation
//! ids) and issues real ES256 JWTs with app-only claims, signed by a P-256 key generated at
//! start. It knows one tenant, one application and one resource (the sample upstream). It
//! does not do certificates, managed identity or the v1 endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::json;

use super::{DEV_ROLE, DEV_TOKEN_LIFETIME_SECS, DevError, json_response, unix_now, uuid_like};
use crate::secret::Secret;

/// Object id of the demo application's service principal (`oid` and `sub`).
const SERVICE_PRINCIPAL_OID: &str = "dec0de00-0000-4000-a000-0000000005b1";
/// Largest form body read; real token requests are well under 4 KiB.
const MAX_FORM_BYTES: usize = 64 * 1024;
const JWT_HEADER: &str = r#"{"alg":"ES256","typ":"JWT","kid":"dev"}"#;

pub(super) struct Settings {
    /// `http://127.0.0.1:<port>` of the issuer itself.
    pub(super) origin: String,
    pub(super) tenant: String,
    pub(super) client_id: String,
    pub(super) client_secret: Secret,
    /// The one resource tokens are issued for (scope without `/.default`).
    pub(super) resource: String,
    pub(super) issued: Arc<AtomicU64>,
}

pub(super) struct Issuer {
    settings: Settings,
    secret_digest: crate::secret::SecretDigest,
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("origin", &self.settings.origin)
            .field("tenant", &self.settings.tenant)
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

/// An Entra error answer: HTTP status, `error`, AADSTS number and description.
struct AadError {
    status: StatusCode,
    error: &'static str,
    code: u32,
    description: String,
}

impl AadError {
    fn new(status: StatusCode, error: &'static str, code: u32, description: String) -> Self {
        Self {
            status,
            error,
            code,
            description,
        }
    }

    fn missing(parameter: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            format!("The request body must contain the following parameter: '{parameter}'."),
        )
    }
}

impl Issuer {
    pub(super) fn new(settings: Settings) -> Result<Self, DevError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| DevError::Crypto)?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| DevError::Crypto)?;
        Ok(Self {
            secret_digest: settings.client_secret.digest(),
            settings,
            key,
            rng,
        })
    }

    /// The uncompressed P-256 point that verifies issued tokens.
    pub(super) fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// The `iss` claim: `http://127.0.0.1:<port>/<tenant>/v2.0`.
    pub(super) fn issuer_claim(&self) -> String {
        format!("{}/{}/v2.0", self.settings.origin, self.settings.tenant)
    }

    pub(super) async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.token_response(req).await {
            Ok(response) => response,
            Err(error) => self.error_response(&error),
        }
    }

    async fn token_response(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, AadError> {
        let Some(tenant) = req
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix("/oauth2/v2.0/token"))
            .filter(|t| !t.is_empty() && !t.contains('/'))
            .map(str::to_owned)
        else {
            return Ok(json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "error_description": "Use POST /{tenant}/oauth2/v2.0/token."}),
            ));
        };
        if req.method() != Method::POST {
            let mut response = self.error_response(&AadError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                900561,
                format!(
                    "The endpoint only accepts POST requests. Received a {} request.",
                    req.method()
                ),
            ));
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return Ok(response);
        }
        if tenant != self.settings.tenant {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                90002,
                format!(
                    "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
                ),
            ));
        }
        let basic = basic_client_auth(req.headers());
        let body = Limited::new(req.into_body(), MAX_FORM_BYTES)
            .collect()
            .await
            .map_err(|_| {
                AadError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    90014,
                    "The request body could not be read or is too large.".to_owned(),
                )
            })?
            .to_bytes();
        let form = parse_form(&body);
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };

        let grant_type = field("grant_type").ok_or_else(|| AadError::missing("grant_type"))?;
        if grant_type != "client_credentials" {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                format!("The app requested an unsupported grant type '{grant_type}'."),
            ));
        }
        // RFC 6749 §2.3.1: either Basic or the form body, not both.
        let (client_id, secret) = match (&basic, field("client_secret")) {
            (Some(_), Some(_)) => {
                return Err(AadError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    90023,
                    "The client sent credentials both in the Authorization header and in the body."
                        .to_owned(),
                ));
            }
            (Some((id, secret)), None) => (Some(id.as_str()), Some(secret.as_str())),
            (None, secret) => (field("client_id"), secret),
        };
        let client_id = client_id.ok_or_else(|| AadError::missing("client_id"))?;
        if client_id != self.settings.client_id {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                700016,
                format!(
                    "Application with identifier '{client_id}' was not found in the directory '{}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
                    self.settings.tenant
                ),
            ));
        }
        let Some(secret) = secret else {
            return Err(AadError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.".to_owned(),
            ));
        };
        if !Secret::new(secret).digest().matches(&self.secret_digest) {
            return Err(AadError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                ),
            ));
        }
        if field("resource").is_some() {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                901002,
                "The 'resource' request parameter is not supported.".to_owned(),
            ));
        }
        let scope = field("scope").ok_or_else(|| AadError::missing("scope"))?;
        let Some(resource) = scope.strip_suffix("/.default").filter(|r| !r.is_empty()) else {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                70011,
                format!(
                    "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                ),
            ));
        };
        if resource != self.settings.resource {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "invalid_resource",
                500011,
                format!(
                    "The resource principal named {resource} was not found in the tenant named {}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant.",
                    self.settings.tenant
                ),
            ));
        }

        let now = unix_now();
        let token = self
            .sign(&self.claims(resource, now, now + DEV_TOKEN_LIFETIME_SECS))
            .map_err(|_| {
                AadError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "temporarily_unavailable",
                    50000,
                    "There was an error issuing a token.".to_owned(),
                )
            })?;
        self.settings.issued.fetch_add(1, Ordering::Relaxed);
        let mut response = json_response(
            StatusCode::OK,
            &json!({
                "token_type": "Bearer",
                "expires_in": DEV_TOKEN_LIFETIME_SECS,
                "ext_expires_in": DEV_TOKEN_LIFETIME_SECS,
                "access_token": token,
            }),
        );
        // RFC 6749 §5.1.
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        Ok(response)
    }

    /// Claims of an Entra v2 app-only access token.
    pub(super) fn claims(&self, audience: &str, now: u64, expires: u64) -> serde_json::Value {
        json!({
            "aud": audience,
            "iss": self.issuer_claim(),
            "iat": now,
            "nbf": now,
            "exp": expires,
            "azp": self.settings.client_id,
            "azpacr": "1",
            "appid": self.settings.client_id,
            "appidacr": "1",
            "idtyp": "app",
            "oid": SERVICE_PRINCIPAL_OID,
            "sub": SERVICE_PRINCIPAL_OID,
            "roles": [DEV_ROLE],
            "tid": self.settings.tenant,
            "uti": uuid_like(&self.rng),
            "ver": "2.0",
        })
    }

    /// A compact JWS (RFC 7515 §7.1) over `claims`, ES256 with a fixed-size signature.
    pub(super) fn sign(&self, claims: &serde_json::Value) -> Result<String, DevError> {
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(JWT_HEADER),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| DevError::Crypto)?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        Ok(token)
    }

    fn error_response(&self, error: &AadError) -> Response<Full<Bytes>> {
        let trace_id = uuid_like(&self.rng);
        let correlation_id = uuid_like(&self.rng);
        let timestamp = entra_timestamp(unix_now());
        let mut response = json_response(
            error.status,
            &json!({
                "error": error.error,
                "error_description": format!(
                    "AADSTS{}: {}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}",
                    error.code, error.description
                ),
                "error_codes": [error.code],
                "timestamp": timestamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": format!("{}/error?code={}", self.settings.origin, error.code),
            }),
        );
        if let Ok(value) = HeaderValue::from_str(&trace_id) {
            response.headers_mut().insert("x-ms-request-id", value);
        }
        response
    }
}

/// Client id and secret from `Authorization: Basic`, each form-urlencoded inside
/// (RFC 6749 §2.3.1).
fn basic_client_auth(headers: &http::HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(credentials.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id.as_bytes()), form_decode(secret.as_bytes())))
}

/// `application/x-www-form-urlencoded` pairs, in order.
fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    body.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let mut parts = pair.splitn(2, |&b| b == b'=');
            let name = parts.next().unwrap_or_default();
            let value = parts.next().unwrap_or_default();
            (form_decode(name), form_decode(value))
        })
        .collect()
}

/// Decodes one form-urlencoded component: `+` is a space, `%XX` a byte.
pub(super) fn form_decode(input: &[u8]) -> String {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < input.len() => {
                match (hex_value(input[i + 1]), hex_value(input[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push(high << 4 | low);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// `2024-05-01 12:34:56Z`, the format of Entra's `timestamp` field.
fn entra_timestamp(unix: u64) -> String {
    crate::civil_date::utc(unix).replacen('T', " ", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_handles_plus_percent_and_tilde() {
        assert_eq!(form_decode(b"a+b%7Ec%7e~d"), "a b~c~~d");
        assert_eq!(form_decode(b"100%"), "100%");
        assert_eq!(form_decode(b"%zz%4"), "%zz%4");
        assert_eq!(
            parse_form(b"grant_type=client_credentials&scope=http%3A%2F%2Fx%2F.default&&x"),
            vec![
                ("grant_type".to_owned(), "client_credentials".to_owned()),
                ("scope".to_owned(), "http://x/.default".to_owned()),
                ("x".to_owned(), String::new()),
            ]
        );
    }

    #[test]
    fn timestamps_look_like_entra() {
        assert_eq!(entra_timestamp(0), "1970-01-01 00:00:00Z");
        assert_eq!(entra_timestamp(1_709_210_096), "2024-02-29 12:34:56Z");
    }
}
