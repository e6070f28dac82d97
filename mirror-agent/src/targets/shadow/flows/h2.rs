//! HTTP/2 connections (h2c with prior knowledge, gRPC's usual form) in the flows: each stream a
//! request opens is one exchange, from its HEADERS to the answer's `END_STREAM` or a reset, and
//! is replayed as a stream of the client connection's own HTTP/2 connection to the shadow. A
//! connection first seen in the middle has unknown HPACK state: its requests are counted by
//! their HEADERS frames alone, as `undecodable`, and nothing of them is read or guessed.
use std::collections::HashMap;

use super::{
    super::{
        super::observe::Exchange,
        Reason,
        compare::Answer,
        h2::{Fields, Frame, FrameHeader, PREFACE, Reader},
        http::{Head, Version},
    },
    Connection, Context,
};

/// Streams followed per connection, at most (a peer's usual concurrency limit is 100 to 250):
/// a request past it is counted `unreadable`.
const MAX_STREAMS: usize = 256;

/// What a new stream's first bytes must be for the connection to be read as HTTP/2: the
/// client's preface, or the SETTINGS frame a server may send before the preface arrives.
pub(super) fn begins(client: bool, data: &[u8]) -> bool {
    if client {
        let n = data.len().min(PREFACE.len());
        // "PRI " alone already tells it from every HTTP/1 method.
        n >= 4 && data[..n] == PREFACE[..n]
    } else {
        FrameHeader::parse(data).is_some_and(|h| h.kind == 0x4 && h.stream == 0 && h.flags == 0)
    }
}

/// One HTTP/2 connection: its two directions, and the exchanges open on it.
#[derive(Debug)]
pub(super) struct Conversation {
    /// 0: the client's direction; 1: the server's.
    readers: [Reader; 2],
    calls: HashMap<u32, Call>,
    /// The highest stream a request opened: a HEADERS frame of the client on a higher one
    /// opens a new request.
    highest: u32,
    /// Counting the client's requests by their frames alone, once its HPACK state is unknown.
    blind: Option<Blind>,
}

/// An exchange open on a stream.
#[derive(Debug)]
struct Call {
    /// The request's id for the replay side.
    id: u64,
    /// Handed to the replay side.
    replaying: bool,
    /// The client has not ended its side of the stream yet.
    asking: bool,
    /// Observed: its labels and when it began.
    exchange: Option<Exchange>,
    /// The answer's status, once its head came.
    status: Option<u16>,
    /// Replayed with compare on: the live answer, as it is read.
    answer: Option<Answer>,
}

/// The client's direction read as frame headers only.
#[derive(Debug, Default)]
struct Blind {
    /// The frame header being read.
    header: Vec<u8>,
    /// Payload bytes of the current frame still to skip; `None` while the bytes are not known
    /// to begin a frame (a new piece of the stream may).
    left: Option<u64>,
}

/// What a reader said, kept past the reader's borrow.
enum Said {
    Headers {
        stream: u32,
        fields: Option<Fields>,
        end_stream: bool,
    },
    Data(u32, Vec<u8>),
    End(u32),
    Reset(u32),
    TableSize(u32),
}

impl Conversation {
    /// A connection whose start was seen: both directions decoded.
    pub(super) fn new() -> Self {
        Conversation {
            readers: [Reader::new(true), Reader::new(false)],
            calls: HashMap::new(),
            highest: 0,
            blind: None,
        }
    }

    /// A connection first seen in the middle: its requests are counted by their frames.
    pub(super) fn joined() -> Self {
        let mut joined = Conversation {
            blind: Some(Blind::default()),
            ..Conversation::new()
        };
        // The server's table is as unknown as the client's.
        joined.readers[1].gap();
        joined
    }
}

/// The value of field `name`, as text.
fn field<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], name: &[u8]) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// The fields that are not pseudo-headers, as the replay side takes headers.
fn regular(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    fields
        .iter()
        .filter(|(n, _)| !n.starts_with(b":"))
        .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), v.clone()))
        .collect()
}

impl Blind {
    /// Reads the client's bytes as frames, when they can be told to begin one; hands `opened`
    /// each new request, with how many streams it skipped past `highest` (a client opens them
    /// in order, so those requests were in bytes lost).
    fn feed(&mut self, mut data: &[u8], highest: &mut u32, opened: &mut dyn FnMut(u32)) {
        if self.left.is_none() {
            if !super::super::h2::looks_like_frames(data) {
                return;
            }
            self.header.clear();
            self.left = Some(0);
        }
        while !data.is_empty() {
            let Some(left) = self.left.as_mut() else {
                return;
            };
            if *left > 0 {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                *left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            let Some(header) = FrameHeader::parse(&self.header) else {
                continue;
            };
            self.header.clear();
            if header.kind > 0x9 || header.length > 1 << 14 {
                // Not a frame after all: wait for a piece that begins one.
                self.left = None;
                return;
            }
            if header.kind == 0x1 && header.stream % 2 == 1 && header.stream > *highest {
                // Unknown before the first request seen of a connection joined in the middle.
                let skipped = if *highest == 0 {
                    0
                } else {
                    (header.stream - *highest) / 2 - 1
                };
                *highest = header.stream;
                opened(skipped);
            }
            self.left = Some(u64::from(header.length));
        }
    }
}

impl Context<'_> {
    /// Bytes of an HTTP/2 connection's stream `side`.
    pub(super) fn h2_read(&mut self, conn: &mut Connection, side: usize, data: &[u8]) {
        let Some(mut h2) = conn.h2.take() else {
            return;
        };
        if side == 0
            && let Some(blind) = h2.blind.as_mut()
        {
            let mut opened = Vec::new();
            blind.feed(data, &mut h2.highest, &mut |skipped| opened.push(skipped));
            for skipped in opened {
                for _ in 0..skipped {
                    self.unread(conn.gap_reason(0));
                }
                self.unread(Reason::Undecodable);
            }
        } else {
            let mut said = Vec::new();
            h2.readers[side].feed(data, &mut |frame| {
                said.push(match frame {
                    Frame::Headers {
                        stream,
                        fields,
                        end_stream,
                    } => Said::Headers {
                        stream,
                        fields,
                        end_stream,
                    },
                    Frame::Data { stream, data } => Said::Data(stream, data.to_vec()),
                    Frame::End { stream } => Said::End(stream),
                    Frame::Reset { stream } => Said::Reset(stream),
                    Frame::TableSize(table) => Said::TableSize(table),
                });
            });
            for said in said {
                self.h2_said(conn, &mut h2, side, said);
            }
            if side == 0 && h2.readers[0].broken().is_some() {
                // From here the client's header blocks cannot be decoded: its requests are
                // counted by their frames, from the next piece that begins one.
                h2.blind = Some(Blind::default());
                self.h2_cut(conn, &mut h2, 0);
            }
        }
        conn.h2 = Some(h2);
    }

    /// Bytes of stream `side` were lost: that direction can no longer be decoded.
    pub(super) fn h2_gap(&mut self, conn: &mut Connection, side: usize) {
        let Some(mut h2) = conn.h2.take() else {
            return;
        };
        h2.readers[side].gap();
        if side == 0 {
            h2.blind.get_or_insert_with(Blind::default).left = None;
        }
        self.h2_cut(conn, &mut h2, side);
        conn.h2 = Some(h2);
    }

    /// Direction `side` can be read no further: the requests it was sending, or the answers,
    /// are lost with it.
    fn h2_cut(&mut self, conn: &Connection, h2: &mut Conversation, side: usize) {
        let cut: Vec<u32> = h2
            .calls
            .iter()
            .filter(|(_, call)| side == 1 || call.asking)
            .map(|(stream, _)| *stream)
            .collect();
        for stream in cut {
            if let Some(call) = h2.calls.remove(&stream) {
                self.h2_ended(conn, call, None, conn.gap_reason(side));
            }
        }
    }

    /// The connection ended: the exchanges still open were not answered.
    pub(super) fn h2_close(&mut self, conn: &mut Connection) {
        if let Some(mut h2) = conn.h2.take() {
            for (_, call) in h2.calls.drain() {
                self.h2_ended(conn, call, None, Reason::Gap);
            }
        }
    }

    fn h2_said(&mut self, conn: &Connection, h2: &mut Conversation, side: usize, said: Said) {
        match said {
            Said::TableSize(table) => h2.readers[1 - side].allow_table_size(table),
            Said::Headers {
                stream,
                fields,
                end_stream,
            } if side == 0 => {
                if stream % 2 == 1 && stream > h2.highest {
                    h2.highest = stream;
                    self.h2_request(conn, h2, stream, fields.as_ref(), end_stream);
                } else if let Some(call) = h2.calls.get_mut(&stream)
                    && end_stream
                {
                    // The request's trailers.
                    let trailers = regular(&fields.unwrap_or_default());
                    Self::asked(self.replay, conn, call, trailers);
                }
            }
            Said::Headers {
                stream,
                fields,
                end_stream,
            } => {
                let Some(call) = h2.calls.get_mut(&stream) else {
                    return;
                };
                let fields = fields.unwrap_or_default();
                if call.status.is_none() {
                    // An interim answer (1xx) is followed by the real one.
                    call.status = field(&fields, b":status")
                        .and_then(|s| s.parse().ok())
                        .filter(|s| !(100..200).contains(s));
                    if let (Some(status), Some(answer)) = (call.status, call.answer.as_mut()) {
                        *answer = Answer::new(status, regular(&fields));
                    }
                } else if let Some(answer) = call.answer.as_mut() {
                    // Trailers (gRPC's status) are compared as headers are.
                    answer.headers.extend(regular(&fields));
                }
                if let (Some(exchange), Some(code)) = (
                    call.exchange.as_mut(),
                    field(&fields, b"grpc-status").and_then(|c| c.parse().ok()),
                ) {
                    exchange.grpc_status(code);
                }
                if end_stream {
                    self.h2_answered(conn, h2, stream);
                }
            }
            Said::Data(stream, data) => {
                let Some(call) = h2.calls.get_mut(&stream) else {
                    return;
                };
                if side == 1 {
                    if let Some(answer) = call.answer.as_mut() {
                        answer.add_body(&data, self.flows.limits.compare_body_bytes);
                    }
                } else if call.replaying
                    && call.asking
                    && !self.replay.body(conn.id, call.id, &data)
                {
                    self.replay.abort(conn.id, call.id, Reason::Busy);
                    call.replaying = false;
                    call.answer = None;
                }
            }
            Said::End(stream) => match h2.calls.get_mut(&stream) {
                Some(call) if side == 0 => Self::asked(self.replay, conn, call, Vec::new()),
                Some(_) => self.h2_answered(conn, h2, stream),
                None => {}
            },
            Said::Reset(stream) => {
                if let Some(call) = h2.calls.remove(&stream) {
                    self.h2_ended(conn, call, None, Reason::Reset);
                }
            }
        }
    }

    /// The client ended its side of `call`'s stream, with `trailers`.
    fn asked(
        replay: &mut dyn super::Replay,
        conn: &Connection,
        call: &mut Call,
        trailers: Vec<(String, Vec<u8>)>,
    ) {
        if call.asking && call.replaying {
            replay.end(conn.id, call.id, trailers);
        }
        call.asking = false;
    }

    /// A request opened `stream` with these header fields (`None`: over the bound); `whole`
    /// when they ended the stream.
    fn h2_request(
        &mut self,
        conn: &Connection,
        h2: &mut Conversation,
        stream: u32,
        fields: Option<&Fields>,
        whole: bool,
    ) {
        self.flows.shared.update(|s| s.requests += 1);
        let Some(fields) = fields.filter(|_| h2.calls.len() < MAX_STREAMS) else {
            if self.flows.limits.replays {
                self.flows.shared.lost(Reason::Unreadable);
            }
            if let Some(observed) = &self.flows.observed {
                observed.unread(Reason::Unreadable);
            }
            return;
        };
        let id = self.flows.next_request;
        self.flows.next_request += 1;
        let mut headers = regular(fields);
        if let Some(authority) = field(fields, b":authority") {
            headers.insert(0, ("host".to_owned(), authority.as_bytes().to_vec()));
        }
        let head = Head {
            method: field(fields, b":method").unwrap_or_default().to_owned(),
            target: field(fields, b":path").unwrap_or_default().to_owned(),
            version: Version::Http2 { body: !whole },
            headers,
            ..Head::default()
        };
        let why = self.not_replayed(conn, &head, None);
        let replaying = self.hand_over(conn.id, id, &head, why);
        if replaying && whole {
            self.replay.end(conn.id, id, Vec::new());
        }
        let exchange = self.flows.observed.as_ref().map(|observed| {
            let exchange = observed.request(&head.method, &head.target, self.at);
            let grpc = head
                .header("content-type")
                .is_some_and(|t| t.starts_with(b"application/grpc"));
            if grpc {
                exchange.grpc(&head.target)
            } else {
                exchange
            }
        });
        let compare = replaying && self.flows.limits.compare;
        h2.calls.insert(
            stream,
            Call {
                id,
                replaying,
                asking: !whole,
                exchange,
                status: None,
                answer: compare.then(Answer::default),
            },
        );
    }

    /// The live answer on `stream` ended whole.
    fn h2_answered(&mut self, conn: &Connection, h2: &mut Conversation, stream: u32) {
        let Some(mut call) = h2.calls.remove(&stream) else {
            return;
        };
        if let Some(answer) = call.answer.take().filter(|_| !call.asking) {
            self.replay.live_answer(conn.id, call.id, answer);
        }
        let status = call.status;
        // Answered and closed before the request was whole: the rest never comes.
        self.h2_ended(conn, call, status, Reason::Reset);
    }

    /// An exchange ended: answered with `status`, or not (`None`). A request still being read,
    /// or a live answer still awaited for compare, is aborted for `why`.
    fn h2_ended(&mut self, conn: &Connection, call: Call, status: Option<u16>, why: Reason) {
        if call.replaying && (call.asking || call.answer.is_some()) {
            self.replay.abort(conn.id, call.id, why);
        }
        if let Some(exchange) = call.exchange {
            self.observe(conn, exchange, status);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use loona_hpack::Encoder;

    use super::super::{
        super::{
            super::observe::{ObserveConfig, Observed, Protocol},
            h2::{PREFACE, tests::frame},
        },
        tests::{SERVER, Wire},
    };

    const HEADERS: u8 = 0x1;
    const DATA: u8 = 0x0;
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    /// An HTTP/2 connection on a [`Wire`]: each side's bytes at the next offset, with its own
    /// HPACK encoder.
    struct H2Wire {
        wire: Wire,
        sent: [u32; 2],
        encoders: [Encoder<'static>; 2],
    }

    impl H2Wire {
        fn new(wire: Wire) -> Self {
            H2Wire {
                wire,
                sent: [0; 2],
                encoders: [Encoder::new(), Encoder::new()],
            }
        }

        fn send(&mut self, client: bool, bytes: &[u8]) {
            let [c, s] = self.sent;
            if client {
                self.wire.client(c, s, bytes);
                self.sent[0] += bytes.len() as u32;
            } else {
                self.wire.server(s, c, bytes);
                self.sent[1] += bytes.len() as u32;
            }
        }

        /// A whole header block on `stream`.
        fn headers(&mut self, client: bool, stream: u32, fields: &[(&str, &str)], end: bool) {
            let block = self.encoders[usize::from(!client)]
                .encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
            let flags = END_HEADERS | if end { END_STREAM } else { 0 };
            self.send(client, &frame(HEADERS, flags, stream, &block));
        }
    }

    fn observing_http() -> Observed {
        Observed::new(&ObserveConfig::of(Protocol::Http))
    }

    /// The observed series as `method class [grpc_method grpc_code] count`.
    fn series(observed: &Observed) -> Vec<String> {
        let stats = observed.read();
        stats
            .services
            .iter()
            .flat_map(|s| {
                assert_eq!(s.service, SERVER);
                s.requests.iter().map(|r| {
                    let grpc = match (&r.grpc_method, &r.grpc_code) {
                        (Some(m), Some(c)) => format!(" {m} {c}"),
                        _ => String::new(),
                    };
                    format!("{} {}{grpc} {}", r.method, r.status_class, r.count)
                })
            })
            .collect()
    }

    #[test]
    fn streams_are_exchanges_with_their_status_and_grpc_code() {
        let observed = observing_http();
        let mut h2 = H2Wire::new(Wire::observing(&observed));
        let ms = Duration::from_millis;
        h2.wire.handshake();
        // The server's SETTINGS before the client's preface, letting the client's encoder use
        // a larger table.
        h2.send(false, &frame(0x4, 0, 0, &[0, 1, 0, 0, 0x40, 0]));
        let mut preface = PREFACE.to_vec();
        preface.extend(frame(0x4, 0, 0, &[]));
        h2.send(true, &preface);
        h2.wire.at = ms(10);
        h2.headers(true, 1, &[(":method", "GET"), (":path", "/a")], true);
        h2.wire.at = ms(12);
        h2.headers(true, 3, &[(":method", "POST"), (":path", "/b")], false);
        h2.send(true, &frame(DATA, END_STREAM, 3, b"body"));
        let grpc = [
            (":method", "POST"),
            (":path", "/shop.Cart/Get"),
            ("content-type", "application/grpc"),
        ];
        h2.wire.at = ms(13);
        h2.headers(true, 5, &grpc, false);
        h2.send(true, &frame(DATA, END_STREAM, 5, &[0, 0, 0, 0, 0]));
        h2.headers(true, 7, &grpc, true);
        h2.headers(true, 9, &[(":method", "PUT"), (":path", "/c")], false);
        h2.send(true, &frame(DATA, 0, 9, b"part"));
        // Answers, out of order: stream 3's first, then 1's after an interim 103.
        h2.wire.at = ms(20);
        h2.headers(false, 3, &[(":status", "404")], true);
        h2.headers(false, 1, &[(":status", "103")], false);
        h2.headers(false, 1, &[(":status", "200")], false);
        h2.wire.at = ms(30);
        h2.send(false, &frame(DATA, END_STREAM, 1, b"ok"));
        // A gRPC answer with trailers, and one with trailers only.
        h2.headers(false, 5, &[(":status", "200")], false);
        h2.send(false, &frame(DATA, 0, 5, &[0, 0, 0, 0, 0]));
        h2.headers(
            false,
            5,
            &[("grpc-status", "5"), ("grpc-message", "no")],
            true,
        );
        h2.headers(false, 7, &[(":status", "200"), ("grpc-status", "12")], true);
        // The client resets stream 9 in the middle of its body.
        h2.send(true, &frame(0x3, 0, 9, &[0, 0, 0, 8]));
        let mut got = series(&observed);
        got.sort();
        assert_eq!(
            got,
            [
                "GET 2xx 1",
                "POST 2xx /shop.Cart/Get NOT_FOUND 1",
                "POST 2xx /shop.Cart/Get UNIMPLEMENTED 1",
                "POST 4xx 1",
                "PUT unanswered 1",
            ]
        );
        let stats = observed.read();
        assert_eq!(stats.services[0].duration.count, 4);
        // GET from 10 ms to 30 ms, POST from 12 to 20, the two calls from 13 to 30.
        let sum = stats.services[0].duration.sum_seconds;
        assert!((sum - 0.062).abs() < 1e-9, "{sum}");
        assert_eq!(stats.unread.total(), 0);
    }

    #[test]
    fn each_stream_is_replayed_with_its_body_trailers_and_live_answer() {
        let mut h2 = H2Wire::new(Wire::new("compare = true"));
        h2.wire.handshake();
        h2.send(true, PREFACE);
        h2.headers(true, 1, &[(":method", "GET"), (":path", "/")], true);
        h2.headers(true, 3, &[(":method", "POST"), (":path", "/up")], false);
        h2.headers(true, 5, &[(":method", "PUT"), (":path", "/cut")], false);
        // Bodies interleaved, as a client multiplexes them.
        h2.send(true, &frame(DATA, 0, 3, b"ab"));
        h2.send(true, &frame(DATA, 0, 5, b"part"));
        h2.send(true, &frame(DATA, 0, 3, b"c"));
        h2.headers(true, 3, &[("x-sum", "1")], true);
        // Stream 5 is reset in the middle of its body.
        h2.send(true, &frame(0x3, 0, 5, &[0, 0, 0, 8]));
        h2.headers(false, 3, &[(":status", "201")], false);
        h2.send(false, &frame(DATA, END_STREAM, 3, b"made"));
        h2.headers(false, 1, &[(":status", "200")], false);
        h2.send(false, &frame(DATA, END_STREAM, 1, b"ok"));
        assert_eq!(
            h2.wire.told.lines,
            [
                "start 1 GET /",
                "end 1 trailers=0",
                "start 2 POST /up",
                "start 3 PUT /cut",
                "end 2 trailers=1",
                "abort 3 Reset",
                "live 2 201 made",
                "live 1 200 ok",
            ]
        );
        assert_eq!(h2.wire.told.bodies[&2], b"abc");
        assert_eq!(h2.wire.told.bodies[&3], b"part");
        assert_eq!(h2.wire.stats().requests, 3);
    }

    #[test]
    fn requests_whose_header_state_is_unknown_are_counted_by_their_frames() {
        // Joined in the middle: HPACK indexes into a table never seen, then a request split
        // over two segments and one that follows.
        let observed = observing_http();
        let mut wire = Wire::observing(&observed);
        let mut first = frame(HEADERS, END_HEADERS, 41, b"\xbe\xbf");
        first.extend(frame(DATA, 0, 41, b"abc"));
        wire.client(5000, 900, &first);
        wire.server(
            900,
            5000,
            &frame(HEADERS, END_HEADERS | END_STREAM, 41, b"\xc0"),
        );
        let next = frame(HEADERS, END_HEADERS | END_STREAM, 43, b"\xbe");
        let at = 5000 + first.len() as u32;
        wire.client(at, 910, &next[..4]);
        wire.client(at + 4, 910, &next[4..]);
        let stats = observed.read();
        assert_eq!(stats.unread.undecodable, 2, "{stats:?}");
        assert!(stats.services.is_empty());
        assert_eq!(wire.stats().joined_mid_stream, 1);

        // Bytes lost in the middle of a decoded connection: the requests on the streams it
        // skipped were in them; the next is counted undecodable.
        let observed = observing_http();
        let mut h2 = H2Wire::new(Wire::observing(&observed));
        h2.wire.handshake();
        h2.send(true, PREFACE);
        h2.headers(true, 1, &[(":method", "GET"), (":path", "/")], true);
        h2.sent[0] += 500;
        h2.headers(true, 7, &[(":method", "GET"), (":path", "/")], true);
        // Its server acknowledges the hole: the bytes are gone.
        h2.headers(false, 1, &[(":status", "200")], true);
        let stats = observed.read();
        assert_eq!(
            (stats.unread.gap, stats.unread.undecodable),
            (2, 1),
            "{stats:?}"
        );
        assert_eq!(series(&observed), ["GET 2xx 1"]);
    }
}
