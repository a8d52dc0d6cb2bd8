#!/usr/bin/env bash
# Installs everything the project needs on a Debian 12 machine, from Debian's
# archive, PyPI (into build/deps, never globally) and crates.io.  Idempotent:
# every step checks what is already there first.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS=build/deps
mkdir -p "$DEPS"

APT_PACKAGES=(
	rustc-web cargo-web rust-web-src          # Rust 1.96 with library sources (build-std)
	clang lld llvm libclang-dev               # C shim, kld link, bindgen
	qemu-system-x86                           # the testbed (TCG)
	busybox-static                            # amd64 guest programs and host oracle
	mandoc                                    # kqemu.4 lint
	nasm musl-tools                           # small guest test programs
	cpio xz-utils unzip file                  # packing and unpacking
)

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive

missing=()
for p in "${APT_PACKAGES[@]}"; do
	case "$p" in \#*) continue ;; esac
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "deps: installing ${missing[*]}"
	$SUDO apt-get update -qq
	$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# i386 busybox: downloaded as a package file, not installed (it would
# replace the amd64 one).  The i386 index update may fail on one mirror
# while the main index works: tolerate that and check the download.
BB32="$DEPS/busybox-i386"
if [ ! -x "$BB32" ]; then
	if ! dpkg --print-foreign-architectures | grep -qx i386; then
		$SUDO dpkg --add-architecture i386
	fi
	$SUDO apt-get update -qq || true
	tmp=$(mktemp -d)
	chmod 755 "$tmp"
	(cd "$tmp" && apt-get download busybox-static:i386 >/dev/null)
	dpkg-deb -x "$tmp"/busybox-static_*_i386.deb "$tmp/x"
	cp "$tmp/x/bin/busybox" "$BB32"
	rm -rf "$tmp"
	file "$BB32" | grep -q 'ELF 32-bit LSB executable, Intel 80386' || {
		echo "deps: $BB32 is not an i386 ELF" >&2; exit 1; }
fi

# FreeBSD kernel headers: the ziglang wheels carry FreeBSD's /usr/include
# (0.15.2: FreeBSD 14.x, 0.17.1: FreeBSD 15.x).  Pinned versions.
fetch_headers() { # release zig-version
	local rel=$1 ver=$2 dest="$DEPS/freebsd$1/include"
	[ -f "$dest/x86_64-freebsd-none/machine/pcpu.h" ] && return 0
	local wheels="$DEPS/wheels"
	mkdir -p "$wheels"
	ls "$wheels"/ziglang-"$ver"-*.whl >/dev/null 2>&1 ||
		python3 -m pip download -q --no-deps --only-binary=:all: \
			-d "$wheels" "ziglang==$ver"
	local tmp
	tmp=$(mktemp -d)
	unzip -q "$wheels"/ziglang-"$ver"-*.whl \
		'ziglang/lib/libc/include/x86_64-freebsd-none/*' \
		'ziglang/lib/libc/include/generic-freebsd/*' -d "$tmp"
	rm -rf "$dest"
	mkdir -p "$dest"
	mv "$tmp"/ziglang/lib/libc/include/x86_64-freebsd-none "$dest/"
	mv "$tmp"/ziglang/lib/libc/include/generic-freebsd "$dest/"
	rm -rf "$tmp"
}
fetch_headers 14 0.15.2
fetch_headers 15 0.17.1

# crates.io: fetch the locked dependencies once so later builds need no
# network.
if [ -f Cargo.lock ]; then
	PATH=/usr/bin:$PATH RUSTC=/usr/bin/rustc /usr/bin/cargo fetch -q
fi
echo "deps: ok"
