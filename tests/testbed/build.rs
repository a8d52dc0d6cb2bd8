//! Hands the kernel's linker script to the final link; generates the
//! FreeBSD personality's struct layouts (freebsd/probe.rs).
#[path = "freebsd/probe.rs"]
mod freebsd_probe;

fn main() {
    freebsd_probe::generate();
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
    println!("cargo:rerun-if-changed=link.ld");
}
