//! Route selection and path safety.
//!
//! Owns three things: the checks that refuse ambiguous request targets before anything is
//! routed, the prefix table, and building the upstream URI. Routing (and so authorization,
//! which is per route) looks at one canonical form of the path:
//!
//! - **Canonical form.** Percent-encoded unreserved characters (`%41`, `%7E`; RFC 3986
//!   §2.3) are decoded (§6.2.2.2) and ASCII letters compare case-insensitively, because the
//!   Microsoft front ends (IIS, HTTP.sys, the Dynamics services) decode escapes and route
//!   case-insensitively: `/bc/%41DMIN/x` is `/bc/admin/x` to them and so to the route table.
//!   When comparing with a prefix, an escape of any other printable character a prefix may
//!   hold (`%24` for `$`, `%28` for `(`) counts as that character too, since upstreams
//!   decode those before they route; and the percent-encoded UTF-8 of the four code points
//!   whose case mapping is ASCII (`ı`, `İ`, `ſ`, the Kelvin sign) counts as `i`, `i`, `s`,
//!   `k`, since .NET's case-insensitive comparisons fold them so.
//! - **Refused spellings.** What the canonical form cannot absorb is refused with 400 by
//!   [`check_target`]: dot segments in any encoding (RFC 3986 §5.2.4), encoded `/` and `\`
//!   and raw `\` (Microsoft stacks treat `\` as `/`), empty segments (`//`, collapsed by
//!   many servers), `;` in any encoding (matrix parameters: `..;`, `admin;x`), segments
//!   ending in `.` or a space, raw or encoded (Windows strips them, so `admin.` is
//!   `admin`), malformed escapes including IIS's `%u0061`, control bytes raw or encoded,
//!   and any raw byte outside printable ASCII in the path or the query (non-ASCII must
//!   arrive percent-encoded as UTF-8; C1 controls, U+2028 and bidi overrides never reach a
//!   log or an upstream).
//! - **What a prefix claims.** A prefix `P/` owns `P/…` and also `P` itself, `P(…)` (an
//!   OData key, so `/crm/systemusers/` owns `/crm/systemusers(…)`) and `P` followed by an
//!   escaped `?` or `#` (for backends that decode before they split off the query); the
//!   query is not part of the path, so `P?…` is `P`. For `P/rest` the upstream path is the
//!   upstream base (which ends in `/`) + `rest`; for `P` and `P(…)` it is the base without
//!   its trailing `/` + what follows `P`: `/crm/systemusers(1)` on a route to
//!   `…/v9.2/systemusers/` goes to `…/v9.2/systemusers(1)` (on a base of just `/`, `/(1)`).
//! - **What is forwarded.** The matched prefix is replaced by the upstream base; the rest
//!   of the path is sent in its canonical, decoded-unreserved form, every other byte as
//!   received, never re-encoded (`Company('CRONUS%20USA')` arrives unchanged). Decoding
//!   unreserved characters never changes what a URI means (§2.3), and the upstream then
//!   receives the very spelling routing decided on instead of being trusted to decode
//!   `%41` as the router did (a backend that does not would otherwise see a name the
//!   router never compared). Reserved characters keep their escapes: decoding them could
//!   change the meaning (§2.2). The query is opaque and forwarded as received. Nothing is
//!   allocated for a path with nothing to decode.
//!
//! The upstream is assumed to decode the path once: `%2541` is `%41` to it, not `A` (IIS
//! refuses double escapes outright by default, `allowDoubleEscaping: false`).

use std::borrow::Cow;

use http::Uri;
use http::uri::PathAndQuery;

use crate::config::Upstream;

/// Why a request target was refused (always 400).
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
    #[error("the request target must be printable ASCII; percent-encode other bytes as UTF-8")]
    Unprintable,
    #[error("'%' must be followed by two hexadecimal digits ('%u' escapes are not allowed)")]
    BadEscape,
    #[error("empty path segments ('//') are not allowed")]
    EmptySegment,
    #[error("';' is not allowed in the path, in any encoding")]
    Semicolon,
    #[error("a path segment must not end in '.' or a space, in any encoding")]
    SegmentEnd,
}

/// Checks the request target: the path with [`check_path`], and the query for raw bytes
/// outside printable ASCII (its escapes are opaque and forwarded as received).
pub(crate) fn check_target(path: &str, query: Option<&str>) -> Result<(), PathError> {
    check_path(path)?;
    match query.and_then(|query| query.bytes().find(|b| !b.is_ascii_graphic())) {
        None => Ok(()),
        Some(b) if b.is_ascii_control() => Err(PathError::ControlCharacter),
        Some(_) => Err(PathError::Unprintable),
    }
}

/// Refuses paths that could mean something to the upstream other than what the route
/// table sees in them (the list is in this module's header).
pub(crate) fn check_path(path: &str) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                match escape(bytes, i).ok_or(PathError::BadEscape)? {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    b';' => return Err(PathError::Semicolon),
                    b if b.is_ascii_control() => return Err(PathError::ControlCharacter),
                    _ => {}
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            // Never part of a parsed path; refused so the upstream URI cannot end early.
            b'#' | b'?' => return Err(PathError::NotOriginForm),
            b';' => return Err(PathError::Semicolon),
            b if b.is_ascii_control() => return Err(PathError::ControlCharacter),
            b if !b.is_ascii_graphic() => return Err(PathError::Unprintable),
            _ => {}
        }
        i += 1;
    }
    // After the leading '/'; a trailing '/' leaves one last empty segment, which is fine.
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            if segments.peek().is_some() {
                return Err(PathError::EmptySegment);
            }
            continue;
        }
        check_segment(segment)?;
    }
    Ok(())
}

/// `.` and `..` in any encoding, and (Windows strips them) a trailing `.` or space.
fn check_segment(segment: &str) -> Result<(), PathError> {
    let (mut length, mut dots, mut last) = (0, 0, 0);
    for b in Decoded::new(segment.as_bytes()) {
        length += 1;
        dots += usize::from(b == b'.');
        last = b;
    }
    if dots == length && length <= 2 {
        return Err(PathError::DotSegment);
    }
    if matches!(last, b'.' | b' ') {
        return Err(PathError::SegmentEnd);
    }
    Ok(())
}

/// The byte a `%XX` escape at `i` stands for, if it is one.
fn escape(bytes: &[u8], i: usize) -> Option<u8> {
    let hex = bytes.get(i + 1..i + 3)?;
    let digit = |b: u8| char::from(b).to_digit(16);
    Some((digit(hex[0])? * 16 + digit(hex[1])?) as u8)
}

/// The bytes of a path with every valid escape decoded.
struct Decoded<'a> {
    bytes: &'a [u8],
    i: usize,
}

impl<'a> Decoded<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, i: 0 }
    }
}

impl Iterator for Decoded<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.i)?;
        if b == b'%'
            && let Some(decoded) = escape(self.bytes, self.i)
        {
            self.i += 3;
            return Some(decoded);
        }
        self.i += 1;
        Some(b)
    }
}

/// RFC 3986 §2.3: ALPHA, DIGIT, `-`, `.`, `_`, `~`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The canonical form of a (checked) path: escapes of unreserved characters decoded, every
/// other byte as received. Borrowed when there is nothing to decode.
pub(crate) fn canonical(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while let Some(offset) = memchr::memchr(b'%', &bytes[i..]) {
        let at = i + offset;
        match escape(bytes, at) {
            Some(b) if is_unreserved(b) => {
                let out = out.get_or_insert_with(|| String::with_capacity(path.len()));
                out.push_str(&path[copied..at]);
                out.push(char::from(b));
                copied = at + 3;
                i = at + 3;
            }
            _ => i = at + 1,
        }
    }
    match out {
        None => Cow::Borrowed(path),
        Some(mut out) => {
            out.push_str(&path[copied..]);
            Cow::Owned(out)
        }
    }
}

/// What a route's prefix left of the path, and where it goes on the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rest<'p> {
    /// After `P/`: appended to the upstream base.
    Under(&'p str),
    /// `P` itself (empty) or `P(…)`: appended to the upstream base without its trailing `/`.
    Beside(&'p str),
}

/// Prefixes sorted longest first, so the first match is the longest.
#[derive(Debug, Clone)]
pub(crate) struct RouteTable {
    /// (prefix, index into the caller's route list)
    entries: Vec<(String, usize)>,
}

impl RouteTable {
    /// Prefixes start and end with `/` and differ in more than ASCII case (as the config
    /// loader makes sure).
    pub(crate) fn new<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> Self {
        let mut entries: Vec<(String, usize)> = prefixes
            .into_iter()
            .enumerate()
            .map(|(index, prefix)| (prefix.to_owned(), index))
            .collect();
        entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Self { entries }
    }

    /// The index of the route whose prefix claims `path` (the longest one), and the rest
    /// of the path after that prefix. Allocates nothing.
    pub(crate) fn lookup<'p>(&self, path: &'p str) -> Option<(usize, Rest<'p>)> {
        self.entries
            .iter()
            .find_map(|(prefix, index)| claim(prefix, path).map(|rest| (*index, rest)))
    }
}

/// Whether `prefix` (`P/`) claims `path` in its canonical form, and what it leaves.
fn claim<'p>(prefix: &str, path: &'p str) -> Option<Rest<'p>> {
    let (_, name) = prefix.as_bytes().split_last()?;
    let bytes = path.as_bytes();
    let mut i = 0;
    for &expected in name {
        let (c, length) = compared(bytes, i)?;
        if !c.eq_ignore_ascii_case(&expected) {
            return None;
        }
        i += length;
    }
    // `i` only ever moved past ASCII bytes and escapes: it is a char boundary.
    match compared(bytes, i) {
        None => Some(Rest::Beside("")),
        Some((b'/', 1)) => Some(Rest::Under(&path[i + 1..])),
        Some((b'(' | b'?' | b'#', _)) => Some(Rest::Beside(&path[i..])),
        Some(_) => None,
    }
}

/// The character at `i` as prefix comparison sees it, and how many bytes spell it.
fn compared(bytes: &[u8], i: usize) -> Option<(u8, usize)> {
    let b = *bytes.get(i)?;
    if b != b'%' {
        return Some((b, 1));
    }
    match escape(bytes, i) {
        // An escaped '/' is never a separator (and refused before routing anyway).
        Some(decoded) if decoded.is_ascii_graphic() && decoded != b'/' => Some((decoded, 3)),
        // UTF-8 of ı (U+0131), İ (U+0130), ſ (U+017F), K (U+212A): their case mappings
        // are ASCII letters, so case-insensitive .NET comparisons match them with `i`,
        // `s`, `k`.
        Some(0xc4) if matches!(escape(bytes, i + 3), Some(0xb0 | 0xb1)) => Some((b'i', 6)),
        Some(0xc5) if escape(bytes, i + 3) == Some(0xbf) => Some((b's', 6)),
        Some(0xe2) if escape(bytes, i + 3) == Some(0x84) && escape(bytes, i + 6) == Some(0xaa) => {
            Some((b'k', 9))
        }
        _ => Some((b'%', 1)),
    }
}

/// The upstream URI: the base (without its trailing `/` for [`Rest::Beside`]), the
/// canonical form of the rest, and `?query` as received.
pub(crate) fn upstream_uri(
    upstream: &Upstream,
    rest: Rest<'_>,
    query: Option<&str>,
) -> Result<Uri, http::Error> {
    let (base, rest) = match rest {
        Rest::Under(rest) => (upstream.base_path.as_str(), rest),
        Rest::Beside(rest) => (
            match upstream.base_path.strip_suffix('/') {
                Some(base) if !base.is_empty() => base,
                _ => upstream.base_path.as_str(),
            },
            rest,
        ),
    };
    let rest = canonical(rest);
    let mut path_and_query =
        String::with_capacity(base.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
    path_and_query.push_str(base);
    path_and_query.push_str(&rest);
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
            "/bc/.well-known/x",
            "/bc/100%25",
            "/bc/%252e%252e/x",
            "/bc/%41",
            "/bc/a%5fb",
            "/bc/%7Euser",
            "/bc/Company('M%C3%BCller%20GmbH')",
            "/bc/%E2%80%AE",
            "/bc/a.b/c%20d",
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
        assert_eq!(check_path("/bc/\u{7f}"), Err(PathError::ControlCharacter));
        assert_eq!(check_path("*"), Err(PathError::NotOriginForm));
        // Found by the `path` fuzz target: a raw `#` would cut the upstream URI short.
        assert_eq!(check_path("/bc/!#/b="), Err(PathError::NotOriginForm));
        assert_eq!(check_path("/bc/x?y"), Err(PathError::NotOriginForm));
        assert_eq!(check_path(""), Err(PathError::NotOriginForm));
    }

    #[test]
    fn refuses_spellings_a_microsoft_front_end_reads_differently() {
        for (path, error) in [
            ("/bc//admin/x", PathError::EmptySegment),
            ("//bc/x", PathError::EmptySegment),
            ("/bc//..//crm/x", PathError::EmptySegment),
            ("/bc/admin;x/x", PathError::Semicolon),
            ("/bc/..;/admin/x", PathError::Semicolon),
            ("/bc/.;/admin/x", PathError::Semicolon),
            ("/bc/admin%3bx/x", PathError::Semicolon),
            ("/bc/admin%3B", PathError::Semicolon),
            ("/bc/admin./x", PathError::SegmentEnd),
            ("/bc/admin.", PathError::SegmentEnd),
            ("/bc/admin%2e/x", PathError::SegmentEnd),
            ("/bc/admin%2E", PathError::SegmentEnd),
            ("/bc/admin%20/x", PathError::SegmentEnd),
            ("/bc/admin%20", PathError::SegmentEnd),
            ("/bc/admin.%20/x", PathError::SegmentEnd),
            ("/bc/...", PathError::SegmentEnd),
            ("/bc/%2e%2e%2e/x", PathError::SegmentEnd),
            ("/bc/%u0061dmin/x", PathError::BadEscape),
            ("/bc/%U0061dmin/x", PathError::BadEscape),
            ("/bc/%%34%31dmin", PathError::BadEscape),
            ("/bc/a%2", PathError::BadEscape),
            ("/bc/a%", PathError::BadEscape),
            ("/bc/a%zz", PathError::BadEscape),
            ("/bc/a%+1", PathError::BadEscape),
            ("/bc/adm\u{131}n/x", PathError::Unprintable),
            ("/bc/caf\u{e9}", PathError::Unprintable),
            ("/bc/x\u{85}", PathError::Unprintable),
            ("/bc/x\u{2028}", PathError::Unprintable),
            ("/bc/x\u{202e}", PathError::Unprintable),
            ("/bc/a b", PathError::Unprintable),
        ] {
            assert_eq!(check_path(path), Err(error), "{path}");
        }
    }

    #[test]
    fn the_query_must_be_printable_ascii_and_is_otherwise_opaque() {
        assert_eq!(check_target("/bc/x", None), Ok(()));
        assert_eq!(
            check_target("/bc/x", Some("$filter=a%20eq%20'%C3%A9'&/../..;%00")),
            Ok(())
        );
        for query in ["a=\u{e9}", "a=\u{2028}", "a=\u{202e}", "a=\u{85}", "a= b"] {
            assert_eq!(
                check_target("/bc/x", Some(query)),
                Err(PathError::Unprintable),
                "{query}"
            );
        }
        assert_eq!(
            check_target("/bc/x", Some("a=\t")),
            Err(PathError::ControlCharacter)
        );
        assert_eq!(
            check_target("/bc/../x", Some("a")),
            Err(PathError::DotSegment)
        );
    }

    #[test]
    fn canonical_form_decodes_unreserved_escapes_only() {
        assert_eq!(canonical("/bc/%41dmin/%7euser"), "/bc/Admin/~user");
        assert_eq!(canonical("/a%2D%5f%2E%30z"), "/a-_.0z");
        assert_eq!(
            canonical("/Company('CRONUS%20USA')/%28%27x%27%29/100%25/%252e"),
            "/Company('CRONUS%20USA')/%28%27x%27%29/100%25/%252e"
        );
        assert_eq!(canonical("/%C3%A9%41"), "/%C3%A9A");
        assert!(matches!(
            canonical("/bc/Company('CRONUS%20USA')"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(canonical("/bc/x"), Cow::Borrowed(_)));
    }

    #[test]
    fn longest_prefix_wins() {
        let table = RouteTable::new(["/bc/", "/bc/sandbox/", "/crm/"]);
        assert_eq!(table.lookup("/bc/sandbox/x"), Some((1, Rest::Under("x"))));
        assert_eq!(table.lookup("/bc/x"), Some((0, Rest::Under("x"))));
        assert_eq!(table.lookup("/bc/"), Some((0, Rest::Under(""))));
        assert_eq!(table.lookup("/crm/a/b"), Some((2, Rest::Under("a/b"))));
        assert_eq!(table.lookup("/bc"), Some((0, Rest::Beside(""))));
        assert_eq!(table.lookup("/BC/x"), Some((0, Rest::Under("x"))));
        assert_eq!(table.lookup("/bcx"), None);
        assert_eq!(table.lookup("/other"), None);
        assert_eq!(table.lookup(""), None);
        let root = RouteTable::new(["/", "/admin/"]);
        assert_eq!(root.lookup("/x"), Some((0, Rest::Under("x"))));
        assert_eq!(root.lookup("/ADMIN"), Some((1, Rest::Beside(""))));
    }

    #[test]
    fn a_prefix_claims_every_spelling_of_itself_its_keys_and_an_escaped_query() {
        let table = RouteTable::new(["/crm/", "/crm/systemusers/", "/bc/", "/bc/admin/"]);
        for (path, rest) in [
            ("/crm/systemusers", Rest::Beside("")),
            ("/crm/systemusers/", Rest::Under("")),
            ("/crm/systemusers(1)", Rest::Beside("(1)")),
            ("/crm/SystemUsers(1)/x", Rest::Beside("(1)/x")),
            ("/crm/systemusers%28'x'%29", Rest::Beside("%28'x'%29")),
            ("/crm/systemusers%3Fx", Rest::Beside("%3Fx")),
            ("/crm/systemusers%23x", Rest::Beside("%23x")),
            ("/crm/%73ystemusers/x", Rest::Under("x")),
            ("/crm/SYSTEMUSERS/x", Rest::Under("x")),
            ("/crm/sy%53tem%75sers/%41", Rest::Under("%41")),
            ("/CRM/SystemUsers", Rest::Beside("")),
            ("/%63rm/systemusers", Rest::Beside("")),
        ] {
            assert_eq!(table.lookup(path), Some((1, rest)), "{path}");
        }
        for (path, rest) in [
            ("/bc/adm%C4%B1n/x", Rest::Under("x")),
            ("/bc/adm%c4%b0n", Rest::Beside("")),
            ("/bc/%61%64%6D%69%6E(1)", Rest::Beside("(1)")),
        ] {
            assert_eq!(table.lookup(path), Some((3, rest)), "{path}");
        }
        for (path, index, rest) in [
            ("/crm/systemusersx", 0, "systemusersx"),
            ("/crm/systemusers-x/y", 0, "systemusers-x/y"),
            ("/crm/x/systemusers/y", 0, "x/systemusers/y"),
            ("/crm/systemusers%2F", 0, "systemusers%2F"),
            ("/bc/adm%C4%B2n", 2, "adm%C4%B2n"),
            ("/bc/administrators", 2, "administrators"),
        ] {
            assert_eq!(
                table.lookup(path),
                Some((index, Rest::Under(rest))),
                "{path}"
            );
        }
    }

    fn upstream(base_path: &str) -> Upstream {
        Upstream {
            url: format!("https://api.example.test{base_path}")
                .parse()
                .unwrap(),
            scheme: http::uri::Scheme::HTTPS,
            authority: "api.example.test".parse().unwrap(),
            host: "api.example.test".into(),
            base_path: base_path.into(),
        }
    }

    #[test]
    fn upstream_uri_appends_the_canonical_path_and_the_query_as_received() {
        let uri = upstream_uri(
            &upstream("/v2.0/t/Production/"),
            Rest::Under("ODataV4/Company('CRONUS%20USA')/Customers"),
            Some("$filter=No%20eq%20'10000'&$top=5"),
        )
        .unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.example.test/v2.0/t/Production/ODataV4/Company('CRONUS%20USA')/Customers?$filter=No%20eq%20'10000'&$top=5"
        );
        let uri = upstream_uri(
            &upstream("/v2.0/t/Production/"),
            Rest::Under("%7Euser/%41%2541"),
            Some("%41"),
        )
        .unwrap();
        assert_eq!(
            uri.path_and_query().unwrap(),
            "/v2.0/t/Production/~user/A%2541?%41"
        );
    }

    #[test]
    fn a_prefix_itself_and_its_keys_go_to_the_base_without_its_slash() {
        let users = upstream("/api/data/v9.2/systemusers/");
        for (rest, query, expected) in [
            ("", None, "/api/data/v9.2/systemusers"),
            ("", Some("$top=1"), "/api/data/v9.2/systemusers?$top=1"),
            ("(1)", None, "/api/data/v9.2/systemusers(1)"),
            (
                "%28'%41'%29/x",
                None,
                "/api/data/v9.2/systemusers%28'A'%29/x",
            ),
        ] {
            let uri = upstream_uri(&users, Rest::Beside(rest), query).unwrap();
            assert_eq!(uri.path_and_query().unwrap(), expected, "{rest}");
        }
        let root = upstream("/");
        let uri = upstream_uri(&root, Rest::Beside(""), None).unwrap();
        assert_eq!(uri.path_and_query().unwrap(), "/");
        let uri = upstream_uri(&root, Rest::Beside("(1)"), None).unwrap();
        assert_eq!(uri.path_and_query().unwrap(), "/(1)");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::fuzzing::{lenient_view, reaches};

        const PRODUCTION: &str = "/v2.0/t/Production/";
        const ADMIN: &str = "/v2.0/t/Production/admin/";

        /// Paths built from the pieces attackers use.
        fn hostile_path() -> impl Strategy<Value = String> {
            // Pieces that always get a path refused are drawn together, so that enough
            // generated paths pass for the properties about passing paths.
            let refused = prop::sample::select(vec![
                "%2f", "%5c", "%00", "%u0061", ";", "%3B", "\\", "\u{e9}", "//",
            ])
            .prop_map(str::to_owned);
            let piece = prop_oneof![
                1 => Just("..".to_owned()),
                1 => Just(".".to_owned()),
                1 => Just("%2e".to_owned()),
                1 => Just("%2E".to_owned()),
                1 => Just("%25".to_owned()),
                1 => Just("%41".to_owned()),
                1 => Just("%7e".to_owned()),
                1 => Just("%20".to_owned()),
                1 => Just("%28".to_owned()),
                2 => Just("/".to_owned()),
                2 => refused,
                12 => "[a-zA-Z0-9()'_~-]{1,6}",
            ];
            prop::collection::vec(piece, 0..12)
                .prop_map(|pieces| format!("/bc/{}", pieces.concat()))
        }

        /// One character of `admin`, spelt any way an upstream would still read as it.
        fn spelling(c: char) -> impl Strategy<Value = String> {
            let upper = c.to_ascii_uppercase();
            let mut spellings = vec![
                c.to_string(),
                c.to_string(),
                upper.to_string(),
                format!("%{:02x}", c as u8),
                format!("%{:02X}", upper as u8),
            ];
            if c == 'i' {
                spellings.extend(["%C4%B1".to_owned(), "%c4%b0".to_owned()]);
            }
            // Refused outright, so rarely worth generating.
            let refused =
                prop::sample::select(vec![format!("%u{:04x}", c as u8), "\u{131}".to_owned()]);
            prop_oneof![12 => prop::sample::select(spellings), 1 => refused]
        }

        /// `admin` in some spelling, with what may come around it.
        fn nested_spelling() -> impl Strategy<Value = String> {
            let name = "admin"
                .chars()
                .map(spelling)
                .collect::<Vec<_>>()
                .prop_map(|chars| chars.concat());
            let before = prop::sample::select(vec![
                "", "/", "./", "%2e/", "x/../", "..;/", ";/", "x;/../", "\\", "x\\..\\",
            ]);
            let after = prop::sample::select(vec![
                "",
                "/",
                "/x",
                "(1)",
                "%28'x'%29",
                "%3Fx",
                "%23x",
                ".",
                "%2e",
                "%2E/x",
                "%20",
                "%20/x",
                ".%20",
                ";",
                ";x/x",
                "%3b/x",
                "/..;/x",
                "//x",
                "\\x",
                "%2Fx",
                "%5Cx",
                "s",
                "x/y",
                "%C2%A0",
                "\u{2028}",
                "/%2e%2e/x",
            ]);
            (before, name, after)
                .prop_map(|(before, name, after)| format!("/bc/{before}{name}{after}"))
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
                let uri = upstream_uri(&upstream(PRODUCTION), rest, None).unwrap();
                // Whatever the backend decodes and normalises, it stays under the base.
                prop_assert!(reaches(&lenient_view(uri.path()), PRODUCTION), "{} -> {}", path, uri);
            }

            #[test]
            fn the_forwarded_path_is_the_canonical_form_of_the_checked_one(path in hostile_path(), query in "[a-z$=%0-9&']{0,12}") {
                prop_assume!(check_path(&path).is_ok());
                let table = RouteTable::new(["/bc/"]);
                let (_, rest) = table.lookup(&path).unwrap();
                let Rest::Under(rest) = rest else { panic!("{path}") };
                let query = (!query.is_empty()).then_some(query.as_str());
                let uri = upstream_uri(&upstream(PRODUCTION), Rest::Under(rest), query).unwrap();
                prop_assert_eq!(uri.path(), format!("{PRODUCTION}{}", canonical(rest)));
                prop_assert_eq!(uri.query(), query);
                // Only unreserved escapes were decoded: what any decoder sees is unchanged.
                prop_assert_eq!(Decoded::new(uri.path().as_bytes()).collect::<Vec<_>>(),
                    Decoded::new(format!("{PRODUCTION}{rest}").as_bytes()).collect::<Vec<_>>());
                prop_assert_eq!(canonical(uri.path()), uri.path());
            }

            #[test]
            fn case_and_unreserved_escapes_never_change_the_route(path in hostile_path()) {
                let table = RouteTable::new(["/bc/", "/bc/admin/", "/bc/a/"]);
                let route = table.lookup(&path).map(|(index, _)| index);
                prop_assert_eq!(table.lookup(&canonical(&path)).map(|(index, _)| index), route);
                prop_assert_eq!(table.lookup(&path.to_ascii_uppercase()).map(|(index, _)| index), route);
                prop_assert_eq!(table.lookup(&path.to_ascii_lowercase()).map(|(index, _)| index), route);
            }

        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

            #[test]
            fn a_parent_route_caller_never_reaches_the_nested_routes_upstream_path(path in nested_spelling()) {
                // Refused spellings (400) reach nothing.
                if check_path(&path).is_err() {
                    return Ok(());
                }
                let table = RouteTable::new(["/bc/", "/bc/admin/"]);
                let (index, rest) = table.lookup(&path).unwrap();
                let base = [PRODUCTION, ADMIN][index];
                let uri = upstream_uri(&upstream(base), rest, None).unwrap();
                let view = lenient_view(uri.path());
                prop_assert!(reaches(&view, base), "{} -> {}", path, view);
                if index == 0 {
                    prop_assert!(!reaches(&view, ADMIN), "{} -> {}", path, view);
                }
            }
        }
    }
}
