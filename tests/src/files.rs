//! Capture files: reading them back, writing them, and tshark as an independent decoder.
use std::{process::Command, time::Duration};

/// Where Debian's python3-dpkt ships its example captures (real traffic: HTTP over TCP, DNS and
/// ICMP, `PPPoE`, ARP).
pub const SHIPPED_CAPTURES: &str = "/usr/share/doc/python3-dpkt/examples/data";

/// The frames of one of the [`SHIPPED_CAPTURES`].
pub fn shipped_capture(name: &str) -> Vec<Vec<u8>> {
    let path = std::path::Path::new(SHIPPED_CAPTURES).join(name);
    assert!(
        path.exists(),
        "{}: missing (python3-dpkt ships it: run `cargo xtask setup`)",
        path.display()
    );
    pcap_frames(&path)
}

/// The frames of a pcap file, in order.
pub fn pcap_frames(file: &std::path::Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut reader = pcap_file::pcap::PcapReader::new(data.as_slice()).expect("pcap");
    let mut frames = Vec::new();
    while let Some(packet) = reader.next_packet() {
        frames.push(packet.expect("pcap packet").data.to_vec());
    }
    frames
}

/// The frames of a pcap or pcapng file, in order, with their pcapng interface names.
pub fn capture_file_frames(file: &std::path::Path) -> Vec<(Option<String>, Vec<u8>)> {
    let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    if file.extension().is_some_and(|e| e == "pcapng") {
        let mut reader = pcap_file::pcapng::PcapNgReader::new(data.as_slice()).expect("pcapng");
        let mut names = Vec::new();
        let mut frames = Vec::new();
        while let Some(block) = reader.next_block() {
            match block.expect("pcapng block") {
                pcap_file::pcapng::Block::InterfaceDescription(idb) => {
                    names.push(idb.options.iter().find_map(|o| match o {
                        pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption::IfName(n) => Some(n.to_string()),
                        _ => None,
                    }));
                }
                pcap_file::pcapng::Block::EnhancedPacket(epb) => {
                    frames.push((names[epb.interface_id as usize].clone(), epb.data.to_vec()));
                }
                _ => {}
            }
        }
        frames
    } else {
        pcap_frames(file).into_iter().map(|f| (None, f)).collect()
    }
}

/// Writes frames to a pcap file (for tshark).
pub fn write_pcap(path: &std::path::Path, frames: &[Vec<u8>]) {
    let file = std::fs::File::create(path).expect("create pcap");
    let mut writer = pcap_file::pcap::PcapWriter::new(file).expect("pcap writer");
    for frame in frames {
        writer
            .write_packet(&pcap_file::pcap::PcapPacket::new(
                Duration::ZERO,
                frame.len() as u32,
                frame,
            ))
            .expect("write pcap");
    }
}

/// One line per packet of `tshark -r FILE [-d …] -T fields -e FIELD…`, fields tab-separated.
pub fn tshark_fields(
    file: &std::path::Path,
    decode_as: Option<&str>,
    fields: &[&str],
) -> Vec<String> {
    let mut command = Command::new("tshark");
    command.arg("-r").arg(file);
    if let Some(rule) = decode_as {
        command.args(["-d", rule]);
    }
    command.args(["-T", "fields"]);
    for field in fields {
        command.args(["-e", field]);
    }
    let output = command
        .output()
        .expect("tshark (installed by cargo xtask setup)");
    assert!(
        output.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// How many whole frames a capture file that is still being written holds so far (none while
/// its header has not reached it); a block cut short would stop the count early.
pub fn frames_so_far(file: &std::path::Path) -> usize {
    let Ok(data) = std::fs::read(file) else {
        return 0;
    };
    if file.extension().is_some_and(|e| e == "pcapng") {
        let Ok(mut reader) = pcap_file::pcapng::PcapNgReader::new(data.as_slice()) else {
            return 0;
        };
        let mut frames = 0;
        while let Some(Ok(block)) = reader.next_block() {
            frames += usize::from(matches!(block, pcap_file::pcapng::Block::EnhancedPacket(_)));
        }
        frames
    } else {
        let Ok(mut reader) = pcap_file::pcap::PcapReader::new(data.as_slice()) else {
            return 0;
        };
        let mut frames = 0;
        while let Some(Ok(_)) = reader.next_packet() {
            frames += 1;
        }
        frames
    }
}
