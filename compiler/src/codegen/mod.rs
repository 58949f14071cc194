//! WGSL code generation: a certified model -> a runtime plan, its WGSL kernels and a cost
//! report. The bundle writer ([`crate::bundle`]) puts them on disk; [`compile_in_memory`]
//! hands them straight to the runtime (tests, `iresnetc run model.toml --backend wgpu`,
//! benchmarks of fused vs unfused plans).
//!
//! - [`wgsl`]: templates from `shaders/`, substitution, naga validation;
//! - [`kernels`]: the convolution kernel with its fused epilogues, elementwise kernels;
//! - [`splitk`], [`gemm`]: the GPU tiling's convolutions (split reduction at small batches,
//!   batch-folded shared-memory GEMM from the batch where it fills a GPU);
//! - [`logdet_kernels`]: the log-det accumulation's bindings, term counter and dot kernel;
//! - [`builder`]: buffers, kernels (deduplicated sources), FLOPs;
//! - [`lower`]: graph -> steps of each entry point;
//! - [`inputs`]: the CPU side of the log-det inputs (probes, series / roulette weights).

pub mod builder;
pub mod cost;
pub mod gemm;
pub mod kernels;
pub mod logdet_kernels;
pub mod lower;
pub mod splitk;
mod vec4;
pub mod wgsl;

use std::collections::BTreeMap;

use iresnetc_runtime::{
    Bundle, EntryPoint, IoDecl, ModelKind as PlanKind, Plan, Step, BUNDLE_FORMAT, BUNDLE_VERSION,
};
use serde::Serialize;

pub use kernels::Tiling;
pub use lower::{names, LogDetLayout, ROULETTE_EXTRA_TERMS};

use crate::error::Result;
use crate::passes::fusion;
use crate::pipeline::Model;
use crate::spec::ModelKind;

/// Entry point names of a plan (the runtime's, which every backend reads).
pub use iresnetc_runtime::plan::entries;

#[derive(Clone, Copy, Debug)]
pub struct CodegenOptions {
    /// Apply the fusions of [`crate::passes::fusion`]; false emits one kernel per op.
    pub fuse: bool,
    pub tiling: Tiling,
}

impl Default for CodegenOptions {
    fn default() -> Self {
        Self {
            fuse: true,
            tiling: Tiling::CPU,
        }
    }
}

/// Cost of one run of an entry point (per batch chunk, after unrolling loops).
#[derive(Clone, Debug, Serialize)]
pub struct EntryCost {
    pub dispatches: usize,
    pub flops_per_sample: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CodegenReport {
    pub fused: bool,
    pub tiling: Tiling,
    pub kernels: usize,
    pub wgsl_files: usize,
    pub buffers: usize,
    pub entry_points: BTreeMap<String, EntryCost>,
    /// Fixed-point iterations per block in the inverse entry point.
    pub inverse_iters: Vec<usize>,
    /// Per-kernel grid, chain, bytes and FLOPs of every entry point at batch 1
    /// (`iresnetc inspect --cost` prints it at any batch).
    pub cost: cost::CostReport,
}

/// What codegen produces: the plan, the WGSL files by name, the report.
#[derive(Clone, Debug)]
pub struct Generated {
    pub plan: Plan,
    pub shaders: BTreeMap<String, String>,
    pub report: CodegenReport,
    /// What each kernel costs apart from its grid (input of [`cost::report`]).
    pub costs: std::collections::HashMap<String, builder::KernelCost>,
}

fn io(name: &str, buffer: &str, shape: Vec<usize>) -> IoDecl {
    IoDecl {
        name: name.to_string(),
        buffer: buffer.to_string(),
        shape,
    }
}

/// Generates the plan and kernels of `model`; every WGSL module is validated by naga.
pub fn generate(model: &Model, opts: &CodegenOptions) -> Result<Generated> {
    let g = &model.graph;
    let fusion = fusion::analyze(g, opts.fuse)?;
    let mut low = lower::Lowering::new(g, &fusion, &model.lipschitz, opts.tiling);
    let input_shape = g.spec.input.clone();
    let mut entry_points = BTreeMap::new();
    let layout = low.layout.clone();
    let kind = match g.spec.kind {
        ModelKind::Flow => PlanKind::Flow,
        ModelKind::Classifier => PlanKind::Classifier,
    };
    match g.spec.kind {
        ModelKind::Flow => {
            let z_shape = vec![g.latent_dim()];
            let ld_inputs = vec![
                io("x", names::X, input_shape.clone()),
                io("probes", names::PROBES, vec![layout.probe_elems()]),
                io("coef", names::COEF, vec![layout.coef_elems()]),
            ];
            let forward = low.forward(Some(layout.terms))?;
            let roulette = low.forward(Some(layout.coef_stride))?;
            let encode = low.forward(None)?;
            let inverse = low.inverse()?;
            entry_points.insert(
                entries::FORWARD.to_string(),
                EntryPoint {
                    inputs: ld_inputs.clone(),
                    outputs: vec![
                        io("z", names::Z, z_shape.clone()),
                        io("logdet", names::LOGDET, vec![]),
                    ],
                    steps: forward.clone(),
                },
            );
            entry_points.insert(
                entries::FORWARD_ROULETTE.to_string(),
                EntryPoint {
                    inputs: ld_inputs.clone(),
                    outputs: vec![
                        io("z", names::Z, z_shape.clone()),
                        io("logdet", names::LOGDET, vec![]),
                    ],
                    steps: roulette,
                },
            );
            entry_points.insert(
                entries::LOGDET.to_string(),
                EntryPoint {
                    inputs: ld_inputs,
                    outputs: vec![io("logdet", names::LOGDET, vec![])],
                    steps: forward,
                },
            );
            entry_points.insert(
                entries::ENCODE.to_string(),
                EntryPoint {
                    inputs: vec![io("x", names::X, input_shape.clone())],
                    outputs: vec![io("z", names::Z, z_shape.clone())],
                    steps: encode,
                },
            );
            entry_points.insert(
                entries::INVERSE.to_string(),
                EntryPoint {
                    inputs: vec![io("z", names::Z_IN, z_shape)],
                    outputs: vec![io("x", names::X_OUT, input_shape.clone())],
                    steps: inverse,
                },
            );
        }
        ModelKind::Classifier => {
            let steps = low.forward(None)?;
            let classes: usize = g
                .logits
                .map(|l| g.node(l).shape.iter().product())
                .unwrap_or(0);
            entry_points.insert(
                entries::CLASSIFY.to_string(),
                EntryPoint {
                    inputs: vec![io("x", names::X, input_shape.clone())],
                    outputs: vec![io("logits", names::LOGITS, vec![classes])],
                    steps,
                },
            );
        }
    }
    // Every parameter travels in the bundle (the prior, for sampling and density on the CPU,
    // included), and the runtime accepts only tensors the plan names.
    for (name, t) in &g.params {
        low.b.weight(name, t.data.len())?;
    }
    let inverse_iters = (0..g.blocks.len()).map(|b| low.inverse_iters(b)).collect();

    let builder = low.b;
    let mut costs = BTreeMap::new();
    for (name, ep) in &entry_points {
        let (mut dispatches, mut flops) = (0usize, 0u64);
        count(&ep.steps, 1, &builder.flops, &mut dispatches, &mut flops);
        costs.insert(
            name.clone(),
            EntryCost {
                dispatches,
                flops_per_sample: flops,
            },
        );
    }
    let kernel_costs = builder.costs;
    let mut report = CodegenReport {
        fused: opts.fuse,
        tiling: opts.tiling,
        kernels: builder.kernels.len(),
        wgsl_files: builder.shaders.len(),
        buffers: builder.buffers.len(),
        entry_points: costs,
        inverse_iters,
        cost: cost::CostReport {
            batch: 1,
            entry_points: BTreeMap::new(),
        },
    };
    let mut plan = Plan {
        format: BUNDLE_FORMAT.to_string(),
        version: BUNDLE_VERSION,
        compiler_version: env!("CARGO_PKG_VERSION").to_string(),
        model: g.spec.name.clone(),
        kind,
        input_shape,
        buffers: builder.buffers,
        kernels: builder.kernels,
        entry_points,
        meta: serde_json::json!({
            "fused": opts.fuse,
            "tiling": opts.tiling,
        }),
        logdet: Some(layout),
        info: Some(model.info()),
        limits: None,
        // Filled in by `bundle::write_bundle` once the files' bytes exist.
        integrity: Default::default(),
    };
    plan.validate()?;
    plan.limits = Some(iresnetc_runtime::required_limits(&plan, &builder.shaders)?);
    report.cost = cost::report(&plan, &kernel_costs, 1);
    Ok(Generated {
        plan,
        shaders: builder.shaders,
        report,
        costs: kernel_costs,
    })
}

/// Dispatches and FLOPs of `steps` run `times` times (fill kernels counted as dispatches,
/// like the runtime counts them).
fn count(
    steps: &[Step],
    times: usize,
    flops: &std::collections::HashMap<String, u64>,
    dispatches: &mut usize,
    total: &mut u64,
) {
    for s in steps {
        match s {
            Step::Dispatch { kernel, .. } => {
                *dispatches += times;
                *total += times as u64 * flops.get(kernel).copied().unwrap_or(0);
            }
            Step::Repeat { times: t, steps } => {
                count(steps, times * *t as usize, flops, dispatches, total)
            }
            Step::Fill { value, .. } if *value != 0.0 => *dispatches += times,
            _ => {}
        }
    }
}

/// Compiles `model` into a runtime bundle without touching the file system (the bench and
/// tests compare fused and unfused plans this way).
pub fn compile_in_memory(model: &Model, opts: &CodegenOptions) -> Result<(Bundle, CodegenReport)> {
    let gen = generate(model, opts)?;
    let bundle = Bundle::from_parts(
        gen.plan,
        gen.shaders,
        crate::netdesc::weights_f32(&model.graph.params),
    )?;
    Ok((bundle, gen.report))
}
