//! Rebuild the eBPF object when bpf-linker changes (it is the linker, so cargo does not track it).
fn main() {
    // Only the BPF build needs bpf-linker; the host build of this crate (a build-dependency of the
    // agent, so cargo knows about it) must not fail on a machine that lacks it.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf")
        && let Ok(linker) = which::which("bpf-linker")
    {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
