//! Rule lookup by bit-vector classification (the design is explained in `mirror_common`): one
//! lookup per field gives a rule bitmap; the walk over their intersection runs in a `bpf_loop`
//! callback, so the verifier checks one step however many rules there are.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::bpf_loop,
    macros::map,
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
};
use mirror_common::{
    Action, AttachmentKey, BITMAP_WORDS, FIELD_COUNT, Field, MAX_CLASSIFY_STEPS,
    MAX_COPIES_PER_PACKET, SUMMARY_WORDS, UNCONSTRAINED,
};

use crate::{
    count,
    maps::{
        ATTACHMENT_BITMAP, ATTACHMENT_DIRECT, DST_PORT_BITMAP, DST_V4_BITMAP, DST_V6_BITMAP,
        ETHERTYPE_BITMAP, FIELD_UNKNOWN, FIELD_WILDCARD, IP_PROTO_BITMAP, RULE_BITMAPS, RULES,
        SRC_PORT_BITMAP, SRC_V4_BITMAP, SRC_V6_BITMAP, VLAN_BITMAP,
    },
    packet::{Carried, Packet},
    parse::{ABSENT, FAMILY_UNKNOWN, FAMILY_V4, FAMILY_V6, Headers, UNKNOWN},
    program,
};

/// A copy to make: the rule that decided it (its session holds the target).
#[derive(Clone, Copy)]
pub struct Copy {
    pub rule: u32,
    pub session: u32,
}

/// The classification of one packet at one hook.
pub struct Verdict {
    /// The first `copy_count` entries are this packet's copies (the rest is stale).
    pub copies: &'static [Copy; MAX_COPIES_PER_PACKET],
    pub copy_count: usize,
    pub step_limit_hit: bool,
    /// [`Headers::l4_offset`], read back from map memory: the verifier keeps no range for it, so
    /// using it later does not make the verifier tell apart every parse path that produced it.
    pub l4_offset: u32,
    /// The parser could not finish the packet (see [`crate::parse::UNKNOWN`]).
    pub unparsed: bool,
}

/// A rule-table inconsistency (a missing bitmap or rule entry): the agent wrote the maps wrong.
pub struct TableError;

/// State of the walk, shared with the `bpf_loop` callback through a per-CPU scratch map rather than
/// the stack: the verifier does not track the contents of map values, so every step starts from the
/// same abstract state and the callback verifies in one pass instead of once per distinct state.
#[repr(C)]
pub struct Walk {
    /// Bitmap index per field.
    bitmaps: [u32; FIELD_COUNT],
    /// Words that are non-zero in every field's bitmap and not yet visited.
    summary: [u64; SUMMARY_WORDS],
    /// While the fields narrow the candidates: the first word of the attachment's rules, and its
    /// candidates exactly (the summary is per word). With up to 64 rules, a packet no rule
    /// matches then leaves before the walk.
    focus: u64,
    focus_index: u32,
    /// Candidate rules left in the word being visited.
    word: u64,
    word_index: u32,
    /// Rules below this index belong to sessions already decided.
    min_rule: u32,
    copy_count: u32,
    table_error: u32,
    l4_offset: u32,
    /// [`Headers::frame_len`], for the bytes of the rules that match.
    frame_len: u32,
    /// [`Headers::family`], and the addresses as the keys of the lookups the walk makes on demand
    /// (kept here, not on the stack, which the walk's callback shares with the program).
    family: u32,
    src: AddressKey,
    dst: AddressKey,
    copies: [Copy; MAX_COPIES_PER_PACKET],
}

/// An address as the key of an LPM lookup: the layout of `Key<[u8; 16]>`, whose first 8 bytes are
/// also that of `Key<[u8; 4]>` (an IPv4 key is the same, its prefix length set to 32).
#[repr(C)]
struct AddressKey {
    prefix_len: u32,
    address: [u32; 4],
}

/// A [`Walk::bitmaps`] entry for an address field whose lookup waits until a candidate rule
/// constrains it (see [`resolve_address`]).
const PENDING: u32 = UNCONSTRAINED - 1;

/// Per CPU, the rule walk of the packet being classified.
#[map]
static WALK_SCRATCH: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// The sessions watching `attachment`: the bitmap of their rules and the group its packets count
/// in; none when no session does.
#[inline(always)]
pub fn watched(attachment: &AttachmentKey) -> Option<(u32, u32)> {
    let entry = match attachment.direct_index() {
        Some(index) => ATTACHMENT_DIRECT.get(index),
        // SAFETY: a hash lookup returns a pointer to the value or None.
        None => unsafe { ATTACHMENT_BITMAP.get(attachment) },
    }?;
    Some((entry.bitmap.checked_sub(1)?, entry.group))
}

/// Finds, for each session whose rules are `attachment_rules`, the first rule that matches the
/// packet. None when no rule can match: a packet most rules rule out leaves after the first
/// fields, without the address lookups or the walk.
#[inline(always)]
pub fn classify<P: Packet>(
    ctx: &P,
    attachment_rules: u32,
    headers: &Headers,
) -> Result<Option<Verdict>, TableError> {
    let walk = WALK_SCRATCH.get_ptr_mut(0).ok_or(TableError)?;
    // SAFETY: this CPU's scratch slot; a program runs to completion on one CPU without preemption
    // by another program that uses the slot (TC programs do not nest).
    let walk: &'static mut Walk = unsafe { &mut *walk };
    reset(walk);
    // Cheap and selective fields first (direct arrays), the longest-prefix lookups last; each
    // narrows the candidate words, and an empty set ends the classification.
    let narrowed = narrow(walk, Field::Attachment, attachment_rules)?
        && focus_first_word(walk, attachment_rules)?
        && narrow(
            walk,
            Field::IpProto,
            indexed(Field::IpProto, headers.ip_proto, |i| IP_PROTO_BITMAP.get(i))?,
        )?
        && narrow(
            walk,
            Field::DstPort,
            indexed(Field::DstPort, headers.dst_port, |i| DST_PORT_BITMAP.get(i))?,
        )?
        && narrow(
            walk,
            Field::SrcPort,
            indexed(Field::SrcPort, headers.src_port, |i| SRC_PORT_BITMAP.get(i))?,
        )?
        && narrow(
            walk,
            Field::Ethertype,
            indexed(Field::Ethertype, headers.ethertype, |i| {
                ETHERTYPE_BITMAP.get(i)
            })?,
        )?
        && narrow(
            walk,
            Field::VlanId,
            indexed(Field::VlanId, headers.vlan_id, |i| VLAN_BITMAP.get(i))?,
        )?;
    if !narrowed {
        return Ok(None);
    }
    // The longest-prefix lookups cost more than everything above together, and the candidates
    // left are often only rules that accept any address (a session's default): the walk makes
    // them when it first meets a candidate that constrains the address.
    let mut any_pending = false;
    for field in [Field::DstIp, Field::SrcIp] {
        if headers.family == FAMILY_UNKNOWN {
            // Not reached: no lookup, only the rules that may decide without the address.
            if !narrow(walk, field, unknown(field)?)? {
                return Ok(None);
            }
            continue;
        }
        let pending = wildcard(field)? != UNCONSTRAINED;
        walk.bitmaps[field as usize] = if pending { PENDING } else { UNCONSTRAINED };
        any_pending |= pending;
    }
    // The keys only when a lookup may come: rule sets without addresses skip the stores.
    if any_pending {
        let prefix_len = if headers.family == FAMILY_V4 { 32 } else { 128 };
        walk.family = headers.family;
        walk.src = AddressKey {
            prefix_len,
            address: headers.src,
        };
        walk.dst = AddressKey {
            prefix_len,
            address: headers.dst,
        };
    }
    // SAFETY: a field of `walk`, valid for writes.
    unsafe { core::ptr::write_volatile(&raw mut walk.l4_offset, headers.l4_offset) };
    walk.frame_len = headers.frame_len;
    // Most packets are decided in the first steps (load the first candidate word, decide a rule,
    // find nothing left): take those inline, and pay for bpf_loop only when more remain.
    for _ in 0..INLINE_STEPS {
        if try_walk_step(ctx, walk)? {
            return Ok(Some(verdict(walk, false, headers.malformed)));
        }
    }
    let mut carried = Carried { ctx: ctx.raw() };
    // SAFETY: `walk_step` has the callback signature bpf_loop expects; `carried` outlives the
    // call.
    let steps = unsafe {
        bpf_loop(
            MAX_CLASSIFY_STEPS - INLINE_STEPS,
            walk_step::<P> as *const () as *mut c_void,
            (&raw mut carried).cast(),
            0,
        )
    };
    if walk.table_error != 0 || steps < 0 {
        return Err(TableError);
    }
    Ok(Some(verdict(
        walk,
        steps == i64::from(MAX_CLASSIFY_STEPS - INLINE_STEPS),
        headers.malformed,
    )))
}

/// Records `field`'s bitmap for the walk and narrows the candidate words to those it has; false
/// when none is left.
#[inline(always)]
fn narrow(walk: &mut Walk, field: Field, index: u32) -> Result<bool, TableError> {
    walk.bitmaps[field as usize] = index;
    if index == UNCONSTRAINED {
        return Ok(true);
    }
    let bitmap = RULE_BITMAPS.get(index).ok_or(TableError)?;
    walk.focus &= bitmap
        .words
        .get(walk.focus_index as usize)
        .copied()
        .ok_or(TableError)?;
    if walk.focus == 0 {
        clear_word(&mut walk.summary, walk.focus_index);
    }
    let mut left = 0;
    for (summary, word) in walk.summary.iter_mut().zip(bitmap.summary) {
        *summary &= word;
        left |= *summary;
    }
    Ok(left != 0)
}

/// Focuses on the first word of the attachment's rules, `attachment_rules` (see [`Walk::focus`]);
/// true, as narrowing goes on.
#[inline(always)]
fn focus_first_word(walk: &mut Walk, attachment_rules: u32) -> Result<bool, TableError> {
    for (i, &word) in walk.summary.iter().enumerate() {
        if word != 0 {
            walk.focus_index = i as u32 * 64 + word.trailing_zeros();
            walk.focus = bitmap_word(attachment_rules, walk.focus_index)?;
            break;
        }
    }
    Ok(true)
}

/// Clears the summary bit of word `word_index`: no candidate is left in it.
#[inline(always)]
fn clear_word(summary: &mut [u64; SUMMARY_WORDS], word_index: u32) {
    if let Some(word) = summary.get_mut(word_index as usize / 64) {
        *word &= !(1 << (word_index % 64));
    }
}

/// Starts a walk over every word. The stores are volatile because LLVM otherwise merges them into
/// calls to a byte-wise `memset` subprogram, which cost a quarter of the program's run time.
#[inline(always)]
fn reset(walk: &mut Walk) {
    // SAFETY: each pointer is to a field of `walk`, valid for writes.
    unsafe {
        for word in &mut walk.summary {
            core::ptr::write_volatile(word, !0);
        }
        core::ptr::write_volatile(&raw mut walk.word, 0);
        core::ptr::write_volatile(&raw mut walk.focus, !0);
        core::ptr::write_volatile(&raw mut walk.focus_index, 0);
        core::ptr::write_volatile(&raw mut walk.word_index, 0);
        core::ptr::write_volatile(&raw mut walk.min_rule, 0);
        core::ptr::write_volatile(&raw mut walk.copy_count, 0);
        core::ptr::write_volatile(&raw mut walk.table_error, 0);
    }
}

/// Walk steps taken in the program itself before handing over to `bpf_loop`.
const INLINE_STEPS: u32 = 3;

#[inline(always)]
fn verdict(walk: &'static Walk, step_limit_hit: bool, unparsed: bool) -> Verdict {
    Verdict {
        copies: &walk.copies,
        copy_count: walk.copy_count as usize,
        step_limit_hit,
        // SAFETY: a field of `walk`, valid for reads.
        l4_offset: unsafe { core::ptr::read_volatile(&raw const walk.l4_offset) },
        unparsed,
    }
}

/// One step of the walk: load the next candidate word, or decide one rule. Returns 1 to stop.
extern "C" fn walk_step<P: Packet>(_step: u64, carried: *mut c_void) -> i64 {
    let Some(walk) = WALK_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: as in `classify`.
    let walk = unsafe { &mut *walk };
    // SAFETY: `carried` is the `Carried` that `classify` passed to bpf_loop, holding this
    // program's context pointer.
    let ctx = unsafe { P::from_raw((*carried.cast::<Carried>()).ctx) };
    let stop = try_walk_step(&ctx, walk).unwrap_or_else(|TableError| {
        walk.table_error = 1;
        true
    });
    i64::from(stop)
}

#[inline(always)]
fn try_walk_step<P: Packet>(ctx: &P, walk: &mut Walk) -> Result<bool, TableError> {
    if walk.word == 0 {
        let Some(word_index) = take_lowest_bit(&mut walk.summary) else {
            return Ok(true);
        };
        let mut word = !0u64;
        for &index in &walk.bitmaps {
            if index >= PENDING {
                continue;
            }
            word &= bitmap_word(index, word_index)?;
        }
        for field in [Field::DstIp, Field::SrcIp] {
            if walk.bitmaps[field as usize] == PENDING && word != 0 {
                word &= resolve_address(walk, field, word_index, word)?;
            }
        }
        walk.word_index = word_index;
        walk.word = word & !bits_below(walk.min_rule, word_index);
        return Ok(false);
    }
    let bit = walk.word.trailing_zeros();
    let rule = walk.word_index * 64 + bit;
    let meta = RULES.get(rule).ok_or(TableError)?;
    if meta.program != 0 && !program::accepts(ctx, meta.program - 1) {
        // The rule's program turns the packet down: the session's later rules stay candidates.
        walk.word &= walk.word - 1;
        return Ok(false);
    }
    count::rule_matched(rule, meta.session, walk.frame_len);
    if meta.action == Action::Mirror as u32 {
        let slot = walk.copy_count as usize;
        if let Some(copy) = walk.copies.get_mut(slot) {
            *copy = Copy {
                rule,
                session: meta.session,
            };
            walk.copy_count += 1;
        } else {
            count::copy_limit(rule, meta.session);
        }
    }
    // First match wins: the rest of this session's rules are skipped.
    walk.min_rule = meta.next_session_rule;
    walk.word &= !bits_below(walk.min_rule, walk.word_index);
    clear_words_below(&mut walk.summary, walk.min_rule / 64);
    Ok(false)
}

/// Mask of the bits of word `word_index` that stand for rules below `rule`.
#[inline(always)]
fn bits_below(rule: u32, word_index: u32) -> u64 {
    let first = word_index * 64;
    if rule <= first {
        0
    } else if rule >= first + 64 {
        !0
    } else {
        (1u64 << (rule - first)) - 1
    }
}

/// Clears summary bits of words below `word_index`.
#[inline(always)]
fn clear_words_below(summary: &mut [u64; SUMMARY_WORDS], word_index: u32) {
    for (i, word) in summary.iter_mut().enumerate() {
        *word &= !bits_below(word_index, i as u32);
    }
}

/// Removes and returns the lowest set bit of the multi-word summary.
#[inline(always)]
fn take_lowest_bit(summary: &mut [u64; SUMMARY_WORDS]) -> Option<u32> {
    for (i, word) in summary.iter_mut().enumerate() {
        if *word != 0 {
            let bit = word.trailing_zeros();
            *word &= *word - 1;
            let index = i as u32 * 64 + bit;
            return (index < BITMAP_WORDS as u32).then_some(index);
        }
    }
    None
}

#[inline(always)]
fn wildcard(field: Field) -> Result<u32, TableError> {
    FIELD_WILDCARD.get(field as u32).copied().ok_or(TableError)
}

/// The rules that may decide a packet whose `field` the parser did not reach.
#[inline(always)]
fn unknown(field: Field) -> Result<u32, TableError> {
    FIELD_UNKNOWN.get(field as u32).copied().ok_or(TableError)
}

/// Bitmap index for a field stored as a direct array over all its values.
#[inline(always)]
fn indexed(
    field: Field,
    value: u32,
    lookup: impl Fn(u32) -> Option<&'static u32>,
) -> Result<u32, TableError> {
    if value == UNKNOWN {
        return unknown(field);
    }
    let wildcard = wildcard(field)?;
    if value == ABSENT || wildcard == UNCONSTRAINED {
        return Ok(wildcard);
    }
    // Entries hold a bitmap index plus one; zero (never written) stands for the wildcard.
    match lookup(value).copied().ok_or(TableError)? {
        0 => Ok(wildcard),
        stored => Ok(stored - 1),
    }
}

/// Word `word_index` of bitmap `index`.
#[inline(always)]
fn bitmap_word(index: u32, word_index: u32) -> Result<u64, TableError> {
    let bitmap = RULE_BITMAPS.get(index).ok_or(TableError)?;
    bitmap
        .words
        .get(word_index as usize)
        .copied()
        .ok_or(TableError)
}

/// The part of `word` (candidates of word `word_index`) that `field`, an address whose lookup is
/// [`PENDING`], keeps. The lookup is made only when a candidate constrains the address, and then
/// once: its bitmap replaces the pending entry and narrows the words left to visit.
#[inline(always)]
fn resolve_address(
    walk: &mut Walk,
    field: Field,
    word_index: u32,
    word: u64,
) -> Result<u64, TableError> {
    let wildcard = wildcard(field)?;
    if word & !bitmap_word(wildcard, word_index)? == 0 {
        // Every candidate here accepts any address: the lookup would keep them all.
        return Ok(!0);
    }
    let index = match field {
        Field::DstIp => address(walk.family, &walk.dst, &DST_V4_BITMAP, &DST_V6_BITMAP),
        _ => address(walk.family, &walk.src, &SRC_V4_BITMAP, &SRC_V6_BITMAP),
    }
    .unwrap_or(wildcard);
    // The summary only loses words; an empty one ends the walk after this word.
    narrow(walk, field, index)?;
    bitmap_word(index, word_index)
}

/// Bitmap index for an address: the longest matching prefix's entry; none when no prefix holds it
/// (the field's wildcard bitmap applies).
#[inline(always)]
fn address(
    family: u32,
    key: &AddressKey,
    v4: &LpmTrie<[u8; 4], u32>,
    v6: &LpmTrie<[u8; 16], u32>,
) -> Option<u32> {
    let key = core::ptr::from_ref(key);
    let found = match family {
        // SAFETY: `Key` is packed (alignment 1) and its 8 bytes start `AddressKey` (see there).
        FAMILY_V4 => v4.get(unsafe { &*key.cast::<Key<[u8; 4]>>() }),
        // SAFETY: `Key<[u8; 16]>` has the layout of `AddressKey`, alignment 1.
        FAMILY_V6 => v6.get(unsafe { &*key.cast::<Key<[u8; 16]>>() }),
        _ => None,
    };
    found.copied()
}
