//! Moves the initializers of a bundle's ONNX graphs into one shared data file.
//!
//! The same block weights appear in a segment's forward, forward-with-log-det and inverse
//! graphs and in the whole-model forward graph; stored inline, a cifar bundle carried its
//! 100 MB of weights five times over. Here each distinct initializer of at least
//! [`MIN_EXTERNAL_BYTES`] is written once into [`ONNX_DATA_FILE`] and every graph refers to it
//! with ONNX's external-data fields; the runtime resolves them
//! ([`iresnetc_runtime::onnx_data::resolve`]).

use std::collections::HashMap;

use iresnetc_runtime::fsread::sha256_hex;
use iresnetc_runtime::onnx_data::{MIN_EXTERNAL_BYTES, ONNX_DATA_FILE};
use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::{ModelProto, StringStringEntryProto};

/// Offsets in the data file are multiples of this, so that a reader mapping the file can view
/// any tensor as aligned f32/i64/f64 data.
const ALIGN: usize = 64;

/// Rewrites every large initializer of `graphs` as a reference into the returned data file,
/// each distinct content stored once.
pub fn externalize<'a>(graphs: impl IntoIterator<Item = &'a mut ModelProto>) -> Vec<u8> {
    let mut data: Vec<u8> = vec![];
    let mut stored: HashMap<String, usize> = HashMap::new();
    for m in graphs {
        let Some(graph) = m.graph.as_mut() else {
            continue;
        };
        for t in &mut graph.initializer {
            if t.raw_data.len() < MIN_EXTERNAL_BYTES {
                continue;
            }
            let key = sha256_hex(&t.raw_data);
            let offset = *stored.entry(key).or_insert_with(|| {
                data.resize(data.len().next_multiple_of(ALIGN), 0);
                let at = data.len();
                data.extend_from_slice(&t.raw_data);
                at
            });
            let entry = |key: &str, value: String| StringStringEntryProto {
                key: key.into(),
                value,
            };
            t.external_data = vec![
                entry("location", ONNX_DATA_FILE.into()),
                entry("offset", offset.to_string()),
                entry("length", t.raw_data.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            t.raw_data = vec![];
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn shared_weights_are_stored_once_and_resolve_to_the_same_bytes() {
        let big: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let other: Vec<f32> = (0..300).map(|i| -(i as f32)).collect();
        let small = vec![1.0f32, 2.0];
        let originals = [
            graph(&[("w", big.clone()), ("s", small.clone())]),
            graph(&[("w_again", big.clone()), ("v", other.clone())]),
        ];
        let mut graphs = originals.clone();
        let data = externalize(graphs.iter_mut());
        // `big` once (4000 bytes), padded to the alignment, then `other` (1200 bytes);
        // `small` (8 bytes) stays inline.
        assert_eq!(data.len(), 4000usize.next_multiple_of(ALIGN) + 1200);
        let inits = |m: &ModelProto| m.graph.as_ref().unwrap().initializer.clone();
        assert_eq!(inits(&graphs[0])[1].raw_data.len(), 8, "small tensors stay inline");
        let offset_of = |t: &TensorProto| {
            t.external_data
                .iter()
                .find(|e| e.key == "offset")
                .map(|e| e.value.clone())
        };
        assert_eq!(offset_of(&inits(&graphs[0])[0]), Some("0".into()));
        assert_eq!(offset_of(&inits(&graphs[1])[0]), Some("0".into()));
        for (g, orig) in graphs.iter_mut().zip(&originals) {
            resolve(g, Some(&data)).unwrap();
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
        let mut g = graph(&[("w", big)]);
        let data = externalize(std::iter::once(&mut g));
        let set = |g: &ModelProto, key: &str, value: &str| {
            let mut g = g.clone();
            let t = &mut g.graph.as_mut().unwrap().initializer[0];
            t.external_data.iter_mut().find(|e| e.key == key).unwrap().value = value.into();
            g
        };
        let cases = [
            (set(&g, "location", "../weights.safetensors"), "only"),
            (set(&g, "offset", "1"), "outside"),
            (set(&g, "length", "2044"), "bytes for a tensor of 2048"),
            (set(&g, "offset", "18446744073709551615"), "outside"),
            (set(&g, "length", "-1"), "not a size"),
        ];
        for (mut bad, want) in cases {
            let err = resolve(&mut bad, Some(&data)).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        let err = resolve(&mut g.clone(), None).unwrap_err();
        assert!(err.contains("no onnx.bin"), "{err}");
    }
}
