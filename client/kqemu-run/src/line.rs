//! One output line, formatted without a heap.

use core::fmt;

/// Longest line the client prints; longer text is cut.
const LINE_MAX: usize = 200;

pub struct Line {
    bytes: [u8; LINE_MAX],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            bytes: [0; LINE_MAX],
            len: 0,
        }
    }
}

impl Line {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(LINE_MAX - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
