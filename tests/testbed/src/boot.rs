//! PVH entry: the ELF note QEMU looks for, and the 32-bit trampoline into
//! long mode at the kernel's linked (upper-half) address.
//!
//! QEMU's PVH loader (TESTBED.md) enters `pvh_start32` in 32-bit protected
//! mode with paging off and `%ebx` pointing at `hvm_start_info`. The
//! trampoline maps physical 0..1 GiB three times with 2 MiB pages (identity
//! for the jump itself, at KERNBASE for the kernel, at the DMAP base for the
//! early start-info reads), enters long mode and calls [`crate::kmain`].
//! `kmain` then builds the final tables, which drop the identity map.

use core::arch::global_asm;

/// Where the kernel's code and data are linked (FreeBSD amd64 KERNBASE,
/// contract.md).
pub const KERNBASE: u64 = 0xffff_ffff_8000_0000;

/// Xen public/elfnote.h: "Physical entry point into the kernel".
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Size of the boot stack, also the kernel's only stack besides the IST
/// stacks: everything runs on it except traps from ring 3.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .section .note.pvh, "a"
    .p2align 2
    .long 4
    .long 8
    .long {note_type}
    .asciz "Xen"
    .p2align 2
    .quad pvh_start32 - {kernbase}

    .section .bss.boot, "aw", @nobits
    .p2align 12
    boot_pml4: .skip 4096
    boot_pdpt_low: .skip 4096
    boot_pdpt_high: .skip 4096
    boot_pd: .skip 4096
    .p2align 4
    .globl boot_stack_bottom
    boot_stack_bottom: .skip {stack_size}
    .globl boot_stack_top
    boot_stack_top:

    .section .rodata.boot, "a"
    .p2align 3
    boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    boot_gdt_end:
    boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt - {kernbase}

    .section .text.boot32, "ax"
    .code32
    .globl pvh_start32
    pvh_start32:
    cli
    cld
    mov %ebx, %edi

    /* boot_pd: 512 2-MiB pages covering physical 0..1 GiB (P|RW|PS). */
    mov $(boot_pd - {kernbase}), %edx
    mov $0x83, %eax
    xor %ecx, %ecx
1:
    mov %eax, (%edx,%ecx,8)
    movl $0, 4(%edx,%ecx,8)
    add $0x200000, %eax
    inc %ecx
    cmp $512, %ecx
    jb 1b

    mov $(boot_pd - {kernbase} + 3), %eax
    mov %eax, (boot_pdpt_low - {kernbase})
    mov %eax, (boot_pdpt_high - {kernbase} + 510 * 8)
    mov $(boot_pdpt_low - {kernbase} + 3), %eax
    mov %eax, (boot_pml4 - {kernbase})
    mov %eax, (boot_pml4 - {kernbase} + {dmap_slot} * 8)
    mov $(boot_pdpt_high - {kernbase} + 3), %eax
    mov %eax, (boot_pml4 - {kernbase} + 511 * 8)

    /* CR4.PAE, CR3, EFER.LME, CR0.PG|PE: SDM vol. 3 10.8.5. */
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $(boot_pml4 - {kernbase}), %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt (boot_gdtr - {kernbase})
    ljmp $0x08, $(boot64_low - {kernbase})

    .code64
    boot64_low:
    movabs $boot64_high, %rax
    jmp *%rax
    boot64_high:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    movabs $boot_stack_top, %rsp
    xor %ebp, %ebp
    mov %edi, %edi
    movabs ${kmain}, %rax
    call *%rax
    ud2
    .text
    "#,
    note_type = const XEN_ELFNOTE_PHYS32_ENTRY,
    kernbase = const KERNBASE,
    stack_size = const BOOT_STACK_SIZE,
    dmap_slot = const crate::mem::DMAP_PML4_SLOT,
    kmain = sym crate::kmain,
    options(att_syntax)
);
