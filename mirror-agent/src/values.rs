//! The values of rule and target keys that are written as text or numbers (`"tcp"` or `6`,
//! `"10.0.0.0/8"`, `"1024-65535"`), each parsed and checked where it is read.
use std::{net::IpAddr, ops::RangeInclusive, str::FromStr};

use ipnet::IpNet;
use serde::Deserialize;

macro_rules! parsed_from_str_or_int {
    ($ty:ident, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    Int(i64),
                    Str(String),
                }
                let text = match Raw::deserialize(d)
                    .map_err(|_| serde::de::Error::custom(concat!("expected ", $expecting)))?
                {
                    Raw::Int(i) => i.to_string(),
                    Raw::Str(s) => s,
                };
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A VXLAN network identifier (24 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vni(pub u32);
parsed_from_str_or_int!(Vni, "a VNI");

impl FromStr for Vni {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_u64(s)
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v <= 0x00ff_ffff)
            .map(Vni)
            .ok_or_else(|| format!("`{s}` is not a VNI (0..16777215)"))
    }
}

/// An ERSPAN session id (10 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErspanSessionId(pub u16);
parsed_from_str_or_int!(ErspanSessionId, "an ERSPAN session id");

impl FromStr for ErspanSessionId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_u64(s)
            .and_then(|v| u16::try_from(v).ok())
            .filter(|v| *v <= 1023)
            .map(ErspanSessionId)
            .ok_or_else(|| format!("`{s}` is not an ERSPAN session id (0..1023)"))
    }
}

/// An ethertype: a number (`0x88cc`, `2054`) or a name (`ipv4`, `ipv6`, `arp`, `lldp`, `vlan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ethertype(pub u16);
parsed_from_str_or_int!(Ethertype, "an ethertype number or name");

impl FromStr for Ethertype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let named = match s.to_ascii_lowercase().as_str() {
            "ipv4" | "ip" => Some(0x0800),
            "ipv6" => Some(0x86dd),
            "arp" => Some(0x0806),
            "lldp" => Some(0x88cc),
            "vlan" => Some(0x8100),
            _ => None,
        };
        named
            .or_else(|| parse_u64(s).and_then(|v| u16::try_from(v).ok()))
            .map(Ethertype)
            .ok_or_else(|| {
                format!("`{s}` is not an ethertype (0..0xffff, or ipv4, ipv6, arp, lldp, vlan)")
            })
    }
}

/// A VLAN id, 0..=4095.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vlan(pub u16);
parsed_from_str_or_int!(Vlan, "a VLAN id");

impl FromStr for Vlan {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_u64(s)
            .and_then(|v| u16::try_from(v).ok())
            .filter(|v| *v <= 4095)
            .map(Vlan)
            .ok_or_else(|| format!("`{s}` is not a VLAN id (0..4095)"))
    }
}

/// An IP protocol: a number or `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpProto(pub u8);
parsed_from_str_or_int!(IpProto, "an IP protocol number or name");

impl FromStr for IpProto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let named = match s.to_ascii_lowercase().as_str() {
            "icmp" => Some(1),
            "tcp" => Some(6),
            "udp" => Some(17),
            "icmpv6" | "ipv6-icmp" => Some(58),
            "sctp" => Some(132),
            _ => None,
        };
        named
            .or_else(|| parse_u64(s).and_then(|v| u8::try_from(v).ok()))
            .map(IpProto)
            .ok_or_else(|| {
                format!("`{s}` is not an IP protocol (0..255, or tcp, udp, sctp, icmp, icmpv6)")
            })
    }
}

/// An IPv4 or IPv6 prefix; a bare address means a host prefix. Host bits must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(pub IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let net = match s.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => s.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                format!("`{s}` is not an IPv4 or IPv6 prefix (10.0.0.0/8, fd00::/64)")
            })?,
        };
        if net.trunc() != net {
            return Err(format!(
                "`{s}` has host bits set; did you mean `{}`?",
                net.trunc()
            ));
        }
        Ok(Cidr(net))
    }
}

/// A port or an inclusive port range: `443`, `"1024-65535"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortRange(pub RangeInclusive<u16>);
parsed_from_str_or_int!(PortRange, "a port or a port range");

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| p.trim().parse::<u16>().ok();
        let range = match s.split_once('-') {
            Some((lo, hi)) => port(lo).zip(port(hi)),
            None => port(s).map(|p| (p, p)),
        };
        match range {
            Some((lo, hi)) if lo <= hi => Ok(PortRange(lo..=hi)),
            _ => Err(format!(
                "`{s}` is not a port or port range (0..65535, `low-high` with low <= high)"
            )),
        }
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}
