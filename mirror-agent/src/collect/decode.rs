//! What the collector takes from a received datagram or GRE packet: which tunnel stream it
//! belongs to, its inner Ethernet frame, and its ERSPAN sequence number. Pure functions: every
//! malformed input is a [`Refused`], never a panic. Of the VXLAN flags only "I" (the VNI is
//! valid) is looked at; the others are ignored on receipt, as RFC 7348 says.
use crate::encap::{
    GRE_KEY, GRE_SEQUENCE, PROTOCOL_ERSPAN2, PROTOCOL_ERSPAN3, PROTOCOL_ETHERNET, VXLAN_FLAG_VNI,
};

/// A tunnel stream: the format and the identifier a sender tells its sessions apart by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Vxlan(u32),
    Geneve(u32),
    Gre(Option<u32>),
    Erspan(u16),
}

impl Stream {
    /// The stream's name in the summary: `vxlan:7`, `geneve:7`, `gre`, `gre:5`, `erspan:3`.
    pub fn label(self) -> String {
        match self {
            Stream::Vxlan(vni) => format!("vxlan:{vni}"),
            Stream::Geneve(vni) => format!("geneve:{vni}"),
            Stream::Gre(None) => "gre".to_owned(),
            Stream::Gre(Some(key)) => format!("gre:{key}"),
            Stream::Erspan(session) => format!("erspan:{session}"),
        }
    }

    /// The pcapng interface the stream's frames are written to.
    pub fn interface_name(self) -> String {
        match self {
            Stream::Vxlan(vni) => format!("vni {vni}"),
            Stream::Geneve(vni) => format!("geneve vni {vni}"),
            Stream::Gre(None) => "gre".to_owned(),
            Stream::Gre(Some(key)) => format!("gre key {key}"),
            Stream::Erspan(session) => format!("erspan session {session}"),
        }
    }

    /// A key that tells streams apart in one number (the capture file's interface key).
    pub fn key(self) -> u64 {
        match self {
            Stream::Vxlan(vni) => 1 << 40 | u64::from(vni),
            Stream::Geneve(vni) => 2 << 40 | u64::from(vni),
            Stream::Gre(Some(key)) => 3 << 40 | u64::from(key),
            Stream::Gre(None) => 4 << 40,
            Stream::Erspan(session) => 5 << 40 | u64::from(session),
        }
    }

    /// The identifier the collector's filters compare: VNI, GRE key or ERSPAN session id.
    pub fn id(self) -> Option<u32> {
        match self {
            Stream::Vxlan(vni) | Stream::Geneve(vni) => Some(vni),
            Stream::Gre(key) => key,
            Stream::Erspan(session) => Some(u32::from(session)),
        }
    }
}

/// A datagram's stream, inner frame and ERSPAN sequence number.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub stream: Stream,
    pub frame: &'a [u8],
    pub sequence: Option<u32>,
}

/// Why a datagram is not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Shorter than its headers and an Ethernet header.
    Short,
    /// A header this collector does not take (flags, version, protocol).
    BadFlags,
}

const ETHERNET_HEADER_LEN: usize = 14;
const VXLAN_HEADER_LEN: usize = 8;
const GENEVE_HEADER_LEN: usize = 8;
const GRE_CHECKSUM: u8 = 0x80;
/// RFC 1701's routing present, strict source route and recursion control bits, which an RFC 2784
/// receiver discards a packet for (as Linux does): their fields would shift everything after.
const GRE_RFC1701_ONLY: u8 = 0x40 | 0x08 | 0x07;
const GRE_VERSION_MASK: u8 = 0x07;
/// GENEVE (RFC 8926): a control message (`O`), whose payload is never forwarded, and critical
/// options (`C`), which a receiver that does not process options must drop the packet for.
const GENEVE_CONTROL_OR_CRITICAL: u8 = 0xc0;
const ERSPAN2_HEADER_LEN: usize = 8;
const ERSPAN3_HEADER_LEN: usize = 12;
/// ERSPAN type III: an 8-byte platform-specific subheader follows (the `O` bit).
const ERSPAN3_SUBHEADER: u8 = 0x01;
const ERSPAN3_SUBHEADER_LEN: usize = 8;

/// `rest` from `at`, holding at least an Ethernet header.
fn frame_at(packet: &[u8], at: usize) -> Result<&[u8], Refused> {
    packet
        .get(at..)
        .filter(|frame| frame.len() >= ETHERNET_HEADER_LEN)
        .ok_or(Refused::Short)
}

fn u16_at(packet: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([packet[at], packet[at + 1]])
}

fn u32_at(packet: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([packet[at], packet[at + 1], packet[at + 2], packet[at + 3]])
}

/// A VXLAN datagram's payload (RFC 7348).
pub fn vxlan(datagram: &[u8]) -> Result<Decoded<'_>, Refused> {
    let frame = frame_at(datagram, VXLAN_HEADER_LEN)?;
    if datagram[0] & VXLAN_FLAG_VNI == 0 {
        return Err(Refused::BadFlags);
    }
    Ok(Decoded {
        stream: Stream::Vxlan(u32_at(datagram, 4) >> 8),
        frame,
        sequence: None,
    })
}

/// A GENEVE datagram's payload (RFC 8926): version 0, options skipped, Ethernet inside.
pub fn geneve(datagram: &[u8]) -> Result<Decoded<'_>, Refused> {
    if datagram.len() < GENEVE_HEADER_LEN {
        return Err(Refused::Short);
    }
    let options = usize::from(datagram[0] & 0x3f) * 4;
    if datagram[0] >> 6 != 0
        || datagram[1] & GENEVE_CONTROL_OR_CRITICAL != 0
        || u16_at(datagram, 2) != PROTOCOL_ETHERNET
    {
        return Err(Refused::BadFlags);
    }
    Ok(Decoded {
        stream: Stream::Geneve(u32_at(datagram, 4) >> 8),
        frame: frame_at(datagram, GENEVE_HEADER_LEN + options)?,
        sequence: None,
    })
}

/// A GRE packet's payload (after the IP header): Ethernet (0x6558, with its key when present)
/// or ERSPAN type II or III (sequence numbered).
pub fn gre(packet: &[u8]) -> Result<Decoded<'_>, Refused> {
    if packet.len() < 4 {
        return Err(Refused::Short);
    }
    let flags = packet[0];
    if flags & GRE_RFC1701_ONLY != 0 || packet[1] & GRE_VERSION_MASK != 0 {
        return Err(Refused::BadFlags);
    }
    let protocol = u16_at(packet, 2);
    let mut at = 4;
    if flags & GRE_CHECKSUM != 0 {
        at += 4;
    }
    let mut optional = |present: bool| -> Result<Option<u32>, Refused> {
        if !present {
            return Ok(None);
        }
        packet.get(at..at + 4).ok_or(Refused::Short)?;
        at += 4;
        Ok(Some(u32_at(packet, at - 4)))
    };
    let key = optional(flags & GRE_KEY != 0)?;
    let sequence = optional(flags & GRE_SEQUENCE != 0)?;
    match protocol {
        PROTOCOL_ETHERNET => Ok(Decoded {
            stream: Stream::Gre(key),
            frame: frame_at(packet, at)?,
            sequence,
        }),
        PROTOCOL_ERSPAN2 | PROTOCOL_ERSPAN3 => {
            let erspan = packet.get(at..).ok_or(Refused::Short)?;
            let (version, mut len) = if protocol == PROTOCOL_ERSPAN2 {
                (1, ERSPAN2_HEADER_LEN)
            } else {
                (2, ERSPAN3_HEADER_LEN)
            };
            if erspan.len() < len {
                return Err(Refused::Short);
            }
            if erspan[0] >> 4 != version || sequence.is_none() {
                return Err(Refused::BadFlags);
            }
            if version == 2 && erspan[11] & ERSPAN3_SUBHEADER != 0 {
                len += ERSPAN3_SUBHEADER_LEN;
            }
            Ok(Decoded {
                stream: Stream::Erspan(u16_at(erspan, 2) & 0x03ff),
                frame: frame_at(erspan, len)?,
                sequence,
            })
        }
        _ => Err(Refused::BadFlags),
    }
}

/// What an IPv4 raw socket delivers: the IP header, then the GRE packet.
pub fn gre_in_ipv4(packet: &[u8]) -> Result<Decoded<'_>, Refused> {
    let header_len = usize::from(packet.first().ok_or(Refused::Short)? & 0x0f) * 4;
    if packet[0] >> 4 != 4 || header_len < 20 {
        return Err(Refused::BadFlags);
    }
    gre(packet.get(header_len..).ok_or(Refused::Short)?)
}

/// Counts the copies an ERSPAN session lost, from its sequence numbers: a step forward by more
/// than one means the numbers between never arrived. A repeat (the segments of one GSO copy
/// share a number) or a step back (reordering, a restarted sender) counts nothing.
#[derive(Debug, Default, Clone)]
pub struct Gaps {
    last: Option<u32>,
    pub lost: u64,
}

impl Gaps {
    pub fn saw(&mut self, sequence: u32) {
        let Some(last) = self.last else {
            self.last = Some(sequence);
            return;
        };
        let step = sequence.wrapping_sub(last);
        if step == 0 || step > u32::MAX / 2 {
            return;
        }
        self.lost += u64::from(step - 1);
        self.last = Some(sequence);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any bytes, in any format: refused, or a frame that lies within the datagram and holds
        /// at least an Ethernet header. Never a panic. Datagrams start from a valid header of
        /// the format half the time, so that the cases reach past the first check.
        #[test]
        fn any_datagram_decodes_within_bounds_or_is_refused(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..160),
            format in 0..4usize,
            valid_start in any::<bool>(),
        ) {
            let starts: [&[u8]; 4] = [
                &[0x08, 0, 0, 0, 0, 0, 7, 0],
                &[0, 0, 0x65, 0x58, 0, 0, 7, 0],
                &[0x20, 0, 0x88, 0xbe, 0, 0, 0, 1],
                &[0x45, 0, 0, 0, 0, 0, 0, 0, 64, 47, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
            ];
            if valid_start {
                let start = starts[format];
                let n = start.len().min(bytes.len());
                bytes[..n].copy_from_slice(&start[..n]);
            }
            let decoded = match format {
                0 => vxlan(&bytes),
                1 => geneve(&bytes),
                2 => gre(&bytes),
                _ => gre_in_ipv4(&bytes),
            };
            if let Ok(decoded) = decoded {
                let range = bytes.as_ptr_range();
                let frame = decoded.frame.as_ptr_range();
                prop_assert!(range.start <= frame.start && frame.end <= range.end);
                prop_assert!(decoded.frame.len() >= ETHERNET_HEADER_LEN);
            }
        }
    }

    const FRAME: [u8; 14] = [0xab; 14];

    fn with_frame(header: &[u8]) -> Vec<u8> {
        let mut packet = header.to_vec();
        packet.extend_from_slice(&FRAME);
        packet
    }

    #[test]
    fn vxlan_datagrams() {
        let datagram = with_frame(&[0x08, 0, 0, 0, 0, 0, 42, 0]);
        assert_eq!(
            vxlan(&datagram),
            Ok(Decoded {
                stream: Stream::Vxlan(42),
                frame: &FRAME,
                sequence: None
            })
        );
        assert_eq!(vxlan(&datagram[..21]), Err(Refused::Short));
        assert_eq!(vxlan(&[]), Err(Refused::Short));
        let mut flagless = datagram.clone();
        flagless[0] = 0;
        assert_eq!(vxlan(&flagless), Err(Refused::BadFlags));
        // Reserved bits are ignored on receipt (RFC 7348).
        let mut reserved = datagram;
        reserved[0] = 0xff;
        reserved[7] = 0xff;
        assert_eq!(vxlan(&reserved).map(|d| d.stream), Ok(Stream::Vxlan(42)));
    }

    #[test]
    fn geneve_datagrams_with_and_without_options() {
        let plain = with_frame(&[0, 0, 0x65, 0x58, 0, 0, 7, 0]);
        assert_eq!(
            geneve(&plain).map(|d| (d.stream, d.frame)),
            Ok((Stream::Geneve(7), &FRAME[..]))
        );
        let optioned = with_frame(&[1, 0, 0x65, 0x58, 0, 1, 0, 0, 0xee, 0xee, 0xee, 0xee]);
        assert_eq!(
            geneve(&optioned).map(|d| (d.stream, d.frame)),
            Ok((Stream::Geneve(256), &FRAME[..]))
        );
        assert_eq!(geneve(&[0, 0, 0x65]), Err(Refused::Short));
        let cases: [(&[u8], Refused); 5] = [
            (&[0x40, 0, 0x65, 0x58, 0, 0, 7, 0], Refused::BadFlags),
            // A control message (O), critical options (C).
            (&[0, 0x80, 0x65, 0x58, 0, 0, 7, 0], Refused::BadFlags),
            (
                &[1, 0x40, 0x65, 0x58, 0, 0, 7, 0, 0xee, 0xee, 0xee, 0xee],
                Refused::BadFlags,
            ),
            (&[0, 0, 0x08, 0x00, 0, 0, 7, 0], Refused::BadFlags),
            (&[0x3f, 0, 0x65, 0x58, 0, 0, 7, 0], Refused::Short),
        ];
        for (header, refused) in cases {
            assert_eq!(
                geneve(&with_frame(header)).map(|d| d.stream),
                Err(refused),
                "{header:?}"
            );
        }
    }

    #[test]
    fn gre_and_erspan_packets() {
        type Expected = Result<(Stream, Option<u32>), Refused>;
        let cases: [(&[u8], Expected); 12] = [
            // RFC 1701's routing (with its offset word), strict source route, recursion.
            (
                &[0x40, 0, 0x65, 0x58, 0, 0, 0, 0, 0, 0, 0, 0],
                Err(Refused::BadFlags),
            ),
            (&[0x08, 0, 0x65, 0x58], Err(Refused::BadFlags)),
            (&[0x01, 0, 0x65, 0x58], Err(Refused::BadFlags)),
            (&[0, 0, 0x65, 0x58], Ok((Stream::Gre(None), None))),
            (
                &[0x20, 0, 0x65, 0x58, 0, 0, 0, 5],
                Ok((Stream::Gre(Some(5)), None)),
            ),
            (
                &[0xa0, 0, 0x65, 0x58, 0, 0, 0, 0, 0, 0, 0, 9],
                Ok((Stream::Gre(Some(9)), None)),
            ),
            (
                &[
                    0x10, 0, 0x88, 0xbe, 0, 0, 0, 3, 0x10, 0, 0x03, 0xff, 0, 0, 0, 0,
                ],
                Ok((Stream::Erspan(1023), Some(3))),
            ),
            (
                &[
                    0x10, 0, 0x22, 0xeb, 0, 0, 1, 0, 0x20, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, 0x0a,
                ],
                Ok((Stream::Erspan(4), Some(256))),
            ),
            // Type II without a sequence number (type I), a wrong ERSPAN version, GRE version 1.
            (
                &[0, 0, 0x88, 0xbe, 0x10, 0, 0, 1, 0, 0, 0, 0],
                Err(Refused::BadFlags),
            ),
            (
                &[0x10, 0, 0x88, 0xbe, 0, 0, 0, 3, 0x20, 0, 0, 1, 0, 0, 0, 0],
                Err(Refused::BadFlags),
            ),
            (&[0, 1, 0x65, 0x58], Err(Refused::BadFlags)),
            (&[0x30, 0, 0x65, 0x58, 0, 0], Err(Refused::Short)),
        ];
        for (header, expected) in cases {
            let packet = with_frame(header);
            assert_eq!(
                gre(&packet).map(|d| (d.stream, d.sequence)),
                expected,
                "{header:?}"
            );
            if let Ok(decoded) = gre(&packet) {
                assert_eq!(decoded.frame, FRAME);
            }
        }
        // Type III with its platform subheader.
        let mut subheader = vec![
            0x10, 0, 0x22, 0xeb, 0, 0, 0, 1, 0x20, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0x01,
        ];
        subheader.extend_from_slice(&[0; 8]);
        assert_eq!(
            gre(&with_frame(&subheader)).map(|d| d.frame),
            Ok(&FRAME[..])
        );
        assert_eq!(gre(&[0x20, 0, 0x65]), Err(Refused::Short));
    }

    #[test]
    fn gre_behind_an_ipv4_header() {
        let mut packet = vec![0x45; 1];
        packet.extend_from_slice(&[0; 19]);
        packet.extend_from_slice(&with_frame(&[0, 0, 0x65, 0x58]));
        assert_eq!(
            gre_in_ipv4(&packet).map(|d| d.stream),
            Ok(Stream::Gre(None))
        );
        assert_eq!(gre_in_ipv4(&packet[..10]), Err(Refused::Short));
        assert_eq!(gre_in_ipv4(&[0x65]), Err(Refused::BadFlags));
        assert_eq!(gre_in_ipv4(&[]), Err(Refused::Short));
    }

    #[test]
    fn gaps_count_missing_sequence_numbers_only() {
        let mut gaps = Gaps::default();
        for sequence in [7, 8, 8, 9, 12, 11, 13, u32::MAX] {
            gaps.saw(sequence);
        }
        // 10 and 11 were missing when 12 came (11 came late: not taken back); the jump to
        // u32::MAX is a step back by the wrapping distance, not a loss.
        assert_eq!(gaps.lost, 2);
        let mut wrapping = Gaps::default();
        for sequence in [u32::MAX - 1, u32::MAX, 1] {
            wrapping.saw(sequence);
        }
        assert_eq!(wrapping.lost, 1);
    }
}
