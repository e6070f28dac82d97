//! What one rule matches: a conjunction of field conditions, and the set operations the hidden-rule
//! warnings and the filter compiler need (cover, overlap, intersection).
use std::{fmt, net::IpAddr, ops::RangeInclusive};

use ipnet::IpNet;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Every VLAN id: a tagged frame, whatever its id.
pub const ANY_VLAN: RangeInclusive<u16> = 0..=4095;

/// The fields a rule constrains; `None` matches anything, an absent field included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Fields {
    pub ethertype: Option<u16>,
    /// Outer VLAN ids ([`ANY_VLAN`]: any tagged frame).
    pub vlan: Option<RangeInclusive<u16>>,
    pub proto: Option<u8>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub src_port: Option<RangeInclusive<u16>>,
    pub dst_port: Option<RangeInclusive<u16>>,
}

/// A packet's fields as the kernel's parser reads them; `None` where the packet has none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub ethertype: Option<u16>,
    pub vlan: Option<u16>,
    pub proto: Option<u8>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

impl Header {
    /// The fields of an Ethernet frame, read in userspace (a live capture's filter): the outer
    /// VLAN id, the ethertype after the tags, the IP protocol after IPv6 extension headers, and
    /// TCP, UDP and SCTP ports (none in a later fragment). A frame cut short has the fields read
    /// before the cut.
    pub fn of_frame(frame: &[u8]) -> Header {
        use etherparse::{LaxLinkExtSlice, LaxNetSlice, LinkSlice};
        let Ok(packet) = etherparse::LaxSlicedPacket::from_ethernet(frame) else {
            return Header::default();
        };
        let tags = packet.link_exts.iter().filter_map(|ext| match ext {
            LaxLinkExtSlice::Vlan(tag) => Some(tag),
            LaxLinkExtSlice::Macsec(_) => None,
        });
        let mut header = Header {
            vlan: tags.clone().next().map(|tag| tag.vlan_identifier().value()),
            ethertype: match (tags.clone().next_back(), &packet.link) {
                (Some(tag), _) => Some(tag.ether_type().0),
                (None, Some(LinkSlice::Ethernet2(ethernet))) => Some(ethernet.ether_type().0),
                (None, _) => None,
            },
            ..Header::default()
        };
        let (payload, later_fragment) = match &packet.net {
            Some(LaxNetSlice::Ipv4(ip)) => {
                header.src = Some(ip.header().source_addr().into());
                header.dst = Some(ip.header().destination_addr().into());
                (ip.payload(), ip.header().fragments_offset().value() != 0)
            }
            Some(LaxNetSlice::Ipv6(ip)) => {
                header.src = Some(ip.header().source_addr().into());
                header.dst = Some(ip.header().destination_addr().into());
                (ip.payload(), ip.payload().fragmented)
            }
            _ => return header,
        };
        header.proto = Some(payload.ip_number.0);
        if matches!(payload.ip_number.0, 6 | 17 | 132)
            && !later_fragment
            && let Some(ports) = payload.payload.get(..4)
        {
            header.src_port = Some(u16::from_be_bytes([ports[0], ports[1]]));
            header.dst_port = Some(u16::from_be_bytes([ports[2], ports[3]]));
        }
        header
    }
}

impl Fields {
    /// Whether a packet with `header` has these fields (a field it lacks matches only a rule
    /// that leaves the field open).
    pub fn matches(&self, header: &Header) -> bool {
        fn field<W, H>(want: Option<&W>, have: Option<H>, f: impl Fn(&W, &H) -> bool) -> bool {
            match (want, have) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(w), Some(h)) => f(w, &h),
            }
        }
        field(self.ethertype.as_ref(), header.ethertype, PartialEq::eq)
            && field(self.vlan.as_ref(), header.vlan, RangeInclusive::contains)
            && field(self.proto.as_ref(), header.proto, PartialEq::eq)
            && field(self.src.as_ref(), header.src, |net, a| net.contains(a))
            && field(self.dst.as_ref(), header.dst, |net, a| net.contains(a))
            && field(
                self.src_port.as_ref(),
                header.src_port,
                RangeInclusive::contains,
            )
            && field(
                self.dst_port.as_ref(),
                header.dst_port,
                RangeInclusive::contains,
            )
    }

    /// Why no packet can have these fields together, if none can.
    pub fn contradiction(&self) -> Option<&'static str> {
        let family = |net: &IpNet| match net {
            IpNet::V4(_) => ETHERTYPE_IPV4,
            IpNet::V6(_) => ETHERTYPE_IPV6,
        };
        if let (Some(src), Some(dst)) = (&self.src, &self.dst)
            && family(src) != family(dst)
        {
            return Some("the source and destination are of different IP versions");
        }
        let ip_family = self.src.as_ref().or(self.dst.as_ref()).map(family);
        let has_ports = self.src_port.is_some() || self.dst_port.is_some();
        let needs_ip = ip_family.is_some() || self.proto.is_some() || has_ports;
        if let Some(ethertype) = self.ethertype {
            if needs_ip && ethertype != ETHERTYPE_IPV4 && ethertype != ETHERTYPE_IPV6 {
                return Some("IP fields are set but the ethertype is not ipv4 or ipv6");
            }
            if ip_family.is_some_and(|f| f != ethertype) {
                return Some("the ethertype and the address family differ");
            }
        }
        if has_ports && self.proto.is_some_and(|p| !matches!(p, 6 | 17 | 132)) {
            return Some("ports are set but the protocol is not tcp, udp or sctp");
        }
        None
    }

    /// The packets both match, or `None` when no packet can.
    pub fn intersect(&self, other: &Fields) -> Option<Fields> {
        /// The values two conditions on one field both allow: `Err` when none.
        fn both<T: Clone>(
            a: Option<&T>,
            b: Option<&T>,
            meet: impl Fn(&T, &T) -> Option<T>,
        ) -> Result<Option<T>, Disjoint> {
            match (a, b) {
                (None, None) => Ok(None),
                (Some(x), None) | (None, Some(x)) => Ok(Some(x.clone())),
                (Some(a), Some(b)) => meet(a, b).map(Some).ok_or(Disjoint),
            }
        }
        struct Disjoint;
        let equal = |a: &_, b: &_| (a == b).then_some(*a);
        let ethertype = both(self.ethertype.as_ref(), other.ethertype.as_ref(), equal).ok()?;
        let proto = both(self.proto.as_ref(), other.proto.as_ref(), |a, b| {
            (a == b).then_some(*a)
        })
        .ok()?;
        let net = |a: &IpNet, b: &IpNet| {
            if a.contains(b) {
                Some(*b)
            } else if b.contains(a) {
                Some(*a)
            } else {
                None
            }
        };
        let range = |a: &RangeInclusive<u16>, b: &RangeInclusive<u16>| {
            let (start, end) = (*a.start().max(b.start()), *a.end().min(b.end()));
            (start <= end).then_some(start..=end)
        };
        let met = Fields {
            ethertype,
            vlan: both(self.vlan.as_ref(), other.vlan.as_ref(), range).ok()?,
            proto,
            src: both(self.src.as_ref(), other.src.as_ref(), net).ok()?,
            dst: both(self.dst.as_ref(), other.dst.as_ref(), net).ok()?,
            src_port: both(self.src_port.as_ref(), other.src_port.as_ref(), range).ok()?,
            dst_port: both(self.dst_port.as_ref(), other.dst_port.as_ref(), range).ok()?,
        };
        met.contradiction().is_none().then_some(met)
    }

    /// Every packet `other` matches, `self` matches too.
    pub fn covers(&self, other: &Fields) -> bool {
        fn field<T>(a: Option<&T>, b: Option<&T>, covers: impl Fn(&T, &T) -> bool) -> bool {
            match (a, b) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(b)) => covers(a, b),
            }
        }
        let net = |x: &IpNet, y: &IpNet| x.contains(y);
        let range = |x: &RangeInclusive<u16>, y: &RangeInclusive<u16>| {
            x.start() <= y.start() && y.end() <= x.end()
        };
        field(
            self.ethertype.as_ref(),
            other.ethertype.as_ref(),
            PartialEq::eq,
        ) && field(self.vlan.as_ref(), other.vlan.as_ref(), range)
            && field(self.proto.as_ref(), other.proto.as_ref(), PartialEq::eq)
            && field(self.src.as_ref(), other.src.as_ref(), net)
            && field(self.dst.as_ref(), other.dst.as_ref(), net)
            && field(self.src_port.as_ref(), other.src_port.as_ref(), range)
            && field(self.dst_port.as_ref(), other.dst_port.as_ref(), range)
    }

    /// Some packet matches both.
    pub fn overlaps(&self, other: &Fields) -> bool {
        self.intersect(other).is_some()
    }
}

/// The rule's conditions as `check --explain` prints them, e.g. `proto 6, dst_port 443`; `any`
/// when there is none.
impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = |r: &RangeInclusive<u16>| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}-{}", r.start(), r.end())
            }
        };
        let parts: Vec<String> = [
            self.ethertype.map(|e| format!("ethertype {e:#06x}")),
            self.vlan.as_ref().map(|v| {
                if *v == ANY_VLAN {
                    "vlan any".to_owned()
                } else {
                    format!("vlan {}", range(v))
                }
            }),
            self.proto.map(|p| format!("proto {p}")),
            self.src.map(|n| format!("src {n}")),
            self.dst.map(|n| format!("dst {n}")),
            self.src_port
                .as_ref()
                .map(|p| format!("src_port {}", range(p))),
            self.dst_port
                .as_ref()
                .map(|p| format!("dst_port {}", range(p))),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            f.write_str("any")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// A rule's fields in tcpdump's words (`check --explain`): `tcp and src net 10.0.0.0/8 and dst
/// port 443`.
#[derive(Debug)]
pub struct InTcpdumpWords<'a>(pub &'a Fields);

impl fmt::Display for InTcpdumpWords<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields = self.0;
        let port_words = |side: &str, r: &RangeInclusive<u16>| {
            if r.start() == r.end() {
                format!("{side} port {}", r.start())
            } else {
                format!("{side} portrange {}-{}", r.start(), r.end())
            }
        };
        let net = |side: &str, n: &IpNet| {
            if n.prefix_len() == n.max_prefix_len() {
                format!("{side} host {}", n.addr())
            } else {
                format!("{side} net {n}")
            }
        };
        let parts: Vec<String> = [
            fields.ethertype.map(|e| match e {
                ETHERTYPE_IPV4 => "ip".to_owned(),
                ETHERTYPE_IPV6 => "ip6".to_owned(),
                0x0806 => "arp".to_owned(),
                other => format!("ether proto {other:#06x}"),
            }),
            fields.vlan.as_ref().map(|v| {
                if *v == ANY_VLAN {
                    "vlan".to_owned()
                } else if v.start() == v.end() {
                    format!("vlan {}", v.start())
                } else {
                    format!("vlan {}-{}", v.start(), v.end())
                }
            }),
            fields.proto.map(|p| match p {
                1 => "icmp".to_owned(),
                6 => "tcp".to_owned(),
                17 => "udp".to_owned(),
                58 => "icmp6".to_owned(),
                132 => "sctp".to_owned(),
                other => format!("proto {other}"),
            }),
            fields.src.map(|n| net("src", &n)),
            fields.dst.map(|n| net("dst", &n)),
            fields.src_port.as_ref().map(|p| port_words("src", p)),
            fields.dst_port.as_ref().map(|p| port_words("dst", p)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            f.write_str("any packet")
        } else {
            f.write_str(&parts.join(" and "))
        }
    }
}

#[cfg(test)]
mod tcpdump_words {
    use super::*;

    #[test]
    fn rules_read_as_tcpdump_expressions() {
        let fields = Fields {
            proto: Some(6),
            src: Some("10.0.0.0/8".parse().expect("net")),
            dst: Some("10.1.2.3/32".parse().expect("host")),
            dst_port: Some(1024..=65535),
            ..Fields::default()
        };
        assert_eq!(
            InTcpdumpWords(&fields).to_string(),
            "tcp and src net 10.0.0.0/8 and dst host 10.1.2.3 and dst portrange 1024-65535"
        );
        let arp = Fields {
            ethertype: Some(0x0806),
            ..Fields::default()
        };
        assert_eq!(InTcpdumpWords(&arp).to_string(), "arp");
        assert_eq!(InTcpdumpWords(&Fields::default()).to_string(), "any packet");
    }
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::Header;

    #[test]
    fn a_frame_s_fields_are_read_as_the_kernel_reads_them() {
        let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let mut tagged = Vec::new();
        PacketBuilder::ethernet2(a, b)
            .double_vlan(
                etherparse::VlanId::try_new(100).expect("id"),
                etherparse::VlanId::try_new(7).expect("id"),
            )
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(53, 4000)
            .write(&mut tagged, b"x")
            .expect("frame");
        assert_eq!(
            Header::of_frame(&tagged),
            Header {
                ethertype: Some(0x0800),
                vlan: Some(100),
                proto: Some(17),
                src: Some("10.0.0.1".parse().expect("ip")),
                dst: Some("10.0.0.2".parse().expect("ip")),
                src_port: Some(53),
                dst_port: Some(4000),
            }
        );
        let mut v6 = Vec::new();
        PacketBuilder::ethernet2(a, b)
            .ipv6([0x20; 16], [0x30; 16], 64)
            .tcp(40_000, 443, 1, 100)
            .write(&mut v6, b"")
            .expect("frame");
        let header = Header::of_frame(&v6);
        assert_eq!(
            (
                header.ethertype,
                header.vlan,
                header.proto,
                header.src_port,
                header.dst_port
            ),
            (Some(0x86dd), None, Some(6), Some(40_000), Some(443))
        );
        // Cut inside the TCP header: no ports; cut inside IPv4's: no fields past the ethertype.
        let header = Header::of_frame(&v6[..14 + 40 + 2]);
        assert_eq!((header.proto, header.src_port), (Some(6), None));
        let header = Header::of_frame(&tagged[..14 + 8 + 10]);
        assert_eq!(
            (header.ethertype, header.vlan, header.src),
            (Some(0x0800), Some(100), None)
        );
        assert_eq!(Header::of_frame(&[0; 6]), Header::default());
    }
}
