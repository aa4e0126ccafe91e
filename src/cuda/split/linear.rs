//! The fused linear path split over the vocabulary on device buffers: rank `r` holds rows
//! `[v0_r, v0_r + V_r)` of the output weight (and of the bias). Per logits product of the chunk
//! loop ([`CudaLinearLoss`]'s, shared with the one-device call), the slice's statistics of those
//! rows are all-gathered over the vocabulary group and merged in rank order, and the gradient
//! of the slice is written where the one-device call's rows kernel writes it; the products
//! `d h = G_r·W_r`, `d W_r += G_rᵀ·h`, `d b_r += Σ G_r` follow as there.

use super::DeviceSharded;
use crate::cuda::linear::{
    check_buffers, scaled_for, CudaLinearLoss, Cut, DeviceGrad, DeviceLinearGrads, DeviceLinearInputs,
    DeviceLinearOutput,
};
use crate::cuda::{drv, output, DeviceInputs};
use crate::dtype::{DType, Logit, TokenId};
use crate::error::{Error, Result};
use crate::linear::{Chunking, LinearShape};
use crate::spec::LossSpec;
use cudarc::driver::CudaStream;
use std::ops::Range;
use std::sync::Arc;

impl DeviceSharded<'_> {
    /// The fused linear loss ([`CudaLinearLoss::loss_and_grad`]) with this rank's rows of the
    /// output weight, queued on `stream` with the exchanges through the groups' collectives.
    ///
    /// `shape` has the whole vocabulary; `inputs` holds the hidden states of this rank's samples
    /// (the same on every rank of the vocabulary group) and `W`'s rows (and the bias's entries)
    /// of this rank's slice, `slice.len() x H`. `d W` and `d bias` are those of this rank's rows;
    /// **`d hidden` is this rank's part** `G_r·W_r`, to be summed over the vocabulary group (an
    /// all-reduce, as the backward of a vocabulary-parallel output layer does anyway). Every
    /// rank gets the loss of the whole batch.
    ///
    /// The chunks depend only on `V`, the group's size, the rows, the dtype and `chunking` (not
    /// on [`with_chunk_rows`](Self::with_chunk_rows), which is the logits path's), so they are
    /// the same on every rank of the group as long as `chunking` is; the budget is counted for
    /// `⌈V / P⌉` logits per row, so a rank with a wider slice uses more. One exchange of `4 · W`
    /// bytes per row ([`CudaSharded::words_per_row`](super::CudaSharded::words_per_row)) per
    /// logits product: `C` rows at a time for f32 inputs, `⌈C / 4⌉` for 16-bit ones. The slices
    /// of a group of more than one are not checked to tile the vocabulary (a host read: see
    /// [`check_tiling`](Self::check_tiling)); a group of one must hold the whole vocabulary.
    ///
    /// `fused`'s cuBLAS handle is held for the whole call, exchanges included: ranks that share
    /// a CUDA context (threads of one process on one GPU) need a [`CudaLinearLoss`] each, or
    /// one waits for the handle while the others wait for it in the exchange.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use fused_weighted_loss::cuda::cudarc::driver::CudaContext;
    /// use fused_weighted_loss::cuda::linear::{CudaLinearLoss, DeviceGrad, DeviceLinearGrads, DeviceLinearInputs};
    /// use fused_weighted_loss::cuda::split::{DeviceSharded, DeviceSolo};
    /// use fused_weighted_loss::cuda::DeviceInputs;
    /// use fused_weighted_loss::parallel::VocabSlice;
    /// use fused_weighted_loss::{bf16, Chunking, LinearShape, LossSpec};
    ///
    /// let ctx = CudaContext::new(0)?;
    /// let stream = ctx.default_stream();
    /// let shape = LinearShape::new(8, 1024, 4096, 128_256)?;
    /// // rank 0 of 1 here; with NCCL, cuda::nccl::NcclGroup (feature `nccl`) and that rank's slice
    /// let slice = VocabSlice::even(0, 1, shape.vocab())?;
    /// let hidden = stream.alloc_zeros::<bf16>(shape.hidden_len())?;
    /// let weight = stream.alloc_zeros::<bf16>(slice.len() * shape.hidden())?; // this rank's rows
    /// let ids = stream.alloc_zeros::<i64>(shape.rows())?;
    /// let mut d_hidden = stream.alloc_zeros::<f32>(shape.hidden_len())?; // this rank's part
    /// let (h, w, i) = (hidden.as_view(), weight.as_view(), ids.as_view());
    /// let mut dh = d_hidden.as_view_mut();
    /// let out = DeviceSharded::vocab_parallel(slice, &DeviceSolo).linear_loss_and_grad(
    ///     &CudaLinearLoss::new(&ctx)?, &LossSpec::default(), shape, &stream,
    ///     &DeviceLinearInputs::new(&h, &w), &DeviceInputs::new(&i),
    ///     DeviceLinearGrads::new().hidden(DeviceGrad::IntoF32(&mut dh)), Chunking::Auto)?;
    /// println!("loss {}", out.loss.to_host(&stream)?.loss);
    /// # Ok(()) }
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn linear_loss_and_grad<L: Logit, I: TokenId>(
        &self,
        fused: &CudaLinearLoss,
        spec: &LossSpec,
        shape: LinearShape,
        stream: &Arc<CudaStream>,
        inputs: &DeviceLinearInputs<'_, L>,
        tokens: &DeviceInputs<'_, I>,
        mut grads: DeviceLinearGrads<'_, '_, L>,
        chunking: Chunking,
    ) -> Result<DeviceLinearOutput> {
        let (slice, vg) = (self.slice, self.vocab_group);
        if slice.vocab() != shape.vocab() {
            return Err(Error::InvalidVocabSlice { start: slice.start(), len: slice.len(), vocab: shape.vocab() });
        }
        let local = shape.with_vocab(slice.len())?;
        check_buffers(local, inputs, &grads)?;
        // the same cut on every rank: from the shared V / ranks, H and rows only
        let cut = Cut::new::<L>(chunking, shape.vocab().div_ceil(vg.size().max(1)), shape.rows())?;
        let loss = fused.kernels();
        if shape.batch() == 0 {
            // a rank without samples: no rows, and nothing to add to d W and d b
            let out = self.no_samples(loss, spec, shape.tokens(), stream, tokens, 0, None)?;
            if !grads.accumulate {
                for g in [&mut grads.weight, &mut grads.bias] {
                    match g {
                        DeviceGrad::Skip => Ok(()),
                        DeviceGrad::Into(g) => stream.memset_zeros(&mut **g),
                        DeviceGrad::IntoF32(g) => stream.memset_zeros(&mut **g),
                    }
                    .map_err(drv("zeroing a gradient"))?;
                }
            }
            return Ok(DeviceLinearOutput {
                loss: out,
                chunk_rows: 0,
                logits_rows: 0,
                chunks: 0,
                scratch_bytes: 0,
                tile_cols: 0,
            });
        }
        // float16 gradient rows scaled by a power of two, their products by its inverse (each
        // rank its own: its products add nothing of another's before they are unscaled)
        let (spec, unscale) = scaled_for::<L, I>(spec, shape.tokens(), tokens);
        let mut st = self.begin(loss, &spec, shape.tokens(), stream, tokens)?;
        let ranks = vg.size();
        let most = st.partials_len(cut.cl);
        let mut send = output::<f32>(stream, most.max(1))?;
        let mut recv = output::<f32>(stream, if ranks > 1 { most * ranks } else { 1 })?;
        let exchange_bytes = 4 * (send.len() + recv.len());
        let mut rows_step = |rows: Range<usize>, z: u64, g: u64| -> Result<()> {
            let n = st.partials_len(rows.len());
            st.launch_stats::<f32>(stream, rows.clone(), z, &mut send.slice_mut(..n))?;
            let gathered = if ranks > 1 {
                vg.all_gather_f32(stream, &send.slice(..n), &mut recv.slice_mut(..n * ranks))?;
                recv.slice(..n * ranks)
            } else {
                send.slice(..n)
            };
            match L::DTYPE {
                DType::F32 => st.launch_grad::<f32, f32>(stream, rows, &gathered, z, g),
                DType::F16 => st.launch_grad::<f32, half::f16>(stream, rows, &gathered, z, g),
                DType::BF16 => st.launch_grad::<f32, half::bf16>(stream, rows, &gathered, z, g),
            }
        };
        let swept = fused.sweep(local, stream, inputs, &mut grads, cut, unscale, &mut rows_step)?;
        let out = self.end(loss, st, stream)?;
        Ok(DeviceLinearOutput {
            loss: out,
            chunk_rows: cut.c,
            logits_rows: cut.cl,
            chunks: swept.chunks,
            scratch_bytes: swept.scratch_bytes + exchange_bytes,
            tile_cols: 0,
        })
    }
}
