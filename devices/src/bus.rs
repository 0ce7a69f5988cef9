//! An address bus (port I/O or MMIO) that maps address ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base::sync::lock;

/// What a guest asked the VMM for by writing to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    /// End the VM with this exit status (the exit port).
    Exit(u8),
    /// Reset the machine (keyboard-controller reset); the VMM ends with status 0.
    Reset,
    /// Power the machine off; the VMM ends with status 0.
    PowerOff,
}

/// A device that answers reads and writes within its own address range.
pub trait BusDevice: Send {
    /// Fills `data` with what the device returns at `offset` into its range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes a write of `data` at `offset` into its range.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest>;
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or wraps around the address space.
    #[error("device '{name}' has an empty or wrapping range at {base:#x} (length {len:#x})")]
    BadRange { name: String, base: u64, len: u64 },
    /// The new range overlaps one already on the bus.
    #[error("device '{name}' at {base:#x} overlaps device '{other}'")]
    Overlap {
        name: String,
        base: u64,
        other: String,
    },
}

struct Entry {
    len: u64,
    name: String,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Address ranges mapped to devices; lookups are shared between vCPU threads.
#[derive(Default)]
pub struct Bus {
    entries: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)` under `name` (used in errors and logs).
    pub fn insert(
        &mut self,
        name: &str,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => {
                return Err(BusError::BadRange {
                    name: name.to_string(),
                    base,
                    len,
                })
            }
        };
        let clash = self
            .entries
            .range(..end)
            .next_back()
            .filter(|(b, e)| **b + e.len > base);
        if let Some((_, other)) = clash {
            return Err(BusError::Overlap {
                name: name.to_string(),
                base,
                other: other.name.clone(),
            });
        }
        self.entries.insert(
            base,
            Entry {
                len,
                name: name.to_string(),
                device,
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, entry) = self.entries.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, entry))
    }

    /// Routes a read; returns false (leaving `data` alone) when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, entry)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; `None` in the outer option means nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<Option<GuestRequest>> {
        let (offset, entry) = self.find(addr)?;
        Some(lock(&entry.device).write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
            self.0.push((offset, data.to_vec()));
            None
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder(Vec::new())))
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert("rec", 0x3f8, 8, dev.clone()).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5]);
        assert_eq!(bus.write(0x3ff, &[7]), Some(None));
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![7])]);
    }

    #[test]
    fn unmapped_addresses_are_reported_not_routed() {
        let mut bus = Bus::new();
        bus.insert("rec", 0x3f8, 8, recorder()).unwrap();
        let mut buf = [0xaa];
        assert!(!bus.read(0x400, &mut buf));
        assert!(!bus.read(0x3f7, &mut buf));
        assert_eq!(buf, [0xaa]);
        assert_eq!(bus.write(0x400, &[1]), None);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused_with_names() {
        let mut bus = Bus::new();
        bus.insert("serial", 0x3f8, 8, recorder()).unwrap();
        let err = bus.insert("other", 0x3fc, 8, recorder()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device 'other' at 0x3fc overlaps device 'serial'"
        );
        assert!(bus.insert("below", 0x3f0, 9, recorder()).is_err());
        assert!(bus.insert("adjacent", 0x400, 1, recorder()).is_ok());
        assert!(bus.insert("adjacent-low", 0x3f0, 8, recorder()).is_ok());
        assert!(matches!(
            bus.insert("empty", 0x10, 0, recorder()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert("wrap", u64::MAX, 2, recorder()),
            Err(BusError::BadRange { .. })
        ));
    }
}
