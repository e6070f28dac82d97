//! TCX attachment by `BPF_LINK_CREATE`, from several threads at once.
//!
//! Each TCX attach and detach waits in the kernel for an RCU grace period (about 6 ms on the test
//! machine), so a node with hundreds of veths would take seconds to attach one hook at a time, and
//! as long again to detach. aya's attach needs exclusive access to the program, so it cannot run
//! in parallel; a link made here is the same kernel object, owned as a file descriptor: closing
//! it detaches the program.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::Mutex,
};

use mirror_common::Direction;

const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// Threads attaching or detaching at once.
const WORKERS: usize = 32;

/// The `link_create` member of `union bpf_attr` (TCX variant), padded to the union's size.
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    reserved: u32,
    expected_revision: u64,
    /// The rest of `union bpf_attr`, which the kernel requires to be zero.
    zero: [u64; 13],
}

/// Attaches `program` to one hook; the returned descriptor is the link.
pub fn attach(program: BorrowedFd<'_>, ifindex: u32, direction: Direction) -> io::Result<OwnedFd> {
    let attr = LinkCreate {
        prog_fd: u32::try_from(program.as_raw_fd())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        target_ifindex: ifindex,
        attach_type: match direction {
            Direction::Ingress => BPF_TCX_INGRESS,
            Direction::Egress => BPF_TCX_EGRESS,
        },
        flags: 0,
        relative_fd: 0,
        reserved: 0,
        expected_revision: 0,
        zero: [0; 13],
    };
    // SAFETY: the bpf syscall reads `attr`, which lives across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &raw const attr,
            size_of::<LinkCreate>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `job` on every item from up to [`WORKERS`] threads; results in input order.
pub fn parallel<T: Sync, R: Send>(items: &[T], job: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = Mutex::new(0usize);
    let results: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..WORKERS.min(items.len()) {
            scope.spawn(|| {
                loop {
                    let index = {
                        let mut next = next
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let index = *next;
                        *next += 1;
                        index
                    };
                    let Some(item) = items.get(index) else { break };
                    let result = job(item);
                    *results[index]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(result);
                }
            });
        }
    });
    results
        .into_iter()
        .filter_map(|r| {
            r.into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })
        .collect()
}
