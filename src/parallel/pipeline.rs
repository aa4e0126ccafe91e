//! The chunk loop of a [`Sharded`](super::Sharded) call that writes a gradient: one worker per
//! thread of the pool, each taking a piece of the rows of every chunk, with the caller's thread
//! as one of them and the only one that exchanges.
//!
//! Pass `q` of a worker takes the statistics of its share of chunk `q` and writes the gradient
//! of its share of chunk `q − AHEAD`, each gradient row inside the statistics loop of a row of
//! chunk `q` (`SplitCpu::pass_rows`). Before its pass `q`, the caller's thread exchanges and
//! merges every chunk up to `q − AHEAD` whose statistics all workers have taken; the other
//! workers wait only for the merge of the chunk their pass writes. So:
//!
//! - a worker's share of the chunks in flight (`AHEAD + 1` of them) stays in its own core's
//!   caches between its statistics and its gradient: a chunk's rows are the same thread's in
//!   both (which piece of a chunk a worker takes turns from chunk to chunk, so that uneven
//!   pieces even out);
//! - handing a chunk from a worker to the exchange and back costs a few atomic operations,
//!   not a fork-join of the pool per chunk (tens of microseconds, more once its threads sleep);
//! - the exchange stays on the caller's thread, as a collective such as `torch.distributed`
//!   needs, and the other workers run up to `AHEAD` passes ahead of it.
//!
//! Each worker of the pool is started by two jobs, of which the first to start takes the worker
//! and the other returns: Linux tends to wake a thread on the waker's core, here the caller's,
//! which is busy with its own share; the job that starts first is on another core.
//! (Measured on 2 cores: with one job, the worker ran on the caller's core in about half of the
//! calls, which then took up to twice as long.)
//!
//! A worker that would wait for a merge longer than a moment hands its thread back to the pool
//! and is started again by the caller's thread after its next merge: no pool thread is ever held
//! waiting for an exchange. (Ranks run as threads of one process share the pool: one rank's
//! workers waiting for its exchange, which waits for a rank whose workers cannot start, would
//! otherwise hang them all.)
//!
//! Every row is computed as in the loop of one pass at a time: the same bits whatever the number
//! of workers.

use super::exchange::Exchange;
use super::wire::SLICE_WORDS;
use super::ShardedLoss;
use crate::cpu::split::{ChunkExps, Dest, GradPart, SplitCpu, StatsPart, WorkerScratch};
use crate::cpu::RowStats;
use crate::dtype::Logit;
use crate::error::{Error, Result};
use crate::plan::Plan;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Chunks between a chunk's statistics and its gradient: pass `q` takes the statistics of chunk
/// `q` and writes the gradient of chunk `q − AHEAD`.
const AHEAD: usize = 2;

/// Row buffers per worker: its share of chunk `c`'s exponentials lives in slot `c % SLOTS` from
/// pass `c` to pass `c + AHEAD`.
const SLOTS: usize = AHEAD + 1;

/// One chunk's memory: the logits its statistics read, and where its gradient goes.
pub(super) trait ChunkMem<L, G>: Send + Sized {
    fn logits(&self) -> &[L];
    fn dest(&mut self) -> Dest<'_, L, G>;
    /// The first `at` elements and the rest.
    fn split_at(self, at: usize) -> (Self, Self);
}

/// Logits read, gradient into another buffer.
pub(super) struct ReadInto<'a, L, G> {
    pub logits: &'a [L],
    pub grad: &'a mut [G],
}

impl<L: Logit, G: Logit> ChunkMem<L, G> for ReadInto<'_, L, G> {
    fn logits(&self) -> &[L] {
        self.logits
    }
    fn dest(&mut self) -> Dest<'_, L, G> {
        Dest::Into(self.logits, self.grad)
    }
    fn split_at(self, at: usize) -> (Self, Self) {
        let (l0, l1) = self.logits.split_at(at);
        let (g0, g1) = self.grad.split_at_mut(at);
        (ReadInto { logits: l0, grad: g0 }, ReadInto { logits: l1, grad: g1 })
    }
}

/// The gradient written over the logits.
pub(super) struct InPlace<'a, L>(pub &'a mut [L]);

impl<L: Logit> ChunkMem<L, L> for InPlace<'_, L> {
    fn logits(&self) -> &[L] {
        self.0
    }
    fn dest(&mut self) -> Dest<'_, L, L> {
        Dest::InPlace(self.0)
    }
    fn split_at(self, at: usize) -> (Self, Self) {
        let (a, b) = self.0.split_at_mut(at);
        (InPlace(a), InPlace(b))
    }
}

/// How long a worker of the pool waits for a merge before it hands its thread back (about the
/// time of a pass over a share of a default chunk).
const BRIEF: Duration = Duration::from_micros(300);

/// A worker of the pool between its runs: the worker, and whether a job of the pool runs it.
struct Slot<'r, M> {
    worker: Mutex<Worker<'r, M>>,
    running: AtomicBool,
}

impl<M> Slot<'_, M> {
    /// Runs the worker's passes while the merges they need are there; returns (the thread back
    /// to the pool) when one is not there after a moment, after the last pass, or when the call
    /// was given up. A job that finds the worker taken returns at once: the job that has it is
    /// running, and looks for work again after it lets the worker go (below), so no start is
    /// lost and no job waits for another.
    fn drive<L: Logit, G: Logit>(&self, chunks: &[Range<usize>], cpu: &SplitCpu, plan: &Plan, sh: &Shared)
    where
        M: ChunkMem<L, G>,
    {
        let n = chunks.len();
        loop {
            let Ok(mut wk) = self.worker.try_lock() else { return };
            // (after the lock: on a panic it drops first, and the call is given up before any
            // other job can take the worker)
            let _guard = StopOnPanic(&sh.stop);
            // pass `q` needs chunk `q − AHEAD` merged
            let ready = |q: usize| q < AHEAD || sh.merged[q - AHEAD].get().is_some();
            let q = loop {
                let q = sh.progress[wk.w].load(Ordering::Acquire);
                if q >= n + AHEAD || sh.stop.load(Ordering::Acquire) {
                    self.running.store(false, Ordering::Release);
                    return;
                }
                if !sh.wait(|| ready(q), Some(BRIEF)) {
                    break q;
                }
                wk.pass(q, chunks, cpu, plan, sh);
            };
            // the worker is let go first, then the flag: a job the caller starts from now on
            // finds the worker free
            drop(wk);
            self.running.store(false, Ordering::SeqCst);
            // (the caller sets a merge, then looks at `running`: one of the two sees the other's
            // write)
            std::sync::atomic::fence(Ordering::SeqCst);
            let again = ready(q) && !sh.stop.load(Ordering::Acquire);
            if !(again && self.running.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok()) {
                return;
            }
        }
    }
}

/// What the workers share: how far each got, the statistics of their shares, the merged
/// statistics of each chunk and whether the call was given up.
struct Shared {
    workers: usize,
    /// Passes each worker has finished (its share of chunk `q`'s statistics is in `stats` once
    /// this is past `q`).
    progress: Vec<AtomicUsize>,
    /// Worker `w`'s statistics of chunk `q` at `q * workers + w`.
    stats: Vec<Mutex<Vec<RowStats>>>,
    /// Each chunk's merged statistics, set by the caller's thread.
    merged: Vec<OnceLock<Vec<RowStats>>>,
    /// Set when a worker or the exchange failed: every wait gives up.
    stop: AtomicBool,
}

impl Shared {
    /// Waits until `ready` (true) or until the call is given up (false): spins briefly, then
    /// yields the core; gives up after `patience` if any, else sleeps in short steps after a
    /// while (a peer that is slow to exchange does not keep a core busy).
    fn wait(&self, ready: impl Fn() -> bool, patience: Option<Duration>) -> bool {
        let t0 = Instant::now();
        let mut tries = 0u32;
        while !ready() {
            if self.stop.load(Ordering::Acquire) || patience.is_some_and(|p| t0.elapsed() > p) {
                return false;
            }
            tries = tries.saturating_add(1);
            if tries < 64 {
                std::hint::spin_loop();
            } else if tries < 20_000 || patience.is_some() {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        true
    }

    /// Whether every worker has the statistics of chunk `c`.
    fn taken(&self, c: usize) -> bool {
        self.progress.iter().all(|p| p.load(Ordering::Acquire) > c)
    }
}

/// Gives the call up when dropped while panicking (a worker's or the caller's panic), so that
/// the others stop waiting for it.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// One worker: its index, its share of every chunk (memory, rows), its row buffers and scratch.
struct Worker<'r, M> {
    w: usize,
    mems: Vec<Option<M>>,
    rows: Vec<Range<usize>>,
    ring: &'r mut [ChunkExps],
    scratch: WorkerScratch,
}

impl<M> Worker<'_, M> {
    /// Pass `q`: the statistics of this worker's share of chunk `q` and the gradient of its
    /// share of chunk `q − AHEAD` (merged before), then its progress.
    fn pass<L: Logit, G: Logit>(&mut self, q: usize, chunks: &[Range<usize>], cpu: &SplitCpu, plan: &Plan, sh: &Shared)
    where
        M: ChunkMem<L, G>,
    {
        let n = chunks.len();
        // this pass's gradient chunk is done after it: its memory is taken out for good
        let mut done =
            q.checked_sub(AHEAD).map(|c| (c, self.mems[c].take().expect("a chunk's memory is written once")));
        let (ring_s, ring_g) = two_slots(self.ring, q % SLOTS, q.checked_sub(AHEAD).map(|c| c % SLOTS));
        let grad = match (done.as_mut(), ring_g) {
            (Some((c, m)), Some(exps)) => {
                let merged = sh.merged[*c].get().expect("merged before its gradient");
                let r = self.rows[*c].clone();
                let at = r.start - chunks[*c].start;
                Some(GradPart { merged: &merged[at..at + r.len()], rows: r, dest: m.dest(), exps })
            }
            _ => None,
        };
        let mut out = Vec::new();
        let stats = match (q < n).then(|| self.mems[q].as_ref()).flatten() {
            Some(m) => {
                out = vec![RowStats::EMPTY; self.rows[q].len()];
                Some(StatsPart { rows: self.rows[q].clone(), logits: m.logits(), out: &mut out, exps: ring_s })
            }
            None => None,
        };
        cpu.pass_rows(plan, grad, stats, &mut self.scratch);
        if q < n {
            *sh.stats[q * sh.workers + self.w].lock().unwrap_or_else(|e| e.into_inner()) = out;
        }
        sh.progress[self.w].store(q + 1, Ordering::Release);
    }
}

/// Slot `s` (the statistics' buffers) and, when given, slot `g` (the gradient's; another slot).
fn two_slots(ring: &mut [ChunkExps], s: usize, g: Option<usize>) -> (&mut ChunkExps, Option<&mut ChunkExps>) {
    match g {
        Some(g) if g < s => {
            let (lo, hi) = ring.split_at_mut(s);
            (&mut hi[0], Some(&mut lo[g]))
        }
        Some(g) => {
            let (lo, hi) = ring.split_at_mut(g);
            (&mut lo[s], Some(&mut hi[0]))
        }
        None => (&mut ring[s], None),
    }
}

/// Piece `p` of chunk `r`'s rows cut in `workers` consecutive pieces (their lengths differ by
/// one at most).
fn piece(r: &Range<usize>, p: usize, workers: usize) -> Range<usize> {
    let n = r.len();
    r.start + n * p / workers..r.start + n * (p + 1) / workers
}

/// The worker that takes piece `p` of chunk `q`: the pieces turn by one worker per chunk, so that
/// no worker takes the longer pieces of every chunk (with 2 workers and chunks of 5 rows, one
/// would take 3 rows of every 5). A chunk's statistics and gradient are the same worker's.
fn worker_of(p: usize, q: usize, workers: usize) -> usize {
    (p + q) % workers
}

/// Runs the chunks (`mems[c]` is chunk `c`'s memory, `chunks[c]` its rows, `len` logits each)
/// through the pipeline. The caller checked that the slice's exponentials can be kept and that
/// this thread is not one of the pool's.
pub(super) fn run<L: Logit, G: Logit, M: ChunkMem<L, G>>(
    steps: &mut ShardedLoss,
    ex: &mut Exchange<'_>,
    chunks: &[Range<usize>],
    len: usize,
    mems: Vec<M>,
) -> Result<()> {
    let n = chunks.len();
    let workers = crate::pool::install(rayon::current_num_threads)
        .clamp(1, chunks.iter().map(|c| c.len()).max().unwrap_or(1).max(1));
    let max_share = chunks.iter().map(|c| c.len().div_ceil(workers)).max().unwrap_or(0);
    let mut rings: Vec<Vec<ChunkExps>> = Vec::with_capacity(workers);
    for _ in 0..workers {
        let ring: Option<Vec<ChunkExps>> = (0..SLOTS).map(|_| steps.cpu_mut().chunk_buffers(max_share)).collect();
        match ring {
            Some(r) => rings.push(r),
            None => {
                rings.into_iter().flatten().for_each(|b| steps.cpu_mut().recycle(b));
                return Err(Error::StepOrder("a pipelined call on a slice whose exponentials cannot be kept"));
            }
        }
    }
    // each chunk's memory cut into the workers' shares (`rows[w][q]` worker `w`'s rows of chunk
    // `q`, `parts[w][q]` their memory)
    let mut parts: Vec<Vec<Option<M>>> = (0..workers).map(|_| Vec::with_capacity(n)).collect();
    let mut rows: Vec<Vec<Range<usize>>> = (0..workers).map(|_| Vec::with_capacity(n)).collect();
    for (q, (m, r)) in mems.into_iter().zip(chunks).enumerate() {
        let mut rest = Some(m);
        for p in 0..workers {
            let w = worker_of(p, q, workers);
            let mine = piece(r, p, workers);
            let (part, after) = rest.take().expect("the rest of the chunk").split_at(mine.len() * len);
            parts[w].push(Some(part));
            rows[w].push(mine);
            rest = Some(after);
        }
    }
    let sh = Shared {
        workers,
        progress: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
        stats: (0..n * workers).map(|_| Mutex::new(Vec::new())).collect(),
        merged: (0..n).map(|_| OnceLock::new()).collect(),
        stop: AtomicBool::new(false),
    };
    let words = steps.words_per_row();
    let (plan, cpu, mut merge) = steps.pipeline_parts();
    let mut list: Vec<Worker<'_, M>> = parts
        .into_iter()
        .zip(rings.iter_mut())
        .enumerate()
        .map(|(w, (mems, ring))| Worker { w, mems, rows: std::mem::take(&mut rows[w]), ring, scratch: cpu.scratch() })
        .collect();
    let mut me = list.remove(0);
    let slots: Vec<Slot<'_, M>> =
        list.into_iter().map(|wk| Slot { worker: Mutex::new(wk), running: AtomicBool::new(false) }).collect();
    let result = crate::pool::in_place_scope(|s| -> Result<()> {
        let _guard = StopOnPanic(&sh.stop);
        // starts the pool's workers that are not running (after a merge they may be waiting
        // for), the first time with a spare job each
        let start = |spares: bool| {
            std::sync::atomic::fence(Ordering::SeqCst);
            for slot in &slots {
                if slot.running.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                    let sh = &sh;
                    s.spawn(move |_| slot.drive(chunks, cpu, plan, sh));
                    if spares {
                        s.spawn(move |_| slot.drive(chunks, cpu, plan, sh));
                    }
                }
            }
        };
        start(true);
        // chunk `c`'s exchange and merge, once every worker has its statistics
        let mut merge_chunk = |c: usize| -> Result<()> {
            if !sh.wait(|| sh.taken(c), None) {
                return Err(Error::StepOrder("a worker of the pipeline stopped"));
            }
            let mut st = Vec::with_capacity(chunks[c].len());
            for p in 0..workers {
                let w = worker_of(p, c, workers);
                st.append(&mut sh.stats[c * workers + w].lock().unwrap_or_else(|e| e.into_inner()));
            }
            let wds = words * st.len() + SLICE_WORDS;
            merge.encode(&st, ex.buffer(wds));
            let (gathered, stride) = ex.gather(wds)?;
            let merged = merge.merge(&chunks[c], gathered, Some(stride))?;
            let _ = sh.merged[c].set(merged);
            start(false);
            Ok(())
        };
        let mut run = || -> Result<()> {
            let mut next = 0;
            for q in 0..n + AHEAD {
                if let Some(c) = q.checked_sub(AHEAD) {
                    while next <= c {
                        merge_chunk(next)?;
                        next += 1;
                    }
                }
                me.pass(q, chunks, cpu, plan, &sh);
                // the chunks every worker has taken, merged now rather than when needed
                while next < n.min(q + 1) && sh.taken(next) {
                    merge_chunk(next)?;
                    next += 1;
                }
            }
            Ok(())
        };
        let r = run();
        if r.is_err() {
            sh.stop.store(true, Ordering::Release);
        }
        r
    });
    drop(me);
    drop(slots);
    for b in rings.into_iter().flatten() {
        steps.cpu_mut().recycle(b);
    }
    result
}
