//! Every relocation type FreeBSD's amd64 linker accepts, applied to an
//! object built from fixtures/relocs.S, checked site by site; and the
//! image layout of fixtures/layout.S.

mod common;

use common::{build, load, read_i32, read_u32, read_u64, BASE};
use kqemu_kldload::{ErrorKind, Kld, Resolver, SectionKind, PAGE_SIZE};

const EXT_DATA: u64 = 0xffff_ffff_8123_4560;
const EXT_FUNC: u64 = 0xffff_ffff_8100_1000;
const EXT_GOT: u64 = 0xffff_ffff_8100_2000;
const EXT_JMP: u64 = 0xffff_ffff_8100_3000;
const IFUNC_RESULT: u64 = 0xffff_ffff_8100_4000;

/// A kernel symbol table that records what the loader asks of it.
#[derive(Default)]
struct Kernel {
    asked: Vec<String>,
    ifunc_calls: Vec<u64>,
    runs_ifuncs: bool,
}

impl Resolver for Kernel {
    fn resolve(&mut self, name: &str) -> Option<u64> {
        self.asked.push(name.to_string());
        match name {
            "ext_data" => Some(EXT_DATA),
            "ext_func" => Some(EXT_FUNC),
            "ext_got" => Some(EXT_GOT),
            "ext_jmp" => Some(EXT_JMP),
            _ => None,
        }
    }

    fn call_ifunc(&mut self, resolver: u64) -> Option<u64> {
        if !self.runs_ifuncs {
            return None;
        }
        self.ifunc_calls.push(resolver);
        Some(IFUNC_RESULT + 0x10 * self.ifunc_calls.len() as u64)
    }
}

fn relocs(kernel: &mut Kernel) -> Kld<Vec<u8>> {
    let ko = build("relocs", "relocs.S", &[]);
    load("relocs.ko", &ko, kernel).unwrap_or_else(|e| panic!("load failed: {e}"))
}

fn site(kld: &Kld<Vec<u8>>, name: &str) -> u64 {
    kld.symbol(name)
        .unwrap_or_else(|| panic!("no symbol {name}"))
}

/// S + A - P as the 32-bit field holds it.
fn displacement(target: u64, addend: i64, place: u64) -> i32 {
    (target as i128 + addend as i128 - place as i128) as i32
}

#[test]
fn pc_relative_relocations_hold_the_displacement_from_the_site() {
    let kld = relocs(&mut Kernel {
        runs_ifuncs: true,
        ..Kernel::default()
    });
    // call rel32: the field is 1 byte in, and A = -4 (end of instruction).
    let call = site(&kld, "site_plt32") + 1;
    assert_eq!(read_i32(&kld, call), displacement(EXT_FUNC, -4, call));
    // leaq sym(%rip): the field is 3 bytes in.
    let lea = site(&kld, "site_pc32_text") + 3;
    assert_eq!(read_i32(&kld, lea), displacement(EXT_DATA, -4, lea));
    let local_call = site(&kld, "site_call_local") + 1;
    let helper = kld.section(".text.helper").unwrap().address;
    assert_eq!(
        read_i32(&kld, local_call),
        displacement(helper, -4, local_call)
    );
    let pc32 = site(&kld, "site_pc32");
    assert_eq!(read_i32(&kld, pc32), displacement(EXT_DATA, 0, pc32));
    let pc32_addend = site(&kld, "site_pc32_addend");
    assert_eq!(
        read_i32(&kld, pc32_addend),
        displacement(EXT_DATA, 0x20, pc32_addend)
    );
    let plt32 = site(&kld, "site_plt32_data");
    assert_eq!(read_i32(&kld, plt32), displacement(EXT_FUNC, 12, plt32));
}

#[test]
fn absolute_relocations_hold_the_address() {
    let kld = relocs(&mut Kernel {
        runs_ifuncs: true,
        ..Kernel::default()
    });
    assert_eq!(read_u64(&kld, site(&kld, "site_64")), EXT_DATA + 16);
    let local_obj = site(&kld, "local_obj");
    assert_eq!(read_u64(&kld, site(&kld, "site_64_local")), local_obj + 8);
    // 32S: the field sign-extends back to the full kernel address.
    let imm = site(&kld, "site_32s_text") + 3;
    assert_eq!(read_i32(&kld, imm) as i64 as u64, EXT_DATA);
    assert_eq!(
        read_i32(&kld, site(&kld, "site_32s")) as i64 as u64,
        EXT_DATA - 8
    );
    // GLOB_DAT drops its addend (+4 in the source), as the kernel does.
    assert_eq!(read_u64(&kld, site(&kld, "site_glob_dat")), EXT_GOT);
    assert_eq!(read_u64(&kld, site(&kld, "site_jmp_slot")), EXT_JMP);
    // RELATIVE: B is the patched section, not the image.
    let data = kld.section(".data").unwrap().address;
    assert_ne!(data, kld.base());
    assert_eq!(read_u64(&kld, site(&kld, "site_relative")), data + 0x10);
    assert_eq!(
        read_u64(&kld, site(&kld, "site_none")),
        0x1122_3344_5566_7788
    );
    assert_eq!(read_u64(&kld, site(&kld, "site_weak")), 0);
}

#[test]
fn ifuncs_are_resolved_last_by_calling_their_resolver() {
    let mut kernel = Kernel {
        runs_ifuncs: true,
        ..Kernel::default()
    };
    let kld = relocs(&mut kernel);
    // Global ifuncs (the STT_GNU_IFUNC symbol) before local ones (the
    // IRELATIVE, whose symbol is index 0), as link_elf_load_file orders them.
    let data = kld.section(".data").unwrap().address;
    assert_eq!(kernel.ifunc_calls, [site(&kld, "ifunc_sym"), data + 0x30]);
    assert_eq!(
        read_u64(&kld, site(&kld, "site_ifunc")),
        IFUNC_RESULT + 0x10
    );
    assert_eq!(
        read_u64(&kld, site(&kld, "site_irelative")),
        IFUNC_RESULT + 0x20
    );
}

#[test]
fn a_resolver_that_cannot_run_ifuncs_fails_the_load_naming_the_resolver() {
    let ko = build("relocs", "relocs.S", &[]);
    let mut kernel = Kernel::default();
    let error = load("relocs.ko", &ko, &mut kernel).err().unwrap();
    assert_eq!(*error.kind(), ErrorKind::Ifunc);
    let with_ifuncs = relocs(&mut Kernel {
        runs_ifuncs: true,
        ..Kernel::default()
    });
    let resolver = format!("{:#x}", site(&with_ifuncs, "ifunc_sym"));
    assert!(error.message().contains(&resolver), "{error}");
    // A closure is a resolver too, and cannot run ifuncs either.
    let mut by_name = |name: &str| (name == "ext_data").then_some(EXT_DATA);
    let error = load("relocs.ko", &ko, &mut by_name).err().unwrap();
    assert_eq!(
        error.message(),
        "link_elf_obj: symbol ext_func undefined",
        "the first global relocation needing another symbol fails first"
    );
}

#[test]
fn link_set_bounds_and_entries_come_from_the_set_section() {
    let kld = relocs(&mut Kernel {
        runs_ifuncs: true,
        ..Kernel::default()
    });
    let set = kld.linker_set("demo_set").unwrap();
    let section = kld.section("set_demo_set").unwrap();
    assert_eq!(
        (set.start, set.stop),
        (section.address, section.address + 24)
    );
    assert_eq!(set.count(), 3);
    assert_eq!(read_u64(&kld, site(&kld, "site_set_start")), set.start);
    assert_eq!(read_u64(&kld, site(&kld, "site_set_stop")), set.stop);
    assert_eq!(kld.symbol("__start_set_demo_set"), Some(set.start));
    assert_eq!(kld.symbol("__stop_set_demo_set"), Some(set.stop));
    let entries = kld.set_entries("demo_set").unwrap();
    let expected: Vec<u64> = ["demo_a", "demo_b", "demo_c"]
        .iter()
        .map(|name| site(&kld, name))
        .collect();
    assert_eq!(entries, expected);
    assert_eq!(kld.linker_set("no_such_set"), None);
    assert!(kld.set_entries("no_such_set").unwrap().is_empty());
}

#[test]
fn only_undefined_symbols_reach_the_resolver_once_each() {
    let mut kernel = Kernel {
        runs_ifuncs: true,
        ..Kernel::default()
    };
    let kld = relocs(&mut kernel);
    let mut asked = kernel.asked.clone();
    asked.sort();
    assert_eq!(
        asked,
        ["ext_data", "ext_func", "ext_got", "ext_jmp", "ext_weak"]
    );
    let imports: Vec<(&str, u64, bool)> = kld
        .imports()
        .iter()
        .map(|i| (i.name.as_str(), i.address, i.weak))
        .collect();
    assert!(imports.contains(&("ext_data", EXT_DATA, false)));
    assert!(imports.contains(&("ext_weak", 0, true)));
    assert_eq!(imports.len(), 5);
}

#[test]
fn bss_is_zero_and_aligned_inside_the_image() {
    let kld = relocs(&mut Kernel {
        runs_ifuncs: true,
        ..Kernel::default()
    });
    let bss = kld.section(".bss").unwrap();
    assert_eq!(bss.kind, SectionKind::NoBits);
    assert_eq!(bss.address % 64, 0);
    let offset = (bss.address - kld.base()) as usize;
    assert!(kld.image()[offset..offset + 64].iter().all(|&b| b == 0));
    assert_eq!(site(&kld, "bss_obj"), bss.address);
}

#[test]
fn sections_are_placed_in_table_order_at_their_alignment() {
    let ko = build("layout", "layout.S", &[]);
    let kld = load("layout.ko", &ko, &mut |_: &str| None).unwrap();
    assert_eq!(kld.base(), BASE);
    assert_eq!(kld.size() % PAGE_SIZE, 0);
    let names: Vec<&str> = kld.sections().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, [".text", ".rodata.byte", ".data.page", ".bss"]);
    // The first section starts the image; each next one starts at the
    // first multiple of its alignment after the previous one ends.
    let sections = kld.sections();
    assert_eq!(sections[0].address, BASE);
    assert_eq!(sections[1].address, BASE + sections[0].size);
    assert_eq!(sections[2].address, BASE + PAGE_SIZE as u64);
    assert_eq!(
        sections[3].address,
        (sections[2].address + sections[2].size).next_multiple_of(16)
    );
    assert!(sections[3].address + sections[3].size <= BASE + kld.size() as u64);
    assert!(sections.windows(2).all(|w| w[0].index < w[1].index));
    assert!(sections[0].executable() && !sections[0].writable());
    assert!(sections[2].writable() && !sections[2].executable());
    assert_eq!(site(&kld, "page_aligned"), BASE + PAGE_SIZE as u64);
    assert_eq!(
        read_u64(&kld, site(&kld, "page_aligned")),
        0x0123_4567_89ab_cdef
    );
    assert_eq!(read_u32(&kld, site(&kld, "one_byte")) & 0xff, 0xab);
    assert_eq!(kld.section(".comment.extra"), None);
}
