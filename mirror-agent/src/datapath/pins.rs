//! Pinned mode: a link per hook and interface pinned in a bpffs directory, the mark of the
//! generation those links run, pinning new links and taking over (and repairing) what an earlier
//! agent left.
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
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

/// The interface the TCX or XDP link pinned at `pin` is attached to, as the kernel reports it:
/// 0 once that interface is gone (the kernel detached the link with it), even if another of the
/// same name has come since.
pub(super) fn pinned_link_ifindex(pin: &Path) -> Option<u32> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    /// `union bpf_attr` for `BPF_OBJ_GET`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).ok()?;
    let attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: the kernel reads `attr`, sized as passed, and the NUL-terminated path it points to,
    // which outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            std::mem::size_of::<ObjGet>(),
        )
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    link_ifindex(link.as_raw_fd())
}

fn link_ifindex(link: std::os::fd::RawFd) -> Option<u32> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // `struct bpf_link_info`: type, id, prog_id, then (8-aligned, at byte 16) a union whose
    // `tcx` and `xdp` members start with the ifindex. Zeroed room for all of it.
    let mut info = [0u64; 16];
    let mut attr = InfoByFd {
        bpf_fd: u32::try_from(link).ok()?,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which outlives the call,
    // and reads `attr`, sized as passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    (rc == 0).then(|| (info[2] & 0xffff_ffff) as u32)
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
        std::fs::create_dir_all(dir).map_err(|e| pin_error(e.to_string()))?;
        if !on_bpffs(dir) {
            return Err(pin_error(
                "not on a BPF file system (mount one with `mount -t bpf bpf /sys/fs/bpf`)".into(),
            ));
        }
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
            if ifindex.is_none() || pinned_link_ifindex(&path) != ifindex {
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
