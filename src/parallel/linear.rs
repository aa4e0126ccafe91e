//! The split of the fused linear path (CPU): rank `r` of the vocabulary group holds rows
//! `[v0_r, v0_r + V_r)` of the output weight `W` (and of the bias). Per chunk of token rows,
//! `z_c = h_c·W_rᵀ (+ b_r)` is this rank's slice of the chunk's logits; the slice's statistics
//! are all-gathered and merged in rank order as on the logits path, the slice's gradient `G_c`
//! written over `z_c` (from the kept exponentials), then `d h_c = G_c·W_r` (this rank's part),
//! `d W_r += G_cᵀ·h_c` and `d b_r += Σ G_c` as the unsplit path does.

use super::agree::{call_digest, Agreement, LINEAR_CALL};
use super::exchange::Exchange;
use super::wire::{encode_sealed, SLICE_WORDS};
use super::{finish_over, first_exchanges, global_denominator, plan_totals, token_dims, Sharded};
use crate::cpu::split::{merge_rows, words, Dest, Rows, SplitCpu};
use crate::cpu::{RowSel, RowStats};
use crate::dtype::{Logit, TokenId};
use crate::error::Result;
use crate::linear::cpu::{active_rows, chunk_row_bytes, run_with};
use crate::linear::{Chunking, LinearGrads, LinearInputs, LinearOutput, LinearShape, CPU_BUDGET};
use crate::spec::{LossSpec, Tokens};
use crate::{Backend, Grad};

/// Chunk buffers per exchange by default: twice the unsplit path's budget, a fixed number so
/// that every rank cuts the same chunks whatever its thread count.
const LINEAR_BUDGET: usize = 2 * CPU_BUDGET;

impl Sharded<'_> {
    /// The fused linear loss ([`LossSpec::linear_loss_and_grad`]) with this rank's rows of the
    /// output weight: `shape` has the whole vocabulary, `inputs` the hidden states of this
    /// rank's samples (the same on every rank of the vocabulary group) and `W`'s rows (and the
    /// bias's entries) of this rank's slice, `slice.len() x H`. `d W` and `d bias` are those of
    /// this rank's rows; **`d hidden` is this rank's part**, `G_r·W_r`: the gradient of the
    /// hidden states is its sum over the vocabulary group (an all-reduce, as the backward of a
    /// vocabulary-parallel output layer does anyway). The chunking must be the same on every
    /// rank; by default it depends only on `V`, `H`, the group's size and the tokens. Runs on the
    /// CPU backend.
    ///
    /// Bad input, this rank's or a peer's (slices that do not tile the vocabulary, ranks of
    /// different vocabularies, ranks of the vocabulary group with tokens of different `[B, T]`
    /// ([`Error::GroupShapeMismatch`](crate::Error::GroupShapeMismatch)), a peer's own bad
    /// tokens or buffers:
    /// [`Error::PeerFailed`](crate::Error::PeerFailed), see the [module docs](super)), is an
    /// error on every rank before any gradient buffer is written (the slices and shapes, then
    /// the batch totals are exchanged and checked first). A failure of the exchange itself during the
    /// sweep (a peer that went away) leaves the gradient buffers partly written, `d weight`
    /// partly accumulated into: do not retry such a step on the same buffers.
    ///
    /// ```
    /// use fused_weighted_loss::parallel::{Sharded, Solo, VocabSlice};
    /// use fused_weighted_loss::{Chunking, Grad, LinearGrads, LinearInputs, LinearShape, LossSpec, Tokens};
    /// let shape = LinearShape::new(1, 4, 3, 10)?;
    /// let hidden: Vec<f32> = (0..12).map(|i| (i % 5) as f32 * 0.3 - 0.6).collect();
    /// let weight: Vec<f32> = (0..30).map(|i| (i % 7) as f32 * 0.2 - 0.6).collect();
    /// let ids = [1i64, 4, 9, 2];
    /// let spec = LossSpec::default();
    /// let mut dw = vec![0f32; 30];
    /// let grads = LinearGrads::new().weight(Grad::Into(&mut dw));
    /// let out = Sharded::vocab_parallel(VocabSlice::full(10)?, &Solo).linear_loss_and_grad(
    ///     &spec, shape, LinearInputs::new(&hidden, &weight), Tokens::new(&ids), grads, Chunking::Auto)?;
    /// let plain = spec.linear_loss_and_grad(
    ///     shape, LinearInputs::new(&hidden, &weight), Tokens::new(&ids), LinearGrads::new(), Chunking::Auto)?;
    /// assert!((out.loss.loss - plain.loss.loss).abs() <= 1e-6 * plain.loss.loss);
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn linear_loss_and_grad<L: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: LinearShape,
        inputs: LinearInputs<'_, L>,
        tokens: Tokens<'_, I>,
        grads: LinearGrads<'_, L>,
        chunking: Chunking,
    ) -> Result<LinearOutput> {
        let (vg, dg) = (self.vocab_group, self.data_group);
        let slice = self.slice;
        self.check_ranks()?;
        // this rank's own errors (here and in the plan) wait for the first exchanges, which
        // carry them to every rank of both groups (see `first_exchanges`)
        let checked = (|| -> Result<_> {
            self.check_vocab(shape.vocab())?;
            let local = shape.with_vocab(slice.len())?;
            inputs.check(local)?;
            grads.check(local, inputs.bias.is_some())?;
            self.check_alone_holds_all()?;
            chunking.rows_for(1, 1, 1)?;
            Ok(local)
        })();
        // what the ranks of a group compare: the rows per chunk (none without samples) and H
        let agree = |c: usize| {
            let call = call_digest(LINEAR_CALL, c as u64, shape.hidden() as u64);
            move || Agreement::new(spec, shape.vocab(), shape.seq(), call, &tokens)
        };
        if shape.batch() == 0 {
            // this rank's part of d W and d b: nothing (d hidden has no rows)
            let loss = super::no_samples(spec, shape.tokens(), &tokens, self, agree(0), checked.map(|_| ()))?;
            if !grads.accumulate {
                for g in [grads.weight, grads.bias] {
                    match g {
                        Grad::Skip => {}
                        Grad::Into(g) => g.fill(L::default()),
                        Grad::IntoF32(g) => g.fill(0.0),
                    }
                }
            }
            return Ok(LinearOutput { loss, chunk_rows: 0, chunks: 0, scratch_bytes: 0 });
        }
        let planned = checked.and_then(|local| {
            let plan = spec.plan(shape.tokens(), &tokens)?;
            let k = crate::cpu_kernels(spec.cpu_simd)?;
            let active = active_rows(&plan)?.len();
            // the same chunks on every rank: from the shared V / ranks, H and tokens only (the
            // first exchange compares them, with H)
            // (a row of the slice costs what a row of the unsplit path does)
            let share = shape.vocab().div_ceil(vg.size());
            let c = chunking.rows_for(LINEAR_BUDGET, chunk_row_bytes(shape.hidden(), share), active)?;
            Ok((local, plan, k, c))
        });
        let agree = agree(planned.as_ref().map_or(0, |p| p.3));
        // every rank's [B, T], agreement and slice, then the data group's batch totals, checked
        // before the sweep writes (or zeroes) a gradient buffer
        let (local, plan, k, c) = first_exchanges(
            self,
            token_dims(shape.tokens()),
            agree,
            planned,
            |(_, plan, _, _)| plan_totals(plan),
            |(_, plan, _, _), all| global_denominator(plan, spec, all),
        )?;
        let mut cpu = SplitCpu::new(k, &plan.opts, shape.vocab(), (slice.start(), slice.len()), shape.rows(), c);
        let w = words(&plan.opts);
        let mut ex = Exchange::new(vg, slice);
        let plan_ref = &plan;
        let mut pass = |rows: &[u32], z: &mut [f32], loss: &mut [f64], zl: &mut [f64]| -> Result<()> {
            let m = rows.len();
            let r = Rows { key: rows[0] as usize..rows[0] as usize + m, sel: RowSel::List(rows) };
            let mut st = vec![RowStats::EMPTY; m];
            cpu.stats(plan_ref, &r, z, &mut st, true);
            let n = m * w + SLICE_WORDS;
            encode_sealed(&st, w, slice, ex.buffer(n));
            let merged = {
                let (gathered, stride) = ex.gather(n)?;
                merge_rows(gathered, stride, w, m)
            };
            for ((s, l), zp) in merged.iter().zip(loss.iter_mut()).zip(zl.iter_mut()) {
                (*l, *zp) = cpu.m.loss(s);
            }
            cpu.grad::<f32, f32>(plan_ref, &r, &merged, Dest::InPlace(z));
            Ok(())
        };
        let (row_loss, chunks) = run_with(&k, &plan, local, &inputs, grads, Chunking::Rows(c), &mut pass)?;
        let out = finish_over(dg, spec.check_finite, |check| plan.finish(&row_loss, check, Backend::Cpu, None))?;
        // (nothing is kept of a slice longer than a kept row can be: its rows are recomputed)
        let kept = c.min(cpu.keep_rows()) * slice.len() * 4 * if cpu.m.keeps_chain() { 2 } else { 1 };
        Ok(LinearOutput {
            loss: out,
            chunk_rows: chunks.rows,
            chunks: chunks.count,
            scratch_bytes: chunks.scratch_bytes + kept,
        })
    }
}
