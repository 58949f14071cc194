//! The device limits a bundle needs: reflected from its plan and WGSL by the compiler,
//! recorded in `plan.json` (`limits`), and checked against the device before anything is
//! built, so an adapter that is too small is refused with the limit's name rather than with a
//! validation error in the middle of pipeline creation. WebGPU's defaults
//! ([`RequiredLimits::WEBGPU_DEFAULT`]) are what a browser grants a page that asks for no
//! more; codegen keeps every bundle within them.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::buffers::buffer_bytes;
use crate::error::{Result, RuntimeError};
use crate::plan::{dispatch_at, Plan, Step, MAX_WORKGROUPS_PER_DIM};

/// Limits a bundle needs (named as wgpu's `Limits` fields), at batch 1: buffer sizes and the
/// per-sample grids grow with the batch, which the runtimes split into chunks that fit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct RequiredLimits {
    pub max_bind_groups: u32,
    pub max_storage_buffers_per_shader_stage: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_size_x: u32,
    pub max_compute_workgroup_size_y: u32,
    pub max_compute_workgroup_size_z: u32,
    /// Bytes of `var<workgroup>` memory of one kernel.
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_workgroups_per_dimension: u32,
    /// Bytes of the largest buffer at batch 1.
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
}

impl RequiredLimits {
    /// WebGPU's default limits (the specification's "default" column).
    pub const WEBGPU_DEFAULT: RequiredLimits = RequiredLimits {
        max_bind_groups: 4,
        max_storage_buffers_per_shader_stage: 8,
        max_compute_invocations_per_workgroup: 256,
        max_compute_workgroup_size_x: 256,
        max_compute_workgroup_size_y: 256,
        max_compute_workgroup_size_z: 64,
        max_compute_workgroup_storage_size: 16_384,
        max_compute_workgroups_per_dimension: MAX_WORKGROUPS_PER_DIM,
        max_storage_buffer_binding_size: 128 << 20,
        max_buffer_size: 256 << 20,
    };

    /// Every limit by its wgpu name.
    pub fn entries(&self) -> [(&'static str, u64); 10] {
        [
            ("max_bind_groups", self.max_bind_groups.into()),
            (
                "max_storage_buffers_per_shader_stage",
                self.max_storage_buffers_per_shader_stage.into(),
            ),
            (
                "max_compute_invocations_per_workgroup",
                self.max_compute_invocations_per_workgroup.into(),
            ),
            (
                "max_compute_workgroup_size_x",
                self.max_compute_workgroup_size_x.into(),
            ),
            (
                "max_compute_workgroup_size_y",
                self.max_compute_workgroup_size_y.into(),
            ),
            (
                "max_compute_workgroup_size_z",
                self.max_compute_workgroup_size_z.into(),
            ),
            (
                "max_compute_workgroup_storage_size",
                self.max_compute_workgroup_storage_size.into(),
            ),
            (
                "max_compute_workgroups_per_dimension",
                self.max_compute_workgroups_per_dimension.into(),
            ),
            (
                "max_storage_buffer_binding_size",
                self.max_storage_buffer_binding_size,
            ),
            ("max_buffer_size", self.max_buffer_size),
        ]
    }

    /// The same limits of a wgpu device.
    pub fn of_device(l: &wgpu::Limits) -> RequiredLimits {
        RequiredLimits {
            max_bind_groups: l.max_bind_groups,
            max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
            max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_compute_workgroup_size_x: l.max_compute_workgroup_size_x,
            max_compute_workgroup_size_y: l.max_compute_workgroup_size_y,
            max_compute_workgroup_size_z: l.max_compute_workgroup_size_z,
            max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
            max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
            max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
            max_buffer_size: l.max_buffer_size,
        }
    }

    /// The first limit this bundle needs above `available`'s, as an error naming it.
    pub fn check(&self, available: &RequiredLimits) -> Result<()> {
        for ((limit, requested), (_, max)) in self.entries().into_iter().zip(available.entries()) {
            if requested > max {
                return Err(RuntimeError::LimitExceeded {
                    limit: limit.to_string(),
                    what: "the bundle (plan.json \"limits\")".to_string(),
                    requested,
                    max,
                });
            }
        }
        Ok(())
    }

    fn raise(&mut self, other: &RequiredLimits) {
        let m = |a: &mut u32, b: u32| *a = (*a).max(b);
        m(&mut self.max_bind_groups, other.max_bind_groups);
        m(
            &mut self.max_storage_buffers_per_shader_stage,
            other.max_storage_buffers_per_shader_stage,
        );
        m(
            &mut self.max_compute_invocations_per_workgroup,
            other.max_compute_invocations_per_workgroup,
        );
        m(
            &mut self.max_compute_workgroup_size_x,
            other.max_compute_workgroup_size_x,
        );
        m(
            &mut self.max_compute_workgroup_size_y,
            other.max_compute_workgroup_size_y,
        );
        m(
            &mut self.max_compute_workgroup_size_z,
            other.max_compute_workgroup_size_z,
        );
        m(
            &mut self.max_compute_workgroup_storage_size,
            other.max_compute_workgroup_storage_size,
        );
        m(
            &mut self.max_compute_workgroups_per_dimension,
            other.max_compute_workgroups_per_dimension,
        );
        self.max_storage_buffer_binding_size = self
            .max_storage_buffer_binding_size
            .max(other.max_storage_buffer_binding_size);
        self.max_buffer_size = self.max_buffer_size.max(other.max_buffer_size);
    }
}

/// Refuses a device below what `plan` records it needs (plans without `limits` pass).
pub fn check_device(plan: &Plan, device: &wgpu::Limits) -> Result<()> {
    match &plan.limits {
        Some(needed) => needed.check(&RequiredLimits::of_device(device)),
        None => Ok(()),
    }
}

/// What one compute entry point of a parsed WGSL module needs: its storage buffers (the
/// `var<storage>` globals it uses), workgroup size and `var<workgroup>` bytes; None when the
/// module has no such entry point.
pub fn entry_point_limits(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
) -> Option<RequiredLimits> {
    let (index, ep) = module
        .entry_points
        .iter()
        .enumerate()
        .find(|(_, ep)| ep.name == entry && ep.stage == naga::ShaderStage::Compute)?;
    let uses = info.get_entry_point(index);
    let mut storage = 0u32;
    let mut groups = std::collections::BTreeSet::new();
    let mut shared = 0u32;
    let layouter = {
        let mut l = naga::proc::Layouter::default();
        l.update(module.to_ctx()).ok()?;
        l
    };
    for (handle, var) in module.global_variables.iter() {
        if uses[handle].is_empty() {
            continue;
        }
        match var.space {
            naga::AddressSpace::Storage { .. } => storage += 1,
            naga::AddressSpace::WorkGroup => {
                shared = shared.saturating_add(layouter[var.ty].size);
            }
            _ => {}
        }
        if let Some(b) = &var.binding {
            groups.insert(b.group);
        }
    }
    let [x, y, z] = ep.workgroup_size;
    Some(RequiredLimits {
        max_bind_groups: groups.iter().next_back().map_or(0, |g| g + 1),
        max_storage_buffers_per_shader_stage: storage,
        max_compute_invocations_per_workgroup: x.saturating_mul(y).saturating_mul(z),
        max_compute_workgroup_size_x: x,
        max_compute_workgroup_size_y: y,
        max_compute_workgroup_size_z: z,
        max_compute_workgroup_storage_size: shared,
        ..RequiredLimits::default()
    })
}

/// The limits `plan` with its WGSL files `shaders` needs (see [`RequiredLimits`]). Errors
/// name the WGSL file that does not parse or lacks its entry point.
pub fn required_limits(plan: &Plan, shaders: &BTreeMap<String, String>) -> Result<RequiredLimits> {
    let mut need = RequiredLimits::default();
    let mut modules: HashMap<&str, (naga::Module, naga::valid::ModuleInfo)> = HashMap::new();
    for k in &plan.kernels {
        let shader_error = |message: String| RuntimeError::Shader {
            kernel: k.name.clone(),
            message: format!("{}: {message}", k.file),
        };
        if !modules.contains_key(k.file.as_str()) {
            let source = shaders
                .get(&k.file)
                .ok_or_else(|| shader_error("no such WGSL file".into()))?;
            let module = naga::front::wgsl::parse_str(source)
                .map_err(|e| shader_error(crate::device::one_line(&e.to_string())))?;
            let info = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .map_err(|e| shader_error(crate::device::one_line(&e.to_string())))?;
            modules.insert(k.file.as_str(), (module, info));
        }
        let (module, info) = &modules[k.file.as_str()];
        let kernel = entry_point_limits(module, info, &k.entry)
            .ok_or_else(|| shader_error(format!("no @compute function {:?}", k.entry)))?;
        need.raise(&kernel);
    }
    // The built-in fill kernel: one group of 256 invocations, two storage buffers.
    need.raise(&RequiredLimits {
        max_bind_groups: 1,
        max_storage_buffers_per_shader_stage: 2,
        max_compute_invocations_per_workgroup: 256,
        max_compute_workgroup_size_x: 256,
        max_compute_workgroup_size_y: 1,
        max_compute_workgroup_size_z: 1,
        ..RequiredLimits::default()
    });
    for b in &plan.buffers {
        let bytes = buffer_bytes(b, 1);
        need.max_storage_buffer_binding_size = need.max_storage_buffer_binding_size.max(bytes);
        need.max_buffer_size = need.max_buffer_size.max(bytes);
    }
    fn grids(steps: &[Step], need: &mut RequiredLimits) {
        for s in steps {
            match s {
                Step::Dispatch {
                    kernel,
                    workgroups,
                    large_batch,
                } => {
                    let at_one = dispatch_at(
                        kernel,
                        *workgroups,
                        large_batch.as_ref(),
                        1,
                        MAX_WORKGROUPS_PER_DIM,
                    );
                    let grid = at_one.map_or([u32::MAX; 3], |(_, g)| g);
                    let largest = grid.into_iter().max().unwrap_or(0);
                    need.max_compute_workgroups_per_dimension =
                        need.max_compute_workgroups_per_dimension.max(largest);
                }
                Step::Repeat { steps, .. } => grids(steps, need),
                Step::Copy { .. } | Step::Fill { .. } => {}
            }
        }
    }
    for ep in plan.entry_points.values() {
        grids(&ep.steps, &mut need);
    }
    Ok(need)
}
