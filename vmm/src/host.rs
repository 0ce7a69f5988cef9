//! Facts about the host that change what the VMM does.

use std::path::Path;

/// True on hosts whose `/dev/kvm` comes from PVM (paravirtual KVM): the
/// instruction emulator there lacks instructions Linux uses, so the VMM hides
/// them from CPUID and adds kernel parameters (see KVM-HOSTS.md).
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The host's physical memory in bytes, from `/proc/meminfo`.
pub fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&info)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let info = "MemFree: 5 kB\nMemTotal:       24576000 kB\n";
        assert_eq!(parse_mem_total(info), Some(24576000 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
    }
}
