//! Hostile states for [`validate_normal_mode`] (issue 6, validation: bad
//! input gets a clear answer, never a panic). Valid 32-bit, compatibility
//! mode and 64-bit process states are mutated by a seeded xorshift
//! generator, field by field, at the values where rules change (canonical
//! and 4 GiB edges, descriptor flag bits, EFLAGS/CR/EFER bits). Every
//! call must return; every accepted state must satisfy the normal-mode
//! rules, checked here from the raw bits, independently of the checks in
//! validate.rs and segments.rs.

use crate::abi::{seg, KqemuCpuState, KqemuSegmentCache};
use crate::monitor::mmu::{CpuPaging, Cr0, Cr4, Efer};
use crate::monitor::mutate::{mutate, Rng};
use crate::monitor::segments::{cache_of_load, CodeSize, CpuMode, Descriptor, Selector};
use crate::monitor::validate::{validate_normal_mode, Eflags, NormalModeEntry};

/// Host CPUs: a common one, the narrowest PAE one without 1 GiB pages,
/// the widest.
const CPUS: [CpuPaging; 3] = [
    CpuPaging {
        max_phys_addr_bits: 40,
        gib_pages: true,
    },
    CpuPaging {
        max_phys_addr_bits: 36,
        gib_pages: false,
    },
    CpuPaging {
        max_phys_addr_bits: 52,
        gib_pages: true,
    },
];
const STATES: u32 = 100_000;
const SEED: u64 = 0x6b71_656d_7566_7a31;

/// Descriptor high dwords (flags of the client's cache).
const CS32_FLAGS: u32 = 0x00cf_fb00;
const CS64_FLAGS: u32 = 0x00af_fb00;
const DS_FLAGS: u32 = 0x00cf_f300;

/// Descriptor attribute bits in the cache's flags (high dword of a
/// descriptor, SDM Vol. 3A 3.4.5).
const TYPE_WRITABLE_READABLE: u32 = 1 << 9;
const TYPE_CODE: u32 = 1 << 11;
const S_CODE_OR_DATA: u32 = 1 << 12;
const DPL_SHIFT: u32 = 13;
const PRESENT: u32 = 1 << 15;
const LONG: u32 = 1 << 21;
const DEFAULT_SIZE: u32 = 1 << 22;

fn state32() -> KqemuCpuState {
    let mut s = KqemuCpuState {
        eip: 0x0804_8000,
        eflags: (Eflags::FIXED1 | Eflags::IF).bits(),
        cr0: (Cr0::PE | Cr0::PG | Cr0::WP | Cr0::ET | Cr0::NE).bits(),
        cr3: 0x0123_4000,
        cr4: (Cr4::PAE | Cr4::PGE | Cr4::OSFXSR | Cr4::OSXMMEXCPT).bits(),
        a20_mask: u64::MAX,
        efer: (Efer::NXE | Efer::SCE).bits(),
        cpl: 3,
        user_only: 1,
        ..KqemuCpuState::default()
    };
    s.regs[4] = 0xbfff_f000;
    let load = |sel: u16, flags: u32| {
        cache_of_load(Selector(sel), Descriptor(u64::from(flags) << 32 | 0xffff))
    };
    s.segs[seg::CS] = load(0x73, CS32_FLAGS);
    for i in [seg::SS, seg::DS, seg::ES] {
        s.segs[i] = load(0x7b, DS_FLAGS);
    }
    s.segs[seg::GS] = KqemuSegmentCache {
        base: 0xb7f0_0000,
        ..load(0x33, DS_FLAGS)
    };
    s.gdt = KqemuSegmentCache {
        base: 0xc1a0_0000,
        limit: 0xff,
        ..KqemuSegmentCache::default()
    };
    s.idt = s.gdt;
    s
}

fn state64(compat: bool) -> KqemuCpuState {
    let mut s = state32();
    s.efer |= (Efer::LME | Efer::LMA).bits();
    if !compat {
        s.eip = 0x0000_5555_5555_4000;
        s.regs[4] = 0x7fff_ffff_e000;
        s.segs[seg::CS] = cache_of_load(
            Selector(0x33),
            Descriptor(u64::from(CS64_FLAGS) << 32 | 0xffff),
        );
        s.segs[seg::FS].base = 0x7fff_f7d8_b740;
    }
    s.gdt.base = 0xffff_fe00_0000_1000;
    s
}

fn canonical(a: u64) -> bool {
    let high = a >> 47;
    high == 0 || high == 0x1_ffff
}

/// The normal-mode rules for an accepted `s`, from the raw bits; `Err`
/// names the rule broken.
fn check_rules(s: &KqemuCpuState, e: &NormalModeEntry, cpu: CpuPaging) -> Result<(), &'static str> {
    let rule = |ok: bool, what: &'static str| if ok { Ok(()) } else { Err(what) };
    rule(s.user_only == 1, "user_only 1")?;
    rule(s.cpl == 3, "CPL 3")?;
    rule(
        s.cr0 & 1 != 0 && s.cr0 >> 32 == 0,
        "CR0.PE=1, CR0 63:32 clear",
    )?;
    let f = s.eflags;
    rule(f & 1 << 9 != 0, "IF=1")?;
    rule(f & 1 << 17 == 0, "VM=0")?;
    rule((f >> 12) & 3 != 3, "IOPL<3")?;
    rule(
        f & 2 != 0 && f >> 22 == 0 && f & (1 << 3 | 1 << 5 | 1 << 15) == 0,
        "EFLAGS reserved bits",
    )?;
    let lma = s.efer & 1 << 10 != 0;
    rule(!lma || s.efer & 1 << 8 != 0, "LMA needs LME")?;
    rule(
        !lma || (s.cr0 & 1 << 31 != 0 && s.cr4 & 1 << 5 != 0),
        "long mode needs PG and PAE",
    )?;
    rule(s.cr4 & 1 << 12 == 0, "no LA57")?;
    rule(!lma || s.cr4 & 1 << 22 == 0, "no PKE in 4-level paging")?;
    let paging = s.cr0 & 1 << 31 != 0;
    let cr3_ok = if lma {
        s.cr3 >> cpu.max_phys_addr_bits == 0
    } else {
        s.cr3 <= 0xffff_ffff
    };
    rule(
        !paging || cr3_ok,
        "CR3 within MAXPHYADDR (4-level), 32 bits (else)",
    )?;
    rule(
        s.a20_mask == u64::MAX || s.a20_mask == !(1 << 20),
        "a20 mask",
    )?;
    rule((e.mode == CpuMode::Long) == lma, "mode follows EFER.LMA")?;
    let addr_ok = |a: u64| if lma { canonical(a) } else { a <= 0xffff_ffff };

    let cs = &s.segs[seg::CS];
    let ss = &s.segs[seg::SS];
    let dpl = |c: &KqemuSegmentCache| (c.flags >> DPL_SHIFT) & 3;
    let present = |c: &KqemuSegmentCache| c.flags & PRESENT != 0;
    rule(
        cs.selector & !3 != 0 && cs.selector & 3 == 3,
        "CS selector non-null, RPL 3",
    )?;
    rule(
        present(cs) && cs.flags & (S_CODE_OR_DATA | TYPE_CODE) == S_CODE_OR_DATA | TYPE_CODE,
        "CS present code",
    )?;
    let conforming = cs.flags & 1 << 10 != 0;
    rule(conforming || dpl(cs) == 3, "CS DPL 3 unless conforming")?;
    let long_code = lma && cs.flags & LONG != 0;
    rule(
        !long_code || cs.flags & DEFAULT_SIZE == 0,
        "64-bit CS has D=0",
    )?;
    rule(
        ss.selector & !3 != 0 && ss.selector & 3 == 3,
        "SS selector non-null, RPL 3",
    )?;
    rule(
        present(ss)
            && ss.flags & (S_CODE_OR_DATA | TYPE_CODE | TYPE_WRITABLE_READABLE)
                == S_CODE_OR_DATA | TYPE_WRITABLE_READABLE,
        "SS present writable data",
    )?;
    rule(dpl(ss) == 3, "SS DPL 3")?;
    for (i, c) in s.segs.iter().enumerate() {
        let fs_gs = i == seg::FS || i == seg::GS;
        if c.selector & !3 == 0 {
            rule(
                !lma || !fs_gs || canonical(c.base),
                "long-mode FS/GS base canonical",
            )?;
            continue;
        }
        rule(
            present(c) && c.flags & S_CODE_OR_DATA != 0,
            "segment present, code or data",
        )?;
        let code = c.flags & TYPE_CODE != 0;
        if i != seg::CS {
            rule(
                !code || c.flags & TYPE_WRITABLE_READABLE != 0,
                "no execute-only code in a data register",
            )?;
            rule(code || dpl(c) == 3, "data segment DPL 3")?;
        }
        let base_ok = if lma && fs_gs {
            canonical(c.base)
        } else {
            c.base <= 0xffff_ffff
        };
        rule(base_ok, "segment base fits the mode")?;
        rule(
            e.segments[i].descriptor.is_some(),
            "a descriptor for a non-null selector",
        )?;
    }
    let eip_ok = if long_code {
        canonical(s.eip)
    } else {
        s.eip <= 0xffff_ffff
    };
    rule(eip_ok, "RIP fits the code size")?;
    rule(
        (e.code_size == CodeSize::Bits64) == long_code,
        "code size follows CS.L",
    )?;
    rule(
        addr_ok(s.gdt.base) && s.gdt.limit <= 0xffff,
        "GDT base and limit",
    )?;
    if s.ldt.selector & !3 != 0 {
        rule(
            present(&s.ldt) && addr_ok(s.ldt.base),
            "LDT present, base fits",
        )?;
    }
    if s.dr7 & 0xff != 0 {
        rule(
            s.dr7 & (1 << 13 | 1 << 11 | 1 << 12 | 0xffff_ffff_0000_0000) == 0,
            "DR7 no GD, reserved clear",
        )?;
        rule(
            [s.dr0, s.dr1, s.dr2, s.dr3].iter().all(|&a| addr_ok(a)),
            "breakpoint addresses fit",
        )?;
    }
    rule(s.dr6 >> 32 == 0, "DR6 63:32 clear")
}

#[test]
fn hostile_states_are_answered_and_accepted_ones_keep_the_rules() {
    let bases = [state32(), state64(true), state64(false)];
    for (b, cpu) in bases.iter().zip(CPUS) {
        let e = validate_normal_mode(b, cpu).expect("starting states are valid");
        assert_eq!(check_rules(b, &e, cpu), Ok(()));
    }
    let mut rng = Rng::seeded(SEED);
    let (mut accepted, mut refused) = (0u32, 0u32);
    for n in 0..STATES {
        let mut s = bases[(n % 3) as usize];
        for _ in 0..=rng.below(4) {
            mutate(&mut rng, &mut s);
        }
        let cpu = CPUS[(n / 3 % 3) as usize];
        let answer = validate_normal_mode(&s, cpu);
        // Nothing but the state decides (no hidden state between calls).
        assert_eq!(validate_normal_mode(&s, cpu), answer, "state {n}");
        match answer {
            Ok(e) => {
                accepted += 1;
                if let Err(rule) = check_rules(&s, &e, cpu) {
                    panic!(
                        "state {n} (seed {SEED:#x}, {cpu:?}) accepted against the rule \"{rule}\": {s:x?}"
                    );
                }
            }
            Err(_) => refused += 1,
        }
    }
    // The mutations must reach both sides, or the test shows nothing.
    assert!(
        accepted > STATES / 20 && refused > STATES / 4,
        "{accepted} accepted, {refused} refused"
    );
}
