# Makefile: kqemu.ko on FreeBSD 14 or 15, with bsd.kmod.mk.
#
#	make			build kqemu.ko against the kernel sources in SYSDIR
#				(default /usr/src/sys)
#	make install		install it in /boot/modules
#	make load / unload	kldload / kldunload the built module
#
# Needs the kernel sources, Rust with its library sources (rust-src) for
# -Z build-std, and libclang for bindgen.  The Rust flags are shared with
# the Linux build in mk/kernel.mk; the C flags are bsd.kmod.mk's own.
# (On Linux, GNU make reads GNUmakefile instead: see README.)

KMOD=	kqemu
KMODDIR?= /boot/modules
SRCS=	kqemu_kmod.c helpers.c
.PATH:	${.CURDIR}/sys
CFLAGS+= -I${.CURDIR}/sys

.include "${.CURDIR}/mk/kernel.mk"

CARGO?=	cargo
KQEMU_TARGET_DIR= ${.OBJDIR}/target
KQEMU_RUST_INPUTS!= find ${.CURDIR}/src ${.CURDIR}/sys -type f
KQEMU_RUST_INPUTS+= ${.CURDIR}/Cargo.toml ${.CURDIR}/Cargo.lock ${.CURDIR}/mk/kernel.mk

# The Rust side as a static library, linked in with the C objects (kmod.mk
# links OBJS with ld -r).  The release (feature freebsd14/freebsd15) is
# that of the headers in SYSDIR, from __FreeBSD_version in sys/param.h.
# bindgen sees the kmod CFLAGS, with the object directory (where
# bsd.kmod.mk links machine/ and x86/) in place of `-I.`, without
# dependency-file options, and with the target the compiler builds for.
OBJS+=	libkqemu.a
CLEANFILES+= libkqemu.a
CLEANDIRS+= ${KQEMU_TARGET_DIR}

libkqemu.a: ${KQEMU_RUST_INPUTS}
	major=$$(awk '$$2 == "__FreeBSD_version" { print int($$3 / 100000) }' \
	    ${SYSDIR}/sys/param.h); \
	cd ${.CURDIR} && env RUSTC_BOOTSTRAP=1 \
	    KQEMU_KERNEL_CFLAGS="--target=$$(${CC} -dumpmachine) ${CFLAGS:N-I.:N-M*} -I${.OBJDIR}" \
	    RUSTFLAGS="${KQEMU_RUSTFLAGS}" CARGO_TARGET_DIR=${KQEMU_TARGET_DIR} \
	    ${CARGO} rustc -p kqemu --features freebsd$${major} ${KQEMU_CARGO_FLAGS}
	cp ${KQEMU_TARGET_DIR}/${KQEMU_RUST_TARGET}/release/libkqemu.a ${.TARGET}
	${OBJCOPY} -R .llvmbc -R .llvmcmd ${.TARGET}

.include <bsd.kmod.mk>
