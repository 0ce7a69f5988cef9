//! The test guest: a tiny PVH kernel that runs in guest kernel mode,
//! prints what the VMM gave it on the serial port and exits with the
//! status chosen on its command line. Output (one fact per line):
//!
//! ```text
//! testguest: start
//! testguest: cmdline=<the command line, as given>
//! testguest: cpus=<enabled processors in the MP table, 1 without one>
//! testguest: memory=<bytes of RAM in the PVH memory map>
//! testguest: exit=<status>
//! ```
//!
//! With `blk=` / `blk.bench=`, `testguest: blk ...` lines (the virtio-blk
//! devices and workloads, blk_run.rs) come before the exit line.
//!
//! plus `testguest: warning: ...` / `testguest: error: ...` lines where
//! something is off, and `testguest: panic: <message>` (status 101) on a
//! panic or CPU exception. `idle` replaces the exit line with
//! `testguest: idle` and halts forever; `crash=triple-fault` and
//! `crash=emulation` replace it with `testguest: crash=<how>` and stop the
//! VM that way (crash.rs). See README.md.

#![no_std]
#![no_main]

mod bench;
mod blk;
mod blk_run;
mod blk_work;
mod cmdline;
mod crash;
mod exit;
mod idt;
mod mem;
mod mptable;
mod phys;
mod port;
mod pvh;
mod serial;
mod text;
mod tsc;
mod user;
mod virtio;

use core::sync::atomic::{AtomicBool, Ordering};
use serial::{put, put_bytes, put_dec};

core::arch::global_asm!(include_str!("boot.s"), options(att_syntax));

/// Exit status after a panic or CPU exception.
const PANIC_STATUS: u8 = 101;
/// Exit status when a block workload FAILED (whatever `exit=` says).
const BLK_FAILED_STATUS: u8 = 1;

/// Entered from boot.s in long mode, with the physical address of the
/// PVH start info.
#[no_mangle]
extern "C" fn tg_main(start_info: u64) -> ! {
    put("testguest: start\n");

    let info = pvh::StartInfo::read(start_info);
    let cmdline = info.as_ref().map_or(&[][..], |i| i.cmdline);
    put("testguest: cmdline=");
    put_bytes(cmdline);
    put("\n");

    let options = cmdline::parse(cmdline, |key, value| {
        put("testguest: error: bad ");
        put(key);
        put(" value '");
        put_bytes(value);
        put("'\n");
    });

    let cpus = match mptable::count_cpus() {
        mptable::Cpus::Found(n) => n,
        mptable::Cpus::NoTable | mptable::Cpus::Broken => 1,
    };
    put("testguest: cpus=");
    put_dec(cpus);
    put("\n");

    put("testguest: memory=");
    put_dec(info.as_ref().map_or(0, |i| i.ram_bytes()));
    put("\n");

    let mut status = options.exit;
    if options.blk.wanted() && blk_run::run(&options.blk, info.as_ref()) {
        status = BLK_FAILED_STATUS;
    }
    match options.crash {
        Some(crash) => {
            put("testguest: crash=");
            put(crash.name());
            put("\n");
            match crash {
                cmdline::Crash::TripleFault => crash::triple_fault(),
                cmdline::Crash::Emulation => {
                    crash::emulation();
                    // Hardware KVM runs popcnt natively.
                    put("testguest: crash=emulation did not stop the VM\n");
                    status = 0;
                }
            }
        }
        None if options.idle => {
            put("testguest: idle\n");
            exit::halt_forever()
        }
        None => {}
    }

    put("testguest: exit=");
    put_dec(status as u64);
    put("\n");
    exit::exit(status)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // In ring 3: back to ring 0 with the message (user.rs).
    user::panic_in_user(info);
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::Relaxed) {
        serial::say(format_args!("panic: {}", info.message()));
    }
    exit::exit(PANIC_STATUS)
}
