//! One applied configuration: its datapath, ring drain, followers' state and targets, what the
//! API reports of it, and the counters carried across reloads.
use mirror_common::{Counters, Direction, HOOK_COUNT, HookCounters, Traffic};

use super::{Follow, RuleStats, SelectedPod, SessionStats, SessionView, Stats, direction_name};
use crate::{
    datapath::Datapath,
    rules::{self, Plan},
    targets::{
        TargetCounters, Targets, TunnelView,
        observe::{HttpStats, Observed},
        ring::RingDrain,
        shadow::{ShadowStats, Shared},
    },
};

/// One applied configuration: its datapath, what the API reports of it, and the counters its
/// unchanged sessions carried over from the configurations before it.
#[derive(Debug)]
pub struct Applied {
    pub datapath: Datapath,
    /// Sends the ring copies on (XDP sessions, ring-fed targets); stops once it has sent what is
    /// queued when dropped.
    pub drain: Option<RingDrain>,
    pub(crate) view: PlanView,
    carried: Carried,
    /// What the follower needs to watch interfaces that appear later.
    pub follow: Option<Follow>,
    /// The targets as they are now: tunnels' hops (kept current by `follow::routes`) and
    /// target interfaces' indexes (by `follow::links`).
    pub targets: Targets,
    /// The pods pod-selector sessions select now, and where they were found.
    pub pods: Vec<SelectedPod>,
    /// By session, the counters of its default rule last reported where the agent counts them:
    /// derived from counters read one after the other under traffic, they are never reported
    /// lower than before, so that they only grow as counters do.
    counted_defaults: std::sync::Mutex<Vec<Counters>>,
}

/// Counters carried over from earlier generations, added to the live ones.
#[derive(Debug, Default)]
struct Carried {
    sessions: Vec<Counters>,
    rules: Vec<Counters>,
    /// Per session, what the agent counted of its target.
    targets: Vec<TargetCounters>,
    /// The hooks' counters, of every generation before (whatever changed).
    hooks: [HookCounters; HOOK_COUNT as usize],
    /// Per session, what its shadow counted before this generation.
    shadows: Vec<Earlier<Shared>>,
    /// Per session, what it observed of its services before this generation.
    observed: Vec<Earlier<Observed>>,
}

/// What a session's stream reader (a shadow, an observer) counts, read as it goes on.
trait Live: Clone {
    type Stats: Default + Clone;
    fn read(&self) -> Self::Stats;
    /// Adds `earlier` to `stats`.
    fn absorb(stats: &mut Self::Stats, earlier: &Self::Stats);
}

impl Live for Shared {
    type Stats = ShadowStats;
    fn read(&self) -> ShadowStats {
        Shared::read(self)
    }
    fn absorb(stats: &mut ShadowStats, earlier: &ShadowStats) {
        stats.absorb(earlier);
    }
}

impl Live for Observed {
    type Stats = HttpStats;
    fn read(&self) -> HttpStats {
        Observed::read(self)
    }
    fn absorb(stats: &mut HttpStats, earlier: &HttpStats) {
        stats.absorb(earlier);
    }
}

/// What a session's reader counted in the generation just replaced (read as it goes on: its
/// replays may still be finishing), and in those before it (final by then: a generation's drain
/// and replays end when it is dropped, after its successor took over).
#[derive(Debug, Clone)]
struct Earlier<L: Live> {
    last: Option<L>,
    before: L::Stats,
}

impl<L: Live> Default for Earlier<L> {
    fn default() -> Self {
        Earlier {
            last: None,
            before: L::Stats::default(),
        }
    }
}

impl<L: Live> Earlier<L> {
    fn read(&self) -> L::Stats {
        let mut stats = self.last.as_ref().map(L::read).unwrap_or_default();
        L::absorb(&mut stats, &self.before);
        stats
    }

    /// What session `old` of the replaced generation counted until now, `live` its reader then.
    fn of(carried: &[Earlier<L>], live: &[Option<L>], old: usize) -> Self {
        Earlier {
            last: live.get(old).cloned().flatten(),
            before: carried.get(old).map(Earlier::read).unwrap_or_default(),
        }
    }

    /// Session `index`'s count now: its `live` reader's, and what it counted before.
    fn with_live(carried: &[Earlier<L>], live: &[Option<L>], index: usize) -> Option<L::Stats> {
        let mut stats = live.get(index)?.as_ref()?.read();
        if let Some(earlier) = carried.get(index) {
            L::absorb(&mut stats, &earlier.read());
        }
        Some(stats)
    }
}

/// The parts of a plan the API reports (the compiled tables are gone by then).
#[derive(Debug)]
pub(crate) struct PlanView {
    pub(crate) sessions: Vec<SessionView>,
    /// (session index, rule label) of each configured rule, in global order.
    rules: Vec<(usize, String)>,
    /// By row of `rules`, its action.
    actions: Vec<crate::config::ActionConfig>,
    /// By kernel rule index, the configured rule it belongs to (an index into `rules`): a rule
    /// with `host` or `port` is one kernel rule per direction, counted as one.
    kernel_rules: Vec<usize>,
    /// Per session: what it is made of; equal fingerprints across a reload mean an unchanged
    /// session, whose counters go on.
    fingerprints: Vec<String>,
    /// Per session, the row of its default rule when the agent counts it (see
    /// [`rules::Rule::counted_by_agent`]).
    counted_defaults: Vec<Option<usize>>,
}

impl PlanView {
    fn of(plan: &Plan) -> Self {
        let mut rules: Vec<(usize, String)> = Vec::new();
        let mut actions = Vec::new();
        let mut kernel_rules = Vec::with_capacity(plan.rules.len());
        let mut counted_defaults = vec![None; plan.sessions.len()];
        for rule in &plan.rules {
            let row = (rule.session, rule.kind.to_string());
            // The kernel rules of one configured rule are next to each other.
            if rules.last() != Some(&row) {
                rules.push(row);
                actions.push(rule.action);
            }
            kernel_rules.push(rules.len() - 1);
            if rule.counted_by_agent() {
                counted_defaults[rule.session] = Some(rules.len() - 1);
            }
        }
        PlanView {
            sessions: plan
                .sessions
                .iter()
                .map(|s| SessionView {
                    name: s.name.clone(),
                    target: s.target.view(),
                    selects_pods: s.pods.is_some(),
                    hooks: s
                        .attachments
                        .iter()
                        .map(|(i, d)| (i.name.clone(), direction_name(*d)))
                        .collect(),
                })
                .collect(),
            rules,
            actions,
            kernel_rules,
            fingerprints: rules::fingerprints(plan),
            counted_defaults,
        }
    }
}

impl Applied {
    /// A configuration applied afresh (see [`Applied::succeed`] for one that replaces another).
    pub fn new(
        datapath: Datapath,
        drain: Option<RingDrain>,
        plan: &Plan,
        follow: Option<Follow>,
        targets: Targets,
    ) -> Self {
        Applied {
            datapath,
            drain,
            view: PlanView::of(plan),
            carried: Carried::default(),
            follow,
            targets,
            pods: Vec::new(),
            counted_defaults: std::sync::Mutex::default(),
        }
    }

    /// `next`, the configuration that replaces `self` (its datapath has taken over), with the
    /// counters of `self` (final: its programs are detached) going on in the sessions that did not
    /// change, and the pods `self` found.
    pub fn succeed(&self, next: Applied) -> Self {
        let before = self.stats().unwrap_or_else(|e| {
            tracing::warn!("reading the replaced configuration's counters: {e:#}");
            Stats::default()
        });
        let view = &next.view;
        let mut carried = Carried {
            sessions: vec![Counters::default(); view.sessions.len()],
            rules: vec![Counters::default(); view.rules.len()],
            targets: vec![TargetCounters::default(); view.sessions.len()],
            hooks: hook_array(&before),
            shadows: vec![Earlier::default(); view.sessions.len()],
            observed: vec![Earlier::default(); view.sessions.len()],
        };
        let live_shadows = self.drain.as_ref().map_or(&[][..], |d| d.shadows());
        let live_observed = self.drain.as_ref().map_or(&[][..], |d| d.observed());
        for (index, fingerprint) in view.fingerprints.iter().enumerate() {
            let Some(old) = self.view.fingerprints.iter().position(|f| f == fingerprint) else {
                continue;
            };
            let Some(old_stats) = before.sessions.get(old) else {
                continue;
            };
            carried.sessions[index] = old_stats.counters;
            carried.targets[index] = old_stats.target;
            carried.shadows[index] = Earlier::of(&self.carried.shadows, live_shadows, old);
            carried.observed[index] = Earlier::of(&self.carried.observed, live_observed, old);
            // An unchanged session has the same rules in the same order.
            let rules = view
                .rules
                .iter()
                .enumerate()
                .filter(|(_, (s, _))| *s == index);
            for ((rule, _), old_rule) in rules.zip(&old_stats.rules) {
                carried.rules[rule] = old_rule.counters;
            }
        }
        Applied {
            carried,
            pods: self.pods.clone(),
            ..next
        }
    }

    /// Sets each session's `watched` flag in the kernel to whether `watchers` watch it.
    pub fn sync_watched(&mut self, watchers: &crate::targets::watch::Watchers) {
        for (index, session) in self.view.sessions.iter().enumerate() {
            let watched = watchers.watches(&session.name);
            if let Err(e) = self.datapath.set_watched(index as u32, watched) {
                tracing::warn!("session `{}`: (un)marking it watched: {e}", session.name);
            }
        }
    }

    /// Per session, the (interface, direction) hooks it watches now: those of the plan, and those
    /// of interfaces that appeared or pods selected since.
    pub(crate) fn session_hooks(&self) -> Vec<Vec<(String, String)>> {
        let Some(follow) = &self.follow else {
            return self.view.sessions.iter().map(|s| s.hooks.clone()).collect();
        };
        let mut hooks = vec![Vec::new(); self.view.sessions.len()];
        for (interface, direction) in self.datapath.attached() {
            for session in follow.sessions_watching(&interface, direction) {
                if let Some(list) = hooks.get_mut(session) {
                    list.push((interface.clone(), direction_name(direction)));
                }
            }
        }
        hooks
    }

    /// Where each tunnel session's copies leave now, or why they cannot.
    pub fn tunnels(&self) -> Vec<TunnelView> {
        self.targets.tunnels.views()
    }

    /// Per session, what the agent counted of its target: the ring drain's counts and the
    /// tunnels' hop changes.
    fn target_counters(&self) -> Vec<TargetCounters> {
        let mut counters = self
            .drain
            .as_ref()
            .map(RingDrain::counters)
            .unwrap_or_default();
        counters.resize(self.view.sessions.len(), TargetCounters::default());
        for (session, changes) in self.targets.tunnels.hop_changes() {
            if let Some(counters) = counters.get_mut(session as usize) {
                counters.hop_changes = changes;
            }
        }
        counters
    }

    /// Every counter, summed over CPUs, plus what earlier generations carried over.
    pub fn stats(&self) -> anyhow::Result<Stats> {
        // The traffic first: a packet counted after it is read can only be missing from the
        // default rules' share, never counted there and again by the rule that decides it.
        let traffic = self.datapath.watch_traffic()?;
        let mut sessions = self.datapath.session_counters(self.view.sessions.len())?;
        let mut rules = vec![Counters::default(); self.view.rules.len()];
        let mut kernel = self.datapath.rule_counters(self.view.kernel_rules.len())?;
        let past_count = self
            .drain
            .as_ref()
            .map(RingDrain::past_count)
            .unwrap_or_default();
        for (&(session, rule), &(copies, bytes)) in &past_count {
            for counters in [
                kernel.get_mut(rule as usize),
                sessions.get_mut(session as usize),
            ]
            .into_iter()
            .flatten()
            {
                counters.mirrored = counters.mirrored.saturating_sub(copies);
                counters.mirrored_bytes = counters.mirrored_bytes.saturating_sub(bytes);
            }
        }
        for (counters, &row) in kernel.iter().zip(&self.view.kernel_rules) {
            rules[row] += *counters;
        }
        let mut hooks = self.datapath.hook_counters()?;
        let mut seen = vec![Traffic::default(); sessions.len()];
        for (group, traffic) in traffic {
            for &session in &group.sessions {
                if let Some(seen) = seen.get_mut(session) {
                    *seen += traffic;
                }
            }
            if let Some(hook) = hooks.get_mut(group.direction as usize) {
                hook.packets += traffic.packets;
            }
        }
        self.count_defaults(&seen, &mut sessions, &mut rules);
        let targets = self.target_counters();
        let live_shadows = self.drain.as_ref().map_or(&[][..], |d| d.shadows());
        let live_observed = self.drain.as_ref().map_or(&[][..], |d| d.observed());
        let hook = |i: usize| {
            hooks.get(i).copied().unwrap_or_default()
                + self.carried.hooks.get(i).copied().unwrap_or_default()
        };
        let carried = |list: &[Counters], i: usize| list.get(i).copied().unwrap_or_default();
        Ok(Stats {
            generation: self.datapath.generation(),
            sessions: self
                .view
                .sessions
                .iter()
                .zip(&sessions)
                .zip(targets)
                .enumerate()
                .map(|(index, ((view, counters), target))| SessionStats {
                    name: view.name.clone(),
                    counters: *counters + carried(&self.carried.sessions, index),
                    target: target + self.carried.targets.get(index).copied().unwrap_or_default(),
                    shadow: Earlier::with_live(&self.carried.shadows, live_shadows, index),
                    http: Earlier::with_live(&self.carried.observed, live_observed, index),
                    rules: self
                        .view
                        .rules
                        .iter()
                        .zip(&rules)
                        .enumerate()
                        .filter(|(_, ((session, _), _))| *session == index)
                        .map(|(rule, ((_, label), counters))| RuleStats {
                            rule: label.clone(),
                            action: self.view.actions[rule],
                            counters: *counters + carried(&self.carried.rules, rule),
                        })
                        .collect(),
                })
                .collect(),
            ingress: hook(Direction::Ingress as usize),
            egress: hook(Direction::Egress as usize),
            xdp: hook(Direction::XdpIngress as usize),
            copy: hook(mirror_common::COPY_HOOK as usize),
            targets: Vec::new(),
        })
    }

    /// The default rules the agent counts: what their sessions saw that the kernel's rules did not
    /// decide, added to the rule's and the session's counters.
    fn count_defaults(&self, seen: &[Traffic], sessions: &mut [Counters], rules: &mut [Counters]) {
        let mut reported = self
            .counted_defaults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reported.resize(sessions.len(), Counters::default());
        for (session, row) in self.view.counted_defaults.iter().enumerate() {
            let (Some(row), Some(seen)) = (row, seen.get(session)) else {
                continue;
            };
            let decided = sessions[session];
            let last = &mut reported[session];
            last.matched = last
                .matched
                .max(seen.packets.saturating_sub(decided.matched));
            last.matched_bytes = last
                .matched_bytes
                .max(seen.bytes.saturating_sub(decided.matched_bytes));
            rules[*row] += *last;
            sessions[session] += *last;
        }
    }
}

/// The hooks' counters of `stats`, by hook index.
fn hook_array(stats: &Stats) -> [HookCounters; HOOK_COUNT as usize] {
    let mut hooks = [HookCounters::default(); HOOK_COUNT as usize];
    for (index, counters) in [
        (Direction::Ingress as usize, stats.ingress),
        (Direction::Egress as usize, stats.egress),
        (Direction::XdpIngress as usize, stats.xdp),
        (mirror_common::COPY_HOOK as usize, stats.copy),
    ] {
        if let Some(hook) = hooks.get_mut(index) {
            *hook = counters;
        }
    }
    hooks
}
