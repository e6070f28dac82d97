//! The kernel side seen from userspace: loads the eBPF object, fills the lookup maps from a
//! [`Plan`], attaches the TC programs and reads the counters. Everything it attached is detached
//! when the [`Datapath`] is dropped, and a failure part-way drops what was done so far.
use std::ffi::CStr;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId},
    util::KernelVersion,
};
use ipnet::IpNet;
use mirror_common::{
    ATTACHMENT_BITMAP_MAP, AttachmentKey, Counters, DST_PORT_BITMAP_MAP, DST_V4_BITMAP_MAP,
    DST_V6_BITMAP_MAP, Direction, ETHERTYPE_BITMAP_MAP, FIELD_WILDCARD_MAP, Field, HOOK_COUNT,
    HOOK_COUNTERS_MAP, HookCounters, IP_PROTO_BITMAP_MAP, NODE_RATE_LIMIT_MAP, RULE_BITMAPS_MAP,
    RULE_COUNTERS_MAP, RULES_MAP, SESSION_COUNTERS_MAP, SESSIONS_MAP, SRC_PORT_BITMAP_MAP,
    SRC_V4_BITMAP_MAP, SRC_V6_BITMAP_MAP, SessionMeta, TC_COPY_PROGRAM, TC_EGRESS_PROGRAM,
    TC_INGRESS_PROGRAM, VLAN_BITMAP_MAP,
};

use crate::rules::{Interface, Plan};

/// Where a program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// The mirror program on a watched interface.
    Mirror(Direction),
    /// The copy program at the egress of a target (interface or VXLAN device).
    Copy,
}

/// The eBPF object built by build.rs from mirror-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mirror"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
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
    #[error("listing interfaces: {0}")]
    Interfaces(std::io::Error),
}

/// A loaded, filled and attached datapath.
pub struct Datapath {
    ebpf: Ebpf,
    links: Vec<(Hook, String, SchedClassifierLinkId)>,
    /// Bitmaps written for interfaces attached later, by the sessions watching them.
    later_bitmaps: std::collections::HashMap<Vec<usize>, u32>,
    /// The next free entry of `RULE_BITMAPS` (entries past the plan's are kept spare).
    next_bitmap: u32,
}

/// Entries of `RULE_BITMAPS` kept for interfaces that appear after the start (one per distinct
/// set of sessions watching them).
const SPARE_BITMAPS: u32 = 64;

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

/// The interfaces of this network namespace.
pub fn interfaces() -> Result<Vec<Interface>, DatapathError> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(DatapathError::Interfaces(std::io::Error::last_os_error()));
        }
        let mut out = Vec::new();
        let mut entry = list;
        while (*entry).if_index != 0 {
            out.push(Interface {
                name: CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
                ifindex: (*entry).if_index,
            });
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
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
    /// Loads the programs, fills the maps from `plan` and the sessions' resolved targets, attaches
    /// the copy program to `target_devices` (the targets whose copies need finishing) and the
    /// mirror programs to every watched interface.
    pub fn start(
        plan: &Plan,
        sessions: &[SessionMeta],
        target_devices: &[(String, u32)],
    ) -> Result<Self, DatapathError> {
        let tables = &plan.tables;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(
                RULE_BITMAPS_MAP,
                tables.bitmaps.len() as u32 + SPARE_BITMAPS,
            )
            .load(EBPF_OBJECT)?;
        fill_array(&mut ebpf, RULE_BITMAPS_MAP, &tables.bitmaps)?;
        fill_array(&mut ebpf, FIELD_WILDCARD_MAP, &tables.wildcard)?;
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
        fill_array(&mut ebpf, SESSIONS_MAP, sessions)?;
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
        // Attachments last: the programs see no session until every other table is complete.
        fill_hash(&mut ebpf, ATTACHMENT_BITMAP_MAP, &tables.attachments)?;

        let mut datapath = Datapath {
            ebpf,
            links: Vec::new(),
            later_bitmaps: std::collections::HashMap::new(),
            next_bitmap: tables.bitmaps.len() as u32,
        };
        // Targets first: a copy must never reach a target without the copy program.
        let mut hooks: Vec<(Hook, String)> = target_devices
            .iter()
            .map(|(name, _)| (Hook::Copy, name.clone()))
            .collect();
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
        hooks.extend(watched);
        // TCX (Linux >= 6.6) needs no qdisc; older kernels need clsact for the netlink
        // attachment. An existing clsact is fine, and one we add stays (harmless, empty).
        let needs_clsact = KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0));
        for hook in [
            Hook::Copy,
            Hook::Mirror(Direction::Ingress),
            Hook::Mirror(Direction::Egress),
        ] {
            let (name, _) = attach_point(hook);
            datapath
                .program(name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        for (hook, interface) in hooks {
            let (name, attach_type) = attach_point(hook);
            if needs_clsact {
                let _ = aya::programs::tc::qdisc_add_clsact(&interface);
            }
            let link = datapath
                .program(name)?
                .attach(&interface, attach_type)
                .map_err(|source| DatapathError::Attach {
                    interface: interface.clone(),
                    hook,
                    source,
                })?;
            datapath.links.push((hook, interface, link));
        }
        Ok(datapath)
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

    /// Watches an interface that appeared after the start: classifies its packets in `direction`
    /// against `bitmap`, the rules of `sessions`, and attaches the mirror program. The bitmap and
    /// the attachment entry are written before the program is attached.
    pub fn watch_later(
        &mut self,
        interface: &str,
        ifindex: u32,
        direction: Direction,
        sessions: Vec<usize>,
        bitmap: impl FnOnce() -> mirror_common::RuleBitmap,
    ) -> Result<(), DatapathError> {
        let index = if let Some(index) = self.later_bitmaps.get(&sessions) {
            *index
        } else {
            let index = self.next_bitmap;
            let mut bitmaps = Array::<_, mirror_common::RuleBitmap>::try_from(map(
                &mut self.ebpf,
                RULE_BITMAPS_MAP,
            )?)
            .map_err(map_err(RULE_BITMAPS_MAP))?;
            bitmaps
                .set(index, bitmap(), 0)
                .map_err(map_err(RULE_BITMAPS_MAP))?;
            self.next_bitmap += 1;
            self.later_bitmaps.insert(sessions, index);
            index
        };
        let key = AttachmentKey {
            ifindex,
            direction: direction as u32,
        };
        fill_hash(&mut self.ebpf, ATTACHMENT_BITMAP_MAP, &[(key, index)])?;
        let hook = Hook::Mirror(direction);
        let (name, attach_type) = attach_point(hook);
        let link = self
            .program(name)?
            .attach(interface, attach_type)
            .map_err(|source| DatapathError::Attach {
                interface: interface.to_owned(),
                hook,
                source,
            })?;
        self.links.push((hook, interface.to_owned(), link));
        Ok(())
    }

    /// Forgets an interface that is gone: its attachment entries (its index may be reused) and
    /// its links (the kernel detached them with the device). Returns whether it was watched.
    pub fn forget(&mut self, interface: &str, ifindex: u32) -> bool {
        if let Some(Ok(mut attachments)) = map(&mut self.ebpf, ATTACHMENT_BITMAP_MAP)
            .ok()
            .map(HashMap::<_, AttachmentKey, u32>::try_from)
        {
            for direction in [Direction::Ingress, Direction::Egress] {
                let _ = attachments.remove(&AttachmentKey {
                    ifindex,
                    direction: direction as u32,
                });
            }
        }
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(hook, name, _)| matches!(hook, Hook::Mirror(_)) && name == interface);
        self.links = kept;
        let watched = !gone.is_empty();
        for (hook, _, link) in gone {
            let (name, _) = attach_point(hook);
            if let Ok(program) = self.program(name) {
                // The device took the link with it; dropping our handle is all that is left.
                let _ = program.detach(link);
            }
        }
        watched
    }

    /// The watched (interface, direction) hooks attached now.
    pub fn attached(&self) -> Vec<(String, Direction)> {
        self.links
            .iter()
            .filter_map(|(hook, name, _)| match hook {
                Hook::Mirror(direction) => Some((name.clone(), *direction)),
                Hook::Copy => None,
            })
            .collect()
    }

    /// Number of watched (interface, direction) hooks attached.
    pub fn hook_count(&self) -> usize {
        self.links
            .iter()
            .filter(|(hook, _, _)| matches!(hook, Hook::Mirror(_)))
            .count()
    }

    /// Detaches every program, reporting the first failure (the rest are still detached).
    pub fn stop(mut self) -> Result<(), DatapathError> {
        let mut first_error = None;
        // Watched interfaces first, targets last: the reverse of attaching.
        for (hook, interface, link) in std::mem::take(&mut self.links).into_iter().rev() {
            let (name, _) = attach_point(hook);
            let result = self.program(name).and_then(|p| {
                p.detach(link).map_err(|source| DatapathError::Attach {
                    interface: interface.clone(),
                    hook,
                    source,
                })
            });
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Counters summed over CPUs, by index.
    fn summed<T: aya::Pod + Default>(
        &self,
        name: &'static str,
        len: usize,
        add: impl Fn(&mut T, &T),
    ) -> Result<Vec<T>, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing(name))?;
        let array = PerCpuArray::<_, T>::try_from(map).map_err(map_err(name))?;
        (0..len as u32)
            .map(|i| {
                let per_cpu = array.get(&i, 0).map_err(map_err(name))?;
                let mut total = T::default();
                for value in per_cpu.iter() {
                    add(&mut total, value);
                }
                Ok(total)
            })
            .collect()
    }

    /// Per-rule counters, by global rule index.
    pub fn rule_counters(&self, rules: usize) -> Result<Vec<Counters>, DatapathError> {
        self.summed(RULE_COUNTERS_MAP, rules, add_counters)
    }

    /// Per-session counters, by session index.
    pub fn session_counters(&self, sessions: usize) -> Result<Vec<Counters>, DatapathError> {
        self.summed(SESSION_COUNTERS_MAP, sessions, add_counters)
    }

    /// Per-hook counters: ingress, egress, copy program.
    pub fn hook_counters(&self) -> Result<Vec<HookCounters>, DatapathError> {
        self.summed(
            HOOK_COUNTERS_MAP,
            HOOK_COUNT as usize,
            |t: &mut HookCounters, v| {
                t.packets += v.packets;
                t.malformed += v.malformed;
                t.step_limit += v.step_limit;
                t.table_errors += v.table_errors;
                t.foreign += v.foreign;
                t.copy_errors += v.copy_errors;
            },
        )
    }
}

/// The program and TC attach point serving a hook.
fn attach_point(hook: Hook) -> (&'static str, TcAttachType) {
    match hook {
        Hook::Mirror(Direction::Ingress) => (TC_INGRESS_PROGRAM, TcAttachType::Ingress),
        Hook::Mirror(Direction::Egress) => (TC_EGRESS_PROGRAM, TcAttachType::Egress),
        Hook::Copy => (TC_COPY_PROGRAM, TcAttachType::Egress),
    }
}

fn add_counters(total: &mut Counters, value: &Counters) {
    total.matched += value.matched;
    total.mirrored += value.mirrored;
    total.clone_errors += value.clone_errors;
    total.copy_limit += value.copy_limit;
    total.too_big += value.too_big;
    total.sampled_out += value.sampled_out;
    total.rate_limited += value.rate_limited;
    total.truncated += value.truncated;
}
