//! Builds the eBPF object with the nightly toolchain (aya-build) into `OUT_DIR`, where the agent
//! embeds it: `cargo build` never embeds a stale object.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let metadata_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../mirror-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mirror-ebpf",
            root_dir: metadata_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF object (needs `cargo xtask setup`: nightly rust-src and bpf-linker)",
    )
}
