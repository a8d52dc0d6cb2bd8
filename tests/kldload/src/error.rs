//! Why a load failed, and what the console says about it.
//!
//! Where FreeBSD prints a line for a failure, [`LoadError`]'s message is
//! that exact text (several lines when the kernel prints several), so the
//! testbed's console reads like a FreeBSD console. Where FreeBSD fails
//! silently, or does not check at all (it trusts the file's offsets and
//! truncates 32-bit relocation values without a word), the message starts
//! with `kqemu-kldload:` to mark it as this loader's own.

use alloc::format;
use alloc::string::String;
use core::fmt;

/// What went wrong, for callers and tests that branch on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not an ELF file (FreeBSD: `ENOEXEC`, no message).
    NotElf,
    /// `e_ident` class or byte order is not ELF64 little-endian.
    UnsupportedLayout,
    /// `e_ident[EI_VERSION]` or `e_version` is not `EV_CURRENT`.
    UnsupportedVersion,
    /// Not `ET_REL`: no linker class takes it as an amd64 kld.
    UnsupportedType,
    /// `e_machine` is not `EM_X86_64`.
    UnsupportedMachine,
    /// No allocated section with contents.
    NoContents,
    /// Zero or several non-empty `SHT_SYMTAB` sections.
    SymbolTableCount,
    /// The symbol table's `sh_link` is not a string table.
    InvalidSymbolStrings,
    /// An offset, size or index in the file points outside it, or the
    /// image, or is otherwise impossible.
    Malformed,
    /// Valid for FreeBSD but outside what this loader models.
    Unsupported,
    /// The memory provider had no room for the image.
    NoMemory,
    /// A relocation type FreeBSD's amd64 linker refuses.
    UnexpectedRelocation { rtype: u32 },
    /// A global symbol nothing defines, or a relocation against a global
    /// symbol that failed for another reason (FreeBSD names the symbol).
    UndefinedSymbol(String),
    /// A local relocation that FreeBSD rejects without naming a symbol.
    LocalRelocation,
    /// A 32-bit relocation whose value does not fit (FreeBSD truncates).
    Overflow,
    /// An ifunc resolver must run, and the caller cannot run it.
    Ifunc,
    /// A `MODULE_DEPEND` that the available modules do not satisfy.
    Dependency(String),
    /// A `MODULE_VERSION` already provided by a loaded file.
    InterfacePresent(String),
}

/// A failed load: its kind and the console text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    kind: ErrorKind,
    message: String,
}

impl LoadError {
    pub(crate) fn new(kind: ErrorKind, message: String) -> Self {
        LoadError { kind, message }
    }

    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The console text, without a trailing newline.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(feature = "std")]
impl std::error::Error for LoadError {}

/// A refusal with the kernel's `kldload: <file>: <what>` text.
pub(crate) fn refuse(kind: ErrorKind, path: &str, what: &str) -> LoadError {
    LoadError::new(kind, format!("kldload: {path}: {what}"))
}

/// A refusal of this loader's own: `kqemu-kldload: <file>: <what>`.
pub(crate) fn own(kind: ErrorKind, path: &str, what: String) -> LoadError {
    LoadError::new(kind, format!("kqemu-kldload: {path}: {what}"))
}

/// [`own`] for a file that contradicts itself or points outside itself.
pub(crate) fn malformed(path: &str, what: String) -> LoadError {
    own(ErrorKind::Malformed, path, what)
}
