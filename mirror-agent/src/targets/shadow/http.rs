//! HTTP/1.x messages in a byte stream that may have gaps: a request or response head (by
//! httparse), then its body by `Content-Length`, chunked (trailers included) or, for a response,
//! until the connection closes. Bodies pass through as they come, never whole. After a gap, or
//! when the stream is joined in the middle, the parser looks for the next message's first line.
use bytes::BytesMut;

/// A head's bytes at most: a longer one loses its message (`oversized`).
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// Which side of a connection a parser reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// A message's first line and headers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Head {
    /// A request's method and target, or empty for a response.
    pub method: String,
    pub target: String,
    /// A response's status, or 0 for a request.
    pub status: u16,
    pub version: Version,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// The version a head was read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.x, with its minor version.
    Http1(u8),
    /// HTTP/2: `body` when its HEADERS did not end the stream.
    Http2 { body: bool },
}

impl Default for Version {
    fn default() -> Self {
        Version::Http1(1)
    }
}

impl Head {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether a header `name` lists `token` (comma-separated, any case).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }

    /// How the body that follows this head is framed, by the headers alone (RFC 9112 §6.3):
    /// chunked, a length, or (responses) until the connection closes.
    pub fn framing(&self, side: Side) -> Result<Framing, String> {
        if self.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked(Chunked::Size(Vec::new())));
        }
        if self.header("transfer-encoding").is_some() {
            return match side {
                Side::Request => Err("a transfer coding other than chunked".into()),
                Side::Response => Ok(Framing::UntilClose),
            };
        }
        match self.header("content-length") {
            Some(value) => std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Framing::Length)
                .ok_or_else(|| "an unreadable Content-Length".into()),
            None if side == Side::Request => Ok(Framing::Length(0)),
            None => Ok(Framing::UntilClose),
        }
    }
}

/// How a body is delimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the connection closes (a response).
    UntilClose,
}

/// Where a chunked body's parser is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked {
    /// Reading a chunk-size line (bytes so far).
    Size(Vec<u8>),
    /// This many data bytes of the chunk to come, then its CRLF.
    Data(u64),
    /// The CRLF after a chunk's data: bytes of it still to skip.
    DataEnd(u8),
    /// The trailer section, after the last chunk (bytes so far).
    Trailers(Vec<u8>),
}

/// What a parser found, in stream order.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Head(Head),
    /// Body bytes (chunk framing removed).
    Body(&'a [u8]),
    /// The message is complete; trailers of a chunked body, if any.
    End(Vec<(String, Vec<u8>)>),
    /// The message was cut by a gap, or could not be read: it ends here, incomplete.
    Lost(LostWhy),
}

/// Why a message was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostWhy {
    /// Bytes of it never reached the agent.
    Gap,
    /// Its head was longer than [`MAX_HEAD`], or unreadable.
    Unreadable,
}

#[derive(Debug)]
enum State {
    /// Looking for the first line of a message (after a gap, or when joined mid-stream).
    Seek,
    /// At a message boundary, or in a head: its bytes so far.
    Head,
    Body(Framing),
    /// Nothing more is read on this stream (an upgrade, or a body until the close).
    Stopped,
}

/// A parser for one direction of a connection.
#[derive(Debug)]
pub struct Parser {
    side: Side,
    state: State,
    head: BytesMut,
}

impl Parser {
    /// A parser at a message boundary (`synced`, the stream's start was seen) or looking for one.
    pub fn new(side: Side, synced: bool) -> Self {
        Parser {
            side,
            state: if synced { State::Head } else { State::Seek },
            head: BytesMut::new(),
        }
    }

    /// Whether the parser is inside a message (a head or a body).
    pub fn in_message(&self) -> bool {
        match self.state {
            State::Head => !self.head.is_empty(),
            State::Body(_) => true,
            State::Seek | State::Stopped => false,
        }
    }

    /// Whether the parser is between two messages it read whole: the next byte begins one.
    pub fn between_messages(&self) -> bool {
        matches!(self.state, State::Head) && self.head.is_empty()
    }

    /// Reads no more: the connection was upgraded to another protocol.
    pub fn stop(&mut self) {
        self.state = State::Stopped;
    }

    /// The stream lost bytes here.
    pub fn gap(&mut self, on: &mut dyn FnMut(Event<'_>)) {
        if self.in_message() {
            on(Event::Lost(LostWhy::Gap));
        }
        self.head.clear();
        if !matches!(self.state, State::Stopped) {
            self.state = State::Seek;
        }
    }

    /// The stream ended: a body until the close is complete, anything else in progress is lost.
    pub fn close(&mut self, on: &mut dyn FnMut(Event<'_>)) {
        match self.state {
            State::Body(Framing::UntilClose) => on(Event::End(Vec::new())),
            _ if self.in_message() => on(Event::Lost(LostWhy::Gap)),
            _ => {}
        }
        self.state = State::Stopped;
    }

    /// Reads `data`. For each [`Event::Head`], `on` says how its body is framed (a response's
    /// depends on its request), or `None` to read no more of the stream (an upgrade).
    pub fn feed(&mut self, mut data: &[u8], on: &mut dyn FnMut(Event<'_>) -> Option<Framing>) {
        while !data.is_empty() {
            match &mut self.state {
                State::Stopped => return,
                State::Seek => match find_start(data, self.side) {
                    Some(at) => {
                        data = &data[at..];
                        self.state = State::Head;
                    }
                    None => return,
                },
                State::Head => {
                    // Blank lines between messages are allowed.
                    if self.head.is_empty() {
                        let skip = data
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let before = self.head.len();
                    let take = data.len().min(MAX_HEAD + 4 - before);
                    self.head.extend_from_slice(&data[..take]);
                    match parse_head(&self.head, self.side) {
                        Ok(Some((head, len))) => {
                            data = &data[len - before..];
                            self.head.clear();
                            self.state = match on(Event::Head(head)) {
                                Some(Framing::Length(0)) => {
                                    on(Event::End(Vec::new()));
                                    State::Head
                                }
                                Some(framing) => State::Body(framing),
                                None => State::Stopped,
                            };
                        }
                        Ok(None) if self.head.len() <= MAX_HEAD => data = &data[take..],
                        _ => {
                            self.head.clear();
                            self.state = State::Seek;
                            on(Event::Lost(LostWhy::Unreadable));
                            data = &data[take..];
                        }
                    }
                }
                State::Body(framing) => {
                    let (used, event) = body_step(framing, data);
                    // A body whose last bytes just came ends now, not with the next message.
                    let complete = *framing == Framing::Length(0);
                    data = &data[used..];
                    match event {
                        Some(event @ Event::End(_)) => {
                            self.state = State::Head;
                            on(event);
                        }
                        Some(event @ Event::Lost(_)) => {
                            self.state = State::Seek;
                            on(event);
                        }
                        Some(event) => {
                            on(event);
                            if complete {
                                self.state = State::Head;
                                on(Event::End(Vec::new()));
                            }
                        }
                        None => {}
                    }
                }
            }
        }
    }
}

/// One step through a body: bytes of `data` used, and what they were.
fn body_step<'a>(framing: &mut Framing, data: &'a [u8]) -> (usize, Option<Event<'a>>) {
    match framing {
        Framing::UntilClose => (data.len(), Some(Event::Body(data))),
        Framing::Length(left) => {
            let take = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= take as u64;
            (take, Some(Event::Body(&data[..take])))
        }
        Framing::Chunked(chunked) => chunk_step(chunked, data),
    }
}

fn chunk_step<'a>(chunked: &mut Chunked, data: &'a [u8]) -> (usize, Option<Event<'a>>) {
    match chunked {
        Chunked::Size(line) => {
            let Some(end) = data.iter().position(|&b| b == b'\n') else {
                line.extend_from_slice(data);
                return if line.len() > 1024 {
                    (data.len(), Some(Event::Lost(LostWhy::Unreadable)))
                } else {
                    (data.len(), None)
                };
            };
            line.extend_from_slice(&data[..end]);
            let text = String::from_utf8_lossy(line);
            let digits = text.split(';').next().unwrap_or("").trim();
            match u64::from_str_radix(digits, 16) {
                Ok(0) => *chunked = Chunked::Trailers(Vec::new()),
                Ok(size) => *chunked = Chunked::Data(size),
                Err(_) => return (end + 1, Some(Event::Lost(LostWhy::Unreadable))),
            }
            (end + 1, None)
        }
        Chunked::Data(left) => {
            let take = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= take as u64;
            if *left == 0 {
                *chunked = Chunked::DataEnd(2);
            }
            (take, Some(Event::Body(&data[..take])))
        }
        Chunked::DataEnd(left) => {
            // CRLF (or a bare LF) after the data.
            let mut used = 0;
            while *left > 0 && used < data.len() {
                let byte = data[used];
                used += 1;
                *left = if byte == b'\n' { 0 } else { *left - 1 };
            }
            if *left == 0 {
                *chunked = Chunked::Size(Vec::new());
            }
            (used, None)
        }
        Chunked::Trailers(section) => {
            section.extend_from_slice(data);
            // The section ends with an empty line: at once (no trailers), or after them.
            let end = if section.starts_with(b"\r\n") {
                Some(2)
            } else if section.starts_with(b"\n") {
                Some(1)
            } else {
                find(section, b"\r\n\r\n").map(|at| at + 4)
            };
            let Some(end) = end else {
                return if section.len() > MAX_HEAD {
                    (data.len(), Some(Event::Lost(LostWhy::Unreadable)))
                } else {
                    (data.len(), None)
                };
            };
            let used = data.len() - (section.len() - end);
            let trailers = trailer_fields(&section[..end]);
            (used, Some(Event::End(trailers)))
        }
    }
}

fn trailer_fields(section: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut headers) {
        Ok(httparse::Status::Complete((_, fields))) => fields
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
        _ => Vec::new(),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A complete head at the start of `bytes`, with its length; `None` while incomplete.
fn parse_head(bytes: &[u8], side: Side) -> Result<Option<(Head, usize)>, ()> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let head = |fields: &[httparse::Header<'_>]| -> Vec<(String, Vec<u8>)> {
        fields
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect()
    };
    match side {
        Side::Request => {
            let mut request = httparse::Request::new(&mut fields);
            match request.parse(bytes) {
                Ok(httparse::Status::Complete(len)) => Ok(Some((
                    Head {
                        method: request.method.unwrap_or_default().to_owned(),
                        target: request.path.unwrap_or_default().to_owned(),
                        status: 0,
                        version: Version::Http1(request.version.unwrap_or(1)),
                        headers: head(request.headers),
                    },
                    len,
                ))),
                Ok(httparse::Status::Partial) => Ok(None),
                Err(_) => Err(()),
            }
        }
        Side::Response => {
            let mut response = httparse::Response::new(&mut fields);
            match response.parse(bytes) {
                Ok(httparse::Status::Complete(len)) => Ok(Some((
                    Head {
                        status: response.code.unwrap_or_default(),
                        version: Version::Http1(response.version.unwrap_or(1)),
                        headers: head(response.headers),
                        ..Head::default()
                    },
                    len,
                ))),
                Ok(httparse::Status::Partial) => Ok(None),
                Err(_) => Err(()),
            }
        }
    }
}

/// Where in `data` the first line of a message starts: at the start, or after a line feed.
fn find_start(data: &[u8], side: Side) -> Option<usize> {
    std::iter::once(0)
        .chain(
            data.iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .find(|&at| looks_like_start(&data[at..], side))
}

/// Whether `data` holds the first line of one of `side`'s messages (how a connection joined in
/// the middle tells its client from its server).
pub fn has_start(data: &[u8], side: Side) -> bool {
    find_start(data, side).is_some()
}

/// Whether `line` begins like a request line (`METHOD SP target SP HTTP/1.`) or a status line.
fn looks_like_start(line: &[u8], side: Side) -> bool {
    match side {
        Side::Response => line.starts_with(b"HTTP/1.") && line.len() >= 12,
        Side::Request => {
            let method = line.iter().take_while(|b| b.is_ascii_uppercase()).count();
            if method == 0 || method > 16 || line.get(method) != Some(&b' ') {
                return false;
            }
            let rest = &line[method + 1..];
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            let first = &rest[..end];
            first.windows(7).any(|w| w == b"HTTP/1.")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a parser found, as words, with `framing` deciding each body (a response to HEAD has
    /// none, say).
    fn parse(side: Side, synced: bool, pieces: &[Option<&[u8]>]) -> Vec<String> {
        let mut parser = Parser::new(side, synced);
        let mut events = Vec::new();
        for piece in pieces {
            let mut on = |event: Event<'_>| {
                let (text, framing) = match &event {
                    Event::Head(head) if head.status == 0 => (
                        format!("head {} {}", head.method, head.target),
                        Some(head.framing(side).expect("framing")),
                    ),
                    Event::Head(head) => (
                        format!("head {}", head.status),
                        Some(head.framing(side).expect("framing")),
                    ),
                    Event::Body(b) => (format!("body {}", String::from_utf8_lossy(b)), None),
                    Event::End(trailers) => (format!("end {}", trailers.len()), None),
                    Event::Lost(why) => (format!("lost {why:?}"), None),
                };
                events.push(text);
                framing
            };
            match piece {
                Some(data) => parser.feed(data, &mut on),
                None => parser.gap(&mut |e| {
                    on(e);
                }),
            }
        }
        events
    }

    #[test]
    fn requests_by_length_chunks_and_pipelined() {
        let got = parse(
            Side::Request,
            true,
            &[Some(
                b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n1;ext=1\r\nz\r\n0\r\nX-Sum: 9\r\n\r\n",
            )],
        );
        assert_eq!(
            got,
            [
                "head GET /a",
                "end 0",
                "head POST /b",
                "body abc",
                "end 0",
                "head PUT /c",
                "body xy",
                "body z",
                "end 1"
            ]
        );
    }

    #[test]
    fn messages_split_anywhere_read_the_same() {
        let whole: &[u8] = b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /n HTTP/1.1\r\n\r\n";
        for split in 1..whole.len() {
            let got = parse(
                Side::Request,
                true,
                &[Some(&whole[..split]), Some(&whole[split..])],
            );
            let bodies: String = got.iter().filter_map(|e| e.strip_prefix("body ")).collect();
            let heads: Vec<_> = got.iter().filter(|e| e.starts_with("head")).collect();
            assert_eq!(bodies, "abc", "split at {split}: {got:?}");
            assert_eq!(heads, ["head POST /b", "head GET /n"], "split at {split}");
        }
    }

    #[test]
    fn a_gap_loses_the_message_and_the_next_one_is_found() {
        let got = parse(
            Side::Request,
            true,
            &[
                Some(b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
                None,
                Some(b"fgh\r\nxx GET /no\r\nGET /b HTTP/1.1\r\n\r\n"),
            ],
        );
        assert_eq!(
            got,
            [
                "head POST /a",
                "body abc",
                "lost Gap",
                "head GET /b",
                "end 0"
            ]
        );
        // Joined in the middle: the first line is found after a line feed.
        let got = parse(
            Side::Request,
            false,
            &[Some(b"tail of a body\nGET /c HTTP/1.0\r\n\r\n")],
        );
        assert_eq!(got, ["head GET /c", "end 0"]);
    }

    #[test]
    fn responses_until_the_close_and_bad_heads() {
        let mut parser = Parser::new(Side::Response, true);
        let mut events = Vec::new();
        parser.feed(b"HTTP/1.0 200 OK\r\n\r\nall", &mut |e| {
            events.push(format!("{e:?}").chars().take(10).collect::<String>());
            match e {
                Event::Head(h) => Some(h.framing(Side::Response).expect("framing")),
                _ => None,
            }
        });
        parser.close(&mut |e| events.push(format!("{e:?}")));
        assert_eq!(events, ["Head(Head ", "Body([97, ", "End([])"]);
        let got = parse(
            Side::Request,
            true,
            &[Some(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")],
        );
        assert_eq!(got, ["lost Unreadable"]);
        let head = Head {
            headers: vec![("Content-Length".into(), b"x".to_vec())],
            ..Head::default()
        };
        assert!(head.framing(Side::Request).is_err());
    }
}
