//! The power of two by which the fused linear path scales its float16 gradient rows.
//!
//! For float16 inputs the chunk's gradient rows `G = coef · (softmax − onehot)` are float16 (the
//! products' operands are of one type), and an entry below 2^-25 rounds to 0: with `coef` near
//! `1/N`, at `N` in the thousands most of a row's entries did (README, "Fused linear + weighted
//! loss"). The rows are written as `S · G` instead, `S` a power of two folded into the plan's
//! `grad_scale`, and every product of them is multiplied by `1/S` (cuBLAS's `alpha`): exact in
//! both directions, as long as `S · G` stays within float16's range. `S` comes from a bound of
//! the largest `coef` that the host knows without reading the ids: the spec, `B` and `T`. At
//! `N = 8192`, `V = 32000` (the course's mean, `S = 2^22`) a float64 model of the rounding lost
//! no entry and put `d weight` and `d hidden` 4.4e-5 off, where unscaled rows lost 99.5% of
//! their entries and were 4.8e-2 / 9.3e-2 off.

use crate::cuda::DeviceInputs;
use crate::dtype::{DType, Logit, TokenId};
use crate::spec::{LossSpec, Reduction, RowMean, Shape};

/// What the largest `|S · coef|` may be: `2^10`, so that an entry `S · coef · x` with `|x|` up
/// to 61 (`softmax − onehot` is within 1, with label smoothing and soft-capping too; z-loss adds
/// `2 · k · lse · softmax`) stays below float16's largest finite value, 65504.
const HEADROOM: f64 = 1024.0;

/// The largest z-loss coefficient under which the rows are scaled: with `k ≤ 0.01`, the bound
/// above holds for `|lse|` up to 3000.
const Z_LOSS_MAX: f64 = 0.01;

/// The largest scale (so that `1/S` is a normal f32).
const MOST: f64 = (1u64 << 60) as f64;

/// `S` for gradient rows of `dtype` under `spec` on a batch of `tokens` (`B`, `T`): 1 unless
/// `dtype` is float16 and the largest `coef` has a bound (no token weights, no gradient scale
/// on the device, z-loss at most [`Z_LOSS_MAX`]), else the largest power of two that keeps
/// `S · coef` within [`HEADROOM`] (never below 1).
pub(in crate::cuda) fn gradient_rows_scale(
    spec: &LossSpec,
    tokens: Shape,
    dtype: DType,
    token_weights: bool,
    device_scale: bool,
) -> f64 {
    if dtype != DType::F16 || token_weights || device_scale || spec.z_loss > Z_LOSS_MAX {
        return 1.0;
    }
    let bound = coef_bound(spec, tokens);
    if !(bound.is_finite() && bound > 0.0) {
        return 1.0;
    }
    let mut s = 1.0;
    while s < MOST && 2.0 * s * bound <= HEADROOM {
        s *= 2.0;
    }
    s
}

/// For a call on inputs of `L` and `tokens` (`B`, `T`: `shape`): `spec` with its gradient scale
/// multiplied by [`gradient_rows_scale`]'s `S` (for the plan, so that the rows come out scaled),
/// and the `alpha` of the rows' products, `1/S`.
pub(in crate::cuda) fn scaled_for<L: Logit, I: TokenId>(
    spec: &LossSpec,
    shape: Shape,
    tokens: &DeviceInputs<'_, I>,
) -> (LossSpec, f32) {
    let s = gradient_rows_scale(spec, shape, L::DTYPE, tokens.token_weights.is_some(), tokens.grad_scale.is_some());
    (LossSpec { grad_scale: spec.grad_scale * s, ..spec.clone() }, (1.0 / s) as f32)
}

/// A bound of every sample's `|coef| = |grad_scale| · r_b / d_b` (`r_b` the sample's weight over
/// the reduction's divisor, `d_b` its row mean's): each position adds at most the largest sum of
/// positive keyword weights one id matches, `d_b` is `T − 1` (all positions) or at least 1
/// (valid tokens), the divisor `B` (mean), `Σ w ≥ w_b` (weighted mean: `r_b ≤ 1`) or 1 (sum).
fn coef_bound(spec: &LossSpec, tokens: Shape) -> f64 {
    let (b, t) = (tokens.batch() as f64, tokens.seq() as f64);
    let mut per_id: Vec<(i64, f64)> = Vec::new();
    for k in &spec.keywords {
        match per_id.iter_mut().find(|(id, _)| *id == k.id) {
            Some((_, w)) => *w += k.weight.max(0.0),
            None => per_id.push((k.id, k.weight.max(0.0))),
        }
    }
    let per_position = per_id.iter().map(|&(_, w)| w).fold(0.0, f64::max);
    let w_max = spec.alpha.abs() * (1.0 + t * per_position);
    let r_max = match spec.reduction {
        Reduction::Mean => w_max / b.max(1.0),
        Reduction::WeightedMean => 1.0,
        Reduction::Sum => w_max,
    };
    let d_min = match spec.row_mean {
        RowMean::AllPositions => (t - 1.0).max(1.0),
        RowMean::ValidTokens => 1.0,
    };
    spec.grad_scale.abs() * r_max / d_min
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(b: usize, t: usize) -> Shape {
        Shape::new(b, t, 10).unwrap()
    }

    #[test]
    fn the_course_default_scales_float16_rows_by_the_bound() {
        let spec = LossSpec::default();
        // coef ≤ 1 / (B · (T − 1)) = 1 / (8 · 1023): S · coef ≤ 1024
        let s = gradient_rows_scale(&spec, shape(8, 1024), DType::F16, false, false);
        assert_eq!(s, 4_194_304.0); // 2^22: 2^22 / 8184 ≈ 512.5, 2^23 / 8184 ≈ 1025
        assert!(s * coef_bound(&spec, shape(8, 1024)) <= HEADROOM);
        assert!(2.0 * s * coef_bound(&spec, shape(8, 1024)) > HEADROOM);
        // other dtypes, token weights, a device scale, a large z-loss: no scale
        assert_eq!(gradient_rows_scale(&spec, shape(8, 1024), DType::BF16, false, false), 1.0);
        assert_eq!(gradient_rows_scale(&spec, shape(8, 1024), DType::F32, false, false), 1.0);
        assert_eq!(gradient_rows_scale(&spec, shape(8, 1024), DType::F16, true, false), 1.0);
        assert_eq!(gradient_rows_scale(&spec, shape(8, 1024), DType::F16, false, true), 1.0);
        let z = LossSpec::builder().z_loss(0.5).build().unwrap();
        assert_eq!(gradient_rows_scale(&z, shape(8, 1024), DType::F16, false, false), 1.0);
    }

    #[test]
    fn the_bound_covers_keywords_row_means_and_reductions() {
        // a keyword of weight 2 listed twice (each occurrence adds 4), alpha 3, valid tokens
        let spec = LossSpec::builder()
            .weighted_keywords([(5i64, 2.0), (5, 2.0), (6, 0.5)])
            .alpha(3.0)
            .row_mean(RowMean::ValidTokens)
            .grad_scale(-2.0)
            .build()
            .unwrap();
        let bound = coef_bound(&spec, shape(4, 9));
        // |grad_scale| · alpha · (1 + T · 4) / B / 1
        assert_eq!(bound, 2.0 * 3.0 * (1.0 + 9.0 * 4.0) / 4.0);
        let s = gradient_rows_scale(&spec, shape(4, 9), DType::F16, false, false);
        assert!(s >= 1.0 && s * bound <= HEADROOM);
        let weighted = LossSpec::builder().reduction(Reduction::WeightedMean).build().unwrap();
        assert_eq!(coef_bound(&weighted, shape(4, 9)), 1.0 / 8.0);
        let sum = LossSpec::builder().reduction(Reduction::Sum).alpha(1e6).build().unwrap();
        assert_eq!(coef_bound(&sum, shape(4, 9)), 1e6 / 8.0);
        // beyond the headroom already: never below 1
        assert_eq!(gradient_rows_scale(&sum, shape(4, 9), DType::F16, false, false), 1.0);
        // alpha 0: every coef 0, nothing to scale
        let zero = LossSpec::builder().alpha(0.0).build().unwrap();
        assert_eq!(gradient_rows_scale(&zero, shape(4, 9), DType::F16, false, false), 1.0);
    }
}
