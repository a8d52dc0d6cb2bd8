#!/usr/bin/env python3
"""Static checks a FreeBSD amd64 kld must pass before kldload would take it.

We cannot kldload on the Linux build host, so this script reads the .ko the
way FreeBSD's kernel linker (sys/kern/link_elf_obj.c) and the module system
(sys/kern/kern_linker.c, sys/sys/module.h) will, and fails on anything they
would reject or mis-handle:

  elf-header        ELF64, little endian, ET_REL, EM_X86_64, OS/ABI FreeBSD
  symtab            exactly one SHT_SYMTAB ("file has no valid symbol table")
  relocations       only the types sys/amd64/amd64/elf_machdep.c applies
  undefined-symbols every import is in the release's KPI list, and the list
                    names nothing the module does not import
  modmetadata       module `kqemu`, version `kqemu` = 1, `kernel` dependency
                    for the release (DECLARE_MODULE / MODULE_VERSION)
  linker-sets       set_sysinit_set, set_sysuninit_set (+ --require-set ...)
  fpu-instructions  no x87/MMX/SSE/AVX instruction in executable sections
  llvm-sections     no .llvmbc / .llvmcmd (rustc's embedded bitcode)

Usage: check_kld.py --release 14 --kpi kpi-14.txt [--require-set sysctl_set]
                    [--module kqemu] [--version 1] file.ko
Exit status: 0 all checks passed, 1 a check failed, 2 bad usage.
Only the Python standard library and llvm-objdump are needed.
"""

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys

# ELF constants (System V gABI; amd64 psABI for the R_X86_64_* numbers).
ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ELFOSABI_FREEBSD = 9
ET_REL = 1
ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
EM_X86_64 = 62
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_RELA = 4
SHT_NOBITS = 8
SHT_REL = 9
SHF_ALLOC = 0x2
SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
SHN_COMMON = 0xFFF2
STB_LOCAL = 0
STT_SECTION = 3

R_X86_64_NAMES = {
    0: "R_X86_64_NONE", 1: "R_X86_64_64", 2: "R_X86_64_PC32",
    3: "R_X86_64_GOT32", 4: "R_X86_64_PLT32", 5: "R_X86_64_COPY",
    6: "R_X86_64_GLOB_DAT", 7: "R_X86_64_JUMP_SLOT", 8: "R_X86_64_RELATIVE",
    9: "R_X86_64_GOTPCREL", 10: "R_X86_64_32", 11: "R_X86_64_32S",
    12: "R_X86_64_16", 13: "R_X86_64_PC16", 14: "R_X86_64_8",
    15: "R_X86_64_PC8", 16: "R_X86_64_DTPMOD64", 17: "R_X86_64_DTPOFF64",
    18: "R_X86_64_TPOFF64", 19: "R_X86_64_TLSGD", 20: "R_X86_64_TLSLD",
    21: "R_X86_64_DTPOFF32", 22: "R_X86_64_GOTTPOFF", 23: "R_X86_64_TPOFF32",
    24: "R_X86_64_PC64", 25: "R_X86_64_GOTOFF64", 26: "R_X86_64_GOTPC32",
    27: "R_X86_64_GOT64", 28: "R_X86_64_GOTPCREL64", 29: "R_X86_64_GOTPC64",
    30: "R_X86_64_GOTPLT64", 31: "R_X86_64_PLTOFF64", 32: "R_X86_64_SIZE32",
    33: "R_X86_64_SIZE64", 34: "R_X86_64_GOTPC32_TLSDESC",
    35: "R_X86_64_TLSDESC_CALL", 36: "R_X86_64_TLSDESC",
    37: "R_X86_64_IRELATIVE", 38: "R_X86_64_RELATIVE64",
    41: "R_X86_64_GOTPCRELX", 42: "R_X86_64_REX_GOTPCRELX",
}
R_X86_64_64 = 1
# The cases of elf_reloc_internal() in sys/amd64/amd64/elf_machdep.c (14.x
# and 15.x alike); every other type ends in "kldload: unexpected relocation
# type" (R_X86_64_COPY in "unexpected R_COPY relocation").
ACCEPTED_RELOCATIONS = frozenset(
    num for num, name in R_X86_64_NAMES.items()
    if name[len("R_X86_64_"):] in ("NONE", "64", "PC32", "PLT32", "32S", "GLOB_DAT",
                                   "JUMP_SLOT", "RELATIVE", "IRELATIVE"))

# sys/sys/module.h
MDT_STRUCT_VERSION = 1
MDT_DEPEND = 1
MDT_MODULE = 2
MDT_VERSION = 3
MDT_NAMES = {1: "MDT_DEPEND", 2: "MDT_MODULE", 3: "MDT_VERSION", 4: "MDT_PNP_INFO"}
POINTER_SIZE = 8

# Linker sets whose bounds a kld may import from the kernel without having
# the set itself: <sys/pcpu.h> makes __start_set_pcpu/__stop_set_pcpu global
# (__GLOBL) in every file that includes it, and the kernel's own DPCPU set
# answers them.
KERNEL_LINKER_SETS = frozenset(("set_pcpu",))

# Linker sets every DECLARE_MODULE/SYSINIT kld has (sys/sys/kernel.h).
REQUIRED_SETS = ("set_modmetadata_set", "set_sysinit_set", "set_sysuninit_set")

# FPU/SIMD state the kernel does not save for kernel code: an instruction
# that touches it outside fpu_kern_enter() corrupts the interrupted user
# thread's registers or panics ("Unregistered use of FPU in kernel").
# AT&T register names: x87 %st, MMX %mm0-7, SSE/AVX %xmm/%ymm/%zmm,
# AVX-512 mask %k0-7, AMX tiles %tmm.
FPU_REGISTER = re.compile(r"%(?:[xyz]mm\d+|mm\d\b|st\b|st\(\d\)|k[0-7]\b|tmm\d)")
# Mnemonics that use that state with no such register operand.
FPU_MNEMONICS = frozenset((
    "ldmxcsr", "stmxcsr", "vldmxcsr", "vstmxcsr", "emms", "femms",
    "vzeroupper", "vzeroall", "wait", "ldtilecfg", "sttilecfg", "tilerelease",
))
# Allowed on purpose: saving and restoring the whole FPU/SIMD state is what
# the monitor does to run a guest on the thread's user FPU state (bhyve's
# pattern, FREEBSD.md "CPU").  They move the state, they do not compute on it.
FPU_STATE_SAVE_RESTORE = re.compile(
    r"^(?:fxsave|fxrstor|xsave|xsaveopt|xsavec|xsaves|xrstor|xrstors)(?:64|q)?$")
# Instruction prefixes llvm-objdump prints as separate words.
PREFIXES = frozenset((
    "lock", "rep", "repe", "repz", "repne", "repnz", "rex", "rex64", "data16",
    "data32", "addr16", "addr32", "cs", "ds", "es", "fs", "gs", "ss", "notrack",
    "xacquire", "xrelease", "bnd", "{vex}", "{vex2}", "{vex3}", "{evex}",
))

CHECKS = ("elf-header", "symtab", "relocations", "undefined-symbols", "kpi-list",
          "modmetadata", "linker-sets", "fpu-instructions", "llvm-sections")
MAX_ITEMS = 25  # problems listed per check before "... and N more"


class ElfError(Exception):
    """The file cannot be read as the ELF it claims to be."""


class Section:
    def __init__(self, index, fields):
        (self.name_off, self.type, self.flags, self.addr, self.offset,
         self.size, self.link, self.info, self.addralign, self.entsize) = fields
        self.index = index
        self.name = ""


class Symbol:
    def __init__(self, index, name, info, shndx, value, size):
        self.index = index
        self.name = name
        self.bind = info >> 4
        self.type = info & 0xF
        self.shndx = shndx
        self.value = value
        self.size = size


class Relocation:
    def __init__(self, offset, rtype, sym, addend):
        self.offset = offset
        self.type = rtype
        self.sym = sym
        self.addend = addend


class Elf:
    """An ELF64 little-endian relocatable object, read into memory."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.raw = f.read()
        if len(self.raw) < 64 or self.raw[:4] != ELFMAG:
            raise ElfError("not an ELF file (bad magic)")
        self.ident = self.raw[:16]
        if self.ident[4] != ELFCLASS64:
            raise ElfError(f"EI_CLASS {self.ident[4]}, expected ELFCLASS64 (2)")
        if self.ident[5] != ELFDATA2LSB:
            raise ElfError(f"EI_DATA {self.ident[5]}, expected ELFDATA2LSB (1)")
        (self.type, self.machine, self.version, _entry, _phoff, self.shoff,
         _flags, _ehsize, _phentsize, _phnum, self.shentsize, self.shnum,
         self.shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", self.raw, 16)
        if self.shoff == 0 or self.shnum == 0:
            raise ElfError("no section header table")
        if self.shentsize != 64:
            raise ElfError(f"e_shentsize {self.shentsize}, expected 64")
        if self.shoff + self.shnum * 64 > len(self.raw):
            raise ElfError("section header table runs past the end of the file")
        self.sections = []
        for i in range(self.shnum):
            fields = struct.unpack_from("<IIQQQQIIQQ", self.raw, self.shoff + 64 * i)
            sec = Section(i, fields)
            if sec.type != SHT_NOBITS and sec.offset + sec.size > len(self.raw):
                raise ElfError(f"section {i} runs past the end of the file")
            self.sections.append(sec)
        if not 0 < self.shstrndx < self.shnum:
            raise ElfError("no section name string table")
        names = self.sections[self.shstrndx]
        for sec in self.sections:
            sec.name = self._cstring(names, sec.name_off)
        self.symtabs = [s for s in self.sections if s.type == SHT_SYMTAB]
        self.symbols = self._read_symbols(self.symtabs[0]) if self.symtabs else []
        self.relocations = {}  # target section index -> {offset: Relocation}
        self.reloc_sections = [s for s in self.sections if s.type in (SHT_REL, SHT_RELA)]

    def data(self, sec):
        if sec.type == SHT_NOBITS:
            return bytes(sec.size)
        return self.raw[sec.offset:sec.offset + sec.size]

    def _cstring(self, sec, off):
        data = self.data(sec)
        if off >= len(data):
            raise ElfError(f"string offset {off:#x} outside {sec.name or sec.index}")
        end = data.find(b"\0", off)
        if end < 0:
            raise ElfError(f"unterminated string in section {sec.index}")
        return data[off:end].decode("utf-8", "replace")

    def _read_symbols(self, symtab):
        if not 0 < symtab.link < self.shnum or self.sections[symtab.link].type != SHT_STRTAB:
            raise ElfError("symbol table's sh_link is not a string table")
        strtab = self.sections[symtab.link]
        data = self.data(symtab)
        out = []
        for i in range(len(data) // 24):
            name, info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", data, 24 * i)
            out.append(Symbol(i, self._cstring(strtab, name), info, shndx, value, size))
        return out

    def relocs(self, rsec):
        """Relocation entries of one SHT_REL/SHT_RELA section."""
        data = self.data(rsec)
        out = []
        if rsec.type == SHT_RELA:
            for i in range(len(data) // 24):
                off, info, addend = struct.unpack_from("<QQq", data, 24 * i)
                out.append(Relocation(off, info & 0xFFFFFFFF, info >> 32, addend))
        else:
            target = self.sections[rsec.info]
            for i in range(len(data) // 16):
                off, info = struct.unpack_from("<QQ", data, 16 * i)
                rtype = info & 0xFFFFFFFF
                # REL keeps the addend in the relocated field.
                width = 8 if rtype == R_X86_64_64 else 4
                field = self.data(target)[off:off + width].ljust(width, b"\0")
                addend = int.from_bytes(field, "little", signed=True)
                out.append(Relocation(off, rtype, info >> 32, addend))
        return out

    def relocations_for(self, secidx):
        """{offset: Relocation} for the relocations applied to one section."""
        if secidx not in self.relocations:
            table = {}
            for rsec in self.reloc_sections:
                if rsec.info == secidx:
                    for rel in self.relocs(rsec):
                        table[rel.offset] = rel
            self.relocations[secidx] = table
        return self.relocations[secidx]

    def section_named(self, name):
        for sec in self.sections:
            if sec.name == name:
                return sec
        return None

    def symbol_desc(self, idx):
        if idx >= len(self.symbols):
            return f"symbol #{idx} (out of range)"
        sym = self.symbols[idx]
        if sym.type == STT_SECTION and sym.shndx < len(self.sections):
            return self.sections[sym.shndx].name
        return sym.name or f"symbol #{idx}"


class Pointer:
    """Where a pointer stored in the object points: (section, offset)."""

    def __init__(self, sec, offset):
        self.sec = sec
        self.offset = offset


def read_pointer(elf, sec, off):
    """Follow the pointer stored at sec+off as the kernel linker would, by
    applying that word's relocation.  None is a NULL pointer."""
    rel = elf.relocations_for(sec.index).get(off)
    if rel is None:
        raw = elf.data(sec)[off:off + POINTER_SIZE]
        if len(raw) < POINTER_SIZE:
            raise ElfError(f"pointer at {sec.name}+{off:#x} outside the section")
        if int.from_bytes(raw, "little") == 0:
            return None
        raise ElfError(f"pointer at {sec.name}+{off:#x} is an absolute address "
                       "with no relocation")
    if rel.type != R_X86_64_64:
        raise ElfError(f"pointer at {sec.name}+{off:#x} has relocation "
                       f"{R_X86_64_NAMES.get(rel.type, rel.type)}, expected R_X86_64_64")
    if rel.sym >= len(elf.symbols):
        raise ElfError(f"pointer at {sec.name}+{off:#x}: bad symbol index {rel.sym}")
    sym = elf.symbols[rel.sym]
    if sym.shndx == SHN_UNDEF or sym.shndx >= SHN_LORESERVE:
        raise ElfError(f"pointer at {sec.name}+{off:#x} refers to `{sym.name}`, "
                       "which is not defined in the module")
    return Pointer(elf.sections[sym.shndx], sym.value + rel.addend)


def read_int32(elf, ptr, delta=0):
    data = elf.data(ptr.sec)
    off = ptr.offset + delta
    if off < 0 or off + 4 > len(data):
        raise ElfError(f"int at {ptr.sec.name}+{off:#x} outside the section")
    return struct.unpack_from("<i", data, off)[0]


def read_cstring(elf, ptr):
    if ptr is None:
        return None
    data = elf.data(ptr.sec)
    end = data.find(b"\0", ptr.offset)
    if ptr.offset >= len(data) or end < 0:
        raise ElfError(f"string at {ptr.sec.name}+{ptr.offset:#x} is not NUL-terminated")
    return data[ptr.offset:end].decode("utf-8", "replace")


def set_entries(elf, sec):
    """The pointers of a linker set, in order."""
    if sec.size % POINTER_SIZE:
        raise ElfError(f"{sec.name} size {sec.size} is not a multiple of {POINTER_SIZE}")
    out = []
    for off in range(0, sec.size, POINTER_SIZE):
        ptr = read_pointer(elf, sec, off)
        if ptr is None:
            raise ElfError(f"{sec.name} entry {off // POINTER_SIZE} is NULL")
        out.append(ptr)
    return out


# ---------------------------------------------------------------- checks

def check_elf_header(elf, _args):
    problems = []
    if elf.ident[6] != EV_CURRENT or elf.version != EV_CURRENT:
        problems.append(f"ELF version {elf.ident[6]}/{elf.version}, expected 1 (EV_CURRENT)")
    if elf.ident[7] != ELFOSABI_FREEBSD:
        problems.append(f"OS/ABI {elf.ident[7]}, expected {ELFOSABI_FREEBSD} (ELFOSABI_FREEBSD)")
    if elf.type != ET_REL:
        problems.append(f"e_type {ET_NAMES.get(elf.type, elf.type)}, expected ET_REL: "
                        "an amd64 kld is a relocatable object (ld -r)")
    if elf.machine != EM_X86_64:
        problems.append(f"e_machine {elf.machine}, expected {EM_X86_64} (EM_X86_64)")
    return problems


def check_symtab(elf, _args):
    # link_elf_obj.c: "file must have exactly one symbol table".
    if len(elf.symtabs) != 1:
        return [f"{len(elf.symtabs)} SHT_SYMTAB sections "
                f"({', '.join(s.name or str(s.index) for s in elf.symtabs)}), expected exactly 1"]
    return []


def check_relocations(elf, args):
    problems, seen = [], {}
    for rsec in elf.reloc_sections:
        if rsec.size == 0 or not 0 < rsec.info < elf.shnum:
            continue
        target = elf.sections[rsec.info]
        # link_elf_obj.c ignores relocation tables of unallocated sections
        # (debug info); the kernel applies all the others.
        if not target.flags & SHF_ALLOC:
            continue
        for rel in elf.relocs(rsec):
            name = R_X86_64_NAMES.get(rel.type, f"type {rel.type}")
            seen[name] = seen.get(name, 0) + 1
            if rel.type not in ACCEPTED_RELOCATIONS:
                problems.append(f"{name} at {target.name}+{rel.offset:#x} "
                                f"(symbol {elf.symbol_desc(rel.sym)}) in {rsec.name}")
    args.notes["relocations"] = ", ".join(f"{n[len('R_X86_64_'):]} {c}"
                                          for n, c in sorted(seen.items()))
    return problems


def parse_kpi(path):
    """{symbol: defining source file} from a KPI list, and its problems."""
    kpi, problems = {}, []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        return kpi, [f"cannot read {path}: {e.strerror}"]
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].split()
        if not text:
            continue
        if (len(text) != 2 or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text[0])
                or not re.fullmatch(r"sys/[A-Za-z0-9_./-]+\.[cSs]", text[1])):
            problems.append(f"{os.path.basename(path)}:{n}: expected `symbol  sys/<file>.c`, "
                            f"got `{line.strip()}`")
            continue
        if text[0] in kpi:
            problems.append(f"{os.path.basename(path)}:{n}: `{text[0]}` listed twice")
        kpi[text[0]] = text[1]
    return kpi, problems


def linker_set_bound(name):
    """The set a __start_set_X/__stop_set_X symbol bounds, or None."""
    for prefix in ("__start_", "__stop_"):
        if name.startswith(prefix + "set_"):
            return name[len(prefix):]
    return None


def imported_symbols(elf):
    return [s for s in elf.symbols[1:] if s.shndx == SHN_UNDEF]


def check_undefined_symbols(elf, args):
    problems = []
    kpi = args.kpi_table
    bounds = 0
    for sym in imported_symbols(elf):
        if not sym.name:
            problems.append(f"undefined symbol #{sym.index} has no name")
        elif sym.bind == STB_LOCAL:
            problems.append(f"`{sym.name}` is a local undefined symbol")
        elif linker_set_bound(sym.name):
            # link_elf_fix_link_set() binds these to the module's own set
            # section; without that section they would resolve to the
            # kernel's set of the same name.
            bound = linker_set_bound(sym.name)
            bounds += 1
            if elf.section_named(bound) is None and bound not in KERNEL_LINKER_SETS:
                problems.append(f"`{sym.name}` bounds linker set `{bound}`, "
                                "which the module lacks")
        elif sym.name not in kpi:
            problems.append(f"`{sym.name}` is imported but not in {args.kpi}")
    for sym in elf.symbols[1:]:
        # elf_obj_lookup() takes a defined symbol's st_value as its address:
        # for SHN_COMMON that is the alignment, not storage.
        if sym.shndx == SHN_COMMON:
            problems.append(f"`{sym.name}` is a common symbol (build with -fno-common)")
    nimports = len(imported_symbols(elf))
    args.notes["undefined-symbols"] = (f"{nimports - bounds} KPI imports, "
                                       f"{bounds} linker-set bounds")
    return problems


def check_kpi_list(elf, args):
    # The list documents exactly what the module imports: an entry the module
    # does not use would hide a mistake in the list.
    problems = list(args.kpi_problems)
    imported = {s.name for s in imported_symbols(elf)}
    for name in sorted(set(args.kpi_table) - imported):
        problems.append(f"`{name}` is listed in {args.kpi} but the module does not import it")
    return problems


def check_modmetadata(elf, args):
    sec = elf.section_named("set_modmetadata_set")
    if sec is None:
        return ["no set_modmetadata_set section (DECLARE_MODULE/MODULE_VERSION missing)"]
    problems, modules, versions, kernel_deps = [], [], [], []
    try:
        for ptr in set_entries(elf, sec):
            md_version = read_int32(elf, ptr, 0)
            md_type = read_int32(elf, ptr, 4)
            data = read_pointer(elf, ptr.sec, ptr.offset + 8)
            cval = read_cstring(elf, read_pointer(elf, ptr.sec, ptr.offset + 16))
            where = f"{MDT_NAMES.get(md_type, md_type)} `{cval}`"
            if md_version != MDT_STRUCT_VERSION:
                problems.append(f"{where}: md_version {md_version}, expected {MDT_STRUCT_VERSION}")
            if md_type == MDT_MODULE:
                # md_data is the moduledata_t: {const char *name; evhand; priv}
                if data is None:
                    problems.append(f"{where}: md_data is NULL")
                    continue
                name = read_cstring(elf, read_pointer(elf, data.sec, data.offset))
                evhand = read_pointer(elf, data.sec, data.offset + 8)
                modules.append((cval, name, evhand))
            elif md_type == MDT_VERSION:
                if data is None:
                    problems.append(f"{where}: md_data is NULL")
                    continue
                versions.append((cval, read_int32(elf, data)))
            elif md_type == MDT_DEPEND and cval == "kernel":
                if data is None:
                    problems.append(f"{where}: md_data is NULL")
                    continue
                kernel_deps.append(tuple(read_int32(elf, data, 4 * i) for i in range(3)))
    except ElfError as e:
        return problems + [str(e)]

    if len(modules) != 1:
        problems.append(f"{len(modules)} MDT_MODULE entries "
                        f"({', '.join(repr(m[0]) for m in modules)}), expected 1")
    for cval, name, evhand in modules:
        if cval != args.module or name != args.module:
            problems.append(f"module named `{cval}` (moduledata name `{name}`), "
                            f"expected `{args.module}`")
        if evhand is None:
            problems.append(f"module `{cval}` has no event handler")
    mine = [v for c, v in versions if c == args.module]
    if mine != [args.version]:
        problems.append(f"MDT_VERSION `{args.module}` = {mine or 'missing'}, "
                        f"expected [{args.version}] (MODULE_VERSION({args.module}, {args.version}))")
    for cval, _ in versions:
        if cval != args.module:
            problems.append(f"MDT_VERSION for another module `{cval}`")
    # DECLARE_MODULE: MODULE_DEPEND(name, kernel, __FreeBSD_version,
    # __FreeBSD_version, MODULE_KERNEL_MAXVER = roundup(version, 100000) - 1).
    low = args.release * 100000
    maxver = low + 99999
    if len(kernel_deps) != 1:
        problems.append(f"{len(kernel_deps)} `kernel` dependencies, expected 1")
    for vmin, vpref, vmax in kernel_deps:
        if not low <= vmin <= maxver:
            problems.append(f"kernel dependency minimum {vmin} is not a FreeBSD "
                            f"{args.release}.x version ({low}..{maxver})")
        if not vmin <= vpref <= vmax:
            problems.append(f"kernel dependency preferred {vpref} outside {vmin}..{vmax}")
        if vmax != maxver:
            problems.append(f"kernel dependency maximum {vmax}, expected {maxver} "
                            "(MODULE_KERNEL_MAXVER)")
        args.notes["modmetadata"] = (f"module {args.module}, version {args.version}, "
                                     f"kernel {vmin}..{vmax}")
    return problems


def check_linker_sets(elf, args):
    problems, counts = [], []
    for name in REQUIRED_SETS[1:] + tuple(f"set_{s}" for s in args.require_set):
        sec = elf.section_named(name)
        if sec is None:
            problems.append(f"no {name} section")
            continue
        if sec.size == 0:
            problems.append(f"{name} is empty")
            continue
        try:
            counts.append(f"{name} {len(set_entries(elf, sec))}")
        except ElfError as e:
            problems.append(str(e))
    args.notes["linker-sets"] = ", ".join(counts)
    return problems


def find_objdump():
    for name in (os.environ.get("LLVM_OBJDUMP"), "llvm-objdump", "llvm-objdump-14"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def fpu_use(insn):
    """Why a disassembled instruction touches FPU/SIMD state, or None."""
    text = re.sub(r"<[^>]*>", "", insn.split("#", 1)[0]).strip()
    words = text.split(None, 1)
    while words and words[0] in PREFIXES:
        words = words[1].split(None, 1) if len(words) > 1 else []
    if not words:
        return None
    mnemonic = words[0]
    operands = words[1] if len(words) > 1 else ""
    if FPU_STATE_SAVE_RESTORE.match(mnemonic):
        return None
    if mnemonic.startswith("f"):
        return "x87 instruction"
    if mnemonic in FPU_MNEMONICS:
        return "uses FPU/SIMD state"
    reg = FPU_REGISTER.search(operands)
    if reg:
        return f"uses {reg.group(0)}"
    return None


def check_fpu_instructions(elf, args):
    objdump = find_objdump()
    if objdump is None:
        return ["llvm-objdump not found (install Debian's llvm: make deps)"]
    proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", args.file],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return [f"llvm-objdump failed: {proc.stderr.strip()}"]
    problems = []
    section, function = "?", "?"
    count = saves = 0
    for line in proc.stdout.splitlines():
        m = re.match(r"Disassembly of section (.*):$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"[0-9a-f]+ <(.*)>:$", line)
        if m:
            function = m.group(1)
            continue
        m = re.match(r"\s*([0-9a-f]+):\s+(.*)$", line)
        if m:
            words = m.group(2).split()
            if not words:
                continue
            count += 1
            saves += bool(FPU_STATE_SAVE_RESTORE.match(words[0]))
            why = fpu_use(m.group(2))
            if why:
                insn = " ".join(m.group(2).split())
                problems.append(f"{section}+{int(m.group(1), 16):#x} in {function}: "
                                f"`{insn}` ({why})")
    if count == 0:
        problems.append("llvm-objdump disassembled no instruction")
    args.notes["fpu-instructions"] = (f"{count} instructions, {saves} allowed "
                                      "FPU state save/restore")
    return problems


def check_llvm_sections(elf, _args):
    return [f"section {s.name} present (strip it: llvm-objcopy --remove-section={s.name})"
            for s in elf.sections if s.name in (".llvmbc", ".llvmcmd")]


CHECK_FUNCS = {
    "elf-header": check_elf_header,
    "symtab": check_symtab,
    "relocations": check_relocations,
    "undefined-symbols": check_undefined_symbols,
    "kpi-list": check_kpi_list,
    "modmetadata": check_modmetadata,
    "linker-sets": check_linker_sets,
    "fpu-instructions": check_fpu_instructions,
    "llvm-sections": check_llvm_sections,
}


def summary(elf):
    """One line that says what was looked at, so a pass is not silent."""
    nrel = sum(len(elf.relocs(r)) for r in elf.reloc_sections
               if 0 < r.info < elf.shnum and elf.sections[r.info].flags & SHF_ALLOC)
    nundef = len(imported_symbols(elf))
    nexec = sum(1 for s in elf.sections if s.flags & 0x4)
    return (f"{len(elf.sections)} sections ({nexec} executable), {len(elf.symbols)} symbols "
            f"({nundef} undefined), {nrel} relocations applied by the kernel")


def run(args):
    """Check one file; print a line per check; return the failed check names."""
    label = args.file
    try:
        elf = Elf(args.file)
    except OSError as e:
        print(f"{label}: FAIL elf-header: cannot read: {e.strerror}")
        return ["elf-header"]
    except ElfError as e:
        print(f"{label}: FAIL elf-header: {e}")
        return ["elf-header"]
    args.kpi_table, args.kpi_problems = parse_kpi(args.kpi)
    args.notes = {}
    print(f"{label}: {summary(elf)}")
    failed = []
    for name in CHECKS:
        try:
            problems = CHECK_FUNCS[name](elf, args)
        except ElfError as e:
            problems = [str(e)]
        if problems:
            failed.append(name)
            print(f"{label}: FAIL {name}: {len(problems)} problem(s)")
            for p in problems[:MAX_ITEMS]:
                print(f"    {name}: {p}")
            if len(problems) > MAX_ITEMS:
                print(f"    {name}: ... and {len(problems) - MAX_ITEMS} more")
        else:
            note = args.notes.get(name)
            print(f"{label}: ok   {name}" + (f" ({note})" if note else ""))
    return failed


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", type=int, required=True,
                        help="FreeBSD major release the module is built for (14, 15)")
    parser.add_argument("--kpi", required=True, help="KPI list of that release")
    parser.add_argument("--module", default="kqemu", help="expected module name")
    parser.add_argument("--version", type=int, default=1, help="expected MODULE_VERSION")
    parser.add_argument("--require-set", action="append", default=[], metavar="NAME",
                        help="another linker set the module must have, e.g. sysctl_set")
    parser.add_argument("file", help="the .ko to check")
    args = parser.parse_args(argv)
    failed = run(args)
    if failed:
        print(f"{args.file}: FAILED {len(failed)} of {len(CHECKS)} checks: {' '.join(failed)}")
        return 1
    print(f"{args.file}: all {len(CHECKS)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
