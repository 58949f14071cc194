//! WGSL text: the templates in `shaders/` (compiled into the binary), placeholder
//! substitution, binding declarations, and naga validation of every generated module.

use std::fmt::Write as _;

use crate::error::{Error, Result};
use crate::ops::activation::LIPSWISH_DIV;
use crate::spec::Activation;

pub const CONV_TEMPLATE: &str = include_str!("../../../shaders/conv.wgsl");
pub const CONV1X1_VEC4_TEMPLATE: &str = include_str!("../../../shaders/conv1x1_vec4.wgsl");
pub const CONV_GEMM_TEMPLATE: &str = include_str!("../../../shaders/conv_gemm.wgsl");
pub const CONV_SPLITK_TEMPLATE: &str = include_str!("../../../shaders/conv_splitk.wgsl");
pub const ELTWISE_TEMPLATE: &str = include_str!("../../../shaders/eltwise.wgsl");
pub const REDUCE_TEMPLATE: &str = include_str!("../../../shaders/logdet_reduce.wgsl");
const ACTIVATIONS: &str = include_str!("../../../shaders/activations.wgsl");

/// A buffer a kernel reads or writes: the WGSL variable and the plan buffer behind it.
/// Binding indices follow the order of the list, except that every small read-only
/// parameter (`param`) shares one binding, see [`slots`].
#[derive(Clone, Debug)]
pub struct Binding {
    pub var: &'static str,
    pub buffer: String,
    pub write: bool,
    /// A parameter tensor of this many values, read through the accessor `var(i)`.
    pub param: Option<usize>,
}

impl Binding {
    pub fn read(var: &'static str, buffer: impl Into<String>) -> Self {
        Self {
            var,
            buffer: buffer.into(),
            write: false,
            param: None,
        }
    }

    pub fn write(var: &'static str, buffer: impl Into<String>) -> Self {
        Self {
            var,
            buffer: buffer.into(),
            write: true,
            param: None,
        }
    }

    /// A small read-only weight tensor of `elems` values (a bias, an ActNorm scale, ...),
    /// read in WGSL as `var(i)`.
    pub fn param(var: &'static str, tensor: impl Into<String>, elems: usize) -> Self {
        Self {
            var,
            buffer: tensor.into(),
            write: false,
            param: Some(elems),
        }
    }
}

/// WGSL variable of the binding that packs a kernel's parameters.
pub const PARAMS_VAR: &str = "params";

/// One `@group(0) @binding(i)` of a kernel.
#[derive(Clone, Debug)]
pub enum Slot<'a> {
    Buffer(&'a Binding),
    /// Every parameter of the kernel, concatenated in this order (see
    /// `iresnetc_runtime::BufferInit::Packed`), at the position of the first one. WebGPU's
    /// default limit is 8 storage buffers per shader stage; a fused epilogue with a bias, an
    /// ActNorm and an activation parameter would exceed it with a binding each.
    Params(Vec<&'a Binding>),
}

/// The bindings a kernel declares, in binding order.
pub fn slots(bindings: &[Binding]) -> Vec<Slot<'_>> {
    let params: Vec<&Binding> = bindings.iter().filter(|b| b.param.is_some()).collect();
    let mut out = Vec::new();
    let mut params = Some(params);
    for b in bindings {
        if b.param.is_none() {
            out.push(Slot::Buffer(b));
        } else if let Some(p) = params.take() {
            out.push(Slot::Params(p));
        }
    }
    out
}

/// Plan buffer name of a parameter pack: its tensors in order.
pub fn params_buffer(parts: &[&Binding]) -> String {
    let names: Vec<&str> = parts.iter().map(|b| b.buffer.as_str()).collect();
    format!("params[{}]", names.join(","))
}

/// The declarations of `bindings`, one per line.
pub fn declare(bindings: &[Binding]) -> String {
    declare_vec4(bindings, &[])
}

/// The declarations of `bindings`, those named in `vec4` as arrays of `vec4<f32>` (the
/// kernels that load 4 consecutive values at once), the others of `f32`; the parameters as
/// one array with an accessor function per tensor.
pub fn declare_vec4(bindings: &[Binding], vec4: &[&str]) -> String {
    let mut s = String::new();
    for (i, slot) in slots(bindings).into_iter().enumerate() {
        match slot {
            Slot::Buffer(b) => {
                let access = if b.write { "read_write" } else { "read" };
                let ty = if vec4.contains(&b.var) {
                    "array<vec4<f32>>"
                } else {
                    "array<f32>"
                };
                let _ = writeln!(
                    s,
                    "@group(0) @binding({i}) var<storage, {access}> {}: {ty};",
                    b.var
                );
            }
            Slot::Params(parts) => {
                let _ = writeln!(
                    s,
                    "@group(0) @binding({i}) var<storage, read> {PARAMS_VAR}: array<f32>;"
                );
                let mut offset = 0usize;
                for p in parts {
                    let _ = writeln!(
                        s,
                        "fn {}(i: u32) -> f32 {{ return {PARAMS_VAR}[{offset}u + i]; }}",
                        p.var
                    );
                    offset += p.param.unwrap_or(0);
                }
            }
        }
    }
    s
}

/// Replaces every `{{NAME}}` of `template`; a placeholder left over is a codegen bug.
pub fn render(template: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut out = template.to_string();
    for (name, value) in vars {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(start) = out.find("{{") {
        let end = out[start..].find("}}").map_or(out.len(), |e| start + e + 2);
        return Err(Error::Codegen {
            context: "WGSL template".into(),
            message: format!("placeholder {} was not filled", &out[start..end]),
        });
    }
    Ok(out)
}

/// The activation helpers (with LipSwish's divisor filled in).
pub fn activation_functions() -> String {
    ACTIVATIONS.replace("{{LIPSWISH_DIV}}", &float(LIPSWISH_DIV))
}

/// WGSL name suffix of an activation's functions (`act_elu`, `dact_elu`, ...).
pub fn act_suffix(act: Activation) -> &'static str {
    match act {
        Activation::Elu => "elu",
        Activation::Relu => "relu",
        Activation::LipSwish => "lipswish",
    }
}

/// An f32 literal WGSL accepts (always with a decimal point or exponent).
pub fn float(v: f64) -> String {
    let s = format!("{:?}", v as f32);
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// Parses and validates a module with naga, as the runtime and wgpu will; the error names the
/// kernel and the line.
pub fn validate(kernel: &str, source: &str) -> Result<()> {
    let err = |message: String| Error::Codegen {
        context: format!("kernel `{kernel}`"),
        message,
    };
    let module = naga::front::wgsl::parse_str(source).map_err(|e| {
        err(format!(
            "generated WGSL does not parse: {}",
            e.emit_to_string(source)
        ))
    })?;
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| {
        err(format!(
            "generated WGSL does not validate: {}",
            e.emit_to_string(source)
        ))
    })?;
    Ok(())
}
