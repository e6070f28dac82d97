//! What the agent reports of itself, as the API serves it in JSON (`GET /stats`, `GET /status`)
//! and the CLI reads it.
use mirror_common::{Counters, Direction, HookCounters};
use serde::{Deserialize, Serialize};

use crate::{
    config::ActionConfig,
    targets::{
        TargetCounters, TargetView, TunnelView, TxLosses, observe::HttpStats, shadow::ShadowStats,
        watch::WatcherView,
    },
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleStats {
    pub rule: String,
    /// What the rule does with the packets it decides.
    #[serde(default)]
    pub action: ActionConfig,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStats {
    pub name: String,
    pub counters: Counters,
    /// What the agent counted of its target in userspace, in this configuration.
    #[serde(default)]
    pub target: TargetCounters,
    /// A shadow target's requests: replayed, lost by reason, compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStats>,
    /// An observed session's services: requests by method and status class, durations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpStats>,
    pub rules: Vec<RuleStats>,
}

/// `GET /stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// The configuration generation the counters are of.
    pub generation: u64,
    pub sessions: Vec<SessionStats>,
    pub ingress: HookCounters,
    pub egress: HookCounters,
    pub xdp: HookCounters,
    pub copy: HookCounters,
    /// Copies lost after they left the programs, per interface they leave by (read with the
    /// counters by [`Shared::reading`]).
    #[serde(default)]
    pub targets: Vec<TxLosses>,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// Which configuration is applied: 1 at the start (in pinned mode, one more than the agent
    /// before), one more with every reload.
    pub generation: u64,
    pub uptime_seconds: u64,
    pub hooks_attached: usize,
    /// The (interface, direction) hooks attached now, including interfaces that appeared later.
    pub attached: Vec<(String, String)>,
    /// (name, kernel program id) of the programs of this generation.
    pub programs: Vec<(String, u32)>,
    pub sessions: Vec<SessionView>,
    /// The pods pod-selector sessions select.
    #[serde(default)]
    pub pods: Vec<SelectedPod>,
    /// Where each tunnel session's copies leave now.
    #[serde(default)]
    pub tunnels: Vec<TunnelView>,
    /// The live captures (`mirror-agent capture`) running now.
    #[serde(default)]
    pub captures: Vec<WatcherView>,
}

/// A pod that pod-selector sessions select, and the interface watched for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectedPod {
    /// `namespace/name`.
    pub pod: String,
    pub ips: Vec<std::net::IpAddr>,
    /// Its host-side interface, watched for these sessions.
    pub interface: Option<String>,
    /// Why no interface is watched for it.
    pub problem: Option<String>,
    pub sessions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionView {
    pub name: String,
    pub target: TargetView,
    /// The session watches pods (`pods = {…}`), not named interfaces.
    #[serde(default)]
    pub selects_pods: bool,
    /// (interface, direction) pairs watched.
    pub hooks: Vec<(String, String)>,
}

pub fn direction_name(direction: Direction) -> String {
    match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
        Direction::XdpIngress => "xdp",
    }
    .to_owned()
}
