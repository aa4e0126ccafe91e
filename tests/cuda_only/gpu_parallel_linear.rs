//! The cases of `tests/gpu_parallel_linear.rs`, compiled with the `cuda` feature only.

use crate::common::linear::{expected, Case, Expected};
use crate::common::{gpu_or_skip, rel, tolerances};
use crate::shards::{run_grid, run_ranks, ThreadGroup};
use crate::through_host::ThroughHost;
use fused_weighted_loss::cuda::cudarc::driver::{CudaContext, CudaStream, CudaView, CudaViewMut};
use fused_weighted_loss::cuda::linear::{CudaLinearLoss, DeviceGrad, DeviceLinearGrads, DeviceLinearInputs};
use fused_weighted_loss::cuda::split::{DeviceCollective, DeviceSharded, DeviceSolo};
use fused_weighted_loss::cuda::DeviceInputs;
use fused_weighted_loss::parallel::VocabSlice;
use fused_weighted_loss::reference::rel_err;
use fused_weighted_loss::{
    bf16, f16, Chunking, Error, LinearShape, Logit, LossOutput, LossSpec, Reduction, Result, RowMean,
};
use std::ops::Range;
use std::sync::Arc;

/// What one rank gets back: the loss outputs and its gradients, widened to f32.
struct RankOut {
    out: LossOutput,
    dh: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

/// Rank `(samples, slice)` of `c` on its own stream: gradients in the inputs' dtype when `in_l`
/// (`d W` and `d b` added to `prior` when given), else in f32.
#[allow(clippy::too_many_arguments)]
fn run_rank<L: Logit>(
    ctx: &Arc<CudaContext>,
    c: &Case<L>,
    spec: &LossSpec,
    samples: Range<usize>,
    slice: VocabSlice,
    call: DeviceSharded<'_>,
    chunking: Chunking,
    in_l: bool,
    prior: Option<f32>,
) -> Result<RankOut> {
    let stream = ctx.new_stream().unwrap();
    let fused = CudaLinearLoss::new(ctx)?;
    let (t, h) = (c.shape.seq(), c.shape.hidden());
    let shape = match samples.len() {
        0 => LinearShape::without_samples(t, h, c.shape.vocab())?,
        b => LinearShape::new(b, t, h, c.shape.vocab())?,
    };
    let rows = samples.start * t..samples.end * t;
    let up = |x: &[L]| stream.clone_htod(x).unwrap();
    // (the per-row buffers get one element more, used through views of their rows: a rank
    // without samples has none, and CUDA allocates no zero bytes)
    let padded = |x: &[L]| stream.clone_htod(&[x, &[L::from_f32(0.0)]].concat()).unwrap();
    let (nr, nh, nw, nb) = (rows.len(), shape.rows() * h, slice.len() * h, slice.len());
    let hidden = padded(&c.hidden[rows.start * h..rows.end * h]);
    let weight = up(&c.weight[slice.start() * h..slice.end() * h]);
    let bias = c.bias.as_ref().map(|b| up(&b[slice.start()..slice.end()]));
    let ids = stream.clone_htod(&[&c.ids[rows.clone()], &[0]].concat()).unwrap();
    let labels = c.labels.as_ref().map(|l| stream.clone_htod(&[&l[rows.clone()], &[0]].concat()).unwrap());
    let weights = c.token_weights.as_ref().map(|w| stream.clone_htod(&[&w[rows.clone()], &[1.0]].concat()).unwrap());
    let fill = |n: usize| vec![prior.unwrap_or(f32::NAN); n];
    let (mut dh_l, mut dw_l, mut db_l) = (
        stream.clone_htod(&vec![L::from_f32(f32::NAN); nh + 1]).unwrap(),
        stream.clone_htod(&fill(nw).iter().map(|&x| L::from_f32(x)).collect::<Vec<_>>()).unwrap(),
        stream.clone_htod(&fill(nb).iter().map(|&x| L::from_f32(x)).collect::<Vec<_>>()).unwrap(),
    );
    let (mut dh_f, mut dw_f, mut db_f) = (
        stream.clone_htod(&vec![f32::NAN; nh + 1]).unwrap(),
        stream.clone_htod(&fill(nw)).unwrap(),
        stream.clone_htod(&fill(nb)).unwrap(),
    );
    let out = {
        let (hv, wv, iv) = (hidden.slice(..nh), weight.as_view(), ids.slice(..nr));
        let bv = bias.as_ref().map(|b| b.as_view());
        let (lv, tv) = (labels.as_ref().map(|l| l.slice(..nr)), weights.as_ref().map(|w| w.slice(..nr)));
        let mut inputs = DeviceLinearInputs::new(&hv, &wv);
        if let Some(b) = bv.as_ref() {
            inputs = inputs.with_bias(b);
        }
        let mut tokens = DeviceInputs::new(&iv);
        if let Some(l) = lv.as_ref() {
            tokens = tokens.with_labels(l);
        }
        if let Some(w) = tv.as_ref() {
            tokens = tokens.with_token_weights(w);
        }
        let (mut a, mut b, mut d) = (dh_l.slice_mut(..nh), dw_l.as_view_mut(), db_l.as_view_mut());
        let (mut e, mut f, mut g) = (dh_f.slice_mut(..nh), dw_f.as_view_mut(), db_f.as_view_mut());
        let mut grads = if in_l {
            DeviceLinearGrads::new().hidden(DeviceGrad::Into(&mut a)).weight(DeviceGrad::Into(&mut b))
        } else {
            DeviceLinearGrads::new().hidden(DeviceGrad::IntoF32(&mut e)).weight(DeviceGrad::IntoF32(&mut f))
        };
        if c.bias.is_some() {
            grads = grads.bias(if in_l { DeviceGrad::Into(&mut d) } else { DeviceGrad::IntoF32(&mut g) });
        }
        grads = grads.accumulate(prior.is_some());
        call.linear_loss_and_grad(&fused, spec, shape, &stream, &inputs, &tokens, grads, chunking)?
    };
    let out = out.loss.to_host(&stream)?;
    let widen = |x: Vec<L>| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    // no bias: no bias gradient (the NaN-filled buffer was not asked for)
    let no_bias = c.bias.is_none();
    let r = if in_l {
        RankOut {
            out,
            dh: widen(stream.clone_dtoh(&dh_l.slice(..nh)).unwrap()),
            dw: widen(stream.clone_dtoh(&dw_l).unwrap()),
            db: if no_bias { Vec::new() } else { widen(stream.clone_dtoh(&db_l).unwrap()) },
        }
    } else {
        RankOut {
            out,
            dh: stream.clone_dtoh(&dh_f.slice(..nh)).unwrap(),
            dw: stream.clone_dtoh(&dw_f).unwrap(),
            db: if no_bias { Vec::new() } else { stream.clone_dtoh(&db_f).unwrap() },
        }
    };
    stream.synchronize().unwrap();
    Ok(r)
}

/// Uneven slices: rank `k` of `ranks` gets about `(k + 1)` parts of `V`.
fn uneven(ranks: usize, v: usize) -> Vec<VocabSlice> {
    let total: usize = (1..=ranks).sum();
    let mut cuts: Vec<usize> = (0..=ranks).map(|k| v * (k * (k + 1) / 2) / total).collect();
    cuts[ranks] = v;
    cuts.windows(2).map(|w| VocabSlice::new(w[0], w[1] - w[0], v).unwrap()).collect()
}

/// Every rank of `slices` as a thread (all samples, a vocabulary group of them), as [`run_rank`].
fn vocab_ranks<L: Logit>(
    ctx: &Arc<CudaContext>,
    c: &Case<L>,
    spec: &LossSpec,
    slices: &[VocabSlice],
    chunking: Chunking,
    in_l: bool,
    prior: Option<f32>,
) -> Vec<RankOut> {
    run_ranks(slices.len(), |r, g| {
        let group = ThroughHost(g);
        let call = DeviceSharded::vocab_parallel(slices[r], &group);
        run_rank(ctx, c, spec, 0..c.shape.batch(), slices[r], call, chunking, in_l, prior).unwrap()
    })
}

/// Checks the vocabulary ranks' results against the reference: the loss on every rank (the
/// same bits), `d W` and `d b` put together from the slices, `d hidden` as the sum of the parts.
fn check_ranks(what: &str, outs: &[RankOut], e: &Expected, prior: f64, tol: (f64, f64)) {
    let (grad_tol, loss_tol) = tol;
    for (r, o) in outs.iter().enumerate() {
        crate::common::assert_outputs(&o.out, &e.out, loss_tol, &format!("{what}: rank {r}"));
        assert_eq!(o.out.loss.to_bits(), outs[0].out.loss.to_bits(), "{what}: rank {r}: the same bits on every rank");
    }
    let plus = |g: &[f64]| g.iter().map(|x| x + prior).collect::<Vec<f64>>();
    let dw: Vec<f32> = outs.iter().flat_map(|o| o.dw.clone()).collect();
    let err = rel_err(&dw, &plus(&e.dw));
    assert!(err <= grad_tol, "{what}: d W rel err {err:e}");
    let db: Vec<f32> = outs.iter().flat_map(|o| o.db.clone()).collect();
    if !db.is_empty() {
        assert_eq!(db.len(), e.db.len(), "{what}: d bias put together from the slices");
        let err = rel_err(&db, &plus(&e.db));
        assert!(err <= grad_tol, "{what}: d bias rel err {err:e}");
    }
    let mut dh = vec![0f64; outs[0].dh.len()];
    for o in outs {
        dh.iter_mut().zip(&o.dh).for_each(|(a, b)| *a += *b as f64);
    }
    let dh: Vec<f32> = dh.iter().map(|&x| x as f32).collect();
    let err = rel_err(&dh, &e.dh);
    assert!(err <= grad_tol, "{what}: d hidden (sum of the parts) rel err {err:e}");
}

fn specs() -> Vec<LossSpec> {
    vec![
        LossSpec::builder().keywords([1i64, 4]).build().unwrap(),
        LossSpec::builder()
            .keywords([2i64])
            .row_mean(RowMean::ValidTokens)
            .reduction(Reduction::WeightedMean)
            .build()
            .unwrap(),
        LossSpec::builder()
            .keywords([0i64])
            .z_loss(1e-3)
            .label_smoothing(0.1)
            .softcap(4.0)
            .reduction(Reduction::Sum)
            .build()
            .unwrap(),
    ]
}

/// `c` with some targets ignored and token weights.
fn with_tokens<L: Logit>(mut c: Case<L>) -> Case<L> {
    let mut labels = c.ids.clone();
    labels.iter_mut().enumerate().filter(|(i, _)| i % 5 == 3).for_each(|(_, y)| *y = -100);
    c.labels = Some(labels);
    c.token_weights = Some((0..c.shape.rows()).map(|i| 0.5 + (i % 3) as f32 * 0.25).collect());
    c
}

#[test]
fn gpu_linear_split_ranks_as_threads_match_the_reference() {
    if !gpu_or_skip("gpu_linear_split_ranks_as_threads_match_the_reference") {
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    let (b, t, h, v) = (2, 7, 24, 1001);
    for (i, spec) in specs().into_iter().enumerate() {
        let c = with_tokens(Case::<f32>::random(40 + i as u64, b, t, h, v, i != 1));
        let e = expected(&spec, &c);
        for ranks in 1..=4 {
            let sl = uneven(ranks, v);
            for chunking in [Chunking::Rows(3), Chunking::Auto] {
                let outs = vocab_ranks(&ctx, &c, &spec, &sl, chunking, false, None);
                let what = format!("f32, {ranks} ranks, {chunking:?}, {spec:?}");
                check_ranks(&what, &outs, &e, 0.0, tolerances(f32::DTYPE));
                if ranks == 3 && matches!(chunking, Chunking::Rows(_)) {
                    let again = vocab_ranks(&ctx, &c, &spec, &sl, chunking, false, None);
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    for (x, y) in outs.iter().zip(&again) {
                        assert_eq!(x.out, y.out, "{what}: rerun outputs");
                        assert!(
                            bits(&x.dh) == bits(&y.dh) && bits(&x.dw) == bits(&y.dw) && bits(&x.db) == bits(&y.db),
                            "{what}: rerun gradients bit-identical"
                        );
                    }
                }
            }
        }
    }
}

/// 16-bit inputs: gradients in the inputs' dtype added to a prior, and f32 gradients, in
/// several chunks (each a few logits products and exchanges) and in one.
fn sixteen_bit_gradients_accumulate<L: Logit>(seed: u64) {
    let ctx = CudaContext::new(0).unwrap();
    let (b, t, h, v) = (3, 5, 40, 5003);
    let c = with_tokens(Case::<L>::random(seed, b, t, h, v, true));
    let spec = LossSpec::builder().keywords([c.ids[3]]).z_loss(1e-4).build().unwrap();
    let e = expected(&spec, &c);
    let sl = uneven(3, v);
    let dtype = L::DTYPE;
    // a prior small against the gradients (2^-12, exact in 16 bits): one near 0.1 would round
    // most d W entries (~1e-4) away and hide a missing chunk
    let prior = 1.0 / 4096.0;
    for chunking in [Chunking::Rows(9), Chunking::Auto] {
        // chunks of 9 rows, logits products of 3: several exchanges per chunk
        let outs = vocab_ranks(&ctx, &c, &spec, &sl, chunking, true, Some(prior as f32));
        check_ranks(&format!("{dtype} gradients, accumulated, {chunking:?}"), &outs, &e, prior, tolerances(dtype));
        // the f32 gradients of 16-bit inputs: computed from the 16-bit gradient rows (the
        // products' operands), so the 16-bit bound
        let outs = vocab_ranks(&ctx, &c, &spec, &sl, chunking, false, None);
        check_ranks(&format!("{dtype} inputs, f32 gradients, {chunking:?}"), &outs, &e, 0.0, tolerances(dtype));
    }
    // no token weights, no z-loss: float16 gradient rows scaled by a power of two on each rank
    // (src/cuda/linear/scale.rs), their products by its inverse
    let mut c = c;
    c.token_weights = None;
    let spec = LossSpec::builder().keywords([c.ids[3]]).reduction(Reduction::WeightedMean).build().unwrap();
    let e = expected(&spec, &c);
    let outs = vocab_ranks(&ctx, &c, &spec, &sl, Chunking::Rows(9), true, Some(prior as f32));
    check_ranks(&format!("{dtype} gradients, no token weights, accumulated"), &outs, &e, prior, tolerances(dtype));
    let outs = vocab_ranks(&ctx, &c, &spec, &sl, Chunking::Rows(9), false, None);
    check_ranks(&format!("{dtype} inputs, no token weights, f32 gradients"), &outs, &e, 0.0, tolerances(dtype));
}

#[test]
fn gpu_linear_split_bf16_gradients_accumulate() {
    if !gpu_or_skip("gpu_linear_split_bf16_gradients_accumulate") {
        return;
    }
    sixteen_bit_gradients_accumulate::<bf16>(61);
}

#[test]
fn gpu_linear_split_f16_gradients_accumulate() {
    if !gpu_or_skip("gpu_linear_split_f16_gradients_accumulate") {
        return;
    }
    sixteen_bit_gradients_accumulate::<f16>(62);
}

#[test]
fn gpu_linear_split_grid_with_a_data_group() {
    if !gpu_or_skip("gpu_linear_split_grid_with_a_data_group") {
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    let (b, t, h, v) = (4, 6, 16, 777);
    let c = with_tokens(Case::<f32>::random(71, b, t, h, v, true));
    for reduction in [Reduction::Mean, Reduction::WeightedMean] {
        let spec = LossSpec::builder().keywords([c.ids[1], c.ids[9]]).reduction(reduction).build().unwrap();
        let e = expected(&spec, &c);
        let sl = uneven(2, v);
        // WeightedMean: data rank 0 holds no samples
        let samples = if reduction == Reduction::Mean { [0..1, 1..4] } else { [0..0, 0..4] };
        let outs = run_grid(2, 2, |d, p, vg, dg| {
            run_rank(
                &ctx,
                &c,
                &spec,
                samples[d].clone(),
                sl[p],
                DeviceSharded::vocab_parallel(sl[p], &ThroughHost(vg)).with_data_group(&ThroughHost(dg)),
                Chunking::Rows(4),
                false,
                None,
            )
            .unwrap()
        });
        let what = format!("2x2 grid, {reduction:?}");
        let (grad_tol, loss_tol) = tolerances(f32::DTYPE);
        for (r, o) in outs.iter().enumerate() {
            assert!(rel(o.out.loss, e.out.loss) <= loss_tol, "{what}: rank {r} loss {} vs {}", o.out.loss, e.out.loss);
            assert_eq!(o.out.loss.to_bits(), outs[0].out.loss.to_bits(), "{what}: the same bits on every rank");
            // per-sample losses: this data rank's samples
            let want = &e.out.per_sample_loss[samples[r / 2].clone()];
            let err = rel_err(&o.out.per_sample_loss, want);
            assert!(err <= loss_tol, "{what}: rank {r} per-sample losses: {err:e}");
        }
        // d W and d bias of each vocabulary rank's rows: the sums over the data ranks
        let summed = |p: usize, part: fn(&RankOut) -> &Vec<f32>| {
            let mut acc = vec![0f64; part(&outs[p]).len()];
            for d in 0..2 {
                acc.iter_mut().zip(part(&outs[d * 2 + p])).for_each(|(a, x)| *a += *x as f64);
            }
            acc.iter().map(|&x| x as f32).collect::<Vec<f32>>()
        };
        for (p, s) in sl.iter().enumerate() {
            let err = rel_err(&summed(p, |o| &o.dw), &e.dw[s.start() * h..s.end() * h]);
            assert!(err <= grad_tol, "{what}: d W of rank {p}'s rows: {err:e}");
            let db = summed(p, |o| &o.db);
            assert_eq!(db.len(), s.len(), "{what}: d bias of rank {p}'s rows");
            let err = rel_err(&db, &e.db[s.start()..s.end()]);
            assert!(err <= grad_tol, "{what}: d bias of rank {p}'s rows: {err:e}");
        }
        // d hidden of each data rank's rows: the sum of its vocabulary ranks' parts
        for (d, rows) in samples.iter().enumerate() {
            let parts = [&outs[d * 2].dh, &outs[d * 2 + 1].dh];
            let dh: Vec<f32> = parts[0].iter().zip(parts[1]).map(|(a, b)| a + b).collect();
            let err = rel_err(&dh, &e.dh[rows.start * t * h..rows.end * t * h]);
            assert!(err <= grad_tol, "{what}: d hidden of data rank {d}: {err:e}");
        }
    }
}

#[test]
fn gpu_linear_split_errors_are_typed() {
    if !gpu_or_skip("gpu_linear_split_errors_are_typed") {
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    let c = Case::<f32>::random(5, 2, 3, 8, 50, false);
    let spec = LossSpec::default();
    // a slice of another vocabulary
    let other = VocabSlice::new(0, 50, 51).unwrap();
    let r = run_rank(
        &ctx,
        &c,
        &spec,
        0..2,
        VocabSlice::full(50).unwrap(),
        DeviceSharded::vocab_parallel(other, &DeviceSolo),
        Chunking::Auto,
        false,
        None,
    );
    assert!(matches!(r, Err(Error::InvalidVocabSlice { .. })), "{:?}", r.err());
    // weight rows for a slice of 20 handed to a rank that holds 25
    let (s20, s25) = (VocabSlice::new(0, 20, 50).unwrap(), VocabSlice::new(0, 25, 50).unwrap());
    let r = run_rank(
        &ctx,
        &c,
        &spec,
        0..2,
        s20,
        DeviceSharded::vocab_parallel(s25, &DeviceSolo),
        Chunking::Auto,
        false,
        None,
    );
    assert!(matches!(r, Err(Error::LengthMismatch { what: "weight", .. })), "{:?}", r.err());
    // a group whose rank is out of range
    let groups = ThreadGroup::new(1);
    struct Bad<'a>(ThroughHost<'a>);
    impl DeviceCollective for Bad<'_> {
        fn rank(&self) -> usize {
            3
        }
        fn size(&self) -> usize {
            2
        }
        fn all_gather_f32(
            &self,
            s: &Arc<CudaStream>,
            a: &CudaView<'_, f32>,
            b: &mut CudaViewMut<'_, f32>,
        ) -> Result<()> {
            self.0.all_gather_f32(s, a, b)
        }
        fn all_gather_f64(
            &self,
            s: &Arc<CudaStream>,
            a: &CudaView<'_, f64>,
            b: &mut CudaViewMut<'_, f64>,
        ) -> Result<()> {
            self.0.all_gather_f64(s, a, b)
        }
    }
    let bad = Bad(ThroughHost(&groups[0]));
    let full = VocabSlice::full(50).unwrap();
    let r =
        run_rank(&ctx, &c, &spec, 0..2, full, DeviceSharded::vocab_parallel(full, &bad), Chunking::Auto, false, None);
    assert!(matches!(r, Err(Error::Collective(_))), "{:?}", r.err());
}
