//! Spec -> graph. Names follow the weight naming scheme of docs/model-files.md#weights:
//! `stage{s}.block{b}.{actnorm|conv{i}|dense{i}|act{i}}`, `pre.squeeze`,
//! `stage{s}.squeeze`, `stage{s}.factor_out.{keep|out}`, `head.{bn,relu,pool,linear}`.

use petgraph::stable_graph::{NodeIndex, StableDiGraph};

use super::{Block, Graph, Node};
use crate::error::{Error, Result};
use crate::kernels::ConvGeom;
use crate::ops::Op;
use crate::spec::{Activation, FactorOutHalf, ModelKind, ModelSpec};
use crate::tensor::Params;

struct Builder {
    dag: StableDiGraph<Node, usize>,
}

impl Builder {
    fn add(
        &mut self,
        name: String,
        op: Op,
        inputs: &[NodeIndex],
        block: Option<usize>,
    ) -> Result<NodeIndex> {
        let shapes: Vec<&[usize]> = inputs
            .iter()
            .map(|&i| self.dag[i].shape.as_slice())
            .collect();
        let shape = op.infer_shape(&shapes).map_err(|reason| Error::Graph {
            node: name.clone(),
            reason,
        })?;
        let ix = self.dag.add_node(Node {
            name,
            op,
            shape,
            block,
        });
        for (slot, &i) in inputs.iter().enumerate() {
            self.dag.add_edge(i, ix, slot);
        }
        Ok(ix)
    }

    fn shape(&self, ix: NodeIndex) -> Vec<usize> {
        self.dag[ix].shape.clone()
    }
}

/// Builds the (parameter-less) graph of a validated spec.
pub fn build(spec: &ModelSpec) -> Result<Graph> {
    let mut b = Builder {
        dag: StableDiGraph::new(),
    };
    let input = b.dag.add_node(Node {
        name: "input".into(),
        op: Op::Input,
        shape: spec.input.clone(),
        block: None,
    });
    let mut cur = input;
    let squeeze = Op::Squeeze {
        order: spec.squeeze_order,
    };
    if spec.squeeze {
        cur = b.add("pre.squeeze".into(), squeeze.clone(), &[cur], None)?;
    }
    if let Some(channels) = spec.pad_channels {
        cur = b.add("pre.pad".into(), Op::PadChannels { channels }, &[cur], None)?;
    }
    let mut blocks = Vec::new();
    let mut latents = Vec::new();
    for (s, st) in spec.stages.iter().enumerate() {
        if st.squeeze {
            cur = b.add(format!("stage{s}.squeeze"), squeeze.clone(), &[cur], None)?;
        }
        for bi in 0..st.blocks {
            let name = format!("stage{s}.block{bi}");
            let block_ix = blocks.len();
            let actnorm = b.add(format!("{name}.actnorm"), Op::ActNorm, &[cur], None)?;
            let mut body = Vec::new();
            let mut h = actnorm;
            let mut act_i = 0;
            let mut act = |b: &mut Builder,
                           h: NodeIndex,
                           body: &mut Vec<NodeIndex>,
                           a: Activation|
             -> Result<NodeIndex> {
                let n = b.add(
                    format!("{name}.act{act_i}"),
                    Op::Act { act: a },
                    &[h],
                    Some(block_ix),
                )?;
                act_i += 1;
                body.push(n);
                Ok(n)
            };
            // The very first block of a model sees the raw input: no input activation.
            let first_of_model = block_ix == 0;
            let shape = b.shape(h);
            if spec.is_image() {
                let (c, hh, ww) = (shape[0], shape[1], shape[2]);
                let width = st.width.unwrap_or(c);
                let ks = st.kernels.clone().unwrap_or_else(|| vec![3, 1, 3]);
                for (li, &k) in ks.iter().enumerate() {
                    if li > 0 || !first_of_model {
                        h = act(&mut b, h, &mut body, st.activation)?;
                    }
                    let cin = b.shape(h)[0];
                    let cout = if li + 1 == ks.len() { c } else { width };
                    let geom = ConvGeom {
                        cin,
                        cout,
                        h: hh,
                        w: ww,
                        k,
                        stride: 1,
                        pad: k / 2,
                    };
                    h = b.add(
                        format!("{name}.conv{li}"),
                        Op::Conv2d { geom },
                        &[h],
                        Some(block_ix),
                    )?;
                    body.push(h);
                }
            } else {
                let d = shape[0];
                let hidden = st.hidden.clone().unwrap_or_default();
                let widths: Vec<usize> = hidden.iter().copied().chain([d]).collect();
                let mut fin = d;
                for (li, &fout) in widths.iter().enumerate() {
                    if li > 0 || !first_of_model {
                        h = act(&mut b, h, &mut body, st.activation)?;
                    }
                    h = b.add(
                        format!("{name}.dense{li}"),
                        Op::Dense { fin, fout },
                        &[h],
                        Some(block_ix),
                    )?;
                    body.push(h);
                    fin = fout;
                }
            }
            let residual = b.add(
                format!("{name}.residual"),
                Op::Residual,
                &[actnorm, h],
                None,
            )?;
            blocks.push(Block {
                name,
                stage: s,
                actnorm,
                body,
                residual,
            });
            cur = residual;
        }
        if st.factor_out {
            let c = b.shape(cur)[0];
            // The half sent to z and the half that continues (channel ranges).
            let (out_range, keep_range) = match spec.factor_out_half {
                FactorOutHalf::First => ((0, c / 2), (c / 2, c - c / 2)),
                FactorOutHalf::Second => ((c / 2, c - c / 2), (0, c / 2)),
            };
            let keep = b.add(
                format!("stage{s}.factor_out.keep"),
                Op::SliceChannels {
                    start: keep_range.0,
                    len: keep_range.1,
                },
                &[cur],
                None,
            )?;
            let out = b.add(
                format!("stage{s}.factor_out.out"),
                Op::SliceChannels {
                    start: out_range.0,
                    len: out_range.1,
                },
                &[cur],
                None,
            )?;
            latents.push(out);
            cur = keep;
        }
    }
    let mut logits = None;
    match spec.kind {
        ModelKind::Flow => latents.push(cur),
        ModelKind::Classifier => {
            let head = spec.head.clone().unwrap_or_default();
            if spec.is_image() {
                if head.batchnorm {
                    cur = b.add(
                        "head.bn".into(),
                        Op::BatchNorm { eps: head.bn_eps },
                        &[cur],
                        None,
                    )?;
                }
                cur = b.add(
                    "head.relu".into(),
                    Op::Act {
                        act: Activation::Relu,
                    },
                    &[cur],
                    None,
                )?;
                cur = b.add("head.pool".into(), Op::GlobalAvgPool, &[cur], None)?;
            }
            let fin = b.shape(cur)[0];
            cur = b.add(
                "head.linear".into(),
                Op::Dense {
                    fin,
                    fout: head.classes,
                },
                &[cur],
                None,
            )?;
            logits = Some(cur);
        }
    }
    Ok(Graph {
        spec: spec.clone(),
        dag: b.dag,
        input,
        blocks,
        latents,
        logits,
        params: Params::new(),
    })
}
