#![no_main]
//! `cargo fuzz run npy`: see `iresnetc::fuzzing::npy`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| iresnetc::fuzzing::npy(data));
