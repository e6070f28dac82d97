//! The validated model of a configuration (the plan), and how a configuration becomes one:
//! [`validate`] checks it against the interfaces present, [`shadow`] warns about rules that earlier
//! rules hide, [`compile`] turns the rules into the kernel's lookup tables (the bit-vector design
//! is described in `mirror_common`), and [`fingerprint`] tells which sessions a reload left
//! unchanged. Pure: given the interfaces present, a configuration either becomes a complete plan
//! or an error, so nothing is applied from a configuration that fails here.
mod compile;
mod fields;
pub mod filter;
mod fingerprint;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
pub(crate) mod model;
mod shadow;
#[cfg(test)]
mod tests;
mod validate;

use ipnet::IpNet;
use mirror_common::{Action, Direction, FIELD_COUNT, RateLimit, RuleBitmap, RuleMeta};

pub use self::{
    compile::sessions_bitmap,
    fields::{ANY_VLAN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, Fields, Header},
    fingerprint::fingerprints,
    validate::plan,
};
use crate::{
    config::{ActionConfig, PodSelector},
    encap::TunnelTarget,
};

/// A network interface present on the node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
}

/// One rule after validation; `None` fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub session: usize,
    pub kind: RuleKind,
    pub action: ActionConfig,
    pub fields: Fields,
}

impl Rule {
    /// A session's default rule that skips: in no rule bitmap, so that a packet no other
    /// rule matches leaves the classifier without a walk or a counter write. The agent counts its
    /// packets instead, from the attachments' traffic (see `mirror_common::WATCH_TRAFFIC_MAP`).
    pub fn counted_by_agent(&self) -> bool {
        self.kind == RuleKind::Default && self.action == ActionConfig::Skip
    }
}

/// Where a rule comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RuleKind {
    /// A configured rule with its number (a rule with `host`, `net` or `port` is several of these,
    /// one for each direction).
    Numbered(u32),
    /// The rules a session's `filter` expression became, numbered from 1 in their order.
    Filter(u32),
    /// Put first in every session when any session has a tunnel target: skips the outer packets
    /// of the agent's own tunnels, so copies are never mirrored again.
    TunnelGuard,
    /// The session's implicit last rule, with its default action.
    #[default]
    Default,
}

impl std::fmt::Display for RuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleKind::Numbered(n) => write!(f, "{n}"),
            RuleKind::Filter(n) => write!(f, "filter-{n}"),
            RuleKind::TunnelGuard => f.write_str("guard"),
            RuleKind::Default => f.write_str("default"),
        }
    }
}

fn action_abi(action: ActionConfig) -> Action {
    match action {
        ActionConfig::Skip => Action::Skip,
        ActionConfig::Mirror => Action::Mirror,
    }
}

/// Where a session's copies go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Interface(Interface),
    Tunnel(TunnelTarget),
    File(FileTarget),
    /// `mirror-agent capture` watchers only (an ad-hoc capture's session).
    Watch,
}

/// A pcap or pcapng file the agent writes copies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTarget {
    pub path: std::path::PathBuf,
    pub rotate_bytes: Option<u64>,
    pub rotate_count: Option<u64>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Interface(i) => write!(f, "interface {}", i.name),
            Target::Tunnel(t) => t.fmt(f),
            Target::File(file) => write!(f, "file {}", file.path.display()),
            Target::Watch => f.write_str("live capture"),
        }
    }
}

/// What a session does to the copies its rules select: sampling, then size, then rate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controls {
    /// Copies are cut to this many bytes.
    pub snaplen: Option<u32>,
    /// `SAMPLE_ALL`, `SAMPLE_PACKETS` or `SAMPLE_FLOWS`, 1 in `every`, and the flow hash seed.
    pub sample_mode: u32,
    pub sample_every: u32,
    pub sample_seed: u32,
    pub rate: RateLimit,
    /// No copy of a packet the parser could not finish (see `SessionConfig::unparsed`).
    pub skip_unparsed: bool,
}

/// A session after validation.
#[derive(Debug, Clone)]
pub struct Session {
    pub name: String,
    pub target: Target,
    pub controls: Controls,
    /// Interfaces and directions watched, sorted.
    pub attachments: Vec<(Interface, Direction)>,
    /// The session's interface globs, which interfaces created later may match.
    pub globs: Vec<glob::Pattern>,
    /// The pods the session watches instead of named interfaces; its attachments are their
    /// host-side interfaces when the plan was made.
    pub pods: Option<PodSelector>,
    /// The directions watched ([`Direction::XdpIngress`] alone for an XDP session).
    pub directions: Vec<Direction>,
    /// Copies go through the ring buffer and the agent sends them on: an XDP session, or a file
    /// target.
    pub through_ring: bool,
}

/// Everything the agent applies: sessions, rules in global order, and the kernel tables.
#[derive(Debug)]
pub struct Plan {
    pub sessions: Vec<Session>,
    /// The budget all sessions share.
    pub node_rate: RateLimit,
    /// Size of the ring buffer of copies the agent sends on.
    pub copy_ring_bytes: u32,
    pub rules: Vec<Rule>,
    pub tables: Tables,
    pub warnings: Vec<String>,
}

/// An attachment's entry: the bitmap of the rules of the sessions watching it (by index), and
/// those sessions.
#[derive(Debug)]
pub struct AttachmentTable {
    pub ifindex: u32,
    pub direction: Direction,
    pub bitmap: u32,
    pub sessions: Vec<usize>,
}

/// The contents of the kernel's lookup maps. A field no rule constrains has an empty table and
/// [`UNCONSTRAINED`] as its wildcard.
#[derive(Debug, Default)]
pub struct Tables {
    pub bitmaps: Vec<RuleBitmap>,
    pub wildcard: [u32; FIELD_COUNT],
    pub attachments: Vec<AttachmentTable>,
    /// Direct arrays by value; empty when no rule constrains the field.
    pub ethertype: Vec<u32>,
    pub vlan: Vec<u32>,
    pub ip_proto: Vec<u32>,
    pub src_ip: Vec<(IpNet, u32)>,
    pub dst_ip: Vec<(IpNet, u32)>,
    pub src_port: Vec<u32>,
    pub dst_port: Vec<u32>,
    pub rules: Vec<RuleMeta>,
}
