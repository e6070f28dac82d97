//! Following the node's pods: the first configuration with a pod-selector session starts a watch
//! of the node's pods; each change re-plans the interfaces the sessions select.
use anyhow::Context as _;

use super::{Daemon, Options};
use crate::{
    config::{LoadedConfig, PodSelector},
    follow::pods::{self, PodView, PodWatch},
    rules::{self, Plan},
    state::{Applied, SelectedPod},
};

impl Daemon<'_> {
    /// Watches the interfaces of the pods the sessions select now, and no others.
    pub(super) async fn apply_pods(&mut self) {
        let Some(watch) = &self.pods else { return };
        let pods = watch.pods();
        let selectors: Vec<&PodSelector> = self
            .plan
            .sessions
            .iter()
            .filter_map(|s| s.pods.as_ref())
            .collect();
        let selected_by_some = |pod: &PodView| {
            selectors
                .iter()
                .any(|s| s.matches(&pod.namespace, &pod.labels))
        };
        let placed = match pods::place(&pods, selected_by_some).await {
            Ok(placed) => placed,
            Err(e) => {
                tracing::warn!("placing the node's pods: {e:#}");
                return;
            }
        };
        let selected: Vec<SelectedPod> = pods
            .iter()
            .filter_map(|(key, pod)| {
                let sessions: Vec<String> = self
                    .plan
                    .sessions
                    .iter()
                    .filter(|s| {
                        s.pods
                            .as_ref()
                            .is_some_and(|p| p.matches(&pod.namespace, &pod.labels))
                    })
                    .map(|s| s.name.clone())
                    .collect();
                let placement = placed.get(key)?;
                (!sessions.is_empty()).then(|| SelectedPod {
                    pod: key.clone(),
                    ips: pod.ips.clone(),
                    interface: placement.as_ref().ok().map(|i| i.name.clone()),
                    problem: placement.as_ref().err().map(|u| u.why.clone()),
                    sessions,
                })
            })
            .collect();
        for pod in &selected {
            let before = self.placements.get(&pod.pod);
            if before == placed.get(&pod.pod) {
                continue;
            }
            match (&pod.interface, &pod.problem) {
                (Some(interface), _) => {
                    tracing::info!("pod {} is selected: its interface is {interface}", pod.pod);
                }
                (None, Some(why)) => {
                    tracing::warn!("pod {} is selected but not watched: {why}", pod.pod);
                }
                (None, None) => {}
            }
        }
        self.placements = selected
            .iter()
            .filter_map(|p| Some((p.pod.clone(), placed.get(&p.pod)?.clone())))
            .collect();
        let mut applied = self.shared.applied();
        let Applied {
            datapath,
            follow,
            pods: shown,
            ..
        } = &mut *applied;
        if let Some(follow) = follow {
            follow.apply_pods(datapath, |selector| {
                pods::selected(&pods, &placed, selector)
            });
        }
        *shown = selected;
    }

    /// Whether a selected pod has no interface yet but may get one (its route may come a moment
    /// after its IP).
    pub(super) fn waits_for_pods(&self) -> bool {
        self.placements
            .values()
            .any(|p| p.as_ref().is_err_and(|u| u.may_change))
    }
}

pub(super) fn selects_pods(loaded: &LoadedConfig) -> bool {
    loaded
        .config
        .sessions
        .iter()
        .any(|s| s.get_ref().pods.is_some())
}

/// Plans `loaded` with the interfaces of the pods its pod-selector sessions select now. The
/// first configuration with such a session starts watching the node's pods (and waits for their
/// first list); without one, the agent never talks to the Kubernetes API.
pub(super) async fn plan_with_pods(
    loaded: &LoadedConfig,
    pods: &mut Option<PodWatch>,
    options: &Options,
) -> anyhow::Result<Plan> {
    let plan = planned_with_pods(loaded, pods, options).await?;
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }
    Ok(plan)
}

/// [`plan_with_pods`] without the log of its warnings.
async fn planned_with_pods(
    loaded: &LoadedConfig,
    pods: &mut Option<PodWatch>,
    options: &Options,
) -> anyhow::Result<Plan> {
    if !selects_pods(loaded) {
        return Ok(rules::plan_on_host(loaded)?);
    }
    let watch = if let Some(watch) = pods {
        watch
    } else {
        let node = options.node_name.as_deref().context(
                "a session selects pods: the agent needs its node's name (--node-name, or NODE_NAME from the downward API)",
            )?;
        let watch = PodWatch::start(node, options.kubeconfig.as_deref()).await?;
        tracing::info!(
            "watching the pods of node `{node}`: {} now",
            watch.pods().len()
        );
        pods.insert(watch)
    };
    let now = watch.pods();
    // Only the pods some session selects are looked up.
    let selectors: Vec<&PodSelector> = loaded
        .config
        .sessions
        .iter()
        .filter_map(|s| s.get_ref().pods.as_ref().map(toml::Spanned::get_ref))
        .collect();
    let placed = pods::place(&now, |pod| {
        selectors
            .iter()
            .any(|s| s.matches(&pod.namespace, &pod.labels))
    })
    .await?;
    Ok(rules::plan_selecting(loaded, &|selector| {
        pods::selected(&now, &placed, selector)
    })?)
}

/// Waits for a change of the node's pods; forever without a pod watch.
pub(super) async fn pods_changed(pods: Option<&mut PodWatch>) {
    match pods {
        Some(pods) => pods.changed().await,
        None => std::future::pending().await,
    }
}
