//! WGSL kernels on the device: parsing and validating a kernel with naga, checking its entry
//! point and bindings against the plan and the adapter's limits, and building its pipeline.

use super::*;

/// Parses and validates a WGSL module with naga, for reflection and for error messages that
/// point at a line (wgpu validates again with the device's real capabilities).
pub(super) fn parse_wgsl(
    decl: &KernelDecl,
    source: &str,
) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
    let shader_error = |message: String| RuntimeError::Shader {
        kernel: decl.name.clone(),
        message,
    };
    let module = naga::front::wgsl::parse_str(source).map_err(|e| {
        shader_error(match e.location(source) {
            Some(loc) => format!(
                "{}:{}:{}: {}",
                decl.file,
                loc.line_number,
                loc.line_position,
                one_line(&e.to_string())
            ),
            None => format!("{}: {}", decl.file, one_line(&e.to_string())),
        })
    })?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| {
        let location = e
            .location(source)
            .map(|loc| format!(":{}:{}", loc.line_number, loc.line_position))
            .unwrap_or_default();
        shader_error(format!(
            "{}{location}: {}",
            decl.file,
            error_chain(e.as_inner())
        ))
    })?;
    Ok((module, info))
}

/// Checks the kernel's entry point and bindings against the plan; returns, per plan binding,
/// whether it is read-only.
pub(super) fn reflect_bindings(
    decl: &KernelDecl,
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
) -> Result<Vec<bool>> {
    let shader_error = |message: String| RuntimeError::Shader {
        kernel: decl.name.clone(),
        message: format!("{}: {message}", decl.file),
    };
    let (ep_index, ep) = module
        .entry_points
        .iter()
        .enumerate()
        .find(|(_, ep)| ep.name == decl.entry && ep.stage == naga::ShaderStage::Compute)
        .ok_or_else(|| {
            let available: Vec<&str> = module
                .entry_points
                .iter()
                .filter(|ep| ep.stage == naga::ShaderStage::Compute)
                .map(|ep| ep.name.as_str())
                .collect();
            shader_error(format!(
                "no @compute function {:?} (compute entry points: {})",
                decl.entry,
                if available.is_empty() {
                    "none".to_string()
                } else {
                    available.join(", ")
                }
            ))
        })?;
    if ep.workgroup_size_overrides.is_none() && ep.workgroup_size != decl.workgroup_size {
        return Err(shader_error(format!(
            "@workgroup_size is {:?} but plan.json says {:?}",
            ep.workgroup_size, decl.workgroup_size
        )));
    }
    let uses = info.get_entry_point(ep_index);

    let mut read_only: Vec<Option<bool>> = vec![None; decl.bindings.len()];
    for (handle, var) in module.global_variables.iter() {
        let Some(binding) = &var.binding else {
            continue;
        };
        let used = !uses[handle].is_empty();
        let name = var.name.as_deref().unwrap_or("?");
        if binding.group != 0 {
            if used {
                return Err(shader_error(format!(
                    "{name} is in @group({}); the runtime binds @group(0) only",
                    binding.group
                )));
            }
            continue;
        }
        let index = binding.binding as usize;
        if index >= decl.bindings.len() {
            if used {
                return Err(shader_error(format!(
                    "{name} is @binding({index}) but plan.json binds only {} buffers",
                    decl.bindings.len()
                )));
            }
            continue;
        }
        let ro = match var.space {
            naga::AddressSpace::Storage { access } => {
                !access.contains(naga::StorageAccess::STORE)
            }
            _ => {
                return Err(shader_error(format!(
                    "{name} (@binding({index})) must be var<storage, read> or var<storage, read_write>: \
                     plan buffers are bound as storage buffers"
                )))
            }
        };
        // A file may hold several entry points; the one this kernel uses decides.
        if used || read_only[index].is_none() {
            read_only[index] = Some(ro);
        }
    }
    let mut result = Vec::with_capacity(decl.bindings.len());
    for (index, ro) in read_only.into_iter().enumerate() {
        let ro = ro.ok_or_else(|| {
            shader_error(format!(
                "plan.json binds buffer {:?} at @binding({index}), which the WGSL does not declare",
                decl.bindings[index]
            ))
        })?;
        if let Some(&declared) = decl.read_only.get(index) {
            if declared != ro {
                return Err(shader_error(format!(
                    "@binding({index}) (buffer {:?}) is {} in the WGSL but read_only = {declared} in plan.json",
                    decl.bindings[index],
                    if ro { "read" } else { "read_write" }
                )));
            }
        }
        result.push(ro);
    }
    Ok(result)
}

pub(super) fn check_kernel_limits(decl: &KernelDecl, limits: &wgpu::Limits) -> Result<()> {
    let exceeded = |limit: &str, what: String, requested: u64, max: u64| {
        Err(RuntimeError::LimitExceeded {
            limit: limit.to_string(),
            what,
            requested,
            max,
        })
    };
    let n = decl.bindings.len() as u64;
    if n > u64::from(limits.max_storage_buffers_per_shader_stage) {
        return exceeded(
            "max_storage_buffers_per_shader_stage",
            format!("kernel {:?} (storage buffers)", decl.name),
            n,
            u64::from(limits.max_storage_buffers_per_shader_stage),
        );
    }
    if n > u64::from(limits.max_bindings_per_bind_group) {
        return exceeded(
            "max_bindings_per_bind_group",
            format!("kernel {:?} (bindings)", decl.name),
            n,
            u64::from(limits.max_bindings_per_bind_group),
        );
    }
    let [x, y, z] = decl.workgroup_size.map(u64::from);
    for (limit, size, max) in [
        (
            "max_compute_workgroup_size_x",
            x,
            limits.max_compute_workgroup_size_x,
        ),
        (
            "max_compute_workgroup_size_y",
            y,
            limits.max_compute_workgroup_size_y,
        ),
        (
            "max_compute_workgroup_size_z",
            z,
            limits.max_compute_workgroup_size_z,
        ),
        (
            "max_compute_invocations_per_workgroup",
            x * y * z,
            limits.max_compute_invocations_per_workgroup,
        ),
    ] {
        if size > u64::from(max) {
            return exceeded(
                limit,
                format!("kernel {:?} (workgroup size)", decl.name),
                size,
                u64::from(max),
            );
        }
    }
    Ok(())
}

/// Shader module, explicit bind-group layout (one storage entry per plan binding, access from
/// the WGSL) and pipeline, with wgpu's errors caught and attributed to the kernel.
pub(super) fn create_kernel(
    gpu: &GpuDevice,
    decl: &KernelDecl,
    source: &str,
    read_only: &[bool],
) -> Result<Kernel> {
    let device = &gpu.device;
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(&decl.file),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let entries: Vec<wgpu::BindGroupLayoutEntry> = read_only
        .iter()
        .enumerate()
        .map(|(i, &ro)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only: ro },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(&decl.name),
        entries: &entries,
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(&decl.name),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&decl.name),
        layout: Some(&pipeline_layout),
        module: &module,
        entry_point: Some(&decl.entry),
        compilation_options: Default::default(),
        cache: None,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(RuntimeError::Shader {
            kernel: decl.name.clone(),
            message: format!("{}: {}", decl.file, wgpu_error(&e)),
        });
    }
    Ok(Kernel { pipeline, layout })
}

/// An error and its sources on one line (a naga validation error's top-level message alone is
/// often just "Function [0] 'main' is invalid").
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = one_line(&e.to_string());
    let mut source = e.source();
    while let Some(s) = source {
        let part = one_line(&s.to_string());
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    text
}
