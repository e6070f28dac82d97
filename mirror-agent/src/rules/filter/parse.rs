//! The pcap-filter grammar subset, read into an expression over rule [`Fields`]. As in tcpdump,
//! `and` and `or` bind equally and from the left, `not` binds tightest, and a bare value takes the
//! qualifiers of the primitive before it (`port 80 or 443`, `host a and not b`).
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use super::{
    FilterError, SUPPORTED,
    lex::{Located, Token},
};
use crate::rules::{ANY_VLAN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, Fields};

const ETHERTYPE_ARP: u16 = 0x0806;

/// A filter expression; leaves are conjunctions of field conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Fields(Fields),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Ether,
    Ip,
    Ip6,
    Arp,
    Tcp,
    Udp,
    Sctp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    SrcOrDst,
    Src,
    Dst,
    SrcAndDst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Host,
    Net,
    Port,
    PortRange,
}

/// The qualifiers of a primitive that names a value (`tcp dst port 80`).
#[derive(Debug, Clone, Copy, Default)]
struct Qualifiers {
    proto: Option<Proto>,
    dir: Option<Dir>,
    kind: Option<Kind>,
}

/// Words and operators an expression may have: parsing and compiling recurse over them.
const MAX_TOKENS: usize = 1024;
/// How deep parentheses and `not`s may nest.
const MAX_NESTING: usize = 64;

/// Reads `tokens` (of a text `len` bytes long) into one expression.
pub fn parse(tokens: Vec<Located>, len: usize) -> Result<Expr, FilterError> {
    if let Some((_, at)) = tokens.get(MAX_TOKENS) {
        return Err(FilterError::at(
            *at,
            format!(
                "more than {MAX_TOKENS} words and operators: split the expression into sessions"
            ),
        ));
    }
    let mut parser = Parser {
        tokens,
        next: 0,
        len,
        last: None,
        depth: 0,
        vlan_seen: false,
    };
    let expr = parser.expr()?;
    match parser.peek() {
        None => Ok(expr),
        Some((Token::Close, at)) => Err(FilterError::at(at, "a `)` without its `(`")),
        Some((_, at)) => Err(FilterError::at(
            at,
            "expected `and` or `or` between two primitives",
        )),
    }
}

struct Parser {
    tokens: Vec<Located>,
    next: usize,
    len: usize,
    /// The qualifiers of the last primitive that named a value, for a bare value after it.
    last: Option<Qualifiers>,
    /// Parentheses and `not`s open around the term being read.
    depth: usize,
    /// Whether a `vlan` was read: libpcap reads the next tag for each one after it.
    vlan_seen: bool,
}

impl Parser {
    fn peek(&self) -> Option<(Token, usize)> {
        self.tokens.get(self.next).cloned()
    }

    fn peek_word(&self) -> Option<&str> {
        match self.tokens.get(self.next) {
            Some((Token::Word(w), _)) => Some(w),
            _ => None,
        }
    }

    fn advance(&mut self) -> Option<(Token, usize)> {
        let token = self.peek();
        self.next += 1;
        token
    }

    fn expr(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.term()?;
        while let Some((operator @ (Token::And | Token::Or), _)) = self.peek() {
            self.advance();
            let right = Box::new(self.term()?);
            left = if operator == Token::And {
                Expr::And(Box::new(left), right)
            } else {
                Expr::Or(Box::new(left), right)
            };
        }
        Ok(left)
    }

    fn term(&mut self) -> Result<Expr, FilterError> {
        match self.advance() {
            Some((Token::Not, at)) => {
                let inner = self.nested(at, Self::term)?;
                Ok(Expr::Not(Box::new(inner)))
            }
            Some((Token::Open, at)) => {
                let inner = self.nested(at, Self::expr)?;
                match self.advance() {
                    Some((Token::Close, _)) => Ok(inner),
                    _ => Err(FilterError::at(at, "a `(` without its `)`")),
                }
            }
            Some((Token::Word(word), at)) => self.primitive(&word, at),
            Some((Token::Close, at)) => Err(FilterError::at(at, "a `)` where a primitive belongs")),
            Some((Token::And | Token::Or, at)) => Err(FilterError::at(
                at,
                "`and`/`or` needs a primitive on each side",
            )),
            None => Err(FilterError::at(
                self.len,
                format!("the expression ends where a primitive belongs ({SUPPORTED})"),
            )),
        }
    }

    fn primitive(&mut self, word: &str, at: usize) -> Result<Expr, FilterError> {
        let mut qualifiers = Qualifiers::default();
        let mut word = (word.to_owned(), at);
        if let Some(proto) = proto_qualifier(&word.0) {
            qualifiers.proto = Some(proto);
            match self.peek_word() {
                Some("proto") if matches!(proto, Proto::Ether | Proto::Ip | Proto::Ip6) => {
                    self.advance();
                    return self.protocol_number(Some(proto), &word.0);
                }
                Some(next) if is_dir(next) || kind(next).is_some() => {
                    let Some((Token::Word(next), next_at)) = self.advance() else {
                        unreachable!("peeked a word");
                    };
                    word = (next, next_at);
                }
                _ => return standalone(proto, &word.0, at),
            }
        } else {
            match word.0.as_str() {
                "icmp" => return Ok(fields(Some(ETHERTYPE_IPV4), Some(1))),
                "icmp6" => return Ok(fields(Some(ETHERTYPE_IPV6), Some(58))),
                // IPv4's alone, as tcpdump's; PIM over both.
                "igmp" => return Ok(fields(Some(ETHERTYPE_IPV4), Some(2))),
                "igrp" => return Ok(fields(Some(ETHERTYPE_IPV4), Some(9))),
                "vrrp" => return Ok(fields(Some(ETHERTYPE_IPV4), Some(112))),
                "pim" => return Ok(fields(None, Some(103))),
                "proto" => return self.protocol_number(None, "proto"),
                "vlan" => return self.vlan(word.1),
                _ => {}
            }
        }
        if is_dir(&word.0) {
            qualifiers.dir = Some(self.direction(&word.0));
            word = self.value_word(&word.0, word.1)?;
        }
        if let Some(kind) = kind(&word.0) {
            qualifiers.kind = Some(kind);
            word = self.value_word(&word.0, word.1)?;
        } else if qualifiers.proto.is_none() && qualifiers.dir.is_none() {
            // A bare value: the qualifiers of the primitive before it, as in tcpdump.
            if let Some(last) = self.last {
                qualifiers = last;
            } else if word.0.parse::<IpAddr>().is_err() {
                return Err(FilterError::at(
                    at,
                    format!("`{}` is not supported ({SUPPORTED})", word.0),
                ));
            }
        }
        self.last = Some(qualifiers);
        self.value(qualifiers, &word.0, word.1)
    }

    /// `read` one level deeper (inside a `(` or `not` at `at`), within [`MAX_NESTING`].
    fn nested(
        &mut self,
        at: usize,
        read: impl FnOnce(&mut Self) -> Result<Expr, FilterError>,
    ) -> Result<Expr, FilterError> {
        if self.depth == MAX_NESTING {
            return Err(FilterError::at(
                at,
                format!("parentheses and `not`s nest more than {MAX_NESTING} deep"),
            ));
        }
        self.depth += 1;
        let inner = read(self);
        self.depth -= 1;
        inner
    }

    /// `src`, `dst`, `src or dst`, `src and dst` (the words are taken, the first given).
    fn direction(&mut self, first: &str) -> Dir {
        let other = if first == "src" { "dst" } else { "src" };
        let joined = match (self.peek(), self.tokens.get(self.next + 1)) {
            (Some((operator @ (Token::And | Token::Or), _)), Some((Token::Word(w), _)))
                if w == other =>
            {
                Some(operator)
            }
            _ => None,
        };
        match joined {
            Some(operator) => {
                self.next += 2;
                if operator == Token::And {
                    Dir::SrcAndDst
                } else {
                    Dir::SrcOrDst
                }
            }
            None if first == "src" => Dir::Src,
            None => Dir::Dst,
        }
    }

    /// The word after a qualifier, which must be there.
    fn value_word(&mut self, after: &str, at: usize) -> Result<(String, usize), FilterError> {
        match self.advance() {
            Some((Token::Word(word), word_at)) => Ok((word, word_at)),
            _ => Err(FilterError::at(
                at,
                format!("`{after}` needs a value after it"),
            )),
        }
    }

    /// `vlan` or `vlan N`.
    fn vlan(&mut self, at: usize) -> Result<Expr, FilterError> {
        if std::mem::replace(&mut self.vlan_seen, true) {
            return Err(FilterError::at(
                at,
                "a second `vlan` reads the next tag (a VLAN stack), which the rule tables cannot \
                 hold",
            ));
        }
        let id = self
            .peek_word()
            .and_then(|w| w.parse::<u16>().ok())
            .filter(|id| *id < 4096);
        if id.is_some() {
            self.advance();
        }
        Ok(Expr::Fields(Fields {
            vlan: Some(id.map_or(ANY_VLAN, |id| id..=id)),
            ..Fields::default()
        }))
    }

    /// The number after `ether proto`, `ip proto`, `ip6 proto` or `proto`.
    fn protocol_number(&mut self, proto: Option<Proto>, said: &str) -> Result<Expr, FilterError> {
        let (word, at) = self.value_word(said, self.tokens[self.next - 1].1)?;
        let name = word.strip_prefix('\\').unwrap_or(&word);
        if proto == Some(Proto::Ether) {
            let ethertype = match name {
                "ip" => Some(ETHERTYPE_IPV4),
                "ip6" => Some(ETHERTYPE_IPV6),
                "arp" => Some(ETHERTYPE_ARP),
                _ => number(name),
            };
            return ethertype.map(|e| fields(Some(e), None)).ok_or_else(|| {
                FilterError::at(
                    at,
                    format!("`{word}` is not an ethertype (a number, \\ip, \\ip6 or \\arp)"),
                )
            });
        }
        let ip_proto = match name {
            "icmp" => Some(1),
            "igmp" => Some(2),
            "tcp" => Some(6),
            "udp" => Some(17),
            "esp" => Some(50),
            "ah" => Some(51),
            "icmp6" => Some(58),
            "pim" => Some(103),
            "vrrp" => Some(112),
            "sctp" => Some(132),
            _ => number(name),
        };
        let ip_proto = ip_proto.ok_or_else(|| {
            FilterError::at(
                at,
                format!("`{word}` is not an IP protocol (0-255, or a name such as \\tcp)"),
            )
        })?;
        let ethertype = match proto {
            Some(Proto::Ip) => Some(ETHERTYPE_IPV4),
            Some(Proto::Ip6) => Some(ETHERTYPE_IPV6),
            _ => None,
        };
        Ok(fields(ethertype, Some(ip_proto)))
    }

    /// A primitive that names a value: a host, net, port or port range.
    fn value(&mut self, q: Qualifiers, word: &str, at: usize) -> Result<Expr, FilterError> {
        let kind = q.kind.unwrap_or(Kind::Host);
        let base = match (q.proto, kind) {
            (Some(Proto::Ether), _) => {
                return Err(FilterError::at(
                    at,
                    "`ether host`, `ether src` and `ether dst` (MAC addresses) are not supported",
                ));
            }
            (Some(Proto::Arp), _) => {
                return Err(FilterError::at(
                    at,
                    "`arp host`/`arp net` (addresses inside ARP) are not supported",
                ));
            }
            (Some(p @ (Proto::Tcp | Proto::Udp | Proto::Sctp)), Kind::Host | Kind::Net) => {
                return Err(FilterError::at(
                    at,
                    format!(
                        "`{}` does not qualify a host or net: write `{} and host …`",
                        proto_name(p),
                        proto_name(p)
                    ),
                ));
            }
            (Some(Proto::Tcp), _) => protocol(None, Some(6)),
            (Some(Proto::Udp), _) => protocol(None, Some(17)),
            (Some(Proto::Sctp), _) => protocol(None, Some(132)),
            (Some(Proto::Ip), _) => protocol(Some(ETHERTYPE_IPV4), None),
            (Some(Proto::Ip6), _) => protocol(Some(ETHERTYPE_IPV6), None),
            (None, _) => Fields::default(),
        };
        let condition = match kind {
            Kind::Host => {
                let address: IpAddr = word.parse().map_err(|_| {
                    let hint = if word.contains('/') {
                        "`host` takes one address; for a prefix write `net …`"
                    } else {
                        "not an IP address (host names are not looked up)"
                    };
                    FilterError::at(at, format!("`{word}`: {hint}"))
                })?;
                Condition::Address(IpNet::from(address))
            }
            Kind::Net => Condition::Address(self.net(word, at)?),
            Kind::Port => {
                let port = port(word, at)?;
                Condition::Ports(port..=port)
            }
            Kind::PortRange => {
                let range = word.split_once('-').ok_or_else(|| {
                    FilterError::at(at, format!("`{word}`: a port range is `low-high`"))
                })?;
                let (low, high) = (port(range.0, at)?, port(range.1, at)?);
                if low > high {
                    return Err(FilterError::at(at, format!("`{word}`: the range is empty")));
                }
                Condition::Ports(low..=high)
            }
        };
        let one_side = |source: bool| -> Result<Expr, FilterError> {
            let mut side = base.clone();
            match (&condition, source) {
                (Condition::Address(net), true) => side.src = Some(*net),
                (Condition::Address(net), false) => side.dst = Some(*net),
                (Condition::Ports(range), true) => side.src_port = Some(range.clone()),
                (Condition::Ports(range), false) => side.dst_port = Some(range.clone()),
            }
            if let Some(why) = side.contradiction() {
                return Err(FilterError::at(
                    at,
                    format!("`{word}` can never match: {why}"),
                ));
            }
            Ok(Expr::Fields(side))
        };
        Ok(match q.dir.unwrap_or(Dir::SrcOrDst) {
            Dir::Src => one_side(true)?,
            Dir::Dst => one_side(false)?,
            Dir::SrcOrDst => Expr::Or(Box::new(one_side(true)?), Box::new(one_side(false)?)),
            Dir::SrcAndDst => Expr::And(Box::new(one_side(true)?), Box::new(one_side(false)?)),
        })
    }

    /// `10.0.0.0/8`, `2001:db8::/32`, `10.1` (a /16, as tcpdump reads it), an address (a /32 or
    /// /128), each optionally followed by `mask 255.255.0.0`.
    fn net(&mut self, word: &str, at: usize) -> Result<IpNet, FilterError> {
        let bad = |why: &str| FilterError::at(at, format!("`{word}`: {why}"));
        let net = if let Ok(net) = word.parse::<IpNet>() {
            net
        } else if let Ok(address) = word.parse::<IpAddr>() {
            IpNet::from(address)
        } else {
            let octets: Vec<u8> = word
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| bad("not a network (10.0.0.0/8, 10.1, 2001:db8::/32)"))?;
            if octets.len() > 3 {
                return Err(bad("not a network"));
            }
            let mut bytes = [0; 4];
            bytes[..octets.len()].copy_from_slice(&octets);
            let len = u8::try_from(octets.len() * 8).map_err(|_| bad("not a network"))?;
            IpNet::new(Ipv4Addr::from(bytes).into(), len).map_err(|_| bad("not a network"))?
        };
        let net = if self.peek_word() == Some("mask") {
            self.advance();
            let (mask, mask_at) = self.value_word("mask", at)?;
            let mask: Ipv4Addr = mask.parse().map_err(|_| {
                FilterError::at(mask_at, format!("`{mask}` is not an IPv4 netmask"))
            })?;
            let bits = u32::from(mask);
            if bits.leading_ones() + bits.trailing_zeros() != 32 || !net.addr().is_ipv4() {
                return Err(FilterError::at(
                    mask_at,
                    format!("`{mask}` is not a contiguous IPv4 netmask for an IPv4 network"),
                ));
            }
            IpNet::new(net.addr(), bits.leading_ones() as u8).map_err(|_| bad("not a network"))?
        } else {
            net
        };
        if net.trunc() != net {
            return Err(bad(&format!(
                "non-network bits are set (did you mean {}?)",
                net.trunc()
            )));
        }
        Ok(net)
    }
}

enum Condition {
    Address(IpNet),
    Ports(std::ops::RangeInclusive<u16>),
}

fn protocol(ethertype: Option<u16>, proto: Option<u8>) -> Fields {
    Fields {
        ethertype,
        proto,
        ..Fields::default()
    }
}

fn fields(ethertype: Option<u16>, proto: Option<u8>) -> Expr {
    Expr::Fields(protocol(ethertype, proto))
}

fn proto_qualifier(word: &str) -> Option<Proto> {
    Some(match word {
        "ether" => Proto::Ether,
        "ip" => Proto::Ip,
        "ip6" => Proto::Ip6,
        "arp" => Proto::Arp,
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "sctp" => Proto::Sctp,
        _ => return None,
    })
}

fn proto_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Ether => "ether",
        Proto::Ip => "ip",
        Proto::Ip6 => "ip6",
        Proto::Arp => "arp",
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Sctp => "sctp",
    }
}

/// `tcp`, `ip`, … on their own.
fn standalone(proto: Proto, word: &str, at: usize) -> Result<Expr, FilterError> {
    Ok(match proto {
        Proto::Ether => {
            return Err(FilterError::at(
                at,
                format!("`{word}` alone is not a primitive: write `ether proto N`"),
            ));
        }
        Proto::Ip => fields(Some(ETHERTYPE_IPV4), None),
        Proto::Ip6 => fields(Some(ETHERTYPE_IPV6), None),
        Proto::Arp => fields(Some(ETHERTYPE_ARP), None),
        Proto::Tcp => fields(None, Some(6)),
        Proto::Udp => fields(None, Some(17)),
        Proto::Sctp => fields(None, Some(132)),
    })
}

fn is_dir(word: &str) -> bool {
    matches!(word, "src" | "dst")
}

fn kind(word: &str) -> Option<Kind> {
    Some(match word {
        "host" => Kind::Host,
        "net" => Kind::Net,
        "port" => Kind::Port,
        "portrange" => Kind::PortRange,
        _ => return None,
    })
}

/// A decimal or `0x` hexadecimal number.
fn number<T: TryFrom<u32>>(word: &str) -> Option<T> {
    let value = match word.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
        None => word.parse().ok()?,
    };
    T::try_from(value).ok()
}

fn port(word: &str, at: usize) -> Result<u16, FilterError> {
    word.parse().map_err(|_| {
        FilterError::at(
            at,
            format!("`{word}` is not a port number (0-65535; service names are not looked up)"),
        )
    })
}
