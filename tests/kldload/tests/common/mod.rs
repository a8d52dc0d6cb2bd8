//! Builds the test objects from tests/fixtures with the compile line of a
//! FreeBSD amd64 kmod (TOOLCHAIN.md) and `ld.lld -r`, as the kld build
//! links kqemu.ko, and reads a few things back from them.
#![allow(dead_code)] // Each test binary uses part of these helpers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use kqemu_kldload::{Kld, LoadError, Loader, Resolver, VecMemory};

/// A kernel address for test images: KERNBASE + 32 MiB, 2 MiB aligned.
pub const BASE: u64 = 0xffff_ffff_8200_0000;

/// The kernel version the fixtures' `MODULE_DEPEND(..., kernel, ...)` names.
pub const FREEBSD_VERSION: i32 = 1_400_097;

const CFLAGS: &[&str] = &[
    "--target=x86_64-unknown-freebsd14.0",
    "-O2",
    "-mcmodel=kernel",
    "-mno-red-zone",
    "-mno-mmx",
    "-mno-sse",
    "-msoft-float",
    "-ffreestanding",
    "-fno-common",
    "-fno-pic",
    "-Wall",
    "-Werror",
];

fn tool(names: &[&'static str]) -> &'static str {
    names
        .iter()
        .copied()
        .find(|name| Command::new(name).arg("--version").output().is_ok())
        .unwrap_or_else(|| panic!("none of {names:?} found: run `make deps` (clang and lld)"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kldload-fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) {
    let output = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Compiles `source` (a file in tests/fixtures) with `flags` and links it
/// alone into a kld named `name`.ko; returns the .ko's bytes. Tests run in
/// parallel: one build at a time, each name built once per test binary.
pub fn build(name: &str, source: &str, flags: &[&str]) -> Vec<u8> {
    static BUILT: Mutex<Option<HashMap<String, Vec<u8>>>> = Mutex::new(None);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(ko) = built.get(name) {
        return ko.clone();
    }
    let ko = compile_and_link(name, source, flags);
    built.insert(name.to_string(), ko.clone());
    ko
}

fn compile_and_link(name: &str, source: &str, flags: &[&str]) -> Vec<u8> {
    let out = out_dir();
    let object = out.join(format!("{name}.o"));
    let ko = out.join(format!("{name}.ko"));
    run(Command::new(tool(&["clang", "clang-14"]))
        .args(CFLAGS)
        .args(flags)
        .arg("-c")
        .arg(fixtures().join(source))
        .arg("-o")
        .arg(&object));
    run(Command::new(tool(&["ld.lld", "ld.lld-14"]))
        .args(["-m", "elf_x86_64_fbsd", "-r", "-o"])
        .arg(&ko)
        .arg(&object));
    std::fs::read(&ko).unwrap()
}

/// Loads `object` at [`BASE`] for a 14.x kernel.
pub fn load<S: Resolver>(
    path: &str,
    object: &[u8],
    resolver: &mut S,
) -> Result<Kld<Vec<u8>>, LoadError> {
    Loader::new(FREEBSD_VERSION).load(path, object, &mut VecMemory::new(BASE), resolver)
}

/// The little-endian integer of `N` bytes at kernel address `at`.
pub fn read<const N: usize>(kld: &Kld<Vec<u8>>, at: u64) -> [u8; N] {
    let offset = (at - kld.base()) as usize;
    kld.image()[offset..offset + N].try_into().unwrap()
}

pub fn read_u64(kld: &Kld<Vec<u8>>, at: u64) -> u64 {
    u64::from_le_bytes(read(kld, at))
}

pub fn read_i32(kld: &Kld<Vec<u8>>, at: u64) -> i32 {
    i32::from_le_bytes(read(kld, at))
}

pub fn read_u32(kld: &Kld<Vec<u8>>, at: u64) -> u32 {
    u32::from_le_bytes(read(kld, at))
}

/// The section headers of an ELF64 file: (offset of the header, sh_type,
/// sh_link), enough to patch a copy.
pub fn section_headers(object: &[u8]) -> Vec<(usize, u32, u32)> {
    let u16_at = |at: usize| u16::from_le_bytes(object[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(object[at..at + 4].try_into().unwrap());
    let shoff = u64::from_le_bytes(object[40..48].try_into().unwrap()) as usize;
    let shnum = usize::from(u16_at(60));
    (0..shnum)
        .map(|i| {
            let at = shoff + i * 64;
            (at, u32_at(at + 4), u32_at(at + 40))
        })
        .collect()
}

/// The index of symbol `name` in the file's symbol table.
pub fn symbol_index(object: &[u8], name: &str) -> u32 {
    const SHT_SYMTAB: u32 = 2;
    let headers = section_headers(object);
    let &(symtab, _, link) = headers.iter().find(|h| h.1 == SHT_SYMTAB).unwrap();
    let field = |header: usize, at: usize| {
        u64::from_le_bytes(object[header + at..header + at + 8].try_into().unwrap()) as usize
    };
    let (sym_off, sym_size) = (field(symtab, 24), field(symtab, 32));
    let strtab = headers[link as usize].0;
    let str_off = field(strtab, 24);
    for i in 0..sym_size / 24 {
        let entry = sym_off + i * 24;
        let name_off = u32::from_le_bytes(object[entry..entry + 4].try_into().unwrap()) as usize;
        let start = str_off + name_off;
        let end = start + object[start..].iter().position(|&b| b == 0).unwrap();
        if &object[start..end] == name.as_bytes() {
            return i as u32;
        }
    }
    panic!("no symbol {name}");
}
