//! Reading a state file's saved state back, to compare two snapshots:
//! restoring a snapshot and saving it again must give the same device and
//! vCPU state (crosvm's check that snapshot, restore, snapshot is stable).

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;

use base::state::StateReader;
use zerocopy::IntoBytes;

use super::cpu::VcpuState;
use super::format::{self, Kind};
use super::machine::MachineState;
use super::shape::Shape;
use super::MigrationError;

/// `MSR_IA32_TSC`: counts on while a VM waits.
const MSR_IA32_TSC: u32 = 0x10;
/// The LAPIC timer's current count register, which counts down with time.
const LAPIC_CURRENT_COUNT: std::ops::Range<usize> = 0x390..0x394;

/// What a state file holds besides RAM.
struct Saved {
    shape: Shape,
    devices: Vec<u8>,
    machine: MachineState,
    vcpus: Vec<VcpuState>,
}

fn read(path: &Path) -> Result<Saved, MigrationError> {
    let file = File::open(path).map_err(|source| MigrationError::Io {
        what: "cannot open the state file",
        source,
    })?;
    let mut r = BufReader::new(file);
    format::read_header(&mut r)?;
    let mut payload = Vec::new();
    if format::read_frame(&mut r, &mut payload)? != Kind::Config {
        return Err(base::state::StateError::invalid("first frame", "not a Config frame").into());
    }
    let shape = Shape::decode(&mut StateReader::new(&payload))?;
    let Some(offset) = shape.ram_offset else {
        return Err(base::state::StateError::invalid("Config frame", "not a state file").into());
    };
    r.seek(SeekFrom::Start(offset + shape.memory))
        .map_err(MigrationError::receive)?;
    let (mut devices, mut machine, mut vcpus) = (None, None, Vec::new());
    loop {
        match format::read_frame(&mut r, &mut payload)? {
            Kind::Devices => devices = Some(payload.clone()),
            Kind::Machine => machine = Some(MachineState::decode(&mut StateReader::new(&payload))?),
            Kind::Vcpu => {
                let mut sr = StateReader::new(&payload);
                let _index = sr.u32("vCPU index")?;
                vcpus.push(VcpuState::decode(&mut sr)?);
            }
            Kind::End => break,
            _ => {}
        }
    }
    let missing =
        |what| base::state::StateError::invalid("End frame", format!("{what} never came"));
    Ok(Saved {
        shape,
        devices: devices.ok_or_else(|| missing("the devices' state"))?,
        machine: machine.ok_or_else(|| missing("the machine state"))?,
        vcpus,
    })
}

/// Where the XSAVE header's `XSTATE_BV` lies in the standard-format area.
const XSTATE_BV: std::ops::Range<usize> = 512..520;

/// An XSAVE area (standard format) as the state it stands for: every
/// component whose `XSTATE_BV` bit is clear written out as its initial
/// value, and the bits themselves left out. `XRSTOR` loads a clear bit's
/// component as its initial value, so an area that marks a component in
/// use with initial contents means the same as one that does not; which
/// of the two KVM hands back depends on whether the vCPU ran in between
/// (the processor's init optimisation), not on the guest.
fn xsave_meaning(area: &[u8], cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<u8> {
    let mut out = area.to_vec();
    let Some(bv) = xstate_bv(area) else {
        return out;
    };
    if bv & 1 == 0 {
        // x87: FCW 0x037f, then FSW, FTW, FOP, FIP, FDP and ST0-7 all zero.
        out[0..24].fill(0);
        out[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        out[32..160].fill(0);
    }
    if bv & 2 == 0 {
        out[160..416].fill(0); // XMM0-15
    }
    if bv & 6 == 0 {
        // MXCSR belongs to SSE and AVX state both.
        out[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    }
    for e in cpuid
        .iter()
        .filter(|e| e.function == 0xd && (2..63).contains(&e.index))
    {
        let (offset, size) = (e.ebx as usize, e.eax as usize);
        if bv & (1 << e.index) == 0 && offset + size <= out.len() && size > 0 {
            out[offset..offset + size].fill(0);
        }
    }
    out[XSTATE_BV].fill(0);
    out
}

/// The area's `XSTATE_BV`; none if the area is too short to have one.
fn xstate_bv(area: &[u8]) -> Option<u64> {
    let bytes = area.get(XSTATE_BV)?;
    Some(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
}

/// The byte ranges where `a` and `b` differ, as `start..end` joined by
/// commas (with both sides' bytes in hex when a range is short), so that a
/// difference can be placed in its structure's layout.
fn differing_ranges(a: &[u8], b: &[u8]) -> String {
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
    for i in (0..a.len().min(b.len())).filter(|&i| a[i] != b[i]) {
        match ranges.last_mut() {
            Some(r) if r.end == i => r.end += 1,
            _ => ranges.push(i..i + 1),
        }
    }
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let text: Vec<String> = ranges
        .iter()
        .map(|r| match r.len() {
            // Short ones with their values, to read against the layout.
            1..=32 => format!(
                "bytes {r:?}: {} -> {}",
                hex(&a[r.clone()]),
                hex(&b[r.clone()])
            ),
            _ => format!("bytes {r:?}"),
        })
        .collect();
    text.join(", ")
}

/// The differences between two state files' VM shape, device state,
/// interrupt controllers and vCPU state, leaving out what moves on while
/// a VM merely exists (the TSC, the LAPIC timer's count, the PIT, the
/// kvmclock) and guest RAM. Empty when they are the same.
pub fn state_differences(a: &Path, b: &Path) -> Result<Vec<String>, MigrationError> {
    let (a, b) = (read(a)?, read(b)?);
    let mut diffs = Vec::new();
    let mut differ = |what: String, same: bool| {
        if !same {
            diffs.push(what);
        }
    };
    let (mut sa, mut sb) = (a.shape.clone(), b.shape.clone());
    (sa.ram_offset, sb.ram_offset) = (None, None);
    differ("the VM's shape".into(), sa == sb);
    differ("the devices' state".into(), a.devices == b.devices);
    for (i, (x, y)) in a
        .machine
        .irqchips
        .iter()
        .zip(&b.machine.irqchips)
        .enumerate()
    {
        differ(
            format!("interrupt controller {i}"),
            x.as_bytes() == y.as_bytes(),
        );
    }
    differ("the vCPU count".into(), a.vcpus.len() == b.vcpus.len());
    for (i, (x, y)) in a.vcpus.iter().zip(&b.vcpus).enumerate() {
        let field = |name: &str| format!("vCPU {i}'s {name}");
        differ(field("CPUID"), x.cpuid.as_bytes() == y.cpuid.as_bytes());
        differ(field("registers"), x.regs.as_bytes() == y.regs.as_bytes());
        differ(
            field("special registers"),
            x.sregs.as_bytes() == y.sregs.as_bytes(),
        );
        let (xa, ya) = (
            xsave_meaning(x.xsave.as_bytes(), &x.cpuid),
            xsave_meaning(y.xsave.as_bytes(), &y.cpuid),
        );
        let bv = |area: &[u8]| xstate_bv(area).unwrap_or(0);
        differ(
            field(&format!(
                "XSAVE area ({}; XSTATE_BV {:#x} -> {:#x})",
                differing_ranges(&xa, &ya),
                bv(x.xsave.as_bytes()),
                bv(y.xsave.as_bytes())
            )),
            xa == ya,
        );
        differ(field("XCRs"), x.xcrs.as_bytes() == y.xcrs.as_bytes());
        differ(
            field("debug registers"),
            x.debugregs.as_bytes() == y.debugregs.as_bytes(),
        );
        differ(
            field("MP state"),
            x.mp_state.as_bytes() == y.mp_state.as_bytes(),
        );
        differ(field("events"), x.events.as_bytes() == y.events.as_bytes());
        let lapic = |s: &VcpuState| {
            let mut regs = s.lapic.as_bytes().to_vec();
            regs[LAPIC_CURRENT_COUNT].fill(0);
            regs
        };
        differ(field("local APIC"), lapic(x) == lapic(y));
        let msrs = |s: &VcpuState| -> Vec<(u32, u64)> {
            s.msrs
                .iter()
                .copied()
                .filter(|&(i, _)| i != MSR_IA32_TSC)
                .collect()
        };
        let (mx, my) = (msrs(x), msrs(y));
        if mx.len() != my.len() {
            differ(field("MSR list"), false);
        }
        for ((ix, vx), (iy, vy)) in mx.iter().zip(&my) {
            differ(format!("vCPU {i}'s MSR {ix:#x}"), ix == iy && vx == vy);
        }
    }
    Ok(diffs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    /// CPUID leaf 0xD's AVX sub-leaf: 256 bytes at offset 576.
    fn avx_layout() -> Vec<kvm_cpuid_entry2> {
        vec![kvm_cpuid_entry2 {
            function: 0xd,
            index: 2,
            eax: 256,
            ebx: 576,
            ..Default::default()
        }]
    }

    /// A 4 KiB area with every component in its initial state and none marked in use.
    fn initial_area() -> Vec<u8> {
        let mut area = vec![0u8; 4096];
        area[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        area
    }

    #[test]
    fn components_marked_in_use_with_initial_contents_mean_the_same_as_unmarked_ones() {
        let unmarked = initial_area();
        let mut marked = initial_area();
        marked[XSTATE_BV].copy_from_slice(&0b111u64.to_le_bytes());
        assert_eq!(
            xsave_meaning(&unmarked, &avx_layout()),
            xsave_meaning(&marked, &avx_layout())
        );
    }

    #[test]
    fn a_register_value_in_a_component_in_use_is_a_difference() {
        let mut a = initial_area();
        a[XSTATE_BV].copy_from_slice(&0b110u64.to_le_bytes());
        let mut b = a.clone();
        b[600] = 0x5a; // inside the upper half of YMM1
        let (ma, mb) = (
            xsave_meaning(&a, &avx_layout()),
            xsave_meaning(&b, &avx_layout()),
        );
        assert_ne!(ma, mb);
        assert_eq!(differing_ranges(&ma, &mb), "bytes 600..601: 00 -> 5a");
    }

    #[test]
    fn leftovers_in_a_component_not_in_use_are_not_a_difference() {
        let a = initial_area();
        let mut b = initial_area();
        b[200] = 1; // XMM2, with the SSE bit clear
        b[700] = 1; // the AVX component, with its bit clear
        assert_eq!(
            xsave_meaning(&a, &avx_layout()),
            xsave_meaning(&b, &avx_layout())
        );
    }

    #[test]
    fn differing_ranges_joins_neighbouring_bytes() {
        let a = [0u8; 8];
        let b = [0, 1, 1, 0, 0, 1, 0, 0];
        assert_eq!(
            differing_ranges(&a, &b),
            "bytes 1..3: 0000 -> 0101, bytes 5..6: 00 -> 01"
        );
    }
}
