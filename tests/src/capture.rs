//! `AF_PACKET` captures and senders, and comparing what was captured.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Instant,
};

use etherparse::{LaxSlicedPacket, TransportSlice};

use super::{DEADLINE, Netns, SENTINEL_PORT, pin_to_first_cpu, udp_v4_frame};

/// A frame captured by a packet socket, with any VLAN tag the kernel held in metadata put back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frame {
    pub bytes: Vec<u8>,
    /// Sent by this host (`PACKET_OUTGOING`) rather than received.
    pub outgoing: bool,
}

/// An `AF_PACKET` socket on one interface of a namespace, seeing every frame in both directions.
#[derive(Debug)]
pub struct Capture {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

fn packet_socket(ns: &Netns, interface: &str) -> OwnedFd {
    let ifindex = ns.ifindex(interface);
    ns.enter(move || {
        // SAFETY: plain socket syscalls on a descriptor we own.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from(ETH_P_ALL.to_be()),
            );
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETH_P_ALL.to_be();
            addr.sll_ifindex = i32::try_from(ifindex).expect("ifindex");
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                rc,
                0,
                "bind packet socket: {}",
                std::io::Error::last_os_error()
            );
            fd
        }
    })
}

impl Capture {
    pub fn open(ns: &Netns, interface: &str) -> Self {
        let fd = packet_socket(ns, interface);
        let one: i32 = 1;
        // SAFETY: setsockopt with an int option.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                (&raw const one).cast(),
                4,
            )
        };
        assert_eq!(rc, 0, "PACKET_AUXDATA");
        // Room for every frame of a test, read only after the traffic: a full socket buffer drops.
        let bytes: i32 = 64 << 20;
        // SAFETY: as above.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const bytes).cast(),
                4,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE");
        Capture { fd }
    }

    /// Next frame, waiting until `deadline`.
    fn next(&self, deadline: Instant) -> Option<Frame> {
        loop {
            if let Some(frame) = self.try_recv() {
                return Some(frame);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd.
            unsafe { libc::poll(&raw mut poll, 1, left.as_millis().min(1000) as i32) };
        }
    }

    fn try_recv(&self) -> Option<Frame> {
        let mut buf = vec![0u8; 65_600];
        let mut control = [0u64; 16];
        // SAFETY: sockaddr_ll is plain integers, valid all zero.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr points at live buffers for the duration of recvmsg.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut addr).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        // SAFETY: as above.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &raw mut msg, libc::MSG_TRUNC) };
        buf.truncate(usize::try_from(n).ok()?);
        // SAFETY: walking the control messages the kernel wrote into `control`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_PACKET
                    && (*cmsg).cmsg_type == libc::PACKET_AUXDATA
                {
                    let aux = libc::CMSG_DATA(cmsg)
                        .cast::<libc::tpacket_auxdata>()
                        .read_unaligned();
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                            aux.tp_vlan_tpid
                        } else {
                            0x8100
                        };
                        let tag = [tpid.to_be_bytes(), aux.tp_vlan_tci.to_be_bytes()].concat();
                        buf.splice(12..12, tag);
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
            }
        }
        Some(Frame {
            bytes: buf,
            outgoing: addr.sll_pkttype == libc::PACKET_OUTGOING,
        })
    }

    /// Every frame that arrives before the sentinel (which is consumed), in order.
    pub fn until_sentinel(&self) -> Vec<Frame> {
        let mut frames = self.until_nth(1, is_sentinel);
        frames.pop();
        frames
    }

    /// Every frame up to and including the `n`th one that satisfies `last`, in order.
    pub fn until_nth(&self, n: usize, last: impl Fn(&[u8]) -> bool) -> Vec<Frame> {
        let deadline = Instant::now() + DEADLINE;
        let mut frames = Vec::new();
        let mut seen = 0;
        while seen < n {
            let frame = self.next(deadline).unwrap_or_else(|| {
                panic!(
                    "only {seen} of {n} closing frame(s) within {DEADLINE:?}; got {} frame(s): {:?}",
                    frames.len(),
                    summarize(&frames)
                )
            });
            if last(&frame.bytes) {
                seen += 1;
            }
            frames.push(frame);
        }
        frames
    }

    /// The bytes of every frame received (not sent by the capture's own namespace) before the
    /// sentinel.
    pub fn received_until_sentinel(&self) -> Vec<Vec<u8>> {
        self.until_sentinel()
            .into_iter()
            .filter(|f| !f.outgoing)
            .map(|f| f.bytes)
            .collect()
    }

    /// The bytes of every frame that arrives before the sentinel.
    pub fn bytes_until_sentinel(&self) -> Vec<Vec<u8>> {
        self.until_sentinel().into_iter().map(|f| f.bytes).collect()
    }

    /// Every frame queued now, without waiting.
    pub fn drain(&self) -> Vec<Frame> {
        std::iter::from_fn(|| self.try_recv()).collect()
    }
}

/// Sends raw Ethernet frames out of an interface of a namespace (bypassing nothing: they traverse
/// the interface's TC egress hook).
#[derive(Debug)]
pub struct FrameSender {
    fd: OwnedFd,
}

impl FrameSender {
    pub fn open(ns: &Netns, interface: &str) -> Self {
        FrameSender {
            fd: packet_socket(ns, interface),
        }
    }

    /// Sends the sentinel as a raw UDP frame between these MAC addresses.
    pub fn send_sentinel(&self, src_mac: &str, dst_mac: &str) {
        self.send(&udp_v4_frame(src_mac, dst_mac, SENTINEL_PORT, b"sentinel"));
    }

    pub fn send(&self, frame: &[u8]) {
        pin_to_first_cpu();
        // SAFETY: send on a bound packet socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            isize::try_from(frame.len()).expect("frame length"),
            "send frame: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The L3/L4 summary of a frame, for test oracles and failure messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub proto: Option<u8>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

impl Flow {
    pub fn of(frame: &[u8]) -> Flow {
        let mut flow = Flow {
            src: None,
            dst: None,
            proto: None,
            src_port: None,
            dst_port: None,
        };
        let Ok(packet) = LaxSlicedPacket::from_ethernet(frame) else {
            return flow;
        };
        match &packet.net {
            Some(etherparse::LaxNetSlice::Ipv4(ip)) => {
                flow.src = Some(ip.header().source_addr().into());
                flow.dst = Some(ip.header().destination_addr().into());
                flow.proto = Some(ip.header().protocol().0);
            }
            Some(etherparse::LaxNetSlice::Ipv6(ip)) => {
                flow.src = Some(ip.header().source_addr().into());
                flow.dst = Some(ip.header().destination_addr().into());
                flow.proto = Some(ip.payload().ip_number.0);
            }
            _ => {}
        }
        match &packet.transport {
            Some(TransportSlice::Udp(udp)) => {
                flow.src_port = Some(udp.source_port());
                flow.dst_port = Some(udp.destination_port());
            }
            Some(TransportSlice::Tcp(tcp)) => {
                flow.src_port = Some(tcp.source_port());
                flow.dst_port = Some(tcp.destination_port());
            }
            _ => {}
        }
        flow
    }
}

/// Whether a frame is one of the kernel's own `MLDv2` reports (to `ff02::16`), which a link sends
/// for a while after it comes up: never a copy.
pub fn is_mld_report(frame: &[u8]) -> bool {
    frame.starts_with(&[0x33, 0x33, 0, 0, 0, 0x16])
}

/// Whether `frame` is the sentinel datagram.
pub fn is_sentinel(frame: &[u8]) -> bool {
    let flow = Flow::of(frame);
    flow.proto == Some(17) && flow.dst_port == Some(SENTINEL_PORT)
}

fn summarize(frames: &[Frame]) -> Vec<Flow> {
    frames.iter().map(|f| Flow::of(&f.bytes)).collect()
}

/// Asserts two frame multisets are equal, with a readable diff on failure.
pub fn assert_same_frames(what: &str, mut copies: Vec<Vec<u8>>, mut expected: Vec<Vec<u8>>) {
    copies.sort();
    expected.sort();
    if copies != expected {
        let missing: Vec<_> = expected
            .iter()
            .filter(|f| !copies.contains(f))
            .map(|f| Flow::of(f))
            .collect();
        let extra: Vec<_> = copies
            .iter()
            .filter(|f| !expected.contains(f))
            .map(|f| Flow::of(f))
            .collect();
        panic!(
            "{what}: {} copies, {} expected\nmissing: {missing:?}\nextra: {extra:?}",
            copies.len(),
            expected.len()
        );
    }
}

/// A UDP socket bound in a namespace.
pub fn udp_socket(ns: &Netns, bind: SocketAddr) -> UdpSocket {
    ns.enter(move || {
        let socket = UdpSocket::bind(bind).expect("bind udp");
        socket.set_read_timeout(Some(DEADLINE)).expect("timeout");
        socket
    })
}

/// Keeps only the frames whose flow satisfies `keep`.
pub fn select(frames: &[Frame], keep: impl Fn(&Flow, &Frame) -> bool) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter(|f| keep(&Flow::of(&f.bytes), f))
        .map(|f| f.bytes.clone())
        .collect()
}
