//! The power of two by which the fused linear path scales its float16 gradient rows.
//!
//! For float16 inputs the chunk's gradient rows `G = coef · (softmax − onehot)` are float16 (the
//! products' operands are of one type), and an entry below 2^-25 rounds to 0: with `coef` near
//! `1/N`, at `N` in the thousands most of a row's entries did (README, "Fused linear + weighted
//! loss"). The rows are written as `S · G` instead, `S` a power of two folded into the plan's
//! `grad_scale`, and every product of them is multiplied by `1/S` (cuBLAS's `alpha`): exact in
//! both directions, as long as `S · G` stays within float16's range. `S` comes from a bound of
//! the largest entry that the host knows without reading the ids: the spec, `B` and `T`. At
//! `N = 8192`, `V = 32000` (the course's mean, `S = 2^26`) a float64 model of the rounding lost
//! no entry and put `d weight` and `d hidden` 4.4e-5 off, where unscaled rows lost 99.5% of
//! their entries and were 4.8e-2 / 9.3e-2 off.

use crate::cuda::DeviceInputs;
use crate::dtype::{DType, Logit, TokenId};
use crate::spec::{LossSpec, Reduction, RowMean, Shape};

/// What the largest `|S · G|` entry may be: `2^14`, a quarter of float16's largest finite
/// value (65504).
const HEADROOM: f64 = 16384.0;

/// The largest scale (so that `1/S` is a normal f32).
const MOST: f64 = (1u64 << 60) as f64;

/// `S` for gradient rows of `dtype` under `spec` on a batch of `tokens` (`B`, `T`): 1 unless
/// `dtype` is float16 and the largest entry `|G|` has a bound ([`entry_bound`]), else the
/// largest power of two that keeps `S · |G|` within [`HEADROOM`] (never below 1).
pub(in crate::cuda) fn gradient_rows_scale(
    spec: &LossSpec,
    tokens: Shape,
    dtype: DType,
    token_weights: bool,
    device_scale: bool,
) -> f64 {
    if dtype != DType::F16 || token_weights || device_scale {
        return 1.0;
    }
    let Some(bound) = entry_bound(spec, tokens) else { return 1.0 };
    if !(bound.is_finite() && bound > 0.0) {
        return 1.0;
    }
    let mut s = 1.0;
    while s < MOST && 2.0 * s * bound <= HEADROOM {
        s *= 2.0;
    }
    s
}

/// A bound of every gradient entry `|G| = |coef · x|`: [`coef_bound`] times that of `|x|`, which
/// is 1 without z-loss (`softmax − onehot`, with label smoothing's `ε/V` and soft-capping's chain
/// factor too), and with a z-loss `k` (which adds `2 · k · lse · softmax`) `2 + 2k · (c + 22)`
/// under a soft-cap `c` (`lse` is within `c + ln V`, `ln V < 22`); with z-loss and no soft-cap
/// nothing bounds `lse`: none.
fn entry_bound(spec: &LossSpec, tokens: Shape) -> Option<f64> {
    let x = match (spec.z_loss, spec.softcap) {
        (0.0, _) => 1.0,
        (k, Some(c)) => 2.0 + 2.0 * k.abs() * (c.abs() + 22.0),
        (_, None) => return None,
    };
    Some(coef_bound(spec, tokens) * x)
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
/// keyword weights one id matches (`k`: weights are at least 0), so `alpha ≤ w_b ≤ w_max =
/// alpha · (1 + T · k)`; `d_b` is `T − 1` (all positions) or at least 1 (valid tokens); the
/// divisor is `B` (mean), `Σ w ≥ w_b + (B − 1) · alpha` (weighted mean), or 1 (sum). A
/// data-parallel split's divisors (the global batch, the global `Σ w`) are only larger.
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
    let alpha = spec.alpha.abs();
    let w_max = alpha * (1.0 + t * per_position);
    let r_max = match spec.reduction {
        Reduction::Mean => w_max / b.max(1.0),
        // (alpha 0: every weight 0, and so every coef)
        Reduction::WeightedMean if w_max == 0.0 => 0.0,
        Reduction::WeightedMean => w_max / (w_max + (b - 1.0).max(0.0) * alpha),
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
        // coef ≤ 1 / (B · (T − 1)) = 1 / (8 · 1023): S · coef ≤ 2^14
        let s = gradient_rows_scale(&spec, shape(8, 1024), DType::F16, false, false);
        assert_eq!(s, 2f64.powi(26)); // 2^26 / 8184 ≈ 8200, 2^27 / 8184 ≈ 16400
        let bound = entry_bound(&spec, shape(8, 1024)).unwrap();
        assert!(s * bound <= HEADROOM && 2.0 * s * bound > HEADROOM);
        // other dtypes, token weights, a device scale: no scale
        assert_eq!(gradient_rows_scale(&spec, shape(8, 1024), DType::BF16, false, false), 1.0);
        assert_eq!(gradient_rows_scale(&spec, shape(8, 1024), DType::F32, false, false), 1.0);
        assert_eq!(gradient_rows_scale(&spec, shape(8, 1024), DType::F16, true, false), 1.0);
        assert_eq!(gradient_rows_scale(&spec, shape(8, 1024), DType::F16, false, true), 1.0);
        // z-loss: no bound of lse without a soft-cap; with one, the entries' factor
        let z = LossSpec::builder().z_loss(1e-4).build().unwrap();
        assert_eq!(gradient_rows_scale(&z, shape(8, 1024), DType::F16, false, false), 1.0);
        let zc = LossSpec::builder().z_loss(0.5).softcap(30.0).build().unwrap();
        let x = 2.0 + 2.0 * 0.5 * (30.0 + 22.0);
        assert_eq!(entry_bound(&zc, shape(8, 1024)).unwrap(), coef_bound(&zc, shape(8, 1024)) * x);
        let s = gradient_rows_scale(&zc, shape(8, 1024), DType::F16, false, false);
        assert!(s > 1.0 && s * entry_bound(&zc, shape(8, 1024)).unwrap() <= HEADROOM);
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
        // the weighted mean: w_max over w_max and the others' least, alpha each
        let weighted = LossSpec::builder().keywords([1i64]).reduction(Reduction::WeightedMean).build().unwrap();
        assert_eq!(coef_bound(&weighted, shape(4, 9)), 10.0 / (10.0 + 3.0) / 8.0);
        let sum = LossSpec::builder().reduction(Reduction::Sum).alpha(1e6).build().unwrap();
        assert_eq!(coef_bound(&sum, shape(4, 9)), 1e6 / 8.0);
        // beyond the headroom already: never below 1
        assert_eq!(gradient_rows_scale(&sum, shape(4, 9), DType::F16, false, false), 1.0);
        // alpha 0: every coef 0, nothing to scale
        let zero = LossSpec::builder().alpha(0.0).build().unwrap();
        assert_eq!(gradient_rows_scale(&zero, shape(4, 9), DType::F16, false, false), 1.0);
    }

    /// Every coef the float64 reference's plan gives, on random ids and specs, is within the
    /// bound.
    #[test]
    fn the_bound_holds_for_random_specs_and_ids() {
        use crate::reference::reference;
        let mut seed = 0x5ca1e_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let (b, t, v) = (1 + next(4) as usize, 2 + next(9) as usize, 2 + next(6) as usize);
            let ids: Vec<i64> = (0..b * t).map(|_| next(v as u64) as i64).collect();
            let kws: Vec<(i64, f64)> = (0..next(4)).map(|_| (next(v as u64) as i64, next(5) as f64 * 0.5)).collect();
            let row_mean = [RowMean::AllPositions, RowMean::ValidTokens][next(2) as usize];
            let reduction = [Reduction::Mean, Reduction::WeightedMean, Reduction::Sum][next(3) as usize];
            let spec = LossSpec::builder()
                .weighted_keywords(kws)
                .alpha(next(4) as f64 * 0.75)
                .row_mean(row_mean)
                .reduction(reduction)
                .grad_scale(next(5) as f64 - 2.0)
                .build()
                .unwrap();
            let sh = Shape::new(b, t, v).unwrap();
            let logits = vec![0f32; sh.logits_len()];
            let r = reference(&spec, sh, &logits, crate::Tokens::new(&ids)).unwrap();
            let bound = coef_bound(&spec, sh);
            // the gradient of a zero-logit row: coef (1/V − 1) at its target, coef / V elsewhere
            for (row, g) in r.grad.chunks(v).enumerate() {
                let coef = g.iter().map(|x| x.abs()).fold(0.0, f64::max) / (1.0 - 1.0 / v as f64);
                assert!(coef <= bound * (1.0 + 1e-12), "row {row}: coef {coef} over the bound {bound} ({spec:?})");
            }
        }
    }
}
