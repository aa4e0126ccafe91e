//! What a row's loss and gradient follow from: its statistics ([`RowStats`], gathered by the
//! statistics pass) and the per-row arithmetic of the options ([`RowMath`]).

use super::simd::ElemOpts;
use crate::plan::RowOptions;

/// The statistics of one logits row (or of a slice of it), from which loss and gradient follow:
/// with any reference `r`, `others = Σ_{j≠y} exp(z_j - r)` over every entry but the target `y`,
/// `e_y = exp(target_logit - r)` (in f64), `sum = others + e_y`,
/// `loss = ln(sum) - (target_logit - r)`, taken as `ln(1 + others / e_y)` where the target
/// dominates, and `grad_j = coef * (exp(z_j - r) / sum - [j == y])` (plus the options' terms,
/// see [`RowMath`]); `z` is the soft-capped logit when soft-capping is on.
///
/// The target's term is kept out of the f32 lanes that sum the others: in a confident row it is
/// near 1 and the others tiny, and summed together the others fell below half an ulp of it (the
/// loss `ln(1 + others / e_y)` then lost its relative accuracy: 2e-3 at a margin of 18 over
/// V = 32000).
///
/// Statistics of disjoint slices of a row combine with [`RowStats::merge`]; a slice that does
/// not hold the target sums all its entries into `others` and contributes `target_logit = 0`,
/// so merging adds the target logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowStats {
    /// The reference `r`: within [`MARGIN`](super::MARGIN) of the maximum logit (NaN skipped),
    /// `-inf` while every logit seen is `-inf`.
    pub shift: f32,
    /// `Σ exp(z - shift)` over every entry but the target (NaN when another logit is NaN or
    /// `+inf`; a NaN or `+inf` target makes [`target_exp`](Self::target_exp) NaN instead).
    /// Chunks are summed in f32 lanes and the chunk sums in f64, so even a 2^29-wide row keeps
    /// f32 accuracy.
    pub others: f64,
    /// The target's logit (0 when the target lies outside the slice).
    pub target_logit: f64,
    /// `1 − tanh²(z_target / c)` with soft-capping, else 1 (1 outside the slice).
    pub target_chain: f64,
    /// The sum of the logits (label smoothing only; 0 otherwise).
    pub logit_sum: f64,
}

/// `s * exp(from - to)` for `to >= from`, with `0 * exp(-inf - -inf)` kept at 0.
#[inline]
fn rescale(s: f64, from: f32, to: f32) -> f64 {
    if s == 0.0 {
        0.0
    } else {
        s * (from as f64 - to as f64).exp()
    }
}

impl RowStats {
    /// Statistics of an empty slice.
    pub const EMPTY: RowStats =
        RowStats { shift: f32::NEG_INFINITY, others: 0.0, target_logit: 0.0, target_chain: 1.0, logit_sum: 0.0 };

    /// Moves the reference up to `m`, rescaling the sum.
    #[inline]
    pub fn raise(&mut self, m: f32) {
        if m > self.shift {
            self.others = rescale(self.others, self.shift, m);
            self.shift = m;
        }
    }

    /// What a chunk's exponentials are taken against: the reference, or 0 while every value so
    /// far is `-inf` (then `-inf` adds 0 and NaN adds NaN).
    #[inline]
    pub fn exp_shift(&self) -> f32 {
        if self.shift == f32::NEG_INFINITY {
            0.0
        } else {
            self.shift
        }
    }

    /// Combines the statistics of two disjoint slices of one row.
    pub fn merge(self, other: RowStats) -> RowStats {
        let shift = if other.shift > self.shift { other.shift } else { self.shift };
        RowStats {
            shift,
            others: rescale(self.others, self.shift, shift) + rescale(other.others, other.shift, shift),
            target_logit: self.target_logit + other.target_logit,
            target_chain: self.target_chain * other.target_chain,
            logit_sum: self.logit_sum + other.logit_sum,
        }
    }

    /// The target's term `exp(target_logit - r)`, in f64 (against 0 while every logit is
    /// `-inf`, as the chunks' exponentials are taken).
    #[inline]
    pub fn target_exp(&self) -> f64 {
        (self.target_logit - self.exp_shift() as f64).exp()
    }

    /// `Σ exp(z - shift)` over the whole row: the others and the target's term.
    #[inline]
    pub fn sum_exp(&self) -> f64 {
        self.others + self.target_exp()
    }

    /// `ln(sum(exp(z)))`.
    #[inline]
    fn lse(&self) -> f64 {
        self.shift as f64 + self.sum_exp().ln()
    }

    /// The cross-entropy `lse - target_logit`: `ln(1 + others / e_y)` where the target's term
    /// is at least the others' (a loss of at most `ln 2`, which the difference of two logarithms
    /// would round away below 1e-11 or so), else that difference.
    #[inline]
    fn cross_entropy(&self) -> f64 {
        let (s, e) = (self.others, self.target_exp());
        if e >= s {
            (s / e).ln_1p()
        } else {
            (self.shift as f64 - self.target_logit) + (s + e).ln()
        }
    }
}

/// The per-row arithmetic of a call's options, in `f64`:
///
/// - loss: `(1 − ε) · (lse − z_y) + ε · (lse − Σz / V) + z_loss · lse²`;
/// - gradient: `coef · (A · softmax − (1 − ε) · onehot − ε / V) · s` with
///   `A = 1 + 2 · z_loss · lse` and `s = 1 − tanh²(z / c)` (1 without soft-capping).
///
/// With every option off this is the plain cross-entropy and its gradient, to the same bits as
/// the formulas without the options' terms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowMath {
    z_loss: f64,
    eps: f64,
    vocab: f64,
    /// What the element loop computes beyond `exp` (`None`: the plain loop).
    pub elem: Option<ElemOpts>,
}

impl RowMath {
    pub fn new(o: &RowOptions, vocab: usize) -> RowMath {
        let elem = o.per_element().then(|| ElemOpts {
            cap: o.softcap.unwrap_or(0.0),
            inv_cap: o.softcap.map_or(0.0, |c| 1.0 / c),
            sum: o.smoothing != 0.0,
        });
        RowMath { z_loss: o.z_loss, eps: o.smoothing, vocab: vocab as f64, elem }
    }

    /// Whether the element loop keeps the chain factors apart from the exponentials (soft-cap
    /// and smoothing together: the gradient needs `q · f − k · s`).
    pub fn keeps_chain(&self) -> bool {
        self.elem.is_some_and(|e| e.cap != 0.0 && e.sum)
    }

    /// The row's loss and its z-loss part.
    #[inline]
    pub fn loss(&self, st: &RowStats) -> (f64, f64) {
        let ce = st.cross_entropy();
        let l = if self.eps != 0.0 {
            (1.0 - self.eps) * ce + self.eps * (st.lse() - st.logit_sum / self.vocab)
        } else {
            ce
        };
        if self.z_loss != 0.0 {
            let z = self.z_loss * st.lse() * st.lse();
            (l + z, z)
        } else {
            (l, 0.0)
        }
    }

    /// `A = 1 + 2 · z_loss · lse` (exactly 1 without z-loss, whatever the row holds).
    #[inline]
    fn softmax_factor(&self, st: &RowStats) -> f64 {
        if self.z_loss != 0.0 {
            1.0 + 2.0 * self.z_loss * st.lse()
        } else {
            1.0
        }
    }

    /// A row's `coef · A / sum_exp`, once per row ([`grad_factor`](Self::grad_factor) of each
    /// chunk starts from it).
    #[inline]
    pub fn row_scale(&self, st: &RowStats, coef: f32) -> f64 {
        coef as f64 * self.softmax_factor(st) / st.sum_exp()
    }

    /// The factor that turns a kept `exp(z - r_c) · s` into the gradient:
    /// `coef · A / sum_exp · exp(r_c - r)` from the row's [`row_scale`](Self::row_scale). A chunk
    /// whose `r_c` is `-inf` (all `-inf` or NaN) gets 0, or NaN for an all `-inf` row.
    #[inline]
    pub fn grad_factor(&self, st: &RowStats, scale: f64, chunk_shift: f32) -> f32 {
        if chunk_shift == st.shift && chunk_shift.is_finite() {
            // exp(0) = 1: the same bits without the exponential
            return scale as f32;
        }
        (scale * (chunk_shift as f64 - st.shift as f64).exp()) as f32
    }

    /// What label smoothing subtracts from every entry's gradient before the chain factor:
    /// `coef · ε / V` (0 without smoothing, also when `coef` is beyond f32's range: `inf · 0`
    /// made every entry NaN).
    #[inline]
    pub fn smoothing_offset(&self, coef: f32) -> f32 {
        if self.eps == 0.0 {
            return 0.0;
        }
        (coef as f64 * self.eps / self.vocab) as f32
    }

    /// The gradient at the target, `coef · (A · softmax[target] − (1 − ε) − ε / V) · s_target`,
    /// taken as `coef · ((A − 1) · p − others / sum + ε · (1 − 1 / V)) · s_target` with
    /// `p = e_y / sum`: `p − 1` of a confident row without the cancellation.
    #[inline]
    pub fn target_grad(&self, st: &RowStats, coef: f32) -> f32 {
        let sum = st.sum_exp();
        let p = st.target_exp() / sum;
        let d = (self.softmax_factor(st) - 1.0) * p - st.others / sum + self.eps * (1.0 - 1.0 / self.vocab);
        (coef as f64 * d * st.target_chain) as f32
    }
}
