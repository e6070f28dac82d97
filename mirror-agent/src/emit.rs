//! The agent's half of the ring-buffer path (XDP sessions and file targets): a thread of its own
//! drains `COPY_RING` and hands each copy to its session's target, a packet socket on the target
//! interface, a tunnel's raw socket, or a pcap/pcapng file; and each copy of a watched session to
//! its `capture` watchers (see [`crate::watch`]). It wakes up every [`IDLE_WAIT`] (or at once
//! when the ring is half full), drains everything queued, and sends datagrams in batches (one
//! `sendmmsg` for up to 64).
use std::{
    collections::HashMap,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use mirror_common::{Direction, RING_WATCH_ONLY, RingCopyHeader};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    time::{ClockId, clock_gettime},
};

use crate::{
    capture::{Sink, open_tap},
    rules::{Plan, Target},
    sys::socket::send_many,
    tunnel::send::TunnelSender,
    watch::{Watched, Watchers},
};

/// How long the drain thread sleeps when the ring is empty: records wake it only once the ring
/// is half full (see the eBPF `ring::wakeup_flags`), so this bounds the delay of a copy at low
/// rates, and how soon the thread sees that it should stop.
const IDLE_WAIT: Duration = Duration::from_millis(20);

/// Where ring copies go besides interfaces and tunnels, kept across reloads: capture files, and
/// the watchers of live captures.
#[derive(Debug, Default)]
pub struct Outputs {
    pub files: Files,
    pub watchers: Arc<Watchers>,
}

/// The capture files of file targets, kept open across reloads (a reload must not start a
/// session's file again) and closed when the agent stops.
#[derive(Debug, Default)]
pub struct Files(Mutex<HashMap<PathBuf, Arc<Mutex<Sink>>>>);

impl Files {
    fn open(&self, target: &crate::rules::FileTarget) -> anyhow::Result<Arc<Mutex<Sink>>> {
        let mut files = lock(&self.0);
        if let Some(sink) = files.get(&target.path) {
            return Ok(sink.clone());
        }
        let sink = Arc::new(Mutex::new(Sink::open(
            &target.path,
            target.rotate_bytes,
            target.rotate_count,
        )?));
        files.insert(target.path.clone(), sink.clone());
        Ok(sink)
    }

    /// Flushes and closes the files no session of `plan` writes any more (all of them for
    /// `None`).
    pub fn close_unused(&self, plan: Option<&Plan>) -> anyhow::Result<()> {
        let used: Vec<&PathBuf> = plan
            .into_iter()
            .flat_map(|p| &p.sessions)
            .filter_map(|s| match &s.target {
                Target::File(file) => Some(&file.path),
                _ => None,
            })
            .collect();
        let closing: Vec<_> = {
            let mut files = lock(&self.0);
            let gone: Vec<PathBuf> = files
                .keys()
                .filter(|path| !used.contains(path))
                .cloned()
                .collect();
            gone.iter().filter_map(|path| files.remove(path)).collect()
        };
        for sink in closing {
            let sink = Arc::try_unwrap(sink)
                .map_err(|_| anyhow::anyhow!("a capture file is still in use"))?
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            sink.finish()?;
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where one session's ring copies go.
enum Emit {
    Interface(OwnedFd),
    Tunnel(TunnelSender),
    File(Arc<Mutex<Sink>>),
}

/// Copies sent on and copies the target refused, per session.
#[derive(Debug, Default)]
struct EmitCounts {
    sent: AtomicU64,
    failed: AtomicU64,
}

/// The drain thread of one generation's ring.
#[derive(Debug)]
pub struct Drain {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// By session index.
    counts: Arc<Vec<EmitCounts>>,
    /// Whether any session's target copies come through the ring (else the drain only feeds
    /// watchers).
    ring_sessions: bool,
}

/// Where the drain sends what it takes from the ring.
struct Targets {
    /// By session index: the session's target, when its copies come through the ring.
    emits: Vec<Option<Emit>>,
    /// Session names by index, for their watchers.
    sessions: Vec<String>,
    /// Interface names by index.
    names: HashMap<u32, String>,
    counts: Arc<Vec<EmitCounts>>,
    limit: Option<u64>,
    watchers: Arc<Watchers>,
}

impl Drain {
    /// Starts draining `ring`: the copies of the ring sessions of `plan` go to their targets, and
    /// the copies of watched sessions to their `watchers`. With a `limit`, target copies past the
    /// first `limit` are dropped (`run -c`).
    pub fn start(
        ring: RingBuf<MapData>,
        plan: &Plan,
        outputs: &Outputs,
        limit: Option<u64>,
    ) -> anyhow::Result<Self> {
        let emits = plan
            .sessions
            .iter()
            .map(|s| {
                if !s.through_ring {
                    return Ok(None);
                }
                Ok(Some(match &s.target {
                    Target::Interface(i) => Emit::Interface(open_tap(&i.name)?),
                    Target::Tunnel(t) => Emit::Tunnel(TunnelSender::new(t)?),
                    Target::File(f) => Emit::File(outputs.files.open(f)?),
                    // Its copies go to its watchers alone.
                    Target::Watch => return Ok(None),
                }))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .context("opening the targets of ring copies")?;
        let sessions: Vec<String> = plan.sessions.iter().map(|s| s.name.clone()).collect();
        let names: HashMap<u32, String> = plan
            .sessions
            .iter()
            .flat_map(|s| &s.attachments)
            .map(|(i, _)| (i.ifindex, i.name.clone()))
            .collect();
        let counts: Arc<Vec<EmitCounts>> = Arc::new(
            plan.sessions
                .iter()
                .map(|_| EmitCounts::default())
                .collect(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let targets = Targets {
            emits,
            sessions,
            names,
            counts: counts.clone(),
            limit,
            watchers: outputs.watchers.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("ring-drain".into())
            .spawn({
                let stop = stop.clone();
                move || drain(ring, targets, &stop)
            })
            .context("starting the ring drain thread")?;
        Ok(Drain {
            stop,
            thread: Some(thread),
            counts,
            ring_sessions: plan.sessions.iter().any(|s| s.through_ring),
        })
    }
}

impl Drain {
    /// Stops the thread once it has sent everything queued; (sent, failed) per session, when
    /// any session's copies come through the ring.
    pub fn finish(mut self) -> Option<Vec<(u64, u64)>> {
        self.stop_thread();
        self.ring_sessions.then(|| self.counts())
    }

    /// Copies sent on and refused so far, all sessions together.
    pub fn total(&self) -> u64 {
        self.counts()
            .iter()
            .map(|(sent, failed)| sent + failed)
            .sum()
    }

    /// Copies sent on and refused by the target so far, (sent, failed) per session.
    pub fn counts(&self) -> Vec<(u64, u64)> {
        self.counts
            .iter()
            .map(|c| {
                (
                    c.sent.load(Ordering::Relaxed),
                    c.failed.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// Copies waiting to be sent on a socket, in one `sendmmsg` per batch.
#[derive(Default)]
struct Outbox {
    /// Buffers, reused; the first `queued` hold datagrams.
    datagrams: Vec<Vec<u8>>,
    queued: usize,
}

/// Copies sent with one system call, at most.
const BATCH: usize = 64;

impl Outbox {
    /// An empty buffer for the next datagram.
    fn next(&mut self) -> &mut Vec<u8> {
        if self.queued == self.datagrams.len() {
            self.datagrams.push(Vec::new());
        }
        self.queued += 1;
        let buffer = &mut self.datagrams[self.queued - 1];
        buffer.clear();
        buffer
    }

    /// Sends what is queued for `emit`, counting into `count`.
    fn flush(&mut self, emit: &Emit, count: &EmitCounts) {
        if self.queued == 0 {
            return;
        }
        let queued = &self.datagrams[..self.queued];
        let (sent, errors) = match emit {
            Emit::Interface(fd) => send_many(fd, queued, None),
            Emit::Tunnel(sender) => {
                let (socket, destination) = sender.socket();
                send_many(socket, queued, Some(&destination))
            }
            Emit::File(_) => (0, Vec::new()),
        };
        self.queued = 0;
        count.sent.fetch_add(sent as u64, Ordering::Relaxed);
        if let Some(error) = errors.first() {
            failed(count, errors.len() as u64, error);
        }
    }
}

/// Counts `n` copies a target refused, and logs the first of a session.
fn failed(count: &EmitCounts, n: u64, error: &dyn std::fmt::Display) {
    if count.failed.fetch_add(n, Ordering::Relaxed) == 0 {
        tracing::warn!("sending a ring copy on: {error:#} (further failures are counted)");
    }
}

fn drain(mut ring: RingBuf<MapData>, mut targets: Targets, stop: &AtomicBool) {
    let clock = WallClock::now();
    let mut taken = 0u64;
    let mut outboxes: Vec<Outbox> = targets.emits.iter().map(|_| Outbox::default()).collect();
    // Interface descriptions for watchers, made once each.
    let mut described: HashMap<u64, Arc<str>> = HashMap::new();
    let counts = targets.counts.clone();
    loop {
        // Read the flag before draining: what was queued before it was set is then sent.
        let stopping = stop.load(Ordering::Relaxed);
        while let Some(record) = ring.next() {
            let Some((header, frame)) = parse(&record) else {
                continue;
            };
            let session = header.session as usize;
            let interface = interface_key(header.ifindex, header.direction);
            if let Some(name) = targets.sessions.get(session) {
                targets.watchers.offer(name, frame, || Watched {
                    interface,
                    interface_name: described
                        .entry(interface)
                        .or_insert_with(|| {
                            describe(&targets.names, header.ifindex, header.direction).into()
                        })
                        .clone(),
                    timestamp: clock.wall(header.timestamp_ns),
                    orig_len: header.orig_len,
                    frame: frame.to_vec(),
                });
            }
            if header.flags & RING_WATCH_ONLY != 0 {
                continue;
            }
            let (Some(Some(emit)), Some(outbox), Some(count)) = (
                targets.emits.get_mut(session),
                outboxes.get_mut(session),
                counts.get(session),
            ) else {
                continue;
            };
            if targets.limit.is_some_and(|limit| taken >= limit) {
                continue;
            }
            taken += 1;
            match emit {
                Emit::Interface(_) => outbox.next().extend_from_slice(frame),
                Emit::Tunnel(sender) => {
                    sender.encapsulate(frame, header.flow_hash, header.orig_len, outbox.next());
                }
                Emit::File(sink) => {
                    let written = lock(sink).write(
                        interface,
                        || describe(&targets.names, header.ifindex, header.direction),
                        clock.wall(header.timestamp_ns),
                        frame,
                        header.orig_len,
                    );
                    match written {
                        Ok(()) => count.sent.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failed(count, 1, &e);
                            0
                        }
                    };
                }
            }
            if outbox.queued == BATCH {
                outbox.flush(emit, count);
            }
        }
        // The ring is empty: send what is queued before sleeping.
        for ((emit, outbox), count) in targets.emits.iter().zip(&mut outboxes).zip(counts.iter()) {
            if let Some(emit) = emit {
                outbox.flush(emit, count);
            }
        }
        if stopping {
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
