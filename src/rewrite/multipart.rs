//! Streaming link rewriting in `multipart/mixed` `$batch` responses (OData v4 §11.7).
//!
//! A batch response is a multipart body whose parts are `application/http` messages
//! (status line, headers, body) or nested `multipart/mixed` change sets. The header
//! lines of parts and of the embedded messages are read whole (each bounded by
//! [`MAX_LINE`]) and their `Location`, `Content-Location` and `OData-EntityId` values
//! rewritten; JSON bodies go through the JSON scanner. Bodies are scanned line by line
//! only far enough to recognise the next boundary delimiter, so memory stays bounded
//! whatever a part's size.

use bytes::BytesMut;

use super::LinkMap;
use super::json::JsonRewriter;

/// Longest header or delimiter line looked at; longer lines pass through unchanged.
const MAX_LINE: usize = 16 * 1024;
/// Deepest nesting of multiparts followed (a batch nests change sets once).
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the first delimiter of the innermost multipart.
    Preamble,
    /// Header lines of a part.
    PartHeaders,
    /// The status line (`first`) and headers of an `application/http` part.
    HttpHead { first: bool },
    /// A part's body, up to the next delimiter line.
    Body,
    /// After the outermost close delimiter: passed through.
    Epilogue,
}

/// What a part's (or embedded message's) `Content-Type` announced.
#[derive(Debug, Default)]
struct PartInfo {
    http: bool,
    json: bool,
    boundary: Option<Vec<u8>>,
}

#[derive(Debug)]
pub(crate) struct MultipartRewriter {
    /// `--boundary` of each open multipart, innermost last.
    delimiters: Vec<Vec<u8>>,
    mode: Mode,
    /// The header or delimiter line being read.
    line: Vec<u8>,
    /// The current line was too long and is being passed through.
    long_line: bool,
    part: PartInfo,
    /// In a body: whether the next byte starts a line, and the bytes at a line start that
    /// match the delimiter so far.
    line_start: bool,
    held: Vec<u8>,
    json: Option<JsonRewriter>,
}

impl MultipartRewriter {
    pub(crate) fn new(boundary: &[u8]) -> Self {
        Self {
            delimiters: vec![delimiter(boundary)],
            mode: Mode::Preamble,
            line: Vec::new(),
            long_line: false,
            part: PartInfo::default(),
            line_start: true,
            held: Vec::new(),
            json: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.line.len() + self.held.len() + self.json.as_ref().map_or(0, JsonRewriter::buffered)
    }

    pub(crate) fn push(&mut self, links: &LinkMap, input: &[u8], out: &mut BytesMut) {
        let mut i = 0;
        while i < input.len() {
            match self.mode {
                Mode::Epilogue => {
                    out.extend_from_slice(&input[i..]);
                    return;
                }
                Mode::Body => i = self.body(links, input, i, out),
                Mode::Preamble | Mode::PartHeaders | Mode::HttpHead { .. } => {
                    let newline = memchr::memchr(b'\n', &input[i..]);
                    let end = newline.map_or(input.len(), |at| i + at + 1);
                    if self.long_line {
                        out.extend_from_slice(&input[i..end]);
                    } else {
                        self.line.extend_from_slice(&input[i..end]);
                        if self.line.len() > MAX_LINE {
                            out.extend_from_slice(&self.line);
                            self.line.clear();
                            self.long_line = true;
                        }
                    }
                    i = end;
                    if newline.is_some() {
                        if self.long_line {
                            self.long_line = false;
                        } else {
                            let line = std::mem::take(&mut self.line);
                            self.on_line(links, &line, out);
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn finish(&mut self, out: &mut BytesMut) {
        if let Some(json) = &mut self.json {
            json.finish(out);
        }
        out.extend_from_slice(&self.held);
        out.extend_from_slice(&self.line);
        self.held.clear();
        self.line.clear();
    }

    /// Body bytes from `i`: sends them on (through the JSON scanner when the part is
    /// JSON) until a line starts with the delimiter. Returns where it stopped.
    fn body(&mut self, links: &LinkMap, input: &[u8], mut i: usize, out: &mut BytesMut) -> usize {
        while i < input.len() {
            if self.line_start {
                let delimiter = self.delimiters.last().map_or(&[][..], Vec::as_slice);
                while self.held.len() < delimiter.len() && i < input.len() {
                    if input[i] != delimiter[self.held.len()] {
                        break;
                    }
                    self.held.push(input[i]);
                    i += 1;
                }
                if self.held.len() == delimiter.len() {
                    // The delimiter line is read like a preamble line.
                    if let Some(json) = &mut self.json {
                        json.finish(out);
                    }
                    self.json = None;
                    self.line = std::mem::take(&mut self.held);
                    self.mode = Mode::Preamble;
                    return i;
                }
                if i == input.len() {
                    return i;
                }
                let held = std::mem::take(&mut self.held);
                self.send(links, &held, out);
                self.line_start = false;
            }
            match memchr::memchr(b'\n', &input[i..]) {
                Some(at) => {
                    self.send(links, &input[i..i + at + 1], out);
                    i += at + 1;
                    self.line_start = true;
                }
                None => {
                    self.send(links, &input[i..], out);
                    i = input.len();
                }
            }
        }
        i
    }

    fn send(&mut self, links: &LinkMap, bytes: &[u8], out: &mut BytesMut) {
        match &mut self.json {
            Some(json) => json.push(links, bytes, out),
            None => out.extend_from_slice(bytes),
        }
    }

    fn on_line(&mut self, links: &LinkMap, line: &[u8], out: &mut BytesMut) {
        let content = trim_line(line);
        match self.mode {
            Mode::Preamble => {
                out.extend_from_slice(line);
                let Some(delimiter) = self.delimiters.last() else {
                    return;
                };
                if content == delimiter.as_slice() {
                    self.part = PartInfo::default();
                    self.mode = Mode::PartHeaders;
                } else if content.len() == delimiter.len() + 2
                    && content.starts_with(delimiter)
                    && content.ends_with(b"--")
                {
                    self.delimiters.pop();
                    if self.delimiters.is_empty() {
                        self.mode = Mode::Epilogue;
                    } else {
                        // The nested multipart's epilogue, inside the outer part's body.
                        self.enter_body(false);
                    }
                }
            }
            Mode::PartHeaders => {
                if content.is_empty() {
                    out.extend_from_slice(line);
                    let part = std::mem::take(&mut self.part);
                    match part.boundary {
                        Some(boundary) if self.delimiters.len() < MAX_DEPTH => {
                            self.delimiters.push(delimiter(&boundary));
                            self.mode = Mode::Preamble;
                        }
                        Some(_) => self.enter_body(false),
                        None if part.http => self.mode = Mode::HttpHead { first: true },
                        None => self.enter_body(part.json),
                    }
                } else {
                    self.header(links, line, out);
                }
            }
            Mode::HttpHead { first: true } => {
                out.extend_from_slice(line);
                self.mode = Mode::HttpHead { first: false };
            }
            Mode::HttpHead { first: false } => {
                if content.is_empty() {
                    out.extend_from_slice(line);
                    let json = std::mem::take(&mut self.part).json;
                    self.enter_body(json);
                } else {
                    self.header(links, line, out);
                }
            }
            Mode::Body | Mode::Epilogue => out.extend_from_slice(line),
        }
    }

    fn enter_body(&mut self, json: bool) {
        self.mode = Mode::Body;
        self.line_start = true;
        self.held.clear();
        self.json = json.then(JsonRewriter::new);
    }

    /// One header line: noted when it is `Content-Type`, rewritten when it is a link.
    fn header(&mut self, links: &LinkMap, line: &[u8], out: &mut BytesMut) {
        let Some(colon) = memchr::memchr(b':', line) else {
            out.extend_from_slice(line);
            return;
        };
        let name = line[..colon].trim_ascii();
        let value_start =
            colon + 1 + (line[colon + 1..].len() - line[colon + 1..].trim_ascii_start().len());
        let value = trim_line(&line[value_start..]);
        if name.eq_ignore_ascii_case(b"content-type") {
            let (http, json, boundary) = classify(value);
            self.part.http |= http;
            self.part.json |= json;
            if boundary.is_some() {
                self.part.boundary = boundary;
            }
        }
        if super::is_link_header(name)
            && let Some(rewritten) = links.rewrite(value)
        {
            out.extend_from_slice(&line[..value_start]);
            out.extend_from_slice(&rewritten);
            out.extend_from_slice(&line[value_start + value.len()..]);
            return;
        }
        out.extend_from_slice(line);
    }
}

/// `--boundary`.
fn delimiter(boundary: &[u8]) -> Vec<u8> {
    let mut delimiter = b"--".to_vec();
    delimiter.extend_from_slice(boundary);
    delimiter
}

/// A line without its line break and trailing white space (RFC 2046 §5.1.1 allows
/// white space after a delimiter).
fn trim_line(line: &[u8]) -> &[u8] {
    line.trim_ascii_end()
}

/// A `Content-Type` value: (`application/http`, JSON, multipart boundary).
pub(crate) fn classify(value: &[u8]) -> (bool, bool, Option<Vec<u8>>) {
    let media = super::media_type(value);
    let mut params = value.split(|&b| b == b';').skip(1);
    let http = media == b"application/http";
    let json = media == b"application/json" || media.ends_with(b"+json");
    let boundary = if media == b"multipart/mixed" {
        params.find_map(|param| {
            let (name, value) = param.split_at(memchr::memchr(b'=', param)?);
            if !name.trim_ascii().eq_ignore_ascii_case(b"boundary") {
                return None;
            }
            let value = value[1..].trim_ascii();
            let value = value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value);
            // RFC 2046 §5.1.1: 1 to 70 characters.
            (!value.is_empty() && value.len() <= 70).then(|| value.to_vec())
        })
    } else {
        None
    };
    (http, json, boundary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(boundary: &str, input: &str, size: usize) -> String {
        let links = LinkMap::new(
            "https://org.crm.test/api/data/v9.2/",
            "http://proxy.test/crm/",
        );
        let mut rewriter = MultipartRewriter::new(boundary.as_bytes());
        let mut out = BytesMut::new();
        for chunk in input.as_bytes().chunks(size) {
            rewriter.push(&links, chunk, &mut out);
            assert!(rewriter.buffered() <= MAX_LINE + 200);
        }
        rewriter.finish(&mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    const BATCH: &str = "--batchresponse_1\r\n\
Content-Type: multipart/mixed; boundary=changesetresponse_2\r\n\
\r\n\
--changesetresponse_2\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
Content-ID: 1\r\n\
\r\n\
HTTP/1.1 204 No Content\r\n\
OData-Version: 4.0\r\n\
Location: https://org.crm.test/api/data/v9.2/tasks(1)\r\n\
OData-EntityId: https://org.crm.test/api/data/v9.2/tasks(1)\r\n\
\r\n\
\r\n\
--changesetresponse_2--\r\n\
--batchresponse_1\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
\r\n\
HTTP/1.1 200 OK\r\n\
Content-Type: application/json; odata.metadata=minimal\r\n\
ETag: W/\"123\"\r\n\
\r\n\
{\"@odata.context\":\"https://org.crm.test/api/data/v9.2/$metadata#tasks\",\"@odata.etag\":\"W/\\\"123\\\"\",\"subject\":\"--batchresponse_1 is not at a line start\",\n\"@odata.nextLink\":\"https://org.crm.test/api/data/v9.2/tasks?$skiptoken=%3Ccookie%20pagenumber=%222%22/%3E\"}\r\n\
--batchresponse_1--\r\n\
epilogue https://org.crm.test/api/data/v9.2/x\r\n";

    #[test]
    fn batch_part_headers_and_json_bodies_are_rewritten() {
        let expected = BATCH
            .replace(
                "Location: https://org.crm.test/api/data/v9.2/",
                "Location: http://proxy.test/crm/",
            )
            .replace(
                "OData-EntityId: https://org.crm.test/api/data/v9.2/",
                "OData-EntityId: http://proxy.test/crm/",
            )
            .replace(
                "\"https://org.crm.test/api/data/v9.2/",
                "\"http://proxy.test/crm/",
            );
        assert_ne!(expected, BATCH);
        assert!(expected.contains("epilogue https://org.crm.test/api/data/v9.2/x"));
        for size in [1, 2, 5, 13, 64, usize::MAX] {
            assert_eq!(
                rewrite("batchresponse_1", BATCH, size),
                expected,
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            classify(b"multipart/mixed; boundary=\"batch_36522ad7\""),
            (false, false, Some(b"batch_36522ad7".to_vec()))
        );
        assert_eq!(
            classify(b"Application/JSON; odata.metadata=minimal"),
            (false, true, None)
        );
        assert_eq!(classify(b"application/http"), (true, false, None));
        assert_eq!(classify(b"multipart/mixed"), (false, false, None));
    }
}
