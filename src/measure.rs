//! Timing helpers shared by the CLI's `bench` and the criterion benches: medians, paired timing
//! and the memory-copy floor that a fused pass is measured against: the fastest of several copies
//! of the same bytes (`memcpy` or streaming stores, piece sizes, thread counts), picked in the
//! same run.

use crate::CpuSimd;
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
    // (grown as the runs come: no reservation sized by the caller's count)
    let mut runs = Vec::with_capacity(iters.min(RESERVE));
    for _ in 0..iters {
        let t = Instant::now();
        f();
        runs.push(t.elapsed().as_secs_f64());
    }
    runs
}

/// Runs whose times are reserved for up front; more grow the vectors as they come.
const RESERVE: usize = 1 << 12;

/// Times `a` and `b` alternately (`a`, `b`, `a`, `b`, ...), so that drifts of the machine (other
/// tenants, clocks) hit both alike; returns each one's timed runs in seconds.
pub fn time_paired(warmup: usize, iters: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (Vec<f64>, Vec<f64>) {
    for _ in 0..warmup {
        a();
        b();
    }
    let (mut ta, mut tb) = (Vec::with_capacity(iters.min(RESERVE)), Vec::with_capacity(iters.min(RESERVE)));
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

/// How a copy floor copies: plain `memcpy` (the platform's, through `copy_from_slice`) or
/// streaming (non-temporal) stores at an instruction-set level, with or without prefetches of
/// the source ahead of the copy, split into pieces of `piece` bytes across `threads` threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyMethod {
    /// Streaming stores at this level (`None`: plain `memcpy`).
    pub streaming: Option<CpuSimd>,
    /// With streaming stores at the x86 levels: the source prefetched into L2 32 KiB ahead,
    /// line by line, as the fused pass prefetches its logits. On a 2-vCPU Xeon of 2026-12-04 a
    /// C loop copying so took 7.4–10.3 ms for 410 MB at two threads where the fastest of the
    /// other candidates took 8.4–12.3 ms in the same minutes. Ignored elsewhere.
    pub prefetch: bool,
    /// Bytes per parallel piece.
    pub piece: usize,
    /// Threads (a rayon pool of this size; the current pool when it is the current size).
    pub threads: usize,
}

impl std::fmt::Display for CopyMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.streaming {
            None => write!(f, "memcpy")?,
            Some(level) => write!(f, "streaming {level}")?,
        }
        if self.prefetch {
            write!(f, " + prefetch")?;
        }
        write!(f, ", {} KiB pieces, {} threads", self.piece >> 10, self.threads)
    }
}

/// The smallest piece a copy is split into, in bytes.
const MIN_PIECE: usize = 4096;

/// The piece a copy asked for `piece` bytes copies: whole f32, at least [`MIN_PIECE`].
fn whole_piece(piece: usize) -> usize {
    piece.div_ceil(4).max(MIN_PIECE / 4) * 4
}

/// Two filled (non-zero) buffers of equal size and a parallel copy between them: the reference
/// point for a pass that reads the logits once and writes the gradient once. The copy is the
/// fastest of several ways this machine can copy the same bytes ([`CopyBuffers::pick_fastest`]).
pub struct CopyBuffers {
    src: Vec<f32>,
    dst: Vec<f32>,
    method: CopyMethod,
    pool: Option<rayon::ThreadPool>,
}

impl CopyBuffers {
    /// Allocates and fills `bytes` to read and `bytes` to write (rounded up to whole f32);
    /// `None` if they cannot be had. Copies with `memcpy` in 4 pieces per thread until
    /// [`pick_fastest`](Self::pick_fastest) chooses otherwise.
    pub fn new(bytes: usize) -> Option<Self> {
        let n = bytes.div_ceil(4);
        let (mut src, mut dst): (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
        src.try_reserve_exact(n).ok()?;
        dst.try_reserve_exact(n).ok()?;
        src.extend((0..n).map(|i| (i % 1021) as f32 * 0.5 + 1.0));
        dst.resize(n, 1.0);
        let threads = crate::pool::install(rayon::current_num_threads).max(1);
        let piece = whole_piece((n * 4).div_ceil(threads * 4));
        Some(CopyBuffers {
            src,
            dst,
            method: CopyMethod { streaming: None, prefetch: false, piece, threads },
            pool: None,
        })
    }

    /// The candidates [`pick_fastest`](Self::pick_fastest) times: `memcpy` and streaming stores
    /// at each level this CPU has (at the x86 levels also prefetching), in one piece per thread,
    /// four per thread and 1 MiB pieces, on all threads of the current pool; and `memcpy` on one
    /// thread.
    pub fn candidates(&self) -> Vec<CopyMethod> {
        let bytes = self.src.len() * 4;
        let threads = crate::pool::install(rayon::current_num_threads).max(1);
        let pieces = [bytes.div_ceil(threads), bytes.div_ceil(4 * threads), 1 << 20];
        let mut ways: Vec<Option<CpuSimd>> = vec![None];
        ways.extend([CpuSimd::Avx512, CpuSimd::Avx2].into_iter().filter(|&l| crate::cpu_simd_supported(l)).map(Some));
        let mut out = Vec::new();
        for streaming in ways {
            for prefetch in [false, streaming.is_some_and(prefetches)] {
                for piece in pieces {
                    out.push(CopyMethod { streaming, prefetch, piece: whole_piece(piece.min(bytes)), threads });
                }
            }
        }
        if threads > 1 {
            out.push(CopyMethod { streaming: None, prefetch: false, piece: whole_piece(bytes), threads: 1 });
        }
        // equal pieces need not be neighbours (one thread: the whole, a quarter, then 1 MiB
        // clamped to the whole): each method once
        let mut unique: Vec<CopyMethod> = Vec::with_capacity(out.len());
        for m in out {
            if !unique.contains(&m) {
                unique.push(m);
            }
        }
        unique
    }

    /// Times every [candidate](Self::candidates) (`rounds` runs each after one untimed run),
    /// keeps the one with the smallest median for [`copy`](Self::copy), and returns it with
    /// each candidate's median in seconds.
    pub fn pick_fastest(&mut self, rounds: usize) -> (CopyMethod, Vec<(CopyMethod, f64)>) {
        let mut times = Vec::new();
        for m in self.candidates() {
            self.set_method(m);
            times.push((m, median(&time_runs(1, rounds.max(1), || self.copy()))));
        }
        let best = times.iter().min_by(|a, b| a.1.total_cmp(&b.1)).map(|t| t.0).unwrap_or(self.method);
        self.set_method(best);
        (best, times)
    }

    /// Copies with `method` from now on, as far as this machine allows, and
    /// [`method`](Self::method) says what runs: a streaming level this CPU lacks copies with
    /// `memcpy` (`streaming: None`), `threads: 0`, or a pool of `threads` that cannot start,
    /// takes the current pool (`threads`: its size), and `piece` is rounded up to whole f32
    /// and up to 4 KiB, and down to the buffers' size (`piece`: what is copied; `usize::MAX`
    /// asks for one piece).
    pub fn set_method(&mut self, method: CopyMethod) {
        let current = crate::pool::install(rayon::current_num_threads);
        let streaming = method.streaming.filter(|&level| crate::cpu::simd::Kernels::select(level).is_some());
        let wanted = if method.threads == 0 { current } else { method.threads };
        self.pool =
            (wanted != current).then(|| rayon::ThreadPoolBuilder::new().num_threads(wanted).build().ok()).flatten();
        let threads = if wanted == current || self.pool.is_some() { wanted } else { current };
        let piece = whole_piece(method.piece.min(self.src.len() * 4));
        let prefetch = method.prefetch && streaming.is_some_and(prefetches);
        self.method = CopyMethod { streaming, prefetch, piece, threads };
    }

    /// The method [`copy`](Self::copy) uses.
    pub fn method(&self) -> CopyMethod {
        self.method
    }

    /// One copy with the current method.
    pub fn copy(&mut self) {
        let m = self.method;
        let piece = m.piece / 4;
        let kernels = m.streaming.and_then(crate::cpu::simd::Kernels::select);
        let (src, dst) = (&self.src, &mut self.dst);
        let body = || {
            dst.par_chunks_mut(piece).zip(src.par_chunks(piece)).for_each(|(d, s)| match &kernels {
                Some(k) if m.prefetch && k.copy_ahead(s, d) => k.fence(),
                // x * 1.0 is x: a streaming copy through the backend's store kernel
                Some(k) => {
                    k.scale_f32(s, 1.0, d, true);
                    k.fence();
                }
                None => d.copy_from_slice(s),
            })
        };
        match &self.pool {
            Some(pool) => pool.install(body),
            None => crate::pool::install(body),
        }
        std::hint::black_box(&self.dst);
    }
}

/// Whether `level`'s kernels have a prefetching streaming copy.
fn prefetches(level: CpuSimd) -> bool {
    crate::cpu::simd::Kernels::select(level).is_some_and(|k| k.has_copy_ahead())
}

#[cfg(test)]
mod tests {
    use super::{CopyBuffers, CopyMethod};
    use crate::CpuSimd;

    /// What `set_method` takes is what runs, and `method()` says so: no thread count of 0, no
    /// streaming level this CPU lacks (each was reported as asked while another ran).
    #[test]
    fn the_method_set_is_the_method_reported() {
        let mut copy = CopyBuffers::new(1 << 16).unwrap();
        let current = crate::pool::install(rayon::current_num_threads);
        copy.set_method(CopyMethod { streaming: None, prefetch: false, piece: 4096, threads: 0 });
        assert_eq!(copy.method().threads, current);
        copy.set_method(CopyMethod { streaming: None, prefetch: false, piece: 4096, threads: current + 1 });
        assert_eq!(copy.method().threads, current + 1);
        for level in [CpuSimd::Portable, CpuSimd::Avx2, CpuSimd::Avx512] {
            // pieces of a line, of less than one, and of lines and a bit (heads and tails)
            for (prefetch, piece) in [(false, 4096), (true, 4096), (true, 50_000), (true, 1 << 16)] {
                copy.set_method(CopyMethod { streaming: Some(level), prefetch, piece, threads: 1 });
                let runs = crate::cpu::simd::Kernels::select(level).is_some();
                assert_eq!(copy.method().streaming, runs.then_some(level), "{level:?}");
                // prefetching only with streaming stores, at the levels that have the copy
                let x86 = cfg!(target_arch = "x86_64") && level != CpuSimd::Portable;
                assert_eq!(copy.method().prefetch, prefetch && runs && x86, "{level:?}");
                copy.dst.fill(0.5);
                copy.copy();
                assert!(copy.src == copy.dst, "{level:?}, prefetch {prefetch}, {piece} bytes: the copy copied");
            }
        }
        copy.set_method(CopyMethod { streaming: None, prefetch: true, piece: 4096, threads: 1 });
        assert!(!copy.method().prefetch, "memcpy prefetches on its own");
        // the piece copied, not the piece asked for: whole f32, 4 KiB at least, the buffers' size
        // at most (a piece near usize::MAX overflowed its rounding to 0, and the copy panicked)
        let all = 1 << 16;
        for (asked, runs) in
            [(0, 4096), (1, 4096), (4095, 4096), (5000, 5000), (5001, 5004), (all + 1, all), (usize::MAX, all)]
        {
            copy.set_method(CopyMethod { streaming: None, prefetch: false, piece: asked, threads: 1 });
            assert_eq!(copy.method().piece, runs, "{asked} bytes asked");
            copy.dst.fill(0.5);
            copy.copy();
            assert!(copy.src == copy.dst, "{asked} bytes asked: the copy copied");
        }
    }

    /// Each copy method is a candidate once, whatever the thread count and size (on one thread
    /// of 512 KiB the whole, a quarter and 1 MiB clamped to the whole were three, two alike).
    #[test]
    fn copy_candidates_are_distinct() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                for bytes in [1, 4096, 512 << 10, 3 << 20] {
                    let copy = CopyBuffers::new(bytes).unwrap();
                    let c = copy.candidates();
                    assert!(!c.is_empty());
                    for (i, m) in c.iter().enumerate() {
                        assert!(!c[..i].contains(m), "{m} twice for {bytes} bytes on {threads} threads: {c:?}");
                    }
                }
            });
        }
    }
}
