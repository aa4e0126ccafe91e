//! `candle::weighted_linear_loss` (forward + backward through candle's autograd) against the
//! float64 reference and against the logits path through candle (`matmul` + `weighted_loss`).
#![cfg(feature = "candle")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::linear::{expected, Case};
use fused_weighted_loss::candle::{weighted_linear_loss, weighted_loss};
use fused_weighted_loss::reference::rel_err;
use fused_weighted_loss::{bf16, Logit, LossSpec};

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Loss and gradients through candle for one case, checked against the reference; `scale`
/// multiplies the loss before the backward.
fn check<L: Logit + candle_core::WithDType>(device: &Device, c: &Case<L>, spec: &LossSpec, scale: f64) {
    let s = c.shape;
    let e = expected(spec, c);
    let (grad_tol, loss_tol) = common::tolerances(<L as Logit>::DTYPE);
    let hidden =
        Var::from_tensor(&Tensor::from_vec(c.hidden.clone(), (s.batch(), s.seq(), s.hidden()), device).unwrap())
            .unwrap();
    let weight =
        Var::from_tensor(&Tensor::from_vec(c.weight.clone(), (s.vocab(), s.hidden()), device).unwrap()).unwrap();
    let bias =
        c.bias.as_ref().map(|b| Var::from_tensor(&Tensor::from_vec(b.clone(), s.vocab(), device).unwrap()).unwrap());
    let ids: Vec<u32> = c.ids.iter().map(|&x| x as u32).collect();
    let ids = Tensor::from_vec(ids, (s.batch(), s.seq()), device).unwrap();
    let labels = c.labels.as_ref().map(|l| Tensor::from_vec(l.clone(), (s.batch(), s.seq()), device).unwrap());
    let loss = weighted_linear_loss(
        hidden.as_tensor(),
        weight.as_tensor(),
        bias.as_ref().map(|b| b.as_tensor()),
        &ids,
        labels.as_ref(),
        spec,
    )
    .unwrap();
    assert_eq!(loss.dims(), &[] as &[usize]);
    let l = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(common::rel(l, e.out.loss) <= loss_tol.max(1e-6), "loss {l} vs {}", e.out.loss);
    let grads = loss.affine(scale, 0.0).unwrap().backward().unwrap();
    let scaled = |g: &[f64]| g.iter().map(|x| x * scale).collect::<Vec<_>>();
    let gh = grads.get(&hidden).expect("d hidden");
    assert_eq!(gh.dims(), hidden.dims());
    let err = rel_err(&to_vec(gh), &scaled(&e.dh));
    assert!(err <= grad_tol, "d hidden rel err {err:e}");
    let err = rel_err(&to_vec(grads.get(&weight).expect("d weight")), &scaled(&e.dw));
    assert!(err <= grad_tol, "d weight rel err {err:e}");
    if let Some(b) = &bias {
        let err = rel_err(&to_vec(grads.get(b).expect("d bias")), &scaled(&e.db));
        assert!(err <= grad_tol, "d bias rel err {err:e}");
    }
}

fn cases(device: &Device) {
    let spec = LossSpec::builder().keywords([1i64, 4]).build().unwrap();
    check(device, &Case::<f32>::random(1, 2, 5, 8, 11, false), &spec, 1.0);
    check(device, &Case::<f32>::random(2, 3, 7, 33, 301, true), &spec, 2.5);
    check(device, &Case::<bf16>::random(3, 2, 9, 40, 515, true), &spec, 1.0);
    let mut c = Case::<f32>::random(4, 3, 6, 16, 97, true);
    let mut labels = c.ids.clone();
    labels[2] = -100;
    labels[7..12].fill(-100);
    c.labels = Some(labels);
    check(device, &c, &LossSpec::builder().ignore_index(-100).build().unwrap(), 1.0);
    check(device, &Case::<fused_weighted_loss::f16>::random(5, 2, 8, 32, 2000, true), &spec, 65536.0);
    f16_under_a_loss_scale(device);
}

/// float16 inputs under a loss scale of 65536: `d weight` keeps the entries a float16 gradient
/// rounded at scale 1 in the forward would lose (the op keeps float32 gradients until the
/// backward).
fn f16_under_a_loss_scale(device: &Device) {
    use fused_weighted_loss::f16;
    let c = Case::<f16>::random(6, 4, 16, 16, 3000, false);
    let spec = LossSpec::default();
    let e = expected(&spec, &c);
    let scale = 65536.0;
    let ideal: Vec<f16> = e.dw.iter().map(|&x| f16::from_f64(x * scale)).collect();
    let at_one = e.dw.iter().zip(&ideal).filter(|(&x, &i)| f16::from_f64(x) == f16::ZERO && i != f16::ZERO).count();
    assert!(at_one > 10, "the case must have entries a float16 gradient at scale 1 loses ({at_one})");
    let s = c.shape;
    let hidden = Tensor::from_vec(c.hidden.clone(), (s.batch(), s.seq(), s.hidden()), device).unwrap();
    let weight =
        Var::from_tensor(&Tensor::from_vec(c.weight.clone(), (s.vocab(), s.hidden()), device).unwrap()).unwrap();
    let ids: Vec<u32> = c.ids.iter().map(|&x| x as u32).collect();
    let ids = Tensor::from_vec(ids, (s.batch(), s.seq()), device).unwrap();
    let loss = weighted_linear_loss(&hidden, weight.as_tensor(), None, &ids, None, &spec).unwrap();
    let grads = loss.affine(scale, 0.0).unwrap().backward().unwrap();
    let dw = grads.get(&weight).expect("d weight");
    assert_eq!(dw.dtype(), DType::F16);
    let dw: Vec<f16> = dw.flatten_all().unwrap().to_vec1().unwrap();
    let lost = dw.iter().zip(&ideal).filter(|(&x, &i)| x == f16::ZERO && i != f16::ZERO).count();
    assert_eq!(lost, 0, "d weight entries rounded to 0 that the scaled gradient keeps");
}

#[test]
fn candle_linear_cpu_loss_and_backward() {
    cases(&Device::Cpu);
}

#[test]
fn candle_linear_matches_the_logits_path() {
    // hidden·Wᵀ + b through candle's matmul and autograd, then the logits op: same loss and
    // gradients (f32) as the fused op
    let c = Case::<f32>::random(6, 2, 6, 12, 50, true);
    let s = c.shape;
    let dev = Device::Cpu;
    let spec = LossSpec::builder().keywords([c.ids[3]]).build().unwrap();
    let hidden =
        Var::from_tensor(&Tensor::from_vec(c.hidden.clone(), (s.batch(), s.seq(), s.hidden()), &dev).unwrap()).unwrap();
    let weight = Var::from_tensor(&Tensor::from_vec(c.weight.clone(), (s.vocab(), s.hidden()), &dev).unwrap()).unwrap();
    let bias = Var::from_tensor(&Tensor::from_vec(c.bias.clone().unwrap(), s.vocab(), &dev).unwrap()).unwrap();
    let ids = Tensor::from_vec(c.ids.clone(), (s.batch(), s.seq()), &dev).unwrap();
    let fused = weighted_linear_loss(hidden.as_tensor(), weight.as_tensor(), Some(bias.as_tensor()), &ids, None, &spec)
        .unwrap();
    let logits = hidden
        .as_tensor()
        .broadcast_matmul(&weight.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(bias.as_tensor())
        .unwrap();
    let plain = weighted_loss(&logits, &ids, None, &spec).unwrap();
    let (a, b) = (fused.to_scalar::<f32>().unwrap() as f64, plain.to_scalar::<f32>().unwrap() as f64);
    assert!(common::rel(a, b) <= 1e-5, "{a} vs {b}");
    let (ga, gb) = (fused.backward().unwrap(), plain.backward().unwrap());
    for (name, v) in [("hidden", &hidden), ("weight", &weight), ("bias", &bias)] {
        let (x, y) = (to_vec(ga.get(v).unwrap()), to_vec(gb.get(v).unwrap()));
        let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        assert!(rel_err(&x, &y64) <= 1e-5, "d {name}: {:e}", rel_err(&x, &y64));
    }
}

#[test]
fn candle_linear_strided_inputs_are_copied() {
    // the weight stored as [H, V] and seen through `.t()`, the hidden states narrowed along T
    let c = Case::<f32>::random(8, 2, 6, 12, 50, true);
    let s = c.shape;
    let dev = Device::Cpu;
    let spec = LossSpec::builder().keywords([c.ids[2]]).build().unwrap();
    let ids = Tensor::from_vec(c.ids.clone(), (s.batch(), s.seq()), &dev).unwrap();
    let hidden = Tensor::from_vec(c.hidden.clone(), (s.batch(), s.seq(), s.hidden()), &dev).unwrap();
    let weight = Var::from_tensor(&Tensor::from_vec(c.weight.clone(), (s.vocab(), s.hidden()), &dev).unwrap()).unwrap();
    let stored = Var::from_tensor(&weight.as_tensor().t().unwrap().contiguous().unwrap()).unwrap();
    let padded = Tensor::cat(&[&hidden, &hidden.narrow(1, 0, 2).unwrap()], 1).unwrap();
    let (h_view, w_view) = (padded.narrow(1, 0, s.seq()).unwrap(), stored.as_tensor().t().unwrap());
    assert!(!h_view.is_contiguous() && !w_view.is_contiguous());
    let bias = Tensor::from_vec(c.bias.clone().unwrap(), s.vocab(), &dev).unwrap();
    let a = weighted_linear_loss(&hidden, weight.as_tensor(), Some(&bias), &ids, None, &spec).unwrap();
    let b = weighted_linear_loss(&h_view, &w_view, Some(&bias), &ids, None, &spec).unwrap();
    assert_eq!(a.to_scalar::<f32>().unwrap().to_bits(), b.to_scalar::<f32>().unwrap().to_bits());
    let (ga, gb) = (a.backward().unwrap(), b.backward().unwrap());
    let gb = gb.get(&stored).expect("d weight reaches the stored tensor").t().unwrap();
    assert_eq!(to_vec(ga.get(&weight).unwrap()), to_vec(&gb), "the same d weight, back through `.t()`");
}

#[test]
fn candle_linear_untracked_inputs_get_no_gradient() {
    // a frozen head: only d hidden
    let c = Case::<f32>::random(7, 2, 4, 6, 20, false);
    let s = c.shape;
    let dev = Device::Cpu;
    let hidden = Var::from_tensor(&Tensor::from_vec(c.hidden.clone(), (s.rows(), s.hidden()), &dev).unwrap()).unwrap();
    let weight = Tensor::from_vec(c.weight.clone(), (s.vocab(), s.hidden()), &dev).unwrap();
    let ids =
        Tensor::from_vec(c.ids.iter().map(|&x| x as i32).collect::<Vec<_>>(), (s.batch(), s.seq()), &dev).unwrap();
    let spec = LossSpec::default();
    let loss = weighted_linear_loss(hidden.as_tensor(), &weight, None, &ids, None, &spec).unwrap();
    let grads = loss.backward().unwrap();
    let e = expected(&spec, &c);
    let err = rel_err(&to_vec(grads.get(&hidden).unwrap()), &e.dh);
    assert!(err <= 1e-5, "d hidden ([N, H] input) rel err {err:e}");
    assert!(grads.get(&weight).is_none());
}

#[test]
fn candle_linear_bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let spec = LossSpec::default();
    let h = Tensor::zeros((2, 5, 8), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((11, 8), DType::F32, &dev).unwrap();
    let ids = Tensor::zeros((2, 5), DType::U32, &dev).unwrap();
    let w_bad = Tensor::zeros((11, 7), DType::F32, &dev).unwrap();
    assert!(weighted_linear_loss(&h, &w_bad, None, &ids, None, &spec).is_err(), "hidden sizes differ");
    let b_bad = Tensor::zeros(10, DType::F32, &dev).unwrap();
    assert!(weighted_linear_loss(&h, &w, Some(&b_bad), &ids, None, &spec).is_err(), "bias of the wrong size");
    let w16 = Tensor::zeros((11, 8), DType::BF16, &dev).unwrap();
    assert!(weighted_linear_loss(&h, &w16, None, &ids, None, &spec).is_err(), "mixed dtypes");
    let ids_bad = Tensor::full(11u32, (2, 5), &dev).unwrap();
    assert!(weighted_linear_loss(&h, &w, None, &ids_bad, None, &spec).is_err(), "id outside the vocabulary");
    // ids and labels are integers (an id of 1.7 was read as 1)
    let floats = Tensor::full(1.7f32, (2, 5), &dev).unwrap();
    let e = weighted_linear_loss(&h, &w, None, &floats, None, &spec).unwrap_err().to_string();
    assert!(e.contains("ids must be u32, i64 or i32"), "{e}");
    let e = weighted_linear_loss(&h, &w, None, &ids, Some(&floats), &spec).unwrap_err().to_string();
    assert!(e.contains("labels must be u32, i64 or i32"), "{e}");
    // the gradient's scale comes from autograd: a spec's grad_scale multiplied it a second time
    let scaled = LossSpec::builder().grad_scale(0.25).build().unwrap();
    let e = weighted_linear_loss(&h, &w, None, &ids, None, &scaled).unwrap_err().to_string();
    assert!(e.contains("grad_scale"), "{e}");
}

#[test]
fn candle_linear_bf16_d_hidden_scaled_in_f32_and_rounded_once() {
    // bfloat16 `d hidden` is kept in bfloat16; under a scaled loss it is multiplied in f32 and
    // rounded once (candle's affine rounded the factor 1/3 to bfloat16 first)
    let dev = Device::Cpu;
    let c = Case::<bf16>::random(12, 2, 9, 24, 400, false);
    let s = c.shape;
    let ids: Vec<u32> = c.ids.iter().map(|&x| x as u32).collect();
    let ids = Tensor::from_vec(ids, (s.batch(), s.seq()), &dev).unwrap();
    let weight = Tensor::from_vec(c.weight.clone(), (s.vocab(), s.hidden()), &dev).unwrap();
    let d_hidden = |scale: f64| -> Vec<bf16> {
        let h = Tensor::from_vec(c.hidden.clone(), (s.batch(), s.seq(), s.hidden()), &dev).unwrap();
        let h = Var::from_tensor(&h).unwrap();
        let loss = weighted_linear_loss(h.as_tensor(), &weight, None, &ids, None, &LossSpec::default()).unwrap();
        let g = (loss * scale).unwrap().backward().unwrap().remove(h.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::BF16);
        g.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (one, third) = (d_hidden(1.0), d_hidden(1.0 / 3.0));
    let want: Vec<bf16> = one.iter().map(|g| bf16::from_f32(g.to_f32() * (1.0 / 3.0) as f32)).collect();
    assert!(one.iter().filter(|g| g.to_f32() != 0.0).count() > 100, "the case needs nonzero entries");
    let differ = third.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} entries are not bf16(g * s) of the unscaled gradient", want.len());
}

/// bfloat16 inputs over many chunks of rows: `d weight` and `d bias` add up one product per
/// chunk, kept in float32 and rounded once (rounded to bfloat16 after each of 42 chunks, the
/// bias gradient came out 2.6e-2 off, past the 1.5e-2 tolerance), against the host API's float32
/// gradients of the same call.
#[test]
fn candle_linear_bf16_sums_its_chunks_in_f32() {
    use fused_weighted_loss::{Backend, Chunking, Grad, LinearGrads};
    let dev = Device::Cpu;
    let c = Case::<bf16>::random(11, 16, 258, 32, 32000, true);
    let s = c.shape;
    // (the CPU backend's chunks: with `Backend::Auto` a CUDA build on a machine with a GPU runs
    // the host API there, in CUDA's larger chunks, 5 for this case)
    let spec = LossSpec::builder().keywords([3i64]).backend(Backend::Cpu).build().unwrap();
    let (mut dw, mut db) = (vec![0f32; s.weight_len()], vec![0f32; s.vocab()]);
    let grads = LinearGrads::new().weight(Grad::IntoF32(&mut dw)).bias(Grad::IntoF32(&mut db));
    let host = spec.linear_loss_and_grad(s, c.inputs(), c.tokens(), grads, Chunking::Auto).unwrap();
    assert!(host.chunks >= 20, "the case must take many chunks ({})", host.chunks);
    let hidden = Tensor::from_vec(c.hidden.clone(), (s.batch(), s.seq(), s.hidden()), &dev).unwrap();
    let weight = Var::from_tensor(&Tensor::from_vec(c.weight.clone(), (s.vocab(), s.hidden()), &dev).unwrap()).unwrap();
    let bias = Var::from_tensor(&Tensor::from_vec(c.bias.clone().unwrap(), s.vocab(), &dev).unwrap()).unwrap();
    let ids: Vec<u32> = c.ids.iter().map(|&x| x as u32).collect();
    let ids = Tensor::from_vec(ids, (s.batch(), s.seq()), &dev).unwrap();
    let loss = weighted_linear_loss(&hidden, weight.as_tensor(), Some(bias.as_tensor()), &ids, None, &spec).unwrap();
    let grads = loss.backward().unwrap();
    let (gw, gb) = (grads.get(&weight).expect("d weight"), grads.get(&bias).expect("d bias"));
    assert_eq!((gw.dtype(), gb.dtype()), (DType::BF16, DType::BF16));
    // one rounding to bfloat16 (2^-9 relative at most per entry)
    for (what, got, want) in [("d weight", to_vec(gw), &dw), ("d bias", to_vec(gb), &db)] {
        let err = rel_err(&got, want);
        assert!(err <= 3e-3, "{what}: rel err {err:e} against the float32 sums");
    }
}

#[test]
fn candle_linear_cuda_loss_and_backward() {
    if !common::gpu_or_skip("candle_linear_cuda_loss_and_backward") {
        return;
    }
    if !cfg!(feature = "candle-cuda") {
        if std::env::var("FWL_REQUIRE_CUDA").as_deref() == Ok("1") {
            panic!("candle_linear_cuda_loss_and_backward: FWL_REQUIRE_CUDA=1 but built without `candle-cuda`");
        }
        eprintln!("candle_linear_cuda_loss_and_backward: skipped, built without the `candle-cuda` feature");
        return;
    }
    cases(&Device::new_cuda(0).unwrap());
}
