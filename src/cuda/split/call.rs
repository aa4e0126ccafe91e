//! The one-call API on device buffers: [`CudaSharded`]'s steps with the exchanges done through
//! the caller's [`DeviceCollective`]s, chunk by chunk, all queued on one stream.

use super::{CudaSharded, DeviceCollective, DeviceSolo};
use crate::cuda::{drv, output, CudaLoss, DeviceInputs, DeviceLossOutput};
use crate::dtype::{DType, Logit, TokenId};
use crate::error::{Error, Result};
use crate::parallel::{check_tiling, VocabSlice};
use crate::spec::{check_len, LossSpec, Shape};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// Bytes of logits per chunk: the gradient kernel reads a chunk's logits again right after the
/// exchange, from the GPU's L2 cache when they fit (50 MiB on an H100 or H200, 40 MiB on an A100).
const DEVICE_CHUNK_BYTES: usize = 24 << 20;

/// The rows [`DeviceSharded`] exchanges at once by default: about 24 MiB of `dtype` logits of a
/// slice of `ceil(vocab / ranks)` (at least 64 rows). The same on every rank of a vocabulary
/// group. (More rows per exchange: fewer all-gathers, each a collective's latency, but the
/// gradient kernel's second read of the logits spills from L2 to memory; not yet tuned on a GPU.)
///
/// ```
/// # #[cfg(feature = "cuda")] {
/// use fused_weighted_loss::cuda::split::default_device_chunk_rows;
/// use fused_weighted_loss::DType;
/// assert_eq!(default_device_chunk_rows(128_256, 8, DType::BF16), 784);
/// # }
/// ```
pub fn default_device_chunk_rows(vocab: usize, ranks: usize, dtype: DType) -> usize {
    (DEVICE_CHUNK_BYTES / (vocab.div_ceil(ranks.max(1)) * dtype.size()).max(1)).max(64)
}

/// One sharded call on device buffers: this rank's slice of the vocabulary, its vocabulary and
/// data groups. The device twin of [`Sharded`](crate::parallel::Sharded) (see there), except
/// that the calls do not check that the slices of a vocabulary group of more than one tile the
/// vocabulary, nor that its ranks hold tokens of the same `[B, T]` (which the host calls check
/// in their first exchange: ranks of different shapes make all-gathers of different sizes, a
/// hang or an abort with NCCL), and that an error one rank finds alone before an exchange
/// leaves its peers waiting (the host calls fail them: [`Error::PeerFailed`]): each needs a
/// host read of what was exchanged, which the calls do not do, except on a data-parallel rank
/// without samples (see [`Shape::without_samples`]). Run [`check_tiling`](Self::check_tiling)
/// once per configuration for the slices. A group of one must hold the whole vocabulary
/// (checked by every call).
#[derive(Clone, Copy)]
pub struct DeviceSharded<'c> {
    pub(super) slice: VocabSlice,
    pub(super) vocab_group: &'c dyn DeviceCollective,
    pub(super) data_group: &'c dyn DeviceCollective,
    chunk_rows: Option<usize>,
    split_steps: bool,
}

impl std::fmt::Debug for DeviceSharded<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSharded")
            .field("slice", &self.slice)
            .field("vocab_group", &(self.vocab_group.rank(), self.vocab_group.size()))
            .field("data_group", &(self.data_group.rank(), self.data_group.size()))
            .field("chunk_rows", &self.chunk_rows)
            .field("split_steps", &self.split_steps)
            .finish()
    }
}

static SOLO: DeviceSolo = DeviceSolo;

/// The logits of a call, and where the gradient goes.
enum Io<'v, 'a, 'b, L, G> {
    Loss(&'v CudaView<'a, L>),
    Grad(&'v CudaView<'a, L>, &'v mut CudaViewMut<'b, G>),
    InPlace(&'v mut CudaViewMut<'a, L>),
}

impl<'c> DeviceSharded<'c> {
    /// Vocabulary-parallel: this rank's logits hold `slice`; `group` reaches the other slices.
    pub fn vocab_parallel(slice: VocabSlice, group: &'c dyn DeviceCollective) -> Self {
        DeviceSharded { slice, vocab_group: group, data_group: &SOLO, chunk_rows: None, split_steps: false }
    }

    /// Data-parallel: this rank holds some samples with every logit of a vocabulary of `vocab`.
    /// The logits call runs the one-device rows kernel with the data group's denominators (one
    /// read of the logits, no chunks); the fused linear call runs the split's chunk loop.
    pub fn data_parallel(vocab: usize, group: &'c dyn DeviceCollective) -> Result<Self> {
        let slice = VocabSlice::full(vocab)?;
        Ok(DeviceSharded { slice, vocab_group: &SOLO, data_group: group, chunk_rows: None, split_steps: false })
    }

    /// Adds a data group to a vocabulary-parallel call (a 2-D grid of ranks).
    pub fn with_data_group(self, group: &'c dyn DeviceCollective) -> Self {
        DeviceSharded { data_group: group, ..self }
    }

    /// Rows per exchange (default [`default_device_chunk_rows`]); the same on every rank of the
    /// vocabulary group. At least 1. Not used by the logits call when this rank holds the whole
    /// vocabulary (it exchanges no rows).
    pub fn with_chunk_rows(self, rows: usize) -> Self {
        DeviceSharded { chunk_rows: Some(rows.max(1)), ..self }
    }

    /// Runs the split's kernels chunk by chunk even when the vocabulary group is this rank alone
    /// (which otherwise runs the one-device pass): what `bench-split` uses to time one rank's
    /// kernels of a larger group without its exchange.
    #[doc(hidden)]
    pub fn with_split_steps(self) -> Self {
        DeviceSharded { split_steps: true, ..self }
    }

    /// Checks that the slices of the vocabulary group tile the vocabulary, in any order, without
    /// gaps or overlaps ([`Error::SlicesDoNotTile`] with every rank's slice), and that each
    /// group's rank lies within its size. A collective: every rank of the vocabulary group calls
    /// it. One all-gather of two numbers per rank on `stream`, then a host read that waits for
    /// the stream: run it once when the slices or the group are set up, not every step (the
    /// calls themselves do not wait for the device, except on a rank without samples).
    pub fn check_tiling(&self, stream: &Arc<CudaStream>) -> Result<()> {
        self.check_ranks()?;
        let vg = self.vocab_group;
        if vg.size() == 1 {
            return self.check_alone_holds_all();
        }
        let mine = (self.slice.start(), self.slice.len());
        // exact in f64 (slices below 2^53)
        let send = stream.clone_htod(&[mine.0 as f64, mine.1 as f64]).map_err(drv("copying to the device"))?;
        let recv = gather_pairs(vg, stream, &send.as_view())?;
        let all = stream.clone_dtoh(&recv).map_err(drv("copying to the host"))?;
        stream.synchronize().map_err(drv("waiting for the stream"))?;
        let slices: Vec<(usize, usize)> = all.chunks_exact(2).map(|w| (w[0] as usize, w[1] as usize)).collect();
        check_tiling(&slices, self.slice.vocab())
    }

    /// Each group's rank lies within its size, and its size within [`crate::parallel::MAX_RANKS`].
    fn check_ranks(&self) -> Result<()> {
        for g in [self.vocab_group, self.data_group] {
            crate::parallel::check_group(g.rank(), g.size())?;
        }
        Ok(())
    }

    /// With no other rank in the vocabulary group to hold the rest, this one holds every column.
    fn check_alone_holds_all(&self) -> Result<()> {
        if self.vocab_group.size() == 1 {
            check_tiling(&[(self.slice.start(), self.slice.len())], self.slice.vocab())?;
        }
        Ok(())
    }

    /// The loss only.
    pub fn loss<L: Logit, I: TokenId>(
        &self,
        loss: &CudaLoss,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        logits: &CudaView<'_, L>,
        inputs: &DeviceInputs<'_, I>,
    ) -> Result<DeviceLossOutput> {
        self.run::<L, L, I>(loss, spec, shape, stream, Io::Loss(logits), inputs)
    }

    /// Loss and gradient of this rank's logits (`[B, T, slice.len()]`) into `grad` (the
    /// logits' dtype or `f32`). Every rank gets the loss of the whole batch.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grad<L: Logit, G: Logit, I: TokenId>(
        &self,
        loss: &CudaLoss,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        logits: &CudaView<'_, L>,
        inputs: &DeviceInputs<'_, I>,
        grad: &mut CudaViewMut<'_, G>,
    ) -> Result<DeviceLossOutput> {
        self.run::<L, G, I>(loss, spec, shape, stream, Io::Grad(logits, grad), inputs)
    }

    /// Loss and gradient, the gradient written over the logits.
    pub fn loss_and_grad_in_place<L: Logit, I: TokenId>(
        &self,
        loss: &CudaLoss,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        logits: &mut CudaViewMut<'_, L>,
        inputs: &DeviceInputs<'_, I>,
    ) -> Result<DeviceLossOutput> {
        self.run::<L, L, I>(loss, spec, shape, stream, Io::InPlace(logits), inputs)
    }

    fn run<L: Logit, G: Logit, I: TokenId>(
        &self,
        loss: &CudaLoss,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        mut io: Io<'_, '_, '_, L, G>,
        inputs: &DeviceInputs<'_, I>,
    ) -> Result<DeviceLossOutput> {
        let vg = self.vocab_group;
        let (rows, len) = (shape.rows(), self.slice.len());
        // the whole vocabulary here (a data group alone, or no group): the one-device pass
        let whole = vg.size() == 1 && len == shape.vocab() && !self.split_steps;
        let logits_len = match &io {
            Io::Loss(l) | Io::Grad(l, _) => l.len(),
            Io::InPlace(l) => l.len(),
        };
        check_len("logits", logits_len, rows * len, shape)?;
        if let Io::Grad(_, g) = &io {
            if g.len() != rows * len {
                return Err(Error::GradLength { expected: rows * len, got: g.len() });
            }
        }
        if matches!(io, Io::Grad(..)) {
            // an unsupported pair fails every rank before its first exchange (a rank without
            // samples launches nothing, so the kernels' own check would leave it waiting)
            if whole {
                loss.module.rows_fn(L::DTYPE, G::DTYPE)?;
            } else {
                loss.module.split.grad_fn(L::DTYPE, G::DTYPE)?;
            }
        }
        if shape.batch() == 0 {
            let grad_len = match &io {
                Io::Grad(_, g) => Some(g.len()),
                _ => None,
            };
            return self.no_samples(loss, spec, shape, stream, inputs, logits_len, grad_len);
        }
        let mut st = self.begin(loss, spec, shape, stream, inputs)?;
        if whole {
            // the one-device pass with the data group's denominators, no chunks
            match &mut io {
                Io::Loss(l) => {
                    let (x, _g) = l.device_ptr(stream);
                    st.launch_whole_rows::<L, L>(stream, 0..rows, x, 0)?
                }
                Io::Grad(l, g) => {
                    let (x, _g1) = l.device_ptr(stream);
                    let (gp, _g2) = g.device_ptr_mut(stream);
                    st.launch_whole_rows::<L, G>(stream, 0..rows, x, gp)?
                }
                Io::InPlace(l) => {
                    let (x, _g) = l.device_ptr_mut(stream);
                    st.launch_whole_rows::<L, L>(stream, 0..rows, x, x)?
                }
            }
            return self.end(loss, st, stream);
        }
        let chunk = self.chunk_rows.unwrap_or_else(|| default_device_chunk_rows(shape.vocab(), vg.size(), L::DTYPE));
        let chunk = chunk.clamp(1, rows);
        // one send and one receive buffer for every chunk: the stream orders their reuse
        let mut send = output::<f32>(stream, st.partials_len(chunk))?;
        let mut recv = output::<f32>(stream, if vg.size() > 1 { st.partials_len(chunk) * vg.size() } else { 1 })?;
        for r0 in (0..rows).step_by(chunk) {
            let r = r0..(r0 + chunk).min(rows);
            let (n, span) = (st.partials_len(r.len()), r0 * len..r.end * len);
            match &io {
                Io::Loss(l) | Io::Grad(l, _) => {
                    st.partials(stream, r.clone(), &l.slice(span.clone()), &mut send.slice_mut(..n))?
                }
                Io::InPlace(l) => st.partials(stream, r.clone(), &l.slice(span.clone()), &mut send.slice_mut(..n))?,
            }
            let gathered = if vg.size() > 1 {
                vg.all_gather_f32(stream, &send.slice(..n), &mut recv.slice_mut(..n * vg.size()))?;
                recv.slice(..n * vg.size())
            } else {
                send.slice(..n)
            };
            match &mut io {
                Io::Loss(l) => st.finish_rows(stream, r, &gathered, &l.slice(span))?,
                Io::Grad(l, g) => {
                    st.finish_rows_grad(stream, r, &gathered, &l.slice(span.clone()), &mut g.slice_mut(span))?
                }
                Io::InPlace(l) => st.finish_rows_in_place(stream, r, &gathered, &mut l.slice_mut(span))?,
            }
        }
        self.end(loss, st, stream)
    }

    /// A data-parallel rank without samples ([`Shape::without_samples`]): after the checks its
    /// peers make before their first exchange, it takes part in the data group's two exchanges
    /// with nothing (`B = 0`, `Σ w_b = 0`, then a share of 0 of the loss), so that every rank
    /// gets the loss of the whole batch, the same bits. Its vocabulary group (the same samples:
    /// none) makes no exchange, as on any call (`check_tiling` checks the slices). It reads the
    /// gathered batch sizes on the host (this rank has nothing else to wait for): a data group
    /// with no sample on any rank is [`Error::EmptyDataGroup`] on every rank, a group of one
    /// [`Error::EmptyBatch`]; the peers' weighted-mean `Σ w_b` beyond `f64` is reported by this
    /// rank's `check` and `to_host` as by theirs. No per-sample outputs (see
    /// [`DeviceLossOutput`] for its buffers).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn no_samples<I: TokenId>(
        &self,
        loss: &CudaLoss,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        inputs: &DeviceInputs<'_, I>,
        logits_len: usize,
        grad_len: Option<usize>,
    ) -> Result<DeviceLossOutput> {
        self.check_ranks()?;
        let slice = self.slice;
        if slice.vocab() != shape.vocab() {
            return Err(Error::InvalidVocabSlice { start: slice.start(), len: slice.len(), vocab: shape.vocab() });
        }
        loss.validate_of_rank(spec, shape, logits_len, inputs, grad_len)?;
        // before anything is queued or exchanged (found at the last launch before)
        loss.same_context(stream)?;
        self.check_alone_holds_all()?;
        let dg = self.data_group;
        if dg.size() <= 1 {
            return Err(Error::EmptyBatch);
        }
        let zeros = stream.alloc_zeros::<f64>(2).map_err(drv("allocating device memory"))?;
        let totals = gather_pairs(dg, stream, &zeros.as_view())?;
        let host = stream.clone_dtoh(&totals).map_err(drv("copying to the host"))?;
        stream.synchronize().map_err(drv("waiting for the stream"))?;
        if host.chunks_exact(2).all(|rank| rank[0] == 0.0) {
            return Err(Error::EmptyDataGroup);
        }
        // the peers' weighted-mean sum beyond f64 is their `check`'s error, and so this rank's
        let mut status = crate::cuda::FwlStatus::default();
        let sum = crate::parallel::sum_in_rank_order(&host, 2, 1);
        if spec.reduction == crate::Reduction::WeightedMean && !sum.is_finite() {
            status.flags |= crate::cuda::params::FWL_STATUS_BAD_SAMPLE_WEIGHT;
            status.bad_sample_weight = sum;
        }
        // (the `[B]` and `[B·T]` buffers get one unused element: CUDA allocates no zero bytes)
        let zero = || stream.alloc_zeros::<f64>(1).map_err(drv("allocating device memory"));
        let mut out = DeviceLossOutput {
            loss: zero()?,
            per_sample_loss: zero()?,
            weights: zero()?,
            valid_tokens: stream.alloc_zeros::<u32>(1).map_err(drv("allocating device memory"))?,
            loss_f32: stream.alloc_zeros::<f32>(1).map_err(drv("allocating device memory"))?,
            row_loss: zero()?,
            z_loss: zero()?,
            status: stream.clone_htod(&[status]).map_err(drv("copying to the device"))?,
            shape,
            check_finite: spec.check_finite,
            over_group: false,
        };
        let shares = gather_pairs(dg, stream, &zeros.as_view())?;
        CudaSharded::combine_loss(loss, &mut out, stream, &shares.as_view())?;
        Ok(out)
    }

    /// Checks the groups; the plan of this rank's samples and, on a data group of more than one,
    /// the global denominator.
    pub(super) fn begin<I: TokenId>(
        &self,
        loss: &CudaLoss,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        inputs: &DeviceInputs<'_, I>,
    ) -> Result<CudaSharded> {
        self.check_ranks()?;
        let dg = self.data_group;
        let mut st = CudaSharded::new(loss, spec, shape, self.slice, stream, inputs)?;
        self.check_alone_holds_all()?;
        if dg.size() > 1 {
            let mut mine = output::<f64>(stream, 2)?;
            st.batch_totals(stream, &mut mine.as_view_mut())?;
            let all = gather_pairs(dg, stream, &mine.as_view())?;
            st.set_batch_totals(stream, &all.as_view())?;
        }
        Ok(st)
    }

    /// The finish kernel and, on a data group of more than one, the global loss.
    pub(super) fn end(&self, loss: &CudaLoss, st: CudaSharded, stream: &Arc<CudaStream>) -> Result<DeviceLossOutput> {
        let dg = self.data_group;
        let mut out = st.finish(stream)?;
        if dg.size() > 1 {
            let mut mine = output::<f64>(stream, 2)?;
            CudaSharded::loss_totals(&out, stream, &mut mine.as_view_mut())?;
            let all = gather_pairs(dg, stream, &mine.as_view())?;
            CudaSharded::combine_loss(loss, &mut out, stream, &all.as_view())?;
        }
        Ok(out)
    }
}

/// Every rank's two numbers, in rank order: one all-gather on `group` into a new buffer.
fn gather_pairs(
    group: &dyn DeviceCollective,
    stream: &Arc<CudaStream>,
    mine: &CudaView<'_, f64>,
) -> Result<CudaSlice<f64>> {
    let mut all = output::<f64>(stream, 2 * group.size())?;
    group.all_gather_f64(stream, mine, &mut all.as_view_mut())?;
    Ok(all)
}
