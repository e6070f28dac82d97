//! The unsafe code of the agent, each piece behind a safe function: raw and packet sockets and
//! their integer options ([`socket`]), the `bpf(2)` commands aya does not offer for pinned links
//! ([`bpf`]), `malloc_trim`, `membarrier`, registering a descriptor with tokio ([`readable`]),
//! reading a kernel record's header ([`read_pod`]), and `SIGPIPE`'s default action
//! ([`die_on_closed_pipe`]), and libpcap's filter compiler, loaded when needed ([`pcap`]).
//! Everything else goes through `nix`, `rtnetlink` and `aya`.
pub mod bpf;
pub mod pcap;
pub mod socket;

use std::os::fd::{AsFd, AsRawFd};

use tokio::io::{Interest, unix::AsyncFd};

/// `owner`'s descriptor registered with the tokio reactor for readiness to read.
pub fn readable<T: AsFd + AsRawFd>(owner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: an `AsFd` owner keeps its descriptor open, and the same, while it lives (the
    // `BorrowedFd` it lends is tied to it), and the `AsyncFd` owns it from here on.
    unsafe { AsyncFd::register_with_interest(owner, Interest::READABLE) }.map_err(Into::into)
}

/// The `T` at the start of `bytes` (read unaligned, as ring records are), or `None` when
/// `bytes` is shorter.
pub fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    let head = bytes.get(..size_of::<T>())?;
    // SAFETY: `head` holds `size_of::<T>()` bytes, and a `Pod` is valid for any bytes.
    Some(unsafe { head.as_ptr().cast::<T>().read_unaligned() })
}

/// Hands freed heap pages back to the kernel, so the agent's resident size reflects what it
/// still uses (glibc keeps them otherwise).
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Returns once every program run that started before the call has ended: TC programs run in RCU
/// read-side sections, and `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for an RCU grace period.
pub fn wait_for_running_programs() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        // Not available (e.g. nohz_full CPUs): a program run lasts microseconds.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Makes the process end at once, as coreutils and tcpdump do, when the reader of what it writes
/// goes (`| head`): Rust ignores `SIGPIPE`, so a write would fail and `println!` panic.
pub fn die_on_closed_pipe() {
    // SAFETY: SIG_DFL is a valid disposition, and no handler of ours is replaced: the runtime
    // only set SIGPIPE to SIG_IGN before main.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
