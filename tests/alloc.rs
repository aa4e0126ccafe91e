//! The vocabulary-parallel split keeps its row buffers (the exponentials kept between the
//! statistics and the gradient of a chunk) for the next call whose slice has the same length, and
//! the single-device pass's threads keep their scratch rows for the next call: no allocation,
//! zeroing or page faults of those buffers per step. Bytes allocated are counted
//! by this test binary's global allocator (one test in the binary, so nothing else allocates
//! meanwhile).

use fused_weighted_loss::parallel::{Sharded, Solo, VocabSlice};
use fused_weighted_loss::{synthetic, Grad, LossSpec, Shape, Tokens};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        BYTES.fetch_add(new_size.saturating_sub(layout.size()), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn the_split_reuses_its_row_buffers_across_calls() {
    // one chunk of 64 rows of 4096 logits: 1 MiB of kept exponentials
    let shape = Shape::new(1, 64, 4096).unwrap();
    let logits = synthetic::logits::<f32>(5, shape.logits_len(), 3.0);
    let ids = synthetic::ids::<i64>(6, shape.rows(), shape.vocab());
    let mut grad = vec![0f32; shape.logits_len()];
    let spec = LossSpec::default();
    let call = Sharded::vocab_parallel(VocabSlice::full(4096).unwrap(), &Solo).with_split_steps();
    let kept = shape.rows() * shape.vocab() * 4;
    let mut used = Vec::new();
    for _ in 0..4 {
        let before = BYTES.load(Ordering::Relaxed);
        let out = call.loss_and_grad(&spec, shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad)).unwrap();
        assert!(out.loss.is_finite() && out.loss > 0.0);
        used.push(BYTES.load(Ordering::Relaxed) - before);
    }
    assert!(used[0] >= kept, "the first call allocates the row buffers: {used:?} bytes");
    // later calls: statistics, exchange and per-task scratch buffers (about 140 KiB here), not
    // the row buffers (each call allocated the 1 MiB afresh while keep_rows rebuilt the CPU side)
    assert!(used[2..].iter().all(|&b| b < kept / 4), "bytes allocated per call: {used:?}");

    // (in the same test: nothing else allocates meanwhile) the single-device pass: each task's
    // two scratch rows of 4·V bytes and chunk buffers are kept by the pool's threads for the
    // next call (fresh, they cost a zeroing or page faults: 12–35% of a call in cache)
    let shape = Shape::new(2, 32, 50_000).unwrap();
    let logits = synthetic::logits::<f32>(7, shape.logits_len(), 3.0);
    let ids = synthetic::ids::<i64>(8, shape.rows(), shape.vocab());
    let mut grad = vec![0f32; shape.logits_len()];
    let row = 4 * shape.vocab();
    // (a pool of one thread, which runs every task of every call: in a larger pool a thread
    // that happened to run no task in the first calls would allocate its rows in a later one)
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut used = Vec::new();
    for _ in 0..4 {
        let before = BYTES.load(Ordering::Relaxed);
        let out =
            pool.install(|| spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad))).unwrap();
        assert!(out.loss.is_finite() && out.loss > 0.0);
        used.push(BYTES.load(Ordering::Relaxed) - before);
    }
    assert!(used[0] >= 2 * row, "the first call allocates a task's two rows: {used:?} bytes");
    // later calls: the per-row losses and the outputs, a few KiB
    assert!(used[2..].iter().all(|&b| b < row / 4), "bytes allocated per call: {used:?}");
}
