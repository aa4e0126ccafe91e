//! `bench-linear`: times the fused linear + weighted loss (loss, `d hidden`, `d weight`) on random
//! data and reports the chunking and the peak memory beyond inputs and gradients.

use super::{CliResult, Failure};
use clap::Args;
use fused_weighted_loss::measure::{median, min, time_runs};
use fused_weighted_loss::{
    bf16, f16, synthetic, Backend, Chunking, DType, Grad, LinearGrads, LinearInputs, LinearShape, Logit, LossSpec,
    Tokens,
};
use serde_json::json;

#[derive(Args)]
pub struct BenchLinearArgs {
    /// BxT: token rows N = B·T.
    #[arg(long, default_value = "8x128")]
    tokens: String,
    /// Hidden size H.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// Vocabulary size V.
    #[arg(long, default_value_t = 32_000)]
    vocab: usize,
    /// Precision of hidden states, weight and their gradients.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Token rows per chunk (default: from the memory budget; not with --budget-mib).
    #[arg(long, conflicts_with = "budget_mib")]
    chunk_rows: Option<usize>,
    /// Memory budget for the chunk buffers, MiB (default: the backend's).
    #[arg(long)]
    budget_mib: Option<usize>,
    /// Timed runs, 1 to a million.
    #[arg(long, default_value_t = 5, value_parser = super::bench::timed_count)]
    iters: usize,
    /// Untimed runs first, at most a million.
    #[arg(long, default_value_t = 1, value_parser = super::bench::run_count)]
    warmup: usize,
    /// A bias `[V]` in the inputs, and its gradient `d bias` timed with the others.
    #[arg(long)]
    bias: bool,
    /// Every gradient in f32 whatever --dtype (16-bit inputs: f32 accumulation kept to the end).
    #[arg(long)]
    f32_grads: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object on stdout instead of a line of text.
    #[arg(long)]
    json: bool,
}

/// Resident and peak resident memory of this process (bytes), where Linux reports them.
fn rss() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = |key: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|k| k * 1024)
    };
    Some((kb("VmRSS:")?, kb("VmHWM:")?))
}

/// Resets the peak resident memory to the current one (Linux `clear_refs`); false if it cannot.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn chunking(a: &BenchLinearArgs) -> CliResult<Chunking> {
    Ok(match (a.chunk_rows, a.budget_mib) {
        (Some(c), None) => Chunking::Rows(c),
        (Some(_), Some(_)) => return Err(Failure("--chunk-rows and --budget-mib are alternatives".into())),
        (None, Some(m)) => Chunking::Budget(
            m.checked_mul(1 << 20).ok_or_else(|| Failure(format!("--budget-mib {m} does not fit in memory sizes")))?,
        ),
        (None, None) => Chunking::Auto,
    })
}

/// Refuses a CPU run whose inputs, gradient buffers and chunk buffers need more memory than is
/// available (as `bench` does), before anything is allocated: an allocation failure aborts.
fn check_cpu_memory(a: &BenchLinearArgs, shape: LinearShape, dtype: DType, chunking: Chunking) -> CliResult<()> {
    let (n, h, v) = (shape.rows() as u128, shape.hidden() as u128, shape.vocab() as u128);
    let (s, gs) = (dtype.size() as u128, if a.f32_grads { 4 } else { dtype.size() as u128 });
    // per chunk row: its f32 logits, hidden rows (twice) and d hidden, and its part of one
    // logits panel (`P` rows of W per ~4 MiB panel, rounded up to even), as the library counts
    // a chunk row
    let p = ((4u128 << 20) / (4 * h).max(1)).clamp(1, v.max(1)).div_ceil(2) * 2;
    let row = 4 * v + 12 * h + 4 * p;
    let chunk_rows = match chunking {
        Chunking::Rows(c) => (c as u128).min(n),
        Chunking::Budget(b) => (b as u128 / row).clamp(1, n.max(1)),
        Chunking::Auto => (fused_weighted_loss::linear::CPU_BUDGET as u128 / row).clamp(1, n.max(1)),
    };
    let inputs = n * h + v * h + if a.bias { v } else { 0 };
    // hidden, weight (and bias) and their gradients; ids; the f32 panels of W (16-bit); the
    // chunks; and beside them the rows pass's working row per running task
    let tasks = (a.threads.unwrap_or_else(rayon::current_num_threads) as u128).min(chunk_rows);
    let need = inputs * (s + gs) + 8 * n + 8 * (4 << 20) + chunk_rows * row + tasks * 4 * v;
    check_host(shape, dtype, need)
}

/// Refuses a run that needs `need` bytes of host memory when less is available.
fn check_host(shape: LinearShape, dtype: DType, need: u128) -> CliResult<()> {
    let need = u64::try_from(need).unwrap_or(u64::MAX);
    if super::bench::fits(need, super::bench::available_memory()) {
        return Ok(());
    }
    Err(Failure(format!(
        "bench-linear {shape} {dtype} needs {:.2} GB of memory, more than the memory available",
        need as f64 * 1e-9
    )))
}

/// Refuses a CUDA run whose host-side inputs (made one at a time, then copied to the device:
/// the larger of hidden and weight, and the ids) need more memory than is available.
#[cfg(feature = "cuda")]
fn check_cuda_host_memory(shape: LinearShape, dtype: DType) -> CliResult<()> {
    let (n, h, v) = (shape.rows() as u128, shape.hidden() as u128, shape.vocab() as u128);
    check_host(shape, dtype, (n * h).max(v * h) * dtype.size() as u128 + 8 * n)
}

/// A host gradient buffer in `L` or in f32 (written once so that it is resident before the
/// memory baseline); empty: not wanted.
enum GradBuf<L: Logit> {
    Same(Vec<L>),
    F32(Vec<f32>),
}

impl<L: Logit> GradBuf<L> {
    fn new(len: usize, f32: bool) -> Self {
        match f32 {
            true => GradBuf::F32(vec![1.0; len]),
            false => GradBuf::Same(vec![L::from_f32(1.0); len]),
        }
    }

    fn grad(&mut self) -> Grad<'_, L> {
        match self {
            GradBuf::Same(v) if v.is_empty() => Grad::Skip,
            GradBuf::F32(v) if v.is_empty() => Grad::Skip,
            GradBuf::Same(v) => Grad::Into(v),
            GradBuf::F32(v) => Grad::IntoF32(v),
        }
    }
}

fn run_cpu<L: Logit>(a: &BenchLinearArgs, shape: LinearShape, spec: &LossSpec) -> CliResult<serde_json::Value> {
    let chunking = chunking(a)?;
    check_cpu_memory(a, shape, L::DTYPE, chunking)?;
    let hidden = synthetic::logits::<L>(1, shape.hidden_len(), 1.0);
    let weight = synthetic::logits::<L>(2, shape.weight_len(), 3.0 / (shape.hidden() as f32).sqrt());
    let bias = a.bias.then(|| synthetic::logits::<L>(4, shape.vocab(), 0.5));
    let ids = synthetic::ids::<i64>(3, shape.rows(), shape.vocab());
    let mut dh = GradBuf::<L>::new(shape.hidden_len(), a.f32_grads);
    let mut dw = GradBuf::<L>::new(shape.weight_len(), a.f32_grads);
    let mut db = GradBuf::<L>::new(if a.bias { shape.vocab() } else { 0 }, a.f32_grads);
    let mut call = || {
        let grads = LinearGrads::new().hidden(dh.grad()).weight(dw.grad()).bias(db.grad());
        let mut inputs = LinearInputs::new(&hidden, &weight);
        if let Some(b) = &bias {
            inputs = inputs.with_bias(b);
        }
        spec.linear_loss_and_grad(shape, inputs, Tokens::new(&ids), grads, chunking)
    };
    // inputs and gradient buffers are resident now (written once): the calls' peak on top of
    // them is what they need (measured from the first call: freed heap memory stays resident)
    let base = rss();
    let reset = reset_peak();
    let out = call()?;
    for _ in 0..a.warmup {
        call()?;
    }
    let runs = time_runs(0, a.iters, || drop(std::hint::black_box(call())));
    let peak_extra = match (base, rss(), reset) {
        (Some((before, _)), Some((_, peak)), true) => Some(peak.saturating_sub(before)),
        _ => None,
    };
    Ok(json!({
        "backend": "cpu",
        "threads": rayon::current_num_threads(),
        "simd": fused_weighted_loss::cpu_simd_level().to_string(),
        "median_ms": median(&runs) * 1e3,
        "min_ms": min(&runs) * 1e3,
        "loss": crate::json_f64(out.loss.loss),
        "chunk_rows": out.chunk_rows,
        "chunks": out.chunks,
        "scratch_bytes": out.scratch_bytes,
        "peak_extra_bytes": peak_extra,
        "inputs_and_grads_bytes": inputs_and_grads_bytes(a, shape, L::DTYPE),
    }))
}

#[cfg(feature = "cuda")]
fn run_cuda<L: Logit>(a: &BenchLinearArgs, shape: LinearShape, spec: &LossSpec) -> CliResult<serde_json::Value> {
    check_cuda_host_memory(shape, L::DTYPE)?;
    let extras = fused_weighted_loss::cuda::linear::LinearBenchExtras { bias: a.bias, f32_grads: a.f32_grads };
    let r = fused_weighted_loss::cuda::linear::bench_device::<L>(spec, shape, chunking(a)?, extras, a.warmup, a.iters)?;
    Ok(json!({
        "backend": "cuda",
        "device": r.device,
        "median_ms": median(&r.ms),
        "min_ms": min(&r.ms),
        "loss": crate::json_f64(r.loss),
        "chunk_rows": r.chunk_rows,
        "logits_rows": r.logits_rows,
        "tile_cols": r.tile_cols,
        "chunks": r.chunks,
        "scratch_bytes": r.scratch_bytes,
        "peak_bytes": r.peak_bytes,
        "inputs_and_grads_bytes": inputs_and_grads_bytes(a, shape, L::DTYPE),
    }))
}

/// Bytes of the inputs (hidden, weight, the bias if any) and of their gradients.
fn inputs_and_grads_bytes(a: &BenchLinearArgs, shape: LinearShape, dtype: DType) -> usize {
    let len = shape.hidden_len() + shape.weight_len() + if a.bias { shape.vocab() } else { 0 };
    len * (dtype.size() + if a.f32_grads { 4 } else { dtype.size() })
}

fn run_typed<L: Logit>(a: &BenchLinearArgs, shape: LinearShape, spec: &LossSpec) -> CliResult<serde_json::Value> {
    if spec.resolved_linear_backend()? == Backend::Cuda {
        #[cfg(feature = "cuda")]
        return run_cuda::<L>(a, shape, spec);
    }
    run_cpu::<L>(a, shape, spec)
}

pub fn bench_linear(a: BenchLinearArgs) -> CliResult<String> {
    // every part must parse: "2xfoox4" is not 2x4
    let bt: Option<Vec<usize>> = a.tokens.split(['x', 'X']).map(|p| p.trim().parse::<usize>().ok()).collect();
    let Some([b, t]) = bt.as_deref().and_then(|v| <[usize; 2]>::try_from(v).ok()) else {
        return Err(Failure(format!("--tokens '{}': expected BxT, e.g. 8x128", a.tokens)));
    };
    super::bench::check_threads(a.threads)?;
    let shape = LinearShape::new(b, t, a.hidden, a.vocab)?;
    // keywords 0, 1, 2 where the vocabulary has them (as `bench`)
    let keywords = (0..3i64).filter(|&k| (k as usize) < a.vocab);
    let spec = LossSpec::builder().keywords(keywords).backend(a.backend).build()?;
    let run = || -> CliResult<String> {
        let mut j = match a.dtype {
            DType::F32 => run_typed::<f32>(&a, shape, &spec)?,
            DType::F16 => run_typed::<f16>(&a, shape, &spec)?,
            DType::BF16 => run_typed::<bf16>(&a, shape, &spec)?,
        };
        if !j["loss"].as_f64().is_some_and(f64::is_finite) {
            return Err(Failure(format!("bench-linear produced a non-finite loss {}", j["loss"])));
        }
        j["tokens"] = json!([b, t]);
        j["hidden"] = json!(a.hidden);
        j["vocab"] = json!(a.vocab);
        j["dtype"] = json!(a.dtype.name());
        j["bias"] = json!(a.bias);
        j["f32_grads"] = json!(a.f32_grads);
        j["iters"] = json!(a.iters);
        if a.json {
            return Ok(j.to_string());
        }
        let mib = |k: &str| j[k].as_f64().map_or("-".to_string(), |x| format!("{:.1} MiB", x / 1048576.0));
        // the CPU's figure is the calls' peak beyond inputs and gradients; the device's is the
        // pool's high-water mark with them
        let peak = match j["peak_bytes"].is_null() {
            true => format!("peak extra {}", mib("peak_extra_bytes")),
            false => format!("device peak (inputs and gradients included) {}", mib("peak_bytes")),
        };
        // the tiled schedule's vocabulary blocks (CUDA, FWL_CUDA_LINEAR_TILES)
        let tiles = match j["tile_cols"].as_u64() {
            Some(c) if c > 0 => format!(" in blocks of {c} columns"),
            _ => String::new(),
        };
        let extras = match (a.bias, a.f32_grads) {
            (false, false) => "",
            (true, false) => " with bias",
            (false, true) => " (f32 gradients)",
            (true, true) => " with bias (f32 gradients)",
        };
        Ok(format!(
            "fused linear {shape} {}{extras}: median {:.2} ms (min {:.2}), C = {} rows x {} chunks{tiles}, scratch {}, {peak}",
            a.dtype,
            j["median_ms"].as_f64().unwrap_or(f64::NAN),
            j["min_ms"].as_f64().unwrap_or(f64::NAN),
            j["chunk_rows"],
            j["chunks"],
            mib("scratch_bytes"),
        ))
    };
    match a.threads {
        Some(n) => rayon::ThreadPoolBuilder::new().num_threads(n).build()?.install(run),
        None => run(),
    }
}
