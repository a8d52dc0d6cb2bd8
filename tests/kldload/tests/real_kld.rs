//! The real modules, build/freebsd14/kqemu.ko and build/freebsd15/kqemu.ko
//! (`make kld`), loaded with every kernel symbol at a made-up address:
//! they must pass FreeBSD's loading rules and carry the module metadata
//! and SYSINITs that DEV_MODULE(kqemu, ...) and MODULE_VERSION(kqemu, 1)
//! declare (FREEBSD.md).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::BASE;
use kqemu_kldload::{ErrorKind, Kld, Loader, Metadata, ModDepend, VecMemory};

/// sys/sys/kernel.h: DEV_MODULE's DECLARE_MODULE runs at SI_SUB_DRIVERS,
/// SI_ORDER_MIDDLE.
const SI_SUB_DRIVERS: u32 = 0x310_0000;
const SI_ORDER_MIDDLE: u32 = 0x100_0000;

/// Made-up kernel addresses, one per symbol asked for.
#[derive(Default)]
struct FakeKernel {
    symbols: HashMap<String, u64>,
}

impl FakeKernel {
    fn resolve(&mut self, name: &str) -> Option<u64> {
        let next = 0xffff_ffff_8080_0000 + 0x10 * self.symbols.len() as u64;
        Some(*self.symbols.entry(name.to_string()).or_insert(next))
    }
}

fn module_path(release: u32) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../build/freebsd{release}/kqemu.ko"));
    assert!(
        path.exists(),
        "build/freebsd{release}/kqemu.ko does not exist: run `make kld` first"
    );
    path
}

fn load(release: u32, freebsd_version: i32, kernel: &mut FakeKernel) -> Kld<Vec<u8>> {
    let object = std::fs::read(module_path(release)).unwrap();
    Loader::new(freebsd_version)
        .load(
            &format!("/boot/modules/kqemu.ko ({release}.x build)"),
            &object,
            &mut VecMemory::new(BASE),
            &mut |name: &str| kernel.resolve(name),
        )
        .unwrap_or_else(|e| panic!("{release}.x kqemu.ko did not load:\n{e}"))
}

/// The `MODULE_DEPEND(kqemu, kernel, ...)` DECLARE_MODULE adds.
fn kernel_dependency(kld: &Kld<Vec<u8>>) -> ModDepend {
    let metadata = kld.modmetadata().unwrap();
    let depends: Vec<ModDepend> = metadata
        .iter()
        .filter_map(|m| match &m.entry {
            Metadata::Depend { module, depend } if module == "kernel" => Some(*depend),
            _ => None,
        })
        .collect();
    assert_eq!(depends.len(), 1, "{metadata:#?}");
    depends[0]
}

fn check_release(release: u32) {
    let oldest = release as i32 * 100_000;
    let newest = oldest + 99_999;
    let mut kernel = FakeKernel::default();
    let kld = load(release, newest, &mut kernel);

    // Built for one release: loads from __FreeBSD_version at build time to
    // the end of the branch (MODULE_KERNEL_MAXVER).
    let depend = kernel_dependency(&kld);
    assert_eq!(depend.minimum, depend.preferred);
    assert!((oldest..newest).contains(&depend.minimum), "{depend:?}");
    assert_eq!(depend.maximum, newest);
    let mut at_minimum = FakeKernel::default();
    load(release, depend.minimum, &mut at_minimum);
    for too_old_or_new in [depend.minimum - 1, newest + 1] {
        let object = std::fs::read(module_path(release)).unwrap();
        let error = Loader::new(too_old_or_new)
            .load(
                "kqemu.ko",
                &object,
                &mut VecMemory::new(BASE),
                &mut |name: &str| kernel.resolve(name),
            )
            .err()
            .unwrap_or_else(|| panic!("{release}.x kqemu.ko loaded on {too_old_or_new}"));
        assert_eq!(*error.kind(), ErrorKind::Dependency("kernel".into()));
    }

    // DEV_MODULE(kqemu, kqemu_modevent, NULL) and MODULE_VERSION(kqemu, 1).
    let metadata = kld.modmetadata().unwrap();
    let text = kld.section(".text").unwrap();
    let in_text = |address: u64| (text.address..text.address + text.size).contains(&address);
    let moduledata = metadata
        .iter()
        .find_map(|m| match &m.entry {
            Metadata::Module {
                name,
                moduledata,
                data,
            } if name == "kqemu" => {
                assert_eq!(data.name, "kqemu");
                assert!(in_text(data.evhand), "evhand {:#x}", data.evhand);
                assert_eq!(kld.symbol("kqemu_modevent"), Some(data.evhand));
                Some(*moduledata)
            }
            _ => None,
        })
        .expect("no MDT_MODULE kqemu");
    assert!(metadata.iter().any(|m| m.entry
        == Metadata::Version {
            module: "kqemu".into(),
            version: 1
        }));

    // Its SYSINIT: module_register_init(&moduledata), which sends MOD_LOAD.
    let module_register_init = kernel.symbols["module_register_init"];
    let sysinits = kld.sysinits().unwrap();
    let registration: Vec<_> = sysinits
        .iter()
        .filter(|s| s.func == module_register_init)
        .collect();
    assert_eq!(registration.len(), 1, "{sysinits:#x?}");
    assert_eq!(registration[0].udata, moduledata);
    assert_eq!(
        (registration[0].subsystem, registration[0].order),
        (SI_SUB_DRIVERS, SI_ORDER_MIDDLE)
    );
    let kernel_functions: Vec<u64> = kernel.symbols.values().copied().collect();
    for s in sysinits.iter().chain(&kld.sysuninits().unwrap()) {
        assert!(
            in_text(s.func) || kernel_functions.contains(&s.func),
            "SYSINIT function {:#x} is neither the module's nor the kernel's",
            s.func
        );
    }
    assert!(sysinits
        .windows(2)
        .all(|w| (w[0].subsystem, w[0].order) <= (w[1].subsystem, w[1].order)));

    // hw.kqemu and its four leaves (FREEBSD.md, contract): oids in the image.
    let oids = kld.sysctl_oids().unwrap();
    assert!(oids.len() >= 5, "{oids:#x?}");
    let end = kld.base() + kld.size() as u64;
    assert!(oids.iter().all(|&oid| (kld.base()..end).contains(&oid)));

    // Every import came through the resolver, and only undefined symbols did.
    assert_eq!(kld.imports().len(), kernel.symbols.len());
    assert!(kld
        .imports()
        .iter()
        .all(|i| !i.weak && kld.symbol(&i.name).is_none()));
}

#[test]
fn the_freebsd14_module_loads_with_its_metadata() {
    check_release(14);
}

#[test]
fn the_freebsd15_module_loads_with_its_metadata() {
    check_release(15);
}
