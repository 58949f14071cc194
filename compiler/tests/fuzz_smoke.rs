//! A deterministic mutation fuzzer on stable Rust, over the committed seed corpus
//! (`fuzz/corpus/<target>/`), calling the same functions as the cargo-fuzz targets
//! (`iresnetc::fuzzing`). CI runs a few thousand executions per target; the long runs of the
//! docs/testing.md set `IRESNETC_FUZZ_ITERS`:
//!
//! `IRESNETC_FUZZ_ITERS=1000000 cargo test --release -p iresnetc --test fuzz_smoke -- --nocapture`
//! (`IRESNETC_FUZZ_TARGETS=manifest` runs only the targets named)
//!
//! The seeds are written by `examples/fuzz_seeds.rs` (see docs/testing.md) and must all be
//! accepted by their loaders (`every_seed_is_accepted_by_its_loader`).
//!
//! A panic is caught, the offending input written to `target/fuzz-crash-<target>-<n>.bin`,
//! and the test fails naming it.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// xorshift64*: reproducible mutations without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that find overflow and boundary bugs in parsers of sizes and counts.
const INTERESTING: &[&str] = &[
    "0",
    "-1",
    "1",
    "4294967296",
    "18446744073709551615",
    "9223372036854775807",
    "1e308",
    "1e-300",
    "nan",
    "inf",
    "-0",
    "65535",
    "\"\"",
    "[]",
    "{}",
    "\"../x\"",
    "2147483648",
];

/// One mutation of `seed` (several stacked), in the style of libFuzzer's: bit flips, byte
/// sets, inserts, deletes, duplicated spans, splices from another seed, and replacement of a
/// number by an interesting value.
fn mutate(seed: &[u8], other: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        match r.below(8) {
            0 if !d.is_empty() => {
                let i = r.below(d.len());
                d[i] ^= 1 << r.below(8);
            }
            1 if !d.is_empty() => {
                let i = r.below(d.len());
                d[i] = [0, 0xff, b'9', b'"', b'[', b'-', b'\n', b'.'][r.below(8)];
            }
            2 => {
                let i = r.below(d.len() + 1);
                d.insert(i, r.next() as u8);
            }
            3 if !d.is_empty() => {
                let i = r.below(d.len());
                let n = 1 + r.below((d.len() - i).min(16));
                d.drain(i..i + n);
            }
            4 if !d.is_empty() => {
                let i = r.below(d.len());
                let n = 1 + r.below((d.len() - i).min(64));
                let span = d[i..i + n].to_vec();
                let at = r.below(d.len() + 1);
                d.splice(at..at, span);
            }
            5 if !other.is_empty() => {
                let i = r.below(other.len());
                let n = 1 + r.below((other.len() - i).min(64));
                let at = r.below(d.len() + 1);
                d.splice(at..at, other[i..i + n].iter().copied());
            }
            6 => {
                // Replace the digits of a number by an interesting value.
                let starts: Vec<usize> = (0..d.len())
                    .filter(|&i| d[i].is_ascii_digit() && (i == 0 || !d[i - 1].is_ascii_digit()))
                    .collect();
                if !starts.is_empty() {
                    let s = starts[r.below(starts.len())];
                    let e = (s..d.len())
                        .find(|&i| !d[i].is_ascii_digit())
                        .unwrap_or(d.len());
                    let v = INTERESTING[r.below(INTERESTING.len())].as_bytes();
                    d.splice(s..e, v.iter().copied());
                }
            }
            _ if d.len() > 1 => {
                let n = r.below(d.len());
                d.truncate(n);
            }
            _ => {}
        }
    }
    d
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The mutation run sets a small `IRESNETC_MEMORY_LIMIT` for the whole process, under which
/// the big shipped model files are refused; the seed check must not run meanwhile.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Every committed seed is a valid input of its target's loader, and every target has seeds:
/// a format change that orphans the corpus fails here (regenerate it with
/// `cargo run --release -p iresnetc --example fuzz_seeds -- fuzz/corpus`).
#[test]
fn every_seed_is_accepted_by_its_loader() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut refused = vec![];
    let mut count = 0;
    for (name, _) in iresnetc::fuzzing::TARGETS {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no seeds for {name}");
        for f in files {
            count += 1;
            let bytes = std::fs::read(&f).unwrap();
            if let Err(e) = iresnetc::fuzzing::accepts(name, &bytes) {
                refused.push(format!("{}: {e}", f.display()));
            }
        }
    }
    assert!(
        refused.is_empty(),
        "seeds their loader refuses (regenerate: cargo run --release -p iresnetc --example \
         fuzz_seeds -- fuzz/corpus):\n{}",
        refused.join("\n")
    );
    eprintln!("{count} seeds, all accepted");
}

#[test]
fn every_target_survives_mutations_of_its_corpus() {
    let iters: usize = std::env::var("IRESNETC_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    // Budget of each execution: a tiny budget keeps a bug that allocates by a size field
    // from hiding behind a big machine.
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let limit_before = std::env::var_os("IRESNETC_MEMORY_LIMIT");
    std::env::set_var("IRESNETC_MEMORY_LIMIT", "256M");
    // Silence the panics this thread catches; other tests' panics still print.
    let fuzzing = std::thread::current().id();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != fuzzing {
            default_hook(info);
        }
    }));
    let mut failures = vec![];
    // `IRESNETC_FUZZ_TARGETS=plan,npy` runs only those.
    let only = std::env::var("IRESNETC_FUZZ_TARGETS").ok();
    for (name, f) in iresnetc::fuzzing::TARGETS {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|t| t == *name))
        {
            continue;
        }
        let seeds = corpus(name);
        assert!(!seeds.is_empty(), "no seeds for {name}");
        let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        let start = Instant::now();
        // The seeds themselves first, then mutations.
        for i in 0..iters + seeds.len() {
            let input = if i < seeds.len() {
                seeds[i].clone()
            } else {
                let s = &seeds[r.below(seeds.len())];
                let o = &seeds[r.below(seeds.len())];
                mutate(s, o, &mut r)
            };
            if std::panic::catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
                let out = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../target")
                    .join(format!("fuzz-crash-{name}-{i}.bin"));
                let _ = std::fs::write(&out, &input);
                failures.push(format!(
                    "{name}: execution {i} panicked; input saved to {}",
                    out.display()
                ));
                break;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "fuzz {name}: {} executions in {secs:.1} s ({:.0}/s), {} seeds",
            iters + seeds.len(),
            (iters + seeds.len()) as f64 / secs.max(1e-9),
            seeds.len()
        );
    }
    let _ = std::panic::take_hook();
    match limit_before {
        Some(v) => std::env::set_var("IRESNETC_MEMORY_LIMIT", v),
        None => std::env::remove_var("IRESNETC_MEMORY_LIMIT"),
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
