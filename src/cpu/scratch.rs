//! The buffers the passes work in: a row's kept exponentials ([`RowExps`]) and a task's chunk
//! buffers ([`Scratch`]), both drawn from a per-thread store of buffers kept between calls.

use super::row::RowMath;
use super::{CHUNK, SCRATCH_MAX};

/// The exponentials of one row, kept between its two passes.
pub(super) struct RowExps {
    /// `exp(z - shift_c)`, times the chain factor with soft-capping (empty when rows are too
    /// long to keep).
    pub(super) exps: Vec<f32>,
    /// The chain factors, when soft-capping and smoothing are both on (else empty).
    pub(super) chain: Vec<f32>,
    /// The running reference (within `MARGIN` of the maximum so far) each chunk's exponentials are taken against.
    pub(super) shifts: Vec<f32>,
}

impl RowExps {
    /// A scratch row for rows of `vocab` logits (its contents are whatever the thread's last
    /// call left: every pass writes a row's exponentials before it reads them).
    pub(super) fn new(vocab: usize, m: &RowMath) -> RowExps {
        let keep = vocab <= SCRATCH_MAX;
        RowExps {
            exps: reuse::take(if keep { vocab } else { 0 }),
            chain: reuse::take(if keep && m.keeps_chain() { vocab } else { 0 }),
            shifts: vec![0.0; if keep { vocab.div_ceil(CHUNK) } else { 0 }],
        }
    }

    pub(super) fn kept(&self) -> bool {
        !self.exps.is_empty()
    }
}

impl Drop for RowExps {
    fn drop(&mut self) {
        reuse::give(std::mem::take(&mut self.exps));
        reuse::give(std::mem::take(&mut self.chain));
    }
}

/// The scratch buffers a thread keeps between calls. A call's tasks each take one or two rows of
/// `V` floats and a few chunk buffers; fresh ones cost the allocator's zeroing or, for large
/// rows, a page fault per 4 KiB on their first write and an unmapping after: a few percent of a
/// pass over a batch that takes milliseconds, 13–18% of one that fits in cache.
mod reuse {
    use std::cell::RefCell;

    /// At most this many bytes kept per thread (a task's pair of rows of a vocabulary of up to
    /// a million ids); larger rows are allocated per call.
    const KEEP_BYTES: usize = 8 << 20;
    /// At most this many buffers kept per thread (a task's two rows and three chunk buffers).
    const KEEP_ROWS: usize = 8;

    thread_local! {
        static KEPT: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    }

    /// `len` floats: a kept buffer that holds them (its old contents, then zeros past its old
    /// length), or a new one of zeros.
    pub(super) fn take(len: usize) -> Vec<f32> {
        if len == 0 {
            return Vec::new();
        }
        let kept = KEPT
            .try_with(|k| {
                let mut k = k.borrow_mut();
                // the smallest that holds them (a chunk buffer does not take a row's)
                let (i, _) =
                    k.iter().enumerate().filter(|(_, v)| v.capacity() >= len).min_by_key(|(_, v)| v.capacity())?;
                Some(k.swap_remove(i))
            })
            .ok()
            .flatten();
        match kept {
            Some(mut v) => {
                v.resize(len, 0.0);
                v
            }
            None => vec![0.0; len],
        }
    }

    /// Keeps `v` for this thread's next [`take`], within the limits (dropped otherwise).
    pub(super) fn give(v: Vec<f32>) {
        if v.capacity() == 0 {
            return;
        }
        // (a thread being torn down keeps nothing)
        let _ = KEPT.try_with(|k| {
            let mut k = k.borrow_mut();
            let bytes: usize = k.iter().map(|v| 4 * v.capacity()).sum();
            if k.len() < KEEP_ROWS && bytes + 4 * v.capacity() <= KEEP_BYTES {
                k.push(v);
            }
        });
    }
}

/// Per-task buffers, allocated once per task (never per row).
pub(super) struct Scratch {
    /// Widened input chunk.
    pub(super) buf: Vec<f32>,
    /// Exponentials nobody keeps (loss only, or rows too long to keep).
    pub(super) tmp: Vec<f32>,
    /// Their chain factors (soft-capping with smoothing; else empty).
    pub(super) chain: Vec<f32>,
}

impl Scratch {
    pub(super) fn new(m: &RowMath) -> Scratch {
        Scratch {
            buf: reuse::take(CHUNK),
            tmp: reuse::take(CHUNK),
            chain: reuse::take(if m.keeps_chain() { CHUNK } else { 0 }),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for v in [&mut self.buf, &mut self.tmp, &mut self.chain] {
            reuse::give(std::mem::take(v));
        }
    }
}
