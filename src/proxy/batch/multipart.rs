//! `multipart/mixed` batch requests (OData v4.01 Part 1 §11.7.7 "Multipart Batch Format",
//! RFC 2046 §5.1).
//!
//! Header lines, request lines and boundary lines are read whole, each bounded by
//! [`MAX_LINE`] (a longer one refuses the batch); part bodies stream through, held back
//! only while the start of a line could be a boundary delimiter. Output is produced only
//! for what has been checked, so a refused part never leaves the proxy.

use bytes::BytesMut;

use super::{BatchError, BatchRoute};
use crate::rewrite::classify_content_type;

/// Longest header, request or boundary line.
pub(super) const MAX_LINE: usize = 16 * 1024;
/// A batch and its change sets: OData nests multiparts once.
const MAX_DEPTH: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Body bytes up to the next delimiter line; `send` is false for a preamble or a
    /// change set's epilogue (dropped: they carry no request).
    Body { send: bool },
    /// A line that starts with a delimiter, read to its end.
    Delimiter,
    /// The MIME headers of a part.
    PartHeaders,
    /// The request line of an `application/http` part.
    RequestLine,
    /// The headers of the inner request.
    RequestHeaders,
    /// After the closing delimiter: dropped.
    Epilogue,
}

#[derive(Debug, Default)]
struct Part {
    content_types: usize,
    http: bool,
    boundary: Option<Vec<u8>>,
}

#[derive(Debug)]
pub(crate) struct MultipartTranslator {
    /// `--boundary` of each open multipart, innermost last.
    delimiters: Vec<Vec<u8>>,
    mode: Mode,
    line: Vec<u8>,
    part: Part,
    /// In a body: the next byte starts a line; `held` are its first bytes so far, while
    /// they may still be a delimiter.
    line_start: bool,
    held: Vec<u8>,
}

impl MultipartTranslator {
    pub(crate) fn new(boundary: &[u8]) -> Self {
        Self {
            delimiters: vec![delimiter(boundary)],
            mode: Mode::Body { send: false },
            line: Vec::new(),
            part: Part::default(),
            line_start: true,
            held: Vec::new(),
        }
    }

    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.line.len() + self.held.len()
    }

    pub(crate) fn push(
        &mut self,
        route: &BatchRoute,
        input: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), BatchError> {
        let mut i = 0;
        while i < input.len() {
            match self.mode {
                Mode::Epilogue => return Ok(()),
                Mode::Body { send } => i = self.body(input, i, send, out),
                Mode::Delimiter | Mode::PartHeaders | Mode::RequestLine | Mode::RequestHeaders => {
                    let newline = memchr::memchr(b'\n', &input[i..]);
                    let end = newline.map_or(input.len(), |at| i + at + 1);
                    self.line.extend_from_slice(&input[i..end]);
                    if self.line.len() > MAX_LINE {
                        return Err(BatchError::Malformed("a part line is longer than 16 KiB"));
                    }
                    i = end;
                    if newline.is_some() {
                        let line = std::mem::take(&mut self.line);
                        self.on_line(route, &line, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self, out: &mut BytesMut) -> Result<(), BatchError> {
        if self.mode == Mode::Epilogue {
            return Ok(());
        }
        // The closing delimiter may end the body without a line break.
        if matches!(self.mode, Mode::Body { .. } | Mode::Delimiter) && self.delimiters.len() == 1 {
            let mut line = std::mem::take(&mut self.held);
            line.extend_from_slice(&std::mem::take(&mut self.line));
            let close = [self.delimiters[0].as_slice(), b"--"].concat();
            if trim_line(&line) == close.as_slice() {
                out.extend_from_slice(&line);
                self.mode = Mode::Epilogue;
                return Ok(());
            }
        }
        Err(BatchError::Malformed(
            "the batch ends before its closing boundary",
        ))
    }

    /// Body bytes from `i` until a line starts with a delimiter; returns where it stopped.
    fn body(&mut self, input: &[u8], mut i: usize, send: bool, out: &mut BytesMut) -> usize {
        while i < input.len() {
            if self.line_start {
                while i < input.len() {
                    let next = input[i];
                    let len = self.held.len();
                    let extends = self
                        .delimiters
                        .iter()
                        .any(|d| d.len() > len && d[..len] == self.held[..] && d[len] == next);
                    if !extends {
                        break;
                    }
                    self.held.push(next);
                    i += 1;
                }
                if self.delimiters.contains(&self.held) {
                    // Read the whole line, then decide what it is.
                    self.line = std::mem::take(&mut self.held);
                    self.mode = Mode::Delimiter;
                    return i;
                }
                if i == input.len() {
                    return i;
                }
                if send {
                    out.extend_from_slice(&self.held);
                }
                self.held.clear();
                self.line_start = false;
            }
            match memchr::memchr(b'\n', &input[i..]) {
                Some(at) => {
                    if send {
                        out.extend_from_slice(&input[i..i + at + 1]);
                    }
                    i += at + 1;
                    self.line_start = true;
                }
                None => {
                    if send {
                        out.extend_from_slice(&input[i..]);
                    }
                    i = input.len();
                }
            }
        }
        i
    }

    fn enter_body(&mut self, send: bool) {
        self.mode = Mode::Body { send };
        self.line_start = true;
        self.held.clear();
    }

    fn on_line(
        &mut self,
        route: &BatchRoute,
        line: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), BatchError> {
        let content = trim_line(line);
        // RFC 9112 §2.2: a bare CR is not a line break a parser may honour differently.
        if content.contains(&b'\r') {
            return Err(BatchError::Malformed("bare CR in a part line"));
        }
        match self.mode {
            Mode::Delimiter => {
                let innermost = self.delimiters.last().map_or(&[][..], Vec::as_slice);
                if content == innermost {
                    out.extend_from_slice(line);
                    self.part = Part::default();
                    self.mode = Mode::PartHeaders;
                } else if content.len() == innermost.len() + 2
                    && content.starts_with(innermost)
                    && content.ends_with(b"--")
                {
                    out.extend_from_slice(line);
                    self.delimiters.pop();
                    if self.delimiters.is_empty() {
                        self.mode = Mode::Epilogue;
                    } else {
                        // The change set's epilogue, inside the outer part.
                        self.enter_body(false);
                    }
                } else {
                    // An outer boundary inside a change set, or a boundary with more
                    // after it: parsers disagree on these, so none is forwarded.
                    return Err(BatchError::Malformed(
                        "a line starts with a boundary delimiter but is not this multipart's",
                    ));
                }
            }
            Mode::PartHeaders => {
                if content.is_empty() {
                    out.extend_from_slice(line);
                    let part = std::mem::take(&mut self.part);
                    match (part.http, part.boundary) {
                        (false, Some(boundary)) if self.delimiters.len() < MAX_DEPTH => {
                            self.delimiters.push(delimiter(&boundary));
                            self.enter_body(false);
                        }
                        (true, None) => self.mode = Mode::RequestLine,
                        _ => {
                            return Err(BatchError::Malformed(
                                "every part must be application/http or a change set",
                            ));
                        }
                    }
                    return Ok(());
                }
                let (name, value) = header(content)?;
                if name.eq_ignore_ascii_case(b"content-type") {
                    let (http, _, boundary) = classify_content_type(value);
                    self.part.content_types += 1;
                    self.part.http = http;
                    self.part.boundary = boundary;
                    if self.part.content_types > 1 {
                        return Err(BatchError::Malformed("a part has two Content-Types"));
                    }
                } else if name.eq_ignore_ascii_case(b"content-transfer-encoding")
                    && ![&b"binary"[..], b"8bit", b"7bit"]
                        .iter()
                        .any(|e| value.eq_ignore_ascii_case(e))
                {
                    return Err(BatchError::Malformed(
                        "parts must use Content-Transfer-Encoding: binary",
                    ));
                }
                if !route.drops_header(name) {
                    out.extend_from_slice(line);
                }
            }
            Mode::RequestLine => {
                let mut fields = content.split(|&b| b == b' ');
                let (Some(method), Some(url), Some(version), None) =
                    (fields.next(), fields.next(), fields.next(), fields.next())
                else {
                    return Err(BatchError::Malformed(
                        "an inner request line must be METHOD URL HTTP/1.1",
                    ));
                };
                if method.is_empty()
                    || !method.iter().all(u8::is_ascii_alphabetic)
                    || !version.starts_with(b"HTTP/")
                {
                    return Err(BatchError::Malformed(
                        "an inner request line must be METHOD URL HTTP/1.1",
                    ));
                }
                let url = route.translate(url)?;
                out.extend_from_slice(method);
                out.extend_from_slice(b" ");
                out.extend_from_slice(&url);
                out.extend_from_slice(b" ");
                out.extend_from_slice(&line[method.len() + url_len(content, method) + 2..]);
                self.mode = Mode::RequestHeaders;
            }
            Mode::RequestHeaders => {
                if content.is_empty() {
                    out.extend_from_slice(line);
                    self.enter_body(true);
                    return Ok(());
                }
                let (name, _) = header(content)?;
                if name.eq_ignore_ascii_case(b"host") {
                    out.extend_from_slice(b"Host: ");
                    out.extend_from_slice(route.upstream_authority.as_bytes());
                    out.extend_from_slice(&line[content.len()..]);
                } else if !route.drops_header(name) {
                    out.extend_from_slice(line);
                }
            }
            Mode::Body { .. } | Mode::Epilogue => {}
        }
        Ok(())
    }
}

/// Length of the URL field of a request line whose method is `method`.
fn url_len(content: &[u8], method: &[u8]) -> usize {
    content[method.len() + 1..]
        .iter()
        .position(|&b| b == b' ')
        .unwrap_or(0)
}

/// `name: value` of a header line. Folded lines (RFC 9112 §5.2 obsoletes them) and names
/// that are not tokens are refused: another parser could read them otherwise.
fn header(content: &[u8]) -> Result<(&[u8], &[u8]), BatchError> {
    if content.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err(BatchError::Malformed(
            "folded header lines are not accepted",
        ));
    }
    let colon = memchr::memchr(b':', content)
        .ok_or(BatchError::Malformed("a part header line has no ':'"))?;
    let name = &content[..colon];
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if name.is_empty() || !name.iter().all(token) {
        return Err(BatchError::Malformed("a part header name is not a token"));
    }
    Ok((name, content[colon + 1..].trim_ascii()))
}

/// `--boundary`.
fn delimiter(boundary: &[u8]) -> Vec<u8> {
    let mut delimiter = b"--".to_vec();
    delimiter.extend_from_slice(boundary);
    delimiter
}

/// A line without its line break and the white space RFC 2046 §5.1.1 allows after a
/// delimiter.
fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let end = line
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    &line[..end]
}
