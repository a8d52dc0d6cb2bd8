//! What FreeBSD refuses, refused with the console text `kldload` shows;
//! what it would silently get wrong, refused with this loader's own text;
//! and damaged files refused without a panic.

mod common;

use common::{build, load, section_headers, symbol_index, BASE, FREEBSD_VERSION};
use kqemu_kldload::{ErrorKind, LoadError, Loader, Memory, Resolver, VecMemory};

const EXT_DATA: u64 = 0xffff_ffff_8123_4560;
const EXT_FUNC: u64 = 0xffff_ffff_8100_1000;

fn kernel(name: &str) -> Option<u64> {
    match name {
        "ext_data" => Some(EXT_DATA),
        "ext_func" => Some(EXT_FUNC),
        _ => None,
    }
}

fn refused(path: &str, ko: &[u8]) -> LoadError {
    match load(path, ko, &mut kernel) {
        Ok(_) => panic!("{path} loaded"),
        Err(error) => error,
    }
}

#[test]
fn r_x86_64_32_against_a_global_symbol_prints_both_kernel_lines() {
    let ko = build("bad_r32", "bad.S", &["-DBAD_R32"]);
    let error = refused("bad_r32.ko", &ko);
    assert_eq!(*error.kind(), ErrorKind::UnexpectedRelocation { rtype: 10 });
    assert_eq!(
        error.message(),
        format!(
            "kldload: unexpected relocation type 10, symbol index {}\n\
             link_elf_obj: symbol ext_data undefined",
            symbol_index(&ko, "ext_data")
        )
    );
}

#[test]
fn r_x86_64_32_against_a_local_symbol_prints_one_line() {
    let ko = build("bad_r32_local", "bad.S", &["-DBAD_R32_LOCAL"]);
    let error = refused("bad_r32_local.ko", &ko);
    assert_eq!(*error.kind(), ErrorKind::UnexpectedRelocation { rtype: 10 });
    let message = error.message();
    assert!(
        message.starts_with("kldload: unexpected relocation type 10, symbol index "),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
}

#[test]
fn gotpcrel_is_refused() {
    let ko = build(
        "bad_gotpcrel",
        "bad.S",
        &["-DBAD_GOT", "-Wa,-mrelax-relocations=no"],
    );
    let error = refused("bad_gotpcrel.ko", &ko);
    assert_eq!(*error.kind(), ErrorKind::UnexpectedRelocation { rtype: 9 });
    assert_eq!(
        error.message(),
        format!(
            "kldload: unexpected relocation type 9, symbol index {}\n\
             link_elf_obj: symbol ext_data undefined",
            symbol_index(&ko, "ext_data")
        )
    );
}

#[test]
fn rex_gotpcrelx_is_refused() {
    let ko = build("bad_gotpcrelx", "bad.S", &["-DBAD_GOT"]);
    let error = refused("bad_gotpcrelx.ko", &ko);
    assert_eq!(*error.kind(), ErrorKind::UnexpectedRelocation { rtype: 42 });
    assert!(
        error
            .message()
            .starts_with("kldload: unexpected relocation type 42, symbol index "),
        "{error}"
    );
}

#[test]
fn r_x86_64_copy_has_its_own_kernel_message() {
    let ko = build("bad_copy", "bad.S", &["-DBAD_COPY"]);
    let error = refused("bad_copy.ko", &ko);
    assert_eq!(*error.kind(), ErrorKind::UnexpectedRelocation { rtype: 5 });
    assert_eq!(
        error.message(),
        format!(
            "kldload: unexpected R_COPY relocation, symbol index {}\n\
             link_elf_obj: symbol ext_data undefined",
            symbol_index(&ko, "ext_data")
        )
    );
}

#[test]
fn an_undefined_symbol_is_named() {
    let ko = build("undefined", "undefined.S", &[]);
    let error = refused("undefined.ko", &ko);
    assert_eq!(
        *error.kind(),
        ErrorKind::UndefinedSymbol("missing_fn".to_string())
    );
    assert_eq!(error.message(), "link_elf_obj: symbol missing_fn undefined");
    // Address 0 is "not found" to the kernel too.
    let mut zero = |name: &str| Some(if name == "missing_fn" { 0 } else { EXT_FUNC });
    let error = load("undefined.ko", &ko, &mut zero).err().unwrap();
    assert_eq!(error.message(), "link_elf_obj: symbol missing_fn undefined");
    let mut everything = |_: &str| Some(EXT_FUNC);
    assert!(load("undefined.ko", &ko, &mut everything).is_ok());
}

#[test]
fn a_pc32_displacement_beyond_2_gib_is_an_overflow_not_a_truncation() {
    let ko = build("far_pc32", "far.S", &["-DFAR_PC32"]);
    // The direct map: far from a module near KERNBASE.
    let mut dmap = |_: &str| Some(0xffff_f800_0000_0000);
    let error = load("far_pc32.ko", &ko, &mut dmap).err().unwrap();
    assert_eq!(*error.kind(), ErrorKind::Overflow);
    assert!(
        error.message().contains("R_X86_64_PC32 against 'far_data'"),
        "{error}"
    );
    let mut near = |_: &str| Some(BASE - 0x7fff_0000);
    assert!(load("far_pc32.ko", &ko, &mut near).is_ok());
}

#[test]
fn a_32s_address_outside_the_top_and_bottom_2_gib_is_an_overflow() {
    let ko = build("far_32s", "far.S", &["-DFAR_32S"]);
    for far in [0xffff_f800_0000_0000, 0x8000_0000, 0xffff_ffff_7fff_ffff] {
        let mut resolver = |_: &str| Some(far);
        let error = load("far_32s.ko", &ko, &mut resolver).err().unwrap();
        assert_eq!(*error.kind(), ErrorKind::Overflow, "{far:#x}");
        assert!(error.message().contains("R_X86_64_32S"), "{error}");
    }
    for near in [0x7fff_ffff, 0xffff_ffff_8000_0000] {
        let mut resolver = |_: &str| Some(near);
        assert!(load("far_32s.ko", &ko, &mut resolver).is_ok(), "{near:#x}");
    }
}

fn patched(patch: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut ko = build("undefined", "undefined.S", &[]);
    patch(&mut ko);
    ko
}

fn refused_copy(patch: impl FnOnce(&mut Vec<u8>)) -> LoadError {
    refused("/boot/modules/t.ko", &patched(patch))
}

/// A change to a copy of a good module.
type Patch = fn(&mut Vec<u8>);

#[test]
fn header_checks_print_what_link_elf_obj_prints() {
    let path = "/boot/modules/t.ko";
    let cases: [(Patch, &str, ErrorKind); 6] = [
        (
            |ko| ko[4] = 1,
            "kldload: /boot/modules/t.ko: Unsupported file layout",
            ErrorKind::UnsupportedLayout,
        ),
        (
            |ko| ko[5] = 2,
            "kldload: /boot/modules/t.ko: Unsupported file layout",
            ErrorKind::UnsupportedLayout,
        ),
        (
            |ko| ko[6] = 0,
            "kldload: /boot/modules/t.ko: Unsupported file version",
            ErrorKind::UnsupportedVersion,
        ),
        (
            |ko| ko[20] = 2,
            "kldload: /boot/modules/t.ko: Unsupported file version",
            ErrorKind::UnsupportedVersion,
        ),
        (
            |ko| ko[16] = 2,
            "linker_load_file: /boot/modules/t.ko - unsupported file type",
            ErrorKind::UnsupportedType,
        ),
        (
            |ko| ko[18] = 3,
            "kldload: /boot/modules/t.ko: Unsupported machine",
            ErrorKind::UnsupportedMachine,
        ),
    ];
    for (patch, message, kind) in cases {
        let error = refused(path, &patched(patch));
        assert_eq!(error.message(), message);
        assert_eq!(*error.kind(), kind);
    }
    let error = refused_copy(|ko| ko[1] = b'X');
    assert_eq!(*error.kind(), ErrorKind::NotElf);
    let error = refused_copy(|ko| ko[58] = 40);
    assert_eq!(*error.kind(), ErrorKind::Malformed);
}

#[test]
fn exactly_one_symbol_table_is_required() {
    const SHT_PROGBITS: u8 = 1;
    const SHT_SYMTAB: u8 = 2;
    const SHT_RELA: u32 = 4;
    let message = "kldload: /boot/modules/t.ko: file must have exactly one symbol table";
    let none = refused_copy(|ko| {
        let (symtab, _, _) = *section_headers(ko).iter().find(|h| h.1 == 2).unwrap();
        ko[symtab + 4] = SHT_PROGBITS;
    });
    assert_eq!(none.message(), message);
    assert_eq!(*none.kind(), ErrorKind::SymbolTableCount);
    let two = refused_copy(|ko| {
        let (rela, _, _) = *section_headers(ko)
            .iter()
            .find(|h| h.1 == SHT_RELA)
            .unwrap();
        ko[rela + 4] = SHT_SYMTAB;
    });
    assert_eq!(two.message(), message);
}

#[test]
fn the_symbol_table_must_link_to_a_string_table() {
    let error = refused_copy(|ko| {
        let (symtab, _, _) = *section_headers(ko).iter().find(|h| h.1 == 2).unwrap();
        ko[symtab + 40..symtab + 44].copy_from_slice(&0u32.to_le_bytes());
    });
    assert_eq!(
        error.message(),
        "kldload: /boot/modules/t.ko: file has invalid symbol strings"
    );
}

#[test]
fn an_object_without_allocated_sections_has_no_contents() {
    let ko = build("noalloc", "noalloc.S", &[]);
    let error = refused("noalloc.ko", &ko);
    assert_eq!(error.message(), "kldload: noalloc.ko: file has no contents");
    assert_eq!(*error.kind(), ErrorKind::NoContents);
}

/// A provider that answers with whatever it was given.
struct Scripted(Option<(u64, Vec<u8>)>);

impl Memory for Scripted {
    type Region = Vec<u8>;
    fn alloc(&mut self, _: usize, _: usize) -> Option<(u64, Vec<u8>)> {
        self.0.take()
    }
}

#[test]
fn memory_the_provider_cannot_give_or_gives_wrong_fails_the_load() {
    let ko = build("undefined", "undefined.S", &[]);
    let loader = Loader::new(FREEBSD_VERSION);
    let cases = [
        None,
        Some((BASE + 8, vec![0; 4096])),
        Some((BASE, vec![0; 16])),
        Some((0xffff_ffff_ffff_f000, vec![0; 4096])),
    ];
    for answer in cases {
        let error = loader
            .load("t.ko", &ko, &mut Scripted(answer), &mut kernel)
            .err()
            .unwrap();
        assert_eq!(*error.kind(), ErrorKind::NoMemory, "{error}");
    }
    let error = loader
        .load("t.ko", &ko, &mut VecMemory::new(BASE + 0x800), &mut kernel)
        .err()
        .unwrap();
    assert_eq!(*error.kind(), ErrorKind::NoMemory);
}

/// A kernel that has every symbol and runs every ifunc resolver.
struct Everything;

impl Resolver for Everything {
    fn resolve(&mut self, _: &str) -> Option<u64> {
        Some(0xffff_ffff_8100_0000)
    }

    fn call_ifunc(&mut self, _: u64) -> Option<u64> {
        Some(0xffff_ffff_8100_1000)
    }
}

/// Host memory for at most 1 MiB: a corrupted size must not make the test
/// zero-fill gigabytes.
struct Capped;

impl Memory for Capped {
    type Region = Vec<u8>;
    fn alloc(&mut self, size: usize, align: usize) -> Option<(u64, Vec<u8>)> {
        (size <= 1 << 20)
            .then(|| VecMemory::new(BASE).alloc(size, align))
            .flatten()
    }
}

/// Loads `object` with every kernel symbol and module available and, if
/// that works, reads every linker set: a damaged file may load or fail,
/// but nothing may panic or read out of bounds.
fn load_and_read(object: &[u8]) -> bool {
    let loader = Loader::new(FREEBSD_VERSION).provide("fakedep", 3, "fakedep.ko");
    let Ok(kld) = loader.load("t.ko", object, &mut Capped, &mut Everything) else {
        return false;
    };
    let _ = kld.modmetadata();
    let _ = kld.sysinits();
    let _ = kld.sysuninits();
    let _ = kld.sysctl_oids();
    let _ = kld.ctors();
    let _ = kld.dtors();
    true
}

/// Every prefix of a module fails; single-byte corruptions anywhere load or
/// fail cleanly.
#[test]
fn damaged_files_never_panic() {
    for good in [
        build("relocs", "relocs.S", &[]),
        build("module", "module.c", &[]),
    ] {
        assert!(load_and_read(&good));
        for len in 0..good.len() {
            assert!(!load_and_read(&good[..len]), "a {len}-byte prefix loaded");
        }
        // A fixed pseudo-random sequence (xorshift), so a failure reproduces.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut copy = good.clone();
            let at = (state % copy.len() as u64) as usize;
            copy[at] ^= (state >> 32) as u8 | 1;
            load_and_read(&copy);
        }
    }
}
