//! The kernel side seen from userspace: loads the eBPF object, fills the lookup maps from a
//! [`Plan`], attaches the TC programs and reads the counters. Everything it attached is detached
//! when the [`Datapath`] is dropped, and a failure part-way drops what was done so far.
mod kernel_log;
mod live;
mod pins;

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType, Xdp,
        links::FdLink,
        tc::SchedClassifierLink,
        xdp::{XdpLink, XdpMode},
    },
    util::KernelVersion,
};
use ipnet::IpNet;
use mirror_common::{
    ATTACHMENT_BITMAP_MAP, ATTACHMENT_DIRECT_MAP, AttachmentEntry, AttachmentKey,
    COPY_GENERATION_BIT, COPY_RING_MAP, Counters, DST_PORT_BITMAP_MAP, DST_V4_BITMAP_MAP,
    DST_V6_BITMAP_MAP, Direction, ETHERTYPE_BITMAP_MAP, FIELD_UNKNOWN_MAP, FIELD_WILDCARD_MAP,
    FILTER_PROGRAMS_MAP, FLOW_HASH_GLOBAL, Field, FilterProgram, GENERATION_GLOBAL, HOOK_COUNT,
    HOOK_COUNTERS_MAP, HookCounters, IP_PROTO_BITMAP_MAP, MAX_ATTACHMENTS, NODE_RATE_LIMIT_MAP,
    RING_LOST_MAP, RULE_BITMAPS_MAP, RULE_COUNTERS_MAP, RULES_MAP, SESSION_COUNTERS_MAP,
    SESSIONS_MAP, SRC_PORT_BITMAP_MAP, SRC_V4_BITMAP_MAP, SRC_V6_BITMAP_MAP, SessionMeta,
    TC_COPY_PROGRAM, TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM, TUNNELS_MAP, Traffic, Tunnel,
    VLAN_BITMAP_MAP, WATCH_TRAFFIC_MAP, XDP_PROGRAM,
};

use self::kernel_log::KERNEL_LOG_GLOBAL;
pub use self::{kernel_log::KernelLog, pins::foreign_pins};
use crate::rules::Plan;

/// Where a program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// The mirror program on a watched interface.
    Mirror(Direction),
    /// The copy program at the egress of a target interface or of a tunnel's underlay.
    Copy,
}

/// The eBPF object built by build.rs from mirror-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mirror"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(aya::EbpfError),
    #[error(
        "loading the eBPF object: {0}: bpf(2) was refused while this process runs under a seccomp \
         filter. The filter must allow bpf and perf_event_open with CAP_BPF and CAP_PERFMON, as \
         the RuntimeDefault of containerd 1.7+ and Docker 23+ does; CRI-O's and podman's default \
         profile allow them only with CAP_SYS_ADMIN. Give the container a profile that allows \
         them (the Helm chart's `seccompProfile` value), and check that it has CAP_BPF and \
         CAP_PERFMON"
    )]
    SeccompDenied(aya::EbpfError),
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching to {interface} ({hook:?}): {source}")]
    Attach {
        interface: String,
        hook: Hook,
        source: aya::programs::ProgramError,
    },
    #[error("the object has no {0}")]
    Missing(&'static str),
    #[error("reading the programs' log: {0}")]
    KernelLog(Box<dyn std::error::Error + Send + Sync>),
    #[error("pinning or adopting links in {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error(
        "more than {MAX_ATTACHMENTS} distinct sets of sessions watch interfaces in one direction"
    )]
    WatchGroups,
}

impl DatapathError {
    /// A failed load, named for its likely cause when bpf(2) was refused (EPERM) under a seccomp
    /// filter, as container engines' default profiles do.
    fn load(error: aya::EbpfError) -> Self {
        let mut cause: Option<&dyn std::error::Error> = Some(&error);
        let mut refused = false;
        while let Some(current) = cause {
            refused |= current
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.raw_os_error() == Some(libc::EPERM));
            cause = current.source();
        }
        if refused && under_seccomp_filter() {
            DatapathError::SeccompDenied(error)
        } else {
            DatapathError::Load(error)
        }
    }
}

/// Whether a seccomp filter confines this process (`Seccomp: 2` in /proc/self/status).
fn under_seccomp_filter() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|line| line.split_whitespace().eq(["Seccomp:", "2"]))
    })
}

/// A loaded, filled and attached datapath.
pub struct Datapath {
    ebpf: Ebpf,
    /// The configuration generation this object was loaded for (see
    /// `mirror_common::GENERATION_GLOBAL`).
    generation: u64,
    links: Vec<Attached>,
    /// Where links are pinned (pinned mode), so that they outlive the agent.
    pin_dir: Option<PathBuf>,
    /// Bitmaps written for interfaces attached later, by the sessions watching them.
    later_bitmaps: std::collections::HashMap<Vec<usize>, u32>,
    /// The next free entry of `RULE_BITMAPS` (entries past the plan's are kept spare).
    next_bitmap: u32,
    /// The `WATCH_TRAFFIC` entry of each set of sessions and direction, by entry.
    watch_groups: Vec<WatchGroup>,
    /// Reads the programs' log lines, when `--kernel-log` asks for them.
    kernel_log: Option<crate::task::AbortOnDrop>,
}

/// The sessions that watch some attachments in one direction: their packets count in one
/// `WATCH_TRAFFIC` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchGroup {
    pub sessions: Vec<usize>,
    pub direction: Direction,
}

/// A program attached to an interface. Dropping it detaches the program, unless it is pinned.
#[derive(Debug)]
pub struct Attached {
    hook: Hook,
    interface: String,
    /// The interface's index when the link was made: one of the same name made later has
    /// another.
    ifindex: u32,
    link: HookLink,
    /// Where the link is pinned (pinned mode).
    pin: Option<PathBuf>,
}

/// A TC or an XDP link.
#[derive(Debug)]
enum HookLink {
    Tc(SchedClassifierLink),
    Xdp(XdpLink),
}

impl HookLink {
    fn into_fd(self) -> Result<FdLink, aya::programs::links::LinkError> {
        match self {
            HookLink::Tc(link) => link.try_into(),
            HookLink::Xdp(link) => link.try_into(),
        }
    }

    /// The link behind `fd` as the kind `hook` uses.
    fn from_fd(hook: Hook, fd: FdLink) -> Result<Self, aya::programs::links::LinkError> {
        Ok(match hook {
            Hook::Mirror(Direction::XdpIngress) => HookLink::Xdp(fd.try_into()?),
            _ => HookLink::Tc(fd.try_into()?),
        })
    }
}

/// A datapath that could not take over: why, and the links it was handed, untouched.
#[derive(Debug)]
pub struct TakeOverFailed {
    pub error: DatapathError,
    pub previous: Vec<Attached>,
}

/// Entries of `RULE_BITMAPS` kept for interfaces that appear after the start (one per distinct
/// set of sessions watching them).
const SPARE_BITMAPS: u32 = 64;

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("generation", &self.generation)
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

/// Loads a program (`load`) with the signals the agent answers held back from this thread, so
/// that they go to another one instead of interrupting the verifier (which then fails with
/// `EAGAIN`: a SIGHUP during a reload, say); and loads again, up to [`LOAD_TRIES`] times, when
/// another signal interrupted it all the same.
fn retry_interrupted(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut answered = SigSet::empty();
    for signal in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM] {
        answered.add(signal);
    }
    let mut before = SigSet::empty();
    // Cannot fail with a valid `how`; were it to, the retries below still apply.
    let masked = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&answered), Some(&mut before));
    let mut tries = 1;
    let result = loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < LOAD_TRIES =>
            {
                tries += 1;
                tracing::debug!("a signal interrupted the verifier: loading the program again");
            }
            result => break result,
        }
    };
    if masked.is_ok() {
        // Held-back signals are delivered now (tokio's handlers only note them).
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&before), None);
    }
    result
}

/// Loads of one program before an interrupted verifier is an error.
const LOAD_TRIES: u32 = 5;

/// The programs `plan` attaches: the copy program (cheap to verify, and a reload's new tunnel
/// or file target needs it), and the mirror program of each hook a session watches. Each
/// mirror program takes the verifier about a second, so a quick-form run of one direction loads
/// one, and a TC plan no XDP program. Interfaces found later are watched at the sessions' own
/// hooks, so these stay enough until the next plan, which loads its own.
fn programs_used(plan: &Plan) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = plan
        .sessions
        .iter()
        .flat_map(|s| &s.directions)
        .map(|&direction| program_name(Hook::Mirror(direction)))
        .chain([TC_COPY_PROGRAM])
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Loads the programs named `names`, each on a thread of its own: the verifier works on one
/// program per thread, so the mirror programs of both directions take the time of one.
fn load_programs(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<(), DatapathError> {
    let programs: Vec<(&'static str, &mut aya::programs::Program)> = ebpf
        .programs_mut()
        .filter_map(|(name, program)| Some((*names.iter().find(|n| **n == name)?, program)))
        .collect();
    if let Some(missing) = names
        .iter()
        .find(|name| !programs.iter().any(|(found, _)| found == *name))
    {
        return Err(DatapathError::Missing(missing));
    }
    std::thread::scope(|scope| {
        let loads: Vec<_> = programs
            .into_iter()
            .map(|(name, program)| {
                scope.spawn(move || {
                    let result = match program {
                        aya::programs::Program::SchedClassifier(tc) => {
                            retry_interrupted(|| tc.load())
                        }
                        aya::programs::Program::Xdp(xdp) => retry_interrupted(|| xdp.load()),
                        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
                    };
                    result.map_err(|source| DatapathError::Program { name, source })
                })
            })
            .collect();
        // Every load is waited for; the first failure is the answer.
        loads
            .into_iter()
            .map(|load| {
                load.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .fold(Ok(()), Result::and)
    })
}

fn map<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, DatapathError> {
    ebpf.map_mut(name).ok_or(DatapathError::Missing(name))
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn fill_array<T: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    values: &[T],
) -> Result<(), DatapathError> {
    let mut array = Array::<_, T>::try_from(map(ebpf, name)?).map_err(map_err(name))?;
    for (i, value) in values.iter().enumerate() {
        array.set(i as u32, value, 0).map_err(map_err(name))?;
    }
    Ok(())
}

/// A direct array (see `mirror_common::ETHERTYPE_BITMAP_MAP`): only the entries that differ from
/// the field's wildcard are written, as bitmap index plus one.
fn fill_direct(
    ebpf: &mut Ebpf,
    name: &'static str,
    table: &[u32],
    wildcard: u32,
) -> Result<(), DatapathError> {
    let mut array = Array::<_, u32>::try_from(map(ebpf, name)?).map_err(map_err(name))?;
    for (value, index) in table.iter().enumerate() {
        if *index != wildcard {
            array
                .set(value as u32, index + 1, 0)
                .map_err(map_err(name))?;
        }
    }
    Ok(())
}

fn fill_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<(), DatapathError> {
    let mut hash = HashMap::<_, K, V>::try_from(map(ebpf, name)?).map_err(map_err(name))?;
    for (k, v) in entries {
        hash.insert(k, v, 0).map_err(map_err(name))?;
    }
    Ok(())
}

/// Writes (`Some` entry) or removes (`None`) the attachment entry of `key`, in `ATTACHMENT_DIRECT`
/// or, for a large interface index, `ATTACHMENT_BITMAP`.
fn set_attachment(
    ebpf: &mut Ebpf,
    key: AttachmentKey,
    entry: Option<AttachmentEntry>,
) -> Result<(), DatapathError> {
    if let Some(slot) = key.direct_index() {
        let mut array = Array::<_, AttachmentEntry>::try_from(map(ebpf, ATTACHMENT_DIRECT_MAP)?)
            .map_err(map_err(ATTACHMENT_DIRECT_MAP))?;
        return array
            .set(slot, entry.unwrap_or_default(), 0)
            .map_err(map_err(ATTACHMENT_DIRECT_MAP));
    }
    let mut hash =
        HashMap::<_, AttachmentKey, AttachmentEntry>::try_from(map(ebpf, ATTACHMENT_BITMAP_MAP)?)
            .map_err(map_err(ATTACHMENT_BITMAP_MAP))?;
    match entry {
        Some(entry) => hash.insert(key, entry, 0),
        // Absent already is what removing wants.
        None => hash.remove(&key).or(Ok(())),
    }
    .map_err(map_err(ATTACHMENT_BITMAP_MAP))
}

fn fill_prefixes(
    ebpf: &mut Ebpf,
    v4_name: &'static str,
    v6_name: &'static str,
    entries: &[(IpNet, u32)],
) -> Result<(), DatapathError> {
    let mut v4 =
        LpmTrie::<_, [u8; 4], u32>::try_from(map(ebpf, v4_name)?).map_err(map_err(v4_name))?;
    for (net, index) in entries {
        if let IpNet::V4(n) = net {
            let key = Key::new(u32::from(n.prefix_len()), n.addr().octets());
            v4.insert(&key, index, 0).map_err(map_err(v4_name))?;
        }
    }
    let mut v6 =
        LpmTrie::<_, [u8; 16], u32>::try_from(map(ebpf, v6_name)?).map_err(map_err(v6_name))?;
    for (net, index) in entries {
        if let IpNet::V6(n) = net {
            let key = Key::new(u32::from(n.prefix_len()), n.addr().octets());
            v6.insert(&key, index, 0).map_err(map_err(v6_name))?;
        }
    }
    Ok(())
}

impl Datapath {
    /// Loads the programs for configuration `generation` and fills the maps from `plan` and the
    /// sessions' resolved targets and tunnels. Nothing is attached yet (see [`Datapath::attach`]).
    pub fn load(
        plan: &Plan,
        sessions: &[SessionMeta],
        tunnels: &[(u32, Tunnel)],
        generation: u64,
        pin_dir: Option<&Path>,
        kernel_log: KernelLog,
    ) -> Result<Self, DatapathError> {
        let tables = &plan.tables;
        let generation_bit = if generation % 2 == 1 {
            COPY_GENERATION_BIT
        } else {
            0
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(GENERATION_GLOBAL, &generation_bit, true)
            .override_global(KERNEL_LOG_GLOBAL, &kernel_log.global(), true)
            .override_global(
                FLOW_HASH_GLOBAL,
                &u32::from(sessions.iter().any(SessionMeta::uses_flow_hash)),
                true,
            )
            .map_max_entries(
                RULE_BITMAPS_MAP,
                tables.bitmaps.len() as u32 + SPARE_BITMAPS,
            )
            .map_max_entries(COPY_RING_MAP, plan.copy_ring_bytes)
            .load(EBPF_OBJECT)
            .map_err(DatapathError::load)?;
        fill_array(&mut ebpf, RULE_BITMAPS_MAP, &tables.bitmaps)?;
        fill_array(&mut ebpf, FIELD_WILDCARD_MAP, &tables.wildcard)?;
        fill_array(&mut ebpf, FIELD_UNKNOWN_MAP, &tables.unknown)?;
        for (name, field, table) in [
            (ETHERTYPE_BITMAP_MAP, Field::Ethertype, &tables.ethertype),
            (VLAN_BITMAP_MAP, Field::VlanId, &tables.vlan),
            (IP_PROTO_BITMAP_MAP, Field::IpProto, &tables.ip_proto),
            (SRC_PORT_BITMAP_MAP, Field::SrcPort, &tables.src_port),
            (DST_PORT_BITMAP_MAP, Field::DstPort, &tables.dst_port),
        ] {
            fill_direct(&mut ebpf, name, table, tables.wildcard[field as usize])?;
        }
        fill_array(&mut ebpf, RULES_MAP, &tables.rules)?;
        let programs: Vec<FilterProgram> = tables.programs.iter().map(|p| p.kernel()).collect();
        fill_array(&mut ebpf, FILTER_PROGRAMS_MAP, &programs)?;
        fill_array(&mut ebpf, SESSIONS_MAP, sessions)?;
        fill_hash(&mut ebpf, TUNNELS_MAP, tunnels)?;
        fill_array(&mut ebpf, NODE_RATE_LIMIT_MAP, &[plan.node_rate])?;
        fill_prefixes(
            &mut ebpf,
            SRC_V4_BITMAP_MAP,
            SRC_V6_BITMAP_MAP,
            &tables.src_ip,
        )?;
        fill_prefixes(
            &mut ebpf,
            DST_V4_BITMAP_MAP,
            DST_V6_BITMAP_MAP,
            &tables.dst_ip,
        )?;
        let mut datapath = Datapath {
            ebpf,
            generation,
            links: Vec::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
            later_bitmaps: std::collections::HashMap::new(),
            next_bitmap: tables.bitmaps.len() as u32,
            watch_groups: Vec::new(),
            kernel_log: None,
        };
        // Attachments last: the programs see no session until every other table is complete.
        for attachment in &tables.attachments {
            datapath.watch_with(
                attachment.ifindex,
                attachment.direction,
                attachment.bitmap,
                &attachment.sessions,
            )?;
        }
        load_programs(&mut datapath.ebpf, &programs_used(plan))?;
        if kernel_log != KernelLog::Off {
            datapath.kernel_log = Some(kernel_log::start_reader(&mut datapath.ebpf)?);
        }
        Ok(datapath)
    }

    /// Attaches the copy program to `target_devices` (the targets whose copies need finishing)
    /// and the mirror programs to every interface `plan` watches, taking over `previous`: the
    /// links of the datapath this one replaces (a reload, or an agent before this one in pinned
    /// mode).
    ///
    /// A watched hook `previous` already holds is switched to the new program in one step
    /// (`BPF_LINK_UPDATE`): each packet is judged wholly by the old programs and maps or wholly by
    /// the new ones. The new copy programs are attached before any mirror program is switched,
    /// next to the old ones; each finishes only its own generation's copies. The old copy
    /// programs go last, once no old mirror program can still be running. If a new attachment
    /// fails, what this call attached is detached again and `previous` is handed back untouched.
    pub fn attach(
        &mut self,
        plan: &Plan,
        target_devices: &[(String, u32)],
        mut previous: Vec<Attached>,
    ) -> Result<(), Box<TakeOverFailed>> {
        let replacing = !previous.is_empty();
        let mut watched: Vec<(Hook, String)> = plan
            .sessions
            .iter()
            .flat_map(|s| {
                s.attachments
                    .iter()
                    .map(|(i, d)| (Hook::Mirror(*d), i.name.clone()))
            })
            .collect();
        watched.sort();
        watched.dedup();
        let (switched, fresh): (Vec<_>, Vec<_>) = watched.into_iter().partition(|(hook, name)| {
            previous
                .iter()
                .any(|a| a.hook == *hook && a.interface == *name)
        });
        // Targets first: a copy must never reach a target without the copy program.
        let fresh = target_devices
            .iter()
            .map(|(name, _)| (Hook::Copy, name.clone()))
            .chain(fresh);
        for (hook, interface) in fresh {
            if let Err(e) = self.attach_new(hook, &interface) {
                release(std::mem::take(&mut self.links));
                return Err(Box::new(TakeOverFailed { error: e, previous }));
            }
        }
        for (hook, interface) in switched {
            let Some(at) = previous
                .iter()
                .position(|a| a.hook == hook && a.interface == interface)
            else {
                continue;
            };
            let old = previous.swap_remove(at);
            if let Err(e) = self.switch(old) {
                // Only a link whose interface vanished meanwhile fails to switch.
                tracing::warn!("{e}");
            }
        }
        if !previous.is_empty() || replacing {
            let (old_copies, old_mirrors): (Vec<_>, Vec<_>) =
                previous.into_iter().partition(|a| a.hook == Hook::Copy);
            release(old_mirrors);
            // Then no old program is running any more: their counters are final, and no copy
            // of theirs is left for an old copy program to finish.
            crate::sys::wait_for_running_programs();
            release(old_copies);
        }
        self.record_generation();
        Ok(())
    }

    /// Attaches `hook`'s program to `interface` (pinning the link in pinned mode).
    fn attach_new(&mut self, hook: Hook, interface: &str) -> Result<(), DatapathError> {
        let attach_error = |source| DatapathError::Attach {
            interface: interface.to_owned(),
            hook,
            source,
        };
        let ifindex = ifindex_of(interface).unwrap_or(0);
        let link = match attach_point(hook) {
            AttachPoint::Tc(name, attach_type) => {
                // TCX (Linux >= 6.6) needs no qdisc; older kernels need clsact for the netlink
                // attachment. An existing clsact is fine, and one we add stays (harmless, empty).
                if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0)) {
                    let _ = aya::programs::tc::qdisc_add_clsact(interface);
                }
                let program = self.program(name)?;
                let id = program
                    .attach(interface, attach_type)
                    .map_err(attach_error)?;
                HookLink::Tc(program.take_link(id).map_err(attach_error)?)
            }
            AttachPoint::Xdp => {
                let program = self.xdp_program()?;
                // Native XDP where the driver has it; else the kernel's generic XDP.
                let id = match program.attach(interface, XdpMode::Driver) {
                    Ok(id) => id,
                    Err(native) => {
                        tracing::warn!(
                            "{interface}: native XDP unavailable ({native}); using generic XDP"
                        );
                        program
                            .attach(interface, XdpMode::Skb)
                            .map_err(attach_error)?
                    }
                };
                HookLink::Xdp(program.take_link(id).map_err(attach_error)?)
            }
        };
        let (link, pin) = self.pinned(hook, interface, link)?;
        self.links.push(Attached {
            hook,
            interface: interface.to_owned(),
            ifindex,
            link,
            pin,
        });
        Ok(())
    }

    /// Switches an attached link to this datapath's program for its hook.
    fn switch(&mut self, old: Attached) -> Result<(), DatapathError> {
        let Attached {
            hook,
            interface,
            ifindex,
            link,
            pin,
        } = old;
        let attach_error = |source| DatapathError::Attach {
            interface: interface.clone(),
            hook,
            source,
        };
        let link = match (attach_point(hook), link) {
            (AttachPoint::Tc(name, _), HookLink::Tc(link)) => {
                let program = self.program(name)?;
                let id = program.attach_to_link(link).map_err(attach_error)?;
                HookLink::Tc(program.take_link(id).map_err(attach_error)?)
            }
            (AttachPoint::Xdp, HookLink::Xdp(link)) => {
                let program = self.xdp_program()?;
                let id = program.attach_to_link(link).map_err(attach_error)?;
                HookLink::Xdp(program.take_link(id).map_err(attach_error)?)
            }
            _ => return Err(DatapathError::Missing("a link of the hook's kind")),
        };
        self.links.push(Attached {
            hook,
            interface,
            ifindex,
            link,
            pin,
        });
        Ok(())
    }

    /// Takes back the links handed to a datapath that failed to take over.
    pub fn restore_links(&mut self, links: Vec<Attached>) {
        self.links = links;
    }

    /// The ring buffer of copies the agent sends on (see `mirror_common::COPY_RING_MAP`); it can
    /// be taken once.
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = self
            .ebpf
            .take_map(COPY_RING_MAP)
            .ok_or(DatapathError::Missing(COPY_RING_MAP))?;
        RingBuf::try_from(map).map_err(map_err(COPY_RING_MAP))
    }

    /// Per session, whether the ring refused a copy since its last record (see
    /// `mirror_common::RING_LOST_MAP`): the drain reads it once the ring is empty at a stop.
    pub fn take_ring_lost(&mut self) -> Result<Array<MapData, u32>, DatapathError> {
        let map = self
            .ebpf
            .take_map(RING_LOST_MAP)
            .ok_or(DatapathError::Missing(RING_LOST_MAP))?;
        Array::try_from(map).map_err(map_err(RING_LOST_MAP))
    }

    /// The links, for the datapath that replaces this one.
    pub fn take_links(&mut self) -> Vec<Attached> {
        std::mem::take(&mut self.links)
    }

    /// The kernel's ids of the programs loaded (as `bpftool prog show id N` lists them).
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        [
            TC_INGRESS_PROGRAM,
            TC_EGRESS_PROGRAM,
            XDP_PROGRAM,
            TC_COPY_PROGRAM,
        ]
        .into_iter()
        .filter_map(|name| {
            let program = self.ebpf.program(name)?;
            Some((name, program.info().ok()?.id()))
        })
        .collect()
    }

    /// The configuration generation this datapath was loaded for.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn xdp_program(&mut self) -> Result<&mut Xdp, DatapathError> {
        let program = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(DatapathError::Missing(XDP_PROGRAM))?;
        program.try_into().map_err(|source| DatapathError::Program {
            name: XDP_PROGRAM,
            source,
        })
    }

    fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing(name))?;
        program
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// Number of watched (interface, direction) hooks attached.
    pub fn hook_count(&self) -> usize {
        self.links
            .iter()
            .filter(|a| matches!(a.hook, Hook::Mirror(_)))
            .count()
    }

    /// Detaches every program, the watched interfaces first and the targets last; in pinned mode
    /// leaves them attached and pinned for the next agent instead.
    pub fn stop(&mut self) {
        let links = std::mem::take(&mut self.links);
        if self.pin_dir.is_none() {
            release(links);
        }
    }

    /// Counters summed over CPUs, by index.
    fn summed<T: aya::Pod + Default + std::ops::AddAssign>(
        &self,
        name: &'static str,
        len: usize,
    ) -> Result<Vec<T>, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing(name))?;
        let array = PerCpuArray::<_, T>::try_from(map).map_err(map_err(name))?;
        (0..len as u32)
            .map(|i| {
                let per_cpu = array.get(&i, 0).map_err(map_err(name))?;
                let mut total = T::default();
                for value in per_cpu.iter() {
                    total += *value;
                }
                Ok(total)
            })
            .collect()
    }

    /// Per-rule counters, by global rule index.
    pub fn rule_counters(&self, rules: usize) -> Result<Vec<Counters>, DatapathError> {
        self.summed(RULE_COUNTERS_MAP, rules)
    }

    /// Per-session counters, by session index.
    pub fn session_counters(&self, sessions: usize) -> Result<Vec<Counters>, DatapathError> {
        self.summed(SESSION_COUNTERS_MAP, sessions)
    }

    /// Per-hook counters: ingress, egress, XDP, copy program.
    pub fn hook_counters(&self) -> Result<Vec<HookCounters>, DatapathError> {
        self.summed(HOOK_COUNTERS_MAP, HOOK_COUNT as usize)
    }

    /// The packets classified at the attachments of each watch group.
    pub fn watch_traffic(&self) -> Result<Vec<(&WatchGroup, Traffic)>, DatapathError> {
        let traffic: Vec<Traffic> = self.summed(WATCH_TRAFFIC_MAP, self.watch_groups.len())?;
        Ok(self.watch_groups.iter().zip(traffic).collect())
    }

    /// Makes `sessions` watch `ifindex` in `direction`: its packets are classified against bitmap
    /// `bitmap` and counted in the traffic of their watch group.
    fn watch_with(
        &mut self,
        ifindex: u32,
        direction: Direction,
        bitmap: u32,
        sessions: &[usize],
    ) -> Result<(), DatapathError> {
        let key = AttachmentKey {
            ifindex,
            direction: direction as u32,
        };
        let group = WatchGroup {
            sessions: sessions.to_vec(),
            direction,
        };
        let index = match self.watch_groups.iter().position(|g| *g == group) {
            Some(index) => index,
            None if self.watch_groups.len() < MAX_ATTACHMENTS as usize => {
                self.watch_groups.push(group);
                self.watch_groups.len() - 1
            }
            None => return Err(DatapathError::WatchGroups),
        };
        let entry = AttachmentEntry {
            bitmap: bitmap + 1,
            group: index as u32,
        };
        set_attachment(&mut self.ebpf, key, Some(entry))
    }
}

/// Where a hook's program attaches.
enum AttachPoint {
    Tc(&'static str, TcAttachType),
    Xdp,
}

/// The program serving a hook.
fn program_name(hook: Hook) -> &'static str {
    match attach_point(hook) {
        AttachPoint::Tc(name, _) => name,
        AttachPoint::Xdp => XDP_PROGRAM,
    }
}

/// The program and attach point serving a hook.
fn attach_point(hook: Hook) -> AttachPoint {
    match hook {
        Hook::Mirror(Direction::Ingress) => {
            AttachPoint::Tc(TC_INGRESS_PROGRAM, TcAttachType::Ingress)
        }
        Hook::Mirror(Direction::Egress) => AttachPoint::Tc(TC_EGRESS_PROGRAM, TcAttachType::Egress),
        Hook::Mirror(Direction::XdpIngress) => AttachPoint::Xdp,
        Hook::Copy => AttachPoint::Tc(TC_COPY_PROGRAM, TcAttachType::Egress),
    }
}

/// Detaches links a datapath no longer uses (removing their pins first).
fn release(links: Vec<Attached>) {
    for attached in links.into_iter().rev() {
        if let Some(pin) = &attached.pin {
            let _ = std::fs::remove_file(pin);
        }
        drop(attached);
    }
}

fn ifindex_of(interface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(interface).ok()
}
