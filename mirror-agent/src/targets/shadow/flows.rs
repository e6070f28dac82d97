//! The connections a shadow session sees, from the ring drain's thread: each direction's stream
//! put back in order ([`super::tcp`]), read as HTTP/1.x ([`super::http`]), and every request
//! decided at its head: replayed (handed to the [`Replay`] side), or lost with a reason. The
//! answers seen on the wire are paired with their requests by TCP itself: a response belongs to
//! the oldest request not yet answered that the server had received when it began to answer.
//! With `observe`, every exchange read is also counted as a service's ([`Observed`]).
use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use join::{client_of, h2_client};
use spent::{Spent, SpentConnections};

use super::{
    super::observe::{Exchange, Observed},
    Limits, Reason, Shared,
    compare::Answer,
    http::{Event, Framing, Head, LostWhy, Parser, Side},
    tcp::{Piece, Segment, Stream},
};

/// What the flows hand to the replay side, per connection (`conn`) and request (`id`). Once
/// [`Replay::start`] has taken a request, the replay side counts its outcome.
pub trait Replay {
    /// A request to replay; false when it cannot be taken now (counted `busy` by the caller).
    fn start(&mut self, conn: u64, id: u64, head: &Head) -> bool;
    /// Body bytes of the request being read; false when they cannot be queued (the request is
    /// then aborted as `busy`).
    fn body(&mut self, conn: u64, id: u64, data: &[u8]) -> bool;
    fn end(&mut self, conn: u64, id: u64, trailers: Vec<(String, Vec<u8>)>);
    /// The request cannot be completed: its outcome is `why`.
    fn abort(&mut self, conn: u64, id: u64, why: Reason);
    /// The answer the live service gave to request `id` (with compare on).
    fn live_answer(&mut self, conn: u64, id: u64, answer: Answer);
    /// The client connection ended: its shadow connection ends once its requests are done.
    fn close(&mut self, conn: u64);
}

/// No replay side at all (an observed session without a shadow): nothing is taken.
impl<R: Replay> Replay for Option<R> {
    fn start(&mut self, conn: u64, id: u64, head: &Head) -> bool {
        self.as_mut().is_some_and(|r| r.start(conn, id, head))
    }
    fn body(&mut self, conn: u64, id: u64, data: &[u8]) -> bool {
        self.as_mut().is_some_and(|r| r.body(conn, id, data))
    }
    fn end(&mut self, conn: u64, id: u64, trailers: Vec<(String, Vec<u8>)>) {
        if let Some(r) = self {
            r.end(conn, id, trailers);
        }
    }
    fn abort(&mut self, conn: u64, id: u64, why: Reason) {
        if let Some(r) = self {
            r.abort(conn, id, why);
        }
    }
    fn live_answer(&mut self, conn: u64, id: u64, answer: Answer) {
        if let Some(r) = self {
            r.live_answer(conn, id, answer);
        }
    }
    fn close(&mut self, conn: u64) {
        if let Some(r) = self {
            r.close(conn);
        }
    }
}

/// A request counted on a connection, waiting for its answer on the wire.
#[derive(Debug)]
struct Pending {
    /// 0 for a request lost whole in a hole (see [`Context::lost_whole`]).
    id: u64,
    /// The client's stream position once its head was read (or where the hole that held it
    /// began): a response to it comes from a server that had at least this much.
    start: u64,
    head_request: bool,
    /// Replayed with compare on: the live answer is wanted.
    compare: bool,
    /// When its last byte was seen.
    ended: Option<Duration>,
    /// Observed: its labels and when it began.
    exchange: Option<Exchange>,
}

/// The request being read.
#[derive(Debug, Clone, Copy)]
struct Reading {
    id: u64,
    /// Handed to the replay side.
    replaying: bool,
}

/// The live answer being read, for compare.
#[derive(Debug)]
struct Answering {
    id: u64,
    answer: Answer,
    compare: bool,
    /// Observed: its request's labels, and its status.
    exchange: Option<(Exchange, u16)>,
}

#[derive(Debug)]
struct Connection {
    id: u64,
    client: SocketAddr,
    server: SocketAddr,
    /// 0: client to server; 1: server to client.
    streams: [Stream; 2],
    parsers: [Parser; 2],
    /// Where the client's stream was first seen (requests before it are not this agent's).
    first_client_offset: Option<u64>,
    /// The connection is in the session's `percent`.
    selected: bool,
    reading: Option<Reading>,
    pending: VecDeque<Pending>,
    /// Answers lost whole in holes of the server's stream, not yet matched to their requests:
    /// for each, how much of the client's stream had been read when the hole showed (its
    /// request was in that).
    answers_lost: VecDeque<u64>,
    answering: Option<Answering>,
    /// When the client's stream began the request being read, as the wire saw it.
    began: Option<Duration>,
    last_seen: Instant,
    /// Its last segment's wall-clock time.
    last_at: Duration,
    /// [`Flows::loss_epoch`] at its last segment.
    loss_epoch: u64,
    /// Per stream: the ring refused copies since its last segment, so the next one's reach
    /// bounds what they could have held.
    ring_armed: [bool; 2],
    /// Per stream: the offset below which a gap is the ring's.
    ring_reach: [u64; 2],
    /// Per stream: where its latest gap began.
    gap_at: [u64; 2],
    /// A FIN or reset, per stream.
    ended: [bool; 2],
    /// First seen without its handshake after the ring refused copies (and not counted by
    /// [`Flows::headless`]): an answer to a request from before the first client byte seen
    /// answers one the ring refused.
    start_refused: bool,
    /// Read as HTTP/2 (its parsers stopped).
    h2: Option<Box<h2::Conversation>>,
}

impl Connection {
    /// Stream `side`'s latest gap: the ring's if it began below what the ring could have
    /// refused; otherwise the bytes never came.
    fn gap_reason(&self, side: usize) -> Reason {
        if self.gap_at[side] < self.ring_reach[side] {
            Reason::RingFull
        } else {
            Reason::Gap
        }
    }
}

/// Every connection of one session.
#[derive(Debug)]
pub struct Flows {
    limits: Limits,
    shared: Shared,
    observed: Option<Observed>,
    connections: HashMap<(SocketAddr, SocketAddr), Connection>,
    /// Connections that ended, or were counted by [`Flows::headless`].
    spent: SpentConnections,
    next_connection: u64,
    next_request: u64,
    /// Ring records marked `RING_AFTER_LOSS` so far: a gap after one is `ring_full`.
    loss_epoch: u64,
    /// The ring refused copies after the last it queued (known at a stop).
    tail_lost: bool,
    /// The request rate limit's bucket: requests it can take now, and when it was filled.
    tokens: f64,
    filled: Instant,
    last_sweep: Instant,
}

/// The shortest message: a hole at a message boundary at least this long held one
/// (`GET / HTTP/1.1` and its line end; a status line is longer), and a shorter one is taken for
/// the line ends some clients send between requests.
const MIN_MESSAGE: u64 = 16;

/// Unanswered requests (and answers lost whole) kept per connection.
const MAX_PENDING: usize = 1024;

/// A connection's key: its two ends, the lower first.
fn key(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a <= b { (a, b) } else { (b, a) }
}

impl Flows {
    pub fn new(limits: Limits, shared: Shared, observed: Option<Observed>) -> Self {
        let now = Instant::now();
        Flows {
            tokens: f64::from(limits.requests_per_second.unwrap_or(0)),
            spent: SpentConnections::new(limits.max_connections),
            limits,
            shared,
            observed,
            connections: HashMap::new(),
            next_connection: 1,
            next_request: 1,
            loss_epoch: 0,
            tail_lost: false,
            filled: now,
            last_sweep: now,
        }
    }

    /// The ring refused copies of the session before this one.
    pub fn ring_lost(&mut self) {
        self.loss_epoch += 1;
    }

    /// The ring refused copies of the session after the last one: whatever [`Flows::finish`]
    /// finds missing may have been in them.
    pub fn ring_lost_at_end(&mut self) {
        self.tail_lost = true;
    }

    /// One segment, seen at wall-clock `at`.
    pub fn segment(&mut self, segment: &Segment<'_>, at: Duration, replay: &mut dyn Replay) {
        let now = Instant::now();
        let key = key(segment.from, segment.to);
        if !self.connections.contains_key(&key) {
            let spent = self.spent.get(&key);
            if spent == Some(Spent::Closed) && !segment.syn {
                // A late copy of a connection that ended.
                return;
            }
            let (client, framed) = match client_of(segment) {
                Some(client) => (client, false),
                None if spent.is_none() && super::h2::looks_like_frames(segment.payload) => {
                    (h2_client(segment), true)
                }
                None => {
                    self.headless(key, segment, spent.is_some(), now);
                    return;
                }
            };
            if self.connections.len() >= self.limits.max_connections {
                self.evict_oldest(replay);
            }
            let synced = segment.syn;
            let server = if client == segment.from {
                segment.to
            } else {
                segment.from
            };
            let counted = self.spent.remove(&key) == Some(Spent::Counted);
            let mut conn = self.new_connection(client, server, synced);
            conn.start_refused = !synced && !counted && self.loss_epoch > 0;
            if framed {
                // HTTP/2 in the middle: its requests are counted by their frames alone.
                conn.h2 = Some(Box::new(h2::Conversation::joined()));
                conn.parsers.iter_mut().for_each(Parser::stop);
            }
            self.shared.update(|s| {
                s.connections += 1;
                if !synced {
                    s.joined_mid_stream += 1;
                }
            });
            self.connections.insert(key, conn);
        }
        let Some(mut conn) = self.connections.remove(&key) else {
            return;
        };
        conn.last_seen = now;
        conn.last_at = at;
        if conn.loss_epoch != self.loss_epoch {
            conn.loss_epoch = self.loss_epoch;
            conn.ring_armed = [true; 2];
        }
        let side = usize::from(segment.from != conn.client);
        let mut ctx = Context {
            flows: self,
            replay,
            at,
        };
        if segment.syn {
            conn.streams[side].syn(segment.seq);
            if side == 0 {
                conn.first_client_offset.get_or_insert(0);
            }
        }
        if let Some(ack) = segment.ack {
            // The peer's acknowledgment: bytes of the other stream before it are final.
            ctx.stream_pieces(&mut conn, 1 - side, ack, None);
        }
        ctx.stream_pieces(&mut conn, side, segment.seq, Some(segment));
        if segment.fin || segment.rst {
            conn.ended[side] = true;
            conn.streams[side].fin();
        }
        if segment.rst || conn.ended == [true, true] {
            ctx.close(&mut conn);
        } else {
            self.connections.insert(key, conn);
        }
    }

    /// A request known only by the bytes it left missing (lost whole in a hole, or its head cut):
    /// counted, and lost for `why`.
    fn unread(&self, why: Reason) {
        self.shared.update(|s| s.requests += 1);
        self.shared.lost(why);
        if let Some(observed) = &self.observed {
            observed.unread(why);
        }
    }

    /// Ends the connections idle for longer than the idle timeout (at most once a second).
    pub fn sweep(&mut self, replay: &mut dyn Replay) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < Duration::from_secs(1) {
            return;
        }
        self.last_sweep = now;
        let idle = self.limits.idle_timeout;
        self.spent.expire(now, idle);
        let stale: Vec<_> = self
            .connections
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_seen) > idle)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.evict(key, replay);
        }
    }

    /// Ends every connection: what is in progress is lost as `evicted` (the agent stops), or as
    /// `ring_full` when the ring refused copies at the end.
    pub fn finish(&mut self, replay: &mut dyn Replay) {
        let keys: Vec<_> = self.connections.keys().copied().collect();
        for key in keys {
            self.evict(key, replay);
        }
    }

    fn evict_oldest(&mut self, replay: &mut dyn Replay) {
        if let Some(key) = self
            .connections
            .iter()
            .min_by_key(|(_, c)| c.last_seen)
            .map(|(k, _)| *k)
        {
            self.evict(key, replay);
        }
    }

    fn evict(&mut self, key: (SocketAddr, SocketAddr), replay: &mut dyn Replay) {
        let Some(mut conn) = self.connections.remove(&key) else {
            return;
        };
        self.shared.update(|s| s.evicted_connections += 1);
        // The rest of what was in progress never came: the ring's, if it refused copies at the
        // end (a stop), else the connection's idleness or the table's room.
        let why = if self.tail_lost {
            conn.ring_reach = [u64::MAX; 2];
            Reason::RingFull
        } else {
            Reason::Evicted
        };
        let mut ctx = Context {
            flows: self,
            replay,
            at: conn.last_at,
        };
        if let Some(reading) = conn.reading.take() {
            ctx.lost(&conn, reading, why);
        }
        ctx.close(&mut conn);
    }

    fn new_connection(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        synced: bool,
    ) -> Connection {
        let id = self.next_connection;
        self.next_connection += 1;
        Connection {
            id,
            client,
            server,
            streams: [Stream::default(), Stream::default()],
            parsers: [
                Parser::new(Side::Request, synced),
                Parser::new(Side::Response, synced),
            ],
            first_client_offset: None,
            selected: self.limits.selects(client),
            reading: None,
            pending: VecDeque::new(),
            answers_lost: VecDeque::new(),
            answering: None,
            began: None,
            last_seen: Instant::now(),
            last_at: Duration::ZERO,
            loss_epoch: self.loss_epoch,
            ring_armed: [false; 2],
            ring_reach: [0; 2],
            gap_at: [0; 2],
            ended: [false; 2],
            start_refused: false,
            h2: None,
        }
    }

    /// Whether the request rate limit lets one more request through now.
    fn admit(&mut self) -> bool {
        let Some(rate) = self.limits.requests_per_second else {
            return true;
        };
        let now = Instant::now();
        let rate = f64::from(rate);
        self.tokens =
            (self.tokens + now.duration_since(self.filled).as_secs_f64() * rate).min(rate.max(1.0));
        self.filled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A stream's pieces with their stream offsets, copied (a gap's length for a gap): pieces borrow
/// the stream's buffers only while it hands them on.
type Pieces = Vec<(u64, Result<Vec<u8>, u64>)>;

/// The pieces `hand_on` makes `stream` hand on.
fn held_pieces(
    stream: &mut Stream,
    hand_on: impl FnOnce(&mut Stream, &mut dyn FnMut(Piece<'_>)),
) -> Pieces {
    let mut pieces = Vec::new();
    let mut at = stream.position();
    hand_on(stream, &mut |piece| match piece {
        Piece::Data(d) => {
            pieces.push((at, Ok(d.to_vec())));
            at += d.len() as u64;
        }
        Piece::Gap(n) => {
            pieces.push((at, Err(n)));
            at += n;
        }
    });
    pieces
}

/// What handling one segment needs besides its connection.
struct Context<'a> {
    flows: &'a mut Flows,
    replay: &'a mut dyn Replay,
    at: Duration,
}

impl Context<'_> {
    /// Hands stream `side`'s new pieces to its parser: from `segment`, or (without one) those
    /// the peer's acknowledgment `seq` proves lost.
    fn stream_pieces(
        &mut self,
        conn: &mut Connection,
        side: usize,
        seq: u32,
        segment: Option<&Segment<'_>>,
    ) {
        let limit = self.flows.limits.max_connection_bytes;
        let pieces = held_pieces(&mut conn.streams[side], |stream, out| match segment {
            Some(s) => stream.segment(seq, s.payload, s.missing, limit, out),
            None => stream.acknowledged(seq, out),
        });
        if side == 0 && conn.first_client_offset.is_none() && conn.streams[0].started() {
            conn.first_client_offset = conn.streams[0].offset_of(seq);
        }
        if conn.ring_armed[side] {
            // Copies the ring refused were queued before this one: of this stream, they held
            // bytes before the end of what this segment (or acknowledgment) reaches.
            let length = segment.map_or(0, |s| s.payload.len() as u64 + u64::from(s.missing));
            if let Some(start) = conn.streams[side].offset_of(seq) {
                conn.ring_reach[side] = conn.ring_reach[side].max(start + length);
                conn.ring_armed[side] = false;
            }
        }
        // The client's stream position the server had when it sent this segment.
        let acked = if side == 1 {
            segment
                .and_then(|s| s.ack)
                .and_then(|ack| conn.streams[0].offset_of(ack))
        } else {
            None
        };
        self.take_pieces(conn, side, pieces, acked);
    }

    /// Hands stream `side`'s pieces to its parser; `acked`: the client's stream position the
    /// server had when it sent them (for answers).
    fn take_pieces(
        &mut self,
        conn: &mut Connection,
        side: usize,
        pieces: Pieces,
        acked: Option<u64>,
    ) {
        for (offset, piece) in pieces {
            let length = match piece {
                Ok(data) => {
                    if conn.h2.is_none()
                        && offset == 0
                        && (conn.parsers[side].between_messages()
                            || side == 0 && data.starts_with(super::h2::PREFACE))
                        && h2::begins(side == 0, &data)
                    {
                        conn.h2 = Some(Box::new(h2::Conversation::new()));
                        conn.parsers.iter_mut().for_each(Parser::stop);
                    }
                    if conn.h2.is_some() {
                        self.h2_read(conn, side, &data);
                    } else {
                        self.read(conn, side, &data, acked);
                    }
                    continue;
                }
                Err(_) if conn.h2.is_some() => {
                    self.h2_gap(conn, side);
                    continue;
                }
                Err(length) => length,
            };
            conn.gap_at[side] = offset;
            if conn.parsers[side].between_messages() && length >= MIN_MESSAGE {
                self.lost_whole(conn, side, offset);
            }
            let mut events = Vec::new();
            conn.parsers[side].gap(&mut |e| {
                if let Event::Lost(why) = e {
                    events.push(why);
                }
            });
            for why in events {
                self.message_lost(conn, side, why);
            }
        }
    }

    /// Reads stream bytes on `side`.
    fn read(&mut self, conn: &mut Connection, side: usize, data: &[u8], acked: Option<u64>) {
        if side == 0 && conn.parsers[0].between_messages() {
            conn.began.get_or_insert(self.at);
        }
        let mut parser =
            std::mem::replace(&mut conn.parsers[side], Parser::new(Side::Request, false));
        parser.feed(data, &mut |event| match side {
            0 => self.request_event(conn, event),
            _ => self.response_event(conn, event, acked),
        });
        conn.parsers[side] = parser;
    }

    fn request_event(&mut self, conn: &mut Connection, event: Event<'_>) -> Option<Framing> {
        match event {
            Event::Head(head) => self.request_head(conn, &head),
            Event::Body(data) => {
                if let Some(reading) = conn.reading.filter(|r| r.replaying)
                    && !self.replay.body(conn.id, reading.id, data)
                {
                    self.replay.abort(conn.id, reading.id, Reason::Busy);
                    conn.reading = Some(Reading {
                        replaying: false,
                        ..reading
                    });
                }
                None
            }
            Event::End(trailers) => {
                if let Some(reading) = conn.reading.take() {
                    if reading.replaying {
                        self.replay.end(conn.id, reading.id, trailers);
                    }
                    if let Some(pending) = conn.pending.iter_mut().find(|p| p.id == reading.id) {
                        pending.ended = Some(self.at);
                    }
                }
                None
            }
            Event::Lost(why) => {
                self.message_lost(conn, 0, why);
                None
            }
        }
    }

    /// A request's head: counted, and replayed or lost with a reason.
    fn request_head(&mut self, conn: &mut Connection, head: &Head) -> Option<Framing> {
        let id = self.flows.next_request;
        self.flows.next_request += 1;
        self.flows.shared.update(|s| s.requests += 1);
        let framing = head.framing(Side::Request);
        let upgrade = head.method.eq_ignore_ascii_case("CONNECT")
            || head.header("upgrade").is_some() && head.has_token("connection", "upgrade");
        let problem = if upgrade {
            Some(Reason::Upgrade)
        } else {
            framing.is_err().then_some(Reason::Unreadable)
        };
        let why = self.not_replayed(conn, head, problem);
        let replaying = self.hand_over(conn.id, id, head, why);
        let began = conn.began.take().unwrap_or(self.at);
        conn.pending.push_back(Pending {
            id,
            start: conn.streams[0].position(),
            head_request: head.method.eq_ignore_ascii_case("HEAD"),
            compare: replaying && self.flows.limits.compare,
            ended: None,
            exchange: self
                .flows
                .observed
                .as_ref()
                .map(|o| o.request(&head.method, &head.target, began)),
        });
        // Keep the queue of unanswered requests bounded.
        if conn.pending.len() > MAX_PENDING {
            self.unanswered(conn, 1);
        }
        conn.reading = Some(Reading { id, replaying });
        if upgrade {
            // The rest of the connection is another protocol.
            conn.parsers[1].stop();
            return None;
        }
        framing.ok()
    }

    /// Why a request read whole at its head is not replayed (`None`: it is), given what is
    /// wrong with it as a message (`problem`).
    fn not_replayed(
        &mut self,
        conn: &Connection,
        head: &Head,
        problem: Option<Reason>,
    ) -> Option<Reason> {
        if !conn.selected {
            Some(Reason::SampledOut)
        } else if problem.is_some() {
            problem
        } else if !self.flows.limits.matches(head) {
            Some(Reason::FilteredOut)
        } else if !self.flows.admit() {
            Some(Reason::RateLimited)
        } else {
            None
        }
    }

    /// Hands request `id` to the replay side unless `why`; whether it took it. A request not
    /// taken is counted lost (`busy` when the replay side refused it).
    fn hand_over(&mut self, conn: u64, id: u64, head: &Head, why: Option<Reason>) -> bool {
        match why {
            // An observed session without a shadow replays nothing and loses nothing.
            _ if !self.flows.limits.replays => false,
            Some(why) => {
                self.flows.shared.lost(why);
                false
            }
            None if self.replay.start(conn, id, head) => true,
            None => {
                self.flows.shared.lost(Reason::Busy);
                false
            }
        }
    }

    fn response_event(
        &mut self,
        conn: &mut Connection,
        event: Event<'_>,
        acked: Option<u64>,
    ) -> Option<Framing> {
        match event {
            Event::Head(head) => Some(self.response_head(conn, head, acked)),
            Event::Body(data) => {
                if let Some(answering) = conn.answering.as_mut().filter(|a| a.compare) {
                    answering
                        .answer
                        .add_body(data, self.flows.limits.compare_body_bytes);
                }
                None
            }
            Event::End(_) => {
                if let Some(answering) = conn.answering.take() {
                    if let Some((exchange, status)) = answering.exchange {
                        self.observe(conn, exchange, Some(status));
                    }
                    if answering.compare {
                        self.replay
                            .live_answer(conn.id, answering.id, answering.answer);
                    }
                }
                None
            }
            Event::Lost(_) => {
                self.answer_lost(conn);
                None
            }
        }
    }

    /// A response's head: paired with its request, and its body's framing (which depends on
    /// the request's method and the status).
    fn response_head(&mut self, conn: &mut Connection, head: Head, acked: Option<u64>) -> Framing {
        let interim = (100..200).contains(&head.status) && head.status != 101;
        let framing = |head_request: bool| {
            if head_request || head.status < 200 || head.status == 204 || head.status == 304 {
                Framing::Length(0)
            } else {
                head.framing(Side::Response).unwrap_or(Framing::UntilClose)
            }
        };
        if interim {
            return Framing::Length(0);
        }
        // Answers lost whole before this one took the oldest requests the server had then.
        while let Some(had) = conn.answers_lost.pop_front() {
            if conn.pending.front().is_some_and(|p| p.start <= had) {
                self.unanswered(conn, 1);
            }
        }
        // The request it answers: the oldest unanswered one the server had received.
        let answers_front = conn
            .pending
            .front()
            .is_some_and(|p| acked.is_none_or(|acked| acked >= p.start));
        if !answers_front {
            // No request of it was seen: one lost in a gap, unless it came before the agent
            // joined the connection.
            let after_join = acked
                .zip(conn.first_client_offset)
                .is_some_and(|(acked, first)| acked > first);
            if after_join {
                self.unread(conn.gap_reason(0));
            } else if conn.start_refused {
                self.unread(Reason::RingFull);
            }
            return framing(false);
        }
        let Some(pending) = conn.pending.pop_front() else {
            return framing(false);
        };
        if let Some(ended) = pending.ended {
            self.flows
                .shared
                .update(|s| s.live_latency.observe(self.at.saturating_sub(ended)));
        }
        if head.status == 101 {
            // Its answer is the switch: what follows is another protocol.
            if let Some(exchange) = pending.exchange {
                self.observe(conn, exchange, Some(head.status));
            }
            conn.parsers[0].stop();
            return Framing::UntilClose;
        }
        let body = framing(pending.head_request);
        conn.answering = Some(Answering {
            id: pending.id,
            compare: pending.compare,
            answer: Answer::new(head.status, head.headers),
            exchange: pending.exchange.map(|e| (e, head.status)),
        });
        body
    }

    /// A hole in stream `side` at `offset`, where a message would begin: it held one at least,
    /// since a client sends nothing but requests and a server nothing but answers. A request
    /// lost whole is counted, and waits in line for its answer as any other; an answer lost
    /// whole was the oldest unanswered request's, which then waits no more (see
    /// [`Connection::answers_lost`]).
    fn lost_whole(&mut self, conn: &mut Connection, side: usize, offset: u64) {
        if side == 1 {
            // Its request is known once the next answer comes (the hole may show before the
            // hole in the client's stream that held the request): one the server had then.
            if conn.answers_lost.len() == MAX_PENDING {
                conn.answers_lost.pop_front();
            }
            conn.answers_lost.push_back(conn.streams[0].position());
            return;
        }
        self.unread(conn.gap_reason(0));
        conn.pending.push_back(Pending {
            id: 0,
            start: offset,
            head_request: false,
            compare: false,
            ended: None,
            exchange: None,
        });
    }

    /// A message of `side` cut short.
    fn message_lost(&mut self, conn: &mut Connection, side: usize, why: LostWhy) {
        if side == 1 {
            self.answer_lost(conn);
            return;
        }
        let reason = match why {
            LostWhy::Gap => conn.gap_reason(side),
            LostWhy::Unreadable => Reason::Unreadable,
        };
        if let Some(reading) = conn.reading.take() {
            self.lost(conn, reading, reason);
        } else {
            // A head cut before it was complete: a request all the same.
            self.unread(reason);
        }
    }

    /// The request being read is lost: counted here, or by the replay side if it took it.
    fn lost(&mut self, conn: &Connection, reading: Reading, why: Reason) {
        if reading.replaying {
            self.replay.abort(conn.id, reading.id, why);
        }
    }

    fn close(&mut self, conn: &mut Connection) {
        for side in 0..2 {
            // What was held ahead of a hole is read after it; then the parser's close decides
            // what is lost.
            let held = held_pieces(&mut conn.streams[side], Stream::finish);
            self.take_pieces(conn, side, held, None);
            conn.gap_at[side] = conn.streams[side].position();
            let mut events = Vec::new();
            let mut parser =
                std::mem::replace(&mut conn.parsers[side], Parser::new(Side::Request, false));
            parser.close(&mut |e| events.push(matches!(e, Event::End(_))));
            for complete in events {
                if complete {
                    self.response_event(conn, Event::End(Vec::new()), None);
                } else {
                    self.message_lost(conn, side, LostWhy::Gap);
                }
            }
        }
        let waiting = conn.pending.len();
        self.unanswered(conn, waiting);
        self.h2_close(conn);
        self.replay.close(conn.id);
        self.flows
            .spent
            .insert(key(conn.client, conn.server), Spent::Closed, Instant::now());
    }

    fn unread(&self, why: Reason) {
        self.flows.unread(why);
    }

    /// An observed exchange ended now: answered with `status`, or not (`None`).
    fn observe(&self, conn: &Connection, exchange: Exchange, status: Option<u16>) {
        if let Some(observed) = &self.flows.observed {
            observed.ended(conn.server, exchange, status.map(|s| (s, self.at)));
        }
    }

    /// The live answer being read was cut short.
    fn answer_lost(&mut self, conn: &mut Connection) {
        if let Some((exchange, _)) = conn.answering.take().and_then(|a| a.exchange) {
            self.observe(conn, exchange, None);
        }
    }

    /// The `n` oldest requests waiting for an answer will not see one.
    fn unanswered(&mut self, conn: &mut Connection, n: usize) {
        for _ in 0..n {
            if let Some(exchange) = conn.pending.pop_front().and_then(|p| p.exchange) {
                self.observe(conn, exchange, None);
            }
        }
    }
}

mod h2;
mod join;
mod spent;
#[cfg(test)]
mod tests;
