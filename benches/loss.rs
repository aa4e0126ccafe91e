//! Criterion benches: fused loss + gradient vs the copy floor and the float64 reference, at the
//! course's shape and at a small LLM-like shape. Throughput is bytes moved by a fused pass:
//! logits read once + gradient written once.
//!
//! `cargo bench --bench loss` (all of it) or `cargo bench --bench loss -- course` (one group;
//! `-- options` times every option on against the plain loss).
//! Set `FWL_BENCH_REFERENCE=0` to skip the (slow) reference.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fused_weighted_loss::measure::{median, time_paired, CopyBuffers};
use fused_weighted_loss::reference::reference;
use fused_weighted_loss::{bf16, synthetic, Grad, Logit, LossSpec, Shape, Tokens};
use std::time::Duration;

fn group<L: Logit>(c: &mut Criterion, name: &str, shape: Shape, with_reference: bool) {
    let logits = synthetic::logits::<L>(1, shape.logits_len(), 4.0);
    let ids = synthetic::ids::<i64>(2, shape.rows(), shape.vocab());
    let spec = LossSpec::builder().keywords([0, 1, 2]).build().unwrap();
    let mut grad = L::zeroed(shape.logits_len());
    let bytes = shape.fused_bytes(L::DTYPE, L::DTYPE);

    // the copy floor, timed alternately with the fused pass so machine drift hits both alike
    let mut copy = CopyBuffers::new(bytes / 2).expect("memory for the copy floor");
    let (method, _) = copy.pick_fastest(3);
    let (fused, floor) = time_paired(
        2,
        10,
        || drop(spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad)).unwrap()),
        || copy.copy(),
    );
    let (fused, floor) = (median(&fused), median(&floor));
    eprintln!(
        "{name}: shape {shape} {} on {} threads ({}): fused {:.2} ms, copy floor {:.2} ms ({:.1} GB/s; {method}) for \
         {:.0} MB read+written: {:.2}x floor",
        L::DTYPE,
        rayon::current_num_threads(),
        fused_weighted_loss::cpu_simd_level(),
        fused * 1e3,
        floor * 1e3,
        bytes as f64 / floor / 1e9,
        bytes as f64 / 1e6,
        fused / floor
    );

    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(bytes as u64));
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.bench_function(BenchmarkId::new("fused", L::DTYPE), |b| {
        b.iter(|| spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad)).unwrap())
    });
    g.bench_function(BenchmarkId::new("copy_floor", L::DTYPE), |b| b.iter(|| copy.copy()));
    if with_reference && std::env::var("FWL_BENCH_REFERENCE").as_deref() != Ok("0") {
        g.measurement_time(Duration::from_secs(20));
        g.bench_function(BenchmarkId::new("reference_f64", L::DTYPE), |b| {
            b.iter(|| reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap())
        });
    }
    g.finish();
}

/// The options (z-loss, label smoothing, soft-capping, token weights: all on) against the plain
/// loss, timed alternately in one run; prints the paired ratio, then criterion times both.
fn options_group<L: Logit>(c: &mut Criterion, name: &str, shape: Shape) {
    let logits = synthetic::logits::<L>(1, shape.logits_len(), 4.0);
    let ids = synthetic::ids::<i64>(2, shape.rows(), shape.vocab());
    let weights: Vec<f32> = synthetic::logits::<f32>(3, shape.rows(), 1.0).iter().map(|x| x + 1.0).collect();
    let plain = LossSpec::builder().keywords([0, 1, 2]).build().unwrap();
    let all = plain.to_builder().z_loss(1e-4).label_smoothing(0.1).softcap(30.0).build().unwrap();
    let mut grad = L::zeroed(shape.logits_len());
    let mut g2 = L::zeroed(shape.logits_len());
    let tokens = Tokens::new(&ids);
    let weighted = tokens.with_token_weights(&weights);
    let (p, o) = time_paired(
        2,
        10,
        || drop(plain.loss_and_grad(shape, &logits, tokens, Grad::Into(&mut grad)).unwrap()),
        || drop(all.loss_and_grad(shape, &logits, weighted, Grad::Into(&mut g2)).unwrap()),
    );
    let (p, o) = (median(&p), median(&o));
    eprintln!(
        "{name}: shape {shape} {} on {} threads ({}): plain {:.2} ms, all options {:.2} ms: {:.3}x plain",
        L::DTYPE,
        rayon::current_num_threads(),
        fused_weighted_loss::cpu_simd_level(),
        p * 1e3,
        o * 1e3,
        o / p
    );
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(shape.fused_bytes(L::DTYPE, L::DTYPE) as u64));
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.bench_function(BenchmarkId::new("plain", L::DTYPE), |b| {
        b.iter(|| plain.loss_and_grad(shape, &logits, tokens, Grad::Into(&mut grad)).unwrap())
    });
    g.bench_function(BenchmarkId::new("all_options", L::DTYPE), |b| {
        b.iter(|| all.loss_and_grad(shape, &logits, weighted, Grad::Into(&mut grad)).unwrap())
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    // the course's shape: B=32, T=128, V=50000 (GPT-2-sized vocabulary), f32
    group::<f32>(c, "course_32x128x50000", Shape::new(32, 128, 50_000).unwrap(), true);
    // a small LLM-like step: 2048 tokens, V=128256, bf16
    group::<bf16>(c, "llm_4x512x128256", Shape::new(4, 512, 128_256).unwrap(), false);
    // z-loss + label smoothing + soft-capping + token weights vs the plain loss
    let shape = Shape::new(8, 128, 50_000).unwrap();
    options_group::<f32>(c, "options_8x128x50000", shape);
    options_group::<bf16>(c, "options_8x128x50000", shape);
}

criterion_group!(loss, benches);
criterion_main!(loss);
