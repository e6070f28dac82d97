//! The validated model of a configuration (the plan), and how a configuration becomes one:
//! [`validate`] checks it against the interfaces present (and [`host`] on this host), [`hidden`]
//! warns about rules that earlier rules hide, [`compile`] turns the rules into the kernel's lookup tables (the bit-vector design
//! is described in `mirror_common`), and [`fingerprint`] tells which sessions a reload left
//! unchanged. Pure: given the interfaces present, a configuration either becomes a complete plan
//! or an error, so nothing is applied from a configuration that fails here.
mod compile;
mod fields;
pub mod filter;
mod fingerprint;
#[cfg(test)]
mod fuzz;
mod hidden;
mod host;
#[cfg(test)]
pub(crate) mod model;
#[cfg(test)]
mod tests;
mod validate;

use ipnet::IpNet;
use mirror_common::{Action, Direction, FIELD_COUNT, RateLimit, RuleBitmap, RuleMeta, SessionMeta};

pub use self::{
    compile::sessions_bitmap,
    fields::{ANY_VLAN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, Fields, Header, InTcpdumpWords},
    fingerprint::fingerprints,
    host::{plan_on_host, plan_selecting},
    validate::plan,
};
pub use crate::targets::Interface;
use crate::{
    config::{ActionConfig, PodSelector},
    targets::{SessionTarget, Target},
};

/// One rule after validation; `None` fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub session: usize,
    pub kind: RuleKind,
    pub action: ActionConfig,
    pub fields: Fields,
    /// A filter program that must also accept the packet (an expression beyond the rule tables).
    pub program: Option<std::sync::Arc<filter::Program>>,
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

impl Controls {
    /// The controls' fields of a session's kernel entry (the target fills in the rest).
    fn kernel(&self) -> SessionMeta {
        SessionMeta {
            sample_mode: self.sample_mode,
            sample_every: self.sample_every,
            sample_seed: self.sample_seed,
            skip_unparsed: u32::from(self.skip_unparsed),
            rate: self.rate,
            ..SessionMeta::default()
        }
    }
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
    /// Copies go through the ring buffer and the agent sends them on: an XDP session, or a
    /// ring-fed target (see [`Target::through_ring`]).
    pub through_ring: bool,
}

impl Session {
    /// What the targets need of the session.
    pub fn target_input(&self) -> SessionTarget<'_> {
        SessionTarget {
            name: &self.name,
            target: &self.target,
            through_ring: self.through_ring,
            controls: self.controls.kernel(),
            snaplen: self.controls.snaplen,
        }
    }
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
    /// Per field, the rules that may decide a packet whose field was not reached.
    pub unknown: [u32; FIELD_COUNT],
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
    /// The distinct filter programs, by the index the rules' `program` names (less one).
    pub programs: Vec<std::sync::Arc<filter::Program>>,
}
