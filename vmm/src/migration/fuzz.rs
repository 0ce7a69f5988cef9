//! The incoming stream's parsing without KVM, for the `migration_stream`
//! fuzz target and the mutation test below: the header and Config frame
//! as the destination reads them, then each frame through the decoders
//! the destination's loader uses (RAM into a small guest memory, the
//! serial port and the virtio device count, the machine and vCPU state).
//! Whatever the bytes, each step ends in an error or goes on; none panics.

use std::sync::Arc;

use base::state::StateReader;
use devices::legacy::Serial;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::cpu::VcpuState;
use super::format::{self, Kind, HEADER_LEN};
use super::machine::MachineState;
use super::ram;
use super::shape::Shape;
use crate::runstate::RunState;
use crate::shared::Shared;

/// Guest RAM of the VM the stream is loaded into: 16 pages.
const MEM: u64 = 16 * 4096;

/// Gives every whole frame after the header the checksum of its payload,
/// so that mutated payloads reach the decoders instead of the CRC check.
fn reseal(data: &mut [u8]) {
    let mut at = HEADER_LEN as usize;
    while at + format::FRAME_OVERHEAD as usize <= data.len() {
        let len = u32::from_le_bytes(data[at + 1..at + 5].try_into().expect("4 bytes")) as usize;
        let start = at + format::FRAME_OVERHEAD as usize;
        let Some(end) = start.checked_add(len).filter(|&e| e <= data.len()) else {
            return;
        };
        let crc = crc32fast::hash(&data[start..end]);
        data[at + 5..at + 9].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// Loads `data[1..]` as a stream into a VM of [`MEM`] bytes, one vCPU, no
/// disks; `data[0]` bit 0 reseals the frames' checksums first.
pub fn stream(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if flags & 1 != 0 {
        reseal(&mut bytes);
    }
    let _ = load(&bytes);
}

/// The destination's steps on `bytes`; the first error ends them.
fn load(bytes: &[u8]) -> Result<(), String> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)])
        .expect("a small guest memory");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    let mut serial = Serial::new(&irq, Box::new(std::io::sink())).expect("a serial port");
    let run = RunState::new(Arc::new(Shared::new().expect("an eventfd")), Vec::new());
    let here = Shape {
        memory: MEM,
        cpus: 1,
        disks: Vec::new(),
        ram_offset: None,
    };
    let mut r = bytes;
    super::incoming::read_config(&mut r, &here).map_err(|e| e.to_string())?;
    let mut payload = Vec::new();
    loop {
        let kind = format::read_frame(&mut r, &mut payload).map_err(|e| e.to_string())?;
        let mut sr = StateReader::new(&payload);
        match kind {
            Kind::Ram => {
                ram::receive_pages(&mem, &payload).map_err(|e| e.to_string())?;
                continue;
            }
            Kind::End => return Ok(()),
            Kind::Config | Kind::Disk | Kind::Pass => continue,
            Kind::Devices => {
                serial.restore(&mut sr).map_err(|e| e.to_string())?;
                run.restore_devices(&mut sr)?;
            }
            Kind::Machine => {
                MachineState::decode(&mut sr).map_err(|e| e.to_string())?;
            }
            Kind::Vcpu => {
                let index = sr.u32("vCPU index").map_err(|e| e.to_string())?;
                VcpuState::decode(&mut sr).map_err(|e| e.to_string())?;
                if index != 0 {
                    return Err("there is no such vCPU here".into());
                }
            }
        }
        sr.finish("a frame").map_err(|e| e.to_string())?;
    }
}

/// A small valid stream for [`stream`] (flags byte first): what a source
/// of 16 pages, one vCPU and no disks sends. The fuzz corpus's seed.
pub fn seed() -> Vec<u8> {
    use base::state::StateWriter;
    use kvm_bindings::{kvm_cpuid_entry2, kvm_irqchip, kvm_pit_state2};

    let mut out = vec![1u8];
    format::write_header(&mut out).expect("a Vec takes every write");
    let mut w = StateWriter::new();
    Shape {
        memory: MEM,
        cpus: 1,
        disks: Vec::new(),
        ram_offset: None,
    }
    .encode(&mut w);
    let mut frame = |kind, payload: &[u8]| {
        format::write_frame(&mut out, kind, &[payload]).expect("a Vec takes every write")
    };
    frame(Kind::Config, w.as_slice());
    for (addr, pages, zero) in [(0u64, 1u32, false), (8 * 4096, 2, true)] {
        let mut w = StateWriter::new();
        w.u64(addr).u32(pages).bool(zero);
        if !zero {
            w.raw(&vec![0xa5; pages as usize * 4096]);
        }
        frame(Kind::Ram, w.as_slice());
    }
    frame(Kind::Pass, &1u32.to_le_bytes());
    let mut w = StateWriter::new();
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    Serial::new(&irq, Box::new(std::io::sink()))
        .expect("a serial port")
        .save(&mut w);
    w.u32(0);
    frame(Kind::Devices, w.as_slice());
    let mut machine = MachineState {
        irqchips: [kvm_irqchip::default(); 3],
        pit: Some(kvm_pit_state2::default()),
        clock: 12345,
    };
    for (id, chip) in machine.irqchips.iter_mut().enumerate() {
        chip.chip_id = id as u32;
    }
    let mut w = StateWriter::new();
    machine.encode(&mut w);
    frame(Kind::Machine, w.as_slice());
    let vcpu = VcpuState {
        cpuid: vec![kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        }],
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: vec![(0x10, 99)],
        mp_state: Default::default(),
        events: Default::default(),
        tsc_khz: 1_000_000,
    };
    let mut w = StateWriter::new();
    w.u32(0);
    vcpu.encode(&mut w);
    frame(Kind::Vcpu, w.as_slice());
    frame(Kind::End, &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base::xorshift::XorShift64;

    #[test]
    fn the_seed_loads_to_its_end() {
        let seed = seed();
        assert_eq!(load(&seed[1..]), Ok(()));
        // Without its End frame it is a truncated stream.
        let cut = &seed[1..seed.len() - 9];
        assert_eq!(
            load(cut).unwrap_err(),
            "the migration stream ended early (truncated)"
        );
    }

    /// A small xorshift: the same mutations on every run.
    struct Rng(XorShift64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0.next()
        }

        fn below(&mut self, n: usize) -> usize {
            self.0.below(n as u64) as usize
        }
    }

    #[test]
    fn mutated_streams_never_panic() {
        let seed = seed();
        let mut rng = Rng(XorShift64(0x9e37_79b9_7f4a_7c15));
        let mut errors = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            let mut data = seed.clone();
            for _ in 0..=rng.below(4) {
                let len = data.len();
                match rng.below(6) {
                    0 => {
                        let i = 1 + rng.below(len - 1);
                        data[i] ^= 1 << rng.below(8);
                    }
                    1 => {
                        let i = 1 + rng.below(len - 1);
                        data[i] = rng.next() as u8;
                    }
                    2 => data.truncate(1 + rng.below(len - 1)),
                    3 => {
                        // A length or count field rewritten with a large value.
                        let i = 1 + rng.below(len.saturating_sub(5));
                        let v = [u32::MAX, 1 << 20, 65, 256, 0][rng.below(5)];
                        data[i..i + 4].copy_from_slice(&v.to_le_bytes());
                    }
                    4 => {
                        // Part of the stream repeated.
                        let a = 1 + rng.below(len - 1);
                        let b = a + rng.below(len - a);
                        let copy = data[a..b].to_vec();
                        let at = 1 + rng.below(data.len() - 1);
                        data.splice(at..at, copy);
                    }
                    _ => data[0] ^= 1,
                }
            }
            let mut bytes = data[1..].to_vec();
            if data[0] & 1 != 0 {
                reseal(&mut bytes);
            }
            if let Err(e) = load(&bytes) {
                errors.insert(e.split(':').next().unwrap_or_default().to_string());
            }
        }
        // The mutations reached past the checksums into the decoders.
        assert!(errors.len() > 10, "{errors:#?}");
    }
}
