//! candle: this crate's op (forward + backward through candle's autograd) against candle-nn's
//! own `cross_entropy` composed from separate ops, at B=8 T=128 V=50000 f32 on the CPU.
//!
//! `cargo bench --features train-example --bench candle`

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fused_weighted_loss::candle::weighted_loss;
use fused_weighted_loss::{synthetic, LossSpec};
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let (b, t, v) = (8usize, 128usize, 50_000usize);
    let logits = synthetic::logits::<f32>(1, b * t * v, 4.0);
    let ids = synthetic::ids::<u32>(2, b * t, v);
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::from_vec(logits, (b, t, v), &dev).unwrap()).unwrap();
    let ids = Tensor::from_vec(ids, (b, t), &dev).unwrap();
    let spec = LossSpec::builder().keywords([0i64, 1, 2]).build().unwrap();
    let mut g = c.benchmark_group("candle_8x128x50000_f32");
    g.throughput(Throughput::Bytes((b * t * v * 8) as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("fused_op_fwd_only", |bn| {
        // the forward alone (it computes the gradient too, into a fresh buffer, and keeps it)
        bn.iter(|| weighted_loss(x.as_tensor(), &ids, None, &spec).unwrap())
    });
    g.bench_function("fused_op_fwd_bwd", |bn| {
        bn.iter(|| {
            let loss = weighted_loss(x.as_tensor(), &ids, None, &spec).unwrap();
            loss.backward().unwrap()
        })
    });
    g.bench_function("candle_nn_cross_entropy_fwd_bwd", |bn| {
        bn.iter(|| {
            // plain mean cross-entropy of the shifted rows (no weighting): the cheaper problem
            let shifted = x.as_tensor().narrow(1, 0, t - 1).unwrap().reshape((b * (t - 1), v)).unwrap();
            let targets = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
            let loss = candle_nn::loss::cross_entropy(&shifted, &targets).unwrap();
            loss.backward().unwrap()
        })
    });
    g.finish();
}

criterion_group!(candle_benches, bench);
criterion_main!(candle_benches);
