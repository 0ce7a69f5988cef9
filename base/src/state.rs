//! The byte encoding of saved VM state (snapshot files, migration streams):
//! little-endian integers and length-prefixed byte strings, written by
//! [`StateWriter`] and read back by [`StateReader`].
//!
//! A state file or stream is hostile input, so every read names what it
//! was reading and fails cleanly when the bytes run out or a value is out
//! of range; nothing here panics on any input.

/// Why saved state could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The bytes ended in the middle of a value.
    #[error("the saved state is truncated: {what} needs {need} bytes, {left} are left")]
    Truncated {
        what: &'static str,
        need: usize,
        left: usize,
    },
    /// A value is out of range or contradicts another.
    #[error("the saved state is invalid: {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// Bytes are left over after the last value of a section.
    #[error("the saved state is invalid: {left} unexpected bytes after {what}")]
    Trailing { what: &'static str, left: usize },
}

impl StateError {
    /// An out-of-range `what`, saying why.
    pub fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

/// Appends values to a byte buffer.
#[derive(Debug, Default)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a bool as one byte, 0 or 1.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Appends a little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends bytes as they are (the reader must know their length).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    /// Appends a u32 length, then the bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        let len = u32::try_from(bytes.len()).expect("saved state values are far below 4 GiB");
        self.u32(len).raw(bytes)
    }

    /// Appends a string as [`bytes`](Self::bytes).
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// The bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    /// The bytes written.
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads values back from a byte slice, in the order they were written.
#[derive(Debug, Clone)]
pub struct StateReader<'a> {
    data: &'a [u8],
}

impl<'a> StateReader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    /// Takes the next `len` bytes.
    pub fn raw(&mut self, what: &'static str, len: usize) -> Result<&'a [u8], StateError> {
        if self.data.len() < len {
            return Err(StateError::Truncated {
                what,
                need: len,
                left: self.data.len(),
            });
        }
        let (head, tail) = self.data.split_at(len);
        self.data = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], StateError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.raw(what, N)?);
        Ok(out)
    }

    /// Reads one byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, StateError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// Reads a bool written as 0 or 1; any other byte is invalid.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, StateError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(StateError::invalid(what, format!("{other} is not 0 or 1"))),
        }
    }

    /// Reads a little-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    /// Reads a little-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// Reads a little-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads a u32 length and that many bytes.
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], StateError> {
        let len = self.u32(what)? as usize;
        self.raw(what, len)
    }

    /// Reads a string written by [`StateWriter::str`]; it must be UTF-8.
    pub fn str(&mut self, what: &'static str) -> Result<&'a str, StateError> {
        std::str::from_utf8(self.bytes(what)?)
            .map_err(|_| StateError::invalid(what, "the text is not UTF-8"))
    }

    /// Checks that everything was read: `what` names the section.
    pub fn finish(self, what: &'static str) -> Result<(), StateError> {
        match self.data.len() {
            0 => Ok(()),
            left => Err(StateError::Trailing { what, left }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_in_the_order_written() {
        let mut w = StateWriter::new();
        w.u8(7)
            .bool(true)
            .u16(0xbeef)
            .u32(0xdead_beef)
            .u64(u64::MAX - 1)
            .str("vda")
            .bytes(&[1, 2, 3])
            .raw(&[9; 4]);
        let bytes = w.into_vec();
        let mut r = StateReader::new(&bytes);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert!(r.bool("b").unwrap());
        assert_eq!(r.u16("c").unwrap(), 0xbeef);
        assert_eq!(r.u32("d").unwrap(), 0xdead_beef);
        assert_eq!(r.u64("e").unwrap(), u64::MAX - 1);
        assert_eq!(r.str("f").unwrap(), "vda");
        assert_eq!(r.bytes("g").unwrap(), &[1, 2, 3]);
        assert_eq!(r.raw("h", 4).unwrap(), &[9; 4]);
        r.finish("test").unwrap();
    }

    #[test]
    fn every_truncation_is_an_error_naming_the_value() {
        let mut w = StateWriter::new();
        w.u64(1).str("node0");
        let bytes = w.into_vec();
        for cut in 0..bytes.len() {
            let mut r = StateReader::new(&bytes[..cut]);
            let err = r
                .u64("queue address")
                .and_then(|_| r.str("node name").map(|_| ()))
                .unwrap_err();
            assert!(matches!(err, StateError::Truncated { .. }), "{err}");
        }
        let err = StateReader::new(&[1, 0]).u32("queue size").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the saved state is truncated: queue size needs 4 bytes, 2 are left"
        );
    }

    #[test]
    fn a_huge_length_prefix_is_refused_without_allocating() {
        let bytes = u32::MAX.to_le_bytes();
        let err = StateReader::new(&bytes).bytes("serial").unwrap_err();
        assert!(matches!(err, StateError::Truncated { need, .. } if need == u32::MAX as usize));
    }

    #[test]
    fn bad_bools_text_and_leftovers_are_refused() {
        assert!(StateReader::new(&[2]).bool("ready").is_err());
        let mut w = StateWriter::new();
        w.bytes(&[0xff, 0xfe]);
        let bytes = w.into_vec();
        assert!(StateReader::new(&bytes).str("id").is_err());
        let r = StateReader::new(&[0]);
        assert_eq!(
            r.finish("serial").unwrap_err().to_string(),
            "the saved state is invalid: 1 unexpected bytes after serial"
        );
    }
}
