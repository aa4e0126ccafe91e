//! `fused-weighted-loss`: evaluate the loss over .npy files, or benchmark it.
//!
//! `bench-linear` times the fused linear + weighted loss (see `linear_bench.rs`).
//!
//! Any bad input, file or flag exits with code 2 and one line on stderr, nothing on stdout.

use clap::{Args, Parser, Subcommand};
use fused_weighted_loss::measure::{median, min, time_paired, time_runs, CopyBuffers};
use fused_weighted_loss::reference::reference;
use fused_weighted_loss::{
    bf16, f16, synthetic, Backend, CpuSimd, DType, Grad, Logit, LossOutput, LossSpec, Reduction, RowMean, Shape, Tokens,
};
use serde_json::json;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[path = "fused-weighted-loss/linear_bench.rs"]
mod linear_bench;

#[derive(Parser)]
#[command(name = "fused-weighted-loss", version, about = "Keyword-weighted causal LM loss and gradient, fused")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compute the loss (and optionally the gradient) of logits and ids stored as .npy files.
    Eval(EvalArgs),
    /// Time loss + gradient on random data and compare with the copy floor and the reference.
    Bench(BenchArgs),
    /// Time the fused linear + weighted loss (hidden states and output weight, no logits).
    BenchLinear(linear_bench::BenchLinearArgs),
}

#[derive(Args)]
struct EvalArgs {
    /// Logits [B,T,V], float32 or float16.
    #[arg(long)]
    logits: PathBuf,
    /// Token ids [B,T], int64 or int32.
    #[arg(long)]
    inputs: PathBuf,
    /// Labels [B,T] (default: the ids); `--ignore-index` marks positions with no target.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Comma-separated keyword ids; a repeated id counts twice.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    keywords: Vec<i64>,
    /// Weight scale: w_b = alpha * (1 + keyword hits).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    alpha: f64,
    /// Label value meaning "no target".
    #[arg(long, default_value_t = -100, allow_hyphen_values = true)]
    ignore_index: i64,
    /// Per-sample mean over all T-1 positions (course) or over valid targets.
    #[arg(long, default_value = "all")]
    row_mean: RowMean,
    /// Batch reduction: mean (course), weighted-mean or sum.
    #[arg(long, default_value = "mean")]
    reduction: Reduction,
    /// Precision the loss is computed from (logits are rounded to it first); default: the file's.
    #[arg(long)]
    dtype: Option<DType>,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Fail on a non-finite per-position loss instead of propagating it.
    #[arg(long)]
    check_finite: bool,
    /// Write the gradient as float32 [B,T,V] here.
    #[arg(long)]
    grad_out: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    /// BxTxV.
    #[arg(long, default_value = "8x128x50000")]
    shape: String,
    /// Logits (and gradient) precision.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Timed runs of the fused pass (and of the copy floor).
    #[arg(long, default_value_t = 15)]
    iters: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// CPU instruction set: auto, avx512, avx2 or portable.
    #[arg(long, default_value = "auto")]
    simd: CpuSimd,
    /// Timed runs of the float64 reference (0 skips it).
    #[arg(long, default_value_t = 2)]
    reference_iters: usize,
}

/// A CLI failure: printed as one line, exit code 2.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

type CliResult<T> = Result<T, Failure>;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(e.kind(), DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand) {
                let _ = e.print();
                return if e.kind() == DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // clap's message spans lines (with usage); keep its first paragraph on one line
            let msg = e.to_string();
            let line: Vec<&str> = msg
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", line.join(" "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Eval(a) => eval(a),
        Command::Bench(a) => bench(a),
        Command::BenchLinear(a) => linear_bench::bench_linear(a),
    };
    match result {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{text}").is_err() {
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(Failure(msg)) => {
            eprintln!("error: {}", msg.replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

fn open_npy(path: &Path, what: &str) -> CliResult<npyz::NpyFile<BufReader<File>>> {
    let f = File::open(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let npy = npyz::NpyFile::new(BufReader::new(f))
        .map_err(|e| format!("{what} {}: not a .npy file ({e})", path.display()))?;
    if npy.order() != npyz::Order::C {
        return Err(Failure(format!("{what} {}: Fortran-order arrays are not supported", path.display())));
    }
    Ok(npy)
}

fn dims(npy: &npyz::NpyFile<BufReader<File>>) -> CliResult<Vec<usize>> {
    npy.shape().iter().map(|&d| usize::try_from(d).map_err(|_| Failure("dimension too large".into()))).collect()
}

fn type_str(npy: &npyz::NpyFile<BufReader<File>>) -> String {
    match npy.dtype() {
        npyz::DType::Plain(ts) => ts.to_string(),
        other => format!("{other:?}"),
    }
}

enum LogitsData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

fn read_logits(path: &Path) -> CliResult<(Vec<usize>, LogitsData)> {
    let npy = open_npy(path, "logits")?;
    let d = dims(&npy)?;
    let ts = type_str(&npy);
    let data = match ts.trim_start_matches(['<', '>', '=', '|']) {
        "f4" => LogitsData::F32(npy.into_vec::<f32>().map_err(|e| format!("logits: {e}"))?),
        "f2" => LogitsData::F16(npy.into_vec::<f16>().map_err(|e| format!("logits: {e}"))?),
        _ => return Err(Failure(format!("logits {}: dtype {ts} is not float32 or float16", path.display()))),
    };
    Ok((d, data))
}

fn read_ids(path: &Path, what: &str) -> CliResult<(Vec<usize>, Vec<i64>)> {
    let npy = open_npy(path, what)?;
    let d = dims(&npy)?;
    let ts = type_str(&npy);
    let data = match ts.trim_start_matches(['<', '>', '=', '|']) {
        "i8" => npy.into_vec::<i64>(),
        "i4" => npy.into_vec::<i32>().map(|v| v.into_iter().map(i64::from).collect()),
        _ => return Err(Failure(format!("{what} {}: dtype {ts} is not int64 or int32", path.display()))),
    }
    .map_err(|e| format!("{what}: {e}"))?;
    Ok((d, data))
}

fn convert<S: Logit, D: Logit>(src: &[S]) -> Vec<D> {
    src.iter().map(|x| D::from_f32(x.to_f32())).collect()
}

fn eval_typed<L: Logit>(
    spec: &LossSpec,
    shape: Shape,
    logits: &[L],
    tokens: Tokens<'_, i64>,
    grad_out: Option<&Path>,
) -> CliResult<LossOutput> {
    match grad_out {
        None => Ok(spec.loss_and_grad(shape, logits, tokens, Grad::Skip)?),
        Some(path) => {
            // create the file first so an unwritable path fails before the work
            let file = File::create(path).map_err(|e| format!("grad-out {}: {e}", path.display()))?;
            let mut g = f32::zeroed(shape.logits_len());
            let out = match spec.loss_and_grad(shape, logits, tokens, Grad::IntoF32(&mut g)) {
                Ok(out) => out,
                Err(e) => {
                    // leave no empty file behind
                    drop(file);
                    let _ = std::fs::remove_file(path);
                    return Err(e.into());
                }
            };
            write_f32_npy(file, &[shape.batch(), shape.seq(), shape.vocab()], &g)
                .map_err(|e| format!("grad-out {}: {e}", path.display()))?;
            Ok(out)
        }
    }
}

fn write_f32_npy(file: File, dims: &[usize], data: &[f32]) -> std::io::Result<()> {
    use npyz::WriterBuilder;
    let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(BufWriter::new(file)).begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish()
}

fn eval(a: EvalArgs) -> CliResult<String> {
    let spec = LossSpec::builder()
        .keywords(a.keywords.iter().copied())
        .alpha(a.alpha)
        .ignore_index(a.ignore_index)
        .row_mean(a.row_mean)
        .reduction(a.reduction)
        .check_finite(a.check_finite)
        .backend(a.backend)
        .build()?;
    let (ldims, logits) = read_logits(&a.logits)?;
    let (idims, ids) = read_ids(&a.inputs, "inputs")?;
    let shape = Shape::from_dims(&ldims, &idims)?;
    let labels = match &a.labels {
        Some(p) => {
            let (d, y) = read_ids(p, "labels")?;
            shape.check_token_dims("labels", &d)?;
            Some(y)
        }
        None => None,
    };
    let tokens = match &labels {
        Some(y) => Tokens::new(&ids).with_labels(y),
        None => Tokens::new(&ids),
    };
    let file_dtype = match logits {
        LogitsData::F32(_) => DType::F32,
        LogitsData::F16(_) => DType::F16,
    };
    let dtype = a.dtype.unwrap_or(file_dtype);
    let g = a.grad_out.as_deref();
    let out = match (&logits, dtype) {
        (LogitsData::F32(l), DType::F32) => eval_typed(&spec, shape, l, tokens, g)?,
        (LogitsData::F32(l), DType::F16) => eval_typed(&spec, shape, &convert::<f32, f16>(l), tokens, g)?,
        (LogitsData::F32(l), DType::BF16) => eval_typed(&spec, shape, &convert::<f32, bf16>(l), tokens, g)?,
        (LogitsData::F16(l), DType::F32) => eval_typed(&spec, shape, &convert::<f16, f32>(l), tokens, g)?,
        (LogitsData::F16(l), DType::F16) => eval_typed(&spec, shape, l, tokens, g)?,
        (LogitsData::F16(l), DType::BF16) => eval_typed(&spec, shape, &convert::<f16, bf16>(l), tokens, g)?,
    };
    Ok(json!({
        "loss": out.loss,
        "per_sample_loss": out.per_sample_loss,
        "weights": out.weights,
        "valid_tokens": out.valid_tokens,
        "backend": out.backend.to_string(),
        "dtype": dtype.name(),
        "shape": [shape.batch(), shape.seq(), shape.vocab()],
    })
    .to_string())
}

fn parse_shape(s: &str) -> CliResult<Shape> {
    let parts: Vec<&str> = s.split(['x', 'X', ',']).collect();
    let nums: Result<Vec<usize>, _> = parts.iter().map(|p| p.trim().parse::<usize>()).collect();
    match nums.as_deref() {
        Ok([b, t, v]) => Ok(Shape::new(*b, *t, *v)?),
        _ => Err(Failure(format!("--shape '{s}': expected BxTxV, e.g. 8x128x50000"))),
    }
}

/// Timings of one implementation, in milliseconds.
struct Timing {
    median_ms: f64,
    min_ms: f64,
}

impl Timing {
    /// From runs in seconds.
    fn of(runs: &[f64]) -> Timing {
        Timing { median_ms: median(runs) * 1e3, min_ms: min(runs) * 1e3 }
    }
    /// From runs in milliseconds.
    #[cfg(feature = "cuda")]
    fn of_ms(runs: &[f64]) -> Timing {
        Timing { median_ms: median(runs), min_ms: min(runs) }
    }
}

/// What `bench` measured, rendered as a table or one JSON object.
struct BenchReport {
    shape: Shape,
    dtype: DType,
    iters: usize,
    /// `backend`, then what describes it (`simd` and `threads`, or `device`), in print order.
    about: Vec<(&'static str, serde_json::Value)>,
    fused: Timing,
    floor: Timing,
    floor_name: &'static str,
    reference: Option<Timing>,
    loss: f64,
}

impl BenchReport {
    fn render(&self, as_json: bool) -> String {
        let bytes = self.shape.fused_bytes(self.dtype, self.dtype);
        let gbps = |ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
        if as_json {
            let mut j = json!({
                "median_ms": self.fused.median_ms,
                "min_ms": self.fused.min_ms,
                "gbps": gbps(self.fused.median_ms),
                "dtype": self.dtype.name(),
                "shape": [self.shape.batch(), self.shape.seq(), self.shape.vocab()],
                "threads": null,
                "bytes": bytes,
                "iters": self.iters,
                "floor_median_ms": self.floor.median_ms,
                "floor_gbps": gbps(self.floor.median_ms),
                "x_floor": self.fused.median_ms / self.floor.median_ms,
                "reference_median_ms": self.reference.as_ref().map(|r| r.median_ms),
                "reference_min_ms": self.reference.as_ref().map(|r| r.min_ms),
                "loss": self.loss,
            });
            for (k, v) in &self.about {
                j[*k] = v.clone();
            }
            return j.to_string();
        }
        let about: Vec<String> = self
            .about
            .iter()
            .map(|(k, v)| format!("{k} {}", v.as_str().map_or(v.to_string(), str::to_string)))
            .collect();
        let mut s = format!(
            "shape {}  dtype {}  {}  bytes moved {:.1} MB\n",
            self.shape,
            self.dtype,
            about.join("  "),
            bytes as f64 / 1e6
        );
        s += &format!("{:<26}{:>12}{:>12}{:>10}{:>10}\n", "", "median ms", "min ms", "GB/s", "x floor");
        let rows = [("fused loss+grad", Some(&self.fused)), (self.floor_name, Some(&self.floor))];
        for (name, t) in rows.into_iter().chain([("reference (f64, 1 thread)", self.reference.as_ref())]) {
            let Some(t) = t else { continue };
            s += &format!(
                "{name:<26}{:>12.3}{:>12.3}{:>10.1}{:>10.2}\n",
                t.median_ms,
                t.min_ms,
                gbps(t.median_ms),
                t.median_ms / self.floor.median_ms
            );
        }
        s.trim_end().to_string()
    }
}

/// `bench` on the GPU: device buffers, CUDA events, a device copy as the floor.
#[cfg(feature = "cuda")]
fn bench_cuda<L: Logit>(a: &BenchArgs, shape: Shape, spec: &LossSpec) -> CliResult<BenchReport> {
    let r = fused_weighted_loss::cuda::bench_device::<L>(spec, shape, a.warmup, a.iters.max(1))?;
    Ok(BenchReport {
        shape,
        dtype: L::DTYPE,
        iters: a.iters.max(1),
        about: vec![("backend", json!("cuda")), ("device", json!(r.device)), ("row_launch", json!(r.row_launch))],
        fused: Timing::of_ms(&r.fused_ms),
        floor: Timing::of_ms(&r.copy_ms),
        floor_name: "device copy (read+write)",
        reference: None,
        loss: r.loss,
    })
}

fn bench_typed<L: Logit>(a: &BenchArgs, shape: Shape, spec: &LossSpec) -> CliResult<BenchReport> {
    if spec.resolved_backend()? == Backend::Cuda {
        #[cfg(feature = "cuda")]
        return bench_cuda::<L>(a, shape, spec);
    }
    // logits, gradient and the two copy buffers: fail cleanly if they cannot be had
    let bytes = shape.fused_bytes(L::DTYPE, L::DTYPE);
    if Vec::<u8>::new().try_reserve_exact(bytes.saturating_mul(2)).is_err() {
        return Err(Failure(format!("shape {shape} needs {:.1} GB of memory for bench", bytes as f64 * 2e-9)));
    }
    let logits = synthetic::logits::<L>(1, shape.logits_len(), 4.0);
    let ids = synthetic::ids::<i64>(2, shape.rows(), shape.vocab());
    let mut grad = L::zeroed(shape.logits_len());
    // one checked run first: bad options fail here
    let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad))?;
    // fused pass and copy floor alternate, so machine drift affects both alike
    let mut copy = CopyBuffers::new(bytes / 2).ok_or_else(|| Failure("no memory for the copy floor".into()))?;
    let (fused, floor) = time_paired(
        a.warmup,
        a.iters.max(1),
        || {
            let r = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad));
            std::hint::black_box(r).ok();
        },
        || copy.copy(),
    );
    drop(copy);
    let reference = (a.reference_iters > 0).then(|| {
        Timing::of(&time_runs(0, a.reference_iters, || {
            let _ = std::hint::black_box(reference(spec, shape, &logits, Tokens::new(&ids)));
        }))
    });
    let simd = match spec.cpu_simd() {
        CpuSimd::Auto => fused_weighted_loss::cpu_simd_level(),
        level => level,
    };
    Ok(BenchReport {
        shape,
        dtype: L::DTYPE,
        iters: a.iters.max(1),
        about: vec![
            ("backend", json!(out.backend.to_string())),
            ("simd", json!(simd.to_string())),
            ("threads", json!(rayon::current_num_threads())),
        ],
        fused: Timing::of(&fused),
        floor: Timing::of(&floor),
        floor_name: "copy floor (read+write)",
        reference,
        loss: out.loss,
    })
}

fn bench(a: BenchArgs) -> CliResult<String> {
    let shape = parse_shape(&a.shape)?;
    let spec = LossSpec::builder().keywords([0, 1, 2]).backend(a.backend).cpu_simd(a.simd).build()?;
    let run = || -> CliResult<String> {
        let report = match a.dtype {
            DType::F32 => bench_typed::<f32>(&a, shape, &spec)?,
            DType::F16 => bench_typed::<f16>(&a, shape, &spec)?,
            DType::BF16 => bench_typed::<bf16>(&a, shape, &spec)?,
        };
        // a bench of a broken kernel is worthless
        if !report.loss.is_finite() {
            return Err(Failure(format!("bench produced a non-finite loss {}", report.loss)));
        }
        Ok(report.render(a.json))
    };
    match a.threads {
        Some(0) => Err(Failure("--threads must be at least 1".into())),
        Some(n) => rayon::ThreadPoolBuilder::new().num_threads(n).build()?.install(run),
        None => run(),
    }
}
