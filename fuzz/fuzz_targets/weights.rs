#![no_main]
//! `cargo fuzz run weights`: see `iresnetc::fuzzing::weights`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| iresnetc::fuzzing::weights(data));
