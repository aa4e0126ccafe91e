//! The plan of a call: what the kernels need that depends only on the tokens (targets, sample
//! weights, per-row coefficients), worked out once per call from a validated [`LossSpec`], and
//! the reduction of the backends' row losses into a [`LossOutput`].

use crate::dtype::TokenId;
use crate::error::{Error, Result};
use crate::spec::{
    validate_tokens, validate_tokens_of_rank, Backend, Keyword, LossOutput, LossSpec, Reduction, RowMean, Shape, Tokens,
};

/// Marks a row with no target (the last position, or an ignored label).
pub(crate) const NO_TARGET: u32 = u32::MAX;

/// Everything the kernels need that depends only on the tokens: validated once per call.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub shape: Shape,
    /// Per row `b*T + t`: the target id, or [`NO_TARGET`].
    pub targets: Vec<u32>,
    /// Per sample: `w_b` .
    pub weights: Vec<f64>,
    /// Per sample: non-ignored targets.
    pub valid: Vec<u64>,
    /// Per sample: what the sum of its per-token losses is divided by (0: contributes nothing).
    pub row_div: Vec<f64>,
    /// Per sample: `d loss / d loss_b` before the upstream scale (the reduction's factor).
    pub reduce: Vec<f64>,
    /// Per sample: the gradient coefficient `grad_scale * reduce_b / row_div_b`.
    pub coef: Vec<f64>,
    /// Per row: the token weight (`token_weights[b, t + 1]`); empty when none were given.
    pub token_weight: Vec<f32>,
    /// The per-row options.
    pub opts: RowOptions,
}

/// The options that change a row's loss and gradient, as the kernels use them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct RowOptions {
    /// z-loss coefficient (0: off).
    pub z_loss: f64,
    /// Label smoothing `ε` (0: off).
    pub smoothing: f64,
    /// Soft-cap `c` (`None`: off).
    pub softcap: Option<f32>,
}

impl RowOptions {
    /// Whether the options need more per element than the plain loss: a sum of the logits
    /// (smoothing) or `tanh` (soft-capping). z-loss and token weights change only per-row factors.
    pub fn per_element(&self) -> bool {
        self.smoothing != 0.0 || self.softcap.is_some()
    }
}

/// What a backend returns per row: the row's loss (0 for a row without a target) and, with
/// z-loss on, the z-loss part of it (`z.is_empty()` otherwise).
#[derive(Debug, Clone, Default)]
pub(crate) struct RowLosses {
    pub loss: Vec<f64>,
    pub z: Vec<f64>,
}

/// Keywords merged by id (a repeated id's weights add up) and sorted, so that counting the hits
/// of a sample is one pass over its ids whatever the number of keywords.
struct KeywordTable(Vec<(i64, f64)>);

impl KeywordTable {
    fn new(keywords: &[Keyword]) -> Self {
        let mut v: Vec<(i64, f64)> = keywords.iter().map(|k| (k.id, k.weight)).collect();
        v.sort_by_key(|&(id, _)| id);
        v.dedup_by(|b, a| {
            let same = a.0 == b.0;
            if same {
                a.1 += b.1;
            }
            same
        });
        KeywordTable(v)
    }

    /// What one occurrence of `id` adds to the hit count (0 for a non-keyword).
    #[inline]
    fn weight(&self, id: i64) -> f64 {
        match self.0.binary_search_by_key(&id, |&(k, _)| k) {
            Ok(i) => self.0[i].1,
            Err(_) => 0.0,
        }
    }
}

/// Sample weights `alpha · (1 + keyword hits)`, or their sum (over this call's samples or a data
/// group's) under the weighted mean, beyond f64: `value` the first that is not finite.
pub(crate) fn weights_overflow(value: f64) -> Error {
    Error::InvalidOption {
        name: "alpha and the keyword weights",
        value,
        expected: "small enough that every sample weight alpha * (1 + keyword hits) and their sum stay finite",
    }
}

/// [`weights_overflow`] when a sample weight, or under the weighted mean their sum, is not
/// finite (the fused path's check, which the float64 reference makes too).
pub(crate) fn check_sample_weights(reduction: Reduction, weights: &[f64]) -> Result<()> {
    if let Some(&w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(weights_overflow(w));
    }
    if reduction == Reduction::WeightedMean && !weights.iter().sum::<f64>().is_finite() {
        return Err(weights_overflow(weights.iter().sum()));
    }
    Ok(())
}

impl LossSpec {
    /// The sample weights `alpha · (1 + keyword hits)` of `ids` (`[B, T]`, validated), or
    /// [`weights_overflow`] when one of them, or for the weighted mean their sum, is not
    /// finite: an infinite `Σ w_b` made every `w_b / Σ w_b` 0, a silent zero loss and gradient.
    /// The GPU's host calls check this here too, before anything is written.
    pub(crate) fn sample_weights<I: TokenId>(&self, shape: Shape, ids: &[I]) -> Result<Vec<f64>> {
        let t = shape.seq();
        let table = KeywordTable::new(&self.keywords);
        let weights: Vec<f64> = (0..shape.batch())
            .map(|s| {
                let hits: f64 = ids[s * t..(s + 1) * t].iter().map(|id| table.weight(id.to_i64())).sum();
                self.alpha * (1.0 + hits)
            })
            .collect();
        check_sample_weights(self.reduction, &weights)?;
        Ok(weights)
    }

    /// Validates the tokens and works out targets, weights and per-sample coefficients.
    pub(crate) fn plan<I: TokenId>(&self, shape: Shape, tokens: &Tokens<'_, I>) -> Result<Plan> {
        validate_tokens(self, shape, tokens)?;
        self.plan_validated(shape, tokens)
    }

    /// [`plan`](Self::plan) of a data-parallel rank's tokens, which may hold no samples
    /// ([`Shape::without_samples`]: a plan of no rows).
    pub(crate) fn plan_of_rank<I: TokenId>(&self, shape: Shape, tokens: &Tokens<'_, I>) -> Result<Plan> {
        validate_tokens_of_rank(self, shape, tokens)?;
        self.plan_validated(shape, tokens)
    }

    fn plan_validated<I: TokenId>(&self, shape: Shape, tokens: &Tokens<'_, I>) -> Result<Plan> {
        let (b, t) = (shape.batch(), shape.seq());
        let labels = tokens.labels.unwrap_or(tokens.ids);
        let mut targets = vec![NO_TARGET; shape.rows()];
        let mut valid = vec![0u64; b];
        for s in 0..b {
            for p in 0..t - 1 {
                let y = labels[s * t + p + 1].to_i64();
                if y != self.ignore_index {
                    // In range: checked by `validate_tokens`.
                    targets[s * t + p] = y as u32;
                    valid[s] += 1;
                }
            }
        }
        let weights = self.sample_weights(shape, tokens.ids)?;
        let row_div: Vec<f64> = valid
            .iter()
            .map(|&n| match self.row_mean {
                RowMean::AllPositions => (t - 1) as f64,
                RowMean::ValidTokens => n as f64,
            })
            .collect();
        // row (s, p) is weighted by token_weights[s, p + 1]; the last position has no target
        let token_weight = match tokens.token_weights {
            Some(w) => (0..shape.rows()).map(|r| if (r + 1) % t == 0 { 0.0 } else { w[r + 1] }).collect(),
            None => Vec::new(),
        };
        let (reduce, coef) = (Vec::new(), Vec::new());
        let mut plan =
            Plan { shape, targets, weights, valid, row_div, reduce, coef, token_weight, opts: self.row_options() };
        let denom = match self.reduction {
            Reduction::Mean => b as f64,
            Reduction::WeightedMean => plan.weights.iter().sum(),
            Reduction::Sum => 1.0,
        };
        plan.set_denominator(denom, self.grad_scale);
        Ok(plan)
    }

    /// The per-row options of this spec.
    pub(crate) fn row_options(&self) -> RowOptions {
        RowOptions { z_loss: self.z_loss, smoothing: self.label_smoothing, softcap: self.softcap.map(|c| c as f32) }
    }
}

impl Plan {
    /// Sets the reduction's per-sample factors `reduce_b = w_b / denom` (0 when `denom` is 0) and
    /// the gradient coefficients from them: `denom` is `B`, `Σ w_b` or 1 for this call's samples,
    /// or the same over every data-parallel rank's samples.
    pub(crate) fn set_denominator(&mut self, denom: f64, grad_scale: f64) {
        self.reduce = self.weights.iter().map(|&w| if denom > 0.0 { w / denom } else { 0.0 }).collect();
        let coef = self.reduce.iter().zip(&self.row_div);
        self.coef = coef.map(|(&r, &d)| if d > 0.0 { grad_scale * r / d } else { 0.0 }).collect();
    }

    /// Row `r`'s gradient coefficient: its sample's, times its token weight.
    #[inline]
    pub(crate) fn row_coef(&self, r: usize) -> f32 {
        let c = self.coef[r / self.shape.seq()];
        match self.token_weight.get(r) {
            Some(&w) => (c * w as f64) as f32,
            None => c as f32,
        }
    }

    /// For a call that writes a gradient: [`Error::InvalidOption`] when a row with a target has a
    /// gradient factor `grad_scale · w_b / (D · N_b) · token weight` beyond f32's range, whose
    /// entries would all be infinite or NaN (the loss, in f64, would not show it). Checked
    /// before the pass, from the ids and options alone; a loss-only call needs no factor.
    /// `device`: the factor as the CUDA kernels form it, the sample's factor rounded to f32
    /// first and times the token weight in f32 (a sample factor beyond f32 with a small token
    /// weight is finite on the CPU, which multiplies in f64, and infinite there).
    pub(crate) fn check_grad_factors(&self, device: bool) -> Result<()> {
        let finite = |r: usize| match device {
            false => self.row_coef(r).is_finite(),
            true => {
                let c = self.coef[r / self.shape.seq()] as f32;
                (c * self.token_weight.get(r).copied().unwrap_or(1.0)).is_finite()
            }
        };
        for (r, &y) in self.targets.iter().enumerate() {
            if y != NO_TARGET && !finite(r) {
                let (c, w) = (self.coef[r / self.shape.seq()], self.token_weight.get(r).map_or(1.0, |&w| w as f64));
                // (on the device, the sample's factor alone where it is the one beyond f32)
                let value = if device && !(c as f32).is_finite() { c } else { c * w };
                return Err(Error::InvalidOption {
                    name: "grad_scale, alpha, the keyword weights and the token weights",
                    value,
                    expected: "a gradient factor grad_scale * w_b / (D * N_b) * token weight within f32's range \
                               (on CUDA, grad_scale * w_b / (D * N_b) too)",
                });
            }
        }
        Ok(())
    }

    /// Combines per-row losses (0 for rows without a target) into the output, in a fixed order;
    /// writes each position's loss into `token_loss` (`[B, T - 1]`, 0 where ignored) when given.
    pub(crate) fn finish(
        &self,
        rows: &RowLosses,
        check_finite: bool,
        backend: Backend,
        mut token_loss: Option<&mut [f32]>,
    ) -> Result<LossOutput> {
        let t = self.shape.seq();
        let mut per_sample = Vec::with_capacity(self.shape.batch());
        let mut z_loss = 0f64;
        for (s, losses) in rows.loss.chunks_exact(t).enumerate() {
            let (mut sum, mut z_sum) = (0f64, 0f64);
            for (p, &l) in losses[..t - 1].iter().enumerate() {
                let r = s * t + p;
                if let Some(out) = token_loss.as_deref_mut() {
                    out[s * (t - 1) + p] = l as f32;
                }
                if self.targets[r] == NO_TARGET {
                    continue;
                }
                if check_finite && !l.is_finite() {
                    return Err(Error::NonFinite { batch: s, position: p, value: l });
                }
                let w = self.token_weight.get(r).map_or(1.0, |&w| w as f64);
                sum += w * l;
                if let Some(&z) = rows.z.get(r) {
                    z_sum += w * z;
                }
            }
            let div = self.row_div[s];
            per_sample.push(if div > 0.0 { sum / div } else { 0.0 });
            if div > 0.0 {
                z_loss += z_sum / div * self.reduce[s];
            }
        }
        let loss = per_sample.iter().zip(&self.reduce).map(|(l, r)| l * r).sum();
        Ok(LossOutput {
            loss,
            per_sample_loss: per_sample,
            weights: self.weights.clone(),
            valid_tokens: self.valid.clone(),
            z_loss,
            backend,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{LossSpec, Shape, Tokens};

    /// The CUDA kernels round a sample's gradient factor to f32 before the token weight
    /// multiplies it: a factor beyond f32 with a small token weight is finite on the CPU (the
    /// product in f64) and infinite there, so the device's check refuses what the CPU's takes.
    #[test]
    fn the_device_check_forms_the_factor_as_the_kernels_do() {
        let shape = Shape::new(2, 3, 5).unwrap();
        let ids = [0i64, 1, 2, 3, 4, 0];
        // w_b = 1e40, D = B = 2, N_b = 2: a sample factor of 2.5e39
        let spec = LossSpec::builder().alpha(1e40).build().unwrap();
        let small = [1e-3f32; 6];
        let plan = spec.plan(shape, &Tokens::new(&ids).with_token_weights(&small)).unwrap();
        assert!(plan.check_grad_factors(false).is_ok(), "the CPU's factor, 2.5e36, is an f32");
        let e = plan.check_grad_factors(true).unwrap_err();
        assert!(matches!(e, crate::Error::InvalidOption { value, .. } if value == 2.5e39), "{e}");
        // within f32 before and after the token weight: both take it
        let spec = LossSpec::builder().alpha(1e30).build().unwrap();
        let plan = spec.plan(shape, &Tokens::new(&ids).with_token_weights(&small)).unwrap();
        assert!(plan.check_grad_factors(false).is_ok() && plan.check_grad_factors(true).is_ok());
        // beyond f32 after the token weight: both refuse it
        let large = [1e10f32; 6];
        let plan = spec.plan(shape, &Tokens::new(&ids).with_token_weights(&large)).unwrap();
        assert!(plan.check_grad_factors(false).is_err() && plan.check_grad_factors(true).is_err());
    }
}
