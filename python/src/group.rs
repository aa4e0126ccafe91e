//! A vocabulary or data group of `torch.distributed` as the crate's `parallel::Collective`: the
//! all-gather is a Python callable (`fused_weighted_loss/_dist.py`), called with this rank's
//! numbers (a list of floats) and returning every rank's, concatenated in rank order. The crate's
//! one call (`parallel::Sharded`, the fused linear split) runs with the GIL released and takes
//! it back for each exchange.

use fused_weighted_loss::parallel::{Collective, VocabSlice};
use fused_weighted_loss::{Error, Result};
use pyo3::prelude::*;

/// One rank's place in a group: `(rank, size, all-gather callable)`; no callable for a group of
/// one.
#[derive(FromPyObject, Debug)]
pub(crate) struct PyGroup(usize, usize, Option<Py<PyAny>>);

impl PyGroup {
    /// Every rank's `send`, concatenated in rank order, as the callable returns them.
    fn gather(&self, send: Vec<f64>, expected: usize) -> Result<Vec<f64>> {
        let got = match &self.2 {
            None => send,
            Some(f) => Python::attach(|py| f.call1(py, (send,))?.extract::<Vec<f64>>(py))
                .map_err(|e| Error::Collective(format!("torch.distributed all-gather: {e}")))?,
        };
        if got.len() != expected {
            return Err(Error::ExchangeLength { what: "all-gather result", expected, got: got.len() });
        }
        Ok(got)
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
}
