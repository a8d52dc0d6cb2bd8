#!/usr/bin/env python3
"""Self-test of check_kld.py: every check must reject an object made to break
it, for that reason and no other, and a well-formed kld-shaped object must
pass.  The objects are built at test time with clang and ld.lld from the
sources in selftest/ (a fake module with the linker sets DECLARE_MODULE and
friends produce, plus one small assembly file per bad instruction or
relocation); header and section-table defects are patched into copies.

Usage: selftest.py [--out DIR]     (default: build/kld-selftest)
Prints one line per case and ends with `N passed, N failed`.
"""

import argparse
import os
import shutil
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "selftest")
CHECKER = os.path.join(HERE, "check_kld.py")
TOP = os.path.dirname(os.path.dirname(HERE))
KPI = os.path.join(SRC, "kpi-test.txt")

# The compile line of a FreeBSD amd64 kmod (TOOLCHAIN.md), minus the headers.
CFLAGS = ["--target=x86_64-unknown-freebsd14.0", "-O2", "-mcmodel=kernel",
          "-mno-red-zone", "-mno-mmx", "-mno-sse", "-msoft-float",
          "-ffreestanding", "-fno-common", "-fno-pic", "-Wall", "-Werror"]
LDFLAGS = ["-m", "elf_x86_64_fbsd", "-r"]


def tool(*names):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"selftest: none of {', '.join(names)} found (run `make deps`)")


class Builder:
    def __init__(self, out):
        self.out = out
        self.clang = tool("clang", "clang-14")
        self.lld = tool("ld.lld", "ld.lld-14")
        self.objcopy = tool("llvm-objcopy", "llvm-objcopy-14")

    def path(self, name):
        return os.path.join(self.out, name)

    def compile(self, src, obj, extra=()):
        subprocess.run([self.clang, *CFLAGS, *extra, "-c", os.path.join(SRC, src),
                        "-o", self.path(obj)], check=True)
        return self.path(obj)

    def link(self, ko, objs):
        subprocess.run([self.lld, *LDFLAGS, "-o", self.path(ko), *objs], check=True)
        return self.path(ko)

    def module(self, ko, defines=(), extra_objs=(), cflags=()):
        """The fake module with -D switches, linked like a kld."""
        obj = self.compile("fake_kld.c", ko + ".o", [f"-D{d}" for d in defines] + list(cflags))
        fpu = self.compile("fpu_state_ok.S", "fpu_state_ok.o")
        return self.link(ko, [obj, fpu, *extra_objs])

    def with_asm(self, ko, asm, asflags=()):
        """The good module plus one assembly file."""
        return self.module(ko, extra_objs=[self.compile(asm, ko + ".asm.o", asflags)])

    def patched(self, ko, src, patch):
        data = bytearray(open(src, "rb").read())
        patch(data)
        with open(self.path(ko), "wb") as f:
            f.write(data)
        return self.path(ko)

    def add_section(self, ko, src, name):
        blob = self.path(ko + ".blob")
        with open(blob, "wb") as f:
            f.write(b"BC\xc0\xde" + bytes(12))
        subprocess.run([self.objcopy, f"--add-section={name}={blob}", src, self.path(ko)],
                       check=True)
        return self.path(ko)


def set_byte(offset, value):
    def patch(data):
        data[offset] = value
    return patch


def set_half(offset, value):
    def patch(data):
        struct.pack_into("<H", data, offset, value)
    return patch


def second_symtab(data):
    """Append a copy of the section header table with the .symtab header
    repeated at the end: two SHT_SYMTAB sections over the same bytes."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shnum, = struct.unpack_from("<H", data, 0x3C)
    table = bytes(data[shoff:shoff + 64 * shnum])
    symtab = next(table[64 * i:64 * i + 64] for i in range(shnum)
                  if struct.unpack_from("<I", table, 64 * i + 4)[0] == 2)
    while len(data) % 8:
        data.append(0)
    struct.pack_into("<Q", data, 0x28, len(data))
    struct.pack_into("<H", data, 0x3C, shnum + 1)
    data.extend(table + symtab)


def write_kpi(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def cases(b):
    """[(name, build, checker arguments, checks expected to fail)]; `build`
    makes the object when the case runs, so a build error fails that case."""
    built = {}

    def good():
        if "good" not in built:
            built["good"] = b.module("good.ko")
        return built["good"]

    def extra():
        return write_kpi(b.path("kpi-extra.txt"), ["printf  sys/kern/subr_prf.c",
                                                   "malloc  sys/kern/kern_malloc.c"])

    def ssp_kpi():
        return write_kpi(b.path("kpi-ssp.txt"), ["printf  sys/kern/subr_prf.c",
                                                 "__stack_chk_guard  sys/kern/stack_protector.c",
                                                 "__stack_chk_fail  sys/kern/stack_protector.c"])

    def malformed():
        return write_kpi(b.path("kpi-malformed.txt"), ["printf"])

    sysctl = ["--require-set", "sysctl_set"]
    r14 = ["--release", "14", "--kpi", KPI]
    r15 = ["--release", "15", "--kpi", KPI]
    out = [
        ("good module (14)", good, r14 + sysctl, set()),
        ("good module (15)", lambda: b.module("good15.ko", ["KMIN=1500000", "KMAX=1599999"]),
         r15 + sysctl, set()),
        ("good module with debug info (R_X86_64_32 in .debug_*: not applied by the kernel)",
         lambda: b.module("good_debug.ko", cflags=["-g"]), r14 + sysctl, set()),
        # elf-header
        ("ET_EXEC instead of ET_REL",
         lambda: b.patched("et_exec.ko", good(), set_half(0x10, 2)), r14, {"elf-header"}),
        ("OS/ABI SYSV instead of FreeBSD",
         lambda: b.patched("osabi.ko", good(), set_byte(7, 0)), r14, {"elf-header"}),
        ("EM_386 instead of EM_X86_64",
         lambda: b.patched("em386.ko", good(), set_half(0x12, 3)), r14, {"elf-header"}),
        ("ELFCLASS32", lambda: b.patched("class32.ko", good(), set_byte(4, 1)), r14, {"elf-header"}),
        ("big endian", lambda: b.patched("msb.ko", good(), set_byte(5, 2)), r14, {"elf-header"}),
        # symtab
        ("two symbol tables", lambda: b.patched("two_symtabs.ko", good(), second_symtab),
         r14, {"symtab"}),
        # relocations
        ("R_X86_64_32", lambda: b.with_asm("r32.ko", "bad_r32.S"), r14, {"relocations"}),
        ("R_X86_64_GOTPCREL", lambda: b.with_asm("gotpcrel.ko", "bad_gotpcrel.S",
                                                 ["-Wa,-mrelax-relocations=no"]),
         r14, {"relocations"}),
        ("R_X86_64_REX_GOTPCRELX", lambda: b.with_asm("rex_gotpcrelx.ko", "bad_gotpcrel.S"),
         r14, {"relocations"}),
        ("R_X86_64_GOTPCRELX", lambda: b.with_asm("gotpcrelx.ko", "bad_gotpcrelx.S"),
         r14, {"relocations"}),
        ("clang 14 stack protector for FreeBSD: __stack_chk_guard via the GOT",
         lambda: b.module("ssp.ko", cflags=["-fstack-protector-all"]),
         ["--release", "14", "--kpi", ssp_kpi()], {"relocations"}),
        ("R_X86_64_TPOFF32", lambda: b.with_asm("tpoff.ko", "bad_tpoff.S"), r14, {"relocations"}),
        # undefined-symbols / kpi-list
        ("import not in the KPI list", lambda: b.module("unlisted.ko", ["CALL_UNLISTED"]),
         r14, {"undefined-symbols"}),
        ("set bound without its set", lambda: b.with_asm("set_bound.ko", "bad_set_bound.S"),
         r14, {"undefined-symbols"}),
        ("common symbol", lambda: b.module("common.ko", ["COMMON_SYMBOL"], cflags=["-fcommon"]),
         r14, {"undefined-symbols"}),
        ("KPI entry not imported", good, lambda: ["--release", "14", "--kpi", extra()],
         {"kpi-list"}),
        ("KPI line without source file", good,
         lambda: ["--release", "14", "--kpi", malformed()], {"kpi-list", "undefined-symbols"}),
        # modmetadata
        ("no modmetadata", lambda: b.module("no_modmeta.ko", ["NO_MODMETA"]), r14, {"modmetadata"}),
        ("wrong module name", lambda: b.module("wrong_name.ko", ['MODNAME="kqemu2"']),
         r14, {"modmetadata"}),
        ("MODULE_VERSION 2", lambda: b.module("version2.ko", ["MODVERSION=2"]), r14, {"modmetadata"}),
        ("no kernel dependency", lambda: b.module("no_depend.ko", ["NO_DEPEND"]),
         r14, {"modmetadata"}),
        ("kernel minimum from 13", lambda: b.module("kmin13.ko", ["KMIN=1300139"]),
         r14, {"modmetadata"}),
        ("kernel maximum tied (not MAXVER)", lambda: b.module("kmax_tied.ko", ["KMAX=1400097"]),
         r14, {"modmetadata"}),
        ("14 module checked as 15", good, r15, {"modmetadata"}),
        # linker-sets
        ("no set_sysinit_set", lambda: b.module("no_sysinit.ko", ["NO_SYSINIT"]),
         r14, {"linker-sets"}),
        ("no set_sysuninit_set", lambda: b.module("no_sysuninit.ko", ["NO_SYSUNINIT"]),
         r14, {"linker-sets"}),
        ("no set_sysctl_set", lambda: b.module("no_sysctl.ko", ["NO_SYSCTL"]),
         r14 + sysctl, {"linker-sets"}),
        # llvm-sections
        (".llvmbc section", lambda: b.add_section("llvmbc.ko", good(), ".llvmbc"),
         r14, {"llvm-sections"}),
        (".llvmcmd section", lambda: b.add_section("llvmcmd.ko", good(), ".llvmcmd"),
         r14, {"llvm-sections"}),
    ]
    # fpu-instructions
    for kind in ("sse", "x87", "mmx", "avx", "vzeroupper", "ldmxcsr"):
        out.append((f"{kind} instruction",
                    lambda kind=kind: b.with_asm(f"{kind}.ko", f"bad_{kind}.S"),
                    r14, {"fpu-instructions"}))
    return out


# How check_kld.fpu_use() must classify llvm-objdump's AT&T text: True means
# flagged as touching FPU/SIMD state.
CLASSIFY = [
    ("fldz", True), ("fstpt (%rax)", True), ("fnstcw -2(%rbp)", True), ("fwait", True),
    ("wait", True), ("emms", True), ("stmxcsr (%rdi)", True), ("vzeroall", True),
    ("movq %xmm0, %rax", True), ("cvtsi2sd %rax, %xmm15", True), ("movd %mm7, %eax", True),
    ("vaddps %zmm1, %zmm2, %zmm3", True), ("kmovw %k1, %eax", True),
    ("fadd %st(1), %st", True), ("lock xaddq %rax, (%rdi)", False),
    ("fxsave64 (%rdi)", False), ("fxrstor (%rdi)", False), ("xsaveopt64 (%rdi)", False),
    ("xrstors (%rdi)", False), ("mfence", False), ("lfence", False), ("sfence", False),
    ("movq %fs:0, %rax", False), ("fs movq (%rax), %rax", False),
    ("callq 0x0 <fmod>", False), ("jmp 0x10 <xmm_copy+0x4>", False),
    ("movq 0x0(%rip), %rax  # 0x7 <mm0_table>", False), ("rep stosq %rax, %es:(%rdi)", False),
]


def classify_cases():
    sys.dont_write_bytecode = True  # no __pycache__ in the source tree
    sys.path.insert(0, HERE)
    import check_kld  # pylint: disable=import-outside-toplevel
    for insn, flagged in CLASSIFY:
        why = check_kld.fpu_use(insn)
        ok = (why is not None) == flagged
        verdict = f"flagged ({why})" if why else "not flagged"
        yield ok, f"classify `{insn}`: {verdict}" + ("" if ok else
                                                      f", want {'flagged' if flagged else 'not flagged'}")


def failed_checks(output):
    """The check names of the `<file>: FAIL <check>: ...` lines."""
    out = set()
    for line in output.splitlines():
        head, sep, rest = line.partition(": FAIL ")
        if sep:
            out.add(rest.split(":", 1)[0])
    return out


def main(argv):
    parser = argparse.ArgumentParser(description="check_kld.py self-test")
    parser.add_argument("--out", default=os.path.join(TOP, "build", "kld-selftest"))
    parser.add_argument("-v", "--verbose", action="store_true", help="show checker output")
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    builder = Builder(args.out)
    passed = failed = 0
    for name, build, check_args, expected in cases(builder):
        try:
            obj = build()
            if callable(check_args):
                check_args = check_args()
        except subprocess.CalledProcessError as e:
            failed += 1
            print(f"FAIL {name}: building the object: {' '.join(e.cmd)} exited {e.returncode}")
            continue
        proc = subprocess.run([sys.executable, CHECKER, *check_args, obj],
                              capture_output=True, text=True, check=False)
        got = failed_checks(proc.stdout)
        want_rc = 1 if expected else 0
        ok = proc.returncode == want_rc and got == expected
        if ok:
            passed += 1
            reason = f"rejected by {', '.join(sorted(got))}" if got else "accepted"
            detail = next((line.strip() for line in proc.stdout.splitlines()
                           if line.startswith("    ")), "")
            print(f"PASS {name}: {reason}" + (f" ({detail})" if detail else ""))
        else:
            failed += 1
            print(f"FAIL {name}: exit {proc.returncode} (want {want_rc}), failed checks "
                  f"{sorted(got) or 'none'} (want {sorted(expected) or 'none'})")
        if args.verbose or not ok:
            sys.stdout.write(proc.stdout + proc.stderr)
    for ok, line in classify_cases():
        print(("PASS " if ok else "FAIL ") + line)
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
