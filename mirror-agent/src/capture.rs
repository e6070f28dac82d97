//! Where copies are written or sent in userspace: pcap and pcapng files (rotated by size when
//! asked) and packet sockets that send frames out of an interface as they are. Used by the
//! collector and by the agent for the copies that come through the ring buffer.
//!
//! A capture file is only ever created, never opened if it exists: `O_CREAT|O_EXCL|O_NOFOLLOW`,
//! mode 0600. So a link someone planted at its name is not followed, a file someone made in
//! advance does not receive the traffic, and nothing earlier is overwritten: a name that is
//! taken (an earlier run's file) moves the capture on to the next free number. A write that fails
//! (a full disk) is counted; the capture goes on in a new file once writing works again.
use std::{
    borrow::Cow,
    fs::File,
    io::{self, BufWriter},
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::sys::socket::MsgFlags;
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

use crate::config::STDOUT;

/// A packet socket that sends frames out of `interface` as they are.
pub fn open_tap(interface: &str) -> anyhow::Result<OwnedFd> {
    let Ok(ifindex) = nix::net::if_::if_nametoindex(interface) else {
        bail!("--tap: interface `{interface}` does not exist");
    };
    crate::sys::socket::packet_socket(ifindex)
        .with_context(|| format!("opening a packet socket on {interface}"))
}

pub fn send_frame(socket: impl AsFd, frame: &[u8]) -> io::Result<()> {
    nix::sys::socket::send(socket.as_fd().as_raw_fd(), frame, MsgFlags::empty())?;
    Ok(())
}

/// The capture files: the format follows the file name, rotated by size when asked.
pub struct Sink {
    path: PathBuf,
    rotate_bytes: Option<u64>,
    rotate_count: Option<u64>,
    /// The number of the file written now (0: the path itself).
    sequence: u64,
    /// The numbers of this capture's files still on disk, oldest first (for `rotate_count`).
    kept: std::collections::VecDeque<u64>,
    /// `None` after a write failed: the next write starts a new file (at most once per
    /// [`REOPEN_PERIOD`]).
    writer: Option<Writer>,
    last_open: std::time::Instant,
    written: u64,
    /// Frames not written because writing failed.
    pub write_errors: u64,
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
    PcapNg(PcapNgStream<BufWriter<File>>),
}

/// A pcapng stream: a section header, then an interface description block the first time an
/// interface (by key) has a frame, and each frame in an enhanced packet block.
pub struct PcapNgStream<W: io::Write> {
    writer: PcapNgWriter<W>,
    /// The ids of the interfaces described so far, by key.
    interfaces: std::collections::HashMap<u64, u32>,
}

impl<W: io::Write> PcapNgStream<W> {
    /// Writes the section header to `out`.
    pub fn new(out: W) -> anyhow::Result<Self> {
        Ok(PcapNgStream {
            writer: PcapNgWriter::new(out).context("writing a pcapng section header")?,
            interfaces: std::collections::HashMap::new(),
        })
    }

    /// Writes a frame seen on `interface` (`name` describes it), of which `frame` was kept of
    /// `orig_len` bytes; the bytes written.
    pub fn write(
        &mut self,
        interface: u64,
        name: impl FnOnce() -> String,
        timestamp: Duration,
        frame: &[u8],
        orig_len: u32,
    ) -> anyhow::Result<usize> {
        let mut written = 0;
        let interface_id = if let Some(id) = self.interfaces.get(&interface) {
            *id
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
            written += self.writer.write_block(&description.into_block())?;
            let id = self.interfaces.len() as u32;
            self.interfaces.insert(interface, id);
            id
        };
        let packet = EnhancedPacketBlock {
            interface_id,
            timestamp,
            original_len: orig_len,
            data: Cow::Borrowed(frame),
            options: Vec::new(),
        };
        Ok(written + self.writer.write_block(&packet.into_block())?)
    }

    /// Where the blocks go.
    pub fn out(&mut self) -> &mut W {
        self.writer.get_mut()
    }

    fn into_inner(self) -> W {
        self.writer.into_inner()
    }
}

/// Frames are stored whole (a tunnel datagram carries at most 64 KiB).
const SNAPLEN: u32 = 65_535;

/// How often a capture whose writes fail tries a new file.
const REOPEN_PERIOD: Duration = Duration::from_secs(1);

/// How many taken names a new file skips before it gives up (someone fills the directory).
const NAME_TRIES: u64 = 1000;

impl Sink {
    /// Starts a capture at `path` (rotated: `name-000001.ext` and on), or at the next free
    /// number after the highest file of this name already there.
    pub fn open(
        path: &Path,
        rotate_bytes: Option<u64>,
        rotate_count: Option<u64>,
    ) -> anyhow::Result<Self> {
        // Standard output is one stream: no numbered files beside it.
        let highest = if path == Path::new(STDOUT) {
            None
        } else {
            highest_sequence(path)
        };
        let mut sink = Sink {
            path: path.to_owned(),
            rotate_bytes,
            rotate_count,
            sequence: highest.map_or(0, |n| n + 1),
            kept: std::collections::VecDeque::new(),
            writer: None,
            last_open: std::time::Instant::now(),
            written: 0,
            write_errors: 0,
        };
        if rotate_bytes.is_some() && sink.sequence == 0 {
            sink.sequence = 1;
        }
        sink.writer = Some(sink.create()?);
        if highest.is_some() {
            tracing::info!(
                "{} is taken: the capture goes on in {}",
                path.display(),
                file_name(path, sink.sequence).display()
            );
        }
        Ok(sink)
    }

    /// Creates the file of the current number, or of the next free one.
    fn create(&mut self) -> anyhow::Result<Writer> {
        let mut tries = 0;
        loop {
            let path = file_name(&self.path, self.sequence);
            match Writer::create(&path) {
                Ok(writer) => {
                    self.kept.push_back(self.sequence);
                    self.written = 0;
                    return Ok(writer);
                }
                Err(e)
                    if tries < NAME_TRIES
                        && e.downcast_ref::<io::Error>()
                            .is_some_and(|e| e.kind() == io::ErrorKind::AlreadyExists) =>
                {
                    tracing::warn!("{} exists (not ours): skipping it", path.display());
                    self.sequence += 1;
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes a frame seen on `interface` (a key; `name` describes it in a pcapng file) whose
    /// first `frame.len()` of `orig_len` bytes were kept. A failure is counted in
    /// [`Sink::write_errors`]; what is in the file stays readable up to the last whole frame, and
    /// the next write starts a new file.
    pub fn write(
        &mut self,
        interface: u64,
        name: impl FnOnce() -> String,
        timestamp: Duration,
        frame: &[u8],
        orig_len: u32,
    ) -> anyhow::Result<()> {
        let written = self
            .current()
            .and_then(|writer| writer.write(interface, name, timestamp, frame, orig_len));
        if let Ok(bytes) = written {
            self.written += bytes;
        } else {
            self.write_errors += 1;
            if let Some(broken) = self.writer.take() {
                let _ = broken.finish();
            }
        }
        written.map(drop)
    }

    /// The file to write to now: a new one when this one is full or writing failed.
    fn current(&mut self) -> anyhow::Result<&mut Writer> {
        let full = self.rotate_bytes.is_some_and(|limit| self.written >= limit);
        if full || self.writer.is_none() {
            self.next_file()?;
        }
        self.writer.as_mut().context("no capture file is open")
    }

    /// Closes the file written now (if any) and starts the next number, no sooner than
    /// [`REOPEN_PERIOD`] after the last try when writing failed. Old files past `rotate_count`
    /// are removed.
    fn next_file(&mut self) -> anyhow::Result<()> {
        if self.writer.is_none() && self.last_open.elapsed() < REOPEN_PERIOD {
            bail!("writing {} failed a moment ago", self.path.display());
        }
        self.last_open = std::time::Instant::now();
        if let Some(done) = self.writer.take() {
            done.finish()?;
        }
        self.sequence += 1;
        self.writer = Some(self.create()?);
        while let Some(keep) = self.rotate_count
            && self.kept.len() as u64 > keep
            && let Some(old) = self.kept.pop_front()
        {
            let old = file_name(&self.path, old);
            // Someone else may have removed it: that is no reason to stop capturing.
            if let Err(e) = std::fs::remove_file(&old)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!("removing {}: {e}", old.display());
            }
        }
        Ok(())
    }

    /// Flushes the file written now.
    pub fn finish(self) -> anyhow::Result<()> {
        self.writer.map_or(Ok(()), Writer::finish)
    }
}

/// The highest number among the files of `path`'s name already there (0 for the path itself),
/// `None` when there is none.
fn highest_sequence(path: &Path) -> Option<u64> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let taken = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| sequence_of(path, Path::new(&entry.file_name())));
    taken.max()
}

/// The number `name` has as one of `path`'s files (see [`file_name`]).
fn sequence_of(path: &Path, name: &Path) -> Option<u64> {
    if Some(name.as_os_str()) == path.file_name() {
        return Some(0);
    }
    let stem = path.file_stem()?.to_str()?;
    let name = name.to_str()?;
    let rest = name.strip_prefix(stem)?.strip_prefix('-')?;
    let digits = match path.extension() {
        Some(ext) => rest.strip_suffix(ext.to_str()?)?.strip_suffix('.')?,
        None => rest,
    };
    (digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
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

/// Standard output for [`STDOUT`]; else `path` created afresh: never an existing file, never
/// through a link, root-only. An existing name fails with `AlreadyExists`.
pub fn create_output(path: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if path == Path::new(STDOUT) {
        // A second handle on fd 1: Rust's own `Stdout` buffers by line, which splits frames.
        let fd = std::os::fd::AsFd::as_fd(&std::io::stdout())
            .try_clone_to_owned()
            .context("standard output")?;
        return Ok(File::from(fd));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

impl Writer {
    /// Creates `path` afresh (see [`create_output`]).
    fn create(path: &Path) -> anyhow::Result<Self> {
        let file = BufWriter::new(create_output(path)?);
        let pcapng = path.extension().is_some_and(|e| e == "pcapng");
        let context = || format!("writing {}", path.display());
        Ok(if pcapng {
            Writer::PcapNg(PcapNgStream::new(file).with_context(context)?)
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
            Writer::PcapNg(stream) => stream.write(interface, name, timestamp, frame, orig_len)?,
        };
        Ok(written as u64)
    }

    fn finish(self) -> anyhow::Result<()> {
        let mut file = match self {
            Writer::Pcap(w) => w.into_writer(),
            Writer::PcapNg(stream) => stream.into_inner(),
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

    #[test]
    fn numbers_of_a_capture_s_files() {
        let path = Path::new("/tmp/cap.pcapng");
        for (name, number) in [
            ("cap.pcapng", Some(0)),
            ("cap-000003.pcapng", Some(3)),
            ("cap-123456.pcapng", Some(123_456)),
            ("cap-00003.pcapng", None),
            ("cap-00000x.pcapng", None),
            ("cap-000003.pcap", None),
            ("cap.pcap", None),
            ("capx-000003.pcapng", None),
            ("other-000003.pcapng", None),
        ] {
            assert_eq!(sequence_of(path, Path::new(name)), number, "{name}");
        }
        assert_eq!(sequence_of(Path::new("x"), Path::new("x-000012")), Some(12));
    }

    /// Files are created root-only, never over an existing name or through a link, and the
    /// numbering goes on after what is there.
    #[test]
    fn files_are_created_afresh_and_numbered_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cap.pcap");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").expect("write");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        std::fs::write(dir.path().join("cap-000001.pcap"), b"someone else's").expect("write");
        let sink = Sink::open(&path, None, None).expect("open");
        sink.finish().expect("finish");
        assert_eq!(
            std::fs::read(&victim).expect("read"),
            b"keep",
            "the link not followed"
        );
        let created = dir.path().join("cap-000002.pcap");
        let meta = std::fs::metadata(&created).expect("the capture goes on after 1");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        // A rotated capture started again goes on after the highest number.
        let rotated = Sink::open(&path, Some(1), Some(2)).expect("open");
        assert_eq!(rotated.sequence, 3);
    }

    /// A rotated file someone else removed is no reason to stop: the capture goes on, and the
    /// newest `rotate_count` files are kept.
    #[test]
    fn a_rotated_file_removed_by_someone_else_is_passed_over() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cap.pcap");
        let mut sink = Sink::open(&path, Some(1), Some(2)).expect("open");
        let write = |sink: &mut Sink| {
            sink.write(1, String::new, Duration::ZERO, &[0; 60], 60)
                .expect("written");
        };
        write(&mut sink);
        write(&mut sink);
        std::fs::remove_file(dir.path().join("cap-000001.pcap")).expect("someone removes it");
        for _ in 0..3 {
            write(&mut sink);
        }
        sink.finish().expect("finish");
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        assert_eq!(names, ["cap-000004.pcap", "cap-000005.pcap"]);
    }
}
