//! Lowering of a block's log-det series: probes x terms vjp chains with the fused
//! activation-derivative masks and the `<w_k, v>` reduction.

use super::*;

impl Lowering<'_> {
    /// Values per sample of the accumulator every block of a log-det entry point adds to.
    fn acc_elems(&self) -> usize {
        self.layout.block_dims.iter().copied().max().unwrap_or(1)
    }

    pub(super) fn ld_bindings(&mut self, b: usize, terms: usize) -> Result<LogDetBindings> {
        let acc_n = self.acc_elems();
        let acc = self
            .b
            .buffer(names::ACC, acc_n + 1, true, BufferInit::Zero)?;
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
        let log_scale = param_name(&self.g.node(self.g.blocks[b].actnorm).name, "log_scale");
        self.weight(&log_scale)?;
        Ok(LogDetBindings {
            // Terms started in the run, over every block's probes (advanced by the first vjp
            // kernel of each term; zeroed with the accumulator when a run starts).
            counter: TermCounter {
                buffer: acc.clone(),
                stride: acc_n + 1,
                at: acc_n,
            },
            acc,
            acc_n,
            coef,
            probes,
            log_scale,
            terms,
            probes_per_block: self.layout.probes,
            coef_n: self.layout.coef_elems(),
            coef_off: b * self.layout.coef_stride,
            probe_n: self.layout.probe_elems(),
            probe_off: self.layout.block_dims[..b].iter().sum::<usize>() * self.layout.probes,
        })
    }

    /// The entry point's log-det: every sample's accumulator summed, once, at the end.
    pub(super) fn logdet_sum(&mut self, tag: &str) -> Result<Step> {
        let acc_n = self.acc_elems();
        let acc = self
            .b
            .buffer(names::ACC, acc_n + 1, true, BufferInit::Zero)?;
        let logdet = self.b.buffer(names::LOGDET, 1, true, BufferInit::Zero)?;
        let reduce = kernels::logdet_reduce(acc_n, acc_n + 1, &acc, &logdet)?;
        self.emit(&format!("{tag}.logdet.sum"), reduce)
    }

    // ---------------------------------------------------------------- forward

    /// The log-det series of block `b` at its ActNorm output (whose branch intermediates the
    /// forward just left in the stage scratch): for each probe, its first term (whose first
    /// kernel reads the probe straight from the `probes` input), then the other terms, one
    /// kernel sequence repeated; the terms and the block's ActNorm log-scales accumulate
    /// elementwise into the entry point's accumulator.
    pub(super) fn block_logdet(&mut self, b: usize, terms: usize, tag: &str) -> Result<Vec<Step>> {
        let fb: FusedBlock = self.fusion.blocks[b].clone();
        let s = fb.stage;
        let d: usize = fb.shape.iter().product();
        let ld = self.ld_bindings(b, terms)?;
        let w = self.stage_buf(s, "w", d)?;
        let mut steps = Vec::new();
        for p in 0..self.layout.probes {
            // The probe's values in `probes`: values per sample, and this probe's offset.
            let view = (ld.probe_n, ld.probe_off + p * d);
            let first = self.term(b, &ld, &w, Some((p, view)), tag)?;
            steps.extend(first);
            if terms > 1 {
                let rest = self.term(b, &ld, &w, None, tag)?;
                steps.push(Step::Repeat {
                    times: terms as u32 - 1,
                    steps: rest,
                });
            }
        }
        Ok(steps)
    }

    /// The kernels of one series term of block `b`: the vjp chain from `w` (or, for a
    /// probe's first term, from probe `p` inside `probes`) back to `w`, with the
    /// activation-derivative masks and the `<w_k, v>` accumulation.
    fn term(
        &mut self,
        b: usize,
        ld: &LogDetBindings,
        w: &str,
        probe: Option<(usize, (usize, usize))>,
        tag: &str,
    ) -> Result<Vec<Step>> {
        let g = self.g;
        let fb: FusedBlock = self.fusion.blocks[b].clone();
        let blk = &g.blocks[b];
        let s = fb.stage;
        let d: usize = fb.shape.iter().product();
        let a = self.val(blk.actnorm)?;
        let prefix = format!("{tag}.{}", fb.name);
        let mut term = Vec::new();
        let last = fb.layers.len() - 1;
        for i in (0..=last).rev() {
            let layer = &fb.layers[i];
            let mut name = format!("{tag}.vjp.{}", layer.node);
            let (src, src_view) = if i < last {
                let g_in = self.stage_buf(s, &format!("g{}", i + 1), layer.geom.out_len())?;
                (g_in, None)
            } else if let Some((p, view)) = probe {
                name = format!("{name}.probe{p}");
                (ld.probes.clone(), Some(view))
            } else {
                (w.to_string(), None)
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
                src_view,
                adjoint_weight: false,
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
                    let mask_name = format!("{tag}.vjp.{}.mask", layer.node);
                    term.push(self.mask(&mask_name, in_n, &raw, &mask, &dst)?);
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
                        dst: w.to_string(),
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
                        term.push(self.mask(&format!("{name}.mask"), in_n, &raw, &mask, w)?);
                    }
                    None => {
                        term.push(self.conv(&name, conv(Epilogue::Store { dst: w.to_string() }))?)
                    }
                }
                let an = g.node(blk.actnorm);
                term.push(self.eltwise(
                    &format!("{prefix}.dot"),
                    d,
                    kernels::dot_bindings(ld, w, d / spatial(&an.shape)),
                    None,
                    &kernels::dot_body(ld, d, spatial(&an.shape)),
                )?);
            }
        }
        Ok(term)
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
