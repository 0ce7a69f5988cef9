//! The `Config` frame: the shape of the VM a stream carries, which the
//! destination compares with its own before it takes anything else.

use base::state::{StateError, StateReader, StateWriter};

/// The most disks a stream may describe (more than a VM can have).
const MAX_DISKS: usize = 64;

/// One disk as the source has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskShape {
    /// The device's id (`vda`...).
    pub id: String,
    /// The guest-visible size in bytes.
    pub size: u64,
    /// Whether the guest sees it read-only.
    pub read_only: bool,
    /// Whether block migration copies its contents in this stream.
    pub copied: bool,
}

/// The VM a stream describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u32,
    /// The disks, in the guest's order.
    pub disks: Vec<DiskShape>,
    /// A state file: where guest RAM's image starts in the file (page
    /// aligned); `None` in a stream, where RAM comes in frames.
    pub ram_offset: Option<u64>,
}

impl Shape {
    /// Appends the shape to `w`.
    pub fn encode(&self, w: &mut StateWriter) {
        w.u64(self.memory)
            .u32(self.cpus)
            .u32(self.disks.len() as u32);
        for d in &self.disks {
            w.str(&d.id).u64(d.size).bool(d.read_only).bool(d.copied);
        }
        w.u64(self.ram_offset.unwrap_or(0));
    }

    /// Reads a shape written by [`encode`](Self::encode).
    pub fn decode(r: &mut StateReader) -> Result<Self, StateError> {
        let memory = r.u64("memory size")?;
        if memory == 0 || memory % 4096 != 0 {
            return Err(StateError::invalid(
                "memory size",
                format!("{memory} is not a positive number of pages"),
            ));
        }
        let cpus = r.u32("vCPU count")?;
        let count = r.u32("disk count")? as usize;
        if count > MAX_DISKS {
            return Err(StateError::invalid(
                "disk count",
                format!("{count} is more than {MAX_DISKS}"),
            ));
        }
        let mut disks = Vec::with_capacity(count);
        for _ in 0..count {
            disks.push(DiskShape {
                id: r.str("disk id")?.to_string(),
                size: r.u64("disk size")?,
                read_only: r.bool("disk read-only flag")?,
                copied: r.bool("disk copied flag")?,
            });
        }
        let offset = r.u64("RAM offset")?;
        if offset % 4096 != 0 {
            return Err(StateError::invalid(
                "RAM offset",
                format!("{offset} is not page aligned"),
            ));
        }
        Ok(Self {
            memory,
            cpus,
            disks,
            ram_offset: (offset != 0).then_some(offset),
        })
    }

    /// Whether a VM of shape `here` can take this state; the error names
    /// the first difference, the source's value first.
    pub fn check(&self, here: &Shape) -> Result<(), String> {
        if self.memory != here.memory {
            return Err(format!(
                "the source has {} MiB of RAM, this VM {} MiB",
                self.memory >> 20,
                here.memory >> 20
            ));
        }
        if self.cpus != here.cpus {
            return Err(format!(
                "the source has {} vCPUs, this VM {}",
                self.cpus, here.cpus
            ));
        }
        if self.disks.len() != here.disks.len() {
            return Err(format!(
                "the source has {} disks, this VM {}",
                self.disks.len(),
                here.disks.len()
            ));
        }
        for (theirs, ours) in self.disks.iter().zip(&here.disks) {
            if theirs.id != ours.id {
                return Err(format!(
                    "the source's disk '{}' is disk '{}' here",
                    theirs.id, ours.id
                ));
            }
            if theirs.size != ours.size {
                return Err(format!(
                    "disk '{}' has {} bytes on the source, {} here",
                    theirs.id, theirs.size, ours.size
                ));
            }
            if theirs.read_only != ours.read_only {
                return Err(format!(
                    "disk '{}' is {} on the source and {} here",
                    theirs.id,
                    if theirs.read_only {
                        "read-only"
                    } else {
                        "writable"
                    },
                    if ours.read_only {
                        "read-only"
                    } else {
                        "writable"
                    },
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            memory: 128 << 20,
            cpus: 1,
            disks: vec![DiskShape {
                id: "vda".into(),
                size: 1 << 20,
                read_only: false,
                copied: true,
            }],
            ram_offset: Some(8192),
        }
    }

    #[test]
    fn a_shape_reads_back_and_matches_itself() {
        let mut w = StateWriter::new();
        shape().encode(&mut w);
        let bytes = w.into_vec();
        let mut r = StateReader::new(&bytes);
        let back = Shape::decode(&mut r).unwrap();
        r.finish("config").unwrap();
        assert_eq!(back, shape());
        back.check(&shape()).unwrap();
    }

    #[test]
    fn each_difference_is_named_with_both_values() {
        let here = shape();
        let mut other = shape();
        other.memory = 256 << 20;
        assert_eq!(
            other.check(&here).unwrap_err(),
            "the source has 256 MiB of RAM, this VM 128 MiB"
        );
        let mut other = shape();
        other.disks[0].size = 2 << 20;
        assert_eq!(
            other.check(&here).unwrap_err(),
            "disk 'vda' has 2097152 bytes on the source, 1048576 here"
        );
        let mut other = shape();
        other.disks.clear();
        assert_eq!(
            other.check(&here).unwrap_err(),
            "the source has 0 disks, this VM 1"
        );
        let mut other = shape();
        other.cpus = 2;
        assert!(other.check(&here).unwrap_err().contains("2 vCPUs"));
    }

    #[test]
    fn nonsense_sizes_are_refused() {
        let mut bad = shape();
        bad.memory = 4095;
        let mut w = StateWriter::new();
        bad.encode(&mut w);
        let bytes = w.into_vec();
        assert!(Shape::decode(&mut StateReader::new(&bytes)).is_err());
        let mut w = StateWriter::new();
        w.u64(4096).u32(1).u32(1_000_000);
        let bytes = w.into_vec();
        assert!(Shape::decode(&mut StateReader::new(&bytes)).is_err());
    }
}
