//! Accumulates a plan: buffers (declared once, shared by name), kernels (each unique WGSL
//! source validated by naga once and written once, however many kernels bind it) and the
//! per-dispatch FLOP counts the report sums per entry point.

use std::collections::{BTreeMap, HashMap};

use iresnetc_runtime::{BufferDecl, BufferInit, KernelDecl, Step, WeightLayout};

use super::wgsl::{self, Binding, Slot};
use crate::error::{Error, Result};

#[derive(Default)]
pub struct PlanBuilder {
    pub buffers: Vec<BufferDecl>,
    buffer_index: HashMap<String, usize>,
    pub kernels: Vec<KernelDecl>,
    kernel_index: HashMap<String, usize>,
    /// WGSL file name -> source.
    pub shaders: BTreeMap<String, String>,
    file_of_source: HashMap<String, String>,
    /// FLOPs per sample of one dispatch of each kernel.
    pub flops: HashMap<String, u64>,
    /// The cost figures of each kernel that do not depend on the batch.
    pub costs: HashMap<String, KernelCost>,
}

/// What one dispatch of a kernel costs, apart from its grid (which the plan holds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCost {
    pub flops_per_sample: u64,
    /// Longest serial chain of one invocation (see `kernels::Generated::chain`).
    pub chain: u64,
    pub bytes_per_sample: u64,
    pub bytes_shared: u64,
    pub kind: super::kernels::KernelKind,
}

impl PlanBuilder {
    /// Declares buffer `name` (or checks that an earlier declaration agrees) and returns it.
    pub fn buffer(
        &mut self,
        name: &str,
        elems: usize,
        per_sample: bool,
        init: BufferInit,
    ) -> Result<String> {
        if let Some(&i) = self.buffer_index.get(name) {
            let b = &self.buffers[i];
            if b.elems != elems as u64 || b.per_sample != per_sample || b.init != init {
                return Err(Error::Codegen {
                    context: format!("buffer `{name}`"),
                    message: format!(
                        "declared twice with different layouts ({} vs {elems} elements, {:?} vs {init:?})",
                        b.elems, b.init
                    ),
                });
            }
            return Ok(name.to_string());
        }
        self.buffer_index
            .insert(name.to_string(), self.buffers.len());
        self.buffers.push(BufferDecl {
            name: name.to_string(),
            elems: elems as u64,
            per_sample,
            init,
        });
        Ok(name.to_string())
    }

    /// Per-sample scratch (contents undefined at the start of a run).
    pub fn scratch(&mut self, name: &str, elems: usize) -> Result<String> {
        self.buffer(name, elems, true, BufferInit::Scratch)
    }

    /// A weight tensor, bound through a buffer of the same name.
    pub fn weight(&mut self, tensor: &str, elems: usize) -> Result<String> {
        self.buffer(
            tensor,
            elems,
            false,
            BufferInit::Weight {
                tensor: tensor.to_string(),
                layout: WeightLayout::Stored,
            },
        )
    }

    /// The adjoint arrangement of convolution weight `tensor` (`cout` outputs, `k`x`k` taps;
    /// see [`WeightLayout::Adjoint`]), uploaded by the runtime beside the stored one.
    pub fn weight_adjoint(
        &mut self,
        tensor: &str,
        elems: usize,
        cout: usize,
        k: usize,
    ) -> Result<String> {
        let too_big = |_| Error::Codegen {
            context: format!("tensor `{tensor}`"),
            message: "dimensions beyond u32".into(),
        };
        self.buffer(
            &format!("{tensor}.adjoint"),
            elems,
            false,
            BufferInit::Weight {
                tensor: tensor.to_string(),
                layout: WeightLayout::Adjoint {
                    cout: u32::try_from(cout).map_err(too_big)?,
                    k: u32::try_from(k).map_err(too_big)?,
                },
            },
        )
    }

    /// Declares kernel `name` (a `main` entry point of `source` with `bindings`) and returns
    /// the step that dispatches it. A kernel requested again under the same name must be
    /// identical; sources are deduplicated into one file.
    pub fn kernel(
        &mut self,
        name: &str,
        source: String,
        bindings: &[Binding],
        workgroup_size: u32,
        workgroups: [u32; 2],
        cost: KernelCost,
    ) -> Result<Step> {
        let step = Step::Dispatch {
            kernel: name.to_string(),
            workgroups: [workgroups[0].max(1), workgroups[1].max(1), 1],
            large_batch: None,
        };
        let file = match self.file_of_source.get(&source) {
            Some(f) => f.clone(),
            None => {
                wgsl::validate(name, &source)?;
                let file = format!("{}.wgsl", sanitize(name));
                self.shaders.insert(file.clone(), source.clone());
                self.file_of_source.insert(source, file.clone());
                file
            }
        };
        let mut bound = Vec::new();
        let mut read_only = Vec::new();
        for slot in wgsl::slots(bindings) {
            match slot {
                Slot::Buffer(b) => {
                    bound.push(b.buffer.clone());
                    read_only.push(!b.write);
                }
                Slot::Params(parts) => {
                    let elems = parts.iter().map(|b| b.param.unwrap_or(0)).sum();
                    let buffer = self.buffer(
                        &wgsl::params_buffer(&parts),
                        elems,
                        false,
                        BufferInit::Packed {
                            parts: parts.iter().map(|b| b.buffer.clone()).collect(),
                        },
                    )?;
                    bound.push(buffer);
                    read_only.push(true);
                }
            }
        }
        let decl = KernelDecl {
            name: name.to_string(),
            file,
            entry: "main".to_string(),
            workgroup_size: [workgroup_size, 1, 1],
            bindings: bound,
            read_only,
        };
        if let Some(&i) = self.kernel_index.get(name) {
            let old = &self.kernels[i];
            if old.file != decl.file || old.bindings != decl.bindings {
                return Err(Error::Codegen {
                    context: format!("kernel `{name}`"),
                    message: "declared twice with different code or bindings".into(),
                });
            }
            return Ok(step);
        }
        self.kernel_index
            .insert(name.to_string(), self.kernels.len());
        self.kernels.push(decl);
        self.flops.insert(name.to_string(), cost.flops_per_sample);
        self.costs.insert(name.to_string(), cost);
        Ok(step)
    }
}

/// File-system-safe version of a kernel name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
