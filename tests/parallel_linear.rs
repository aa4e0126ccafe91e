//! The split of the fused linear path against the unsplit fused linear path, ranks simulated as
//! threads: 1 to 4 vocabulary ranks (uneven slices of `W`'s rows), data-parallel and a 2x2 grid,
//! with and without a bias, with the options; loss, `d W` and `d bias` equal within 1e-6
//! relative, `d hidden` as the rank-order sum of the ranks' parts, the same loss bits on every
//! rank.

mod common;
#[path = "common/shards.rs"]
mod shards;

use common::rel;
use fused_weighted_loss::parallel::{Sharded, VocabSlice};
use fused_weighted_loss::reference::rel_err;
use fused_weighted_loss::synthetic::{self, Rng};
use fused_weighted_loss::{
    Chunking, Grad, LinearGrads, LinearInputs, LinearOutput, LinearShape, LossSpec, Reduction, RowMean, Tokens,
};
use shards::{random_slices, random_splits, run_grid, run_ranks, ThreadGroup};

struct Case {
    shape: LinearShape,
    spec: LossSpec,
    hidden: Vec<f32>,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    ids: Vec<i64>,
    labels: Vec<i64>,
    weights: Vec<f32>,
}

/// Unsplit results: output, d hidden, d weight, d bias.
type Whole = (LinearOutput, Vec<f32>, Vec<f32>, Vec<f32>);

impl Case {
    fn new(seed: u64, b: usize, t: usize, h: usize, v: usize, bias: bool) -> Case {
        let mut rng = Rng::new(seed);
        let spec = LossSpec::builder()
            .keywords([1, 5])
            .row_mean(if rng.below(2) == 0 { RowMean::AllPositions } else { RowMean::ValidTokens })
            .reduction([Reduction::Mean, Reduction::WeightedMean, Reduction::Sum][rng.below(3) as usize])
            .z_loss(if rng.below(2) == 0 { 0.0 } else { 1e-3 })
            .label_smoothing(if rng.below(2) == 0 { 0.0 } else { 0.1 })
            .softcap(if rng.below(2) == 0 { None } else { Some(6.0) })
            .build()
            .unwrap();
        let ids = synthetic::ids::<i64>(seed, b * t, v);
        let labels = ids.iter().enumerate().map(|(i, &y)| if i % 4 == 3 { -100 } else { y }).collect();
        Case {
            shape: LinearShape::new(b, t, h, v).unwrap(),
            spec,
            hidden: synthetic::logits(seed + 1, b * t * h, 1.0),
            weight: synthetic::logits(seed + 2, v * h, 0.5),
            bias: bias.then(|| synthetic::logits(seed + 3, v, 1.0)),
            ids,
            labels,
            weights: synthetic::logits::<f32>(seed + 4, b * t, 0.5).iter().map(|x| x + 1.0).collect(),
        }
    }

    /// Samples `b0..b1` and weight rows `s` (`None`: all) of this case, as one rank sees them.
    fn part(&self, b0: usize, b1: usize, s: Option<VocabSlice>) -> Case {
        let (t, h, v) = (self.shape.seq(), self.shape.hidden(), self.shape.vocab());
        let (v0, v1) = s.map_or((0, v), |s| (s.start(), s.end()));
        Case {
            // a rank without samples: the sharded calls' empty shape
            shape: if b1 == b0 { LinearShape::without_samples(t, h, v) } else { LinearShape::new(b1 - b0, t, h, v) }
                .unwrap(),
            spec: self.spec.clone(),
            hidden: self.hidden[b0 * t * h..b1 * t * h].to_vec(),
            weight: self.weight[v0 * h..v1 * h].to_vec(),
            bias: self.bias.as_ref().map(|b| b[v0..v1].to_vec()),
            ids: self.ids[b0 * t..b1 * t].to_vec(),
            labels: self.labels[b0 * t..b1 * t].to_vec(),
            weights: self.weights[b0 * t..b1 * t].to_vec(),
        }
    }

    fn tokens(&self) -> Tokens<'_, i64> {
        Tokens::new(&self.ids).with_labels(&self.labels).with_token_weights(&self.weights)
    }

    fn inputs(&self) -> LinearInputs<'_, f32> {
        let i = LinearInputs::new(&self.hidden, &self.weight);
        match &self.bias {
            Some(b) => i.with_bias(b),
            None => i,
        }
    }

    /// Runs `call` (None: the unsplit path) with every gradient asked for.
    fn run(&self, call: Option<Sharded<'_>>) -> Whole {
        self.run_chunked(call, Chunking::Rows(3))
    }

    fn run_chunked(&self, call: Option<Sharded<'_>>, chunking: Chunking) -> Whole {
        let (h, rows) = (self.shape.hidden(), self.shape.rows());
        let wrows = self.weight.len() / h;
        let (mut dh, mut dw, mut db) = (vec![f32::NAN; rows * h], vec![f32::NAN; wrows * h], vec![f32::NAN; wrows]);
        let mut g = LinearGrads::new().hidden(Grad::Into(&mut dh)).weight(Grad::Into(&mut dw));
        if self.bias.is_some() {
            g = g.bias(Grad::Into(&mut db));
        }
        let out = match call {
            Some(c) => c.linear_loss_and_grad(&self.spec, self.shape, self.inputs(), self.tokens(), g, chunking),
            None => self.spec.linear_loss_and_grad(self.shape, self.inputs(), self.tokens(), g, chunking),
        };
        (out.unwrap(), dh, dw, db)
    }
}

fn slices(seed: u64, ranks: usize, v: usize) -> Vec<VocabSlice> {
    let mut rng = Rng::new(seed);
    let mut cuts: Vec<usize> = (1..v).filter(|_| rng.below(v as u64) < ranks as u64).collect();
    cuts.truncate(ranks - 1);
    while cuts.len() < ranks - 1 {
        let c = cuts.last().map_or(1, |c| c + 1);
        cuts.push(c);
    }
    let b: Vec<usize> = std::iter::once(0).chain(cuts).chain(std::iter::once(v)).collect();
    b.windows(2).map(|w| VocabSlice::new(w[0], w[1] - w[0], v).unwrap()).collect()
}

/// The rank-order sum of the ranks' `d hidden` parts.
fn sum_parts(parts: &[Vec<f32>]) -> Vec<f32> {
    let mut s = vec![0f32; parts[0].len()];
    for p in parts {
        s.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    s
}

fn check(what: &str, outs: &[Whole], whole: &Whole, slices: &[VocabSlice], h: usize, dh_tol: f64) {
    let (w, wdh, wdw, wdb) = whole;
    for (r, (o, ..)) in outs.iter().enumerate() {
        assert!(rel(o.loss.loss, w.loss.loss) <= 1e-6, "{what}: rank {r} loss {} vs {}", o.loss.loss, w.loss.loss);
        assert!(rel(o.loss.z_loss, w.loss.z_loss) <= 1e-6, "{what}: z-loss");
        assert_eq!(o.loss.loss.to_bits(), outs[0].0.loss.loss.to_bits(), "{what}: the same bits on every rank");
    }
    let dw: Vec<f32> = outs.iter().flat_map(|o| o.2.clone()).collect();
    let e = rel_err(&dw, wdw);
    assert!(e <= 1e-6, "{what}: d W rel err {e:e}");
    if outs[0].0.loss.loss.is_finite() && !w.loss.per_sample_loss.is_empty() {
        let db: Vec<f32> = outs.iter().zip(slices).flat_map(|(o, s)| o.3[..s.len()].to_vec()).collect();
        if !wdb.iter().any(|x| x.is_nan()) {
            let e = rel_err(&db, wdb);
            assert!(e <= 1e-6, "{what}: d bias rel err {e:e}");
        }
    }
    let dh = sum_parts(&outs.iter().map(|o| o.1.clone()).collect::<Vec<_>>());
    let e = rel_err(&dh, wdh);
    assert!(e <= dh_tol, "{what}: d hidden (sum of the parts) rel err {e:e}, H {h}");
}

#[test]
fn linear_vocab_parallel_matches_the_unsplit_path() {
    for ranks in 1..=4usize {
        for (seed, bias) in [(11u64, true), (12, false), (13, true)] {
            let seed = seed * 10 + ranks as u64;
            let c = Case::new(seed, 2, 5, 16, 301, bias);
            let whole = c.run(None);
            let sl = slices(seed, ranks, 301);
            let outs = run_ranks(ranks, |r, g: &ThreadGroup| {
                c.part(0, 2, Some(sl[r])).run(Some(Sharded::vocab_parallel(sl[r], g)))
            });
            check(&format!("{ranks} ranks, seed {seed}, bias {bias}, {:?}", c.spec), &outs, &whole, &sl, 16, 1e-6);
        }
    }
}

#[test]
fn linear_data_parallel_and_grid() {
    // (25, 26: a data rank without samples, first and in the middle)
    for (data, vocab, seed) in [(2usize, 1usize, 21u64), (3, 1, 22), (2, 2, 23), (2, 3, 24), (3, 1, 25), (3, 2, 26)] {
        let c = Case::new(seed, 3, 4, 8, 257, true);
        let whole = c.run(None);
        let splits: Vec<usize> = match seed {
            25 => vec![0, 0, 1, 3],
            26 => vec![0, 2, 2, 3],
            _ => (0..=data).map(|d| if d == data { 3 } else { d }).collect(),
        };
        let sl = slices(seed, vocab, 257);
        let outs = run_grid(data, vocab, |d, p, vg, dg| {
            c.part(splits[d], splits[d + 1], Some(sl[p]))
                .run(Some(Sharded::vocab_parallel(sl[p], vg).with_data_group(dg)))
        });
        let what = format!("{data}x{vocab} grid, {:?}", c.spec);
        let (w, wdh, wdw, wdb) = &whole;
        let h = 8;
        for (rank, (o, odh, odw, odb)) in outs.iter().enumerate() {
            assert!(
                rel(o.loss.loss, w.loss.loss) <= 1e-6,
                "{what}: rank {rank} loss {} vs {}",
                o.loss.loss,
                w.loss.loss
            );
            assert_eq!(o.loss.loss.to_bits(), outs[0].0.loss.loss.to_bits(), "{what}: same bits");
            let d = rank / vocab;
            if splits[d] == splits[d + 1] {
                assert!(odh.is_empty() && o.chunks == 0, "{what}: rank {rank} has no rows");
                assert!(odw.iter().chain(odb).all(|&x| x == 0.0), "{what}: rank {rank}: d W and d bias zero");
            }
        }
        // d W and d bias: sums over the data ranks of each vocabulary rank's rows
        for p in 0..vocab {
            let s = sl[p];
            let mut dw = vec![0f32; s.len() * h];
            let mut db = vec![0f32; s.len()];
            for d in 0..data {
                let o = &outs[d * vocab + p];
                dw.iter_mut().zip(&o.2).for_each(|(a, b)| *a += b);
                db.iter_mut().zip(&o.3).for_each(|(a, b)| *a += b);
            }
            let e = rel_err(&dw, &wdw[s.start() * h..s.end() * h]);
            assert!(e <= 1e-6, "{what}: d W rows of rank {p}: {e:e}");
            let e = rel_err(&db, &wdb[s.start()..s.end()]);
            assert!(e <= 1e-6, "{what}: d bias of rank {p}: {e:e}");
        }
        // d hidden: each data rank's rows, summed over its vocabulary group
        let mut dh = Vec::new();
        for d in 0..data {
            dh.extend(sum_parts(&(0..vocab).map(|p| outs[d * vocab + p].1.clone()).collect::<Vec<_>>()));
        }
        let e = rel_err(&dh, wdh);
        assert!(e <= 1e-6, "{what}: d hidden: {e:e}");
    }
}

/// Slices that own no target (every label in the first slice), and reruns: the same bits for the
/// loss and every gradient, rank by rank.
#[test]
fn linear_slices_without_targets_and_bit_identical_reruns() {
    let (v, ranks) = (240usize, 4usize);
    let mut c = Case::new(31, 2, 6, 12, v, true);
    c.ids.iter_mut().for_each(|y| *y %= 20);
    c.labels = c.ids.iter().enumerate().map(|(i, &y)| if i % 5 == 4 { -100 } else { y }).collect();
    let sl: Vec<VocabSlice> = (0..ranks).map(|r| VocabSlice::even(r, ranks, v).unwrap()).collect();
    assert!(sl[1].start() >= 20, "ranks 1.. own no target");
    let whole = c.run(None);
    let go = || {
        run_ranks(ranks, |r, g: &ThreadGroup| c.part(0, 2, Some(sl[r])).run(Some(Sharded::vocab_parallel(sl[r], g))))
    };
    let (a, b) = (go(), go());
    check(&format!("targets in rank 0 only, {:?}", c.spec), &a, &whole, &sl, 12, 1e-6);
    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for (r, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.0.loss, y.0.loss, "rank {r}: loss output");
        assert_eq!(bits(&x.1), bits(&y.1), "rank {r}: d hidden");
        assert_eq!(bits(&x.2), bits(&y.2), "rank {r}: d W");
        assert_eq!(bits(&x.3), bits(&y.3), "rank {r}: d bias");
    }
}

#[test]
fn linear_typed_errors() {
    use fused_weighted_loss::parallel::Solo;
    use fused_weighted_loss::Error;
    let c = Case::new(41, 1, 4, 8, 50, false);
    let part = c.part(0, 1, Some(VocabSlice::new(0, 10, 50).unwrap()));
    let call = |s: VocabSlice, case: &Case, ch: Chunking| {
        Sharded::vocab_parallel(s, &Solo).linear_loss_and_grad(
            &case.spec,
            case.shape,
            case.inputs(),
            case.tokens(),
            LinearGrads::new(),
            ch,
        )
    };
    // a slice of another vocabulary, a weight of the wrong rows, no rows per chunk
    let r = call(VocabSlice::new(0, 10, 51).unwrap(), &part, Chunking::Auto);
    assert!(matches!(r, Err(Error::InvalidVocabSlice { .. })), "{r:?}");
    let r = call(VocabSlice::new(0, 11, 50).unwrap(), &part, Chunking::Auto);
    assert!(matches!(r, Err(Error::LengthMismatch { .. })), "{r:?}");
    let r = call(VocabSlice::full(50).unwrap(), &c, Chunking::Rows(0));
    assert!(matches!(r, Err(Error::InvalidChunking(_))), "{r:?}");
    // a group of one whose slice is not the whole vocabulary does not tile it
    let r = call(VocabSlice::new(0, 10, 50).unwrap(), &part, Chunking::Auto);
    assert!(matches!(r, Err(Error::SlicesDoNotTile { .. })), "{r:?}");
    // two ranks with overlapping slices fail on both, none hangs, before any gradient buffer is
    // written: an accumulated d W and a d hidden stay as they were
    let over = [VocabSlice::new(0, 30, 50).unwrap(), VocabSlice::new(25, 25, 50).unwrap()];
    let errs = run_ranks(2, |r, g: &ThreadGroup| {
        let p = c.part(0, 1, Some(over[r]));
        let (mut dh, mut dw) = (vec![0.5f32; p.hidden.len()], vec![0.25f32; p.weight.len()]);
        let grads = LinearGrads::new().hidden(Grad::Into(&mut dh)).weight(Grad::Into(&mut dw)).accumulate(true);
        let out = Sharded::vocab_parallel(over[r], g).linear_loss_and_grad(
            &p.spec,
            p.shape,
            p.inputs(),
            p.tokens(),
            grads,
            Chunking::Auto,
        );
        (out, dh.iter().all(|&x| x == 0.5) && dw.iter().all(|&x| x == 0.25))
    });
    assert!(errs.iter().all(|e| matches!(e.0, Err(Error::SlicesDoNotTile { .. }))), "{errs:?}");
    assert!(errs.iter().all(|e| e.1), "a gradient buffer was written before the error");
}

/// A rank without samples: with `accumulate` its `d W` and `d bias` stay as they were; alone, or
/// in a data group without any sample, it is an error; a chunking its peers reject, it rejects.
#[test]
fn linear_rank_without_samples_accumulates_nothing_and_its_errors() {
    use fused_weighted_loss::parallel::Solo;
    use fused_weighted_loss::Error;
    let c = Case::new(51, 2, 4, 8, 40, true);
    let whole = c.run(None);
    let full = VocabSlice::full(40).unwrap();
    let outs = run_ranks(2, |r, g: &ThreadGroup| {
        let p = c.part(0, 2 * r, None);
        let (mut dw, mut db) = (vec![0.25f32; 40 * 8], vec![-0.5f32; 40]);
        let grads = LinearGrads::new().weight(Grad::Into(&mut dw)).bias(Grad::Into(&mut db)).accumulate(true);
        let out = Sharded::data_parallel(40, g)
            .linear_loss_and_grad(&p.spec, p.shape, p.inputs(), p.tokens(), grads, Chunking::Rows(3))
            .unwrap();
        (out, dw, db)
    });
    let (empty, dw, db) = &outs[0];
    assert!(empty.loss.weights.is_empty() && empty.chunks == 0);
    assert_eq!(empty.loss.loss.to_bits(), outs[1].0.loss.loss.to_bits(), "the same loss bits");
    assert!(rel(empty.loss.loss, whole.0.loss.loss) <= 1e-6, "the whole batch's loss");
    assert!(dw.iter().all(|&x| x == 0.25) && db.iter().all(|&x| x == -0.5), "accumulate: untouched");
    let e = rel_err(&outs[1].1.iter().map(|x| x - 0.25).collect::<Vec<_>>(), &whole.2);
    assert!(e <= 1e-6, "the rank with samples accumulates the whole d W: {e:e}");

    let p = c.part(0, 0, None);
    let alone = Sharded::data_parallel(40, &Solo).linear_loss_and_grad(
        &p.spec,
        p.shape,
        p.inputs(),
        p.tokens(),
        LinearGrads::new(),
        Chunking::Auto,
    );
    assert!(matches!(alone, Err(Error::EmptyBatch)), "{alone:?}");
    let plain = p.spec.linear_loss_and_grad(p.shape, p.inputs(), p.tokens(), LinearGrads::new(), Chunking::Auto);
    assert!(matches!(plain, Err(Error::EmptyBatch)), "{plain:?}");
    let both = run_ranks(2, |_, g: &ThreadGroup| {
        Sharded::vocab_parallel(full, &Solo).with_data_group(g).linear_loss_and_grad(
            &p.spec,
            p.shape,
            p.inputs(),
            p.tokens(),
            LinearGrads::new(),
            Chunking::Auto,
        )
    });
    assert!(both.iter().all(|r| matches!(r, Err(Error::EmptyDataGroup))), "{both:?}");
    let zero_rows = run_ranks(2, |r, g: &ThreadGroup| {
        let p = c.part(0, r, None);
        Sharded::data_parallel(40, g).linear_loss_and_grad(
            &p.spec,
            p.shape,
            p.inputs(),
            p.tokens(),
            LinearGrads::new(),
            Chunking::Rows(0),
        )
    });
    assert!(zero_rows.iter().all(|r| matches!(r, Err(Error::InvalidChunking(_)))), "{zero_rows:?}");
}

/// The memory a rank reports: its chunk buffers (those of the single-device call on its slice
/// alone) and the exponentials it keeps between statistics and gradient, none for a slice longer
/// than 2^22 (whose rows are recomputed; it reported `chunk × slice × 4` bytes it never held).
#[test]
fn linear_scratch_bytes_of_a_slice_beyond_the_kept_rows() {
    let v = (1usize << 22) + 3;
    let c = Case::new(41, 1, 3, 2, v, false);
    let spec = LossSpec::default();
    let sl = [VocabSlice::new(0, v - 2, v).unwrap(), VocabSlice::new(v - 2, 2, v).unwrap()];
    let outs = run_ranks(2, |r, g: &ThreadGroup| {
        let part = Case { spec: spec.clone(), ..c.part(0, 1, Some(sl[r])) };
        part.run(Some(Sharded::vocab_parallel(sl[r], g)))
    });
    for (r, (out, ..)) in outs.iter().enumerate() {
        // the single-device call on this slice alone, the same chunks
        let alone = Case { spec: spec.clone(), ..c.part(0, 1, Some(sl[r])) };
        let len = sl[r].len() as i64;
        let (ids, labels) =
            (alone.ids.iter().map(|y| y % len).collect(), alone.labels.iter().map(|y| y % len).collect());
        let alone = Case { shape: LinearShape::new(1, 3, 2, sl[r].len()).unwrap(), ids, labels, ..alone };
        let (solo, ..) = alone.run(None);
        assert_eq!(out.chunk_rows, solo.chunk_rows, "rank {r}: the same chunks");
        let kept = if r == 0 { 0 } else { out.chunk_rows * sl[r].len() * 4 };
        assert_eq!(out.scratch_bytes, solo.scratch_bytes + kept, "rank {r}: chunk buffers and kept rows");
    }
}

/// A budget holds the split path's chunk buffers as it holds the single-device call's on the
/// rank's slice alone: the same rows per chunk. Its count of a row's bytes left out the row's
/// part of the logits panel (4 bytes per panel row, as many as the slice's columns at H = 64),
/// and took twice the rows the budget allows.
#[test]
fn a_budget_holds_the_split_chunks_as_it_holds_the_single_device_ones() {
    let (v, h) = (32_000, 64);
    let c = Case::new(43, 2, 100, h, v, false);
    let spec = LossSpec::default();
    let sl = [VocabSlice::new(0, v / 2, v).unwrap(), VocabSlice::new(v / 2, v / 2, v).unwrap()];
    let budget = Chunking::Budget(4 << 20);
    let outs = run_ranks(2, |r, g: &ThreadGroup| {
        let part = Case { spec: spec.clone(), ..c.part(0, 2, Some(sl[r])) };
        part.run_chunked(Some(Sharded::vocab_parallel(sl[r], g)), budget)
    });
    for (r, (out, ..)) in outs.iter().enumerate() {
        let alone = Case { spec: spec.clone(), ..c.part(0, 2, Some(sl[r])) };
        let len = sl[r].len() as i64;
        let (ids, labels) =
            (alone.ids.iter().map(|y| y % len).collect(), alone.labels.iter().map(|y| y % len).collect());
        let alone = Case { shape: LinearShape::new(2, 100, h, sl[r].len()).unwrap(), ids, labels, ..alone };
        let (solo, ..) = alone.run_chunked(None, budget);
        assert!(solo.chunk_rows > 1 && solo.chunks > 1, "rank {r}: a budget that cuts ({solo:?})");
        assert_eq!(out.chunk_rows, solo.chunk_rows, "rank {r}: the same rows per chunk");
    }
}

/// Random grids of 1–3 data ranks by 1–4 vocabulary ranks over random shapes (H 1–40, V 10 to
/// 621, with or without a bias), random sample splits (data ranks without samples included),
/// uneven slices and chunk sizes, the options from the seed: the loss (1e-6, the same bits on
/// every rank) and `d W`, `d bias`, `d hidden` summed over the ranks that share them, against
/// the unsplit path. Those sums add the data ranks' parts in another order than the unsplit
/// path's chunks, so where a row's terms cancel their rounding shows: within 1e-5 (the worst of
/// a 20 000-seed campaign: 1.9e-6). Seeds: `FWL_TEST_CASES` (default 200).
#[test]
fn random_grids_match_the_unsplit_path() {
    let cases = u64::from(common::cases(200));
    let mut worst = 0f64;
    for seed in 0..cases {
        let mut rng = Rng::new(seed ^ 0xABC);
        let (data, vocab) = (1 + rng.below(3) as usize, 1 + rng.below(4) as usize);
        let (b, t, h) =
            (1 + rng.below(data as u64 + 2) as usize, 2 + rng.below(5) as usize, 1 + rng.below(40) as usize);
        let v = 4 * vocab + 6 + rng.below(600) as usize; // keywords 1 and 5 in range
        let c = Case::new(seed, b, t, h, v, rng.below(2) == 0);
        let chunking = Chunking::Rows(1 + rng.below(6) as usize);
        let whole = c.run_chunked(None, chunking);
        let splits = random_splits(&mut rng, data, b);
        let sl = random_slices(&mut rng, vocab, v);
        let outs = run_grid(data, vocab, |d, p, vg, dg| {
            c.part(splits[d], splits[d + 1], Some(sl[p]))
                .run_chunked(Some(Sharded::vocab_parallel(sl[p], vg).with_data_group(dg)), chunking)
        });
        let what = format!(
            "seed {seed}: {data}x{vocab} grid, b {b} t {t} h {h} v {v}, samples {splits:?}, {chunking:?}, {:?}",
            c.spec
        );
        let (w, wdh, wdw, wdb) = &whole;
        assert!(w.loss.loss.is_finite() && w.loss.loss != 0.0, "{what}: degenerate case");
        for (rank, o) in outs.iter().enumerate() {
            assert!(
                rel(o.0.loss.loss, w.loss.loss) <= 1e-6,
                "{what}: rank {rank} loss {} vs {}",
                o.0.loss.loss,
                w.loss.loss
            );
            assert_eq!(o.0.loss.loss.to_bits(), outs[0].0.loss.loss.to_bits(), "{what}: rank {rank}'s loss bits");
        }
        let mut within = |e: f64, part: &str| {
            worst = worst.max(e);
            assert!(e <= 1e-5, "{what}: {part} rel err {e:e}");
        };
        for (p, s) in sl.iter().enumerate() {
            let (mut dw, mut db) = (vec![0f32; s.len() * h], vec![0f32; s.len()]);
            for d in 0..data {
                let o = &outs[d * vocab + p];
                dw.iter_mut().zip(&o.2).for_each(|(a, b)| *a += b);
                db.iter_mut().zip(&o.3).for_each(|(a, b)| *a += b);
            }
            within(rel_err(&dw, &wdw[s.start() * h..s.end() * h]), &format!("d W of vocabulary rank {p}"));
            if c.bias.is_some() {
                within(rel_err(&db, &wdb[s.start()..s.end()]), &format!("d bias of vocabulary rank {p}"));
            }
        }
        let mut dh = Vec::new();
        for d in 0..data {
            dh.extend(sum_parts(&(0..vocab).map(|p| outs[d * vocab + p].1.clone()).collect::<Vec<_>>()));
        }
        within(rel_err(&dh, wdh), "d hidden");
    }
    println!("random_grids_match_the_unsplit_path: {cases} seeds, worst gradient rel err {worst:e}");
}
