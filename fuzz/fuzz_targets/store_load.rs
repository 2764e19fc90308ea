//! Fuzz target: `tandem::fuzzing::store_load` (see docs/testing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzzing::store_load(data));
