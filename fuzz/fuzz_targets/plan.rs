#![no_main]
//! `cargo fuzz run plan`: see `iresnetc::fuzzing::plan`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| iresnetc::fuzzing::plan(data));
