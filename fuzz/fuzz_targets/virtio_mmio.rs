//! The virtio-mmio registers over a virtio-blk device
//! (`devices::fuzzing::virtio_mmio`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::virtio_mmio(data));
