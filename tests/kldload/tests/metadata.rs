//! The linker sets of fixtures/module.c (what DECLARE_MODULE,
//! MODULE_DEPEND, MODULE_VERSION, SYSINIT, SYSUNINIT and SYSCTL_* make):
//! parsed, ordered as the kernel runs them, and the dependency rules.

mod common;

use common::{build, read_u64, BASE, FREEBSD_VERSION};
use kqemu_kldload::{
    ErrorKind, Kld, Loader, Metadata, ModDepend, ModuleData, ProvidedModule, VecMemory,
};

const MODULE_REGISTER_INIT: u64 = 0xffff_ffff_8080_0000;
const PRINTF: u64 = 0xffff_ffff_8080_1000;

fn kernel(name: &str) -> Option<u64> {
    match name {
        "module_register_init" => Some(MODULE_REGISTER_INIT),
        "printf" => Some(PRINTF),
        _ => None,
    }
}

fn module_ko() -> Vec<u8> {
    build("module", "module.c", &[])
}

/// The fixture's kernel with the module it depends on.
fn loader(freebsd_version: i32) -> Loader {
    Loader::new(freebsd_version).provide("fakedep", 3, "fakedep.ko")
}

fn loaded() -> Kld<Vec<u8>> {
    loader(FREEBSD_VERSION)
        .load(
            "/boot/modules/module.ko",
            &module_ko(),
            &mut VecMemory::new(BASE),
            &mut kernel,
        )
        .unwrap_or_else(|e| panic!("load failed: {e}"))
}

fn symbol(kld: &Kld<Vec<u8>>, name: &str) -> u64 {
    kld.symbol(name)
        .unwrap_or_else(|| panic!("no symbol {name}"))
}

#[test]
fn module_metadata_is_typed_in_set_order() {
    let kld = loaded();
    let metadata = kld.modmetadata().unwrap();
    assert!(metadata.iter().all(|m| m.md_version == 1));
    let entries: Vec<&Metadata> = metadata.iter().map(|m| &m.entry).collect();
    let Metadata::Module { moduledata, .. } = entries[1] else {
        panic!("second entry: {:?}", entries[1]);
    };
    let expected = [
        Metadata::Depend {
            module: "kernel".into(),
            depend: ModDepend {
                minimum: 1_400_097,
                preferred: 1_400_097,
                maximum: 1_499_999,
            },
        },
        Metadata::Module {
            name: "fake".into(),
            moduledata: *moduledata,
            data: ModuleData {
                name: "fake".into(),
                evhand: symbol(&kld, "fake_modevent"),
                private: symbol(&kld, "fake_private"),
            },
        },
        Metadata::Depend {
            module: "fakedep".into(),
            depend: ModDepend {
                minimum: 2,
                preferred: 3,
                maximum: 4,
            },
        },
        Metadata::Depend {
            module: "fake".into(),
            depend: ModDepend {
                minimum: 9,
                preferred: 9,
                maximum: 9,
            },
        },
        Metadata::Version {
            module: "fake".into(),
            version: 7,
        },
    ];
    assert_eq!(entries, expected.iter().collect::<Vec<_>>());
    assert_eq!(*moduledata, symbol(&kld, "fake_mod"));
}

#[test]
fn sysinits_run_in_the_kernels_order_without_dummies() {
    let kld = loaded();
    // The set as the compiler laid it out: source order, tags 1..6 then
    // the DECLARE_MODULE entry (udata = &fake_mod).
    let raw: Vec<u64> = kld
        .set_entries("sysinit_set")
        .unwrap()
        .iter()
        .map(|&record| read_u64(&kld, record + 24))
        .collect();
    let fake_mod = symbol(&kld, "fake_mod");
    assert_eq!(raw[..6], [1, 2, 3, 4, 5, 6]);
    assert_eq!(raw[6], fake_mod);
    // linker_file_sysinit's exchange sort by (subsystem, order) is not
    // stable: 2 and 5 share a key and come out as 5, 2; 4 and 6 stay.
    let sysinits = kld.sysinits().unwrap();
    let udata: Vec<u64> = sysinits.iter().map(|s| s.udata).collect();
    assert_eq!(udata, [4, 6, 5, 2, 1, fake_mod]);
    let keys: Vec<(u32, u32)> = sysinits.iter().map(|s| (s.subsystem, s.order)).collect();
    assert_eq!(
        keys,
        [
            (0x0700000, 1),
            (0x0700000, 1),
            (0x0700000, 5),
            (0x0700000, 5),
            (0x2000000, 1),
            (0x3100000, 0x1000000),
        ]
    );
    let fake_init = symbol(&kld, "fake_init");
    assert!(sysinits[..5].iter().all(|s| s.func == fake_init));
    // DECLARE_MODULE's entry: module_register_init(&moduledata).
    assert_eq!(sysinits[5].func, MODULE_REGISTER_INIT);
}

#[test]
fn sysuninits_run_in_reverse_order() {
    let kld = loaded();
    let sysuninits = kld.sysuninits().unwrap();
    let udata: Vec<u64> = sysuninits.iter().map(|s| s.udata).collect();
    assert_eq!(udata, [12, 13, 14, 11]);
    let fake_uninit = symbol(&kld, "fake_uninit");
    assert!(sysuninits.iter().all(|s| s.func == fake_uninit));
}

#[test]
fn sysctl_oids_and_constructors_are_listed() {
    let kld = loaded();
    assert_eq!(
        kld.sysctl_oids().unwrap(),
        [
            symbol(&kld, "fake_oid_counter"),
            symbol(&kld, "fake_oid_private")
        ]
    );
    assert_eq!(kld.ctors().unwrap(), [symbol(&kld, "fake_ctor")]);
    assert!(kld.dtors().unwrap().is_empty());
}

fn load_for(loader: &Loader) -> Result<Kld<Vec<u8>>, kqemu_kldload::LoadError> {
    loader.load(
        "/boot/modules/module.ko",
        &module_ko(),
        &mut VecMemory::new(BASE),
        &mut kernel,
    )
}

#[test]
fn the_kernel_dependency_accepts_the_range_it_declares() {
    for version in [1_400_097, 1_400_500, 1_499_999] {
        assert!(load_for(&loader(version)).is_ok(), "{version}");
    }
    for version in [1_400_096, 1_500_000, 1_302_000] {
        let error = load_for(&loader(version)).err().unwrap();
        assert_eq!(
            error.message(),
            "KLD module.ko: depends on kernel - not available or version mismatch",
            "{version}"
        );
        assert_eq!(*error.kind(), ErrorKind::Dependency("kernel".into()));
    }
}

#[test]
fn other_dependencies_need_a_provided_module_in_range() {
    let kernel_only = Loader::new(FREEBSD_VERSION);
    let error = load_for(&kernel_only).err().unwrap();
    assert_eq!(
        error.message(),
        "KLD module.ko: depends on fakedep - not available or version mismatch"
    );
    for (version, ok) in [(1, false), (2, true), (3, true), (4, true), (5, false)] {
        let loader = Loader::new(FREEBSD_VERSION).provide("fakedep", version, "fakedep.ko");
        assert_eq!(load_for(&loader).is_ok(), ok, "fakedep {version}");
    }
    // The dependency on "fake" (9..9) is the module's own: skipped.
    let kld = load_for(&loader(FREEBSD_VERSION)).unwrap();
    let available = [ProvidedModule {
        name: "kernel".into(),
        version: FREEBSD_VERSION,
        container: "kernel".into(),
    }];
    assert_eq!(
        *kld.check_dependencies(&available).err().unwrap().kind(),
        ErrorKind::Dependency("fakedep".into())
    );
}

#[test]
fn a_version_already_loaded_is_refused() {
    let loader = loader(FREEBSD_VERSION).provide("fake", 7, "old_fake.ko");
    let error = load_for(&loader).err().unwrap();
    assert_eq!(
        error.message(),
        "interface fake.7 already present in the KLD 'old_fake.ko'!"
    );
    assert!(load_for(&loader_with_other_fake()).is_ok());
}

fn loader_with_other_fake() -> Loader {
    loader(FREEBSD_VERSION).provide("fake", 6, "old_fake.ko")
}

#[test]
fn dependencies_are_checked_before_global_symbols_are_resolved() {
    // linker_load_dependencies runs between the local and global
    // relocations: with no kernel symbols at all, the version mismatch is
    // what fails.
    let mut nothing = |_: &str| None;
    let error = loader(1_500_000)
        .load(
            "module.ko",
            &module_ko(),
            &mut VecMemory::new(BASE),
            &mut nothing,
        )
        .err()
        .unwrap();
    assert_eq!(*error.kind(), ErrorKind::Dependency("kernel".into()));
    let error = loader(FREEBSD_VERSION)
        .load(
            "module.ko",
            &module_ko(),
            &mut VecMemory::new(BASE),
            &mut nothing,
        )
        .err()
        .unwrap();
    assert!(
        matches!(error.kind(), ErrorKind::UndefinedSymbol(name) if name == "printf" || name == "module_register_init"),
        "{error}"
    );
}
