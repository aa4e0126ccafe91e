//! Shared test helpers: run every output mode of the fused path and compare with the reference.
#![allow(dead_code)]

pub mod host_cxx;
pub mod kernel_calls;
pub mod linear;

use fused_weighted_loss::reference::{reference, rel_err, ReferenceOutput};
use fused_weighted_loss::synthetic::Rng;
use fused_weighted_loss::{CpuSimd, DType, Grad, Logit, LossOutput, LossSpec, LossSpecBuilder, Shape, TokenId, Tokens};

/// Cases of a randomised test: `FWL_TEST_CASES` when set (a longer campaign, e.g.
/// `FWL_TEST_CASES=20000 cargo test --release --test options`), else `default`.
pub fn cases(default: u32) -> u32 {
    match std::env::var("FWL_TEST_CASES") {
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("FWL_TEST_CASES={s:?}: not a count of cases")),
        Err(_) => default,
    }
}

/// `b` with a random soft-cap (5, 30 or 200), z-loss (1e-4) and label smoothing (0.1), each on
/// one time in three; returns the cap too, so that a caller can bound its logits by it.
pub fn random_options(rng: &mut Rng, b: LossSpecBuilder) -> (LossSpecBuilder, Option<f32>) {
    let cap = (rng.below(3) == 0).then(|| [5.0f32, 30.0, 200.0][rng.below(3) as usize]);
    let mut b = b.softcap(cap.map(f64::from));
    if rng.below(3) == 0 {
        b = b.z_loss(1e-4);
    }
    if rng.below(3) == 0 {
        b = b.label_smoothing(0.1);
    }
    (b, cap)
}

/// Tolerances from the project's standard: f32 inputs 1e-5; f16/bf16 1.5e-2 on the gradient
/// (it is rounded to the input dtype) and 1e-4 on the loss.
pub fn tolerances(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-5),
        _ => (1.5e-2, 1e-4),
    }
}

/// Relative error of a scalar (absolute when the reference is 0); NaN when either is NaN.
pub fn rel(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        a.abs()
    } else {
        (a - b).abs() / b.abs()
    }
}

/// Asserts the non-gradient outputs agree with the reference.
pub fn assert_outputs(out: &LossOutput, r: &ReferenceOutput, loss_tol: f64, what: &str) {
    let e = rel(out.loss, r.loss);
    assert!(e <= loss_tol, "{what}: loss {} vs reference {} (rel err {e:e})", out.loss, r.loss);
    let e = rel_err(&out.per_sample_loss, &r.per_sample_loss);
    assert!(e <= loss_tol, "{what}: per-sample loss rel err {e:e}");
    if r.z_loss == 0.0 {
        assert_eq!(out.z_loss, 0.0, "{what}: z-loss");
    } else {
        let e = rel(out.z_loss, r.z_loss);
        assert!(e <= loss_tol, "{what}: z-loss {} vs reference {} (rel err {e:e})", out.z_loss, r.z_loss);
    }
    // weights are sums of keyword weights: exact for integer weights, summation order otherwise
    let e = rel_err(&out.weights, &r.weights);
    assert!(e <= 1e-12, "{what}: weights {:?} vs {:?}", out.weights, r.weights);
    assert_eq!(out.valid_tokens, r.valid_tokens, "{what}: valid tokens");
}

/// The CPU instruction sets this machine runs (always including `Portable`).
pub fn cpu_levels() -> Vec<CpuSimd> {
    [CpuSimd::Avx512, CpuSimd::Avx2, CpuSimd::Portable]
        .into_iter()
        .filter(|&l| fused_weighted_loss::cpu_simd_supported(l))
        .collect()
}

/// Runs [`check_modes`] at every CPU instruction set this machine has; returns the reference
/// and the f32 gradient of the last level.
pub fn check_all_modes<L: Logit, I: TokenId>(
    spec: &LossSpec,
    shape: Shape,
    logits: &[L],
    tokens: Tokens<'_, I>,
) -> (ReferenceOutput, Vec<f32>) {
    let specs = cpu_levels().into_iter().map(|level| spec.to_builder().cpu_simd(level).build().unwrap());
    check_specs(spec, shape, logits, tokens, specs)
}

/// Runs [`check_modes`] for each of `specs` (variants of `spec` that change where it runs).
fn check_specs<L: Logit, I: TokenId>(
    spec: &LossSpec,
    shape: Shape,
    logits: &[L],
    tokens: Tokens<'_, I>,
    specs: impl IntoIterator<Item = LossSpec>,
) -> (ReferenceOutput, Vec<f32>) {
    let r = reference(spec, shape, logits, tokens).expect("reference");
    assert!(r.loss.is_finite(), "test data must give a finite reference loss");
    let mut g = Vec::new();
    for s in specs {
        g = check_modes(&s, shape, logits, tokens, &r);
    }
    assert!(!g.is_empty(), "at least one configuration ran");
    (r, g)
}

/// Whether a CUDA GPU can be used; without one the caller skips, saying so, unless
/// `FWL_REQUIRE_CUDA=1`, in which case the test fails.
pub fn gpu_or_skip(test: &str) -> bool {
    match fused_weighted_loss::cuda_status() {
        Ok(()) => true,
        Err(why) => {
            if std::env::var("FWL_REQUIRE_CUDA").as_deref() == Ok("1") {
                panic!("{test}: FWL_REQUIRE_CUDA=1 but CUDA is not usable: {why}");
            }
            eprintln!("{test}: skipped, no CUDA GPU ({why})");
            false
        }
    }
}

/// [`check_modes`] through the CUDA backend (host buffers, uploaded and downloaded).
pub fn check_cuda<L: Logit, I: TokenId>(
    spec: &LossSpec,
    shape: Shape,
    logits: &[L],
    tokens: Tokens<'_, I>,
) -> (ReferenceOutput, Vec<f32>) {
    let cuda = spec.to_builder().backend(fused_weighted_loss::Backend::Cuda).build().unwrap();
    check_specs(spec, shape, logits, tokens, [cuda])
}

/// Logit `i` of the >2^31-element tests, recomputable without storing a copy.
pub fn hashed_logit(i: usize) -> fused_weighted_loss::bf16 {
    let mut z = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    fused_weighted_loss::bf16::from_f32(((z >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0)
}

/// Runs loss-only, gradient into `L`, gradient into `f32` and in place; checks each against
/// the reference; returns the f32 gradient.
pub fn check_modes<L: Logit, I: TokenId>(
    spec: &LossSpec,
    shape: Shape,
    logits: &[L],
    tokens: Tokens<'_, I>,
    r: &ReferenceOutput,
) -> Vec<f32> {
    let (grad_tol, loss_tol) = tolerances(L::DTYPE);
    let level = match spec.backend() {
        fused_weighted_loss::Backend::Cuda => "cuda".to_string(),
        _ => spec.cpu_simd().to_string(),
    };

    let out = spec.loss_and_grad(shape, logits, tokens, Grad::Skip).expect("loss only");
    assert_outputs(&out, r, loss_tol, &format!("{level}: loss only"));

    let mut per_token = vec![f32::NAN; shape.batch() * (shape.seq() - 1)];
    let out = spec.loss_and_grad_per_token(shape, logits, tokens, Grad::Skip, &mut per_token).expect("per token");
    assert_outputs(&out, r, loss_tol, &format!("{level}: per token"));
    // an f32 buffer: losses beyond the f32 range are infinite there, as the reference rounds
    let (fits, beyond): (Vec<_>, Vec<_>) =
        per_token.iter().zip(&r.token_loss).partition(|(_, &want)| (want as f32).is_finite());
    assert!(beyond.iter().all(|(&got, &want)| got == want as f32), "{level}: per-token losses beyond f32");
    let (got, want): (Vec<f32>, Vec<f64>) = fits.into_iter().map(|(&g, &w)| (g, w)).unzip();
    let e = rel_err(&got, &want);
    assert!(e <= loss_tol, "{level}: per-token losses: rel err {e:e}");

    let mut g32 = vec![f32::NAN; shape.logits_len()];
    let out = spec.loss_and_grad(shape, logits, tokens, Grad::IntoF32(&mut g32)).expect("grad f32");
    assert_outputs(&out, r, loss_tol, &format!("{level}: grad f32"));
    // An f32 gradient from narrower logits is computed in f32 from the same values: f32 bound.
    let e = rel_err(&g32, &r.grad);
    assert!(e <= 1e-5, "{level}: grad f32: rel err {e:e}");

    let mut gl = vec![L::from_f32(f32::NAN); shape.logits_len()];
    let out = spec.loss_and_grad(shape, logits, tokens, Grad::Into(&mut gl)).expect("grad L");
    assert_outputs(&out, r, loss_tol, &format!("{level}: grad same dtype"));
    let gl32: Vec<f32> = gl.iter().map(|x| x.to_f32()).collect();
    let e = rel_err(&gl32, &r.grad);
    // a gradient stored in 16 bits cannot beat the reference rounded to 16 bits: where a small
    // grad_scale puts the entries among f16's subnormals, that rounding alone loses more than
    // the tolerance, and the bound is twice what it loses
    let best: Vec<f32> = r.grad.iter().map(|&g| L::from_f32(g as f32).to_f32()).collect();
    let floor = rel_err(&best, &r.grad);
    assert!(e <= grad_tol.max(2.0 * floor), "{level}: grad {}: rel err {e:e} (the dtype's own {floor:e})", L::DTYPE);

    let mut inplace = logits.to_vec();
    let mut per_token_in_place = vec![f32::NAN; per_token.len()];
    let out =
        spec.loss_and_grad_in_place_per_token(shape, &mut inplace, tokens, &mut per_token_in_place).expect("in place");
    assert_outputs(&out, r, loss_tol, &format!("{level}: in place"));
    let same = per_token.iter().zip(&per_token_in_place).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{level}: per-token losses in place equal those of the loss-only pass");
    let same = inplace.iter().zip(&gl).all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits());
    assert!(same, "{level}: in-place gradient equals the same-dtype gradient bit for bit");
    g32
}

/// Soft-capping where tanh saturates: logits at 4.5..5.5 times the cap (every seventh at
/// 9.5..10.5), where the chain factor `1 - tanh^2` is tiny and must keep its relative accuracy;
/// the shape, f32 logits, ids and the specs (cap 10 alone and with smoothing and z-loss).
pub fn saturating_softcap_case() -> (Shape, Vec<f32>, Vec<i64>, [LossSpec; 2]) {
    let shape = Shape::new(2, 4, 3000).unwrap();
    let (u, ids) = random_inputs::<f32>(51, shape, 0.5);
    let l = u.iter().enumerate().map(|(i, x)| if i % 7 == 0 { 95.0 + 10.0 * x } else { 50.0 + 10.0 * x }).collect();
    let specs = [
        LossSpec::builder().softcap(10.0).build().unwrap(),
        LossSpec::builder().softcap(10.0).label_smoothing(0.1).z_loss(1e-4).build().unwrap(),
    ];
    (shape, l, ids, specs)
}

/// Soft-capping far into saturation: every logit 15 to 19.5 times the cap, where `1 - tanh^2`
/// in f64 loses all of its accuracy (at 19.5 it is exactly 0; the true factor is about 1e-17)
/// and the reference must take `1 / cosh^2`; the gradient is then tiny everywhere, so this case
/// stands alone (beside larger entries its error would not show in the relative norm).
pub fn deep_softcap_case() -> (Shape, Vec<f32>, Vec<i64>, [LossSpec; 2]) {
    let shape = Shape::new(2, 5, 300).unwrap();
    let (u, ids) = random_inputs::<f32>(53, shape, 0.5);
    let l = u.iter().map(|x| 172.5 + 45.0 * x).collect();
    let specs = [
        LossSpec::builder().softcap(10.0).build().unwrap(),
        LossSpec::builder().softcap(10.0).label_smoothing(0.1).z_loss(1e-4).build().unwrap(),
    ];
    (shape, l, ids, specs)
}

/// Random inputs for a shape: logits uniform in [-scale, scale), ids uniform in [0, V).
pub fn random_inputs<L: Logit>(seed: u64, shape: Shape, scale: f32) -> (Vec<L>, Vec<i64>) {
    let logits = fused_weighted_loss::synthetic::logits::<L>(seed, shape.logits_len(), scale);
    let ids = fused_weighted_loss::synthetic::ids::<i64>(seed, shape.rows(), shape.vocab());
    (logits, ids)
}

/// Confident rows: logits uniform in [-1, 1) with every row's target raised to `margin` (plus
/// 0.25 or 0.5 in every second and third row), so each per-token loss is about
/// `V · e^{-margin}`: small, and lost to rounding where the target's term shares a sum with the
/// others' (e.g. 6e-4 at margin 18 over V = 32000).
pub fn confident_inputs<L: Logit>(seed: u64, shape: Shape, margin: f32) -> (Vec<L>, Vec<i64>) {
    let (logits, ids) = random_inputs::<f32>(seed, shape, 1.0);
    let mut logits: Vec<L> = logits.into_iter().map(L::from_f32).collect();
    let (t, v) = (shape.seq(), shape.vocab());
    for r in (0..shape.rows()).filter(|r| r % t < t - 1) {
        logits[r * v + ids[r + 1] as usize] = L::from_f32(margin + (r % 3) as f32 * 0.25);
    }
    (logits, ids)
}

/// The confident-row cases every backend runs (with [`confident_inputs`]): (spec, V, margin,
/// seed, logits' dtype) over `vocabs`: margins 8 to 30 plain, soft-capped, bf16 and f16 (to 20),
/// and a margin of 18 with z-loss and label smoothing in f32 and bf16.
pub fn confident_cases(vocabs: &[usize]) -> Vec<(LossSpec, usize, f32, u64, DType)> {
    let plain = LossSpec::default();
    let options = LossSpec::builder().z_loss(1e-4).label_smoothing(0.05).build().unwrap();
    let capped = LossSpec::builder().softcap(60.0).build().unwrap();
    let mut cases = Vec::new();
    for (i, &v) in vocabs.iter().enumerate() {
        let seed = 1 + i as u64;
        for margin in [8.0, 14.0, 18.0, 22.0, 30.0] {
            cases.push((plain.clone(), v, margin, seed, DType::F32));
            cases.push((capped.clone(), v, margin, seed, DType::F32));
            cases.push((plain.clone(), v, margin, seed, DType::BF16));
            cases.push((plain.clone(), v, f32::min(margin, 20.0), seed, DType::F16));
        }
        cases.push((options.clone(), v, 18.0, seed, DType::F32));
        cases.push((options.clone(), v, 18.0, seed, DType::BF16));
    }
    cases
}

/// Finite logits at the edge of the `f32` range: random values in [-2, 2) with, in every row that
/// has a target, the target at `-big` and another entry at `+big` (`big` = `f32::MAX` for f32
/// logits, `3.3e38` for bf16), so each such per-token loss (about `2 * big`) exceeds `f32::MAX`
/// while its float64 value is finite. The vocabulary must be at least 2.
pub fn edge_of_range_logits<L: Logit>(seed: u64, shape: Shape) -> (Vec<L>, Vec<i64>) {
    let (mut logits, ids) = random_inputs::<L>(seed, shape, 2.0);
    let (t, v) = (shape.seq(), shape.vocab());
    assert!(v >= 2, "needs a second entry beside the target");
    let big = if L::DTYPE == DType::F32 { f32::MAX } else { 3.3e38 };
    for r in (0..shape.rows()).filter(|r| r % t < t - 1) {
        let y = ids[r + 1] as usize;
        logits[r * v + y] = L::from_f32(-big);
        logits[r * v + (y + 1 + r % (v - 1)) % v] = L::from_f32(big);
    }
    (logits, ids)
}
