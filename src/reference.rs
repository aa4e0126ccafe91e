//! A plain float64 implementation that follows the course function step by step.
//!
//! It is the oracle the tests and benches compare the fused backends against: no SIMD, no
//! threads, no fusion, every intermediate in `f64`. It shares only the input validation with the
//! fused path; targets, weights, reductions and the gradient are worked out independently here.
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

use crate::dtype::{Logit, TokenId};
use crate::error::Result;
use crate::spec::{check_len, validate_tokens, LossSpec, Reduction, RowMean, Shape, Tokens};

/// What the reference computes: the same fields as [`LossOutput`](crate::LossOutput) plus the
/// full gradient in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceOutput {
    /// The batch loss.
    pub loss: f64,
    /// Each sample's mean per-token loss.
    pub per_sample_loss: Vec<f64>,
    /// Each sample's weight.
    pub weights: Vec<f64>,
    /// Each sample's number of non-ignored targets.
    pub valid_tokens: Vec<u64>,
    /// d loss / d logits, `[B, T, V]`, scaled by the spec's `grad_scale`.
    pub grad: Vec<f64>,
}

/// `ln(sum(exp(row)))` in `f64`, NaN when the row holds a NaN, `+inf` or only `-inf` (as PyTorch).
fn logsumexp(row: &[f64]) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &z| if z > m || z.is_nan() { z } else { m });
    m + row.iter().map(|&z| (z - m).exp()).sum::<f64>().ln()
}

/// Computes loss, per-sample losses, weights and gradient in `f64`.
///
/// ```
/// use fused_weighted_loss::{reference::reference, LossSpec, Shape, Tokens};
/// let shape = Shape::new(1, 3, 4)?;
/// let logits = [0.0f32; 12];
/// let ids = [1i64, 2, 3];
/// let r = reference(&LossSpec::default(), shape, &logits, Tokens::new(&ids))?;
/// assert!((r.loss - 4f64.ln()).abs() < 1e-12); // uniform logits: ln V per token
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

    // CrossEntropyLoss(reduction="none", ignore_index), viewed as [B, T-1]
    let mut loss = vec![vec![0f64; t - 1]; b];
    let mut valid = vec![0u64; b];
    for s in 0..b {
        for (p, l) in loss[s].iter_mut().enumerate() {
            let y = shift_label(s, p);
            if y == spec.ignore_index {
                continue;
            }
            let row = shift_logits(s, p);
            *l = logsumexp(&row) - row[y as usize];
            valid[s] += 1;
        }
    }

    // loss_per_sample = loss.mean(axis=1) (or the valid-token mean)
    let per_sample_loss: Vec<f64> = (0..b)
        .map(|s| {
            let sum: f64 = loss[s].iter().sum();
            match spec.row_mean {
                RowMean::AllPositions => sum / (t - 1) as f64,
                RowMean::ValidTokens if valid[s] > 0 => sum / valid[s] as f64,
                RowMean::ValidTokens => 0.0,
            }
        })
        .collect();

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

    // weighted_loss = (loss_per_sample * weights).mean()
    let weighted: Vec<f64> = per_sample_loss.iter().zip(&weights).map(|(l, w)| l * w).collect();
    let wsum: f64 = weights.iter().sum();
    let loss_total = match spec.reduction {
        Reduction::Mean => weighted.iter().sum::<f64>() / b as f64,
        Reduction::WeightedMean if wsum > 0.0 => weighted.iter().sum::<f64>() / wsum,
        Reduction::WeightedMean => 0.0,
        Reduction::Sum => weighted.iter().sum::<f64>(),
    };

    // gradient: d loss_total / d z[s, p, j] = grad_scale * dred_s / div_s * (softmax_j - [j == y])
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
            let row = shift_logits(s, p);
            let lse = logsumexp(&row);
            let g = &mut grad[(s * t + p) * v..(s * t + p + 1) * v];
            for (j, (gj, z)) in g.iter_mut().zip(&row).enumerate() {
                let onehot = if j as i64 == y { 1.0 } else { 0.0 };
                *gj = c * ((z - lse).exp() - onehot);
            }
        }
    }

    Ok(ReferenceOutput { loss: loss_total, per_sample_loss, weights, valid_tokens: valid, grad })
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
