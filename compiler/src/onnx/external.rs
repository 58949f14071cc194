//! Moves the initializers of a bundle's ONNX graphs out of the graphs.
//!
//! The same block weights appear in a segment's forward, forward-with-log-det and inverse
//! graphs and in the whole-model forward graph; stored inline, a cifar bundle carried its
//! 100 MB of weights five times over. Here each initializer of at least
//! [`MIN_EXTERNAL_BYTES`] becomes an ONNX external-data reference: into the bundle's
//! `weights.safetensors` when the bytes are a stored tensor's, else into [`ONNX_DATA_FILE`],
//! each distinct content once. The runtime resolves them
//! ([`iresnetc_runtime::onnx_data::resolve`]).

use std::collections::HashMap;

use crate::error::{Error, Result};

use iresnetc_runtime::fsread::sha256_hex;
use iresnetc_runtime::onnx_data::{MIN_EXTERNAL_BYTES, ONNX_DATA_FILE};
use iresnetc_runtime::plan::WEIGHTS_FILE;
use safetensors::SafeTensors;
use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::{ModelProto, StringStringEntryProto};

/// Offsets in the data file are multiples of this, so that a reader mapping the file can view
/// any tensor as aligned f32/i64/f64 data.
const ALIGN: usize = 64;

/// Rewrites every large initializer of `graphs` as a reference into `weights` (the bytes of
/// the bundle's `weights.safetensors`) where it holds the same bytes, else into the returned
/// contents of [`ONNX_DATA_FILE`], each distinct content stored once.
pub fn externalize<'a>(
    graphs: impl IntoIterator<Item = &'a mut ModelProto>,
    weights: &[u8],
) -> Result<Vec<u8>> {
    let mut data: Vec<u8> = vec![];
    // Content hash -> (file, offset in it).
    let mut stored: HashMap<String, (&'static str, usize)> = HashMap::new();
    let (header, _) = SafeTensors::read_metadata(weights).map_err(|e| Error::Unsupported {
        what: WEIGHTS_FILE.into(),
        reason: e.to_string(),
    })?;
    // Tensor data starts after the 8-byte header length and the header.
    let start = 8 + header;
    let tensors = SafeTensors::deserialize(weights).map_err(|e| Error::Unsupported {
        what: WEIGHTS_FILE.into(),
        reason: e.to_string(),
    })?;
    for (_, view) in tensors.tensors() {
        let bytes = view.data();
        if bytes.len() >= MIN_EXTERNAL_BYTES {
            // `bytes` is a slice of `weights`: its offset is the distance of the pointers.
            let offset = bytes.as_ptr() as usize - weights.as_ptr() as usize;
            debug_assert!(offset >= start);
            stored.insert(sha256_hex(bytes), (WEIGHTS_FILE, offset));
        }
    }
    for m in graphs {
        let Some(graph) = m.graph.as_mut() else {
            continue;
        };
        for t in &mut graph.initializer {
            if t.raw_data.len() < MIN_EXTERNAL_BYTES {
                continue;
            }
            let key = sha256_hex(&t.raw_data);
            let (file, offset) = *stored.entry(key).or_insert_with(|| {
                data.resize(data.len().next_multiple_of(ALIGN), 0);
                let at = data.len();
                data.extend_from_slice(&t.raw_data);
                (ONNX_DATA_FILE, at)
            });
            let entry = |key: &str, value: String| StringStringEntryProto {
                key: key.into(),
                value,
            };
            t.external_data = vec![
                entry("location", file.into()),
                entry("offset", offset.to_string()),
                entry("length", t.raw_data.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            t.raw_data = vec![];
        }
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{Params, Tensor};
    use iresnetc_runtime::onnx_data::resolve;
    use tract_onnx::pb::{GraphProto, TensorProto};

    fn graph(tensors: &[(&str, Vec<f32>)]) -> ModelProto {
        ModelProto {
            graph: Some(GraphProto {
                initializer: tensors
                    .iter()
                    .map(|(name, v)| TensorProto {
                        name: (*name).into(),
                        dims: vec![v.len() as i64],
                        data_type: 1,
                        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn weights_file(tensors: &[(&str, &[f32])]) -> Vec<u8> {
        let mut p = Params::new();
        for (name, v) in tensors {
            let data = v.iter().map(|&x| f64::from(x)).collect();
            p.insert((*name).into(), Tensor::new(vec![v.len()], data));
        }
        crate::weights::to_safetensors(&p).unwrap()
    }

    fn field(t: &TensorProto, key: &str) -> Option<String> {
        t.external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    }

    #[test]
    fn stored_tensors_are_referenced_and_the_rest_stored_once() {
        let big: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let stored: Vec<f32> = (0..300).map(|i| -(i as f32)).collect();
        let small = vec![1.0f32, 2.0];
        let weights = weights_file(&[("a.weight", &stored), ("b.scale", &small)]);
        let originals = [
            graph(&[("w", big.clone()), ("s", small.clone())]),
            graph(&[("w_again", big.clone()), ("v", stored.clone())]),
        ];
        let mut graphs = originals.clone();
        let data = externalize(graphs.iter_mut(), &weights).unwrap();
        // `big` once (4000 bytes); `stored` is in the weights file; `small` (8 bytes) inline.
        assert_eq!(data.len(), 4000);
        let inits = |m: &ModelProto| m.graph.as_ref().unwrap().initializer.clone();
        assert_eq!(
            inits(&graphs[0])[1].raw_data.len(),
            8,
            "small tensors stay inline"
        );
        for g in &graphs {
            assert_eq!(field(&inits(g)[0], "offset").as_deref(), Some("0"));
            assert_eq!(
                field(&inits(g)[0], "location").as_deref(),
                Some(ONNX_DATA_FILE)
            );
        }
        let v = &inits(&graphs[1])[1];
        assert_eq!(field(v, "location").as_deref(), Some(WEIGHTS_FILE));
        // Its offset, found independently: the stored bytes' position in the file.
        let needle: Vec<u8> = stored.iter().flat_map(|x| x.to_le_bytes()).collect();
        let at = weights
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap();
        assert_eq!(field(v, "offset"), Some(at.to_string()));
        let files = |f: &str| match f {
            ONNX_DATA_FILE => Some(&data[..]),
            WEIGHTS_FILE => Some(&weights[..]),
            _ => None,
        };
        for (g, orig) in graphs.iter_mut().zip(&originals) {
            resolve(g, &files).unwrap();
            let bytes = |m: &ModelProto| -> Vec<(String, Vec<u8>, bool)> {
                inits(m)
                    .into_iter()
                    .map(|t| (t.name, t.raw_data, t.external_data.is_empty()))
                    .collect()
            };
            assert_eq!(bytes(g), bytes(orig));
        }
    }

    #[test]
    fn bad_references_are_refused() {
        let big: Vec<f32> = (0..512).map(|i| i as f32).collect();
        let weights = weights_file(&[("x.weight", &[0.5; 4])]);
        let mut g = graph(&[("w", big)]);
        let data = externalize(std::iter::once(&mut g), &weights).unwrap();
        let set = |g: &ModelProto, key: &str, value: &str| {
            let mut g = g.clone();
            let t = &mut g.graph.as_mut().unwrap().initializer[0];
            t.external_data
                .iter_mut()
                .find(|e| e.key == key)
                .unwrap()
                .value = value.into();
            g
        };
        let cases = [
            (set(&g, "location", "../weights.safetensors"), "only"),
            (set(&g, "location", "plan.json"), "only"),
            (set(&g, "offset", "1"), "outside"),
            (set(&g, "length", "2044"), "bytes for a tensor of 2048"),
            (set(&g, "offset", "18446744073709551615"), "outside"),
            (set(&g, "length", "-1"), "not a size"),
            (set(&g, "location", WEIGHTS_FILE), "outside"),
        ];
        let files = |f: &str| match f {
            ONNX_DATA_FILE => Some(&data[..]),
            WEIGHTS_FILE => Some(&weights[..]),
            _ => None,
        };
        for (mut bad, want) in cases {
            let err = resolve(&mut bad, &files).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        let err = resolve(&mut g.clone(), &|_| None).unwrap_err();
        assert!(err.contains("no onnx.bin"), "{err}");
    }
}
