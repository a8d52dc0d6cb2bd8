//! Runs one process at ring 3 until it traps: loads its address space,
//! segments, TLS descriptors, FS/GS bases and FPU state from the client
//! core's [`UserContext`], enters it, and translates the way it came back
//! into a [`Trap`] for the client core.

use crate::cpu::{self, Features};
use crate::fpu::FpuStates;
use crate::timer::Clock;
use crate::trap::{self, TrapFrame, VECTOR_INT80, VECTOR_SPURIOUS, VECTOR_SYSCALL, VECTOR_TIMER};
use crate::x86::{self, RFLAGS_AC, RFLAGS_DF, RFLAGS_FIXED, RFLAGS_ID, RFLAGS_IF, RFLAGS_TF};
use alloc::vec::Vec;
use core::arch::asm;
use kqemu_client::{Arch, Trap, UserContext};

/// Register indices of `UserContext::regs` (kqemu order).
const RAX: usize = 0;
const RCX: usize = 1;
const RDX: usize = 2;
const RBX: usize = 3;
const RSP: usize = 4;
const RBP: usize = 5;
const RSI: usize = 6;
const RDI: usize = 7;

/// The arithmetic flags CF, PF, AF, ZF, SF, OF (SDM vol. 1, 3.4.3.1).
const RFLAGS_STATUS: u64 = 0x8d5;
/// RFLAGS bits ring 3 may set through `popf` itself: the status flags,
/// TF, DF, AC, ID. IF is forced on; IOPL, NT, RF and VM are forced off.
const RFLAGS_USER: u64 = RFLAGS_STATUS | RFLAGS_TF | RFLAGS_DF | RFLAGS_AC | RFLAGS_ID;

/// #GP (SDM vol. 3, 6.15): what the CPU would raise if `iretq` were
/// handed a non-canonical RIP or a bad selector; the process gets it
/// without running.
const VECTOR_GP: u8 = 13;
const VECTOR_PF: u64 = 14;

fn canonical(addr: u64) -> bool {
    ((addr as i64) << 16 >> 16) as u64 == addr
}

pub struct UserCpu {
    fpu: FpuStates<u32>,
    features: Features,
    cr3: u64,
    /// The kernel's own root, the CR3 when the CPU was made.
    kernel_cr3: u64,
    /// Interrupts other than the timer seen while ring 3 ran.
    pub stray_interrupts: u64,
    /// The LDT loaded (`cpu::set_ldt`): the last process's, written again
    /// only when the next one's differs.
    ldt: Vec<u64>,
}

impl UserCpu {
    pub fn new(features: Features) -> UserCpu {
        UserCpu {
            fpu: FpuStates::new(features.xsave, features.fpu_area_size),
            features,
            cr3: x86::read_cr3(),
            kernel_cr3: x86::read_cr3(),
            stray_interrupts: 0,
            ldt: Vec::new(),
        }
    }

    /// Loads the kernel's own address space (the CR3 this CPU had when it
    /// was made): the next `run` writes the process's CR3 again. With
    /// --cr3-exits every round trip thus writes CR3 twice, as each exit of
    /// the monitor does, and the benchmark shows what that costs alone.
    pub fn leave_address_space(&mut self) {
        if self.cr3 != self.kernel_cr3 {
            // SAFETY: the kernel's own root maps the kernel (its upper half is
            // the one every process root copies) and nothing of ring 3 runs
            // until `run` loads a process root again.
            unsafe { x86::write_cr3(self.kernel_cr3) };
            self.cr3 = self.kernel_cr3;
        }
    }

    /// Drops the saved FPU state of processes that are gone.
    pub fn retain(&mut self, alive: &[u32]) {
        self.fpu.retain(|pid| alive.contains(pid));
    }

    /// Runs `ctx` at ring 3 in the address space `cr3` until it traps.
    /// `flush_tlb`: the OS removed or reduced translations of this space.
    pub fn run(
        &mut self,
        pid: u32,
        arch: Arch,
        cr3: u64,
        flush_tlb: bool,
        ctx: &mut UserContext,
        clock: &Clock,
    ) -> Trap {
        let compat = arch == Arch::I386;
        let rip = if compat {
            ctx.rip & 0xffff_ffff
        } else {
            ctx.rip
        };
        if !canonical(rip) || (!compat && (!canonical(ctx.fs_base) || !canonical(ctx.gs_base))) {
            return Trap::Exception {
                vector: VECTOR_GP,
                error_code: 0,
                cr2: 0,
            };
        }
        if cr3 != self.cr3 || flush_tlb {
            // Loading CR3 drops every non-global translation (the kernel's
            // are global), also when the value is unchanged (SDM vol. 3, 4.10.4.1).
            // SAFETY: the client core copies the kernel's upper-half PML4
            // entries into every root it builds (LinuxConfig::kernel_pml4e).
            unsafe { x86::write_cr3(cr3) };
            self.cr3 = cr3;
        }
        self.fpu.switch_to(pid);
        self.load_segments(compat, ctx);
        // An i386 program's own SS (a TLS entry it loaded) is checked
        // against the TLS descriptors just written: the program may have
        // changed the entry since. A bad one fails the `iret` on Linux,
        // which sends SIGSEGV (#GP).
        let ss = match ctx.ss_sel {
            Some(sel) if compat && !cpu::user_stack_selector_ok(sel) => {
                return Trap::Exception {
                    vector: VECTOR_GP,
                    error_code: u32::from(sel & !3),
                    cr2: 0,
                };
            }
            Some(sel) if compat => sel,
            _ => cpu::user_data_selector(),
        };

        let frame = trap::user_frame();
        let r = &ctx.regs;
        let rsp = if compat { r[RSP] & 0xffff_ffff } else { r[RSP] };
        let state = TrapFrame {
            rax: r[RAX],
            rcx: r[RCX],
            rdx: r[RDX],
            rbx: r[RBX],
            rbp: r[RBP],
            rsi: r[RSI],
            rdi: r[RDI],
            r8: r[8],
            r9: r[9],
            r10: r[10],
            r11: r[11],
            r12: r[12],
            r13: r[13],
            r14: r[14],
            r15: r[15],
            vector: 0,
            error_code: 0,
            rip,
            cs: u64::from(cpu::user_code_selector(compat)),
            rflags: (ctx.rflags & RFLAGS_USER) | RFLAGS_IF | RFLAGS_FIXED,
            rsp,
            ss: u64::from(ss),
        };
        // SAFETY: the frame area is the top of the RSP0 stack, which only
        // the CPU (on a trap from ring 3) and this code write; the kernel
        // is not on that stack.
        unsafe { frame.write(state) };
        // SYSRET is the cheaper way back (Linux takes it under the same
        // conditions): 64-bit code whose RCX/R11 already hold the RIP and
        // RFLAGS to return with, as after a system call, and no single-step
        // trap pending. RIP was checked canonical (the SYSRET #GP in ring 0
        // that hit FreeBSD in 2012).
        let sysret = !compat
            && state.rcx == state.rip
            && state.r11 == state.rflags
            && state.rflags & RFLAGS_TF == 0;
        // SAFETY: the frame holds a valid ring-3 state: user code selector,
        // canonical RIP, IF set, IOPL 0; CR3 maps the kernel; for SYSRET the
        // conditions above hold.
        unsafe {
            if sysret {
                trap::enter_user_sysret()
            } else {
                trap::enter_user()
            }
        };
        // SAFETY: enter_user returned, so a trap from ring 3 filled the frame.
        let f = unsafe { frame.read() };

        ctx.regs = [
            f.rax, f.rcx, f.rdx, f.rbx, f.rsp, f.rbp, f.rsi, f.rdi, f.r8, f.r9, f.r10, f.r11,
            f.r12, f.r13, f.r14, f.r15,
        ];
        ctx.rip = f.rip;
        ctx.rflags = f.rflags;
        self.save_segments(compat, ctx, f.ss as u16);

        match f.vector {
            VECTOR_SYSCALL => Trap::Syscall,
            VECTOR_INT80 => Trap::Int80,
            VECTOR_TIMER => {
                clock.eoi();
                Trap::Timer
            }
            VECTOR_SPURIOUS => Trap::Timer,
            v if v < 32 => Trap::Exception {
                vector: v as u8,
                error_code: f.error_code as u32,
                cr2: if v == VECTOR_PF { x86::read_cr2() } else { 0 },
            },
            _ => {
                clock.eoi();
                self.stray_interrupts += 1;
                Trap::Timer
            }
        }
    }

    fn load_segments(&mut self, compat: bool, ctx: &mut UserContext) {
        // The LDT before the selectors, which may name it.
        if ctx.ldt != self.ldt {
            cpu::set_ldt(&ctx.ldt);
            self.ldt.clone_from(&ctx.ldt);
        }
        if compat {
            let descriptors = [
                ctx.tls[0].descriptor(),
                ctx.tls[1].descriptor(),
                ctx.tls[2].descriptor(),
            ];
            cpu::set_tls_descriptors(descriptors);
            ctx.tls_changed = false;
        }
        // An i386 program's own DS/ES; one that became invalid loads null,
        // as Linux's fixup of the segment reload on return to user mode.
        let data = |sel: Option<u16>| match sel {
            Some(s) if compat && cpu::user_data_selector_ok(s) => s,
            Some(_) if compat => 0,
            _ => cpu::user_data_selector(),
        };
        let (ds, es) = (data(ctx.ds_sel), data(ctx.es_sel));
        let fs = if cpu::user_data_selector_ok(ctx.fs_sel) {
            ctx.fs_sel
        } else {
            0
        };
        let gs = if cpu::user_data_selector_ok(ctx.gs_sel) {
            ctx.gs_sel
        } else {
            0
        };
        // SAFETY: ds/es/fs/gs were checked to be null, the GDT's flat
        // user data segment or valid DPL-3 data selectors; the kernel
        // itself uses none of DS, ES, FS, GS.
        unsafe {
            asm!(
                "mov ds, {ds:x}",
                "mov es, {es:x}",
                "mov fs, {fs:x}",
                "mov gs, {gs:x}",
                ds = in(reg) u64::from(ds),
                es = in(reg) u64::from(es),
                fs = in(reg) u64::from(fs),
                gs = in(reg) u64::from(gs),
                options(nostack, preserves_flags)
            );
        }
        if !compat {
            // In 64-bit mode the bases come from the MSRs (after the
            // selector loads, which would reset them); both were checked
            // canonical above.
            self.write_bases(ctx.fs_base, ctx.gs_base);
        }
    }

    fn write_bases(&self, fs: u64, gs: u64) {
        if self.features.fsgsbase {
            // SAFETY: CR4.FSGSBASE is set; the values are canonical.
            unsafe {
                asm!("wrfsbase {0}", "wrgsbase {1}", in(reg) fs, in(reg) gs, options(nostack, preserves_flags))
            };
        } else {
            // SAFETY: the values are canonical; the kernel does not use FS/GS.
            unsafe {
                x86::wrmsr(x86::MSR_FS_BASE, fs);
                x86::wrmsr(x86::MSR_GS_BASE, gs);
            }
        }
    }

    /// `ss`: the program's SS from the trap frame.
    fn save_segments(&self, compat: bool, ctx: &mut UserContext, ss: u16) {
        let (ds, es, fs, gs): (u16, u16, u16, u16);
        // SAFETY: reading segment selectors has no side effects.
        unsafe {
            asm!(
                "mov {0:x}, ds", "mov {1:x}, es", "mov {2:x}, fs", "mov {3:x}, gs",
                out(reg) ds, out(reg) es, out(reg) fs, out(reg) gs,
                options(nomem, nostack, preserves_flags)
            )
        };
        ctx.fs_sel = fs;
        ctx.gs_sel = gs;
        if compat {
            // The context keeps only what differs from the flat user data
            // segment (UserContext).
            let own = |sel: u16| (sel != cpu::user_data_selector()).then_some(sel);
            (ctx.ds_sel, ctx.es_sel, ctx.ss_sel) = (own(ds), own(es), own(ss));
        }
        if !compat {
            // The program may have changed its bases itself (wrfsbase is
            // allowed at ring 3 when CR4.FSGSBASE is set, as on Linux).
            ctx.fs_base = x86::rdmsr(x86::MSR_FS_BASE);
            ctx.gs_base = x86::rdmsr(x86::MSR_GS_BASE);
        }
    }
}
