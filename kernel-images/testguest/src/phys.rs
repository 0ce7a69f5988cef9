//! Reads of guest-physical memory through the boot identity map.
//!
//! The boot code maps the first 4 GiB 1:1; anything else is refused, and
//! so is address 0. Reads are unaligned-safe.

/// End of the identity map set up in boot.s.
pub const MAPPED_END: u64 = 1 << 32;

/// True if `[addr, addr + len)` is non-null and inside the identity map.
pub fn range_ok(addr: u64, len: u64) -> bool {
    addr != 0 && matches!(addr.checked_add(len), Some(end) if end <= MAPPED_END)
}

/// The bytes at `[addr, addr + len)`; the caller checked `range_ok`.
pub fn bytes(addr: u64, len: u64) -> &'static [u8] {
    debug_assert!(range_ok(addr, len));
    // SAFETY: identity-mapped guest memory; only read, never written
    // while the slice lives.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) }
}

pub fn read_u8(addr: u64) -> u8 {
    // SAFETY: identity-mapped; the caller checked the range.
    unsafe { core::ptr::read(addr as *const u8) }
}

pub fn read_u16(addr: u64) -> u16 {
    // SAFETY: as read_u8.
    unsafe { core::ptr::read_unaligned(addr as *const u16) }
}

pub fn read_u32(addr: u64) -> u32 {
    // SAFETY: as read_u8.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

pub fn read_u64(addr: u64) -> u64 {
    // SAFETY: as read_u8.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

/// 8-bit checksum as used by the MP and ACPI tables: the sum of all
/// bytes, which must be 0.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}
