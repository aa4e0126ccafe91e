//! A plain float64 implementation that follows the course function step by step.
//!
//! It is the oracle the tests and benches compare the fused backends against: no SIMD, no
//! threads, no fusion, every intermediate in `f64`. It shares only the input validation with the
//! fused path (shapes, tokens, and the refusal of sample weights or, under `WeightedMean`, their
//! sum beyond `f64`, with the same errors); targets, weights, reductions and the gradient are
//! worked out independently here.
//!
//! The course function (PyTorch), for reference:
//!
//! ```text
//! shift_labels = inputs[..., 1:]
//! shift_logits = logits[..., :-1, :]
//! loss = CrossEntropyLoss(reduction="none")(shift_logits.view(-1, V), shift_labels.view(-1))
//! loss_per_sample = loss.view(B, T-1).mean(axis=1)
//! weights = torch.stack([(inputs == kt).float() for kt in keytoken_ids]).sum(axis=[0, 2])
//! weights = alpha * (1.0 + weights)
//! weighted_loss = (loss_per_sample * weights).mean()
//! ```
//!
//! The options beyond the course function follow their usual definitions, each step by step:
//! soft-capping `z ← c·tanh(z/c)` first (Gemma 2), then per token
//! `loss = (1 − ε)·(lse − z[y]) + ε·(lse − mean(z)) + z_loss·lse²` (PyTorch's `label_smoothing`,
//! PaLM's z-loss), then the token weight multiplies it before the row mean.

use crate::dtype::{Logit, TokenId};
use crate::error::Result;
use crate::spec::{check_len, validate_tokens, LossSpec, Reduction, RowMean, Shape, Tokens};

/// What the reference computes: the same fields as [`LossOutput`](crate::LossOutput) plus the
/// full gradient in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceOutput {
    /// The batch loss.
    pub loss: f64,
    /// Each sample's row mean of its per-token losses (times the token weights, when given),
    /// before the sample weight.
    pub per_sample_loss: Vec<f64>,
    /// Each sample's weight.
    pub weights: Vec<f64>,
    /// Each sample's number of non-ignored targets.
    pub valid_tokens: Vec<u64>,
    /// The z-loss part of `loss`.
    pub z_loss: f64,
    /// Each position's loss `[B, T - 1]` before token and sample weights (0 where ignored).
    pub token_loss: Vec<f64>,
    /// d loss / d logits, `[B, T, V]`, scaled by the spec's `grad_scale`.
    pub grad: Vec<f64>,
}

/// `ln(sum(exp(row)))` in `f64` as `(m, ln(sum(exp(row - m))))` with `m` the maximum, so that
/// `softmax = exp((z - m) - ln_s)` stays exact where `m + ln_s` would round to `m` (logits near
/// 1e37 and beyond). NaN when the row holds a NaN, `+inf` or only `-inf` (as PyTorch).
fn logsumexp(row: &[f64]) -> (f64, f64) {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &z| if z > m || z.is_nan() { z } else { m });
    (m, row.iter().map(|&z| (z - m).exp()).sum::<f64>().ln())
}

/// A row's terms apart, against its maximum `m`: `(exp(z_y - m), Σ_{j≠y} exp(z_j - m))`.
fn target_and_others(row: &[f64], y: usize, m: f64) -> (f64, f64) {
    let others = row.iter().enumerate().filter(|&(j, _)| j != y).map(|(_, &z)| (z - m).exp()).sum();
    ((row[y] - m).exp(), others)
}

/// The cross-entropy `lse - z_y` of a row: `ln(1 + others / e_y)` (`ln_1p`) where the
/// target's term is at least the others' sum, a loss of at most `ln 2` that
/// `(m - z_y) + ln(Σ)` would round away (1 + 1e-13 keeps only three digits of the 1e-13 in
/// f64); else that sum, as a NaN, `+inf` or all `-inf` row always takes it.
fn cross_entropy(row: &[f64], y: usize, m: f64, ln_s: f64) -> f64 {
    let (e_y, others) = target_and_others(row, y, m);
    if e_y >= others && e_y > 0.0 {
        (others / e_y).ln_1p()
    } else {
        (m - row[y]) + ln_s
    }
}

/// Computes loss, per-sample losses, weights and gradient in `f64`.
///
/// ```
/// use fused_weighted_loss::{reference::reference, LossSpec, Shape, Tokens};
/// let shape = Shape::new(1, 3, 4)?;
/// let ln2 = 2f32.ln();
/// // row 0 predicts id 2 (exponentials 1, 1, 2, 1: loss ln 5/2), row 1 id 3 (uniform: ln 4);
/// // row 2 predicts nothing
/// let logits = [0.0, 0.0, ln2, 0.0, 1.0, 1.0, 1.0, 1.0, 3.0, -1.0, 2.0, 0.5];
/// let ids = [1i64, 2, 3];
/// let r = reference(&LossSpec::default(), shape, &logits, Tokens::new(&ids))?;
/// assert!((r.loss - 10f64.ln() / 2.0).abs() < 1e-7); // (ln 5/2 + ln 4) / 2
/// # Ok::<(), fused_weighted_loss::Error>(())
/// ```
pub fn reference<L: Logit, I: TokenId>(
    spec: &LossSpec,
    shape: Shape,
    logits: &[L],
    tokens: Tokens<'_, I>,
) -> Result<ReferenceOutput> {
    check_len("logits", logits.len(), shape.logits_len(), shape)?;
    validate_tokens(spec, shape, &tokens)?;
    let (b, t, v) = (shape.batch(), shape.seq(), shape.vocab());
    let inputs: Vec<i64> = tokens.ids.iter().map(|x| x.to_i64()).collect();
    let labels: Vec<i64> = match tokens.labels {
        Some(l) => l.iter().map(|x| x.to_i64()).collect(),
        None => inputs.clone(),
    };

    // shift: row (s, p) of the logits predicts labels[s, p + 1]
    let shift_label = |s: usize, p: usize| labels[s * t + p + 1];
    let shift_logits = |s: usize, p: usize| -> Vec<f64> {
        let o = (s * t + p) * v;
        logits[o..o + v].iter().map(|z| z.to_f32() as f64).collect()
    };

    // soft-capping: the loss sees c * tanh(z / c)
    let cap = |z: f64| match spec.softcap {
        Some(c) => c * (z / c).tanh(),
        None => z,
    };
    let eps = spec.label_smoothing;
    // token weights, aligned with the labels: row (s, p) is weighted by token_weights[s, p + 1]
    let token_weight = |s: usize, p: usize| tokens.token_weights.map_or(1.0, |w| w[s * t + p + 1] as f64);

    // CrossEntropyLoss(reduction="none", ignore_index, label_smoothing) + z-loss, viewed as [B, T-1]
    let mut loss = vec![vec![0f64; t - 1]; b];
    let mut zpart = vec![vec![0f64; t - 1]; b];
    let mut valid = vec![0u64; b];
    for s in 0..b {
        for p in 0..t - 1 {
            let y = shift_label(s, p);
            if y == spec.ignore_index {
                continue;
            }
            let row: Vec<f64> = shift_logits(s, p).into_iter().map(cap).collect();
            let (m, ln_s) = logsumexp(&row);
            let lse = m + ln_s;
            let ce = cross_entropy(&row, y as usize, m, ln_s);
            let mut l = ce;
            if eps != 0.0 {
                let mean = row.iter().sum::<f64>() / v as f64;
                l = (1.0 - eps) * ce + eps * (lse - mean);
            }
            // z-loss off: 0, also where lse is not finite (0 · NaN would be NaN)
            if spec.z_loss != 0.0 {
                zpart[s][p] = spec.z_loss * lse * lse;
            }
            loss[s][p] = l + zpart[s][p];
            valid[s] += 1;
        }
    }
    let token_loss: Vec<f64> = loss.iter().flatten().copied().collect();
    for s in 0..b {
        for p in 0..t - 1 {
            loss[s][p] *= token_weight(s, p);
            zpart[s][p] *= token_weight(s, p);
        }
    }

    // loss_per_sample = loss.mean(axis=1) (or the valid-token mean)
    let row_mean = |s: usize, x: &[f64]| {
        let sum: f64 = x.iter().sum();
        match spec.row_mean {
            RowMean::AllPositions => sum / (t - 1) as f64,
            RowMean::ValidTokens if valid[s] > 0 => sum / valid[s] as f64,
            RowMean::ValidTokens => 0.0,
        }
    };
    let per_sample_loss: Vec<f64> = (0..b).map(|s| row_mean(s, &loss[s])).collect();
    let per_sample_z: Vec<f64> = (0..b).map(|s| row_mean(s, &zpart[s])).collect();

    // weights = alpha * (1 + stack([(inputs == kt) for kt in keytoken_ids]).sum(axis=[0, 2]))
    let weights: Vec<f64> = (0..b)
        .map(|s| {
            let mut hits = 0f64;
            for k in &spec.keywords {
                for p in 0..t {
                    if inputs[s * t + p] == k.id {
                        hits += k.weight;
                    }
                }
            }
            spec.alpha * (1.0 + hits)
        })
        .collect();
    // weights beyond f64 are refused, as the fused path refuses them (the same error)
    crate::plan::check_sample_weights(spec.reduction, &weights)?;

    // weighted_loss = (loss_per_sample * weights).mean()
    let wsum: f64 = weights.iter().sum();
    let reduce = |x: &[f64]| {
        let total: f64 = x.iter().zip(&weights).map(|(l, w)| l * w).sum();
        match spec.reduction {
            // (each weight over B first: weights near f64's limit, which the mean keeps
            // finite, do not overflow the sum)
            Reduction::Mean => x.iter().zip(&weights).map(|(l, w)| l * (w / b as f64)).sum(),
            Reduction::WeightedMean if wsum > 0.0 => total / wsum,
            // every weight 0: the weighted losses' sum, 0 unless a loss is not finite (a zero
            // weight does not hide a NaN)
            Reduction::WeightedMean => total,
            Reduction::Sum => total,
        }
    };
    let loss_total = reduce(&per_sample_loss);
    let z_loss = reduce(&per_sample_z);

    // gradient: d loss_total / d z[s, p, j] = grad_scale * dred_s / div_s * token_weight
    //   * (softmax_j * (1 + 2 z_loss lse) - (1 - eps) [j == y] - eps / V) * (1 - tanh^2(z_j / c))
    let mut grad = vec![0f64; shape.logits_len()];
    for s in 0..b {
        let dred = match spec.reduction {
            Reduction::Mean => weights[s] / b as f64,
            Reduction::WeightedMean if wsum > 0.0 => weights[s] / wsum,
            Reduction::WeightedMean => 0.0,
            Reduction::Sum => weights[s],
        };
        let div = match spec.row_mean {
            RowMean::AllPositions => (t - 1) as f64,
            RowMean::ValidTokens => valid[s] as f64,
        };
        if div == 0.0 {
            continue;
        }
        let c = spec.grad_scale * dred / div;
        for p in 0..t - 1 {
            let y = shift_label(s, p);
            if y == spec.ignore_index {
                continue;
            }
            let raw = shift_logits(s, p);
            let row: Vec<f64> = raw.iter().map(|&z| cap(z)).collect();
            let (m, ln_s) = logsumexp(&row);
            let lse = m + ln_s;
            let c = c * token_weight(s, p);
            // `1 − softmax_y` as the others' share, not as a difference that rounds away a
            // confident row's 1e-13
            let (e_y, others) = target_and_others(&row, y as usize, m);
            let rest = others / (e_y + others);
            let g = &mut grad[(s * t + p) * v..(s * t + p + 1) * v];
            for (j, (gj, (z, zc))) in g.iter_mut().zip(raw.iter().zip(&row)).enumerate() {
                let softmax = ((zc - m) - ln_s).exp();
                let a = 1.0 + 2.0 * spec.z_loss * lse;
                let d = if j as i64 != y {
                    softmax * a - eps / v as f64
                } else if rest.is_finite() {
                    // softmax_y · a − (1 − ε) − ε / V
                    softmax * (a - 1.0) - rest + eps * (1.0 - 1.0 / v as f64)
                } else {
                    softmax * a - (1.0 - eps) - eps / v as f64
                };
                let chain = match spec.softcap {
                    // sech², not 1 − tanh²: the difference cancels to nothing beyond about
                    // 19 caps (a cosh beyond f64 gives the factor 0, its true value there)
                    Some(cap) => 1.0 / (z / cap).cosh().powi(2),
                    None => 1.0,
                };
                *gj = c * d * chain;
            }
        }
    }

    Ok(ReferenceOutput { loss: loss_total, per_sample_loss, weights, valid_tokens: valid, z_loss, token_loss, grad })
}

/// `‖out − ref‖ / ‖ref‖` over two sequences (`‖ref‖ = 0` gives `‖out‖`). NaN when either side
/// holds a NaN or the lengths differ, so a NaN or a mismatch never passes a `<=` bound.
pub fn rel_err<A: Copy + Into<f64>, B: Copy + Into<f64>>(out: &[A], reference: &[B]) -> f64 {
    if out.len() != reference.len() {
        return f64::NAN;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&o, &r) in out.iter().zip(reference) {
        let (o, r): (f64, f64) = (o.into(), r.into());
        num += (o - r) * (o - r);
        den += r * r;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
