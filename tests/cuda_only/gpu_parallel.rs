//! The cases of `tests/gpu_parallel.rs`, compiled with the `cuda` feature only.

use crate::common::{gpu_or_skip, rel, tolerances};
use crate::shards::{assemble, columns, run_ranks, Case};
use crate::through_host::ThroughHost;
use fused_weighted_loss::cuda::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use fused_weighted_loss::cuda::split::{CudaSharded, DeviceSharded, DeviceSolo};
use fused_weighted_loss::cuda::{CudaLoss, DeviceInputs, DeviceLossOutput};
use fused_weighted_loss::parallel::VocabSlice;
use fused_weighted_loss::reference::{reference, rel_err};
use fused_weighted_loss::synthetic;
use fused_weighted_loss::{bf16, Error, Logit, LossOutput, LossSpec, Reduction, RowMean, Shape};
use std::sync::Arc;

/// Logits, ids, labels (some ignored) and token weights from the seed.
fn case<L: Logit>(seed: u64, shape: Shape, spec: LossSpec) -> Case<L> {
    let logits = synthetic::logits::<L>(seed, shape.logits_len(), 4.0);
    let ids = synthetic::ids::<i64>(seed, shape.rows(), shape.vocab());
    let labels = ids.iter().enumerate().map(|(i, &y)| if i % 5 == 3 { -100 } else { y }).collect();
    let weights = synthetic::logits::<f32>(seed ^ 1, shape.rows(), 0.5).iter().map(|w| w + 1.0).collect();
    Case { shape, spec, logits, ids, labels, weights: Some(weights) }
}

/// A case's token inputs on the device.
struct Tokens3 {
    ids: CudaSlice<i64>,
    labels: CudaSlice<i64>,
    weights: CudaSlice<f32>,
}

impl Tokens3 {
    fn upload<L: Logit>(stream: &Arc<CudaStream>, c: &Case<L>) -> Tokens3 {
        let weights = c.weights.as_deref().unwrap_or(&[]);
        Tokens3 {
            ids: stream.clone_htod(&c.ids).unwrap(),
            labels: stream.clone_htod(&c.labels).unwrap(),
            weights: stream.clone_htod(weights).unwrap(),
        }
    }

    /// Runs `f` with these tokens as `DeviceInputs` (ids, labels, token weights).
    fn with<R>(&self, f: impl FnOnce(&DeviceInputs<'_, i64>) -> R) -> R {
        let (ids, labels, weights) = (self.ids.as_view(), self.labels.as_view(), self.weights.as_view());
        f(&DeviceInputs::new(&ids).with_labels(&labels).with_token_weights(&weights))
    }
}

fn specs() -> Vec<LossSpec> {
    vec![
        LossSpec::builder().keywords([3]).build().unwrap(),
        LossSpec::builder()
            .keywords([1])
            .row_mean(RowMean::ValidTokens)
            .reduction(Reduction::WeightedMean)
            .build()
            .unwrap(),
        LossSpec::builder().z_loss(1e-3).label_smoothing(0.1).softcap(8.0).reduction(Reduction::Sum).build().unwrap(),
    ]
}

fn device() -> (Arc<CudaContext>, Arc<CudaStream>, CudaLoss) {
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let loss = CudaLoss::new(&ctx).unwrap();
    (ctx, stream, loss)
}

/// Every rank of `slices` on one GPU, driven step by step: the ranks' statistics of a chunk go
/// into their parts of one gathered buffer, then each rank finishes the chunk. Host outputs and
/// f32 gradients (each rank's columns).
fn split_on_one_gpu<L: Logit>(c: &Case<L>, slices: &[VocabSlice], chunk: usize) -> (Vec<LossOutput>, Vec<Vec<f32>>) {
    let (_ctx, stream, loss) = device();
    let (shape, v) = (c.shape, c.shape.vocab());
    let locals: Vec<CudaSlice<L>> =
        slices.iter().map(|&s| stream.clone_htod(&columns(&c.logits, v, s)).unwrap()).collect();
    let mut grads: Vec<CudaSlice<f32>> =
        slices.iter().map(|s| stream.alloc_zeros::<f32>(shape.rows() * s.len()).unwrap()).collect();
    let toks = Tokens3::upload(&stream, c);
    let outs = toks.with(|inputs| {
        let mut steps: Vec<CudaSharded> =
            slices.iter().map(|&s| CudaSharded::new(&loss, &c.spec, shape, s, &stream, inputs).unwrap()).collect();
        let (w, p) = (steps[0].words_per_row(), slices.len());
        let mut gathered = stream.alloc_zeros::<f32>(p * chunk * w).unwrap();
        for r0 in (0..shape.rows()).step_by(chunk) {
            let r = r0..(r0 + chunk).min(shape.rows());
            let n = r.len() * w;
            for (k, st) in steps.iter().enumerate() {
                let len = slices[k].len();
                let x = locals[k].slice(r.start * len..r.end * len);
                st.partials(&stream, r.clone(), &x, &mut gathered.slice_mut(k * n..(k + 1) * n)).unwrap();
            }
            for (k, st) in steps.iter_mut().enumerate() {
                let span = r.start * slices[k].len()..r.end * slices[k].len();
                let (x, all) = (locals[k].slice(span.clone()), gathered.slice(..p * n));
                st.finish_rows_grad(&stream, r.clone(), &all, &x, &mut grads[k].slice_mut(span)).unwrap();
            }
        }
        steps.into_iter().map(|st| st.finish(&stream).unwrap().to_host(&stream).unwrap()).collect::<Vec<_>>()
    });
    let grads = grads.iter().map(|g| stream.clone_dtoh(g).unwrap()).collect();
    stream.synchronize().unwrap();
    (outs, grads)
}

#[test]
fn gpu_split_ranks_on_one_device_match_the_reference() {
    if !gpu_or_skip("gpu_split_ranks_on_one_device_match_the_reference") {
        return;
    }
    for (i, spec) in specs().into_iter().enumerate() {
        let shape = Shape::new(3, 9, 5003).unwrap();
        let c = case::<f32>(7 + i as u64, shape, spec);
        let r = reference(&c.spec, shape, &c.logits, c.tokens()).unwrap();
        let (gt, lt) = tolerances(<f32 as Logit>::DTYPE);
        for (ranks, chunk) in [(1, 27), (2, 5), (3, 1), (5, 8)] {
            let slices: Vec<VocabSlice> = (0..ranks).map(|k| VocabSlice::even(k, ranks, 5003).unwrap()).collect();
            let (outs, grads) = split_on_one_gpu(&c, &slices, chunk);
            let what = format!("{ranks} ranks, chunks of {chunk}, {:?}", c.spec);
            for o in &outs {
                assert!(rel(o.loss, r.loss) <= lt, "{what}: loss {} vs {}", o.loss, r.loss);
                assert_eq!(o.loss.to_bits(), outs[0].loss.to_bits(), "{what}: every rank the same bits");
                assert_eq!(o.per_sample_loss, outs[0].per_sample_loss, "{what}: per-sample");
            }
            let e = rel_err(&assemble(&grads, &slices, shape.rows(), 5003), &r.grad);
            assert!(e <= gt, "{what}: gradient rel err {e:e}");
            // a rerun: the same bits
            let (again, g2) = split_on_one_gpu(&c, &slices, chunk);
            assert_eq!(again, outs, "{what}: rerun");
            assert!(grads.iter().zip(&g2).all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())));
        }
    }
}

#[test]
fn gpu_split_confident_rows_keep_the_accuracy_of_small_losses() {
    if !gpu_or_skip("gpu_split_confident_rows_keep_the_accuracy_of_small_losses") {
        return;
    }
    // Every target 20 above logits in [-1, 1]: the rank that holds it leaves it out of its sum,
    // so the merged sum is the others' and the small loss (about 1e-4) keeps f32 accuracy
    let shape = Shape::new(2, 6, 5003).unwrap();
    for spec in [LossSpec::default(), LossSpec::builder().softcap(60.0).z_loss(1e-4).build().unwrap()] {
        let mut c = case::<f32>(41, shape, spec);
        c.logits = synthetic::logits::<f32>(41, shape.logits_len(), 1.0);
        for r in 0..shape.rows() {
            if (r + 1) % shape.seq() != 0 && c.labels[r + 1] >= 0 {
                c.logits[r * 5003 + c.labels[r + 1] as usize] = 20.0;
            }
        }
        let r = reference(&c.spec, shape, &c.logits, c.tokens()).unwrap();
        for ranks in [1, 3, 4] {
            let slices: Vec<VocabSlice> = (0..ranks).map(|k| VocabSlice::even(k, ranks, 5003).unwrap()).collect();
            let (outs, grads) = split_on_one_gpu(&c, &slices, 4);
            let what = format!("{ranks} ranks, {:?}", c.spec);
            for o in &outs {
                assert!(rel(o.loss, r.loss) <= 1e-5, "{what}: loss {} vs {}", o.loss, r.loss);
                let e = rel_err(&o.per_sample_loss, &r.per_sample_loss);
                assert!(e <= 1e-5, "{what}: per-sample rel err {e:e}");
            }
            let e = rel_err(&assemble(&grads, &slices, shape.rows(), 5003), &r.grad);
            assert!(e <= 1e-5, "{what}: gradient rel err {e:e}");
        }
    }
}

#[test]
fn gpu_split_label_smoothing_under_a_large_common_offset() {
    if !gpu_or_skip("gpu_split_label_smoothing_under_a_large_common_offset") {
        return;
    }
    // Each rank sends its slice's sum of (z - max) and its length; the merge moves the sums to
    // the row's maximum, so an offset of 1e6 cancels nothing (uneven slices: different lengths)
    let shape = Shape::new(2, 5, 3001).unwrap();
    let spec = LossSpec::builder().label_smoothing(0.1).keywords([2]).build().unwrap();
    let mut c = case::<f32>(31, shape, spec);
    c.logits.iter_mut().for_each(|z| *z += 1e6);
    let r = reference(&c.spec, shape, &c.logits, c.tokens()).unwrap();
    let slices = [(0, 1000), (1000, 1), (1001, 2000)].map(|(s, n)| VocabSlice::new(s, n, 3001).unwrap());
    let (outs, grads) = split_on_one_gpu(&c, &slices, 4);
    for o in &outs {
        assert!(rel(o.loss, r.loss) <= 1e-5, "loss {} vs {}", o.loss, r.loss);
        assert!(rel_err(&o.per_sample_loss, &r.per_sample_loss) <= 1e-5);
    }
    let e = rel_err(&assemble(&grads, &slices, shape.rows(), 3001), &r.grad);
    assert!(e <= 1e-5, "gradient rel err {e:e}");
}

#[test]
fn gpu_split_bf16_and_slices_without_targets() {
    if !gpu_or_skip("gpu_split_bf16_and_slices_without_targets") {
        return;
    }
    let shape = Shape::new(2, 17, 32_000).unwrap();
    let mut c = case::<bf16>(99, shape, LossSpec::builder().keywords([5]).build().unwrap());
    // every target in the first 1000 ids: ranks 1.. own none
    c.ids.iter_mut().for_each(|y| *y %= 1000);
    c.labels = c.ids.clone();
    let r = reference(&c.spec, shape, &c.logits, c.tokens()).unwrap();
    let slices: Vec<VocabSlice> = (0..4).map(|k| VocabSlice::even(k, 4, 32_000).unwrap()).collect();
    let (outs, grads) = split_on_one_gpu(&c, &slices, 6);
    let (_, lt) = tolerances(bf16::DTYPE);
    assert!(rel(outs[3].loss, r.loss) <= lt);
    // an f32 gradient of bf16 logits is computed in f32: the f32 bound
    let e = rel_err(&assemble(&grads, &slices, shape.rows(), 32_000), &r.grad);
    assert!(e <= 1e-5, "bf16 logits, f32 gradient: rel err {e:e}");
}

#[test]
fn gpu_one_call_group_of_one_matches_the_unsharded_kernels() {
    if !gpu_or_skip("gpu_one_call_group_of_one_matches_the_unsharded_kernels") {
        return;
    }
    let (_ctx, stream, loss) = device();
    for spec in specs() {
        let shape = Shape::new(4, 33, 50_000).unwrap();
        let c = case::<bf16>(5, shape, spec);
        let d_l = stream.clone_htod(&c.logits).unwrap();
        let toks = Tokens3::upload(&stream, &c);
        toks.with(|inputs| {
            let mut g1 = stream.alloc_zeros::<f32>(shape.logits_len()).unwrap();
            let mut g2 = stream.alloc_zeros::<f32>(shape.logits_len()).unwrap();
            let whole =
                loss.loss_and_grad(&c.spec, shape, &stream, &d_l.as_view(), inputs, &mut g1.as_view_mut()).unwrap();
            let slice = VocabSlice::full(50_000).unwrap();
            let split = DeviceSharded::vocab_parallel(slice, &DeviceSolo).with_chunk_rows(10);
            let out = split
                .loss_and_grad(&loss, &c.spec, shape, &stream, &d_l.as_view(), inputs, &mut g2.as_view_mut())
                .unwrap();
            // the whole vocabulary on a group of one: the one-device kernel, the same bits
            let (a, b) = (whole.to_host(&stream).unwrap(), out.to_host(&stream).unwrap());
            assert_eq!(a, b, "{:?}", c.spec);
            let (h1, h2) = (stream.clone_dtoh(&g1).unwrap(), stream.clone_dtoh(&g2).unwrap());
            stream.synchronize().unwrap();
            assert!(h1.iter().zip(&h2).all(|(x, y)| x.to_bits() == y.to_bits()), "{:?}: gradient bits", c.spec);
            // in place and loss only: the same loss
            let mut d_in = stream.clone_htod(&c.logits).unwrap();
            let ip =
                split.loss_and_grad_in_place(&loss, &c.spec, shape, &stream, &mut d_in.as_view_mut(), inputs).unwrap();
            let lo = split.loss(&loss, &c.spec, shape, &stream, &d_l.as_view(), inputs).unwrap();
            assert_eq!(ip.to_host(&stream).unwrap().loss.to_bits(), b.loss.to_bits());
            assert_eq!(lo.to_host(&stream).unwrap().loss.to_bits(), b.loss.to_bits());
            // the split's kernels chunk by chunk all the same (what `bench-split` times): the
            // same loss and gradient to rounding
            let steps = split.with_split_steps();
            let s = steps
                .loss_and_grad(&loss, &c.spec, shape, &stream, &d_l.as_view(), inputs, &mut g2.as_view_mut())
                .unwrap()
                .to_host(&stream)
                .unwrap();
            let close = (s.loss - a.loss).abs() <= 1e-5 * a.loss.abs();
            assert!(s.loss.is_finite() && close, "{:?}: split steps' loss {} vs {}", c.spec, s.loss, a.loss);
            let h3 = stream.clone_dtoh(&g2).unwrap();
            stream.synchronize().unwrap();
            let e = rel_err(&h3, &h1);
            assert!(e <= 1e-5, "{:?}: split steps' gradient rel err {e:e}", c.spec);
        });
    }
}

/// Two data-parallel ranks holding `parts` (each with the whole vocabulary) through the steps on
/// one device, their batch totals gathered by hand: each rank's output (its loss not yet
/// combined) and f32 gradient.
fn data_steps(
    loss: &CudaLoss,
    stream: &Arc<CudaStream>,
    spec: &LossSpec,
    parts: &[Case<f32>],
) -> (Vec<DeviceLossOutput>, Vec<CudaSlice<f32>>) {
    let v = parts[0].shape.vocab();
    let d_l: Vec<_> = parts.iter().map(|p| stream.clone_htod(&p.logits).unwrap()).collect();
    let toks: Vec<Tokens3> = parts.iter().map(|p| Tokens3::upload(stream, p)).collect();
    let slice = VocabSlice::full(v).unwrap();
    toks[0].with(|i0| {
        toks[1].with(|i1| {
            let mut steps: Vec<CudaSharded> = [i0, i1]
                .iter()
                .zip(parts)
                .map(|(inputs, p)| CudaSharded::new(loss, spec, p.shape, slice, stream, inputs).unwrap())
                .collect();
            let mut totals = stream.alloc_zeros::<f64>(4).unwrap();
            for (d, st) in steps.iter().enumerate() {
                st.batch_totals(stream, &mut totals.slice_mut(2 * d..2 * d + 2)).unwrap();
            }
            let mut grads = Vec::new();
            let mut outs = Vec::new();
            for (d, mut st) in steps.drain(..).enumerate() {
                st.set_batch_totals(stream, &totals.as_view()).unwrap();
                let rows = parts[d].shape.rows();
                let mut part_buf = stream.alloc_zeros::<f32>(st.partials_len(rows)).unwrap();
                st.partials(stream, 0..rows, &d_l[d].as_view(), &mut part_buf.as_view_mut()).unwrap();
                let mut g = stream.alloc_zeros::<f32>(rows * v).unwrap();
                st.finish_rows_grad(stream, 0..rows, &part_buf.as_view(), &d_l[d].as_view(), &mut g.as_view_mut())
                    .unwrap();
                outs.push(st.finish(stream).unwrap());
                grads.push(g);
            }
            (outs, grads)
        })
    })
}

#[test]
fn gpu_data_parallel_steps_match_the_concatenated_batch() {
    if !gpu_or_skip("gpu_data_parallel_steps_match_the_concatenated_batch") {
        return;
    }
    let (_ctx, stream, loss) = device();
    let shape = Shape::new(3, 11, 3001).unwrap();
    for reduction in [Reduction::Mean, Reduction::WeightedMean, Reduction::Sum] {
        let spec = LossSpec::builder().keywords([2, 7]).reduction(reduction).z_loss(1e-4).build().unwrap();
        let c = case::<f32>(17, shape, spec);
        let r = reference(&c.spec, shape, &c.logits, c.tokens()).unwrap();
        let splits = [0usize, 1, 3];
        let parts: Vec<Case<f32>> = (0..2).map(|d| c.samples(splits[d], splits[d + 1])).collect();
        let (mut outs, grads) = data_steps(&loss, &stream, &c.spec, &parts);
        let mut shares = stream.alloc_zeros::<f64>(4).unwrap();
        for (d, o) in outs.iter().enumerate() {
            CudaSharded::loss_totals(o, &stream, &mut shares.slice_mut(2 * d..2 * d + 2)).unwrap();
        }
        let mut g_all = Vec::new();
        for (o, g) in outs.iter_mut().zip(&grads) {
            CudaSharded::combine_loss(&loss, o, &stream, &shares.as_view()).unwrap();
            g_all.extend(stream.clone_dtoh(g).unwrap());
        }
        for o in &outs {
            let h = o.to_host(&stream).unwrap();
            assert!(rel(h.loss, r.loss) <= 1e-5, "{reduction:?}: loss {} vs {}", h.loss, r.loss);
            assert!(rel(h.z_loss, r.z_loss) <= 1e-5, "{reduction:?}: z-loss");
        }
        stream.synchronize().unwrap();
        assert!(rel_err(&g_all, &r.grad) <= 1e-5, "{reduction:?}: gradient");
    }
}

#[test]
fn gpu_data_parallel_weight_sum_beyond_f64_is_reported_on_every_rank() {
    if !gpu_or_skip("gpu_data_parallel_weight_sum_beyond_f64_is_reported_on_every_rank") {
        return;
    }
    // two ranks of one sample each, weight alpha = 1e308: each rank's sum is finite, the
    // group's is not (every w_b / sum would be 0): every rank's check reports it, as the host
    // split does; with alpha = 1e307 the group's sum is finite and nothing is reported
    let (_ctx, stream, loss) = device();
    let shape = Shape::new(2, 9, 500).unwrap();
    for (alpha, overflows) in [(1e308, true), (1e307, false)] {
        let spec = LossSpec::builder().alpha(alpha).reduction(Reduction::WeightedMean).build().unwrap();
        let c = case::<f32>(23, shape, spec);
        let parts: Vec<Case<f32>> = (0..2).map(|d| c.samples(d, d + 1)).collect();
        let (outs, _grads) = data_steps(&loss, &stream, &c.spec, &parts);
        let checks: Vec<_> = outs.iter().map(|o| o.check(&stream)).collect();
        for (d, got) in checks.iter().enumerate() {
            if overflows {
                assert!(
                    matches!(got, Err(Error::InvalidOption { name: "alpha and the keyword weights", value, .. })
                        if value.is_infinite()),
                    "rank {d}: {got:?}"
                );
            } else {
                assert!(got.is_ok(), "alpha {alpha}, rank {d}: {got:?}");
            }
        }
    }
}

#[test]
fn gpu_data_parallel_one_call_matches_the_concatenated_batch() {
    if !gpu_or_skip("gpu_data_parallel_one_call_matches_the_concatenated_batch") {
        return;
    }
    // DeviceSharded::data_parallel: each rank (a thread with its own stream) holds some samples
    // with the whole vocabulary and runs the one-device pass with the data group's denominators
    let ctx = CudaContext::new(0).unwrap();
    let loss = CudaLoss::new(&ctx).unwrap();
    let shape = Shape::new(4, 9, 5003).unwrap();
    let v = shape.vocab();
    for reduction in [Reduction::Mean, Reduction::WeightedMean, Reduction::Sum] {
        let spec = LossSpec::builder().keywords([2, 7]).reduction(reduction).z_loss(1e-4).label_smoothing(0.05).build();
        let c = case::<f32>(23, shape, spec.unwrap());
        let r = reference(&c.spec, shape, &c.logits, c.tokens()).unwrap();
        let splits = [0usize, 1, 4];
        let outs = run_ranks(2, |d, g| {
            let part = c.samples(splits[d], splits[d + 1]);
            let stream = ctx.new_stream().unwrap();
            let d_l = stream.clone_htod(&part.logits).unwrap();
            let toks = Tokens3::upload(&stream, &part);
            let mut grad = stream.alloc_zeros::<f32>(part.shape.logits_len()).unwrap();
            let group = ThroughHost(g);
            let out = toks.with(|inputs| {
                let call = DeviceSharded::data_parallel(v, &group).unwrap();
                call.loss_and_grad(&loss, &c.spec, part.shape, &stream, &d_l.as_view(), inputs, &mut grad.as_view_mut())
                    .unwrap()
            });
            let host = out.to_host(&stream).unwrap();
            (host, stream.clone_dtoh(&grad).unwrap())
        });
        let what = format!("{reduction:?}");
        for (d, (o, _)) in outs.iter().enumerate() {
            assert!(rel(o.loss, r.loss) <= 1e-5, "{what}: rank {d} loss {} vs {}", o.loss, r.loss);
            assert!(rel(o.z_loss, r.z_loss) <= 1e-5, "{what}: rank {d} z-loss");
            assert_eq!(o.loss.to_bits(), outs[0].0.loss.to_bits(), "{what}: the same bits on every rank");
            let want = &r.per_sample_loss[splits[d]..splits[d + 1]];
            assert!(rel_err(&o.per_sample_loss, want) <= 1e-5, "{what}: rank {d} per-sample losses");
        }
        let g: Vec<f32> = outs.iter().flat_map(|(_, g)| g.iter().copied()).collect();
        let e = rel_err(&g, &r.grad);
        assert!(e <= 1e-5, "{what}: gradient rel err {e:e}");
    }
}

/// A rank's logits, ids, labels and token weights on the device, each one element longer than
/// the part (CUDA allocates no zero bytes: a rank without samples still gets buffers, of which
/// it passes empty views).
struct Padded {
    logits: CudaSlice<f32>,
    ids: CudaSlice<i64>,
    labels: CudaSlice<i64>,
    weights: CudaSlice<f32>,
}

fn upload_padded(stream: &Arc<CudaStream>, part: &Case<f32>) -> Padded {
    let pad = |v: &[f32]| [v, &[0.5]].concat();
    let pad_ids = |v: &[i64]| [v, &[0]].concat();
    Padded {
        logits: stream.clone_htod(&pad(&part.logits)).unwrap(),
        ids: stream.clone_htod(&pad_ids(&part.ids)).unwrap(),
        labels: stream.clone_htod(&pad_ids(&part.labels)).unwrap(),
        weights: stream.clone_htod(&pad(part.weights.as_deref().unwrap())).unwrap(),
    }
}

/// A data rank without samples (`Shape::without_samples`): it gets the whole batch's loss, the
/// same bits as its peers, and no per-sample outputs; its peers the gradient of the
/// concatenated batch. (Its device buffers are empty views of one-element allocations: CUDA
/// allocates no zero bytes.)
#[test]
fn gpu_data_parallel_rank_without_samples() {
    if !gpu_or_skip("gpu_data_parallel_rank_without_samples") {
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    let loss = CudaLoss::new(&ctx).unwrap();
    let shape = Shape::new(3, 7, 1001).unwrap();
    let v = shape.vocab();
    let spec = LossSpec::builder().keywords([2, 7]).reduction(Reduction::WeightedMean).z_loss(1e-4).build().unwrap();
    let c = case::<f32>(29, shape, spec);
    let r = reference(&c.spec, shape, &c.logits, c.tokens()).unwrap();
    for splits in [[0usize, 0, 1, 3], [0, 2, 2, 3], [0, 3, 3, 3]] {
        let outs = run_ranks(3, |d, g| {
            let part = c.samples(splits[d], splits[d + 1]);
            let stream = ctx.new_stream().unwrap();
            let n = part.shape.logits_len();
            let d = upload_padded(&stream, &part);
            let rows = part.ids.len();
            let mut grad = stream.alloc_zeros::<f32>(n + 1).unwrap();
            let group = ThroughHost(g);
            // (the reference's tokens: ids, labels with ignored targets, token weights)
            let (ids, labels, weights) = (d.ids.slice(..rows), d.labels.slice(..rows), d.weights.slice(..rows));
            let inputs = DeviceInputs::new(&ids).with_labels(&labels).with_token_weights(&weights);
            let call = DeviceSharded::data_parallel(v, &group).unwrap();
            let out = call
                .loss_and_grad(
                    &loss,
                    &c.spec,
                    part.shape,
                    &stream,
                    &d.logits.slice(..n),
                    &inputs,
                    &mut grad.slice_mut(..n),
                )
                .unwrap();
            let host = out.to_host(&stream).unwrap();
            let mut g = stream.clone_dtoh(&grad).unwrap();
            g.truncate(n);
            (host, g)
        });
        let what = format!("splits {splits:?}");
        for (d, (o, _)) in outs.iter().enumerate() {
            assert!(rel(o.loss, r.loss) <= 1e-5, "{what}: rank {d} loss {} vs {}", o.loss, r.loss);
            assert!(rel(o.z_loss, r.z_loss) <= 1e-5, "{what}: rank {d} z-loss");
            assert_eq!(o.loss.to_bits(), outs[0].0.loss.to_bits(), "{what}: the same bits on every rank");
            assert_eq!(o.weights.len(), splits[d + 1] - splits[d], "{what}: rank {d}: its samples' weights");
        }
        let g: Vec<f32> = outs.iter().flat_map(|(_, g)| g.iter().copied()).collect();
        let e = rel_err(&g, &r.grad);
        assert!(e <= 1e-5, "{what}: gradient rel err {e:e}");
    }
    // every rank empty: an error on each, none waits
    let empty = Shape::without_samples(7, v).unwrap();
    let errs = run_ranks(2, |_, g| {
        let stream = ctx.new_stream().unwrap();
        let one = stream.alloc_zeros::<f32>(1).unwrap();
        let ids = stream.alloc_zeros::<i64>(1).unwrap();
        let ids_view = ids.slice(..0);
        let group = ThroughHost(g);
        let call = DeviceSharded::data_parallel(v, &group).unwrap();
        call.loss(&loss, &c.spec, empty, &stream, &one.slice(..0), &DeviceInputs::new(&ids_view)).map(|_| ())
    });
    assert!(errs.iter().all(|e| matches!(e, Err(fused_weighted_loss::Error::EmptyDataGroup))), "{errs:?}");
    // the peers' weighted-mean sum beyond f64 (one sample of weight 1e308 on each of two ranks,
    // none on the third): every rank's check reports it, the empty one's too
    let big = LossSpec::builder().alpha(1e308).reduction(Reduction::WeightedMean).build().unwrap();
    let two = case::<f32>(31, Shape::new(2, 7, v).unwrap(), big.clone());
    let splits = [0usize, 1, 1, 2];
    let checks = run_ranks(3, |d, g| {
        let part = two.samples(splits[d], splits[d + 1]);
        let stream = ctx.new_stream().unwrap();
        let n = part.shape.logits_len();
        let d = upload_padded(&stream, &part);
        let ids_view = d.ids.slice(..part.ids.len());
        let group = ThroughHost(g);
        let call = DeviceSharded::data_parallel(v, &group).unwrap();
        let out =
            call.loss(&loss, &big, part.shape, &stream, &d.logits.slice(..n), &DeviceInputs::new(&ids_view)).unwrap();
        out.check(&stream)
    });
    for (d, got) in checks.iter().enumerate() {
        assert!(
            matches!(got, Err(Error::InvalidOption { name: "alpha and the keyword weights", value, .. })
                if value.is_infinite()),
            "rank {d}: {got:?}"
        );
    }
}

#[cfg(feature = "nccl")]
mod nccl {
    use super::*;
    use fused_weighted_loss::cuda::nccl::{nccl_status, NcclGroup, NcclId};
    use fused_weighted_loss::cuda::split::DeviceCollective;
    use fused_weighted_loss::Error;

    /// Whether NCCL can be used; without it the test skips, or fails with `FWL_REQUIRE_CUDA=1`.
    fn nccl_or_skip(test: &str) -> bool {
        if !gpu_or_skip(test) {
            return false;
        }
        match nccl_status() {
            Ok(_) => true,
            Err(why) if std::env::var("FWL_REQUIRE_CUDA").as_deref() == Ok("1") => {
                panic!("{test}: FWL_REQUIRE_CUDA=1 but NCCL is not usable: {why}")
            }
            Err(why) => {
                eprintln!("{test}: skipped, no NCCL ({why})");
                false
            }
        }
    }

    /// Runs everywhere: without NCCL (or without a driver) every entry point is a typed error.
    #[test]
    fn missing_nccl_is_a_typed_error_not_a_panic() {
        match nccl_status() {
            Ok(version) => {
                eprintln!("NCCL {version} found");
                assert!(version > 0);
                assert!(NcclId::new().is_ok());
            }
            Err(why) => {
                eprintln!("{why}: checking that every entry point says so");
                assert!(matches!(NcclId::new(), Err(Error::BackendUnavailable { .. })));
                // a context needs a driver (cudarc panics without one: ask first)
                if fused_weighted_loss::cuda_status().is_ok() {
                    let ctx = CudaContext::new(0).unwrap();
                    assert!(matches!(NcclGroup::single(&ctx), Err(Error::BackendUnavailable { .. })));
                }
            }
        }
    }

    #[test]
    fn gpu_nccl_group_of_one() {
        if !nccl_or_skip("gpu_nccl_group_of_one") {
            return;
        }
        let (ctx, stream, loss) = device();
        let group = NcclGroup::single(&ctx).unwrap();
        assert_eq!((group.rank(), group.size()), (0, 1));
        // the all-gather itself
        let send = stream.clone_htod(&[1.5f64, -2.0]).unwrap();
        let mut recv = stream.alloc_zeros::<f64>(2).unwrap();
        group.all_gather_f64(&stream, &send.as_view(), &mut recv.as_view_mut()).unwrap();
        assert_eq!(stream.clone_dtoh(&recv).unwrap(), [1.5, -2.0]);
        // the split's steps with their exchange through NCCL (a group of one still calls it)
        let shape = Shape::new(2, 13, 7000).unwrap();
        let c = case::<f32>(3, shape, specs().remove(2));
        let r = reference(&c.spec, shape, &c.logits, c.tokens()).unwrap();
        let d_l = stream.clone_htod(&c.logits).unwrap();
        let toks = Tokens3::upload(&stream, &c);
        let slice = VocabSlice::full(7000).unwrap();
        toks.with(|inputs| {
            let mut st = CudaSharded::new(&loss, &c.spec, shape, slice, &stream, inputs).unwrap();
            let rows = 0..shape.rows();
            let mut part = stream.alloc_zeros::<f32>(st.partials_len(rows.len())).unwrap();
            let mut all = stream.alloc_zeros::<f32>(st.partials_len(rows.len())).unwrap();
            let mut g = stream.alloc_zeros::<f32>(shape.logits_len()).unwrap();
            st.partials(&stream, rows.clone(), &d_l.as_view(), &mut part.as_view_mut()).unwrap();
            group.all_gather_f32(&stream, &part.as_view(), &mut all.as_view_mut()).unwrap();
            st.finish_rows_grad(&stream, rows, &all.as_view(), &d_l.as_view(), &mut g.as_view_mut()).unwrap();
            let out = st.finish(&stream).unwrap().to_host(&stream).unwrap();
            assert!(rel(out.loss, r.loss) <= 1e-5, "loss {} vs {}", out.loss, r.loss);
            let e = rel_err(&stream.clone_dtoh(&g).unwrap(), &r.grad);
            assert!(e <= 1e-5, "gradient rel err {e:e}");
        });
    }

    /// One rank per GPU (up to 4) when the machine has two or more.
    #[test]
    fn gpu_nccl_one_rank_per_device() {
        if !nccl_or_skip("gpu_nccl_one_rank_per_device") {
            return;
        }
        let count = CudaContext::device_count().unwrap().max(0) as usize;
        if count < 2 {
            eprintln!("gpu_nccl_one_rank_per_device: skipped, {count} GPU (NCCL needs one per rank)");
            return;
        }
        let ranks = count.min(4);
        let shape = Shape::new(2, 9, 20_011).unwrap();
        let c = case::<f32>(41, shape, specs().remove(1));
        let r = reference(&c.spec, shape, &c.logits, c.tokens()).unwrap();
        let slices: Vec<VocabSlice> = (0..ranks).map(|k| VocabSlice::even(k, ranks, 20_011).unwrap()).collect();
        let id = NcclId::new().unwrap().to_bytes();
        let results: Vec<(f64, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..ranks)
                .map(|k| {
                    let (c, slices) = (&c, &slices);
                    s.spawn(move || {
                        let ctx = CudaContext::new(k).unwrap();
                        let stream = ctx.new_stream().unwrap();
                        let loss = CudaLoss::new(&ctx).unwrap();
                        let group = NcclGroup::new(&ctx, &NcclId::from_bytes(id), k, ranks).unwrap();
                        let d_l = stream.clone_htod(&columns(&c.logits, 20_011, slices[k])).unwrap();
                        let toks = Tokens3::upload(&stream, c);
                        let mut g = stream.alloc_zeros::<f32>(shape.rows() * slices[k].len()).unwrap();
                        let call = DeviceSharded::vocab_parallel(slices[k], &group).with_chunk_rows(5);
                        let out = toks.with(|inputs| {
                            let x = d_l.as_view();
                            call.loss_and_grad(&loss, &c.spec, shape, &stream, &x, inputs, &mut g.as_view_mut())
                        });
                        let out = out.unwrap();
                        let host = out.to_host(&stream).unwrap();
                        let g = stream.clone_dtoh(&g).unwrap();
                        stream.synchronize().unwrap();
                        (host.loss, g)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (l, _) in &results {
            assert!(rel(*l, r.loss) <= 1e-5);
            assert_eq!(l.to_bits(), results[0].0.to_bits(), "every rank the same bits");
        }
        let grads: Vec<Vec<f32>> = results.into_iter().map(|(_, g)| g).collect();
        assert!(rel_err(&assemble(&grads, &slices, shape.rows(), 20_011), &r.grad) <= 1e-5);
    }
}

#[test]
fn gpu_check_tiling_finds_gaps_and_overlaps() {
    if !gpu_or_skip("gpu_check_tiling_finds_gaps_and_overlaps") {
        return;
    }
    // DeviceSharded::check_tiling: one all-gather of every rank's (start, len) (ranks as threads,
    // each with its own stream), the same answer on every rank
    let ctx = CudaContext::new(0).unwrap();
    let v = 100;
    let s = |start, len| VocabSlice::new(start, len, v).unwrap();
    let cases: [(&str, Vec<VocabSlice>, bool); 4] = [
        ("rank order", vec![s(0, 30), s(30, 50), s(80, 20)], true),
        ("any order", vec![s(70, 30), s(0, 45), s(45, 25)], true),
        ("an overlap", vec![s(0, 40), s(30, 50), s(80, 20)], false),
        ("a gap", vec![s(0, 30), s(31, 49), s(80, 20)], false),
    ];
    for (what, slices, tiles) in cases {
        let results = run_ranks(slices.len(), |r, g| {
            let stream = ctx.new_stream().unwrap();
            let group = ThroughHost(g);
            DeviceSharded::vocab_parallel(slices[r], &group).check_tiling(&stream)
        });
        for (r, res) in results.iter().enumerate() {
            if tiles {
                assert!(res.is_ok(), "{what}: rank {r}: {res:?}");
            } else {
                match res {
                    Err(Error::SlicesDoNotTile { vocab, slices: got }) => {
                        assert_eq!(*vocab, v, "{what}");
                        let want: Vec<(usize, usize)> = slices.iter().map(|x| (x.start(), x.len())).collect();
                        assert_eq!(got, &want, "{what}: every rank's slice in rank order");
                    }
                    other => panic!("{what}: rank {r}: {other:?}"),
                }
            }
        }
    }
    // a group of one must hold the whole vocabulary: refused by check_tiling and by every call
    let (_ctx, stream, loss) = device();
    assert!(DeviceSharded::vocab_parallel(s(0, v), &DeviceSolo).check_tiling(&stream).is_ok());
    let part = DeviceSharded::vocab_parallel(s(0, 60), &DeviceSolo);
    assert!(matches!(part.check_tiling(&stream), Err(Error::SlicesDoNotTile { .. })));
    let shape = Shape::new(2, 5, v).unwrap();
    let c = case::<f32>(3, shape, LossSpec::default());
    let d_l = stream.clone_htod(&columns(&c.logits, v, s(0, 60))).unwrap();
    let toks = Tokens3::upload(&stream, &c);
    let r = toks.with(|inputs| part.loss(&loss, &c.spec, shape, &stream, &d_l.as_view(), inputs));
    assert!(matches!(r, Err(Error::SlicesDoNotTile { .. })), "{:?}", r.err());
}
