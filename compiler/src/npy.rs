//! `.npy` arrays in and out (the ecosystem's convention; npyz does the format).
//!
//! Inputs may be f32 or f64, C order, with a leading batch axis; a wrong
//! shape, dtype, order or a NaN/Inf value is an error naming file and array.

use std::io::Cursor;
use std::path::Path;

use npyz::{DType, NpyFile, Order, WriterBuilder};

use crate::error::{Error, Result};

/// A batch read from a `.npy` file: `[B, ...per_sample]`, stored as f64.
#[derive(Clone, Debug)]
pub struct Batch {
    pub shape: Vec<usize>,
    pub samples: Vec<Vec<f64>>,
}

/// Reads `path` and checks that each sample has `per_sample` shape.
pub fn read_batch(path: &Path, array: &str, per_sample: &[usize]) -> Result<Batch> {
    // Bounded by the memory budget: the array is held as f64 rows besides the file bytes.
    let budget = iresnetc_runtime::fsread::memory_budget()?;
    let bytes = iresnetc_runtime::fsread::read_bounded(path, budget / 4, ".npy array")?;
    parse_batch(&bytes, path, array, per_sample)
}

/// [`read_batch`] on bytes already in memory; `path` is only used in messages.
pub fn parse_batch(bytes: &[u8], path: &Path, array: &str, per_sample: &[usize]) -> Result<Batch> {
    let bad = |reason: String| Error::Array {
        file: path.to_path_buf(),
        array: array.to_string(),
        reason,
    };
    let npy = NpyFile::new(Cursor::new(bytes)).map_err(|e| {
        bad(format!(
            "not a valid .npy file ({})",
            iresnetc_runtime::fsread::clip(&e.to_string(), 120)
        ))
    })?;
    let shape: Vec<usize> = npy
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
        .collect();
    // The header's shape must describe exactly the data that follows: checked before npyz
    // allocates for it, so a header claiming 2^60 elements is an error, not an abort.
    let count = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let width = match npy.dtype() {
        DType::Plain(t) => t.num_bytes().unwrap_or(0) as u64,
        _ => 0,
    };
    if width > 0
        && count
            .checked_mul(width)
            .is_none_or(|n| n > bytes.len() as u64)
    {
        return Err(bad(format!(
            "header says shape {shape:?} but the file holds only {} bytes",
            bytes.len()
        )));
    }
    if npy.order() != Order::C && shape.len() > 1 {
        return Err(bad(
            "Fortran-ordered arrays are not supported; save with C order".into(),
        ));
    }
    let descr = match npy.dtype() {
        DType::Plain(t) => t.to_string(),
        other => return Err(bad(format!("unsupported dtype {}", other.descr()))),
    };
    let data: Vec<f64> = match descr.as_str() {
        "<f8" | ">f8" => npy.into_vec::<f64>(),
        "<f4" | ">f4" => npy
            .into_vec::<f32>()
            .map(|v| v.into_iter().map(f64::from).collect()),
        other => return Err(bad(format!("dtype {other}, expected float32 or float64"))),
    }
    .map_err(|e| {
        bad(format!(
            "cannot read data ({})",
            iresnetc_runtime::fsread::clip(&e.to_string(), 120)
        ))
    })?;
    let expected = std::iter::once("B".to_string())
        .chain(per_sample.iter().map(|d| d.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    if shape.len() != per_sample.len() + 1 || shape[1..] != *per_sample {
        return Err(bad(format!("shape {shape:?}, expected [{expected}]")));
    }
    if shape[0] == 0 {
        return Err(bad("the batch is empty".into()));
    }
    // Finite, and finite in f32 too: every backend but the reference computes in f32, where
    // 1e300 is inf; refusing it here keeps the backends' answers comparable.
    let limit = f64::from(f32::MAX);
    if let Some(i) = data.iter().position(|v| !v.is_finite() || v.abs() > limit) {
        let per: usize = per_sample.iter().product::<usize>().max(1);
        return Err(bad(format!(
            "sample {} element {} is {:e} (inputs must be finite and within f32 range, |x| <= {limit:e})",
            i / per,
            i % per,
            data[i]
        )));
    }
    let per: usize = per_sample.iter().product::<usize>().max(1);
    Ok(Batch {
        shape,
        samples: data.chunks(per).map(|c| c.to_vec()).collect(),
    })
}

/// Serializes rows as an `[B, ...per_sample]` array of f64 or f32.
pub fn to_bytes(rows: &[Vec<f64>], per_sample: &[usize], f32_out: bool) -> Result<Vec<u8>> {
    let shape: Vec<u64> = std::iter::once(rows.len() as u64)
        .chain(per_sample.iter().map(|&d| d as u64))
        .collect();
    let mut buf = Vec::new();
    let io = |e: std::io::Error| Error::Codegen {
        context: "npy".into(),
        message: e.to_string(),
    };
    if f32_out {
        let mut w = npyz::WriteOptions::<f32>::new()
            .default_dtype()
            .shape(&shape)
            .writer(&mut buf)
            .begin_nd()
            .map_err(io)?;
        w.extend(rows.iter().flatten().map(|&v| v as f32))
            .map_err(io)?;
        w.finish().map_err(io)?;
    } else {
        let mut w = npyz::WriteOptions::<f64>::new()
            .default_dtype()
            .shape(&shape)
            .writer(&mut buf)
            .begin_nd()
            .map_err(io)?;
        w.extend(rows.iter().flatten().copied()).map_err(io)?;
        w.finish().map_err(io)?;
    }
    Ok(buf)
}

/// Writes an array atomically (nothing half-written on failure).
///
/// Every result of every backend goes through here: inside a command (an open output
/// transaction, see [`crate::output`]) a NaN or infinite value is refused (the command fails,
/// nothing is written) rather than saved as if it were a result. Library callers may write
/// any values (tests write NaN arrays on purpose).
pub fn write(path: &Path, rows: &[Vec<f64>], per_sample: &[usize], f32_out: bool) -> Result<()> {
    let results = crate::output::active();
    for (i, r) in rows.iter().enumerate().filter(|_| results) {
        if let Some(j) = r
            .iter()
            .position(|v| !v.is_finite() || (f32_out && v.abs() > f64::from(f32::MAX)))
        {
            return Err(Error::Array {
                file: path.to_path_buf(),
                array: "output".into(),
                reason: format!(
                    "sample {i} element {j} is {}: the computation overflowed or is undefined for this input (nothing written)",
                    r[j]
                ),
            });
        }
    }
    let bytes = to_bytes(rows, per_sample, f32_out)?;
    crate::fsutil::write_atomic(path, &bytes)
}
