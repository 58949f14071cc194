//! Lowering of a block's log-det series: probes x terms vjp chains with the fused
//! activation-derivative masks and the `<w_k, v>` reduction.

use super::*;

impl Lowering<'_> {
    pub(super) fn ld_bindings(&mut self, b: usize, terms: usize) -> Result<LogDetBindings> {
        let fb = &self.fusion.blocks[b];
        let dim = self.layout.block_dims[b];
        let acc = self
            .b
            .buffer(&format!("s{}.acc", fb.stage), dim, true, BufferInit::Zero)?;
        let coef = self.b.buffer(
            names::COEF,
            self.layout.coef_elems(),
            true,
            BufferInit::Input,
        )?;
        let probes = self.b.buffer(
            names::PROBES,
            self.layout.probe_elems(),
            true,
            BufferInit::Input,
        )?;
        // Terms started in this block, over all probes (advanced by the first vjp kernel of
        // each term, reset by the block's reduce kernel).
        let counter = self.b.buffer(names::COUNTER, 1, true, BufferInit::Zero)?;
        Ok(LogDetBindings {
            acc,
            coef,
            probes,
            counter,
            terms,
            coef_n: self.layout.coef_elems(),
            coef_off: b * self.layout.coef_stride,
            probe_n: self.layout.probe_elems(),
            probe_off: self.layout.block_dims[..b].iter().sum::<usize>() * self.layout.probes,
        })
    }

    // ---------------------------------------------------------------- forward

    /// The log-det series of block `b` at its ActNorm output (whose branch intermediates the
    /// forward just left in the stage scratch): probes x terms vjp chains, one submission.
    pub(super) fn block_logdet(&mut self, b: usize, terms: usize, tag: &str) -> Result<Vec<Step>> {
        let g = self.g;
        let fb: FusedBlock = self.fusion.blocks[b].clone();
        let blk = &g.blocks[b];
        let s = fb.stage;
        let d: usize = fb.shape.iter().product();
        let ld = self.ld_bindings(b, terms)?;
        let a = self.val(blk.actnorm)?;
        let w = self.stage_buf(s, "w", d)?;
        let prefix = format!("{tag}.{}", fb.name);

        // w = v_p (the current probe; no term of it has started yet).
        let init_body = format!(
            "    let probe = u32(counter[sample]) / {terms}u;\n    w[sample * {d}u + i] = probes[sample * {}u + {}u + probe * {d}u + i];",
            ld.probe_n, ld.probe_off
        );
        let init = self.eltwise(
            &format!("{prefix}.probe"),
            d,
            vec![
                Binding::write("w", w.clone()),
                Binding::read("probes", ld.probes.clone()),
                Binding::read("counter", ld.counter.clone()),
            ],
            None,
            &init_body,
        )?;

        let mut term = Vec::new();
        let last = fb.layers.len() - 1;
        for i in (0..=last).rev() {
            let layer = &fb.layers[i];
            let name = format!("{tag}.vjp.{}", layer.node);
            let src = if i == last {
                w.clone()
            } else {
                self.stage_buf(s, &format!("g{}", i + 1), layer.geom.out_len())?
            };
            let in_n = layer.geom.in_len();
            // The first kernel of a term advances the counter; the kernel that reads it is
            // the term's last, a later dispatch (branches have at least two layers here:
            // lowering refuses a single one).
            let bump_here = i == last && last > 0;
            let conv = |epilogue| Conv {
                geom: layer.geom,
                transposed: true,
                src: src.clone(),
                weight: layer.weight.clone(),
                bias: None,
                epilogue,
                bump: bump_here.then(|| ld.counter.clone()),
            };
            if i > 0 {
                let act = fb.layers[i - 1]
                    .act_after
                    .clone()
                    .ok_or_else(|| Error::Codegen {
                        context: layer.node.clone(),
                        message: "inner layer without activation".into(),
                    })?;
                // ELU and ReLU: the derivative from the forward's stored output.
                let from_output = kernels::derivative_from_output(&act);
                let stored = if from_output { "post" } else { "pre" };
                let mask = Mask {
                    buffer: self.stage_buf(s, &format!("{stored}{i}"), in_n)?,
                    act,
                    from_output,
                };
                let dst = self.stage_buf(s, &format!("g{i}"), in_n)?;
                if self.fusion.enabled {
                    term.push(self.conv(&name, conv(Epilogue::VjpMask { mask, dst }))?);
                } else {
                    let raw = self.stage_buf(s, &format!("gt{i}"), in_n)?;
                    term.push(self.conv(&name, conv(Epilogue::Store { dst: raw.clone() }))?);
                    term.push(self.mask(&format!("{name}.mask"), in_n, &raw, &mask, &dst)?);
                }
            } else if self.fusion.enabled {
                // The next block's leading activation has replaced this one's output in the
                // stage's `lead` buffer by now: the derivative comes from the ActNorm output.
                let mask = fb.lead_act.clone().map(|act| Mask {
                    buffer: a.clone(),
                    act,
                    from_output: false,
                });
                term.push(self.conv(
                    &name,
                    conv(Epilogue::VjpDot {
                        mask,
                        dst: w.clone(),
                        ld: ld.clone(),
                    }),
                )?);
            } else {
                match fb.lead_act.clone() {
                    Some(act) => {
                        let raw = self.stage_buf(s, "gt0", in_n)?;
                        let mask = Mask {
                            buffer: a.clone(),
                            act,
                            from_output: false,
                        };
                        term.push(self.conv(&name, conv(Epilogue::Store { dst: raw.clone() }))?);
                        term.push(self.mask(&format!("{name}.mask"), in_n, &raw, &mask, &w)?);
                    }
                    None => term.push(self.conv(&name, conv(Epilogue::Store { dst: w.clone() }))?),
                }
                term.push(self.eltwise(
                    &format!("{prefix}.dot"),
                    d,
                    kernels::dot_bindings(&ld, &w),
                    None,
                    &kernels::dot_body(&ld, d),
                )?);
            }
        }

        let an = &g.node(blk.actnorm);
        let log_scale = param_name(&an.name, "log_scale");
        self.weight(&log_scale)?;
        let logdet = self.b.buffer(names::LOGDET, 1, true, BufferInit::Zero)?;
        let reduce = kernels::logdet_reduce(
            d,
            an.shape[0],
            spatial(&an.shape),
            &ld.acc,
            &log_scale,
            &logdet,
            &ld.counter,
        )?;
        let reduce = self.emit(&format!("{prefix}.reduce"), reduce)?;
        Ok(vec![
            Step::Repeat {
                times: self.layout.probes as u32,
                steps: vec![
                    init,
                    Step::Repeat {
                        times: terms as u32,
                        steps: term,
                    },
                ],
            },
            reduce,
        ])
    }

    /// `dst = src * act'` elementwise, the derivative from `mask` (unfused plans).
    pub(super) fn mask(
        &mut self,
        name: &str,
        n: usize,
        src: &str,
        mask: &Mask,
        dst: &str,
    ) -> Result<Step> {
        let body = format!(
            "    let o = sample * {n}u + i;\n    dst[o] = src[o] * {};",
            mask.call("pre[o]")
        );
        self.eltwise(
            name,
            n,
            vec![
                Binding::read("src", src),
                Binding::read("pre", mask.buffer.clone()),
                Binding::write("dst", dst),
            ],
            Some(&mask.act),
            &body,
        )
    }
}
