//! File targets: copies written to pcap and pcapng files (rotated by size when asked), or to
//! standard output. Also the pcapng stream live captures use, and the files the collector writes.
//!
//! A capture file is only ever created, never opened if it exists: `O_CREAT|O_EXCL|O_NOFOLLOW`,
//! mode 0600. So a link someone planted at its name is not followed, a file someone made in
//! advance does not receive the traffic, and nothing earlier is overwritten: a name that is
//! taken (an earlier run's file) moves the capture on to the next free number. A write that fails
//! (a full disk) is counted; the capture goes on in a new file once writing works again.
use std::{
    borrow::Cow,
    collections::HashMap,
    fs::File,
    io::{self, BufWriter},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use pcap_file::{
    DataLink, Endianness, TsResolution,
    pcap::PcapHeader,
    pcapng::{
        PcapNgBlock as _, PcapNgWriter,
        blocks::{
            enhanced_packet::EnhancedPacketBlock,
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
    },
};
use serde::Deserialize;

use super::{
    Target,
    ring::{RingCopy, SessionCounters, Sink},
};

/// The file target path that stands for standard output (pcap, for `| tshark -r -`).
pub const STDOUT: &str = "-";

/// `file = "PATH"`, or `file = { path = "PATH", rotate_bytes = N, rotate_seconds = S,
/// rotate_count = M, packet_buffered = true }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileConfig {
    /// A pcap (`.pcap`) or pcapng (`.pcapng`) file, or `-` for standard output (pcap).
    pub path: PathBuf,
    /// Start a new file (`NAME-000002.pcapng`, …) when this many bytes are written.
    pub rotate_bytes: Option<u64>,
    /// Start a new file with the first copy this many seconds after the file was started
    /// (tcpdump's `-G`).
    pub rotate_seconds: Option<u64>,
    /// With `rotate_bytes` or `rotate_seconds`: keep only the newest this many files.
    pub rotate_count: Option<u64>,
    /// Each copy goes to the file at once (tcpdump's `-U`), not at least every 100 ms.
    pub packet_buffered: bool,
}

impl<'de> Deserialize<'de> for FileConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// The table form.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            path: PathBuf,
            rotate_bytes: Option<u64>,
            rotate_seconds: Option<u64>,
            rotate_count: Option<u64>,
            #[serde(default)]
            packet_buffered: bool,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FileConfig;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a file's path, or a table `{ path = \"…\", rotate_bytes = …, rotate_seconds = …, rotate_count = … }`")
            }

            fn visit_str<E: serde::de::Error>(self, path: &str) -> Result<FileConfig, E> {
                Ok(FileConfig {
                    path: path.into(),
                    rotate_bytes: None,
                    rotate_seconds: None,
                    rotate_count: None,
                    packet_buffered: false,
                })
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FileConfig, A::Error> {
                let table = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(FileConfig {
                    path: table.path,
                    rotate_bytes: table.rotate_bytes,
                    rotate_seconds: table.rotate_seconds,
                    rotate_count: table.rotate_count,
                    packet_buffered: table.packet_buffered,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl FileConfig {
    /// Whether the copies go to standard output.
    pub fn is_stdout(&self) -> bool {
        self.path == Path::new(STDOUT)
    }

    /// When its capture goes on in a new file.
    pub fn rotation(&self) -> Rotation {
        Rotation {
            bytes: self.rotate_bytes,
            seconds: self.rotate_seconds,
            count: self.rotate_count,
        }
    }

    /// The file target, its values checked.
    pub(super) fn resolve(&self) -> Result<Target, String> {
        let path = &self.path;
        let rotation = self.rotation();
        if rotation.count.is_some() && !rotation.rotates() {
            return Err("`rotate_count` needs `rotate_bytes` or `rotate_seconds`".to_owned());
        }
        if rotation.seconds == Some(0) {
            return Err("`rotate_seconds` must be at least 1".to_owned());
        }
        if path == Path::new(STDOUT) && rotation.rotates() {
            return Err("standard output (`-`) is one stream: it is not rotated".to_owned());
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if parent.is_some_and(|p| !p.is_dir()) {
            return Err(format!(
                "the directory of `{}` does not exist",
                path.display()
            ));
        }
        Ok(Target::File(self.clone()))
    }
}

/// The files of file targets, kept open across reloads (a reload must not start a session's file
/// again) and closed when the agent stops.
#[derive(Debug, Default)]
pub struct OpenFiles(Mutex<HashMap<PathBuf, Arc<Mutex<PcapFile>>>>);

impl OpenFiles {
    /// The file of `target`: the one open already, or a new one.
    pub(super) fn open(&self, target: &FileConfig) -> anyhow::Result<SharedFile> {
        let mut files = lock(&self.0);
        if let Some(file) = files.get(&target.path) {
            return Ok(SharedFile(file.clone()));
        }
        let mut file = PcapFile::open(&target.path, target.rotation())?;
        file.packet_buffered = target.packet_buffered;
        let file = Arc::new(Mutex::new(file));
        files.insert(target.path.clone(), file.clone());
        Ok(SharedFile(file))
    }

    /// The file the target's copies go into now, when it is not the path it names: a numbered
    /// one beside it (that path was taken, or the target rotates).
    pub fn writing(&self, target: &FileConfig) -> Option<PathBuf> {
        let files = lock(&self.0);
        let file = lock(files.get(&target.path)?);
        let now = file_name(&file.path, file.sequence);
        (now != target.path).then_some(now)
    }

    /// Flushes and closes the files none of `used` is any more (all of them when it is empty).
    pub fn close_unused<'a>(
        &self,
        used: impl IntoIterator<Item = &'a Target>,
    ) -> anyhow::Result<()> {
        let used: Vec<&PathBuf> = used
            .into_iter()
            .filter_map(Target::file)
            .map(|file| &file.path)
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
        for file in closing {
            let file = Arc::try_unwrap(file)
                .map_err(|_| anyhow::anyhow!("a capture file is still in use"))?
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            file.finish()?;
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A file target's file as the ring drain writes it (the open files keep it across reloads).
pub(super) struct SharedFile(Arc<Mutex<PcapFile>>);

impl Sink for SharedFile {
    fn push(&mut self, copy: &RingCopy<'_>, counters: &SessionCounters) {
        let written = lock(&self.0).write(
            copy.interface,
            copy.interface_name,
            copy.timestamp,
            copy.frame,
            copy.orig_len,
        );
        match written {
            Ok(()) => counters.sent(1),
            Err(e) => counters.refused(1, &e),
        }
    }

    /// The ring is empty: what was written goes to the file now.
    fn flush(&mut self, _: &SessionCounters) {
        lock(&self.0).flush();
    }
}

/// When a capture goes on in a new file: by size, by time or both; and how many files it keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rotation {
    pub bytes: Option<u64>,
    pub seconds: Option<u64>,
    pub count: Option<u64>,
}

impl Rotation {
    /// Whether the capture has more than one file.
    pub fn rotates(&self) -> bool {
        self.bytes.is_some() || self.seconds.is_some()
    }
}

/// A capture's files: the format follows the file name, rotated by size or time when asked.
pub struct PcapFile {
    path: PathBuf,
    rotation: Rotation,
    /// When the file written now was started (for `Rotation::seconds`).
    started: std::time::Instant,
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
    /// Each frame goes to the file at once (tcpdump's `-U`).
    pub packet_buffered: bool,
}

impl std::fmt::Debug for PcapFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcapFile")
            .field("path", &self.path)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

/// An open capture file. Each frame's block is made whole in memory and goes into the file's
/// buffer in one piece, so the file only ever receives whole blocks (a kill leaves none torn);
/// the buffer reaches the file at least every [`FLUSH_PERIOD`] while frames come, and whenever
/// the ring drain or the collector has nothing more to write.
struct Writer {
    file: BufWriter<File>,
    format: Format,
    /// The block being made.
    block: Vec<u8>,
    flushed: Instant,
}

enum Format {
    /// pcap: the record headers in the byte order of the file's header.
    Pcap(Endianness),
    /// pcapng: the blocks as the stream makes them.
    PcapNg(PcapNgStream<Vec<u8>>),
}

/// How long written frames may wait in a file's buffer, at most, while frames come.
const FLUSH_PERIOD: Duration = Duration::from_millis(100);

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
}

/// Frames are stored whole (a tunnel datagram carries at most 64 KiB).
const SNAPLEN: u32 = 65_535;

/// How often a capture whose writes fail tries a new file.
const REOPEN_PERIOD: Duration = Duration::from_secs(1);

/// How many taken names a new file skips before it gives up (someone fills the directory).
const NAME_TRIES: u64 = 1000;

impl PcapFile {
    /// Starts a capture at `path` (rotated: `name-000001.ext` and on), or at the next free
    /// number after the highest file of this name already there.
    pub fn open(path: &Path, rotation: Rotation) -> anyhow::Result<Self> {
        // Standard output is one stream: no numbered files beside it.
        let highest = if path == Path::new(STDOUT) {
            None
        } else {
            highest_sequence(path)
        };
        let mut sink = PcapFile {
            path: path.to_owned(),
            rotation,
            started: std::time::Instant::now(),
            sequence: highest.map_or(0, |n| n + 1),
            kept: std::collections::VecDeque::new(),
            writer: None,
            last_open: std::time::Instant::now(),
            written: 0,
            write_errors: 0,
            packet_buffered: false,
        };
        if rotation.rotates() && sink.sequence == 0 {
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
                    self.started = std::time::Instant::now();
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
    /// [`PcapFile::write_errors`]; what is in the file stays readable up to the last whole frame, and
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
            if self.packet_buffered {
                self.flush();
            }
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
        let full = self
            .rotation
            .bytes
            .is_some_and(|limit| self.written >= limit);
        let old = self
            .rotation
            .seconds
            .is_some_and(|seconds| self.started.elapsed() >= Duration::from_secs(seconds));
        if full || old || self.writer.is_none() {
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
        while let Some(keep) = self.rotation.count
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

    /// Sends the frames written so far to the file. A failure (a full disk) is left for the next
    /// write to count: the frames stay in the buffer meanwhile.
    pub fn flush(&mut self) {
        if let Some(writer) = &mut self.writer {
            let _ = writer.flush();
        }
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
    /// Creates `path` afresh (see [`create_output`]) with the format's header.
    fn create(path: &Path) -> anyhow::Result<Self> {
        let mut file = BufWriter::new(create_output(path)?);
        let pcapng = path.extension().is_some_and(|e| e == "pcapng");
        let context = || format!("writing {}", path.display());
        let mut block = Vec::new();
        let format = if pcapng {
            let mut stream = PcapNgStream::new(Vec::new()).with_context(context)?;
            block = std::mem::take(stream.out());
            Format::PcapNg(stream)
        } else {
            let header = PcapHeader {
                snaplen: SNAPLEN,
                datalink: DataLink::ETHERNET,
                ts_resolution: TsResolution::NanoSecond,
                ..PcapHeader::default()
            };
            header.write_to(&mut block).with_context(context)?;
            Format::Pcap(header.endianness)
        };
        io::Write::write_all(&mut file, &block).with_context(context)?;
        io::Write::flush(&mut file).with_context(context)?;
        Ok(Writer {
            file,
            format,
            block,
            flushed: Instant::now(),
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
        self.block.clear();
        match &mut self.format {
            Format::Pcap(endianness) => {
                pcap_record(&mut self.block, *endianness, timestamp, frame, orig_len);
            }
            Format::PcapNg(stream) => {
                stream.write(interface, name, timestamp, frame, orig_len)?;
                std::mem::swap(&mut self.block, stream.out());
            }
        }
        io::Write::write_all(&mut self.file, &self.block)?;
        if self.flushed.elapsed() >= FLUSH_PERIOD {
            self.flush()?;
        }
        Ok(self.block.len() as u64)
    }

    /// Sends what the buffer holds to the file.
    fn flush(&mut self) -> anyhow::Result<()> {
        self.flushed = Instant::now();
        io::Write::flush(&mut self.file).context("flushing the capture file")
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.flush()
    }
}

/// A pcap record of `frame` (its header and the bytes), the header's words in `endianness`;
/// timestamps in nanoseconds, as the file's header says.
fn pcap_record(
    out: &mut Vec<u8>,
    endianness: Endianness,
    timestamp: Duration,
    frame: &[u8],
    orig_len: u32,
) {
    let seconds = u32::try_from(timestamp.as_secs()).unwrap_or(u32::MAX);
    for word in [
        seconds,
        timestamp.subsec_nanos(),
        frame.len() as u32,
        orig_len,
    ] {
        out.extend_from_slice(&match endianness {
            Endianness::Big => word.to_be_bytes(),
            Endianness::Little => word.to_le_bytes(),
        });
    }
    out.extend_from_slice(frame);
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
    fn by_size(bytes: u64, count: u64) -> Rotation {
        Rotation {
            bytes: Some(bytes),
            seconds: None,
            count: Some(count),
        }
    }

    /// numbering goes on after what is there.
    #[test]
    fn files_are_created_afresh_and_numbered_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cap.pcap");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").expect("write");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        std::fs::write(dir.path().join("cap-000001.pcap"), b"someone else's").expect("write");
        let sink = PcapFile::open(&path, Rotation::default()).expect("open");
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
        let rotated = PcapFile::open(&path, by_size(1, 2)).expect("open");
        assert_eq!(rotated.sequence, 3);
    }

    /// A rotated file someone else removed is no reason to stop: the capture goes on, and the
    /// newest `rotate_count` files are kept.
    #[test]
    fn a_rotated_file_removed_by_someone_else_is_passed_over() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cap.pcap");
        let mut sink = PcapFile::open(&path, by_size(1, 2)).expect("open");
        let write = |sink: &mut PcapFile| {
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
