//! Bit-identical results across runs and across thread counts.

mod common;

use fused_weighted_loss::{bf16, Grad, Logit, LossOutput, LossSpec, Shape, Tokens};

fn run_in_pool<L: Logit>(
    threads: usize,
    shape: Shape,
    logits: &[L],
    ids: &[i64],
    spec: &LossSpec,
) -> (LossOutput, Vec<L>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let mut g = vec![L::default(); shape.logits_len()];
        let out = spec.loss_and_grad(shape, logits, Tokens::new(ids), Grad::Into(&mut g)).unwrap();
        (out, g)
    })
}

fn bits<L: Logit>(g: &[L]) -> Vec<u32> {
    g.iter().map(|x| x.to_f32().to_bits()).collect()
}

fn check<L: Logit>(shape: Shape, seed: u64) {
    let ids = fused_weighted_loss::synthetic::ids::<i64>(seed, shape.rows(), shape.vocab());
    let spec = LossSpec::builder().keywords([ids[0], ids[1]]).build().unwrap();
    check_spec::<L>(shape, seed, &spec);
}

fn check_spec<L: Logit>(shape: Shape, seed: u64, spec: &LossSpec) {
    let logits = fused_weighted_loss::synthetic::logits::<L>(seed, shape.logits_len(), 5.0);
    let ids = fused_weighted_loss::synthetic::ids::<i64>(seed, shape.rows(), shape.vocab());
    let (a, ga) = run_in_pool(1, shape, &logits, &ids, spec);
    for threads in [2, 3, 8] {
        let (b, gb) = run_in_pool(threads, shape, &logits, &ids, spec);
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "loss differs with {threads} threads");
        assert_eq!(a, b);
        assert!(bits(&ga) == bits(&gb), "gradient differs with {threads} threads");
    }
    let (c, gc) = run_in_pool(8, shape, &logits, &ids, spec);
    assert_eq!(a, c);
    assert!(bits(&ga) == bits(&gc), "gradient differs between runs");
}

#[test]
fn bitwise_across_threads_f32() {
    check::<f32>(Shape::new(5, 33, 5003).unwrap(), 1);
}

#[test]
fn bitwise_across_threads_streamed() {
    // large enough for streaming stores (gradients of 32 MiB and more), whose use depends on
    // each buffer's alignment
    let shape = Shape::new(2, 42, 100_003).unwrap();
    assert!(shape.logits_len() * 4 > 32 << 20);
    check::<f32>(shape, 4);
}

#[test]
fn bitwise_across_threads_bf16() {
    check::<bf16>(Shape::new(3, 17, 20_000).unwrap(), 2);
}

#[test]
fn bitwise_across_threads_with_every_option() {
    let spec = LossSpec::builder().keywords([3]).z_loss(1e-4).label_smoothing(0.1).softcap(15.0).build().unwrap();
    for level in [fused_weighted_loss::CpuSimd::Portable, fused_weighted_loss::CpuSimd::Auto] {
        let spec = spec.to_builder().cpu_simd(level).build().unwrap();
        check_spec::<f32>(Shape::new(3, 17, 5003).unwrap(), 8, &spec);
        check_spec::<bf16>(Shape::new(3, 9, 20_000).unwrap(), 9, &spec);
    }
}

#[test]
fn bitwise_in_place_across_threads() {
    let shape = Shape::new(4, 9, 3001).unwrap();
    let logits = fused_weighted_loss::synthetic::logits::<f32>(3, shape.logits_len(), 5.0);
    let ids = fused_weighted_loss::synthetic::ids::<i32>(3, shape.rows(), shape.vocab());
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut l = logits.clone();
        let out =
            pool.install(|| LossSpec::default().loss_and_grad_in_place(shape, &mut l, Tokens::new(&ids)).unwrap());
        (out, bits(&l))
    };
    assert_eq!(run(1), run(7));
}

/// Random shapes (up to 186 rows of up to 40 000 logits), options, levels and dtypes: one thread
/// and 2–8 give the same bits. Seeds: `FWL_TEST_CASES` (default 40; 3 000 passed).
#[test]
fn random_shapes_give_the_same_bits_on_any_thread_count() {
    use fused_weighted_loss::synthetic::Rng;
    use fused_weighted_loss::{f16, CpuSimd};
    for seed in 0..u64::from(common::cases(40)) {
        let mut rng = Rng::new(seed ^ 0x99);
        let (b, t, v) = (1 + rng.below(6) as usize, 2 + rng.below(30) as usize, 1 + rng.below(40_000) as usize);
        let shape = Shape::new(b, t, v).unwrap();
        let (sb, _) = common::random_options(&mut rng, LossSpec::builder().keywords([0i64]));
        let spec = sb.cpu_simd([CpuSimd::Portable, CpuSimd::Auto][rng.below(2) as usize]).build().unwrap();
        let ids = fused_weighted_loss::synthetic::ids::<i64>(seed, shape.rows(), v);
        let (threads, scale) = (2 + rng.below(7) as usize, [1.0, 5.0, 20.0][rng.below(3) as usize]);
        let what = format!("seed {seed}, {shape}, {threads} threads, {spec:?}");
        match rng.below(3) {
            0 => same_bits::<bf16>(shape, seed, scale, &ids, &spec, threads, &what),
            1 => same_bits::<f16>(shape, seed, scale, &ids, &spec, threads, &what),
            _ => same_bits::<f32>(shape, seed, scale, &ids, &spec, threads, &what),
        }
    }
}

fn same_bits<L: Logit>(shape: Shape, seed: u64, scale: f32, ids: &[i64], spec: &LossSpec, threads: usize, what: &str) {
    let logits = fused_weighted_loss::synthetic::logits::<L>(seed, shape.logits_len(), scale);
    let (a, ga) = run_in_pool(1, shape, &logits, ids, spec);
    let (b, gb) = run_in_pool(threads, shape, &logits, ids, spec);
    assert!(a.loss.is_finite(), "{what}: a finite loss");
    assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{what}: loss");
    assert_eq!(a, b, "{what}: outputs");
    assert!(bits(&ga) == bits(&gb), "{what}: gradient");
}
