//! What parsing, classification and the copies need of a packet, for both program types: a TC
//! packet (an skb) and an XDP frame. The code above this is shared; only these reads differ.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use network_types::vlan::VlanHdr;

/// A VLAN tag's length.
pub const VLAN_TAG_LEN: u32 = VlanHdr::LEN as u32;
/// Bytes of a frame before its first VLAN tag (the two MAC addresses).
pub const MACS_LEN: u32 = 12;

/// What each `bpf_loop` step gets, on the stack (a context pointer cannot go into a map): the
/// program's context, for [`Packet::from_raw`].
#[repr(C)]
pub struct Carried {
    pub ctx: *mut c_void,
}

/// Reading a packet, whichever hook it is at.
pub trait Packet {
    /// Start and end of the directly readable packet data.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Copies `len` bytes from `offset` into `to` through the kernel's bounds-checked helper,
    /// which also reaches data past [`Packet::data_end`] (paged skb data).
    fn load_bytes(&self, offset: u32, to: *mut u8, len: u32) -> Result<(), ()>;
    /// The VLAN tag the kernel already took out of the frame into metadata (skb only), as its
    /// four bytes on the wire (TPID, TCI).
    fn tag_in_metadata(&self) -> Option<[u8; 4]>;
    /// The frame's length, a tag held in metadata included.
    fn frame_len(&self) -> u32;
    /// For a GSO skb, the payload size of each segment it becomes; 0 otherwise.
    fn gso_size(&self) -> u32;
    /// The interface the packet is seen on.
    fn ifindex(&self) -> u32;
    /// The context pointer, to pass through `bpf_loop` (see [`Packet::from_raw`]).
    fn raw(&self) -> *mut c_void;
    /// # Safety
    /// `raw` is what [`Packet::raw`] returned for this program's context.
    unsafe fn from_raw(raw: *mut c_void) -> Self;
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn load_bytes(&self, offset: u32, to: *mut u8, len: u32) -> Result<(), ()> {
        // SAFETY: the helper writes at most `len` bytes to `to`, which the caller sized.
        match unsafe { bpf_skb_load_bytes(self.skb.skb.cast(), offset, to.cast(), len) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }

    #[inline(always)]
    fn tag_in_metadata(&self) -> Option<[u8; 4]> {
        // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program.
        let skb = unsafe { &*self.skb.skb };
        if skb.vlan_present == 0 {
            return None;
        }
        // The TPID is kept in network order (a __be16 widened to 32 bits); the TCI in host order.
        let [p0, p1] = (skb.vlan_proto as u16).to_ne_bytes();
        let [t0, t1] = (skb.vlan_tci as u16).to_be_bytes();
        Some([p0, p1, t0, t1])
    }

    #[inline(always)]
    fn frame_len(&self) -> u32 {
        // SAFETY: as above.
        let len = unsafe { (*self.skb.skb).len };
        if self.tag_in_metadata().is_some() {
            len + VLAN_TAG_LEN
        } else {
            len
        }
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.skb.skb).gso_size }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.skb.skb.cast()
    }

    #[inline(always)]
    unsafe fn from_raw(raw: *mut c_void) -> Self {
        TcContext::new(raw.cast())
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn load_bytes(&self, offset: u32, to: *mut u8, len: u32) -> Result<(), ()> {
        // SAFETY: the helper writes at most `len` bytes to `to`, which the caller sized.
        match unsafe { bpf_xdp_load_bytes(self.ctx.cast(), offset, to.cast(), len) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }

    #[inline(always)]
    fn tag_in_metadata(&self) -> Option<[u8; 4]> {
        None
    }

    #[inline(always)]
    fn frame_len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: ctx.ctx is the context pointer the kernel passed to this program.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.ctx.cast()
    }

    #[inline(always)]
    unsafe fn from_raw(raw: *mut c_void) -> Self {
        XdpContext::new(raw.cast())
    }
}
