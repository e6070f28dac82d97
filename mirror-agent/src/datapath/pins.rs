//! Pinned mode's names in the pin directory: a link per hook and interface, and the mark of
//! the generation those links run.
use std::path::{Path, PathBuf};

use mirror_common::Direction;

use super::Hook;

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

pub(super) fn parse_pin_name(name: &str) -> Option<(Hook, &str)> {
    let (hook, interface) = name.split_once('-')?;
    let hook = match hook {
        "ingress" => Hook::Mirror(Direction::Ingress),
        "egress" => Hook::Mirror(Direction::Egress),
        "xdp" => Hook::Mirror(Direction::XdpIngress),
        copy if copy
            .strip_prefix("copy")
            .is_some_and(|g| g.parse::<u64>().is_ok()) =>
        {
            Hook::Copy
        }
        _ => return None,
    };
    Some((hook, interface))
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

pub(super) fn on_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &raw mut stat) == 0 && stat.f_type == BPF_FS_MAGIC
    }
}
