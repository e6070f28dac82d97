//! `run -r IN -w OUT [FILTER]`: the frames of a capture file (pcap or pcapng) that a tcpdump
//! filter selects, written to another as the agent writes its copies, as `tcpdump -r IN -w OUT
//! FILTER` does. Nothing is attached: the filter is the userspace selector of live captures,
//! which decides as the kernel rules do.
use std::{
    borrow::Cow,
    io::{BufRead, BufReader, Read},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use pcap_file::{
    DataLink,
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader, blocks::interface_description::InterfaceDescriptionOption},
};

use crate::targets::{file::PcapFile, watch::Selector};

/// The first bytes of a pcapng file (its section header block's type).
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

/// What a selection read and wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Selection {
    pub read: u64,
    pub selected: u64,
}

/// One frame of the input: its interface (a pcapng file's index, 0 in pcap), the interface's
/// name when the file gives one, and the frame.
struct Frame<'a> {
    interface: u32,
    name: Option<String>,
    timestamp: Duration,
    orig_len: u32,
    data: Cow<'a, [u8]>,
}

/// Writes the frames of `input` that `selector` selects (all of them without one) to `out`, the
/// first `count` at the most.
pub(crate) fn select(
    input: &Path,
    selector: Option<&Selector>,
    mut out: PcapFile,
    count: Option<u64>,
) -> anyhow::Result<Selection> {
    let file =
        std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let mut reader = BufReader::new(file);
    let pcapng = reader
        .fill_buf()
        .with_context(|| format!("reading {}", input.display()))?
        .starts_with(&PCAPNG_MAGIC);
    let mut selection = Selection {
        read: 0,
        selected: 0,
    };
    let mut take = |frame: Frame<'_>| -> anyhow::Result<bool> {
        selection.read += 1;
        if selector.is_none_or(|selects| selects(&frame.data)) {
            let name = frame
                .name
                .unwrap_or_else(|| format!("interface {}", frame.interface));
            out.write(
                u64::from(frame.interface),
                || name,
                frame.timestamp,
                &frame.data,
                frame.orig_len,
            )?;
            selection.selected += 1;
        }
        Ok(count.is_none_or(|count| selection.selected < count))
    };
    let context = || format!("reading {}", input.display());
    if pcapng {
        read_pcapng(reader, &mut take).with_context(context)?;
    } else {
        read_pcap(reader, &mut take).with_context(context)?;
    }
    out.finish()?;
    Ok(selection)
}

fn read_pcap(
    reader: impl Read,
    take: &mut impl FnMut(Frame<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut pcap = PcapReader::new(reader).context("not a pcap or pcapng file")?;
    ethernet(pcap.header().datalink)?;
    while let Some(packet) = pcap.next_packet() {
        let packet = packet?;
        let frame = Frame {
            interface: 0,
            name: None,
            timestamp: packet.timestamp,
            orig_len: packet.orig_len,
            data: packet.data,
        };
        if !take(frame)? {
            break;
        }
    }
    Ok(())
}

fn read_pcapng(
    reader: impl Read,
    take: &mut impl FnMut(Frame<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut pcapng = PcapNgReader::new(reader)?;
    while let Some(block) = pcapng.next_block() {
        let (interface, timestamp, orig_len, data) = match block? {
            Block::EnhancedPacket(packet) => (
                packet.interface_id,
                packet.timestamp,
                packet.original_len,
                packet.data.into_owned(),
            ),
            Block::SimplePacket(packet) => (
                0,
                Duration::ZERO,
                packet.original_len,
                packet.data.into_owned(),
            ),
            _ => continue,
        };
        let description = pcapng
            .interfaces()
            .get(interface as usize)
            .with_context(|| {
                format!("a packet of interface {interface}, which no block describes")
            })?;
        ethernet(description.linktype)?;
        let name = description.options.iter().find_map(|option| match option {
            InterfaceDescriptionOption::IfName(name) => Some(name.to_string()),
            _ => None,
        });
        let frame = Frame {
            interface,
            name,
            timestamp,
            orig_len,
            data: Cow::Owned(data),
        };
        if !take(frame)? {
            break;
        }
    }
    Ok(())
}

/// The filter reads Ethernet frames, as the hooks see them.
fn ethernet(link: DataLink) -> anyhow::Result<()> {
    anyhow::ensure!(
        link == DataLink::ETHERNET,
        "link type {link:?}: the filter reads Ethernet frames only"
    );
    Ok(())
}
