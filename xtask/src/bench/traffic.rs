//! Load generation and measurement: an `AF_PACKET` `sendmmsg` generator with `PACKET_QDISC_BYPASS`,
//! interface counters, an idle check, and a low-priority spinner that measures how much of a CPU
//! the packet path leaves.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mirror_tests::Netns;

/// Frames per `sendmmsg` call.
const BATCH: usize = 64;

/// What one generator run did.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub packets: u64,
    pub elapsed: Duration,
}

fn set_int_option(fd: &OwnedFd, level: i32, option: i32, value: i32) -> anyhow::Result<()> {
    // SAFETY: setsockopt with an int.
    let rc =
        unsafe { libc::setsockopt(fd.as_raw_fd(), level, option, (&raw const value).cast(), 4) };
    if rc != 0 {
        bail!(
            "setsockopt({level}, {option}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A raw packet socket on `interface` of `ns` that bypasses the qdisc layer.
fn generator_socket(ns: &Netns, interface: &str) -> anyhow::Result<OwnedFd> {
    let ifindex = ns.ifindex(interface);
    let fd = ns.enter(move || {
        // SAFETY: plain socket syscalls; the descriptor is owned right away.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = i32::try_from(ifindex).unwrap_or_default();
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(fd)
        }
    })?;
    set_int_option(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)?;
    Ok(fd)
}

/// Where the generator's frames enter the node's `src0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Source {
    /// Sent from the source namespace's `eth0`, the veth peer of `src0` (`AF_PACKET`,
    /// `sendmmsg`): the whole path runs in the sender's context.
    Veth,
    /// Written to the file descriptor of `src0`, a tap in the node namespace, as a VM's frames
    /// reach its host: received on `src0` before any skb exists (tun's native XDP).
    Tap,
}

/// Sends `frame` into the node's `src0` from `source` on CPU 0 for `duration`, as fast as
/// possible or at `rate` packets per second. Bounded by time and by `max_packets`.
pub fn generate(
    lab: &mirror_tests::Lab,
    source: Source,
    frame: &[u8],
    duration: Duration,
    rate: Option<u64>,
    max_packets: u64,
) -> anyhow::Result<Sent> {
    let frame = frame.to_vec();
    let fd = match source {
        Source::Veth => generator_socket(&lab.src, "eth0")?,
        Source::Tap => lab.node.enter(|| tap_queue("src0"))?,
    };
    std::thread::spawn(move || -> anyhow::Result<Sent> {
        mirror_tests::pin_to_first_cpu();
        match source {
            Source::Veth => {
                let mut iov = vec![
                    libc::iovec {
                        iov_base: frame.as_ptr() as *mut _,
                        iov_len: frame.len()
                    };
                    BATCH
                ];
                // SAFETY: zeroed mmsghdr is valid; each points at one iovec that outlives the
                // sends.
                let mut messages: Vec<libc::mmsghdr> =
                    (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
                for (message, iov) in messages.iter_mut().zip(iov.iter_mut()) {
                    message.msg_hdr.msg_iov = iov;
                    message.msg_hdr.msg_iovlen = 1;
                }
                drive(duration, rate, max_packets, BATCH as u64, |batch| {
                    // SAFETY: `messages` holds `batch` valid headers.
                    let n = unsafe {
                        libc::sendmmsg(fd.as_raw_fd(), messages.as_mut_ptr(), batch as u32, 0)
                    };
                    u64::try_from(n).map_err(|_| std::io::Error::last_os_error())
                })
                .context("sendmmsg")
            }
            Source::Tap => drive(duration, rate, max_packets, 1, |_| {
                // SAFETY: writes `frame.len()` bytes from `frame`; a tap takes one frame a write.
                let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(1)
                }
            })
            .context("writing to the tap"),
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("generator thread panicked"))?
}

/// Calls `send_up_to` with up to `batch` frames at a time until `duration` or `max_packets`, at
/// `rate` if given; it says how many it sent. A full queue (ENOBUFS) is tried again.
fn drive(
    duration: Duration,
    rate: Option<u64>,
    max_packets: u64,
    batch: u64,
    mut send_up_to: impl FnMut(u64) -> std::io::Result<u64>,
) -> std::io::Result<Sent> {
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < max_packets {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let mut now = batch;
        if let Some(rate) = rate {
            let due = (elapsed.as_secs_f64() * rate as f64) as u64;
            if due <= sent {
                std::hint::spin_loop();
                continue;
            }
            now = now.min(due - sent);
        }
        match send_up_to(now) {
            Ok(n) => sent += n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Sent {
        packets: sent,
        elapsed: start.elapsed(),
    })
}

/// A queue of the tap `name` of the current namespace (`/dev/net/tun`, no packet information
/// header): a frame written to it is received on the tap.
fn tap_queue(name: &str) -> anyhow::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: open(2) of a NUL-terminated path; the result is checked and owned right away.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
    }
    // SAFETY: fd is new and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid; the name fits (checked) and the flags are set below.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() {
        bail!("tap name {name} is too long");
    }
    for (to, from) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *to = from.cast_signed();
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut request) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("TUNSETIFF {name}"));
    }
    Ok(fd)
}

/// (rx packets, tx packets) of an interface of a namespace.
pub fn counters(ns: &Netns, interface: &str) -> anyhow::Result<(u64, u64)> {
    let text = ns.ip(&["-s", "-j", "link", "show", "dev", interface]);
    let json: serde_json::Value = serde_json::from_str(&text).context("ip -j output")?;
    let stats = &json[0]["stats64"];
    let get = |dir: &str| {
        stats[dir]["packets"]
            .as_u64()
            .with_context(|| format!("no {dir} packets for {interface}"))
    };
    Ok((get("rx")?, get("tx")?))
}

/// Fraction of CPU time not idle across the machine over `window`.
pub fn busy_fraction(window: Duration) -> anyhow::Result<f64> {
    let read = || -> anyhow::Result<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .context("empty /proc/stat")?
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        Ok((fields.iter().sum(), idle))
    };
    let (total0, idle0) = read()?;
    std::thread::sleep(window);
    let (total1, idle1) = read()?;
    let total = total1.saturating_sub(total0).max(1);
    Ok(1.0 - idle1.saturating_sub(idle0) as f64 / total as f64)
}

/// Waits (bounded) for the machine to be idle; returns the busy fraction seen last.
pub fn wait_for_idle() -> anyhow::Result<f64> {
    let mut busy = busy_fraction(Duration::from_millis(200))?;
    for _ in 0..10 {
        if busy < 0.10 {
            break;
        }
        eprintln!(
            "bench: machine {:.0}% busy before a run; waiting",
            busy * 100.0
        );
        std::thread::sleep(Duration::from_secs(1));
        busy = busy_fraction(Duration::from_millis(200))?;
    }
    Ok(busy)
}

/// A nice-19 thread on CPU 1 that counts loop iterations: what it gets is what the packet path
/// (steered to CPU 1) left over.
pub struct Spinner {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            mirror_tests::pin_to_cpu(1);
            // SAFETY: lowers the priority of the calling thread only.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            let mut local = 0u64;
            while !s.load(Ordering::Relaxed) {
                for _ in 0..1000 {
                    local = std::hint::black_box(local + 1);
                }
                c.store(local, Ordering::Relaxed);
            }
        });
        Spinner {
            stop,
            count,
            thread: Some(thread),
        }
    }

    /// Iterations per second over `window`.
    pub fn rate_over(
        &self,
        work: impl FnOnce() -> anyhow::Result<Duration>,
    ) -> anyhow::Result<f64> {
        let before = self.count.load(Ordering::Relaxed);
        let start = Instant::now();
        work()?;
        let elapsed = start.elapsed();
        Ok((self.count.load(Ordering::Relaxed) - before) as f64 / elapsed.as_secs_f64())
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
