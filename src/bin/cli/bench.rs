//! `bench`: times loss + gradient on synthetic data against the copy floor and the float64
//! reference, after checking that the machine has the memory the run will take.

use crate::{json_f64, CliResult, Failure};
use clap::Args;
use fused_weighted_loss::measure::{median, min, time_paired, time_runs, CopyBuffers};
use fused_weighted_loss::reference::reference;
use fused_weighted_loss::{bf16, f16, synthetic, Backend, CpuSimd, DType, Grad, Logit, LossSpec, Shape, Tokens};
use serde_json::json;

#[derive(Args)]
pub struct BenchArgs {
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
    /// Timed runs of the fused pass (and of the copy floor), 1 to a million.
    #[arg(long, default_value_t = 15, value_parser = timed_count)]
    iters: usize,
    /// Untimed runs first, at most a million.
    #[arg(long, default_value_t = 3, value_parser = run_count)]
    warmup: usize,
    /// CPU threads (default: all cores; at most 4 per core).
    #[arg(long)]
    threads: Option<usize>,
    /// CPU instruction set: auto, avx512, avx2 or portable.
    #[arg(long, default_value = "auto")]
    simd: CpuSimd,
    /// Timed runs of the float64 reference (0 skips it), at most a million.
    #[arg(long, default_value_t = 2, value_parser = run_count)]
    reference_iters: usize,
    /// Refuse shapes that need more memory than this, in GB (default: the memory available now).
    #[arg(long)]
    max_memory: Option<f64>,
    #[command(flatten)]
    options: crate::LossOptionArgs,
    /// Per-token weights (random, in [0.5, 1.5)).
    #[arg(long)]
    token_weights: bool,
}

/// Most runs a count flag takes: a million runs of the smallest call are seconds, and each
/// timed run keeps its time (8 bytes), so a count this size cannot exhaust memory.
const MAX_RUNS: usize = 1_000_000;

/// A count of runs (`--iters`, `--warmup`, `--reference-iters`): 0 to [`MAX_RUNS`].
pub fn run_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= MAX_RUNS => Ok(n),
        Ok(_) => Err(format!("at most {MAX_RUNS}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A count of timed runs (`--iters`): 1 to [`MAX_RUNS`] (a median of no runs is no figure).
pub fn timed_count(s: &str) -> Result<usize, String> {
    match run_count(s)? {
        0 => Err("at least 1".to_string()),
        n => Ok(n),
    }
}

pub fn parse_shape(s: &str) -> CliResult<Shape> {
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
    /// How the host floor copied (the fastest candidate) and each candidate's median ms.
    floor_method: Option<(String, Vec<(String, f64)>)>,
    reference: Option<Timing>,
    loss: f64,
    /// What the run was estimated to need on the host, in bytes.
    memory_estimate: u64,
}

impl BenchReport {
    fn render(&self, as_json: bool) -> String {
        let bytes = self.shape.fused_bytes(self.dtype, self.dtype);
        let gbps = |ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
        if as_json {
            let mut j = json!({
                "median_ms": json_f64(self.fused.median_ms),
                "min_ms": json_f64(self.fused.min_ms),
                "gbps": json_f64(gbps(self.fused.median_ms)),
                "dtype": self.dtype.name(),
                "shape": [self.shape.batch(), self.shape.seq(), self.shape.vocab()],
                "threads": null,
                "bytes": bytes,
                "iters": self.iters,
                "floor_median_ms": json_f64(self.floor.median_ms),
                "floor_gbps": json_f64(gbps(self.floor.median_ms)),
                "x_floor": json_f64(self.fused.median_ms / self.floor.median_ms),
                "reference_median_ms": self.reference.as_ref().map(|r| json_f64(r.median_ms)),
                "reference_min_ms": self.reference.as_ref().map(|r| json_f64(r.min_ms)),
                "loss": json_f64(self.loss),
                "memory_estimate_bytes": self.memory_estimate,
                "peak_rss_bytes": peak_rss_bytes(),
            });
            for (k, v) in &self.about {
                j[*k] = v.clone();
            }
            if let Some((method, candidates)) = &self.floor_method {
                j["floor_method"] = json!(method);
                j["floor_candidates"] =
                    candidates.iter().map(|(m, ms)| json!({"method": m, "median_ms": json_f64(*ms)})).collect();
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
        if let Some((method, _)) = &self.floor_method {
            s += &format!("copy floor: the fastest of this run's copies: {method}\n");
        }
        s.trim_end().to_string()
    }
}

/// `bench` on the GPU: device buffers, CUDA events, a device copy as the floor.
#[cfg(feature = "cuda")]
fn bench_cuda<L: Logit>(a: &BenchArgs, shape: Shape, spec: &LossSpec) -> CliResult<BenchReport> {
    let r = fused_weighted_loss::cuda::bench_device::<L>(spec, shape, a.warmup, a.iters, a.token_weights)?;
    Ok(BenchReport {
        shape,
        dtype: L::DTYPE,
        iters: a.iters,
        about: vec![("backend", json!("cuda")), ("device", json!(r.device)), ("row_launch", json!(r.row_launch))],
        fused: Timing::of_ms(&r.fused_ms),
        floor: Timing::of_ms(&r.copy_ms),
        floor_name: "device copy (read+write)",
        floor_method: None,
        reference: None,
        loss: r.loss,
        memory_estimate: cuda_host_bytes(shape, L::DTYPE),
    })
}

fn bench_typed<L: Logit>(a: &BenchArgs, shape: Shape, spec: &LossSpec) -> CliResult<BenchReport> {
    if spec.resolved_backend()? == Backend::Cuda {
        #[cfg(feature = "cuda")]
        {
            check_memory(a, L::DTYPE, cuda_host_bytes(shape, L::DTYPE), None)?;
            return bench_cuda::<L>(a, shape, spec);
        }
    }
    // everything below, at its peak: refuse now rather than abort half-way
    let threads = rayon::current_num_threads();
    let need = host_bytes(shape, L::DTYPE, threads, a.reference_iters > 0);
    let without_reference = (a.reference_iters > 0).then(|| host_bytes(shape, L::DTYPE, threads, false));
    check_memory(a, L::DTYPE, need, without_reference)?;
    let bytes = shape.fused_bytes(L::DTYPE, L::DTYPE);
    let logits = synthetic::logits::<L>(1, shape.logits_len(), 4.0);
    let ids = synthetic::ids::<i64>(2, shape.rows(), shape.vocab());
    let weights: Vec<f32> = match a.token_weights {
        true => synthetic::logits::<f32>(3, shape.rows(), 0.5).iter().map(|w| w + 1.0).collect(),
        false => Vec::new(),
    };
    let tokens = match a.token_weights {
        true => Tokens::new(&ids).with_token_weights(&weights),
        false => Tokens::new(&ids),
    };
    let mut grad = L::zeroed(shape.logits_len());
    // one checked run first: bad options fail here
    let out = spec.loss_and_grad(shape, &logits, tokens, Grad::Into(&mut grad))?;
    // fused pass and copy floor alternate, so machine drift affects both alike
    let mut copy = CopyBuffers::new(bytes / 2).ok_or_else(|| Failure("no memory for the copy floor".into()))?;
    // the floor is the fastest copy this machine does for these bytes, picked in this run
    let (method, candidates) = copy.pick_fastest(3);
    let (fused, floor) = time_paired(
        a.warmup,
        a.iters,
        || {
            let r = spec.loss_and_grad(shape, &logits, tokens, Grad::Into(&mut grad));
            std::hint::black_box(r).ok();
        },
        || copy.copy(),
    );
    drop(copy);
    let reference = (a.reference_iters > 0).then(|| {
        Timing::of(&time_runs(0, a.reference_iters, || {
            let _ = std::hint::black_box(reference(spec, shape, &logits, tokens));
        }))
    });
    let simd = match spec.cpu_simd() {
        CpuSimd::Auto => fused_weighted_loss::cpu_simd_level(),
        level => level,
    };
    Ok(BenchReport {
        shape,
        dtype: L::DTYPE,
        iters: a.iters,
        about: vec![
            ("backend", json!(out.backend.to_string())),
            ("simd", json!(simd.to_string())),
            ("threads", json!(rayon::current_num_threads())),
        ],
        fused: Timing::of(&fused),
        floor: Timing::of(&floor),
        floor_name: "copy floor (read+write)",
        floor_method: Some((method.to_string(), candidates.iter().map(|(m, t)| (m.to_string(), t * 1e3)).collect())),
        reference,
        loss: out.loss,
        memory_estimate: need,
    })
}

/// Runs `bench`: checks the flags, then the memory, then times; returns the table or JSON.
pub fn bench(a: BenchArgs) -> CliResult<String> {
    let shape = parse_shape(&a.shape)?;
    check_threads(a.threads)?;
    if let Some(gb) = a.max_memory {
        if !(gb.is_finite() && gb > 0.0) {
            return Err(Failure(format!("--max-memory must be a positive number of GB, got {gb}")));
        }
    }
    // keywords 0, 1, 2 where the vocabulary has them
    let keywords = (0..3).filter(|&k| k < shape.vocab() as i64);
    let spec = a.options.apply(LossSpec::builder().keywords(keywords).backend(a.backend).cpu_simd(a.simd)).build()?;
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
    with_threads(a.threads, run)
}

/// Refuses a `--threads` of 0 or of more than [`MAX_THREADS_PER_CORE`] per core.
pub fn check_threads(threads: Option<usize>) -> CliResult<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match threads {
        Some(0) => Err(Failure("--threads must be at least 1".into())),
        Some(n) if n > MAX_THREADS_PER_CORE * cores => {
            let max = MAX_THREADS_PER_CORE * cores;
            Err(Failure(format!("--threads {n} is more than {max} ({MAX_THREADS_PER_CORE} per core, {cores} here)")))
        }
        _ => Ok(()),
    }
}

/// Runs `run` on a pool of `threads` threads (`None`: the global pool, all cores).
pub fn with_threads<T: Send>(threads: Option<usize>, run: impl FnOnce() -> CliResult<T> + Send) -> CliResult<T> {
    match threads {
        Some(n) => rayon::ThreadPoolBuilder::new().num_threads(n).build()?.install(run),
        None => run(),
    }
}

/// `--threads` beyond this many per core only adds scheduling overhead (and at the thousands,
/// spawning takes longer than the bench).
const MAX_THREADS_PER_CORE: usize = 4;

/// Bytes the bench holds at its peak on the host (an upper estimate): the process itself,
/// logits and gradient in `dtype`, the ids, the fused pass's per-row arrays and per-thread
/// scratch rows, and the larger of the copy floor's two buffers and the float64 reference's
/// gradient and rows.
fn host_bytes(shape: Shape, dtype: DType, threads: usize, reference: bool) -> u64 {
    // in u128: a shape near the address space's size must not wrap to a small estimate
    let (n, rows, v, b) =
        (shape.logits_len() as u128, shape.rows() as u128, shape.vocab() as u128, shape.batch() as u128);
    let s = dtype.size() as u128;
    let inputs = 2 * n * s + rows * 8;
    // targets (4), the row losses and z-loss parts (8 + 8), the plan's shifted token weights
    // (4); per sample a few f64 and the output vectors
    let per_call = rows * 24 + b * 80;
    // two scratch rows of f32 exponentials per thread (and two of chain factors with the
    // options), and the chunk buffers; token weights
    let scratch = threads as u128 * (4 * v * 4 + 64 * 1024) + rows * 4;
    let copy = 2 * n * s;
    // f64 gradient; ids and labels as i64, per-token losses and z-loss parts, their flat copy
    // (8 each); two rows of f64 logits
    let reference = if reference { n * 8 + rows * 40 + 2 * v * 8 } else { 0 };
    let total = PROCESS_BYTES + inputs + per_call + scratch + copy.max(reference);
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// Bytes the CUDA bench holds at its peak on the host (an upper estimate): the process, the
/// random logits (dropped once on the device), ids (i64) and token weights (f32). Gradient and
/// copy floor live on the device only, whose allocations fail with an error, not an abort.
#[cfg(feature = "cuda")]
fn cuda_host_bytes(shape: Shape, dtype: DType) -> u64 {
    let (n, rows) = (shape.logits_len() as u128, shape.rows() as u128);
    u64::try_from(PROCESS_BYTES + n * dtype.size() as u128 + rows * 12).unwrap_or(u64::MAX)
}

/// The process before any buffer: code, runtime, thread stacks in use (a few MB; with margin).
pub const PROCESS_BYTES: u128 = 32 << 20;

/// Refuses a run needing more than `--max-memory`, or than the memory available (Linux), or
/// than can be reserved (elsewhere), saying how much it needs.
fn check_memory(a: &BenchArgs, dtype: DType, need: u64, without_reference: Option<u64>) -> CliResult<()> {
    let (limit, what) = match a.max_memory {
        Some(gb) => (Some((gb * 1e9) as u64), "--max-memory"),
        None => (available_memory(), "the memory available"),
    };
    if fits(need, limit) {
        return Ok(());
    }
    let gb = |x: u64| x as f64 * 1e-9;
    let mut msg = format!("bench --shape {} --dtype {dtype} needs {:.2} GB of memory", a.shape, gb(need));
    match limit {
        Some(limit) => msg += &format!(", more than {what} ({:.2} GB)", gb(limit)),
        None => msg += ", more than can be reserved",
    }
    if let Some(w) = without_reference {
        msg += &format!("; with --reference-iters 0: {:.2} GB", gb(w));
    }
    Err(Failure(msg))
}

/// A field of /proc/meminfo or /proc/self/status given in kB, in bytes.
fn proc_kb(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Whether `need` bytes fit under `limit`, or (no limit known) can be reserved at all.
pub fn fits(need: u64, limit: Option<u64>) -> bool {
    match limit {
        Some(limit) => need <= limit,
        None => Vec::<u8>::new().try_reserve_exact(usize::try_from(need).unwrap_or(usize::MAX)).is_ok(),
    }
}

/// Memory the kernel says can be had without swapping (Linux), if known: `MemAvailable`, or
/// less where this process's control group has a nearer memory limit (a container's).
pub fn available_memory() -> Option<u64> {
    let host = proc_kb("/proc/meminfo", "MemAvailable:");
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok();
    let group = cgroup.and_then(|text| cgroup_room(std::path::Path::new("/sys/fs/cgroup"), &text));
    match (host, group) {
        (Some(h), Some(g)) => Some(h.min(g)),
        (h, g) => h.or(g),
    }
}

/// The least room under the memory limits of the control groups that `cgroups` (the text of
/// /proc/self/cgroup) names, and of their ancestors, as files under `root` (/sys/fs/cgroup)
/// say: v2 (`0::/path`: memory.max, memory.current) and v1's memory controller
/// (`N:memory:/path` under `root/memory`: memory.limit_in_bytes, memory.usage_in_bytes).
/// The room is the limit minus the usage, the inactive file cache counted as free (the kernel
/// reclaims it before it kills). `None` where no group has a limit this can read.
fn cgroup_room(root: &std::path::Path, cgroups: &str) -> Option<u64> {
    let mut least: Option<u64> = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (base, files) = if controllers.is_empty() {
            (root.to_path_buf(), ["memory.max", "memory.current", "inactive_file"])
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), ["memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"])
        } else {
            continue;
        };
        // the group and each ancestor up to the hierarchy's root (a limit anywhere above binds)
        let mut dir = base.join(path.trim_start_matches('/'));
        while dir.starts_with(&base) {
            if let Some(room) = room_in(&dir, files) {
                least = Some(least.map_or(room, |l| l.min(room)));
            }
            if !dir.pop() {
                break;
            }
        }
    }
    least
}

/// Limit minus usage (plus inactive file cache) from one group's files `[limit, usage, the
/// memory.stat key]`; `None` without a numeric limit ("max": none).
fn room_in(dir: &std::path::Path, [limit, usage, inactive]: [&str; 3]) -> Option<u64> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok()?.trim().parse::<u64>().ok();
    let (limit, usage) = (read(limit)?, read(usage)?);
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    let inactive =
        stat.lines().find_map(|l| l.strip_prefix(inactive)?.strip_prefix(' ')?.trim().parse::<u64>().ok()).unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(inactive)))
}

/// The process's peak resident memory so far (Linux), if known.
fn peak_rss_bytes() -> Option<u64> {
    proc_kb("/proc/self/status", "VmHWM:")
}

#[cfg(test)]
mod tests {
    use super::{cgroup_room, run_count, timed_count};
    use std::path::Path;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    #[test]
    fn memory_room_under_cgroup_limits() {
        let root = std::env::temp_dir().join(format!("fwl-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // v2: a limit of 1000 on the parent, 600 on the group (500 used, 200 of it inactive cache)
        write(&root.join("a"), &[("memory.max", "1000\n"), ("memory.current", "700\n")]);
        write(
            &root.join("a/b"),
            &[
                ("memory.max", "600\n"),
                ("memory.current", "500\n"),
                ("memory.stat", "active_file 9\ninactive_file 200\n"),
            ],
        );
        assert_eq!(cgroup_room(&root, "0::/a/b\n"), Some(300));
        // the parent binds when its room is less
        write(&root.join("a"), &[("memory.current", "950\n")]);
        assert_eq!(cgroup_room(&root, "0::/a/b\n"), Some(50));
        // no limit ("max") anywhere, or no such group: none
        write(&root.join("c"), &[("memory.max", "max\n"), ("memory.current", "5\n")]);
        assert_eq!(cgroup_room(&root, "0::/c\n"), None);
        assert_eq!(cgroup_room(&root, "0::/nowhere\n"), None);
        // v1: the memory controller's own hierarchy; other controllers' lines ignored
        write(
            &root.join("memory/d"),
            &[
                ("memory.limit_in_bytes", "4000\n"),
                ("memory.usage_in_bytes", "3000\n"),
                ("memory.stat", "inactive_file 7\ntotal_inactive_file 1000\n"),
            ],
        );
        assert_eq!(cgroup_room(&root, "5:cpu:/d\n4:cpuacct,memory:/d\n1:name=systemd:/\n"), Some(2000));
        assert_eq!(cgroup_room(&root, "garbage\n3:cpu:/d\n"), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn run_counts_go_up_to_a_million() {
        assert_eq!(run_count("0"), Ok(0));
        assert_eq!(run_count("1000000"), Ok(1_000_000));
        assert_eq!(run_count("1000001"), Err("at most 1000000".to_string()));
        assert!(run_count("18446744073709551616").is_err());
        assert!(run_count("-1").is_err());
        assert!(run_count("2.5").is_err());
    }

    #[test]
    fn timed_runs_are_at_least_one() {
        assert_eq!(timed_count("1"), Ok(1));
        assert_eq!(timed_count("1000000"), Ok(1_000_000));
        assert_eq!(timed_count("0"), Err("at least 1".to_string()));
        assert!(timed_count("1000001").is_err());
        assert!(timed_count("x").is_err());
    }
}
