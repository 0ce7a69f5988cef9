//! Tells the integration tests what this host can run, so tests that cannot
//! run here show up as ignored with the reason, never as a silent pass.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_kvm)");
    println!("cargo::rustc-check-cfg=cfg(pvm_host)");
    println!("cargo::rustc-check-cfg=cfg(not_root)");
    println!("cargo::rustc-check-cfg=cfg(no_loop)");
    // Missing paths make cargo rerun this script every build: the answers
    // are about the machine, not the source.
    println!("cargo::rerun-if-changed=/dev/kvm");
    println!("cargo::rerun-if-changed=/sys/module/kvm_pvm");

    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm {
        println!("cargo::rustc-cfg=no_kvm");
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        println!("cargo::rustc-cfg=pvm_host");
    }
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        println!("cargo::rustc-cfg=not_root");
    }
    // Loop devices (a 4K-sector disk for direct=on) need root and the loop driver.
    if !root || !Path::new("/dev/loop-control").exists() {
        println!("cargo::rustc-cfg=no_loop");
    }
}
