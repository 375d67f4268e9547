//! Parsing of `Authorization: Basic` (RFC 7617).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};

/// Longest credentials accepted; anything longer is malformed, not worth decoding.
const MAX_ENCODED_LEN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// `None` when the header uses another scheme; otherwise the user-id and password, split
/// at the first colon (RFC 7617 §2: the user-id cannot contain one, the password can).
pub(crate) fn parse(value: &[u8]) -> Option<Result<(String, String), Malformed>> {
    let split = value.iter().position(|&b| b == b' ').unwrap_or(value.len());
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    Some(
        std::str::from_utf8(rest)
            .map_err(|_| Malformed)
            .and_then(|rest| decode(rest.trim_start_matches(' '))),
    )
}

fn decode(encoded: &str) -> Result<(String, String), Malformed> {
    if encoded.is_empty() || encoded.len() > MAX_ENCODED_LEN {
        return Err(Malformed);
    }
    let bytes = STANDARD
        .decode(encoded)
        .or_else(|_| STANDARD_NO_PAD.decode(encoded))
        .map_err(|_| Malformed)?;
    let text = String::from_utf8(bytes).map_err(|_| Malformed)?;
    if text.chars().any(char::is_control) {
        return Err(Malformed);
    }
    let (user, password) = text.split_once(':').ok_or(Malformed)?;
    if user.is_empty() {
        return Err(Malformed);
    }
    Ok((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn parses_rfc7617_forms() {
        let ok = |v: &str| parse(v.as_bytes()).unwrap().unwrap();
        assert_eq!(
            ok(&format!("Basic {}", b64("u:p"))),
            ("u".into(), "p".into())
        );
        assert_eq!(
            ok(&format!("basic {}", b64("u:p"))),
            ("u".into(), "p".into())
        );
        assert_eq!(
            ok(&format!("BASIC  {}", b64("u:p"))),
            ("u".into(), "p".into())
        );
        assert_eq!(
            ok(&format!("Basic {}", b64("u:p:extra"))),
            ("u".into(), "p:extra".into())
        );
        assert_eq!(ok("Basic dTpw"), ("u".into(), "p".into()));
        assert_eq!(
            ok(&format!("Basic {}", b64("u:"))),
            ("u".into(), String::new())
        );
    }

    #[test]
    fn other_schemes_are_not_basic() {
        assert!(parse(b"Bearer abc").is_none());
        assert!(parse(b"Basicx abc").is_none());
    }

    #[test]
    fn malformed_never_panics() {
        let long = format!("Basic {}", "A".repeat(64 * 1024));
        let cases = [
            "Basic".to_owned(),
            "Basic ".to_owned(),
            "Basic !!!".to_owned(),
            format!("Basic {}", b64("user")),
            format!("Basic {}", b64(":")),
            format!("Basic {}", b64(":p")),
            format!("Basic {}", b64("u\r\nX-Evil: 1:p")),
            format!("Basic {}", b64("u:p\0")),
            long,
        ];
        for case in cases {
            assert_eq!(parse(case.as_bytes()), Some(Err(Malformed)), "{case:.40}");
        }
        assert_eq!(parse(b"Basic \xff\xfe"), Some(Err(Malformed)));
        let invalid_utf8 = format!("Basic {}", STANDARD.encode([0xff, b':', b'p']));
        assert_eq!(parse(invalid_utf8.as_bytes()), Some(Err(Malformed)));
    }
}
