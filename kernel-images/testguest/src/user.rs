//! Running code in ring 3 (guest user mode).
//!
//! On PVM hosts every guest kernel-mode instruction is emulated (0.25-1
//! µs each) while guest user-mode code runs natively, so the block
//! workloads (pattern fills, compares, hashing, the benchmark's polling
//! loop) run in ring 3. `call` enters ring 3 with `iretq` (boot.s:
//! tg_user_enter) on a stack of its own, runs the closure, and the `ud2`
//! after it (#UD, about 60 µs on PVM) brings the CPU back to ring 0 on the
//! TSS's RSP0 stack, where boot.s restores the kernel context. Ring 3
//! shares everything with the kernel: the identity map has the user bit on
//! every page (boot.s). It cannot do port I/O (no serial output): the
//! workloads write their lines into a buffer that the kernel prints.
//!
//! A panic in ring 3 records its message here and executes `ud2`; `call`
//! returns it as `Fault::Panic`. Any other exception in ring 3 comes back
//! as `Fault::Exception`.

use core::arch::asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::text::Text;

extern "C" {
    fn tg_user_enter(arg: *mut u8, func: usize, stack_top: u64) -> u64;
    static tg_user_done: u8;
    static tg_user_stack_top: u8;
    static tg_rsp0_top: u8;
    static mut tg_gdt: [u64; 7];
    static tg_user_fault_error: u64;
    static tg_user_fault_rip: u64;
}

const TSS_SELECTOR: u16 = 0x28;
const TSS_GDT_INDEX: usize = 5;
const UD: u64 = 6;

/// The 64-bit TSS: only RSP0 and the I/O map base (past the limit: no
/// I/O bitmap, so ring 3 gets #GP on port I/O) matter.
#[repr(C, align(16))]
struct Tss([u32; 26]);

static mut TSS: Tss = Tss([0; 26]);
static READY: AtomicBool = AtomicBool::new(false);
/// True while ring 3 runs (read by the panic handler).
static IN_USER: AtomicBool = AtomicBool::new(false);
static mut PANIC_MSG: Text<160> = Text::new();

/// Why a ring-3 call did not return normally.
pub enum Fault {
    /// A panic in ring 3, with its message.
    Panic(&'static str),
    /// A CPU exception in ring 3 other than the final `ud2`.
    Exception { vector: u64, error: u64, rip: u64, cr2: u64 },
}

impl core::fmt::Display for Fault {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            Fault::Panic(m) => write!(f, "panic in user mode: {}", m),
            Fault::Exception { vector, error, rip, cr2 } => write!(
                f,
                "CPU exception {} error {:#x} at rip {:#x} in user mode (cr2 {:#x})",
                vector, error, rip, cr2
            ),
        }
    }
}

/// Loads the TSS (once).
fn init() {
    if READY.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: single CPU, interrupts off; the TSS and GDT are statics that
    // only this function writes, before `ltr` makes the CPU use them.
    unsafe {
        let tss = core::ptr::addr_of_mut!(TSS) as u64;
        let rsp0 = core::ptr::addr_of!(tg_rsp0_top) as u64;
        let t = &mut *core::ptr::addr_of_mut!(TSS);
        t.0[1] = rsp0 as u32;
        t.0[2] = (rsp0 >> 32) as u32;
        t.0[25] = 104 << 16; // I/O map base = limit + 1: no bitmap
        let limit = 103u64;
        let low = limit
            | (tss & 0xff_ffff) << 16
            | 0x89 << 40 // present, DPL 0, available 64-bit TSS
            | ((tss >> 24) & 0xff) << 56;
        let gdt = &mut *core::ptr::addr_of_mut!(tg_gdt);
        gdt[TSS_GDT_INDEX] = low;
        gdt[TSS_GDT_INDEX + 1] = tss >> 32;
        asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack, preserves_flags));
    }
    READY.store(true, Ordering::Relaxed);
}

/// Runs `f` in ring 3; returns when it returns (or faults).
pub fn call<F: FnMut()>(f: &mut F) -> Result<(), Fault> {
    extern "C" fn trampoline<F: FnMut()>(f: *mut u8) {
        // SAFETY: `f` is the &mut F passed to tg_user_enter below, alive
        // for the whole call.
        unsafe { (*(f as *mut F))() }
    }
    init();
    // SAFETY: ring 3 is not running; nothing else holds PANIC_MSG.
    unsafe { (*core::ptr::addr_of_mut!(PANIC_MSG)).clear() };
    IN_USER.store(true, Ordering::Relaxed);
    // SAFETY: tg_user_enter saves and restores the callee-saved registers
    // and the stack pointer around the ring-3 call; the closure only
    // touches memory the kernel could touch (same address space).
    let vector = unsafe {
        tg_user_enter(
            f as *mut F as *mut u8,
            trampoline::<F> as extern "C" fn(*mut u8) as usize,
            core::ptr::addr_of!(tg_user_stack_top) as u64,
        )
    };
    IN_USER.store(false, Ordering::Relaxed);
    // SAFETY: written by boot.s before returning here; single CPU.
    let (error, rip) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!(tg_user_fault_error)),
            core::ptr::read_volatile(core::ptr::addr_of!(tg_user_fault_rip)),
        )
    };
    let done = core::ptr::addr_of!(tg_user_done) as u64;
    if vector == UD && rip == done {
        return Ok(());
    }
    // SAFETY: PANIC_MSG is only written by the panic handler in ring 3,
    // which has ended.
    let msg = unsafe { &*core::ptr::addr_of!(PANIC_MSG) };
    if vector == UD && !msg.is_empty() {
        return Err(Fault::Panic(msg.as_str()));
    }
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    Err(Fault::Exception { vector, error, rip, cr2 })
}

/// Called by the panic handler: in ring 3, records the message and goes
/// back to ring 0 with `ud2` (ring 3 cannot print). Returns in ring 0.
pub fn panic_in_user(info: &core::panic::PanicInfo) {
    if !IN_USER.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: single CPU; only ring 3 writes PANIC_MSG, and `call` reads it
    // after ring 3 has ended.
    unsafe {
        let m = &mut *core::ptr::addr_of_mut!(PANIC_MSG);
        m.clear();
        let _ = write!(m, "{}", info.message());
        if let Some(l) = info.location() {
            let _ = write!(m, " at {}:{}", l.file(), l.line());
        }
        if m.is_empty() {
            let _ = m.write_str("(no message)");
        }
        asm!("ud2", options(noreturn, nostack));
    }
}
