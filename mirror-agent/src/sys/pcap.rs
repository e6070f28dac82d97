//! libpcap's filter compiler, loaded the first time a filter needs it (`libpcap.so.0.8`, Debian's
//! libpcap0.8): the agent needs it only for the expressions its rule tables cannot hold, so it
//! runs without it. The `pcap` crate links libpcap into the binary instead, and its instructions
//! are opaque: these are the five functions used, behind one safe function.
use std::{
    ffi::{CStr, CString, c_char, c_int, c_uint, c_void},
    sync::{Mutex, OnceLock},
};

use mirror_common::CbpfInsn;

/// The library's file name (its soname).
pub const LIBRARY: &str = "libpcap.so.0.8";
/// `DLT_EN10MB`: the programs read Ethernet frames.
const LINKTYPE_ETHERNET: c_int = 1;
/// The snap length the programs return for an accepted packet (tcpdump's default).
const SNAPLEN: c_int = 262_144;

/// `struct bpf_program`.
#[repr(C)]
struct BpfProgram {
    len: c_uint,
    insns: *mut CbpfInsn,
}

type OpenDead = unsafe extern "C" fn(c_int, c_int) -> *mut c_void;
type Compile =
    unsafe extern "C" fn(*mut c_void, *mut BpfProgram, *const c_char, c_int, c_uint) -> c_int;
type FreeCode = unsafe extern "C" fn(*mut BpfProgram);
type GetErr = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type Close = unsafe extern "C" fn(*mut c_void);

struct Libpcap {
    open_dead: OpenDead,
    compile: Compile,
    free_code: FreeCode,
    get_err: GetErr,
    close: Close,
    /// Keeps the functions above loaded.
    _library: libloading::Library,
}

/// Why an expression did not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("libpcap's compiler ({LIBRARY}, Debian's libpcap0.8) could not be loaded: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Refused(String),
}

fn library() -> Result<&'static Libpcap, CompileError> {
    static LOADED: OnceLock<Result<Libpcap, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: loading libpcap runs no initialisation beyond its own constructors, and each
            // symbol has the C signature declared above (pcap/pcap.h, libpcap 1.x).
            unsafe {
                let library = libloading::Library::new(LIBRARY).map_err(|e| e.to_string())?;
                let open_dead = *library
                    .get::<OpenDead>(b"pcap_open_dead\0")
                    .map_err(|e| e.to_string())?;
                let compile = *library
                    .get::<Compile>(b"pcap_compile\0")
                    .map_err(|e| e.to_string())?;
                let free_code = *library
                    .get::<FreeCode>(b"pcap_freecode\0")
                    .map_err(|e| e.to_string())?;
                let get_err = *library
                    .get::<GetErr>(b"pcap_geterr\0")
                    .map_err(|e| e.to_string())?;
                let close = *library
                    .get::<Close>(b"pcap_close\0")
                    .map_err(|e| e.to_string())?;
                Ok(Libpcap {
                    open_dead,
                    compile,
                    free_code,
                    get_err,
                    close,
                    _library: library,
                })
            }
        })
        .as_ref()
        .map_err(|e| CompileError::Unavailable(e.clone()))
}

/// Compiles `expression` for Ethernet frames, optimized, with no netmask known (as
/// `tcpdump -r` does): the classic BPF program it becomes.
pub fn compile(expression: &str) -> Result<Vec<CbpfInsn>, CompileError> {
    // Older libpcaps' parsers kept global state: one compilation at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let pcap = library()?;
    let text = CString::new(expression)
        .map_err(|_| CompileError::Refused("the expression holds a NUL byte".into()))?;
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: a dead handle is freed below on every path; `program` is filled by pcap_compile
    // and freed by pcap_freecode after its instructions are copied; the error string belongs
    // to the handle and is copied before the handle is closed.
    unsafe {
        let handle = (pcap.open_dead)(LINKTYPE_ETHERNET, SNAPLEN);
        if handle.is_null() {
            return Err(CompileError::Unavailable("pcap_open_dead failed".into()));
        }
        let mut program = BpfProgram {
            len: 0,
            insns: std::ptr::null_mut(),
        };
        let compiled = if (pcap.compile)(handle, &raw mut program, text.as_ptr(), 1, 0) == 0 {
            let insns = if program.insns.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(program.insns, program.len as usize).to_vec()
            };
            (pcap.free_code)(&raw mut program);
            Ok(insns)
        } else {
            let message = CStr::from_ptr((pcap.get_err)(handle))
                .to_string_lossy()
                .into_owned();
            Err(CompileError::Refused(message))
        };
        (pcap.close)(handle);
        compiled
    }
}
