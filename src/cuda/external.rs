//! Device memory and streams owned by another library (PyTorch, CuPy, JAX, ...): the kernels run
//! on the owner's device pointers and stream, in the device's primary context, with no copy and
//! no host synchronisation.
//!
//! The CUDA runtime, and every framework built on it, works in each device's *primary* context;
//! [`ExternalDevice::primary`] retains that same context (no second context is created), so a
//! device pointer or a stream handle taken from the framework is valid here as it is. The whole
//! unsafe boundary is three constructors: [`ExternalDevice::primary`] (a context without
//! cudarc's cross-stream event tracking), [`ExternalDevice::borrow_stream`] (a stream handle) and
//! [`Borrowed::new`] (a device pointer and a length); everything downstream is the safe
//! [`CudaLoss`] API.
//!
//! ```no_run
//! # fn main() -> Result<(), fused_weighted_loss::Error> {
//! use fused_weighted_loss::cuda::external::{Borrowed, ExternalDevice};
//! use fused_weighted_loss::cuda::DeviceInputs;
//! use fused_weighted_loss::{LossSpec, Shape};
//!
//! // what a framework hands over: addresses of its tensors and its current stream
//! let (logits_ptr, ids_ptr, grad_ptr, stream_handle): (u64, u64, u64, usize) = (0, 0, 0, 0);
//! let shape = Shape::new(8, 128, 50_000)?;
//!
//! // SAFETY (of this example): buffers made through the device's context are used on the one
//! // stream of the call that made them; the handle and the pointers come from the framework, on
//! // device 0, each buffer holding the elements named, alive until the queued work is done.
//! let dev = unsafe { ExternalDevice::primary(0)? };
//! let stream = unsafe { dev.borrow_stream(stream_handle) };
//! let logits = unsafe { Borrowed::<f32>::new(&stream, logits_ptr, shape.logits_len()) };
//! let ids = unsafe { Borrowed::<i64>::new(&stream, ids_ptr, shape.rows()) };
//! let mut grad = unsafe { Borrowed::<f32>::new(&stream, grad_ptr, shape.logits_len()) };
//!
//! let ids = ids.view();
//! let out = dev.loss().loss_and_grad(
//!     &LossSpec::default(), shape, &stream, &logits.view(), &DeviceInputs::new(&ids), &mut grad.view_mut(),
//! )?;
//! // queued on the framework's stream; `out.loss_f32` is on the device
//! # drop(out); Ok(()) }
//! ```

use super::{drv, status, CudaLoss};
use crate::error::{Error, Result};
use crate::Backend;
use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr};
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

/// A device's primary context with the kernels loaded, for work on memory and streams that
/// another library owns. One per device and process; cheap to share.
#[derive(Debug)]
pub struct ExternalDevice {
    loss: CudaLoss,
}

impl ExternalDevice {
    /// The primary context of device `ordinal` (the one the CUDA runtime and PyTorch use), with
    /// the kernels loaded, created on first use and kept for the life of the process.
    ///
    /// Its buffers carry no cudarc events: each call's work is ordered on the one stream it is
    /// given, which is how frameworks order theirs. [`Error::BackendUnavailable`] without a
    /// driver or without that device.
    ///
    /// # Safety
    /// The context's cudarc event tracking is off, for every user of it: a buffer allocated
    /// through it (by this crate's calls, or by any code that reaches the context through
    /// [`loss`](Self::loss)`().context()`, e.g. `stream.alloc_zeros` on one of its streams) must
    /// be used, and dropped, on one stream, or its uses on several streams ordered by the caller
    /// (with tracking, cudarc would order them with events; without, a buffer dropped on one
    /// stream while another still reads it is a use after free). This crate's calls keep to that.
    pub unsafe fn primary(ordinal: usize) -> Result<Arc<ExternalDevice>> {
        static DEVICES: Mutex<Vec<(usize, Arc<ExternalDevice>)>> = Mutex::new(Vec::new());
        let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, d)) = devices.iter().find(|(o, _)| *o == ordinal) {
            return Ok(d.clone());
        }
        status().map_err(|reason| Error::BackendUnavailable { backend: Backend::Cuda, reason })?;
        let count = CudaContext::device_count().map_err(drv("counting devices"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::BackendUnavailable {
                backend: Backend::Cuda,
                reason: format!("no CUDA device {ordinal} (the driver reports {count})"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("retaining the primary context"))?;
        // SAFETY: the buffers this crate makes through the context (the kernels' scratch and
        // results) are used on the stream of the call that made them and freed in that stream's
        // order, so they need no cross-stream event tracking; any other user of the context
        // keeps to the same, as the caller of this function promises.
        unsafe { ctx.disable_event_tracking() };
        let dev = Arc::new(ExternalDevice { loss: CudaLoss::new(&ctx)? });
        devices.push((ordinal, dev.clone()));
        Ok(dev)
    }

    /// The kernels on this device.
    pub fn loss(&self) -> &CudaLoss {
        &self.loss
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.loss.context().ordinal()
    }

    /// Wraps a stream that another library owns (for PyTorch, `torch.cuda.current_stream().cuda_stream`;
    /// 0 is the legacy default stream). Dropping the wrapper does not destroy the stream.
    ///
    /// # Safety
    /// `handle` must be a live `CUstream` (`cudaStream_t`) of this device's primary context, or 0,
    /// and stay alive while the returned stream, or anything allocated on it, is in use.
    pub unsafe fn borrow_stream(&self, handle: usize) -> Arc<CudaStream> {
        // SAFETY: as the caller promises.
        unsafe { self.loss.context().wrap_borrowed_stream(handle as CUstream) }
    }
}

/// Device memory that another library owns, seen as a cudarc slice that is never freed here.
/// [`view`](Self::view) and [`view_mut`](Self::view_mut) hand it to the [`CudaLoss`] API.
#[derive(Debug)]
pub struct Borrowed<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
}

impl<T: DeviceRepr> Borrowed<T> {
    /// Borrows `len` elements of `T` at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` must address at least `len` elements of `T` in memory of `stream`'s device (the
    /// primary context), suitably aligned for `T`, and stay allocated until the work queued on
    /// `stream` that uses it has run (stream order covers this when the owner frees in the order
    /// of that stream, as PyTorch's caching allocator does). Memory written through
    /// [`view_mut`](Self::view_mut) must not be read or written by other work running
    /// concurrently with it.
    pub unsafe fn new(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Borrowed<T> {
        // SAFETY: as the caller promises; the slice is never dropped as a `CudaSlice` (see Drop),
        // so the memory is never freed through cudarc.
        Borrowed { slice: ManuallyDrop::new(unsafe { stream.upgrade_device_ptr(ptr, len) }) }
    }
}

impl<T> Borrowed<T> {
    /// The memory, for reading.
    pub fn view(&self) -> CudaView<'_, T> {
        self.slice.as_view()
    }
    /// The memory, for writing.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice.as_view_mut()
    }
    /// Elements borrowed.
    pub fn len(&self) -> usize {
        self.slice.len()
    }
    /// Whether no element is borrowed.
    pub fn is_empty(&self) -> bool {
        self.slice.is_empty()
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: `slice` is taken once, here, and not used again. `leak` releases the slice's
        // handle on the stream without freeing the memory, which stays its owner's.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        let _ = slice.leak();
    }
}
