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
        differ(
            field("XSAVE area"),
            x.xsave.as_bytes() == y.xsave.as_bytes(),
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
