//! A named f64 parameter tensor and the parameter store of a model.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }
}

/// Parameters by full name (`stage0.block3.conv1.weight`), sorted so that
/// every walk over them is deterministic.
pub type Params = BTreeMap<String, Tensor>;
