//! `bench-split`: one rank's kernels of a vocabulary-parallel split (its slice of `V / ranks`
//! columns, chunk by chunk through the split's steps, a group of one: no exchange) against the
//! single-device pass on the same logits, alternately: issue 13's per-rank measure, on the CPU
//! or the GPU.

use crate::bench::{available_memory, fits, run_count, timed_count, PROCESS_BYTES};
use crate::{CliResult, Failure};
use clap::Args;
use fused_weighted_loss::measure::{median, time_paired};
use fused_weighted_loss::parallel::{default_chunk_rows, Sharded, Solo, VocabSlice};
use fused_weighted_loss::{bf16, f16, synthetic, Backend, CpuSimd, DType, Grad, Logit, LossSpec, Shape, Tokens};
use serde_json::json;

#[derive(Args)]
pub struct BenchSplitArgs {
    /// BxTxV, V the whole vocabulary.
    #[arg(long, default_value = "8x128x50000")]
    shape: String,
    /// Ranks the vocabulary is split over: the rank timed holds ⌈V / ranks⌉ columns.
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    /// Logits (and gradient) precision.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Rows per exchange (default: the split's own for this slice and backend).
    #[arg(long)]
    chunk_rows: Option<usize>,
    /// CPU instruction set: auto, avx512, avx2 or portable.
    #[arg(long, default_value = "auto")]
    simd: CpuSimd,
    /// Timed pairs of runs, 1 to a million.
    #[arg(long, default_value_t = 15, value_parser = timed_count)]
    iters: usize,
    /// Untimed pairs first, at most a million.
    #[arg(long, default_value_t = 3, value_parser = run_count)]
    warmup: usize,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// What the output names of the run's flags.
struct Rendered {
    vocab: usize,
    ranks: usize,
    dtype: DType,
    iters: usize,
    json: bool,
}

/// What was timed: per-call milliseconds of each side, the chunk and the two losses.
struct Timed {
    about: Vec<(&'static str, serde_json::Value)>,
    single_ms: Vec<f64>,
    split_ms: Vec<f64>,
    chunk_rows: usize,
    loss: [f64; 2],
}

/// Runs `bench-split`: checks the flags and the memory, then times; the table or JSON.
pub fn bench_split(a: BenchSplitArgs) -> CliResult<String> {
    let whole = crate::bench::parse_shape(&a.shape)?;
    if a.ranks == 0 || a.ranks > whole.vocab() {
        return Err(Failure(format!("--ranks must be 1 to V ({}), got {}", whole.vocab(), a.ranks)));
    }
    if a.chunk_rows == Some(0) {
        return Err(Failure("--chunk-rows must be at least 1".into()));
    }
    let len = VocabSlice::even(0, a.ranks, whole.vocab())?.len();
    let shape = Shape::new(whole.batch(), whole.seq(), len)?;
    // logits, two gradients (one on the device), ids, the kept rows of a few chunks
    let need = PROCESS_BYTES + 3 * shape.logits_len() as u128 * a.dtype.size() as u128 + shape.rows() as u128 * 8;
    let need = u64::try_from(need + (64u128 << 20)).unwrap_or(u64::MAX);
    if !fits(need, available_memory()) {
        let gb = need as f64 * 1e-9;
        return Err(Failure(format!(
            "bench-split --shape {} needs {gb:.2} GB of memory, more than is available",
            a.shape
        )));
    }
    let keywords = (0..3).filter(|&k| k < len as i64);
    let spec = LossSpec::builder().keywords(keywords).backend(a.backend).cpu_simd(a.simd).build()?;
    let t = match a.dtype {
        DType::F32 => timed::<f32>(&a, whole, shape, &spec)?,
        DType::F16 => timed::<f16>(&a, whole, shape, &spec)?,
        DType::BF16 => timed::<bf16>(&a, whole, shape, &spec)?,
    };
    // a bench of a broken kernel is worthless: both finite, and the same loss to rounding
    let [one, two] = t.loss;
    if !(one.is_finite() && two.is_finite()) || (one - two).abs() > 1e-5 * one.abs().max(1e-30) {
        return Err(Failure(format!("bench-split: the losses differ or are not finite: single {one}, split {two}")));
    }
    let r = Rendered { vocab: whole.vocab(), ranks: a.ranks, dtype: a.dtype, iters: a.iters, json: a.json };
    Ok(render(&r, shape, &t))
}

fn timed<L: Logit>(a: &BenchSplitArgs, whole: Shape, shape: Shape, spec: &LossSpec) -> CliResult<Timed> {
    if spec.resolved_backend()? == Backend::Cuda {
        #[cfg(feature = "cuda")]
        {
            let r = fused_weighted_loss::cuda::bench_device_split::<L>(spec, shape, a.chunk_rows, a.warmup, a.iters)?;
            return Ok(Timed {
                about: vec![("backend", json!("cuda")), ("device", json!(r.device))],
                single_ms: r.single_ms,
                split_ms: r.split_ms,
                chunk_rows: r.chunk_rows,
                loss: r.loss,
            });
        }
    }
    let logits = synthetic::logits::<L>(1, shape.logits_len(), 4.0);
    let ids = synthetic::ids::<i64>(2, shape.rows(), shape.vocab());
    let (mut g1, mut g2) = (L::zeroed(shape.logits_len()), L::zeroed(shape.logits_len()));
    // the chunk a rank of `ranks` takes, the same as the call would take for this slice alone
    let chunk = a.chunk_rows.unwrap_or_else(|| default_chunk_rows(whole.vocab(), a.ranks));
    let split =
        Sharded::vocab_parallel(VocabSlice::full(shape.vocab())?, &Solo).with_split_steps().with_chunk_rows(chunk);
    let (mut one, mut two) = (Ok(f64::NAN), Ok(f64::NAN));
    let (single, sharded) = time_paired(
        a.warmup,
        a.iters,
        || one = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut g1)).map(|o| o.loss),
        || two = split.loss_and_grad(spec, shape, &logits, Tokens::new(&ids), Grad::Into(&mut g2)).map(|o| o.loss),
    );
    let loss = [one?, two?];
    let ms = |v: Vec<f64>| v.into_iter().map(|s| s * 1e3).collect();
    Ok(Timed {
        about: vec![
            ("backend", json!("cpu")),
            (
                "simd",
                json!(match a.simd {
                    CpuSimd::Auto => fused_weighted_loss::cpu_simd_level().to_string(),
                    level => level.to_string(),
                }),
            ),
            ("threads", json!(rayon::current_num_threads())),
        ],
        single_ms: ms(single),
        split_ms: ms(sharded),
        chunk_rows: chunk,
        loss,
    })
}

/// The table or JSON of a run: `shape` is the rank's, `vocab` the whole vocabulary.
fn render(a: &Rendered, shape: Shape, t: &Timed) -> String {
    let (s, p) = (median(&t.single_ms), median(&t.split_ms));
    // the median of the pairs' ratios: each pair ran back to back, under the same load
    let pairs: Vec<f64> = t.single_ms.iter().zip(&t.split_ms).map(|(s, p)| p / s).collect();
    let paired = median(&pairs);
    if a.json {
        let mut o = serde_json::Map::new();
        for (k, v) in &t.about {
            o.insert((*k).into(), v.clone());
        }
        let fields = [
            ("shape", json!([shape.batch(), shape.seq(), a.vocab])),
            ("ranks", json!(a.ranks)),
            ("slice", json!(shape.vocab())),
            ("dtype", json!(a.dtype.to_string())),
            ("chunk_rows", json!(t.chunk_rows)),
            ("iters", json!(a.iters)),
            ("single_ms", json!(s)),
            ("split_ms", json!(p)),
            ("ratio", json!(p / s)),
            ("paired_ratio", json!(paired)),
            ("loss", json!(t.loss[0])),
        ];
        for (k, v) in fields {
            o.insert(k.into(), v);
        }
        return serde_json::Value::Object(o).to_string();
    }
    let about: Vec<String> =
        t.about.iter().map(|(k, v)| format!("{k} {}", v.as_str().map_or(v.to_string(), str::to_string))).collect();
    format!(
        "one rank of {} ({}): [{}, {}, {}] {}, chunks of {} rows, medians of {} pairs\n\
         single-device pass on the slice  {s:9.3} ms\n\
         the split's steps, chunk by chunk {p:9.3} ms\n\
         ratio {:.3} (median of the pairs' ratios {paired:.3}; the exchange apart)",
        a.ranks,
        about.join(", "),
        shape.batch(),
        shape.seq(),
        shape.vocab(),
        a.dtype,
        t.chunk_rows,
        a.iters,
        p / s,
    )
}
