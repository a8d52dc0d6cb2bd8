//! The framed channel to the host runner on COM2.
//!
//! Every frame is `MAGIC, kind: u8, length: u32 LE, payload`. The runner
//! (tests/testbed/run) demultiplexes it: guest stdout/stderr as they come,
//! `--out` files after the run, one result frame last. The format is
//! documented in tests/testbed/README.md.
//!
//! A UART moves about 1 MiB/s under TCG, slow enough to dominate the
//! cycles of a program that prints a lot. When the runner backs guest RAM
//! with a file it can read (command line `shm=1`), bulk data stays in
//! memory: guest output is appended to a staging area and only its
//! physical address and length cross the UART; `--out` files are
//! announced by the physical address of their bytes in the heap.

use crate::mem::{phys_to_virt, DMAP_BASE};
use crate::serial::{TxStuck, Uart, COM2};

const MAGIC: u8 = 0xa5;
/// Payload: the bytes the guest wrote to fd 1 / fd 2.
const KIND_STDOUT: u8 = 1;
const KIND_STDERR: u8 = 2;
/// Payload: guest path, NUL, file contents.
const KIND_OUT_FILE: u8 = 3;
/// Payload: guest path of an --out file the guest did not create.
const KIND_OUT_MISSING: u8 = 4;
/// Payload: status i32 LE, cycles u64 LE.
const KIND_RESULT: u8 = 5;
/// Payload: physical address u64 LE, length u32 LE of fd 1 / fd 2 bytes.
const KIND_STDOUT_MEM: u8 = 6;
const KIND_STDERR_MEM: u8 = 7;
/// Payload: physical address u64 LE, length u64 LE, guest path.
const KIND_OUT_FILE_MEM: u8 = 8;

/// Guest writes smaller than this go through the UART directly.
const SMALL_WRITE: usize = 32;

/// Append-only staging area for guest output, in physical memory the
/// runner can read. Bytes are never overwritten, so the runner may read
/// them whenever the frame arrives.
struct Staging {
    phys: u64,
    size: usize,
    used: usize,
}

pub struct Channel {
    uart: Uart,
    staging: Option<Staging>,
    shared_memory: bool,
}

impl Channel {
    /// `staging` is a physical region (base, size) reserved for guest
    /// output, used only when `shared_memory` says the runner can read RAM.
    pub fn open(shared_memory: bool, staging: Option<(u64, usize)>) -> Channel {
        let uart = Uart::new(COM2);
        uart.init();
        let staging = staging
            .filter(|_| shared_memory)
            .map(|(phys, size)| Staging {
                phys,
                size,
                used: 0,
            });
        Channel {
            uart,
            staging,
            shared_memory,
        }
    }

    fn send(&self, kind: u8, parts: &[&[u8]]) -> Result<(), TxStuck> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).map_err(|_| TxStuck)?;
        self.uart.write_byte(MAGIC)?;
        self.uart.write_byte(kind)?;
        self.uart.write_all(&len.to_le_bytes())?;
        parts.iter().try_for_each(|p| self.uart.write_all(p))
    }

    /// Guest bytes written to fd 1 (`stderr == false`) or fd 2.
    pub fn guest_output(&mut self, stderr: bool, bytes: &[u8]) -> Result<(), TxStuck> {
        if bytes.len() >= SMALL_WRITE {
            if let Some(staging) = self
                .staging
                .as_mut()
                .filter(|s| s.size - s.used >= bytes.len())
            {
                let phys = staging.phys + staging.used as u64;
                // SAFETY: [phys, phys + len) lies in the staging area, which
                // the kernel reserved from the frame allocator and maps in the DMAP.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        phys_to_virt(phys) as *mut u8,
                        bytes.len(),
                    )
                };
                staging.used += bytes.len();
                let kind = if stderr {
                    KIND_STDERR_MEM
                } else {
                    KIND_STDOUT_MEM
                };
                return self.send(
                    kind,
                    &[&phys.to_le_bytes(), &(bytes.len() as u32).to_le_bytes()],
                );
            }
        }
        // A UART frame holds at most u32::MAX bytes; guest writes are far smaller.
        let kind = if stderr { KIND_STDERR } else { KIND_STDOUT };
        bytes
            .chunks(1 << 20)
            .try_for_each(|chunk| self.send(kind, &[chunk]))
    }

    /// Sends a guest file back. `data` must live in the kernel heap (DMAP)
    /// for the shared-memory form.
    pub fn out_file(&self, path: &str, data: &[u8]) -> Result<(), TxStuck> {
        let virt = data.as_ptr() as u64;
        if self.shared_memory && virt >= DMAP_BASE {
            let phys = virt - DMAP_BASE;
            let len = data.len() as u64;
            return self.send(
                KIND_OUT_FILE_MEM,
                &[&phys.to_le_bytes(), &len.to_le_bytes(), path.as_bytes()],
            );
        }
        self.send(KIND_OUT_FILE, &[path.as_bytes(), &[0], data])
    }

    pub fn out_missing(&self, path: &str) -> Result<(), TxStuck> {
        self.send(KIND_OUT_MISSING, &[path.as_bytes()])
    }

    pub fn result(&self, status: i32, cycles: u64) -> Result<(), TxStuck> {
        self.send(KIND_RESULT, &[&status.to_le_bytes(), &cycles.to_le_bytes()])
    }
}
