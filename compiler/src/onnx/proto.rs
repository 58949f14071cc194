//! A small builder over tract-onnx's protobuf types: nodes, f32/i64
//! initializers, attributes and declared inputs/outputs with a symbolic batch.
//!
//! Every node writes one tensor named like the node, so the ONNX graph reads
//! like the IR (`stage0.block3.conv1` is both a node and the tensor it makes).

use std::collections::HashSet;

use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// ONNX IR version written (ONNX 1.10+ readers accept it).
pub const IR_VERSION: i64 = 8;
/// Default-domain operator set: every op used here is unchanged from 13 to 17,
/// and 13 is where Slice/Pad/ReduceSum take their parameters as inputs.
pub const OPSET: i64 = 13;
/// Name of the symbolic batch dimension on every declared input and output.
pub const BATCH: &str = "batch";

/// A dimension of a declared input or output.
#[derive(Clone, Debug, PartialEq)]
pub enum Dim {
    Batch,
    Fixed(usize),
}

/// `[batch, per_sample...]`.
pub fn batched(per_sample: &[usize]) -> Vec<Dim> {
    std::iter::once(Dim::Batch)
        .chain(per_sample.iter().map(|&d| Dim::Fixed(d)))
        .collect()
}

pub fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

pub fn attr_str(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Batch => tensor_shape_proto::dimension::Value::DimParam(BATCH.into()),
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An ONNX graph under construction.
#[derive(Default)]
pub struct OnnxGraph {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    /// Node names and initializer names share one namespace (they are tensor names too).
    names: HashSet<String>,
}

impl OnnxGraph {
    /// A fresh tensor name: `base`, or `base.2`, `base.3`, ... when taken.
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut n = 2;
        while self.names.contains(&name) {
            name = format!("{base}.{n}");
            n += 1;
        }
        self.names.insert(name.clone());
        name
    }

    pub fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Adds a node with one output; returns the output's (= the node's) name.
    pub fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> String {
        let out = self.fresh(name);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: out.clone(),
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
        out
    }

    /// An f32 initializer (values rounded from f64). Reuses `name` if it exists:
    /// a weight read by several unrolled copies of a branch is stored once.
    pub fn init_f32(
        &mut self,
        name: &str,
        dims: &[usize],
        data: impl IntoIterator<Item = f64>,
    ) -> String {
        if self.names.contains(name) {
            return name.to_string();
        }
        let raw: Vec<u8> = data
            .into_iter()
            .flat_map(|v| (v as f32).to_le_bytes())
            .collect();
        self.names.insert(name.to_string());
        self.inits.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            name: name.into(),
            raw_data: raw,
            ..Default::default()
        });
        name.to_string()
    }

    /// An i64 initializer (shapes, axes, pads); reuses `name` if it exists.
    pub fn init_i64(&mut self, name: &str, data: &[i64]) -> String {
        if self.names.contains(name) {
            return name.to_string();
        }
        self.names.insert(name.to_string());
        self.inits.push(TensorProto {
            dims: vec![data.len() as i64],
            data_type: DataType::Int64 as i32,
            name: name.into(),
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.to_string()
    }

    /// A scalar i64 initializer (a Gather index that drops its axis).
    pub fn init_i64_scalar(&mut self, name: &str, v: i64) -> String {
        if self.names.contains(name) {
            return name.to_string();
        }
        self.names.insert(name.to_string());
        self.inits.push(TensorProto {
            dims: vec![],
            data_type: DataType::Int64 as i32,
            name: name.into(),
            raw_data: v.to_le_bytes().to_vec(),
            ..Default::default()
        });
        name.to_string()
    }

    /// A shape constant for Reshape, named after its content so equal shapes share one tensor.
    pub fn shape_const(&mut self, dims: &[i64]) -> String {
        let name = format!(
            "shape[{}]",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        self.init_i64(&name, dims)
    }

    /// An f32 scalar constant named after its value (shared).
    pub fn scalar(&mut self, v: f64) -> String {
        let name = format!("const[{v:e}]");
        self.init_f32(&name, &[], [v])
    }

    /// Reshape `x` to `[-1, per_sample...]`.
    pub fn reshape_batched(&mut self, name: &str, x: &str, per_sample: &[usize]) -> String {
        let dims: Vec<i64> = std::iter::once(-1)
            .chain(per_sample.iter().map(|&d| d as i64))
            .collect();
        let s = self.shape_const(&dims);
        self.node("Reshape", name, &[x, &s], vec![])
    }

    pub fn declare_input(&mut self, name: &str, dims: &[Dim]) {
        self.names.insert(name.to_string());
        self.inputs.push(value_info(name, dims));
    }

    /// Declares `tensor` as a graph output called `name` (an Identity renames it).
    pub fn declare_output(&mut self, name: &str, tensor: &str, dims: &[Dim]) {
        let out = if tensor == name {
            tensor.to_string()
        } else {
            self.node("Identity", name, &[tensor], vec![])
        };
        self.outputs.push(value_info(&out, dims));
    }

    pub fn into_model(self, graph_name: &str, doc: &str) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "iresnetc".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: graph_name.into(),
                initializer: self.inits,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
