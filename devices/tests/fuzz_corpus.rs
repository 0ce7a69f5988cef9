//! Replays the checked-in corpora of the device fuzz targets
//! (`fuzz/corpus/virtio_blk_request`, `fuzz/corpus/virtio_mmio`) through
//! the entry points the fuzzer calls, so a change that breaks on an input
//! the fuzzer once found fails here, in CI, without a fuzzer.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The mmio target counts this process's threads: one replay at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 5,
        "the corpus at {} is missing",
        dir.display()
    );
    inputs
}

fn replay(target: &str, run: fn(&[u8])) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for input in corpus(target) {
        let data = std::fs::read(&input).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "corpus input {} failed", input.display());
    }
}

#[test]
fn every_virtio_blk_request_corpus_input_passes_the_checks() {
    replay("virtio_blk_request", devices::fuzzing::virtio_blk_request);
}

#[test]
fn every_virtio_mmio_corpus_input_passes_the_checks() {
    replay("virtio_mmio", devices::fuzzing::virtio_mmio);
}
