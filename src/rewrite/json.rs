//! A streaming scanner that rewrites OData link values in a JSON text.
//!
//! It does not parse JSON: it only tracks whether it is inside a string, remembers the
//! tail of the last string (a key, once a `:` follows it) and, when that key is a link
//! annotation, holds back the first bytes of the value string until it can tell whether
//! they are the upstream prefix. Memory is bounded by the prefix length and
//! [`KEY_TAIL`], whatever the size of the body or of any one string. Malformed JSON is
//! passed through; at worst a link stays unrewritten.

use bytes::BytesMut;

use super::{LinkMap, Matching, Step};

/// How much of a key is remembered: enough for `…@odata.mediaReadLink` and the batch
/// header names.
const KEY_TAIL: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between tokens.
    Between,
    /// Inside a string that may turn out to be a key.
    Key { escape: bool },
    /// Inside a link value, deciding whether it starts with the upstream prefix.
    Candidate,
    /// Inside a string whose fate is decided: copied as is.
    Pass { escape: bool },
}

#[derive(Debug)]
pub(crate) struct JsonRewriter {
    state: State,
    /// The last bytes of the current or last string; `key_len` counts all of it.
    key_tail: Vec<u8>,
    key_len: usize,
    /// The last string closed was a link key; a `:` next confirms it was a key.
    link_key: bool,
    /// A `:` after a link key was seen: the next string is a link value.
    link_value: bool,
    /// Raw bytes of a candidate value held back, and how many prefix bytes they match.
    held: Vec<u8>,
    matching: Option<Matching>,
    held_escape: bool,
}

impl JsonRewriter {
    pub(crate) fn new() -> Self {
        Self {
            state: State::Between,
            key_tail: Vec::with_capacity(KEY_TAIL),
            key_len: 0,
            link_key: false,
            link_value: false,
            held: Vec::new(),
            matching: None,
            held_escape: false,
        }
    }

    #[cfg(test)]
    /// Bytes held back between calls (for the memory bound).
    pub(crate) fn buffered(&self) -> usize {
        self.held.len() + self.key_tail.len()
    }

    /// Rewrites `input`, appending the result to `out`. Bytes that might start a link are
    /// held until the next call or [`finish`](Self::finish).
    pub(crate) fn push(&mut self, links: &LinkMap, input: &[u8], out: &mut BytesMut) {
        let mut i = 0;
        // Start of the bytes copied through unchanged, not yet appended to `out`.
        let mut copied = 0;
        while i < input.len() {
            match self.state {
                State::Between => {
                    let byte = input[i];
                    i += 1;
                    match byte {
                        b' ' | b'\t' | b'\r' | b'\n' => {}
                        b'"' if self.link_value => {
                            self.link_value = false;
                            self.link_key = false;
                            out.extend_from_slice(&input[copied..i]);
                            copied = i;
                            self.state = State::Candidate;
                            self.held.clear();
                            self.matching = Some(links.start());
                            self.held_escape = false;
                        }
                        b'"' => {
                            self.link_key = false;
                            self.key_tail.clear();
                            self.key_len = 0;
                            self.state = State::Key { escape: false };
                        }
                        b':' => {
                            self.link_value = self.link_key;
                            self.link_key = false;
                        }
                        _ => {
                            self.link_key = false;
                            self.link_value = false;
                        }
                    }
                }
                State::Key { escape } => {
                    let start = i;
                    let (end, closed, escape) = scan_string(input, i, escape);
                    self.remember(&input[start..end]);
                    i = if closed { end + 1 } else { end };
                    if closed {
                        self.link_key = is_link_key(&self.key_tail, self.key_len);
                        self.state = State::Between;
                    } else {
                        self.state = State::Key { escape };
                    }
                }
                State::Pass { escape } => {
                    let (end, closed, escape) = scan_string(input, i, escape);
                    i = if closed { end + 1 } else { end };
                    self.state = if closed {
                        State::Between
                    } else {
                        State::Pass { escape }
                    };
                }
                State::Candidate => {
                    let byte = input[i];
                    i += 1;
                    match self.candidate(links, byte) {
                        Decision::Undecided => {}
                        Decision::Rewrite => {
                            out.extend_from_slice(links.to());
                            self.held.clear();
                            copied = i;
                            self.state = State::Pass { escape: false };
                        }
                        Decision::Keep { closed } => {
                            out.extend_from_slice(&self.held);
                            self.held.clear();
                            copied = i;
                            // A mismatch never leaves an escape open: a `\` is
                            // held until the byte after it is seen.
                            self.state = if closed {
                                State::Between
                            } else {
                                State::Pass { escape: false }
                            };
                        }
                    }
                }
            }
        }
        if self.state != State::Candidate {
            out.extend_from_slice(&input[copied..]);
        }
    }

    /// Ends the text: whatever is held goes out unchanged.
    pub(crate) fn finish(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&self.held);
        self.held.clear();
        self.state = State::Between;
    }

    fn remember(&mut self, bytes: &[u8]) {
        self.key_len += bytes.len();
        let keep = bytes.len().min(KEY_TAIL);
        let bytes = &bytes[bytes.len() - keep..];
        let overflow = (self.key_tail.len() + bytes.len()).saturating_sub(KEY_TAIL);
        self.key_tail.drain(..overflow);
        self.key_tail.extend_from_slice(bytes);
    }

    /// Takes one byte of a candidate value. `\/` counts as `/` (JSON may escape it); any
    /// other escape, or the end of the string, before the whole prefix matched means the
    /// value does not start with it.
    fn candidate(&mut self, links: &LinkMap, byte: u8) -> Decision {
        self.held.push(byte);
        let matching = self.matching.get_or_insert_with(|| links.start());
        let step = if self.held_escape {
            self.held_escape = false;
            if byte == b'/' {
                links.step(matching, b'/')
            } else {
                return Decision::Keep { closed: false };
            }
        } else if byte == b'\\' {
            self.held_escape = true;
            return Decision::Undecided;
        } else if byte == b'"' {
            return Decision::Keep { closed: true };
        } else {
            links.step(matching, byte)
        };
        match step {
            Step::Partial => Decision::Undecided,
            Step::Complete => Decision::Rewrite,
            Step::Failed => Decision::Keep { closed: false },
        }
    }
}

enum Decision {
    Undecided,
    Rewrite,
    /// Not a match; `closed` when the byte ended the string.
    Keep {
        closed: bool,
    },
}

/// Scans string content from `start`: returns where it stopped (the closing quote's index
/// when `closed`, else the input's end) and the pending-escape state.
pub(crate) fn scan_string(input: &[u8], start: usize, mut escape: bool) -> (usize, bool, bool) {
    let mut i = start;
    while i < input.len() {
        if escape {
            escape = false;
            i += 1;
            continue;
        }
        match memchr::memchr2(b'"', b'\\', &input[i..]) {
            None => return (input.len(), false, false),
            Some(offset) => {
                i += offset;
                if input[i] == b'"' {
                    return (i, true, false);
                }
                escape = true;
                i += 1;
            }
        }
    }
    (input.len(), false, escape)
}

/// Whether a key names a link: `@odata.context`, `@odata.id`, any `@odata.…Link`
/// (`nextLink`, `deltaLink`, `editLink`, `readLink`, `mediaReadLink`, `navigationLink`,
/// …, also prefixed by a property as in `picture@odata.mediaReadLink`), or a response
/// header name inside a JSON `$batch` response (`location`, `content-location`,
/// `odata-entityid`). `@odata.etag` and every other annotation are left alone.
fn is_link_key(tail: &[u8], len: usize) -> bool {
    if len == tail.len() {
        for header in [&b"location"[..], b"content-location", b"odata-entityid"] {
            if tail.eq_ignore_ascii_case(header) {
                return true;
            }
        }
    }
    const ODATA: &[u8] = b"@odata.";
    let Some(at) = tail.windows(ODATA.len()).rposition(|w| w == ODATA) else {
        return false;
    };
    let name = &tail[at + ODATA.len()..];
    name == b"context"
        || name == b"id"
        || (name.len() > 4 && name.ends_with(b"Link") && name.iter().all(u8::is_ascii_alphabetic))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::tests::links;

    /// Rewrites `input` fed in chunks of `size` bytes.
    fn rewrite_in_chunks(input: &str, size: usize) -> String {
        let links = links();
        let mut rewriter = JsonRewriter::new();
        let mut out = BytesMut::new();
        for chunk in input.as_bytes().chunks(size) {
            rewriter.push(&links, chunk, &mut out);
        }
        rewriter.finish(&mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    fn rewrite(input: &str) -> String {
        let whole = rewrite_in_chunks(input, usize::MAX);
        for size in [1, 2, 3, 7, 16] {
            assert_eq!(rewrite_in_chunks(input, size), whole, "chunk size {size}");
        }
        whole
    }

    #[test]
    fn link_annotations_are_rewritten_and_the_rest_kept_byte_for_byte() {
        let input = r#"{"@odata.context":"https://api.bc.test/v2.0/t1/Production/api/v2.0/$metadata#companies","value":[{"@odata.etag":"W/\"JzQ0OzE7MDsn\"","id":"1","displayName":"https://api.bc.test/v2.0/t1/Production/x","picture@odata.mediaReadLink":"https://api.bc.test/v2.0/t1/Production/api/v2.0/companies(1)/picture/pictureContent","@odata.id" : "https://api.bc.test/v2.0/t1/Production/a(1)"}],"@odata.nextLink":"https://api.bc.test/v2.0/t1/Production/api/v2.0/companies?$skiptoken=abc%3D%3D%27"}"#;
        assert_eq!(
            rewrite(input),
            r#"{"@odata.context":"https://proxy.test/bc/api/v2.0/$metadata#companies","value":[{"@odata.etag":"W/\"JzQ0OzE7MDsn\"","id":"1","displayName":"https://api.bc.test/v2.0/t1/Production/x","picture@odata.mediaReadLink":"https://proxy.test/bc/api/v2.0/companies(1)/picture/pictureContent","@odata.id" : "https://proxy.test/bc/a(1)"}],"@odata.nextLink":"https://proxy.test/bc/api/v2.0/companies?$skiptoken=abc%3D%3D%27"}"#
        );
    }

    #[test]
    fn other_hosts_other_paths_and_non_strings_are_left_alone() {
        for input in [
            r#"{"@odata.nextLink":"https://api.bc.test/v2.0/t1/Sandbox/x"}"#,
            r#"{"@odata.nextLink":"https://evil.test/v2.0/t1/Production/x"}"#,
            r#"{"@odata.nextLink":"https://api.bc.test/v2.0/t1/Production"}"#,
            r#"{"@odata.nextLink":null,"@odata.count":5}"#,
            r#"{"@odata.etag":"https://api.bc.test/v2.0/t1/Production/x"}"#,
            r#"{"note":"@odata.nextLink","x":"https://api.bc.test/v2.0/t1/Production/x"}"#,
            r#"["@odata.nextLink","https://api.bc.test/v2.0/t1/Production/x"]"#,
            r#"{"@odata.nextLink":"https://api.bc.test/v2.0/t1/Prod\"uction/x"}"#,
            r#"{"a@odata.nextLink":"https://api.bc.test/v2.0/t1/Prod"#,
        ] {
            assert_eq!(rewrite(input), input);
        }
    }

    #[test]
    fn escaped_slashes_and_host_case_match() {
        assert_eq!(
            rewrite(r#"{"@odata.nextLink":"https:\/\/API.BC.test\/v2.0\/t1\/Production\/x\/y"}"#),
            r#"{"@odata.nextLink":"https://proxy.test/bc/x\/y"}"#
        );
        // The path is case-sensitive.
        let input = r#"{"@odata.nextLink":"https://api.bc.test/v2.0/t1/production/x"}"#;
        assert_eq!(rewrite(input), input);
    }

    #[test]
    fn json_batch_headers_are_rewritten() {
        assert_eq!(
            rewrite(
                r#"{"responses":[{"id":"1","status":201,"headers":{"Location":"https://api.bc.test/v2.0/t1/Production/c(1)","odata-entityid":"https://api.bc.test/v2.0/t1/Production/c(1)","etag":"W/\"1\""}}]}"#
            ),
            r#"{"responses":[{"id":"1","status":201,"headers":{"Location":"https://proxy.test/bc/c(1)","odata-entityid":"https://proxy.test/bc/c(1)","etag":"W/\"1\""}}]}"#
        );
        let input = r#"{"mylocation":"https://api.bc.test/v2.0/t1/Production/c(1)"}"#;
        assert_eq!(rewrite(input), input);
    }

    #[test]
    fn link_keys() {
        let yes = |k: &str| is_link_key(k.as_bytes(), k.len());
        assert!(yes("@odata.context") && yes("@odata.id") && yes("@odata.nextLink"));
        assert!(yes("@odata.deltaLink") && yes("@odata.editLink") && yes("@odata.readLink"));
        assert!(yes("pictureContent@odata.mediaEditLink") && yes("x@odata.navigationLink"));
        assert!(!yes("@odata.etag") && !yes("@odata.count") && !yes("@odata.type"));
        assert!(!yes("Link") && !yes("@odata.Link") && !yes("nextLink"));
    }

    /// 200 MB of BC-shaped pages through the rewriter in 16 KiB chunks: what it holds
    /// between chunks never exceeds a few hundred bytes, and every link is rewritten.
    #[test]
    fn two_hundred_megabytes_stream_through_a_bounded_buffer() {
        let links = links();
        let record = r#"{"@odata.etag":"W/\"JzQ0OzE7MDsn\"","id":"5d115c9c-44e3-ea11-bb43-000d3a2feca1","number":"10000","displayName":"Adatum Corporation","picture@odata.mediaReadLink":"https://api.bc.test/v2.0/t1/Production/api/v2.0/companies(1)/customers(2)/picture","address":"Station Street 42, Line\nTwo \"quoted\" \\ back"},"#;
        let head = r#"{"@odata.context":"https://api.bc.test/v2.0/t1/Production/api/v2.0/$metadata#customers","value":["#;
        let tail = r#"{}],"@odata.nextLink":"https://api.bc.test/v2.0/t1/Production/api/v2.0/customers?$skiptoken=x"}"#;
        let total = 200 * 1024 * 1024;
        let records = (total - head.len() - tail.len()) / record.len();
        let mut rewriter = JsonRewriter::new();
        let mut out = BytesMut::new();
        let mut pending: Vec<u8> = head.as_bytes().to_vec();
        let (mut fed, mut produced, mut rewritten) = (0usize, 0usize, 0usize);
        let mut max_buffered = 0;
        let mut feed = |bytes: &[u8], out: &mut BytesMut, rewriter: &mut JsonRewriter| {
            rewriter.push(&links, bytes, out);
            max_buffered = max_buffered.max(rewriter.buffered());
            produced += out.len();
            rewritten += memchr::memmem::find_iter(out, b"https://proxy.test/bc/").count();
            out.clear();
        };
        for _ in 0..records {
            pending.extend_from_slice(record.as_bytes());
            if pending.len() >= 16 * 1024 {
                fed += pending.len();
                feed(&pending, &mut out, &mut rewriter);
                pending.clear();
            }
        }
        pending.extend_from_slice(tail.as_bytes());
        fed += pending.len();
        feed(&pending, &mut out, &mut rewriter);
        rewriter.finish(&mut out);
        produced += out.len();
        assert!(fed >= total - record.len(), "fed {fed}");
        // Links split across chunk boundaries are rewritten too.
        assert_eq!(rewritten, records + 2);
        let shrink =
            "https://api.bc.test/v2.0/t1/Production/".len() - "https://proxy.test/bc/".len();
        assert_eq!(produced, fed - shrink * (records + 2));
        assert!(
            max_buffered <= 2 * links.max_len() + KEY_TAIL,
            "{max_buffered}"
        );
    }
}
