//! The chunk loop of a [`Sharded`](super::Sharded) call that writes a gradient, with two passes
//! in flight.
//!
//! Pass `q` takes the statistics of chunk `q` and writes the gradient of chunk `q − 2`. The
//! caller's thread submits the passes to the rayon pool and runs every exchange itself: it waits
//! for pass `q`, exchanges and merges chunk `q`'s statistics, and submits pass `q + 2`, while pass
//! `q + 1` keeps the pool busy. So the pool never waits for the exchange, nor for the caller's
//! thread to wake up and hand it the next chunk (a fork-join from outside the pool costs tens of
//! microseconds per chunk, and more once the pool's threads have gone to sleep). The exchange
//! stays on the caller's thread, as a collective such as `torch.distributed` needs.
//!
//! Four chunks' exponentials are kept at once (the two passes in flight each read one and write
//! one), in buffers that rotate. Every row is computed as in the loop of one pass at a time: the
//! same bits.

use super::exchange::Exchange;
use super::wire::SLICE_WORDS;
use super::ShardedLoss;
use crate::cpu::split::{ChunkExps, Dest, GradPart, Rows, StatsPart};
use crate::cpu::RowStats;
use crate::dtype::Logit;
use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::mpsc;

/// Chunks between a chunk's statistics and its gradient: pass `q` takes the statistics of chunk
/// `q` and writes the gradient of chunk `q − AHEAD`.
const AHEAD: usize = 2;

/// Chunk buffers in rotation: chunk `c`'s exponentials live in buffer `c % RING` from pass `c`
/// to pass `c + AHEAD`.
const RING: usize = 2 * AHEAD;

/// One chunk's memory: the logits its statistics read, and where its gradient goes.
pub(super) trait ChunkMem<L, G>: Send {
    fn logits(&self) -> &[L];
    fn dest(&mut self) -> Dest<'_, L, G>;
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
}

/// What a pass hands back: the memory and buffers it borrowed, and the statistics it took.
struct Done<M> {
    stats: Option<(M, ChunkExps, Vec<RowStats>)>,
    grad: Option<(M, ChunkExps)>,
}

/// Runs the chunks (`mems[c]` is chunk `c`'s memory) through the pipeline. The caller checked
/// that the slice's exponentials can be kept.
pub(super) fn run<L: Logit, G: Logit, M: ChunkMem<L, G>>(
    steps: &mut ShardedLoss,
    ex: &mut Exchange<'_>,
    chunks: &[Range<usize>],
    mems: Vec<M>,
) -> Result<()> {
    let n = chunks.len();
    let max_rows = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
    let mut bufs: Vec<Option<ChunkExps>> = (0..RING.min(n)).map(|_| steps.cpu_mut().chunk_buffers(max_rows)).collect();
    if bufs.iter().any(Option::is_none) {
        return Err(Error::StepOrder("a pipelined call on a slice whose exponentials cannot be kept"));
    }
    let words = steps.words_per_row();
    let mut mems: Vec<Option<M>> = mems.into_iter().map(Some).collect();
    let mut merged: Vec<Option<Vec<RowStats>>> = (0..n).map(|_| None).collect();
    let (plan, cpu, mut merge) = steps.pipeline_parts();
    let result = crate::pool::in_place_scope(|s| -> Result<()> {
        // the passes in flight, in the order they were submitted
        let mut in_flight: VecDeque<(usize, mpsc::Receiver<Done<M>>)> = VecDeque::new();
        // pass q: the statistics of chunk q (q < n) and the gradient of chunk q - AHEAD
        let submit =
            |q: usize, mems: &mut [Option<M>], bufs: &mut [Option<ChunkExps>], merged: &mut [Option<Vec<RowStats>>]| {
                let stats = (q < n).then(|| {
                    let m = mems[q].take().expect("chunk memory in hand");
                    (m, bufs[q % RING].take().expect("buffer in hand"), vec![RowStats::EMPTY; chunks[q].len()])
                });
                let grad = q.checked_sub(AHEAD).map(|c| {
                    let m = mems[c].take().expect("chunk memory in hand");
                    let b = bufs[c % RING].take().expect("buffer in hand");
                    (m, b, merged[c].take().expect("merged before its gradient"), chunks[c].clone())
                });
                let stats_rows = chunks.get(q).cloned();
                let (tx, rx) = mpsc::channel();
                s.spawn(move |_| {
                    let mut stats = stats;
                    let mut grad = grad;
                    let g = grad.as_mut().map(|(m, b, merged, r)| GradPart {
                        rows: Rows::range(r.clone()),
                        merged: &merged[..],
                        dest: m.dest(),
                        exps: b,
                    });
                    let st = stats.as_mut().zip(stats_rows).map(|((m, b, out), r)| StatsPart {
                        rows: Rows::range(r),
                        logits: m.logits(),
                        out: &mut out[..],
                        exps: b,
                    });
                    cpu.pass(plan, g, st);
                    // the receiver is gone only when the caller gave up on an error
                    let _ = tx.send(Done { stats, grad: grad.map(|(m, b, _, _)| (m, b)) });
                });
                rx
            };
        for q in 0..AHEAD.min(n) {
            in_flight.push_back((q, submit(q, &mut mems, &mut bufs, &mut merged)));
        }
        while let Some((q, rx)) = in_flight.pop_front() {
            let done = rx.recv().map_err(|_| Error::StepOrder("a pass of the pipeline stopped"))?;
            if let Some((_, b)) = done.grad {
                // chunk q - AHEAD is finished: its buffer serves chunk q + AHEAD
                bufs[(q - AHEAD) % RING] = Some(b);
            }
            if let Some((m, b, st)) = done.stats {
                mems[q] = Some(m);
                bufs[q % RING] = Some(b);
                let w = words * st.len() + SLICE_WORDS;
                merge.encode(&st, ex.buffer(w));
                let (gathered, stride) = ex.gather(w)?;
                merged[q] = Some(merge.merge(&chunks[q], gathered, Some(stride))?);
            }
            if q < n {
                in_flight.push_back((q + AHEAD, submit(q + AHEAD, &mut mems, &mut bufs, &mut merged)));
            }
        }
        Ok(())
    });
    for b in bufs.into_iter().flatten() {
        steps.cpu_mut().recycle(b);
    }
    result
}
