//! The real Debian busybox-static binaries (amd64 and i386): ELF parsing, loading into
//! every paging format, and the initial stack the program starts with.

mod common;

use common::{busybox, Machine};
use kqemu_client::context::REG_RSP;
use kqemu_client::elf::{self, ElfError, PF_W, PF_X};
use kqemu_client::linux::DEFAULT_HWCAP;
use kqemu_client::loader::*;
use kqemu_client::{Arch, Errno, MemFs, PagingFormat};

#[test]
fn parses_both_busybox_binaries() {
    for (arch, base, phoff) in [(Arch::Amd64, 0x40_0000, 64), (Arch::I386, 0x0804_8000, 52)] {
        let file = busybox(arch);
        let image = elf::parse(&file).unwrap();
        assert_eq!(image.arch, arch);
        assert!(
            !image.position_independent,
            "Debian's busybox-static is not PIE"
        );
        assert!(image.has_tls, "glibc static programs carry PT_TLS");
        assert!(!image.stack_exec, "PT_GNU_STACK is RW");
        assert_eq!(image.segments.len(), 4);
        assert_eq!(image.segments[0].vaddr, base);
        assert_eq!(image.phdr_vaddr, Some(base + phoff));
        let text = image.segments.iter().find(|s| s.flags & PF_X != 0).unwrap();
        assert!((text.vaddr..text.vaddr + text.memsz).contains(&image.entry));
        let data = image.segments.iter().find(|s| s.flags & PF_W != 0).unwrap();
        assert!(data.memsz > data.filesz, "bss follows the data");
    }
}

#[test]
fn refuses_what_it_cannot_run() {
    let file = busybox(Arch::Amd64);
    assert_eq!(elf::parse(b"#!/bin/sh\n").err(), Some(ElfError::NotElf));
    assert_eq!(elf::parse(&file[..200]).err(), Some(ElfError::Truncated));
    let mut arm = file.clone();
    arm[18] = 183;
    assert_eq!(elf::parse(&arm).err(), Some(ElfError::UnsupportedMachine));
    let mut dynamic = file.clone();
    // Turn the first PT_NOTE (program header 4) into PT_INTERP.
    let ph4 = 64 + 4 * 56;
    assert_eq!(
        u32::from_le_bytes(dynamic[ph4..ph4 + 4].try_into().unwrap()),
        4
    );
    dynamic[ph4..ph4 + 4].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(elf::parse(&dynamic).err(), Some(ElfError::Dynamic));
    let mut object = file.clone();
    object[16] = 1;
    assert_eq!(elf::parse(&object).err(), Some(ElfError::NotExecutable));
    let mut huge = file;
    let ph0_filesz = 64 + 32;
    huge[ph0_filesz..ph0_filesz + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(elf::parse(&huge).is_err());
}

/// Reads a `long` of the program's ABI.
fn word(m: &mut Machine, va: u64) -> u64 {
    let size = if m.arch == Arch::Amd64 { 8 } else { 4 };
    let bytes = m.peek(1, va, size);
    let mut raw = [0u8; 8];
    raw[..size].copy_from_slice(&bytes);
    u64::from_le_bytes(raw)
}

fn cstring(m: &mut Machine, va: u64) -> String {
    let bytes: Vec<u8> = (0..)
        .map(|i| m.peek(1, va + i, 1)[0])
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn loads_busybox_with_sysv_stack_in_every_format() {
    let combos = [
        (Arch::Amd64, PagingFormat::Long4),
        (Arch::I386, PagingFormat::Legacy32),
        (Arch::I386, PagingFormat::Pae),
        (Arch::I386, PagingFormat::Long4),
    ];
    for (arch, paging) in combos {
        let file = busybox(arch);
        let image = elf::parse(&file).unwrap();
        let mut fs = MemFs::new();
        fs.add_file("/bin/busybox", &file, 0o755).unwrap();
        let mut m = Machine::new(arch, paging, 24, fs);
        let total = m.linux.free_frames();
        let argv = ["busybox", "sha256sum", "/data.bin"];
        let envp = ["PATH=/bin", "HOME=/"];
        assert_eq!(
            m.linux.spawn("/bin/busybox", &argv, &envp),
            Ok(1),
            "{arch:?} {paging:?}"
        );

        let run = m.linux.next().unwrap();
        assert_eq!((run.pid, run.arch), (1, arch));
        assert!(
            run.flush_tlb,
            "a new address space must not inherit stale translations"
        );
        assert!(run.cr3 >= 16 << 20 && run.cr3 < 40 << 20);
        assert_eq!(run.ctx.rip, image.entry);
        let sp = run.ctx.regs[REG_RSP];
        assert_eq!(sp % 16, 0);
        assert!(!m.linux.next().unwrap().flush_tlb);

        let w = if arch == Arch::Amd64 { 8 } else { 4 };
        assert_eq!(word(&mut m, sp), 3, "argc");
        for (i, expected) in argv.iter().enumerate() {
            let ptr = word(&mut m, sp + w * (1 + i as u64));
            assert_eq!(cstring(&mut m, ptr), *expected);
        }
        assert_eq!(word(&mut m, sp + w * 4), 0, "argv terminator");
        for (i, expected) in envp.iter().enumerate() {
            let ptr = word(&mut m, sp + w * (5 + i as u64));
            assert_eq!(cstring(&mut m, ptr), *expected);
        }
        assert_eq!(word(&mut m, sp + w * 7), 0, "envp terminator");
        let mut auxv = std::collections::BTreeMap::new();
        let mut at = sp + w * 8;
        loop {
            let (key, value) = (word(&mut m, at), word(&mut m, at + w));
            at += 2 * w;
            if key == AT_NULL {
                break;
            }
            assert!(auxv.insert(key, value).is_none(), "auxv key {key} twice");
        }
        assert_eq!(auxv[&AT_PAGESZ], 4096);
        assert_eq!(auxv[&AT_ENTRY], image.entry);
        assert_eq!(auxv[&AT_PHNUM], image.phnum);
        assert_eq!(auxv[&AT_PHENT], image.phentsize);
        assert_eq!(
            auxv[&AT_HWCAP],
            DEFAULT_HWCAP & if w == 4 { 0xffff_ffff } else { u64::MAX }
        );
        assert_eq!(auxv[&AT_CLKTCK], 100);
        for key in [AT_UID, AT_EUID, AT_GID, AT_EGID, AT_SECURE, AT_BASE] {
            assert_eq!(auxv[&key], 0, "auxv {key}");
        }
        let phdrs = m.peek(1, auxv[&AT_PHDR], (image.phnum * image.phentsize) as usize);
        let phoff = if arch == Arch::Amd64 { 64 } else { 52 };
        assert_eq!(
            phdrs[..],
            file[phoff..phoff + phdrs.len()],
            "AT_PHDR points at the headers"
        );
        let random = m.peek(1, auxv[&AT_RANDOM], 16);
        assert_eq!(
            random,
            (16..32).collect::<Vec<u8>>(),
            "AT_RANDOM comes from Console::random"
        );
        let platform = if arch == Arch::Amd64 {
            "x86_64"
        } else {
            "i686"
        };
        assert_eq!(cstring(&mut m, auxv[&AT_PLATFORM]), platform);
        assert_eq!(cstring(&mut m, auxv[&AT_EXECFN]), "/bin/busybox");

        for seg in &image.segments {
            let len = seg.filesz.min(8192) as usize;
            let off = seg.offset as usize;
            assert_eq!(
                m.peek(1, seg.vaddr, len),
                file[off..off + len],
                "segment at {:#x}",
                seg.vaddr
            );
            let tail = m.peek(1, seg.vaddr + seg.memsz - 16, 16);
            if seg.memsz > seg.filesz + 16 {
                assert_eq!(tail, [0; 16], "bss is zero");
            }
        }
        assert_eq!(
            m.linux.write_user(1, image.entry, b"\xcc"),
            Err(Errno::EFAULT),
            "text is read-only"
        );
        assert!(m.linux.free_frames() < total - 400);
    }
}
