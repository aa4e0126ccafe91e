//! `fused-weighted-loss`: evaluate the loss over .npy files, or benchmark it.
//!
//! `bench-linear` times the fused linear + weighted loss (see `cli/linear_bench.rs`).
//!
//! Any bad input, file or flag exits with code 2 and one line on stderr, nothing on stdout, and
//! leaves every existing file as it was (outputs are renamed into place only on success).

#[path = "cli/bench.rs"]
mod bench;
#[path = "cli/interrupt.rs"]
mod interrupt;
#[path = "cli/linear_bench.rs"]
mod linear_bench;
#[path = "cli/npy.rs"]
mod npy;
#[path = "cli/output.rs"]
mod output;
#[path = "cli/split_bench.rs"]
mod split_bench;

use clap::{Args, Parser, Subcommand};
use fused_weighted_loss::{
    bf16, f16, Backend, CpuSimd, DType, Grad, Logit, LossOutput, LossSpec, LossSpecBuilder, Reduction, RowMean, Shape,
    Tokens,
};
use npy::{peek_npy, read_npy, Elem, NpyData};
use output::{write_f32_npy, PendingOutput};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    Bench(bench::BenchArgs),
    /// Time the fused linear + weighted loss (hidden states and output weight, no logits).
    BenchLinear(linear_bench::BenchLinearArgs),
    /// Time one rank's kernels of a vocabulary-parallel split against the single-device pass on
    /// its slice (the exchange apart).
    BenchSplit(split_bench::BenchSplitArgs),
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
    /// CPU instruction set: auto, avx512, avx2 or portable (each gives the same bits on any
    /// machine that has it, whatever the thread count).
    #[arg(long, default_value = "auto")]
    simd: CpuSimd,
    /// CPU threads (default: all cores; at most 4 per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Fail on a non-finite per-position loss instead of propagating it.
    #[arg(long)]
    check_finite: bool,
    #[command(flatten)]
    options: LossOptionArgs,
    /// Per-token weights [B,T], float32, aligned with the labels (w[b, t+1] weights row t).
    #[arg(long)]
    token_weights: Option<PathBuf>,
    /// Write the gradient as float32 [B,T,V] here.
    #[arg(long)]
    grad_out: Option<PathBuf>,
    /// Write the per-token losses as float32 [B,T-1] here.
    #[arg(long)]
    token_loss_out: Option<PathBuf>,
}

/// The loss options both `eval` and `bench` take.
#[derive(Args)]
struct LossOptionArgs {
    /// z-loss coefficient: adds k * logsumexp^2 per token (reported apart as `z_loss`).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    z_loss: f64,
    /// Label smoothing epsilon in [0, 1] (as PyTorch's cross_entropy).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    label_smoothing: f64,
    /// Logit soft-cap c: the loss sees c * tanh(z / c) (default: off).
    #[arg(long, allow_hyphen_values = true)]
    softcap: Option<f64>,
}

impl LossOptionArgs {
    /// The options on a spec being built (validated by its `build`).
    fn apply(&self, b: LossSpecBuilder) -> LossSpecBuilder {
        b.z_loss(self.z_loss).label_smoothing(self.label_smoothing).softcap(self.softcap)
    }
}

/// A CLI failure: printed as one line, exit code 2.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

type CliResult<T> = Result<T, Failure>;

/// The flags whose values may begin with `-` (negative numbers, `-inf`, refused with the
/// option's own message rather than taken for flags).
const HYPHEN_VALUES: [&str; 6] =
    ["--keywords", "--alpha", "--ignore-index", "--z-loss", "--label-smoothing", "--softcap"];

/// One of [`HYPHEN_VALUES`] followed by a token that begins with `--`: a value left out, where
/// clap takes the next flag for the value and reports what follows it (`--keywords --alpha 2`
/// said "unexpected argument '2' found"). No value of these is a number beginning with `--`.
fn missing_value(args: &[std::ffi::OsString]) -> Option<String> {
    args.windows(2).find_map(|w| {
        let (flag, next) = (w[0].to_str()?, w[1].to_str()?);
        (HYPHEN_VALUES.contains(&flag) && next.starts_with("--")).then(|| {
            format!("error: a value is required for '{flag}' but none was supplied (the next is the flag '{next}')")
        })
    })
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // (only before `--`, where flags end)
    let end = args.iter().position(|a| a == "--").unwrap_or(args.len());
    if let Some(msg) = missing_value(&args[..end]) {
        say(&msg);
        return ExitCode::from(2);
    }
    let cli = match Cli::try_parse_from(&args) {
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
            say(&line.join(" "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Eval(a) => eval(a),
        Command::Bench(a) => bench::bench(a).map(|text| (text, Vec::new())),
        Command::BenchLinear(a) => linear_bench::bench_linear(a).map(|text| (text, Vec::new())),
        Command::BenchSplit(a) => split_bench::bench_split(a).map(|text| (text, Vec::new())),
    };
    // the report goes out after the output files are flushed and before they replace their
    // destinations: a report that cannot be written (a full device, a closed pipe) fails the
    // run with every file as it was
    let report = |text: String| {
        move || {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}")
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the report to stdout: {e}"))
        }
    };
    let failed = match result {
        Ok((text, outputs)) => match output::commit_all(outputs, report(text)) {
            Ok(()) => return ExitCode::SUCCESS,
            Err(msg) => msg,
        },
        Err(Failure(msg)) => msg,
    };
    say(&format!("error: {}", failed.replace('\n', " ")));
    ExitCode::from(2)
}

/// A line on stderr; a stderr that cannot take it (`2>/dev/full`, a closed pipe) changes
/// nothing (`eprintln!` would panic and exit 101, a status the README does not list).
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

enum LogitsData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

fn read_logits(path: &Path) -> CliResult<LogitsData> {
    let a = read_npy(path, &[Elem::F32, Elem::F16]).map_err(|e| format!("logits {}: {e}", path.display()))?;
    let data = match a.data {
        NpyData::F32(v) => LogitsData::F32(v),
        NpyData::F16(v) => LogitsData::F16(v),
        _ => unreachable!("read_npy returns the element types asked for"),
    };
    Ok(data)
}

fn read_ids(path: &Path, what: &str) -> CliResult<Vec<i64>> {
    let a = read_npy(path, &[Elem::I64, Elem::I32]).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let data = match a.data {
        NpyData::I64(v) => v,
        NpyData::I32(v) => {
            let mut wide = reserve::<i64>(v.len(), &format!("{what} as int64"))?;
            wide.extend(v.into_iter().map(i64::from));
            wide
        }
        _ => unreachable!("read_npy returns the element types asked for"),
    };
    Ok(data)
}

/// A float in the JSON output: a number when finite; else, since JSON has no such numbers, the
/// string "inf", "-inf" or "nan".
fn json_f64(x: f64) -> serde_json::Value {
    match x {
        x if x.is_finite() => json!(x),
        x if x.is_nan() => json!("nan"),
        x if x > 0.0 => json!("inf"),
        _ => json!("-inf"),
    }
}

fn json_f64s(xs: &[f64]) -> serde_json::Value {
    xs.iter().map(|&x| json_f64(x)).collect()
}

/// An empty vector with room for `n` elements, or an error naming `what` when the allocator
/// refuses (the large buffers of `eval`: an error and the temporary outputs removed, not an
/// abort that leaves them behind).
fn reserve<T>(n: usize, what: &str) -> CliResult<Vec<T>> {
    let mut v = Vec::new();
    match v.try_reserve_exact(n) {
        Ok(()) => Ok(v),
        Err(_) => {
            Err(Failure(format!("{what}: cannot allocate {:.2} GB", n as f64 * std::mem::size_of::<T>() as f64 * 1e-9)))
        }
    }
}

/// `n` zeros (see [`reserve`]).
fn zeros<T: Logit>(n: usize, what: &str) -> CliResult<Vec<T>> {
    let mut v = reserve(n, what)?;
    v.resize(n, T::from_f32(0.0));
    Ok(v)
}

fn convert<S: Logit, D: Logit>(src: &[S]) -> CliResult<Vec<D>> {
    let mut out = reserve(src.len(), &format!("the logits as {}", D::DTYPE))?;
    out.extend(src.iter().map(|x| D::from_f32(x.to_f32())));
    Ok(out)
}

/// The outputs `eval` writes, each into its temporary file (renamed into place by `eval` once
/// all went well).
struct Outputs {
    grad: Option<PendingOutput>,
    token_loss: Option<PendingOutput>,
}

fn eval_typed<L: Logit>(
    spec: &LossSpec,
    shape: Shape,
    logits: &[L],
    tokens: Tokens<'_, i64>,
    files: &mut Outputs,
) -> CliResult<LossOutput> {
    let mut g = match files.grad {
        Some(_) => zeros::<f32>(shape.logits_len(), "the gradient")?,
        None => Vec::new(),
    };
    let grad = if files.grad.is_some() { Grad::IntoF32(&mut g) } else { Grad::Skip };
    let out = match files.token_loss.as_mut() {
        None => spec.loss_and_grad(shape, logits, tokens, grad)?,
        Some(file) => {
            let dims = [shape.batch(), shape.seq() - 1];
            let mut per_token = zeros::<f32>(dims[0] * dims[1], "the per-token losses")?;
            let out = spec.loss_and_grad_per_token(shape, logits, tokens, grad, &mut per_token)?;
            write_f32_npy(file.writer(), &dims, &per_token).map_err(|e| file.error(e))?;
            out
        }
    };
    if let Some(file) = files.grad.as_mut() {
        write_f32_npy(file.writer(), &[shape.batch(), shape.seq(), shape.vocab()], &g).map_err(|e| file.error(e))?;
    }
    Ok(out)
}

/// Reads per-token weights: float32 `[B, T]` (the shape checked from the header, in
/// [`check_inputs`]).
fn read_token_weights(path: &Path) -> CliResult<Vec<f32>> {
    let a = read_npy(path, &[Elem::F32]).map_err(|e| format!("token weights {}: {e}", path.display()))?;
    match a.data {
        NpyData::F32(v) => Ok(v),
        _ => unreachable!("read_npy returns the element types asked for"),
    }
}

/// The shape and dtype `eval` runs, from the inputs' headers (every shape checked), after checking that
/// its buffers fit in the memory available: the logits as read and in `--dtype`, the gradient
/// and per-token losses asked for, the ids, labels and token weights (the library's per-row
/// plan and the process beside them).
fn check_inputs(a: &EvalArgs, files: &Outputs) -> CliResult<(Shape, DType)> {
    let peek = |path: &Path, what: &str, accept: &[Elem]| {
        peek_npy(path, accept).map_err(|e| Failure(format!("{what} {}: {e}", path.display())))
    };
    let logits = peek(&a.logits, "logits", &[Elem::F32, Elem::F16])?;
    let ids = peek(&a.inputs, "inputs", &[Elem::I64, Elem::I32])?;
    let shape = Shape::from_dims(&logits.dims, &ids.dims)?;
    let mut need = logits.bytes() as u128 + bench::PROCESS_BYTES;
    let (n, rows) = (shape.logits_len() as u128, shape.rows() as u128);
    let file_dtype = if logits.elem == Elem::F32 { DType::F32 } else { DType::F16 };
    let dtype = a.dtype.unwrap_or(file_dtype);
    if dtype != file_dtype {
        need += n * dtype.size() as u128;
    }
    if files.grad.is_some() {
        need += 4 * n;
    }
    if files.token_loss.is_some() {
        need += 4 * rows;
    }
    // ids and labels as int64 (an int32 file read first), token weights, the plan's rows
    need += (8 + 4 * (ids.elem == Elem::I32) as u128) * rows + 24 * rows;
    if let Some(p) = &a.labels {
        let labels = peek(p, "labels", &[Elem::I64, Elem::I32])?;
        shape.check_token_dims("labels", &labels.dims)?;
        need += (8 + 4 * (labels.elem == Elem::I32) as u128) * rows;
    }
    if let Some(p) = &a.token_weights {
        shape.check_token_dims("token_weights", &peek(p, "token weights", &[Elem::F32])?.dims)?;
        need += 4 * rows;
    }
    let need = u64::try_from(need).unwrap_or(u64::MAX);
    let limit = bench::available_memory();
    if bench::fits(need, limit) {
        return Ok((shape, dtype));
    }
    let gb = |x: u64| format!("{:.2} GB", x as f64 * 1e-9);
    Err(Failure(match limit {
        Some(l) => format!("eval of {shape} {dtype} needs {}, more than the memory available ({})", gb(need), gb(l)),
        None => format!("eval of {shape} {dtype} needs {}, more than can be reserved", gb(need)),
    }))
}

/// The report of `eval` and its outputs, flushed but not yet in place.
fn eval(a: EvalArgs) -> CliResult<(String, Vec<PendingOutput>)> {
    let spec = LossSpec::builder()
        .keywords(a.keywords.iter().copied())
        .alpha(a.alpha)
        .ignore_index(a.ignore_index)
        .row_mean(a.row_mean)
        .reduction(a.reduction)
        .check_finite(a.check_finite)
        .backend(a.backend)
        .cpu_simd(a.simd);
    let spec = a.options.apply(spec).build()?;
    bench::check_threads(a.threads)?;
    // before any work: the outputs are none of the inputs (nor each other), and their temporary
    // files can be created
    let inputs = [
        ("--logits", Some(&a.logits)),
        ("--inputs", Some(&a.inputs)),
        ("--labels", a.labels.as_ref()),
        ("--token-weights", a.token_weights.as_ref()),
    ];
    let inputs: Vec<(&str, &Path)> = inputs.iter().filter_map(|&(f, p)| Some((f, p?.as_path()))).collect();
    let grad = a.grad_out.as_deref().map(|p| PendingOutput::create("--grad-out", p, &inputs)).transpose()?;
    let token_loss =
        a.token_loss_out.as_deref().map(|p| PendingOutput::create("--token-loss-out", p, &inputs)).transpose()?;
    if let (Some(g), Some(t)) = (&grad, &token_loss) {
        if g.same_destination(t) {
            return Err(Failure(t.error("is the same file as --grad-out")));
        }
    }
    let mut files = Outputs { grad, token_loss };
    // then the headers: shapes, and the memory the run needs, before any data is read
    let (shape, dtype) = check_inputs(&a, &files)?;
    let logits = read_logits(&a.logits)?;
    let ids = read_ids(&a.inputs, "inputs")?;
    let labels = a.labels.as_deref().map(|p| read_ids(p, "labels")).transpose()?;
    let token_weights = a.token_weights.as_deref().map(read_token_weights).transpose()?;
    let mut tokens = match &labels {
        Some(y) => Tokens::new(&ids).with_labels(y),
        None => Tokens::new(&ids),
    };
    if let Some(w) = &token_weights {
        tokens = tokens.with_token_weights(w);
    }
    let g = &mut files;
    let out = bench::with_threads(a.threads, || {
        Ok(match (&logits, dtype) {
            (LogitsData::F32(l), DType::F32) => eval_typed(&spec, shape, l, tokens, g)?,
            (LogitsData::F32(l), DType::F16) => eval_typed(&spec, shape, &convert::<f32, f16>(l)?, tokens, g)?,
            (LogitsData::F32(l), DType::BF16) => eval_typed(&spec, shape, &convert::<f32, bf16>(l)?, tokens, g)?,
            (LogitsData::F16(l), DType::F32) => eval_typed(&spec, shape, &convert::<f16, f32>(l)?, tokens, g)?,
            (LogitsData::F16(l), DType::F16) => eval_typed(&spec, shape, l, tokens, g)?,
            (LogitsData::F16(l), DType::BF16) => eval_typed(&spec, shape, &convert::<f16, bf16>(l)?, tokens, g)?,
        })
    })?;
    let outputs = [files.grad, files.token_loss].into_iter().flatten().collect();
    let report = json!({
        "loss": json_f64(out.loss),
        "z_loss": json_f64(out.z_loss),
        "per_sample_loss": json_f64s(&out.per_sample_loss),
        "weights": json_f64s(&out.weights),
        "valid_tokens": out.valid_tokens,
        "backend": out.backend.to_string(),
        "dtype": dtype.name(),
        "shape": [shape.batch(), shape.seq(), shape.vocab()],
    });
    Ok((report.to_string(), outputs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_where_a_value_belongs_is_a_missing_value() {
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let msg = missing_value(&args(&["fwl", "eval", "--keywords", "--alpha", "2"])).unwrap();
        assert!(msg.contains("'--keywords'") && msg.contains("'--alpha'"), "{msg}");
        assert!(missing_value(&args(&["fwl", "eval", "--alpha", "--z-loss", "1"])).is_some());
        // negative numbers and -inf are values; other flags are not checked here
        for ok in [&["--alpha", "-1"][..], &["--keywords", "-3,-4"], &["--softcap", "-inf"], &["--labels", "--x"]] {
            assert_eq!(missing_value(&args(ok)), None, "{ok:?}");
        }
    }

    #[test]
    fn json_floats_tell_non_finite_values_apart() {
        assert_eq!(json_f64(4.0e38), json!(4.0e38));
        assert_eq!(json_f64(-0.5), json!(-0.5));
        assert_eq!(json_f64(f64::INFINITY), json!("inf"));
        assert_eq!(json_f64(f64::NEG_INFINITY), json!("-inf"));
        assert_eq!(json_f64(f64::NAN), json!("nan"));
        assert_eq!(json_f64s(&[1.0, f64::NAN]).to_string(), r#"[1.0,"nan"]"#);
    }
}
