//! Sharding helpers for tests and benches only: ranks simulated as threads of one process (an
//! in-memory all-gather behind a barrier, implementing the crate's `Collective`), and a rank's
//! columns of the logits.
#![allow(dead_code)]

use fused_weighted_loss::parallel::{Collective, VocabSlice};
use fused_weighted_loss::synthetic::Rng;
use fused_weighted_loss::{Error, Result};
use fused_weighted_loss::{Grad, Logit, LossOutput, LossSpec, Shape, Tokens};
use std::sync::{Arc, Condvar, Mutex};

/// A barrier that a rank can leave: once one rank's thread has ended (returned or panicked),
/// a wait that still needs it fails instead of blocking forever, so a failing test fails fast.
struct Gate {
    size: usize,
    /// (ranks arrived in this round, rounds completed, a rank has left)
    state: Mutex<(usize, u64, bool)>,
    turned: Condvar,
}

impl Gate {
    fn wait(&self) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.2 {
            return Err(Error::Collective("a rank of the group has ended".into()));
        }
        let round = s.1;
        s.0 += 1;
        if s.0 == self.size {
            *s = (0, round + 1, s.2);
            self.turned.notify_all();
            return Ok(());
        }
        loop {
            // a completed round counts even if a rank left after it
            if s.1 != round {
                return Ok(());
            }
            if s.2 {
                return Err(Error::Collective("a rank of the group ended before this exchange".into()));
            }
            s = self.turned.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn leave(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2 = true;
        self.turned.notify_all();
    }
}

/// What the ranks of one group share: a barrier and one slot per rank for each element type.
struct Shared {
    barrier: Gate,
    f64s: Mutex<Vec<Vec<f64>>>,
    f32s: Mutex<Vec<Vec<f32>>>,
}

/// One rank's handle on a group of threads.
pub struct ThreadGroup {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// The handles of a group of `size` ranks, in rank order (hand one to each thread).
    pub fn new(size: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            barrier: Gate { size, state: Mutex::new((0, 0, false)), turned: Condvar::new() },
            f64s: Mutex::new(vec![Vec::new(); size]),
            f32s: Mutex::new(vec![Vec::new(); size]),
        });
        (0..size).map(|rank| ThreadGroup { rank, size, shared: shared.clone() }).collect()
    }

    /// Publishes `send`, waits for every rank, copies all slots in rank order into `recv`, and
    /// waits again before anyone may publish the next buffer. Every rank sees the same slots,
    /// so a length mismatch fails on all of them alike (no rank is left waiting).
    fn gather<T: Copy>(&self, slots: &Mutex<Vec<Vec<T>>>, send: &[T], recv: &mut [T]) -> Result<()> {
        slots.lock().unwrap_or_else(|e| e.into_inner())[self.rank] = send.to_vec();
        self.shared.barrier.wait()?;
        let result = {
            let all = slots.lock().unwrap_or_else(|e| e.into_inner());
            if all.iter().any(|s| s.len() != send.len()) {
                Err(Error::Collective(format!(
                    "ranks sent different lengths: {:?}",
                    all.iter().map(Vec::len).collect::<Vec<_>>()
                )))
            } else if recv.len() != self.size * send.len() {
                Err(Error::Collective(format!("receive buffer of {} for {} x {}", recv.len(), self.size, send.len())))
            } else {
                for (dst, src) in recv.chunks_exact_mut(send.len().max(1)).zip(all.iter()) {
                    dst.copy_from_slice(src);
                }
                Ok(())
            }
        };
        self.shared.barrier.wait()?;
        result
    }

    /// Marks this rank's thread as ended: the others' waits that need it fail from now on.
    fn leave(&self) {
        self.shared.barrier.leave();
    }
}

/// Leaves the group when dropped: at the end of a rank's thread, however it ends.
struct Leave<'a>(&'a ThreadGroup);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        self.gather(&self.shared.f64s, send, recv)
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.gather(&self.shared.f32s, send, recv)
    }
}

/// Runs `f(rank, group)` on one thread per rank of a fresh group of `size`; results in rank order.
pub fn run_ranks<R: Send>(size: usize, f: impl Fn(usize, &ThreadGroup) -> R + Sync) -> Vec<R> {
    let groups = ThreadGroup::new(size);
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .enumerate()
            .map(|(r, g)| {
                s.spawn({
                    let f = &f;
                    move || {
                        let _leave = Leave(g);
                        f(r, g)
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    })
}

/// A `data × vocab` grid of ranks (rank `d * vocab + v`): each thread gets its vocabulary group
/// (the ranks of row `d`) and its data group (the ranks of column `v`); results in rank order.
pub fn run_grid<R: Send>(
    data: usize,
    vocab: usize,
    f: impl Fn(usize, usize, &ThreadGroup, &ThreadGroup) -> R + Sync,
) -> Vec<R> {
    let mut vgroups: Vec<Vec<Option<ThreadGroup>>> =
        (0..data).map(|_| ThreadGroup::new(vocab).into_iter().map(Some).collect()).collect();
    let mut dgroups: Vec<Vec<Option<ThreadGroup>>> =
        (0..vocab).map(|_| ThreadGroup::new(data).into_iter().map(Some).collect()).collect();
    let mine: Vec<(ThreadGroup, ThreadGroup)> = (0..data * vocab)
        .map(|r| {
            let (d, v) = (r / vocab, r % vocab);
            (vgroups[d][v].take().unwrap(), dgroups[v][d].take().unwrap())
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = mine
            .iter()
            .enumerate()
            .map(|(r, (vg, dg))| {
                s.spawn({
                    let f = &f;
                    move || {
                        let _leave = (Leave(vg), Leave(dg));
                        f(r / vocab, r % vocab, vg, dg)
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    })
}

/// A `data × vocab` grid of ranks as [`run_grid`] (`(1, n)`: a vocabulary group of `n`, `(n, 1)`
/// a data group), but whose exchanges wait as a real collective's do (NCCL, gloo): a rank that
/// has returned is waited for forever, not left. Each rank runs on a detached thread and makes
/// `calls` calls `f(call, d, v, vocab group, data group)` in turn on the same groups; each
/// rank's results come back in rank order, `None` for a rank that had not made them all after
/// `timeout` (its thread is left blocked: a hang fails the test instead of hanging it) or that
/// panicked.
pub fn run_grid_or_hang<R: Send + 'static>(
    data: usize,
    vocab: usize,
    calls: usize,
    timeout: std::time::Duration,
    f: impl Fn(usize, usize, usize, &ThreadGroup, &ThreadGroup) -> R + Send + Sync + 'static,
) -> Vec<Option<Vec<R>>> {
    let mut vgroups: Vec<Vec<Option<ThreadGroup>>> =
        (0..data).map(|_| ThreadGroup::new(vocab).into_iter().map(Some).collect()).collect();
    let mut dgroups: Vec<Vec<Option<ThreadGroup>>> =
        (0..vocab).map(|_| ThreadGroup::new(data).into_iter().map(Some).collect()).collect();
    let f = Arc::new(f);
    let (tx, rx) = std::sync::mpsc::channel();
    for r in 0..data * vocab {
        let (d, v) = (r / vocab, r % vocab);
        let (vg, dg) = (vgroups[d][v].take().unwrap(), dgroups[v][d].take().unwrap());
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let got: Vec<R> = (0..calls).map(|c| f(c, d, v, &vg, &dg)).collect();
            let _ = tx.send((r, got));
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + timeout;
    let mut out: Vec<Option<Vec<R>>> = (0..data * vocab).map(|_| None).collect();
    for _ in 0..data * vocab {
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok((r, got)) => out[r] = Some(got),
            Err(_) => break, // timed out, or every thread that could answer has
        }
    }
    out
}

/// The columns of `slice` of every row.
pub fn columns<L: Copy>(logits: &[L], vocab: usize, slice: VocabSlice) -> Vec<L> {
    logits.chunks_exact(vocab).flat_map(|row| row[slice.start()..slice.end()].iter().copied()).collect()
}

/// Reassembles rows of `vocab` from every rank's columns.
pub fn assemble(parts: &[Vec<f32>], slices: &[VocabSlice], rows: usize, vocab: usize) -> Vec<f32> {
    let mut g = vec![f32::NAN; rows * vocab];
    for (p, s) in parts.iter().zip(slices) {
        for (r, row) in p.chunks_exact(s.len()).enumerate() {
            g[r * vocab + s.start()..r * vocab + s.end()].copy_from_slice(row);
        }
    }
    g
}

/// One test case: inputs of the whole batch over the whole vocabulary.
pub struct Case<L> {
    pub shape: Shape,
    pub spec: LossSpec,
    pub logits: Vec<L>,
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub weights: Option<Vec<f32>>,
}

impl<L: Logit> Case<L> {
    pub fn tokens(&self) -> Tokens<'_, i64> {
        let t = Tokens::new(&self.ids).with_labels(&self.labels);
        match &self.weights {
            Some(w) => t.with_token_weights(w),
            None => t,
        }
    }

    /// Samples `b0..b1` only (a data-parallel rank's share).
    pub fn samples(&self, b0: usize, b1: usize) -> Case<L> {
        let (t, v) = (self.shape.seq(), self.shape.vocab());
        Case {
            // a rank without samples: the sharded calls' empty shape
            shape: if b1 == b0 { Shape::without_samples(t, v) } else { Shape::new(b1 - b0, t, v) }.unwrap(),
            spec: self.spec.clone(),
            logits: self.logits[b0 * t * v..b1 * t * v].to_vec(),
            ids: self.ids[b0 * t..b1 * t].to_vec(),
            labels: self.labels[b0 * t..b1 * t].to_vec(),
            weights: self.weights.as_ref().map(|w| w[b0 * t..b1 * t].to_vec()),
        }
    }

    /// The unsharded loss, f32 gradient and per-token losses.
    pub fn whole(&self) -> (LossOutput, Vec<f32>, Vec<f32>) {
        let mut g = vec![f32::NAN; self.shape.logits_len()];
        let mut pt = vec![f32::NAN; self.shape.batch() * (self.shape.seq() - 1)];
        let out =
            self.spec.loss_and_grad_per_token(self.shape, &self.logits, self.tokens(), Grad::IntoF32(&mut g), &mut pt);
        (out.expect("unsharded call"), g, pt)
    }
}

/// `ranks` slices of `vocab` with random, uneven cut points (none empty: `1 <= ranks <= vocab`).
pub fn random_slices(rng: &mut Rng, ranks: usize, vocab: usize) -> Vec<VocabSlice> {
    assert!(ranks >= 1 && ranks <= vocab, "{ranks} non-empty slices of {vocab}");
    let mut cuts: Vec<usize> = Vec::new();
    while cuts.len() < ranks - 1 {
        let c = 1 + rng.below(vocab as u64 - 1) as usize;
        if !cuts.contains(&c) {
            cuts.push(c);
        }
    }
    cuts.sort_unstable();
    let bounds: Vec<usize> = std::iter::once(0).chain(cuts).chain(std::iter::once(vocab)).collect();
    bounds.windows(2).map(|w| VocabSlice::new(w[0], w[1] - w[0], vocab).unwrap()).collect()
}

/// The sample bounds of `data` ranks over a batch of `b`, cut at random points, equal points
/// included (data ranks without samples): `data + 1` bounds from 0 to `b`.
pub fn random_splits(rng: &mut Rng, data: usize, b: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (1..data).map(|_| rng.below(b as u64 + 1) as usize).collect();
    cuts.sort_unstable();
    std::iter::once(0).chain(cuts).chain(std::iter::once(b)).collect()
}
