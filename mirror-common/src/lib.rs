//! The map ABI shared by mirror's kernel programs (`mirror-ebpf`) and its agent (`mirror-agent`).
//!
//! This file is the single definition of every map's name, key, value and size limit. Both sides
//! compile against it, so a change here changes both.
//!
//! # How a packet is classified: bit-vector classification
//!
//! Every rule of every session gets a global index, ordered by session (configuration order) and
//! then by rule number; each session ends with an implicit catch-all rule that carries the session's
//! default action. For each packet field ([`Field`]) the agent precomputes, for every distinct value
//! or value range that the rules mention, the bitmap of rules that accept that value (including the
//! rules that do not constrain the field). A packet then costs one lookup per field (hash, LPM trie
//! or direct array), an AND of the eight bitmaps, and a walk over the set bits in rule order: the
//! first set bit of a session is that session's verdict (first match wins), after which the walk
//! jumps to the next session's first rule.
//!
//! The address lookups (LPM tries) cost more than all the others together, so they wait: the walk
//! makes one only when a candidate rule in the word it visits constrains that address. A packet
//! left with rules that accept any address (a session's default) never pays for them.
//!
//! To keep that walk flat as rule sets grow, each [`RuleBitmap`] carries a summary with one bit per
//! 64-rule word that is non-zero. The kernel ANDs the summaries first and only visits words that
//! survive in all eight fields, so a packet that matches only the last of 10,000 rules visits a
//! handful of words instead of 157. We chose this over tuple-space search with a flow cache because
//! its cost does not depend on flow churn (a port scan or a SYN flood costs the same per packet as a
//! long flow), it needs no cache invalidation, and port ranges map onto it directly instead of being
//! expanded into prefixes.
#![no_std]

pub mod cbpf;
mod counters;

pub use self::{
    cbpf::{CbpfInsn, FILTER_PROGRAMS_MAP, FilterProgram, MAX_PROGRAM_INSNS, MAX_PROGRAMS},
    counters::{CounterField, Counters, HookCounters, Metric},
};

/// Largest number of rules across all sessions, including one implicit default rule per session.
pub const MAX_RULES: u32 = 16_384;
/// 64-bit words in a rule bitmap.
pub const BITMAP_WORDS: usize = MAX_RULES as usize / 64;
/// 64-bit words in a rule bitmap's summary (one bit per non-zero bitmap word).
pub const SUMMARY_WORDS: usize = BITMAP_WORDS / 64;
/// Largest number of sessions.
pub const MAX_SESSIONS: u32 = 64;
/// Largest number of copies made of one packet at one hook. Sessions are served in configuration
/// order; a session that accepts a packet after this many copies were made counts a `copy_limit`.
pub const MAX_COPIES_PER_PACKET: usize = 8;
/// Largest nesting of mirror programs on one CPU that still makes copies: a copy into a VXLAN
/// device runs the underlay's hook (1) before its clone returns; deeper means copies of copies.
pub const MAX_NESTING: u32 = 4;
/// Largest number of (interface, direction) attachment points.
pub const MAX_ATTACHMENTS: u32 = 4_096;
/// Largest number of distinct prefixes per LPM field.
pub const MAX_FIELD_VALUES: u32 = 65_536;
/// Upper bound on classification steps for one packet (words visited plus rules visited).
pub const MAX_CLASSIFY_STEPS: u32 = MAX_RULES + BITMAP_WORDS as u32;

/// The packet fields a rule can constrain, in the order of [`FIELD_WILDCARD_MAP`]'s entries.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The (interface, direction) the program runs at: selects the sessions that apply.
    Attachment = 0,
    /// The innermost ethertype, after up to two VLAN tags.
    Ethertype = 1,
    /// The outer VLAN id (absent when the frame is untagged).
    VlanId = 2,
    /// The IP protocol (IPv4 protocol or the IPv6 upper-layer header after extension headers).
    IpProto = 3,
    /// The IPv4 or IPv6 source address.
    SrcIp = 4,
    /// The IPv4 or IPv6 destination address.
    DstIp = 5,
    /// The TCP, UDP or SCTP source port.
    SrcPort = 6,
    /// The TCP, UDP or SCTP destination port.
    DstPort = 7,
}

/// Number of [`Field`]s.
pub const FIELD_COUNT: usize = 8;

/// `RULE_BITMAPS`: `Array<RuleBitmap>`; sized by the agent at load time to the bitmaps it needs.
pub const RULE_BITMAPS_MAP: &str = "RULE_BITMAPS";
/// `FIELD_WILDCARD`: `Array<u32>` of [`FIELD_COUNT`] bitmap indices, the rules that accept a packet
/// whose field is absent or has a value no rule names; [`UNCONSTRAINED`] for a field no rule
/// constrains, which the programs then neither look up nor intersect.
pub const FIELD_WILDCARD_MAP: &str = "FIELD_WILDCARD";
/// A [`FIELD_WILDCARD`](FIELD_WILDCARD_MAP) entry: no rule constrains this field.
pub const UNCONSTRAINED: u32 = u32::MAX;
/// `FIELD_UNKNOWN`: `Array<u32>` of [`FIELD_COUNT`] bitmap indices, the rules that may decide a
/// packet whose field the parser did not reach (a header before it was cut or too long to
/// follow): the rules that accept any value of it, and the mirror rules (the field might match:
/// a copy in doubt, counted as `unparsed`). A skip rule that constrains the field never decides
/// such a packet, so `not port 53` cannot be evaded by a chain the parser gives up on.
/// [`UNCONSTRAINED`] where no skip rule constrains the field (every rule may decide).
pub const FIELD_UNKNOWN_MAP: &str = "FIELD_UNKNOWN";
/// `ATTACHMENT_DIRECT`: `Array<AttachmentEntry>` of [`DIRECT_IFINDEXES`] × 4, by
/// [`AttachmentKey::direct_index`]: what the programs classify a packet at this interface and
/// direction against, and where they count it (see [`AttachmentEntry`]). Every packet at a hook
/// starts with this lookup, and an array's is inlined by the verifier where a hash's is a call.
/// Interfaces of larger indices (a node that created many interfaces since boot) are in
/// [`ATTACHMENT_BITMAP_MAP`].
pub const ATTACHMENT_DIRECT_MAP: &str = "ATTACHMENT_DIRECT";
/// Interface indices below this are in [`ATTACHMENT_DIRECT_MAP`].
pub const DIRECT_IFINDEXES: u32 = 16_384;
/// `ATTACHMENT_BITMAP`: `HashMap<AttachmentKey, AttachmentEntry>`, as [`ATTACHMENT_DIRECT_MAP`] for
/// the interfaces whose index is [`DIRECT_IFINDEXES`] or more. A miss means no session applies.
pub const ATTACHMENT_BITMAP_MAP: &str = "ATTACHMENT_BITMAP";
/// `WATCH_TRAFFIC`: `PerCpuArray<Traffic>` of [`MAX_ATTACHMENTS`], by [`AttachmentEntry::group`]:
/// the packets classified at the attachments that the same sessions watch in the same direction.
/// A session's default rule that skips is in no rule bitmap, so that a packet no rule
/// matches leaves the classifier early; the agent counts it instead, as this traffic less what
/// the session's other rules decided.
pub const WATCH_TRAFFIC_MAP: &str = "WATCH_TRAFFIC";
/// The direct arrays below (ethertype, VLAN, IP protocol, ports) hold a bitmap index plus one, and
/// zero for a value no rule names, which stands for the field's [`FIELD_WILDCARD`](FIELD_WILDCARD_MAP) bitmap: the
/// agent then writes only the values rules name, not all 65,536 entries.
///
/// `ETHERTYPE_BITMAP`: `Array<u32>` of 65,536, ethertype to bitmap index (a direct array: no hash).
pub const ETHERTYPE_BITMAP_MAP: &str = "ETHERTYPE_BITMAP";
/// `VLAN_BITMAP`: `Array<u32>` of 4,096, VLAN id to bitmap index.
pub const VLAN_BITMAP_MAP: &str = "VLAN_BITMAP";
/// `IP_PROTO_BITMAP`: `Array<u32>` of 256, IP protocol to bitmap index.
pub const IP_PROTO_BITMAP_MAP: &str = "IP_PROTO_BITMAP";
/// `SRC_V4_BITMAP` / `DST_V4_BITMAP`: `LpmTrie<[u8; 4], u32>`, IPv4 prefix to bitmap index.
pub const SRC_V4_BITMAP_MAP: &str = "SRC_V4_BITMAP";
/// See [`SRC_V4_BITMAP_MAP`].
pub const DST_V4_BITMAP_MAP: &str = "DST_V4_BITMAP";
/// `SRC_V6_BITMAP` / `DST_V6_BITMAP`: `LpmTrie<[u8; 16], u32>`, IPv6 prefix to bitmap index.
pub const SRC_V6_BITMAP_MAP: &str = "SRC_V6_BITMAP";
/// See [`SRC_V6_BITMAP_MAP`].
pub const DST_V6_BITMAP_MAP: &str = "DST_V6_BITMAP";
/// `SRC_PORT_BITMAP` / `DST_PORT_BITMAP`: `Array<u32>` of 65,536, port to bitmap index.
pub const SRC_PORT_BITMAP_MAP: &str = "SRC_PORT_BITMAP";
/// See [`SRC_PORT_BITMAP_MAP`].
pub const DST_PORT_BITMAP_MAP: &str = "DST_PORT_BITMAP";
/// `RULES`: `Array<RuleMeta>` of [`MAX_RULES`], by global rule index.
pub const RULES_MAP: &str = "RULES";
/// `SESSIONS`: `Array<SessionMeta>` of [`MAX_SESSIONS`], by session index.
pub const SESSIONS_MAP: &str = "SESSIONS";
/// `RULE_COUNTERS`: `PerCpuArray<Counters>` of [`MAX_RULES`], by global rule index.
pub const RULE_COUNTERS_MAP: &str = "RULE_COUNTERS";
/// `SESSION_COUNTERS`: `PerCpuArray<Counters>` of [`MAX_SESSIONS`], by session index.
pub const SESSION_COUNTERS_MAP: &str = "SESSION_COUNTERS";
/// `RING_LOST`: `Array<u32>` of [`MAX_SESSIONS`], by session index: 1 while the ring has refused
/// a copy of the session since its last record (which then carries [`RING_AFTER_LOSS`]).
pub const RING_LOST_MAP: &str = "RING_LOST";
/// `HOOK_COUNTERS`: `PerCpuArray<HookCounters>` of [`HOOK_COUNT`]: one per [`Direction`], then
/// [`COPY_HOOK`].
pub const HOOK_COUNTERS_MAP: &str = "HOOK_COUNTERS";
/// Entries of `HOOK_COUNTERS`.
pub const HOOK_COUNT: u32 = 4;
/// `HOOK_COUNTERS` index of the copy program (see [`TC_COPY_PROGRAM`]).
pub const COPY_HOOK: u32 = 2;

/// Program names in the object file.
pub const TC_INGRESS_PROGRAM: &str = "mirror_tc_ingress";
/// The XDP program (received packets only; copies through [`COPY_RING_MAP`]).
pub const XDP_PROGRAM: &str = "mirror_xdp";
/// See [`TC_INGRESS_PROGRAM`].
pub const TC_EGRESS_PROGRAM: &str = "mirror_tc_egress";
/// The program at the egress of every target interface and of every underlay interface a tunnel's
/// copies leave through: cuts a copy to its session's snaplen, puts a tunnel copy's outer headers
/// on it (see [`TUNNELS_MAP`]), and clears the copy's mark. Packets that are not copies pass
/// unchanged.
pub const TC_COPY_PROGRAM: &str = "mirror_tc_copy";

/// How a copy tells the copy program at its target which rule made it: `bpf_clone_redirect` cannot
/// attach data to the clone alone, so the mirror program sets the packet's mark to
/// `COPY_MARK | generation bit | rule` just for the clone and restores the original mark right
/// after. The copy program clears the mark again before the copy leaves.
pub const COPY_MARK: u32 = 0x6d69_0000;
/// The bits of a mark that hold [`COPY_MARK`].
pub const COPY_MARK_MASK: u32 = 0xffff_0000;
/// Set in a copy's mark by the programs of odd configuration generations (see
/// [`GENERATION_GLOBAL`]). While a reload swaps programs, the old and the new copy programs are
/// both attached to a target; each finishes only the copies of its own generation (rule indices
/// differ between them) and passes the others on.
pub const COPY_GENERATION_BIT: u32 = 0x8000;
/// The word of `__sk_buff::cb` that carries a tunnel copy's flow hash (see `limit::flow_hash` in
/// the programs: the same in both directions) from the mirror program to the copy program, which
/// picks the outer UDP source port from it. Set on the original just for the clone, like the mark.
pub const FLOW_HASH_CB: usize = 0;
/// The word of `__sk_buff::cb` where a copy also carries [`COPY_COOKIE`] (set on the original
/// just for the clone, like the mark): the mark's upper half is shared with others (Calico's
/// default mark mask is 0xffff0000), so a packet whose mark merely looks like a copy's is not
/// taken for one, never cut or encapsulated.
pub const COPY_COOKIE_CB: usize = 1;
/// See [`COPY_COOKIE_CB`].
pub const COPY_COOKIE: u32 = 0x7370_616e;
/// Set in a copy's mark when the packet was seen leaving its interface (egress): the ERSPAN type
/// III header carries the direction.
pub const COPY_EGRESS_BIT: u32 = 0x4000;
/// The bits of a copy's mark that hold the global rule index.
pub const COPY_RULE_MASK: u32 = MAX_RULES - 1;
const _: () = assert!(
    size_of::<Tunnel>() == 32 + MAX_TUNNEL_HEADER && MAX_TUNNEL_HEADER.is_multiple_of(8),
    "Tunnel: no padding, a header of whole words"
);
const _: () = assert!(
    MAX_RULES.is_power_of_two()
        && COPY_RULE_MASK & (COPY_MARK_MASK | COPY_GENERATION_BIT | COPY_EGRESS_BIT) == 0
        && COPY_EGRESS_BIT & (COPY_MARK_MASK | COPY_GENERATION_BIT) == 0
        && COPY_MARK & !COPY_MARK_MASK == 0
);
/// Name of the programs' read-only global `u32`: [`COPY_GENERATION_BIT`] in the objects loaded
/// for odd configuration generations, 0 in the others. The agent sets it at load time.
pub const GENERATION_GLOBAL: &str = "COPY_GENERATION";

/// Name of the programs' read-only global `u32`: 1 when a session of the object uses the packets'
/// flow hash ([`SessionMeta::uses_flow_hash`]), else 0, and the programs skip hashing (a ring
/// record's `flow_hash` is then 0). The agent sets it at load time.
pub const FLOW_HASH_GLOBAL: &str = "FLOW_HASH_USED";

/// Where a program runs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Packets received by the interface.
    Ingress = 0,
    /// Packets sent by the interface.
    Egress = 1,
    /// Packets received by the interface, seen by the XDP program before the kernel's stack
    /// (sessions with `hook = "xdp"`). Its copies go through [`COPY_RING_MAP`]. The value is also
    /// the hook's `HOOK_COUNTERS` index (2 is [`COPY_HOOK`]).
    XdpIngress = 3,
}

/// Key of `ATTACHMENT_BITMAP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachmentKey {
    /// Interface index in the agent's network namespace.
    pub ifindex: u32,
    /// A [`Direction`] as u32.
    pub direction: u32,
}

impl AttachmentKey {
    /// The key's [`ATTACHMENT_DIRECT_MAP`] entry; none when the interface index is too large.
    #[inline]
    pub fn direct_index(&self) -> Option<u32> {
        (self.ifindex < DIRECT_IFINDEXES).then_some(self.ifindex * 4 + (self.direction & 3))
    }
}

/// Value of `ATTACHMENT_DIRECT` and `ATTACHMENT_BITMAP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachmentEntry {
    /// The `RULE_BITMAPS` index of the rules of the sessions watching the attachment, plus one;
    /// zero (an entry never written) when no session does.
    pub bitmap: u32,
    /// The `WATCH_TRAFFIC` entry its packets count into: one per set of sessions and direction.
    pub group: u32,
}

/// Per-CPU value of `WATCH_TRAFFIC`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    /// From the Ethernet header on, as a rule's `matched_bytes`.
    pub bytes: u64,
}

impl core::ops::AddAssign for Traffic {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// A set of rules by global rule index, with a summary of its non-zero words.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RuleBitmap {
    /// Bit `w` is set when `words[w]` is non-zero.
    pub summary: [u64; SUMMARY_WORDS],
    /// Bit `r % 64` of word `r / 64` is set when rule `r` is in the set.
    pub words: [u64; BITMAP_WORDS],
}

/// What a rule does with a packet it matches.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Do not copy; the session's decision is made.
    Skip = 0,
    /// Copy the packet to the session's target.
    Mirror = 1,
}

/// Value of `RULES`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RuleMeta {
    /// Session index this rule belongs to.
    pub session: u32,
    /// An [`Action`] as u32.
    pub action: u32,
    /// Global index of the first rule of the next session (rules of a session are contiguous).
    pub next_session_rule: u32,
    /// The `FILTER_PROGRAMS` index plus one of the program that must also accept the packet; zero:
    /// the rule's fields decide alone.
    pub program: u32,
}

/// [`SessionMeta::target_kind`]: copies leave through an interface as they are.
pub const TARGET_INTERFACE: u32 = 0;
/// [`SessionMeta::target_kind`]: copies are cloned to the underlay interface toward a collector,
/// where the copy program puts the session's outer headers on them (see [`TUNNELS_MAP`]).
pub const TARGET_TUNNEL: u32 = 4;

/// [`SessionMeta::target_kind`]: copies go into [`COPY_RING_MAP`] and the agent sends them on (a
/// pcap file, or any target of an XDP session: XDP cannot clone a packet).
pub const TARGET_RING: u32 = 8;

/// `COPY_RING`: a ring buffer (`BPF_MAP_TYPE_RINGBUF`), sized by the agent, of copies the agent
/// sends on: each record is a [`RingCopyHeader`] followed by `cap_len` bytes of the frame. A full
/// ring drops the copy and counts it as `ring_full`; the original packet never waits.
pub const COPY_RING_MAP: &str = "COPY_RING";
/// Largest copy a ring record holds (a jumbo frame); longer copies are cut and count as
/// `truncated`.
pub const MAX_RING_COPY: u32 = 9216;

/// The header of a [`COPY_RING_MAP`] record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCopyHeader {
    /// `bpf_ktime_get_ns` when the copy was made (monotonic clock).
    pub timestamp_ns: u64,
    /// The interface the packet was seen on.
    pub ifindex: u32,
    /// A [`Direction`] as u32.
    pub direction: u32,
    /// Session and global rule index that made the copy.
    pub session: u32,
    pub rule: u32,
    /// The frame's length on the wire, and how many of its bytes follow the header.
    pub orig_len: u32,
    pub cap_len: u32,
    /// The packet's symmetric flow hash (the VXLAN source port of its copies follows it; 0 when no
    /// session uses it, see [`FLOW_HASH_GLOBAL`]).
    pub flow_hash: u32,
    /// [`RING_WATCH_ONLY`] and [`RING_AFTER_LOSS`], and a whole frame's chunk index from
    /// [`RING_CHUNK_SHIFT`].
    pub flags: u32,
}

/// [`RingCopyHeader::flags`]: a copy for `mirror-agent capture` watchers alone; the session's
/// target got its own (a clone) from the kernel.
pub const RING_WATCH_ONLY: u32 = 1;
/// [`RingCopyHeader::flags`]: the ring refused one of this session's copies since its last
/// record (the agent's shadow tells lost copies from a gap in what the peers sent).
pub const RING_AFTER_LOSS: u32 = 2;
/// [`RingCopyHeader::flags`] from this bit: a whole-frame session's chunk index. A frame longer
/// than [`MAX_RING_COPY`] goes into the ring as up to [`MAX_RING_CHUNKS`] records, chunk `k`
/// holding the frame's bytes from `k * MAX_RING_COPY`; every chunk has the first's header fields
/// (timestamp, interface, direction, session, `orig_len`), `cap_len` its own.
pub const RING_CHUNK_SHIFT: u32 = 8;
/// Chunks of one frame at most: a GSO or GRO packet of 64 KiB and its headers.
pub const MAX_RING_CHUNKS: u32 = 8;

/// [`SessionMeta::sample_mode`]: every packet is a candidate.
pub const SAMPLE_ALL: u32 = 0;
/// [`SessionMeta::sample_mode`]: each candidate copy is kept with probability 1 / `sample_every`.
pub const SAMPLE_PACKETS: u32 = 1;
/// [`SessionMeta::sample_mode`]: a flow's copies are all kept or all dropped, by a symmetric hash
/// of its addresses, ports and protocol (both directions of a conversation decide alike).
pub const SAMPLE_FLOWS: u32 = 2;

/// A token bucket in GCRA form: each admitted copy moves a theoretical arrival time forward by its
/// cost, and a copy is admitted while that time stays within the burst allowance of now. Zero
/// fields disable that half of the limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Nanoseconds one copy costs (1e9 / packets per second).
    pub packet_cost_ns: u64,
    /// How far ahead of now the packet clock may run: burst packets × `packet_cost_ns`.
    pub packet_burst_ns: u64,
    /// Nanoseconds one byte costs, × 1024 (1e9 × 1024 / bytes per second).
    pub byte_cost_ns_x1024: u64,
    /// How far ahead of now the byte clock may run: burst bytes × the byte cost.
    pub byte_burst_ns: u64,
}

/// Value of `RATE_STATE`: the buckets' theoretical arrival times, shared by all CPUs. Updates are
/// plain stores, not locked: two CPUs admitting at the same instant may each pass once where the
/// bucket had room for one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub packet_tat_ns: u64,
    pub byte_tat_ns: u64,
}

/// `RATE_STATE`: `Array<RateState>` of [`MAX_SESSIONS`] + 1: by session index, then the node-wide
/// budget at [`NODE_RATE_INDEX`].
pub const RATE_STATE_MAP: &str = "RATE_STATE";
/// `NODE_RATE_LIMIT`: `Array<RateLimit>` of 1, the budget all sessions' copies share.
pub const NODE_RATE_LIMIT_MAP: &str = "NODE_RATE_LIMIT";
/// `RATE_STATE` index of the node-wide budget.
pub const NODE_RATE_INDEX: u32 = MAX_SESSIONS;

/// Value of `SESSIONS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionMeta {
    /// Interface index the copies are sent out of (interface targets; a tunnel's is in
    /// [`TUNNELS_MAP`], where it follows the route); 0 while the target interface is gone.
    pub target_ifindex: u32,
    /// [`TARGET_INTERFACE`], [`TARGET_TUNNEL`] or [`TARGET_RING`].
    pub target_kind: u32,
    /// Largest copy the target carries whole, as an Ethernet frame from its first byte (a VLAN tag
    /// held in skb metadata counts; a GSO packet counts by its largest segment). A larger copy is
    /// not made and counts as `too_big`, unless `snaplen` is set. 0: no limit.
    pub max_copy_len: u32,
    /// Copies are cut to this many bytes (already no more than `max_copy_len`); 0: whole.
    pub snaplen: u32,
    /// 1 when copies need the copy program at the target (outer headers or a cut), and so carry
    /// their rule in the mark; 0 sends them as plain clones.
    pub finish: u32,
    /// [`SAMPLE_ALL`], [`SAMPLE_PACKETS`] or [`SAMPLE_FLOWS`].
    pub sample_mode: u32,
    /// Keep 1 in this many (packets or flows); at least 1.
    pub sample_every: u32,
    /// Mixed into the flow hash, so that nodes can sample different flows or the same ones.
    pub sample_seed: u32,
    /// 1: no copy of a packet the parser could not finish (fail closed); 0: such a packet is
    /// copied when a rule might match it (fail open). Counted as `unparsed` either way.
    pub skip_unparsed: u32,
    /// 1 while `mirror-agent capture` watches the session: each copy the TC path clones is also
    /// put into the ring, marked [`RING_WATCH_ONLY`] (ring targets' copies are there anyway).
    pub watched: u32,
    /// 1: copies go into the ring whole, in chunks (see [`RING_CHUNK_SHIFT`]), a GSO packet's
    /// payload included (a shadow target reassembles the streams); 0: a GSO packet's copy is its
    /// first segment's length.
    pub whole_frames: u32,
    /// Keeps [`SessionMeta::rate`] 8-aligned without implicit padding.
    pub reserved: u32,
    /// This session's own limit.
    pub rate: RateLimit,
}

impl SessionMeta {
    /// Whether this session's copies need the packet's flow hash: flow sampling, and the tunnel
    /// and ring targets, whose outer UDP source port follows it.
    pub fn uses_flow_hash(&self) -> bool {
        self.sample_mode == SAMPLE_FLOWS
            || self.target_kind == TARGET_TUNNEL
            || self.target_kind == TARGET_RING
    }
}

/// `TUNNELS`: `HashMap<u32, Tunnel>` of [`MAX_SESSIONS`], by session index: where a tunnel
/// session's copies leave and the outer headers they get. The agent writes each entry whole (a
/// hash map replaces it atomically: no copy sees half of an old and half of a new next hop) and
/// again whenever the route or the next hop's MAC address changes.
pub const TUNNELS_MAP: &str = "TUNNELS";
/// `TUNNEL_SEQUENCE`: `Array<u64>` of [`MAX_SESSIONS`], by session index: the next ERSPAN sequence
/// number of each session.
pub const TUNNEL_SEQUENCE_MAP: &str = "TUNNEL_SEQUENCE";
/// Largest outer header: Ethernet, IPv6, GRE with a sequence number and ERSPAN type III (74 bytes),
/// rounded up.
pub const MAX_TUNNEL_HEADER: usize = 80;

/// [`Tunnel::format`]: VXLAN (RFC 7348) over UDP.
pub const TUNNEL_VXLAN: u32 = 1;
/// [`Tunnel::format`]: GENEVE (RFC 8926) over UDP, protocol 0x6558 (Ethernet).
pub const TUNNEL_GENEVE: u32 = 2;
/// [`Tunnel::format`]: GRE with protocol 0x6558 (transparent Ethernet bridging), with or without a
/// key.
pub const TUNNEL_GRE: u32 = 3;
/// [`Tunnel::format`]: ERSPAN type II (GRE protocol 0x88BE, sequence numbered).
pub const TUNNEL_ERSPAN2: u32 = 4;
/// [`Tunnel::format`]: ERSPAN type III (GRE protocol 0x22EB, sequence numbered, with a timestamp
/// and the direction).
pub const TUNNEL_ERSPAN3: u32 = 5;

/// Value of `TUNNELS`: a tunnel session's underlay interface and outer header template. The copy
/// program writes `header[..header_len]` in front of each copy (its inner frame), then fills in
/// what differs per copy: IP length and checksum, UDP length and source port, the ERSPAN sequence
/// number, truncation bit, timestamp and direction. Aligned to 8, so that the programs copy the
/// header in words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// The interface the route to the collector leaves through; 0 while there is no route or the
    /// next hop's MAC address is unknown: copies are then not made, and counted as `no_route`.
    pub ifindex: u32,
    /// Bytes of `header` in use: outer Ethernet, IP, UDP or GRE, and the tunnel's own header.
    pub header_len: u32,
    /// [`TUNNEL_VXLAN`], [`TUNNEL_GENEVE`], [`TUNNEL_GRE`], [`TUNNEL_ERSPAN2`] or
    /// [`TUNNEL_ERSPAN3`].
    pub format: u32,
    /// 1 when the outer header is IPv6, 0 for IPv4.
    pub ipv6: u32,
    /// IPv4 only: the one's complement sum of the template's IP header words (length and checksum
    /// zero), so that a copy's checksum costs one addition.
    pub ipv4_sum: u32,
    /// UDP formats: source ports are `source_port_low + (hash * source_port_span >> 32)`, so a
    /// flow's copies share one (ECMP and receive-side scaling keep them together).
    pub source_port_low: u32,
    pub source_port_span: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The outer header, with the fields filled per copy left zero.
    pub header: [u8; MAX_TUNNEL_HEADER],
}

#[cfg(feature = "user")]
mod pod {
    /// Marks map ABI types as plain data for aya.
    macro_rules! pod {
        ($($name:ident),+) => {
            $(
                // SAFETY: every type listed is repr(C), Copy, made of integers only, with no
                // implicit padding.
                unsafe impl aya::Pod for super::$name {}
            )+
        };
    }

    pod!(
        AttachmentKey,
        AttachmentEntry,
        Traffic,
        RuleBitmap,
        RuleMeta,
        SessionMeta,
        RateLimit,
        RingCopyHeader,
        RateState,
        Counters,
        HookCounters,
        Tunnel,
        FilterProgram
    );
}
