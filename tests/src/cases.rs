//! The table of malformed and edge-case frames that the TC and XDP tests both send: each must
//! pass unchanged, be copied only if a rule matches, and be counted as malformed when its headers
//! are cut or invalid.
use crate::{NODE_SINK_MAC, SINK_MAC, tagged, udp_v4_frame, udp_v6_frame};

/// The rules the table is written for: UDP to port 4000, and ethertype 0x88b5.
pub const MALFORMED_RULES: &str = "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 4000\n\
     [[session.rule]]\nnumber = 20\naction = \"mirror\"\nethertype = 0x88b5\n";

/// IPv6 frame with a chain of extension headers (`next`, length in 8-byte units minus one) in front
/// of an upper-layer header.
fn ipv6_with_extensions(chain: &[u8], upper: u8, upper_bytes: &[u8]) -> Vec<u8> {
    let base = udp_v6_frame(NODE_SINK_MAC, SINK_MAC, 4000, b"v6");
    let mut payload = Vec::new();
    for (i, _) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(upper);
        payload.extend([next, 0, 1, 4, 0, 0, 0, 0]); // 8 bytes: next, len 0, PadN option
    }
    payload.extend(upper_bytes);
    let mut frame = base[..14 + 40].to_vec();
    frame[14 + 4..14 + 6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    frame[14 + 6] = chain.first().copied().unwrap_or(upper);
    frame.extend(payload);
    frame
}

const HOP_BY_HOP: u8 = 0;
const DEST_OPTS: u8 = 60;
const FRAGMENT: u8 = 44;

/// A frame, whether a rule matches it, and whether the parser must count it as malformed.
#[derive(Debug)]
pub struct Case {
    pub name: &'static str,
    pub frame: Vec<u8>,
    /// The rules match it, read whole.
    pub copied: bool,
    /// The parser cannot finish it: the fields it does not reach match any rule, so a session
    /// copies it unless it skips unparsed packets (`unparsed = "skip"`).
    pub malformed: bool,
}

/// The frames of the `cases` that `keep` keeps, in order.
pub fn frames_of(cases: &[Case], keep: impl Fn(&Case) -> bool) -> Vec<Vec<u8>> {
    cases
        .iter()
        .filter(|c| keep(c))
        .map(|c| c.frame.clone())
        .collect()
}

impl Case {
    /// Copied by a session that copies unparsed packets (the default).
    pub fn copied_failing_open(&self) -> bool {
        self.copied || self.malformed
    }
}

fn case(name: &'static str, frame: Vec<u8>, copied: bool, malformed: bool) -> Case {
    Case {
        name,
        frame,
        copied,
        malformed,
    }
}

/// The table, for a session whose rules are [`MALFORMED_RULES`].
pub fn malformed() -> Vec<Case> {
    let udp = udp_v4_frame(
        NODE_SINK_MAC,
        SINK_MAC,
        4000,
        b"valid udp to port 4000 .......",
    );
    let udp_header = &udp[34..42];
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = udp.clone();
        f(&mut frame);
        frame
    };
    let mut ipv4_options = udp[..34].to_vec();
    ipv4_options[14] = 0x46;
    ipv4_options[16..18].copy_from_slice(&((udp.len() - 14 + 4) as u16).to_be_bytes());
    ipv4_options.extend([1, 1, 1, 0]); // NOP, NOP, NOP, EOL
    ipv4_options.extend(&udp[34..]);
    let mut ipv6_fragment = ipv6_with_extensions(&[], FRAGMENT, &[17, 0, 0, 8, 0, 0, 0, 1]);
    ipv6_fragment.extend(udp_header);
    let mut cases = vec![
        case("ipv4 udp 4000 (control)", udp.clone(), true, false),
        case(
            "runt: ethernet header only",
            udp[..14].to_vec(),
            false,
            true,
        ),
        case("ipv4 ihl 4", with(&|f| f[14] = 0x44), false, true),
        case("ipv4 version 5", with(&|f| f[14] = 0x55), false, true),
        case(
            "ipv4 cut inside its header",
            udp[..14 + 12].to_vec(),
            false,
            true,
        ),
        case(
            "ipv4 udp header cut to 2 bytes",
            udp[..14 + 20 + 2].to_vec(),
            false,
            true,
        ),
        case(
            "ipv4 non-first fragment",
            with(&|f| f[20..22].copy_from_slice(&[0x00, 0x10])),
            false,
            false,
        ),
        case("ipv4 with options, udp 4000", ipv4_options, true, false),
        case(
            "ipv6 hop-by-hop + dest-opts, udp 4000",
            ipv6_with_extensions(&[HOP_BY_HOP, DEST_OPTS], 17, udp_header),
            true,
            false,
        ),
        case(
            "ipv6 extension header cut",
            ipv6_with_extensions(&[DEST_OPTS], 17, &[])[..14 + 40 + 4].to_vec(),
            false,
            true,
        ),
        case("ipv6 non-first fragment", ipv6_fragment, false, false),
        case(
            "ipv6 udp header cut",
            ipv6_with_extensions(&[], 17, &udp_header[..3]),
            false,
            true,
        ),
        case(
            "ethertype 0x88b5",
            with(&|f| f[12..14].copy_from_slice(&[0x88, 0xb5])),
            true,
            false,
        ),
        // (The receiving kernel drops a tagged frame with fewer than 6 bytes after the tag, so the
        // far side could not show that it continued: keep 2 bytes of IPv4 header.)
        case(
            "802.1Q tag, ipv4 header cut to 2 bytes",
            tagged(&udp[..16], &[(0x8100, 7)]),
            false,
            true,
        ),
        case(
            "802.1Q tagged udp 4000 (tag in data at egress)",
            tagged(&udp, &[(0x8100, 7)]),
            true,
            false,
        ),
    ];
    cases.extend(ipv6_chains(udp_header));
    cases
}

/// IPv6 extension chains around the longest the parser follows (8 headers): longer ones are an
/// evasion unless they are copied.
fn ipv6_chains(udp_header: &[u8]) -> Vec<Case> {
    vec![
        case(
            "ipv6 7 extension headers, udp 4000",
            ipv6_with_extensions(&[DEST_OPTS; 7], 17, udp_header),
            true,
            false,
        ),
        case(
            "ipv6 8 extension headers",
            ipv6_with_extensions(&[DEST_OPTS; 8], 17, udp_header),
            false,
            true,
        ),
        case(
            "ipv6 9 extension headers",
            ipv6_with_extensions(&[DEST_OPTS; 9], 17, udp_header),
            false,
            true,
        ),
        case(
            "ipv6 12 extension headers",
            ipv6_with_extensions(&[DEST_OPTS; 12], 17, udp_header),
            false,
            true,
        ),
    ]
}
