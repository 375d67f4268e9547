//! JSON batch requests (OData JSON Format v4.01 §19: `{"requests":[{"id","method","url",
//! "headers":{…},"body":…},…]}`).
//!
//! A streaming tokenizer follows the structure far enough to know where it is: the root
//! object, its `requests` array, each request object. Each request's `url` string and
//! `headers` object are read whole (bounded: [`MAX_URL`], [`MAX_HEADERS`]), translated
//! and written back; every other value, `body` included, streams through untouched. Keys
//! are compared after JSON unescaping and without regard to case, so `"URL"` or
//! `"u\u0072l"` cannot carry an unchecked URL past the proxy to a lenient parser.
//! Anything that is not JSON (comments, trailing commas, a second root value) refuses the
//! batch.

use bytes::BytesMut;
use serde_json::{Map, Value};

use super::{BatchError, BatchRoute};
use crate::rewrite::scan_string;

/// Longest `url` string, as written (quotes and escapes included).
const MAX_URL: usize = 16 * 1024;
/// Longest `headers` object of one request.
const MAX_HEADERS: usize = 64 * 1024;
/// Longest key read in the root and request objects.
const MAX_KEY: usize = 4 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The root object.
    Root,
    /// The root's `requests` array.
    Requests,
    /// One request object.
    Request,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// After `{`: a key or `}`; after `[`: a value or `]`.
    First,
    /// After `,` in an object.
    Key,
    Colon,
    Value,
    CommaOrEnd,
}

#[derive(Debug)]
struct Container {
    object: bool,
    role: Role,
    expect: Expect,
    /// What the value after the current key is.
    member: Member,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Requests,
    Url,
    Headers,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    Key,
    Url,
    Headers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Structure,
    /// A string copied through: a key of an object nobody looks into, or a value.
    String {
        escape: bool,
        key: bool,
    },
    Literal,
    Capture {
        what: Capture,
        depth: usize,
        in_string: bool,
        escape: bool,
    },
    End,
}

#[derive(Debug)]
pub(crate) struct JsonTranslator {
    stack: Vec<Container>,
    state: State,
    captured: Vec<u8>,
    started: bool,
}

impl JsonTranslator {
    pub(crate) fn new() -> Self {
        Self {
            stack: Vec::new(),
            state: State::Structure,
            captured: Vec::new(),
            started: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.captured.len()
    }

    pub(crate) fn push(
        &mut self,
        route: &BatchRoute,
        input: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), BatchError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::End => {
                    if !input[i..].iter().all(u8::is_ascii_whitespace) {
                        return Err(BatchError::Malformed("data after the JSON batch object"));
                    }
                    out.extend_from_slice(&input[i..]);
                    return Ok(());
                }
                State::String { escape, key } => {
                    let (end, closed, escape) = scan_string(input, i, escape);
                    let end = if closed { end + 1 } else { end };
                    out.extend_from_slice(&input[i..end]);
                    i = end;
                    if !closed {
                        self.state = State::String { escape, key };
                    } else {
                        self.state = State::Structure;
                        // A key's container already expects its colon.
                        if !key {
                            self.value_done();
                        }
                    }
                }
                State::Literal => {
                    let byte = input[i];
                    if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'+' | b'-') {
                        out.extend_from_slice(&[byte]);
                        i += 1;
                    } else {
                        self.state = State::Structure;
                        self.value_done();
                    }
                }
                State::Capture {
                    what,
                    mut depth,
                    mut in_string,
                    mut escape,
                } => {
                    let byte = input[i];
                    i += 1;
                    self.captured.push(byte);
                    let limit = match what {
                        Capture::Key => MAX_KEY,
                        Capture::Url => MAX_URL,
                        Capture::Headers => MAX_HEADERS,
                    };
                    if self.captured.len() > limit {
                        return Err(BatchError::Malformed(
                            "a JSON batch key, url or headers object is too long",
                        ));
                    }
                    let mut complete = false;
                    if in_string {
                        if escape {
                            escape = false;
                        } else if byte == b'\\' {
                            escape = true;
                        } else if byte == b'"' {
                            in_string = false;
                            complete = depth == 0;
                        }
                    } else {
                        match byte {
                            b'"' => in_string = true,
                            b'{' | b'[' => depth += 1,
                            b'}' | b']' => {
                                depth = depth.saturating_sub(1);
                                complete = depth == 0;
                            }
                            _ => {}
                        }
                    }
                    if complete {
                        let captured = std::mem::take(&mut self.captured);
                        self.state = State::Structure;
                        self.captured_value(route, what, &captured, out)?;
                    } else {
                        self.state = State::Capture {
                            what,
                            depth,
                            in_string,
                            escape,
                        };
                    }
                }
                State::Structure => {
                    let byte = input[i];
                    i += 1;
                    self.structure(byte, out)?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self, _out: &mut BytesMut) -> Result<(), BatchError> {
        if self.state == State::Literal && self.stack.is_empty() {
            self.state = State::End;
        }
        match self.state {
            State::End => Ok(()),
            State::Structure | State::String { .. } | State::Literal | State::Capture { .. } => {
                Err(BatchError::Malformed(
                    "the JSON batch ends before its object does",
                ))
            }
        }
    }

    fn structure(&mut self, byte: u8, out: &mut BytesMut) -> Result<(), BatchError> {
        if matches!(byte, b' ' | b'\t' | b'\r' | b'\n') {
            out.extend_from_slice(&[byte]);
            return Ok(());
        }
        let Some(top) = self.stack.last_mut() else {
            if self.started || byte != b'{' {
                return Err(BatchError::Malformed("a JSON batch is one object"));
            }
            self.started = true;
            out.extend_from_slice(&[byte]);
            self.open(true, Role::Root);
            return Ok(());
        };
        let malformed = BatchError::Malformed("the JSON batch is not valid JSON");
        match (top.object, top.expect, byte) {
            (true, Expect::First | Expect::Key, b'"') => {
                top.expect = Expect::Colon;
                if matches!(top.role, Role::Root | Role::Request) {
                    self.captured.clear();
                    self.captured.push(byte);
                    self.state = State::Capture {
                        what: Capture::Key,
                        depth: 0,
                        in_string: true,
                        escape: false,
                    };
                } else {
                    top.member = Member::Other;
                    out.extend_from_slice(&[byte]);
                    self.state = State::String {
                        escape: false,
                        key: true,
                    };
                }
                return Ok(());
            }
            (true, Expect::Colon, b':') => top.expect = Expect::Value,
            (true, Expect::First | Expect::CommaOrEnd, b'}')
            | (false, Expect::First | Expect::CommaOrEnd, b']') => {
                out.extend_from_slice(&[byte]);
                self.stack.pop();
                self.value_done();
                return Ok(());
            }
            (true, Expect::CommaOrEnd, b',') => top.expect = Expect::Key,
            (false, Expect::CommaOrEnd, b',') => top.expect = Expect::Value,
            (true, Expect::Value, _) | (false, Expect::First | Expect::Value, _) => {
                return self.value_start(byte, out);
            }
            _ => return Err(malformed),
        }
        out.extend_from_slice(&[byte]);
        Ok(())
    }

    /// The first byte of a value in the innermost container.
    fn value_start(&mut self, byte: u8, out: &mut BytesMut) -> Result<(), BatchError> {
        let Some(top) = self.stack.last() else {
            return Err(BatchError::Malformed("the JSON batch is not valid JSON"));
        };
        let member = if top.object {
            top.member
        } else if top.role == Role::Requests {
            // Every entry of `requests` is a request.
            if byte != b'{' {
                return Err(BatchError::Malformed("each of requests must be an object"));
            }
            out.extend_from_slice(&[byte]);
            self.open(true, Role::Request);
            return Ok(());
        } else {
            Member::Other
        };
        match (member, byte) {
            (Member::Requests, b'[') => {
                out.extend_from_slice(&[byte]);
                self.open(false, Role::Requests);
            }
            (Member::Requests, _) => {
                return Err(BatchError::Malformed("requests must be an array"));
            }
            (Member::Url, b'"') | (Member::Headers, b'{') => {
                self.captured.clear();
                self.captured.push(byte);
                self.state = if member == Member::Url {
                    State::Capture {
                        what: Capture::Url,
                        depth: 0,
                        in_string: true,
                        escape: false,
                    }
                } else {
                    State::Capture {
                        what: Capture::Headers,
                        depth: 1,
                        in_string: false,
                        escape: false,
                    }
                };
            }
            (Member::Url, _) => return Err(BatchError::Malformed("url must be a string")),
            (Member::Headers, _) => {
                return Err(BatchError::Malformed("headers must be an object"));
            }
            (Member::Other, b'{' | b'[') => {
                out.extend_from_slice(&[byte]);
                self.open(byte == b'{', Role::Other);
            }
            (Member::Other, b'"') => {
                out.extend_from_slice(&[byte]);
                self.state = State::String {
                    escape: false,
                    key: false,
                };
            }
            (Member::Other, b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
                out.extend_from_slice(&[byte]);
                self.state = State::Literal;
            }
            (Member::Other, _) => {
                return Err(BatchError::Malformed("the JSON batch is not valid JSON"));
            }
        }
        Ok(())
    }

    fn open(&mut self, object: bool, role: Role) {
        self.stack.push(Container {
            object,
            role,
            expect: Expect::First,
            member: Member::Other,
        });
    }

    /// A value in the innermost container is complete.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(top) => {
                top.expect = Expect::CommaOrEnd;
                top.member = Member::Other;
            }
            None => self.state = State::End,
        }
    }

    fn captured_value(
        &mut self,
        route: &BatchRoute,
        what: Capture,
        captured: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), BatchError> {
        let malformed =
            |_: serde_json::Error| BatchError::Malformed("the JSON batch is not valid JSON");
        match what {
            Capture::Key => {
                let key: String = serde_json::from_slice(captured).map_err(malformed)?;
                out.extend_from_slice(captured);
                if let Some(top) = self.stack.last_mut() {
                    top.member = match top.role {
                        Role::Root if key.eq_ignore_ascii_case("requests") => Member::Requests,
                        Role::Request if key.eq_ignore_ascii_case("url") => Member::Url,
                        Role::Request if key.eq_ignore_ascii_case("headers") => Member::Headers,
                        Role::Root | Role::Requests | Role::Request | Role::Other => Member::Other,
                    };
                }
                return Ok(());
            }
            Capture::Url => {
                let url: String = serde_json::from_slice(captured).map_err(malformed)?;
                let translated = route.translate(url.as_bytes())?;
                let translated = String::from_utf8(translated)
                    .map_err(|_| BatchError::Malformed("the JSON batch is not valid JSON"))?;
                let json = serde_json::to_string(&translated).map_err(malformed)?;
                out.extend_from_slice(json.as_bytes());
            }
            Capture::Headers => {
                let mut headers: Map<String, Value> =
                    serde_json::from_slice(captured).map_err(malformed)?;
                headers.retain(|name, _| !route.drops_header(name.as_bytes()));
                let json = serde_json::to_string(&headers).map_err(malformed)?;
                out.extend_from_slice(json.as_bytes());
            }
        }
        self.value_done();
        Ok(())
    }
}
