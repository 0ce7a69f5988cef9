//! Replays the checked-in corpora of the QMP and migration stream fuzz
//! targets (`fuzz/corpus/qmp`, `fuzz/corpus/migration_stream`) through the
//! entry points the fuzzer calls, so a change that breaks on an input the
//! fuzzer once found fails here, in CI, without a fuzzer.

use std::path::{Path, PathBuf};

/// Where `target`'s corpus is checked in.
fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs `run` on every input of `target`'s corpus (at least `min` of
/// them); none may panic.
fn replay(target: &str, min: usize, run: fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= min,
        "the corpus at {} is missing",
        dir.display()
    );
    for input in &inputs {
        let data = std::fs::read(input).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "corpus input {} failed", input.display());
    }
}

#[test]
fn every_qmp_corpus_input_gets_well_formed_replies() {
    replay("qmp", 5, vmm::fuzzing::qmp);
}

#[test]
fn every_migration_stream_corpus_input_is_taken_or_refused_without_a_panic() {
    replay("migration_stream", 1, vmm::fuzzing::migration_stream);
    // The checked-in seed is the stream this build writes.
    assert_eq!(
        std::fs::read(corpus_dir("migration_stream").join("seed")).unwrap(),
        vmm::fuzzing::migration_stream_seed(),
        "regenerate fuzz/corpus/migration_stream/seed from vmm::fuzzing::migration_stream_seed()"
    );
}
