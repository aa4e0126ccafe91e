//! A vocabulary or data group of `torch.distributed` as the crate's `parallel::Collective` (host
//! buffers) or, with the `cuda` feature, `cuda::split::DeviceCollective` (device buffers). The
//! all-gather is a Python callable (`fused_weighted_loss/_dist.py`):
//!
//! - host: called with this rank's numbers (a list of floats), returning every rank's,
//!   concatenated in rank order. The crate's one call (`parallel::Sharded`, the fused linear
//!   split) runs with the GIL released and takes it back for each exchange;
//! - device: an object (`_dist._DeviceExchange`) whose `buffers(n, float64?)` returns the
//!   addresses of two torch tensors (this rank's `n` numbers, every rank's `n × size`); the
//!   crate copies its numbers into the first on torch's current stream (the one it queues all
//!   its work on), `run()` all-gathers there, and the crate copies the result out. No host
//!   synchronisation; torch's collective only ever sees torch's own memory.

use fused_weighted_loss::parallel::{Collective, Sharded, VocabSlice};
use fused_weighted_loss::{Error, Result};
use pyo3::prelude::*;

thread_local! {
    /// The Python exception an exchange of this thread's current call raised, kept so that the
    /// call raises it (its type and traceback) rather than the crate's `Error::Collective`. The
    /// exchanges run on the thread that made the call (the one-call APIs exchange on the
    /// calling thread).
    static RAISED: std::cell::RefCell<Option<PyErr>> = const { std::cell::RefCell::new(None) };
}

/// The crate's error of a call whose exchanges went through [`PyGroup`]s as a Python exception:
/// the exception an exchange raised, if one did, else as `crate::to_py`.
pub(crate) fn to_py_kept(e: Error) -> PyErr {
    match (RAISED.with(|r| r.borrow_mut().take()), &e) {
        (Some(raised), Error::Collective(_)) => raised,
        _ => crate::to_py(e),
    }
}

/// Keeps `e` for [`to_py_kept`] and turns it into the crate's error.
fn kept(e: PyErr) -> Error {
    let msg = format!("torch.distributed all-gather: {e}");
    RAISED.with(|r| *r.borrow_mut() = Some(e));
    Error::Collective(msg)
}

/// One rank's place in a group: `(rank, size, all-gather callable)`; no callable for a group of
/// one.
#[derive(FromPyObject, Debug)]
pub(crate) struct PyGroup(usize, usize, Option<Py<PyAny>>);

impl PyGroup {
    /// Every rank's `send`, concatenated in rank order, as the callable returns them.
    fn gather(&self, send: Vec<f64>, expected: usize) -> Result<Vec<f64>> {
        let got = match &self.2 {
            None => send,
            Some(f) => Python::attach(|py| f.call1(py, (send,))?.extract::<Vec<f64>>(py)).map_err(kept)?,
        };
        if got.len() != expected {
            return Err(Error::ExchangeLength { what: "all-gather result", expected, got: got.len() });
        }
        Ok(got)
    }
}

#[cfg(feature = "cuda")]
mod device {
    use super::PyGroup;
    use fused_weighted_loss::cuda::cudarc::driver::{
        result, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    };
    use fused_weighted_loss::cuda::split::{DeviceCollective, DeviceSolo};
    use fused_weighted_loss::{Error, Result};
    use pyo3::prelude::*;
    use std::sync::Arc;

    impl PyGroup {
        /// A group of one rank without a device callable: its all-gathers are copies.
        fn solo(&self) -> bool {
            self.1 == 1 && self.2.is_none()
        }

        /// `send` of every rank into `recv` through the device callable (the trait's methods hand a
        /// group of one without one to [`DeviceSolo`]).
        fn gather_device<T>(
            &self,
            stream: &Arc<CudaStream>,
            send: &CudaView<'_, T>,
            recv: &mut CudaViewMut<'_, T>,
            wide: bool,
        ) -> Result<()> {
            let expected = send.len() * self.1;
            if recv.len() != expected {
                return Err(Error::ExchangeLength { what: "all-gather receive buffer", expected, got: recv.len() });
            }
            let Some(f) = &self.2 else {
                return Err(Error::Collective(format!("no all-gather for a group of {}", self.1)));
            };
            if std::mem::size_of::<T>() != if wide { 8 } else { 4 } {
                return Err(Error::Collective("an all-gather of an element type other than f32 / f64".into()));
            }
            if send.is_empty() {
                return Ok(()); // every rank of the group sends the same length
            }
            let bytes = send.len() * std::mem::size_of::<T>();
            let copy_err = |e: fused_weighted_loss::cuda::cudarc::driver::DriverError| Error::Cuda {
                context: "copying to or from torch's exchange buffers",
                message: e.to_string(),
            };
            let (s, _gs) = send.device_ptr(stream);
            let (r, _gr) = recv.device_ptr_mut(stream);
            Python::attach(|py| -> Result<()> {
                let (ts, tr): (u64, u64) = f
                    .call_method1(py, "buffers", (send.len(), wide))
                    .and_then(|a| a.extract(py))
                    .map_err(super::kept)?;
                // SAFETY: `ts` and `tr` are the addresses of torch's own tensors on this device of at
                // least `send.len()` and `send.len() * size` elements of T (`buffers`' contract),
                // which the exchange object keeps alive; `s` and `r` are this call's buffers of those
                // lengths (checked above); all on `stream`, in its order.
                unsafe { result::memcpy_dtod_async(ts, s, bytes, stream.cu_stream()) }.map_err(copy_err)?;
                f.call_method0(py, "run").map_err(super::kept)?;
                // SAFETY: as above; the all-gather into `tr` is ordered before this copy on `stream`.
                unsafe { result::memcpy_dtod_async(r, tr, bytes * self.1, stream.cu_stream()) }.map_err(copy_err)
            })
        }
    }

    impl DeviceCollective for PyGroup {
        fn rank(&self) -> usize {
            self.0
        }
        fn size(&self) -> usize {
            self.1
        }
        fn all_gather_f32(
            &self,
            stream: &Arc<CudaStream>,
            send: &CudaView<'_, f32>,
            recv: &mut CudaViewMut<'_, f32>,
        ) -> Result<()> {
            if self.solo() {
                return DeviceSolo.all_gather_f32(stream, send, recv);
            }
            self.gather_device(stream, send, recv, false)
        }
        fn all_gather_f64(
            &self,
            stream: &Arc<CudaStream>,
            send: &CudaView<'_, f64>,
            recv: &mut CudaViewMut<'_, f64>,
        ) -> Result<()> {
            if self.solo() {
                return DeviceSolo.all_gather_f64(stream, send, recv);
            }
            self.gather_device(stream, send, recv, true)
        }
    }
}

impl Collective for PyGroup {
    fn rank(&self) -> usize {
        self.0
    }
    fn size(&self) -> usize {
        self.1
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        recv.copy_from_slice(&self.gather(send.to_vec(), recv.len())?);
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let got = self.gather(send.iter().map(|&x| x as f64).collect(), recv.len())?;
        recv.iter_mut().zip(got).for_each(|(r, g)| *r = g as f32);
        Ok(())
    }
}

/// The split of one call: this rank's slice `(start, len, vocab)`, its vocabulary group and its
/// data group.
#[derive(FromPyObject, Debug)]
pub(crate) struct PySplit(pub (usize, usize, usize), pub PyGroup, pub PyGroup);

impl PySplit {
    /// The validated slice.
    pub(crate) fn slice(&self) -> Result<VocabSlice> {
        let (start, len, vocab) = self.0;
        VocabSlice::new(start, len, vocab)
    }

    /// The host call (`parallel::Sharded`) of this split on this rank's slice, and `with_vocab`
    /// of the whole vocabulary (the call's shape: the tensors hold this rank's slice). A slice
    /// or shape that is not one is this rank's error before its call: its groups are failed
    /// first (see [`fail_with`](Self::fail_with)).
    pub(crate) fn host_call<S>(&self, with_vocab: impl FnOnce(usize) -> Result<S>) -> Result<(Sharded<'_>, S)> {
        match self.slice().and_then(|slice| Ok((slice, with_vocab(slice.vocab())?))) {
            Ok((slice, whole)) => Ok((self.call_on(slice), whole)),
            Err(e) => Err(self.fail_with(e)),
        }
    }

    fn call_on(&self, slice: VocabSlice) -> Sharded<'_> {
        Sharded::vocab_parallel(slice, &self.1).with_data_group(&self.2)
    }

    /// `error`, found by this rank before its host call: first takes part in the call's first
    /// exchanges as a rank that failed (`Sharded::fail_with`), so that its peers' calls raise
    /// the crate's `PeerFailed` instead of waiting for this rank (an exchange that itself fails
    /// is returned instead). The slice need not be valid: a failed rank's words do not carry it.
    pub(crate) fn fail_with(&self, error: Error) -> Error {
        match self.slice().or_else(|_| VocabSlice::full(1)) {
            Ok(slice) => self.call_on(slice).fail_with(error),
            Err(_) => error,
        }
    }
}

/// `e`, an error this rank found before its call could start (in its inputs, or in the Python
/// layer's own checks): with a split of host tensors (`host`), its groups are failed first
/// ([`PySplit::fail_with`]; what the exchange raised, if it failed, with `e` as its cause).
pub(crate) fn failed_before(py: Python<'_>, split: Option<&PySplit>, host: bool, e: PyErr) -> PyErr {
    match split {
        Some(split) if host => match join_failed(py, split) {
            Ok(()) => e,
            Err(raised) => {
                raised.set_cause(py, Some(e));
                raised
            }
        },
        _ => e,
    }
}

/// See [`fail_split`].
fn join_failed(py: Python<'_>, split: &PySplit) -> PyResult<()> {
    // (this rank's own error is the caller's: a marker that the exchanges went through)
    const MINE: Error = Error::StepOrder("this rank failed before its call");
    match py.detach(|| split.fail_with(MINE)) {
        e if e == MINE => Ok(()),
        e => Err(to_py_kept(e)),
    }
}

/// Takes part in the first exchanges of a split's host call (`split`: this rank's slice, which
/// may be any, and its vocabulary and data groups) as a rank that failed before it could make
/// its call (an exception of the Python layer's own checks), so that its peers' calls raise the
/// crate's `PeerFailed` instead of waiting for it. Raises what the exchange raised, if it
/// failed; else returns, and the caller raises its own exception.
#[pyfunction]
pub(crate) fn fail_split(py: Python<'_>, split: PySplit) -> PyResult<()> {
    join_failed(py, &split)
}
