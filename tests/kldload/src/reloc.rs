//! One RELA relocation, with the rules of FreeBSD's amd64
//! `elf_reloc_internal` (sys/amd64/amd64/elf_machdep.c, same in 14 and 15):
//!
//! | type | value written | width |
//! |---|---|---|
//! | `NONE` | nothing | - |
//! | `64` | S + A | 64 |
//! | `PC32`, `PLT32` | S + A - P (the PLT is taken to be S) | 32 |
//! | `32S` | S + A | 32 |
//! | `GLOB_DAT`, `JMP_SLOT` | S (the addend is ignored) | 64 |
//! | `RELATIVE` | B + A | 64 |
//! | `IRELATIVE` | the result of calling the function at B + A | 64 |
//!
//! B is the address of the section the relocation patches (for an
//! `ET_REL` file, `relocbase` is that section's base, not the image's).
//! `COPY` and every other type fail the load with the kernel's message.
//! Unlike the kernel, a 32-bit value that does not fit (PC32/PLT32 as a
//! signed displacement, 32S as a sign-extended address) fails too: FreeBSD
//! would truncate it and the module would jump or load somewhere wrong.

use crate::elf::{
    Rela, R_X86_64_32S, R_X86_64_64, R_X86_64_COPY, R_X86_64_GLOB_DAT, R_X86_64_IRELATIVE,
    R_X86_64_JMP_SLOT, R_X86_64_NONE, R_X86_64_PC32, R_X86_64_PLT32, R_X86_64_RELATIVE,
};

/// Why one relocation could not be applied.
pub(crate) enum Failure<L> {
    /// A type `elf_reloc_internal` rejects (its `default:` case).
    UnexpectedType,
    /// `R_X86_64_COPY`, which the kernel rejects with its own message.
    Copy,
    /// The symbol lookup failed; `L` says why.
    Lookup(L),
    /// The patched field lies outside the section.
    OutOfSection,
    /// A 32-bit field cannot hold the value.
    Overflow(i128),
    /// The ifunc resolver at this address could not be called.
    Ifunc(u64),
}

/// What a relocation needs from the loader.
pub(crate) trait Context {
    type LookupError;
    /// `elf_obj_lookup`: the address a symbol index stands for.
    fn lookup(&mut self, symidx: u32) -> Result<u64, Self::LookupError>;
    /// Calls an ifunc resolver and returns what it returned.
    fn call_ifunc(&mut self, resolver: u64) -> Option<u64>;
}

/// The section being patched: its bytes in the image and its address.
pub(crate) struct Target<'i> {
    pub bytes: &'i mut [u8],
    pub address: u64,
}

/// What a relocation type computes, and how wide its field is.
#[derive(Clone, Copy)]
enum Op {
    /// S + A, 64 bits.
    Absolute64,
    /// S + A - P, a signed 32-bit displacement.
    PcRelative32,
    /// S + A, a 32-bit field sign-extended when used.
    Absolute32Signed,
    /// S, 64 bits.
    Symbol64,
    /// B + A, 64 bits.
    Relative64,
    /// resolver(B + A)(), 64 bits.
    Indirect64,
}

impl Op {
    fn width(self) -> usize {
        match self {
            Op::PcRelative32 | Op::Absolute32Signed => 4,
            Op::Absolute64 | Op::Symbol64 | Op::Relative64 | Op::Indirect64 => 8,
        }
    }
}

/// Applies `rela` to `target`.
pub(crate) fn apply<C: Context>(
    target: &mut Target<'_>,
    rela: &Rela,
    ctx: &mut C,
) -> Result<(), Failure<C::LookupError>> {
    let op = match rela.rtype() {
        R_X86_64_NONE => return Ok(()),
        R_X86_64_64 => Op::Absolute64,
        R_X86_64_PC32 | R_X86_64_PLT32 => Op::PcRelative32,
        R_X86_64_32S => Op::Absolute32Signed,
        R_X86_64_GLOB_DAT | R_X86_64_JMP_SLOT => Op::Symbol64,
        R_X86_64_RELATIVE => Op::Relative64,
        R_X86_64_IRELATIVE => Op::Indirect64,
        R_X86_64_COPY => return Err(Failure::Copy),
        _ => return Err(Failure::UnexpectedType),
    };
    let at = usize::try_from(rela.offset).map_err(|_| Failure::OutOfSection)?;
    let end = at.checked_add(op.width()).ok_or(Failure::OutOfSection)?;
    let field = target.bytes.get_mut(at..end).ok_or(Failure::OutOfSection)?;
    let place = target.address.wrapping_add(rela.offset);
    let addend = rela.addend as u64;
    match op {
        Op::Absolute64 => {
            let s = ctx.lookup(rela.symbol()).map_err(Failure::Lookup)?;
            field.copy_from_slice(&s.wrapping_add(addend).to_le_bytes());
        }
        Op::PcRelative32 => {
            let s = ctx.lookup(rela.symbol()).map_err(Failure::Lookup)?;
            let displacement = i128::from(s) + i128::from(rela.addend) - i128::from(place);
            let value = i32::try_from(displacement).map_err(|_| Failure::Overflow(displacement))?;
            field.copy_from_slice(&value.to_le_bytes());
        }
        Op::Absolute32Signed => {
            let s = ctx.lookup(rela.symbol()).map_err(Failure::Lookup)?;
            // The field is sign-extended to 64 bits when used, so it reaches
            // the top and the bottom 2 GiB only (-mcmodel=kernel code).
            let address = s.wrapping_add(addend) as i64;
            let value = i32::try_from(address).map_err(|_| Failure::Overflow(address.into()))?;
            field.copy_from_slice(&value.to_le_bytes());
        }
        Op::Symbol64 => {
            let s = ctx.lookup(rela.symbol()).map_err(Failure::Lookup)?;
            field.copy_from_slice(&s.to_le_bytes());
        }
        Op::Relative64 => {
            field.copy_from_slice(&target.address.wrapping_add(addend).to_le_bytes());
        }
        Op::Indirect64 => {
            let resolver = target.address.wrapping_add(addend);
            let value = ctx.call_ifunc(resolver).ok_or(Failure::Ifunc(resolver))?;
            field.copy_from_slice(&value.to_le_bytes());
        }
    }
    Ok(())
}
