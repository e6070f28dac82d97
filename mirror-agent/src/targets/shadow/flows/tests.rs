//! The flows on made-up connections: what reaches the replay side, and what is counted lost.
use super::*;
use crate::targets::shadow::ShadowConfig;

/// What the replay side was told, in words.
#[derive(Debug, Default)]
pub(super) struct Told {
    pub(super) lines: Vec<String>,
    /// Bodies by request.
    pub(super) bodies: HashMap<u64, Vec<u8>>,
    refuse: bool,
}

impl Replay for Told {
    fn start(&mut self, _conn: u64, id: u64, head: &Head) -> bool {
        if self.refuse {
            return false;
        }
        self.lines
            .push(format!("start {id} {} {}", head.method, head.target));
        true
    }
    fn body(&mut self, _conn: u64, id: u64, data: &[u8]) -> bool {
        self.bodies.entry(id).or_default().extend_from_slice(data);
        true
    }
    fn end(&mut self, _conn: u64, id: u64, trailers: Vec<(String, Vec<u8>)>) {
        self.lines
            .push(format!("end {id} trailers={}", trailers.len()));
    }
    fn abort(&mut self, _conn: u64, id: u64, why: Reason) {
        self.lines.push(format!("abort {id} {why:?}"));
    }
    fn live_answer(&mut self, _conn: u64, id: u64, answer: Answer) {
        self.lines.push(format!(
            "live {id} {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ));
    }
    fn close(&mut self, conn: u64) {
        self.lines.push(format!("close {conn}"));
    }
}

pub(super) const CLIENT: &str = "10.0.0.1:40000";
pub(super) const SERVER: &str = "10.0.0.2:80";

/// A connection's packets, by sequence offsets from each side's first byte.
pub(super) struct Wire {
    pub(super) flows: Flows,
    pub(super) told: Told,
    client_isn: u32,
    server_isn: u32,
    /// The wall-clock time the next packets are seen at.
    pub(super) at: Duration,
}

impl Wire {
    pub(super) fn new(config: &str) -> Self {
        let config: ShadowConfig =
            toml::from_str(&format!("url = \"http://s:1\"\n{config}")).expect("config");
        Wire {
            flows: Flows::new(Limits::of(&config), Shared::default(), None),
            told: Told::default(),
            client_isn: 1000,
            server_isn: u32::MAX - 10,
            at: Duration::ZERO,
        }
    }

    /// A session observed only, counting into `observed`.
    pub(super) fn observing(observed: &Observed) -> Self {
        Wire {
            flows: Flows::new(
                Limits::observing(),
                Shared::default(),
                Some(observed.clone()),
            ),
            ..Wire::new("")
        }
    }

    fn packet(&mut self, from_client: bool, syn: bool, seq: u32, ack: Option<u32>, data: &[u8]) {
        self.packet_with(from_client, (syn, false), seq, ack, data);
    }

    /// A packet with SYN and RST (`flags`) as given.
    fn packet_with(
        &mut self,
        from_client: bool,
        (syn, rst): (bool, bool),
        seq: u32,
        ack: Option<u32>,
        data: &[u8],
    ) {
        let (from, to) = if from_client {
            (CLIENT, SERVER)
        } else {
            (SERVER, CLIENT)
        };
        let segment = Segment {
            from: from.parse().expect("addr"),
            to: to.parse().expect("addr"),
            seq,
            ack,
            syn,
            fin: false,
            rst,
            payload: data,
            missing: 0,
        };
        self.flows.segment(&segment, self.at, &mut self.told);
    }

    pub(super) fn handshake(&mut self) {
        self.packet(true, true, self.client_isn, None, b"");
        self.packet(false, true, self.server_isn, Some(self.client_isn + 1), b"");
    }

    /// Client bytes at offset `at` of its stream, acknowledging `acked` server bytes.
    pub(super) fn client(&mut self, at: u32, acked: u32, data: &[u8]) {
        let (seq, ack) = (
            self.client_isn.wrapping_add(1 + at),
            self.server_isn.wrapping_add(1 + acked),
        );
        self.packet(true, false, seq, Some(ack), data);
    }

    /// The client resets the connection at offset `at` of its stream.
    pub(super) fn client_reset(&mut self, at: u32) {
        let seq = self.client_isn.wrapping_add(1 + at);
        self.packet_with(true, (false, true), seq, None, b"");
    }

    pub(super) fn server(&mut self, at: u32, acked: u32, data: &[u8]) {
        let (seq, ack) = (
            self.server_isn.wrapping_add(1 + at),
            self.client_isn.wrapping_add(1 + acked),
        );
        self.packet(false, false, seq, Some(ack), data);
    }

    pub(super) fn stats(&self) -> super::super::ShadowStats {
        self.flows.shared.read()
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[test]
fn keep_alive_requests_are_handed_over_in_order() {
    let mut wire = Wire::new("compare = true");
    wire.handshake();
    let first = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    wire.client(0, 0, first);
    wire.server(0, first.len() as u32, OK);
    let second = b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
    let at = first.len() as u32;
    wire.client(at, OK.len() as u32, &second[..20]);
    wire.client(at + 20, OK.len() as u32, &second[20..]);
    wire.server(OK.len() as u32, at + second.len() as u32, OK);
    assert_eq!(
        wire.told.lines,
        [
            "start 1 GET /a",
            "end 1 trailers=0",
            "live 1 200 ok",
            "start 2 POST /b",
            "end 2 trailers=0",
            "live 2 200 ok"
        ]
    );
    assert_eq!(wire.told.bodies[&2], b"hello");
    let stats = wire.stats();
    assert_eq!(
        (stats.requests, stats.lost.total(), stats.connections),
        (2, 0, 1)
    );
}

#[test]
fn pipelined_requests_pair_with_their_answers() {
    let mut wire = Wire::new("compare = true");
    wire.handshake();
    let requests = b"GET /1 HTTP/1.1\r\n\r\nHEAD /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n";
    wire.client(0, 0, requests);
    // A HEAD answer has no body whatever its Content-Length says; a 304 neither.
    let answers = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n";
    wire.server(0, requests.len() as u32, answers);
    let lives: Vec<_> = wire
        .told
        .lines
        .iter()
        .filter(|l| l.starts_with("live"))
        .collect();
    assert_eq!(lives, ["live 1 200 a", "live 2 200 ", "live 3 304 "]);
}

#[test]
fn segments_out_of_order_and_twice_read_as_one_stream() {
    let mut wire = Wire::new("");
    wire.handshake();
    let request =
        b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";
    wire.client(30, 0, &request[30..]);
    wire.client(10, 0, &request[10..40]);
    wire.client(0, 0, &request[..12]);
    wire.client(0, 0, &request[..12]);
    assert_eq!(wire.told.lines, ["start 1 PUT /x", "end 1 trailers=1"]);
    assert_eq!(wire.told.bodies[&1], b"abc");
}

#[test]
fn lost_bytes_lose_their_request_with_the_reason() {
    let body = b"POST /up HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789";
    // When the ring refused copies: never, before the server's acknowledgment shows the hole,
    // before a later copy of the body that is held until then, or only once the hole is past.
    for (ring_lost_at, reason) in [
        (None, "Gap"),
        (Some("ack"), "RingFull"),
        (Some("held"), "RingFull"),
        (Some("after"), "Gap"),
    ] {
        let mut wire = Wire::new("");
        wire.handshake();
        if ring_lost_at == Some("after") {
            wire.flows.ring_lost();
        }
        wire.client(0, 0, &body[..45]);
        if ring_lost_at == Some("held") {
            wire.flows.ring_lost();
            wire.client(48, 0, &body[48..]);
        }
        if ring_lost_at == Some("ack") {
            wire.flows.ring_lost();
        }
        // The server acknowledged the whole request: the bytes between never reach the agent.
        wire.server(0, body.len() as u32, OK);
        let next = b"GET /next HTTP/1.1\r\n\r\n";
        wire.client(body.len() as u32, OK.len() as u32, next);
        assert_eq!(
            wire.told.lines,
            [
                "start 1 POST /up".to_owned(),
                format!("abort 1 {reason}"),
                "start 2 GET /next".to_owned(),
                "end 2 trailers=0".to_owned()
            ],
            "{ring_lost_at:?}"
        );
    }
}

#[test]
fn an_answer_to_a_request_never_seen_counts_it_lost() {
    let mut wire = Wire::new("");
    wire.handshake();
    let first = b"GET /1 HTTP/1.1\r\n\r\n";
    wire.client(0, 0, first);
    wire.server(0, first.len() as u32, OK);
    // The second request's copies were lost, whole; its answer shows it was there.
    let lost = 20;
    wire.server(OK.len() as u32, first.len() as u32 + lost, OK);
    let stats = wire.stats();
    assert_eq!((stats.requests, stats.lost.gap), (2, 1));
}

/// Messages lost whole, with the ring's copies of them: `lost` of client requests 1-3 and server
/// answers a-c, on a keep-alive connection with (`pipelined`) or without pipelining.
#[test]
fn messages_lost_whole_are_counted_and_the_rest_pair_right() {
    let request = |n: u32| format!("GET /{n} HTTP/1.1\r\n\r\n").into_bytes();
    let answer = |b: char| format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{b}").into_bytes();
    let (rl, al) = (request(1).len() as u32, answer('a').len() as u32);
    for (pipelined, lost, lives, requests) in [
        // A request and its answer: the hole in the client's stream held a request (the third
        // is the second the replay side is told of).
        (false, "2b", ["live 1 200 a", "live 2 200 c"], 3),
        // A request: its answer goes with the hole's request, not the next one's.
        (true, "2", ["live 1 200 a", "live 2 200 c"], 3),
        // An answer: the hole in the server's stream held the second request's.
        (false, "b", ["live 1 200 a", "live 3 200 c"], 3),
    ] {
        let mut wire = Wire::new("compare = true");
        wire.handshake();
        for (i, (n, b)) in [(1, 'a'), (2, 'b'), (3, 'c')].into_iter().enumerate() {
            let i = i as u32;
            if !lost.contains(char::from_digit(n, 10).expect("digit")) {
                wire.client(i * rl, if pipelined { 0 } else { i * al }, &request(n));
            }
            if !pipelined && !lost.contains(b) {
                wire.server(i * al, (i + 1) * rl, &answer(b));
            }
        }
        if pipelined {
            let answers = [answer('a'), answer('b'), answer('c')].concat();
            wire.server(0, 3 * rl, &answers);
        }
        let told: Vec<_> = wire
            .told
            .lines
            .iter()
            .filter(|l| l.starts_with("live"))
            .collect();
        assert_eq!(told, lives, "lost {lost}, pipelined {pipelined}");
        let stats = wire.stats();
        let lost_requests = u64::from(lost.chars().any(|c| c.is_ascii_digit()));
        assert_eq!(
            (stats.requests, stats.lost.gap),
            (requests, lost_requests),
            "lost {lost}, pipelined {pipelined}"
        );
    }
}

#[test]
fn requests_held_after_a_hole_are_read_when_the_connection_ends() {
    let mut wire = Wire::new("");
    wire.handshake();
    let request = |n: u32| format!("GET /{n} HTTP/1.1\r\n\r\n").into_bytes();
    let length = request(1).len() as u32;
    wire.client(0, 0, &request(1));
    // The second request's copy was lost; the third's is held behind the hole...
    wire.client(2 * length, 0, &request(3));
    assert_eq!(wire.told.lines, ["start 1 GET /1", "end 1 trailers=0"]);
    // ...until the connection ends: then the hole counts its request, and the third goes on.
    wire.client_reset(3 * length);
    assert_eq!(
        wire.told.lines,
        [
            "start 1 GET /1",
            "end 1 trailers=0",
            "start 2 GET /3",
            "end 2 trailers=0",
            "close 1"
        ]
    );
    let stats = wire.stats();
    assert_eq!((stats.requests, stats.lost.gap), (3, 1));
}

#[test]
fn a_connection_joined_in_the_middle_starts_at_the_next_request() {
    let mut wire = Wire::new("");
    // No handshake: the agent started while the connection was open, in a body.
    wire.client(5, 0, b"tail of a body\r\nGET /after HTTP/1.1\r\n\r\n");
    // The answer to the request before the agent joined is not counted.
    wire.server(0, 5, OK);
    assert_eq!(wire.told.lines, ["start 1 GET /after", "end 1 trailers=0"]);
    let stats = wire.stats();
    assert_eq!((stats.requests, stats.joined_mid_stream), (1, 1));
}

#[test]
fn a_connection_whose_start_the_ring_refused_counts_its_request() {
    // (ring refused copies first, what is seen of a connection with no handshake, requests
    // counted, lost to the ring)
    type Seen = fn(&mut Wire);
    let cases: [(bool, Seen, u64, u64); 7] = [
        // Body bytes only: one request, whose head the ring refused.
        (
            true,
            |w| {
                w.client(500, 0, b"body");
                w.client(504, 0, b"more");
            },
            1,
            1,
        ),
        // The same before any refusal: a connection older than the agent, not counted.
        (false, |w| w.client(500, 0, b"body"), 0, 0),
        // Only an answer: its request was refused.
        (true, |w| w.server(0, 500, OK), 1, 1),
        // The last ACK of a connection already closed counts nothing.
        (true, |w| w.client(500, 2, b""), 0, 0),
        // A body, then the next request and the answer to the first: that answer's request was
        // counted once already, and the next one is read.
        (
            true,
            |w| {
                w.client(500, 0, b"body");
                w.client(504, 0, b"GET /next HTTP/1.1\r\n\r\n");
                w.server(0, 504, OK);
                w.server(OK.len() as u32, 526, OK);
            },
            2,
            1,
        ),
        // The next request's head first, then the answer to the one before it.
        (
            true,
            |w| {
                w.client(500, 0, b"GET /next HTTP/1.1\r\n\r\n");
                w.server(0, 500, OK);
                w.server(OK.len() as u32, 522, OK);
            },
            2,
            1,
        ),
        // A copy of a connection that ended, held by the drain until then, counts nothing.
        (
            true,
            |w| {
                w.handshake();
                w.client(0, 0, b"GET /1 HTTP/1.1\r\n\r\n");
                w.server(0, 19, OK);
                w.client_reset(19);
                w.client(10, 0, b"late");
            },
            1,
            0,
        ),
    ];
    for (i, (refused, seen, requests, ring_full)) in cases.into_iter().enumerate() {
        let mut wire = Wire::new("");
        if refused {
            wire.flows.ring_lost();
        }
        seen(&mut wire);
        let stats = wire.stats();
        assert_eq!(
            (stats.requests, stats.lost.ring_full),
            (requests, ring_full),
            "case {i}: {stats:?}"
        );
    }
}

#[test]
fn requests_not_replayed_are_counted_by_reason() {
    let cases = [
        (
            "methods = [\"POST\"]",
            "GET /a HTTP/1.1\r\n\r\n",
            "filtered_out",
        ),
        (
            "paths = [\"/api/\"]",
            "GET /a HTTP/1.1\r\n\r\n",
            "filtered_out",
        ),
        (
            "",
            "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "upgrade",
        ),
        ("", "CONNECT a:443 HTTP/1.1\r\n\r\n", "upgrade"),
        (
            "requests_per_second = 1",
            "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            "rate_limited",
        ),
        (
            "",
            "GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "unreadable",
        ),
    ];
    for (config, requests, reason) in cases {
        let mut wire = Wire::new(config);
        wire.handshake();
        wire.client(0, 0, requests.as_bytes());
        let stats = wire.stats();
        let lost: Vec<_> = stats.lost.named().filter(|(_, n)| *n != 0).collect();
        assert_eq!(lost.len(), 1, "{config} {requests:?}: {lost:?}");
        assert_eq!(lost[0].0.name, reason, "{config}");
        assert_eq!(lost[0].1, 1, "{config}");
    }
    let mut wire = Wire::new("");
    wire.told.refuse = true;
    wire.handshake();
    wire.client(0, 0, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(wire.stats().lost.busy, 1);
}

#[test]
fn connections_past_the_limit_evict_the_idlest() {
    let mut wire = Wire::new("max_connections = 1");
    wire.handshake();
    wire.client(0, 0, b"POST /a HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc");
    // Another client's connection takes its place.
    let segment = Segment {
        from: "10.0.0.3:1".parse().expect("addr"),
        to: SERVER.parse().expect("addr"),
        seq: 1,
        ack: None,
        syn: true,
        fin: false,
        rst: false,
        payload: b"",
        missing: 0,
    };
    wire.flows.segment(&segment, Duration::ZERO, &mut wire.told);
    assert_eq!(
        wire.told.lines,
        ["start 1 POST /a", "abort 1 Evicted", "close 1"]
    );
    assert_eq!(wire.stats().evicted_connections, 1);
}

#[test]
fn a_request_cut_at_a_stop_is_the_rings_when_it_refused_copies_at_the_end() {
    for (tail_lost, told) in [(false, "abort 1 Evicted"), (true, "abort 1 RingFull")] {
        let mut wire = Wire::new("");
        wire.handshake();
        wire.client(0, 0, b"POST /a HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc");
        if tail_lost {
            wire.flows.ring_lost_at_end();
        }
        wire.flows.finish(&mut wire.told);
        assert_eq!(
            wire.told.lines,
            ["start 1 POST /a", told, "close 1"],
            "tail lost: {tail_lost}"
        );
    }
}

/// An observed session counts each exchange by service, method and status class, timed from its
/// request's first byte to its answer's last; a request without an answer is `unanswered`; and
/// nothing is replayed or lost.
#[test]
fn observed_exchanges_are_counted_and_timed() {
    use crate::targets::observe::{ObserveConfig, Protocol};
    let observed = Observed::new(&ObserveConfig::of(Protocol::Http));
    let mut wire = Wire::observing(&observed);
    let ms = Duration::from_millis;
    wire.handshake();
    let head = b"GET /a HTTP/1.1\r\nHost: x\r\n";
    wire.at = ms(10);
    wire.client(0, 0, head);
    wire.at = ms(12);
    wire.client(head.len() as u32, 0, b"\r\n");
    let asked = head.len() as u32 + 2;
    let answer_head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
    wire.at = ms(15);
    wire.server(0, asked, answer_head);
    wire.at = ms(20);
    wire.server(answer_head.len() as u32, asked, b"ok");
    let answered = answer_head.len() as u32 + 2;
    let post = b"POST /b HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
    wire.at = ms(30);
    wire.client(asked, answered, post);
    let failed = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n";
    wire.at = ms(31);
    wire.server(answered, asked + post.len() as u32, failed);
    wire.at = ms(40);
    wire.client(
        asked + post.len() as u32,
        answered,
        b"GET /c HTTP/1.1\r\n\r\n",
    );
    wire.client_reset(asked + post.len() as u32 + 19);
    let stats = observed.read();
    let [service] = stats.services.as_slice() else {
        panic!("one service: {stats:?}");
    };
    assert_eq!(service.service, SERVER);
    let series: Vec<(&str, &str, u64)> = service
        .requests
        .iter()
        .map(|r| (r.method.as_str(), r.status_class.as_str(), r.count))
        .collect();
    assert_eq!(
        series,
        [
            ("GET", "2xx", 1),
            ("POST", "5xx", 1),
            ("GET", "unanswered", 1)
        ]
    );
    assert_eq!(service.duration.count, 2);
    assert!(
        (service.duration.sum_seconds - 0.011).abs() < 1e-9,
        "10 ms and 1 ms: {}",
        service.duration.sum_seconds
    );
    assert_eq!(wire.told.lines, ["close 1"]);
    assert_eq!(wire.stats().lost.total(), 0);
}
