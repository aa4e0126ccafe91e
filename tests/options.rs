//! The options beyond the course function (z-loss, label smoothing, soft-capping, per-token
//! weights, per-token losses) against the float64 reference, alone and combined, on every CPU
//! instruction set, dtype, row mean and reduction, with ignored labels.

mod common;

use common::{check_all_modes, cpu_levels, random_inputs, rel};
use fused_weighted_loss::reference::{reference, rel_err};
use fused_weighted_loss::{bf16, f16, Error, Grad, Logit, LossSpec, Reduction, RowMean, Shape, Tokens};
use proptest::prelude::*;

/// The four options, each off or on.
#[derive(Debug, Clone, Copy)]
struct Opts {
    z_loss: f64,
    smoothing: f64,
    softcap: Option<f64>,
    token_weights: bool,
}

fn opts_strategy() -> impl Strategy<Value = Opts> {
    (
        prop_oneof![Just(0.0), 1e-5f64..0.1],
        prop_oneof![Just(0.0), Just(1.0), 0.0f64..0.5],
        prop_oneof![Just(None), (0.5f64..50.0).prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(|(z_loss, smoothing, softcap, token_weights)| Opts { z_loss, smoothing, softcap, token_weights })
}

/// The spec of `o`, with keyword id 1 (0 in a vocabulary of one, where 1 is out of range).
fn spec_of(o: Opts, row_mean: RowMean, reduction: Reduction, vocab: usize) -> LossSpec {
    LossSpec::builder()
        .keywords([i64::from(vocab > 1)])
        .z_loss(o.z_loss)
        .label_smoothing(o.smoothing)
        .softcap(o.softcap)
        .row_mean(row_mean)
        .reduction(reduction)
        .build()
        .unwrap()
}

/// Token weights in [0, 2), some exactly 0, from the seed.
fn token_weights(seed: u64, n: usize) -> Vec<f32> {
    fused_weighted_loss::synthetic::logits::<f32>(seed ^ 0x5eed, n, 1.0)
        .into_iter()
        .map(|x| if x < -0.8 { 0.0 } else { x + 1.0 })
        .collect()
}

fn check<L: Logit>(
    o: Opts,
    row_mean: RowMean,
    reduction: Reduction,
    shape: Shape,
    seed: u64,
    scale: f32,
    ignore: bool,
) {
    let spec = spec_of(o, row_mean, reduction, shape.vocab());
    let (logits, ids) = random_inputs::<L>(seed, shape, scale);
    let labels: Vec<i64> = ids.iter().enumerate().map(|(i, &y)| if ignore && i % 3 == 1 { -100 } else { y }).collect();
    let w = token_weights(seed, shape.rows());
    let mut tokens = Tokens::new(&ids).with_labels(&labels);
    if o.token_weights {
        tokens = tokens.with_token_weights(&w);
    }
    check_all_modes(&spec, shape, &logits, tokens);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(48), ..ProptestConfig::default() })]

    #[test]
    fn random_options_f32(o in opts_strategy(), b in 1usize..4, t in 2usize..6, v in 1usize..5000,
                          seed in any::<u64>(), scale in prop_oneof![Just(1.0f32), 0.01f32..30.0],
                          valid in any::<bool>(), weighted in any::<bool>(), ignore in any::<bool>()) {
        let row_mean = if valid { RowMean::ValidTokens } else { RowMean::AllPositions };
        let reduction = if weighted { Reduction::WeightedMean } else { Reduction::Mean };
        // Full smoothing of near-uniform rows is ill-conditioned: the gradient `p − 1/V` is a
        // difference of nearly equal numbers, and f32's rounding of `p` is a large part of it
        // (logits of scale 0.01: PyTorch's f32 cross-entropy 1.4e-3 from float64, this crate's
        // 1.7e-5 to 2.0e-5 with or without soft-capping). With full smoothing the logits' scale
        // is at least 1 here, where 400 seeds per scale with caps up to 50 stayed within 4.4e-7
        // (and 5.7e-7 at a scale of 0.5).
        let scale = if o.smoothing == 1.0 { scale.max(1.0) } else { scale };
        check::<f32>(o, row_mean, reduction, Shape::new(b, t, v).unwrap(), seed, scale, ignore);
    }

    #[test]
    fn random_options_half(o in opts_strategy(), b in 1usize..3, t in 2usize..5, v in 1usize..3000,
                           seed in any::<u64>(), valid in any::<bool>(), ignore in any::<bool>()) {
        let row_mean = if valid { RowMean::ValidTokens } else { RowMean::AllPositions };
        let shape = Shape::new(b, t, v).unwrap();
        check::<f16>(o, row_mean, Reduction::Sum, shape, seed, 4.0, ignore);
        check::<bf16>(o, row_mean, Reduction::Mean, shape, seed, 4.0, ignore);
    }
}

/// Every combination of the four options on the course's vocabulary (rows span many chunks).
#[test]
fn every_combination_at_the_course_vocabulary() {
    let shape = Shape::new(2, 4, 50_000).unwrap();
    for bits in 0..16u32 {
        let o = Opts {
            z_loss: if bits & 1 != 0 { 1e-4 } else { 0.0 },
            smoothing: if bits & 2 != 0 { 0.1 } else { 0.0 },
            softcap: if bits & 4 != 0 { Some(30.0) } else { None },
            token_weights: bits & 8 != 0,
        };
        check::<f32>(o, RowMean::AllPositions, Reduction::Mean, shape, bits as u64, 8.0, bits % 3 == 0);
        check::<bf16>(o, RowMean::ValidTokens, Reduction::WeightedMean, shape, bits as u64, 8.0, true);
    }
}

/// Rows longer than the kept scratch row (4 Mi elements): the gradient pass recomputes the
/// exponentials from the logits, under the options too.
#[test]
fn rows_beyond_the_scratch_row_with_every_option() {
    let shape = Shape::new(1, 2, (1 << 22) + 1001).unwrap();
    let o = Opts { z_loss: 1e-3, smoothing: 0.2, softcap: Some(10.0), token_weights: true };
    check::<f32>(o, RowMean::AllPositions, Reduction::Mean, shape, 5, 6.0, false);
    let o = Opts { z_loss: 0.0, smoothing: 0.1, softcap: None, token_weights: false };
    check::<bf16>(o, RowMean::AllPositions, Reduction::Mean, shape, 6, 6.0, false);
}

#[test]
fn options_change_the_loss_as_their_formulas_say() {
    let shape = Shape::new(2, 5, 300).unwrap();
    let (logits, ids) = random_inputs::<f32>(9, shape, 3.0);
    let run = |spec: LossSpec| spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
    let plain = run(LossSpec::default());
    // z-loss adds a positive term and reports it
    let z = run(LossSpec::builder().z_loss(1e-2).build().unwrap());
    assert!(z.z_loss > 0.0 && rel(z.loss - z.z_loss, plain.loss) <= 1e-6, "{} {} {}", z.loss, z.z_loss, plain.loss);
    // full smoothing ignores the targets: the loss is the same for any labels
    let full = LossSpec::builder().label_smoothing(1.0).build().unwrap();
    let other: Vec<i64> = ids.iter().map(|&y| (y + 1) % 300).collect();
    let a = full.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
    let b = full.loss_and_grad(shape, &logits, Tokens::new(&ids).with_labels(&other), Grad::Skip).unwrap();
    assert!(rel(a.loss, b.loss) <= 1e-6 && rel(a.loss, plain.loss) > 1e-3);
    // a large cap changes almost nothing, a small one a lot
    let wide = run(LossSpec::builder().softcap(1e4).build().unwrap());
    let tight = run(LossSpec::builder().softcap(0.5).build().unwrap());
    assert!(rel(wide.loss, plain.loss) <= 1e-5 && rel(tight.loss, plain.loss) > 1e-2);
    // token weights of 2 everywhere double the loss
    let two = vec![2f32; shape.rows()];
    let w = LossSpec::default().loss_and_grad(shape, &logits, Tokens::new(&ids).with_token_weights(&two), Grad::Skip);
    assert!(rel(w.unwrap().loss, 2.0 * plain.loss) <= 1e-12);
}

#[test]
fn soft_capping_makes_infinite_logits_finite() {
    // -inf and +inf logits become -c and +c: every loss and gradient is finite
    let shape = Shape::new(1, 3, 5).unwrap();
    let mut logits = vec![0.5f32; 15];
    logits[1] = f32::NEG_INFINITY;
    logits[7] = f32::INFINITY;
    logits[9] = f32::NEG_INFINITY; // row 1's target (ids[2] = 4)
    let ids = [0i64, 1, 4];
    let spec = LossSpec::builder().softcap(5.0).label_smoothing(0.1).z_loss(1e-3).build().unwrap();
    for level in cpu_levels() {
        let spec = spec.to_builder().cpu_simd(level).build().unwrap();
        let mut g = vec![f32::NAN; 15];
        let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap();
        let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
        assert!(out.loss.is_finite() && rel(out.loss, r.loss) <= 1e-6, "{level}: {} vs {}", out.loss, r.loss);
        assert!(g.iter().all(|x| x.is_finite()) && rel_err(&g, &r.grad) <= 1e-5, "{level}: {g:?}");
    }
    // without the cap, smoothing over a -inf logit is +inf, as in PyTorch
    let mut masked = vec![0.5f32; 15];
    masked[1] = f32::NEG_INFINITY;
    let spec = LossSpec::builder().label_smoothing(0.1).build().unwrap();
    let out = spec.loss_and_grad(shape, &masked, Tokens::new(&[0i64, 0, 0]), Grad::Skip).unwrap();
    assert_eq!(out.loss, f64::INFINITY);
    let r = reference(&spec, shape, &masked, Tokens::new(&[0i64, 0, 0])).unwrap();
    assert_eq!(r.loss, f64::INFINITY);
}

#[test]
fn a_logit_far_above_the_first_chunks_maximum_counts() {
    // The first chunk of a row sets the running reference; a later chunk holding one element far
    // above it must move the reference. On the portable and AVX2 levels `exp` of more than 88
    // once wrapped its `2^n` and the element vanished (a loss of 9.85 where 99.4 was due, at
    // 100 above). Rows of 5000 span three chunks; every level, dtype, thread count, with and
    // without the options (soft-cap 50 takes the clamped loop, 30 the in-range one).
    let shape = Shape::new(2, 3, 5000).unwrap();
    let ids: Vec<i64> = vec![3, 7, 11, 4000, 13, 2];
    for big in [30.0f32, 89.0, 100.0, 1000.0, 6e4] {
        let mut logits: Vec<f32> = (0..shape.logits_len()).map(|i| ((i * 37) % 11) as f32 * 0.1 - 0.5).collect();
        logits[4321] = big; // row (0, 0), third chunk
        logits[2 * 5000 + 2500] = big; // row (0, 2): its target is 4000, in the same chunk
        logits[3 * 5000 + 4000] = -big; // row (1, 0), a low one
                                        // row (1, 1): a first chunk masked far below, the rest about `big` (with a soft-cap the
                                        // reference is −c, and whole later chunks lie up to 2c above it)
        logits[4 * 5000..4 * 5000 + 2048].fill(-1e4);
        for j in 2048..5000 {
            logits[4 * 5000 + j] = big + (j % 7) as f32 * 0.1;
        }
        for o in [
            Opts { z_loss: 0.0, smoothing: 0.0, softcap: None, token_weights: false },
            Opts { z_loss: 1e-4, smoothing: 0.1, softcap: None, token_weights: false },
            Opts { z_loss: 0.0, smoothing: 0.0, softcap: Some(50.0), token_weights: false },
            Opts { z_loss: 0.0, smoothing: 0.0, softcap: Some(60.0), token_weights: false },
            Opts { z_loss: 0.0, smoothing: 0.0, softcap: Some(40.0), token_weights: false },
            Opts { z_loss: 0.0, smoothing: 0.1, softcap: Some(30.0), token_weights: true },
        ] {
            let spec = spec_of(o, RowMean::AllPositions, Reduction::Mean, shape.vocab());
            let w = token_weights(5, shape.rows());
            let mut tokens = Tokens::new(&ids);
            if o.token_weights {
                tokens = tokens.with_token_weights(&w);
            }
            check_all_modes(&spec, shape, &logits, tokens);
            let bf: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
            check_all_modes(&spec, shape, &bf, tokens);
            let hf: Vec<f16> = logits.iter().map(|&x| f16::from_f32(x)).collect();
            check_all_modes(&spec, shape, &hf, tokens);
        }
    }
}

#[test]
fn large_soft_caps_keep_the_accuracy_of_small_ones() {
    // With a cap of c, tanh(x / c) is taken at small arguments: from `1 − exp(−2x/c)` its error
    // was an absolute ulp of 1, c times that in the capped logit (1e-4 of the loss at c = 1e4, the
    // capped logits all 0 at 1e30); the loops take `1 − exp` from the polynomial's own terms.
    // Caps from 50 to 1e30, every level, dtype and mode, with and without smoothing (whose loop
    // keeps the chain factors apart).
    let shape = Shape::new(2, 4, 3000).unwrap();
    for (i, cap) in [50.0, 64.0, 65.0, 1e3, 1e4, 1e6, 1e30].into_iter().enumerate() {
        for smoothing in [0.0, 0.1] {
            let o = Opts { z_loss: 0.0, smoothing, softcap: Some(cap), token_weights: false };
            check::<f32>(o, RowMean::AllPositions, Reduction::Mean, shape, 40 + i as u64, 3.0, false);
            check::<bf16>(o, RowMean::ValidTokens, Reduction::WeightedMean, shape, 50 + i as u64, 3.0, true);
        }
    }
}

/// The soft-cap's `tanh` keeps f32's relative accuracy at every cap, so the capped outputs are as
/// accurate as the plain ones: loss, z-loss and gradient within 2e-6 of float64 on small
/// vocabularies (whose z-loss and loss hang on a few capped logits) with caps of 5 to 64 (at
/// most 2e-7 measured at AVX2 and the portable level). Taken as `c · (2r − 1)`, `tanh` kept an
/// absolute error of ~2e-7 that the cap multiplied: up to 9.4e-6 here (V = 2, cap 64, z-loss).
#[test]
fn soft_capped_outputs_are_as_accurate_as_plain_ones() {
    for v in [2usize, 3, 5, 100] {
        for (i, cap) in [5.0, 20.0, 30.0, 48.0, 64.0].into_iter().enumerate() {
            for (scale, k) in [0.1f32, 1.0].into_iter().flat_map(|s| (0..8u64).map(move |k| (s, k))) {
                let shape = Shape::new(2, 4, v).unwrap();
                let seed = (v * 100 + i * 10) as u64 + k;
                let (logits, ids) = random_inputs::<f32>(seed, shape, scale);
                let spec = LossSpec::builder().keywords([1]).z_loss(1e-3).softcap(cap).build().unwrap();
                let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
                for level in cpu_levels() {
                    let what = format!("{level:?}, V {v}, cap {cap}, scale {scale}, seed {seed}");
                    let s = spec.to_builder().cpu_simd(level).build().unwrap();
                    let mut g = vec![f32::NAN; logits.len()];
                    let out = s.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap();
                    assert!(rel(out.loss, r.loss) <= 2e-6, "{what}: loss {} vs {}", out.loss, r.loss);
                    assert!(rel(out.z_loss, r.z_loss) <= 2e-6, "{what}: z-loss {} vs {}", out.z_loss, r.z_loss);
                    let e = rel_err(&g, &r.grad);
                    assert!(e <= 2e-6, "{what}: gradient rel err {e:e}");
                }
            }
        }
    }
}

#[test]
fn a_nan_logit_is_a_nan_loss_under_every_option() {
    // NaN in the vector body of row 0 and in the tail of row 1 (V = 40: two 16-lane steps and 8)
    // reaches the loss, and row 0's whole gradient, with every option, level and dtype; whatever
    // the NaN's sign and payload, signalling ones included (the lane code's `exp` once turned a
    // NaN with low payload bits into a finite number)
    for nan in [0x7FC0_0000u32, 0x7FC0_0001, 0x7FC0_01FF, 0xFFC0_0003, 0x7F80_0001, 0xFFBF_FFFF] {
        nan_logit_is_a_nan_loss(f32::from_bits(nan));
    }
}

fn nan_logit_is_a_nan_loss(nan: f32) {
    assert!(nan.is_nan());
    let shape = Shape::new(1, 3, 40).unwrap();
    let mut logits: Vec<f32> = (0..120).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
    logits[5] = nan;
    logits[40 + 37] = nan;
    let ids = [0i64, 1, 2];
    let specs = [
        LossSpec::default(),
        LossSpec::builder().label_smoothing(0.1).build().unwrap(),
        LossSpec::builder().softcap(5.0).build().unwrap(),
        LossSpec::builder().softcap(5.0).label_smoothing(0.1).z_loss(1e-3).build().unwrap(),
        LossSpec::builder().z_loss(1e-3).build().unwrap(),
    ];
    fn losses<L: Logit>(spec: &LossSpec, shape: Shape, logits: &[L], ids: &[i64]) -> Vec<f64> {
        let out = spec.loss_and_grad(shape, logits, Tokens::new(ids), Grad::Skip).unwrap();
        out.per_sample_loss.iter().chain([&out.loss]).copied().collect()
    }
    for level in cpu_levels() {
        for spec in &specs {
            let spec = spec.to_builder().cpu_simd(level).build().unwrap();
            let what = format!("{level} NaN {:#x} {spec:?}", nan.to_bits());
            let bf: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
            let hf: Vec<f16> = logits.iter().map(|&x| f16::from_f32(x)).collect();
            for l in
                [losses(&spec, shape, &logits, &ids), losses(&spec, shape, &bf, &ids), losses(&spec, shape, &hf, &ids)]
            {
                assert!(l.iter().all(|x| x.is_nan()), "{what}: {l:?}");
            }
            let mut g = vec![0f32; 120];
            spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap();
            assert!(g[..40].iter().all(|x| x.is_nan()), "{what}: {:?}", &g[..40]);
            let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
            assert!(r.loss.is_nan(), "{what}: the reference gives {}", r.loss);
        }
    }
}

#[test]
fn vocab_of_one_with_options() {
    let shape = Shape::new(2, 3, 1).unwrap();
    let logits = [0.5f32, -2.0, 3.0, 1.0, 0.0, -7.0];
    let ids = [0i32; 6];
    let spec = LossSpec::builder().z_loss(0.5).label_smoothing(0.3).softcap(2.0).build().unwrap();
    let mut g = vec![f32::NAN; 6];
    let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap();
    let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
    assert!(rel(out.loss, r.loss) <= 1e-6 && rel(out.z_loss, r.z_loss) <= 1e-6 && out.loss > 0.0);
    assert!(rel_err(&g, &r.grad) <= 1e-5, "{g:?} vs {:?}", r.grad);
}

#[test]
fn bad_options_and_buffers_are_typed_errors() {
    for (spec, name) in [
        (LossSpec::builder().z_loss(-1.0), "z_loss"),
        (LossSpec::builder().z_loss(f64::NAN), "z_loss"),
        (LossSpec::builder().label_smoothing(1.5), "label_smoothing"),
        (LossSpec::builder().label_smoothing(-0.1), "label_smoothing"),
        (LossSpec::builder().softcap(0.0), "softcap"),
        (LossSpec::builder().softcap(-3.0), "softcap"),
        (LossSpec::builder().softcap(f64::INFINITY), "softcap"),
        (LossSpec::builder().softcap(1e300), "softcap"),
    ] {
        match spec.build() {
            Err(Error::InvalidOption { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    // what a cap outside f32's normal range is told (not "finite and > 0", which it is), and
    // values far from 1 in scientific notation (not a 300-digit decimal)
    let msg = |b: fused_weighted_loss::LossSpecBuilder| b.build().unwrap_err().to_string();
    assert_eq!(msg(LossSpec::builder().softcap(1e300)), "softcap must be a normal f32 (1.2e-38 to 3.4e38), got 1e300");
    assert_eq!(
        msg(LossSpec::builder().softcap(1e-300)),
        "softcap must be a normal f32 (1.2e-38 to 3.4e38), got 1e-300"
    );
    assert_eq!(msg(LossSpec::builder().z_loss(-1e-4)), "z_loss must be finite and >= 0, got -0.0001");
    assert_eq!(msg(LossSpec::builder().softcap(-30.0)), "softcap must be finite and > 0, got -30");
    let shape = Shape::new(2, 3, 4).unwrap();
    let (logits, ids) = random_inputs::<f32>(1, shape, 1.0);
    let spec = LossSpec::default();
    let mut w = vec![1f32; 6];
    w[4] = f32::NAN;
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids).with_token_weights(&w), Grad::Skip);
    assert!(matches!(e, Err(Error::InvalidTokenWeight { batch: 1, position: 1, .. })), "{e:?}");
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids).with_token_weights(&w[..5]), Grad::Skip);
    assert!(matches!(e, Err(Error::LengthMismatch { what: "token_weights", .. })), "{e:?}");
    let mut per_token = vec![0f32; 5];
    let e = spec.loss_and_grad_per_token(shape, &logits, Tokens::new(&ids), Grad::Skip, &mut per_token);
    assert!(matches!(e, Err(Error::TokenLossLength { expected: 4, got: 5 })), "{e:?}");
    // nothing was written on error
    assert!(per_token.iter().all(|&x| x == 0.0));
}

#[test]
fn soft_capping_takes_the_target_and_the_reference_from_the_element_loop() {
    // The target's capped value and the row's reference are the element loop's own (its `tanh`):
    // a one-entry row has a loss of exactly 0, a row of 33 equal entries exactly ln 33 (every
    // exponential exactly 1, in the vector steps and the tail alike), and a row the target
    // dominates a loss >= 0. T = 2: each sample's loss is its one position's.
    fn per_sample<L: Logit>(spec: &LossSpec, shape: Shape, logits: &[f32], ids: &[i64]) -> (Vec<f64>, Vec<f32>) {
        let x: Vec<L> = logits.iter().map(|&v| L::from_f32(v)).collect();
        let mut g = vec![f32::NAN; x.len()];
        let out = spec.loss_and_grad(shape, &x, Tokens::new(ids), Grad::IntoF32(&mut g)).unwrap();
        (out.per_sample_loss, g)
    }
    let b = 6;
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut uniform = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    for level in cpu_levels() {
        for cap in [5.0, 30.0, 50.0] {
            let spec = LossSpec::builder().softcap(cap).cpu_simd(level).build().unwrap();
            // V = 1
            let one: Vec<f32> = (0..2 * b).map(|_| (uniform() * 160.0 - 80.0) as f32).collect();
            let ids = vec![0i64; 2 * b];
            let shape = Shape::new(b, 2, 1).unwrap();
            for (l, g) in [
                per_sample::<f32>(&spec, shape, &one, &ids),
                per_sample::<bf16>(&spec, shape, &one, &ids),
                per_sample::<f16>(&spec, shape, &one, &ids),
            ] {
                assert!(l.iter().all(|&x| x == 0.0), "{level} c={cap} V=1: {l:?}");
                assert!(g.iter().all(|&x| x == 0.0), "{level} c={cap} V=1: {g:?}");
            }
            // 33 equal entries per row
            let shape = Shape::new(b, 2, 33).unwrap();
            let mut equal = Vec::new();
            for _ in 0..2 * b {
                let x = (uniform() * 160.0 - 80.0) as f32;
                equal.extend(std::iter::repeat_n(x, 33));
            }
            let ids: Vec<i64> = (0..2 * b as i64).map(|i| (i * 5) % 33).collect();
            for (l, _) in [
                per_sample::<f32>(&spec, shape, &equal, &ids),
                per_sample::<bf16>(&spec, shape, &equal, &ids),
                per_sample::<f16>(&spec, shape, &equal, &ids),
            ] {
                assert!(l.iter().all(|&x| (x - 33f64.ln()).abs() <= 1e-12), "{level} c={cap} equal: {l:?}");
            }
            // the target dominates its row
            let v = 257;
            let shape = Shape::new(b, 2, v).unwrap();
            let ids: Vec<i64> = (0..2 * b as i64).map(|i| (i * 37) % v as i64).collect();
            let mut dom: Vec<f32> = (0..2 * b * v).map(|_| (uniform() * -60.0) as f32).collect();
            for s in 0..b {
                dom[2 * s * v + ids[2 * s + 1] as usize] = (40.0 + uniform() * 60.0) as f32;
            }
            for (l, _) in [
                per_sample::<f32>(&spec, shape, &dom, &ids),
                per_sample::<bf16>(&spec, shape, &dom, &ids),
                per_sample::<f16>(&spec, shape, &dom, &ids),
            ] {
                assert!(l.iter().all(|&x| x >= 0.0), "{level} c={cap} dominated: {l:?}");
            }
        }
    }
}

#[test]
fn weighted_mean_with_every_weight_zero_is_zero_and_keeps_a_nan() {
    // alpha = 0: every sample weight is 0. Finite logits: loss 0 (not 0/0). A NaN logit in a
    // counted row: NaN, as the reference says (a zero weight does not hide it).
    let shape = Shape::new(2, 3, 5).unwrap();
    let (mut logits, ids) = random_inputs::<f32>(7, shape, 2.0);
    let spec = LossSpec::builder().alpha(0.0).reduction(Reduction::WeightedMean).build().unwrap();
    for level in cpu_levels() {
        let spec = spec.to_builder().cpu_simd(level).build().unwrap();
        let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
        let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
        assert_eq!((out.loss, r.loss), (0.0, 0.0), "{level}");
    }
    logits[2] = f32::NAN;
    for level in cpu_levels() {
        let spec = spec.to_builder().cpu_simd(level).build().unwrap();
        let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
        let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
        assert!(out.loss.is_nan() && r.loss.is_nan(), "{level}: {} and the reference {}", out.loss, r.loss);
    }
}

#[test]
fn label_smoothing_keeps_f32_accuracy_under_a_large_common_offset() {
    // The logits' sum is taken against the row's reference: a common offset of 1e4 or 1e6 does
    // not cancel the smoothing term away (summing the raw logits in f32 lost 4.5e-2 of the loss
    // at 1e6), with and without soft-capping, every level and dtype, and through the split.
    let shape = Shape::new(3, 4, 2000).unwrap();
    for offset in [1e4f32, 1e6] {
        let (base, ids) = random_inputs::<f32>(11, shape, 3.0);
        let logits: Vec<f32> = base.iter().map(|&x| x + offset).collect();
        for level in cpu_levels() {
            let spec = LossSpec::builder().label_smoothing(0.1).keywords([5]).cpu_simd(level).build().unwrap();
            fn check<L: Logit>(spec: &LossSpec, shape: Shape, logits: &[f32], ids: &[i64], what: &str) {
                let x: Vec<L> = logits.iter().map(|&v| L::from_f32(v)).collect();
                let out = spec.loss_and_grad(shape, &x, Tokens::new(ids), Grad::Skip).unwrap();
                let r = reference(spec, shape, &x, Tokens::new(ids)).unwrap();
                assert!(rel(out.loss, r.loss) <= 1e-5, "{what}: {} vs {}", out.loss, r.loss);
                assert!(rel_err(&out.per_sample_loss, &r.per_sample_loss) <= 1e-5, "{what}");
            }
            let what = format!("offset {offset} {level}");
            check::<f32>(&spec, shape, &logits, &ids, &what);
            check::<bf16>(&spec, shape, &logits, &ids, &what);
            if offset < 6e4 {
                check::<f16>(&spec, shape, &logits, &ids, &what);
            }
        }
    }
}

#[test]
fn soft_capping_where_tanh_saturates() {
    // logits at 4.5..5.5 and 9.5..10.5 times the cap: the chain factor 1 - tanh^2 is tiny
    // there and must keep its relative accuracy (the GPU's, from the rounded tanh, did not)
    // and, alone, logits at 15 to 19.5 times the cap
    for (shape, l, ids, specs) in [common::saturating_softcap_case(), common::deep_softcap_case()] {
        for spec in specs {
            check_all_modes(&spec, shape, &l, Tokens::new(&ids));
        }
    }
}
