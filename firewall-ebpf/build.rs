// Rebuild the kernel programs when bpf-linker changes (it is part of the toolchain).
fn main() {
    if let Ok(p) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
