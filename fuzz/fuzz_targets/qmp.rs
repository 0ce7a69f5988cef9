//! The QMP input stream and command dispatch (`vmm::fuzzing::qmp`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::qmp(data));
