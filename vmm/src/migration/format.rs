//! The migration stream and state file: a header, then frames.
//!
//! ```text
//! header  "VMMSTATE" u32 version
//! frame   u8 kind | u32 length | u32 crc32(payload) | payload
//! ```
//!
//! Frames follow in this order: `Config` first (the shape of the VM, which
//! the destination checks before it accepts anything else), then `Ram`
//! (and `Disk` with block migration) for as many passes as it takes, then
//! `Devices`, `Machine`, one `Vcpu` per vCPU, and `End`. A state file
//! (`file:`) keeps guest RAM as one page-aligned image right after the
//! `Config` frame instead of `Ram` frames, so a restore can map it.
//!
//! The reader trusts nothing: a wrong magic or version, an unknown kind,
//! a frame longer than [`MAX_FRAME`], a checksum that does not match, or
//! bytes that end early are each one error, before any payload is used.

use std::io::{self, Read, Write};

/// The first bytes of every stream and state file.
pub const MAGIC: [u8; 8] = *b"VMMSTATE";
/// The format this build writes and reads.
pub const VERSION: u32 = 1;
/// The longest payload a frame may have: a RAM frame's pages and header.
pub const MAX_FRAME: u32 = (RAM_FRAME_PAGES as u32) * 4096 + 64;
/// Pages a `Ram` frame carries at most.
pub const RAM_FRAME_PAGES: usize = 256;

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The VM's shape: memory, vCPUs, disks, the RAM layout, block migration.
    Config = 1,
    /// A run of guest pages: u64 first guest address, u32 page count, the pages.
    Ram = 2,
    /// A run of a disk's data (block migration).
    Disk = 3,
    /// The devices' state.
    Devices = 4,
    /// VM-wide KVM state: interrupt controllers, PIT, clock.
    Machine = 5,
    /// One vCPU's state.
    Vcpu = 6,
    /// The end of a pass over RAM (and disks): u32 pass number.
    Pass = 7,
    /// Nothing follows.
    End = 8,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Config,
            2 => Kind::Ram,
            3 => Kind::Disk,
            4 => Kind::Devices,
            5 => Kind::Machine,
            6 => Kind::Vcpu,
            7 => Kind::Pass,
            8 => Kind::End,
            _ => return None,
        })
    }
}

/// Why a stream or state file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The first bytes are not ours.
    #[error("not a vmm migration stream or state file (wrong magic)")]
    Magic,
    /// Written by a format this build does not read.
    #[error("unsupported migration format version {found} (this vmm reads version {VERSION})")]
    Version { found: u32 },
    /// A frame kind this build does not know.
    #[error("unknown frame kind {0} in the migration stream")]
    UnknownKind(u8),
    /// A frame says it is longer than any frame can be.
    #[error("a {kind:?} frame of {len} bytes is longer than the {MAX_FRAME} a frame may have")]
    TooLong { kind: Kind, len: u32 },
    /// The payload does not match its checksum.
    #[error("the {kind:?} frame is corrupt (checksum mismatch)")]
    Checksum { kind: Kind },
    /// The stream ended before the `End` frame.
    #[error("the migration stream ended early (truncated)")]
    Truncated,
    /// The return path carried a reply kind we do not know.
    #[error("unknown reply {0} on the migration return path")]
    UnknownReply(u8),
    /// The return path carried an over-long reply.
    #[error("a reply of {0} bytes on the migration return path is too long")]
    TooLongReply(u32),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Writes the header.
pub fn write_header<W: Write + ?Sized>(w: &mut W) -> io::Result<()> {
    w.write_all(&MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())
}

/// Bytes of the header.
pub const HEADER_LEN: u64 = 12;

/// Reads and checks the header.
pub fn read_header(r: &mut impl Read) -> Result<(), FormatError> {
    let mut head = [0u8; HEADER_LEN as usize];
    read_exact(r, &mut head)?;
    if head[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let found = u32::from_le_bytes(head[8..].try_into().expect("4 bytes"));
    if found != VERSION {
        return Err(FormatError::Version { found });
    }
    Ok(())
}

/// Writes one frame; `parts` are its payload, concatenated (so a RAM frame's
/// pages go out from guest memory without a copy).
pub fn write_frame<W: Write + ?Sized>(w: &mut W, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    debug_assert!(len <= MAX_FRAME as usize, "{kind:?} frame of {len} bytes");
    let mut crc = crc32fast::Hasher::new();
    for p in parts {
        crc.update(p);
    }
    let mut head = [0u8; 9];
    head[0] = kind as u8;
    head[1..5].copy_from_slice(&(len as u32).to_le_bytes());
    head[5..9].copy_from_slice(&crc.finalize().to_le_bytes());
    w.write_all(&head)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Bytes a frame takes besides its payload.
pub const FRAME_OVERHEAD: u64 = 9;

/// Reads the next frame into `payload` (reused between calls).
pub fn read_frame(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Kind, FormatError> {
    let mut head = [0u8; 9];
    read_exact(r, &mut head)?;
    let kind = Kind::from_u8(head[0]).ok_or(FormatError::UnknownKind(head[0]))?;
    let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes"));
    if len > MAX_FRAME {
        return Err(FormatError::TooLong { kind, len });
    }
    payload.resize(len as usize, 0);
    read_exact(r, payload)?;
    if crc32fast::hash(payload) != crc {
        return Err(FormatError::Checksum { kind });
    }
    Ok(kind)
}

/// What the destination tells the source on the return path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The configuration matches: send the rest.
    Ready,
    /// Everything is loaded and the guest runs here now.
    Done,
    /// The destination gave up, saying why.
    Error(String),
}

/// The longest text a reply may carry.
const MAX_REPLY: u32 = 4096;

/// Sends a reply on the return path.
pub fn write_reply(w: &mut impl Write, reply: &Reply) -> io::Result<()> {
    let (code, text) = match reply {
        Reply::Ready => (1u8, ""),
        Reply::Done => (2, ""),
        Reply::Error(text) => (3, text.as_str()),
    };
    let text = &text.as_bytes()[..text.len().min(MAX_REPLY as usize)];
    let mut out = vec![code];
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text);
    w.write_all(&out)?;
    w.flush()
}

/// Reads a reply from the return path.
pub fn read_reply(r: &mut impl Read) -> Result<Reply, FormatError> {
    let mut head = [0u8; 5];
    read_exact(r, &mut head)?;
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes"));
    if len > MAX_REPLY {
        return Err(FormatError::TooLongReply(len));
    }
    let mut text = vec![0u8; len as usize];
    read_exact(r, &mut text)?;
    match head[0] {
        1 => Ok(Reply::Ready),
        2 => Ok(Reply::Done),
        3 => Ok(Reply::Error(String::from_utf8_lossy(&text).into_owned())),
        other => Err(FormatError::UnknownReply(other)),
    }
}

/// `read_exact`, with an early end named as truncation.
fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), FormatError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FormatError::Truncated,
        _ => FormatError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out).unwrap();
        write_frame(&mut out, Kind::Config, &[b"abc", b"def"]).unwrap();
        write_frame(&mut out, Kind::End, &[]).unwrap();
        out
    }

    #[test]
    fn frames_read_back_as_written() {
        let bytes = stream();
        let mut r = &bytes[..];
        read_header(&mut r).unwrap();
        let mut payload = Vec::new();
        assert_eq!(read_frame(&mut r, &mut payload).unwrap(), Kind::Config);
        assert_eq!(payload, b"abcdef");
        assert_eq!(read_frame(&mut r, &mut payload).unwrap(), Kind::End);
        assert!(payload.is_empty());
        assert!(r.is_empty());
    }

    #[test]
    fn every_truncation_is_reported_as_such() {
        let bytes = stream();
        for cut in 0..bytes.len() - FRAME_OVERHEAD as usize {
            let mut r = &bytes[..cut];
            let mut payload = Vec::new();
            let result = read_header(&mut r)
                .and_then(|_| read_frame(&mut r, &mut payload))
                .and_then(|_| read_frame(&mut r, &mut payload));
            assert!(
                matches!(result, Err(FormatError::Truncated)),
                "cut at {cut}: {result:?}"
            );
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_caught() {
        let bytes = stream();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            let mut r = &bad[..];
            let mut payload = Vec::new();
            let result = read_header(&mut r)
                .and_then(|_| read_frame(&mut r, &mut payload))
                .and_then(|k| {
                    assert_eq!(k, Kind::Config);
                    assert_eq!(payload, b"abcdef");
                    read_frame(&mut r, &mut payload)
                })
                .map(|k| assert_eq!(k, Kind::End));
            assert!(result.is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn wrong_magic_version_kind_and_length_are_named() {
        let mut r: &[u8] = b"QEVMxxxx\x01\0\0\0";
        assert_eq!(
            read_header(&mut r).unwrap_err().to_string(),
            "not a vmm migration stream or state file (wrong magic)"
        );
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            read_header(&mut &v[..]).unwrap_err().to_string(),
            "unsupported migration format version 7 (this vmm reads version 1)"
        );
        let mut payload = Vec::new();
        let unknown = [99u8, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut &unknown[..], &mut payload),
            Err(FormatError::UnknownKind(99))
        ));
        let mut long = vec![Kind::Ram as u8];
        long.extend_from_slice(&u32::MAX.to_le_bytes());
        long.extend_from_slice(&[0; 4]);
        assert!(matches!(
            read_frame(&mut &long[..], &mut payload),
            Err(FormatError::TooLong { .. })
        ));
        assert!(payload.capacity() < 1 << 20, "no allocation for a lie");
    }
}
