//! Route selection and path safety.
//!
//! Owns three things: the prefix table (longest prefix wins, matched on the raw path), the
//! path checks that refuse traversal tricks before anything is routed, and building the
//! upstream URI. The path is never decoded or re-encoded: what passed the check is what
//! the upstream receives, byte for byte (Business Central keys such as
//! `Company('CRONUS%20USA')` depend on it). The query string is opaque and kept as is.

use http::Uri;
use http::uri::PathAndQuery;

use crate::config::Upstream;

/// Why a request path was refused (always 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    #[error("the request target must be a path starting with '/'")]
    NotOriginForm,
    #[error("dot segments ('.' or '..', in any encoding) are not allowed in the path")]
    DotSegment,
    #[error("encoded slashes or backslashes are not allowed in the path")]
    EncodedSeparator,
    #[error("backslashes are not allowed in the path")]
    Backslash,
    #[error("control characters are not allowed in the path")]
    ControlCharacter,
    #[error("letters, digits, '-' and '_' must not be percent-encoded in the path")]
    EncodedUnreserved,
}

/// Refuses paths that could mean something else to the upstream than to the route table:
/// dot segments in any encoding (RFC 3986 §5.2.4), encoded `/` and `\` (a backend that
/// decodes them would see other segments), raw `\` (Microsoft stacks treat it as `/`),
/// control bytes raw or encoded (request splitting, truncation at NUL), and needlessly
/// encoded unreserved characters (another spelling of a path a narrower route owns).
pub(crate) fn check_path(path: &str) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::Backslash),
            // Never part of a parsed path; refused so the upstream URI cannot end early.
            b'#' | b'?' => return Err(PathError::NotOriginForm),
            b if b < 0x20 || b == 0x7f => return Err(PathError::ControlCharacter),
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
                match decoded {
                    Some(b'/' | b'\\') => return Err(PathError::EncodedSeparator),
                    Some(b) if b < 0x20 || b == 0x7f => return Err(PathError::ControlCharacter),
                    // RFC 3986 §2.3: these mean the same encoded or not, so a backend would
                    // see `%73ystemusers` as `systemusers` while the route table did not.
                    // `%7E` (~) stays allowed: older encoders produce it.
                    Some(b) if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') => {
                        return Err(PathError::EncodedUnreserved);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        i += 1;
    }
    if path.split('/').any(is_dot_segment) {
        return Err(PathError::DotSegment);
    }
    Ok(())
}

/// `.` or `..` with any of the dots written as `%2e` / `%2E`.
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && rest[2] | 0x20 == b'e' {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// Prefixes sorted longest first, so the first match is the longest.
#[derive(Debug, Clone)]
pub(crate) struct RouteTable {
    /// (prefix, index into the caller's route list)
    entries: Vec<(String, usize)>,
}

impl RouteTable {
    pub(crate) fn new<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> Self {
        let mut entries: Vec<(String, usize)> = prefixes
            .into_iter()
            .enumerate()
            .map(|(index, prefix)| (prefix.to_owned(), index))
            .collect();
        entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Self { entries }
    }

    /// The index of the route with the longest prefix of `path`, and the rest of the path
    /// after that prefix.
    pub(crate) fn lookup<'p>(&self, path: &'p str) -> Option<(usize, &'p str)> {
        self.entries.iter().find_map(|(prefix, index)| {
            path.strip_prefix(prefix.as_str())
                .map(|rest| (*index, rest))
        })
    }
}

/// `upstream` base + `rest` of the path (byte for byte) + `?query`.
pub(crate) fn upstream_uri(
    upstream: &Upstream,
    rest: &str,
    query: Option<&str>,
) -> Result<Uri, http::Error> {
    let mut path_and_query = String::with_capacity(
        upstream.base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1),
    );
    path_and_query.push_str(&upstream.base_path);
    path_and_query.push_str(rest);
    if let Some(query) = query {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(PathAndQuery::try_from(path_and_query)?)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_business_central_paths() {
        for path in [
            "/",
            "/bc/",
            "/bc/api/v2.0/companies",
            "/bc/ODataV4/Company('CRONUS%20USA')/Customers",
            "/bc/x.json",
            "/bc/...",
            "/bc/.well-known/x",
            "/bc//double",
            "/bc/100%25",
            "/bc/%252e%252e/x",
            "/bc/a%2",
        ] {
            assert_eq!(check_path(path), Ok(()), "{path}");
        }
    }

    #[test]
    fn refuses_traversal_in_every_spelling() {
        for path in [
            "/bc/../crm/x",
            "/bc/./x",
            "/bc/..",
            "/bc/%2e%2e/crm",
            "/bc/%2E%2e/crm",
            "/bc/.%2e/crm",
            "/bc/%2e./crm",
            "/bc/%2e/crm",
            "/bc//..//crm/x",
        ] {
            assert_eq!(check_path(path), Err(PathError::DotSegment), "{path}");
        }
    }

    #[test]
    fn refuses_separators_and_controls() {
        assert_eq!(
            check_path("/bc%2f..%2fcrm/x"),
            Err(PathError::EncodedSeparator)
        );
        assert_eq!(check_path("/bc/..%2Fcrm"), Err(PathError::EncodedSeparator));
        assert_eq!(
            check_path("/bc/%5c../crm"),
            Err(PathError::EncodedSeparator)
        );
        assert_eq!(check_path("/bc/%5C"), Err(PathError::EncodedSeparator));
        assert_eq!(check_path("/bc\\..\\crm"), Err(PathError::Backslash));
        assert_eq!(
            check_path("/bc/x%00.json"),
            Err(PathError::ControlCharacter)
        );
        assert_eq!(
            check_path("/bc/x%0d%0aHost:%20evil"),
            Err(PathError::ControlCharacter)
        );
        assert_eq!(check_path("/bc/%09x"), Err(PathError::ControlCharacter));
        assert_eq!(check_path("/bc/%7F"), Err(PathError::ControlCharacter));
        assert_eq!(
            check_path("/crm/%73ystemusers"),
            Err(PathError::EncodedUnreserved)
        );
        assert_eq!(check_path("/bc/%41"), Err(PathError::EncodedUnreserved));
        assert_eq!(check_path("/bc/a%5fb"), Err(PathError::EncodedUnreserved));
        assert_eq!(check_path("/bc/%7Euser"), Ok(()));
        assert_eq!(check_path("*"), Err(PathError::NotOriginForm));
        // Found by the `path` fuzz target: a raw `#` would cut the upstream URI short.
        assert_eq!(check_path("/bc/!#/b="), Err(PathError::NotOriginForm));
        assert_eq!(check_path("/bc/x?y"), Err(PathError::NotOriginForm));
        assert_eq!(check_path(""), Err(PathError::NotOriginForm));
    }

    #[test]
    fn longest_prefix_wins() {
        let table = RouteTable::new(["/bc/", "/bc/sandbox/", "/crm/"]);
        assert_eq!(table.lookup("/bc/sandbox/x"), Some((1, "x")));
        assert_eq!(table.lookup("/bc/x"), Some((0, "x")));
        assert_eq!(table.lookup("/bc/"), Some((0, "")));
        assert_eq!(table.lookup("/crm/a/b"), Some((2, "a/b")));
        assert_eq!(table.lookup("/bc"), None);
        assert_eq!(table.lookup("/BC/x"), None);
        assert_eq!(table.lookup("/other"), None);
    }

    #[test]
    fn upstream_uri_appends_path_and_query_byte_for_byte() {
        let upstream = Upstream {
            url: "https://api.example.test/v2.0/t/Production/"
                .parse()
                .unwrap(),
            scheme: http::uri::Scheme::HTTPS,
            authority: "api.example.test".parse().unwrap(),
            host: "api.example.test".into(),
            base_path: "/v2.0/t/Production/".into(),
        };
        let uri = upstream_uri(
            &upstream,
            "ODataV4/Company('CRONUS%20USA')/Customers",
            Some("$filter=No%20eq%20'10000'&$top=5"),
        )
        .unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.example.test/v2.0/t/Production/ODataV4/Company('CRONUS%20USA')/Customers?$filter=No%20eq%20'10000'&$top=5"
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Percent-decodes everything (what a lenient backend might do), lossy.
        fn decode(path: &str) -> String {
            let bytes = path.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%'
                    && let Some(b) = bytes
                        .get(i + 1..i + 3)
                        .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())
                {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(bytes[i]);
                i += 1;
            }
            String::from_utf8_lossy(&out).replace('\\', "/")
        }

        /// RFC 3986 §5.2.4 remove_dot_segments, as a backend would apply it.
        fn remove_dot_segments(path: &str) -> String {
            let mut out: Vec<&str> = Vec::new();
            for segment in path.split('/').skip(1) {
                match segment {
                    "." => {}
                    ".." => {
                        out.pop();
                    }
                    other => out.push(other),
                }
            }
            format!("/{}", out.join("/"))
        }

        fn upstream() -> Upstream {
            Upstream {
                url: "https://bc.test/v2.0/t/Production/".parse().unwrap(),
                scheme: http::uri::Scheme::HTTPS,
                authority: "bc.test".parse().unwrap(),
                host: "bc.test".into(),
                base_path: "/v2.0/t/Production/".into(),
            }
        }

        /// Paths built from the pieces attackers use.
        fn hostile_path() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                1 => Just("..".to_owned()),
                1 => Just(".".to_owned()),
                1 => Just("%2e".to_owned()),
                1 => Just("%2E".to_owned()),
                1 => Just("%2f".to_owned()),
                1 => Just("%5c".to_owned()),
                1 => Just("%00".to_owned()),
                1 => Just("%25".to_owned()),
                1 => Just("%41".to_owned()),
                1 => Just("\\".to_owned()),
                1 => Just("/".to_owned()),
                1 => Just("//".to_owned()),
                8 => "[a-zA-Z0-9()'_~-]{1,6}",
            ];
            prop::collection::vec(piece, 0..12)
                .prop_map(|pieces| format!("/bc/{}", pieces.concat()))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, max_global_rejects: 20_000, ..ProptestConfig::default() })]

            #[test]
            fn the_check_is_deterministic(path in hostile_path()) {
                prop_assert_eq!(check_path(&path), check_path(&path));
            }

            #[test]
            fn a_passing_path_never_leaves_its_upstream_base(path in hostile_path()) {
                prop_assume!(check_path(&path).is_ok());
                let table = RouteTable::new(["/bc/"]);
                let (_, rest) = table.lookup(&path).unwrap();
                let uri = upstream_uri(&upstream(), rest, None).unwrap();
                // Whatever the backend decodes and normalises, it stays under the base.
                let resolved = remove_dot_segments(&decode(uri.path()));
                prop_assert!(resolved.starts_with("/v2.0/t/Production"), "{} -> {}", path, resolved);
            }

            #[test]
            fn the_forwarded_path_is_byte_identical_to_the_checked_one(path in hostile_path(), query in "[a-z$=%0-9&']{0,12}") {
                prop_assume!(check_path(&path).is_ok());
                let table = RouteTable::new(["/bc/"]);
                let (_, rest) = table.lookup(&path).unwrap();
                let query = (!query.is_empty()).then_some(query.as_str());
                let uri = upstream_uri(&upstream(), rest, query).unwrap();
                prop_assert_eq!(uri.path(), format!("/v2.0/t/Production/{rest}"));
                prop_assert_eq!(uri.query(), query);
            }
        }
    }
}
