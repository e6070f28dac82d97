//! Connections first seen without their start: which end is the client, and what a segment
//! that tells neither end counts ([`Flows::headless`]).
use std::{net::SocketAddr, time::Instant};

use super::{
    super::{Reason, http::Side, tcp::Segment},
    Flows,
    spent::Spent,
};

impl Flows {
    /// A segment of a connection not open, with no handshake or start line to tell its client
    /// (`counted` once this was done before). Once the ring has refused copies, its start may
    /// have been among them: the first such segment with payload counts one request lost to the
    /// ring, and the connection is remembered so that its later segments count nothing more.
    /// Before any refusal it is a connection older than the agent, left alone until a start
    /// line shows.
    pub(super) fn headless(
        &mut self,
        key: (SocketAddr, SocketAddr),
        segment: &Segment<'_>,
        counted: bool,
        now: Instant,
    ) {
        // A pure ACK or FIN may be the last of a connection already forgotten.
        let counts =
            !counted && self.loss_epoch > 0 && (!segment.payload.is_empty() || segment.missing > 0);
        if counts {
            self.shared.update(|s| s.connections += 1);
            self.unread(Reason::RingFull);
        }
        if segment.fin || segment.rst {
            self.spent.insert(key, Spent::Closed, now);
        } else if counts {
            self.spent.insert(key, Spent::Counted, now);
        } else {
            self.spent.touch(key, now);
        }
    }
}

/// Which end of a connection first seen with this segment is the client: the sender of a SYN,
/// the receiver of a SYN-ACK, or whoever sends a request line (a status line: the server);
/// `None` while it cannot be told.
pub(super) fn client_of(segment: &Segment<'_>) -> Option<SocketAddr> {
    match (segment.syn, segment.ack.is_some()) {
        (true, false) => Some(segment.from),
        (true, true) => Some(segment.to),
        _ if super::super::http::has_start(segment.payload, Side::Request)
            || segment.payload.starts_with(super::super::h2::PREFACE) =>
        {
            Some(segment.from)
        }
        _ if super::super::http::has_start(segment.payload, Side::Response) => Some(segment.to),
        _ => None,
    }
}

/// The client of an HTTP/2 connection first seen in the middle, where neither a handshake nor
/// the frames tell it: the end with the higher port, as clients' ports are ephemeral and
/// services' are not.
pub(super) fn h2_client(segment: &Segment<'_>) -> SocketAddr {
    if segment.from.port() >= segment.to.port() {
        segment.from
    } else {
        segment.to
    }
}
