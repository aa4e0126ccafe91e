//! Timing helpers shared by the CLI's `bench` and the criterion benches: medians, paired timing
//! and the memory-copy floor that a fused pass is measured against.

use rayon::prelude::*;
use std::time::Instant;

/// Median of a sample (NaN for an empty one).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Minimum of a sample (NaN for an empty one).
pub fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::NAN, f64::min)
}

/// Runs `f` `warmup` times, then `iters` times, and returns each timed run in seconds.
pub fn time_runs(warmup: usize, iters: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..warmup {
        f();
    }
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// Times `a` and `b` alternately (`a`, `b`, `a`, `b`, ...), so that drifts of the machine (other
/// tenants, clocks) hit both alike; returns each one's timed runs in seconds.
pub fn time_paired(warmup: usize, iters: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (Vec<f64>, Vec<f64>) {
    for _ in 0..warmup {
        a();
        b();
    }
    let (mut ta, mut tb) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for _ in 0..iters {
        let t = Instant::now();
        a();
        ta.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        b();
        tb.push(t.elapsed().as_secs_f64());
    }
    (ta, tb)
}

/// Two filled (non-zero) buffers of equal size and a parallel `memcpy` between them: the
/// reference point for a pass that reads the logits once and writes the gradient once.
pub struct CopyBuffers {
    src: Vec<u8>,
    dst: Vec<u8>,
    chunk: usize,
}

impl CopyBuffers {
    /// Allocates and fills `bytes` to read and `bytes` to write; `None` if they cannot be had.
    pub fn new(bytes: usize) -> Option<Self> {
        let (mut src, mut dst): (Vec<u8>, Vec<u8>) = (Vec::new(), Vec::new());
        src.try_reserve_exact(bytes).ok()?;
        dst.try_reserve_exact(bytes).ok()?;
        src.extend((0..bytes).map(|i| (i.wrapping_mul(31) >> 3) as u8 | 1));
        dst.resize(bytes, 1);
        let chunk = bytes.div_ceil(rayon::current_num_threads().max(1) * 4).max(4096);
        Some(CopyBuffers { src, dst, chunk })
    }

    /// One copy, split across the current rayon pool.
    pub fn copy(&mut self) {
        let chunk = self.chunk;
        self.dst.par_chunks_mut(chunk).zip(self.src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        std::hint::black_box(&self.dst);
    }
}
