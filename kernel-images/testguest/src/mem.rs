//! A bump allocator over the RAM above the image (virtqueues, request
//! headers, data buffers). Nothing is freed one by one: `mark`/`release`
//! give the workloads a scratch area that is reset after each one.
//! Memory is handed out as is (not zeroed): callers zero what needs it.

use core::sync::atomic::{AtomicU64, Ordering};

extern "C" {
    static __kernel_end: u8;
}

static NEXT: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);

/// First address after the loaded image (and its stacks).
pub fn kernel_end() -> u64 {
    core::ptr::addr_of!(__kernel_end) as u64
}

/// Uses `[start, end)`, clipped to the identity map.
pub fn init(start: u64, end: u64) {
    let start = (start + 4095) & !4095;
    let end = end.min(crate::phys::MAPPED_END);
    NEXT.store(start, Ordering::Relaxed);
    END.store(end.max(start), Ordering::Relaxed);
}

/// `size` bytes aligned to `align` (a power of two); None if RAM is out.
pub fn alloc(size: u64, align: u64) -> Option<u64> {
    let next = NEXT.load(Ordering::Relaxed);
    let addr = next.checked_add(align - 1)? & !(align - 1);
    let end = addr.checked_add(size)?;
    if end > END.load(Ordering::Relaxed) {
        return None;
    }
    NEXT.store(end, Ordering::Relaxed);
    Some(addr)
}

pub fn mark() -> u64 {
    NEXT.load(Ordering::Relaxed)
}

/// Frees everything allocated since `mark`.
pub fn release(mark: u64) {
    NEXT.store(mark, Ordering::Relaxed);
}

/// Zeroes `[addr, addr + len)`.
pub fn zero(addr: u64, len: u64) {
    // SAFETY: callers pass memory they allocated here.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len as usize) }
}
