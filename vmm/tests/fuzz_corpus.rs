//! Replays the checked-in corpus of the QMP fuzz target (`fuzz/corpus/qmp`)
//! through the same entry point the fuzzer calls, so a change that breaks
//! on an input the fuzzer once found fails here, in CI, without a fuzzer.

use std::path::Path;

#[test]
fn every_qmp_corpus_input_gets_well_formed_replies() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qmp");
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
    for input in &inputs {
        let data = std::fs::read(input).unwrap();
        let run = std::panic::catch_unwind(|| vmm::fuzzing::qmp(&data));
        assert!(run.is_ok(), "corpus input {} failed", input.display());
    }
}

#[test]
fn every_migration_stream_corpus_input_is_taken_or_refused_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/migration_stream");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "the corpus at {} is missing",
        dir.display()
    );
    for input in &inputs {
        let data = std::fs::read(input).unwrap();
        let run = std::panic::catch_unwind(|| vmm::fuzzing::migration_stream(&data));
        assert!(run.is_ok(), "corpus input {} failed", input.display());
    }
    // The checked-in seed is the stream this build writes.
    assert_eq!(
        std::fs::read(dir.join("seed")).unwrap(),
        vmm::fuzzing::migration_stream_seed(),
        "regenerate fuzz/corpus/migration_stream/seed from vmm::fuzzing::migration_stream_seed()"
    );
}
