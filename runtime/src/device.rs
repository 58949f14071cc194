//! Adapter listing and selection, and the opened device.
//!
//! Selection order: an explicit name (argument or `IRESNETC_ADAPTER`, a case-insensitive
//! substring of the adapter name) wins; otherwise discrete GPU > integrated GPU > virtual GPU >
//! other > CPU (lavapipe / llvmpipe), and on a tie a native API (Vulkan, Metal, DX12) before GL.
//! `WGPU_BACKEND=vulkan|gl|metal|dx12` restricts the backends wgpu enumerates at all.
//!
//! wgpu's default reaction to a validation error is a panic on some later call. A runtime that
//! runs generated code must not panic on a codegen bug, so every device gets an uncaptured-error
//! handler and a device-lost callback that record the error; the executor turns them into
//! `RuntimeError`s.

use std::sync::{Arc, Mutex};

use crate::error::{Result, RuntimeError};

/// Environment variable: substring of the adapter name to force.
pub const ADAPTER_ENV: &str = "IRESNETC_ADAPTER";
/// Environment variable read by wgpu: which backends to enumerate.
pub const BACKEND_ENV: &str = "WGPU_BACKEND";

/// What a user needs to know about an adapter to pick one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSummary {
    pub name: String,
    /// "vulkan", "gl", "metal", "dx12", ...
    pub backend: String,
    /// "discrete", "integrated", "virtual", "cpu", "other".
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    /// A software rasterizer (lavapipe/llvmpipe, SwiftShader, WARP): fine for tests, never for
    /// performance numbers.
    pub is_software: bool,
}

impl AdapterSummary {
    fn from_info(info: &wgpu::AdapterInfo) -> Self {
        AdapterSummary {
            name: info.name.clone(),
            backend: info.backend.to_str().to_string(),
            device_type: device_type_name(info.device_type).to_string(),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            is_software: is_software(info),
        }
    }
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.backend, self.device_type)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
            if !self.driver_info.is_empty() {
                write!(f, " {}", self.driver_info)?;
            }
        }
        write!(f, ")")
    }
}

fn device_type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

fn is_software(info: &wgpu::AdapterInfo) -> bool {
    if info.device_type == wgpu::DeviceType::Cpu {
        return true;
    }
    // GL drivers do not always report a device type; recognise the usual software ones by name.
    let name = info.name.to_lowercase();
    [
        "llvmpipe",
        "lavapipe",
        "softpipe",
        "swiftshader",
        "microsoft basic render",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// Higher is preferred.
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = if is_software(info) {
        0
    } else {
        match info.device_type {
            wgpu::DeviceType::DiscreteGpu => 4,
            wgpu::DeviceType::IntegratedGpu => 3,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other => 1,
            wgpu::DeviceType::Cpu => 0,
        }
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 1,
        _ => 0,
    };
    (kind, api)
}

fn instance() -> Result<wgpu::Instance> {
    // wgpu silently ignores an unknown WGPU_BACKEND value and then finds no adapter; say why.
    if let Ok(value) = std::env::var(BACKEND_ENV) {
        if wgpu::Backends::from_comma_list(&value).is_empty() {
            return Err(RuntimeError::BadEnv {
                var: BACKEND_ENV.to_string(),
                value,
                reason: "expected a comma list of vulkan, gl, metal, dx12".to_string(),
            });
        }
    }
    // Headless: no display handle; honours WGPU_BACKEND and the WGPU_* debug flags.
    Ok(wgpu::Instance::new(
        wgpu::InstanceDescriptor::new_without_display_handle_from_env(),
    ))
}

fn enumerate(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

/// Every adapter wgpu can see (after `WGPU_BACKEND` filtering), best first.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let Ok(instance) = instance() else {
        return Vec::new();
    };
    let mut adapters = enumerate(&instance);
    adapters.sort_by_key(|a| std::cmp::Reverse(rank(&a.get_info())));
    adapters
        .iter()
        .map(|a| AdapterSummary::from_info(&a.get_info()))
        .collect()
}

/// True when some adapter is real hardware (not lavapipe & co.): the `auto` backend then picks
/// wgpu, otherwise the CPU backend, which beats a software rasterizer.
pub fn has_hardware_gpu() -> bool {
    list_adapters().iter().any(|a| !a.is_software)
}

/// Errors wgpu reported outside an error scope, and the reason the device was lost.
#[derive(Default, Debug)]
pub(crate) struct ErrorSink {
    uncaptured: Mutex<Vec<String>>,
    lost: Mutex<Option<String>>,
}

/// An opened adapter: device, queue and what was selected. Cheap to clone (wgpu handles are
/// reference counted).
#[derive(Clone, Debug)]
pub struct GpuDevice {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    summary: AdapterSummary,
    limits: wgpu::Limits,
    errors: Arc<ErrorSink>,
}

impl GpuDevice {
    /// Opens the adapter named by `IRESNETC_ADAPTER`, or else the best one.
    pub fn new() -> Result<GpuDevice> {
        match std::env::var(ADAPTER_ENV) {
            Ok(name) if !name.trim().is_empty() => GpuDevice::with_adapter(Some(name.trim())),
            _ => GpuDevice::with_adapter(None),
        }
    }

    /// Opens the first adapter whose name contains `name` (case-insensitive), or the best one
    /// when `name` is `None`. Ignores `IRESNETC_ADAPTER` (a CLI flag overrides the environment).
    pub fn with_adapter(name: Option<&str>) -> Result<GpuDevice> {
        let instance = instance()?;
        let mut adapters = enumerate(&instance);
        if adapters.is_empty() {
            return Err(RuntimeError::NoAdapter);
        }
        adapters.sort_by_key(|a| std::cmp::Reverse(rank(&a.get_info())));
        let adapter = match name {
            None => adapters.swap_remove(0),
            Some(wanted) => {
                let needle = wanted.to_lowercase();
                let found = adapters
                    .iter()
                    .position(|a| a.get_info().name.to_lowercase().contains(&needle));
                match found {
                    Some(i) => adapters.swap_remove(i),
                    None => {
                        return Err(RuntimeError::AdapterNotFound {
                            wanted: wanted.to_string(),
                            available: adapters
                                .iter()
                                .map(|a| AdapterSummary::from_info(&a.get_info()).to_string())
                                .collect(),
                        })
                    }
                }
            }
        };
        GpuDevice::from_adapter(&adapter)
    }

    /// Opens a device on `adapter` with all of its limits (the defaults are far lower: 8
    /// storage buffers per stage, 128 MiB bindings) and timestamp queries when offered.
    pub fn from_adapter(adapter: &wgpu::Adapter) -> Result<GpuDevice> {
        let info = adapter.get_info();
        let summary = AdapterSummary::from_info(&info);
        // Timestamps for `run_timed`; inside passes for the per-dispatch profile.
        let wanted_features =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("iresnetc"),
            required_features: adapter.features() & wanted_features,
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) =
            pollster::block_on(adapter.request_device(&descriptor)).map_err(|e| {
                RuntimeError::DeviceRequest {
                    adapter: summary.to_string(),
                    reason: e.to_string(),
                }
            })?;

        let errors = Arc::new(ErrorSink::default());
        {
            let sink = Arc::clone(&errors);
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                if let Ok(mut list) = sink.uncaptured.lock() {
                    list.push(wgpu_error(&e));
                }
            }));
        }
        {
            let sink = Arc::clone(&errors);
            device.set_device_lost_callback(move |reason, message| {
                // Dropping our own device reports `Destroyed`; that is not an error.
                if reason == wgpu::DeviceLostReason::Destroyed {
                    return;
                }
                if let Ok(mut lost) = sink.lost.lock() {
                    *lost = Some(if message.is_empty() {
                        format!("{reason:?}")
                    } else {
                        one_line(&message)
                    });
                }
            });
        }
        let limits = device.limits();
        Ok(GpuDevice {
            device,
            queue,
            summary,
            limits,
            errors,
        })
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.summary
    }

    /// The limits the device was opened with (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    pub fn has_timestamps(&self) -> bool {
        self.device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Timestamps can be written between the dispatches of one compute pass.
    pub fn has_timestamps_inside_passes(&self) -> bool {
        self.device.features().contains(
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
        )
    }

    /// Returns (and clears) what wgpu reported outside error scopes since the last call.
    pub fn take_errors(&self) -> Result<()> {
        if let Some(reason) = self.errors.lost.lock().ok().and_then(|l| l.clone()) {
            return Err(RuntimeError::DeviceLost(reason));
        }
        let errors = match self.errors.uncaptured.lock() {
            Ok(mut list) => std::mem::take(&mut *list),
            Err(_) => Vec::new(),
        };
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Gpu(errors.join("; ")))
        }
    }
}

/// wgpu's messages span several lines (an error chain); ours are one line.
pub(crate) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// A wgpu error on one line. Its description already holds the whole cause chain, one cause
/// per line under "Caused by:"; keep the causes, drop the headings.
pub(crate) fn wgpu_error(e: &wgpu::Error) -> String {
    match e {
        wgpu::Error::OutOfMemory { .. } => "out of GPU memory".to_string(),
        wgpu::Error::Validation { description, .. } | wgpu::Error::Internal { description, .. } => {
            let parts: Vec<&str> = description
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && *l != "Caused by:" && *l != "Validation Error")
                .collect();
            if parts.is_empty() {
                one_line(&e.to_string())
            } else {
                parts.join(": ")
            }
        }
    }
}
