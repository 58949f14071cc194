#![no_main]
//! `cargo fuzz run model_file`: see `iresnetc::fuzzing::model_file`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| iresnetc::fuzzing::model_file(data));
