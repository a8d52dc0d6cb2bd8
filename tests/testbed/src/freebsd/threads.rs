//! Threads of the FreeBSD process (sys/kern/kern_thr.c): `thr_new(2)`,
//! `thr_self(2)`, `thr_exit(2)`, `sched_yield(2)`, and preemption.
//!
//! The first thread is the home of the process loop (process.rs). Another
//! thread runs for one time slice when the first one is preempted: at the
//! last `critical_exit` of a deferred preemption inside the module
//! (critical_exit_preempt → mi_switch: the module is in the middle of an
//! ioctl on the first thread's stack), on a timer tick in user mode, or at
//! `sched_yield`. The slice ends at that thread's own next tick,
//! `sched_yield` or `thr_exit`; then the first thread resumes where it was
//! (inside the module, or in user mode). A thread that is in user mode
//! needs no kernel stack, so the other thread's slice runs on top of the
//! first thread's kernel stack; what this cannot model is a second thread
//! that sleeps inside the kernel while the first runs (none of the system
//! calls served here sleeps), nor slices of the first thread nested in
//! another's. Each thread has its own `struct thread` (`curthread`,
//! `td_critnest`, `td_ast`, `td_owepreempt` per thread, `PCPU(curthread)`
//! switched) and its own FPU state, switched eagerly as FreeBSD does.

use super::kpi::{self, peek, poke, Block};
use crate::cpu::Features;
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::asm;
use kqemu_client::mm::Mm;
use kqemu_client::{GuestRam, UserContext};

/// Thread ids: FreeBSD numbers threads above PID_MAX (99999, sys/sys/proc.h).
const FIRST_TID: u64 = 100_001;
/// RSP of a new thread: the top of its stack, 16-byte aligned, less the
/// slot of a return address (cpu_set_upcall, amd64 vm_machdep.c).
const STACK_ALIGN: u64 = 16;
const RETURN_SLOT: u64 = 8;
/// RFLAGS of a new thread: IF and the always-one bit (PSL_USER).
const RFLAGS_INITIAL: u64 = 0x202;
/// Registers of UserContext::regs (kqemu order).
const RSP: usize = 4;
const RDI: usize = 7;
/// FXSAVE/XSAVE legacy-area offsets and power-on values (SDM vol. 1,
/// 10.5.1, 8.1.5, 10.2.3); XSAVE areas are 64-byte aligned (13.4). A new
/// thread starts with the initial FPU state (cpu_copy_thread clears
/// PCB_FPUINITDONE).
const FCW_INIT: u16 = 0x037f;
const MXCSR_OFFSET: usize = 24;
const MXCSR_INIT: u32 = 0x1f80;
const AREA_ALIGN: usize = 64;

/// A thread's saved FPU state.
struct Fpu {
    buffer: Vec<u8>,
    offset: usize,
    xsave: bool,
}

impl Fpu {
    fn initial(features: &Features) -> Fpu {
        let size = features.fpu_area_size.max(512);
        let buffer = vec![0u8; size + AREA_ALIGN];
        let offset = (AREA_ALIGN - buffer.as_ptr() as usize % AREA_ALIGN) % AREA_ALIGN;
        let mut f = Fpu {
            buffer,
            offset,
            xsave: features.xsave,
        };
        let area = &mut f.buffer[offset..];
        area[..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        area[MXCSR_OFFSET..MXCSR_OFFSET + 4].copy_from_slice(&MXCSR_INIT.to_le_bytes());
        f
    }

    fn ptr(&mut self) -> *mut u8 {
        self.buffer[self.offset..].as_mut_ptr()
    }

    /// The live registers into this area.
    fn save(&mut self) {
        let area = self.ptr();
        // SAFETY: a 64-byte aligned area of the size CPUID gave for the
        // testbed's XCR0 (or 512 bytes for FXSAVE); CR0.TS is clear on
        // every path here (cpu::after_ioctl, user mode just left).
        unsafe {
            if self.xsave {
                asm!("xsave64 [{}]", in(reg) area, in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
            } else {
                asm!("fxsave64 [{}]", in(reg) area, options(nostack));
            }
        }
    }

    /// This area into the registers.
    fn restore(&mut self) {
        let area = self.ptr();
        // SAFETY: as in save; the area holds a state saved by this CPU or
        // the initial one (XSAVE header zero: every component in its init
        // state, SDM vol. 1 13.8).
        unsafe {
            if self.xsave {
                asm!("xrstor64 [{}]", in(reg) area, in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
            } else {
                asm!("fxrstor64 [{}]", in(reg) area, options(nostack));
            }
        }
    }
}

/// A thread other than the first, not running.
struct Thread {
    tid: u64,
    ctx: UserContext,
    td: Block,
    fpu: Fpu,
}

struct Threads {
    features: Features,
    main_td: u64,
    main_fpu: Fpu,
    others: VecDeque<Thread>,
    /// The thread whose slice runs now (not in `others`).
    running: Option<(u64, Block, Fpu)>,
    next_tid: u64,
    /// A preemption hook: the process loop's way to run a slice while the
    /// first thread is inside the module (see `preempt`).
    hook: Option<Hook>,
    created: u64,
    exited: u64,
    slices: u64,
    preemptions_in_module: u64,
    /// `curthread->td_fpop` of the first thread, kept across a slice.
    saved_file: Option<u32>,
}

/// `&mut dyn FnMut()` of the process loop, valid while registered.
#[derive(Clone, Copy)]
struct Hook(*mut (dyn FnMut() + 'static));

// SAFETY: one CPU; the hook is only called on the stack that registered it,
// before `unregister` (Hook is Send only to sit in the static).
unsafe impl Send for Hook {}

static THREADS: spin::Mutex<Option<Threads>> = spin::Mutex::new(None);

/// Runs `f` on the thread table; never held while user or module code runs.
fn with<R>(f: impl FnOnce(&mut Threads) -> R) -> Option<R> {
    let Some(mut guard) = THREADS.try_lock() else {
        crate::fail(format_args!("FreeBSD personality: re-entrant thread table"))
    };
    guard.as_mut().map(f)
}

/// exec: the process has one thread, `main_td`.
pub fn exec(features: Features, main_td: u64) {
    *THREADS.lock() = Some(Threads {
        features,
        main_td,
        main_fpu: Fpu::initial(&features),
        others: VecDeque::new(),
        running: None,
        next_tid: FIRST_TID + 1,
        hook: None,
        created: 0,
        exited: 0,
        slices: 0,
        preemptions_in_module: 0,
        saved_file: None,
    });
}

/// The tid of the running thread.
pub fn current_tid() -> u64 {
    with(|t| t.running.as_ref().map_or(FIRST_TID, |r| r.0)).unwrap_or(FIRST_TID)
}

/// True while another thread's slice runs.
pub fn in_slice() -> bool {
    with(|t| t.running.is_some()).unwrap_or(false)
}

/// Threads other than the first that have not exited.
pub fn others() -> usize {
    with(|t| t.others.len() + usize::from(t.running.is_some())).unwrap_or(0)
}

/// thr_new(2): a thread that starts at `start_func(arg)` on its stack,
/// with `tls_base` as its FS base; its tid goes to `child_tid` and
/// `parent_tid`. EINVAL for a parameter size past `struct thr_param`.
pub fn thr_new(mm: &mut Mm, ram: &mut GuestRam, param: u64, size: u64) -> Result<u64, i32> {
    let l = kpi::with(|k| k.layout);
    let (einval, efault) = (l.EINVAL as i32, l.EFAULT as i32);
    // kern_thr_new: 0 <= param_size <= sizeof, the rest zero.
    if size as i64 > l.sizeof_thr_param as i64 || (size as i64) < 0 {
        return Err(einval);
    }
    let mut p = vec![0u8; l.sizeof_thr_param as usize];
    mm.read(ram, param, &mut p[..size as usize])
        .map_err(|_| efault)?;
    let field = |off: u64| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[off as usize..off as usize + 8]);
        u64::from_le_bytes(b)
    };
    let stack_top = field(l.thr_param_stack_base).wrapping_add(field(l.thr_param_stack_size));
    let mut ctx = UserContext {
        rip: field(l.thr_param_start_func),
        rflags: RFLAGS_INITIAL,
        fs_base: field(l.thr_param_tls_base),
        ..UserContext::default()
    };
    ctx.regs[RSP] = (stack_top & !(STACK_ALIGN - 1)).wrapping_sub(RETURN_SLOT);
    ctx.regs[RDI] = field(l.thr_param_arg);
    let tid = with(|t| t.next_tid).unwrap_or(FIRST_TID + 1);
    for at in [field(l.thr_param_child_tid), field(l.thr_param_parent_tid)] {
        if at != 0 {
            mm.write(ram, at, &tid.to_le_bytes()).map_err(|_| efault)?;
        }
    }
    let td = Block::new(l.sizeof_thread, 64);
    with(|t| {
        // SAFETY: a fresh zeroed struct thread of the header size; its
        // process is the first thread's.
        unsafe {
            let proc: u64 = peek(t.main_td + l.thread_td_proc);
            poke(td.addr + l.thread_td_proc, proc);
        }
        t.others.push_back(Thread {
            tid,
            ctx,
            td,
            fpu: Fpu::initial(&t.features),
        });
        t.next_tid += 1;
        t.created += 1;
    });
    Ok(0)
}

/// Starts the next thread's slice: the first thread's FPU state is saved
/// and curthread switched. None when no other thread is runnable or a
/// slice already runs.
pub fn slice_begin() -> Option<(u64, UserContext)> {
    with(|t| {
        if t.running.is_some() {
            return None;
        }
        let mut next = t.others.pop_front()?;
        t.main_fpu.save();
        next.fpu.restore();
        t.saved_file = kpi::with(|k| k.current_file.take());
        super::cpu::set_curthread(next.td.addr);
        t.running = Some((next.tid, next.td, next.fpu));
        t.slices += 1;
        Some((next.tid, next.ctx))
    })
    .flatten()
}

/// Ends the slice: the thread is put back with `ctx` (or freed when it
/// exited), the first thread's FPU state, curthread and GS base return.
pub fn slice_end(ctx: UserContext, exited: bool) {
    with(|t| {
        let Some((tid, td, mut fpu)) = t.running.take() else {
            crate::fail(format_args!("threads: slice_end without a slice"))
        };
        fpu.save();
        t.main_fpu.restore();
        super::cpu::set_curthread(t.main_td);
        let file = t.saved_file.take();
        kpi::with(|k| k.current_file = file);
        if exited {
            td.free();
            t.exited += 1;
        } else {
            t.others.push_back(Thread { tid, ctx, td, fpu });
        }
    });
    kpi::enter_kernel();
}

/// Runs `f` (a device ioctl of the first thread) with `slice` as the way
/// to give another thread a time slice while the module is inside it.
pub fn preemptible<R>(slice: &mut (dyn FnMut() + '_), f: impl FnOnce() -> R) -> R {
    // SAFETY: only the lifetime bound changes; the pointer leaves the
    // table below, before the borrow of `slice` ends (the kernel does not
    // unwind: a panic ends the run).
    let raw: *mut (dyn FnMut() + 'static) =
        unsafe { core::mem::transmute(slice as *mut (dyn FnMut() + '_)) };
    with(|t| t.hook = Some(Hook(raw)));
    let result = f();
    with(|t| t.hook = None);
    result
}

/// critical_exit_preempt: the first thread, inside the module, gives the
/// CPU to another thread for a slice, then continues in the module.
pub fn preempt() {
    let hook = with(|t| {
        if t.running.is_some() || t.others.is_empty() {
            return None;
        }
        let hook = t.hook.take()?;
        t.preemptions_in_module += 1;
        Some(hook)
    })
    .flatten();
    let Some(hook) = hook else {
        return;
    };
    // SAFETY: registered by `preemptible` further up this stack, around
    // the device ioctl that called into the module and from there here;
    // it leaves the table only after that ioctl returns. Taken out of the
    // table while it runs, so it is never entered twice.
    unsafe { (*hook.0)() };
    with(|t| t.hook = Some(hook));
}

/// The process ends: threads still alive go with it.
pub fn exit() {
    with(|t| {
        for th in t.others.drain(..) {
            th.td.free();
            t.exited += 1;
        }
    });
}

/// For the end-of-run check: (created, exited, slices, slices that began
/// inside the module), when the process made a thread.
pub fn summary() -> Option<(u64, u64, u64, u64)> {
    with(|t| (t.created > 0).then_some((t.created, t.exited, t.slices, t.preemptions_in_module)))
        .flatten()
}
