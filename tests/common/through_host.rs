//! A device collective for ranks as threads of one test process on one GPU (tests only).

use crate::shards::ThreadGroup;
use fused_weighted_loss::cuda::cudarc::driver::{CudaStream, CudaView, CudaViewMut, DeviceRepr};
use fused_weighted_loss::cuda::split::DeviceCollective;
use fused_weighted_loss::parallel::Collective;
use fused_weighted_loss::{Error, Result};
use std::sync::Arc;

/// A group of threads on one GPU: each all-gather waits for the stream, goes through the
/// host's in-memory exchange of [`ThreadGroup`] and comes back to the device (tests only: it
/// synchronises, which the crate's own paths never do).
pub struct ThroughHost<'a>(pub &'a ThreadGroup);

impl ThroughHost<'_> {
    fn gather<T: DeviceRepr + Copy + Default>(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, T>,
        recv: &mut CudaViewMut<'_, T>,
        host: impl Fn(&ThreadGroup, &[T], &mut [T]) -> Result<()>,
    ) -> Result<()> {
        let dev = |e: fused_weighted_loss::cuda::cudarc::driver::DriverError| Error::Collective(e.to_string());
        let mine = stream.clone_dtoh(send).map_err(dev)?;
        stream.synchronize().map_err(dev)?;
        let mut all = vec![T::default(); recv.len()];
        host(self.0, &mine, &mut all)?;
        stream.memcpy_htod(&all, recv).map_err(dev)?;
        stream.synchronize().map_err(dev)
    }
}

impl DeviceCollective for ThroughHost<'_> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn all_gather_f32(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.gather(stream, send, recv, |g, s, r| g.all_gather_f32(s, r))
    }
    fn all_gather_f64(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, f64>,
        recv: &mut CudaViewMut<'_, f64>,
    ) -> Result<()> {
        self.gather(stream, send, recv, |g, s, r| g.all_gather_f64(s, r))
    }
}
