//! Push-fed decompression of `gzip`, `deflate` and `br` response bodies.
//!
//! The decoders are the pull-based readers of `flate2` (miniz_oxide) and `brotli` (both
//! pure Rust) over a [`Feed`] that answers `WouldBlock` when it has no input yet; both
//! keep their state across that. Output is read into a fixed-size buffer, so one small
//! compressed chunk that expands a thousandfold still comes out in bounded pieces.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read};

use bytes::{Buf, Bytes};
use flate2::bufread::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};

/// A `Content-Encoding` the proxy can undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    Gzip,
    /// RFC 9110 §8.4.1.2: zlib; some servers send raw deflate, which is detected.
    Deflate,
    Brotli,
}

/// Input handed over so far, not yet read by the decoder.
#[derive(Debug, Default)]
struct Feed {
    chunks: VecDeque<Bytes>,
    ended: bool,
}

impl Feed {
    fn would_block() -> io::Error {
        io::ErrorKind::WouldBlock.into()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    fn first_two(&self) -> [Option<u8>; 2] {
        let mut bytes = self.chunks.iter().flat_map(|c| c.iter().copied());
        [bytes.next(), bytes.next()]
    }
}

impl Read for Feed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Feed {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.chunks.front().is_some_and(Bytes::is_empty) {
            self.chunks.pop_front();
        }
        match self.chunks.front() {
            Some(chunk) => Ok(chunk),
            None if self.ended => Ok(&[]),
            None => Err(Self::would_block()),
        }
    }

    fn consume(&mut self, amount: usize) {
        if let Some(chunk) = self.chunks.front_mut() {
            chunk.advance(amount.min(chunk.len()));
        }
    }
}

enum Inner {
    Gzip(Box<MultiGzDecoder<Feed>>),
    Zlib(Box<ZlibDecoder<Feed>>),
    RawDeflate(Box<DeflateDecoder<Feed>>),
    Brotli(Box<brotli::Decompressor<Feed>>),
    /// `deflate` before its first two bytes tell zlib from raw deflate.
    Deflate(Feed),
    Done,
}

/// One response body's decoder.
pub(crate) struct Decoder {
    inner: Inner,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder")
    }
}

impl Decoder {
    pub(crate) fn new(coding: Coding) -> Self {
        let feed = Feed::default();
        let inner = match coding {
            Coding::Gzip => Inner::Gzip(Box::new(MultiGzDecoder::new(feed))),
            Coding::Deflate => Inner::Deflate(feed),
            Coding::Brotli => Inner::Brotli(Box::new(brotli::Decompressor::new(feed, 4096))),
        };
        Self { inner }
    }

    fn feed(&mut self) -> Option<&mut Feed> {
        match &mut self.inner {
            Inner::Gzip(d) => Some(d.get_mut()),
            Inner::Zlib(d) => Some(d.get_mut()),
            Inner::RawDeflate(d) => Some(d.get_mut()),
            Inner::Brotli(d) => Some(d.get_mut()),
            Inner::Deflate(feed) => Some(feed),
            Inner::Done => None,
        }
    }

    #[cfg(test)]
    /// Compressed bytes held, not yet decoded.
    pub(crate) fn buffered(&mut self) -> usize {
        self.feed().map_or(0, |feed| feed.len())
    }

    pub(crate) fn push(&mut self, data: Bytes) {
        if let Some(feed) = self.feed() {
            feed.chunks.push_back(data);
        }
    }

    /// No more input will come.
    pub(crate) fn end(&mut self) {
        if let Some(feed) = self.feed() {
            feed.ended = true;
        }
    }

    /// Decodes into `out`: `Ok(Some(n))` with `n > 0` bytes, `Ok(Some(0))` at the end of
    /// the stream, `Ok(None)` when more input is needed.
    pub(crate) fn read(&mut self, out: &mut [u8]) -> io::Result<Option<usize>> {
        if let Inner::Deflate(feed) = &mut self.inner {
            let zlib = match feed.first_two() {
                // RFC 1950 §2.2: CM = 8 and the header is a multiple of 31.
                [Some(a), Some(b)] => a & 0x0f == 8 && (u16::from(a) << 8 | u16::from(b)) % 31 == 0,
                _ if feed.ended => true,
                _ => return Ok(None),
            };
            let feed = std::mem::take(feed);
            self.inner = if zlib {
                Inner::Zlib(Box::new(ZlibDecoder::new(feed)))
            } else {
                Inner::RawDeflate(Box::new(DeflateDecoder::new(feed)))
            };
        }
        let result = match &mut self.inner {
            Inner::Gzip(d) => d.read(out),
            Inner::Zlib(d) => d.read(out),
            Inner::RawDeflate(d) => d.read(out),
            Inner::Brotli(d) => d.read(out),
            Inner::Deflate(_) | Inner::Done => Ok(0),
        };
        match result {
            Ok(0) => {
                self.inner = Inner::Done;
                Ok(Some(0))
            }
            Ok(n) => Ok(Some(n)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn decode_byte_by_byte(coding: Coding, compressed: &[u8]) -> io::Result<Vec<u8>> {
        let mut decoder = Decoder::new(coding);
        let mut out = Vec::new();
        let mut buf = [0u8; 100];
        let mut input = compressed.iter();
        loop {
            match decoder.read(&mut buf)? {
                Some(0) => return Ok(out),
                Some(n) => out.extend_from_slice(&buf[..n]),
                None => match input.next() {
                    Some(byte) => decoder.push(Bytes::copy_from_slice(&[*byte])),
                    None => decoder.end(),
                },
            }
        }
    }

    #[test]
    fn every_coding_decodes_from_single_byte_pushes() {
        let data: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(&data).unwrap();
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(&data).unwrap();
        let mut br = Vec::new();
        {
            let mut writer = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            writer.write_all(&data).unwrap();
        }
        let mut two_members = gzip(&data[..1000]);
        two_members.extend(gzip(&data[1000..]));
        for (coding, compressed) in [
            (Coding::Gzip, gzip(&data)),
            (Coding::Gzip, two_members),
            (Coding::Deflate, zlib.finish().unwrap()),
            (Coding::Deflate, raw.finish().unwrap()),
            (Coding::Brotli, br),
        ] {
            assert_eq!(
                decode_byte_by_byte(coding, &compressed).unwrap(),
                data,
                "{coding:?}"
            );
        }
    }

    #[test]
    fn truncated_and_corrupt_input_are_errors() {
        let compressed = gzip(b"hello world, hello world");
        assert!(decode_byte_by_byte(Coding::Gzip, &compressed[..compressed.len() - 3]).is_err());
        assert!(decode_byte_by_byte(Coding::Gzip, b"not gzip at all").is_err());
    }
}
