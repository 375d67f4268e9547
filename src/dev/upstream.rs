//! The demo's sample upstream: a look-alike of Business Central's API v2.0 under
//! `/v2.0/{tenant}/Production/`, plus an echo endpoint for seeing what the proxy forwarded.
//!
//! Every request must carry a bearer token that verifies against the demo issuer's ES256
//! key, has not expired and was issued for this upstream (`aud`); otherwise the answer is
//! BC's 401. Answers carry absolute `@odata.*` links pointing at this upstream, as BC's do
//! (docs/dynamics.md "Link rewriting"). It serves a fixed data set and does not write anything.

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{issuer::form_decode, json_response, unix_now};

/// Entries per page unless the client sends `Prefer: odata.maxpagesize=N`.
const DEFAULT_PAGE_SIZE: usize = 2;
/// Tolerated clock skew for `nbf`, as Entra-protected APIs allow.
const CLOCK_SKEW_SECS: u64 = 300;

struct Company {
    id: &'static str,
    name: &'static str,
    display_name: &'static str,
}

/// Three companies: with the default page size, page 1 has a nextLink and page 2 does not.
const COMPANIES: [Company; 3] = [
    Company {
        id: "5d1a7e2c-0f4b-4e7b-9a3c-2b6f1c0d9e01",
        name: "CRONUS USA, Inc.",
        display_name: "CRONUS USA, Inc.",
    },
    Company {
        id: "5d1a7e2c-0f4b-4e7b-9a3c-2b6f1c0d9e02",
        name: "CRONUS International Ltd.",
        display_name: "CRONUS International Ltd.",
    },
    Company {
        id: "5d1a7e2c-0f4b-4e7b-9a3c-2b6f1c0d9e03",
        name: "My Company",
        display_name: "My Company",
    },
];

/// The query that fetches page 2 of `companies` at the default page size.
pub(super) fn second_page_query() -> String {
    skiptoken_query(COMPANIES[DEFAULT_PAGE_SIZE - 1].id)
}

/// BC-style `$skiptoken`: the last key of the page, quoted and percent-encoded.
fn skiptoken_query(last_id: &str) -> String {
    format!("$skiptoken=%27{last_id}%27")
}

pub(super) struct Settings {
    /// `http://127.0.0.1:<port>`: this upstream, and the `aud` its tokens must carry.
    pub(super) origin: String,
    pub(super) tenant: String,
    pub(super) environment: String,
    /// The `iss` its tokens must carry.
    pub(super) issuer: String,
    /// Uncompressed P-256 point of the issuer's key.
    pub(super) public_key: Vec<u8>,
}

pub(super) struct SampleUpstream {
    settings: Settings,
    base_path: String,
}

/// What the upstream learned from a valid token; shown by the echo endpoint.
#[derive(Debug)]
pub(super) struct VerifiedToken {
    audience: String,
    app_id: String,
    roles: Vec<String>,
    expires: u64,
}

impl VerifiedToken {
    fn summary(&self) -> String {
        format!(
            "Bearer <verified ES256 token: aud={}, appid={}, roles=[{}], expires in {} s>",
            self.audience,
            self.app_id,
            self.roles.join(", "),
            self.expires.saturating_sub(unix_now())
        )
    }
}

impl SampleUpstream {
    pub(super) fn new(settings: Settings) -> Self {
        let base_path = format!("/v2.0/{}/{}/", settings.tenant, settings.environment);
        Self {
            settings,
            base_path,
        }
    }

    pub(super) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let token = match self.verify(req.headers()) {
            Ok(token) => token,
            Err(reason) => return unauthorized(reason),
        };
        let path = req.uri().path();
        if path.contains("/echo") {
            return echo(req, peer, &token).await;
        }
        let Some(rest) = path.strip_prefix(self.base_path.as_str()) else {
            return not_found();
        };
        let Some(entity) = rest.strip_prefix("api/v2.0/") else {
            return not_found();
        };
        let (collection, company_id, navigation) = match parse_segments(entity) {
            Some(parsed) => parsed,
            None => return not_found(),
        };
        if collection != "companies" {
            return not_found();
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return method_not_allowed(req.method(), navigation.unwrap_or("companies"));
        }
        match (company_id, navigation) {
            (None, None) => self.companies(req.uri().query(), req.headers()),
            (Some(id), None) => match find_company(id) {
                Some(company) => self.company(company),
                None => not_found(),
            },
            (Some(id), Some("customers")) => match find_company(id) {
                Some(company) => self.customers(company),
                None => not_found(),
            },
            (None | Some(_), Some(_)) => not_found(),
        }
    }

    /// Checks signature, algorithm, issuer, audience and lifetime of the bearer token.
    fn verify(&self, headers: &HeaderMap) -> Result<VerifiedToken, &'static str> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = values.next().ok_or("no bearer token")?;
        if values.next().is_some() {
            return Err("more than one Authorization header");
        }
        let value = value
            .to_str()
            .map_err(|_| "malformed Authorization header")?;
        let token = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or("not a bearer token")?;
        let mut parts = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT");
        };
        let jose: Value = decode_json(header_b64).ok_or("malformed token header")?;
        // Never trust the token to pick its algorithm (RFC 8725 §3.1).
        if jose.get("alg").and_then(Value::as_str) != Some("ES256") {
            return Err("unexpected token algorithm");
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| "malformed token signature")?;
        let signed = &token[..header_b64.len() + 1 + claims_b64.len()];
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.settings.public_key)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| "token signature does not verify")?;

        let claims: Value = decode_json(claims_b64).ok_or("malformed token claims")?;
        let text = |name: &str| claims.get(name).and_then(Value::as_str).unwrap_or_default();
        let number = |name: &str| claims.get(name).and_then(Value::as_u64);
        let now = unix_now();
        let expires = number("exp").ok_or("token has no expiry")?;
        if expires <= now {
            return Err("token expired");
        }
        if number("nbf").is_some_and(|nbf| nbf > now + CLOCK_SKEW_SECS) {
            return Err("token not yet valid");
        }
        if text("iss") != self.settings.issuer {
            return Err("token from another issuer");
        }
        if text("aud").trim_end_matches('/') != self.settings.origin {
            return Err("token issued for another audience");
        }
        let roles = claims
            .get("roles")
            .and_then(Value::as_array)
            .map(|roles| {
                roles
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(VerifiedToken {
            audience: text("aud").to_owned(),
            app_id: text("appid").to_owned(),
            roles,
            expires,
        })
    }

    fn api_url(&self) -> String {
        format!("{}{}api/v2.0", self.settings.origin, self.base_path)
    }

    fn companies(&self, query: Option<&str>, headers: &HeaderMap) -> Response<Full<Bytes>> {
        let requested_size = max_page_size(headers);
        let page_size = requested_size.unwrap_or(DEFAULT_PAGE_SIZE);
        let start = match query.and_then(skiptoken) {
            None => 0,
            Some(last_id) => match COMPANIES.iter().position(|c| c.id == last_id) {
                Some(index) => index + 1,
                None => {
                    return bc_error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "The $skiptoken is not valid.",
                    );
                }
            },
        };
        let page: Vec<&Company> = COMPANIES.iter().skip(start).take(page_size).collect();
        let api = self.api_url();
        let mut body = json!({
            "@odata.context": format!("{api}/$metadata#companies"),
            "value": page.iter().map(|c| company_json(c)).collect::<Vec<_>>(),
        });
        if start + page.len() < COMPANIES.len()
            && let Some(last) = page.last()
        {
            body["@odata.nextLink"] =
                Value::String(format!("{api}/companies?{}", skiptoken_query(last.id)));
        }
        let mut response = odata_response(&body);
        if let Some(size) = requested_size
            && let Ok(value) = HeaderValue::from_str(&format!("odata.maxpagesize={size}"))
        {
            response.headers_mut().insert("preference-applied", value);
        }
        response
    }

    fn company(&self, company: &Company) -> Response<Full<Bytes>> {
        let mut body = json!({
            "@odata.context": format!("{}/$metadata#companies/$entity", self.api_url()),
        });
        if let (Value::Object(target), Value::Object(fields)) = (&mut body, company_json(company)) {
            target.extend(fields);
        }
        odata_response(&body)
    }

    fn customers(&self, company: &Company) -> Response<Full<Bytes>> {
        let api = self.api_url();
        let customer = |number: &str, name: &str, city: &str, etag: &str, suffix: &str| {
            json!({
                "@odata.etag": format!("W/\"{etag}\""),
                "id": format!("{}{suffix}", &company.id[..company.id.len() - suffix.len()]),
                "number": number,
                "displayName": name,
                "type": "Company",
                "addressLine1": "192 Market Square",
                "addressLine2": "",
                "city": city,
                "state": "",
                "country": "US",
                "postalCode": "",
                "phoneNumber": "",
                "email": "",
                "website": "",
                "taxLiable": false,
                "currencyCode": "USD",
                "blocked": " ",
                "balanceDue": 0,
                "lastModifiedDateTime": "2024-01-15T10:20:30.123Z",
            })
        };
        let body = json!({
            "@odata.context": format!("{api}/$metadata#companies({})/customers", company.id),
            "value": [
                customer("10000", "Adatum Corporation", "Atlanta", "JzE4OzEzNjc1NDkzNDA1NTk0OTc1NjE7MDA7Jw==", "c10000"),
                customer("20000", "Trey Research", "Chicago", "JzE4OzQ0NzE5MTkyODk3NzE4ODU4MDE7MDA7Jw==", "c20000"),
            ],
        });
        odata_response(&body)
    }
}

/// `companies`, `companies(<id>)` or `companies(<id>)/<navigation>`.
fn parse_segments(entity: &str) -> Option<(&str, Option<&str>, Option<&str>)> {
    let (first, navigation) = match entity.split_once('/') {
        Some((first, rest)) if !rest.is_empty() && !rest.contains('/') => (first, Some(rest)),
        Some(_) => return None,
        None => (entity, None),
    };
    match first.split_once('(') {
        Some((collection, key)) => {
            let key = key.strip_suffix(')')?;
            Some((collection, Some(key), navigation))
        }
        None => Some((first, None, navigation)),
    }
}

fn find_company(id: &str) -> Option<&'static Company> {
    COMPANIES.iter().find(|c| c.id.eq_ignore_ascii_case(id))
}

fn company_json(company: &Company) -> Value {
    json!({
        "id": company.id,
        "systemVersion": "24.0.16410.18056",
        "timestamp": 25_331,
        "name": company.name,
        "displayName": company.display_name,
        "businessProfileId": "",
        "systemCreatedAt": "2024-01-01T08:00:00.000Z",
        "systemCreatedBy": "00000000-0000-0000-0000-000000000001",
        "systemModifiedAt": "2024-01-01T08:00:00.000Z",
        "systemModifiedBy": "00000000-0000-0000-0000-000000000001",
    })
}

/// The key inside `$skiptoken='…'` (the `$` possibly percent-encoded, the quotes too).
fn skiptoken(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        if form_decode(name.as_bytes()) != "$skiptoken" {
            return None;
        }
        let value = form_decode(value.as_bytes());
        Some(value.trim_matches('\'').to_owned())
    })
}

/// `Prefer: odata.maxpagesize=N` (OData 4.01 §8.2.8.3), when sensible.
fn max_page_size(headers: &HeaderMap) -> Option<usize> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|preference| {
            let (name, value) = preference.trim().split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("odata.maxpagesize") {
                return None;
            }
            value.trim().parse().ok().filter(|&n| n > 0)
        })
}

fn decode_json(part: &str) -> Option<Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

/// What arrived, byte for byte where it matters; the token only as a summary.
async fn echo(
    req: Request<Incoming>,
    peer: SocketAddr,
    token: &VerifiedToken,
) -> Response<Full<Bytes>> {
    let (parts, mut body) = req.into_parts();
    let mut headers = serde_json::Map::new();
    let mut header_list = Vec::new();
    for (name, value) in &parts.headers {
        let value = if name == header::AUTHORIZATION {
            token.summary()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        header_list.push(json!([name.as_str(), value]));
        match headers.get_mut(name.as_str()) {
            // Repeated fields combine with ", " (RFC 9110 §5.3); `header_list` keeps each.
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    let mut length: u64 = 0;
    let mut digest = Sha256::new();
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    length += data.len() as u64;
                    digest.update(data);
                }
            }
            Err(error) => {
                body_error = Some(error.to_string());
                break;
            }
        }
    }
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    odata_response(&json!({
        "method": parts.method.as_str(),
        "target": target,
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "peer": peer.to_string(),
        "headers": headers,
        "header_list": header_list,
        "body_length": length,
        "body_sha256": hex::encode(digest.finalize()),
        "body_error": body_error,
    }))
}

fn odata_response(body: &Value) -> Response<Full<Bytes>> {
    let mut response = json_response(StatusCode::OK, body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; odata.metadata=minimal; odata.streaming=true"),
    );
    headers.insert("odata-version", HeaderValue::from_static("4.0"));
    response
}

fn bc_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

/// BC's answer to a missing or bad token, with the reason in `error_description`
/// (RFC 6750 §3).
fn unauthorized(reason: &'static str) -> Response<Full<Bytes>> {
    let mut response = bc_error(
        StatusCode::UNAUTHORIZED,
        "Authentication_InvalidCredentials",
        "The server has rejected the client credentials.",
    );
    if let Ok(value) = HeaderValue::from_str(&format!(
        "Bearer error=\"invalid_token\", error_description=\"{reason}\""
    )) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn not_found() -> Response<Full<Bytes>> {
    bc_error(
        StatusCode::NOT_FOUND,
        "BadRequest_NotFound",
        "The request URI is not valid for this sample Business Central API. Try api/v2.0/companies.",
    )
}

fn method_not_allowed(method: &Method, entity: &str) -> Response<Full<Bytes>> {
    let mut response = bc_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "BadRequest_MethodNotAllowed",
        &format!(
            "'{method}' requests for '{entity}' of EdmType 'Entity' are not allowed within Dynamics 365 Business Central OData web services."
        ),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_skiptokens_parse() {
        assert_eq!(parse_segments("companies"), Some(("companies", None, None)));
        assert_eq!(
            parse_segments("companies(abc)/customers"),
            Some(("companies", Some("abc"), Some("customers")))
        );
        assert_eq!(parse_segments("companies(abc/customers"), None);
        assert_eq!(parse_segments("companies/a/b"), None);
        assert_eq!(skiptoken("$skiptoken=%27k%27").as_deref(), Some("k"));
        assert_eq!(skiptoken("a=1&%24skiptoken='k'").as_deref(), Some("k"));
        assert_eq!(skiptoken("$top=1"), None);
    }
}
