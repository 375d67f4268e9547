//! Successful token answers: `access_token` plus an expiry, numbers accepted as JSON
//! numbers or strings (Entra v1, IMDS and App Service send `"expires_in":"3599"`,
//! as their Microsoft Learn pages show).
//!
//! Every field is checked before the token is cached (SECURITY.md catalogue F3): a missing or
//! unusable token, an expiry that is zero, negative or absurd, or a `token_type` other than
//! `Bearer` make the fetch fail. Error messages are ours; the body is never echoed.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{IssuedToken, TokenError, claims};
use crate::secret::Secret;

/// Longest lifetime accepted. Entra issues 60–90 min (24 h for managed identity); anything
/// beyond a year is garbage such as `1e12`.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// Parses a 2xx body. `now` is the wall clock, used only to turn `expires_on`/`exp` epochs
/// into a lifetime.
pub(crate) fn parse_success(body: &[u8], now: SystemTime) -> Result<IssuedToken, TokenError> {
    let invalid = |reason: &str| TokenError::InvalidResponse(reason.to_owned());
    let json: Value =
        serde_json::from_slice(body).map_err(|_| invalid("response body is not JSON"))?;
    let object = json
        .as_object()
        .ok_or_else(|| invalid("response body is not a JSON object"))?;

    let access_token = match object.get("access_token") {
        Some(Value::String(token)) => token.as_str(),
        Some(_) => return Err(invalid("access_token is not a string")),
        None => return Err(invalid("access_token is missing")),
    };
    validate_access_token(access_token)?;

    if let Some(token_type) = object.get("token_type") {
        let is_bearer = token_type
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case("bearer"));
        if !is_bearer {
            return Err(invalid("token_type is not Bearer"));
        }
    }

    let expires_in = if let Some(value) = object.get("expires_in") {
        seconds(value).ok_or_else(|| invalid("expires_in is not a positive number of seconds"))?
    } else if let Some(value) = object.get("expires_on") {
        let epoch = seconds(value).ok_or_else(|| invalid("expires_on is not an epoch time"))?;
        until_epoch(epoch, now).ok_or_else(|| invalid("expires_on is in the past"))?
    } else if let Some(exp) = claims::decode_claims(access_token).and_then(|c| c.exp) {
        until_epoch(Duration::from_secs(exp), now)
            .ok_or_else(|| invalid("the token's exp claim is in the past"))?
    } else {
        return Err(invalid("no expires_in, expires_on or exp claim"));
    };
    if expires_in > MAX_LIFETIME {
        return Err(invalid("expires_in is longer than a year"));
    }

    // A malformed hint is ignored rather than failing a usable token.
    let refresh_in = object.get("refresh_in").and_then(seconds);

    Ok(IssuedToken {
        access_token: Secret::new(access_token),
        expires_in,
        refresh_in,
    })
}

/// A bearer token must be a non-empty run of visible ASCII (RFC 6750 §2.1 `b64token` is
/// stricter; opaque tokens from other providers may use more of the range). Rules out
/// spaces, CR/LF header injection (CVE-2023-27493) and non-ASCII.
pub(crate) fn validate_access_token(token: &str) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError::InvalidResponse(
            "access_token is empty".to_owned(),
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::InvalidResponse(
            "access_token contains characters not allowed in a header".to_owned(),
        ));
    }
    Ok(())
}

/// A positive whole number of seconds, from a JSON number or a numeric string. Fractions
/// are truncated; zero, negatives, NaN and huge values give `None`.
fn seconds(value: &Value) -> Option<Duration> {
    let secs = match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            let f = n.as_f64()?;
            (1.0..1e15).contains(&f).then_some(f as u64)
        })?,
        Value::String(s) => s.trim().parse::<u64>().ok()?,
        _ => return None,
    };
    (secs > 0 && secs < 1 << 50).then(|| Duration::from_secs(secs))
}

/// Time from `now` until the epoch instant `at`, if it is in the future.
fn until_epoch(at: Duration, now: SystemTime) -> Option<Duration> {
    let now = now.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    at.checked_sub(now).filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn parse(body: &str) -> Result<IssuedToken, TokenError> {
        parse_success(body.as_bytes(), now())
    }

    #[test]
    fn v2_numbers_and_v1_strings() {
        let t = parse(r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"refresh_in":1799,"access_token":"abc"}"#).unwrap();
        assert_eq!(t.access_token.expose(), "abc");
        assert_eq!(t.expires_in, Duration::from_secs(3599));
        assert_eq!(t.refresh_in, Some(Duration::from_secs(1799)));
        let t = parse(r#"{"token_type":"bearer","expires_in":"3599","ext_expires_in":"3599","expires_on":"1700003599","not_before":"1699999699","resource":"https://x","access_token":"abc"}"#).unwrap();
        assert_eq!(t.expires_in, Duration::from_secs(3599));
        assert_eq!(t.refresh_in, None);
    }

    #[test]
    fn expiry_falls_back_to_expires_on_then_the_exp_claim() {
        let t = parse(r#"{"access_token":"abc","expires_on":1700000600}"#).unwrap();
        assert_eq!(t.expires_in, Duration::from_secs(600));
        let payload = URL_SAFE_NO_PAD.encode(br#"{"exp":1700000900,"aud":"x"}"#);
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln");
        let t = parse(&format!(r#"{{"access_token":"{jwt}"}}"#)).unwrap();
        assert_eq!(t.expires_in, Duration::from_secs(900));
        assert!(matches!(
            parse(r#"{"access_token":"opaque"}"#),
            Err(TokenError::InvalidResponse(_))
        ));
    }

    #[test]
    fn garbage_is_refused() {
        let cases = [
            "<html>oops</html>",
            "",
            "[]",
            r#"{"expires_in":3599}"#,
            r#"{"access_token":"","expires_in":3599}"#,
            r#"{"access_token":"   ","expires_in":3599}"#,
            r#"{"access_token":"a\r\nb","expires_in":3599}"#,
            r#"{"access_token":42,"expires_in":3599}"#,
            r#"{"access_token":"abc","expires_in":0}"#,
            r#"{"access_token":"abc","expires_in":-5}"#,
            r#"{"access_token":"abc","expires_in":1e12}"#,
            r#"{"access_token":"abc","expires_in":"soon"}"#,
            r#"{"access_token":"abc","expires_in":null}"#,
            r#"{"access_token":"abc","expires_in":3599,"token_type":"mac"}"#,
            r#"{"access_token":"abc","expires_on":1600000000}"#,
        ];
        for body in cases {
            assert!(
                matches!(parse(body), Err(TokenError::InvalidResponse(_))),
                "accepted: {body}"
            );
        }
    }

    #[test]
    fn messages_do_not_echo_the_body() {
        let err = parse(r#"{"access_token":"abc","expires_in":3599,"token_type":"SECRETISH"}"#)
            .unwrap_err();
        assert!(!err.to_string().contains("SECRETISH"));
    }
}
