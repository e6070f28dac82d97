//! `mirror-agent collect`: a receiver for tunnelled copies: VXLAN and GENEVE on UDP ports, GRE
//! and ERSPAN (types II and III) on a raw IP protocol 47 socket. Each datagram is checked
//! ([`decode`]) and filtered by VNI, GRE key or ERSPAN session id, and its inner Ethernet frame
//! is written with the kernel's receive timestamp to a pcap or pcapng file (one interface per
//! stream; rotated by size when asked), sent out of an interface for an IDS and/or read for the
//! HTTP requests in them, replayed to a shadow (`--shadow`, as a shadow target). Bad datagrams
//! are counted, never fatal; ERSPAN sequence gaps are counted as lost copies. Counts per stream
//! are logged as it runs and printed on exit, together with the datagrams the sockets dropped.
mod decode;
mod metrics;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsFd as _, AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use clap::Args;
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt},
        time::TimeSpec,
    },
};
use tokio::signal::unix::{SignalKind, signal};

use self::decode::{Decoded, Gaps, Refused, Stream};
use crate::{
    sys::socket,
    targets::{
        file::PcapFile,
        interface::{open_tap, send_frame},
        shadow::{ShadowConfig, ShadowSink, ShadowStats, Shared},
    },
    values::{ErspanSessionId, Vni},
};

/// Receive tunnelled copies (VXLAN, GENEVE, GRE, ERSPAN) and write or forward their inner
/// frames. Without `--listen`, `--geneve` or `--gre` it receives VXLAN on 0.0.0.0:4789.
#[derive(Debug, Args)]
pub struct CollectArgs {
    /// Receive VXLAN on this address and UDP port: `0.0.0.0:4789`, `[::]:4789` (IPv6 and
    /// IPv4). Repeatable.
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Receive GENEVE on this address and UDP port (`0.0.0.0:6081`). Repeatable.
    #[arg(long)]
    geneve: Vec<SocketAddr>,
    /// Receive GRE (Ethernet inside) and ERSPAN type II and III sent to this address (`0.0.0.0`
    /// or `::` for any of one family; a raw IP protocol 47 socket). Repeatable.
    #[arg(long)]
    gre: Vec<IpAddr>,
    /// Take copies only from senders in this prefix (repeatable: `10.0.0.0/8`, `fd00::/8`, or an
    /// address); others are counted as `not_allowed` and dropped. Without it, every sender. Only
    /// the source address is checked: with `rp_filter` off, a sender on another interface can
    /// spoof an allowed one (keep `rp_filter` on, or firewall the listening interface).
    #[arg(long)]
    allow: Vec<crate::config::Cidr>,
    /// Keep only this VNI of VXLAN and GENEVE (repeatable); others are counted and dropped.
    #[arg(long)]
    vni: Vec<Vni>,
    /// Keep only this GRE key (repeatable); others, and GRE without a key, are counted and
    /// dropped.
    #[arg(long)]
    key: Vec<u32>,
    /// Keep only this ERSPAN session id (repeatable); others are counted and dropped.
    #[arg(long)]
    session_id: Vec<ErspanSessionId>,
    /// Write the inner frames here: `.pcapng` (one interface per stream: `vni N`, `geneve vni N`,
    /// `gre key N`, `erspan session N`) or anything else as pcap; nanosecond kernel receive
    /// timestamps either way.
    #[arg(long)]
    write: Option<PathBuf>,
    /// Also send each inner frame out of this interface (a tap or veth feeding an IDS).
    #[arg(long)]
    tap: Option<String>,
    /// Start a new file once the current one holds this many bytes; files are then named
    /// `NAME-000001.EXT`, `NAME-000002.EXT`, ...
    #[arg(long, requires = "write", value_parser = clap::value_parser!(u64).range(1024..))]
    rotate_bytes: Option<u64>,
    /// With --rotate-bytes: keep only the newest N files, removing older ones.
    #[arg(long, requires = "rotate_bytes", value_parser = clap::value_parser!(u64).range(1..))]
    rotate_count: Option<u64>,
    /// Seconds between per-stream count lines on stderr; 0: none.
    #[arg(long, default_value_t = 10)]
    stats_interval: u64,
    /// Exit after this many frames were accepted (like tcpdump -c).
    #[arg(long)]
    count: Option<u64>,
    /// Forget a stream that sent nothing for this many seconds (1 to 86400), so that a flood of
    /// made-up identifiers that filled the stream table does not keep later streams out.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    stream_idle: u64,
    /// Serve Prometheus `/metrics` (frames, bytes and lost copies per stream, drops by reason)
    /// and `/healthz` on this address, e.g. `10.0.0.9:9478`, with the agent's bounds (256
    /// connections, 16 per client, 16 KiB and 5 s for a request's header).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Shadow a service from here: the HTTP/1.x requests in the inner frames, from any number
    /// of nodes' tunnels, are replayed to this `http://HOST:PORT` and its answers dropped
    /// (counts in the summary and `/metrics`). The senders' filters choose the live service's
    /// traffic, both directions (e.g. 'tcp port 8080').
    #[arg(long, value_name = "URL")]
    shadow: Option<String>,
    /// With --shadow: compare each shadow answer with the live one in the tunnels.
    #[arg(long, requires = "shadow")]
    compare: bool,
}

/// How long the receive loop waits for a datagram before it looks at the stop flag again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Streams tracked at once: datagrams of further streams are counted, not tracked, so that a
/// flood of made-up identifiers cannot grow the collector without bound; idle streams are
/// forgotten (`--stream-idle`), which makes room again.
const MAX_STREAMS: usize = 4096;
/// How often idle streams are looked for.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// Where a socket's datagrams come from, and so how they are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vxlan,
    Geneve,
    /// A raw GRE socket: IPv4 ones deliver the IP header too.
    Gre {
        ipv4: bool,
    },
}

/// What one stream sent.
#[derive(Debug, Default, Clone)]
struct Tracked {
    frames: u64,
    /// Bytes of inner frames.
    bytes: u64,
    /// ERSPAN's lost copies.
    gaps: Gaps,
    /// When it last sent a frame.
    seen: Option<Instant>,
}

/// What was received, per stream, and what was not taken.
#[derive(Debug, Default, Clone)]
struct Counts {
    streams: BTreeMap<Stream, Tracked>,
    /// Streams forgotten after `--stream-idle` seconds without a frame (their frames counted in
    /// `accepted`, no longer per stream).
    aged_out: u64,
    short: u64,
    bad_flags: u64,
    filtered: u64,
    not_allowed: u64,
    too_many_streams: u64,
    socket_drops: u64,
    tap_errors: u64,
    /// Frames not written to the capture file (a full disk, say).
    write_errors: u64,
    accepted: u64,
    /// With --shadow: what it did with the requests.
    shadow: Option<ShadowStats>,
}

impl Counts {
    /// The datagrams not taken, and the frames not passed on, by reason.
    fn dropped(&self) -> [(&'static str, u64); 8] {
        [
            ("short", self.short),
            ("bad_flags", self.bad_flags),
            ("filtered", self.filtered),
            ("not_allowed", self.not_allowed),
            ("too_many_streams", self.too_many_streams),
            ("socket_drops", self.socket_drops),
            ("tap_errors", self.tap_errors),
            ("write_errors", self.write_errors),
        ]
    }

    fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "{:<16} {:>12} {:>14} {:>10}\n",
            "stream", "frames", "bytes", "lost"
        );
        for (stream, tracked) in &self.streams {
            let _ = writeln!(
                out,
                "{:<16} {:>12} {:>14} {:>10}",
                stream.label(),
                tracked.frames,
                tracked.bytes,
                tracked.gaps.lost
            );
        }
        let _ = writeln!(out, "streams          aged_out={}", self.aged_out);
        out.push_str("dropped         ");
        for (reason, count) in self.dropped() {
            let _ = write!(out, " {reason}={count}");
        }
        out.push('\n');
        if let Some(shadow) = &self.shadow {
            let _ = writeln!(out, "{}", shadow.summary());
        }
        out
    }
}

/// The ids each format keeps (empty: all).
#[derive(Debug, Default)]
struct Filters {
    vni: BTreeSet<u32>,
    key: BTreeSet<u32>,
    session: BTreeSet<u32>,
}

impl Filters {
    fn keeps(&self, stream: Stream) -> bool {
        let wanted = match stream {
            Stream::Vxlan(_) | Stream::Geneve(_) => &self.vni,
            Stream::Gre(_) => &self.key,
            Stream::Erspan(_) => &self.session,
        };
        wanted.is_empty() || stream.id().is_some_and(|id| wanted.contains(&id))
    }
}

pub async fn run(args: CollectArgs) -> anyhow::Result<()> {
    // Checked before any socket is bound.
    let shadow = args
        .shadow
        .as_deref()
        .map(|url| open_shadow(url, args.compare))
        .transpose()?;
    let (sockets, described) = open_sockets(&args)?;
    let tap = args.tap.as_deref().map(open_tap).transpose()?;
    let sink = args
        .write
        .as_deref()
        .map(|path| {
            let rotation = crate::targets::file::Rotation {
                bytes: args.rotate_bytes,
                seconds: None,
                count: args.rotate_count,
            };
            PcapFile::open(path, rotation)
        })
        .transpose()?;
    // Bound before anything is received, so that a busy port fails the start.
    let metrics_listener = match args.metrics {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listening on {address} for metrics"))?,
        ),
        None => None,
    };
    eprintln!(
        "mirror-agent collect: listening on {}{}{}{}",
        described.join(", "),
        args.write
            .as_ref()
            .map(|p| format!(", writing {}", p.display()))
            .unwrap_or_default(),
        args.metrics
            .map(|a| format!(", metrics on {a}"))
            .unwrap_or_default(),
        shadow
            .as_ref()
            .map(|(_, stats)| format!(", replaying HTTP requests to {}", stats.read().url))
            .unwrap_or_default()
    );
    let published = metrics::Published::default();
    let (stop_serving, serving) = tokio::sync::watch::channel(false);
    let server = metrics_listener
        .map(|listener| tokio::spawn(metrics::serve(listener, published.clone(), serving)));
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        let options = LoopOptions {
            allow: args.allow.iter().map(|c| c.0).collect(),
            filters: Filters {
                vni: args.vni.iter().map(|v| v.0).collect(),
                key: args.key.iter().copied().collect(),
                session: args.session_id.iter().map(|s| u32::from(s.0)).collect(),
            },
            stats_interval: Duration::from_secs(args.stats_interval),
            stream_idle: Duration::from_secs(args.stream_idle),
            count: args.count,
            published: server.is_some().then(|| published.clone()),
        };
        tokio::task::spawn_blocking(move || {
            let outputs = Outputs {
                sink,
                tap: tap.as_ref(),
                shadow,
            };
            receive(&sockets, outputs, &options, &stop)
        })
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let waiter = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = sigint.recv() => {},
                _ = sigterm.recv() => {},
            }
            stop.store(true, Ordering::Relaxed);
        })
    };
    let counts = receiver.await.context("the receive loop");
    waiter.abort();
    let _ = stop_serving.send(true);
    if let Some(server) = server {
        // Within the listener's grace period.
        let _ = server.await;
    }
    let counts = counts??;
    print!("{}", counts.summary());
    Ok(())
}

/// The receiving sockets, each with the format it reads.
type Sockets = Vec<(OwnedFd, Kind)>;

/// The sockets asked for (VXLAN on 0.0.0.0:4789 when none is), and what they listen on.
fn open_sockets(args: &CollectArgs) -> anyhow::Result<(Sockets, Vec<String>)> {
    let mut sockets = Vec::new();
    let vxlan = if args.listen.is_empty() && args.geneve.is_empty() && args.gre.is_empty() {
        vec![SocketAddr::from((
            [0, 0, 0, 0],
            crate::targets::tunnel::DEFAULT_VXLAN_PORT,
        ))]
    } else {
        args.listen.clone()
    };
    let mut described = Vec::new();
    for address in &vxlan {
        sockets.push((listen_udp(*address)?, Kind::Vxlan));
        described.push(format!("VXLAN {address}"));
    }
    for address in &args.geneve {
        sockets.push((listen_udp(*address)?, Kind::Geneve));
        described.push(format!("GENEVE {address}"));
    }
    for address in &args.gre {
        sockets.push((
            listen_gre(*address)?,
            Kind::Gre {
                ipv4: address.is_ipv4(),
            },
        ));
        described.push(format!("GRE/ERSPAN {address}"));
    }
    Ok((sockets, described))
}

struct LoopOptions {
    filters: Filters,
    /// Senders taken (empty: all).
    allow: Vec<ipnet::IpNet>,
    stats_interval: Duration,
    count: Option<u64>,
    /// Streams idle this long are forgotten.
    stream_idle: Duration,
    /// Where the counts go for `/metrics`, when it is served.
    published: Option<metrics::Published>,
}

/// Where the inner frames go: a capture file, an interface, a shadow (with its counts).
struct Outputs<'a> {
    sink: Option<PcapFile>,
    tap: Option<&'a OwnedFd>,
    shadow: Option<(ShadowSink, Shared)>,
}

impl Outputs<'_> {
    /// Writes, forwards and replays one inner frame, received at `timestamp`.
    fn pass(&mut self, counts: &mut Counts, stream: Stream, frame: &[u8], timestamp: Duration) {
        if let Some(sink) = &mut self.sink
            && let Err(e) = sink.write(
                stream.key(),
                || stream.interface_name(),
                timestamp,
                frame,
                frame.len() as u32,
            )
        {
            // Counted; the capture goes on in a new file once writing works again.
            if sink.write_errors == 1 {
                tracing::warn!("{e:#} (further failures are only counted)");
            }
        }
        if let Some(tap) = self.tap
            && send_frame(tap, frame).is_err()
        {
            counts.tap_errors += 1;
        }
        if let Some((shadow, _)) = &mut self.shadow {
            shadow.frame(frame, frame.len() as u32, timestamp);
        }
    }
}

/// The sink replaying to `url`, and its counts.
fn open_shadow(url: &str, compare: bool) -> anyhow::Result<(ShadowSink, Shared)> {
    let config = ShadowConfig {
        compare,
        ..ShadowConfig::of_url(url)
    };
    let target = config
        .checked()
        .map_err(|e| anyhow::anyhow!("--shadow: {e}"))?;
    let stats = Shared::default();
    Ok((ShadowSink::open(&target, stats.clone(), None)?, stats))
}

/// When the receive loop last logged its counts, published them for `/metrics` and forgot idle
/// streams.
struct Ticks {
    logged: Instant,
    published: Instant,
    swept: Instant,
}

impl Default for Ticks {
    fn default() -> Self {
        Ticks {
            logged: Instant::now(),
            published: Instant::now(),
            swept: Instant::now(),
        }
    }
}

impl Ticks {
    /// Publishes the counts every [`POLL_INTERVAL`] and logs them every stats interval.
    fn tick(
        &mut self,
        counts: &mut Counts,
        sink: Option<&PcapFile>,
        shadow: Option<&Shared>,
        options: &LoopOptions,
    ) {
        if self.swept.elapsed() >= SWEEP_PERIOD {
            self.swept = Instant::now();
            let before = counts.streams.len();
            counts.streams.retain(|_, t| {
                t.seen
                    .is_some_and(|seen| seen.elapsed() < options.stream_idle)
            });
            counts.aged_out += (before - counts.streams.len()) as u64;
        }
        if let Some(published) = &options.published
            && self.published.elapsed() >= POLL_INTERVAL
        {
            self.published = Instant::now();
            counts.write_errors = sink.map_or(0, |sink| sink.write_errors);
            counts.shadow = shadow.map(Shared::read);
            *published.lock().unwrap_or_else(PoisonError::into_inner) = counts.clone();
        }
        if !options.stats_interval.is_zero() && self.logged.elapsed() >= options.stats_interval {
            self.logged = Instant::now();
            for (stream, tracked) in &counts.streams {
                tracing::info!(
                    stream = stream.label(),
                    frames = tracked.frames,
                    bytes = tracked.bytes,
                    lost = tracked.gaps.lost,
                    "received"
                );
            }
        }
    }
}

/// Receives until `stop` is set (then drains what the sockets already hold) or `count` frames.
fn receive(
    sockets: &[(OwnedFd, Kind)],
    outputs: Outputs<'_>,
    options: &LoopOptions,
    stop: &AtomicBool,
) -> anyhow::Result<Counts> {
    let mut outputs = outputs;
    let mut counts = Counts::default();
    let mut drops: Vec<u32> = vec![0; sockets.len()];
    let mut buffer = vec![0u8; 65_536];
    // Room for the timestamp's and the drop count's control messages, reused for each datagram.
    let mut control = nix::cmsg_space!(TimeSpec, u32);
    let mut ticks = Ticks::default();
    while options.count.is_none_or(|n| counts.accepted < n) {
        let draining = stop.load(Ordering::Relaxed);
        let ready = wait_readable(
            sockets,
            if draining {
                Duration::ZERO
            } else {
                POLL_INTERVAL
            },
        )?;
        if ready.is_empty() && draining {
            break;
        }
        // One reading of the clock for the datagrams of this wait: when their streams last sent.
        let now = Instant::now();
        // Nothing waits: what was written goes to the file now, not at the next frame.
        if let (true, Some(sink)) = (ready.is_empty(), &mut outputs.sink) {
            sink.flush();
        }
        for index in ready {
            let (socket, kind) = &sockets[index];
            let datagram = match receive_one(socket.as_raw_fd(), &mut buffer, &mut control) {
                Ok(d) => d,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e).context("receiving"),
            };
            if let Some(dropped) = datagram.socket_drops {
                drops[index] = dropped;
                counts.socket_drops = drops.iter().map(|d| u64::from(*d)).sum();
            }
            if !options.allow.is_empty()
                && !datagram
                    .sender
                    .is_some_and(|sender| options.allow.iter().any(|net| net.contains(&sender)))
            {
                counts.not_allowed += 1;
                continue;
            }
            let packet = &buffer[..datagram.len];
            let decoded = match kind {
                Kind::Vxlan => decode::vxlan(packet),
                Kind::Geneve => decode::geneve(packet),
                Kind::Gre { ipv4: true } => decode::gre_in_ipv4(packet),
                Kind::Gre { ipv4: false } => decode::gre(packet),
            };
            let Some((stream, frame)) = take(&mut counts, decoded, options, now) else {
                continue;
            };
            outputs.pass(&mut counts, stream, frame, datagram.timestamp);
        }
        if let Some((shadow, _)) = &mut outputs.shadow {
            shadow.sweep();
        }
        let shadow_stats = outputs.shadow.as_ref().map(|(_, stats)| stats);
        ticks.tick(&mut counts, outputs.sink.as_ref(), shadow_stats, options);
    }
    let Outputs { sink, shadow, .. } = outputs;
    if let Some((shadow, stats)) = shadow {
        // Its connections end, and the requests in flight get their moment to finish.
        drop(shadow);
        counts.shadow = Some(stats.read());
    }
    if let Some(sink) = sink {
        counts.write_errors = sink.write_errors;
        if let Err(e) = sink.finish() {
            tracing::warn!("{e:#}");
            counts.write_errors += 1;
        }
    }
    // The kernel's own count, read now: datagrams it dropped after the last one received are
    // in it too.
    counts.socket_drops = sockets
        .iter()
        .map(|(socket, _)| u64::from(socket::buffer_drops(socket)))
        .sum();
    if let Some(published) = &options.published {
        *published.lock().unwrap_or_else(PoisonError::into_inner) = counts.clone();
    }
    Ok(counts)
}

/// Counts a decoded datagram; its stream and frame when the frame is to be written and
/// forwarded.
fn take<'a>(
    counts: &mut Counts,
    decoded: Result<Decoded<'a>, Refused>,
    options: &LoopOptions,
    now: Instant,
) -> Option<(Stream, &'a [u8])> {
    let decoded = match decoded {
        Ok(decoded) => decoded,
        Err(Refused::Short) => {
            counts.short += 1;
            return None;
        }
        Err(Refused::BadFlags) => {
            counts.bad_flags += 1;
            return None;
        }
    };
    if !options.filters.keeps(decoded.stream) {
        counts.filtered += 1;
        return None;
    }
    if !counts.streams.contains_key(&decoded.stream) && counts.streams.len() >= MAX_STREAMS {
        counts.too_many_streams += 1;
        return None;
    }
    let entry = counts.streams.entry(decoded.stream).or_default();
    entry.frames += 1;
    entry.bytes += decoded.frame.len() as u64;
    entry.seen = Some(now);
    if let Some(sequence) = decoded.sequence
        && matches!(decoded.stream, Stream::Erspan(_))
    {
        entry.gaps.saw(sequence);
    }
    counts.accepted += 1;
    Some((decoded.stream, decoded.frame))
}

/// Indices of the sockets with a datagram waiting, after at most `timeout`.
fn wait_readable(sockets: &[(OwnedFd, Kind)], timeout: Duration) -> io::Result<Vec<usize>> {
    let mut fds: Vec<PollFd> = sockets
        .iter()
        .map(|(socket, _)| PollFd::new(socket.as_fd(), PollFlags::POLLIN))
        .collect();
    match poll(
        &mut fds,
        PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(_) => {}
        Err(Errno::EINTR) => return Ok(Vec::new()),
        Err(errno) => return Err(errno.into()),
    }
    Ok(fds
        .iter()
        .enumerate()
        .filter(|(_, fd)| fd.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
        .map(|(index, _)| index)
        .collect())
}

/// A UDP socket with a large buffer, kernel receive timestamps and a drop counter.
fn listen_udp(address: SocketAddr) -> anyhow::Result<OwnedFd> {
    let socket = UdpSocket::bind(address).with_context(|| format!("listening on UDP {address}"))?;
    socket
        .set_nonblocking(true)
        .context("a non-blocking socket")?;
    let fd = OwnedFd::from(socket);
    if address.is_ipv6() {
        // Tunnels over IPv6 may send a zero UDP checksum (RFC 6935, RFC 6936): the inner frame
        // carries its own checks. Linux drops such datagrams unless told otherwise.
        socket::set_int_option(&fd, libc::SOL_UDP, libc::UDP_NO_CHECK6_RX, 1)
            .context("UDP_NO_CHECK6_RX")?;
    }
    receive_options(&fd)?;
    Ok(fd)
}

/// A raw socket for IP protocol 47 (GRE) bound to `address`.
fn listen_gre(address: IpAddr) -> anyhow::Result<OwnedFd> {
    let family = if address.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd =
        socket::raw_socket(family, libc::IPPROTO_GRE, true).context("opening a raw GRE socket")?;
    nix::sys::socket::bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(address, 0)),
    )
    .with_context(|| format!("listening for GRE on {address}"))?;
    receive_options(&fd)?;
    Ok(fd)
}

/// A large buffer (as root, beyond `net.core.rmem_max`), kernel timestamps, drop counts.
fn receive_options(fd: &OwnedFd) -> anyhow::Result<()> {
    const BUFFER: usize = 16 << 20;
    if setsockopt(fd, sockopt::RcvBufForce, &BUFFER).is_err() {
        let _ = setsockopt(fd, sockopt::RcvBuf, &BUFFER);
    }
    setsockopt(fd, sockopt::ReceiveTimestampns, &true).context("SO_TIMESTAMPNS")?;
    setsockopt(fd, sockopt::RxqOvfl, &1).context("SO_RXQ_OVFL")?;
    Ok(())
}

struct Datagram {
    len: usize,
    /// Who sent it (IPv4-mapped IPv6 senders of a dual-stack socket as IPv4).
    sender: Option<IpAddr>,
    timestamp: Duration,
    /// The socket's cumulative drop count, when the kernel reported it with this datagram.
    socket_drops: Option<u32>,
}

/// The sender's address (IPv4-mapped IPv6 senders as IPv4).
fn sender_of(from: &SockaddrStorage) -> Option<IpAddr> {
    from.as_sockaddr_in()
        .map(|v4| IpAddr::V4(v4.ip()))
        .or_else(|| from.as_sockaddr_in6().map(|v6| v6.ip().to_canonical()))
}

fn receive_one(socket: RawFd, buffer: &mut [u8], control: &mut [u8]) -> io::Result<Datagram> {
    let mut iov = [io::IoSliceMut::new(buffer)];
    let message = recvmsg::<SockaddrStorage>(socket, &mut iov, Some(control), MsgFlags::empty())?;
    let mut datagram = Datagram {
        len: message.bytes,
        sender: message.address.as_ref().and_then(sender_of),
        timestamp: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
        socket_drops: None,
    };
    for control in message.cmsgs()? {
        match control {
            ControlMessageOwned::ScmTimestampns(ts) => {
                datagram.timestamp = Duration::new(
                    u64::try_from(ts.tv_sec()).unwrap_or_default(),
                    u32::try_from(ts.tv_nsec()).unwrap_or_default(),
                );
            }
            ControlMessageOwned::RxqOvfl(drops) => datagram.socket_drops = Some(drops),
            _ => {}
        }
    }
    Ok(datagram)
}
