//! The incoming migration stream's parsing (`vmm::fuzzing::migration_stream`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::migration_stream(data));
