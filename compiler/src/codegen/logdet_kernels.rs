//! The log-det pieces shared by the fused convolution epilogue and the unfused dot kernel:
//! which buffers the `<w_k, v>` accumulation binds, where each sample's term counter lives,
//! and the WGSL that finds the current term's coefficient and probe from that counter.

use super::wgsl::Binding;

/// The log-det's per-sample count of series terms started in the run, at
/// `buffer[sample * stride + at]`: the slot after the sample's accumulator, so the kernels
/// that read it bind no buffer for it (WebGPU allows 8 storage buffers per stage by default).
#[derive(Clone, Debug)]
pub struct TermCounter {
    pub buffer: String,
    pub stride: usize,
    pub at: usize,
}

impl TermCounter {
    /// The WGSL element of sample `sample` (the buffer is bound as `acc`).
    pub(super) fn element(&self) -> String {
        format!("acc[sample * {}u + {}u]", self.stride, self.at)
    }
}

/// Buffers and offsets the log-det accumulation reads.
#[derive(Clone, Debug)]
pub struct LogDetBindings {
    /// One accumulator of `acc_n` values per sample for every block of the entry point,
    /// summed once at its end.
    pub acc: String,
    pub acc_n: usize,
    pub coef: String,
    pub probes: String,
    /// In `acc`, after each sample's `acc_n` values.
    pub counter: TermCounter,
    /// The block's ActNorm `log_scale`: its log-det, `H*W*sum(log_scale)`, is added one
    /// channel value per element with the block's first term.
    pub log_scale: String,
    /// Terms per probe of the entry point and probes per block: the counter runs over every
    /// block's probes x terms, never reset within a run.
    pub terms: usize,
    pub probes_per_block: usize,
    /// Per-sample elements of `coef` and the offset of this block's terms.
    pub coef_n: usize,
    pub coef_off: usize,
    /// Per-sample elements of `probes` and the offset of this block's first probe.
    pub probe_n: usize,
    pub probe_off: usize,
}

/// `channels`: values of the ActNorm log-scale (one per channel of the block's output).
pub(super) fn push_logdet_bindings(b: &mut Vec<Binding>, ld: &LogDetBindings, channels: usize) {
    b.push(Binding::write("acc", ld.acc.clone()));
    b.push(Binding::read("coef", ld.coef.clone()));
    b.push(Binding::read("probes", ld.probes.clone()));
    b.push(Binding::param("ld_scale", ld.log_scale.clone(), channels));
}

/// `coef_at` and `probe_at` of the current term and probe, and whether it is the block's
/// first term, from the per-sample count of terms started in the run (the term's first kernel
/// has already advanced it; every block runs probes x terms of them), so one kernel serves
/// every term of the series.
pub(super) fn logdet_counters(ld: &LogDetBindings) -> String {
    let t = ld.terms.max(1);
    format!(
        "    let started = (u32({counter}) - 1u) % {per_block}u;\n    let term = started % {t}u;\n    let probe = started / {t}u;\n    let first_term = started == 0u;\n    let coef_at = sample * {}u + {}u + term;\n    let probe_at = sample * {}u + {}u + probe * OUT_N;\n",
        ld.coef_n,
        ld.coef_off,
        ld.probe_n,
        ld.probe_off,
        per_block = t * ld.probes_per_block.max(1),
        counter = ld.counter.element(),
    )
}

/// Body of the log-det's elementwise `acc += coef_k * w * v_p` (unfused plans), with the
/// ActNorm term (channel `i / spatial`) on the block's first term.
pub fn dot_body(ld: &LogDetBindings, dim: usize, spatial: usize) -> String {
    format!(
        "{}    let o = sample * {dim}u + i;\n    acc[sample * {}u + i] += coef[coef_at] * w[o] * probes[probe_at + i] + select(0.0, ld_scale(i / {spatial}u), first_term);",
        logdet_counters(ld).replace("OUT_N", &format!("{dim}u")),
        ld.counter.stride
    )
}

pub fn dot_bindings(ld: &LogDetBindings, w: &str, channels: usize) -> Vec<Binding> {
    let mut b = vec![Binding::read("w", w)];
    push_logdet_bindings(&mut b, ld, channels);
    b
}
