//! Where copies are written or sent in userspace: pcap and pcapng files (rotated by size when
//! asked) and packet sockets that send frames out of an interface as they are. Used by the
//! collector and by the agent for the copies that come through the ring buffer.
use std::{
    borrow::Cow,
    ffi::CString,
    fs::File,
    io::{self, BufWriter},
    mem::MaybeUninit,
    os::fd::{FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use pcap_file::{
    DataLink, TsResolution,
    pcap::{PcapHeader, PcapPacket, PcapWriter},
    pcapng::{
        PcapNgBlock as _, PcapNgWriter,
        blocks::{
            enhanced_packet::EnhancedPacketBlock,
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
    },
};

/// A packet socket that sends frames out of `interface` as they are.
pub fn open_tap(interface: &str) -> anyhow::Result<OwnedFd> {
    let name = CString::new(interface).context("interface name")?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("--tap: interface `{interface}` does not exist");
    }
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening a packet socket");
    }
    // SAFETY: fd is a new socket owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set make it a bind to the interface.
    let mut address: libc::sockaddr_ll = unsafe { MaybeUninit::zeroed().assume_init() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = ifindex.cast_signed();
    // SAFETY: `address` is a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&raw const address).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("binding to {interface}"));
    }
    Ok(socket)
}

pub fn send_frame(fd: RawFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: send reads `frame.len()` bytes of `frame`.
    let sent = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), 0) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sends `datagrams` on `fd` (to `destination`, for an unconnected socket) with as few `sendmmsg`
/// calls as the kernel allows. Returns how many were sent, and the first error of those that were
/// not (each failed one is skipped).
pub fn send_many(
    fd: RawFd,
    datagrams: &[Vec<u8>],
    destination: Option<&(libc::sockaddr_storage, libc::socklen_t)>,
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
            if let Some((address, len)) = destination {
                message.msg_hdr.msg_name = std::ptr::from_ref(address).cast_mut().cast();
                message.msg_hdr.msg_namelen = *len;
            }
            message
        })
        .collect();
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

/// The capture files: the format follows the file name, rotated by size when asked.
pub struct Sink {
    path: PathBuf,
    rotate_bytes: Option<u64>,
    rotate_count: Option<u64>,
    sequence: u64,
    writer: Writer,
    written: u64,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("path", &self.path)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

enum Writer {
    Pcap(PcapWriter<BufWriter<File>>),
    /// With the keys of the interfaces that have a description block in this file, by id.
    PcapNg(PcapNgWriter<BufWriter<File>>, Vec<u64>),
}

/// Frames are stored whole (a tunnel datagram carries at most 64 KiB).
const SNAPLEN: u32 = 65_535;

impl Sink {
    pub fn open(
        path: &Path,
        rotate_bytes: Option<u64>,
        rotate_count: Option<u64>,
    ) -> anyhow::Result<Self> {
        let sequence = u64::from(rotate_bytes.is_some());
        let first = file_name(path, sequence);
        Ok(Sink {
            path: path.to_owned(),
            rotate_bytes,
            rotate_count,
            sequence,
            writer: Writer::create(&first)?,
            written: 0,
        })
    }

    /// Writes a frame seen on `interface` (a key; `name` describes it in a pcapng file) whose
    /// first `frame.len()` of `orig_len` bytes were kept.
    pub fn write(
        &mut self,
        interface: u64,
        name: impl FnOnce() -> String,
        timestamp: Duration,
        frame: &[u8],
        orig_len: u32,
    ) -> anyhow::Result<()> {
        if self.rotate_bytes.is_some_and(|limit| self.written >= limit) {
            self.rotate()?;
        }
        self.written += self
            .writer
            .write(interface, name, timestamp, frame, orig_len)?;
        Ok(())
    }

    fn rotate(&mut self) -> anyhow::Result<()> {
        self.sequence += 1;
        let next = Writer::create(&file_name(&self.path, self.sequence))?;
        std::mem::replace(&mut self.writer, next).finish()?;
        self.written = 0;
        if let Some(keep) = self.rotate_count
            && self.sequence > keep
        {
            let old = file_name(&self.path, self.sequence - keep);
            std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    }

    pub fn finish(self) -> anyhow::Result<()> {
        self.writer.finish()
    }
}

/// `dir/name.ext` itself for sequence 0, else `dir/name-00000N.ext`.
fn file_name(path: &Path, sequence: u64) -> PathBuf {
    if sequence == 0 {
        return path.to_owned();
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{sequence:06}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{sequence:06}"),
    };
    path.with_file_name(name)
}

impl Writer {
    fn create(path: &Path) -> anyhow::Result<Self> {
        let file = BufWriter::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        let pcapng = path.extension().is_some_and(|e| e == "pcapng");
        let context = || format!("writing {}", path.display());
        Ok(if pcapng {
            Writer::PcapNg(PcapNgWriter::new(file).with_context(context)?, Vec::new())
        } else {
            let header = PcapHeader {
                snaplen: SNAPLEN,
                datalink: DataLink::ETHERNET,
                ts_resolution: TsResolution::NanoSecond,
                ..PcapHeader::default()
            };
            Writer::Pcap(PcapWriter::with_header(file, header).with_context(context)?)
        })
    }

    /// Writes one frame; returns the bytes it took in the file.
    fn write(
        &mut self,
        interface: u64,
        name: impl FnOnce() -> String,
        timestamp: Duration,
        frame: &[u8],
        orig_len: u32,
    ) -> anyhow::Result<u64> {
        let written = match self {
            Writer::Pcap(w) => w.write_packet(&PcapPacket::new(timestamp, orig_len, frame))?,
            Writer::PcapNg(w, interfaces) => {
                let mut written = 0;
                let interface_id = if let Some(id) = interfaces.iter().position(|i| *i == interface)
                {
                    id
                } else {
                    let description = InterfaceDescriptionBlock {
                        linktype: DataLink::ETHERNET,
                        snaplen: SNAPLEN,
                        options: vec![
                            InterfaceDescriptionOption::IfName(Cow::Owned(name())),
                            // Timestamps in nanoseconds (the default is microseconds).
                            InterfaceDescriptionOption::IfTsResol(9),
                        ],
                    };
                    written += w.write_block(&description.into_block())?;
                    interfaces.push(interface);
                    interfaces.len() - 1
                };
                let packet = EnhancedPacketBlock {
                    interface_id: interface_id as u32,
                    timestamp,
                    original_len: orig_len,
                    data: Cow::Borrowed(frame),
                    options: Vec::new(),
                };
                written + w.write_block(&packet.into_block())?
            }
        };
        Ok(written as u64)
    }

    fn finish(self) -> anyhow::Result<()> {
        let mut file = match self {
            Writer::Pcap(w) => w.into_writer(),
            Writer::PcapNg(w, _) => w.into_inner(),
        };
        io::Write::flush(&mut file).context("flushing the capture file")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_file_names() {
        let path = Path::new("/tmp/cap.pcapng");
        assert_eq!(file_name(path, 0), path);
        assert_eq!(file_name(path, 3), Path::new("/tmp/cap-000003.pcapng"));
        assert_eq!(file_name(Path::new("x"), 12), Path::new("x-000012"));
    }
}
