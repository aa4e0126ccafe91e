//! The vocabulary-parallel one call on pools of 1, 3 and 4 threads (each in a process of its own:
//! the pool's size is fixed once per process), against the same call with one chunk for all
//! rows (no pipeline): the same bits, with chunks of fewer rows than threads (empty shares),
//! uneven shares, in place and into a buffer, f32 and bf16 logits, and an exchange slow enough
//! that the pool's workers hand their threads back and are started again.

#[path = "common/shards.rs"]
mod shards;

use fused_weighted_loss::parallel::{Collective, Sharded, VocabSlice};
use fused_weighted_loss::synthetic::{self, Rng};
use fused_weighted_loss::{bf16, Grad, Logit, LossSpec, Result, Shape, Tokens};
use shards::{columns, random_slices, run_ranks, ThreadGroup};
use std::time::Duration;

/// The child's pool size, set by the parent test.
const CHILD: &str = "FWL_SPLIT_TEST_THREADS";
const TEST: &str = "the_pipeline_keeps_the_bits_on_pools_of_1_3_and_4_threads";

/// A group whose every all-gather first sleeps: the workers of the pool wait for merges longer
/// than they hold their thread.
struct Slow<'a>(&'a ThreadGroup, Duration);

impl Collective for Slow<'_> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        std::thread::sleep(self.1);
        self.0.all_gather_f64(send, recv)
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        std::thread::sleep(self.1);
        self.0.all_gather_f32(send, recv)
    }
}

/// Every rank's (loss bits, gradient bits into a buffer, gradient bits in place) of the call
/// with `chunk` rows per exchange, each exchange `delay` late.
fn ranks<L: Logit>(
    spec: &LossSpec,
    shape: Shape,
    logits: &[L],
    ids: &[i64],
    slices: &[VocabSlice],
    chunk: usize,
    delay: Duration,
) -> Vec<(u64, Vec<u32>, Vec<u32>)> {
    let v = shape.vocab();
    run_ranks(slices.len(), |r, g| {
        let slow = Slow(g, delay);
        let local = columns(logits, v, slices[r]);
        let call = Sharded::vocab_parallel(slices[r], &slow).with_chunk_rows(chunk);
        let mut grad = vec![f32::NAN; local.len()];
        let out = call.loss_and_grad(spec, shape, &local, Tokens::new(ids), Grad::IntoF32(&mut grad)).unwrap();
        let mut inplace = local.clone();
        let ip = call.loss_and_grad_in_place(spec, shape, &mut inplace, Tokens::new(ids)).unwrap();
        assert_eq!(out.loss.to_bits(), ip.loss.to_bits(), "rank {r}: in place, the same loss");
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        let inplace: Vec<f32> = inplace.iter().map(|x| x.to_f32()).collect();
        assert!(grad.iter().all(|x| x.is_finite()), "rank {r}: every element written");
        (out.loss.to_bits(), bits(&grad), bits(&inplace))
    })
}

fn check<L: Logit>(seed: u64, threads: usize) {
    let mut rng = Rng::new(seed);
    let (b, t, v) = (2, 9, 3000 + rng.below(2000) as usize);
    let shape = Shape::new(b, t, v).unwrap();
    let spec = LossSpec::builder().keywords([3, 7]).z_loss(1e-3).build().unwrap();
    let logits = synthetic::logits::<L>(seed, shape.logits_len(), 4.0);
    let mut ids = synthetic::ids::<i64>(seed, shape.rows(), v);
    ids[5] = -100; // a row without a target
    let slices = random_slices(&mut rng, 2, v);
    let whole = ranks(&spec, shape, &logits, &ids, &slices, shape.rows(), Duration::ZERO);
    for (chunk, delay) in [(1, 0), (2, 0), (3, 0), (5, 0), (7, 0), (2, 1500), (5, 1000)] {
        let got = ranks(&spec, shape, &logits, &ids, &slices, chunk, Duration::from_micros(delay));
        for (r, (a, w)) in got.iter().zip(&whole).enumerate() {
            let what = format!("{} threads, {}, chunk {chunk}, delay {delay} us, rank {r}", threads, L::DTYPE);
            assert_eq!(a.0, w.0, "{what}: loss bits");
            assert_eq!(a.1, w.1, "{what}: gradient bits");
            assert_eq!(a.2, w.2, "{what}: gradient bits in place");
        }
    }
}

#[test]
fn the_pipeline_keeps_the_bits_on_pools_of_1_3_and_4_threads() {
    if let Ok(k) = std::env::var(CHILD) {
        let k: usize = k.parse().expect("a thread count");
        rayon::ThreadPoolBuilder::new().num_threads(k).build_global().expect("the global pool, once");
        assert_eq!(rayon::current_num_threads(), k);
        check::<f32>(11, k);
        check::<bf16>(12, k);
        println!("child with {k} threads checked");
        return;
    }
    for k in [1, 3, 4] {
        let exe = std::env::current_exe().expect("this test binary");
        let out = std::process::Command::new(exe)
            .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD, k.to_string())
            .output()
            .expect("the child test runs");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{k} threads failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains(&format!("child with {k} threads checked")), "{k} threads did not run:\n{stdout}");
    }
}
