//! Training and evaluation data: the built-in 2-D densities (an endless stream
//! for training, an independently drawn held-out sample for evaluation), and
//! image sets from `.npy` (`[N, C, H, W]` uint8, or float in [0, 1], optional
//! labels) or MNIST-format IDX files (`.gz` or not). Every check against the
//! model (shape, range, labels) happens here, before any step, with a one-line
//! error naming the file.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use npyz::{DType, NpyFile};

use super::mat::Mat;
use super::toy;
use crate::error::{Error, Result};
use crate::spec::{ModelKind, ModelSpec};
use iresnetc_runtime::rng::Rng;

pub const STREAM_DATA: u64 = 103;
pub const STREAM_HELDOUT: u64 = 104;
pub const STREAM_SHUFFLE: u64 = 105;

/// How image data is fitted to the model's input.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fit {
    /// Zero pixels added on every side.
    pub pad: usize,
    /// Repeat a single channel to the model's channel count.
    pub repeat_channels: bool,
}

#[derive(Clone, Debug)]
pub enum Data {
    /// A built-in 2-D density (training draws fresh points every step).
    Toy { name: String },
    /// A finite set, already fitted to the model: pixels in [0, 1].
    Set {
        source: String,
        x: Vec<Vec<f64>>,
        labels: Option<Vec<usize>>,
    },
}

fn err(file: &Path, array: &str, reason: String) -> Error {
    Error::Array {
        file: file.to_path_buf(),
        array: array.into(),
        reason,
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| err(path, "data", format!("not a valid gzip file ({e})")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// An IDX file: `(dims, bytes)` of an unsigned-byte array.
fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let b = read_bytes(path)?;
    let bad = |r: String| err(path, "idx", r);
    if b.len() < 4 || b[0] != 0 || b[1] != 0 {
        return Err(bad("not an IDX file (bad magic number)".into()));
    }
    if b[2] != 0x08 {
        return Err(bad(format!(
            "element type 0x{:02x}, expected unsigned bytes (0x08)",
            b[2]
        )));
    }
    let nd = b[3] as usize;
    let head = 4 + 4 * nd;
    if b.len() < head {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| {
            u32::from_be_bytes([b[4 + 4 * i], b[5 + 4 * i], b[6 + 4 * i], b[7 + 4 * i]]) as usize
        })
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("dimensions overflow".into()))?;
    if b.len() - head != n {
        return Err(bad(format!(
            "{} data bytes, the header says {dims:?} = {n}",
            b.len() - head
        )));
    }
    Ok((dims, b[head..].to_vec()))
}

/// A `.npy` array as f64 with its shape; `int` accepts integer dtypes only.
fn read_npy(path: &Path, array: &str, int: bool) -> Result<(Vec<usize>, Vec<f64>, bool)> {
    let bytes = read_bytes(path)?;
    let bad = |r: String| err(path, array, r);
    let npy = NpyFile::new(Cursor::new(&bytes))
        .map_err(|e| bad(format!("not a valid .npy file ({e})")))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    if npy.order() != npyz::Order::C && shape.len() > 1 {
        return Err(bad("Fortran-ordered arrays are not supported".into()));
    }
    let descr = match npy.dtype() {
        DType::Plain(t) => t.to_string(),
        other => return Err(bad(format!("unsupported dtype {}", other.descr()))),
    };
    let e = |x: std::io::Error| bad(format!("cannot read data ({x})"));
    let (data, is_u8): (Vec<f64>, bool) = match descr.trim_start_matches(['<', '>', '|', '=']) {
        "u1" => (
            npy.into_vec::<u8>()
                .map_err(e)?
                .into_iter()
                .map(f64::from)
                .collect(),
            true,
        ),
        "f4" if !int => (
            npy.into_vec::<f32>()
                .map_err(e)?
                .into_iter()
                .map(f64::from)
                .collect(),
            false,
        ),
        "f8" if !int => (npy.into_vec::<f64>().map_err(e)?, false),
        "i8" if int => (
            npy.into_vec::<i64>()
                .map_err(e)?
                .into_iter()
                .map(|v| v as f64)
                .collect(),
            false,
        ),
        "i4" if int => (
            npy.into_vec::<i32>()
                .map_err(e)?
                .into_iter()
                .map(f64::from)
                .collect(),
            false,
        ),
        "u8" if int => (
            npy.into_vec::<u64>()
                .map_err(e)?
                .into_iter()
                .map(|v| v as f64)
                .collect(),
            false,
        ),
        other => {
            return Err(bad(format!(
                "dtype {other}, expected {}",
                if int {
                    "an integer type"
                } else {
                    "uint8, float32 or float64"
                }
            )))
        }
    };
    Ok((shape, data, is_u8))
}

/// Labels from a `.npy` or IDX file, checked against the class count.
fn read_labels(path: &Path, n: usize, classes: usize) -> Result<Vec<usize>> {
    let is_npy = path.extension().is_some_and(|e| e == "npy");
    let vals: Vec<f64> = if is_npy {
        let (shape, d, _) = read_npy(path, "labels", true)?;
        if shape.len() != 1 {
            return Err(err(
                path,
                "labels",
                format!("shape {shape:?}, expected [N]"),
            ));
        }
        d
    } else {
        let (dims, b) = read_idx(path)?;
        if dims.len() != 1 {
            return Err(err(path, "labels", format!("shape {dims:?}, expected [N]")));
        }
        b.into_iter().map(f64::from).collect()
    };
    if vals.len() != n {
        return Err(err(
            path,
            "labels",
            format!("{} labels for {n} images", vals.len()),
        ));
    }
    vals.iter()
        .enumerate()
        .map(|(i, &v)| {
            if v >= 0.0 && v < classes as f64 && v.fract() == 0.0 {
                Ok(v as usize)
            } else {
                Err(err(
                    path,
                    "labels",
                    format!("label {i} is {v}, the model has {classes} classes"),
                ))
            }
        })
        .collect()
}

/// The MNIST file names of a split in a directory (`.gz` or not).
fn mnist_files(dir: &Path, test: bool) -> Option<(PathBuf, PathBuf)> {
    let pre = if test { "t10k" } else { "train" };
    let find = |stem: String| {
        [dir.join(&stem), dir.join(format!("{stem}.gz"))]
            .into_iter()
            .find(|p| p.is_file())
    };
    Some((
        find(format!("{pre}-images-idx3-ubyte"))?,
        find(format!("{pre}-labels-idx1-ubyte"))?,
    ))
}

/// Opens a data source for a model. `src` is a toy name, a `.npy` file, an
/// IDX images file, or a directory with MNIST-format files (`test` picks the
/// t10k split). `labels` overrides the labels file.
pub fn open(
    src: &str,
    labels: Option<&Path>,
    spec: &ModelSpec,
    fit: Fit,
    test: bool,
) -> Result<Data> {
    let classifier = spec.kind == ModelKind::Classifier;
    if toy::is_toy(src) {
        if spec.input != [2] || classifier {
            return Err(Error::Unsupported {
                what: format!("data `{src}`"),
                reason: format!(
                    "a 2-D density needs a flow with input [2], model `{}` has {:?}",
                    spec.name, spec.input
                ),
            });
        }
        return Ok(Data::Toy { name: src.into() });
    }
    let path = Path::new(src);
    if !path.exists() {
        return Err(Error::Unsupported {
            what: format!("data `{src}`"),
            reason: format!(
                "neither a file, a directory nor a built-in density ({})",
                toy::NAMES.join(", ")
            ),
        });
    }
    let (img_path, lab_path) = if path.is_dir() {
        let (i, l) = mnist_files(path, test).ok_or_else(|| {
            err(
                path,
                "data",
                format!(
                    "no {}-images-idx3-ubyte[.gz] and labels in this directory",
                    if test { "t10k" } else { "train" }
                ),
            )
        })?;
        (i, Some(l))
    } else {
        let sibling = {
            let name = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let l = if name.contains("images-idx3") {
                Some(path.with_file_name(name.replace("images-idx3", "labels-idx1")))
            } else {
                name.strip_suffix(".npy")
                    .map(|s| path.with_file_name(format!("{s}_labels.npy")))
            };
            l.filter(|p| p.is_file())
        };
        (path.to_path_buf(), sibling)
    };
    let lab_path = labels.map(Path::to_path_buf).or(lab_path);
    let is_npy = img_path.extension().is_some_and(|e| e == "npy");
    let (shape, mut data, is_u8) = if is_npy {
        read_npy(&img_path, "images", false)?
    } else {
        let (dims, b) = read_idx(&img_path)?;
        // IDX images are [N, H, W]: one channel.
        let shape = match dims.as_slice() {
            [n, h, w] => vec![*n, 1, *h, *w],
            _ => {
                return Err(err(
                    &img_path,
                    "images",
                    format!("shape {dims:?}, expected [N, H, W]"),
                ))
            }
        };
        (shape, b.into_iter().map(f64::from).collect(), true)
    };
    let bad = |r: String| err(&img_path, "images", r);
    if spec.input.len() == 1 {
        if shape.len() != 2 || shape[1] != spec.input[0] {
            return Err(bad(format!(
                "shape {shape:?}, model `{}` needs [N, {}]",
                spec.name, spec.input[0]
            )));
        }
    } else if shape.len() != 4 {
        return Err(bad(format!("shape {shape:?}, expected [N, C, H, W]")));
    }
    if shape[0] == 0 {
        return Err(bad("no samples".into()));
    }
    if is_u8 {
        data.iter_mut().for_each(|v| *v /= 255.0);
    } else if spec.input.len() == 3 {
        if let Some(i) = data.iter().position(|v| !(0.0..=1.0).contains(v)) {
            return Err(bad(format!(
                "element {i} is {}, image values must be in [0, 1]",
                data[i]
            )));
        }
    } else if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("element {i} is {}", data[i])));
    }
    let n = shape[0];
    let per: usize = shape[1..].iter().product();
    let mut x: Vec<Vec<f64>> = data.chunks(per.max(1)).map(<[f64]>::to_vec).collect();
    if spec.input.len() == 3 {
        x = fit_images(x, &shape[1..], &spec.input, fit).map_err(bad)?;
    }
    let labels = if classifier {
        let lp = lab_path
            .ok_or_else(|| bad("a classifier needs labels (--labels, or a sibling file)".into()))?;
        let classes = spec.head.as_ref().map(|h| h.classes).unwrap_or(0);
        Some(read_labels(&lp, n, classes)?)
    } else {
        None
    };
    Ok(Data::Set {
        source: img_path.display().to_string(),
        x,
        labels,
    })
}

/// Pads and repeats channels so that images of shape `have` become `want`.
fn fit_images(
    x: Vec<Vec<f64>>,
    have: &[usize],
    want: &[usize],
    fit: Fit,
) -> std::result::Result<Vec<Vec<f64>>, String> {
    let (c, h, w) = (have[0], have[1], have[2]);
    let (hp, wp) = (h + 2 * fit.pad, w + 2 * fit.pad);
    let co = if fit.repeat_channels && c == 1 {
        want[0]
    } else {
        c
    };
    if [co, hp, wp] != want[..] {
        return Err(format!(
            "images [{c}, {h}, {w}] (with pad {} and repeat_channels {}) do not fit the model input {want:?}",
            fit.pad, fit.repeat_channels
        ));
    }
    if fit.pad == 0 && co == c {
        return Ok(x);
    }
    Ok(x.into_iter()
        .map(|img| {
            let mut out = vec![0.0; co * hp * wp];
            for o in 0..co {
                let ci = if c == 1 { 0 } else { o };
                for y in 0..h {
                    for xx in 0..w {
                        out[(o * hp + y + fit.pad) * wp + xx + fit.pad] =
                            img[(ci * h + y) * w + xx];
                    }
                }
            }
            out
        })
        .collect())
}

impl Data {
    pub fn len(&self) -> Option<usize> {
        match self {
            Data::Toy { .. } => None,
            Data::Set { x, .. } => Some(x.len()),
        }
    }

    /// The training batch of `step` (toy: fresh points; sets: the shuffled
    /// epoch order, each epoch its own permutation) with its labels.
    pub fn batch(&self, seed: u64, step: u64, batch: usize) -> (Mat, Option<Vec<usize>>) {
        match self {
            Data::Toy { name } => {
                let mut r = Rng::for_stream(seed, &[STREAM_DATA, step]);
                let pts = toy::sample(name, batch, &mut r).unwrap_or_default();
                let rows: Vec<Vec<f64>> = pts.iter().map(|p| p.to_vec()).collect();
                (Mat::from_rows(&rows, 2), None)
            }
            Data::Set { x, labels, .. } => {
                let n = x.len();
                let dim = x[0].len();
                let mut m = Mat::zeros(batch, dim);
                let mut lab = labels.as_ref().map(|_| Vec::with_capacity(batch));
                let mut perm_epoch = u64::MAX;
                let mut perm: Vec<usize> = Vec::new();
                for i in 0..batch {
                    let g = step as u128 * batch as u128 + i as u128;
                    let epoch = (g / n as u128) as u64;
                    if epoch != perm_epoch {
                        perm = permutation(n, seed, epoch);
                        perm_epoch = epoch;
                    }
                    let idx = perm[(g % n as u128) as usize];
                    m.row_mut(i).copy_from_slice(&x[idx]);
                    if let (Some(l), Some(all)) = (lab.as_mut(), labels.as_ref()) {
                        l.push(all[idx]);
                    }
                }
                (m, lab)
            }
        }
    }

    /// The evaluation set: the held-out toy sample (`n` points from its own
    /// stream) or the first `n` samples of the set.
    pub fn eval_set(&self, seed: u64, n: usize) -> (Vec<Vec<f64>>, Option<Vec<usize>>) {
        match self {
            Data::Toy { name } => {
                let mut r = Rng::for_stream(seed, &[STREAM_HELDOUT]);
                let pts = toy::sample(name, n, &mut r).unwrap_or_default();
                (pts.iter().map(|p| p.to_vec()).collect(), None)
            }
            Data::Set { x, labels, .. } => {
                let k = n.min(x.len());
                (x[..k].to_vec(), labels.as_ref().map(|l| l[..k].to_vec()))
            }
        }
    }
}

/// Fisher-Yates permutation of `0..n` for an epoch.
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut r = Rng::for_stream(seed, &[STREAM_SHUFFLE, epoch]);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (r.next_u64() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}
