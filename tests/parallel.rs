//! Vocabulary-parallel, data-parallel and 2-D sharded calls against the unsharded result, with
//! ranks simulated as threads exchanging through memory: 1 to 8 ranks, uneven slices, slices
//! that own no target, ignored labels, every row mean, reduction and option; equal within 1e-6
//! relative, the same bits on every rank and on every rerun.

mod common;
#[path = "common/shards.rs"]
mod shards;

use common::rel;
use fused_weighted_loss::parallel::{check_tiling, Sharded, ShardedLoss, Solo, VocabSlice};
use fused_weighted_loss::reference::rel_err;
use fused_weighted_loss::synthetic::{self, Rng};
use fused_weighted_loss::{bf16, Error, Grad, Logit, LossOutput, LossSpec, Reduction, RowMean, Shape, Tokens};
use shards::{assemble, columns, random_slices, random_splits, run_grid, run_ranks, Case, ThreadGroup};

/// A random case: shape, options, reductions, ignored labels and token weights from the seed.
fn random_case<L: Logit>(seed: u64, min_vocab: usize) -> Case<L> {
    let mut rng = Rng::new(seed);
    let (b, t) = (1 + rng.below(3) as usize, 2 + rng.below(5) as usize);
    let v = min_vocab + rng.below(3000) as usize;
    let shape = Shape::new(b, t, v).unwrap();
    let pick = |rng: &mut Rng, n: u64| rng.below(n);
    let spec = LossSpec::builder()
        .keywords([rng.below(v as u64) as i64, 1])
        .alpha([1.0, 0.5, 2.0][pick(&mut rng, 3) as usize])
        .row_mean(if pick(&mut rng, 2) == 0 { RowMean::AllPositions } else { RowMean::ValidTokens })
        .reduction([Reduction::Mean, Reduction::WeightedMean, Reduction::Sum][pick(&mut rng, 3) as usize])
        .z_loss(if pick(&mut rng, 2) == 0 { 0.0 } else { 1e-3 })
        .label_smoothing(if pick(&mut rng, 2) == 0 { 0.0 } else { 0.1 })
        .softcap(if pick(&mut rng, 2) == 0 { None } else { Some(5.0) })
        .grad_scale(if pick(&mut rng, 3) == 0 { 0.5 } else { 1.0 })
        .build()
        .unwrap();
    let logits = synthetic::logits::<L>(seed, shape.logits_len(), [1.0, 4.0, 12.0][pick(&mut rng, 3) as usize]);
    let ids = synthetic::ids::<i64>(seed, shape.rows(), v);
    let ignore = pick(&mut rng, 2) == 0;
    // label 1 (the first row's target) is never ignored nor weighted 0: the loss is never 0
    let labels = ids.iter().enumerate().map(|(i, &y)| if ignore && i % 3 == 2 { -100 } else { y }).collect();
    let weights = (pick(&mut rng, 2) == 0).then(|| {
        let w = synthetic::logits::<f32>(seed ^ 7, shape.rows(), 1.0);
        w.iter().enumerate().map(|(i, x)| if *x < -0.7 && i != 1 { 0.0 } else { x + 1.0 }).collect()
    });
    Case { shape, spec, logits, ids, labels, weights }
}

/// The outputs of one rank: loss output, its f32 gradient (its columns / rows), per-token losses.
type RankOut = (LossOutput, Vec<f32>, Vec<f32>);

/// Runs the vocabulary-parallel call of `case` on one thread per slice.
fn vocab_parallel<L: Logit>(case: &Case<L>, slices: &[VocabSlice], chunk: Option<usize>) -> Vec<RankOut> {
    let (shape, v) = (case.shape, case.shape.vocab());
    run_ranks(slices.len(), |r, g| {
        let s = slices[r];
        let local = columns(&case.logits, v, s);
        let mut grad = vec![f32::NAN; shape.rows() * s.len()];
        let mut pt = vec![f32::NAN; shape.batch() * (shape.seq() - 1)];
        let mut call = Sharded::vocab_parallel(s, g);
        if let Some(c) = chunk {
            call = call.with_chunk_rows(c);
        }
        let out =
            call.loss_and_grad_per_token(&case.spec, shape, &local, case.tokens(), Grad::IntoF32(&mut grad), &mut pt);
        (out.expect("sharded call"), grad, pt)
    })
}

/// Asserts a sharded output equals the unsharded one within 1e-6 relative.
fn assert_close(out: &LossOutput, whole: &LossOutput, what: &str) {
    assert!(rel(out.loss, whole.loss) <= 1e-6, "{what}: loss {} vs {}", out.loss, whole.loss);
    assert!(rel(out.z_loss, whole.z_loss) <= 1e-6, "{what}: z-loss {} vs {}", out.z_loss, whole.z_loss);
    assert!(rel_err(&out.per_sample_loss, &whole.per_sample_loss) <= 1e-6, "{what}: per-sample losses");
    assert_eq!(out.weights, whole.weights, "{what}: weights");
    assert_eq!(out.valid_tokens, whole.valid_tokens, "{what}: valid tokens");
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Every rank's output against the unsharded call, and the ranks against each other.
fn check_vocab_parallel<L: Logit>(case: &Case<L>, slices: &[VocabSlice], what: &str) -> Vec<RankOut> {
    let (whole, wgrad, wpt) = case.whole();
    assert!(whole.loss.is_finite() && whole.loss != 0.0, "{what}: degenerate case");
    let outs = vocab_parallel(case, slices, None);
    for (r, (out, _, pt)) in outs.iter().enumerate() {
        assert_close(out, &whole, &format!("{what}, rank {r}"));
        assert!(rel_err(pt, &wpt) <= 1e-6, "{what}, rank {r}: per-token losses");
        // every rank merged the same statistics in the same order: the same bits
        assert_eq!(out.loss.to_bits(), outs[0].0.loss.to_bits(), "{what}: rank {r}'s loss bits");
        assert_eq!(out.per_sample_loss, outs[0].0.per_sample_loss, "{what}: rank {r}'s per-sample losses");
        assert_eq!(bits(pt), bits(&outs[0].2), "{what}: rank {r}'s per-token losses");
    }
    let grads: Vec<Vec<f32>> = outs.iter().map(|o| o.1.clone()).collect();
    let g = assemble(&grads, slices, case.shape.rows(), case.shape.vocab());
    let e = rel_err(&g, &wgrad);
    assert!(e <= 1e-6, "{what}: gradient rel err {e:e}");
    outs
}

#[test]
fn vocab_parallel_matches_unsharded_for_1_to_8_ranks() {
    for ranks in 1..=8usize {
        for seed in 0..6u64 {
            let seed = seed * 1000 + ranks as u64;
            let case = random_case::<f32>(seed, 2 * ranks);
            let mut rng = Rng::new(seed ^ 0xC0FFEE);
            let slices = random_slices(&mut rng, ranks, case.shape.vocab());
            let what = format!("{ranks} ranks, seed {seed}, {:?}", case.spec);
            let first = check_vocab_parallel(&case, &slices, &what);
            // a rerun gives the same bits
            let again = vocab_parallel(&case, &slices, None);
            for ((a, ga, pa), (b, gb, pb)) in first.iter().zip(&again) {
                assert_eq!(a, b, "{what}: rerun output");
                assert_eq!(bits(ga), bits(gb), "{what}: rerun gradient");
                assert_eq!(bits(pa), bits(pb), "{what}: rerun per-token losses");
            }
        }
    }
}

#[test]
fn every_row_mean_reduction_and_option() {
    let mut seed = 77;
    for row_mean in [RowMean::AllPositions, RowMean::ValidTokens] {
        for reduction in [Reduction::Mean, Reduction::WeightedMean, Reduction::Sum] {
            for (z, eps, cap) in
                [(0.0, 0.0, None), (1e-3, 0.0, None), (0.0, 0.2, None), (0.0, 0.0, Some(3.0)), (1e-4, 0.1, Some(8.0))]
            {
                seed += 1;
                let mut case = random_case::<f32>(seed, 16);
                case.spec = case
                    .spec
                    .to_builder()
                    .row_mean(row_mean)
                    .reduction(reduction)
                    .z_loss(z)
                    .label_smoothing(eps)
                    .softcap(cap)
                    .build()
                    .unwrap();
                let slices = random_slices(&mut Rng::new(seed), 3, case.shape.vocab());
                check_vocab_parallel(&case, &slices, &format!("{:?}", case.spec));
            }
        }
    }
}

#[test]
fn slices_that_own_no_target() {
    // every label in the first tenth of the vocabulary: ranks 1.. hold no target at all
    for ranks in [2usize, 4, 7] {
        let mut case = random_case::<f32>(500 + ranks as u64, 100);
        let v = case.shape.vocab();
        case.ids.iter_mut().for_each(|y| *y %= (v / 10) as i64);
        case.labels = case.ids.clone();
        let slices: Vec<VocabSlice> = (0..ranks).map(|r| VocabSlice::even(r, ranks, v).unwrap()).collect();
        assert!(slices[1].start() >= v / 10);
        let outs = check_vocab_parallel(&case, &slices, &format!("{ranks} ranks, targets in rank 0 only"));
        // a slice without targets gets softmax-only gradients: every entry >= 0 (times the coefficient's sign)
        let sign = case.spec.grad_scale().signum() as f32;
        let eps = case.spec.label_smoothing();
        if eps == 0.0 && case.weights.as_ref().is_none_or(|w| w.iter().all(|&x| x >= 0.0)) {
            assert!(outs[1].1.iter().all(|&g| g * sign >= 0.0), "no target, no negative entry");
        }
    }
}

#[test]
fn ignore_index_everywhere_and_one_rank() {
    // a sample whose labels are all ignored (valid-token mean: contributes 0, no NaN)
    let mut case = random_case::<f32>(31, 50);
    case.spec = case.spec.to_builder().row_mean(RowMean::ValidTokens).build().unwrap();
    let t = case.shape.seq();
    case.labels[..t].iter_mut().for_each(|y| *y = -100);
    let v = case.shape.vocab();
    for ranks in [1, 2, 5] {
        let slices: Vec<VocabSlice> = (0..ranks).map(|r| VocabSlice::even(r, ranks, v).unwrap()).collect();
        let outs = check_vocab_parallel(&case, &slices, &format!("all ignored in sample 0, {ranks} ranks"));
        assert_eq!(outs[0].0.per_sample_loss[0], 0.0);
    }
}

#[test]
fn chunking_keeps_the_bits() {
    let case = random_case::<f32>(4242, 500);
    let slices = random_slices(&mut Rng::new(9), 3, case.shape.vocab());
    let base = vocab_parallel(&case, &slices, None);
    for chunk in [1, 2, 5, case.shape.rows(), 1000] {
        let outs = vocab_parallel(&case, &slices, Some(chunk));
        for ((a, ga, _), (b, gb, _)) in base.iter().zip(&outs) {
            assert_eq!(a, b, "chunk {chunk}: output");
            assert_eq!(bits(ga), bits(gb), "chunk {chunk}: gradient");
        }
    }
}

#[test]
fn chunked_steps_keep_the_bits_on_long_slices_in_every_mode() {
    // slices longer than two of the CPU pass's 2048-element chunks, exchanges of 1 and 2 rows
    // (each chunk's gradient beside the next chunk's statistics) against one exchange for all
    // rows: the same loss and gradient bits, into a buffer, in place and loss only
    for seed in [31u64, 32] {
        let case = random_case::<f32>(seed, 9000);
        let (shape, v) = (case.shape, case.shape.vocab());
        let slices = [VocabSlice::new(0, 4500, v).unwrap(), VocabSlice::new(4500, v - 4500, v).unwrap()];
        let modes = |chunk: usize| {
            run_ranks(slices.len(), |r, g| {
                let s = slices[r];
                let local = columns(&case.logits, v, s);
                let call = Sharded::vocab_parallel(s, g).with_chunk_rows(chunk);
                let mut g32 = vec![f32::NAN; local.len()];
                let into =
                    call.loss_and_grad(&case.spec, shape, &local, case.tokens(), Grad::IntoF32(&mut g32)).unwrap();
                let mut inplace = local.clone();
                let ip = call.loss_and_grad_in_place(&case.spec, shape, &mut inplace, case.tokens()).unwrap();
                let skip = call.loss_and_grad(&case.spec, shape, &local, case.tokens(), Grad::Skip).unwrap();
                (into, ip, skip, bits(&g32), bits(&inplace))
            })
        };
        let whole = modes(shape.rows());
        for chunk in [1, 2] {
            for (r, (a, b)) in modes(chunk).iter().zip(&whole).enumerate() {
                let what = format!("seed {seed} chunk {chunk} rank {r}");
                assert_eq!((&a.0, &a.1, &a.2), (&b.0, &b.1, &b.2), "{what}: outputs");
                assert_eq!(a.3, b.3, "{what}: gradient");
                assert_eq!(a.4, b.4, "{what}: gradient in place");
                assert!(a.3.iter().all(|&x| f32::from_bits(x).is_finite()), "{what}: every element written");
            }
        }
    }
}

#[test]
fn a_call_from_a_thread_of_the_pool_itself_finishes_with_the_same_bits() {
    // chunked steps called from inside a one-thread rayon pool (whose only thread is the caller)
    // give the bits of the same call from outside
    let case = random_case::<f32>(61, 3000);
    let (shape, v) = (case.shape, case.shape.vocab());
    let run = || {
        let call = Sharded::vocab_parallel(VocabSlice::full(v).unwrap(), &Solo).with_split_steps().with_chunk_rows(1);
        let mut g = vec![f32::NAN; case.logits.len()];
        let out = call.loss_and_grad(&case.spec, shape, &case.logits, case.tokens(), Grad::IntoF32(&mut g)).unwrap();
        (out, bits(&g))
    };
    let outside = run();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let inside = pool.install(run);
    assert_eq!(inside.0, outside.0);
    assert_eq!(inside.1, outside.1);
}

#[test]
fn bf16_logits_and_every_gradient_mode() {
    let case = random_case::<bf16>(808, 300);
    let slices = random_slices(&mut Rng::new(3), 4, case.shape.vocab());
    let outs = check_vocab_parallel(&case, &slices, "bf16");
    let (shape, v) = (case.shape, case.shape.vocab());
    // loss only, gradient in bf16, in place: the same loss bits; the same gradient as bf16
    let modes = run_ranks(slices.len(), |r, g| {
        let s = slices[r];
        let local = columns(&case.logits, v, s);
        let call = Sharded::vocab_parallel(s, g);
        let skip = call.loss_and_grad(&case.spec, shape, &local, case.tokens(), Grad::Skip).unwrap();
        let mut gl = vec![bf16::from_f32(f32::NAN); local.len()];
        let into = call.loss_and_grad(&case.spec, shape, &local, case.tokens(), Grad::Into(&mut gl)).unwrap();
        let mut inplace = local.clone();
        let ip = call.loss_and_grad_in_place(&case.spec, shape, &mut inplace, case.tokens()).unwrap();
        (skip, into, ip, gl, inplace)
    });
    for ((out, g32, _), (skip, into, ip, gl, inplace)) in outs.iter().zip(&modes) {
        for o in [skip, into, ip] {
            assert_eq!(o.loss.to_bits(), out.loss.to_bits());
        }
        let rounded: Vec<bf16> = g32.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(gl, &rounded, "bf16 gradient = the f32 one rounded");
        assert_eq!(inplace, gl, "in place = into a buffer");
    }
}

#[test]
fn data_parallel_matches_the_concatenated_batch() {
    // (5-7: a rank without samples, first, in the middle, last)
    for (seed, splits) in [
        (1u64, vec![0, 1, 3]),
        (2, vec![0, 2, 3]),
        (3, vec![0, 1, 2, 3]),
        (4, vec![0, 3]),
        (5, vec![0, 0, 1, 3]),
        (6, vec![0, 2, 2, 3]),
        (7, vec![0, 3, 3]),
    ] {
        for reduction in [Reduction::Mean, Reduction::WeightedMean, Reduction::Sum] {
            let mut case = random_case::<f32>(seed * 31, 40);
            let t = case.shape.seq();
            // three samples, so that the splits above apply
            case = Case { shape: Shape::new(3, t, case.shape.vocab()).unwrap(), ..case };
            let v = case.shape.vocab();
            case.logits = synthetic::logits(seed, 3 * t * v, 3.0);
            case.ids = synthetic::ids(seed, 3 * t, v);
            case.labels = case.ids.clone();
            case.weights =
                case.weights.map(|_| synthetic::logits::<f32>(seed, 3 * t, 1.0).iter().map(|x| x + 1.0).collect());
            case.spec = case.spec.to_builder().reduction(reduction).build().unwrap();
            let (whole, wgrad, _) = case.whole();
            let ranks = splits.len() - 1;
            let outs = run_ranks(ranks, |r, g| {
                let part = case.samples(splits[r], splits[r + 1]);
                let mut grad = vec![f32::NAN; part.shape.logits_len()];
                let out = Sharded::data_parallel(v, g)
                    .loss_and_grad(&part.spec, part.shape, &part.logits, part.tokens(), Grad::IntoF32(&mut grad))
                    .unwrap();
                (out, grad)
            });
            let what = format!("data-parallel {splits:?} {reduction:?}");
            let mut g = Vec::new();
            for (r, (out, grad)) in outs.iter().enumerate() {
                assert!(rel(out.loss, whole.loss) <= 1e-6, "{what}: rank {r} loss {} vs {}", out.loss, whole.loss);
                assert!(rel(out.z_loss, whole.z_loss) <= 1e-6, "{what}: z-loss");
                assert_eq!(out.loss.to_bits(), outs[0].0.loss.to_bits(), "{what}: same bits on every rank");
                let (b0, b1) = (splits[r], splits[r + 1]);
                assert_eq!(out.weights, whole.weights[b0..b1], "{what}: weights");
                assert!(rel_err(&out.per_sample_loss, &whole.per_sample_loss[b0..b1]) <= 1e-6, "{what}: per sample");
                g.extend_from_slice(grad);
            }
            let e = rel_err(&g, &wgrad);
            assert!(e <= 1e-6, "{what}: gradient rel err {e:e}");
        }
    }
}

/// A vocabulary group of one runs the single-device pass: every gradient mode, the per-token
/// losses and a data group of one give the plain call's bits.
#[test]
fn data_parallel_every_gradient_mode() {
    let mut case = random_case::<bf16>(4242, 200);
    let (t, v) = (case.shape.seq(), case.shape.vocab());
    case.shape = Shape::new(3, t, v).unwrap();
    case.logits = synthetic::logits(17, 3 * t * v, 4.0);
    case.ids = synthetic::ids(17, 3 * t, v);
    case.labels = case.ids.iter().enumerate().map(|(i, &y)| if i % 5 == 3 { -100 } else { y }).collect();
    case.weights = case.weights.map(|_| vec![0.75; 3 * t]);
    let (whole, wgrad, wpt) = case.whole();
    assert!(whole.loss.is_finite() && whole.loss != 0.0, "degenerate case");
    // a data group of one: exactly the plain call
    let mut g1 = vec![f32::NAN; case.shape.logits_len()];
    let mut pt1 = vec![f32::NAN; wpt.len()];
    let solo = Sharded::data_parallel(v, &fused_weighted_loss::parallel::Solo)
        .loss_and_grad_per_token(&case.spec, case.shape, &case.logits, case.tokens(), Grad::IntoF32(&mut g1), &mut pt1)
        .unwrap();
    assert_eq!(solo.loss.to_bits(), whole.loss.to_bits(), "group of one: loss bits");
    assert_eq!(bits(&g1), bits(&wgrad), "group of one: gradient bits");
    assert_eq!(bits(&pt1), bits(&wpt), "group of one: per-token bits");
    // two data ranks (one sample, two samples), every mode
    let splits = [0usize, 1, 3];
    let outs = run_ranks(2, |r, g| {
        let part = case.samples(splits[r], splits[r + 1]);
        let call = Sharded::data_parallel(v, g);
        let skip = call.loss_and_grad(&part.spec, part.shape, &part.logits, part.tokens(), Grad::Skip).unwrap();
        let mut gl = vec![bf16::from_f32(f32::NAN); part.logits.len()];
        let into =
            call.loss_and_grad(&part.spec, part.shape, &part.logits, part.tokens(), Grad::Into(&mut gl)).unwrap();
        let mut g32 = vec![f32::NAN; part.logits.len()];
        let mut pt = vec![f32::NAN; part.shape.batch() * (t - 1)];
        let per = call
            .loss_and_grad_per_token(
                &part.spec,
                part.shape,
                &part.logits,
                part.tokens(),
                Grad::IntoF32(&mut g32),
                &mut pt,
            )
            .unwrap();
        let mut inplace = part.logits.clone();
        let ip = call.loss_and_grad_in_place(&part.spec, part.shape, &mut inplace, part.tokens()).unwrap();
        ([skip, into, per, ip], gl, g32, pt, inplace)
    });
    let (mut g, mut pts) = (Vec::new(), Vec::new());
    for (r, (modes, gl, g32, pt, inplace)) in outs.iter().enumerate() {
        for o in modes {
            assert_eq!(o.loss.to_bits(), outs[0].0[0].loss.to_bits(), "rank {r}: the same loss bits in every mode");
            assert!(rel(o.loss, whole.loss) <= 1e-6, "rank {r}: loss {} vs {}", o.loss, whole.loss);
        }
        let rounded: Vec<bf16> = g32.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(gl, &rounded, "rank {r}: bf16 gradient = the f32 one rounded");
        assert_eq!(inplace, gl, "rank {r}: in place = into a buffer");
        g.extend_from_slice(g32);
        pts.extend_from_slice(pt);
    }
    let e = rel_err(&g, &wgrad);
    assert!(e <= 1e-6, "gradient rel err {e:e}");
    assert!(rel_err(&pts, &wpt) <= 1e-6, "per-token losses");
}

#[test]
fn grid_of_data_and_vocab_ranks() {
    for (data, vocab, seed) in [(2usize, 2usize, 11u64), (2, 3, 12), (3, 2, 13), (1, 4, 14), (4, 1, 15)] {
        let mut case = random_case::<f32>(seed, 64);
        let (t, v) = (case.shape.seq(), case.shape.vocab());
        let b = data + 1; // uneven: the last data rank gets two samples
        case.shape = Shape::new(b, t, v).unwrap();
        case.logits = synthetic::logits(seed, b * t * v, 4.0);
        case.ids = synthetic::ids(seed, b * t, v);
        case.labels = case.ids.iter().enumerate().map(|(i, &y)| if i % 4 == 2 { -100 } else { y }).collect();
        case.weights = case.weights.map(|_| vec![1.5; b * t]);
        let (whole, wgrad, _) = case.whole();
        let splits: Vec<usize> = (0..=data).map(|d| if d == data { b } else { d }).collect();
        let slices = random_slices(&mut Rng::new(seed), vocab, v);
        let outs = run_grid(data, vocab, |d, p, vg, dg| {
            let part = case.samples(splits[d], splits[d + 1]);
            let local = columns(&part.logits, v, slices[p]);
            let mut grad = vec![f32::NAN; local.len()];
            let call = Sharded::vocab_parallel(slices[p], vg).with_data_group(dg);
            // odd seeds: exchanges of two rows (several chunks, the pipelined loop); even: default
            let call = if seed % 2 == 1 { call.with_chunk_rows(2) } else { call };
            let out =
                call.loss_and_grad(&part.spec, part.shape, &local, part.tokens(), Grad::IntoF32(&mut grad)).unwrap();
            (out, grad)
        });
        let what = format!("{data}x{vocab} grid, {:?}", case.spec);
        let mut g = vec![f32::NAN; wgrad.len()];
        for (rank, (out, grad)) in outs.iter().enumerate() {
            let (d, p) = (rank / vocab, rank % vocab);
            assert!(rel(out.loss, whole.loss) <= 1e-6, "{what}: rank {rank} loss {} vs {}", out.loss, whole.loss);
            assert_eq!(out.loss.to_bits(), outs[0].0.loss.to_bits(), "{what}: same bits on every rank");
            let (b0, s) = (splits[d], slices[p]);
            for (i, row) in grad.chunks_exact(s.len()).enumerate() {
                let r = b0 * t + i;
                g[r * v + s.start()..r * v + s.end()].copy_from_slice(row);
            }
        }
        let e = rel_err(&g, &wgrad);
        assert!(e <= 1e-6, "{what}: gradient rel err {e:e}");
    }
}

/// A data rank without samples in a grid (its vocabulary group is empty too): every gradient
/// mode and the per-token losses come back empty, the loss is the whole batch's, the same bits
/// as its peers'; the ranks with samples get the gradient of the concatenated batch.
#[test]
fn a_data_rank_without_samples_in_a_grid() {
    let mut case = random_case::<f32>(21, 64);
    let (t, v) = (case.shape.seq(), case.shape.vocab());
    case.shape = Shape::new(3, t, v).unwrap();
    case.logits = synthetic::logits(21, 3 * t * v, 4.0);
    case.ids = synthetic::ids(21, 3 * t, v);
    case.labels = case.ids.clone();
    case.spec = case.spec.to_builder().z_loss(1e-3).build().unwrap();
    let (whole, wgrad, _) = case.whole();
    let splits = [0usize, 1, 1, 3];
    let slices = random_slices(&mut Rng::new(21), 2, v);
    let outs = run_grid(3, 2, |d, p, vg, dg| {
        let part = case.samples(splits[d], splits[d + 1]);
        let local = columns(&part.logits, v, slices[p]);
        let call = Sharded::vocab_parallel(slices[p], vg).with_data_group(dg).with_chunk_rows(3);
        let mut grad = vec![f32::NAN; local.len()];
        let mut pt = vec![f32::NAN; part.shape.batch() * (t - 1)];
        let per = call
            .loss_and_grad_per_token(&part.spec, part.shape, &local, part.tokens(), Grad::IntoF32(&mut grad), &mut pt)
            .unwrap();
        let skip = call.loss_and_grad(&part.spec, part.shape, &local, part.tokens(), Grad::Skip).unwrap();
        let mut inplace = local.clone();
        let ip = call.loss_and_grad_in_place(&part.spec, part.shape, &mut inplace, part.tokens()).unwrap();
        ([per, skip, ip], grad)
    });
    let mut g = vec![f32::NAN; wgrad.len()];
    for (rank, (modes, grad)) in outs.iter().enumerate() {
        let (d, p) = (rank / 2, rank % 2);
        for o in modes {
            assert_eq!(o.loss.to_bits(), outs[0].0[0].loss.to_bits(), "rank {rank}: the same loss bits");
            assert_eq!(o.z_loss.to_bits(), outs[0].0[0].z_loss.to_bits(), "rank {rank}: the same z-loss bits");
            assert!(rel(o.loss, whole.loss) <= 1e-6, "rank {rank}: loss {} vs {}", o.loss, whole.loss);
            assert!(rel(o.z_loss, whole.z_loss) <= 1e-6, "rank {rank}: z-loss");
            assert_eq!(o.weights.len(), splits[d + 1] - splits[d], "rank {rank}: its samples' weights");
        }
        if d == 1 {
            assert!(grad.is_empty() && modes[0].per_sample_loss.is_empty(), "the empty rank's outputs are empty");
        }
        let (b0, s) = (splits[d], slices[p]);
        for (i, row) in grad.chunks_exact(s.len()).enumerate() {
            let r = b0 * t + i;
            g[r * v + s.start()..r * v + s.end()].copy_from_slice(row);
        }
    }
    let e = rel_err(&g, &wgrad);
    assert!(e <= 1e-6, "gradient rel err {e:e}");
}

/// What a rank without samples cannot be: alone (no data group), in a data group where no rank
/// holds a sample, or beside inputs its peers reject (each rank reports its own error, after
/// the first exchanges, so nobody is left waiting); and the slices of its vocabulary group are
/// still checked.
#[test]
fn a_rank_without_samples_and_its_errors() {
    let (t, v) = (5usize, 12usize);
    let empty = Shape::without_samples(t, v).unwrap();
    let none: [i64; 0] = [];
    let spec = LossSpec::default();
    let solo = Sharded::data_parallel(v, &fused_weighted_loss::parallel::Solo);
    let alone = solo.loss_and_grad::<f32, i64>(&spec, empty, &[], Tokens::new(&none), Grad::Skip);
    assert!(matches!(alone, Err(Error::EmptyBatch)), "{alone:?}");
    let plain = spec.loss_and_grad::<f32, i64>(empty, &[], Tokens::new(&none), Grad::Skip);
    assert!(matches!(plain, Err(Error::EmptyBatch)), "{plain:?}");
    // the steps take an empty rank, whose output needs the data group's totals
    let steps = ShardedLoss::new(&spec, empty, VocabSlice::full(v).unwrap(), Tokens::new(&none)).unwrap();
    let alone = steps.finish();
    assert!(matches!(alone, Err(Error::EmptyBatch)), "no data group: {alone:?}");
    let mut steps = ShardedLoss::new(&spec, empty, VocabSlice::full(v).unwrap(), Tokens::new(&none)).unwrap();
    let totals = [steps.batch_totals(), steps.batch_totals()].concat();
    assert_eq!(steps.set_batch_totals(&totals), Err(Error::EmptyDataGroup));
    assert!(matches!(steps.finish(), Err(Error::EmptyBatch)), "its totals were refused");
    let all_empty = run_ranks(3, |_, g| {
        Sharded::data_parallel(v, g).loss_and_grad::<f32, i64>(&spec, empty, &[], Tokens::new(&none), Grad::Skip)
    });
    for r in &all_empty {
        assert!(matches!(r, Err(Error::EmptyDataGroup)), "{r:?}");
    }
    // a keyword outside the vocabulary: every rank's error, the empty one's included
    let bad = LossSpec::builder().keywords([v as i64]).build().unwrap();
    let ids: Vec<i64> = (0..t as i64).collect();
    let logits = synthetic::logits::<f32>(3, t * v, 2.0);
    let errs = run_ranks(2, |r, g| {
        let call = Sharded::data_parallel(v, g);
        if r == 0 {
            call.loss_and_grad::<f32, i64>(&bad, empty, &[], Tokens::new(&none), Grad::Skip)
        } else {
            call.loss_and_grad(&bad, Shape::new(1, t, v).unwrap(), &logits, Tokens::new(&ids), Grad::Skip)
        }
    });
    for r in &errs {
        assert!(matches!(r, Err(Error::KeywordOutOfRange { .. })), "{r:?}");
    }
    // logits that are not empty beside an empty shape
    let long = Sharded::data_parallel(v, &fused_weighted_loss::parallel::Solo).loss_and_grad(
        &spec,
        empty,
        &logits,
        Tokens::new(&none),
        Grad::Skip,
    );
    assert!(matches!(long, Err(Error::LengthMismatch { what: "logits", .. })), "{long:?}");
    // an empty vocabulary group of two whose slices overlap: the check still runs (a grid of 2 x 2,
    // data rank 0 empty, data rank 1 with one sample)
    let slices = [VocabSlice::new(0, 7, v).unwrap(), VocabSlice::new(5, 7, v).unwrap()];
    let grid = run_grid(2, 2, |d, p, vg, dg| {
        let call = Sharded::vocab_parallel(slices[p], vg).with_data_group(dg);
        if d == 0 {
            call.loss_and_grad::<f32, i64>(&spec, empty, &[], Tokens::new(&none), Grad::Skip)
        } else {
            let local = columns(&logits, v, slices[p]);
            call.loss_and_grad(&spec, Shape::new(1, t, v).unwrap(), &local, Tokens::new(&ids), Grad::Skip)
        }
    });
    for r in &grid {
        assert!(matches!(r, Err(Error::SlicesDoNotTile { .. })), "{r:?}");
    }
}

/// Steps driven by hand (finished, their gradients `grads`) give the one call's outputs and
/// gradient bits.
fn same_as_one_call(
    case: &Case<f32>,
    slices: &[VocabSlice],
    chunk: usize,
    steps: Vec<ShardedLoss>,
    grads: &[Vec<f32>],
) {
    let by_hand: Vec<LossOutput> = steps.into_iter().map(|s| s.finish().unwrap()).collect();
    let one_call = vocab_parallel(case, slices, Some(chunk));
    for ((a, g), (b, gb, _)) in by_hand.iter().zip(grads).zip(&one_call) {
        assert_eq!(a, b, "steps by hand = one call");
        assert_eq!(bits(g), bits(gb), "gradients by hand = one call");
    }
}

/// The steps driven by hand, two ranks simulated in one thread, pipelined: the statistics of
/// chunk k + 1 are taken before chunk k is finished (two chunks kept at once).
#[test]
fn steps_pipelined_by_hand_equal_the_one_call() {
    let case = random_case::<f32>(99, 200);
    let (shape, v) = (case.shape, case.shape.vocab());
    let slices = [VocabSlice::new(0, v / 3, v).unwrap(), VocabSlice::new(v / 3, v - v / 3, v).unwrap()];
    let local: Vec<Vec<f32>> = slices.iter().map(|&s| columns(&case.logits, v, s)).collect();
    let mut steps: Vec<ShardedLoss> =
        slices.iter().map(|&s| ShardedLoss::new(&case.spec, shape, s, case.tokens()).unwrap()).collect();
    let chunk = 2;
    let chunks: Vec<std::ops::Range<usize>> =
        (0..shape.rows()).step_by(chunk).map(|r| r..(r + chunk).min(shape.rows())).collect();
    let gather = |steps: &mut Vec<ShardedLoss>, r: &std::ops::Range<usize>| -> Vec<f64> {
        let mut all = Vec::new();
        for (st, (s, l)) in steps.iter_mut().zip(slices.iter().zip(&local)) {
            let mut part = vec![f64::NAN; st.partials_len(r.len())];
            st.partials(r.clone(), &l[r.start * s.len()..r.end * s.len()], &mut part).unwrap();
            all.extend(part);
        }
        all
    };
    let mut grads: Vec<Vec<f32>> = slices.iter().map(|s| vec![f32::NAN; shape.rows() * s.len()]).collect();
    let mut in_flight = gather(&mut steps, &chunks[0]);
    for k in 0..chunks.len() {
        let next = chunks.get(k + 1).map(|r| gather(&mut steps, r));
        let r = &chunks[k];
        for ((st, s), (l, g)) in steps.iter_mut().zip(&slices).zip(local.iter().zip(grads.iter_mut())) {
            let span = r.start * s.len()..r.end * s.len();
            st.finish_rows_grad(r.clone(), &in_flight, &l[span.clone()], &mut g[span]).unwrap();
        }
        if let Some(n) = next {
            in_flight = n;
        }
    }
    same_as_one_call(&case, &slices, chunk, steps, &grads);
}

/// Ranks of a vocabulary group whose tokens mean the same but are passed differently (one
/// gives labels equal to its ids and token weights of 1, the other leaves both out) make the same
/// call: no `GroupCallMismatch`, the same loss bits as when neither passes them.
#[test]
fn tokens_that_mean_the_same_agree() {
    let case = random_case::<f32>(57, 40);
    let (shape, v) = (case.shape, case.shape.vocab());
    let slices = [VocabSlice::new(0, v / 2, v).unwrap(), VocabSlice::new(v / 2, v - v / 2, v).unwrap()];
    let ones = vec![1.0f32; case.ids.len()];
    let run = |explicit: [bool; 2]| {
        run_ranks(2, |r, g| {
            let local = columns(&case.logits, v, slices[r]);
            let mut grad = vec![f32::NAN; local.len()];
            let tokens = match explicit[r] {
                true => Tokens::new(&case.ids).with_labels(&case.ids).with_token_weights(&ones),
                false => Tokens::new(&case.ids),
            };
            let out = Sharded::vocab_parallel(slices[r], g).loss_and_grad(
                &case.spec,
                shape,
                &local,
                tokens,
                Grad::IntoF32(&mut grad),
            );
            (out, grad)
        })
    };
    let plain = run([false, false]);
    let mixed = run([true, false]);
    for ((a, ga), (b, gb)) in plain.iter().zip(&mixed) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().expect("the same call"));
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "the same loss bits");
        assert_eq!(bits(ga), bits(gb), "the same gradient bits");
    }
}

/// The host steps on a 2 × 2 grid driven by hand in one thread, data rank 0 without samples
/// (`Shape::without_samples`): every rank's loss has the same bits as the one call's on the same
/// grid, the full rank's gradient too, and the empty rank's outputs are empty.
#[test]
fn steps_of_a_data_rank_without_samples_equal_the_one_call() {
    let mut case = random_case::<f32>(31, 40);
    case.spec = case.spec.to_builder().z_loss(1e-3).reduction(Reduction::WeightedMean).build().unwrap();
    let (b, v) = (case.shape.batch(), case.shape.vocab());
    let parts = [case.samples(0, 0), case.samples(0, b)];
    let slices = [VocabSlice::new(0, v / 2, v).unwrap(), VocabSlice::new(v / 2, v - v / 2, v).unwrap()];
    let local = |d: usize, p: usize| columns(&parts[d].logits, v, slices[p]);
    // steps[d][p]: data rank d, vocabulary rank p
    let mut steps: Vec<Vec<ShardedLoss>> = parts
        .iter()
        .map(|part| {
            slices.iter().map(|&s| ShardedLoss::new(&part.spec, part.shape, s, part.tokens()).unwrap()).collect()
        })
        .collect();
    for p in 0..2 {
        let totals = [steps[0][p].batch_totals(), steps[1][p].batch_totals()].concat();
        assert_eq!(&totals[..2], &[0.0, 0.0], "the empty rank's totals");
        for row in steps.iter_mut() {
            row[p].set_batch_totals(&totals).unwrap();
        }
    }
    let mut grads: Vec<Vec<Vec<f32>>> =
        (0..2).map(|d| slices.iter().map(|s| vec![f32::NAN; parts[d].shape.rows() * s.len()]).collect()).collect();
    for d in 0..2 {
        let rows = 0..parts[d].shape.rows();
        let mut gathered = Vec::new();
        for (p, st) in steps[d].iter_mut().enumerate() {
            let mut words = vec![f64::NAN; st.partials_len(rows.len())];
            st.partials(rows.clone(), &local(d, p), &mut words).unwrap();
            gathered.extend(words);
        }
        for (p, (st, g)) in steps[d].iter_mut().zip(grads[d].iter_mut()).enumerate() {
            st.finish_rows_grad(rows.clone(), &gathered, &local(d, p), g).unwrap();
        }
    }
    let mut outs: Vec<Vec<LossOutput>> =
        steps.into_iter().map(|row| row.into_iter().map(|s| s.finish().unwrap()).collect()).collect();
    for p in 0..2 {
        let shares = [ShardedLoss::loss_totals(&outs[0][p]), ShardedLoss::loss_totals(&outs[1][p])].concat();
        assert_eq!(&shares[..2], &[0.0, 0.0], "the empty rank's share");
        for row in outs.iter_mut() {
            ShardedLoss::combine_loss(&mut row[p], &shares).unwrap();
        }
    }
    let one_call = run_grid(2, 2, |d, p, vg, dg| {
        let call = Sharded::vocab_parallel(slices[p], vg).with_data_group(dg);
        let mut grad = vec![f32::NAN; parts[d].shape.rows() * slices[p].len()];
        let out =
            call.loss_and_grad(&parts[d].spec, parts[d].shape, &local(d, p), parts[d].tokens(), Grad::Into(&mut grad));
        (out.unwrap(), grad)
    });
    let (whole, _, _) = case.whole();
    for (rank, (out, grad)) in one_call.iter().enumerate() {
        let (d, p) = (rank / 2, rank % 2);
        let mine = &outs[d][p];
        assert_eq!(mine.loss.to_bits(), out.loss.to_bits(), "rank {rank}: loss bits of the one call");
        assert_eq!(mine.z_loss.to_bits(), out.z_loss.to_bits(), "rank {rank}: z-loss bits");
        assert_eq!(mine.per_sample_loss, out.per_sample_loss, "rank {rank}: per-sample losses");
        assert_eq!(bits(&grads[d][p]), bits(grad), "rank {rank}: gradient bits of the one call");
        assert!(rel(mine.loss, whole.loss) <= 1e-6, "rank {rank}: loss {} vs {}", mine.loss, whole.loss);
        if d == 0 {
            assert!(mine.per_sample_loss.is_empty() && mine.weights.is_empty() && grads[d][p].is_empty());
        }
    }
}

/// The pipelined step `finish_rows_grad_then_partials` (one chunk's gradient beside the next
/// chunk's statistics), driven by hand for three uneven ranks: the same bits as the one call.
#[test]
fn grad_then_partials_step_equals_the_one_call() {
    let case = random_case::<f32>(77, 150);
    let (shape, v) = (case.shape, case.shape.vocab());
    let slices = [
        VocabSlice::new(0, 1, v).unwrap(),
        VocabSlice::new(1, v / 2, v).unwrap(),
        VocabSlice::new(1 + v / 2, v - 1 - v / 2, v).unwrap(),
    ];
    let local: Vec<Vec<f32>> = slices.iter().map(|&s| columns(&case.logits, v, s)).collect();
    let mut steps: Vec<ShardedLoss> =
        slices.iter().map(|&s| ShardedLoss::new(&case.spec, shape, s, case.tokens()).unwrap()).collect();
    let chunk = 3;
    let chunks: Vec<std::ops::Range<usize>> =
        (0..shape.rows()).step_by(chunk).map(|r| r..(r + chunk).min(shape.rows())).collect();
    let mut gathered = Vec::new();
    for (st, (s, l)) in steps.iter_mut().zip(slices.iter().zip(&local)) {
        let r = &chunks[0];
        let mut part = vec![f64::NAN; st.partials_len(r.len())];
        st.partials(r.clone(), &l[r.start * s.len()..r.end * s.len()], &mut part).unwrap();
        gathered.extend(part);
    }
    let mut grads: Vec<Vec<f32>> = slices.iter().map(|s| vec![f32::NAN; shape.rows() * s.len()]).collect();
    for k in 0..chunks.len() {
        let r = &chunks[k];
        let mut next_gathered = Vec::new();
        for ((st, s), (l, g)) in steps.iter_mut().zip(&slices).zip(local.iter().zip(grads.iter_mut())) {
            let span = r.start * s.len()..r.end * s.len();
            match chunks.get(k + 1) {
                Some(nx) => {
                    let mut part = vec![f64::NAN; st.partials_len(nx.len())];
                    let nl = &l[nx.start * s.len()..nx.end * s.len()];
                    st.finish_rows_grad_then_partials(
                        r.clone(),
                        &gathered,
                        &l[span.clone()],
                        &mut g[span],
                        nx.clone(),
                        nl,
                        &mut part,
                    )
                    .unwrap();
                    next_gathered.extend(part);
                }
                None => st.finish_rows_grad(r.clone(), &gathered, &l[span.clone()], &mut g[span]).unwrap(),
            }
        }
        gathered = next_gathered;
    }
    same_as_one_call(&case, &slices, chunk, steps, &grads);
    // a short partials buffer for the next chunk is a typed error, not a panic
    let mut st = ShardedLoss::new(&case.spec, shape, VocabSlice::full(v).unwrap(), case.tokens()).unwrap();
    let mut part = vec![0.0; st.partials_len(1)];
    st.partials(0..1, &case.logits[..v], &mut part).unwrap();
    let mut g = vec![0f32; v];
    let mut short = vec![0.0; st.partials_len(1) - 1];
    let r = st.finish_rows_grad_then_partials(
        0..1,
        &part,
        &case.logits[..v],
        &mut g,
        1..2,
        &case.logits[v..2 * v],
        &mut short,
    );
    assert!(matches!(r, Err(Error::ExchangeLength { .. })), "{r:?}");
}

#[test]
fn exponentials_not_kept_are_recomputed() {
    // keep nothing: the gradient step re-reads the logits; same values within rounding
    let case = random_case::<f32>(5150, 1000);
    let (shape, v) = (case.shape, case.shape.vocab());
    let (whole, wgrad, _) = case.whole();
    let slice = VocabSlice::full(v).unwrap();
    let mut st = ShardedLoss::new(&case.spec, shape, slice, case.tokens()).unwrap().with_keep_rows(0);
    let rows = 0..shape.rows();
    let mut part = vec![0.0; st.partials_len(rows.len())];
    st.partials(rows.clone(), &case.logits, &mut part).unwrap();
    let mut grad = vec![f32::NAN; case.logits.len()];
    st.finish_rows_grad(rows, &part, &case.logits, &mut grad).unwrap();
    let out = st.finish().unwrap();
    assert_close(&out, &whole, "recomputed");
    let e = rel_err(&grad, &wgrad);
    assert!(e <= 1e-6, "recomputed gradient rel err {e:e}");
}

#[test]
fn typed_errors() {
    let case = random_case::<f32>(1, 20);
    let (shape, v) = (case.shape, case.shape.vocab());
    assert!(matches!(VocabSlice::new(0, 0, v), Err(Error::InvalidVocabSlice { .. })));
    assert!(matches!(VocabSlice::new(5, v, v), Err(Error::InvalidVocabSlice { .. })));
    assert!(matches!(VocabSlice::even(4, 4, v), Err(Error::InvalidVocabSlice { .. })));
    assert!(matches!(check_tiling(&[(0, 3), (3, 3)], 7), Err(Error::SlicesDoNotTile { .. })));
    // a slice of another vocabulary
    let other = VocabSlice::new(0, 4, v + 1).unwrap();
    let r = ShardedLoss::new(&case.spec, shape, other, case.tokens());
    assert!(matches!(r, Err(Error::InvalidVocabSlice { .. })));
    // overlapping slices: every rank learns it from the first exchange, none hangs
    let overlapping = [VocabSlice::new(0, v / 2 + 1, v).unwrap(), VocabSlice::new(v / 2, v - v / 2, v).unwrap()];
    let errs = run_ranks(2, |r, g| {
        let local = columns(&case.logits, v, overlapping[r]);
        Sharded::vocab_parallel(overlapping[r], g).loss_and_grad(&case.spec, shape, &local, case.tokens(), Grad::Skip)
    });
    assert!(errs.iter().all(|e| matches!(e, Err(Error::SlicesDoNotTile { .. }))), "{errs:?}");
    // wrong lengths, rows out of range, steps out of order
    let s = VocabSlice::full(v).unwrap();
    let call = Sharded::vocab_parallel(s, &Solo);
    let bad = call.loss_and_grad(&case.spec, shape, &case.logits[1..], case.tokens(), Grad::Skip);
    assert!(matches!(bad, Err(Error::LengthMismatch { .. })));
    let mut short = vec![0f32; 3];
    let bad = call.loss_and_grad(&case.spec, shape, &case.logits, case.tokens(), Grad::IntoF32(&mut short));
    assert!(matches!(bad, Err(Error::GradLength { .. })));
    let mut st = ShardedLoss::new(&case.spec, shape, s, case.tokens()).unwrap();
    let n = shape.rows();
    let mut part = vec![0.0; st.partials_len(n)];
    assert!(matches!(st.partials(0..n + 1, &case.logits, &mut part), Err(Error::RowRange { .. })));
    assert!(matches!(st.partials(0..n, &case.logits, &mut part[1..]), Err(Error::ExchangeLength { .. })));
    st.partials(0..n, &case.logits, &mut part).unwrap();
    assert!(matches!(st.finish_rows(0..n, &part[1..]), Err(Error::ExchangeLength { .. })));
    // the words of rows 0..n are not those of row 0 (the slice's words end each rank's part)
    assert!(st.finish_rows(0..1, &part[..st.partials_len(1)]).is_err());
    let mut one = vec![0.0; st.partials_len(1)];
    st.partials(0..1, &case.logits[..v], &mut one).unwrap();
    st.finish_rows(0..1, &one).unwrap();
    let mut grad = vec![0f32; case.logits.len()];
    st.finish_rows_grad(0..n, &part, &case.logits, &mut grad).unwrap();
    assert!(matches!(st.set_batch_totals(&[1.0, 2.0]), Err(Error::StepOrder(_))));
    assert!(matches!(st.set_batch_totals(&[1.0]), Err(Error::ExchangeLength { .. })));
    let st2 = ShardedLoss::new(&case.spec, shape, s, case.tokens()).unwrap();
    assert!(matches!(st2.finish(), Err(Error::StepOrder(_))));
    assert!(matches!(VocabSlice::even(0, 0, v), Err(Error::InvalidOption { name: "ranks", .. })));
    // a group whose ranks send different lengths fails on every rank
    let errs = run_ranks(2, |r, g: &ThreadGroup| {
        let mut recv = vec![0.0; 2 * (r + 1)];
        fused_weighted_loss::parallel::Collective::all_gather_f64(g, &vec![1.0; r + 1], &mut recv)
    });
    assert!(errs.iter().all(|e| matches!(e, Err(Error::Collective(_)))));
}

/// What a driver of the steps hands the merge is checked: every rank's slice ends its words, so
/// a gather that was not done (this rank's own words only), overlapping slices, or partials of
/// another row count are errors, not a wrong loss.
#[test]
fn the_merge_checks_what_the_driver_gathered() {
    let case = random_case::<f32>(3, 40);
    let (shape, v) = (case.shape, case.shape.vocab());
    let n = shape.rows();
    let parts = |slices: &[VocabSlice], rows: std::ops::Range<usize>| -> Vec<Vec<f64>> {
        slices
            .iter()
            .map(|&s| {
                let mut st = ShardedLoss::new(&case.spec, shape, s, case.tokens()).unwrap();
                let local = columns(&case.logits, v, s);
                let mut out = vec![0.0; st.partials_len(rows.len())];
                st.partials(rows.clone(), &local[rows.start * s.len()..rows.end * s.len()], &mut out).unwrap();
                out
            })
            .collect()
    };
    let tiled = [VocabSlice::new(0, v / 2, v).unwrap(), VocabSlice::new(v / 2, v - v / 2, v).unwrap()];
    let mine = |s: VocabSlice| ShardedLoss::new(&case.spec, shape, s, case.tokens()).unwrap();
    // the whole gather merges
    let all: Vec<f64> = parts(&tiled, 0..n).concat();
    mine(tiled[0]).finish_rows(0..n, &all).unwrap();
    // no gather: rank 0's own words only
    let own = parts(&tiled, 0..n).swap_remove(0);
    assert!(matches!(mine(tiled[0]).finish_rows(0..n, &own), Err(Error::SlicesDoNotTile { .. })));
    // overlapping slices
    let overlap = [VocabSlice::new(0, v / 2 + 3, v).unwrap(), VocabSlice::new(v / 2, v - v / 2, v).unwrap()];
    let both: Vec<f64> = parts(&overlap, 0..n).concat();
    assert!(matches!(mine(overlap[0]).finish_rows(0..n, &both), Err(Error::SlicesDoNotTile { .. })));
    // two ranks' partials of rows 0..2 passed as rows 0..4
    let short: Vec<f64> = parts(&tiled, 0..2).concat();
    assert!(mine(tiled[0]).finish_rows(0..4, &short).is_err());
    // a rank of another vocabulary
    let mut other = all.clone();
    let end = other.len();
    other[end - 1] += 1.0;
    assert!(matches!(mine(tiled[0]).finish_rows(0..n, &other), Err(Error::VocabMismatch { .. })));
    // batch totals that are not every rank's (zeros here: the loss and gradient came out 0)
    let mut st = mine(tiled[0]);
    assert!(matches!(st.set_batch_totals(&[0.0, 0.0]), Err(Error::Collective(_))));
    let mut totals = st.batch_totals().to_vec();
    totals.extend([3.0, 2.5]);
    st.set_batch_totals(&totals).unwrap();
}

/// The one call: ranks that name different vocabularies fail together (the slices' words carry
/// each rank's vocabulary).
#[test]
fn ranks_of_different_vocabularies_fail_together() {
    let case = random_case::<f32>(4, 20);
    let (shape, v) = (case.shape, case.shape.vocab());
    let errs = run_ranks(2, |r, g| {
        // rank 1 names a vocabulary one larger (its slice and logits fit it)
        let vocab = v + r;
        let s = VocabSlice::new(r * 6, if r == 0 { 6 } else { vocab - 6 }, vocab).unwrap();
        let shape = Shape::new(shape.batch(), shape.seq(), vocab).unwrap();
        let local: Vec<f32> = (0..shape.rows() * s.len()).map(|i| (i % 7) as f32 * 0.3).collect();
        Sharded::vocab_parallel(s, g).loss_and_grad(&case.spec, shape, &local, case.tokens(), Grad::Skip)
    });
    assert!(errs.iter().all(|e| matches!(e, Err(Error::VocabMismatch { .. }))), "{errs:?}");
}

/// `check_finite` on a data group: a non-finite position on rank 0 fails every rank (rank 0 alone
/// failed, and left its peers waiting in the exchange of the loss).
#[test]
fn a_non_finite_loss_fails_every_rank_of_the_data_group() {
    // (a case of two samples at least; soft-capping would make the +inf below finite)
    let case = (5..).map(|seed| random_case::<f32>(seed, 20)).find(|c| c.shape.batch() >= 2).unwrap();
    let (shape, v) = (case.shape, case.shape.vocab());
    let spec = case.spec.to_builder().check_finite(true).softcap(None::<f64>).build().unwrap();
    let b = shape.batch();
    for grad in [false, true] {
        let errs = run_ranks(2, |r, g| {
            let (b0, b1) = if r == 0 { (0, 1) } else { (1, b) };
            let sub = case.samples(b0, b1);
            let mut logits = sub.logits.clone();
            if r == 0 {
                logits[0] = f32::INFINITY;
            }
            let call = Sharded::data_parallel(v, g);
            let mut out = vec![0f32; logits.len()];
            let dest = if grad { Grad::Into(&mut out) } else { Grad::Skip };
            call.loss_and_grad(&spec, sub.shape, &logits, sub.tokens(), dest)
        });
        assert!(matches!(errs[0], Err(Error::NonFinite { .. })), "{errs:?}");
        assert!(matches!(errs[1], Err(Error::NonFiniteInGroup { .. })), "{errs:?}");
    }
}

/// Sample weights whose sum overflows only over the data group: with the weighted mean every
/// rank fails alike (its share was 0, a silent zero loss); the plain mean, which does not use
/// the sum, is not refused for it.
#[test]
fn a_data_group_whose_weight_sum_overflows_fails_every_rank() {
    let case = (5..).map(|seed| random_case::<f32>(seed, 20)).find(|c| c.shape.batch() >= 2).unwrap();
    let v = case.shape.vocab();
    for (reduction, fails) in [(Reduction::WeightedMean, true), (Reduction::Mean, false)] {
        // every sample's weight 1e308 (no keywords): each rank's sum finite, the group's not
        let spec = case.spec.to_builder().keywords([] as [i64; 0]).alpha(1e308).reduction(reduction).build().unwrap();
        let outs = run_ranks(2, |r, g| {
            let sub = case.samples(r, r + 1);
            Sharded::data_parallel(v, g).loss_and_grad(&spec, sub.shape, &sub.logits, sub.tokens(), Grad::Skip)
        });
        for o in &outs {
            if fails {
                assert!(matches!(o, Err(Error::InvalidOption { value, .. }) if value.is_infinite()), "{outs:?}");
            } else {
                // (its loss, 1e308 times a loss of ~8, is beyond f64 too: not checked)
                assert!(o.is_ok(), "{outs:?}");
            }
        }
    }
}

#[test]
fn a_rank_that_ends_before_an_exchange_fails_the_others_instead_of_hanging() {
    use fused_weighted_loss::parallel::Collective;
    let got = run_ranks(3, |r, g| {
        let mut a = vec![0f32; 3];
        g.all_gather_f32(&[r as f32], &mut a)?;
        if r == 1 {
            return Ok(a); // skips the second exchange
        }
        g.all_gather_f32(&[r as f32], &mut a).map(|()| a)
    });
    assert_eq!(got[1].as_ref().unwrap(), &[0.0, 1.0, 2.0]);
    assert!(matches!(got[0], Err(Error::Collective(_))) && matches!(got[2], Err(Error::Collective(_))), "{got:?}");
}

#[test]
#[should_panic(expected = "a rank panicked")]
fn a_rank_that_panics_fails_the_test_instead_of_hanging_it() {
    use fused_weighted_loss::parallel::Collective;
    run_ranks(2, |r, g| {
        assert!(r != 1, "rank 1 fails before its exchange");
        let mut a = vec![0f64; 2];
        g.all_gather_f64(&[1.0], &mut a)
    });
}

#[test]
fn thread_exchange_gathers_in_rank_order() {
    use fused_weighted_loss::parallel::Collective;
    let got = run_ranks(4, |r, g| {
        let mut a = vec![0f32; 8];
        g.all_gather_f32(&[r as f32, -(r as f32)], &mut a).unwrap();
        let mut b = vec![0f64; 4];
        g.all_gather_f64(&[r as f64 * 0.5], &mut b).unwrap();
        (a, b)
    });
    for (a, b) in got {
        assert_eq!(a, [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0]);
        assert_eq!(b, [0.0, 0.5, 1.0, 1.5]);
    }
}

/// A group whose rank is not within its size, of no rank, or of more ranks than any collective
/// has (`MAX_RANKS`: the exchanges' lengths, words per rank × ranks, overflowed) fails the call
/// with `Error::Collective` before any exchange and before anything is written, in either group.
#[test]
fn a_group_that_is_not_one_is_refused() {
    use fused_weighted_loss::parallel::{Collective, MAX_RANKS};
    struct Odd(usize, usize);
    impl Collective for Odd {
        fn rank(&self) -> usize {
            self.0
        }
        fn size(&self) -> usize {
            self.1
        }
        fn all_gather_f64(&self, _: &[f64], _: &mut [f64]) -> fused_weighted_loss::Result<()> {
            panic!("no exchange is made")
        }
        fn all_gather_f32(&self, _: &[f32], _: &mut [f32]) -> fused_weighted_loss::Result<()> {
            panic!("no exchange is made")
        }
    }
    let case = random_case::<f32>(5, 40);
    let (shape, v) = (case.shape, case.shape.vocab());
    let full = VocabSlice::full(v).unwrap();
    for (rank, size) in [(3, 2), (2, 2), (0, 0), (0, MAX_RANKS + 1), (0, usize::MAX)] {
        let odd = Odd(rank, size);
        for call in [Sharded::vocab_parallel(full, &odd), Sharded::vocab_parallel(full, &Solo).with_data_group(&odd)] {
            let mut g = vec![7f32; case.logits.len()];
            let r = call.loss_and_grad(&case.spec, shape, &case.logits, case.tokens(), Grad::IntoF32(&mut g));
            assert!(matches!(r, Err(Error::Collective(_))), "rank {rank} of {size}: {r:?}");
            assert!(g.iter().all(|&x| x == 7.0), "rank {rank} of {size}: nothing written");
        }
    }
}

/// Random grids of 1–4 data ranks by 1–5 vocabulary ranks: random sample splits (data ranks
/// without samples included), uneven slices, chunked exchanges or not, f32 and bf16 logits,
/// every option, row mean and reduction from the seed; the loss, per-sample and per-token losses
/// and the gradient against the unsharded call, the same loss bits on every rank and the same
/// per-token bits across a vocabulary group. The gradient agrees within 1e-6 relative; where
/// it does not (the two f32 computations round differently: 1 seed in 81 000 of a campaign,
/// 1.8e-6, both paths 1.1–1.2e-6 from float64), both must lie within the f32 bound (1e-5) of the
/// float64 reference. Seeds: `FWL_TEST_CASES` (default 200, about a millisecond each in a release
/// build).
#[test]
fn random_grids_match_the_unsharded_call() {
    for seed in 0..u64::from(common::cases(200)) {
        let mut rng = Rng::new(seed ^ 0x5EED);
        let (data, vocab) = (1 + rng.below(4) as usize, 1 + rng.below(5) as usize);
        let chunk = [None, Some(1), Some(2), Some(3), Some(7)][rng.below(5) as usize];
        if rng.below(3) == 0 {
            random_grid::<bf16>(seed, data, vocab, chunk, &mut rng);
        } else {
            random_grid::<f32>(seed, data, vocab, chunk, &mut rng);
        }
    }
}

fn random_grid<L: Logit + Send + Sync>(seed: u64, data: usize, vocab: usize, chunk: Option<usize>, rng: &mut Rng) {
    let mut case = random_case::<L>(seed, 2 * vocab);
    let (t, v) = (case.shape.seq(), case.shape.vocab());
    let b = 1 + rng.below(data as u64 + 2) as usize;
    case.shape = Shape::new(b, t, v).unwrap();
    case.logits = synthetic::logits(seed, b * t * v, [1.0, 4.0, 12.0][rng.below(3) as usize]);
    case.ids = synthetic::ids(seed, b * t, v);
    let every = rng.below(4) as usize;
    // label 1 (the first row's target) is never ignored nor weighted 0: the loss is never 0
    case.labels =
        case.ids.iter().enumerate().map(|(i, &y)| if every > 0 && i % (every + 2) == 2 { -100 } else { y }).collect();
    case.weights = case.weights.map(|_| {
        let w = synthetic::logits::<f32>(seed ^ 9, b * t, 1.0);
        w.iter().enumerate().map(|(i, x)| if *x < -0.7 && i != 1 { 0.0 } else { x + 1.0 }).collect()
    });
    let (whole, wgrad, wpt) = case.whole();
    assert!(whole.loss.is_finite() && whole.loss != 0.0, "seed {seed}: degenerate case");
    // the samples cut at random points, equal points included: data ranks without samples
    let splits = random_splits(rng, data, b);
    let slices = random_slices(rng, vocab, v);
    let outs = run_grid(data, vocab, |d, p, vg, dg| {
        let part = case.samples(splits[d], splits[d + 1]);
        let local = columns(&part.logits, v, slices[p]);
        let mut grad = vec![f32::NAN; local.len()];
        let mut pt = vec![f32::NAN; (splits[d + 1] - splits[d]) * (t - 1)];
        let call = Sharded::vocab_parallel(slices[p], vg).with_data_group(dg);
        let call = if let Some(c) = chunk { call.with_chunk_rows(c) } else { call };
        let out = call
            .loss_and_grad_per_token(&part.spec, part.shape, &local, part.tokens(), Grad::IntoF32(&mut grad), &mut pt)
            .unwrap();
        (out, grad, pt)
    });
    let what = format!(
        "seed {seed}: {data}x{vocab} grid, samples {splits:?}, {slices:?}, chunk {chunk:?}, {}, {:?}",
        L::DTYPE,
        case.spec
    );
    let (mut g, mut pts) = (vec![f32::NAN; wgrad.len()], vec![f32::NAN; wpt.len()]);
    for (rank, (out, grad, pt)) in outs.iter().enumerate() {
        let (d, p) = (rank / vocab, rank % vocab);
        assert!(rel(out.loss, whole.loss) <= 1e-6, "{what}: rank {rank} loss {} vs {}", out.loss, whole.loss);
        assert!(rel(out.z_loss, whole.z_loss) <= 1e-6, "{what}: rank {rank} z-loss");
        assert_eq!(out.loss.to_bits(), outs[0].0.loss.to_bits(), "{what}: rank {rank}'s loss bits");
        let (b0, b1, s) = (splits[d], splits[d + 1], slices[p]);
        assert_eq!(out.weights, whole.weights[b0..b1], "{what}: rank {rank}'s weights");
        assert!(rel_err(&out.per_sample_loss, &whole.per_sample_loss[b0..b1]) <= 1e-6, "{what}: rank {rank}");
        assert_eq!(grad.len(), (b1 - b0) * t * s.len(), "{what}: rank {rank}'s gradient");
        for (i, row) in grad.chunks_exact(s.len()).enumerate() {
            let r = b0 * t + i;
            g[r * v + s.start()..r * v + s.end()].copy_from_slice(row);
        }
        // the per-token losses: the same bits on every rank of a vocabulary group
        assert_eq!(bits(pt), bits(&outs[d * vocab].2), "{what}: rank {rank}'s per-token losses");
        pts[b0 * (t - 1)..b1 * (t - 1)].copy_from_slice(pt);
    }
    let e = rel_err(&pts, &wpt);
    assert!(e <= 1e-6, "{what}: per-token losses rel err {e:e}");
    let e = rel_err(&g, &wgrad);
    if e.is_nan() || e > 1e-6 {
        let r = fused_weighted_loss::reference::reference(&case.spec, case.shape, &case.logits, case.tokens()).unwrap();
        let (es, ew) = (rel_err(&g, &r.grad), rel_err(&wgrad, &r.grad));
        assert!(e <= 1e-5 && es <= 1e-5 && ew <= 1e-5, "{what}: gradient rel err {e:e}; against f64 {es:e} / {ew:e}");
    }
}
