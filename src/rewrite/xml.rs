//! A streaming scanner that rewrites upstream links in an XML document: WSDL and XSD
//! (`soap:address location=`, `wsdl:import`, `xsd:import`/`xsd:include`
//! `schemaLocation=`), SOAP envelopes and Atom feeds (`xml:base`, `href`, `<id>`).
//!
//! It does not parse XML and never re-serializes it. A small tokenizer follows just
//! enough of the syntax (XML 1.0 §2.4–§2.8, §3.1) to know where attribute values and
//! character data are: start tags with their quoted values, end tags, comments,
//! processing instructions, CDATA sections and the DOCTYPE with its internal subset.
//! A value that starts (after whitespace) with the route's upstream URL gets that prefix
//! replaced; every other byte goes out as it came in. Element and attribute names, and
//! so namespaces and prefixes, play no part: what decides is the value.
//!
//! What counts as a value:
//! - an attribute value, between its quotes;
//! - a run of character data between two pieces of markup (a comment or a processing
//!   instruction ends a run as a tag does);
//! - the content of a CDATA section. To an XML reader `<![CDATA[x]]>` and `x` are the
//!   same character data (§2.7), so whether a link is rewritten must not depend on which
//!   of the two the server chose to write; a section holding an embedded document or any
//!   other payload starts with something else and is never touched.
//!
//! Not rewritten: comments, processing instructions (`<?xml-stylesheet href=…?>`) and
//! the DOCTYPE, which are not data. Matching is on the raw bytes: a link written with
//! character or entity references inside the upstream prefix (`&#47;`, `&amp;`) is not
//! recognised, and documents in an encoding that is not ASCII-compatible (UTF-16) are
//! passed through unchanged. Malformed XML is passed through too; at worst a link stays
//! unrewritten. Memory is bounded by the prefix length, whatever the document size.

use bytes::BytesMut;

use super::{LinkMap, Matching, Step};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Character data.
    Text,
    /// After `<`, telling what markup it opens from the bytes that follow.
    Open { seen: usize },
    /// Inside a start (or empty-element) tag; `quote` while inside an attribute value.
    StartTag { quote: Option<u8> },
    /// Inside an end tag.
    EndTag,
    /// Inside `<!-- … -->`: how many `-` were just seen.
    Comment { dashes: u8 },
    /// Inside `<? … ?>`: whether the last byte was `?`.
    Pi { question: bool },
    /// Inside `<![CDATA[ … ]]>`: how many `]` were just seen.
    CData { brackets: u8 },
    /// Inside `<!DOCTYPE …>` or another `<!…>` declaration; `subset` inside `[ … ]`.
    Decl { quote: Option<u8>, subset: bool },
}

const COMMENT_OPEN: &[u8] = b"!--";
const CDATA_OPEN: &[u8] = b"![CDATA[";

#[derive(Debug)]
pub(crate) struct XmlRewriter {
    state: State,
    /// Markup opened inside a DOCTYPE's internal subset returns there when it closes.
    in_subset: bool,
    /// In [`State::Open`] past `<!`: the markup opened is `<![`, not `<!-`.
    open_cdata: bool,
    /// The current value may still start with the upstream prefix.
    deciding: bool,
    matching: Option<Matching>,
    /// Raw bytes of the value held back while deciding (leading whitespace is not held).
    held: Vec<u8>,
    /// What replaces the prefix in attribute values and character data: the proxy's base
    /// with XML's five special characters escaped (§2.4, §3.1), in case a configured
    /// `public_url` or a `Host` holds `&` or `'`.
    to_escaped: Vec<u8>,
    /// When set, only the character data right after a start tag with this local name
    /// is looked at (see [`XmlRewriter::element_text`]).
    only: Option<&'static [u8]>,
    /// The start tag's name being read (at most [`MAX_NAME`] bytes; longer names match
    /// nothing), whether it is still being read, and whether the tag's last byte was `/`.
    tag: Vec<u8>,
    naming: bool,
    tag_slash: bool,
}

/// Longest element name remembered for [`XmlRewriter::element_text`].
const MAX_NAME: usize = 64;

impl XmlRewriter {
    pub(crate) fn new(links: &LinkMap) -> Self {
        Self::scoped(links, None)
    }

    /// A rewriter that only looks at the character data of elements named `local` in any
    /// namespace (`<wsa:To>`, `<a:To>`, `<To xmlns=…>`): attribute values and all other
    /// text pass through.
    pub(crate) fn element_text(links: &LinkMap, local: &'static [u8]) -> Self {
        Self::scoped(links, Some(local))
    }

    fn scoped(links: &LinkMap, only: Option<&'static [u8]>) -> Self {
        let mut to_escaped = Vec::with_capacity(links.to().len());
        for &byte in links.to() {
            match byte {
                b'&' => to_escaped.extend_from_slice(b"&amp;"),
                b'<' => to_escaped.extend_from_slice(b"&lt;"),
                b'>' => to_escaped.extend_from_slice(b"&gt;"),
                b'"' => to_escaped.extend_from_slice(b"&quot;"),
                b'\'' => to_escaped.extend_from_slice(b"&apos;"),
                _ => to_escaped.push(byte),
            }
        }
        Self {
            // The document starts as character data (the prolog's whitespace).
            state: State::Text,
            in_subset: false,
            open_cdata: false,
            deciding: only.is_none(),
            matching: None,
            held: Vec::new(),
            to_escaped,
            only,
            tag: Vec::new(),
            naming: false,
            tag_slash: false,
        }
    }

    #[cfg(test)]
    /// Bytes held back between calls (for the memory bound).
    pub(crate) fn buffered(&self) -> usize {
        self.held.len()
    }

    /// Rewrites `input`, appending the result to `out`. Bytes that might start a link are
    /// held until the next call or [`finish`](Self::finish).
    pub(crate) fn push(&mut self, links: &LinkMap, input: &[u8], out: &mut BytesMut) {
        let mut i = 0;
        // Start of the bytes copied through unchanged, not yet appended to `out`.
        let mut copied = 0;
        while i < input.len() {
            if self.deciding {
                let byte = input[i];
                if self.ends_value(byte) {
                    // Shorter than the prefix: not a link. The byte is markup.
                    self.give_up(out);
                } else if self.held.is_empty() && matches!(byte, b' ' | b'\t' | b'\r' | b'\n') {
                    i += 1;
                    continue;
                } else {
                    if self.held.is_empty() {
                        out.extend_from_slice(&input[copied..i]);
                    }
                    self.held.push(byte);
                    i += 1;
                    copied = i;
                    if let State::CData { brackets } = &mut self.state {
                        *brackets = if byte == b']' {
                            2.min(*brackets + 1)
                        } else {
                            0
                        };
                    }
                    let matching = self.matching.get_or_insert_with(|| links.start());
                    match links.step(matching, byte) {
                        Step::Partial => {}
                        Step::Complete => {
                            let to = if matches!(self.state, State::CData { .. }) {
                                // No reference is recognised inside CDATA; a URL holds
                                // no `]]>`, so the raw base is safe there.
                                links.to()
                            } else {
                                &self.to_escaped
                            };
                            out.extend_from_slice(to);
                            self.held.clear();
                            self.deciding = false;
                        }
                        Step::Failed => self.give_up(out),
                    }
                    continue;
                }
            }
            i = self.markup(input, i);
        }
        out.extend_from_slice(&input[copied..]);
    }

    /// Ends the document: whatever is held goes out unchanged.
    pub(crate) fn finish(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&self.held);
        self.held.clear();
        self.deciding = false;
    }

    /// The byte that ends the current value: `<` for character data, the quote for an
    /// attribute value, `>` for CDATA (`]]>`). None of them can be part of a URL
    /// (RFC 3986 §2), so none can be part of the prefix either.
    fn ends_value(&self, byte: u8) -> bool {
        match self.state {
            State::Text => byte == b'<',
            State::StartTag { quote: Some(quote) } => byte == quote,
            State::CData { .. } => byte == b'>',
            _ => true,
        }
    }

    fn give_up(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&self.held);
        self.held.clear();
        self.deciding = false;
    }

    /// A new value starts: decide whether it starts with the prefix (unless only one
    /// element's text is looked at).
    fn start_value(&mut self) {
        self.start_value_if(self.only.is_none());
    }

    fn start_value_if(&mut self, look: bool) {
        self.deciding = look;
        self.matching = None;
        self.held.clear();
    }

    /// Character data starts after a start tag (`slash`: an empty-element tag).
    fn start_element_text(&mut self, slash: bool) {
        let look = match self.only {
            None => true,
            Some(local) => {
                let name = self.tag.as_slice();
                let name = memchr::memchr(b':', name).map_or(name, |at| &name[at + 1..]);
                !slash && name == local
            }
        };
        self.start_value_if(look);
    }

    /// Character data starts again after markup ends (or the internal subset resumes).
    fn after_markup(&mut self) {
        if self.in_subset {
            self.state = State::Decl {
                quote: None,
                subset: true,
            };
        } else {
            self.state = State::Text;
            self.start_value();
        }
    }

    /// Follows the markup from `i` (not deciding a value); returns where it stopped.
    fn markup(&mut self, input: &[u8], i: usize) -> usize {
        match self.state {
            State::Text => match memchr::memchr(b'<', &input[i..]) {
                None => input.len(),
                Some(at) => {
                    self.state = State::Open { seen: 0 };
                    i + at + 1
                }
            },
            State::Open { seen } => {
                let byte = input[i];
                // `<!-` and `<![` part ways at the second byte; `seen` counts both.
                if seen == 1 {
                    self.open_cdata = byte == b'[';
                }
                let cdata = self.open_cdata;
                let opens = |what: &[u8]| {
                    what.get(seen) == Some(&byte) && (seen < 1 || cdata == (what == CDATA_OPEN))
                };
                if seen == 0 && byte == b'?' {
                    self.state = State::Pi { question: false };
                } else if seen == 0 && byte == b'/' && !self.in_subset {
                    self.state = State::EndTag;
                } else if opens(COMMENT_OPEN) {
                    self.state = if seen + 1 == COMMENT_OPEN.len() {
                        State::Comment { dashes: 0 }
                    } else {
                        State::Open { seen: seen + 1 }
                    };
                } else if opens(CDATA_OPEN) && !self.in_subset {
                    if seen + 1 == CDATA_OPEN.len() {
                        self.state = State::CData { brackets: 0 };
                        self.start_value();
                    } else {
                        self.state = State::Open { seen: seen + 1 };
                    }
                } else {
                    // Not a comment, CDATA, PI or end tag: a declaration after `<!`, a
                    // start tag otherwise. The byte belongs to it: look at it again.
                    self.state = if seen > 0 || self.in_subset {
                        State::Decl {
                            quote: None,
                            subset: self.in_subset,
                        }
                    } else {
                        self.tag.clear();
                        self.naming = true;
                        self.tag_slash = false;
                        State::StartTag { quote: None }
                    };
                    return i;
                }
                i + 1
            }
            State::StartTag { quote: None } if self.naming => {
                let rest = &input[i..];
                let end = rest
                    .iter()
                    .position(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'/' | b'>'))
                    .unwrap_or(rest.len());
                if self.tag.len() + end > MAX_NAME {
                    // Too long to be a name looked for: remembered as no name at all.
                    self.tag.clear();
                    self.tag.extend_from_slice(b"?");
                } else if self.tag != b"?" {
                    self.tag.extend_from_slice(&rest[..end]);
                }
                self.naming = end == rest.len();
                i + end
            }
            State::StartTag { quote: None } => {
                match memchr::memchr3(b'"', b'\'', b'>', &input[i..]) {
                    None => {
                        if let Some(&last) = input.last() {
                            self.tag_slash = last == b'/';
                        }
                        input.len()
                    }
                    Some(at) => {
                        let byte = input[i + at];
                        if byte == b'>' {
                            let slash = if at > 0 {
                                input[i + at - 1] == b'/'
                            } else {
                                self.tag_slash
                            };
                            self.state = State::Text;
                            self.start_element_text(slash);
                        } else {
                            self.tag_slash = false;
                            self.state = State::StartTag { quote: Some(byte) };
                            self.start_value();
                        }
                        i + at + 1
                    }
                }
            }
            State::StartTag { quote: Some(quote) } => match memchr::memchr(quote, &input[i..]) {
                None => input.len(),
                Some(at) => {
                    self.state = State::StartTag { quote: None };
                    i + at + 1
                }
            },
            State::EndTag => match memchr::memchr(b'>', &input[i..]) {
                None => input.len(),
                Some(at) => {
                    self.after_markup();
                    i + at + 1
                }
            },
            State::Comment { dashes } => {
                let byte = input[i];
                if byte == b'>' && dashes >= 2 {
                    self.after_markup();
                } else {
                    let dashes = if byte == b'-' { 2.min(dashes + 1) } else { 0 };
                    self.state = State::Comment { dashes };
                }
                i + 1
            }
            State::Pi { question } => {
                let byte = input[i];
                if byte == b'>' && question {
                    self.after_markup();
                } else {
                    self.state = State::Pi {
                        question: byte == b'?',
                    };
                }
                i + 1
            }
            State::CData { brackets } => {
                let byte = input[i];
                if byte == b'>' && brackets >= 2 {
                    self.after_markup();
                } else {
                    let brackets = if byte == b']' { 2.min(brackets + 1) } else { 0 };
                    self.state = State::CData { brackets };
                }
                i + 1
            }
            State::Decl { quote, subset } => {
                let byte = input[i];
                self.state = match (quote, byte) {
                    (Some(q), _) if byte == q => State::Decl {
                        quote: None,
                        subset,
                    },
                    (Some(_), _) => self.state,
                    (None, b'"' | b'\'') => State::Decl {
                        quote: Some(byte),
                        subset,
                    },
                    (None, b'[') => State::Decl {
                        quote: None,
                        subset: true,
                    },
                    (None, b']') => State::Decl {
                        quote: None,
                        subset: false,
                    },
                    (None, b'<') if subset => {
                        self.in_subset = true;
                        State::Open { seen: 0 }
                    }
                    (None, b'>') if !subset => {
                        self.in_subset = false;
                        self.state = State::Text;
                        self.start_value();
                        return i + 1;
                    }
                    (None, _) => self.state,
                };
                i + 1
            }
        }
    }
}

#[cfg(test)]
mod tests;
