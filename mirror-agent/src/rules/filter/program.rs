//! The rest of the pcap-filter language (byte accessors and arithmetic, `less`/`greater`,
//! `ether host`, `broadcast`, `vlan` chains, …): what libpcap's compiler makes of an expression
//! the rule tables cannot hold, checked for the kernel's interpreter (`mirror_common::cbpf`).
//! Names are refused before libpcap sees them: it would resolve a host name through DNS, once, at
//! load time, and the copies would follow that answer for as long as the configuration lives.
use mirror_common::{
    CbpfInsn, FilterProgram,
    cbpf::{BPF_K, BPF_RET, ProgramError, check_program},
};

use super::FilterError;
use crate::sys::pcap::{self, CompileError};

/// An expression as a classic BPF program.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Program {
    pub insns: Vec<CbpfInsn>,
}

impl Program {
    /// The program as the kernel's `FILTER_PROGRAMS` holds it.
    pub fn kernel(&self) -> FilterProgram {
        let mut program = FilterProgram {
            len: self.insns.len() as u32,
            ..FilterProgram::default()
        };
        program.insns[..self.insns.len()].copy_from_slice(&self.insns);
        program
    }

    /// Whether the program accepts no packet at all (libpcap compiles a contradiction to a
    /// single `ret #0`).
    pub fn rejects_all(&self) -> bool {
        self.insns.len() == 1 && self.insns[0].code == BPF_RET | BPF_K && self.insns[0].k == 0
    }
}

/// The longest expression handed to libpcap, and its deepest nesting: its parser and optimizer
/// recurse, and the agent's stack is not for a configuration to exhaust.
const MAX_TEXT: usize = 4096;
const MAX_DEPTH: usize = 64;

/// Compiles `text` with libpcap, after refusing names.
pub fn compile(text: &str) -> Result<Program, FilterError> {
    if text.len() > MAX_TEXT {
        return Err(FilterError::at(
            0,
            format!("libpcap is given expressions of up to {MAX_TEXT} bytes"),
        ));
    }
    let mut depth = 0usize;
    for (at, byte) in text.bytes().enumerate() {
        match byte {
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_DEPTH {
            return Err(FilterError::at(
                at,
                format!("libpcap is given parentheses up to {MAX_DEPTH} deep"),
            ));
        }
    }
    refuse_names(text)?;
    let insns = match pcap::compile(text) {
        Ok(insns) => insns,
        // What its optimizer proves can match nothing (tcpdump says the same and selects nothing).
        Err(CompileError::Refused(why)) if why.contains("expression rejects all packets") => {
            vec![CbpfInsn {
                code: BPF_RET | BPF_K,
                ..CbpfInsn::default()
            }]
        }
        Err(CompileError::Refused(why)) => {
            return Err(FilterError::at(0, format!("libpcap: {why}")));
        }
        Err(e @ CompileError::Unavailable(_)) => return Err(FilterError::at(0, e.to_string())),
    };
    check_program(&insns).map_err(|e| {
        let why = match e {
            ProgramError::TooLong => format!(
                "libpcap's program has {} instructions, over the limit of {}: split the \
                 expression into sessions",
                insns.len(),
                mirror_common::MAX_PROGRAM_INSNS
            ),
            other => {
                format!("libpcap's program is not one the kernel's interpreter runs: {other:?}")
            }
        };
        FilterError::at(0, why)
    })?;
    Ok(Program { insns })
}

/// The words libpcap's scanner knows (scanner.l), and the qualifiers after which a name is a port
/// or protocol (looked up in /etc/services and /etc/protocols, on this host) rather than a host.
const KEYWORDS: &[&str] = &[
    "aarp",
    "action",
    "addr1",
    "addr2",
    "addr3",
    "addr4",
    "address1",
    "address2",
    "address3",
    "address4",
    "ah",
    "and",
    "arp",
    "atalk",
    "bcc",
    "broadcast",
    "byte",
    "carp",
    "clnp",
    "connectmsg",
    "csnp",
    "decnet",
    "dir",
    "direction",
    "dpc",
    "dst",
    "es-is",
    "esis",
    "esp",
    "ether",
    "fddi",
    "fisu",
    "gateway",
    "geneve",
    "greater",
    "hdpc",
    "hfisu",
    "hlssu",
    "hmsu",
    "hopc",
    "host",
    "hsio",
    "hsls",
    "icmp",
    "icmp6",
    "icmp6code",
    "icmp6type",
    "icmpcode",
    "icmptype",
    "ifindex",
    "ifname",
    "igmp",
    "igrp",
    "iih",
    "ilmic",
    "inbound",
    "ip",
    "ip6",
    "ipx",
    "is-is",
    "isis",
    "iso",
    "l1",
    "l2",
    "lane",
    "lat",
    "len",
    "length",
    "less",
    "link",
    "llc",
    "lsp",
    "lssu",
    "lsu",
    "mask",
    "metac",
    "metaconnect",
    "mopdl",
    "moprc",
    "mpls",
    "msu",
    "multicast",
    "net",
    "netbeui",
    "not",
    "oam",
    "oamf4",
    "oamf4ec",
    "oamf4sc",
    "on",
    "opc",
    "or",
    "outbound",
    "pim",
    "port",
    "portrange",
    "ppp",
    "pppoed",
    "pppoes",
    "proto",
    "protochain",
    "psnp",
    "ra",
    "radio",
    "rarp",
    "reason",
    "rnr",
    "rset",
    "rulenum",
    "ruleset",
    "sc",
    "sca",
    "sctp",
    "sio",
    "slip",
    "sls",
    "snp",
    "src",
    "srnr",
    "stp",
    "subrulenum",
    "subtype",
    "ta",
    "tcp",
    "tcpflags",
    "tr",
    "type",
    "udp",
    "vci",
    "vlan",
    "vpi",
    "vrrp",
    "vxlan",
    "wlan",
];
/// Prefixes of libpcap's named constants (`tcp-syn`, `icmp-echoreply`, `icmp6-echo`, …).
const CONSTANT_PREFIXES: &[&str] = &["tcp-", "icmp-", "icmp6-"];
/// Qualifiers whose names are services or protocols.
const NAMED_BY_FILE: &[&str] = &["port", "portrange", "proto", "protochain"];
/// Qualifiers whose names are hosts, networks or Ethernet hosts.
const NAMED_BY_RESOLVER: &[&str] = &["host", "net", "gateway", "src", "dst"];

/// Refuses a word libpcap would resolve as a host or network name.
fn refuse_names(text: &str) -> Result<(), FilterError> {
    // libpcap's default qualifier is `host`, and a word without one takes the last one given.
    let mut resolved_by_file = false;
    for (at, word) in words(text) {
        // libpcap's scanner is case-sensitive (`TCP` is a name), and a `\`-escaped word is always
        // a name (`proto \tcp`).
        if NAMED_BY_FILE.contains(&word) {
            resolved_by_file = true;
        } else if NAMED_BY_RESOLVER.contains(&word) {
            resolved_by_file = false;
        }
        if (!word.starts_with('\\') && is_known(word)) || resolved_by_file {
            continue;
        }
        return Err(FilterError::at(
            at,
            format!(
                "`{word}` is a name, and mirror resolves no host or network names (copies \
                 would follow one DNS answer for as long as the configuration lives): write the \
                 address"
            ),
        ));
    }
    Ok(())
}

fn is_known(word: &str) -> bool {
    KEYWORDS.contains(&word)
        || CONSTANT_PREFIXES.iter().any(|p| word.starts_with(p))
        || is_number_or_address(word)
}

/// Numbers (decimal, octal, hex), dotted IPv4 forms, IPv6 addresses and MAC addresses in any of
/// libpcap's spellings: what its scanner reads as other than an identifier.
fn is_number_or_address(word: &str) -> bool {
    let hex_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if word.contains(':') {
        return true;
    }
    if let Some(hex) = word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        return hex_digits(hex);
    }
    if word
        .split('.')
        .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    {
        return true;
    }
    // MACs as `xx-xx-xx-xx-xx-xx` or `xxxx.xxxx.xxxx`.
    let dashed = word.split('-').collect::<Vec<_>>();
    let dotted = word.split('.').collect::<Vec<_>>();
    (dashed.len() == 6 && dashed.iter().all(|p| hex_digits(p) && p.len() <= 2))
        || (dotted.len() == 3 && dotted.iter().all(|p| hex_digits(p) && p.len() == 4))
}

/// The words of `text` as libpcap's scanner cuts them (`[A-Za-z0-9][-_.A-Za-z0-9:]*`, or a
/// `\`-escaped word), with their byte offsets.
fn words(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let bytes = text.as_bytes();
    let is_part = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':');
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < bytes.len() && !(bytes[at].is_ascii_alphanumeric() || bytes[at] == b'\\') {
            at += 1;
        }
        if at >= bytes.len() {
            return None;
        }
        let start = at;
        at += 1;
        while at < bytes.len() && is_part(bytes[at]) {
            at += 1;
        }
        // libpcap's identifiers end in a letter, digit or dot.
        let mut end = at;
        while end > start + 1 && matches!(bytes[end - 1], b'-' | b'_') {
            end -= 1;
        }
        Some((start, &text[start..end]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_refused_where_libpcap_would_resolve_them() {
        let refused = [
            ("db1", 0),
            ("host db1", 5),
            ("tcp and host 10.0.0.1 or db1", 25),
            ("port 80 and src db1.example.com", 16),
            ("ether host router", 11),
            ("gateway gw", 8),
            ("TCP", 0),
            ("\\tcp", 0),
        ];
        for (text, at) in refused {
            let error = refuse_names(text).expect_err(text);
            assert_eq!(error.offset, at, "{text}: {error}");
        }
        let accepted = [
            "tcp[tcpflags] & (tcp-syn|tcp-fin) != 0",
            "icmp[icmptype] != icmp-echo and icmp[icmptype] != icmp-echoreply",
            "ip[2:2] - ((ip[0]&0xf)<<2) - ((tcp[12]&0xf0)>>2) != 0",
            "ether host 02:00:00:00:00:01 or ether src 02-00-00-00-00-02",
            "ether dst 0200.0000.0003",
            "host 2001:db8::1 and net 10.0.0.0/8",
            "port http or https",
            "ip proto \\tcp",
            "less 100 or greater 1500",
            "vlan 100 and vlan 200",
            "ip[6:2] & 0x1fff = 0",
        ];
        for text in accepted {
            assert_eq!(refuse_names(text), Ok(()), "{text}");
        }
    }

    #[test]
    fn a_contradiction_rejects_all() {
        let ret = |k| CbpfInsn {
            code: BPF_RET | BPF_K,
            k,
            ..CbpfInsn::default()
        };
        assert!(
            Program {
                insns: vec![ret(0)]
            }
            .rejects_all()
        );
        assert!(
            !Program {
                insns: vec![ret(262_144)]
            }
            .rejects_all()
        );
    }
}
