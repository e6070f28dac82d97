//! The ring drain: the agent's half of the ring-buffer path (XDP sessions and the ring-fed kinds).
//! A thread of its own drains `COPY_RING` and hands each copy to its session's [`Sink`] (a
//! packet socket on the target interface, a tunnel's raw socket, a capture file), and each copy
//! of a watched session to its `capture` watchers (see [`super::watch`]). It wakes up every
//! [`IDLE_WAIT`] (or at once when the ring is half full), drains everything queued, and the
//! socket sinks send datagrams in batches (one `sendmmsg` for up to [`BATCH`]).
use std::{
    collections::HashMap,
    os::fd::{AsFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{Array, MapData, RingBuf};
use mirror_common::{Direction, RING_CHUNK_SHIFT, RING_WATCH_ONLY, RingCopyHeader};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::SockaddrStorage,
    time::{ClockId, clock_gettime},
};

use super::{
    Target, TargetCounters,
    file::OpenFiles,
    observe, shadow,
    watch::{Watched, Watchers},
};
use crate::sys::socket::send_many;

/// How long the drain thread sleeps when the ring is empty: records wake it only once the ring
/// is half full (see the eBPF `ring::wakeup_flags`), so this bounds the delay of a copy at low
/// rates, and how soon the thread sees that it should stop.
const IDLE_WAIT: Duration = Duration::from_millis(20);

/// One copy taken from the ring.
pub struct RingCopy<'a> {
    pub frame: &'a [u8],
    /// The packet's length; more than the frame's when the copy was cut.
    pub orig_len: u32,
    pub flow_hash: u32,
    /// The watched interface and hook, as a key and in words (a pcapng interface's name, made
    /// only when a file describes the interface).
    pub interface: u64,
    pub interface_name: &'a dyn Fn() -> String,
    /// Wall-clock time.
    pub timestamp: Duration,
    /// [`RingCopyHeader::flags`].
    pub flags: u32,
}

impl std::fmt::Debug for RingCopy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingCopy")
            .field("len", &self.frame.len())
            .field("orig_len", &self.orig_len)
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

/// Where a ring-fed session's copies go: one per kind that takes them.
pub trait Sink: Send {
    /// Takes one copy: queued for the next [`Sink::flush`] (which it may do itself when its batch
    /// is full), or written at once; `counters` count what it sent and what it could not.
    fn push(&mut self, copy: &RingCopy<'_>, counters: &SessionCounters);
    /// Sends what is queued.
    fn flush(&mut self, counters: &SessionCounters);
    /// At a stop, with the ring empty: the ring refused copies of the session after the last
    /// one it queued, so no record will say so.
    fn lost_at_end(&mut self) {}
}

/// A session's [`TargetCounters`] as the drain updates them and the API reads them.
#[derive(Debug, Default)]
pub struct SessionCounters(Mutex<TargetCounters>);

impl SessionCounters {
    pub fn read(&self) -> TargetCounters {
        *self.lock()
    }

    pub fn sent(&self, n: u64) {
        self.lock().sent += n;
    }

    /// Counts `n` copies the target refused, and logs the first of the session.
    pub fn refused(&self, n: u64, error: &dyn std::fmt::Display) {
        let mut counters = self.lock();
        if counters.failed == 0 {
            tracing::warn!("sending a ring copy on: {error:#} (further failures are counted)");
        }
        counters.failed += n;
    }

    fn lost_by_watchers(&self, n: u64) {
        self.lock().watcher_lost += n;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TargetCounters> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The drain thread of one generation's ring.
#[derive(Debug)]
pub struct RingDrain {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// By session index.
    counters: Arc<Vec<SessionCounters>>,
    /// Copies handed to the sinks so far (`run -c`).
    taken: Arc<std::sync::atomic::AtomicU64>,
    past_count: Arc<Mutex<PastCount>>,
    /// By session index: what a shadow target counted.
    shadows: Vec<Option<shadow::Shared>>,
    /// By session index: what an observed session counted of its services.
    observed: Vec<Option<observe::Observed>>,
}

/// The copies the kernel made after `run -c N` had its N, which the drain dropped: by session
/// and kernel rule index, how many and their bytes. The agent stops at once, but copies already
/// in the ring are not written, so they are not mirrored either.
pub type PastCount = std::collections::BTreeMap<(u32, u32), (u64, u64)>;

/// A session as the drain sees it: its name (for its watchers), and its target when its copies
/// come through the ring.
#[derive(Debug, Clone, Copy)]
pub struct RingSession<'a> {
    pub name: &'a str,
    pub target: Option<&'a Target>,
}

/// Where the drain sends what it takes from the ring.
struct Destinations {
    /// By session index: the session's sink, when its copies come through the ring.
    sinks: Vec<Option<Box<dyn Sink>>>,
    /// Session names by index, for their watchers.
    sessions: Vec<String>,
    /// Interface names by index.
    names: HashMap<u32, String>,
    /// The ring's loss flags by session index (`mirror_common::RING_LOST_MAP`).
    ring_lost: Array<MapData, u32>,
    counters: Arc<Vec<SessionCounters>>,
    limit: Option<u64>,
    taken: Arc<std::sync::atomic::AtomicU64>,
    past_count: Arc<Mutex<PastCount>>,
    watchers: Arc<Watchers>,
}

impl RingDrain {
    /// Starts draining `ring`: the copies of the `sessions` whose target takes ring copies go to
    /// it, and the copies of watched sessions to their `watchers`; `names` are the watched
    /// interfaces' names by index. With a `limit`, target copies past the first `limit` are
    /// dropped (`run -c`).
    pub fn start(
        (ring, ring_lost): (RingBuf<MapData>, Array<MapData, u32>),
        sessions: &[RingSession<'_>],
        names: HashMap<u32, String>,
        files: &OpenFiles,
        watchers: Arc<Watchers>,
        limit: Option<u64>,
    ) -> anyhow::Result<Self> {
        let shadows: Vec<Option<shadow::Shared>> = sessions
            .iter()
            .map(|s| matches!(s.target, Some(Target::Shadow(_))).then(shadow::Shared::default))
            .collect();
        let observed: Vec<Option<observe::Observed>> = sessions
            .iter()
            .map(|s| {
                s.target
                    .and_then(Target::observes)
                    .map(observe::Observed::new)
            })
            .collect();
        let sinks = sessions
            .iter()
            .zip(shadows.iter().zip(&observed))
            .map(|(s, (stats, observed))| {
                s.target.map_or(Ok(None), |t| {
                    t.ring_sink(
                        files,
                        stats.as_ref().unwrap_or(&shadow::Shared::default()),
                        observed.as_ref(),
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .context("opening the targets of ring copies")?;
        let counters: Arc<Vec<SessionCounters>> = Arc::new(
            sessions
                .iter()
                .map(|_| SessionCounters::default())
                .collect(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let taken = Arc::default();
        let past_count = Arc::default();
        let destinations = Destinations {
            sinks,
            sessions: sessions.iter().map(|s| s.name.to_owned()).collect(),
            names,
            ring_lost,
            counters: counters.clone(),
            limit,
            taken: Arc::clone(&taken),
            past_count: Arc::clone(&past_count),
            watchers,
        };
        let thread = std::thread::Builder::new()
            .name("ring-drain".into())
            .spawn({
                let stop = stop.clone();
                move || drain(ring, destinations, &stop)
            })
            .context("starting the ring drain thread")?;
        Ok(RingDrain {
            stop,
            thread: Some(thread),
            counters,
            taken,
            past_count,
            shadows,
            observed,
        })
    }

    /// Stops the thread once it has sent everything queued: the counters are final.
    pub fn finish(&mut self) {
        self.stop_thread();
    }

    /// Copies handed to the targets so far, all sessions together.
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// The copies dropped after `run -c` had its count.
    pub fn past_count(&self) -> PastCount {
        self.past_count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Per session, what the drain counted.
    pub fn counters(&self) -> Vec<TargetCounters> {
        self.counters.iter().map(SessionCounters::read).collect()
    }

    /// Per session, what its shadow target counts (`None` for other kinds), read as it goes on.
    pub fn shadows(&self) -> &[Option<shadow::Shared>] {
        &self.shadows
    }

    /// Per session, what it observed of its services (`None` when not observed).
    pub fn observed(&self) -> &[Option<observe::Observed>] {
        &self.observed
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RingDrain {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// Copies waiting to be sent on a socket, in one `sendmmsg` per batch.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Buffers, reused; the first `queued` hold datagrams.
    datagrams: Vec<Vec<u8>>,
    queued: usize,
}

/// Copies sent with one system call, at most.
const BATCH: usize = 64;

impl Outbox {
    /// An empty buffer for the next datagram.
    pub fn next(&mut self) -> &mut Vec<u8> {
        if self.queued == self.datagrams.len() {
            self.datagrams.push(Vec::new());
        }
        self.queued += 1;
        let buffer = &mut self.datagrams[self.queued - 1];
        buffer.clear();
        buffer
    }

    /// Whether a batch is queued.
    pub fn is_full(&self) -> bool {
        self.queued == BATCH
    }

    /// Sends what is queued on `socket` (to `destination`, unless it is connected), counting
    /// into `counters`.
    pub fn send(
        &mut self,
        socket: &OwnedFd,
        destination: Option<&SockaddrStorage>,
        counters: &SessionCounters,
    ) {
        if self.queued == 0 {
            return;
        }
        let (sent, errors) = send_many(socket, &self.datagrams[..self.queued], destination);
        self.queued = 0;
        counters.sent(sent as u64);
        if let Some(error) = errors.first() {
            counters.refused(errors.len() as u64, error);
        }
    }
}

fn drain(mut ring: RingBuf<MapData>, mut to: Destinations, stop: &AtomicBool) {
    let clock = WallClock::now();
    // Interface descriptions for watchers, made once each.
    let mut described: HashMap<u64, Arc<str>> = HashMap::new();
    let counters = to.counters.clone();
    loop {
        // Read the flag before draining: what was queued before it was set is then sent.
        let stopping = stop.load(Ordering::Relaxed);
        while let Some(record) = ring.next() {
            let Some((header, frame)) = parse(&record) else {
                continue;
            };
            let session = header.session as usize;
            let Some(count) = counters.get(session) else {
                continue;
            };
            let interface = interface_key(header.ifindex, header.direction);
            let interface_name = || describe(&to.names, header.ifindex, header.direction);
            let timestamp = clock.wall(header.timestamp_ns);
            // A whole frame's later chunks are the shadow's alone.
            let first_chunk = header.flags >> RING_CHUNK_SHIFT == 0;
            if first_chunk && let Some(name) = to.sessions.get(session) {
                let lost = to.watchers.offer(name, frame, || Watched {
                    interface,
                    interface_name: described
                        .entry(interface)
                        .or_insert_with(|| interface_name().into())
                        .clone(),
                    timestamp,
                    orig_len: header.orig_len,
                    frame: frame.to_vec(),
                });
                if lost != 0 {
                    count.lost_by_watchers(lost);
                }
            }
            if header.flags & RING_WATCH_ONLY != 0 {
                continue;
            }
            let Some(Some(sink)) = to.sinks.get_mut(session) else {
                continue;
            };
            if to
                .limit
                .is_some_and(|limit| to.taken.load(Ordering::Relaxed) >= limit)
            {
                let mut past = to
                    .past_count
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let (copies, bytes) = past.entry((header.session, header.rule)).or_default();
                *copies += 1;
                *bytes += u64::from(header.cap_len);
                count.lock().past_count += 1;
                continue;
            }
            to.taken.fetch_add(1, Ordering::Relaxed);
            let copy = RingCopy {
                frame,
                orig_len: header.orig_len,
                flow_hash: header.flow_hash,
                interface,
                interface_name: &interface_name,
                timestamp,
                flags: header.flags,
            };
            sink.push(&copy, count);
        }
        // The ring is empty: send what is queued before sleeping.
        for (sink, count) in to.sinks.iter_mut().zip(counters.iter()) {
            if let Some(sink) = sink {
                sink.flush(count);
            }
        }
        if stopping {
            for (index, sink) in to.sinks.iter_mut().enumerate() {
                if let Some(sink) = sink
                    && u32::try_from(index)
                        .is_ok_and(|i| to.ring_lost.get(&i, 0).is_ok_and(|lost| lost != 0))
                {
                    sink.lost_at_end();
                }
            }
            return;
        }
        // Woken by a record, or after IDLE_WAIT in any case (an error included): the loop reads
        // the ring either way.
        let _ = poll(
            &mut [PollFd::new(ring.as_fd(), PollFlags::POLLIN)],
            PollTimeout::try_from(IDLE_WAIT).unwrap_or(PollTimeout::MAX),
        );
    }
}

/// A record's header and frame bytes; `None` for a record shorter than it says.
fn parse(record: &[u8]) -> Option<(RingCopyHeader, &[u8])> {
    let header: RingCopyHeader = crate::sys::read_pod(record)?;
    let header_len = size_of::<RingCopyHeader>();
    let frame = record.get(header_len..header_len + header.cap_len as usize)?;
    Some((header, frame))
}

/// An interface and hook as one key: a pcapng file or stream describes each once.
fn interface_key(ifindex: u32, direction: u32) -> u64 {
    u64::from(ifindex) << 8 | u64::from(direction)
}

/// A pcapng interface name: the watched interface and hook.
fn describe(names: &HashMap<u32, String>, ifindex: u32, direction: u32) -> String {
    let hook = match direction {
        d if d == Direction::XdpIngress as u32 => "xdp",
        d if d == Direction::Egress as u32 => "egress",
        _ => "ingress",
    };
    match names.get(&ifindex) {
        Some(name) => format!("{name} {hook}"),
        None => format!("ifindex {ifindex} {hook}"),
    }
}

/// Turns the kernel's monotonic timestamps into wall-clock time.
struct WallClock {
    /// Wall-clock minus monotonic time, in nanoseconds.
    offset_ns: i128,
}

impl WallClock {
    fn now() -> Self {
        // These clocks always exist: a failure reads as zero.
        let read = |clock| {
            clock_gettime(clock).map_or(0, |ts| {
                i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec())
            })
        };
        WallClock {
            offset_ns: read(ClockId::CLOCK_REALTIME) - read(ClockId::CLOCK_MONOTONIC),
        }
    }

    fn wall(&self, monotonic_ns: u64) -> Duration {
        let ns = i128::from(monotonic_ns) + self.offset_ns;
        Duration::from_nanos(u64::try_from(ns).unwrap_or_default())
    }
}
