// TEMPORARY (perf investigation; deleted before hand-off).
#[test]
fn time_files() {
    let Ok(list) = std::env::var("TIME_FILES") else { return };
    let batch: usize = std::env::var("TIME_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    for f in list.split(',') {
        let t = iresnetc_runtime::tract::time_onnx_file(std::path::Path::new(f), &[vec![batch, 12, 16, 16]], 2, 15).unwrap();
        eprintln!("{f}: median {:.2} ms min {:.2} ms -> {:.1} GFLOP/s (threads {})", t.median_s * 1e3, t.min_s * 1e3, 1.531e9 / t.median_s / 1e9, iresnetc_runtime::tract::threads());
    }
}
