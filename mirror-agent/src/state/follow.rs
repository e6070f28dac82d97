//! What the followers need of the applied plan: which sessions watch an interface that appears,
//! and the hooks pod-selector sessions watch now.
use std::collections::BTreeMap;

use mirror_common::Direction;

use crate::{
    config::PodSelector,
    datapath::Datapath,
    rules::{self, Interface, Rule, Session},
};

/// What the follower needs of the applied plan.
#[derive(Debug)]
pub struct Follow {
    /// Per session: its globs and directions.
    sessions: Vec<(Vec<glob::Pattern>, Vec<Direction>)>,
    /// Per session: the pods it selects instead of interfaces.
    selectors: Vec<Option<PodSelector>>,
    /// The hooks of the plan's sessions that watch interfaces: (ifindex, direction, session).
    planned: Vec<(Interface, Direction, usize)>,
    /// The hooks pod-selector sessions watch now, and those sessions.
    pod_hooks: BTreeMap<(Interface, Direction), Vec<usize>>,
    rules: Vec<Rule>,
    /// Interfaces never to watch: every target (copies would be mirrored again).
    pub(crate) targets: Vec<u32>,
}

impl Follow {
    /// `None` when no session has a glob or a pod selector: there is nothing to follow.
    pub fn new(sessions: &[Session], rules: &[Rule], targets: Vec<u32>) -> Option<Self> {
        let mut planned = Vec::new();
        let mut pod_hooks = BTreeMap::<_, Vec<usize>>::new();
        for (index, session) in sessions.iter().enumerate() {
            for (interface, direction) in &session.attachments {
                if session.pods.is_some() {
                    pod_hooks
                        .entry((interface.clone(), *direction))
                        .or_default()
                        .push(index);
                } else {
                    planned.push((interface.clone(), *direction, index));
                }
            }
        }
        sessions
            .iter()
            .any(|s| !s.globs.is_empty() || s.pods.is_some())
            .then(|| Follow {
                sessions: sessions
                    .iter()
                    .map(|s| (s.globs.clone(), s.directions.clone()))
                    .collect(),
                selectors: sessions.iter().map(|s| s.pods.clone()).collect(),
                planned,
                pod_hooks,
                rules: rules.to_vec(),
                targets,
            })
    }

    /// Every session that watches the attached hook `(interface, direction)` now: by name, glob
    /// or pod.
    pub fn sessions_watching(&self, interface: &str, direction: Direction) -> Vec<usize> {
        let mut sessions = self.named_or_glob(|i| i.name == interface, interface, direction);
        sessions.extend(
            self.pod_hooks
                .iter()
                .filter(|((i, d), _)| i.name == interface && *d == direction)
                .flat_map(|(_, sessions)| sessions.iter().copied()),
        );
        sessions.sort_unstable();
        sessions.dedup();
        sessions
    }

    /// Sessions that watch `interface` in `direction` by name or glob.
    pub(crate) fn interface_sessions(
        &self,
        interface: &Interface,
        direction: Direction,
    ) -> Vec<usize> {
        let mut sessions = self.named_or_glob(
            |i| i.ifindex == interface.ifindex,
            &interface.name,
            direction,
        );
        sessions.sort_unstable();
        sessions.dedup();
        sessions
    }

    /// Sessions whose planned interface `is_it` accepts, or whose glob matches `name`, in
    /// `direction` (unsorted, maybe repeated).
    fn named_or_glob(
        &self,
        is_it: impl Fn(&Interface) -> bool,
        name: &str,
        direction: Direction,
    ) -> Vec<usize> {
        self.planned
            .iter()
            .filter(|(i, d, _)| is_it(i) && *d == direction)
            .map(|(_, _, session)| *session)
            .chain(
                self.sessions
                    .iter()
                    .enumerate()
                    .filter(|(_, (globs, directions))| {
                        directions.contains(&direction) && globs.iter().any(|g| g.matches(name))
                    })
                    .map(|(index, _)| index),
            )
            .collect()
    }

    /// Watches the interfaces of the pods the pod-selector sessions select now (`selected`
    /// gives them per selector), and stops watching those of pods no session selects any more.
    /// An interface some session watches by name or glob stays watched for that session.
    pub fn apply_pods(
        &mut self,
        datapath: &mut Datapath,
        selected: impl Fn(&PodSelector) -> Vec<Interface>,
    ) {
        let mut wanted = BTreeMap::<(Interface, Direction), Vec<usize>>::new();
        for (index, selector) in self.selectors.iter().enumerate() {
            let Some(selector) = selector else { continue };
            for interface in selected(selector) {
                if self.targets.contains(&interface.ifindex) {
                    continue;
                }
                for direction in &self.sessions[index].1 {
                    wanted
                        .entry((interface.clone(), *direction))
                        .or_default()
                        .push(index);
                }
            }
        }
        // Hooks let go first: a recreated interface of the same name is watched afresh after.
        let gone: Vec<_> = self
            .pod_hooks
            .keys()
            .filter(|hook| !wanted.contains_key(*hook))
            .cloned()
            .collect();
        for (interface, direction) in gone {
            let sessions = self.interface_sessions(&interface, direction);
            let name = &interface.name;
            if sessions.is_empty() {
                let _ = datapath.unwatch(name, interface.ifindex, direction);
                tracing::info!("{name} ({direction:?}): no selected pod's any more: let go");
            } else if let Err(e) = self.watch(datapath, &interface, direction, &sessions) {
                tracing::warn!(
                    "{name} ({direction:?}): no selected pod's any more, but its other sessions could not be kept: {e}"
                );
            }
            self.pod_hooks.remove(&(interface, direction));
        }
        for ((interface, direction), pod_sessions) in wanted {
            if self.pod_hooks.get(&(interface.clone(), direction)) == Some(&pod_sessions) {
                continue;
            }
            let mut sessions = self.interface_sessions(&interface, direction);
            sessions.extend(&pod_sessions);
            sessions.sort_unstable();
            sessions.dedup();
            let name = &interface.name;
            match self.watch(datapath, &interface, direction, &sessions) {
                Ok(()) => tracing::info!("{name} ({direction:?}): a selected pod's: watching it"),
                Err(e) => tracing::warn!(
                    "{name} ({direction:?}): a selected pod's, but it could not be watched: {e}"
                ),
            }
            self.pod_hooks.insert((interface, direction), pod_sessions);
        }
    }

    pub(crate) fn watch(
        &self,
        datapath: &mut Datapath,
        interface: &Interface,
        direction: Direction,
        sessions: &[usize],
    ) -> Result<(), crate::datapath::DatapathError> {
        let bitmap = || rules::sessions_bitmap(&self.rules, sessions);
        datapath.watch_later(
            &interface.name,
            interface.ifindex,
            direction,
            sessions,
            bitmap,
        )
    }

    /// Never watches `ifindex`: a target interface's new index.
    pub(crate) fn add_target(&mut self, ifindex: u32) {
        if !self.targets.contains(&ifindex) {
            self.targets.push(ifindex);
        }
    }

    /// Forgets the pod hooks of an interface that is gone.
    pub(crate) fn forget(&mut self, ifindex: u32) {
        self.pod_hooks
            .retain(|(interface, _), _| interface.ifindex != ifindex);
    }
}
