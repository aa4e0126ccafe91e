//! The candle custom op: its loss and, through `backward()`, its gradient equal the crate's own
//! API and the float64 reference, on CPU tensors (and on CUDA tensors with `candle-cuda` and a
//! GPU; those skip without one, and fail with `FWL_REQUIRE_CUDA=1`).
#![cfg(feature = "candle")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{random_inputs, rel};
use fused_weighted_loss::candle::{weighted_loss, weighted_loss_with_token_weights};
use fused_weighted_loss::reference::{reference, rel_err};
use fused_weighted_loss::{bf16, Grad, Logit, LossSpec, RowMean, Shape, Tokens};

/// Runs the op on `device` with logits of dtype `L`; checks loss and gradient against the
/// reference and the crate's API; `scale` multiplies the loss before `backward()`.
fn check<L: Logit + candle_core::WithDType>(device: &Device, shape: Shape, spec: &LossSpec, labels: bool, scale: f64) {
    let (logits, ids) = random_inputs::<L>(7, shape, 3.0);
    let ids_u32: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let mut lab = ids_u32.clone();
    lab[1] = 0;
    let lab_i64: Vec<i64> = lab.iter().map(|&x| x as i64).collect();
    let mut lab_i64 = lab_i64;
    lab_i64[2] = -100;
    let dims = (shape.batch(), shape.seq(), shape.vocab());
    let t_logits = Var::from_tensor(&Tensor::from_vec(logits.clone(), dims, device).unwrap()).unwrap();
    let (loss, r, api) = if labels {
        let t_ids = Tensor::from_vec(ids.clone(), (shape.batch(), shape.seq()), device).unwrap();
        let t_lab = Tensor::from_vec(lab_i64.clone(), (shape.batch(), shape.seq()), device).unwrap();
        let loss = weighted_loss(t_logits.as_tensor(), &t_ids, Some(&t_lab), spec).unwrap();
        let tokens = Tokens::new(&ids).with_labels(&lab_i64);
        (
            loss,
            reference(spec, shape, &logits, tokens).unwrap(),
            spec.loss_and_grad(shape, &logits, tokens, Grad::Skip).unwrap(),
        )
    } else {
        let t_ids = Tensor::from_vec(ids_u32.clone(), (shape.batch(), shape.seq()), device).unwrap();
        let loss = weighted_loss(t_logits.as_tensor(), &t_ids, None, spec).unwrap();
        let tokens = Tokens::new(&ids_u32);
        (
            loss,
            reference(spec, shape, &logits, tokens).unwrap(),
            spec.loss_and_grad(shape, &logits, tokens, Grad::Skip).unwrap(),
        )
    };
    assert_eq!(loss.dims(), &[] as &[usize]);
    assert_eq!(loss.dtype(), DType::F32);
    let l = loss.to_scalar::<f32>().unwrap() as f64;
    let tol = if <L as Logit>::DTYPE == fused_weighted_loss::DType::F32 { 1e-5 } else { 1e-4 };
    assert!(rel(l, r.loss) <= tol, "loss {l} vs reference {}", r.loss);
    assert!(rel(l, api.loss) <= 1e-6, "loss {l} vs the crate's API {}", api.loss);
    let scaled = if scale == 1.0 { loss } else { (loss * scale).unwrap() };
    let grads = scaled.backward().unwrap();
    let g = grads.get(&t_logits).expect("gradient of the logits");
    assert_eq!(g.dims(), &[shape.batch(), shape.seq(), shape.vocab()]);
    assert_eq!(g.dtype(), t_logits.dtype());
    let g: Vec<f32> = g.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f64> = r.grad.iter().map(|x| x * scale).collect();
    let e = rel_err(&g, &want);
    let gtol = if <L as Logit>::DTYPE == fused_weighted_loss::DType::F32 { 1e-5 } else { 1.5e-2 };
    assert!(e <= gtol, "gradient rel err {e:e} ({:?} labels={labels} scale={scale})", <L as Logit>::DTYPE);
}

fn cases(device: &Device) {
    let shape = Shape::new(3, 7, 1031).unwrap();
    let spec = LossSpec::builder().keywords([5i64, 17, 17]).build().unwrap();
    check::<f32>(device, shape, &spec, false, 1.0);
    check::<f32>(device, shape, &spec, true, 1.0);
    check::<f32>(device, shape, &spec, false, 0.25);
    check::<bf16>(device, shape, &spec, false, 1.0);
    check::<fused_weighted_loss::f16>(device, shape, &spec, true, 2.0);
    let valid = LossSpec::builder().row_mean(RowMean::ValidTokens).build().unwrap();
    check::<f32>(device, shape, &valid, true, 1.0);
    let opts = LossSpec::builder().keywords([5i64]).z_loss(1e-3).label_smoothing(0.1).softcap(20.0).build().unwrap();
    check::<f32>(device, shape, &opts, true, 0.5);
    check::<bf16>(device, shape, &opts, false, 1.0);
    check_token_weights(device, shape, &opts);
    f16_under_a_loss_scale(device);
}

/// float16 logits under a loss scale of 65536: the gradient is the float64 one times the scale,
/// rounded once to float16 (what a float16 gradient can best be), where one rounded to float16
/// at scale 1 in the forward would have lost its small entries.
fn f16_under_a_loss_scale(device: &Device) {
    use fused_weighted_loss::f16;
    let shape = Shape::new(2, 16, 4000).unwrap();
    let spec = LossSpec::default();
    let (logits, ids) = random_inputs::<f16>(31, shape, 4.0);
    let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
    let scale = 65536.0;
    let ideal: Vec<f16> = r.grad.iter().map(|&x| f16::from_f64(x * scale)).collect();
    let at_one = r.grad.iter().zip(&ideal).filter(|(&x, &i)| f16::from_f64(x) == f16::ZERO && i != f16::ZERO).count();
    assert!(at_one > 1000, "the case must have entries a float16 gradient at scale 1 loses ({at_one})");
    let dims = (shape.batch(), shape.seq(), shape.vocab());
    let t_logits = Var::from_tensor(&Tensor::from_vec(logits, dims, device).unwrap()).unwrap();
    let t_ids = Tensor::from_vec(ids, (shape.batch(), shape.seq()), device).unwrap();
    let loss = weighted_loss(t_logits.as_tensor(), &t_ids, None, &spec).unwrap();
    let grads = (loss * scale).unwrap().backward().unwrap();
    let g = grads.get(&t_logits).expect("gradient of the logits");
    assert_eq!(g.dtype(), DType::F16);
    let g: Vec<f16> = g.flatten_all().unwrap().to_vec1().unwrap();
    let lost = g.iter().zip(&ideal).filter(|(&x, &i)| x == f16::ZERO && i != f16::ZERO).count();
    assert_eq!(lost, 0, "entries rounded to 0 that the scaled gradient keeps");
    let want: Vec<f64> = r.grad.iter().map(|x| x * scale).collect();
    let e = rel_err(&g.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), &want);
    assert!(e <= 1e-3, "gradient rel err {e:e}");
}

/// The op with per-token weights (and the spec's options) against the reference.
fn check_token_weights(device: &Device, shape: Shape, spec: &LossSpec) {
    let (logits, ids) = random_inputs::<f32>(9, shape, 3.0);
    let w: Vec<f32> = (0..shape.rows()).map(|i| (i % 4) as f32 * 0.5).collect();
    let dims = (shape.batch(), shape.seq(), shape.vocab());
    let t_logits = Var::from_tensor(&Tensor::from_vec(logits.clone(), dims, device).unwrap()).unwrap();
    let t_ids = Tensor::from_vec(ids.clone(), (shape.batch(), shape.seq()), device).unwrap();
    let t_w = Tensor::from_vec(w.clone(), (shape.batch(), shape.seq()), device).unwrap();
    let loss = weighted_loss_with_token_weights(t_logits.as_tensor(), &t_ids, None, Some(&t_w), spec).unwrap();
    let r = reference(spec, shape, &logits, Tokens::new(&ids).with_token_weights(&w)).unwrap();
    let l = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(rel(l, r.loss) <= 1e-5, "loss {l} vs reference {}", r.loss);
    let grads = loss.backward().unwrap();
    let g: Vec<f32> = grads.get(&t_logits).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(rel_err(&g, &r.grad) <= 1e-5);
    // weights of the wrong shape or dtype are errors
    let bad = Tensor::from_vec(w[..shape.batch()].to_vec(), (shape.batch(), 1), device).unwrap();
    assert!(weighted_loss_with_token_weights(t_logits.as_tensor(), &t_ids, None, Some(&bad), spec).is_err());
    let f64w = t_w.to_dtype(DType::F64).unwrap();
    assert!(weighted_loss_with_token_weights(t_logits.as_tensor(), &t_ids, None, Some(&f64w), spec).is_err());
}

#[test]
fn candle_cpu_loss_and_backward() {
    cases(&Device::Cpu);
}

/// The op inside a graph: logits from `hidden · W` (not a leaf), two losses of them with
/// different specs, scaled and summed; `d W` from `backward()` against `hiddenᵀ · (a1·G1 + a2·G2)`
/// with the float64 reference's gradients on the logits as candle computed them. Random shapes
/// and options; seeds: `FWL_TEST_CASES` (default 20; 5 000 passed).
#[test]
fn candle_two_losses_of_a_matmul_in_one_graph() {
    use fused_weighted_loss::synthetic::{self, Rng};
    let dev = Device::Cpu;
    for seed in 0..u64::from(common::cases(20)) {
        let mut rng = Rng::new(seed ^ 0x3);
        let (b, t) = (1 + rng.below(3) as usize, 2 + rng.below(6) as usize);
        let (h, v) = (1 + rng.below(40) as usize, 2 + rng.below(3000) as usize);
        let shape = Shape::new(b, t, v).unwrap();
        let hidden: Vec<f32> = synthetic::logits(seed, b * t * h, 1.0);
        let ids = synthetic::ids::<u32>(seed, b * t, v);
        let w =
            Var::from_tensor(&Tensor::from_vec(synthetic::logits::<f32>(seed + 1, h * v, 1.0), (h, v), &dev).unwrap())
                .unwrap();
        let hidden_t = Tensor::from_vec(hidden.clone(), (b * t, h), &dev).unwrap();
        let logits = hidden_t.matmul(w.as_tensor()).unwrap().reshape((b, t, v)).unwrap();
        let t_ids = Tensor::from_vec(ids.clone(), (b, t), &dev).unwrap();
        let mut s1 = LossSpec::builder().keywords([0i64]);
        if rng.below(2) == 0 {
            s1 = s1.z_loss(1e-3);
        }
        if rng.below(2) == 0 {
            s1 = s1.softcap(10.0);
        }
        let s1 = s1.build().unwrap();
        let s2 = LossSpec::builder().label_smoothing(0.2).row_mean(RowMean::ValidTokens).build().unwrap();
        let (a1, a2) = (0.5 + rng.below(4) as f64, 0.25 * rng.below(5) as f64);
        let l1 = weighted_loss(&logits, &t_ids, None, &s1).unwrap();
        let l2 = weighted_loss(&logits, &t_ids, None, &s2).unwrap();
        let total = ((l1 * a1).unwrap() + (l2 * a2).unwrap()).unwrap();
        let dw: Vec<f32> = total.backward().unwrap().get(&w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let z: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let (r1, r2) = (
            reference(&s1, shape, &z, Tokens::new(&ids)).unwrap(),
            reference(&s2, shape, &z, Tokens::new(&ids)).unwrap(),
        );
        let mut want = vec![0f64; h * v];
        for r in 0..b * t {
            for k in 0..h {
                let x = f64::from(hidden[r * h + k]);
                for j in 0..v {
                    want[k * v + j] += x * (a1 * r1.grad[r * v + j] + a2 * r2.grad[r * v + j]);
                }
            }
        }
        let what = format!("seed {seed}: [{b}, {t}] H {h} V {v}, {a1}·{s1:?} + {a2}·{s2:?}");
        let l = f64::from(total.to_scalar::<f32>().unwrap());
        assert!(rel(l, a1 * r1.loss + a2 * r2.loss) <= 1e-5, "{what}: loss {l}");
        let e = rel_err(&dw, &want);
        assert!(e <= 1e-5, "{what}: d W rel err {e:e}");
    }
}

#[test]
fn candle_loss_without_tracked_logits_has_no_backward() {
    let shape = Shape::new(2, 3, 50).unwrap();
    let (logits, ids) = random_inputs::<f32>(3, shape, 1.0);
    let t = Tensor::from_vec(logits.clone(), (2, 3, 50), &Device::Cpu).unwrap();
    let i = Tensor::from_vec(ids.clone(), (2, 3), &Device::Cpu).unwrap();
    let loss = weighted_loss(&t, &i, None, &LossSpec::default()).unwrap();
    let r = reference(&LossSpec::default(), shape, &logits, Tokens::new(&ids)).unwrap();
    assert!(rel(loss.to_scalar::<f32>().unwrap() as f64, r.loss) <= 1e-5);
    assert!(!loss.track_op());
}

#[test]
fn candle_bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let logits = Tensor::zeros((2, 3, 5), DType::F32, &dev).unwrap().affine(1.0, 0.5).unwrap();
    let ids = Tensor::new(&[[0u32, 1, 2], [3, 4, 0]], &dev).unwrap();
    let spec = LossSpec::default();
    let flat = logits.flatten_all().unwrap();
    assert!(weighted_loss(&flat, &ids, None, &spec).is_err(), "rank 1 logits");
    let short = Tensor::new(&[[0u32, 1], [3, 4]], &dev).unwrap();
    assert!(weighted_loss(&logits, &short, None, &spec).is_err(), "shape mismatch");
    let bad = Tensor::new(&[[0u32, 1, 9], [3, 4, 0]], &dev).unwrap();
    let e = weighted_loss(&logits, &bad, None, &spec).unwrap_err().to_string();
    assert!(e.contains("outside [0, 5)"), "{e}");
    let f64_logits = logits.to_dtype(DType::F64).unwrap();
    assert!(weighted_loss(&f64_logits, &ids, None, &spec).is_err(), "f64 logits");
    let float_ids = ids.to_dtype(DType::F32).unwrap();
    assert!(weighted_loss(&logits, &float_ids, None, &spec).is_err(), "float ids");
    let lab_i64 = ids.to_dtype(DType::I64).unwrap();
    assert!(weighted_loss(&logits, &ids, Some(&lab_i64), &spec).is_err(), "labels of another dtype");
    // the backward multiplies by autograd's upstream gradient: a spec's grad_scale multiplied
    // the gradient a second time (4x here) while the loss stayed unscaled
    let scaled = LossSpec::builder().grad_scale(4.0).build().unwrap();
    let e = weighted_loss(&logits, &ids, None, &scaled).unwrap_err().to_string();
    assert!(e.contains("grad_scale"), "{e}");
}

#[test]
fn candle_bf16_gradient_scaled_in_f32_and_rounded_once() {
    bf16_scaled_once(&Device::Cpu);
}

/// candle's affine rounds its factor to bfloat16 first (1/3 -> 0.33398, every element 0.2%
/// high): the kept bfloat16 gradient is scaled in f32 and rounded once, on the CPU as on CUDA.
fn bf16_scaled_once(device: &Device) {
    let shape = Shape::new(2, 8, 300).unwrap();
    let (logits, ids) = random_inputs::<bf16>(37, shape, 2.0);
    let ids_t = Tensor::from_vec(ids, (2, 8), device).unwrap();
    let grad_at = |scale: f64| -> Vec<bf16> {
        let x = Var::from_tensor(&Tensor::from_vec(logits.clone(), (2, 8, 300), device).unwrap()).unwrap();
        let loss = weighted_loss(x.as_tensor(), &ids_t, None, &LossSpec::default()).unwrap();
        let g = (loss * scale).unwrap().backward().unwrap().remove(x.as_tensor()).unwrap();
        g.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (one, third) = (grad_at(1.0), grad_at(1.0 / 3.0));
    let want: Vec<bf16> = one.iter().map(|g| bf16::from_f32(g.to_f32() * (1.0 / 3.0) as f32)).collect();
    assert!(one.iter().filter(|g| g.to_f32() != 0.0).count() > 1000, "the case needs nonzero entries");
    let differ = third.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} entries are not bf16(g * s) of the unscaled gradient", want.len());
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn candle_strided_inputs_are_copied_and_pass_the_gradient_back() {
    let dev = Device::Cpu;
    let shape = Shape::new(3, 6, 50).unwrap();
    let (logits, ids) = random_inputs::<f32>(21, shape, 2.0);
    let spec = LossSpec::builder().keywords([ids[4]]).build().unwrap();
    let ids_t = Tensor::from_vec(ids.clone(), (3, 6), &dev).unwrap();
    let plain = Var::from_tensor(&Tensor::from_vec(logits, (3, 6, 50), &dev).unwrap()).unwrap();
    // the same logits stored as [B, V, T] and seen through a transpose; the ids likewise
    let stored = Var::from_tensor(&plain.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap()).unwrap();
    let view = stored.as_tensor().transpose(1, 2).unwrap();
    let ids_view = ids_t.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!view.is_contiguous() && !ids_view.is_contiguous());
    let a = weighted_loss(plain.as_tensor(), &ids_t, None, &spec).unwrap();
    let b = weighted_loss(&view, &ids_view, Some(&ids_view), &spec).unwrap();
    assert_eq!(a.to_scalar::<f32>().unwrap().to_bits(), b.to_scalar::<f32>().unwrap().to_bits());
    let (ga, gb) = (a.backward().unwrap(), b.backward().unwrap());
    let gb = gb.get(&stored).expect("the gradient reaches the stored tensor").transpose(1, 2).unwrap();
    assert_eq!(to_vec(ga.get(&plain).unwrap()), to_vec(&gb), "the same gradient, back through the transpose");
    // a narrow along T (a view with an offset and strides) and a broadcast are taken too
    let wide =
        Tensor::from_vec(random_inputs::<f32>(22, Shape::new(3, 9, 50).unwrap(), 2.0).0, (3, 9, 50), &dev).unwrap();
    let narrow = wide.narrow(1, 2, 6).unwrap();
    let same = weighted_loss(&narrow.contiguous().unwrap(), &ids_t, None, &spec).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(weighted_loss(&narrow, &ids_t, None, &spec).unwrap().to_scalar::<f32>().unwrap(), same);
    let row = Tensor::from_vec(fused_weighted_loss::synthetic::logits::<f32>(23, 50, 2.0), (1, 1, 50), &dev).unwrap();
    let broad = row.broadcast_as((3, 6, 50)).unwrap();
    let same = weighted_loss(&broad.contiguous().unwrap(), &ids_t, None, &spec).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(weighted_loss(&broad, &ids_t, None, &spec).unwrap().to_scalar::<f32>().unwrap(), same);
}

#[test]
fn candle_a_second_backward_through_one_forward_is_an_error() {
    let shape = Shape::new(2, 3, 50).unwrap();
    let (logits, ids) = random_inputs::<f32>(24, shape, 1.0);
    let x = Var::from_tensor(&Tensor::from_vec(logits, (2, 3, 50), &Device::Cpu).unwrap()).unwrap();
    let ids = Tensor::from_vec(ids, (2, 3), &Device::Cpu).unwrap();
    let loss = weighted_loss(x.as_tensor(), &ids, None, &LossSpec::default()).unwrap();
    assert!(loss.backward().unwrap().get(&x).is_some());
    let e = loss.backward().unwrap_err().to_string();
    assert!(e.contains("no gradient kept"), "{e}");
}

#[test]
fn candle_cuda_loss_and_backward() {
    if !common::gpu_or_skip("candle_cuda_loss_and_backward") {
        return;
    }
    if !cfg!(feature = "candle-cuda") {
        if std::env::var("FWL_REQUIRE_CUDA").as_deref() == Ok("1") {
            panic!("candle_cuda_loss_and_backward: FWL_REQUIRE_CUDA=1 but built without `candle-cuda`");
        }
        eprintln!("candle_cuda_loss_and_backward: skipped, built without the `candle-cuda` feature");
        return;
    }
    cases(&Device::new_cuda(0).unwrap());
    #[cfg(feature = "candle-cuda")]
    kernels_load_once_across_steps(&Device::new_cuda(0).unwrap());
    bf16_scaled_once(&Device::new_cuda(0).unwrap());
}

/// Steps of the op, each forward's instance dropped before the next: the kernels stay loaded
/// (each forward made a new instance, and the module was unloaded and loaded again whenever the
/// previous step's had been dropped).
#[cfg(feature = "candle-cuda")]
fn kernels_load_once_across_steps(device: &Device) {
    use fused_weighted_loss::cuda::CudaLoss;
    let shape = Shape::new(2, 5, 300).unwrap();
    let (logits, ids) = random_inputs::<f32>(31, shape, 2.0);
    let step = |track: bool| {
        let t = Tensor::from_vec(logits.clone(), (2, 5, 300), device).unwrap();
        let i = Tensor::from_vec(ids.clone(), (2, 5), device).unwrap();
        let loss = if track {
            let x = Var::from_tensor(&t).unwrap();
            let loss = weighted_loss(x.as_tensor(), &i, None, &LossSpec::default()).unwrap();
            let g = loss.backward().unwrap().remove(x.as_tensor()).unwrap();
            assert!(g.sum_all().unwrap().to_scalar::<f32>().unwrap().is_finite());
            loss
        } else {
            weighted_loss(&t, &i, None, &LossSpec::default()).unwrap()
        };
        loss.to_scalar::<f32>().unwrap()
    };
    let first = step(true);
    let loads = CudaLoss::module_loads();
    for track in [true, false, true, false] {
        let l = step(track);
        assert!(rel(l as f64, first as f64) <= 1e-6, "the same inputs: {l} against {first}");
    }
    assert_eq!(CudaLoss::module_loads(), loads, "the kernels were loaded again between steps");
}
