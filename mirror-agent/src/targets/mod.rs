//! Where copies go. One file per kind of target, each with its configuration, its checks, its
//! kernel entry, what it follows while the agent runs, how it takes ring copies and its view:
//! [`interface`] (sent out of an interface as they are), [`tunnel`] (to a collector, with the next
//! hop), [`file`] (pcap and pcapng files) and [`watch`] (live captures' watchers only); [`ring`]
//! is the drain that hands ring copies to the kinds' sinks; [`shadow`] replays the HTTP requests
//! in a session's copies to a mirror service; [`observe`] counts them as services' (a session
//! with `observe` and no target).
//!
//! This file names every kind, in [`TargetConfig`] (as written) and [`Target`] (as checked); each
//! of their methods matches every kind, and nothing outside this folder matches over them, so a
//! new kind is a file and an arm in each enum, and the compiler names every method that must
//! handle it.
pub mod file;
pub mod interface;
pub mod latency;
pub mod observe;
pub mod ring;
pub mod shadow;
pub mod tunnel;
pub mod watch;

use std::{fmt, io, net::IpAddr, path::PathBuf};

use mirror_common::{SessionMeta, TARGET_INTERFACE, TARGET_RING};
use serde::{Deserialize, Serialize, de};

pub use self::{interface::Interface, tunnel::TunnelView};
use crate::encap::TunnelTarget;

/// `target = { KIND = … }`: where a session's copies go, as the file says it (read through
/// [`one_kind`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetConfig {
    /// `interface = "mirror0"`: copies are sent out of this interface as they are.
    Interface(String),
    /// `vxlan = { remote, vni, port, local }`: copies encapsulated in VXLAN to a collector.
    Vxlan(tunnel::VxlanConfig),
    /// `geneve = { remote, vni, port, local }`: in GENEVE.
    Geneve(tunnel::GeneveConfig),
    /// `gre = { remote, key, local }`: in GRE (Ethernet inside).
    Gre(tunnel::GreConfig),
    /// `erspan = { remote, session_id, version, local }`: in ERSPAN type II or III.
    Erspan(tunnel::ErspanConfig),
    /// `file = "copies.pcapng"` or `file = { path, rotate_bytes, rotate_count }`.
    File(file::FileConfig),
    /// `shadow = { url = "http://HOST:PORT", compare, … }`: the HTTP requests in the copies are
    /// replayed to this service.
    Shadow(shadow::ShadowConfig),
    /// Copies go to `mirror-agent capture` watchers only: the session of an ad-hoc capture,
    /// made by the agent (never read from a file).
    #[serde(skip_deserializing)]
    Watch,
    /// No `target`: the session's copies are only observed (its `observe`), as
    /// [`TargetConfig::resolve_observed`] makes it.
    #[serde(skip_deserializing)]
    Observe,
}

/// A session without `target`: [`TargetConfig::Observe`], at no place in the file.
pub fn no_target() -> toml::Spanned<TargetConfig> {
    toml::Spanned::new(0..0, TargetConfig::Observe)
}

/// What a target needs: named in each error about its shape.
const ONE_KIND: &str = "a target needs exactly one of `interface`, `vxlan`, `geneve`, `gre`, `erspan`, `file` or `shadow`";

/// Reads a session's `target`: a table of exactly one kind, whose keys keep their places in the
/// file for errors. (For `#[serde(deserialize_with)]`.)
pub fn one_kind<'de, D: de::Deserializer<'de>>(
    deserializer: D,
) -> Result<toml::Spanned<TargetConfig>, D::Error> {
    let spanned = toml::Spanned::<OneKind>::deserialize(deserializer)?;
    let span = spanned.span();
    Ok(toml::Spanned::new(span, spanned.into_inner().0))
}

/// A target table with one kind in it.
struct OneKind(TargetConfig);

impl<'de> Deserialize<'de> for OneKind {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(OneKindVisitor)
    }
}

struct OneKindVisitor;

impl<'de> de::Visitor<'de> for OneKindVisitor {
    type Value = OneKind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table with one kind of target, e.g. `{ interface = \"mirror0\" }`")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<OneKind, A::Error> {
        let mut kinds = Vec::new();
        // Before file options had a table of their own, they stood beside `file`.
        let mut loose_rotation = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if matches!(key.as_str(), "rotate_bytes" | "rotate_count") {
                loose_rotation.push(format!("{key} = {}", map.next_value::<u64>()?));
                continue;
            }
            // The kind's own keys are read from the file itself: their errors keep their places.
            let entry = FirstEntry {
                key: Some(key),
                map: &mut map,
            };
            kinds.push(TargetConfig::deserialize(
                de::value::MapAccessDeserializer::new(entry),
            )?);
        }
        if !loose_rotation.is_empty() {
            let path = match kinds.as_slice() {
                [TargetConfig::File(file)] => file.path.display().to_string(),
                _ => "copies.pcapng".to_owned(),
            };
            return Err(de::Error::custom(format!(
                "`rotate_bytes` and `rotate_count` go with a `file` target, inside it: \
                 `target = {{ file = {{ path = \"{path}\", {} }} }}`",
                loose_rotation.join(", ")
            )));
        }
        match <[TargetConfig; 1]>::try_from(kinds) {
            Ok([target]) => Ok(OneKind(target)),
            Err(_) => Err(de::Error::custom(ONE_KIND)),
        }
    }
}

/// One entry of a map whose key was read already: what an enum's variant is read from.
struct FirstEntry<'a, A> {
    key: Option<String>,
    map: &'a mut A,
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for FirstEntry<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.key
            .take()
            .map(|key| seed.deserialize(de::IntoDeserializer::into_deserializer(key)))
            .transpose()
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

impl TargetConfig {
    /// The target of a session with `observe` (or none) checked against the interfaces present;
    /// the message says what is wrong and whether it is the target's (`Err((true, _))`) or
    /// observe's.
    pub fn resolve_observed(
        &self,
        observe: Option<&observe::ObserveConfig>,
        interfaces: &[Interface],
    ) -> Result<Target, (bool, String)> {
        let Some(observe) = observe else {
            return self.resolve(interfaces).map_err(|e| (true, e));
        };
        observe.check().map_err(|e| (false, e))?;
        if *self == TargetConfig::Observe {
            return Ok(Target::Observe(observe.clone()));
        }
        match self.resolve(interfaces).map_err(|e| (true, e))? {
            Target::Shadow(mut shadow) => {
                shadow.observe = Some(observe.clone());
                Ok(Target::Shadow(shadow))
            }
            other => Err((
                false,
                format!(
                    "observe reads the copies in the agent: it goes with a shadow target or                      with none, not yet beside {other} (give the session no target, and a                      second session for the copies)"
                ),
            )),
        }
    }

    /// The target checked against the interfaces present; the message says what is wrong.
    pub fn resolve(&self, interfaces: &[Interface]) -> Result<Target, String> {
        match self {
            TargetConfig::Interface(name) => interface::resolve(name, interfaces),
            TargetConfig::Vxlan(vxlan) => vxlan.resolve(),
            TargetConfig::Geneve(geneve) => geneve.resolve(),
            TargetConfig::Gre(gre) => gre.resolve(),
            TargetConfig::Erspan(erspan) => erspan.resolve(),
            TargetConfig::File(file) => file.resolve(),
            TargetConfig::Shadow(shadow) => shadow.resolve(),
            TargetConfig::Watch => Ok(Target::Watch),
            TargetConfig::Observe => Err(format!(
                "no target: {ONE_KIND}, or the session needs `observe = \"http\"`"
            )),
        }
    }
}

/// Where a session's copies go, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Interface(Interface),
    Tunnel(TunnelTarget),
    /// A file, as configured (its values are checked in place).
    File(file::FileConfig),
    /// A service the session's HTTP requests are replayed to.
    Shadow(Box<shadow::ShadowTarget>),
    /// `mirror-agent capture` watchers only (an ad-hoc capture's session).
    Watch,
    /// Observed only: the exchanges in the copies are counted, and the copies go nowhere.
    Observe(observe::ObserveConfig),
}

/// A target as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetView {
    Interface {
        name: String,
    },
    Tunnel(TunnelTarget),
    File {
        path: PathBuf,
    },
    Shadow {
        url: String,
    },
    /// Live captures' watchers only.
    Watch,
    /// Observed only.
    Observe,
}

impl fmt::Display for TargetView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            TargetView::Interface { name } => format!("interface {name}"),
            TargetView::Tunnel(tunnel) => tunnel.to_string(),
            TargetView::File { path } => format!("file {}", path.display()),
            TargetView::Shadow { url } => format!("shadow {url}"),
            TargetView::Watch => "live capture".to_owned(),
            TargetView::Observe => "observed only".to_owned(),
        };
        // As one piece, so that a width pads it.
        f.pad(&text)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.view().fmt(f)
    }
}

/// What the targets need of a planned session.
#[derive(Debug, Clone, Copy)]
pub struct SessionTarget<'a> {
    pub name: &'a str,
    pub target: &'a Target,
    /// Its copies come through the ring: an XDP session, or a ring-fed kind.
    pub through_ring: bool,
    /// Its kernel entry's controls (sampling, rate, unparsed packets); the target fills in the
    /// rest.
    pub controls: SessionMeta,
    /// The configured snaplen, which the target may cut to what it carries.
    pub snaplen: Option<u32>,
}

impl Target {
    pub fn view(&self) -> TargetView {
        match self {
            Target::Interface(interface) => TargetView::Interface {
                name: interface.name.clone(),
            },
            Target::Tunnel(tunnel) => TargetView::Tunnel(tunnel.clone()),
            Target::File(file) => TargetView::File {
                path: file.path.clone(),
            },
            Target::Shadow(shadow) => TargetView::Shadow { url: shadow.url() },
            Target::Watch => TargetView::Watch,
            Target::Observe(_) => TargetView::Observe,
        }
    }

    /// What is observed of the session's exchanges, if anything.
    pub fn observes(&self) -> Option<&observe::ObserveConfig> {
        match self {
            Target::Shadow(shadow) => shadow.observe.as_ref(),
            Target::Observe(observe) => Some(observe),
            Target::Interface(_) | Target::Tunnel(_) | Target::File(_) | Target::Watch => None,
        }
    }

    /// Whether its copies come through the ring for a session at the XDP hook (`xdp`) or at TC.
    pub fn through_ring(&self, xdp: bool) -> bool {
        match self {
            Target::Interface(_) | Target::Tunnel(_) => xdp,
            Target::File(_) | Target::Shadow(_) | Target::Watch | Target::Observe(_) => true,
        }
    }

    /// The interface copies are sent out of as they are: never to be watched (a loop).
    pub fn interface(&self) -> Option<&Interface> {
        match self {
            Target::Interface(interface) => Some(interface),
            Target::Tunnel(_)
            | Target::File(_)
            | Target::Shadow(_)
            | Target::Watch
            | Target::Observe(_) => None,
        }
    }

    /// The collector of a tunnel target: its outer packets are kept out of every session.
    pub fn tunnel(&self) -> Option<&TunnelTarget> {
        match self {
            Target::Tunnel(tunnel) => Some(tunnel),
            Target::Interface(_)
            | Target::File(_)
            | Target::Shadow(_)
            | Target::Watch
            | Target::Observe(_) => None,
        }
    }

    /// The capture file it writes, if any.
    pub fn file(&self) -> Option<&file::FileConfig> {
        match self {
            Target::File(file) => Some(file),
            Target::Interface(_)
            | Target::Tunnel(_)
            | Target::Shadow(_)
            | Target::Watch
            | Target::Observe(_) => None,
        }
    }

    /// What `check` says of the target on this host now (a tunnel's path), if anything.
    pub fn check(&self) -> Result<Option<String>, TargetError> {
        match self {
            Target::Tunnel(tunnel) => tunnel::check(tunnel).map(Some),
            Target::Shadow(shadow) => Ok(Some(format!(
                "the HTTP/1.x requests in its copies are replayed to {}{}",
                shadow.url(),
                if shadow.observe.is_some() {
                    ", and counted by service"
                } else {
                    ""
                }
            ))),
            Target::Observe(_) => Ok(Some(
                "the HTTP/1.x exchanges in its copies are counted by service; the copies go \
                 nowhere else"
                    .to_owned(),
            )),
            Target::Interface(_) | Target::File(_) | Target::Watch => Ok(None),
        }
    }

    /// Where the ring drain sends the session's ring copies; `None` when they go to its watchers
    /// alone.
    pub fn ring_sink(
        &self,
        files: &file::OpenFiles,
        shadow_stats: &shadow::Shared,
        observed: Option<&observe::Observed>,
    ) -> anyhow::Result<Option<Box<dyn ring::Sink>>> {
        Ok(match self {
            Target::Interface(interface) => Some(Box::new(interface::PacketSink::open(interface)?)),
            Target::Tunnel(tunnel) => Some(Box::new(tunnel::TunnelSink::open(tunnel)?)),
            Target::File(file) => Some(Box::new(files.open(file)?)),
            Target::Shadow(shadow) => Some(Box::new(shadow::ShadowSink::open(
                shadow,
                shadow_stats.clone(),
                observed.cloned(),
            )?)),
            Target::Observe(config) => Some(Box::new(shadow::ShadowSink::observing(
                observed
                    .cloned()
                    .unwrap_or_else(|| observe::Observed::new(config)),
            ))),
            Target::Watch => None,
        })
    }

    /// The session's `SESSIONS` entry: its target's fields and, for kinds the followers keep
    /// current, their state in `targets`.
    async fn kernel_entry(
        &self,
        index: u32,
        session: &SessionTarget<'_>,
        handle: &rtnetlink::Handle,
        targets: &mut Targets,
    ) -> Result<SessionMeta, TargetError> {
        match self {
            Target::Interface(interface) => {
                let kind = if session.through_ring {
                    TARGET_RING
                } else {
                    TARGET_INTERFACE
                };
                let max_copy_len = interface::max_copy_len(handle, interface).await?;
                let meta = entry(kind, interface.ifindex, max_copy_len, session);
                targets.interfaces.add(index, session.name, interface, meta);
                Ok(meta)
            }
            // The agent sends these itself, on a socket.
            Target::Tunnel(tunnel) if session.through_ring => Ok(entry(
                TARGET_RING,
                0,
                tunnel::max_tunnel_copy_len(tunnel)?,
                session,
            )),
            Target::Tunnel(tunnel) => Ok(targets.tunnels.add(index, session, tunnel, handle).await),
            Target::File(_) | Target::Watch => Ok(entry(TARGET_RING, 0, 0, session)),
            // Whole frames, GSO packets included: the shadow reads the streams.
            Target::Shadow(_) | Target::Observe(_) => Ok(SessionMeta {
                whole_frames: 1,
                ..entry(TARGET_RING, 0, 0, session)
            }),
        }
    }
}

/// A session's entry for a target of `kind`: the target's fields and the session's controls, its
/// snaplen cut to what the target carries.
fn entry(kind: u32, ifindex: u32, max_copy_len: u32, session: &SessionTarget<'_>) -> SessionMeta {
    let snaplen = clamp_snaplen(session.snaplen, max_copy_len);
    SessionMeta {
        target_ifindex: ifindex,
        target_kind: kind,
        max_copy_len,
        snaplen,
        // Ring copies are cut as they are queued; clones that need a cut or outer headers are
        // finished by the copy program at the target.
        finish: u32::from(kind != TARGET_RING && (snaplen != 0 || kind != TARGET_INTERFACE)),
        ..session.controls
    }
}

/// The snaplen never exceeds what the target carries, so that a cut copy always fits.
fn clamp_snaplen(snaplen: Option<u32>, max_copy_len: u32) -> u32 {
    match (snaplen, max_copy_len) {
        (None, _) => 0,
        (Some(snaplen), 0) => snaplen,
        (Some(snaplen), max) => snaplen.min(max),
    }
}

/// The writes the targets make to the programs' maps while the agent runs (the datapath
/// implements them).
pub trait KernelEntries {
    type Error: fmt::Display;
    /// Rewrites a session's `SESSIONS` entry.
    fn set_session(&mut self, session: u32, meta: &SessionMeta) -> Result<(), Self::Error>;
    /// Rewrites a tunnel session's `TUNNELS` entry.
    fn set_tunnel(
        &mut self,
        session: u32,
        tunnel: &mirror_common::Tunnel,
    ) -> Result<(), Self::Error>;
    /// Removes a tunnel session's `TUNNELS` entry: its copies are counted as `no_route`.
    fn clear_tunnel(&mut self, session: u32) -> Result<(), Self::Error>;
    /// Attaches the copy program at `interface`'s egress, where it is not yet.
    fn finish_copies_at(&mut self, interface: &str) -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("opening a netlink socket: {0}")]
    Connect(io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("collector {remote}: {source}")]
    Path { remote: IpAddr, source: io::Error },
    #[error("interface index {0} vanished")]
    Vanished(u32),
}

/// What the programs need per session, and the targets the followers keep current.
#[derive(Debug)]
pub struct Resolved {
    pub sessions: Vec<SessionMeta>,
    pub targets: Targets,
}

/// Resolves every session's target: its kernel entry and, for the kinds followed at run time,
/// their state now. A tunnel without a route or next hop now does not fail the start: its copies
/// are counted as `no_route` until the path follower finds one.
pub async fn resolve(sessions: &[SessionTarget<'_>]) -> Result<Resolved, TargetError> {
    let handle = netlink()?;
    let mut targets = Targets::default();
    let mut metas = Vec::with_capacity(sessions.len());
    for (index, session) in sessions.iter().enumerate() {
        metas.push(
            session
                .target
                .kernel_entry(index as u32, session, &handle, &mut targets)
                .await?,
        );
    }
    Ok(Resolved {
        sessions: metas,
        targets,
    })
}

/// The targets of the applied configuration as they are now: the indexes of target interfaces
/// (one deleted and created again has a new one) and the hops tunnel copies take.
#[derive(Debug, Default)]
pub struct Targets {
    pub interfaces: interface::Following,
    pub tunnels: tunnel::Following,
}

impl Targets {
    /// Every interface copies leave by now: the target interfaces that are there and the
    /// tunnels' underlays, each once, by name.
    pub fn sending_interfaces(&self) -> Vec<(String, u32)> {
        let mut out: Vec<_> = self
            .interfaces
            .indexes()
            .into_iter()
            .filter_map(|(name, ifindex)| Some((name, ifindex?)))
            .chain(self.tunnels.underlays())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

mirror_common::counters! {
    /// What the agent counts of a session's target in userspace (the programs count the rest in
    /// `Counters`), in this configuration.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(default)]
    pub struct TargetCounters {
        /// Ring copies (XDP sessions, file targets) the agent sent on or wrote, by session, in this configuration.
        sent => "ring_sent_copies",
        /// Ring copies the target refused (a full socket buffer, a capture file's write error), by session, in this configuration.
        failed => "ring_refused_copies",
        /// Copies the session's live captures (`mirror-agent capture`) lost because they did not read fast enough.
        watcher_lost => "watcher_lost_copies",
        /// Times a tunnel session's path changed: another underlay or next hop, or none.
        hop_changes => "tunnel_hop_changes",
        /// Ring copies that came after `run -c N` had written its N: not written, and not
        /// counted as mirrored.
        past_count => "ring_copies_past_count",
    }
}

/// A netlink handle whose connection runs on the current tokio runtime.
pub fn netlink() -> Result<rtnetlink::Handle, TargetError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(TargetError::Connect)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Copies the kernel lost after they left the programs, on an interface they leave by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxLosses {
    pub interface: String,
    pub tx_dropped: u64,
    pub tx_errors: u64,
}

/// The transmit drops and errors the kernel counted on each of `interfaces` (see
/// [`Targets::sending_interfaces`]); one that cannot be read is left out, with a warning.
pub async fn tx_losses(interfaces: Vec<(String, u32)>) -> Vec<TxLosses> {
    let handle = match netlink() {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!("the targets' counters: {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::with_capacity(interfaces.len());
    for (interface, ifindex) in interfaces {
        match interface::link(&handle, ifindex).await {
            Ok(link) => {
                let (tx_dropped, tx_errors) = link
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        rtnetlink::packet_route::link::LinkAttribute::Stats64(s) => {
                            Some((s.tx_dropped, s.tx_errors))
                        }
                        _ => None,
                    })
                    .unwrap_or_default();
                out.push(TxLosses {
                    interface,
                    tx_dropped,
                    tx_errors,
                });
            }
            Err(e) => tracing::warn!("the counters of target {interface}: {e}"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TargetConfig, String> {
        #[derive(Deserialize)]
        struct Session {
            #[serde(deserialize_with = "one_kind")]
            target: toml::Spanned<TargetConfig>,
        }
        toml::from_str::<Session>(text)
            .map(|s| s.target.into_inner())
            .map_err(|e| e.to_string())
    }

    /// Each kind by its key; a file by its path or a table; the old spelling of rotation refused
    /// with the new one.
    #[test]
    fn targets_are_one_kind_each() {
        assert_eq!(
            parse("target = { interface = \"mir0\" }"),
            Ok(TargetConfig::Interface("mir0".into()))
        );
        let file = |rotate_bytes, rotate_count| {
            Ok(TargetConfig::File(file::FileConfig {
                path: "/tmp/c.pcap".into(),
                rotate_bytes,
                rotate_seconds: None,
                rotate_count,
                packet_buffered: false,
            }))
        };
        assert_eq!(
            parse("target = { file = \"/tmp/c.pcap\" }"),
            file(None, None)
        );
        assert_eq!(
            parse(
                "target = { file = { path = \"/tmp/c.pcap\", rotate_bytes = 10, rotate_count = 2 } }"
            ),
            file(Some(10), Some(2))
        );
        let old = parse("target = { file = \"/tmp/c.pcap\", rotate_bytes = 10 }").expect_err("old");
        assert!(
            old.contains("`target = { file = { path = \"/tmp/c.pcap\", rotate_bytes = 10 } }`"),
            "{old}"
        );
        // A kind's own keys keep their places, here in a table of its own.
        let deep = parse("[target.vxlan]\nremote = \"192.0.2.9\"\nvni = 99999999\n")
            .expect_err("VNI out of range");
        assert!(deep.contains("line 3"), "{deep}");
        for (text, message) in [
            ("target = {}", ONE_KIND),
            ("target = { interface = \"a\", file = \"b\" }", ONE_KIND),
            ("target = { tap = \"a\" }", "unknown variant `tap`"),
            ("target = { watch = true }", "unknown variant `watch`"),
            (
                "target = { file = { path = \"a\", rotate = 1 } }",
                "unknown field `rotate`",
            ),
            ("target = { file = 7 }", "a file's path"),
        ] {
            let error = parse(text).expect_err(text);
            assert!(error.contains(message), "{text}: {error}");
        }
    }

    #[test]
    fn views_read_as_before() {
        let views = [
            (
                TargetView::Interface {
                    name: "mir0".into(),
                },
                "interface mir0",
            ),
            (
                TargetView::File {
                    path: "/tmp/c.pcap".into(),
                },
                "file /tmp/c.pcap",
            ),
            (TargetView::Watch, "live capture"),
        ];
        for (view, text) in views {
            assert_eq!(view.to_string(), text);
            assert_eq!(format!("{view:<20}|"), format!("{text:<20}|"));
            let json = serde_json::to_string(&view).expect("JSON");
            assert_eq!(
                serde_json::from_str::<TargetView>(&json).expect("back"),
                view
            );
        }
    }
}
