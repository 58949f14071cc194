//! `iresnetc inspect --cost`: the per-kernel cost report of a model's plan at a batch, for a
//! tiling (see `iresnetc::codegen::cost`), as a table grouped by kernel shape or as JSON.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Result};
use serde::Serialize;

use super::backend::TilingArg;
use iresnetc::codegen::{self, cost, CodegenOptions, Tiling};
use iresnetc::pipeline::Model;

/// The options of `inspect` that select and shape the cost report.
#[derive(clap::Args, Debug, Clone)]
pub struct CostArgs {
    /// Print the per-kernel cost report (grid, serial chain, bytes, FLOPs per dispatch) and
    /// check the GPU goals, instead of the certificate.
    #[arg(long)]
    pub cost: bool,
    /// Batch size of the cost report.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Kernel tiling of the cost report (default `gpu`: the goals are a GPU's).
    #[arg(long, value_enum, default_value = "gpu")]
    pub tiling: TilingArg,
    /// Report the unfused plan (one kernel per op).
    #[arg(long)]
    pub no_fuse: bool,
}

#[derive(Serialize)]
struct Json<'a> {
    model: &'a str,
    fused: bool,
    tiling: Tiling,
    #[serde(flatten)]
    report: &'a cost::CostReport,
}

pub fn print(m: &Model, a: &CostArgs, json: bool) -> Result<()> {
    // Bounded so that no figure of the report can overflow.
    if a.batch == 0 || a.batch > 1_000_000 {
        bail!("--batch must be in 1..=1000000");
    }
    let opts = CodegenOptions {
        fuse: !a.no_fuse,
        tiling: a.tiling.into(),
    };
    let gen = codegen::generate(m, &opts)?;
    let report = cost::report(&gen.plan, &gen.costs, a.batch);
    if json {
        let out = Json {
            model: &m.graph.spec.name,
            fused: opts.fuse,
            tiling: opts.tiling,
            report: &report,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let file: HashMap<&str, &str> = gen
        .plan
        .kernels
        .iter()
        .map(|k| (k.name.as_str(), k.file.as_str()))
        .collect();
    println!(
        "cost of {} at batch {} ({}, {:?}); goals per dispatch: >= {} invocations or >= {} workgroups, serial chain <= {}",
        m.graph.spec.name,
        report.batch,
        if opts.fuse { "fused" } else { "unfused" },
        opts.tiling,
        cost::GOAL_MIN_INVOCATIONS,
        cost::GOAL_MIN_WORKGROUPS,
        cost::GOAL_MAX_CHAIN
    );
    for (entry, e) in &report.entry_points {
        let g = &e.goals;
        println!(
            "\n{entry}: {} dispatches, {:.3} GFLOP, {:.1} MB moved; fewest invocations {}, longest chain {}; {} dispatches under the parallelism goal, {} over the chain goal (by kind: {:?}); goals {} by every dispatch, {} by the convolutions",
            e.dispatches,
            e.flops as f64 / 1e9,
            e.bytes as f64 / 1e6,
            g.fewest_invocations,
            g.longest_chain,
            g.dispatches_under_parallelism,
            g.dispatches_over_chain,
            g.missed_by_kind,
            if g.met { "MET" } else { "NOT MET" },
            if g.met_by_convolutions { "MET" } else { "NOT MET" }
        );
        // Kernels of one shape (same WGSL file and grid) have the same figures: one line each.
        let mut shapes: BTreeMap<(String, u64, u64), (u64, &cost::KernelRow)> = BTreeMap::new();
        for r in &e.kernels {
            let f = file.get(r.kernel.as_str()).copied().unwrap_or("builtin");
            let key = (f.to_string(), r.workgroups, r.workgroup_size);
            shapes.entry(key).or_insert((0, r)).0 += r.dispatches;
        }
        println!(
            "  {:>6} {:>9} {:>6} {:>10} {:>7} {:>10} {:>11}  kernel (first of its shape)",
            "disp.", "wgroups", "wg", "invoc.", "chain", "KB", "MFLOP"
        );
        let mut lines: Vec<_> = shapes.into_values().collect();
        lines.sort_by_key(|(_, r)| (r.parallel_enough(), std::cmp::Reverse(r.chain)));
        for (n, r) in lines {
            let flag = if !r.parallel_enough() || r.chain > cost::GOAL_MAX_CHAIN {
                "*"
            } else {
                " "
            };
            println!(
                "{flag} {n:>6} {:>9} {:>6} {:>10} {:>7} {:>10.1} {:>11.3}  {}",
                r.workgroups,
                r.workgroup_size,
                r.invocations,
                r.chain,
                r.bytes as f64 / 1e3,
                r.flops as f64 / 1e6,
                r.kernel
            );
        }
    }
    println!("\n* misses a goal. chain: dependent floating-point operations of one invocation (multiply-adds of its sum, then the adds of a split reduction); KB: compulsory traffic of one dispatch");
    Ok(())
}
