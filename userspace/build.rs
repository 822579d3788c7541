//! Builds the kernel programs (`firewall-ebpf`) with nightly + bpf-linker through aya-build and
//! leaves the objects in OUT_DIR, where `src/bpf.rs` embeds them.
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest.parent().expect("workspace root").join("firewall-ebpf");
    let package = aya_build::Package {
        name: "firewall-ebpf",
        root_dir: root_dir.to_str().expect("utf-8 path"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
