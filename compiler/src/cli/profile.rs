//! `iresnetc bench --profile FILE`: per-kernel GPU times of one run of each measured entry
//! point (timestamp queries, see `GpuExecutor::profile`), joined with the cost report's FLOPs
//! and bytes into GFLOP/s and GB/s, written as JSON and summarized on stderr.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use iresnetc::codegen::cost::CostReport;
use iresnetc_runtime::GpuExecutor;

/// One kernel of one measurement: the sum over its dispatches in the profiled run.
#[derive(Clone, Debug, Serialize)]
pub struct KernelProfile {
    pub model: String,
    pub entry: String,
    pub variant: String,
    pub batch: usize,
    pub kernel: String,
    pub grid: [u32; 3],
    pub dispatches: usize,
    pub ns: f64,
    pub gflops: f64,
    pub gbs: f64,
}

/// What is being profiled (for the rows' labels).
pub struct Measured<'a> {
    pub model: &'a str,
    /// The bench's entry name and the plan's.
    pub entry: &'a str,
    pub plan_entry: &'a str,
    pub variant: &'a str,
    pub batch: usize,
}

/// Profiles one entry point; an adapter without timestamp queries gives no rows and one
/// notice on stderr (lavapipe has none).
pub fn profile(
    ex: &mut GpuExecutor,
    costs: &CostReport,
    what: Measured<'_>,
    inputs: &[(&str, &[f32])],
) -> Result<Vec<KernelProfile>> {
    if ex.profile_mode().is_none() {
        eprintln!(
            "profile: adapter {} has no timestamp queries; no per-kernel GPU times for {} {} batch {}",
            ex.device().adapter(),
            what.model,
            what.entry,
            what.batch
        );
        return Ok(Vec::new());
    }
    if what.batch > ex.max_batch() {
        eprintln!(
            "profile: batch {} needs more than one submission here (at most {}); skipped",
            what.batch,
            ex.max_batch()
        );
        return Ok(Vec::new());
    }
    let p = ex
        .profile(what.plan_entry, what.batch, inputs)
        .with_context(|| format!("profiling {} {}", what.model, what.entry))?;
    let figures: HashMap<&str, (u64, u64)> = costs
        .entry_points
        .get(what.plan_entry)
        .map(|e| {
            e.kernels
                .iter()
                .map(|r| (r.kernel.as_str(), (r.flops, r.bytes)))
                .collect()
        })
        .unwrap_or_default();
    let mut rows: Vec<KernelProfile> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for d in p.dispatches {
        let i = *index.entry(d.kernel.clone()).or_insert_with(|| {
            rows.push(KernelProfile {
                model: what.model.to_string(),
                entry: what.entry.to_string(),
                variant: what.variant.to_string(),
                batch: what.batch,
                kernel: d.kernel.clone(),
                grid: d.grid,
                dispatches: 0,
                ns: 0.0,
                gflops: 0.0,
                gbs: 0.0,
            });
            rows.len() - 1
        });
        rows[i].dispatches += 1;
        rows[i].ns += d.ns;
    }
    for r in &mut rows {
        let (flops, bytes) = figures.get(r.kernel.as_str()).copied().unwrap_or((0, 0));
        if r.ns > 0.0 {
            r.gflops = (flops * r.dispatches as u64) as f64 / r.ns;
            r.gbs = (bytes * r.dispatches as u64) as f64 / r.ns;
        }
    }
    let total: f64 = rows.iter().map(|r| r.ns).sum();
    let mut top: Vec<&KernelProfile> = rows.iter().collect();
    top.sort_by(|a, b| b.ns.total_cmp(&a.ns));
    eprintln!(
        "profile {} {} {} batch {}: {:.3} ms in {} kernels ({:?}); slowest:",
        what.model,
        what.entry,
        what.variant,
        what.batch,
        total / 1e6,
        rows.len(),
        p.mode
    );
    for r in top.iter().take(5) {
        eprintln!(
            "  {:<40} {:>4} x {:?} {:>10.1} us {:>8.1} GFLOP/s {:>8.1} GB/s",
            r.kernel,
            r.dispatches,
            r.grid,
            r.ns / 1e3,
            r.gflops,
            r.gbs
        );
    }
    Ok(rows)
}

pub fn write(path: &Path, rows: &[KernelProfile]) -> Result<()> {
    let json = serde_json::to_string_pretty(rows)?;
    iresnetc::fsutil::write_atomic(path, json.as_bytes())?;
    eprintln!(
        "profile: {} kernel rows written to {}",
        rows.len(),
        path.display()
    );
    Ok(())
}
