//! The vocabulary-parallel split on the CPU against the single-device pass (`cargo bench --bench
//! sharded`; `-- f32` or `-- bf16` runs one dtype's rows).
//!
//! 1. **Per-rank kernel time**: one rank's work on its slice, `[B, T, V/P]`, through the split
//!    (statistics step, a group-of-one exchange, merge, gradient step, chunk by chunk, as
//!    `Sharded` runs it for a rank of a larger group; a real group of one runs the
//!    single-device pass instead) against the single-device call on the same logits, timed alternately
//!    (paired). The target is ≤ 1.1×: the split adds no pass over the logits. Beside it, the
//!    same split with one chunk for all rows (its exponentials no longer fit a cache: written to
//!    memory and read back) and with nothing kept (the logits read twice), to show what chunks save.
//! 2. **P ranks as threads** of this process (the test exchange, barrier + copies), all sharing
//!    the machine's cores: wall time of the sharded call of every rank against the
//!    single-device call over the whole vocabulary (the same total work).
//!
//! 3. `FWL_BENCH_RANK=8x128x50000:4`: section 1 for one shape, and the exchange alone (the
//!    ranks as threads all-gathering the statistics words of every row, no kernel).
//!
//! Medians of paired runs (15, or `FWL_BENCH_ITERS`): wall time, and the on-CPU time of all
//! threads (the process CPU clock);
//! figures on a shared machine are provisional.

#[path = "../tests/common/shards.rs"]
mod shards;

use fused_weighted_loss::measure::median;
use fused_weighted_loss::parallel::{Sharded, ShardedLoss, Solo, VocabSlice};
use fused_weighted_loss::{bf16, synthetic, Grad, Logit, LossSpec, Shape, Tokens};
use std::time::Instant;

const WARMUP: usize = 2;

/// Timed runs per measurement: 15, or `FWL_BENCH_ITERS`.
fn iters() -> usize {
    std::env::var("FWL_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(15)
}

/// On-CPU time of every thread of this process so far, in seconds, or NaN where the platform
/// has no process CPU clock: unlike wall time it does not count time other tenants of a shared
/// machine took. (`CLOCK_PROCESS_CPUTIME_ID` counts a running thread up to now; the per-thread
/// schedstat files this read before lag by up to a scheduler tick for a thread that runs a whole
/// call without a break.)
fn cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid timespec for the call to write.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    f64::NAN
}

/// `a` and `b` alternately: medians of (wall, on-CPU) seconds of each.
fn paired(mut a: impl FnMut(), mut b: impl FnMut()) -> [(f64, f64); 2] {
    let mut t = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for i in 0..WARMUP + iters() {
        for (k, f) in [&mut a as &mut dyn FnMut(), &mut b].into_iter().enumerate() {
            let (w, c) = (Instant::now(), cpu_seconds());
            f();
            if i >= WARMUP {
                t[k][0].push(w.elapsed().as_secs_f64());
                t[k][1].push(cpu_seconds() - c);
            }
        }
    }
    [(median(&t[0][0]), median(&t[0][1])), (median(&t[1][0]), median(&t[1][1]))]
}

/// Loss + gradient of `logits` (`[B, T, len]`, ids in `[0, len)`) through the split's steps with
/// all rows in one chunk, keeping `keep` rows' exponentials (the rest re-read).
fn one_chunk<L: Logit>(spec: &LossSpec, shape: Shape, logits: &[L], ids: &[i64], grad: &mut [L], keep: usize) {
    let slice = VocabSlice::full(shape.vocab()).unwrap();
    let mut st = ShardedLoss::new(spec, shape, slice, Tokens::new(ids)).unwrap().with_keep_rows(keep);
    let rows = 0..shape.rows();
    let mut part = vec![0.0; st.partials_len(rows.len())];
    st.partials(rows.clone(), logits, &mut part).unwrap();
    st.finish_rows_grad(rows, &part, logits, grad).unwrap();
    st.finish().unwrap();
}

fn per_rank<L: Logit>(b: usize, t: usize, vocab: usize, ranks: usize, chunk: Option<usize>) {
    let len = VocabSlice::even(0, ranks, vocab).unwrap().len();
    let shape = Shape::new(b, t, len).unwrap();
    let logits = synthetic::logits::<L>(1, shape.logits_len(), 4.0);
    let ids = synthetic::ids::<i64>(2, shape.rows(), len);
    let spec = LossSpec::builder().keywords([0, 1, 2]).build().unwrap();
    let (mut g1, mut g2) = (L::zeroed(shape.logits_len()), L::zeroed(shape.logits_len()));
    let slice = VocabSlice::full(len).unwrap();
    let mut split = Sharded::vocab_parallel(slice, &Solo).with_split_steps();
    if let Some(c) = chunk {
        split = split.with_chunk_rows(c);
    }
    let [(s, sc), (p, pc)] = paired(
        || drop(spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut g1)).unwrap()),
        || drop(split.loss_and_grad(&spec, shape, &logits, Tokens::new(&ids), Grad::Into(&mut g2)).unwrap()),
    );
    let [(s2, _), (n, _)] = paired(
        || drop(spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut g1)).unwrap()),
        || one_chunk(&spec, shape, &logits, &ids, &mut g2, 0),
    );
    println!(
        "| {} | {b}x{t}x{vocab} / {ranks} = {len} | {} | {:.2} | {:.2} | **{:.3}** | {:.2} | {:.2} | **{:.3}** | {:.2} | {:.2} | {:.3} |",
        L::DTYPE,
        chunk.unwrap_or(fused_weighted_loss::parallel::default_chunk_rows(vocab, ranks)),
        s * 1e3,
        p * 1e3,
        p / s,
        sc * 1e3,
        pc * 1e3,
        pc / sc,
        s2 * 1e3,
        n * 1e3,
        n / s2,
    );
}

/// A data-parallel rank (its vocabulary group is itself alone) against the single-device call
/// on its samples: the default (the single-device pass) and the split's chunked steps; wall ms.
fn data_parallel_rank<L: Logit>(b: usize, t: usize, vocab: usize) {
    let shape = Shape::new(b, t, vocab).unwrap();
    let logits = synthetic::logits::<L>(1, shape.logits_len(), 4.0);
    let ids = synthetic::ids::<i64>(2, shape.rows(), vocab);
    let spec = LossSpec::builder().keywords([0, 1, 2]).build().unwrap();
    let (mut g1, mut g2) = (L::zeroed(shape.logits_len()), L::zeroed(shape.logits_len()));
    let dp = Sharded::data_parallel(vocab, &Solo);
    let mut row = |split: Sharded<'_>| {
        let [(s, _), (p, _)] = paired(
            || drop(spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut g1)).unwrap()),
            || drop(split.loss_and_grad(&spec, shape, &logits, Tokens::new(&ids), Grad::Into(&mut g2)).unwrap()),
        );
        (s * 1e3, p * 1e3, p / s)
    };
    let (s, p, r) = row(dp);
    let (s2, c, rc) = row(dp.with_split_steps());
    println!("| {} | {b}x{t}x{vocab} | {s:.2} | {p:.2} | **{r:.3}** | {s2:.2} | {c:.2} | {rc:.3} |", L::DTYPE);
}

fn threads_as_ranks<L: Logit>(b: usize, t: usize, vocab: usize, ranks: usize) {
    let shape = Shape::new(b, t, vocab).unwrap();
    let logits = synthetic::logits::<L>(1, shape.logits_len(), 4.0);
    let ids = synthetic::ids::<i64>(2, shape.rows(), vocab);
    let spec = LossSpec::builder().keywords([0, 1, 2]).build().unwrap();
    let slices: Vec<VocabSlice> = (0..ranks).map(|r| VocabSlice::even(r, ranks, vocab).unwrap()).collect();
    let local: Vec<Vec<L>> = slices.iter().map(|&s| shards::columns(&logits, vocab, s)).collect();
    let grads: Vec<std::sync::Mutex<Vec<L>>> = local.iter().map(|l| L::zeroed(l.len()).into()).collect();
    let mut whole_grad = L::zeroed(shape.logits_len());
    let mut single = Vec::new();
    let mut sharded = Vec::new();
    for i in 0..WARMUP + iters() {
        let t0 = Instant::now();
        spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut whole_grad)).unwrap();
        let t1 = Instant::now();
        shards::run_ranks(ranks, |r, g| {
            let mut grad = grads[r].lock().unwrap();
            Sharded::vocab_parallel(slices[r], g)
                .loss_and_grad(&spec, shape, &local[r], Tokens::new(&ids), Grad::Into(&mut grad))
                .unwrap()
        });
        let t2 = Instant::now();
        if i >= WARMUP {
            single.push((t1 - t0).as_secs_f64());
            sharded.push((t2 - t1).as_secs_f64());
        }
    }
    let (s, p) = (median(&single), median(&sharded));
    println!("| {} | {b}x{t}x{vocab} | {ranks} | {:.2} | {:.2} | {:.3} |", L::DTYPE, s * 1e3, p * 1e3, p / s);
}

/// The exchange alone: `ranks` threads all-gather the statistics words of `B·T` rows (3 `f64`
/// per row, chunk by chunk as `Sharded` cuts them) through the test exchange (barrier + copies);
/// median wall seconds of one call's exchanges.
fn exchange_only(b: usize, t: usize, vocab: usize, ranks: usize) -> f64 {
    use fused_weighted_loss::parallel::Collective;
    let (rows, chunk) = (b * t, fused_weighted_loss::parallel::default_chunk_rows(vocab, ranks));
    let mut times = Vec::new();
    for i in 0..WARMUP + iters() {
        let t0 = Instant::now();
        shards::run_ranks(ranks, |r, g| {
            let mut sum = 0.0;
            for r0 in (0..rows).step_by(chunk) {
                let n = 3 * (r0 + chunk).min(rows).saturating_sub(r0);
                let send = vec![r as f64; n];
                let mut recv = vec![0.0; n * ranks];
                g.all_gather_f64(&send, &mut recv).unwrap();
                sum += recv[n * (ranks - 1)];
            }
            sum
        });
        if i >= WARMUP {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    median(&times)
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if let Ok(spec) = std::env::var("FWL_BENCH_RANK") {
        // one rank's kernel time and the exchange alone: FWL_BENCH_RANK=BxTxV:ranks (f32)
        let parse = || -> Option<(usize, usize, usize, usize)> {
            let (dims, ranks) = spec.split_once(':')?;
            let d: Vec<usize> = dims.split('x').map(|x| x.parse().ok()).collect::<Option<_>>()?;
            Some((*d.first()?, *d.get(1)?, *d.get(2)?, ranks.parse().ok()?))
        };
        let (b, t, v, ranks) = parse().expect("FWL_BENCH_RANK=BxTxV:ranks, e.g. 8x128x50000:4");
        println!("| dtype | B x T x V / ranks = slice | chunk rows | single, wall | split, wall | **ratio** | single, on-CPU | split, on-CPU | **ratio** | single, wall (paired with the next) | one exchange per call (logits read twice), wall | ratio |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        per_rank::<f32>(b, t, v, ranks, None);
        let ex = exchange_only(b, t, v, ranks);
        println!("\nexchange alone ({ranks} thread ranks, 3 f64 per row, {} rows): {:.3} ms", b * t, ex * 1e3);
        println!("\nData-parallel rank (vocabulary group of one) vs the single-device call on its samples\n");
        println!("| dtype | B x T x V | single | data-parallel | **ratio** | single (paired with the next) | the split's chunked steps | ratio |");
        println!("|---|---|---|---|---|---|---|---|");
        data_parallel_rank::<f32>(b, t, v);
        return;
    }
    if let Ok(spec) = std::env::var("FWL_BENCH_CHUNKS") {
        // a sweep of chunk sizes on one rank's slice: FWL_BENCH_CHUNKS=ranks:rows,rows,...
        let (ranks, rows) = spec.split_once(':').expect("FWL_BENCH_CHUNKS=ranks:rows,rows,...");
        for c in rows.split(',') {
            per_rank::<f32>(8, 256, 50_000, ranks.parse().unwrap(), Some(c.parse().unwrap()));
        }
        return;
    }
    let run = |dtype: &str| filter.is_empty() || filter.iter().any(|f| f == dtype);
    println!(
        "CPU: {} threads ({}); medians of {} paired runs (ms)\n",
        rayon::current_num_threads(),
        fused_weighted_loss::cpu_simd_level(),
        iters()
    );
    println!(
        "Per-rank kernel time: one rank's slice through the split (group of one) vs the single-device call on it\n"
    );
    println!("| dtype | B x T x V / ranks = slice | chunk rows | single, wall | split, wall | **ratio** | single, on-CPU | split, on-CPU | **ratio** | single, wall (paired with the next) | one exchange per call (logits read twice), wall | ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for ranks in [1, 2, 4, 8] {
        if run("f32") {
            per_rank::<f32>(8, 256, 50_000, ranks, None);
        }
    }
    for ranks in [4, 8] {
        if run("bf16") {
            per_rank::<bf16>(8, 512, 128_256, ranks, None);
        }
    }
    println!("\nRanks as threads (all on this machine's cores): every rank's sharded call vs one single-device call on the whole vocabulary\n");
    println!("| dtype | B x T x V | ranks | single, whole V | all ranks, sharded | ratio |");
    println!("|---|---|---|---|---|---|");
    for ranks in [2, 4, 8] {
        if run("f32") {
            threads_as_ranks::<f32>(8, 128, 50_000, ranks);
        }
    }
    if run("bf16") {
        threads_as_ranks::<bf16>(4, 512, 128_256, 8);
    }
}
