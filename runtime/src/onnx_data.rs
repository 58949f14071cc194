//! Where the weights of a bundle's ONNX graphs live.
//!
//! A bundle cuts a model into per-block segments, and each block has several graphs (forward,
//! forward with log-det, the unrolled inverse); embedding the block's weights in each of them
//! stored every weight three to five times. Instead every initializer of at least
//! [`MIN_EXTERNAL_BYTES`] is referenced with ONNX's standard external-data fields (`location`,
//! `offset`, `length`): into the bundle's `weights.safetensors` when its bytes are a tensor
//! stored there (safetensors keeps raw little-endian data), else into [`ONNX_DATA_FILE`], each
//! distinct content once. Other runtimes opening a bundle's `forward.onnx` by path read the
//! same files. tract is never given a model directory: the loader resolves the references
//! itself from bytes already checked against the bundle's hashes, so no file is read twice
//! and none outside the bundle is read at all.

use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::ModelProto;

/// The external-data file for initializers that are not stored tensors (relative to the
/// bundle directory).
pub const ONNX_DATA_FILE: &str = "onnx.bin";

/// The files a reference may name: [`ONNX_DATA_FILE`] and the bundle's weights.
pub const DATA_FILES: [&str; 2] = [ONNX_DATA_FILE, crate::plan::WEIGHTS_FILE];

/// Initializers smaller than this stay inline (shapes, axes, scalars).
pub const MIN_EXTERNAL_BYTES: usize = 1024;

/// Replaces every external initializer of `proto` by its bytes from `data(file)` (the
/// contents of one of [`DATA_FILES`], None when the bundle has none). Refuses a reference to
/// any other file, a range outside the file, and a length that disagrees with the tensor's
/// shape.
pub fn resolve<'d>(
    proto: &mut ModelProto,
    data: &dyn Fn(&str) -> Option<&'d [u8]>,
) -> Result<(), String> {
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(());
    };
    for t in &mut graph.initializer {
        if t.data_location != Some(DataLocation::External as i32) {
            continue;
        }
        let field = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.as_str())
        };
        let location = field("location")
            .ok_or_else(|| format!("initializer {:?}: external data without a location", t.name))?;
        if !DATA_FILES.contains(&location) {
            return Err(format!(
                "initializer {:?}: external data in {location:?}, only {DATA_FILES:?} are read",
                t.name
            ));
        }
        let number = |key: &str| -> Result<usize, String> {
            field(key)
                .ok_or_else(|| format!("initializer {:?}: external data without {key}", t.name))?
                .parse::<usize>()
                .map_err(|_| format!("initializer {:?}: external {key} is not a size", t.name))
        };
        let (offset, length) = (number("offset")?, number("length")?);
        let data = data(location).ok_or_else(|| {
            format!(
                "initializer {:?}: external data but the bundle has no {location}",
                t.name
            )
        })?;
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                format!(
                    "initializer {:?}: bytes {offset}..+{length} lie outside {location} ({} bytes)",
                    t.name,
                    data.len()
                )
            })?;
        let expected = expected_bytes(&t.dims, t.data_type)
            .ok_or_else(|| format!("initializer {:?}: unsupported type or shape", t.name))?;
        if expected != length {
            return Err(format!(
                "initializer {:?}: {length} external bytes for a tensor of {expected}",
                t.name
            ));
        }
        t.raw_data = data[offset..end].to_vec();
        t.external_data.clear();
        t.data_location = Some(DataLocation::Default as i32);
    }
    Ok(())
}

/// Bytes of a tensor of these dims and ONNX data type, for the types a bundle stores externally.
fn expected_bytes(dims: &[i64], data_type: i32) -> Option<usize> {
    use tract_onnx::pb::tensor_proto::DataType;
    let elem = match DataType::try_from(data_type).ok()? {
        DataType::Float | DataType::Int32 => 4,
        DataType::Double | DataType::Int64 => 8,
        _ => return None,
    };
    dims.iter().try_fold(elem, |acc: usize, &d| {
        acc.checked_mul(usize::try_from(d).ok()?)
    })
}
