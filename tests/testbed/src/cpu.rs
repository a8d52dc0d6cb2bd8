//! Descriptor tables (GDT with user segments, TLS slots and the TSS; the
//! IDT), SYSCALL MSRs, and the CPU features the testbed turns on.

use crate::trap::{self, KERNEL_CS, KERNEL_DS, USER_CS32, USER_DS, VECTOR_INT80};
use crate::x86::{self, cpuid};
use core::arch::asm;
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicBool, Ordering};

/// The GDT the kernel runs with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GdtLayout {
    /// The testbed's own (native mode): kernel code and data
    /// at 1..2; user segments at 3..5 in the order SYSRET expects from
    /// IA32_STAR[63:48] (SDM vol. 3, 5.8.8): 32-bit code, data, 64-bit
    /// code; the i386 TLS slots at 6..8, as on Linux i386
    /// (GDT_ENTRY_TLS_MIN = 6), so programs' `%gs` selectors match; the
    /// TSS at 9..10; the LDT of the running process (`modify_ldt`) at
    /// 11..12, where FreeBSD has GUSERLDT_SEL.
    Testbed,
    /// FreeBSD amd64's (monitor and kld modes; sys/x86/include/segments.h, !__i386__):
    /// GCODE_SEL 4, GDATA_SEL 5, GUCODE32_SEL 6, GUDATA_SEL 7, GUCODE_SEL 8,
    /// GPROC0_SEL 9 (two slots), GUSERLDT_SEL 11 (two, left null), NGDT 13.
    /// The module then meets what it meets on FreeBSD: the host CS has
    /// index 4, that of Linux's __USER32_CS 0x23, the CS of i386 guests.
    FreeBsd,
}

/// Where a layout puts each segment.
struct Selectors {
    kernel_cs: u16,
    kernel_ds: u16,
    user_cs32: u16,
    user_ds: u16,
    user_cs64: u16,
    tss: usize,
    tls_first: Option<usize>,
    /// The LDT descriptor's index (16 bytes), in the layout native mode
    /// runs processes with.
    ldt: Option<usize>,
    entries: usize,
}

/// [`GdtLayout::Testbed`] (the selectors of trap.rs).
const TESTBED_GDT: Selectors = Selectors {
    kernel_cs: KERNEL_CS,
    kernel_ds: KERNEL_DS,
    user_cs32: USER_CS32,
    user_ds: USER_DS,
    user_cs64: trap::USER_CS64,
    tss: 9,
    tls_first: Some(6),
    ldt: Some(11),
    entries: 13,
};

/// RPL 3 of a user selector.
const RPL_USER: u16 = 3;
/// [`GdtLayout::FreeBsd`]: GSEL(GCODE_SEL, SEL_KPL) and so on.
const FREEBSD_GDT: Selectors = Selectors {
    kernel_cs: 4 << 3,
    kernel_ds: 5 << 3,
    user_cs32: 6 << 3 | RPL_USER,
    user_ds: 7 << 3 | RPL_USER,
    user_cs64: 8 << 3 | RPL_USER,
    tss: 9,
    tls_first: None,
    ldt: None,
    entries: 13,
};

/// Room for the larger layout.
const GDT_ENTRIES: usize = 13;

/// The layout loaded: FreeBSD's once [`init_tables`] loaded it.
static FREEBSD_LAYOUT: AtomicBool = AtomicBool::new(false);

fn selectors() -> &'static Selectors {
    if FREEBSD_LAYOUT.load(Ordering::Relaxed) {
        &FREEBSD_GDT
    } else {
        &TESTBED_GDT
    }
}

const DESC_KERNEL_CODE64: u64 = 0x00af_9a00_0000_ffff;
const DESC_KERNEL_DATA: u64 = 0x00cf_9200_0000_ffff;
const DESC_USER_CODE32: u64 = 0x00cf_fa00_0000_ffff;
const DESC_USER_DATA: u64 = 0x00cf_f200_0000_ffff;
const DESC_USER_CODE64: u64 = 0x00af_fa00_0000_ffff;
/// Available 64-bit TSS, present (SDM vol. 3, 8.2.3).
const DESC_TSS_TYPE: u64 = 0x89;

/// IST slots (1-based, as in the gate's IST field).
const IST_NMI: u8 = 1;
const IST_DOUBLE_FAULT: u8 = 2;
const IST_MACHINE_CHECK: u8 = 3;
const IST_STACK_SIZE: usize = 8192;

/// Interrupt gate, present, DPL 0 or DPL 3 (SDM vol. 3, 6.14.1).
const GATE_INTERRUPT: u8 = 0x8e;
const GATE_INTERRUPT_USER: u8 = 0xee;
/// `int3` and `into` may be raised by ring 3 directly (Linux does the same:
/// they deliver SIGTRAP and SIGSEGV instead of #GP).
const VECTOR_BREAKPOINT: usize = 3;
const VECTOR_OVERFLOW: usize = 4;

#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iopb_offset: u16,
}

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

#[repr(C, align(16))]
struct IstStack([u8; IST_STACK_SIZE]);

static mut GDT: [u64; GDT_ENTRIES] = [0; GDT_ENTRIES];
/// The running process's LDT in native mode ([`set_ldt`]).
static mut LDT: [u64; kqemu_client::LDT_ENTRIES] = [0; kqemu_client::LDT_ENTRIES];
static mut TSS: Tss = Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iopb_offset: 0,
};
static mut IDT: [IdtEntry; 256] = [IdtEntry {
    offset_low: 0,
    selector: 0,
    ist: 0,
    attributes: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; 256];
static mut IST_STACKS: [IstStack; 3] = [const { IstStack([0; IST_STACK_SIZE]) }; 3];

#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

/// What CPUID reports and the testbed turned on.
#[derive(Clone, Copy, Default, Debug)]
pub struct Features {
    pub nx: bool,
    pub global_pages: bool,
    pub smep: bool,
    pub smap: bool,
    pub umip: bool,
    pub fsgsbase: bool,
    pub xsave: bool,
    /// XCR0 the testbed set (x87|SSE, plus AVX when present).
    pub xcr0: u64,
    /// Bytes of the XSAVE area for `xcr0`, or 512 for FXSAVE.
    pub fpu_area_size: usize,
    pub apic: bool,
    pub rdrand: bool,
    pub tsc_khz_cpuid: Option<u64>,
}

/// CPUID feature bits (SDM vol. 2A, CPUID).
const CPUID1_EDX_PGE: u32 = 1 << 13;
const CPUID1_EDX_APIC: u32 = 1 << 9;
const CPUID1_EDX_FXSR: u32 = 1 << 24;
const CPUID1_ECX_XSAVE: u32 = 1 << 26;
const CPUID1_ECX_AVX: u32 = 1 << 28;
const CPUID1_ECX_RDRAND: u32 = 1 << 30;
const CPUID7_EBX_FSGSBASE: u32 = 1 << 0;
const CPUID7_EBX_SMEP: u32 = 1 << 7;
const CPUID7_EBX_SMAP: u32 = 1 << 20;
const CPUID7_ECX_UMIP: u32 = 1 << 2;
const CPUID_EXT1_EDX_NX: u32 = 1 << 20;
/// XCR0 state components (SDM vol. 1, 13.1).
const XCR0_X87: u64 = 1 << 0;
const XCR0_SSE: u64 = 1 << 1;
const XCR0_AVX: u64 = 1 << 2;
const FXSAVE_AREA_SIZE: usize = 512;

pub fn detect_features() -> Features {
    let max_leaf = cpuid(0, 0).eax;
    let max_ext = cpuid(0x8000_0000, 0).eax;
    let l1 = cpuid(1, 0);
    let l7 = if max_leaf >= 7 {
        cpuid(7, 0)
    } else {
        cpuid(0, 0)
    };
    let (l7_ebx, l7_ecx) = if max_leaf >= 7 {
        (l7.ebx, l7.ecx)
    } else {
        (0, 0)
    };
    let ext1_edx = if max_ext >= 0x8000_0001 {
        cpuid(0x8000_0001, 0).edx
    } else {
        0
    };
    let xsave = l1.ecx & CPUID1_ECX_XSAVE != 0 && max_leaf >= 0xd;
    let mut xcr0 = XCR0_X87 | XCR0_SSE;
    if xsave && l1.ecx & CPUID1_ECX_AVX != 0 && u64::from(cpuid(0xd, 0).eax) & XCR0_AVX != 0 {
        xcr0 |= XCR0_AVX;
    }
    let tsc_khz_cpuid = (max_leaf >= 0x15)
        .then(|| cpuid(0x15, 0))
        .filter(|l| l.eax != 0 && l.ebx != 0 && l.ecx != 0)
        .map(|l| u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax) / 1000);
    Features {
        nx: ext1_edx & CPUID_EXT1_EDX_NX != 0,
        global_pages: l1.edx & CPUID1_EDX_PGE != 0,
        smep: l7_ebx & CPUID7_EBX_SMEP != 0,
        smap: l7_ebx & CPUID7_EBX_SMAP != 0,
        umip: l7_ecx & CPUID7_ECX_UMIP != 0,
        fsgsbase: l7_ebx & CPUID7_EBX_FSGSBASE != 0,
        xsave,
        xcr0,
        fpu_area_size: FXSAVE_AREA_SIZE,
        apic: l1.edx & CPUID1_EDX_APIC != 0,
        rdrand: l1.ecx & CPUID1_ECX_RDRAND != 0,
        tsc_khz_cpuid,
    }
}

/// Turns on what the testbed relies on (NX, SYSCALL, FXSR/XSAVE for the
/// guests' FPU state) and the protections it must live with (SMEP, SMAP,
/// UMIP, FSGSBASE), as the kqemu monitor will find them on a real host.
pub fn enable_features(features: &mut Features) {
    let mut efer = x86::rdmsr(x86::MSR_EFER) | x86::EFER_SCE;
    if features.nx {
        efer |= x86::EFER_NXE;
    }
    // SAFETY: SCE and (when CPUID has it) NXE only add capabilities; LME
    // and LMA are kept as they are.
    unsafe { x86::wrmsr(x86::MSR_EFER, efer) };

    let cr0 =
        (x86::read_cr0() | x86::CR0_MP | x86::CR0_NE | x86::CR0_WP) & !(x86::CR0_EM | x86::CR0_TS);
    // SAFETY: the FPU is native (no EM), TS clear: guests use it freely;
    // WP makes the kernel honour read-only pages like FreeBSD's.
    unsafe { x86::write_cr0(cr0) };

    let mut cr4 = x86::read_cr4();
    if cpuid(1, 0).edx & CPUID1_EDX_FXSR != 0 {
        cr4 |= x86::CR4_OSFXSR | x86::CR4_OSXMMEXCPT;
    }
    for (on, bit) in [
        (features.global_pages, x86::CR4_PGE),
        (features.smep, x86::CR4_SMEP),
        (features.smap, x86::CR4_SMAP),
        (features.umip, x86::CR4_UMIP),
        (features.fsgsbase, x86::CR4_FSGSBASE),
        (features.xsave, x86::CR4_OSXSAVE),
    ] {
        if on {
            cr4 |= bit;
        }
    }
    // SAFETY: each bit is set only when CPUID reports the feature; the
    // kernel never touches user pages through user addresses (SMAP/SMEP)
    // and does not use the instructions UMIP restricts.
    unsafe { x86::write_cr4(cr4) };

    if features.xsave {
        // SAFETY: xcr0 holds only components CPUID 0xD reports.
        unsafe { x86::xsetbv(0, features.xcr0) };
        features.fpu_area_size = cpuid(0xd, 0).ebx as usize;
    }
}

fn tss_descriptor(base: u64) -> (u64, u64) {
    let limit = (core::mem::size_of::<Tss>() - 1) as u64;
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | DESC_TSS_TYPE << 40
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    (low, base >> 32)
}

fn set_gate(vector: usize, handler: u64, attributes: u8, ist: u8) {
    let entry = IdtEntry {
        offset_low: handler as u16,
        selector: selectors().kernel_cs,
        ist,
        attributes,
        offset_mid: (handler >> 16) as u16,
        offset_high: (handler >> 32) as u32,
        reserved: 0,
    };
    // SAFETY: single CPU, called during init before interrupts are enabled.
    unsafe { (*addr_of_mut!(IDT))[vector] = entry };
}

/// Loads the GDT of `layout`, the TSS and IDT, and the SYSCALL MSRs. Kld
/// mode calls it again for FreeBSD's layout before anything runs at
/// ring 3 or in the module.
pub fn init_tables(layout: GdtLayout) {
    let old = selectors();
    FREEBSD_LAYOUT.store(layout == GdtLayout::FreeBsd, Ordering::Relaxed);
    let sel = selectors();
    let index = |selector: u16| usize::from(selector >> 3);
    let mut table = [0u64; GDT_ENTRIES];
    table[index(sel.kernel_cs)] = DESC_KERNEL_CODE64;
    table[index(sel.kernel_ds)] = DESC_KERNEL_DATA;
    table[index(sel.user_cs32)] = DESC_USER_CODE32;
    table[index(sel.user_ds)] = DESC_USER_DATA;
    table[index(sel.user_cs64)] = DESC_USER_CODE64;
    // An NMI (IF is clear, nothing else comes) enters through gates that
    // name the old kernel CS until they are rewritten below, and returns
    // to whichever CS it interrupted: the old kernel entries keep their
    // descriptors until then (the testbed's 1..2, which FreeBSD's layout
    // leaves null, GNULL2_SEL and GUFS32_SEL).
    let mut loading = table;
    loading[index(old.kernel_cs)] = DESC_KERNEL_CODE64;
    loading[index(old.kernel_ds)] = DESC_KERNEL_DATA;
    // SAFETY: runs at boot (and once more before the kld run) on the only
    // CPU with interrupts off; no segment register of the kernel names an
    // entry that changes meaning (the old kernel ones stay as they are);
    // the tables are statics that live forever.
    unsafe {
        let gdt = &mut *addr_of_mut!(GDT);
        *gdt = loading;
        let tss = &mut *addr_of_mut!(TSS);
        tss.rsp[0] = trap::rsp0_top();
        let stacks = &*addr_of_mut!(IST_STACKS);
        for (i, stack) in stacks.iter().enumerate() {
            tss.ist[i] = stack.0.as_ptr() as u64 + IST_STACK_SIZE as u64;
        }
        // No I/O permission bitmap: ring 3 gets no port (IOPL 0).
        tss.iopb_offset = core::mem::size_of::<Tss>() as u16;
        // A fresh descriptor (not busy): LTR of the new layout's loads.
        let (low, high) = tss_descriptor(addr_of_mut!(TSS) as u64);
        gdt[sel.tss] = low;
        gdt[sel.tss + 1] = high;

        let gdtr = TablePointer {
            limit: (sel.entries * 8 - 1) as u16,
            base: gdt.as_ptr() as u64,
        };
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "ltr {tss:x}",
            gdtr = in(reg) &gdtr,
            cs = in(reg) u64::from(sel.kernel_cs),
            ds = in(reg) u64::from(sel.kernel_ds),
            tss = in(reg) (sel.tss * 8) as u64,
            tmp = out(reg) _,
        );
    }

    for vector in 0..256 {
        let (attributes, ist) = match vector {
            2 => (GATE_INTERRUPT, IST_NMI),
            8 => (GATE_INTERRUPT, IST_DOUBLE_FAULT),
            18 => (GATE_INTERRUPT, IST_MACHINE_CHECK),
            VECTOR_BREAKPOINT | VECTOR_OVERFLOW => (GATE_INTERRUPT_USER, 0),
            v if v as u64 == VECTOR_INT80 => (GATE_INTERRUPT_USER, 0),
            _ => (GATE_INTERRUPT, 0),
        };
        set_gate(vector, trap::stub_address(vector), attributes, ist);
    }
    // SAFETY: the IDT is a static that lives forever. The gates name the
    // new kernel CS, which is loaded: the old entries can go now.
    unsafe {
        let idtr = TablePointer {
            limit: (256 * 16 - 1) as u16,
            base: addr_of_mut!(IDT) as u64,
        };
        asm!("lidt [{}]", in(reg) &idtr, options(nostack, preserves_flags));
        let gdt = &mut *addr_of_mut!(GDT);
        for i in [index(old.kernel_cs), index(old.kernel_ds)] {
            gdt[i] = table[i];
        }
    }

    // SAFETY: STAR selects the GDT's kernel and user selectors in SYSRET
    // order; LSTAR is the SYSCALL entry; FMASK clears IF (the kernel runs
    // with interrupts off), TF, DF (the ABI wants DF clear), AC and NT.
    unsafe {
        let star = u64::from(sel.user_cs32) << 48 | u64::from(sel.kernel_cs) << 32;
        x86::wrmsr(x86::MSR_STAR, star);
        x86::wrmsr(x86::MSR_LSTAR, trap::syscall_entry as *const () as u64);
        x86::wrmsr(x86::MSR_CSTAR, trap::syscall_entry as *const () as u64);
        x86::wrmsr(
            x86::MSR_FMASK,
            x86::RFLAGS_IF
                | x86::RFLAGS_TF
                | x86::RFLAGS_DF
                | x86::RFLAGS_AC
                | x86::RFLAGS_NT
                | x86::RFLAGS_IOPL,
        );
    }
}

/// Writes the three i386 TLS descriptors of the process about to run.
pub fn set_tls_descriptors(descriptors: [u64; 3]) {
    let Some(first) = selectors().tls_first else {
        crate::fail(format_args!(
            "i386 TLS descriptors with FreeBSD's GDT (kld mode runs amd64 programs only)"
        ))
    };
    // SAFETY: single CPU, kernel context; the slots are not loaded in any
    // kernel segment register.
    unsafe {
        let gdt = &mut *addr_of_mut!(GDT);
        gdt[first..first + 3].copy_from_slice(&descriptors);
    }
}

/// Loads the LDT of the process about to run (`modify_ldt` entries; empty:
/// a null LDTR, so every LDT selector faults #GP as on Linux without an
/// LDT): its entries in [`LDT`], a 16-byte LDT descriptor (type 2, SDM
/// vol. 3A 7.2.3) with the limit of `entries` in the GDT, and LLDT.
pub fn set_ldt(entries: &[u64]) {
    let Some(index) = selectors().ldt else {
        crate::fail(format_args!(
            "an LDT with FreeBSD's GDT (native mode runs processes with the testbed's)"
        ))
    };
    let entries = &entries[..entries.len().min(kqemu_client::LDT_ENTRIES)];
    const TYPE_LDT_PRESENT: u64 = 0x82;
    // SAFETY: single CPU, kernel context; no segment register of the
    // kernel names the LDT, and LLDT of a present LDT descriptor (or of
    // the null selector) cannot fault.
    unsafe {
        let ldt = &mut *addr_of_mut!(LDT);
        ldt[..entries.len()].copy_from_slice(entries);
        let gdt = &mut *addr_of_mut!(GDT);
        let selector = if entries.is_empty() {
            // No descriptor either: `user_segment` reads its limit.
            gdt[index] = 0;
            gdt[index + 1] = 0;
            0u16
        } else {
            let base = ldt.as_ptr() as u64;
            let limit = (entries.len() * 8 - 1) as u64;
            gdt[index] = (limit & 0xffff)
                | (base & 0xff_ffff) << 16
                | TYPE_LDT_PRESENT << 40
                | ((base >> 24) & 0xff) << 56;
            gdt[index + 1] = base >> 32;
            (index * 8) as u16
        };
        asm!("lldt {0:x}", in(reg) selector, options(nostack, preserves_flags));
    }
}

/// The flat user data selector (DS/ES/SS of 64-bit programs).
pub fn user_data_selector() -> u16 {
    selectors().user_ds
}

/// What an RPL-3 selector names: the flat user data segment, or a present
/// DPL-3 code/data TLS or LDT descriptor (its bits); None otherwise.
enum UserSegment {
    FlatData,
    Tls(u64),
}

fn user_segment(selector: u16) -> Option<UserSegment> {
    let index = usize::from(selector >> 3);
    if selector & 7 == 7 {
        // SAFETY: single CPU; reading our own GDT (the LDT descriptor's
        // limit) and LDT.
        let desc = unsafe {
            let limit = selectors()
                .ldt
                .map_or(0, |i| (*addr_of_mut!(GDT))[i] & 0xffff);
            if (index as u64) * 8 + 7 > limit {
                return None;
            }
            (*addr_of_mut!(LDT))[index]
        };
        let present = desc & (1 << 47) != 0;
        let dpl3 = (desc >> 45) & 3 == 3;
        let code_or_data = desc & (1 << 44) != 0;
        return (present && dpl3 && code_or_data).then_some(UserSegment::Tls(desc));
    }
    if selector & 7 != 3 {
        return None;
    }
    let sel = selectors();
    if index == usize::from(sel.user_ds >> 3) {
        return Some(UserSegment::FlatData);
    }
    let first = sel.tls_first?;
    if !(first..first + 3).contains(&index) {
        return None;
    }
    // SAFETY: single CPU; reading our own GDT.
    let desc = unsafe { (*addr_of_mut!(GDT))[index] };
    let present = desc & (1 << 47) != 0;
    let dpl3 = (desc >> 45) & 3 == 3;
    let code_or_data = desc & (1 << 44) != 0;
    (present && dpl3 && code_or_data).then_some(UserSegment::Tls(desc))
}

/// Descriptor type bits: code (else data) and readable code / writable data.
const DESC_CODE: u64 = 1 << 43;
const DESC_READ_WRITE: u64 = 1 << 41;

/// True when `selector` may be loaded into a user data segment register:
/// null, or RPL 3 naming the user data segment or a present DPL-3 data /
/// readable-code TLS descriptor. Anything else would fault in ring 0.
pub fn user_data_selector_ok(selector: u16) -> bool {
    if selector & !3 == 0 {
        return true;
    }
    match user_segment(selector) {
        Some(UserSegment::FlatData) => true,
        Some(UserSegment::Tls(desc)) => desc & DESC_CODE == 0 || desc & DESC_READ_WRITE != 0,
        None => false,
    }
}

/// True when `selector` may be loaded into SS at CPL 3 (what `iretq` checks,
/// SDM vol. 3A, 5.7 and vol. 2B MOV): RPL 3 naming the user data segment or a
/// present DPL-3 writable data TLS descriptor. Anything else would fault in ring 0.
pub fn user_stack_selector_ok(selector: u16) -> bool {
    match user_segment(selector) {
        Some(UserSegment::FlatData) => true,
        Some(UserSegment::Tls(desc)) => desc & DESC_CODE == 0 && desc & DESC_READ_WRITE != 0,
        None => false,
    }
}

/// Selector of the user code segment for a 32-bit (compatibility mode)
/// or 64-bit process.
pub fn user_code_selector(compat: bool) -> u16 {
    let sel = selectors();
    if compat {
        sel.user_cs32
    } else {
        sel.user_cs64
    }
}
