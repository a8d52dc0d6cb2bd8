//! Generates the kernel bindings with bindgen from the FreeBSD headers the
//! C shim is compiled against, with the same clang arguments, so Rust and
//! C agree on every layout (TOOLCHAIN.md).
//!
//! `KQEMU_KERNEL_CFLAGS` carries those arguments (target, defines, include
//! directories): mk/kld.mk passes the ziglang header set of one release,
//! the FreeBSD `Makefile` the kmod CFLAGS of bsd.kmod.mk.

use std::env;
use std::path::PathBuf;

/// Kernel types, functions and constants the kld uses; everything they
/// refer to comes along (bindgen follows the allowlist recursively).
const TYPES: &[&str] = &[
    "cdev",
    "cdevsw",
    "make_dev_args",
    "malloc_type",
    "modeventhand_t",
    "modeventtype",
    "pcpu",
    "proc",
    "thread",
    "vmspace",
];
const FUNCTIONS: &[&str] = &[
    "destroy_dev",
    "devfs_get_cdevpriv",
    "devfs_set_cdevpriv",
    "free",
    "make_dev_args_init_impl",
    "malloc_aligned",
    "panic",
    "printf",
    "vm_fault_quick_hold_pages",
    "vm_map_check_protection",
    "vm_object_deallocate",
    "vm_page_unhold_pages",
    "vmspace_acquire_ref",
    "vmspace_free",
    "kqemu_.*",
];
const VARS: &[&str] = &[
    "E(BUSY|FAULT|INVAL|IO|NOMEM|NOSPC|NOTTY|OPNOTSUPP|PERM)",
    "FWRITE",
    "GID_WHEEL",
    "MAKEDEV_(CHECKNAME|WAITOK)",
    "M_(KQEMU|NOWAIT|ZERO)",
    "PAGE_SIZE",
    "UID_ROOT",
    "kqemu_(cdevsw|tunable_gid|tunable_mode|max_locked_pages)",
    "vm_page_max_user_wired",
    "KQEMU_(FREEBSD_VERSION|VM_PROT_READ|VM_PROT_WRITE)",
];

fn main() {
    println!("cargo:rerun-if-env-changed=KQEMU_KERNEL_CFLAGS");
    println!("cargo:rerun-if-changed=bindings.h");
    println!("cargo:rerun-if-changed=kqemu_kmod.h");

    let releases = [
        env::var_os("CARGO_FEATURE_FREEBSD14").is_some(),
        env::var_os("CARGO_FEATURE_FREEBSD15").is_some(),
    ];
    if releases.iter().filter(|&&on| on).count() != 1 {
        panic!("freebsd-kernel-sys: enable exactly one of the features freebsd14, freebsd15");
    }
    let Ok(cflags) = env::var("KQEMU_KERNEL_CFLAGS") else {
        panic!(
            "freebsd-kernel-sys: KQEMU_KERNEL_CFLAGS is not set; build the kld with `make kld` \
             (Linux) or `make` (FreeBSD), which pass the kernel compile flags"
        );
    };

    let mut builder = bindgen::Builder::default()
        .header("bindings.h")
        .clang_args(cflags.split_whitespace())
        .use_core()
        .ctypes_prefix("core::ffi")
        .layout_tests(true)
        .generate_comments(false)
        .prepend_enum_name(false)
        .enable_function_attribute_detection()
        .default_macro_constant_type(bindgen::MacroTypeVariation::Signed)
        .derive_default(true)
        .merge_extern_blocks(true)
        .wrap_unsafe_ops(true)
        .formatter(bindgen::Formatter::Prettyplease)
        .allowlist_recursively(true);
    for t in TYPES {
        builder = builder.allowlist_type(t);
    }
    for f in FUNCTIONS {
        builder = builder.allowlist_function(f);
    }
    for v in VARS {
        builder = builder.allowlist_var(v);
    }
    let bindings = builder
        .generate()
        .unwrap_or_else(|e| panic!("freebsd-kernel-sys: bindgen failed: {e}"));

    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("bindings.rs");
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| panic!("freebsd-kernel-sys: writing {}: {e}", out.display()));
}
