//! Fuzz target: `tandem::fuzzing::wire` (see docs/testing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzzing::wire(data));
