#![no_main]
//! `cargo fuzz run manifest`: see `iresnetc::fuzzing::manifest`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| iresnetc::fuzzing::manifest(data));
