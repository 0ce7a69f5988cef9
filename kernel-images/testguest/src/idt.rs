//! CPU exceptions. The IDT itself is static (boot.s, loaded before
//! tg_main), so that a fault becomes a `testguest: panic: CPU exception
//! ...` line and exit status 101 instead of a triple fault (which QEMU
//! turns into a reboot loop).

/// Called by the exception stubs in boot.s, on the faulting stack.
#[no_mangle]
extern "C" fn tg_exception(vector: u64, error: u64, rip: u64) -> ! {
    panic!(
        "CPU exception {} ({}) error {:#x} at rip {:#x}",
        vector,
        name(vector),
        error,
        rip
    )
}

fn name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        _ => "reserved",
    }
}
