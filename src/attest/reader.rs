//! A cursor over TPM big-endian marshalling: every read is bounds-checked, every TPM2B has
//! a size cap, and a short input is an error naming the structure, never a panic.

use super::{AttestError, malformed};

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `buf`, which errors call `what` (`ek_pub`, `quote`, ...).
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, what }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], AttestError> {
        if self.buf.len() < n {
            return Err(malformed(self.what, "truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, AttestError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, AttestError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, AttestError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A TPM2B: u16 size, then that many bytes (at most `max`).
    pub(crate) fn tpm2b(&mut self, max: usize) -> Result<&'a [u8], AttestError> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(malformed(
                self.what,
                format!("a field of {n} bytes is over {max}"),
            ));
        }
        self.take(n)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Fails unless the whole input has been read.
    pub(crate) fn done(&self) -> Result<(), AttestError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.what, "trailing bytes"))
        }
    }
}
