//! Error answers from a token endpoint: tolerant parsing, permanent/transient
//! classification and one-line hints for the AADSTS codes operators meet most.
//!
//! Entra answers `{"error", "error_description", "error_codes", "trace_id", "correlation_id",
//! …}` (Microsoft identity platform, client credentials flow, error response), but a throttled
//! request may get a plain-text `Too Many Requests`, and other providers send whatever they
//! like, so every field is optional. Microsoft asks clients to branch on `error` only; the
//! AADSTS code just picks a hint.
//!
//! What authenticated the request (client secret, client assertion, the Basic credentials,
//! the App Service identity header) is masked in every field kept, in every form a provider
//! may echo it: raw, form-encoded as it was sent (`~` → `%7E`, hex in either case, `+` for
//! a space), percent-encoded, JSON-escaped, or any mix of these ([`mask`]); and before the
//! description is cut to its first line and [`MAX_DESCRIPTION`] characters, so a secret
//! straddling the cut cannot survive in part.

use std::fmt;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use serde_json::Value;

/// Longest `Retry-After` honoured; a hostile or buggy value must not park a slot for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10 * 60);
/// Longest description kept for logs.
const MAX_DESCRIPTION: usize = 600;

/// A token endpoint's error answer, as far as it could be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    pub status: u16,
    /// The OAuth `error` code (RFC 6749 §5.2), if it was a plausible one.
    pub error: Option<String>,
    /// First line of `error_description`, control characters removed, shortened. For logs.
    pub description: Option<String>,
    /// AADSTS numbers from `error_codes`, else from the description prefix.
    pub codes: Vec<u64>,
    pub trace_id: Option<String>,
    pub correlation_id: Option<String>,
    /// From the `Retry-After` header (seconds or HTTP-date), capped at 10 minutes.
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    /// Parses an error answer. Never fails: a body that is not JSON leaves the fields empty.
    #[cfg(test)]
    pub(crate) fn from_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Self {
        Self::from_response_masked(status, headers, body, &[])
    }

    /// [`from_response`](Self::from_response) with each of `secrets` masked in every field
    /// kept, before anything is cut or filtered.
    pub(crate) fn from_response_masked(
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        secrets: &[&str],
    ) -> Self {
        let json: Option<Value> = serde_json::from_slice(body).ok();
        let field = |name: &str| {
            json.as_ref()
                .and_then(|v| v.get(name))
                .and_then(Value::as_str)
                .map(|value| mask(value, secrets))
        };
        let description = field("error_description").and_then(|d| clean_description(&d));
        let mut codes: Vec<u64> = json
            .as_ref()
            .and_then(|v| v.get("error_codes"))
            .and_then(Value::as_array)
            .map(|codes| {
                codes
                    .iter()
                    .filter_map(|c| c.as_u64().or_else(|| c.as_str()?.trim().parse().ok()))
                    .collect()
            })
            .unwrap_or_default();
        if codes.is_empty() {
            codes.extend(description.as_deref().and_then(aadsts_prefix));
        }
        Self {
            status: status.as_u16(),
            error: field("error").filter(|e| is_token(e, 64)),
            description,
            codes,
            trace_id: field("trace_id").filter(|id| is_token(id, 64)),
            correlation_id: field("correlation_id").filter(|id| is_token(id, 64)),
            retry_after: capped_retry_after(headers, SystemTime::now()),
        }
    }

    /// The first AADSTS code.
    pub fn aadsts(&self) -> Option<u64> {
        self.codes.first().copied()
    }

    /// Retrying will not help: the configuration is wrong (docs/credentials.md "Tokens").
    pub fn is_permanent(&self) -> bool {
        if self.status == 429 || self.status >= 500 {
            return false;
        }
        let permanent_error = matches!(
            self.error.as_deref(),
            Some("invalid_client" | "unauthorized_client" | "invalid_scope" | "invalid_resource")
        );
        permanent_error || self.codes.iter().any(|c| PERMANENT_CODES.contains(c))
    }

    /// One line for the 503 body: code, AADSTS number and hint. No description, no URL.
    pub fn public_message(&self) -> String {
        let mut message = String::from("identity provider refused the token request");
        match &self.error {
            Some(error) => {
                message.push_str(": ");
                message.push_str(error);
            }
            None => message.push_str(&format!(": HTTP {}", self.status)),
        }
        if let Some(code) = self.aadsts() {
            message.push_str(&format!(" (AADSTS{code})"));
        }
        if let Some(hint) = self.hint() {
            message.push_str(" — ");
            message.push_str(hint);
        }
        message
    }

    /// The most specific hint: by AADSTS code, else by `error`, else by status.
    pub fn hint(&self) -> Option<&'static str> {
        self.codes
            .iter()
            .find_map(|&code| aadsts_hint(code))
            .or_else(|| error_hint(self.error.as_deref()?))
            .or(match self.status {
                429 => Some("throttled by the identity provider; it will be retried later"),
                500..=599 => Some("identity provider error; it will be retried"),
                _ => None,
            })
    }
}

impl fmt::Display for ProviderError {
    /// For logs: everything parsed, the hint included. Never the raw body.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token endpoint answered HTTP {}", self.status)?;
        if let Some(error) = &self.error {
            write!(f, ": {error}")?;
        }
        if !self.codes.is_empty() {
            let codes: Vec<String> = self.codes.iter().map(|c| format!("AADSTS{c}")).collect();
            write!(f, " [{}]", codes.join(", "))?;
        }
        if let Some(description) = &self.description {
            write!(f, ": {description}")?;
        }
        if let Some(hint) = self.hint() {
            write!(f, " (hint: {hint})")?;
        }
        if let Some(trace_id) = &self.trace_id {
            write!(f, " trace_id={trace_id}")?;
        }
        if let Some(correlation_id) = &self.correlation_id {
            write!(f, " correlation_id={correlation_id}")?;
        }
        Ok(())
    }
}

/// AADSTS codes that mean the configuration is wrong (docs/troubleshooting.md; Microsoft Entra
/// "authentication and authorization error codes").
const PERMANENT_CODES: &[u64] = &[
    7000215, 7000222, 7000218, 700016, 700011, 7000112, 90002, 900023, 90038, 70011, 700022,
    700023, 500011, 650057, 700027, 700030, 50012, 50027, 70021, 53003,
];

/// A one-line hint for an AADSTS code, for logs, the 503 body and `s2s-proxy token`.
pub fn aadsts_hint(code: u64) -> Option<&'static str> {
    Some(match code {
        7000215 => {
            "wrong client secret value; often the secret ID was pasted instead of the secret value"
        }
        7000222 => "the client secret has expired; create a new one in the app registration",
        7000218 => "the request carried no client_secret or client_assertion",
        700016 => {
            "application not found in the tenant: wrong client_id or tenant_id, or no admin consent in that tenant"
        }
        700011 => "client application not found in the tenant; check client_id and tenant_id",
        7000112 => "the application is disabled",
        90002 => "tenant not found: wrong tenant_id, or the tenant is in another national cloud",
        900023 => "tenant_id is not a valid tenant GUID or domain name",
        90038 => "the tenant is in another national cloud; set the credential's authority",
        70011 => {
            "invalid scope; use <resource>/.default, e.g. https://api.businesscentral.dynamics.com/.default"
        }
        700022 | 700023 => "the scope must name exactly one resource, as <resource>/.default",
        500011 => {
            "resource not found in the tenant: the Dynamics environment URL or scope is wrong, or the service is not provisioned there"
        }
        650057 => {
            "the resource is not in the app's API permissions; add it and grant admin consent"
        }
        700027 => {
            "certificate not accepted: not uploaded to the app registration, or thumbprint mismatch"
        }
        700024 => "client assertion outside its validity window; check the clock (NTP)",
        700030 => "certificate subject name not authorized for this application",
        70021 => "no matching federated identity credential: check issuer, subject and audience",
        53003 => "blocked by a Conditional Access policy for workload identities",
        50196 => "too many identical token requests (loop detected)",
        _ => return None,
    })
}

fn error_hint(error: &str) -> Option<&'static str> {
    Some(match error {
        "invalid_client" => "client authentication failed; check client_id and client_secret",
        "unauthorized_client" => {
            "the application may not use this grant here; check client_id, tenant and consent"
        }
        "invalid_scope" => "invalid scope; for Entra ID use <resource>/.default",
        "invalid_resource" => "the requested resource does not exist in this tenant",
        "temporarily_unavailable" => "identity provider temporarily unavailable; retrying",
        _ => return None,
    })
}

/// `AADSTS7000215: Invalid client secret …` → 7000215.
fn aadsts_prefix(description: &str) -> Option<u64> {
    let rest = description.trim_start().strip_prefix("AADSTS")?;
    let digits: &str = &rest[..rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len())];
    digits.parse().ok()
}

/// Secrets shorter than this are not masked: masking every `abc` would garble the text
/// and a secret that short protects nothing.
const MIN_MASKED: usize = 4;

/// `text` with every occurrence of each of `secrets` replaced by `****`, however it was
/// written (see [`encoded_match`]). Longer matches win where secrets overlap.
pub(crate) fn mask(text: &str, secrets: &[&str]) -> String {
    let secrets: Vec<&[u8]> = secrets
        .iter()
        .map(|s| s.as_bytes())
        .filter(|s| s.len() >= MIN_MASKED)
        .collect();
    if secrets.is_empty() {
        return text.to_owned();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let end = secrets
            .iter()
            .filter_map(|secret| encoded_match(bytes, i, secret))
            .max();
        match end {
            Some(end) => {
                out.extend_from_slice(b"****");
                i = end;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    // Matches start and end on character boundaries (an escape is ASCII; a raw match
    // starts with a secret's first byte and ends with its last), so this is lossless.
    String::from_utf8_lossy(&out).into_owned()
}

/// Where an occurrence of `secret` starting at `text[start]` ends, each of its bytes
/// written raw, percent-encoded (`%7E` or `%7e`, as form encoding writes it;
/// application/x-www-form-urlencoded also writes a space as `+`), or JSON-escaped (`\"`,
/// `\\`, `\/`, `\n`…, `\u007e`), in any mix. The longest such end.
fn encoded_match(text: &[u8], start: usize, secret: &[u8]) -> Option<usize> {
    // The text positions reachable after each secret byte; a byte has at most a few
    // spellings, so this stays tiny.
    let mut positions = vec![start];
    for &byte in secret {
        let mut next = Vec::with_capacity(positions.len() + 1);
        for &at in &positions {
            for end in spellings_at(text, at, byte) {
                if !next.contains(&end) {
                    next.push(end);
                }
            }
        }
        if next.is_empty() {
            return None;
        }
        positions = next;
    }
    positions.into_iter().max()
}

/// Ends of the ways `byte` may be written at `text[at..]`.
fn spellings_at(text: &[u8], at: usize, byte: u8) -> impl Iterator<Item = usize> {
    let rest = text.get(at..).unwrap_or_default();
    let raw = (rest.first() == Some(&byte)).then_some(at + 1);
    let plus = (byte == b' ' && rest.first() == Some(&b'+')).then_some(at + 1);
    let percent = match rest {
        [b'%', high, low, ..] => (hex_pair(*high, *low) == Some(byte)).then_some(at + 3),
        _ => None,
    };
    let json = match rest {
        [b'\\', b'u', a, b, c, d, ..] if byte.is_ascii() => {
            let value = [*a, *b, *c, *d]
                .iter()
                .try_fold(0u32, |acc, &h| Some(acc * 16 + (h as char).to_digit(16)?));
            (value == Some(u32::from(byte))).then_some(at + 6)
        }
        [b'\\', escape, ..] => (json_unescape(*escape) == Some(byte)).then_some(at + 2),
        _ => None,
    };
    [raw, plus, percent, json].into_iter().flatten()
}

fn hex_pair(high: u8, low: u8) -> Option<u8> {
    let high = (high as char).to_digit(16)?;
    let low = (low as char).to_digit(16)?;
    Some((high * 16 + low) as u8)
}

/// The byte a two-character JSON escape stands for (RFC 8259 §7).
fn json_unescape(escape: u8) -> Option<u8> {
    Some(match escape {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        _ => return None,
    })
}

/// Keeps the first line (Entra appends `\r\nTrace ID: …` lines), drops control
/// characters and shortens, so a description cannot forge log lines.
fn clean_description(description: &str) -> Option<String> {
    let line = description.lines().find(|l| !l.trim().is_empty())?.trim();
    let mut clean: String = line
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_DESCRIPTION)
        .collect();
    if line.chars().count() > MAX_DESCRIPTION {
        clean.push('…');
    }
    Some(clean)
}

/// An identifier-like string: what an OAuth error code or a trace id looks like.
fn is_token(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3). The one parser of
/// it, for identity providers here and for upstreams in `proxy::retry`.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An identity provider's `Retry-After`, at most [`MAX_RETRY_AFTER`].
fn capped_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    retry_after(headers, now).map(|delay| delay.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVALID_SECRET: &str = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.\r\nTrace ID: 0b1f\r\nCorrelation ID: 77aa\r\nTimestamp: 2024-01-01 00:00:00Z","error_codes":[7000215],"timestamp":"2024-01-01 00:00:00Z","trace_id":"0b1f-trace","correlation_id":"77aa-corr","error_uri":"https://login.microsoftonline.com/error?code=7000215"}"#;

    #[test]
    fn entra_error_is_parsed_and_classified() {
        let e = ProviderError::from_response(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            INVALID_SECRET.as_bytes(),
        );
        assert_eq!(e.error.as_deref(), Some("invalid_client"));
        assert_eq!(e.codes, vec![7000215]);
        assert_eq!(e.trace_id.as_deref(), Some("0b1f-trace"));
        assert_eq!(e.correlation_id.as_deref(), Some("77aa-corr"));
        assert!(e.is_permanent());
        let log = e.to_string();
        assert!(log.contains("AADSTS7000215") && log.contains("Invalid client secret"));
        assert!(log.contains("0b1f-trace") && log.contains("77aa-corr"));
        assert!(!log.contains('\n') && !log.contains("Timestamp"));
        let public = e.public_message();
        assert!(public.contains("invalid_client") && public.contains("AADSTS7000215"));
        assert!(public.contains("secret ID"));
        assert!(!public.contains("Invalid client secret provided"));
        assert!(!public.contains("https://"));
    }

    #[test]
    fn code_comes_from_the_description_when_error_codes_is_missing() {
        let body = br#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant 'x' not found."}"#;
        let e = ProviderError::from_response(StatusCode::BAD_REQUEST, &HeaderMap::new(), body);
        assert_eq!(e.aadsts(), Some(90002));
        assert!(e.is_permanent());
        assert!(e.public_message().contains("national cloud"));
    }

    #[test]
    fn plain_text_429_is_transient_with_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, "60".parse().unwrap());
        let e = ProviderError::from_response(
            StatusCode::TOO_MANY_REQUESTS,
            &headers,
            b"Too Many Requests",
        );
        assert!(!e.is_permanent());
        assert_eq!(e.retry_after, Some(Duration::from_secs(60)));
        assert_eq!(e.error, None);
        assert!(e.public_message().contains("HTTP 429"));
        assert!(!e.to_string().contains("Too Many Requests"));
    }

    #[test]
    fn server_errors_are_transient_even_with_a_permanent_code() {
        let body = br#"{"error":"invalid_client"}"#;
        let e = ProviderError::from_response(StatusCode::BAD_GATEWAY, &HeaderMap::new(), body);
        assert!(!e.is_permanent());
        let body = br#"{"error":"temporarily_unavailable"}"#;
        let e = ProviderError::from_response(StatusCode::BAD_REQUEST, &HeaderMap::new(), body);
        assert!(!e.is_permanent());
    }

    #[test]
    fn hostile_fields_are_dropped_or_cleaned() {
        let body = br#"{"error":"bad\r\nInjected: yes <script>","error_description":"line one\u0007 bell","trace_id":"https://evil/"}"#;
        let e = ProviderError::from_response(StatusCode::BAD_REQUEST, &HeaderMap::new(), body);
        assert_eq!(e.error, None);
        assert_eq!(e.trace_id, None);
        assert_eq!(e.description.as_deref(), Some("line one  bell"));
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates_and_is_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        headers.insert(http::header::RETRY_AFTER, date.parse().unwrap());
        assert_eq!(
            capped_retry_after(&headers, now),
            Some(Duration::from_secs(90))
        );
        headers.insert(http::header::RETRY_AFTER, "86400".parse().unwrap());
        assert_eq!(capped_retry_after(&headers, now), Some(MAX_RETRY_AFTER));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(5));
        headers.insert(http::header::RETRY_AFTER, past.parse().unwrap());
        assert_eq!(capped_retry_after(&headers, now), Some(Duration::ZERO));
        headers.insert(http::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(capped_retry_after(&headers, now), None);
    }

    #[test]
    fn secret_echoed_in_a_description_is_redacted() {
        let body = br#"{"error":"invalid_client","error_description":"bad secret s3cr~et+value"}"#;
        let e = ProviderError::from_response_masked(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            body,
            &["s3cr~et+value"],
        );
        assert!(!e.to_string().contains("s3cr~et+value"));
        assert_eq!(e.description.as_deref(), Some("bad secret ****"));
    }

    #[test]
    fn secrets_are_masked_in_every_form_a_provider_echoes() {
        let secret = r#"Ab1~x+y z/"q\w"#;
        for echoed in [
            // Raw, and as serde_urlencoded (form_urlencoded) writes it.
            r#"Ab1~x+y z/"q\w"#.to_owned(),
            "Ab1%7Ex%2By+z%2F%22q%5Cw".to_owned(),
            // Lowercase hex, %20 for the space, and a mix of raw and encoded.
            "Ab1%7ex%2by%20z%2f%22q%5cw".to_owned(),
            r#"Ab1%7Ex+y z/"q\w"#.to_owned(),
            // JSON-escaped (a JSON document inside the description), incl. \/ and \u.
            r#"Ab1~x+y z\/\"q\\w"#.to_owned(),
            r#"Ab1\u007ex\u002By z/\"q\\w"#.to_owned(),
        ] {
            let text = format!("client_secret={echoed}&scope=x");
            assert_eq!(
                mask(&text, &[secret]),
                "client_secret=****&scope=x",
                "{echoed}"
            );
        }
        // Near misses stay; short secrets are not masked at all.
        assert_eq!(mask("Ab1~x+y z/", &[secret]), "Ab1~x+y z/");
        assert_eq!(mask("abc abc", &["abc"]), "abc abc");
        // Several secrets, several occurrences, non-ASCII around them.
        assert_eq!(
            mask(
                "é s3cr3t-1 ü s3cr3t%2D1 eyJa.b.c",
                &["s3cr3t-1", "eyJa.b.c"]
            ),
            "é **** ü **** ****"
        );
    }

    #[test]
    fn masking_comes_before_the_cut_and_covers_every_field() {
        let secret = "cs_LONG~secret~value~0123456789";
        // The form-encoded secret straddles the 600-character cut.
        let form = format!("client_secret={}", secret.replace('~', "%7E"));
        let description = format!("{}{form}", "x".repeat(MAX_DESCRIPTION - 20));
        let body = serde_json::json!({
            "error": "invalid_client",
            "error_description": description,
            "trace_id": secret,
        })
        .to_string();
        let e = ProviderError::from_response_masked(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            body.as_bytes(),
            &[secret],
        );
        let shown = e.to_string();
        assert!(shown.contains("client_secret=****"), "{shown}");
        assert!(!shown.contains("cs_LONG"), "{shown}");
        assert_eq!(e.trace_id, None);
        // Without masking first, the cut would have left a piece of it.
        let unmasked = ProviderError::from_response(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            body.as_bytes(),
        );
        assert!(unmasked.to_string().contains("client_secret=cs_LO"));
    }
}
