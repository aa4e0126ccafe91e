//! The whole of `kernels/weighted_loss.cu` (plan, every rows kernel variant, finish, scale, and
//! the vocabulary- and data-parallel split's kernels) compiled by the system C++ compiler (`$CXX`,
//! else `c++`; without one each test prints that it skipped, or fails with `FWL_REQUIRE_CXX=1`)
//! against `tests/kernel_host/emu.h`, which runs a block's threads as fibers with CUDA's
//! barriers and warp shuffles, and launched as the crate launches them
//! (`tests/kernel_host/calls.cpp`, `common::kernel_calls`):
//!
//! - random calls against the float64 reference, the first 42 through every (dtype pair, rows
//!   kernel) once: blocks of 32 to 1024 threads, grids that stride, shared-memory budgets from
//!   none to the whole row, rows in chunks at their row offsets, misaligned and in-place
//!   buffers, every option and id type, confident rows, `-inf` logits, long sequences;
//! - the split on random grids of 1–3 data (some without samples) × 1–5 vocabulary ranks,
//!   chunked rows or a lone vocabulary rank's whole rows, every rank of a vocabulary group
//!   coming to the same bits;
//! - the same bits through the rows kernels that promise them, on grids of 1, 2 and 3 blocks;
//! - the reports of bad ids, labels, token weights, sample weights beyond f64 (the flag) and
//!   non-finite rows;
//! - `fwl_scale_*` bit for bit: every element multiplied once, nothing written around the
//!   gradient, a scale of exactly 1 leaving it as it was (signalling NaNs included, which a
//!   product would quiet).
//!
//! What this checks is the kernels' logic (indexing, reductions, barriers, the options, the
//! split's exchanges), not the device's arithmetic (the intrinsics are the host's, `__expf`
//! with the device's rounding of its argument) nor its memory model: the GPU tests still wait
//! for a GPU. `FWL_TEST_CASES=N` sets the random calls; `FWL_EMU_KEEP=<file>` keeps the loss
//! tests' call being checked (after a failed check, the failing one), or all of a run's calls
//! (the scale test's too) when the emulation itself fails (the failing call's index is in its
//! message), for `calls <file> <out>` by hand.

mod common;

use common::kernel_calls::{
    calls_exe, keep, run, run_narrow, run_scale, Call, GradMode, NarrowCall, Outputs, ScaleCall, Split, FAMILIES,
    PAIRS, SCALE_GUARD,
};
use common::{cases, rel};
use fused_weighted_loss::reference::{reference, rel_err};
use fused_weighted_loss::synthetic::Rng;
use fused_weighted_loss::{bf16, f16, DType, LossSpec, Reduction, RowMean, Shape, Tokens};

/// `x` as the dtype holds it.
fn round_to(d: DType, x: f32) -> f32 {
    match d {
        DType::F32 => x,
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
    }
}

/// A random call: shapes with odd and tiny vocabularies, every option, every launch geometry;
/// `kernel`: the (dtype pair, rows kernel family) indices to take (a lean plain family forces
/// the plain loss), else random ones.
fn random_call(rng: &mut Rng, kernel: Option<(usize, usize)>) -> Call {
    let pair = match kernel {
        Some((p, _)) => PAIRS[p],
        None => PAIRS[rng.below(PAIRS.len() as u64) as usize],
    };
    // the crate's blocks (1024 threads; the rows kernels 256, 512 or 1024) and smaller ones,
    // whose reductions take other shapes
    let threads = match rng.below(8) {
        0 | 1 => 1024,
        2 => 512,
        _ => 32 * (1 + rng.below(8) as u32),
    };
    let big_block = threads >= 512;
    // one call in ten of long sequences over a small vocabulary (the plan's and the finish's
    // loops over positions and samples go round more than once)
    let long = rng.below(10) == 0;
    let v = match rng.below(6) {
        _ if long => 1 + rng.below(40) as usize,
        0 => 1 + rng.below(9) as usize,
        1 => [31, 32, 33, 63, 64, 65, 127, 128, 129][rng.below(9) as usize],
        _ => 1 + rng.below(if big_block { 12_000 } else { 3000 }) as usize,
    };
    let (b, t) = match () {
        _ if long => (1 + rng.below(2) as usize, 33 + rng.below(16) as usize),
        _ => (1 + rng.below(3) as usize, 2 + rng.below(if big_block { 2 } else { 4 }) as usize),
    };
    let shape = Shape::new(b, t, v).unwrap();
    let rows = b * t;
    let mut builder = LossSpec::builder()
        .row_mean(if rng.below(2) == 0 { RowMean::AllPositions } else { RowMean::ValidTokens })
        .reduction([Reduction::Mean, Reduction::WeightedMean, Reduction::Sum][rng.below(3) as usize])
        .alpha([1.0, 0.5, 2.5][rng.below(3) as usize])
        .grad_scale([1.0, 0.25, 3.0][rng.below(3) as usize]);
    // plain loss one call in three (the lean kernels' case), else random options
    let lean_plain = matches!(kernel, Some((_, 1 | 2 | 4 | 5)));
    let (mut cap, plain) = (None, rng.below(3) == 0 || lean_plain);
    if !plain {
        let (bld, c) = common::random_options(rng, builder);
        builder = bld;
        cap = c;
    }
    let id_type = rng.below(3) as i64;
    // an ignored id: the usual -100 (i32 / i64 ids), or an id of the vocabulary (u32 too)
    let ignore = if id_type != 2 && rng.below(2) == 0 { -100 } else { rng.below(v as u64) as i64 };
    builder = builder.ignore_index(ignore);
    let mut ids: Vec<i64> = (0..rows).map(|_| rng.below(v as u64) as i64).collect();
    for id in ids.iter_mut() {
        if rng.below(6) == 0 {
            *id = ignore;
        }
    }
    let labels = (rng.below(4) == 0).then(|| {
        (0..rows).map(|_| if rng.below(6) == 0 { ignore } else { rng.below(v as u64) as i64 }).collect::<Vec<_>>()
    });
    // up to 3 keywords, one call in eight up to 64 (more than a small block's threads)
    let nk = if rng.below(8) == 0 { 33 + rng.below(32) } else { rng.below(4) } as usize;
    let keywords: Vec<(i64, f64)> =
        (0..nk).map(|_| (rng.below(v as u64) as i64, [1.0, 0.5, 2.0][rng.below(3) as usize])).collect();
    builder = builder.weighted_keywords(keywords);
    let token_weights =
        (rng.below(3) == 0).then(|| (0..rows).map(|_| (rng.below(5) as f32) * 0.5).collect::<Vec<f32>>());
    let spec = builder.build().unwrap();
    // logits of scale 0.5 to 8 around a common offset, a spike of 25 now and then; with a cap, within
    // three caps and offsets of at most 30 (capped logits near ±150 are f32 values 1.5e-5 apart:
    // a softmax error of up to 7.6e-6 from their rounding alone, whatever computes them)
    let scale = [0.5f32, 2.0, 8.0][rng.below(3) as usize];
    let offset = [0.0f32, 0.0, 30.0, if cap.is_some() { -30.0 } else { -200.0 }][rng.below(4) as usize];
    let mut logits = (0..shape.logits_len())
        .map(|_| {
            let mut z = offset + scale * (2.0 * rng.unit() as f32 - 1.0);
            // (not into f16 gradients: a spike on a target of a vocabulary of two leaves the
            // row's gradient at e^-25, which f16 holds as 0, whatever computes it)
            if rng.below(500) == 0 && pair.1 != DType::F16 {
                z += 25.0;
            }
            if let Some(c) = cap {
                z = z.clamp(-3.0 * c, 3.0 * c);
            }
            round_to(pair.0, z)
        })
        .collect::<Vec<f32>>();
    // one call in six without a cap: confident rows, each target 14 to 26 above the rest (a loss
    // of 1e-6 to 1e-11 that only the target's term kept out of the others' sum keeps accurate);
    // not into f16 gradients, whose entries of e^-14 and below round to 0 (f16 ends at 6e-8)
    if cap.is_none() && pair.1 != DType::F16 && rng.below(6) == 0 {
        let targets = labels.as_ref().unwrap_or(&ids);
        for (row, pos) in (0..rows).filter(|r| !(r + 1).is_multiple_of(t)).map(|r| (r, r + 1)) {
            let y = targets[pos];
            if (0..v as i64).contains(&y) {
                let z = &mut logits[row * v + y as usize];
                *z = round_to(pair.0, offset + scale + [14.0, 20.0, 26.0][rng.below(3) as usize]);
            }
        }
    }
    // one call in eight without label smoothing (whose mean of the logits would be -inf): some
    // logits -inf, some 100 below the row's largest (past the exponential's flush to zero), no
    // target among them
    if spec.label_smoothing() == 0.0 && rng.below(8) == 0 {
        let targets = labels.as_ref().unwrap_or(&ids);
        let target_of =
            |row: usize| (!(row + 1).is_multiple_of(t)).then(|| targets[row + 1]).filter(|y| (0..v as i64).contains(y));
        for row in 0..rows {
            let top = logits[row * v..(row + 1) * v].iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z));
            for j in 0..v {
                if target_of(row) == Some(j as i64) {
                    continue;
                }
                match rng.below(20) {
                    0 => logits[row * v + j] = f32::NEG_INFINITY,
                    1 if cap.is_none() => logits[row * v + j] = round_to(pair.0, top - 100.0),
                    _ => {}
                }
            }
        }
    }
    let family = match kernel {
        Some((_, f)) => f,
        None if plain => rng.below(FAMILIES.len() as u64) as usize,
        None => [0, 3][rng.below(2) as usize],
    };
    let grad = match rng.below(5) {
        0 => GradMode::None,
        1 if pair.0 == pair.1 => GradMode::InPlace,
        _ => GradMode::Separate,
    };
    let row_vectors = (v * pair.0.size()).div_ceil(16) as i64;
    Call {
        pair,
        id_type,
        family,
        shape,
        spec,
        threads,
        grid: 1 + rng.below(rows.min(4) as u64) as u32,
        smem_cap: [0, 1 + rng.below(row_vectors as u64) as i64, row_vectors, 1 << 20][rng.below(4) as usize],
        logits_offset: rng.below(8) as i64,
        grad,
        grad_offset: rng.below(8) as i64,
        scale_on_device: rng.below(2) == 0,
        logits,
        ids,
        labels,
        token_weights,
        split: None,
        chunk: if rng.below(2) == 0 { rows as i64 } else { 1 + rng.below(rows as u64 + 1) as i64 },
    }
}

/// Compares one call's outputs with the float64 reference; returns the gradient's error.
fn check(c: &Call, o: &Outputs) -> f64 {
    let what = format!(
        "{} {:?}->{:?} {:?} threads {} grid {} smem {} offsets {}/{} {:?} chunk {} ids {:?} labels {:?} \
         token weights {:?} spec {:?} split {:?}",
        if c.split.is_some() { "split" } else { FAMILIES[c.family] },
        c.pair.0,
        c.pair.1,
        c.shape,
        c.threads,
        c.grid,
        c.smem_cap,
        c.logits_offset,
        c.grad_offset,
        c.grad,
        c.chunk,
        c.ids,
        c.labels,
        c.token_weights,
        c.spec,
        c.split
    );
    let mut tokens = Tokens::new(&c.ids);
    if let Some(l) = &c.labels {
        tokens = tokens.with_labels(l);
    }
    if let Some(w) = &c.token_weights {
        tokens = tokens.with_token_weights(w);
    }
    let r = reference(&c.spec, c.shape, &c.logits, tokens).unwrap();
    let (grad_tol, loss_tol) =
        (if c.pair.1 == DType::F32 { 1e-5 } else { 1.5e-2 }, if c.pair.0 == DType::F32 { 1e-5 } else { 1e-4 });
    assert_eq!(o.status, [0, -1, 0, -1, 0, -1, -1], "{what}: status");
    assert_eq!(o.status_values, [0.0, 0.0], "{what}: status values");
    let e = rel(o.loss, r.loss);
    assert!(e <= loss_tol, "{what}: loss {} vs {} ({e:e})", o.loss, r.loss);
    assert!(rel(o.loss_f32, r.loss) <= loss_tol.max(1e-6), "{what}: the f32 loss {} vs {}", o.loss_f32, r.loss);
    if c.spec.z_loss() == 0.0 {
        assert_eq!(o.z_loss, 0.0, "{what}: the z-loss of a loss without one");
    }
    let e = rel(o.z_loss, r.z_loss);
    assert!(e <= loss_tol, "{what}: z-loss {} vs {} ({e:e})", o.z_loss, r.z_loss);
    // the z-loss per sample, reduced as the loss is (sample weight over the reduction's divisor)
    if c.spec.z_loss() != 0.0 {
        let denom = match c.spec.reduction() {
            Reduction::Mean => c.shape.batch() as f64,
            Reduction::WeightedMean => r.weights.iter().sum(),
            Reduction::Sum => 1.0,
        };
        let z: f64 = o.per_sample_z.iter().zip(&r.weights).map(|(z, w)| z * w / denom).sum();
        let e = rel(z, r.z_loss);
        assert!(e <= loss_tol, "{what}: per-sample z-losses reduced {z} vs {} ({e:e})", r.z_loss);
    }
    let e = rel_err(&o.per_sample, &r.per_sample_loss);
    assert!(e <= loss_tol, "{what}: per-sample losses ({e:e})");
    assert!(rel_err(&o.weights, &r.weights) <= 1e-12, "{what}: weights {:?} vs {:?}", o.weights, r.weights);
    let valid: Vec<i64> = r.valid_tokens.iter().map(|&v| v as i64).collect();
    assert_eq!(o.valid, valid, "{what}: valid targets");
    // each row's loss (the last position of a sample predicts nothing: 0)
    let (b, t) = (c.shape.batch(), c.shape.seq());
    let mut rows = Vec::new();
    for s in 0..b {
        assert_eq!(o.row_loss[s * t + t - 1], 0.0, "{what}: a sample's last position");
        rows.extend_from_slice(&o.row_loss[s * t..s * t + t - 1]);
    }
    let e = rel_err(&rows, &r.token_loss);
    assert!(e <= loss_tol, "{what}: per-token losses ({e:e})");
    // and each on its own: a confident row's 1e-11 among losses of 5, within the bound; below
    // about 1e-36 (the others' f32 sum subnormal), within V · 1.2e-38 (README's semantics
    // table); an ignored row, or one without competitors, exactly 0
    let v = c.shape.vocab();
    for (i, (&a, &b)) in rows.iter().zip(&r.token_loss).enumerate() {
        let ok = if b == 0.0 { a == 0.0 } else { (a - b).abs() <= loss_tol * b.abs() + v as f64 * 1.2e-38 };
        assert!(ok, "{what}: the loss of row {i} (of the [B, T - 1] rows): {a} vs {b}");
    }
    if c.grad == GradMode::None {
        return 0.0;
    }
    let e = rel_err(&o.grad, &r.grad);
    assert!(e <= grad_tol, "{what}: gradient ({e:e})");
    // and each row's on its own: rows without a target (or a weight) exactly 0; besides the
    // bound, what the gradient's dtype cannot hold (f16: half its smallest step, 3e-8, an entry)
    // and the f32 others' sum's absolute error below about 1e-36 (V · 1.2e-38 of the loss, times
    // the row's coefficient: at most 10 here)
    let floor = if c.pair.1 == DType::F16 { 3e-8 * (v as f64).sqrt() } else { 0.0 } + v as f64 * 1.2e-37;
    for (row, (a, b)) in o.grad.chunks(v).zip(r.grad.chunks(v)).enumerate() {
        // the whole row, then the row without its largest entry (the target's, mostly): in a
        // near-uniform row of 16-bit gradients that entry is nearly all of the norm, and every
        // other entry could be 0 within the first bound (by 1/√V)
        let big = (0..v).max_by(|&i, &j| b[i].abs().total_cmp(&b[j].abs())).unwrap_or(0);
        for skip in [None, Some(big)] {
            let kept = |i: &usize| Some(*i) != skip;
            let norm = (0..v).filter(kept).map(|i| b[i] * b[i]).sum::<f64>().sqrt();
            let diff = (0..v).filter(kept).map(|i| (f64::from(a[i]) - b[i]).powi(2)).sum::<f64>().sqrt();
            let ok = if norm == 0.0 { diff == 0.0 } else { diff <= grad_tol * norm + floor };
            let part = if skip.is_some() { ", without its largest entry" } else { "" };
            assert!(ok, "{what}: the gradient of row {row}{part}: {diff:e} off a norm of {norm:e}");
        }
    }
    e
}

/// `pieces + 1` sorted cuts from 0 to `len`, every piece non-empty (`pieces` at most `len`).
fn random_cuts(rng: &mut Rng, len: usize, pieces: usize) -> Vec<i64> {
    let mut inner: Vec<i64> = Vec::new();
    while inner.len() + 1 < pieces {
        let c = 1 + rng.below(len as u64 - 1) as i64;
        if !inner.contains(&c) {
            inner.push(c);
        }
    }
    inner.sort_unstable();
    std::iter::once(0).chain(inner).chain(std::iter::once(len as i64)).collect()
}

/// A random call of the split's kernels: 1–3 data ranks (some without samples), 1–5 vocabulary
/// ranks (uneven, some without the targets), chunks of 1 row to more than all, or whole rows.
fn random_split_call(rng: &mut Rng) -> Call {
    let mut c = random_call(rng, None);
    let (b, v, rows) = (c.shape.batch(), c.shape.vocab(), c.shape.batch() * c.shape.seq());
    let data = 1 + rng.below(b.min(3) as u64) as usize;
    let vocab = 1 + rng.below(v.min(5) as u64) as usize;
    // one grid in four with 2–3 data ranks, some without samples
    let sample_cuts = if rng.below(4) == 0 {
        let mut cuts: Vec<i64> = (0..1 + rng.below(2)).map(|_| rng.below(b as u64 + 1) as i64).collect();
        cuts.sort_unstable();
        std::iter::once(0).chain(cuts).chain(std::iter::once(b as i64)).collect()
    } else {
        random_cuts(rng, b, data)
    };
    c.split = Some(Split {
        sample_cuts,
        column_cuts: random_cuts(rng, v, vocab),
        whole_rows: vocab == 1 && rng.below(2) == 0,
    });
    c.chunk = 1 + rng.below(rows as u64 + 2) as i64;
    // one call in three on a block as the tiled schedule fits one (`block_threads`: one thread
    // per four columns of a vocabulary block, 128 to 1024), most of them an odd count of 9 to 31
    // warps that `random_call` never draws
    if rng.below(3) == 0 {
        c.threads = 32 * (4 + rng.below(29) as u32);
    }
    c
}

#[test]
fn split_kernels_emulated_on_the_host_match_the_reference() {
    let Some(exe) = calls_exe() else { return };
    let n = cases(40);
    let mut rng = Rng::new(0x73706c6974);
    let calls: Vec<Call> = (0..n).map(|_| random_split_call(&mut rng)).collect();
    let outs = run(exe, &calls, "split");
    let mut worst = 0f64;
    for (c, o) in calls.iter().zip(&outs) {
        keep(c);
        worst = worst.max(check(c, o));
    }
    println!("{n} split calls; worst gradient error {worst:.2e}");
}

#[test]
fn kernels_emulated_on_the_host_match_the_reference() {
    let Some(exe) = calls_exe() else { return };
    let n = cases(60);
    let mut rng = Rng::new(0x6b65726e);
    // the first 42 calls take every (dtype pair, rows kernel) once, the rest at random
    let kernels = PAIRS.len() * FAMILIES.len();
    let calls: Vec<Call> = (0..n as usize)
        .map(|i| random_call(&mut rng, (i < kernels).then(|| (i % PAIRS.len(), i / PAIRS.len()))))
        .collect();
    let outs = run(exe, &calls, "random");
    let mut worst = [0f64; 3];
    let mut seen = [[0u32; FAMILIES.len()]; PAIRS.len()];
    for (c, o) in calls.iter().zip(&outs) {
        keep(c);
        let e = check(c, o);
        let k = match c.pair.1 {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        };
        if e > worst[k] && std::env::var("FWL_SHOW_WORST").is_ok() {
            println!(
                "new worst {e:.3e}: {} {:?}->{:?} {:?} spec {:?}",
                FAMILIES[c.family], c.pair.0, c.pair.1, c.shape, c.spec
            );
        }
        worst[k] = worst[k].max(e);
        seen[PAIRS.iter().position(|&p| p == c.pair).unwrap()][c.family] += 1;
    }
    println!("{n} calls; worst gradient error f32 {:.2e}, f16 {:.2e}, bf16 {:.2e}", worst[0], worst[1], worst[2]);
    println!("calls per (dtype pair, family): {seen:?}");
    if n as usize >= kernels {
        assert!(seen.iter().flatten().all(|&k| k > 0), "every (dtype pair, rows kernel) called: {seen:?}");
    }
}

/// The bits `d` stores for `x` (rounded to nearest even).
fn bits_of(d: DType, x: f32) -> u32 {
    match d {
        DType::F32 => x.to_bits(),
        DType::F16 => f16::from_f32(x).to_bits() as u32,
        DType::BF16 => bf16::from_f32(x).to_bits() as u32,
    }
}

#[test]
fn emulated_scale_kernel_scales_every_element_once() {
    let Some(exe) = calls_exe() else { return };
    let n = cases(40);
    let mut rng = Rng::new(0x7363616c65);
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    // signalling NaNs with payloads, which any product would quiet: a scale of exactly 1 must
    // leave them as they are (the kernel returns at once)
    let odd_nans = |d: DType| match d {
        DType::F32 => [0x7f80_0001u32, 0xff80_1234],
        DType::F16 => [0x7c01, 0xfc15],
        DType::BF16 => [0x7f81, 0xff85],
    };
    let mut values = Vec::new();
    let calls: Vec<ScaleCall> = (0..n)
        .map(|i| {
            let dtype = dtypes[i as usize % 3];
            let len = match rng.below(4) {
                0 => rng.below(40) as usize,
                _ => 1 + rng.below(6000) as usize,
            };
            // as api.rs launches it (1024 threads, a grid of at most 4 per SM) and smaller
            // blocks and grids, so that the grid strides
            let threads = if rng.below(2) == 0 { 1024 } else { 32 * (1 + rng.below(8) as u32) };
            let grid = 1 + rng.below((len as u64).div_ceil(threads as u64).clamp(1, 8)) as u32;
            // exactly 1 (the kernel returns at once), 0, -1, a product overflowing f16, one
            // underflowing into subnormals, and random magnitudes of either sign
            let scale = match rng.below(8) {
                0 | 1 => 1.0,
                2 => 0.0,
                3 => -1.0,
                4 => 7.0e4,
                5 => 3.0e-6,
                _ => ((rng.unit() * 12.0 - 6.0).exp() * if rng.below(2) == 0 { 1.0 } else { -1.0 }) as f32,
            };
            let x: Vec<f32> = (0..len)
                .map(|_| round_to(dtype, ((rng.unit() * 2.0 - 1.0) * (rng.unit() * 8.0 - 4.0).exp()) as f32))
                .collect();
            let mut bits: Vec<u32> = x.iter().map(|&v| bits_of(dtype, v)).collect();
            if scale == 1.0 {
                for nan in odd_nans(dtype) {
                    if !bits.is_empty() {
                        let k = rng.below(bits.len() as u64) as usize;
                        bits[k] = nan;
                    }
                }
            }
            values.push(x);
            ScaleCall { dtype, grid, threads, offset: rng.below(9) as i64, scale, bits }
        })
        .collect();
    let outs = run_scale(exe, &calls);
    let mut changed = 0usize;
    for ((c, o), x) in calls.iter().zip(&outs).zip(&values) {
        let off = c.offset as usize;
        let guard = match c.dtype {
            DType::F32 => u32::from_le_bytes([SCALE_GUARD; 4]),
            _ => u16::from_le_bytes([SCALE_GUARD; 2]) as u32,
        };
        assert!(
            o[..off].iter().chain(&o[off + c.bits.len()..]).all(|&b| b == guard),
            "a write outside the gradient ({:?}, {} elements at offset {off}, grid {}, threads {}, scale {})",
            c.dtype,
            c.bits.len(),
            c.grid,
            c.threads,
            c.scale
        );
        for (i, ((&x, &b), &got)) in x.iter().zip(&c.bits).zip(&o[off..]).enumerate() {
            // one product each: the bits of round(x · s), and the element's own where s is 1
            let want = if c.scale == 1.0 { b } else { bits_of(c.dtype, x * c.scale) };
            assert_eq!(
                got,
                want,
                "element {i} of {} (x {x}, bits {b:#x}, scale {}, grid {}, threads {})",
                c.bits.len(),
                c.scale,
                c.grid,
                c.threads
            );
            changed += (want != b) as usize;
        }
    }
    // (a handful of calls could all have a scale of 1)
    assert!(n < 20 || changed > 0, "no call changed an element");
    println!("{n} scale calls, {changed} elements changed, each as one product");
}

#[test]
fn emulated_narrow_kernel_rounds_every_element_once() {
    let Some(exe) = calls_exe() else { return };
    let n = cases(16);
    let mut rng = Rng::new(0x6e6172726f77);
    let calls: Vec<NarrowCall> = (0..n)
        .map(|i| {
            let dtype = [DType::F16, DType::BF16][i as usize % 2];
            let len = match rng.below(4) {
                0 => rng.below(40) as usize,
                _ => 1 + rng.below(6000) as usize,
            };
            // as api.rs launches it (1024 threads, a grid of at most 4 per SM) and smaller
            // blocks and grids, so that the grid strides
            let threads = if rng.below(2) == 0 { 1024 } else { 32 * (1 + rng.below(8) as u32) };
            let grid = 1 + rng.below((len as u64).div_ceil(threads as u64).clamp(1, 8)) as u32;
            // magnitudes from f16's subnormals to beyond its largest finite (and bf16's
            // subnormals), halfway cases of both, infinities and NaN
            let src = (0..len)
                .map(|_| match rng.below(16) {
                    0 => f32::INFINITY,
                    1 => f32::NEG_INFINITY,
                    2 => f32::NAN,
                    3 => 1.0 + 2f32.powi(-11),       // f16's halfway case: to even (1)
                    4 => 1.0 + 3.0 * 2f32.powi(-11), // ... and up
                    5 => 1.0 + 2f32.powi(-8),        // bf16's halfway case
                    6 => 7.0e4,                      // beyond f16's largest finite
                    7 => 1.0e-39,                    // f32 subnormal
                    _ => ((rng.unit() * 2.0 - 1.0) * (rng.unit() * 40.0 - 20.0).exp()) as f32,
                })
                .collect();
            NarrowCall { dtype, grid, threads, offset: rng.below(9) as i64, src }
        })
        .collect();
    let outs = run_narrow(exe, &calls);
    let guard = u16::from_le_bytes([SCALE_GUARD; 2]) as u32;
    let mut elements = 0usize;
    for (c, o) in calls.iter().zip(&outs) {
        let off = c.offset as usize;
        let what =
            format!("{:?}, {} elements at offset {off}, grid {}, threads {}", c.dtype, c.src.len(), c.grid, c.threads);
        assert!(o[..off].iter().chain(&o[off + c.src.len()..]).all(|&b| b == guard), "a write outside ({what})");
        for (i, (&x, &got)) in c.src.iter().zip(&o[off..]).enumerate() {
            let is_nan = match c.dtype {
                DType::F16 => f16::from_bits(got as u16).is_nan(),
                _ => bf16::from_bits(got as u16).is_nan(),
            };
            if x.is_nan() {
                assert!(is_nan, "element {i}: NaN became {got:#x} ({what})");
            } else {
                assert_eq!(got, bits_of(c.dtype, x), "element {i}: {x} ({what})");
            }
        }
        elements += c.src.len();
    }
    assert!(n < 4 || elements > 0, "no element narrowed");
    println!("{n} narrow calls, {elements} elements, each rounded once to nearest even");
}

/// A plain f32 call of `b × t × v` with logits in [-1, 1] and ids `1, 2, 3, ...` (mod `v`), 64
/// threads: two warps, so that a block-wide report merges the warps'.
fn plain_call(b: usize, t: usize, v: usize) -> Call {
    let shape = Shape::new(b, t, v).unwrap();
    let mut rng = Rng::new(5);
    Call {
        pair: (DType::F32, DType::F32),
        id_type: 1,
        family: 0,
        shape,
        spec: LossSpec::default(),
        threads: 64,
        grid: 2,
        smem_cap: 1 << 20,
        logits_offset: 0,
        grad: GradMode::Separate,
        grad_offset: 0,
        scale_on_device: false,
        logits: (0..shape.logits_len()).map(|_| 2.0 * rng.unit() as f32 - 1.0).collect(),
        ids: (0..b * t).map(|i| (1 + i % (v - 1)) as i64).collect(),
        labels: None,
        token_weights: None,
        split: None,
        chunk: (b * t) as i64,
    }
}

/// What the plan and finish kernels report of bad tokens, sample weights beyond f64 and
/// non-finite rows (the host turns the report into the typed errors): the first (smallest flat
/// index) of each kind, across the warps of the block, for every id type. Status: flags, bad id
/// index and value, bad label index and value, non-finite row, bad token weight index; then the
/// bad token weight's value and the bad sample weight (what the host's errors name).
#[test]
fn emulated_kernels_report_bad_inputs() {
    let Some(exe) = calls_exe() else { return };
    let (b, t, v) = (3, 4, 50);
    let mut calls = Vec::new();
    let mut want = Vec::new();
    // ids out of range in sample 2 (warp 0's second sample) and sample 1 (warp 1): the first is
    // sample 1's; the ids are the labels, so the label report says the same
    for id_type in 0..3 {
        let mut c = plain_call(b, t, v);
        c.id_type = id_type;
        c.ids[9] = 70;
        c.ids[5] = -3;
        calls.push(c);
        // (u32 ids: the same 4 bytes, read as 2^32 - 3)
        let bad = if id_type == 2 { (1i64 << 32) - 3 } else { -3 };
        want.push(([1 | 2, 5, bad, 5, bad, -1, -1], [0.0, 0.0]));
    }
    // separate labels: a label out of range, the ids fine; -100 (ignored) is not out of range
    let mut c = plain_call(b, t, v);
    let mut labels = c.ids.clone();
    labels[2] = -100;
    labels[6] = 50;
    labels[10] = -7;
    c.labels = Some(labels);
    c.spec = LossSpec::builder().ignore_index(-100).build().unwrap();
    calls.push(c);
    want.push(([2, -1, 0, 6, 50, -1, -1], [0.0, 0.0]));
    // a token weight that is not finite
    let mut c = plain_call(b, t, v);
    let mut w = vec![1f32; b * t];
    w[7] = f32::INFINITY;
    w[3] = f32::NAN;
    c.token_weights = Some(w);
    calls.push(c);
    // (the first of them: the NaN at 3)
    want.push(([8, -1, 0, -1, 0, -1, 3], [f64::NAN, 0.0]));
    // non-finite logits in rows 6 and 1 (both with a target): row 1 is reported
    let mut c = plain_call(b, t, v);
    c.logits[6 * v + 4] = f32::NAN;
    c.logits[v + 7] = f32::INFINITY;
    calls.push(c);
    want.push(([4, -1, 0, -1, 0, 1, -1], [0.0, 0.0]));
    // a sample weight beyond f64 (alpha 1e308 times 1 + 1 keyword hit), and, under the
    // weighted mean, finite weights whose sum is not
    let mut c = plain_call(b, t, v);
    c.ids[6] = 7;
    c.spec = LossSpec::builder().alpha(1e308).keywords([7i64]).build().unwrap();
    calls.push(c);
    want.push(([16, -1, 0, -1, 0, -1, -1], [0.0, f64::INFINITY]));
    let mut c = plain_call(b, t, v);
    c.spec = LossSpec::builder().alpha(1e308).reduction(Reduction::WeightedMean).build().unwrap();
    calls.push(c);
    want.push(([16, -1, 0, -1, 0, -1, -1], [0.0, f64::INFINITY]));
    // the split: every data rank's weight and sum finite, the group's sum not (fwl_split_batch's
    // own report)
    let mut c = plain_call(b, t, v);
    c.spec = LossSpec::builder().alpha(1e308).reduction(Reduction::WeightedMean).build().unwrap();
    c.split = Some(Split { sample_cuts: vec![0, 1, 2, 3], column_cuts: vec![0, 20, v as i64], whole_rows: false });
    calls.push(c);
    want.push(([16, -1, 0, -1, 0, -1, -1], [0.0, f64::INFINITY]));
    let outs = run(exe, &calls, "bad");
    for (i, (o, (w, values))) in outs.iter().zip(&want).enumerate() {
        assert_eq!(&o.status, w, "case {i}: status");
        // the values the host puts in its errors (NaN equal to NaN here)
        let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
        assert!(
            o.status_values.iter().zip(values).all(|(&a, &b)| same(a, b)),
            "case {i}: status values {:?}, want {values:?}",
            o.status_values
        );
    }
}

/// The prefetching kernels (`fwl_rowslp_*`) over many rows per block: grids of one or two
/// blocks, gradients in place where the dtypes allow (the next row's copies are in flight while
/// this row's gradient is written over its logits), rows whose target is ignored among them
/// (every sample's last position, and more), shared memory for part of a row or all of it. The
/// host's cp.async (emu.h) completes each copy only at the wait that covers it, poisons its slot
/// until then and fails a run whose copy source changes while it is pending.
#[test]
fn emulated_prefetching_kernel_over_many_rows_per_block() {
    let Some(exe) = calls_exe() else { return };
    let n = cases(24);
    let mut rng = Rng::new(0x70726566);
    let calls: Vec<Call> = (0..n as usize)
        .map(|i| {
            let c = random_call(&mut rng, Some((i % PAIRS.len(), 5)));
            let row_vectors = (c.shape.vocab() * c.pair.0.size()).div_ceil(16) as i64;
            Call {
                grid: 1 + rng.below(2) as u32,
                grad: if c.pair.0 == c.pair.1 && i % 3 != 2 { GradMode::InPlace } else { GradMode::Separate },
                smem_cap: if i % 2 == 0 { 1 << 20 } else { 1 + rng.below(row_vectors as u64) as i64 },
                ..c
            }
        })
        .collect();
    let outs = run(exe, &calls, "prefetch");
    for (c, o) in calls.iter().zip(&outs) {
        keep(c);
        check(c, o);
    }
}

/// The rows kernels promise the same bits for any loads in flight, L2 hints and prefetching
/// (the lean `fwl_rowsl`, `fwl_rowsl2`, `fwl_rowslh`, `fwl_rowslp`) at one block size, and any grid (a row is one
/// block's): the same call through each (`fwl_rows` and `fwl_rowslo` on two grids), compared
/// bit for bit.
#[test]
fn emulated_rows_kernels_give_the_same_bits_for_any_loads_in_flight_and_grid() {
    let Some(exe) = calls_exe() else { return };
    let n = cases(16);
    let mut rng = Rng::new(0x62697473);
    let (mut calls, mut groups) = (Vec::new(), Vec::new());
    for _ in 0..n {
        // one or two warps: most rows then hold more vectors than a block reads at once, and
        // every thread keeps 2 or 4 in flight
        let c = Call { threads: 32 * (1 + rng.below(2) as u32), ..random_call(&mut rng, None) };
        let lean = matches!(c.family, 1 | 2 | 4 | 5);
        let group: &[usize] = if lean { &[1, 2, 4, 5] } else { &[c.family, c.family] };
        groups.push(calls.len()..calls.len() + group.len());
        for (&family, grid) in group.iter().zip([1, 3, 2, 4]) {
            calls.push(Call { family, grid, ..c.clone() });
        }
    }
    let outs = run(exe, &calls, "bits");
    let bits = |o: &Outputs| {
        let mut v = vec![o.loss.to_bits(), o.z_loss.to_bits()];
        v.extend(o.per_sample.iter().chain(&o.row_loss).map(|x| x.to_bits()));
        v.extend(o.grad.iter().map(|x| u64::from(x.to_bits())));
        v
    };
    for g in groups {
        let first = bits(&outs[g.start]);
        for j in g.clone().skip(1) {
            let (a, b) = (&calls[g.start], &calls[j]);
            assert!(
                bits(&outs[j]) == first,
                "{} vs {}: {:?} {:?}",
                FAMILIES[b.family],
                FAMILIES[a.family],
                a.pair,
                a.shape
            );
        }
    }
}
