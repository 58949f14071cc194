//! The one file that holds the weights of every ONNX graph of a bundle.
//!
//! A bundle cuts a model into per-block segments, and each block has several graphs (forward,
//! forward with log-det, the unrolled inverse); embedding the block's weights in each of them
//! stored every weight three to five times. Instead every initializer of at least
//! [`MIN_EXTERNAL_BYTES`] is stored once in [`ONNX_DATA_FILE`] and referenced with ONNX's
//! standard external-data fields (`location`, `offset`, `length`), so other runtimes opening a
//! bundle's `forward.onnx` by path read the same file. tract is never given a model directory:
//! the loader resolves the references itself from bytes already checked against the bundle's
//! hashes, so no file is read twice and none outside the bundle is read at all.

use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::ModelProto;

/// The external-data file every reference must name (relative to the bundle directory).
pub const ONNX_DATA_FILE: &str = "onnx.bin";

/// Initializers smaller than this stay inline (shapes, axes, scalars).
pub const MIN_EXTERNAL_BYTES: usize = 1024;

/// Replaces every external initializer of `proto` by its bytes from `data` (the contents of
/// [`ONNX_DATA_FILE`]). Refuses a reference to any other file, a range outside `data`, a length
/// that disagrees with the tensor's shape, and external data when there is no data file.
pub fn resolve(proto: &mut ModelProto, data: Option<&[u8]>) -> Result<(), String> {
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
        if location != ONNX_DATA_FILE {
            return Err(format!(
                "initializer {:?}: external data in {location:?}, only {ONNX_DATA_FILE:?} is read",
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
        let data = data.ok_or_else(|| {
            format!(
                "initializer {:?}: external data but the bundle has no {ONNX_DATA_FILE}",
                t.name
            )
        })?;
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                format!(
                    "initializer {:?}: bytes {offset}..+{length} lie outside {ONNX_DATA_FILE} ({} bytes)",
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
