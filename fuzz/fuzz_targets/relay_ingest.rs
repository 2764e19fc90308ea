//! Fuzz target: `tandem::fuzzing::relay_ingest` (see docs/testing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzzing::relay_ingest(data));
