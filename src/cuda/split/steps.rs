//! [`CudaSharded`]: the split's steps as kernels queued on the caller's stream.

use super::kernels::{batch, block_threads, rows_config};
use crate::cuda::launch::{Planned, Ptrs};
use crate::cuda::params::{self, FwlSplitBatchParams, FwlSplitGradParams, FwlSplitStatsParams};
use crate::cuda::{drv, CudaLoss, DeviceInputs, DeviceLossOutput, FwlStatus};
use crate::dtype::{Logit, TokenId};
use crate::error::{Error, Result};
use crate::parallel::VocabSlice;
use crate::spec::{check_len, LossSpec, Reduction, Shape};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, PushKernelArg};
use std::ffi::c_void;
use std::ops::Range;
use std::sync::Arc;

/// One sharded call on device buffers, as steps (see the [module](super) docs). Everything is
/// queued on the stream each step is given: use one stream for all the steps of a call (the one
/// given to [`new`](Self::new), on which its buffers are allocated). Nothing synchronises.
pub struct CudaSharded {
    loss: CudaLoss,
    spec: LossSpec,
    shape: Shape,
    slice: VocabSlice,
    planned: Planned,
    /// Copies of the call's token weights and upstream gradient scale (the steps after `new`
    /// read them; a copy of `B * T` floats frees the call from its inputs' lifetime).
    token_weights: Option<CudaSlice<f32>>,
    grad_scale: Option<CudaSlice<f32>>,
    finished: Vec<bool>,
    missing: usize,
    grad_written: bool,
    /// Whether the statistics and gradient kernels get blocks sized to their rows
    /// ([`block_threads`]) rather than `THREADS` (the tiled fused linear path's blocks).
    fitted_blocks: bool,
}

impl std::fmt::Debug for CudaSharded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaSharded").field("shape", &self.shape).field("slice", &self.slice).finish()
    }
}

impl CudaSharded {
    /// Queues the plan kernel (targets in the whole vocabulary, weights, per-sample coefficients)
    /// for this rank's samples: `shape` is `[B, T, V]` with this rank's `B` and the whole `V`.
    /// The inputs are read by work queued here (on `stream`) only.
    pub fn new<I: TokenId>(
        loss: &CudaLoss,
        spec: &LossSpec,
        shape: Shape,
        slice: VocabSlice,
        stream: &Arc<CudaStream>,
        inputs: &DeviceInputs<'_, I>,
    ) -> Result<Self> {
        if slice.vocab() != shape.vocab() {
            return Err(Error::InvalidVocabSlice { start: slice.start(), len: slice.len(), vocab: shape.vocab() });
        }
        loss.validate(spec, shape, shape.logits_len(), inputs, None)?;
        let mut planned = loss.with_inputs(stream, inputs, 0, 0, |s, p| loss.launch_plan::<I>(spec, shape, s, p))?;
        let copy = |v: &CudaView<'_, f32>| -> Result<CudaSlice<f32>> {
            let mut c = crate::cuda::output::<f32>(stream, v.len())?;
            stream.memcpy_dtod(v, &mut c).map_err(drv("copying on the device"))?;
            Ok(c)
        };
        let token_weights = inputs.token_weights.map(copy).transpose()?;
        let grad_scale = inputs.grad_scale.map(copy).transpose()?;
        // the finish kernel reads the token weights through the plan: this call's copy
        planned.opts.token_weights = token_weights.as_ref().map_or(0, |w| w.device_ptr(stream).0);
        Ok(CudaSharded {
            loss: loss.clone(),
            spec: spec.clone(),
            shape,
            slice,
            planned,
            token_weights,
            grad_scale,
            finished: vec![false; shape.rows()],
            missing: shape.rows(),
            grad_written: false,
            fitted_blocks: false,
        })
    }

    /// `f32` words of one row's statistics: 3, or 5 with label smoothing (+ the slice's sum of
    /// `z − max` and its length).
    pub fn words_per_row(&self) -> usize {
        if self.spec.label_smoothing != 0.0 {
            params::FWL_SPLIT_WORDS_SMOOTHING as usize
        } else {
            params::FWL_SPLIT_WORDS as usize
        }
    }

    /// The length of [`partials`](Self::partials)' output for `rows` rows.
    pub fn partials_len(&self, rows: usize) -> usize {
        rows * self.words_per_row()
    }

    /// The call's rows, `B * T`.
    pub fn rows(&self) -> usize {
        self.shape.rows()
    }

    /// This rank's slice.
    pub fn slice(&self) -> VocabSlice {
        self.slice
    }

    fn check_range(&self, rows: &Range<usize>) -> Result<()> {
        if rows.start > rows.end || rows.end > self.rows() {
            return Err(Error::RowRange { start: rows.start, end: rows.end, rows: self.rows() });
        }
        Ok(())
    }

    /// Launches the statistics and gradient kernels with blocks sized to their rows' width
    /// ([`block_threads`]) instead of the crate's `THREADS`.
    pub(in crate::cuda) fn fit_blocks(&mut self) {
        self.fitted_blocks = true;
    }

    fn threads(&self, cols: VocabSlice) -> u32 {
        if self.fitted_blocks {
            block_threads(cols.len())
        } else {
            crate::cuda::THREADS
        }
    }

    fn check_cols(&self, cols: VocabSlice) -> Result<()> {
        let s = self.slice;
        if cols.vocab() != s.vocab() || cols.start() < s.start() || cols.start() + cols.len() > s.start() + s.len() {
            return Err(Error::InvalidVocabSlice { start: cols.start(), len: cols.len(), vocab: s.vocab() });
        }
        Ok(())
    }

    fn check_rows(&self, rows: &Range<usize>, what: &'static str, got: usize) -> Result<()> {
        self.check_range(rows)?;
        check_len(what, got, rows.len() * self.slice.len(), self.shape)
    }

    /// Writes this rank's data-parallel totals `[B, Σ w_b]` into `out` (2 elements), for the
    /// all-gather over the data group.
    pub fn batch_totals(&self, stream: &Arc<CudaStream>, out: &mut CudaViewMut<'_, f64>) -> Result<()> {
        if out.len() != 2 {
            return Err(Error::ExchangeLength { what: "batch totals buffer", expected: 2, got: out.len() });
        }
        let (w, _g1) = self.planned.weights.device_ptr(stream);
        let (t, _g2) = out.device_ptr_mut(stream);
        let p = FwlSplitBatchParams {
            weights: w as *const f64,
            totals: t as *mut f64,
            batch: self.shape.batch() as i64,
            mode: params::FWL_SPLIT_TOTALS as i32,
            ..Default::default()
        };
        batch(&self.loss, stream, p)
    }

    /// Sets the reduction's denominator from the data group's all-gathered
    /// [`batch_totals`](Self::batch_totals) (`2 × ranks` numbers, summed in rank order on the
    /// device). Before any gradient is written. Under the weighted mean, a group's `Σ w_b`
    /// beyond `f64` (every rank's finite: each weight's share would be 0) is reported by the
    /// output's `check` and `to_host` on every rank, as the host split reports it
    /// (`InvalidOption` on the keyword weights, value `inf`); a later call of this step does not
    /// clear that report.
    pub fn set_batch_totals(&mut self, stream: &Arc<CudaStream>, gathered: &CudaView<'_, f64>) -> Result<()> {
        let ranks = pairs("gathered batch totals", gathered.len())?;
        if self.grad_written {
            return Err(Error::StepOrder("set_batch_totals after a gradient was written"));
        }
        let Planned { weights, row_div, reduce, coef, status, .. } = &mut self.planned;
        let (w, _g1) = weights.device_ptr(stream);
        let (d, _g2) = row_div.device_ptr(stream);
        let (g, _g3) = gathered.device_ptr(stream);
        let (r, _g4) = reduce.device_ptr_mut(stream);
        let (c, _g5) = coef.device_ptr_mut(stream);
        let (s, _g6) = status.device_ptr_mut(stream);
        let scale = self.grad_scale.as_ref().map(|s| s.device_ptr(stream));
        let p = FwlSplitBatchParams {
            weights: w as *const f64,
            row_div: d as *const f64,
            gathered: g as *const f64,
            reduce: r as *mut f64,
            coef: c as *mut f32,
            grad_scale_ptr: scale.as_ref().map_or(0, |s| s.0) as *const f32,
            status: s as *mut FwlStatus,
            grad_scale: self.spec.grad_scale,
            batch: self.shape.batch() as i64,
            ranks,
            reduction: match self.spec.reduction {
                Reduction::Mean => params::FWL_REDUCE_MEAN as i32,
                Reduction::WeightedMean => params::FWL_REDUCE_WEIGHTED_MEAN as i32,
                Reduction::Sum => params::FWL_REDUCE_SUM as i32,
            },
            mode: params::FWL_SPLIT_DENOMINATOR as i32,
            ..Default::default()
        };
        batch(&self.loss, stream, p)
    }

    /// Queues the statistics of this rank's columns of rows `rows` (`logits`: those rows,
    /// `slice.len()` each) into `out` ([`partials_len`](Self::partials_len)`(rows.len())` f32).
    pub fn partials<L: Logit>(
        &self,
        stream: &Arc<CudaStream>,
        rows: Range<usize>,
        logits: &CudaView<'_, L>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.check_rows(&rows, "logits", logits.len())?;
        let (x, _g1) = logits.device_ptr(stream);
        self.launch_stats::<L>(stream, rows, x, out)
    }

    /// Queues the statistics kernel on rows `rows` of logits at `x` (`slice.len()` per row) into
    /// `out` (`partials_len(rows.len())` f32), both checked by the caller and held while this runs.
    pub(in crate::cuda) fn launch_stats<L: Logit>(
        &self,
        stream: &Arc<CudaStream>,
        rows: Range<usize>,
        x: u64,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let n = out.len();
        let (o, _go) = out.device_ptr_mut(stream);
        self.launch_stats_of::<L>(stream, rows, self.slice, x, (o, n), false)
    }

    /// [`launch_stats`](Self::launch_stats) on the columns `cols` (within this rank's slice)
    /// only, `cols.len()` logits per row, into `out.1` f32 at device address `out.0` (held by
    /// the caller while this runs); with `fold`, merged into the statistics `out` holds (the
    /// previous columns', merged in order: what the gradient kernel's merge of them all gives):
    /// the tiled fused linear path's vocabulary blocks.
    pub(in crate::cuda) fn launch_stats_of<L: Logit>(
        &self,
        stream: &Arc<CudaStream>,
        rows: Range<usize>,
        cols: VocabSlice,
        x: u64,
        out: (u64, usize),
        fold: bool,
    ) -> Result<()> {
        self.check_range(&rows)?;
        self.check_cols(cols)?;
        let words = self.words_per_row();
        if out.1 != rows.len() * words {
            return Err(Error::ExchangeLength { what: "partials buffer", expected: rows.len() * words, got: out.1 });
        }
        if rows.is_empty() {
            return Ok(());
        }
        self.loss.same_context(stream)?;
        let split = &self.loss.module.split;
        let func = split.stats.iter().find(|(d, _)| *d == L::DTYPE).map(|(_, f)| f);
        let func = func.ok_or_else(|| Error::Unsupported(format!("no split kernel for {} logits", L::DTYPE)))?;
        let o = out.0;
        let (t, _g3) = self.planned.targets.device_ptr(stream);
        let p = FwlSplitStatsParams {
            logits: x as *const c_void,
            targets: t as *const i32,
            partials: o as *mut f32,
            rows: rows.len() as i64,
            row0: rows.start as i64,
            len: cols.len() as i64,
            v0: cols.start() as i64,
            words: words as i32,
            softcap: self.spec.softcap.map_or(0.0, |c| c as f32),
            fold: fold as i32,
        };
        let cfg = rows_config(&self.loss, func, rows.len(), self.threads(cols))?;
        // SAFETY: the parameters match fwl_split_stats_<L>'s; logits hold rows * len elements of
        // L (checked, or sized so by the caller), partials rows * words f32 (checked), targets the plan's B * T rows, of
        // which rows row0..row0 + rows are read (range checked).
        unsafe { stream.launch_builder(func).arg(&p).launch(cfg) }
            .map(drop)
            .map_err(drv("launching the split's statistics"))
    }

    /// Merges the all-gathered statistics of rows `rows` (every rank's
    /// [`partials`](Self::partials), concatenated in rank order) and records the rows' losses;
    /// no gradient.
    pub fn finish_rows<L: Logit>(
        &mut self,
        stream: &Arc<CudaStream>,
        rows: Range<usize>,
        gathered: &CudaView<'_, f32>,
        logits: &CudaView<'_, L>,
    ) -> Result<()> {
        self.check_rows(&rows, "logits", logits.len())?;
        let (x, _g) = logits.device_ptr(stream);
        self.launch_grad::<L, L>(stream, rows, gathered, x, 0)
    }

    /// [`finish_rows`](Self::finish_rows) and the gradient of this rank's columns of those rows
    /// into `grad` (`slice.len()` per row; `G` is the logits' dtype or `f32`).
    pub fn finish_rows_grad<L: Logit, G: Logit>(
        &mut self,
        stream: &Arc<CudaStream>,
        rows: Range<usize>,
        gathered: &CudaView<'_, f32>,
        logits: &CudaView<'_, L>,
        grad: &mut CudaViewMut<'_, G>,
    ) -> Result<()> {
        self.check_rows(&rows, "logits", logits.len())?;
        self.check_rows(&rows, "gradient", grad.len())?;
        let (x, _g1) = logits.device_ptr(stream);
        let (g, _g2) = grad.device_ptr_mut(stream);
        self.launch_grad::<L, G>(stream, rows, gathered, x, g)
    }

    /// [`finish_rows_grad`](Self::finish_rows_grad) with the gradient written over the logits.
    pub fn finish_rows_in_place<L: Logit>(
        &mut self,
        stream: &Arc<CudaStream>,
        rows: Range<usize>,
        gathered: &CudaView<'_, f32>,
        logits: &mut CudaViewMut<'_, L>,
    ) -> Result<()> {
        self.check_rows(&rows, "logits", logits.len())?;
        let (x, _g) = logits.device_ptr_mut(stream);
        self.launch_grad::<L, L>(stream, rows, gathered, x, x)
    }

    /// Queues the gradient kernel on rows `rows` of logits at `x` (gradient at `g`, 0 for none),
    /// `slice.len()` elements per row, both checked by the caller and held while this runs.
    pub(in crate::cuda) fn launch_grad<L: Logit, G: Logit>(
        &mut self,
        stream: &Arc<CudaStream>,
        rows: Range<usize>,
        gathered: &CudaView<'_, f32>,
        x: u64,
        g: u64,
    ) -> Result<()> {
        let (q, _gq) = gathered.device_ptr(stream);
        self.launch_grad_of::<L, G>(stream, rows, self.slice, (q, gathered.len()), x, g)
    }

    /// [`launch_grad`](Self::launch_grad) on the columns `cols` (within this rank's slice) only,
    /// `cols.len()` logits and gradient entries per row, with the gathered partials at device
    /// address `gathered.0` (`gathered.1` f32, held by the caller while this runs): the tiled
    /// fused linear path's vocabulary blocks, whose partials stand for ranks.
    pub(in crate::cuda) fn launch_grad_of<L: Logit, G: Logit>(
        &mut self,
        stream: &Arc<CudaStream>,
        rows: Range<usize>,
        cols: VocabSlice,
        gathered: (u64, usize),
        x: u64,
        g: u64,
    ) -> Result<()> {
        self.check_range(&rows)?;
        self.check_cols(cols)?;
        let (n, words) = (rows.len(), self.words_per_row());
        if n == 0 {
            return Ok(());
        }
        self.loss.same_context(stream)?;
        let ranks = gathered.1 / (n * words);
        if ranks == 0 || ranks * n * words != gathered.1 || ranks > i32::MAX as usize {
            let expected = n * words * ranks.max(1);
            return Err(Error::ExchangeLength { what: "gathered partials", expected, got: gathered.1 });
        }
        let func = self.loss.module.split.grad_fn(L::DTYPE, G::DTYPE)?;
        let threads = self.threads(cols);
        let Planned { targets, coef, row_loss, row_z, opts, .. } = &mut self.planned;
        let z_on = opts.z_loss != 0.0;
        let q = gathered.0;
        let (t, _g2) = targets.device_ptr(stream);
        let (c, _g3) = coef.device_ptr(stream);
        let (rl, _g4) = row_loss.device_ptr_mut(stream);
        let (rz, _g5) = row_z.device_ptr_mut(stream);
        let tw = self.token_weights.as_ref().map(|w| w.device_ptr(stream));
        let p = FwlSplitGradParams {
            logits: x as *const c_void,
            grad: g as *mut c_void,
            gathered: q as *const f32,
            targets: t as *const i32,
            coef: c as *const f32,
            token_weights: tw.as_ref().map_or(0, |w| w.0) as *const f32,
            row_loss: rl as *mut f64,
            row_z: if z_on { rz as *mut f64 } else { std::ptr::null_mut() },
            rows: n as i64,
            row0: rows.start as i64,
            seq: self.shape.seq() as i64,
            len: cols.len() as i64,
            v0: cols.start() as i64,
            vocab: self.shape.vocab() as i64,
            ranks: ranks as i32,
            words: words as i32,
            vector_stores: (L::DTYPE.size() == G::DTYPE.size() && g % 16 == x % 16) as i32,
            softcap: self.spec.softcap.map_or(0.0, |c| c as f32),
            z_loss: self.spec.z_loss,
            smoothing: self.spec.label_smoothing,
        };
        let cfg = rows_config(&self.loss, func, n, threads)?;
        // SAFETY: the parameters match fwl_split_grad_<L>_<G>'s; with a gradient (g not 0),
        // logits and grad hold rows * len elements of L and G (checked, or sized so, by the
        // callers); without one the kernel reads no logit (split_grad_impl stops after the row's
        // loss), so the tiled schedule's loss-only call may pass the whole vocabulary's columns
        // with a buffer of one block's; gathered ranks * rows *
        // words f32 (checked), targets, row_loss, row_z (when not NULL) and token_weights (when
        // not 0) the plan's B * T rows (row0 + rows <= B * T, checked), coef B.
        unsafe { stream.launch_builder(func).arg(&p).launch(cfg) }.map_err(drv("launching the split's gradient"))?;
        if g != 0 {
            self.grad_written = true;
        }
        for r in rows {
            if !std::mem::replace(&mut self.finished[r], true) {
                self.missing -= 1;
            }
        }
        Ok(())
    }

    /// Queues the one-device rows kernel on rows `rows` of logits at `x` (gradient at `g`, 0 for
    /// none; both point at row `rows.start`), which hold the whole vocabulary (a rank of a data group alone): one read of the
    /// logits and no exchange; the plan's coefficients carry the data group's denominators. Both
    /// buffers checked by the caller and held while this runs.
    pub(in crate::cuda) fn launch_whole_rows<L: Logit, G: Logit>(
        &mut self,
        stream: &Arc<CudaStream>,
        rows: Range<usize>,
        x: u64,
        g: u64,
    ) -> Result<()> {
        self.check_range(&rows)?;
        if self.slice.len() != self.shape.vocab() {
            return Err(Error::Unsupported("the one-device pass of a split needs the whole vocabulary".into()));
        }
        if rows.is_empty() {
            return Ok(());
        }
        // the rows kernel reads the token weights through the plan: this call's copy, held
        let _tw = self.token_weights.as_ref().map(|w| w.device_ptr(stream));
        let p = Ptrs { logits: x, grad: g, ids: 0, labels: 0, token_weights: 0, scale: 0 };
        self.loss.launch_rows::<L, G>(self.shape, stream, &p, rows.start, rows.len(), &mut self.planned)?;
        if g != 0 {
            self.grad_written = true;
        }
        for r in rows {
            if !std::mem::replace(&mut self.finished[r], true) {
                self.missing -= 1;
            }
        }
        Ok(())
    }

    /// Queues the finish kernel (per-sample means, batch loss) once every row is finished: the
    /// loss on a data group of one, else this rank's share (see [`combine_loss`](Self::combine_loss)).
    pub fn finish(self, stream: &Arc<CudaStream>) -> Result<DeviceLossOutput> {
        if self.missing > 0 {
            return Err(Error::StepOrder("finish before every row's statistics were merged"));
        }
        // the finish kernel reads the token weights' copy; it is freed in `stream`'s order after
        let _tw = self.token_weights.as_ref().map(|w| w.device_ptr(stream));
        self.loss.launch_finish(&self.spec, self.shape, stream, self.planned)
    }

    /// Copies a data-parallel rank's share `[loss, z_loss]` of `out` into `dst` (2 elements), for
    /// the all-gather over the data group.
    pub fn loss_totals(out: &DeviceLossOutput, stream: &Arc<CudaStream>, dst: &mut CudaViewMut<'_, f64>) -> Result<()> {
        if dst.len() != 2 {
            return Err(Error::ExchangeLength { what: "loss totals buffer", expected: 2, got: dst.len() });
        }
        stream.memcpy_dtod(&out.loss, &mut dst.slice_mut(0..1)).map_err(drv("copying on the device"))?;
        stream.memcpy_dtod(&out.z_loss, &mut dst.slice_mut(1..2)).map_err(drv("copying on the device"))
    }

    /// Sets `out`'s loss, z-loss and f32 loss to the rank-order sums of the data group's
    /// all-gathered [`loss_totals`](Self::loss_totals) (`2 × ranks` numbers), on the device.
    pub fn combine_loss(
        loss: &CudaLoss,
        out: &mut DeviceLossOutput,
        stream: &Arc<CudaStream>,
        gathered: &CudaView<'_, f64>,
    ) -> Result<()> {
        let ranks = pairs("gathered loss totals", gathered.len())?;
        out.over_group = true;
        let (g, _g1) = gathered.device_ptr(stream);
        let (l, _g2) = out.loss.device_ptr_mut(stream);
        let (z, _g3) = out.z_loss.device_ptr_mut(stream);
        let (l32, _g4) = out.loss_f32.device_ptr_mut(stream);
        let p = FwlSplitBatchParams {
            gathered: g as *const f64,
            loss: l as *mut f64,
            z_loss: z as *mut f64,
            loss_f32: l32 as *mut f32,
            ranks,
            mode: params::FWL_SPLIT_LOSS as i32,
            ..Default::default()
        };
        batch(loss, stream, p)
    }
}

/// The ranks of an all-gather of two numbers per rank (at least one, a whole number of pairs).
fn pairs(what: &'static str, len: usize) -> Result<i32> {
    if len == 0 || !len.is_multiple_of(2) || len / 2 > i32::MAX as usize {
        return Err(Error::ExchangeLength { what, expected: 2 * (len / 2).max(1), got: len });
    }
    Ok((len / 2) as i32)
}
