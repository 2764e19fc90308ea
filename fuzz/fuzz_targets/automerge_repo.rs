//! Fuzz target: `tandem::fuzzing::automerge_repo` (see docs/testing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzzing::automerge_repo(data));
