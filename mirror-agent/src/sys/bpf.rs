//! The `bpf(2)` commands for pinned links that aya does not offer: opening a pin of any link type
//! and asking the kernel which interface the link is attached to, and which program it runs.
use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

/// A pinned TCX or XDP link, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedLink {
    /// The interface it is attached to: 0 once that interface is gone (the kernel detached the
    /// link with it), even if another of the same name has come since.
    pub ifindex: u32,
    /// The program it runs.
    pub program_id: u32,
}

/// The link pinned at `pin`.
pub fn pinned_link(pin: &Path) -> Option<PinnedLink> {
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
    link_info(link.as_raw_fd())
}

fn link_info(link: RawFd) -> Option<PinnedLink> {
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
    // Little-endian words: `prog_id` is the low half of the second, the ifindex of the third.
    (rc == 0).then(|| PinnedLink {
        ifindex: (info[2] & 0xffff_ffff) as u32,
        program_id: (info[1] & 0xffff_ffff) as u32,
    })
}
