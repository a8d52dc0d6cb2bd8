# mk/kernel.mk: the flags of the kld build, in one place for both builds:
# FreeBSD's make reads it from Makefile, GNU make from GNUmakefile (and
# mk/kld.mk uses it).  Plain `VAR= value` lines only, so both makes parse
# it the same way.

# Rust (TOOLCHAIN.md).  The target already gives the kernel code model, no
# red zone, soft float without MMX/SSE and panic=abort; add a static
# relocation model and PLT calls (FreeBSD's amd64 kld linker refuses
# GOTPCREL), frame pointers (kernel stack traces, DTrace), the stack
# protector the C side also uses, and no embedded LLVM bitcode.
KQEMU_RUST_TARGET= x86_64-unknown-none
KQEMU_RUSTFLAGS= -C relocation-model=static -Z plt=yes -C force-frame-pointers=yes -Z stack-protector=strong
KQEMU_CARGO_FLAGS= --release --config profile.release.lto=true --target x86_64-unknown-none --crate-type staticlib -Z build-std=core,compiler_builtins

# C: what bsd.kmod.mk (kern.mk, kmod.mk) passes for an amd64 module.  The
# FreeBSD build takes these from bsd.kmod.mk itself; the Linux build adds
# the target, the header directories and __FreeBSD_version.
KQEMU_KERNEL_CFLAGS= -O2 -pipe -Werror -D_KERNEL -DKLD_MODULE -nostdinc -fno-common -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer -mcmodel=kernel -mno-red-zone -mno-mmx -mno-sse -msoft-float -fno-asynchronous-unwind-tables -ffreestanding -fwrapv -fstack-protector -std=iso9899:1999 -Wall -Wmissing-prototypes -Wundef -D__SSP_FORTIFY_LEVEL=0

# Link: kmod.mk's `ld -r -warn-common` with the FreeBSD emulation (its -d,
# "allocate commons", has nothing to do with -fno-common and lld drops it).
KQEMU_LDFLAGS= -m elf_x86_64_fbsd -warn-common --build-id=sha1 -r

# __FreeBSD_version of the oldest release each build loads on (it also
# sets the module's kernel dependency range): 14.0-RELEASE and
# 15.0-RELEASE (sys/sys/param.h of releng/14.0 and releng/15.0).
KQEMU_FREEBSD_VERSION_14= 1400097
KQEMU_FREEBSD_VERSION_15= 1500068
