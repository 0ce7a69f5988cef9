//! Registers and tables a vCPU starts with: the boot GDT, identity page
//! tables for 64-bit entry, and segment/control registers for the two entry
//! modes (PVH's 32-bit protected mode and Linux's 64-bit boot protocol).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{kvm, Error, Result};

/// Where the boot GDT lives.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) boot IDT lives.
pub const IDT_ADDR: u64 = 0x520;
/// Top of the stack a 64-bit kernel starts with.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The identity page tables: PML4, PDPT, then one page directory.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;

// GDT slots. Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 and
// __BOOT_DS = 0x18; PVH leaves the selectors to us and takes a 32-bit CS.
const CODE32_SEL: u16 = 0x08;
const CODE64_SEL: u16 = 0x10;
const DATA_SEL: u16 = 0x18;
const TSS_SEL: u16 = 0x20;
const GDT: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff, // 32-bit code, flat
    0x00af_9b00_0000_ffff, // 64-bit code
    0x00cf_9300_0000_ffff, // data, flat
    0x008f_8b00_0000_ffff, // busy 32-bit TSS
];

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `ebx` = start info.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode, identity paging, `rsi` = zero page.
    Linux64 { entry: u64, zero_page: u64 },
}

fn write(mem: &GuestMemoryMmap, what: &'static str, addr: u64, bytes: &[u8]) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| Error::GuestWrite {
            what,
            reason: e.to_string(),
        })
}

/// Writes the GDT, IDT and the identity page tables (first 1 GiB in 2 MiB pages).
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(mem, "boot GDT", GDT_ADDR, &gdt)?;
    write(mem, "boot IDT", IDT_ADDR, &0u64.to_le_bytes())?;
    write(
        mem,
        "page tables",
        PML4_ADDR,
        &(PDPT_ADDR | 0x3).to_le_bytes(),
    )?;
    write(
        mem,
        "page tables",
        PDPT_ADDR,
        &(PD_ADDR | 0x3).to_le_bytes(),
    )?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    write(mem, "page tables", PD_ADDR, &pd)
}

/// A segment register loaded from GDT descriptor `selector`.
fn segment(selector: u16) -> kvm_segment {
    let desc = GDT[usize::from(selector >> 3)];
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g: ((desc >> 55) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The special registers for `mode`, on top of what KVM reset the vCPU to.
pub fn sregs_for(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let (code, long) = match mode {
        EntryMode::Pvh { .. } => (CODE32_SEL, false),
        EntryMode::Linux64 { .. } => (CODE64_SEL, true),
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(code);
    let data = segment(DATA_SEL);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(TSS_SEL);
    sregs.tr.limit = 0xfffff;
    sregs.cr0 = CR0_PE | CR0_ET;
    if long {
        sregs.cr0 |= CR0_PG;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    } else {
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    sregs
}

/// The general registers for `mode`.
pub fn regs_for(mode: EntryMode) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
        EntryMode::Linux64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
    }
    regs
}

/// Puts the boot vCPU at the kernel's entry point.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mode: EntryMode) -> Result<()> {
    let sregs = vcpu
        .get_sregs()
        .map_err(kvm("read vCPU special registers"))?;
    vcpu.set_sregs(&sregs_for(sregs, mode))
        .map_err(kvm("set vCPU special registers"))?;
    vcpu.set_regs(&regs_for(mode))
        .map_err(kvm("set vCPU registers"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set vCPU FPU state"))
}

/// Wires the local APIC's LINT0 to the 8259 (ExtINT) and LINT1 to NMI, as
/// firmware would, matching the MP table's local interrupt entries.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 7 << 8;
    const DELIVERY_NMI: u32 = 4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(kvm("read the local APIC"))?;
    for (reg, mode) in [(LVT_LINT0, DELIVERY_EXTINT), (LVT_LINT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | mode;
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("set the local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_enters_flat_protected_mode_without_paging() {
        let s = sregs_for(
            kvm_sregs::default(),
            EntryMode::Pvh {
                entry: 0x100000,
                start_info: 0x6000,
            },
        );
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(s.efer, 0);
        assert_eq!((s.cs.db, s.cs.l, s.cs.type_), (1, 0, 0xb));
        assert_eq!((s.ds.type_, s.ds.limit, s.ds.g), (3, 0xffff_ffff, 1));
        let r = regs_for(EntryMode::Pvh {
            entry: 0x100000,
            start_info: 0x6000,
        });
        assert_eq!((r.rip, r.rbx), (0x100000, 0x6000));
    }

    #[test]
    fn linux64_enters_long_mode_with_the_boot_selectors() {
        let mode = EntryMode::Linux64 {
            entry: 0x1000000,
            zero_page: 0x7000,
        };
        let s = sregs_for(kvm_sregs::default(), mode);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x10, 1, 0));
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.cr3, PML4_ADDR);
        let r = regs_for(mode);
        assert_eq!((r.rip, r.rsi, r.rsp), (0x1000000, 0x7000, BOOT_STACK));
    }
}
