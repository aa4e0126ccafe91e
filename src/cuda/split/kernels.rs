//! The split's kernels: their parameter blocks, the table of functions loaded with the module,
//! and the launch shapes the steps ([`CudaSharded`](super::CudaSharded)) queue them with.

use crate::cuda::module::ROW_PAIRS;
use crate::cuda::params::{FwlSplitBatchParams, FwlSplitGradParams, FwlSplitStatsParams};
use crate::cuda::{drv, CudaLoss, THREADS};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

// SAFETY: bindgen's #[repr(C)] copies of kernels/split_params.h, plain data (device addresses
// and numbers) that the kernels take by value.
unsafe impl DeviceRepr for FwlSplitStatsParams {}
unsafe impl DeviceRepr for FwlSplitGradParams {}
unsafe impl DeviceRepr for FwlSplitBatchParams {}

/// The split's kernels, loaded with the module.
pub(in crate::cuda) struct SplitFns {
    pub(super) stats: [(DType, CudaFunction); 3],
    grad: Vec<(DType, DType, CudaFunction)>,
    batch: CudaFunction,
}

impl SplitFns {
    /// The gradient kernel of `l` logits into a `g` gradient, or [`Error::Unsupported`].
    pub(in crate::cuda) fn grad_fn(&self, l: DType, g: DType) -> Result<&CudaFunction> {
        let found = self.grad.iter().find(|(a, b, _)| *a == l && *b == g).map(|(_, _, f)| f);
        found.ok_or_else(|| Error::Unsupported(format!("no split kernel for {l} logits with a {g} gradient")))
    }

    /// Finds the split's kernels with `f` (the module's function lookup).
    pub(in crate::cuda) fn load(f: impl Fn(&str) -> Result<CudaFunction>) -> Result<SplitFns> {
        let grad =
            |l: DType, g: DType| f(&format!("fwl_split_grad_{}_{}", l.name(), g.name())).map(|func| (l, g, func));
        Ok(SplitFns {
            stats: [
                (DType::F32, f("fwl_split_stats_f32")?),
                (DType::F16, f("fwl_split_stats_f16")?),
                (DType::BF16, f("fwl_split_stats_bf16")?),
            ],
            // the rows kernel's pairs: the split's gradient kernel has each of them
            grad: ROW_PAIRS.iter().map(|&(l, g)| grad(l, g)).collect::<Result<_>>()?,
            batch: f("fwl_split_batch")?,
        })
    }
}

/// A grid-stride launch over `rows` rows of blocks of `threads` threads (a multiple of 32, at
/// most `THREADS`), as many resident blocks as fit.
pub(super) fn rows_config(loss: &CudaLoss, func: &CudaFunction, rows: usize, threads: u32) -> Result<LaunchConfig> {
    let per_sm = loss.module.blocks_per_sm(func, threads, 0)?;
    let grid = (loss.module.num_sms as usize * per_sm).min(rows).max(1) as u32;
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// Threads per block of the statistics and gradient kernels for rows of `len` logits under the
/// tiled fused linear path (`CudaSharded::fit_blocks`; the vocabulary split always uses
/// `THREADS`): one per 16-byte vector of f32, rounded up to a warp, from 128 to `THREADS`, so
/// that blocks of 512 to 4096 columns leave at most a warp's worth of threads idle.
pub(in crate::cuda) fn block_threads(len: usize) -> u32 {
    (len.div_ceil(4).div_ceil(32) * 32).clamp(128, THREADS as usize) as u32
}

/// One block of the batch kernel.
const ONE_BLOCK: LaunchConfig = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };

/// Queues the batch kernel with `p` (its mode and buffers).
pub(super) fn batch(loss: &CudaLoss, stream: &Arc<CudaStream>, p: FwlSplitBatchParams) -> Result<()> {
    loss.same_context(stream)?;
    // SAFETY: the parameters match fwl_split_batch's; every pointer the mode reads or writes is
    // a live device buffer of the length it indexes (B per-sample arrays, `ranks` pairs, one loss
    // each), as each caller sets them.
    unsafe { stream.launch_builder(&loss.module.split.batch).arg(&p).launch(ONE_BLOCK) }
        .map(drop)
        .map_err(drv("launching the split's batch kernel"))
}

#[cfg(test)]
mod tests {
    use super::block_threads;
    use crate::cuda::module::fatbin_has_kernel as contains;

    #[test]
    fn every_split_kernel_is_in_the_fatbin() {
        let mut names = vec!["fwl_split_batch".to_string()];
        names.extend(["f32", "f16", "bf16"].map(|l| format!("fwl_split_stats_{l}")));
        names.extend(
            ["f32_f32", "f16_f16", "f16_f32", "bf16_bf16", "bf16_f32", "f32_f16", "f32_bf16"]
                .map(|p| format!("fwl_split_grad_{p}")),
        );
        for n in &names {
            assert!(contains(n), "{n} is missing from the embedded kernels");
        }
        assert!(!contains("fwl_split_grad_f16_bf16"), "the search must be able to fail");
    }

    #[test]
    fn fitted_blocks_hold_a_row_of_f32_vectors() {
        for (len, threads) in
            [(1, 128), (512, 128), (1024, 256), (2048, 512), (2050, 544), (4096, 1024), (128_256, 1024)]
        {
            assert_eq!(block_threads(len), threads, "{len} logits per row");
        }
    }
}
