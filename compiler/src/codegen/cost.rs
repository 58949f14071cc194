//! The per-kernel cost report: for every dispatch an entry point records at a given batch,
//! its grid (invocations, workgroups), the longest serial chain of one invocation, the bytes
//! it must move and its FLOPs, with a check of the goals a GPU tiling is held to.
//!
//! The grid comes from the plan itself (each `Dispatch` step's workgroups and the kernel's
//! workgroup size at the batch, or its batch-folded alternative from that one's batch on,
//! exactly as the executor dispatches them), the rest
//! from the figures codegen recorded for each kernel ([`KernelCost`]), so the report
//! describes exactly what the runtime runs.

use std::collections::{BTreeMap, HashMap};

use iresnetc_runtime::plan::MAX_WORKGROUPS_PER_DIM;
use iresnetc_runtime::{dispatch_at, Plan, Step};
use serde::Serialize;

use super::builder::KernelCost;
use super::kernels::KernelKind;

/// A dispatch that launches fewer invocations than this...
pub const GOAL_MIN_INVOCATIONS: u64 = 32_768;
/// ...must launch at least this many workgroups (either fills a data-centre GPU's SMs).
pub const GOAL_MIN_WORKGROUPS: u64 = 128;
/// No invocation may run a longer chain of dependent operations.
pub const GOAL_MAX_CHAIN: u64 = 1_152;

/// The workgroup size of the runtime's built-in fill kernel (`Step::Fill` with a nonzero
/// value) and the elements each invocation writes.
const FILL_WORKGROUP: u64 = 256;

/// One kernel of an entry point: the figures of each of its dispatches (all equal) and how
/// many times the entry point dispatches it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KernelRow {
    pub kernel: String,
    pub kind: KernelKind,
    pub dispatches: u64,
    pub workgroup_size: u64,
    pub workgroups: u64,
    pub invocations: u64,
    /// Longest serial chain of dependent floating-point operations per invocation.
    pub chain: u64,
    pub bytes: u64,
    pub flops: u64,
}

impl KernelRow {
    /// Meets the parallelism goal: enough invocations or enough workgroups.
    pub fn parallel_enough(&self) -> bool {
        self.invocations >= GOAL_MIN_INVOCATIONS || self.workgroups >= GOAL_MIN_WORKGROUPS
    }
}

/// The goals over every dispatch of an entry point.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Goals {
    pub min_invocations: u64,
    pub min_workgroups: u64,
    pub max_chain: u64,
    /// Dispatches below both the invocation and the workgroup goal.
    pub dispatches_under_parallelism: u64,
    /// Dispatches whose chain is longer than `max_chain`.
    pub dispatches_over_chain: u64,
    /// The smallest grid and longest chain of any dispatch.
    pub fewest_invocations: u64,
    pub longest_chain: u64,
    /// Both goals hold for every dispatch.
    pub met: bool,
    /// Both goals hold for every convolution (the kernels with a reduction to split).
    pub met_by_convolutions: bool,
    /// Dispatches missing a goal, by kernel kind.
    pub missed_by_kind: BTreeMap<String, u64>,
    /// The kernels that miss a goal (at most 20 named).
    pub missed_by: Vec<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EntryReport {
    pub dispatches: u64,
    pub flops: u64,
    pub bytes: u64,
    pub goals: Goals,
    /// In order of first dispatch.
    pub kernels: Vec<KernelRow>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CostReport {
    pub batch: u64,
    pub entry_points: BTreeMap<String, EntryReport>,
}

/// The cost report of every entry point of `plan` at `batch`.
pub fn report(plan: &Plan, costs: &HashMap<String, KernelCost>, batch: usize) -> CostReport {
    let batch = batch.max(1) as u64;
    let wg_size: HashMap<&str, u64> = plan
        .kernels
        .iter()
        .map(|k| {
            let [x, y, z] = k.workgroup_size;
            (k.name.as_str(), u64::from(x) * u64::from(y) * u64::from(z))
        })
        .collect();
    let elems: HashMap<&str, u64> = plan
        .buffers
        .iter()
        .map(|b| {
            (
                b.name.as_str(),
                b.elems * if b.per_sample { batch } else { 1 },
            )
        })
        .collect();
    let mut entry_points = BTreeMap::new();
    for (name, ep) in &plan.entry_points {
        let mut rows: Vec<KernelRow> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut add = |row: KernelRow, times: u64| match index.get(&row.kernel) {
            Some(&i) => rows[i].dispatches += times,
            None => {
                index.insert(row.kernel.clone(), rows.len());
                rows.push(KernelRow {
                    dispatches: times,
                    ..row
                });
            }
        };
        walk(&ep.steps, 1, &mut |step, times| match step {
            Step::Dispatch {
                kernel,
                workgroups,
                large_batch,
            } => {
                // The kernel and grid the runtime records at this batch.
                let (kernel, grid) = dispatch_at(
                    kernel,
                    *workgroups,
                    large_batch.as_ref(),
                    batch as usize,
                    MAX_WORKGROUPS_PER_DIM,
                )
                .unwrap_or((kernel, [0; 3]));
                let kernel = &kernel.to_string();
                let c = costs.get(kernel).copied().unwrap_or_default();
                let groups = grid.iter().map(|&n| u64::from(n)).product::<u64>();
                let size = wg_size.get(kernel.as_str()).copied().unwrap_or(1);
                add(
                    KernelRow {
                        kernel: kernel.clone(),
                        kind: c.kind,
                        dispatches: 0,
                        workgroup_size: size,
                        workgroups: groups,
                        invocations: groups * size,
                        chain: c.chain,
                        bytes: c.bytes_per_sample * batch + c.bytes_shared,
                        flops: c.flops_per_sample * batch,
                    },
                    times,
                );
            }
            Step::Fill { buffer, value } if *value != 0.0 || value.is_sign_negative() => {
                let n = elems.get(buffer.as_str()).copied().unwrap_or(0);
                let groups = n.div_ceil(FILL_WORKGROUP).max(1);
                add(
                    KernelRow {
                        kernel: format!("builtin.fill({buffer})"),
                        kind: KernelKind::Fill,
                        dispatches: 0,
                        workgroup_size: FILL_WORKGROUP,
                        workgroups: groups,
                        invocations: groups * FILL_WORKGROUP,
                        chain: 1,
                        bytes: 4 * n,
                        flops: 0,
                    },
                    times,
                );
            }
            _ => {}
        });
        entry_points.insert(name.clone(), summarize(rows));
    }
    CostReport {
        batch,
        entry_points,
    }
}

/// Calls `f` on every step of `steps` with the number of times it runs (`Repeat` unrolled).
fn walk(steps: &[Step], times: u64, f: &mut dyn FnMut(&Step, u64)) {
    for s in steps {
        match s {
            Step::Repeat { times: t, steps } => walk(steps, times * u64::from(*t), f),
            other => f(other, times),
        }
    }
}

fn summarize(kernels: Vec<KernelRow>) -> EntryReport {
    let missed: Vec<&KernelRow> = kernels
        .iter()
        .filter(|r| !r.parallel_enough() || r.chain > GOAL_MAX_CHAIN)
        .collect();
    let goals = Goals {
        min_invocations: GOAL_MIN_INVOCATIONS,
        min_workgroups: GOAL_MIN_WORKGROUPS,
        max_chain: GOAL_MAX_CHAIN,
        dispatches_under_parallelism: kernels
            .iter()
            .filter(|r| !r.parallel_enough())
            .map(|r| r.dispatches)
            .sum(),
        dispatches_over_chain: kernels
            .iter()
            .filter(|r| r.chain > GOAL_MAX_CHAIN)
            .map(|r| r.dispatches)
            .sum(),
        fewest_invocations: kernels.iter().map(|r| r.invocations).min().unwrap_or(0),
        longest_chain: kernels.iter().map(|r| r.chain).max().unwrap_or(0),
        met: missed.is_empty(),
        met_by_convolutions: !missed.iter().any(|r| r.kind == KernelKind::Conv),
        missed_by_kind: missed.iter().fold(BTreeMap::new(), |mut m, r| {
            let kind = serde_json::to_value(r.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            *m.entry(kind).or_insert(0) += r.dispatches;
            m
        }),
        missed_by: missed.iter().take(20).map(|r| r.kernel.clone()).collect(),
    };
    EntryReport {
        dispatches: kernels.iter().map(|r| r.dispatches).sum(),
        flops: kernels.iter().map(|r| r.flops * r.dispatches).sum(),
        bytes: kernels.iter().map(|r| r.bytes * r.dispatches).sum(),
        goals,
        kernels,
    }
}
