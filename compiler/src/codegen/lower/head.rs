//! Lowering of a classifier's head: batch norm and global average pooling.

use super::*;

impl Lowering<'_> {
    pub(super) fn bn_bindings(&mut self, bn: &str) -> Result<Vec<Binding>> {
        let mut v = Vec::new();
        for (var, suffix) in [
            ("bn_w", "weight"),
            ("bn_b", "bias"),
            ("bn_mean", "running_mean"),
            ("bn_var", "running_var"),
        ] {
            let t = param_name(bn, suffix);
            self.weight(&t)?;
            v.push(Binding::read(var, t));
        }
        Ok(v)
    }

    pub(super) fn batchnorm(
        &mut self,
        name: &str,
        ix: NodeIndex,
        input: NodeIndex,
        eps: f64,
    ) -> Result<Step> {
        let n = self.g.node(ix);
        let (src, dst) = (self.val(input)?, self.val(ix)?);
        let d = self.elems(ix);
        let hw = spatial(&n.shape);
        let mut bindings = self.bn_bindings(&n.name)?;
        bindings.insert(0, Binding::read("src", src));
        bindings.insert(1, Binding::write("dst", dst));
        let body = format!(
            "    let c = i / {hw}u;\n    let scale = bn_w[c] / sqrt(bn_var[c] + {eps});\n    let o = sample * {d}u + i;\n    dst[o] = (src[o] - bn_mean[c]) * scale + bn_b[c];",
            eps = float(eps)
        );
        self.eltwise(name, d, bindings, None, &body)
    }

    /// Global average pool; fused, it also applies the head's batch norm and ReLU.
    pub(super) fn pool(&mut self, name: &str, ix: NodeIndex, input: NodeIndex) -> Result<Step> {
        let g = self.g;
        let c = self.elems(ix);
        let dst = self.val(ix)?;
        let mut bindings = vec![Binding::write("dst", dst)];
        let (src_ix, per_elem) = match self.fusion.head_pool.clone() {
            Some(chain) => {
                // chain = [bn?, relu, pool]: read the chain's input.
                let first = g
                    .dag
                    .node_indices()
                    .find(|&i| g.node(i).name == chain[0])
                    .ok_or_else(|| Error::Codegen {
                        context: name.into(),
                        message: "fused head chain not found".into(),
                    })?;
                let mut expr = "x".to_string();
                let mut setup = String::new();
                if let Op::BatchNorm { eps } = g.node(first).op {
                    let bn = self.bn_bindings(&chain[0])?;
                    bindings.extend(bn);
                    setup = format!(
                        "    let scale = bn_w[i] / sqrt(bn_var[i] + {});\n    let shift = bn_b[i] - bn_mean[i] * scale;\n",
                        float(eps)
                    );
                    expr = "x * scale + shift".into();
                }
                (g.inputs(first)[0], (setup, format!("max({expr}, 0.0)")))
            }
            None => (input, (String::new(), "x".to_string())),
        };
        let src = self.val(src_ix)?;
        bindings.insert(0, Binding::read("src", src));
        let hw = spatial(&g.node(src_ix).shape);
        let body = format!(
            "{}    var sum = 0.0;\n    for (var q = 0u; q < {hw}u; q++) {{\n        let x = src[(sample * {c}u + i) * {hw}u + q];\n        sum += {};\n    }}\n    dst[sample * {c}u + i] = sum / {};",
            per_elem.0,
            per_elem.1,
            float(hw as f64)
        );
        self.eltwise(name, c, bindings, None, &body)
    }
}
