//! Pod-selector sessions: the agent watches the Pods scheduled on its node
//! (`spec.nodeName=$NODE_NAME`) on the Kubernetes API, and finds each pod's host-side interface
//! by asking the kernel for the route to the pod's IP.
//!
//! Assumed of the CNI: each pod has a host-side interface (a veth), and the node routes the pod's
//! IP either straight to it — Calico (`cali*`), Cilium (`lxc*`), the AWS VPC CNI (`eni*`),
//! kindnet, GKE — or to a bridge the veth is a port of — flannel's `cni0`, the `bridge` plugin.
//! Behind a bridge, the pod's port is the one whose peer, in the pod's network namespace, has the
//! pod's IP: the kernel reports each port's peer namespace (`IFLA_LINK_NETNSID`) and lists that
//! namespace's addresses on request (`IFA_TARGET_NETNSID`), so the agent needs no `setns`. A pod
//! reached through a gateway, and pods on the host network, have no interface of their own on
//! this node and are left out.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt as _, watcher};
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::LinkAttribute,
        route::{RouteAttribute, RouteFlags, RouteHeader, RouteProtocol, RouteScope, RouteType},
    },
    sys::AsyncSocket as _,
};
use tokio::sync::watch;

use crate::{config::PodSelector, rules::Interface};

/// How long the start waits for the first complete list of the node's pods.
const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the agent needs of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
}

impl PodView {
    /// `None` for a pod that has finished (its interface is gone or going).
    fn of(pod: &Pod) -> Option<Self> {
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return None;
        }
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|ip| ip.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()))
            .filter_map(|ip| ip.parse().ok())
            .fold(Vec::new(), |mut ips, ip| {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
                ips
            });
        Some(PodView {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            host_network: pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
        })
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The node's pods by `namespace/name`, as last listed and watched.
pub type Pods = Arc<BTreeMap<String, PodView>>;

/// The node's pods, kept up to date by a task that watches the API.
#[derive(Debug)]
pub struct PodWatch {
    pods: watch::Receiver<Pods>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodWatch {
    /// Connects to the API (with `kubeconfig`; else in a pod its service account, elsewhere
    /// `KUBECONFIG` or ~/.kube/config) and waits for the first complete list of the pods on
    /// `node`.
    pub async fn start(node: &str, kubeconfig: Option<&Path>) -> anyhow::Result<Self> {
        let client = client(kubeconfig)
            .await
            .context("connecting to the Kubernetes API")?;
        tracing::info!(
            "listing the pods of node `{node}` on the Kubernetes API (waiting up to {} s)",
            FIRST_LIST_TIMEOUT.as_secs()
        );
        let api = kube::Api::<Pod>::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (publish, mut pods) = watch::channel(Pods::default());
        // Whether the first list is complete; until it is, the last error (said at a timeout).
        let (first, mut first_done) = watch::channel(Err(None));
        let task = tokio::spawn(follow(api, config, publish, first));
        let watch = PodWatch {
            pods: pods.clone(),
            task,
        };
        let listed = tokio::time::timeout(FIRST_LIST_TIMEOUT, first_done.wait_for(Result::is_ok))
            .await
            .map(|done| done.map(drop));
        match listed {
            Ok(Ok(())) => {}
            Ok(Err(_)) => anyhow::bail!("the pod watcher stopped before the first list"),
            Err(_) => {
                let last = first_done.borrow().clone().err().flatten();
                anyhow::bail!(
                    "the Kubernetes API did not list the pods of node `{node}` within {} s{}",
                    FIRST_LIST_TIMEOUT.as_secs(),
                    last.map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                );
            }
        }
        pods.mark_unchanged();
        Ok(watch)
    }

    /// The pods now.
    pub fn pods(&self) -> Pods {
        self.pods.borrow().clone()
    }

    /// Waits until the pods change.
    pub async fn changed(&mut self) {
        if self.pods.changed().await.is_err() {
            // The task ended (it does not, but then nothing changes any more).
            std::future::pending::<()>().await;
        }
    }
}

/// A client for `kubeconfig`, or the default one (in-cluster, `KUBECONFIG`, ~/.kube/config).
async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let Some(path) = kubeconfig else {
        return Ok(kube::Client::try_default().await?);
    };
    let file = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("the kubeconfig {}", path.display()))?;
    Ok(kube::Client::try_from(config)?)
}

/// The first list's outcome: done, or the last error so far.
type FirstList = Result<(), Option<String>>;

/// Follows the watch of the node's pods: publishes the pods after each complete list and each
/// change, and says when the first list is complete (or the last error until then).
async fn follow(
    api: kube::Api<Pod>,
    config: watcher::Config,
    publish: watch::Sender<Pods>,
    first: watch::Sender<FirstList>,
) {
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut current = BTreeMap::new();
    let mut listing = BTreeMap::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                // The watcher retries with a backoff; the pods known stay as they are.
                tracing::warn!("watching the node's pods: {e}");
                first.send_if_modified(|first| {
                    first
                        .is_err()
                        .then(|| *first = Err(Some(e.to_string())))
                        .is_some()
                });
                continue;
            }
        };
        let complete = match event {
            watcher::Event::Init => {
                listing.clear();
                false
            }
            watcher::Event::InitApply(pod) => {
                if let Some(view) = PodView::of(&pod) {
                    listing.insert(view.key(), view);
                }
                false
            }
            watcher::Event::InitDone => {
                current = std::mem::take(&mut listing);
                let _ = first.send(Ok(()));
                true
            }
            watcher::Event::Apply(pod) => {
                match PodView::of(&pod) {
                    Some(view) => current.insert(view.key(), view),
                    None => current.remove(&key_of(&pod)),
                };
                true
            }
            watcher::Event::Delete(pod) => {
                current.remove(&key_of(&pod));
                true
            }
        };
        // A relisting is applied whole, once complete.
        if complete {
            publish.send_if_modified(|pods| {
                let changed = **pods != current;
                if changed {
                    *pods = Arc::new(current.clone());
                }
                changed
            });
        }
    }
}

fn key_of(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Where a pod is on this node: its host-side interface, or why it has none the agent can watch.
pub type Placement = Result<Interface, Unplaced>;

/// Why a pod has no interface the agent can watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub why: String,
    /// Placing it again may succeed (no IP or no route yet); not so for a pod on the host network
    /// or behind a bridge.
    pub may_change: bool,
}

impl Unplaced {
    fn for_now(why: String) -> Self {
        Unplaced {
            why,
            may_change: true,
        }
    }

    fn lasting(why: String) -> Self {
        Unplaced {
            why,
            may_change: false,
        }
    }
}

/// The host-side interface of each pod that `wanted` accepts, by the kernel's route to the pod's
/// IPs.
pub async fn place(
    pods: &Pods,
    wanted: impl Fn(&PodView) -> bool,
) -> anyhow::Result<BTreeMap<String, Placement>> {
    let (mut connection, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    // Address lists of another namespace (`IFA_TARGET_NETNSID`) need strict checking.
    connection
        .socket_mut()
        .socket_ref()
        .set_netlink_get_strict_chk(true)
        .context("asking netlink for strict checking")?;
    let connection = tokio::spawn(connection);
    let mut lookups = Placer {
        handle,
        interfaces: crate::targets::interface::present()?,
        bridges: HashMap::new(),
    };
    let mut placed = BTreeMap::new();
    for (key, pod) in pods.iter().filter(|(_, pod)| wanted(pod)) {
        let placement = if pod.host_network {
            Err(Unplaced::lasting(
                "on the host network: no interface of its own".to_owned(),
            ))
        } else {
            lookups.place_by_ips(&pod.ips).await
        };
        placed.insert(key.clone(), placement);
    }
    connection.abort();
    Ok(placed)
}

/// What one placing of pods asks the kernel, each bridge's ports listed once.
struct Placer {
    handle: rtnetlink::Handle,
    interfaces: Vec<Interface>,
    /// Per bridge (by index): the addresses found behind each of its ports, and that port.
    bridges: HashMap<u32, Result<HashMap<IpAddr, u32>, String>>,
}

impl Placer {
    /// The interface of the first of a pod's addresses (dual-stack: IPv4 and IPv6) that leads
    /// to one.
    async fn place_by_ips(&mut self, ips: &[IpAddr]) -> Placement {
        let mut placement = Err(Unplaced::for_now("no IP yet".to_owned()));
        for ip in ips {
            placement = self.route_to(*ip).await;
            if placement.is_ok() {
                break;
            }
        }
        placement
    }

    /// The interface the kernel sends `ip` out of, when that is a pod's own interface, or the
    /// port of the bridge it sends `ip` out of that leads to the pod.
    async fn route_to(&mut self, ip: IpAddr) -> Placement {
        let (interface, host_route) = routed_interface(&self.handle, ip, &self.interfaces)
            .await
            .map_err(Unplaced::for_now)?;
        if !std::path::Path::new("/sys/class/net")
            .join(&interface.name)
            .join("bridge")
            .exists()
        {
            // A pod's own interface has a host route; a subnet's route (the pod's /32 is missing,
            // its address is in the node's own subnet) leads to the node's uplink, not to a pod.
            if !host_route {
                return Err(Unplaced::for_now(format!(
                    "{ip} is routed to {} by a subnet's route, not a host route: not a pod interface",
                    interface.name
                )));
            }
            return Ok(interface);
        }
        if !self.bridges.contains_key(&interface.ifindex) {
            let behind = bridge_addresses(&self.handle, &interface).await;
            self.bridges.insert(interface.ifindex, behind);
        }
        let behind = self.bridges[&interface.ifindex]
            .as_ref()
            .map_err(|e| Unplaced::for_now(e.clone()))?;
        behind
            .get(&ip)
            .and_then(|port| self.interfaces.iter().find(|i| i.ifindex == *port))
            .cloned()
            .ok_or_else(|| {
                Unplaced::for_now(format!(
                    "{ip} is behind the bridge `{}`, but no port of it leads to a namespace with that address",
                    interface.name
                ))
            })
    }
}

/// The addresses of the network namespaces behind the ports of `bridge`, each with the port
/// whose peer has it: the kernel names each port's peer namespace (`IFLA_LINK_NETNSID`) and the
/// peer's index there, and lists a namespace's addresses on request (`IFA_TARGET_NETNSID`).
async fn bridge_addresses(
    handle: &rtnetlink::Handle,
    bridge: &Interface,
) -> Result<HashMap<IpAddr, u32>, String> {
    let failed = |e: rtnetlink::Error| format!("listing the ports of `{}`: {e}", bridge.name);
    // (port, the namespace id of its peer, the peer's index there).
    let mut ports = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await.map_err(failed)? {
        let (mut controller, mut namespace, mut peer) = (None, None, None);
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::Controller(index) => controller = Some(*index),
                LinkAttribute::LinkNetNsId(id) => namespace = Some(*id),
                LinkAttribute::Link(index) => peer = Some(*index),
                _ => {}
            }
        }
        if let (Some(index), Some(namespace), Some(peer)) = (controller, namespace, peer)
            && index == bridge.ifindex
        {
            ports.push((link.header.index, namespace, peer));
        }
    }
    let mut namespaces: Vec<i32> = ports.iter().map(|(_, namespace, _)| *namespace).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let mut behind = HashMap::new();
    for namespace in namespaces {
        let mut request = handle.address().get();
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::TargetNetNsId(namespace));
        let mut addresses = request.execute();
        while let Some(address) = addresses.try_next().await.map_err(failed)? {
            let Some((port, _, _)) = ports
                .iter()
                .find(|(_, n, peer)| *n == namespace && *peer == address.header.index)
            else {
                continue;
            };
            for attribute in &address.attributes {
                if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attribute {
                    behind.insert(*ip, *port);
                }
            }
        }
    }
    Ok(behind)
}

/// The interface of the kernel's unicast route to `ip` without a gateway, and whether that route
/// is a host route (/32 or /128) rather than a subnet's.
async fn routed_interface(
    handle: &rtnetlink::Handle,
    ip: IpAddr,
    interfaces: &[Interface],
) -> Result<(Interface, bool), String> {
    let mut request = rtnetlink::RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(ip, if ip.is_ipv4() { 32 } else { 128 })
        .map_err(|e| e.to_string())?
        .build();
    // A lookup, not a new route: strict checking wants these unset.
    request.header.table = RouteHeader::RT_TABLE_UNSPEC;
    request.header.protocol = RouteProtocol::Unspec;
    request.header.scope = RouteScope::Universe;
    request.header.kind = RouteType::Unspec;
    // The route that matched as it is in the table (its own prefix length), not the lookup's
    // result for `ip` alone.
    request.header.flags |= RouteFlags::FibMatch;
    let route = handle
        .route()
        .get(request)
        .execute()
        .next()
        .await
        .ok_or_else(|| format!("no route to {ip}"))?
        .map_err(|e| format!("no route to {ip}: {e}"))?;
    // A node's own address is `Local`, an unreachable one `Unreachable`, …
    if route.header.kind != RouteType::Unicast {
        return Err(format!(
            "{ip} is not routed to an interface ({:?})",
            route.header.kind
        ));
    }
    let mut ifindex = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => {
                return Err(format!(
                    "{ip} is reached through a gateway: not a pod interface"
                ));
            }
            RouteAttribute::Oif(index) => ifindex = Some(*index),
            _ => {}
        }
    }
    let host_route = route.header.destination_prefix_length == if ip.is_ipv4() { 32 } else { 128 };
    ifindex
        .and_then(|index| interfaces.iter().find(|i| i.ifindex == index))
        .cloned()
        .map(|interface| (interface, host_route))
        .ok_or_else(|| format!("the route to {ip} names no interface"))
}

/// The interfaces of the pods `selector` selects, each once.
pub fn selected(
    pods: &Pods,
    placed: &BTreeMap<String, Placement>,
    selector: &PodSelector,
) -> Vec<Interface> {
    let mut interfaces: Vec<Interface> = pods
        .iter()
        .filter(|(_, pod)| selector.matches(&pod.namespace, &pod.labels))
        .filter_map(|(key, _)| placed.get(key)?.as_ref().ok().cloned())
        .collect();
    interfaces.sort();
    interfaces.dedup();
    interfaces
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};

    use super::*;

    fn pod(phase: &str, ips: &[&str]) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("shop".into());
        pod.metadata.name = Some("web-1".into());
        pod.metadata.labels = Some(BTreeMap::from([
            ("app".into(), "web".into()),
            ("tier".into(), "front".into()),
        ]));
        pod.spec = Some(PodSpec::default());
        pod.status = Some(PodStatus {
            phase: Some(phase.into()),
            pod_ip: ips.first().map(|ip| (*ip).to_owned()),
            pod_ips: Some(
                ips.iter()
                    .map(|ip| PodIP {
                        ip: (*ip).to_owned(),
                    })
                    .collect(),
            ),
            ..PodStatus::default()
        });
        pod
    }

    #[test]
    fn a_pod_is_seen_with_each_of_its_ips_once_until_it_finishes() {
        let view = PodView::of(&pod("Running", &["10.244.0.7", "fd00::7"])).expect("running");
        assert_eq!(view.key(), "shop/web-1");
        assert_eq!(
            view.ips,
            [
                "10.244.0.7".parse::<IpAddr>().expect("ip"),
                "fd00::7".parse().expect("ip")
            ]
        );
        assert!(!view.host_network);
        assert!(PodView::of(&pod("Pending", &[])).is_some_and(|v| v.ips.is_empty()));
        assert_eq!(PodView::of(&pod("Succeeded", &["10.244.0.7"])), None);
        assert_eq!(PodView::of(&pod("Failed", &["10.244.0.7"])), None);
    }

    #[test]
    fn label_expressions_hold_as_in_kubernetes() {
        use crate::config::{LabelExpression, LabelOperator};
        let labels = PodView::of(&pod("Running", &[])).expect("view").labels;
        let expression = |key: &str, operator, values: &[&str]| LabelExpression {
            key: key.to_owned(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        };
        for (expression, holds) in [
            (
                expression("tier", LabelOperator::In, &["front", "edge"]),
                true,
            ),
            (expression("tier", LabelOperator::In, &["back"]), false),
            (expression("zone", LabelOperator::In, &["a"]), false),
            (expression("tier", LabelOperator::NotIn, &["back"]), true),
            (expression("tier", LabelOperator::NotIn, &["front"]), false),
            // A missing label is in no set.
            (expression("zone", LabelOperator::NotIn, &["a"]), true),
            (expression("app", LabelOperator::Exists, &[]), true),
            (expression("zone", LabelOperator::Exists, &[]), false),
            (expression("zone", LabelOperator::DoesNotExist, &[]), true),
            (expression("app", LabelOperator::DoesNotExist, &[]), false),
        ] {
            let selector = PodSelector {
                namespace: None,
                labels: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
                expressions: vec![expression.clone()],
            };
            assert_eq!(selector.matches("shop", &labels), holds, "{expression:?}");
        }
    }

    #[test]
    fn a_selector_needs_its_namespace_and_every_label() {
        let labels = PodView::of(&pod("Running", &[])).expect("view").labels;
        let selector = |namespace: Option<&str>, pairs: &[(&str, &str)]| PodSelector {
            namespace: namespace.map(str::to_owned),
            labels: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            expressions: Vec::new(),
        };
        for (namespace, pairs, selected) in [
            (None, &[][..], true),
            (Some("shop"), &[("app", "web")][..], true),
            (Some("shop"), &[("app", "web"), ("tier", "front")][..], true),
            (Some("shop"), &[("app", "web"), ("tier", "back")][..], false),
            (Some("lab"), &[("app", "web")][..], false),
            (None, &[("app", "db")][..], false),
        ] {
            assert_eq!(
                selector(namespace, pairs).matches("shop", &labels),
                selected,
                "{namespace:?} {pairs:?}"
            );
        }
    }
}
