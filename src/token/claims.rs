//! Reading a JWT access token's payload WITHOUT verifying it: for `s2s-proxy token`, the
//! debug log after a fetch, and the `exp` fallback when a provider sends no `expires_in`.
//!
//! Nothing here is a security decision; the upstream verifies the token. Entra app-only
//! tokens without `roles` usually mean a missing admin consent (docs/troubleshooting.md), which is
//! what these claims help diagnose.

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Serialize;
use serde_json::Value;

/// base64url with or without padding (RFC 7515 §2 says none; some issuers pad).
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Largest payload decoded; token bodies are capped at 64 KiB anyway.
const MAX_PAYLOAD: usize = 64 * 1024;

/// The claims worth showing. Claims are not secret: without its signature a payload cannot
/// be replayed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Claims {
    /// `aud`, a string or an array in the token.
    pub aud: Vec<String>,
    pub iss: Option<String>,
    /// Tenant id.
    pub tid: Option<String>,
    /// Client id: `appid` (v1 tokens) or `azp` (v2 tokens).
    pub appid: Option<String>,
    /// Object id of the service principal.
    pub oid: Option<String>,
    /// Application permissions granted (app-only tokens).
    pub roles: Vec<String>,
    /// Delegated scopes; present only for user tokens.
    pub scp: Option<String>,
    /// `app` for app-only Entra tokens.
    pub idtyp: Option<String>,
    /// Epoch seconds.
    pub iat: Option<u64>,
    pub nbf: Option<u64>,
    pub exp: Option<u64>,
}

/// Decodes the payload of a JWS compact token (`header.payload.signature`). `None` for
/// opaque or encrypted tokens and for anything malformed.
pub fn decode_claims(token: &str) -> Option<Claims> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > MAX_PAYLOAD * 4 / 3 + 4 {
        return None; // JWE has five parts; its payload is encrypted.
    }
    let bytes = BASE64URL.decode(payload).ok()?;
    let json: Value = serde_json::from_slice(&bytes).ok()?;
    let object = json.as_object()?;
    let string = |name: &str| object.get(name)?.as_str().map(str::to_owned);
    let strings = |name: &str| match object.get(name) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let number = |name: &str| match object.get(name)? {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    Some(Claims {
        aud: strings("aud"),
        iss: string("iss"),
        tid: string("tid"),
        appid: string("appid").or_else(|| string("azp")),
        oid: string("oid"),
        roles: strings("roles"),
        scp: string("scp"),
        idtyp: string("idtyp"),
        iat: number("iat"),
        nbf: number("nbf"),
        exp: number("exp"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};

    fn jwt(payload: &str) -> String {
        format!(
            "{}.{}.c2lnbmF0dXJl",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn entra_app_token_claims() {
        let token = jwt(
            r#"{"aud":"https://api.businesscentral.dynamics.com","iss":"https://sts.windows.net/7e1c/","iat":1700000000,"nbf":1700000000,"exp":1700003599,"appid":"c0ffee","idtyp":"app","oid":"0b1d","roles":["API.ReadWrite.All","Automation.ReadWrite.All"],"tid":"7e1c","ver":"1.0"}"#,
        );
        let claims = decode_claims(&token).unwrap();
        assert_eq!(claims.aud, vec!["https://api.businesscentral.dynamics.com"]);
        assert_eq!(claims.tid.as_deref(), Some("7e1c"));
        assert_eq!(claims.appid.as_deref(), Some("c0ffee"));
        assert_eq!(claims.roles.len(), 2);
        assert_eq!(claims.exp, Some(1_700_003_599));
        assert_eq!(claims.iss.as_deref(), Some("https://sts.windows.net/7e1c/"));
        let json = serde_json::to_string(&claims).unwrap();
        assert!(json.contains(r#""roles":["API.ReadWrite.All","Automation.ReadWrite.All"]"#));
    }

    #[test]
    fn v2_azp_array_aud_and_padding() {
        let payload = URL_SAFE.encode(br#"{"aud":["a","b"],"azp":"client","exp":"17"}"#);
        let token = format!("e30.{payload}.");
        let claims = decode_claims(&token).unwrap();
        assert_eq!(claims.aud, vec!["a", "b"]);
        assert_eq!(claims.appid.as_deref(), Some("client"));
        assert_eq!(claims.exp, Some(17));
        assert!(claims.roles.is_empty());
    }

    #[test]
    fn opaque_and_malformed_tokens_give_none() {
        for token in [
            "opaque-token",
            "a.b",
            "a.!!!.c",
            "a.b.c.d.e",
            "e30.bm90IGpzb24.x",
        ] {
            assert_eq!(decode_claims(token), None, "{token}");
        }
    }
}
