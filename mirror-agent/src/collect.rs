//! `mirror-agent collect`: a VXLAN receiver for the copies. Each datagram is checked (length, the
//! VXLAN I flag, the VNI filter), and its inner Ethernet frame is written with the kernel's receive
//! timestamp to a pcap or pcapng file (rotated by size when asked) and/or sent out of an interface
//! for an IDS. Bad datagrams are counted, never fatal. Counts per VNI are logged as it runs and
//! printed on exit, together with the datagrams the socket itself dropped.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    mem::MaybeUninit,
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    capture::{Sink, open_tap, send_frame},
    config::Vni,
};

/// Receive VXLAN copies and write or forward their inner frames.
#[derive(Debug, Args)]
pub struct CollectArgs {
    /// Address and UDP port to receive on: `0.0.0.0:4789`, `[::]:4789` (IPv6 and IPv4).
    #[arg(long, default_value = "0.0.0.0:4789")]
    listen: SocketAddr,
    /// Keep only this VNI (repeatable); datagrams of other VNIs are counted and dropped.
    #[arg(long)]
    vni: Vec<Vni>,
    /// Write the inner frames here: `.pcapng` (one interface per VNI, named `vni N`) or anything
    /// else as pcap; nanosecond kernel receive timestamps either way.
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
    /// Seconds between per-VNI count lines on stderr; 0: none.
    #[arg(long, default_value_t = 10)]
    stats_interval: u64,
    /// Exit after this many frames were accepted (like tcpdump -c).
    #[arg(long)]
    count: Option<u64>,
}

const VXLAN_HEADER_LEN: usize = 8;
const ETHERNET_HEADER_LEN: usize = 14;
/// The VXLAN "I" flag: the VNI field is valid (RFC 7348). The other flag bits are ignored on
/// receipt, as the RFC says.
const VXLAN_FLAG_VNI: u8 = 0x08;
/// How often the receive loop looks at the stop flag when no datagram arrives.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What was received.
#[derive(Debug, Default)]
struct Counts {
    /// (frames, bytes of inner frames) by VNI.
    per_vni: BTreeMap<u32, (u64, u64)>,
    short: u64,
    bad_flags: u64,
    other_vni: u64,
    socket_drops: u64,
    tap_errors: u64,
    accepted: u64,
}

impl Counts {
    fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!("{:<10} {:>12} {:>14}\n", "vni", "frames", "bytes");
        for (vni, (frames, bytes)) in &self.per_vni {
            let _ = writeln!(out, "{vni:<10} {frames:>12} {bytes:>14}");
        }
        let _ = writeln!(
            out,
            "dropped    short={} bad_flags={} other_vni={} socket_drops={} tap_errors={}",
            self.short, self.bad_flags, self.other_vni, self.socket_drops, self.tap_errors
        );
        out
    }
}

/// A VXLAN datagram's VNI and inner frame, or why it is refused.
fn decapsulate(datagram: &[u8]) -> Result<(u32, &[u8]), Refused> {
    if datagram.len() < VXLAN_HEADER_LEN + ETHERNET_HEADER_LEN {
        return Err(Refused::Short);
    }
    if datagram[0] & VXLAN_FLAG_VNI == 0 {
        return Err(Refused::BadFlags);
    }
    let vni = u32::from_be_bytes([0, datagram[4], datagram[5], datagram[6]]);
    Ok((vni, &datagram[VXLAN_HEADER_LEN..]))
}

#[derive(Debug, PartialEq, Eq)]
enum Refused {
    Short,
    BadFlags,
}

pub async fn run(args: CollectArgs) -> anyhow::Result<()> {
    let socket = listen(args.listen)?;
    let tap = args.tap.as_deref().map(open_tap).transpose()?;
    let sink = args
        .write
        .as_deref()
        .map(|path| Sink::open(path, args.rotate_bytes, args.rotate_count))
        .transpose()?;
    eprintln!(
        "mirror-agent collect: listening on {}{}",
        args.listen,
        args.write
            .as_ref()
            .map(|p| format!(", writing {}", p.display()))
            .unwrap_or_default()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        let filter: BTreeSet<u32> = args.vni.iter().map(|v| v.0).collect();
        let options = LoopOptions {
            filter,
            stats_interval: Duration::from_secs(args.stats_interval),
            count: args.count,
        };
        tokio::task::spawn_blocking(move || receive(&socket, sink, tap.as_ref(), &options, &stop))
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
    let counts = receiver.await.context("the receive loop")??;
    waiter.abort();
    print!("{}", counts.summary());
    Ok(())
}

struct LoopOptions {
    filter: BTreeSet<u32>,
    stats_interval: Duration,
    count: Option<u64>,
}

/// Receives until `stop` is set (then drains what the socket already holds) or `count` frames.
fn receive(
    socket: &UdpSocket,
    mut sink: Option<Sink>,
    tap: Option<&OwnedFd>,
    options: &LoopOptions,
    stop: &AtomicBool,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let mut buffer = vec![0u8; 65_536];
    let mut last_stats = Instant::now();
    let mut draining = false;
    while options.count.is_none_or(|n| counts.accepted < n) {
        if !draining && stop.load(Ordering::Relaxed) {
            socket
                .set_nonblocking(true)
                .context("draining the socket")?;
            draining = true;
        }
        let datagram = match receive_one(socket, &mut buffer) {
            Ok(d) => d,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if draining {
                    break;
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("receiving"),
        };
        if let Some(drops) = datagram.socket_drops {
            counts.socket_drops = u64::from(drops);
        }
        match decapsulate(&buffer[..datagram.len]) {
            Err(Refused::Short) => counts.short += 1,
            Err(Refused::BadFlags) => counts.bad_flags += 1,
            Ok((vni, _)) if !options.filter.is_empty() && !options.filter.contains(&vni) => {
                counts.other_vni += 1;
            }
            Ok((vni, frame)) => {
                let entry = counts.per_vni.entry(vni).or_default();
                entry.0 += 1;
                entry.1 += frame.len() as u64;
                counts.accepted += 1;
                if let Some(sink) = &mut sink {
                    sink.write(
                        vni,
                        || format!("vni {vni}"),
                        datagram.timestamp,
                        frame,
                        frame.len() as u32,
                    )?;
                }
                if let Some(tap) = tap
                    && send_frame(tap.as_raw_fd(), frame).is_err()
                {
                    counts.tap_errors += 1;
                }
            }
        }
        if !options.stats_interval.is_zero() && last_stats.elapsed() >= options.stats_interval {
            last_stats = Instant::now();
            for (vni, (frames, bytes)) in &counts.per_vni {
                tracing::info!(vni, frames, bytes, "received");
            }
        }
    }
    if let Some(sink) = sink {
        sink.finish()?;
    }
    Ok(counts)
}

/// A UDP socket with a large buffer, kernel receive timestamps and a drop counter.
fn listen(address: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind(address).with_context(|| format!("listening on UDP {address}"))?;
    let fd = socket.as_raw_fd();
    // A larger buffer rides out bursts; as root, beyond net.core.rmem_max.
    let buffer: libc::c_int = 16 << 20;
    if setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, buffer).is_err() {
        let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, buffer);
    }
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1).context("SO_TIMESTAMPNS")?;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1).context("SO_RXQ_OVFL")?;
    if address.is_ipv6() {
        // Tunnels over IPv6 may send a zero UDP checksum (RFC 6935, RFC 6936): the inner frame
        // carries its own checks. Linux drops such datagrams unless told otherwise.
        setsockopt(fd, libc::SOL_UDP, libc::UDP_NO_CHECK6_RX, 1).context("UDP_NO_CHECK6_RX")?;
    }
    socket
        .set_read_timeout(Some(POLL_INTERVAL))
        .context("setting the receive timeout")?;
    Ok(socket)
}

fn setsockopt(fd: RawFd, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value is a c_int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

struct Datagram {
    len: usize,
    timestamp: Duration,
    /// The socket's cumulative drop count, when the kernel reported it with this datagram.
    socket_drops: Option<u32>,
}

fn receive_one(socket: &UdpSocket, buffer: &mut [u8]) -> io::Result<Datagram> {
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut message: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = size_of_val(&control);
    // SAFETY: recvmsg writes within the buffers described by `message`.
    let len = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut message, 0) };
    let len = usize::try_from(len).map_err(|_| io::Error::last_os_error())?;
    let mut datagram = Datagram {
        len,
        timestamp: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
        socket_drops: None,
    };
    // SAFETY: walking the control messages recvmsg filled in, with the libc macros.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&raw const message);
        while !header.is_null() {
            let data = libc::CMSG_DATA(header);
            match ((*header).cmsg_level, (*header).cmsg_type) {
                (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS) => {
                    let ts = data.cast::<libc::timespec>().read_unaligned();
                    datagram.timestamp = Duration::new(
                        u64::try_from(ts.tv_sec).unwrap_or_default(),
                        u32::try_from(ts.tv_nsec).unwrap_or_default(),
                    );
                }
                (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => {
                    datagram.socket_drops = Some(data.cast::<u32>().read_unaligned());
                }
                _ => {}
            }
            header = libc::CMSG_NXTHDR(&raw const message, header);
        }
    }
    Ok(datagram)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_short_and_flagless_datagrams() {
        let mut datagram = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
        datagram.extend_from_slice(&[0xab; 14]);
        assert_eq!(decapsulate(&datagram), Ok((42, &[0xab; 14][..])));
        assert_eq!(decapsulate(&datagram[..21]), Err(Refused::Short));
        assert_eq!(decapsulate(&[]), Err(Refused::Short));
        datagram[0] = 0x00;
        assert_eq!(decapsulate(&datagram), Err(Refused::BadFlags));
        // Reserved bits are ignored on receipt (RFC 7348).
        datagram[0] = 0xff;
        datagram[7] = 0xff;
        assert_eq!(decapsulate(&datagram).map(|(v, _)| v), Ok(42));
    }
}
