//! The variadic KPI functions (`printf(9)`, `panic(9)`, `make_dev_s(9)`)
//! and the `kvprintf` conversions the module uses.
//!
//! Rust cannot define a C variadic function on stable, so each entry is an
//! assembly trampoline: it stores the six argument registers of the SysV
//! AMD64 calling convention in an array on its stack and calls the Rust
//! side with that array and the address of the first stacked argument,
//! which is how `va_arg` walks integer arguments (floating-point ones are
//! never passed: the kernel is built -msoft-float).

use alloc::string::String;
use alloc::vec::Vec;
use core::arch::global_asm;

/// Integer arguments of a variadic call, in order.
pub struct VaArgs {
    regs: [u64; 6],
    next: usize,
    stack: *const u64,
}

impl VaArgs {
    /// # Safety
    ///
    /// `regs` points at the six saved argument registers and `stack` at
    /// the caller's first stacked argument, as the trampolines pass them;
    /// `first` is the index of the first variadic register argument.
    unsafe fn new(regs: *const u64, stack: *const u64, first: usize) -> VaArgs {
        // SAFETY: the trampoline saved six registers there.
        let regs = unsafe { core::ptr::read(regs.cast::<[u64; 6]>()) };
        VaArgs {
            regs,
            next: first,
            stack,
        }
    }

    pub fn fixed(&self, index: usize) -> u64 {
        self.regs[index]
    }

    fn next(&mut self) -> u64 {
        if self.next < self.regs.len() {
            self.next += 1;
            return self.regs[self.next - 1];
        }
        // SAFETY: the caller passed at least as many arguments as its
        // format names (the C rule printf relies on); they sit in 8-byte
        // slots above the return address.
        let value = unsafe { self.stack.read() };
        // SAFETY: moving to the next slot of the same argument area.
        self.stack = unsafe { self.stack.add(1) };
        value
    }
}

/// Reads a C string of the module (kernel memory).
///
/// # Safety
///
/// `p` is null or points at a NUL-terminated string.
pub unsafe fn c_string(p: u64, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    if p == 0 {
        out.extend_from_slice(b"(null)");
        return out;
    }
    let p = p as *const u8;
    for i in 0..max {
        // SAFETY: within the string, up to its NUL (caller's contract).
        let b = unsafe { p.add(i).read() };
        if b == 0 {
            break;
        }
        out.push(b);
    }
    out
}

/// `kvprintf` with the conversions of printf(9) the module and its C shim
/// use: flags `-0+ #`, width and precision (digits or `*`), length `hh h
/// l ll q j z t`, conversions `d i u o x X p s c %`.
///
/// # Safety
///
/// `fmt` is a NUL-terminated string and `args` holds the arguments it names.
pub unsafe fn format(fmt: u64, args: &mut VaArgs) -> Vec<u8> {
    // SAFETY: the caller's contract.
    let fmt = unsafe { c_string(fmt, 4096) };
    let mut out = Vec::new();
    let mut i = 0;
    while i < fmt.len() {
        let c = fmt[i];
        i += 1;
        if c != b'%' {
            out.push(c);
            continue;
        }
        let (mut left, mut zero, mut plus, mut space, mut alt) =
            (false, false, false, false, false);
        while i < fmt.len() {
            match fmt[i] {
                b'-' => left = true,
                b'0' => zero = true,
                b'+' => plus = true,
                b' ' => space = true,
                b'#' => alt = true,
                _ => break,
            }
            i += 1;
        }
        let mut width = 0usize;
        if fmt.get(i) == Some(&b'*') {
            let w = args.next() as i32;
            if w < 0 {
                left = true;
            }
            width = w.unsigned_abs() as usize;
            i += 1;
        }
        while let Some(d @ b'0'..=b'9') = fmt.get(i) {
            width = width * 10 + usize::from(d - b'0');
            i += 1;
        }
        let mut precision: Option<usize> = None;
        if fmt.get(i) == Some(&b'.') {
            i += 1;
            let mut p = 0usize;
            if fmt.get(i) == Some(&b'*') {
                p = (args.next() as i32).max(0) as usize;
                i += 1;
            }
            while let Some(d @ b'0'..=b'9') = fmt.get(i) {
                p = p * 10 + usize::from(d - b'0');
                i += 1;
            }
            precision = Some(p);
        }
        // Length: 64-bit for l, ll, q, j, z, t; int otherwise.
        let mut wide = false;
        let mut narrow = 0u32;
        while let Some(&m) = fmt.get(i) {
            match m {
                b'l' | b'q' | b'j' | b'z' | b't' => wide = true,
                b'h' => narrow += 1,
                _ => break,
            }
            i += 1;
        }
        let Some(&conv) = fmt.get(i) else { break };
        i += 1;
        let body: Vec<u8> = match conv {
            b'%' => alloc::vec![b'%'],
            b'c' => alloc::vec![args.next() as u8],
            b's' => {
                let p = args.next();
                // SAFETY: %s takes a NUL-terminated string (or a counted
                // one with a precision, which is never read past).
                let mut s = unsafe { c_string(p, precision.unwrap_or(1 << 16)) };
                if let Some(p) = precision {
                    s.truncate(p);
                }
                s
            }
            b'd' | b'i' => {
                let raw = args.next();
                let v: i64 = if wide {
                    raw as i64
                } else {
                    match narrow {
                        0 => i64::from(raw as i32),
                        1 => i64::from(raw as i16),
                        _ => i64::from(raw as i8),
                    }
                };
                let mut s = String::new();
                if v < 0 {
                    s.push('-');
                } else if plus {
                    s.push('+');
                } else if space {
                    s.push(' ');
                }
                s += &alloc::format!("{}", v.unsigned_abs());
                s.into_bytes()
            }
            b'u' | b'o' | b'x' | b'X' | b'p' => {
                let raw = args.next();
                let v = if wide || conv == b'p' {
                    raw
                } else {
                    match narrow {
                        0 => u64::from(raw as u32),
                        1 => u64::from(raw as u16),
                        _ => u64::from(raw as u8),
                    }
                };
                let s = match conv {
                    b'u' => alloc::format!("{v}"),
                    b'o' if alt => alloc::format!("0{v:o}"),
                    b'o' => alloc::format!("{v:o}"),
                    b'x' if alt => alloc::format!("0x{v:x}"),
                    b'x' => alloc::format!("{v:x}"),
                    b'X' if alt => alloc::format!("0X{v:X}"),
                    b'X' => alloc::format!("{v:X}"),
                    _ => alloc::format!("0x{v:x}"),
                };
                s.into_bytes()
            }
            other => alloc::vec![b'%', other],
        };
        let pad = width.saturating_sub(body.len());
        if left {
            out.extend_from_slice(&body);
            out.resize(out.len() + pad, b' ');
        } else if zero && conv != b's' && conv != b'c' {
            // Zeros go after the sign or 0x prefix.
            let prefix = match body.first() {
                Some(b'-' | b'+' | b' ') => 1,
                _ if body.starts_with(b"0x") || body.starts_with(b"0X") => 2,
                _ => 0,
            };
            out.extend_from_slice(&body[..prefix]);
            out.resize(out.len() + pad, b'0');
            out.extend_from_slice(&body[prefix..]);
        } else {
            out.resize(out.len() + pad, b' ');
            out.extend_from_slice(&body);
        }
    }
    out
}

macro_rules! variadic_trampoline {
    ($name:literal, $target:path) => {
        global_asm!(
            concat!(".globl ", $name),
            concat!($name, ":"),
            "push rbp",
            "mov rbp, rsp",
            "sub rsp, 48",
            "mov [rsp], rdi",
            "mov [rsp + 8], rsi",
            "mov [rsp + 16], rdx",
            "mov [rsp + 24], rcx",
            "mov [rsp + 32], r8",
            "mov [rsp + 40], r9",
            "mov rdi, rsp",
            "lea rsi, [rbp + 16]",
            "call {target}",
            "leave",
            "ret",
            target = sym $target,
        );
    };
}

variadic_trampoline!("fbsd_printf", printf_impl);
variadic_trampoline!("fbsd_panic", panic_impl);
variadic_trampoline!("fbsd_make_dev_s", make_dev_s_impl);

extern "C" {
    /// `int printf(const char *, ...)`.
    pub fn fbsd_printf(fmt: *const core::ffi::c_char, ...) -> core::ffi::c_int;
    /// `void panic(const char *, ...)`.
    pub fn fbsd_panic();
    /// `int make_dev_s(struct make_dev_args *, struct cdev **, const char *, ...)`.
    pub fn fbsd_make_dev_s();
}

/// # Safety
///
/// Called only by the trampoline, from a printf(9) call of the module.
unsafe extern "C" fn printf_impl(regs: *const u64, stack: *const u64) -> i32 {
    // SAFETY: the trampoline's contract; fmt is the first argument.
    let text = unsafe {
        let mut args = VaArgs::new(regs, stack, 1);
        let fmt = args.fixed(0);
        format(fmt, &mut args)
    };
    super::kpi::console(&text);
    text.len() as i32
}

/// # Safety
///
/// Called only by the trampoline, from a panic(9) call of the module.
unsafe extern "C" fn panic_impl(regs: *const u64, stack: *const u64) -> ! {
    // SAFETY: the trampoline's contract; fmt is the first argument.
    let text = unsafe {
        let mut args = VaArgs::new(regs, stack, 1);
        let fmt = args.fixed(0);
        format(fmt, &mut args)
    };
    crate::fail(format_args!(
        "panic(9) from the module: {}",
        String::from_utf8_lossy(&text)
    ))
}

/// # Safety
///
/// Called only by the trampoline, from a make_dev_s(9) call of the module.
unsafe extern "C" fn make_dev_s_impl(regs: *const u64, stack: *const u64) -> i32 {
    // SAFETY: the trampoline's contract; args, cdev and fmt come first.
    let (args, cdevp, name) = unsafe {
        let mut va = VaArgs::new(regs, stack, 3);
        let fmt = va.fixed(2);
        (va.fixed(0), va.fixed(1), format(fmt, &mut va))
    };
    super::devfs::make_dev_s(args, cdevp, &name)
}

/// printf(9) called the way C calls it, with more arguments than
/// registers (the rest on the stack): the output must be what FreeBSD's
/// kvprintf prints. Returns (printed, expected).
pub fn selftest() -> (String, &'static str) {
    const EXPECTED: &str =
        "kqemu|  -42|7   |beef|0000000000c0ffee|0x1000|Z|-5|12|abc|% 0x1f 052 +3";
    let before = super::kpi::with(|k| k.dmesg.len());
    // SAFETY: the format names exactly the arguments passed, with their
    // C types (%s a string, %d int, %u unsigned, %lx long, %p pointer, %c
    // int, %jd intmax_t, %zu size_t, %.3s a string of at least 3 bytes).
    unsafe {
        fbsd_printf(
            c"%s|%5d|%-4u|%x|%016lx|%p|%c|%jd|%zu|%.3s|%% %#x %#o %+d\n".as_ptr(),
            c"kqemu".as_ptr(),
            -42i32,
            7u32,
            0xbeefu32,
            0xc0ffeeu64,
            0x1000usize as *const u8,
            i32::from(b'Z'),
            -5i64,
            12usize,
            c"abcdef".as_ptr(),
            0x1fu32,
            0o52u32,
            3i32,
        )
    };
    let printed = super::kpi::with(|k| k.dmesg.get(before).cloned().unwrap_or_default());
    (printed, EXPECTED)
}
