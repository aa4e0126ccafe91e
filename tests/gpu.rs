//! GPU parity: the same bodies as the CPU parity tests, through the CUDA backend, against the
//! float64 reference; plus the device API (caller's buffers and stream, device grad scale,
//! errors found on the device). Without a GPU every test prints that it skipped; with
//! `FWL_REQUIRE_CUDA=1` and no GPU every test fails.

mod common;

use common::{check_cuda, confident_cases, confident_inputs, gpu_or_skip, random_inputs};
use fused_weighted_loss::{bf16, f16, DType, Grad, LossSpec, Reduction, RowMean, Shape, Tokens};

#[test]
fn gpu_random_shapes_all_dtypes() {
    if !gpu_or_skip("gpu_random_shapes_all_dtypes") {
        return;
    }
    let shapes = [(1, 2, 1), (2, 3, 7), (3, 5, 33), (2, 17, 1000), (4, 9, 4097), (2, 4, 50_000), (1, 3, 50_257)];
    for (i, &(b, t, v)) in shapes.iter().enumerate() {
        let shape = Shape::new(b, t, v).unwrap();
        let seed = 100 + i as u64;
        let spec = LossSpec::builder().keywords([0i64, (v as i64 - 1) / 2]).build().unwrap();
        let (l, ids) = random_inputs::<f32>(seed, shape, 4.0);
        check_cuda(&spec, shape, &l, Tokens::new(&ids));
        let (l, ids) = random_inputs::<bf16>(seed, shape, 4.0);
        check_cuda(&spec, shape, &l, Tokens::new(&ids));
        let (l, ids) = random_inputs::<f16>(seed, shape, 4.0);
        check_cuda(&spec, shape, &l, Tokens::new(&ids));
    }
}

#[test]
fn gpu_vocab_256000_and_odd_alignments() {
    if !gpu_or_skip("gpu_vocab_256000_and_odd_alignments") {
        return;
    }
    // 256000 does not fit in shared memory as f32: the tail of each row is re-read
    let shape = Shape::new(2, 3, 256_000).unwrap();
    let (l, ids) = random_inputs::<f32>(7, shape, 4.0);
    check_cuda(&LossSpec::default(), shape, &l, Tokens::new(&ids));
    let (l, ids) = random_inputs::<bf16>(7, shape, 4.0);
    check_cuda(&LossSpec::default(), shape, &l, Tokens::new(&ids));
    // odd vocabularies put rows at every alignment (unaligned heads and tails)
    for v in [3usize, 5, 9, 31, 2049, 128_257] {
        let shape = Shape::new(2, 3, v).unwrap();
        let (l, ids) = random_inputs::<bf16>(v as u64, shape, 2.0);
        check_cuda(&LossSpec::default(), shape, &l, Tokens::new(&ids));
    }
}

#[test]
fn gpu_ignore_index_row_means_reductions() {
    if !gpu_or_skip("gpu_ignore_index_row_means_reductions") {
        return;
    }
    let shape = Shape::new(3, 6, 700).unwrap();
    let (l, ids) = random_inputs::<f32>(13, shape, 2.0);
    let mut labels = ids.clone();
    for i in [1usize, 2, 4, 9, 14, 15] {
        labels[i] = -100;
    }
    labels[12..18].fill(-100); // an all-ignored sample
    for row_mean in [RowMean::AllPositions, RowMean::ValidTokens] {
        for reduction in [Reduction::Mean, Reduction::WeightedMean, Reduction::Sum] {
            let spec = LossSpec::builder()
                .keywords([ids[0], ids[0], ids[3]])
                .row_mean(row_mean)
                .reduction(reduction)
                .grad_scale(0.5)
                .build()
                .unwrap();
            check_cuda(&spec, shape, &l, Tokens::new(&ids).with_labels(&labels));
        }
    }
}

#[test]
fn gpu_numerical_edges() {
    if !gpu_or_skip("gpu_numerical_edges") {
        return;
    }
    let shape = Shape::new(2, 4, 3000).unwrap();
    let (l, ids) = random_inputs::<f32>(3, shape, 3000.0);
    check_cuda(&LossSpec::default(), shape, &l, Tokens::new(&ids));
    let (noise, ids) = random_inputs::<f32>(5, shape, 2.0);
    let l: Vec<f32> = noise.iter().map(|x| 1e4 + x).collect();
    check_cuda(&LossSpec::default(), shape, &l, Tokens::new(&ids));
    let (mut l, ids) = random_inputs::<f32>(9, shape, 2.0);
    for r in 0..shape.rows() {
        let target = if r % 4 < 3 { ids[r + 1] as usize } else { usize::MAX };
        for j in 0..3000 {
            if (j < 1500 || j % 3 == 0) && j != target {
                l[r * 3000 + j] = f32::NEG_INFINITY;
            }
        }
    }
    let (_, g) = check_cuda(&LossSpec::builder().check_finite(true).build().unwrap(), shape, &l, Tokens::new(&ids));
    assert!(l.iter().zip(&g).all(|(z, g)| *z != f32::NEG_INFINITY || *g == 0.0));
}

#[test]
fn gpu_per_token_loss_beyond_f32_range_stays_finite() {
    if !gpu_or_skip("gpu_per_token_loss_beyond_f32_range_stays_finite") {
        return;
    }
    let spec = LossSpec::builder().check_finite(true).build().unwrap();
    for (i, v) in [700usize, 50_257].into_iter().enumerate() {
        let shape = Shape::new(3, 5, v).unwrap();
        let (l, ids) = common::edge_of_range_logits::<f32>(61 + i as u64, shape);
        let (r, _) = check_cuda(&spec, shape, &l, Tokens::new(&ids));
        assert!(r.per_sample_loss.iter().all(|&x| x.is_finite() && x > f32::MAX as f64));
        let (l, ids) = common::edge_of_range_logits::<bf16>(63 + i as u64, shape);
        check_cuda(&spec, shape, &l, Tokens::new(&ids));
    }
}

/// More rows than the grid has blocks, so that each block strides over several (the shapes
/// above have at most 132 rows, one per block on an H100/H200): rows of 4097 entries, whose
/// 16-byte split moves from row to row for 16-bit and f32 logits alike, with ignored targets
/// among them, and rows of 50000 bf16 and f32 entries, several vectors per thread in shared
/// memory.
/// What the prefetching kernels' copies of a block's next row (`FWL_CUDA_ROW_PREFETCH`) must
/// get right, checked in every gradient mode.
#[test]
fn gpu_many_rows_per_block() {
    if !gpu_or_skip("gpu_many_rows_per_block") {
        return;
    }
    let shape = Shape::new(8, 257, 4097).unwrap();
    let spec = |ids: &[i64]| LossSpec::builder().keywords([ids[3]]).build().unwrap();
    let ignore = |ids: &mut Vec<i64>| {
        for i in (0..ids.len()).step_by(7) {
            ids[i] = -100;
        }
    };
    let (l, mut ids) = random_inputs::<bf16>(41, shape, 4.0);
    ignore(&mut ids);
    check_cuda(&spec(&ids), shape, &l, Tokens::new(&ids));
    let (l, mut ids) = random_inputs::<f32>(42, shape, 4.0);
    ignore(&mut ids);
    check_cuda(&spec(&ids), shape, &l, Tokens::new(&ids));
    let shape = Shape::new(4, 129, 50_000).unwrap();
    let (l, ids) = random_inputs::<bf16>(43, shape, 4.0);
    check_cuda(&spec(&ids), shape, &l, Tokens::new(&ids));
    // f32: 13 cached vectors per thread, the prefetching kernels' copies in groups of two
    let (l, ids) = random_inputs::<f32>(44, shape, 4.0);
    check_cuda(&spec(&ids), shape, &l, Tokens::new(&ids));
}

#[test]
fn gpu_agrees_with_cpu_and_is_deterministic() {
    if !gpu_or_skip("gpu_agrees_with_cpu_and_is_deterministic") {
        return;
    }
    let shape = Shape::new(4, 33, 50_000).unwrap();
    let (l, ids) = random_inputs::<bf16>(21, shape, 4.0);
    let run = |backend| {
        let spec = LossSpec::builder().keywords([ids[5]]).backend(backend).build().unwrap();
        let mut g = vec![0f32; shape.logits_len()];
        let out = spec.loss_and_grad(shape, &l, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap();
        (out, g)
    };
    let (a, ga) = run(fused_weighted_loss::Backend::Cuda);
    let (b, gb) = run(fused_weighted_loss::Backend::Cuda);
    assert_eq!(a, b, "reruns on the GPU are bit-identical");
    assert!(ga.iter().zip(&gb).all(|(x, y)| x.to_bits() == y.to_bits()));
    let (c, gc) = run(fused_weighted_loss::Backend::Cpu);
    assert!(common::rel(a.loss, c.loss) <= 1e-5);
    assert!(fused_weighted_loss::reference::rel_err(&ga, &gc) <= 1e-5);
}

#[test]
fn gpu_options_alone_and_combined() {
    if !gpu_or_skip("gpu_options_alone_and_combined") {
        return;
    }
    // z-loss, label smoothing, soft-capping and token weights: each of the 16 combinations, with
    // ignored labels, both row means, at a vocabulary that fits in shared memory and one that
    // does not (as f32), in every dtype
    for (i, v) in [4097usize, 128_257].into_iter().enumerate() {
        let shape = Shape::new(2, 5, v).unwrap();
        for bits in 0..16u32 {
            let spec = LossSpec::builder()
                .keywords([1i64])
                .z_loss(if bits & 1 != 0 { 1e-3 } else { 0.0 })
                .label_smoothing(if bits & 2 != 0 { 0.1 } else { 0.0 })
                .softcap(if bits & 4 != 0 { Some(20.0) } else { None })
                .row_mean(if bits % 3 == 0 { RowMean::ValidTokens } else { RowMean::AllPositions })
                .build()
                .unwrap();
            let seed = 1000 + 16 * i as u64 + bits as u64;
            let (l, ids) = random_inputs::<f32>(seed, shape, 6.0);
            let labels: Vec<i64> = ids.iter().enumerate().map(|(j, &y)| if j % 4 == 2 { -100 } else { y }).collect();
            let w: Vec<f32> = (0..shape.rows()).map(|j| (j % 5) as f32 * 0.5).collect();
            let tokens = Tokens::new(&ids).with_labels(&labels);
            let tokens = if bits & 8 != 0 { tokens.with_token_weights(&w) } else { tokens };
            check_cuda(&spec, shape, &l, tokens);
            let l16: Vec<bf16> = l.iter().map(|&x| bf16::from_f32(x)).collect();
            check_cuda(&spec, shape, &l16, tokens);
            let l16: Vec<f16> = l.iter().map(|&x| f16::from_f32(x)).collect();
            check_cuda(&spec, shape, &l16, tokens);
        }
    }
}

#[test]
fn gpu_large_soft_caps_keep_f32_accuracy() {
    if !gpu_or_skip("gpu_large_soft_caps_keep_f32_accuracy") {
        return;
    }
    // tanh(z / c) at small arguments (large caps) within f32 accuracy: a tanh taken as
    // (1 − u) / (1 + u) from u = exp(−2z/c) keeps an absolute error of an ulp of 1, c times that
    // in the capped logit (1e-4 of the loss at c = 1e4); with and without smoothing, every dtype
    let shape = Shape::new(2, 4, 3000).unwrap();
    for (i, cap) in [30.0, 1e3, 1e4, 1e6, 1e30].into_iter().enumerate() {
        for smoothing in [0.0, 0.1] {
            let spec = LossSpec::builder().softcap(cap).label_smoothing(smoothing).build().unwrap();
            let (l, ids) = random_inputs::<f32>(70 + i as u64, shape, 3.0);
            check_cuda(&spec, shape, &l, Tokens::new(&ids));
            let l16: Vec<bf16> = l.iter().map(|&x| bf16::from_f32(x)).collect();
            check_cuda(&spec, shape, &l16, Tokens::new(&ids));
        }
    }
}

#[test]
fn gpu_ids_equal_to_ignore_index_are_ignored_targets() {
    if !gpu_or_skip("gpu_ids_equal_to_ignore_index_are_ignored_targets") {
        return;
    }
    // as on the CPU (and in the course function): without separate labels an id equal to
    // ignore_index is an ignored target, not an id out of range (the plan kernel's check)
    let shape = Shape::new(3, 6, 700).unwrap();
    let (l, mut ids) = random_inputs::<f32>(29, shape, 2.0);
    for i in [0usize, 3, 5, 8, 12, 13, 14, 15, 16, 17] {
        ids[i] = -100;
    }
    for row_mean in [RowMean::AllPositions, RowMean::ValidTokens] {
        let spec = LossSpec::builder().keywords([ids[1]]).row_mean(row_mean).build().unwrap();
        let (r, _) = check_cuda(&spec, shape, &l, Tokens::new(&ids));
        assert_eq!(r.valid_tokens, vec![3, 4, 0]);
    }
}

#[test]
fn gpu_label_smoothing_keeps_f32_accuracy_under_a_large_common_offset() {
    if !gpu_or_skip("gpu_label_smoothing_keeps_f32_accuracy_under_a_large_common_offset") {
        return;
    }
    // The sum of the logits is kept against the running maximum (with a count to move it): a
    // common offset of 1e4 or 1e6 does not cancel the smoothing term (a raw f32 sum lost about
    // 1e-2 of the loss at 1e6). A vocabulary that fits in shared memory and one that does not.
    for v in [2000usize, 128_257] {
        let shape = Shape::new(2, 4, v).unwrap();
        for offset in [1e4f32, 1e6] {
            let (base, ids) = random_inputs::<f32>(11, shape, 3.0);
            let logits: Vec<f32> = base.iter().map(|&x| x + offset).collect();
            let spec = LossSpec::builder().label_smoothing(0.1).keywords([5i64]).build().unwrap();
            // the loss within 1e-5 (f32) and 1e-4 (bf16), gradient and per-sample losses too
            check_cuda(&spec, shape, &logits, Tokens::new(&ids));
            // bf16 at these offsets leaves a row one or two distinct values, and still catches a
            // cancelled sum (a raw f32 sum missed by ~1e-3 of the loss at 1e6 even so)
            let l16: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
            check_cuda(&spec, shape, &l16, Tokens::new(&ids));
        }
    }
}

#[test]
fn gpu_confident_rows_keep_the_accuracy_of_small_losses() {
    if !gpu_or_skip("gpu_confident_rows_keep_the_accuracy_of_small_losses") {
        return;
    }
    // A target far above the rest: its term stays out of the f32 sum of exponentials (the
    // kernels' `skip`), the loss is ln(1 + others / e_t) in double and the target's gradient
    // -others / sum. With the target in the sum, a margin of 18 over V = 32000 lost 2e-3 of the
    // loss (the batch loss 6e-4 here). Targets in the head, the vectors and the tail of a row
    // (odd V), every dtype, soft-capping and the other options.
    fn case<L: fused_weighted_loss::Logit>(spec: &LossSpec, v: usize, margin: f32, seed: u64) {
        let shape = Shape::new(2, 5, v).unwrap();
        let (logits, ids) = confident_inputs::<L>(seed, shape, margin);
        check_cuda(spec, shape, &logits, Tokens::new(&ids));
    }
    for (spec, v, margin, seed, dtype) in confident_cases(&[4, 2047, 2049, 5000, 32_000, 128_257]) {
        match dtype {
            DType::F32 => case::<f32>(&spec, v, margin, seed),
            DType::BF16 => case::<bf16>(&spec, v, margin, seed),
            _ => case::<f16>(&spec, v, margin, seed),
        }
    }
}

#[cfg(feature = "cuda")]
mod device_api {
    use super::*;
    use fused_weighted_loss::cuda::cudarc::driver::CudaContext;
    use fused_weighted_loss::cuda::{CudaLoss, DeviceInputs};
    use fused_weighted_loss::reference::{reference, rel_err};
    use fused_weighted_loss::Error;

    #[test]
    fn gpu_device_buffers_stream_and_device_grad_scale() {
        if !gpu_or_skip("gpu_device_buffers_stream_and_device_grad_scale") {
            return;
        }
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.new_stream().unwrap();
        let loss = CudaLoss::new(&ctx).unwrap();
        let shape = Shape::new(3, 7, 5003).unwrap();
        let (l, ids) = random_inputs::<bf16>(31, shape, 3.0);
        let spec = LossSpec::builder().keywords([ids[2]]).grad_scale(123.0).build().unwrap();
        let d_l = stream.clone_htod(&l).unwrap();
        let d_ids = stream.clone_htod(&ids).unwrap();
        let d_scale = stream.clone_htod(&[0.25f32]).unwrap();
        let mut d_g = stream.alloc_zeros::<f32>(shape.logits_len()).unwrap();
        let (ids_v, scale_v) = (d_ids.as_view(), d_scale.as_view());
        let inputs = DeviceInputs::new(&ids_v).with_grad_scale(&scale_v);
        let out = loss.loss_and_grad(&spec, shape, &stream, &d_l.as_view(), &inputs, &mut d_g.as_view_mut()).unwrap();
        let host = out.to_host(&stream).unwrap();
        let g = stream.clone_dtoh(&d_g).unwrap();
        stream.synchronize().unwrap();
        // the device scalar (0.25) replaces the spec's 123
        let r = reference(&spec.to_builder().grad_scale(0.25).build().unwrap(), shape, &l, Tokens::new(&ids)).unwrap();
        assert!(common::rel(host.loss, r.loss) <= 1e-4);
        assert!(rel_err(&g, &r.grad) <= 1e-5);
        // row losses stay on the device too
        let rows = stream.clone_dtoh(&out.row_loss).unwrap();
        assert_eq!(rows.len(), shape.rows());
        assert!(rows.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn gpu_device_token_weights_z_loss_and_token_losses() {
        if !gpu_or_skip("gpu_device_token_weights_z_loss_and_token_losses") {
            return;
        }
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.new_stream().unwrap();
        let loss = CudaLoss::new(&ctx).unwrap();
        let shape = Shape::new(3, 6, 3001).unwrap();
        let (l, ids) = random_inputs::<f32>(41, shape, 3.0);
        let w: Vec<f32> = (0..shape.rows()).map(|j| 0.25 + (j % 3) as f32).collect();
        let spec = LossSpec::builder().z_loss(1e-2).label_smoothing(0.05).softcap(10.0).build().unwrap();
        let d_l = stream.clone_htod(&l).unwrap();
        let d_ids = stream.clone_htod(&ids).unwrap();
        let mut d_w = stream.clone_htod(&w).unwrap();
        let (ids_v, w_v) = (d_ids.as_view(), d_w.as_view());
        let inputs = DeviceInputs::new(&ids_v).with_token_weights(&w_v);
        let out = loss.loss(&spec, shape, &stream, &d_l.as_view(), &inputs).unwrap();
        let host = out.to_host(&stream).unwrap();
        let mut per_token = vec![f32::NAN; 3 * 5];
        out.token_loss_to_host(&stream, &mut per_token).unwrap();
        let r = reference(&spec, shape, &l, Tokens::new(&ids).with_token_weights(&w)).unwrap();
        assert!(common::rel(host.loss, r.loss) <= 1e-5, "{} vs {}", host.loss, r.loss);
        assert!(host.z_loss > 0.0 && common::rel(host.z_loss, r.z_loss) <= 1e-5);
        assert!(rel_err(&per_token, &r.token_loss) <= 1e-5);
        // a non-finite token weight is found on the device and reported with its position
        let mut bad = w.clone();
        bad[8] = f32::INFINITY;
        stream.memcpy_htod(&bad, &mut d_w).unwrap();
        let w_v = d_w.as_view();
        let inputs = DeviceInputs::new(&ids_v).with_token_weights(&w_v);
        let e = loss.loss(&spec, shape, &stream, &d_l.as_view(), &inputs).unwrap().to_host(&stream).unwrap_err();
        assert!(matches!(e, Error::InvalidTokenWeight { batch: 1, position: 2, .. }), "{e}");
    }

    #[test]
    fn gpu_device_row_losses_are_f64_beyond_f32_range() {
        if !gpu_or_skip("gpu_device_row_losses_are_f64_beyond_f32_range") {
            return;
        }
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.default_stream();
        let loss = CudaLoss::new(&ctx).unwrap();
        let shape = Shape::new(2, 4, 300).unwrap();
        let (l, ids) = common::edge_of_range_logits::<f32>(71, shape);
        let (d_l, d_ids) = (stream.clone_htod(&l).unwrap(), stream.clone_htod(&ids).unwrap());
        let ids_v = d_ids.as_view();
        let out = loss.loss(&LossSpec::default(), shape, &stream, &d_l.as_view(), &DeviceInputs::new(&ids_v)).unwrap();
        let rows: Vec<f64> = stream.clone_dtoh(&out.row_loss).unwrap();
        stream.synchronize().unwrap();
        let (t, v) = (shape.seq(), shape.vocab());
        for (r, &got) in rows.iter().enumerate() {
            if r % t == t - 1 {
                assert_eq!(got, 0.0, "row {r} has no target");
                continue;
            }
            // logsumexp(z) - z[target] in float64
            let z: Vec<f64> = l[r * v..(r + 1) * v].iter().map(|&x| x as f64).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let want = m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln() - z[ids[r + 1] as usize];
            assert!(want > f32::MAX as f64 && common::rel(got, want) <= 1e-6, "row {r}: {got} vs {want}");
        }
        assert!(out.to_host(&stream).unwrap().loss.is_finite());
    }

    #[test]
    fn gpu_errors_found_on_the_device() {
        if !gpu_or_skip("gpu_errors_found_on_the_device") {
            return;
        }
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.default_stream();
        let loss = CudaLoss::new(&ctx).unwrap();
        let shape = Shape::new(2, 4, 10).unwrap();
        let (l, mut ids) = random_inputs::<f32>(1, shape, 1.0);
        ids[6] = 10;
        let d_l = stream.clone_htod(&l).unwrap();
        let d_ids = stream.clone_htod(&ids).unwrap();
        let ids_v = d_ids.as_view();
        let out = loss.loss(&LossSpec::default(), shape, &stream, &d_l.as_view(), &DeviceInputs::new(&ids_v)).unwrap();
        let e = out.to_host(&stream).unwrap_err();
        assert_eq!(e, Error::IdOutOfRange { what: "ids", batch: 1, position: 2, value: 10, vocab: 10 });
        // an id equal to ignore_index is an ignored target, not an error; under another
        // ignore_index it is one
        let mut masked = ids.clone();
        masked[6] = -100;
        let d_masked = stream.clone_htod(&masked).unwrap();
        let masked_v = d_masked.as_view();
        let inputs = DeviceInputs::new(&masked_v);
        loss.loss(&LossSpec::default(), shape, &stream, &d_l.as_view(), &inputs).unwrap().to_host(&stream).unwrap();
        let other = LossSpec::builder().ignore_index(-1).build().unwrap();
        let e = loss.loss(&other, shape, &stream, &d_l.as_view(), &inputs).unwrap().to_host(&stream).unwrap_err();
        assert_eq!(e, Error::IdOutOfRange { what: "ids", batch: 1, position: 2, value: -100, vocab: 10 });
        // checks that need no device memory fail before any launch
        let mut g = stream.alloc_zeros::<f32>(7).unwrap();
        let e = loss
            .loss_and_grad(
                &LossSpec::default(),
                shape,
                &stream,
                &d_l.as_view(),
                &DeviceInputs::new(&ids_v),
                &mut g.as_view_mut(),
            )
            .unwrap_err();
        assert!(matches!(e, Error::GradLength { expected: 80, got: 7 }), "{e}");
        let many = LossSpec::builder().keywords(0..65i64).build().unwrap();
        let shape_big = Shape::new(2, 4, 100).unwrap();
        let d_big = stream.alloc_zeros::<f32>(800).unwrap();
        let e = loss.loss(&many, shape_big, &stream, &d_big.as_view(), &DeviceInputs::new(&ids_v)).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        // NaN with check_finite: reported with its position
        let mut bad = l.clone();
        bad[13] = f32::NAN;
        let d_bad = stream.clone_htod(&bad).unwrap();
        let ok_ids: Vec<i64> = ids.iter().map(|&x| x % 10).collect();
        let d_ok = stream.clone_htod(&ok_ids).unwrap();
        let ok_v = d_ok.as_view();
        let spec = LossSpec::builder().check_finite(true).build().unwrap();
        let out = loss.loss(&spec, shape, &stream, &d_bad.as_view(), &DeviceInputs::new(&ok_v)).unwrap();
        let e = out.to_host(&stream).unwrap_err();
        assert!(matches!(e, Error::NonFinite { batch: 0, position: 1, .. }), "{e}");
        // sample weights alpha · (1 + hits) beyond f64, and a weighted mean whose sum of finite
        // weights is not: the CPU plan's error, found by the plan kernel (they were silently
        // infinite, or every w_b / Σ w 0)
        for spec in [
            LossSpec::builder().alpha(1e308).keywords([ok_ids[0]]).build().unwrap(),
            LossSpec::builder().alpha(1e308).reduction(Reduction::WeightedMean).build().unwrap(),
        ] {
            let cpu = spec.to_builder().backend(fused_weighted_loss::Backend::Cpu).build().unwrap();
            let want = cpu.loss_and_grad(shape, &l, Tokens::new(&ok_ids), Grad::Skip).unwrap_err();
            assert!(matches!(want, Error::InvalidOption { name: "alpha and the keyword weights", .. }), "{want}");
            let out = loss.loss(&spec, shape, &stream, &d_l.as_view(), &DeviceInputs::new(&ok_v)).unwrap();
            assert_eq!(out.to_host(&stream).unwrap_err(), want);
            // host buffers through the CUDA backend
            let cuda = spec.to_builder().backend(fused_weighted_loss::Backend::Cuda).build().unwrap();
            assert_eq!(cuda.loss_and_grad(shape, &l, Tokens::new(&ok_ids), Grad::Skip).unwrap_err(), want);
            // refused before anything is written: the gradient buffer and, in place, the logits
            // (the device's check came back with them, after they were written)
            let mut g = vec![f32::NAN; l.len()];
            let e = cuda.loss_and_grad(shape, &l, Tokens::new(&ok_ids), Grad::Into(&mut g)).unwrap_err();
            assert_eq!(e, want);
            assert!(g.iter().all(|x| x.is_nan()), "the gradient buffer was written");
            let mut in_place = l.clone();
            assert_eq!(cuda.loss_and_grad_in_place(shape, &mut in_place, Tokens::new(&ok_ids)).unwrap_err(), want);
            assert_eq!(in_place, l, "the logits were overwritten");
        }
    }
}

#[test]
fn gpu_auto_takes_the_gpu_where_the_kernels_load() {
    if !gpu_or_skip("gpu_auto_takes_the_gpu_where_the_kernels_load") {
        return;
    }
    // `Auto` loads the kernels to decide (a GPU they have no code for stays on the CPU); here
    // they load, so `Auto` is the GPU, and a call says so
    let spec = LossSpec::default();
    assert_eq!(spec.resolved_backend().unwrap(), fused_weighted_loss::Backend::Cuda);
    let shape = Shape::new(2, 4, 300).unwrap();
    let (l, ids) = random_inputs::<f32>(41, shape, 2.0);
    let out = spec.loss_and_grad(shape, &l, Tokens::new(&ids), Grad::Skip).unwrap();
    assert_eq!(out.backend, fused_weighted_loss::Backend::Cuda);
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_a_stream_of_another_device_is_refused() {
    if !gpu_or_skip("gpu_a_stream_of_another_device_is_refused") {
        return;
    }
    use fused_weighted_loss::cuda::cudarc::driver::CudaContext;
    use fused_weighted_loss::cuda::{CudaLoss, DeviceInputs};
    use fused_weighted_loss::Error;
    if CudaContext::device_count().unwrap() < 2 {
        eprintln!("gpu_a_stream_of_another_device_is_refused: skipped, one GPU (the case needs two)");
        return;
    }
    let (c0, c1) = (CudaContext::new(0).unwrap(), CudaContext::new(1).unwrap());
    let loss = CudaLoss::new(&c0).unwrap();
    let shape = Shape::new(2, 3, 40).unwrap();
    let (l, ids) = random_inputs::<f32>(43, shape, 2.0);
    let spec = LossSpec::default();
    // buffers and stream of device 1 with the kernels of device 0: refused before any launch
    let s1 = c1.default_stream();
    let (d_l, d_ids) = (s1.clone_htod(&l).unwrap(), s1.clone_htod(&ids).unwrap());
    let ids_v = d_ids.as_view();
    let e = loss.loss(&spec, shape, &s1, &d_l.as_view(), &DeviceInputs::new(&ids_v)).unwrap_err();
    assert!(matches!(e, Error::ContextMismatch { expected: 0, got: 1 }), "{e}");
    // the context is unharmed: the same call on device 0 runs
    let s0 = c0.default_stream();
    let (d_l, d_ids) = (s0.clone_htod(&l).unwrap(), s0.clone_htod(&ids).unwrap());
    let ids_v = d_ids.as_view();
    let out = loss.loss(&spec, shape, &s0, &d_l.as_view(), &DeviceInputs::new(&ids_v)).unwrap();
    assert!(out.to_host(&s0).unwrap().loss.is_finite());
}

#[test]
fn gpu_soft_capping_where_tanh_saturates() {
    if !gpu_or_skip("gpu_soft_capping_where_tanh_saturates") {
        return;
    }
    // every logit at 4.5..5.5 times the cap, and a band beyond 9 times it: the chain factor
    // 1 - tanh^2 taken from the rounded tanh was 2e-4 off there, and exactly 0 beyond 8.7
    // (the reference: 1e-7 .. 1e-8), for the row's largest logits
    // (and, alone, every logit at 15 to 19.5 times the cap)
    for (shape, l, ids, specs) in [common::saturating_softcap_case(), common::deep_softcap_case()] {
        for spec in specs {
            check_cuda(&spec, shape, &l, Tokens::new(&ids));
            let l16: Vec<bf16> = l.iter().map(|&x| bf16::from_f32(x)).collect();
            check_cuda(&spec, shape, &l16, Tokens::new(&ids));
        }
    }
}
