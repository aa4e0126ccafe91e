//! The exchange the split's one calls run between their steps: an all-gather on device buffers
//! in rank order ([`DeviceCollective`]; NCCL's in `cuda::nccl`, feature `nccl`), and the group of
//! one ([`DeviceSolo`]).

use crate::cuda::drv;
use crate::error::{Error, Result};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DeviceRepr};
use std::sync::Arc;

/// An all-gather between the ranks of a group on device buffers, queued on a stream (NCCL's
/// `ncclAllGather`, or a framework's). Every rank calls the same methods in the same order with
/// buffers of the same length `n`; `recv[r * n..(r + 1) * n]` gets rank `r`'s `send`.
pub trait DeviceCollective {
    /// This rank's index in the group, `0..size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// All-gathers `f32`s in rank order, queued on `stream`.
    fn all_gather_f32(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()>;
    /// All-gathers `f64`s in rank order, queued on `stream`.
    fn all_gather_f64(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, f64>,
        recv: &mut CudaViewMut<'_, f64>,
    ) -> Result<()>;
}

/// The group of one rank on a device: every all-gather is a device-to-device copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceSolo;

impl DeviceSolo {
    fn copy<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, T>,
        recv: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        if recv.len() != send.len() {
            return Err(Error::ExchangeLength {
                what: "all-gather receive buffer",
                expected: send.len(),
                got: recv.len(),
            });
        }
        stream.memcpy_dtod(send, recv).map_err(drv("copying on the device"))
    }
}

impl DeviceCollective for DeviceSolo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather_f32(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        Self::copy(stream, send, recv)
    }
    fn all_gather_f64(
        &self,
        stream: &Arc<CudaStream>,
        send: &CudaView<'_, f64>,
        recv: &mut CudaViewMut<'_, f64>,
    ) -> Result<()> {
        Self::copy(stream, send, recv)
    }
}
