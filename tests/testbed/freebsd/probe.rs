//! Build step of the FreeBSD personality (tests/testbed/src/freebsd): the
//! struct layouts and constants of FreeBSD 14 and 15, computed by clang
//! from the kernel headers `make deps` unpacks (the same headers and
//! `__FreeBSD_version` the kld is built with, mk/kernel.mk), written to
//! `$OUT_DIR/freebsd_layout.rs` as one `Layout` value per release.

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const RELEASES: [u32; 2] = [14, 15];

/// `KQEMU_FREEBSD_VERSION_<release>` from mk/kernel.mk.
fn freebsd_version(top: &Path, release: u32) -> String {
    let kernel_mk = top.join("mk/kernel.mk");
    let text = fs::read_to_string(&kernel_mk)
        .unwrap_or_else(|e| panic!("testbed: reading {}: {e}", kernel_mk.display()));
    let key = format!("KQEMU_FREEBSD_VERSION_{release}=");
    text.lines()
        .find_map(|line| line.strip_prefix(&key))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("testbed: {key} missing in mk/kernel.mk"))
}

/// Runs the probe through `clang -S` for `release`; `kq_<name>` → value.
fn probe(top: &Path, release: u32) -> BTreeMap<String, u64> {
    let include = top.join(format!("build/deps/freebsd{release}/include"));
    if !include.is_dir() {
        panic!(
            "testbed: FreeBSD {release} headers missing at {} (run `make deps`)",
            include.display()
        );
    }
    let output = Command::new("clang")
        .arg(format!("--target=x86_64-unknown-freebsd{release}.0"))
        .args([
            "-O2",
            "-D_KERNEL",
            "-DKLD_MODULE",
            "-nostdinc",
            "-ffreestanding",
        ])
        .args(["-mcmodel=kernel", "-mno-red-zone", "-S", "-o", "-"])
        .arg(format!(
            "-D__FreeBSD_version={}",
            freebsd_version(top, release)
        ))
        .arg(format!(
            "-I{}",
            include.join("x86_64-freebsd-none").display()
        ))
        .arg(format!("-I{}", include.join("generic-freebsd").display()))
        .arg(top.join("tests/testbed/freebsd/layout.c"))
        .output()
        .unwrap_or_else(|e| panic!("testbed: running clang for the FreeBSD layout probe: {e}"));
    if !output.status.success() {
        panic!(
            "testbed: the FreeBSD {release} layout probe failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let asm = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut values = BTreeMap::new();
    let mut lines = asm.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("kq_").and_then(|l| l.strip_suffix(':')) else {
            continue;
        };
        let data = lines.next().unwrap_or_default().trim();
        let mut fields = data.split_whitespace();
        let value = match (fields.next(), fields.next()) {
            (Some(".quad"), Some(v)) => v.parse::<i64>().map(|v| v as u64).ok(),
            (Some(".zero"), Some("8")) => Some(0),
            _ => None,
        };
        let value = value.unwrap_or_else(|| panic!("testbed: probe value of {name}: {data:?}"));
        values.insert(name.to_string(), value);
    }
    values
}

pub fn generate() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let top = manifest.join("../..");
    println!("cargo:rerun-if-changed=freebsd/layout.c");
    println!("cargo:rerun-if-changed=freebsd/probe.rs");
    println!("cargo:rerun-if-changed=../../mk/kernel.mk");
    let probes: Vec<_> = RELEASES.iter().map(|&r| (r, probe(&top, r))).collect();
    let mut names: Vec<&String> = probes.iter().flat_map(|(_, v)| v.keys()).collect();
    names.sort();
    names.dedup();
    let mut out = String::from(
        "/// Struct offsets and sizes, constants: one value per release (absent: 0).\n\
         #[derive(Clone, Copy, Debug)]\n#[allow(non_snake_case)]\npub struct Layout {\n",
    );
    for name in &names {
        out += &format!("    pub {name}: u64,\n");
    }
    out += "}\n";
    for (release, values) in &probes {
        out += &format!("pub const FREEBSD{release}: Layout = Layout {{\n");
        for name in &names {
            out += &format!("    {name}: {},\n", values.get(*name).copied().unwrap_or(0));
        }
        out += "};\n";
    }
    let dest =
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("freebsd_layout.rs");
    fs::write(&dest, out).unwrap_or_else(|e| panic!("testbed: writing {}: {e}", dest.display()));
}
