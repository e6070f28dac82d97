//! HTTP/2 (RFC 9113) read from one direction of a connection, as an observer that cannot ask
//! again: the frames, parsed here (h2's parser is private), and header blocks decoded through
//! HPACK (loona-hpack) with the direction's own dynamic table. A direction that cannot be read
//! on (bytes missing, a header block that does not decode) stays broken: its HPACK state is
//! unknown from then on, and nothing is guessed.
use std::borrow::Cow;

use loona_hpack::{Decoder, decoder::DecoderError};

/// A header list: names and values as they were sent.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// What a client sends first on an HTTP/2 connection.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const FRAME_HEADER: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
/// The last frame type RFC 9113 defines (CONTINUATION).
const LAST_KNOWN_TYPE: u8 = CONTINUATION;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;

/// A header block's encoded bytes (HEADERS or `PUSH_PROMISE` and their CONTINUATIONs) kept, at
/// most; the only frames buffered whole are these and SETTINGS.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;
/// Decoded header fields kept per block (names and values), at most: past it the block's
/// fields are dropped (HPACK's table is still kept in step), and its stream is unreadable.
pub const MAX_HEADER_LIST: usize = 64 << 10;
/// The dynamic table size a peer may let its encoder use that is followed, at most: a larger
/// one breaks the direction.
pub const MAX_TABLE_SIZE: usize = 64 << 10;
/// HPACK's dynamic table size before any SETTINGS.
const DEFAULT_TABLE_SIZE: usize = 4096;
/// The largest frame payload HTTP/2 allows (2^24 - 1): a longer length is not a frame.
const MAX_FRAME_PAYLOAD: u32 = (1 << 24) - 1;
/// The largest frame payload allowed before SETTINGS raise it: frames seen in the middle of a
/// connection are told from other bytes with it (see [`looks_like_frames`]).
const DEFAULT_MAX_FRAME: u32 = 16_384;

/// A frame's 9-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub length: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHeader {
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let header: &[u8; FRAME_HEADER] = bytes.get(..FRAME_HEADER)?.try_into().ok()?;
        Some(FrameHeader {
            length: u32::from_be_bytes([0, header[0], header[1], header[2]]),
            kind: header[3],
            flags: header[4],
            // The reserved bit is ignored, as a receiver must.
            stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff,
        })
    }
}

/// Whether `data`, seen in the middle of a connection, begins with HTTP/2 frames: frame headers
/// of known types on the streams their types allow, each within the default frame size, that
/// follow one another to the end of `data` (the last may go on past it).
pub fn looks_like_frames(data: &[u8]) -> bool {
    let mut at = 0;
    let mut frames = 0;
    while at < data.len() {
        let Some(header) = FrameHeader::parse(&data[at..]) else {
            return false;
        };
        let on_connection = matches!(header.kind, SETTINGS | 0x6 | 0x7);
        let on_stream = matches!(
            header.kind,
            DATA | HEADERS | 0x2 | RST_STREAM | CONTINUATION
        );
        let plausible = header.kind <= LAST_KNOWN_TYPE
            && header.length <= DEFAULT_MAX_FRAME
            && (!on_connection || header.stream == 0)
            && (!on_stream || header.stream != 0);
        if !plausible {
            return false;
        }
        frames += 1;
        at += FRAME_HEADER + header.length as usize;
    }
    frames > 0
}

/// What one direction's frames said.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole header block (HEADERS and its CONTINUATIONs), decoded: `None` when its fields
    /// were over [`MAX_HEADER_LIST`].
    Headers {
        stream: u32,
        fields: Option<Fields>,
        end_stream: bool,
    },
    /// Content of a DATA frame, padding left out, as it comes.
    Data {
        stream: u32,
        data: &'a [u8],
    },
    /// A DATA frame that ended the stream on this side.
    End {
        stream: u32,
    },
    Reset {
        stream: u32,
    },
    /// SETTINGS from this side: the dynamic table size it lets the peer's encoder use.
    TableSize(u32),
}

/// Why a direction cannot be read on.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum Broken {
    #[error("bytes are missing")]
    Gap,
    #[error("the client's preface is not HTTP/2's")]
    Preface,
    #[error("a frame that breaks the protocol's order")]
    Protocol,
    #[error("a header block over {MAX_HEADER_BLOCK} bytes")]
    HeaderBlock,
    #[error("HPACK: {0}")]
    Hpack(DecoderError),
}

/// The frame being read.
#[derive(Debug)]
enum Reading {
    /// Its header, so far.
    Header,
    /// A DATA frame's payload: `left` bytes of it, of which `padding` at the end (known once
    /// its pad length was read, for a padded frame).
    Data {
        header: FrameHeader,
        left: u32,
        padding: Option<u32>,
    },
    /// Another frame's payload, kept whole when it is needed (`keep`), else skipped.
    Whole {
        header: FrameHeader,
        left: u32,
        keep: bool,
    },
}

/// A header block waiting for its CONTINUATIONs.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    /// A `PUSH_PROMISE`'s: decoded to keep the table in step, and not reported.
    promise: bool,
    bytes: Vec<u8>,
}

/// One direction of an HTTP/2 connection.
pub struct Reader {
    /// Bytes of the client's preface still to come (0 for the server).
    preface: usize,
    header: Vec<u8>,
    reading: Reading,
    payload: Vec<u8>,
    block: Option<Block>,
    decoder: Decoder<'static>,
    broken: Option<Broken>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("reading", &self.reading)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// The client's direction (which begins with the preface), or the server's.
    pub fn new(client: bool) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(DEFAULT_TABLE_SIZE);
        Reader {
            preface: if client { PREFACE.len() } else { 0 },
            header: Vec::with_capacity(FRAME_HEADER),
            reading: Reading::Header,
            payload: Vec::new(),
            block: None,
            decoder,
            broken: None,
        }
    }

    pub fn broken(&self) -> Option<Broken> {
        self.broken
    }

    /// The peer's SETTINGS let this direction's encoder use a dynamic table of `size`.
    pub fn allow_table_size(&mut self, size: u32) {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size > MAX_TABLE_SIZE {
            // Followed up to the bound: an update past it breaks the direction.
            self.decoder.set_max_allowed_table_size(MAX_TABLE_SIZE);
        } else {
            self.decoder.set_max_allowed_table_size(size);
        }
    }

    /// Bytes of this direction were lost: it cannot be read on.
    pub fn gap(&mut self) {
        self.broken.get_or_insert(Broken::Gap);
    }

    /// Reads `data`, handing each frame to `out`; stops at the first error, for good.
    pub fn feed(&mut self, mut data: &[u8], out: &mut dyn FnMut(Frame<'_>)) {
        if self.broken.is_some() {
            return;
        }
        if self.preface > 0 {
            let done = PREFACE.len() - self.preface;
            let n = self.preface.min(data.len());
            if data[..n] != PREFACE[done..done + n] {
                self.broken = Some(Broken::Preface);
                return;
            }
            self.preface -= n;
            data = &data[n..];
        }
        while !data.is_empty() {
            match self.step(data, out) {
                Ok(used) => data = &data[used..],
                Err(broken) => {
                    self.broken = Some(broken);
                    return;
                }
            }
        }
    }

    /// Reads what it can of `data` for the frame being read; returns the bytes it used.
    fn step(&mut self, data: &[u8], out: &mut dyn FnMut(Frame<'_>)) -> Result<usize, Broken> {
        match &mut self.reading {
            Reading::Header => {
                let n = (FRAME_HEADER - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..n]);
                if let Some(header) = FrameHeader::parse(&self.header) {
                    self.header.clear();
                    self.begin(header, out)?;
                }
                Ok(n)
            }
            Reading::Data {
                header,
                left,
                padding,
            } => {
                let header = *header;
                if padding.is_none() {
                    // The pad length, first: the rest of the frame is content, then padding.
                    let pad = u32::from(data[0]);
                    *left -= 1;
                    if pad > *left {
                        return Err(Broken::Protocol);
                    }
                    *padding = Some(pad);
                    if *left == 0 {
                        self.end_data(header, out);
                    }
                    return Ok(1);
                }
                let pad = padding.unwrap_or(0);
                let n = (*left as usize).min(data.len());
                let content = (left.saturating_sub(pad) as usize).min(n);
                *left -= n as u32;
                let done = *left == 0;
                if content > 0 {
                    out(Frame::Data {
                        stream: header.stream,
                        data: &data[..content],
                    });
                }
                if done {
                    self.end_data(header, out);
                }
                Ok(n)
            }
            Reading::Whole { header, left, keep } => {
                let (header, keep) = (*header, *keep);
                let n = (*left as usize).min(data.len());
                if keep {
                    self.payload.extend_from_slice(&data[..n]);
                }
                *left -= n as u32;
                if *left == 0 {
                    self.reading = Reading::Header;
                    let payload = std::mem::take(&mut self.payload);
                    if keep {
                        self.whole(header, &payload, out)?;
                    }
                }
                Ok(n)
            }
        }
    }

    /// A frame's header was read: how its payload is read.
    fn begin(&mut self, header: FrameHeader, out: &mut dyn FnMut(Frame<'_>)) -> Result<(), Broken> {
        if header.length > MAX_FRAME_PAYLOAD {
            return Err(Broken::Protocol);
        }
        // Between a HEADERS without END_HEADERS and its last CONTINUATION, nothing else.
        if self
            .block
            .as_ref()
            .is_some_and(|b| header.kind != CONTINUATION || header.stream != b.stream)
            || (header.kind == CONTINUATION && self.block.is_none())
        {
            return Err(Broken::Protocol);
        }
        let keep = matches!(
            header.kind,
            HEADERS | PUSH_PROMISE | CONTINUATION | SETTINGS | RST_STREAM
        );
        if keep && header.length as usize > MAX_HEADER_BLOCK {
            return Err(Broken::HeaderBlock);
        }
        self.reading = if header.kind == DATA {
            Reading::Data {
                header,
                left: header.length,
                padding: (header.flags & PADDED == 0).then_some(0),
            }
        } else {
            Reading::Whole {
                header,
                left: header.length,
                keep,
            }
        };
        if header.length == 0 {
            // A frame with no payload is whole now.
            let reading = std::mem::replace(&mut self.reading, Reading::Header);
            match reading {
                Reading::Data {
                    padding: Some(_), ..
                } => self.end_data(header, out),
                Reading::Data { padding: None, .. } => return Err(Broken::Protocol),
                Reading::Whole { keep: true, .. } => self.whole(header, &[], out)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn end_data(&mut self, header: FrameHeader, out: &mut dyn FnMut(Frame<'_>)) {
        self.reading = Reading::Header;
        if header.flags & END_STREAM != 0 {
            out(Frame::End {
                stream: header.stream,
            });
        }
    }

    /// A whole frame other than DATA.
    fn whole(
        &mut self,
        header: FrameHeader,
        payload: &[u8],
        out: &mut dyn FnMut(Frame<'_>),
    ) -> Result<(), Broken> {
        match header.kind {
            HEADERS | PUSH_PROMISE => {
                let promise = header.kind == PUSH_PROMISE;
                let mut fragment = payload;
                if header.flags & PADDED != 0 {
                    let (&pad, rest) = fragment.split_first().ok_or(Broken::Protocol)?;
                    fragment = rest
                        .get(..rest.len().checked_sub(pad.into()).ok_or(Broken::Protocol)?)
                        .ok_or(Broken::Protocol)?;
                }
                // A HEADERS frame's priority fields, or a promise's promised stream.
                let skip = if promise {
                    4
                } else if header.flags & PRIORITY != 0 {
                    5
                } else {
                    0
                };
                let fragment = fragment.get(skip..).ok_or(Broken::Protocol)?;
                self.block = Some(Block {
                    stream: header.stream,
                    end_stream: header.flags & END_STREAM != 0,
                    promise,
                    bytes: fragment.to_vec(),
                });
            }
            CONTINUATION => {
                let block = self.block.as_mut().ok_or(Broken::Protocol)?;
                if block.bytes.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(Broken::HeaderBlock);
                }
                block.bytes.extend_from_slice(payload);
            }
            RST_STREAM => {
                out(Frame::Reset {
                    stream: header.stream,
                });
                return Ok(());
            }
            SETTINGS => {
                if header.flags & ACK == 0 {
                    for setting in payload.chunks_exact(6) {
                        let id = u16::from_be_bytes([setting[0], setting[1]]);
                        if id == SETTINGS_HEADER_TABLE_SIZE {
                            out(Frame::TableSize(u32::from_be_bytes([
                                setting[2], setting[3], setting[4], setting[5],
                            ])));
                        }
                    }
                }
                return Ok(());
            }
            _ => return Ok(()),
        }
        if header.flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            let fields = self.decode(&block.bytes)?;
            if !block.promise {
                out(Frame::Headers {
                    stream: block.stream,
                    fields,
                    end_stream: block.end_stream,
                });
            }
        }
        Ok(())
    }

    /// A whole header block decoded: its fields, unless they are over [`MAX_HEADER_LIST`].
    fn decode(&mut self, block: &[u8]) -> Result<Option<Fields>, Broken> {
        let mut fields = Vec::new();
        let mut size = 0;
        self.decoder
            .decode_with_cb(block, |name: Cow<'_, [u8]>, value: Cow<'_, [u8]>| {
                // As RFC 9113 counts a header list's size: 32 bytes more per field.
                size += name.len() + value.len() + 32;
                if size <= MAX_HEADER_LIST {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(Broken::Hpack)?;
        Ok((size <= MAX_HEADER_LIST).then_some(fields))
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A frame's bytes.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = u32::try_from(payload.len()).expect("length").to_be_bytes();
        let mut bytes = vec![length[1], length[2], length[3], kind, flags];
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    /// What a reader said, in words.
    fn said(reader: &mut Reader, bytes: &[u8], split: usize) -> Vec<String> {
        let mut words = Vec::new();
        for piece in bytes.chunks(split) {
            reader.feed(piece, &mut |frame| {
                words.push(match frame {
                    Frame::Headers {
                        stream,
                        fields,
                        end_stream,
                    } => {
                        let fields: Vec<String> = fields.map_or_else(
                            || vec!["too large".to_owned()],
                            |f| {
                                f.iter()
                                    .map(|(n, v)| {
                                        format!(
                                            "{}={}",
                                            String::from_utf8_lossy(n),
                                            String::from_utf8_lossy(v)
                                        )
                                    })
                                    .collect()
                            },
                        );
                        format!("headers {stream} {} end={end_stream}", fields.join(" "))
                    }
                    Frame::Data { stream, data } => {
                        format!("data {stream} {}", String::from_utf8_lossy(data))
                    }
                    Frame::End { stream } => format!("end {stream}"),
                    Frame::Reset { stream } => format!("reset {stream}"),
                    Frame::TableSize(size) => format!("table {size}"),
                });
            });
        }
        // DATA arrives in pieces as they come: join neighbours of one stream.
        let mut joined: Vec<String> = Vec::new();
        for word in words {
            match joined.last_mut() {
                Some(last) if last.starts_with("data ") && word.starts_with("data ") => {
                    let prefix = last.split(' ').take(2).collect::<Vec<_>>().join(" ") + " ";
                    if let Some(more) = word.strip_prefix(&prefix) {
                        last.push_str(more);
                        continue;
                    }
                    joined.push(word);
                }
                _ => joined.push(word),
            }
        }
        joined
    }

    #[test]
    fn frames_are_read_whatever_the_bytes_are_split_into() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":path", b"/pkg.Svc/Call"),
            (b"content-type", b"application/grpc"),
        ]);
        let (first, rest) = block.split_at(5);
        // HEADERS padded and with priority, its block finished by a CONTINUATION; a padded
        // DATA that ends the stream; an unknown frame type; a reset.
        let mut headers = vec![3];
        headers.extend_from_slice(&[0x80, 0, 0, 1, 16]);
        headers.extend_from_slice(first);
        headers.extend_from_slice(&[0; 3]);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(
            SETTINGS,
            0,
            0,
            &[0, 1, 0, 0, 0x20, 0, 0, 3, 0, 0, 0, 100],
        ));
        bytes.extend(frame(HEADERS, PADDED | PRIORITY, 1, &headers));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, rest));
        bytes.extend(frame(DATA, PADDED | END_STREAM, 1, b"\x02hello\0\0"));
        bytes.extend(frame(0xfa, 0, 0, b"ignored"));
        bytes.extend(frame(DATA, 0, 3, b""));
        bytes.extend(frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]));
        let expected = [
            "table 8192",
            "headers 1 :method=POST :path=/pkg.Svc/Call content-type=application/grpc end=false",
            "data 1 hello",
            "end 1",
            "reset 3",
        ];
        for split in 1..=bytes.len() {
            let mut reader = Reader::new(true);
            assert_eq!(said(&mut reader, &bytes, split), expected, "split {split}");
            assert_eq!(reader.broken(), None);
        }
    }

    #[test]
    fn header_blocks_keep_the_dynamic_table_in_step() {
        // RFC 7541 C.4: requests with Huffman coding, the second naming the authority by its
        // index in the dynamic table that the first filled.
        let first = b"\x82\x86\x84\x41\x8c\xf1\xe3\xc2\xe5\xf2\x3a\x6b\xa0\xab\x90\xf4\xff";
        let second = b"\x82\x86\x84\xbe\x58\x86\xa8\xeb\x10\x64\x9c\xbf";
        let mut bytes = frame(HEADERS, END_HEADERS | END_STREAM, 1, first);
        bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, second));
        let mut reader = Reader::new(false);
        assert_eq!(
            said(&mut reader, &bytes, bytes.len()),
            [
                "headers 1 :method=GET :scheme=http :path=/ :authority=www.example.com end=true",
                "headers 3 :method=GET :scheme=http :path=/ :authority=www.example.com cache-control=no-cache end=true",
            ]
        );
        // A table size update within what the peer allowed, then one past it.
        let mut reader = Reader::new(false);
        reader.allow_table_size(0);
        let bytes = frame(HEADERS, END_HEADERS, 1, b"\x20\x82");
        assert_eq!(
            said(&mut reader, &bytes, 4),
            ["headers 1 :method=GET end=false"]
        );
        let bytes = frame(HEADERS, END_HEADERS, 3, b"\x3f\xe1\x1f\x82");
        assert!(said(&mut reader, &bytes, 4).is_empty());
        assert_eq!(
            reader.broken(),
            Some(Broken::Hpack(DecoderError::InvalidMaxDynamicSize))
        );
    }

    #[test]
    fn what_breaks_a_direction_stops_it_for_good() {
        let headers = |stream| frame(HEADERS, END_HEADERS, stream, b"\x82");
        let cases: [(&str, Vec<u8>, Broken); 5] = [
            (
                "an HTTP/1 request",
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                Broken::Preface,
            ),
            (
                "a CONTINUATION with no HEADERS",
                frame(CONTINUATION, END_HEADERS, 1, b"\x82"),
                Broken::Protocol,
            ),
            (
                "another frame inside a header block",
                {
                    let mut b = frame(HEADERS, 0, 1, b"\x82");
                    b.extend(frame(DATA, 0, 1, b"x"));
                    b
                },
                Broken::Protocol,
            ),
            (
                "a block over the bound",
                frame(HEADERS, END_HEADERS, 1, &vec![0x82; MAX_HEADER_BLOCK + 1]),
                Broken::HeaderBlock,
            ),
            (
                "an index past both tables",
                frame(HEADERS, END_HEADERS, 1, b"\xff\x00"),
                Broken::Hpack(DecoderError::HeaderIndexOutOfBounds),
            ),
        ];
        for (case, bytes, broken) in cases {
            let mut reader = Reader::new(case == "an HTTP/1 request");
            said(&mut reader, &bytes, 7);
            assert_eq!(reader.broken(), Some(broken), "{case}");
            // Nothing is read after it.
            assert!(said(&mut reader, &headers(5), 9).is_empty(), "{case}");
        }
        // A header list over its bound keeps the table in step, and says so.
        let mut encoder = loona_hpack::Encoder::new();
        let big = vec![b'v'; 4000];
        let block = encoder.encode([(&b"x-big"[..], &big[..])]);
        let again = encoder.encode(std::iter::repeat_n((&b"x-big"[..], &big[..]), 20));
        let mut bytes = frame(HEADERS, END_HEADERS, 1, &block);
        bytes.extend(frame(HEADERS, END_HEADERS, 3, &again));
        bytes.extend(frame(HEADERS, END_HEADERS, 5, &block[..0]));
        let mut reader = Reader::new(false);
        let words = said(&mut reader, &bytes, 1000);
        assert_eq!(words[1], "headers 3 too large end=false");
        assert_eq!(words.len(), 3);
    }

    #[test]
    fn frames_are_told_from_other_bytes_in_the_middle_of_a_connection() {
        let mut two = frame(HEADERS, END_HEADERS, 7, b"\x82\x84");
        two.extend(frame(DATA, 0, 7, &[1; 100]));
        let mut cut = two.clone();
        cut.truncate(30);
        for (bytes, frames) in [
            (two, true),
            // The last frame may go on past the bytes seen.
            (cut, true),
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), false),
            (b"{\"json\": 1}".to_vec(), false),
            // A SETTINGS frame on a stream, DATA on stream 0.
            (frame(SETTINGS, 0, 1, &[]), false),
            (frame(DATA, 0, 0, b"x"), false),
            (vec![0; 4], false),
        ] {
            assert_eq!(looks_like_frames(&bytes), frames, "{bytes:?}");
        }
    }
}
