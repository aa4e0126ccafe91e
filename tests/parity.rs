//! The fused CPU path against the float64 reference: random shapes, every dtype and option,
//! and the numerical edge cases.

mod common;

use common::{check_all_modes, confident_cases, confident_inputs, random_inputs, rel};
use fused_weighted_loss::reference::reference;
use fused_weighted_loss::{bf16, f16, CpuSimd, DType, Grad, LossSpec, Reduction, RowMean, Shape, Tokens};
use proptest::prelude::*;

fn spec_strategy() -> impl Strategy<Value = LossSpec> {
    (
        prop::collection::vec((0i64..40, prop_oneof![Just(1.0), 0.0f64..3.0]), 0..5),
        prop_oneof![Just(1.0), 0.0f64..4.0],
        prop_oneof![Just(RowMean::AllPositions), Just(RowMean::ValidTokens)],
        prop_oneof![Just(Reduction::Mean), Just(Reduction::WeightedMean), Just(Reduction::Sum)],
        prop_oneof![Just(1.0), -2.0f64..2.0],
    )
        .prop_map(|(kw, alpha, row_mean, reduction, grad_scale)| {
            LossSpec::builder()
                .weighted_keywords(kw)
                .alpha(alpha)
                .row_mean(row_mean)
                .reduction(reduction)
                .grad_scale(grad_scale)
                .build()
                .unwrap()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(64), ..ProptestConfig::default() })]

    #[test]
    fn random_shapes_f32(b in 1usize..5, t in 2usize..7, v in 1usize..5000, seed in any::<u64>(),
                         scale in prop_oneof![Just(1.0f32), 0.01f32..30.0], spec in spec_strategy(),
                         ignore_every in 0usize..4) {
        let shape = Shape::new(b, t, v).unwrap();
        let (logits, mut ids) = random_inputs::<f32>(seed, shape, scale);
        // keywords must be in range: fold them into the vocabulary
        let kw: Vec<(i64, f64)> = spec.keywords().iter().map(|k| (k.id % v as i64, k.weight)).collect();
        let spec = spec.to_builder().weighted_keywords(kw).build().unwrap();
        // plant some keywords so weights vary
        for (i, id) in ids.iter_mut().enumerate() {
            if let Some(k) = spec.keywords().get(i % 7) { if i % 3 == 0 { *id = k.id; } }
        }
        if ignore_every == 0 {
            check_all_modes(&spec, shape, &logits, Tokens::new(&ids));
        } else {
            let labels: Vec<i64> = ids.iter().enumerate()
                .map(|(i, &y)| if i % (ignore_every + 1) == 0 { -100 } else { y }).collect();
            check_all_modes(&spec, shape, &logits, Tokens::new(&ids).with_labels(&labels));
        }
    }

    #[test]
    fn random_shapes_half(b in 1usize..4, t in 2usize..5, v in 1usize..3000, seed in any::<u64>(),
                          spec in spec_strategy()) {
        let shape = Shape::new(b, t, v).unwrap();
        let spec = spec.to_builder().keywords([0i64]).build().unwrap();
        let (logits, ids) = random_inputs::<f16>(seed, shape, 4.0);
        check_all_modes(&spec, shape, &logits, Tokens::new(&ids));
        let (logits, ids) = random_inputs::<bf16>(seed, shape, 4.0);
        check_all_modes(&spec, shape, &logits, Tokens::new(&ids));
    }
}

#[test]
fn course_shape_slice() {
    // the course's vocabulary with a short sequence, and its keyword-heavy weighting
    let shape = Shape::new(3, 5, 50_000).unwrap();
    let (logits, mut ids) = random_inputs::<f32>(7, shape, 3.0);
    ids[0] = 17;
    ids[1] = 17;
    ids[7] = 40;
    let spec = LossSpec::builder().keywords([3, 17, 40]).build().unwrap();
    let (r, _) = check_all_modes(&spec, shape, &logits, Tokens::new(&ids));
    assert_eq!(r.weights[0], 3.0);
    assert_eq!(r.weights[1], 2.0);
}

#[test]
fn vocab_of_one() {
    // every softmax is 1 and every loss 0; the gradient is exactly zero
    let shape = Shape::new(2, 3, 1).unwrap();
    let logits = [0.5f32, -2.0, 3.0, 1.0, 0.0, -7.0];
    let ids = [0i32; 6];
    let mut g = vec![1f32; 6];
    let out = LossSpec::default().loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap();
    assert_eq!(out.loss, 0.0);
    assert!(g.iter().all(|&x| x == 0.0), "{g:?}");
}

#[test]
fn shortest_sequence_and_odd_vocab() {
    for v in [2usize, 3, 15, 17, 31, 33, 2047, 2049, 4097] {
        let shape = Shape::new(2, 2, v).unwrap();
        let (logits, ids) = random_inputs::<f32>(v as u64, shape, 2.0);
        check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
    }
}

#[test]
fn large_vocab_256000() {
    let shape = Shape::new(2, 3, 256_000).unwrap();
    let (logits, ids) = random_inputs::<f32>(11, shape, 4.0);
    check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
    let (logits, ids) = random_inputs::<bf16>(11, shape, 4.0);
    check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
}

#[test]
fn streamed_gradients_with_odd_rows() {
    // gradients of 32 MiB and more are written with streaming stores on their aligned body;
    // an odd vocabulary puts every row at a different alignment (2*42*100003*4 B > 32 MiB)
    let shape = Shape::new(2, 42, 100_003).unwrap();
    assert!(shape.fused_bytes(fused_weighted_loss::DType::F32, fused_weighted_loss::DType::F32) / 2 > 32 << 20);
    let (logits, ids) = random_inputs::<f32>(37, shape, 4.0);
    check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
    let shape = Shape::new(2, 84, 100_003).unwrap();
    let (logits, ids) = random_inputs::<bf16>(39, shape, 4.0);
    check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
    let (logits, ids) = random_inputs::<f16>(41, shape, 4.0);
    let mut labels = ids.clone();
    labels[5..60].fill(-100); // rows without a target are streamed zeros
    check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids).with_labels(&labels));
}

#[test]
fn rows_longer_than_the_scratch_row() {
    // beyond 2^22 elements a row's exponentials are recomputed instead of kept
    let shape = Shape::new(1, 2, (1 << 22) + 5).unwrap();
    let (logits, ids) = random_inputs::<f32>(47, shape, 4.0);
    check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
    let (logits, ids) = random_inputs::<bf16>(47, shape, 4.0);
    check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
}

#[test]
fn reference_moves_within_a_row() {
    // a chunk whose maximum is far above the row's first chunk forces the reference up
    let shape = Shape::new(2, 3, 20_000).unwrap();
    let (mut logits, ids) = random_inputs::<f32>(43, shape, 1.0);
    for r in 0..shape.rows() {
        logits[r * 20_000 + 9_000 + r] = 40.0 + r as f32;
        logits[r * 20_000 + 15_000] = 70.0;
    }
    check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
}

/// Random long rows (up to 60 000 logits, up to 30 chunks) with a common offset per row (up to
/// ±1000) and up to three spikes of up to +79 anywhere in the row, which move the row's reference
/// after its first chunk; f32, bf16 and f16, with options (soft-capped logits kept within three
/// caps of 0: a row whose every logit saturates has a chain factor below f32's range, as the
/// README says). Seeds: `FWL_TEST_CASES` (default 20; 20 000 passed).
#[test]
fn random_long_rows_with_offsets_and_spikes() {
    use fused_weighted_loss::synthetic::Rng;
    for seed in 0..u64::from(common::cases(20)) {
        let mut rng = Rng::new(seed ^ 0x77);
        let (b, t, v) = (1 + rng.below(2) as usize, 2 + rng.below(3) as usize, 1 + rng.below(60_000) as usize);
        let shape = Shape::new(b, t, v).unwrap();
        let scale = [0.5f32, 3.0, 12.0][rng.below(3) as usize];
        let (mut logits, ids) = random_inputs::<f32>(seed, shape, scale);
        for row in logits.chunks_exact_mut(v) {
            let offset = (rng.below(2001) as f32 - 1000.0) * [0.0, 0.01, 1.0][rng.below(3) as usize];
            row.iter_mut().for_each(|x| *x += offset);
            for _ in 0..rng.below(4) {
                row[rng.below(v as u64) as usize] += rng.below(80) as f32;
            }
        }
        let (sb, cap) = common::random_options(&mut rng, LossSpec::builder().keywords([0i64]));
        if let Some(cap) = cap {
            logits.iter_mut().for_each(|x| *x = x.clamp(-3.0 * cap, 3.0 * cap));
        }
        let spec = sb.build().unwrap();
        match rng.below(3) {
            0 => check_all_modes(
                &spec,
                shape,
                &logits.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
                Tokens::new(&ids),
            ),
            1 => check_all_modes(
                &spec,
                shape,
                &logits.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
                Tokens::new(&ids),
            ),
            _ => check_all_modes(&spec, shape, &logits, Tokens::new(&ids)),
        };
    }
}

#[test]
fn huge_logits() {
    // ±3e3: exp overflows without the max shift and underflows to 0 for most entries
    let shape = Shape::new(2, 4, 1000).unwrap();
    let (logits, ids) = random_inputs::<f32>(3, shape, 3000.0);
    check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
}

#[test]
fn weights_near_the_f64_limit_keep_a_finite_mean() {
    // alpha 1e308: the sum of the samples' weighted losses is beyond f64, their mean over B = 2
    // is not; the reference takes each weight over B first, as the fused path does, and both
    // are finite
    let shape = Shape::new(2, 2, 3).unwrap();
    let (logits, ids) = random_inputs::<f32>(9, shape, 1.0);
    let spec = LossSpec::builder().alpha(1e308).build().unwrap();
    let want = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
    let got = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::<f32>::Skip).unwrap();
    assert!(want.loss.is_finite() && want.loss > 1e307, "reference: {}", want.loss);
    // (the case is one where the sum before the division overflows: else it tests nothing)
    let sum: f64 = want.per_sample_loss.iter().zip(&want.weights).map(|(l, w)| l * w).sum();
    assert!(sum.is_infinite(), "the weighted losses sum to {sum}: pick a case whose sum overflows");
    assert!(rel(got.loss, want.loss) <= 1e-6, "fused {} vs reference {}", got.loss, want.loss);
}

#[test]
fn per_token_loss_beyond_f32_range_stays_finite() {
    // z_max - z[target] = 2 * f32::MAX: finite in float64, so the loss must be finite too
    let shape = Shape::new(3, 5, 700).unwrap();
    let spec = LossSpec::builder().check_finite(true).build().unwrap();
    let (logits, ids) = common::edge_of_range_logits::<f32>(61, shape);
    let (r, _) = check_all_modes(&spec, shape, &logits, Tokens::new(&ids));
    assert!(r.per_sample_loss.iter().all(|&l| l.is_finite() && l > f32::MAX as f64));
    let (logits, ids) = common::edge_of_range_logits::<bf16>(62, shape);
    check_all_modes(&spec, shape, &logits, Tokens::new(&ids));
    // ±3e38 everywhere, as reported: several maxima per row. The gradient is checked against the
    // reference and by its row sums (softmax sums to 1).
    let logits: Vec<f32> = (0..shape.logits_len()).map(|i| if i % 3 == 0 { 3e38 } else { -3e38 }).collect();
    let ids: Vec<i64> = (0..shape.rows() as i64).map(|i| (i * 7) % 700).collect();
    let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
    assert!(r.loss.is_finite() && r.loss > 1e38);
    for level in common::cpu_levels() {
        let s = spec.to_builder().cpu_simd(level).build().unwrap();
        let mut g = vec![f32::NAN; shape.logits_len()];
        let out = s.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap();
        common::assert_outputs(&out, &r, 1e-5, &format!("{level}: ±3e38"));
        let e = fused_weighted_loss::reference::rel_err(&g, &r.grad);
        assert!(e <= 1e-5, "{level}: ±3e38 gradient rel err {e:e}");
        let coef = 1.0 / (shape.batch() * (shape.seq() - 1)) as f64;
        for row in g.chunks_exact(shape.vocab()) {
            let sum: f64 = row.iter().map(|&x| x as f64).sum();
            assert!(sum.abs() <= 1e-6 * coef, "{level}: a row's gradient sums to {sum}");
            assert!(row.iter().all(|&x| (x as f64).abs() <= coef * (1.0 + 1e-6)));
        }
    }
}

#[test]
fn large_common_offset() {
    // 1e4 + noise: the loss must come from differences, not from 1e4-sized sums
    let shape = Shape::new(2, 4, 3000).unwrap();
    let (noise, ids) = random_inputs::<f32>(5, shape, 2.0);
    let logits: Vec<f32> = noise.iter().map(|x| 1e4 + x).collect();
    let (r, _) = check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
    assert!(r.loss > 1.0 && r.loss < 20.0);
}

#[test]
fn masked_vocab_with_neg_inf() {
    // -inf on non-target entries (the usual vocabulary mask) is fine, even a whole leading chunk
    let shape = Shape::new(2, 3, 5000).unwrap();
    let (mut logits, ids) = random_inputs::<f32>(9, shape, 2.0);
    let v = shape.vocab();
    for r in 0..shape.rows() {
        let target = if (r % 3) < 2 { ids[r + 1] as usize } else { usize::MAX };
        for j in 0..v {
            if (j < 2500 || j % 3 == 0) && j != target {
                logits[r * v + j] = f32::NEG_INFINITY;
            }
        }
    }
    let spec = LossSpec::builder().check_finite(true).build().unwrap();
    let (_, g) = check_all_modes(&spec, shape, &logits, Tokens::new(&ids));
    for (z, g) in logits.iter().zip(&g) {
        if *z == f32::NEG_INFINITY {
            assert_eq!(*g, 0.0, "masked entries get exactly zero gradient");
        }
    }
}

#[test]
fn ids_equal_to_ignore_index_are_ignored_targets() {
    // The course function passes its inputs to `CrossEntropyLoss(ignore_index=-100)`: an input of
    // -100 is an ignored target there. The same here, without separate labels: the result equals
    // the call with those positions as ignored labels (and a non-keyword id in the ids), at the
    // first position (never a target), mid-sample, the last and a whole sample.
    let shape = Shape::new(3, 6, 700).unwrap();
    let (logits, clean) = random_inputs::<f32>(29, shape, 2.0);
    let keys = [clean[1], clean[9]];
    let mut ids = clean.clone();
    for i in [0usize, 3, 5, 8, 12, 13, 14, 15, 16, 17] {
        ids[i] = -100;
    }
    let stand_in: Vec<i64> = ids.iter().map(|&y| if y == -100 { 699 } else { y }).collect();
    assert!(!keys.contains(&699));
    for row_mean in [RowMean::AllPositions, RowMean::ValidTokens] {
        let spec = LossSpec::builder().keywords(keys).row_mean(row_mean).build().unwrap();
        let (r, g) = check_all_modes(&spec, shape, &logits, Tokens::new(&ids));
        assert_eq!(r.valid_tokens, vec![3, 4, 0]);
        let (_, g2) = check_all_modes(&spec, shape, &logits, Tokens::new(&stand_in).with_labels(&ids));
        assert_eq!(g, g2, "the same gradient as with the positions ignored through labels");
        let a = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
        let b = spec.loss_and_grad(shape, &logits, Tokens::new(&stand_in).with_labels(&ids), Grad::Skip).unwrap();
        assert_eq!(a, b, "the same outputs as with the positions ignored through labels");
    }
    // another ignore_index: -100 is then out of range, the new value is the ignored one
    let spec = LossSpec::builder().ignore_index(-1).build().unwrap();
    assert!(spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).is_err());
    let ids1: Vec<i64> = ids.iter().map(|&y| if y == -100 { -1 } else { y }).collect();
    let (r, _) = check_all_modes(&spec, shape, &logits, Tokens::new(&ids1));
    assert_eq!(r.valid_tokens, vec![3, 4, 0]);
}

#[test]
fn ignore_index_both_row_means() {
    let shape = Shape::new(3, 6, 700).unwrap();
    let (logits, ids) = random_inputs::<f32>(13, shape, 2.0);
    let mut labels = ids.clone();
    for i in [1usize, 2, 4, 9, 14, 15] {
        labels[i] = -100;
    }
    for row_mean in [RowMean::AllPositions, RowMean::ValidTokens] {
        for reduction in [Reduction::Mean, Reduction::WeightedMean, Reduction::Sum] {
            let spec =
                LossSpec::builder().keywords([ids[0], ids[3]]).row_mean(row_mean).reduction(reduction).build().unwrap();
            let (r, _) = check_all_modes(&spec, shape, &logits, Tokens::new(&ids).with_labels(&labels));
            assert_eq!(r.valid_tokens, vec![2, 4, 3]);
        }
    }
}

#[test]
fn custom_ignore_index_on_ids() {
    // ignore_index applies to the labels, which default to the ids (e.g. a padding id)
    let shape = Shape::new(2, 5, 50).unwrap();
    let (logits, mut ids) = random_inputs::<f32>(17, shape, 2.0);
    ids[3] = 0;
    ids[4] = 0;
    let spec = LossSpec::builder().ignore_index(0).row_mean(RowMean::ValidTokens).build().unwrap();
    let (r, _) = check_all_modes(&spec, shape, &logits, Tokens::new(&ids));
    assert!(r.valid_tokens[0] <= 2);
}

#[test]
fn all_ignored_sample() {
    let shape = Shape::new(2, 4, 100).unwrap();
    let (logits, ids) = random_inputs::<f32>(19, shape, 2.0);
    let mut labels = ids.clone();
    labels[..4].fill(-100);
    for row_mean in [RowMean::AllPositions, RowMean::ValidTokens] {
        let spec = LossSpec::builder().row_mean(row_mean).build().unwrap();
        let mut g = vec![f32::NAN; shape.logits_len()];
        let out =
            spec.loss_and_grad(shape, &logits, Tokens::new(&ids).with_labels(&labels), Grad::IntoF32(&mut g)).unwrap();
        assert_eq!(out.per_sample_loss[0], 0.0);
        assert_eq!(out.valid_tokens[0], 0);
        assert!(out.loss.is_finite());
        assert!(g[..4 * 100].iter().all(|&x| x == 0.0));
        check_all_modes(&spec, shape, &logits, Tokens::new(&ids).with_labels(&labels));
    }
}

#[test]
fn duplicate_and_empty_keywords() {
    let shape = Shape::new(2, 4, 30).unwrap();
    let (logits, _) = random_inputs::<f32>(23, shape, 2.0);
    let ids = [5i64, 5, 1, 2, 3, 4, 5, 6];
    let dup = LossSpec::builder().keywords([5, 5]).build().unwrap();
    let (r, _) = check_all_modes(&dup, shape, &logits, Tokens::new(&ids));
    assert_eq!(r.weights, vec![1.0 + 4.0, 1.0 + 2.0], "a repeated keyword counts twice");
    let (r, _) = check_all_modes(&LossSpec::default(), shape, &logits, Tokens::new(&ids));
    assert_eq!(r.weights, vec![1.0, 1.0]);
}

#[test]
fn all_id_types_agree() {
    let shape = Shape::new(2, 3, 40).unwrap();
    let (logits, ids) = random_inputs::<f32>(29, shape, 2.0);
    let spec = LossSpec::builder().keywords([ids[2]]).build().unwrap();
    let a = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
    let ids32: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let idsu: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    assert_eq!(a, spec.loss_and_grad(shape, &logits, Tokens::new(&ids32), Grad::Skip).unwrap());
    assert_eq!(a, spec.loss_and_grad(shape, &logits, Tokens::new(&idsu), Grad::Skip).unwrap());
}

#[test]
fn non_finite_logits_propagate_like_pytorch() {
    let shape = Shape::new(1, 3, 4).unwrap();
    let ids = [0i64, 1, 2];
    // -inf at a target: +inf loss, finite gradient
    let logits = [0.0f32, f32::NEG_INFINITY, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let mut g = vec![0f32; 12];
    let out = LossSpec::default().loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap();
    assert_eq!(out.loss, f64::INFINITY);
    assert!(g.iter().all(|x| x.is_finite()));
    let r = reference(&LossSpec::default(), shape, &logits, Tokens::new(&ids)).unwrap();
    assert_eq!(r.loss, f64::INFINITY);
    // a row all -inf (its target too): NaN loss, as PyTorch's -inf - (-inf), on every SIMD level
    let mut all_neg = logits;
    all_neg[..4].fill(f32::NEG_INFINITY);
    for simd in [CpuSimd::Portable, CpuSimd::Avx2, CpuSimd::Avx512] {
        let spec = LossSpec::builder().cpu_simd(simd).build().unwrap();
        match spec.loss_and_grad(shape, &all_neg, Tokens::new(&ids), Grad::Skip) {
            Ok(out) => assert!(out.loss.is_nan(), "{simd:?}: {}", out.loss),
            Err(e) => assert!(matches!(e, fused_weighted_loss::Error::BackendUnavailable { .. }), "{simd:?}: {e}"),
        }
    }
    assert!(reference(&LossSpec::default(), shape, &all_neg, Tokens::new(&ids)).unwrap().loss.is_nan());
    // NaN anywhere in a row with a target: NaN loss
    let mut logits = [0.5f32; 12];
    logits[6] = f32::NAN;
    let out = LossSpec::default().loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap();
    assert!(out.loss.is_nan());
    assert!(g[4..8].iter().all(|x| x.is_nan()));
    // +inf: NaN loss, as log_softmax gives
    logits[6] = f32::INFINITY;
    let out = LossSpec::default().loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
    assert!(out.loss.is_nan());
    let r = reference(&LossSpec::default(), shape, &logits, Tokens::new(&ids)).unwrap();
    assert!(r.loss.is_nan());
    // the check turns them into errors that name the position
    let spec = LossSpec::builder().check_finite(true).build().unwrap();
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap_err();
    assert!(matches!(e, fused_weighted_loss::Error::NonFinite { batch: 0, position: 1, .. }), "{e}");
}

#[test]
fn upstream_scale_scales_gradient_only() {
    let shape = Shape::new(2, 3, 64).unwrap();
    let (logits, ids) = random_inputs::<f32>(31, shape, 2.0);
    let mut g1 = vec![0f32; shape.logits_len()];
    let mut g2 = vec![0f32; shape.logits_len()];
    let a = LossSpec::default().loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g1)).unwrap();
    let s = LossSpec::builder().grad_scale(0.25).build().unwrap();
    let b = s.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g2)).unwrap();
    assert_eq!(a.loss, b.loss);
    for (x, y) in g1.iter().zip(&g2) {
        assert!(rel(*y as f64, 0.25 * *x as f64) <= 1e-6 || (*x == 0.0 && *y == 0.0));
    }
}

/// Rows whose target logit stands far above the rest (a confident model late in training):
/// their losses are tiny (`ln(1 + Σ_{j≠y} e^{z_j − z_y})`, down to 1e-9 here) and must keep
/// their relative accuracy, as must the target's gradient `softmax_y − 1`. Summed together with
/// the target's own exponential in f32, every later term of the target's lane fell below half
/// an ulp of it: the loss of a margin of 18 over V = 32000 came out 2e-3 too small.
#[test]
fn confident_rows_keep_the_accuracy_of_small_losses() {
    fn case<L: fused_weighted_loss::Logit>(spec: &LossSpec, v: usize, margin: f32, seed: u64) {
        let shape = Shape::new(2, 5, v).unwrap();
        let (logits, ids) = confident_inputs::<L>(seed, shape, margin);
        check_all_modes(spec, shape, &logits, Tokens::new(&ids));
    }
    for (spec, v, margin, seed, dtype) in confident_cases(&[4, 2047, 2049, 5000, 32000]) {
        match dtype {
            DType::F32 => case::<f32>(&spec, v, margin, seed),
            DType::BF16 => case::<bf16>(&spec, v, margin, seed),
            _ => case::<f16>(&spec, v, margin, seed),
        }
    }
}

#[test]
fn bf16_gradients_below_the_normal_range_are_zeros_the_target_entry_too() {
    // alpha 4e-38: every gradient entry (the target's `coef · (p − 1)`, about -5e-39, included)
    // lies below f32's smallest normal (and the target's above bf16's smallest subnormal, 9.2e-41), where the CPU's bf16 stores give a zero of the entry's sign at every
    // level; the target's entry was written apart and kept a subnormal
    let shape = Shape::new(2, 5, 3000).unwrap();
    let logits: Vec<bf16> = fused_weighted_loss::synthetic::logits::<f32>(3, shape.logits_len(), 2.0)
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let ids = fused_weighted_loss::synthetic::ids::<i64>(4, shape.rows(), shape.vocab());
    for level in [fused_weighted_loss::CpuSimd::Auto, fused_weighted_loss::CpuSimd::Portable] {
        let spec = LossSpec::builder().alpha(4e-38).cpu_simd(level).build().unwrap();
        let mut grad = vec![bf16::from_f32(1.0); logits.len()];
        let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad)).unwrap();
        assert!(out.loss > 0.0 && out.loss < 1e-35, "{}", out.loss);
        let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
        assert!(r.grad.iter().any(|&g| g != 0.0), "the true gradient is not zero");
        for (i, g) in grad.iter().enumerate() {
            assert_eq!(g.to_f32(), 0.0, "entry {i} (row {}): {g:?}", i / shape.vocab());
        }
        // the targets' entries are negative zeros, the others positive
        let negative = grad.iter().filter(|g| g.to_bits() == 0x8000).count();
        assert_eq!(negative, shape.batch() * (shape.seq() - 1), "{level:?}");
    }
}
