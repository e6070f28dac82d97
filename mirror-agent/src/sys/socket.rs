//! Sockets that `std` and `nix` do not open: raw IP sockets of any protocol (GRE, or IPv6 UDP
//! with a kernel-computed checksum), packet sockets bound to an interface, and the integer socket
//! options nix has no type for. Also `sendmmsg` over plain byte vectors, which nix offers only
//! through its multi-header builder.
use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use nix::sys::socket::{SockaddrLike as _, SockaddrStorage};

/// A raw socket of `family` (`AF_INET`, `AF_INET6`) for IP `protocol`, close-on-exec.
pub fn raw_socket(
    family: libc::c_int,
    protocol: libc::c_int,
    nonblocking: bool,
) -> io::Result<OwnedFd> {
    let flags = if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    socket(family, libc::SOCK_RAW | flags, protocol)
}

/// A new socket, close-on-exec.
fn socket(family: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A packet socket bound to the interface `ifindex`: what is sent on it leaves by that interface
/// as it is.
pub fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    let packet = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set make it a bind to the interface.
    let mut address: libc::sockaddr_ll = unsafe { MaybeUninit::zeroed().assume_init() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = ifindex.cast_signed();
    // SAFETY: `address` is a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            packet.as_raw_fd(),
            (&raw const address).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(packet)
}

/// Sets the integer socket option `level`/`name` to `value`.
pub fn set_int_option(
    socket: impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int, of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
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

/// Reads the integer socket option `level`/`name`.
pub fn int_option(
    socket: impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a c_int.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The datagrams the kernel dropped at `socket` because its buffer was full (`SO_MEMINFO`'s drop
/// count; 0 if the kernel does not say).
pub fn buffer_drops(socket: impl AsFd) -> u32 {
    const SK_MEMINFO_DROPS: usize = 8;
    let mut info = [0u32; 9];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc == 0 { info[SK_MEMINFO_DROPS] } else { 0 }
}

/// Sends `datagrams` on `socket` (to `destination`, for an unconnected socket) with as few
/// `sendmmsg` calls as the kernel allows. Returns how many were sent, and the first error of
/// those that were not (each failed one is skipped).
pub fn send_many(
    socket: impl AsFd,
    datagrams: &[Vec<u8>],
    destination: Option<&SockaddrStorage>,
) -> (usize, Vec<io::Error>) {
    let mut iovecs: Vec<libc::iovec> = datagrams
        .iter()
        .map(|d| libc::iovec {
            iov_base: d.as_ptr().cast_mut().cast(),
            iov_len: d.len(),
        })
        .collect();
    let mut messages: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero mmsghdr is valid; the fields set point at live buffers.
            let mut message: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            message.msg_hdr.msg_iov = iov;
            message.msg_hdr.msg_iovlen = 1;
            if let Some(address) = destination {
                message.msg_hdr.msg_name = address.as_ptr().cast_mut().cast();
                message.msg_hdr.msg_namelen = address.len();
            }
            message
        })
        .collect();
    let fd = socket.as_fd().as_raw_fd();
    let mut sent = 0;
    let mut errors = Vec::new();
    let mut at = 0;
    while at < messages.len() {
        let rest = &mut messages[at..];
        // SAFETY: sendmmsg reads `rest.len()` headers, each pointing at a live buffer.
        let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => {
                sent += n;
                at += n;
            }
            // The message at `at` failed: skip it and go on with the rest.
            _ => {
                errors.push(io::Error::last_os_error());
                at += 1;
            }
        }
    }
    (sent, errors)
}
