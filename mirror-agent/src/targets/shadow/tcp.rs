//! TCP in userspace, for the shadow: a ring copy's segment, and each direction's byte stream put
//! back in order from segments that come out of order, twice (from two hooks), overlapping, cut,
//! or not at all. What the stream could not have is a gap of a known length, never a guess.
use std::{collections::BTreeMap, net::SocketAddr};

use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};

/// The part of a TCP segment the shadow reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub seq: u32,
    /// The acknowledgment number, when the ACK flag is set.
    pub ack: Option<u32>,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    /// The payload bytes the copy holds.
    pub payload: &'a [u8],
    /// Payload bytes the packet had after those (a copy cut short).
    pub missing: u32,
}

/// The TCP segment in an Ethernet frame of `wire_len` bytes on the wire (a VLAN tag or two
/// allowed); `None` for anything else.
pub fn segment(frame: &[u8], wire_len: u32) -> Option<Segment<'_>> {
    let packet = LaxSlicedPacket::from_ethernet(frame).ok()?;
    let (from_ip, to_ip) = match packet.net.as_ref()? {
        LaxNetSlice::Ipv4(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        LaxNetSlice::Ipv6(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        LaxNetSlice::Arp(_) => return None,
    };
    let Some(TransportSlice::Tcp(tcp)) = packet.transport.as_ref() else {
        return None;
    };
    let missing = wire_len.saturating_sub(frame.len() as u32);
    Some(Segment {
        from: SocketAddr::new(from_ip, tcp.source_port()),
        to: SocketAddr::new(to_ip, tcp.destination_port()),
        seq: tcp.sequence_number(),
        ack: tcp.ack().then(|| tcp.acknowledgment_number()),
        syn: tcp.syn(),
        fin: tcp.fin(),
        rst: tcp.rst(),
        payload: tcp.payload(),
        missing,
    })
}

/// What a stream hands on, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Data(&'a [u8]),
    /// This many bytes the agent never had.
    Gap(u64),
}

/// One direction of a connection: the byte stream from the first byte the agent knows of.
#[derive(Debug, Default)]
pub struct Stream {
    /// The sequence number of the next byte to hand on, once known.
    next: Option<u32>,
    /// Bytes handed on (or skipped as gaps) so far.
    offset: u64,
    /// Segments ahead of `next`, by stream offset.
    ahead: BTreeMap<u64, Vec<u8>>,
    ahead_bytes: usize,
    /// The stream ended (FIN): later segments are retransmissions.
    finished: bool,
}

impl Stream {
    /// Whether the stream's start is known (a SYN was seen, or a first segment).
    pub fn started(&self) -> bool {
        self.next.is_some()
    }

    /// The stream offset of sequence number `seq`, which lies within 2 GiB of `next`.
    pub fn offset_of(&self, seq: u32) -> Option<u64> {
        let next = self.next?;
        let delta = i64::from(seq.wrapping_sub(next).cast_signed());
        self.offset.checked_add_signed(delta)
    }

    /// Bytes handed on (or skipped) so far.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// The SYN: the stream starts right after `isn`.
    pub fn syn(&mut self, isn: u32) {
        if self.next.is_none() {
            self.next = Some(isn.wrapping_add(1));
        }
    }

    /// A segment's payload from `seq`, with `missing` bytes after it cut off. In-order bytes
    /// (and what they let through from the segments held ahead) go to `out`; bytes already
    /// handed on are dropped; bytes ahead are held while `limit` allows, and past it the stream
    /// skips to them with a gap.
    pub fn segment(
        &mut self,
        seq: u32,
        payload: &[u8],
        missing: u32,
        limit: usize,
        out: &mut dyn FnMut(Piece<'_>),
    ) {
        if self.finished || payload.is_empty() && missing == 0 {
            return;
        }
        let next = *self.next.get_or_insert(seq);
        let delta = seq.wrapping_sub(next).cast_signed();
        if delta <= 0 {
            // Starts at or before the next byte: hand on what is new.
            let old = delta.unsigned_abs() as usize;
            let total = payload.len() + missing as usize;
            if old >= total {
                return;
            }
            if old < payload.len() {
                self.hand_on(&payload[old..], out);
                self.skip(u64::from(missing), out);
            } else {
                self.skip((total - old) as u64, out);
            }
            self.release(out);
            return;
        }
        let at = self.offset + u64::from(delta.unsigned_abs());
        if !payload.is_empty()
            && self
                .ahead
                .get(&at)
                .is_none_or(|held| held.len() < payload.len())
        {
            let replaced = self
                .ahead
                .insert(at, payload.to_vec())
                .map_or(0, |v| v.len());
            self.ahead_bytes = self.ahead_bytes + payload.len() - replaced;
        }
        if self.ahead_bytes > limit {
            self.skip_to_ahead(out);
        }
    }

    /// The peer acknowledged everything before `ack`: bytes not seen by then never will be.
    pub fn acknowledged(&mut self, ack: u32, out: &mut dyn FnMut(Piece<'_>)) {
        let Some(next) = self.next else {
            return;
        };
        let delta = ack.wrapping_sub(next).cast_signed();
        if delta <= 0 || self.finished {
            return;
        }
        let to = self.offset + u64::from(delta.unsigned_abs());
        // The first segment held may start after `ack` or before it.
        let first_ahead = self.ahead.keys().next().copied().unwrap_or(u64::MAX);
        self.skip(to.min(first_ahead) - self.offset, out);
        self.release(out);
    }

    /// The end of the stream (FIN, reset, eviction): what is held goes on after its gaps.
    pub fn finish(&mut self, out: &mut dyn FnMut(Piece<'_>)) {
        while !self.ahead.is_empty() {
            self.skip_to_ahead(out);
        }
        self.finished = true;
    }

    fn skip_to_ahead(&mut self, out: &mut dyn FnMut(Piece<'_>)) {
        if let Some(&first) = self.ahead.keys().next() {
            self.skip(first.saturating_sub(self.offset), out);
            self.release(out);
        }
    }

    fn hand_on(&mut self, data: &[u8], out: &mut dyn FnMut(Piece<'_>)) {
        if data.is_empty() {
            return;
        }
        out(Piece::Data(data));
        self.advance(data.len() as u64);
    }

    fn skip(&mut self, bytes: u64, out: &mut dyn FnMut(Piece<'_>)) {
        if bytes == 0 {
            return;
        }
        out(Piece::Gap(bytes));
        self.advance(bytes);
    }

    fn advance(&mut self, bytes: u64) {
        self.offset += bytes;
        self.next = self.next.map(|n| n.wrapping_add(bytes as u32));
    }

    /// Hands on the held segments that now start at or before the next byte.
    fn release(&mut self, out: &mut dyn FnMut(Piece<'_>)) {
        while let Some(entry) = self.ahead.first_entry() {
            if *entry.key() > self.offset {
                return;
            }
            let at = *entry.key();
            let data = entry.remove();
            self.ahead_bytes -= data.len();
            let old = (self.offset - at) as usize;
            if old < data.len() {
                self.hand_on(&data[old..], out);
            }
        }
    }

    /// The FIN at `seq`: the stream ends there once the bytes before it are in.
    pub fn fin(&mut self) {
        if self.ahead.is_empty() {
            self.finished = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a stream handed on: data as text, gaps as `<n>`.
    fn run(steps: &[(u32, &str, u32)], limit: usize) -> String {
        let mut stream = Stream::default();
        stream.syn(999);
        let mut text = String::new();
        for &(seq, data, missing) in steps {
            stream.segment(
                seq,
                data.as_bytes(),
                missing,
                limit,
                &mut |piece| match piece {
                    Piece::Data(d) => text.push_str(std::str::from_utf8(d).expect("text")),
                    Piece::Gap(n) => text.push_str(&gap(n)),
                },
            );
        }
        stream.finish(&mut |piece| match piece {
            Piece::Data(d) => text.push_str(std::str::from_utf8(d).expect("text")),
            Piece::Gap(n) => text.push_str(&gap(n)),
        });
        text
    }

    fn gap(n: u64) -> String {
        ["<", &n.to_string(), ">"].concat()
    }

    /// A case: its name, the segments (sequence number, payload, bytes cut off) and the stream.
    type Case<'a> = (&'a str, &'a [(u32, &'a str, u32)], &'a str);

    #[test]
    fn streams_come_back_in_order() {
        let cases: &[Case<'_>] = &[
            ("in order", &[(1000, "abc", 0), (1003, "def", 0)], "abcdef"),
            ("swapped", &[(1003, "def", 0), (1000, "abc", 0)], "abcdef"),
            (
                "retransmitted",
                &[(1000, "abc", 0), (1000, "abc", 0), (1003, "d", 0)],
                "abcd",
            ),
            (
                "overlapping",
                &[(1000, "abc", 0), (1001, "bcdef", 0), (1004, "efg", 0)],
                "abcdefg",
            ),
            (
                "seen at two hooks, out of order",
                &[
                    (1003, "def", 0),
                    (1003, "def", 0),
                    (1000, "abc", 0),
                    (1000, "abc", 0),
                ],
                "abcdef",
            ),
            (
                "a hole until the end",
                &[(1000, "ab", 0), (1005, "fg", 0)],
                "ab<3>fg",
            ),
            ("cut short", &[(1000, "ab", 4), (1006, "gh", 0)], "ab<4>gh"),
            (
                "cut short, then retransmitted whole",
                &[(1000, "ab", 4), (1000, "abcdefgh", 0)],
                "ab<4>gh",
            ),
            ("sequence numbers wrap", &[(1000, "a", 0)], "a"),
        ];
        for (name, steps, expected) in cases {
            assert_eq!(run(steps, 1 << 20), *expected, "{name}");
        }
        // Past the limit of bytes held, the stream skips to them.
        assert_eq!(
            run(&[(1010, "xyz", 0), (1020, "uvw", 0)], 4),
            "<10>xyz<7>uvw"
        );
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut stream = Stream::default();
        stream.syn(u32::MAX - 1);
        let mut got = Vec::new();
        let mut out = |piece: Piece<'_>| {
            if let Piece::Data(d) = piece {
                got.extend_from_slice(d);
            }
        };
        stream.segment(u32::MAX, b"ab", 0, 100, &mut out);
        stream.segment(1, b"cd", 0, 100, &mut out);
        assert_eq!(got, b"abcd");
    }

    #[test]
    fn an_acknowledgment_past_the_stream_is_a_gap() {
        let mut stream = Stream::default();
        stream.syn(0);
        let mut pieces = Vec::new();
        stream.segment(1, b"abc", 0, 100, &mut |p| pieces.push(format!("{p:?}")));
        stream.segment(10, b"jk", 0, 100, &mut |p| pieces.push(format!("{p:?}")));
        // The peer had 12 bytes: the 6 between were lost, and what is held comes after them.
        stream.acknowledged(13, &mut |p| pieces.push(format!("{p:?}")));
        assert_eq!(pieces, ["Data([97, 98, 99])", "Gap(6)", "Data([106, 107])"]);
        assert_eq!(stream.offset_of(13), Some(12));
    }

    #[test]
    fn frames_read_as_segments() {
        let builder = etherparse::PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, 7, 1000)
            .ack(9);
        let mut frame = Vec::new();
        builder
            .write(&mut frame, b"GET / HTTP/1.1\r\n")
            .expect("frame");
        let wire = frame.len() as u32;
        let segment = segment(&frame[..frame.len() - 4], wire).expect("segment");
        assert_eq!(segment.from, "10.0.0.1:40000".parse().expect("addr"));
        assert_eq!(segment.to, "10.0.0.2:80".parse().expect("addr"));
        assert_eq!((segment.seq, segment.ack), (7, Some(9)));
        assert_eq!(segment.payload, b"GET / HTTP/1");
        assert_eq!(segment.missing, 4);
        let udp = etherparse::PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2);
        let mut frame = Vec::new();
        udp.write(&mut frame, b"x").expect("frame");
        assert_eq!(super::segment(&frame, frame.len() as u32), None);
        assert_eq!(super::segment(&[0; 10], 10), None);
    }
}
