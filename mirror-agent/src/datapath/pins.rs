//! Pinned mode: a link per hook and interface pinned in a bpffs directory, the mark of the
//! generation those links run, pinning new links and taking over (and repairing) what an earlier
//! agent left.
use std::path::{Path, PathBuf};

use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
};
use mirror_common::Direction;
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use super::{Attached, Datapath, DatapathError, Hook, HookLink, ifindex_of};

/// In a pin directory, the name of the (empty) directory that records the generation of the
/// programs attached through its links: `generation-N`.
pub(super) const GENERATION_MARK: &str = "generation-";

/// A link's pin: `ingress-<interface>`, `egress-<interface>`, `xdp-<interface>` (a reload
/// switches these links in place), `copy<generation>-<interface>` (old and new copy programs are attached side by side
/// while a reload switches). Interface names hold no `/`.
pub(super) fn pin_name(hook: Hook, interface: &str, generation: u64) -> String {
    match hook {
        Hook::Mirror(Direction::Ingress) => format!("ingress-{interface}"),
        Hook::Mirror(Direction::Egress) => format!("egress-{interface}"),
        Hook::Mirror(Direction::XdpIngress) => format!("xdp-{interface}"),
        Hook::Copy => format!("copy{generation}-{interface}"),
    }
}

/// A pin's hook and interface, and for a copy link the generation it was pinned for.
pub(super) fn parse_pin_name(name: &str) -> Option<(Hook, &str, Option<u64>)> {
    let (hook, interface) = name.split_once('-')?;
    let (hook, generation) = match hook {
        "ingress" => (Hook::Mirror(Direction::Ingress), None),
        "egress" => (Hook::Mirror(Direction::Egress), None),
        "xdp" => (Hook::Mirror(Direction::XdpIngress), None),
        copy => (Hook::Copy, Some(copy.strip_prefix("copy")?.parse().ok()?)),
    };
    Some((hook, interface, generation))
}

/// The generation marks in a pin directory (see [`GENERATION_MARK`]).
pub(super) fn pinned_generations(dir: &Path) -> Vec<(u64, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let generation = name.to_str()?.strip_prefix(GENERATION_MARK)?.parse().ok()?;
            Some((generation, entry.path()))
        })
        .collect()
}

/// Folders of a BPF file system looked into for another agent's pins, at the most.
const PIN_SEARCH_ENTRIES: usize = 10_000;
/// How deep below a BPF file system's mount point pin directories are looked for.
const PIN_SEARCH_DEPTH: usize = 4;

/// The pin directories of other mirror agents (a generation mark and link pins, outside `own`)
/// whose links are on one of the `watched` hooks: those programs still copy, so attaching there
/// too would copy every packet twice. Each with the pins found on those hooks.
pub fn foreign_pins(
    own: Option<&Path>,
    watched: &[(String, Direction)],
) -> Vec<(PathBuf, Vec<String>)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut found = Vec::new();
    let mut budget = PIN_SEARCH_ENTRIES;
    let mut pending: Vec<(PathBuf, usize)> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let point = fields.nth(1)?;
            (fields.next()? == "bpf").then(|| (PathBuf::from(point.replace("\\040", " ")), 0))
        })
        .collect();
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut on_watched = Vec::new();
        let mut marked = false;
        for entry in entries.flatten().take(budget) {
            budget -= 1;
            let name = entry.file_name().to_string_lossy().into_owned();
            marked |= name.starts_with(GENERATION_MARK);
            match parse_pin_name(&name) {
                Some((Hook::Mirror(direction), interface, _))
                    if watched
                        .iter()
                        .any(|(i, d)| i == interface && *d == direction)
                        && copies_here(&entry.path(), interface, direction) =>
                {
                    on_watched.push(name.clone());
                }
                _ if depth < PIN_SEARCH_DEPTH && entry.file_type().is_ok_and(|t| t.is_dir()) => {
                    pending.push((entry.path(), depth + 1));
                }
                _ => {}
            }
        }
        if marked && !on_watched.is_empty() && own.is_none_or(|own| !same_dir(own, &dir)) {
            on_watched.sort();
            found.push((dir, on_watched));
        }
    }
    found
}

/// Whether the link pinned at `pin` runs its program at `interface`'s `direction` hook in this
/// network namespace (a pin of another namespace's interface of the same name does not).
fn copies_here(pin: &Path, interface: &str, direction: Direction) -> bool {
    let attach = match direction {
        Direction::Ingress => TcAttachType::Ingress,
        Direction::Egress => TcAttachType::Egress,
        // One XDP program per interface: attaching another fails on its own.
        Direction::XdpIngress => return false,
    };
    let Some(link) = crate::sys::bpf::pinned_link(pin) else {
        return false;
    };
    ifindex_of(interface) == Some(link.ifindex)
        && SchedClassifier::query_tcx(interface, attach)
            .is_ok_and(|(_, programs)| programs.iter().any(|p| p.id() == link.program_id))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

pub(super) fn on_bpffs(dir: &Path) -> bool {
    statfs(dir).is_ok_and(|stat| stat.filesystem_type() == BPF_FS_MAGIC)
}

impl Datapath {
    /// In pinned mode, pins a new link where a later agent finds it.
    pub(super) fn pinned(
        &self,
        hook: Hook,
        interface: &str,
        link: HookLink,
    ) -> Result<(HookLink, Option<PathBuf>), DatapathError> {
        let Some(dir) = &self.pin_dir else {
            return Ok((link, None));
        };
        let path = dir.join(pin_name(hook, interface, self.generation));
        let pin_error = |message: String| DatapathError::Pin {
            path: path.clone(),
            message,
        };
        let fd_link = link.into_fd().map_err(|e| pin_error(e.to_string()))?;
        let pinned = fd_link.pin(&path).map_err(|e| pin_error(e.to_string()))?;
        let link =
            HookLink::from_fd(hook, FdLink::from(pinned)).map_err(|e| pin_error(e.to_string()))?;
        Ok((link, Some(path)))
    }

    /// In pinned mode, records this datapath's generation for the next agent.
    pub(super) fn record_generation(&self) {
        let Some(dir) = &self.pin_dir else {
            return;
        };
        // The new mark first: an agent that dies in between leaves two, and the next takes the
        // higher.
        let _ = std::fs::create_dir(dir.join(format!("{GENERATION_MARK}{}", self.generation)));
        for (generation, _) in pinned_generations(dir) {
            if generation != self.generation {
                let _ = std::fs::remove_dir(dir.join(format!("{GENERATION_MARK}{generation}")));
            }
        }
    }

    /// The links a pinned-mode agent left in `dir` (still attached, still running its programs),
    /// and the generation to go on from. Pins of interfaces that are gone, or were deleted and
    /// created again (the kernel detached the link with the old one), are removed.
    ///
    /// An agent that died between pinning a new generation's copy links and recording that
    /// generation left copy pins of a generation higher than the mark: the generation goes on
    /// from the highest of both, so that the next one pins afresh, and those links are taken
    /// over (and let go once the new ones run) like the others.
    pub fn adopt_pins(dir: &Path) -> Result<(u64, Vec<Attached>), DatapathError> {
        let pin_error = |message: String| DatapathError::Pin {
            path: dir.to_path_buf(),
            message,
        };
        // Checked on the nearest folder there: a directory that is refused is never made.
        let existing = dir
            .ancestors()
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        if !on_bpffs(existing) {
            return Err(pin_error(
                "not on a BPF file system (mount one with `mount -t bpf bpf /sys/fs/bpf`)".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| pin_error(e.to_string()))?;
        let mut generation = pinned_generations(dir)
            .into_iter()
            .map(|(generation, _)| generation)
            .max()
            .unwrap_or(0);
        let entries = std::fs::read_dir(dir).map_err(|e| pin_error(e.to_string()))?;
        let mut links = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((hook, interface, pinned_generation)) = parse_pin_name(&name) else {
                continue;
            };
            generation = generation.max(pinned_generation.unwrap_or(0));
            let path = entry.path();
            let ifindex = ifindex_of(interface);
            if ifindex.is_none()
                || crate::sys::bpf::pinned_link(&path).map(|link| link.ifindex) != ifindex
            {
                tracing::info!(
                    "{interface} is gone or was created again: removing the pin {}",
                    path.display()
                );
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let link = PinnedLink::from_pin(&path)
                .map_err(|e| e.to_string())
                .and_then(|pinned| {
                    HookLink::from_fd(hook, FdLink::from(pinned)).map_err(|e| e.to_string())
                });
            match link {
                Ok(link) => links.push(Attached {
                    hook,
                    interface: interface.to_owned(),
                    ifindex: ifindex.unwrap_or(0),
                    link,
                    pin: Some(path),
                }),
                Err(e) => return Err(pin_error(format!("{name}: {e}"))),
            }
        }
        Ok((generation, links))
    }
}
