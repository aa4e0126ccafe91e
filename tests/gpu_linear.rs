//! The fused linear path on CUDA (cuBLAS products, the rows kernel on each chunk) against the
//! float64 reference, through the host API and the device API. Without a GPU every test prints
//! that it skipped; with `FWL_REQUIRE_CUDA=1` and no GPU every test fails.

mod common;

use common::gpu_or_skip;
use common::linear::{check, expected, Case};
use fused_weighted_loss::{bf16, f16, Backend, Chunking, Grad, LinearGrads, Logit, LossSpec, Reduction, RowMean};

fn cuda(spec: LossSpec) -> LossSpec {
    spec.to_builder().backend(Backend::Cuda).build().unwrap()
}

const CHUNKINGS: [Chunking; 5] =
    [Chunking::Rows(1), Chunking::Rows(3), Chunking::Rows(1000), Chunking::Budget(40_000), Chunking::Auto];

fn all_chunkings<L: Logit>(spec: &LossSpec, c: &Case<L>, what: &str) {
    let e = expected(spec, c);
    let spec = cuda(spec.clone());
    for ch in CHUNKINGS {
        check(&spec, c, &e, ch, what);
    }
}

#[test]
fn gpu_linear_random_shapes_all_dtypes() {
    if !gpu_or_skip("gpu_linear_random_shapes_all_dtypes") {
        return;
    }
    // odd H and V (unaligned rows for the rows kernel and cuBLAS), V = 1, and 16-byte multiples
    let shapes = [(1, 2, 1, 1), (2, 3, 5, 1), (2, 5, 7, 33), (3, 4, 17, 257), (2, 9, 64, 1000), (1, 17, 33, 2049)];
    for (i, &(b, t, h, v)) in shapes.iter().enumerate() {
        let spec = LossSpec::builder().keywords([0i64, (v as i64 - 1) / 2]).build().unwrap();
        let seed = 200 + i as u64;
        all_chunkings(&spec, &Case::<f32>::random(seed, b, t, h, v, i % 2 == 0), "gpu f32");
        all_chunkings(&spec, &Case::<bf16>::random(seed, b, t, h, v, i % 2 == 1), "gpu bf16");
        all_chunkings(&spec, &Case::<f16>::random(seed, b, t, h, v, true), "gpu f16");
    }
}

#[test]
fn gpu_linear_loss_options_and_token_weights() {
    if !gpu_or_skip("gpu_linear_loss_options_and_token_weights") {
        return;
    }
    let spec = LossSpec::builder().keywords([2i64]).z_loss(1e-3).label_smoothing(0.1).softcap(3.0).build().unwrap();
    let mut c = Case::<f32>::random(270, 3, 6, 19, 301, true);
    c.token_weights = Some((0..c.shape.rows()).map(|i| (i % 4) as f32 * 0.5).collect());
    let mut labels = c.ids.clone();
    labels[4] = -100;
    c.labels = Some(labels);
    all_chunkings(&spec, &c, "gpu options f32");
    let mut c = Case::<bf16>::random(271, 2, 5, 24, 515, false);
    c.token_weights = Some((0..c.shape.rows()).map(|i| 0.25 + (i % 3) as f32).collect());
    all_chunkings(&spec, &c, "gpu options bf16");
}

#[test]
fn gpu_linear_ignore_index_and_reductions() {
    if !gpu_or_skip("gpu_linear_ignore_index_and_reductions") {
        return;
    }
    let mut c = Case::<bf16>::random(3, 3, 7, 24, 97, true);
    let mut labels = c.ids.clone();
    for i in [1usize, 2, 5, 9, 10, 11] {
        labels[i] = -100;
    }
    labels[14..21].fill(-100);
    c.labels = Some(labels);
    for row_mean in [RowMean::AllPositions, RowMean::ValidTokens] {
        for reduction in [Reduction::Mean, Reduction::WeightedMean, Reduction::Sum] {
            let spec = LossSpec::builder()
                .keywords([c.ids[0], c.ids[4]])
                .row_mean(row_mean)
                .reduction(reduction)
                .grad_scale(-0.75)
                .build()
                .unwrap();
            all_chunkings(&spec, &c, "gpu ignore_index");
        }
    }
}

#[test]
fn gpu_linear_large_vocab_agrees_with_cpu_and_reruns_bit_identical() {
    if !gpu_or_skip("gpu_linear_large_vocab_agrees_with_cpu_and_reruns_bit_identical") {
        return;
    }
    // a vocabulary row longer than shared memory (the rows kernel re-reads its tail), several
    // chunks of 16-bit gradient rows with 4 logits products each
    let c = Case::<bf16>::random(21, 4, 40, 96, 70_001, true);
    let run = |backend| {
        let spec = LossSpec::builder().keywords([c.ids[5]]).backend(backend).build().unwrap();
        let s = c.shape;
        let (mut dh, mut dw, mut db) = (vec![0f32; s.hidden_len()], vec![0f32; s.weight_len()], vec![0f32; s.vocab()]);
        let grads = LinearGrads::new()
            .hidden(Grad::IntoF32(&mut dh))
            .weight(Grad::IntoF32(&mut dw))
            .bias(Grad::IntoF32(&mut db));
        let out = spec.linear_loss_and_grad(s, c.inputs(), c.tokens(), grads, Chunking::Rows(48)).unwrap();
        (out, dh, dw, db)
    };
    let a = run(Backend::Cuda);
    let b = run(Backend::Cuda);
    assert_eq!(a.0, b.0, "reruns give the same outputs");
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert!(bits(&a.1) == bits(&b.1) && bits(&a.2) == bits(&b.2) && bits(&a.3) == bits(&b.3), "bit-identical");
    let cpu = run(Backend::Cpu);
    assert!(common::rel(a.0.loss.loss, cpu.0.loss.loss) <= 1e-5, "{} vs {}", a.0.loss.loss, cpu.0.loss.loss);
    for (name, g, r) in [("d hidden", &a.1, &cpu.1), ("d weight", &a.2, &cpu.2), ("d bias", &a.3, &cpu.3)] {
        let e = fused_weighted_loss::reference::rel_err(g, r);
        assert!(e <= 1.5e-2, "{name}: GPU vs CPU rel err {e:e}");
    }
}

/// float16 gradient rows at a scale where most of their entries are below float16's smallest
/// subnormal unless scaled (`src/cuda/linear/scale.rs`): `N = 2048`, `V = 16000`. A float64
/// model of the rounding put `d weight` / `d hidden` 8.3e-3 / 2.0e-2 off unscaled and 7.7e-5
/// scaled; the CPU path keeps its rows in f32 and is the yardstick.
#[test]
fn gpu_linear_float16_rows_keep_their_small_entries() {
    if !gpu_or_skip("gpu_linear_float16_rows_keep_their_small_entries") {
        return;
    }
    let c = Case::<f16>::random(31, 2, 1024, 32, 16_000, false);
    let run = |backend| {
        let spec = LossSpec::builder().backend(backend).build().unwrap();
        let s = c.shape;
        let (mut dh, mut dw) = (vec![0f32; s.hidden_len()], vec![0f32; s.weight_len()]);
        let grads = LinearGrads::new().hidden(Grad::IntoF32(&mut dh)).weight(Grad::IntoF32(&mut dw));
        let out = spec.linear_loss_and_grad(s, c.inputs(), c.tokens(), grads, Chunking::Auto).unwrap();
        (out, dh, dw)
    };
    let (gpu, cpu) = (run(Backend::Cuda), run(Backend::Cpu));
    assert!(common::rel(gpu.0.loss.loss, cpu.0.loss.loss) <= 1e-5, "{} vs {}", gpu.0.loss.loss, cpu.0.loss.loss);
    for (name, g, r) in [("d hidden", &gpu.1, &cpu.1), ("d weight", &gpu.2, &cpu.2)] {
        let e = fused_weighted_loss::reference::rel_err(g, r);
        assert!(e <= 2e-3, "{name}: GPU vs CPU rel err {e:e} (float16 rows that lost their small entries?)");
    }
}

#[cfg(feature = "cuda")]
mod device_api {
    use super::*;
    use fused_weighted_loss::cuda::cudarc::driver::{CudaContext, CudaStream};
    use fused_weighted_loss::cuda::linear::{
        CudaLinearLoss, DeviceGrad, DeviceLinearGrads, DeviceLinearInputs, LinearSchedule,
    };
    use fused_weighted_loss::cuda::DeviceInputs;
    use fused_weighted_loss::reference::rel_err;
    use std::sync::Arc;

    #[test]
    fn gpu_linear_device_buffers_stream_scale_and_accumulation() {
        if !gpu_or_skip("gpu_linear_device_buffers_stream_scale_and_accumulation") {
            return;
        }
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.new_stream().unwrap();
        // both schedules: the chunks' (2 logits rows per 5-row chunk for 16-bit inputs) and the
        // tiles' (6 vocabulary blocks of 1000 columns, the 16-bit d hidden through its f32 sum)
        for schedule in [LinearSchedule::Chunks, LinearSchedule::Tiles { cols: 1000 }] {
            device_buffers_case(&ctx, &stream, schedule);
        }
    }

    fn device_buffers_case(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>, schedule: LinearSchedule) {
        let fused = CudaLinearLoss::new(ctx).unwrap().with_schedule(schedule).unwrap();
        let c = Case::<bf16>::random(31, 3, 7, 40, 5003, true);
        let spec = LossSpec::builder().keywords([c.ids[2]]).grad_scale(123.0).build().unwrap();
        // the device scalar (0.25) replaces the spec's 123
        let e = expected(&spec.to_builder().grad_scale(0.25).build().unwrap(), &c);
        let s = c.shape;
        let (h, w, b, ids) = (
            stream.clone_htod(&c.hidden).unwrap(),
            stream.clone_htod(&c.weight).unwrap(),
            stream.clone_htod(c.bias.as_ref().unwrap()).unwrap(),
            stream.clone_htod(&c.ids).unwrap(),
        );
        let d_scale = stream.clone_htod(&[0.25f32]).unwrap();
        let prior: Vec<f32> = (0..s.weight_len()).map(|i| (i % 7) as f32 * 1e-3).collect();
        let mut d_h = stream.alloc_zeros::<bf16>(s.hidden_len()).unwrap();
        let mut d_w = stream.clone_htod(&prior).unwrap();
        let mut d_b = stream.alloc_zeros::<f32>(s.vocab()).unwrap();
        let (hv, wv, bv, iv, sv) = (h.as_view(), w.as_view(), b.as_view(), ids.as_view(), d_scale.as_view());
        let inputs = DeviceLinearInputs::new(&hv, &wv).with_bias(&bv);
        let tokens = DeviceInputs::new(&iv).with_grad_scale(&sv);
        let (mut dhv, mut dwv, mut dbv) = (d_h.as_view_mut(), d_w.as_view_mut(), d_b.as_view_mut());
        let grads = DeviceLinearGrads::new()
            .hidden(DeviceGrad::Into(&mut dhv))
            .weight(DeviceGrad::IntoF32(&mut dwv))
            .bias(DeviceGrad::IntoF32(&mut dbv))
            .accumulate(true);
        let out = fused.loss_and_grad(&spec, s, stream, &inputs, &tokens, grads, Chunking::Rows(5)).unwrap();
        let tiled = match schedule {
            LinearSchedule::Chunks => (2, 0),
            LinearSchedule::Tiles { cols } => (5, cols),
        };
        assert_eq!((out.chunk_rows, out.logits_rows, out.chunks, out.tile_cols), (5, tiled.0, 5, tiled.1));
        let host = out.loss.to_host(stream).unwrap();
        let gh: Vec<f32> = stream.clone_dtoh(&d_h).unwrap().iter().map(|x| x.to_f32()).collect();
        let gw = stream.clone_dtoh(&d_w).unwrap();
        let gb = stream.clone_dtoh(&d_b).unwrap();
        stream.synchronize().unwrap();
        common::assert_outputs(&host, &e.out, 1e-4, &format!("device api, {schedule:?}"));
        assert!(rel_err(&gh, &e.dh) <= 1.5e-2, "{schedule:?}: d hidden {:e}", rel_err(&gh, &e.dh));
        let want_w: Vec<f64> = prior.iter().zip(&e.dw).map(|(p, g)| *p as f64 + g).collect();
        assert!(rel_err(&gw, &want_w) <= 1.5e-2, "d weight accumulated {:e}", rel_err(&gw, &want_w));
        assert!(rel_err(&gb, &e.db) <= 1.5e-2, "d bias (zero prior) {:e}", rel_err(&gb, &e.db));
    }

    #[test]
    fn gpu_linear_bad_device_lengths_are_errors() {
        if !gpu_or_skip("gpu_linear_bad_device_lengths_are_errors") {
            return;
        }
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.default_stream();
        let fused = CudaLinearLoss::new(&ctx).unwrap();
        let c = Case::<f32>::random(5, 2, 3, 4, 10, false);
        let (h, w, ids) = (
            stream.clone_htod(&c.hidden).unwrap(),
            stream.clone_htod(&c.weight[1..]).unwrap(),
            stream.clone_htod(&c.ids).unwrap(),
        );
        let (hv, wv, iv) = (h.as_view(), w.as_view(), ids.as_view());
        let r = fused.loss_and_grad(
            &LossSpec::default(),
            c.shape,
            &stream,
            &DeviceLinearInputs::new(&hv, &wv),
            &DeviceInputs::new(&iv),
            DeviceLinearGrads::new(),
            Chunking::Auto,
        );
        assert!(matches!(r, Err(fused_weighted_loss::Error::LengthMismatch { what: "weight", .. })), "{r:?}");
    }
}
