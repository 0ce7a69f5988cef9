//! The virtio-blk request parser and dataplane over a random split
//! virtqueue in guest RAM (`devices::fuzzing::virtio_blk_request`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::virtio_blk_request(data));
