//! The maps of the map ABI (see `mirror_common`): the agent fills them, the programs read them and
//! count into the counter maps. Sizes the agent sets at load time start at 1 here. (Each
//! module's per-CPU scratch map, of a type of its own, is in that module.)
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use mirror_common::{
    AttachmentEntry, AttachmentKey, Counters, DIRECT_IFINDEXES, FIELD_COUNT, FilterProgram,
    HOOK_COUNT, HookCounters, MAX_ATTACHMENTS, MAX_FIELD_VALUES, MAX_RULES, MAX_SESSIONS,
    RateLimit, RateState, RuleBitmap, RuleMeta, SessionMeta, Traffic, Tunnel,
};

/// Every distinct rule bitmap; the lookup maps below hold indices into it. Sized by the agent.
#[map]
pub static RULE_BITMAPS: Array<RuleBitmap> = Array::with_max_entries(1, 0);

/// Per field, the bitmap of rules that accept a packet whose field is absent or unnamed by any rule.
#[map]
pub static FIELD_WILDCARD: Array<u32> = Array::with_max_entries(FIELD_COUNT as u32, 0);

/// Per field, the bitmap of rules that may decide a packet whose field the parser did not reach
/// (see `mirror_common::FIELD_UNKNOWN_MAP`).
#[map]
pub static FIELD_UNKNOWN: Array<u32> = Array::with_max_entries(FIELD_COUNT as u32, 0);

/// (interface, direction) → the rules of the sessions watching it and its traffic counter, for
/// interface indices below `DIRECT_IFINDEXES` (see `mirror_common::ATTACHMENT_DIRECT_MAP`).
#[map]
pub static ATTACHMENT_DIRECT: Array<AttachmentEntry> =
    Array::with_max_entries(DIRECT_IFINDEXES * 4, 0);

/// As `ATTACHMENT_DIRECT`, for the larger interface indices.
#[map]
pub static ATTACHMENT_BITMAP: HashMap<AttachmentKey, AttachmentEntry> =
    HashMap::with_max_entries(MAX_ATTACHMENTS, 0);

/// Per-CPU packets and bytes classified, by attachment group (see
/// `mirror_common::WATCH_TRAFFIC_MAP`).
#[map]
pub static WATCH_TRAFFIC: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_ATTACHMENTS, 0);

/// Innermost ethertype → bitmap (a direct array).
#[map]
pub static ETHERTYPE_BITMAP: Array<u32> = Array::with_max_entries(65_536, 0);

/// Outer VLAN id → bitmap (a direct array).
#[map]
pub static VLAN_BITMAP: Array<u32> = Array::with_max_entries(4096, 0);

/// IP protocol → bitmap.
#[map]
pub static IP_PROTO_BITMAP: Array<u32> = Array::with_max_entries(256, 0);

/// IPv4 source prefix → bitmap of the rules whose source prefix contains it.
#[map]
pub static SRC_V4_BITMAP: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_FIELD_VALUES, 0);

/// IPv4 destination prefix → bitmap.
#[map]
pub static DST_V4_BITMAP: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_FIELD_VALUES, 0);

/// IPv6 source prefix → bitmap.
#[map]
pub static SRC_V6_BITMAP: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_FIELD_VALUES, 0);

/// IPv6 destination prefix → bitmap.
#[map]
pub static DST_V6_BITMAP: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_FIELD_VALUES, 0);

/// L4 source port → bitmap (a direct array: one lookup whatever the port ranges).
#[map]
pub static SRC_PORT_BITMAP: Array<u32> = Array::with_max_entries(65_536, 0);

/// L4 destination port → bitmap.
#[map]
pub static DST_PORT_BITMAP: Array<u32> = Array::with_max_entries(65_536, 0);

/// Global rule index → its session, action and the next session's first rule.
#[map]
pub static RULES: Array<RuleMeta> = Array::with_max_entries(MAX_RULES, 0);

/// Program index → a filter program, which rules that name it run over the packet (see
/// `mirror_common::FILTER_PROGRAMS_MAP`).
#[map]
pub static FILTER_PROGRAMS: Array<FilterProgram> =
    Array::with_max_entries(mirror_common::MAX_PROGRAMS, 0);

/// Session index → its target.
#[map]
pub static SESSIONS: Array<SessionMeta> = Array::with_max_entries(MAX_SESSIONS, 0);

/// Session index → where its tunnel copies leave and their outer header (see
/// `mirror_common::TUNNELS_MAP`); the agent rewrites an entry when the route or next hop changes.
#[map]
pub static TUNNELS: HashMap<u32, Tunnel> = HashMap::with_max_entries(MAX_SESSIONS, 0);

/// Session index → its next ERSPAN sequence number, shared by all CPUs.
#[map]
pub static TUNNEL_SEQUENCE: Array<u64> = Array::with_max_entries(MAX_SESSIONS, 0);

/// Per-CPU counters by global rule index.
#[map]
pub static RULE_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// Per-CPU counters by session index.
#[map]
pub static SESSION_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SESSIONS, 0);

/// Per-CPU counters by hook: ingress, egress, tunnel.
#[map]
pub static HOOK_COUNTERS: PerCpuArray<HookCounters> = PerCpuArray::with_max_entries(HOOK_COUNT, 0);

/// The rate limits' bucket states: by session, then the node-wide budget (`NODE_RATE_INDEX`).
#[map]
pub static RATE_STATE: Array<RateState> = Array::with_max_entries(MAX_SESSIONS + 1, 0);

/// The node-wide budget all sessions' copies share (zero: none).
#[map]
pub static NODE_RATE_LIMIT: Array<RateLimit> = Array::with_max_entries(1, 0);

/// How deeply mirror programs are nested on this CPU right now (a copy cloned to an interface
/// runs that interface's egress hooks before `bpf_clone_redirect` returns).
#[map]
pub static NESTING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Copies the agent sends on (XDP sessions, pcap targets): see `mirror_common::COPY_RING_MAP`.
/// Sized by the agent.
#[map]
pub static COPY_RING: RingBuf = RingBuf::with_byte_size(4096, 0);

/// `Array<u32>` of `MAX_SESSIONS`, by session index: 1 when the ring refused one of the session's
/// copies since its last record, which then carries `RING_AFTER_LOSS` (and clears it).
#[map]
pub static RING_LOST: Array<u32> = Array::with_max_entries(MAX_SESSIONS, 0);

/// [`mirror_common::GENERATION_GLOBAL`]: the generation bit of this object's copy marks.
#[unsafe(no_mangle)]
static COPY_GENERATION: u32 = 0;

/// This object's [`mirror_common::COPY_GENERATION_BIT`] or 0, as the agent set it at load time.
#[inline(always)]
pub fn copy_generation() -> u32 {
    // SAFETY: a read of a static; volatile so that the compiler keeps the load the agent patches.
    unsafe { core::ptr::read_volatile(&raw const COPY_GENERATION) }
}

/// [`mirror_common::FLOW_HASH_GLOBAL`]: whether a session of this object uses the flow hash.
#[unsafe(no_mangle)]
static FLOW_HASH_USED: u32 = 0;

/// Whether the packets' flow hash is needed, as the agent set it at load time.
#[inline(always)]
pub fn flow_hash_used() -> bool {
    // SAFETY: as in `copy_generation`.
    unsafe { core::ptr::read_volatile(&raw const FLOW_HASH_USED) != 0 }
}
