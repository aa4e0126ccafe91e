//! The command-line contract, end to end on .npy files the test writes.
#![cfg(feature = "cli")]

mod common;

use common::rel;
use fused_weighted_loss::reference::{reference, rel_err};
use fused_weighted_loss::{f16, LossSpec, RowMean, Shape, Tokens};
use npyz::WriterBuilder;
use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fused-weighted-loss"))
}

/// A folder of this test's own under the temporary one, removed when dropped (also when the
/// test fails: a failed run leaves nothing behind).
fn tmpdir(name: &str) -> common::host_cxx::TempDir {
    common::host_cxx::TempDir::new(&format!("cli-{name}"))
}

fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, dims: &[u64], data: &[T]) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = npyz::WriteOptions::new().default_dtype().shape(dims).writer(f).begin_nd().unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}

fn read_f32_npy(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let npy = npyz::NpyFile::new(std::fs::File::open(path).unwrap()).unwrap();
    let dims = npy.shape().to_vec();
    (dims, npy.into_vec::<f32>().unwrap())
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Run {
    let o = bin().args(args).output().unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

fn json(r: &Run) -> serde_json::Value {
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert_eq!(r.stdout.trim().lines().count(), 1, "exactly one JSON object: {}", r.stdout);
    serde_json::from_str(r.stdout.trim()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn eval_matches_reference_f32_with_grad() {
    let d = tmpdir("f32");
    let shape = Shape::new(3, 6, 257).unwrap();
    let (logits, ids) = common::random_inputs::<f32>(41, shape, 3.0);
    write_npy(&d.join("L.npy"), &[3, 6, 257], &logits);
    write_npy(&d.join("I.npy"), &[3, 6], &ids);
    let kw = [ids[1], ids[7], ids[7]];
    let spec = LossSpec::builder().keywords(kw).build().unwrap();
    let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
    let kws = format!("{},{},{}", kw[0], kw[1], kw[2]);
    let g = d.join("G.npy");
    let out = run(&[
        "eval",
        "--logits",
        s(&d.join("L.npy")),
        "--inputs",
        s(&d.join("I.npy")),
        "--keywords",
        &kws,
        "--grad-out",
        s(&g),
    ]);
    let j = json(&out);
    assert!(rel(j["loss"].as_f64().unwrap(), r.loss) <= 1e-5);
    assert!(rel_err(&floats(&j["per_sample_loss"]), &r.per_sample_loss) <= 1e-5);
    assert_eq!(floats(&j["weights"]), r.weights);
    assert_eq!(j["dtype"], "f32");
    assert_eq!(j["backend"], "cpu");
    let (dims, grad) = read_f32_npy(&g);
    assert_eq!(dims, vec![3, 6, 257]);
    assert!(rel_err(&grad, &r.grad) <= 1e-5);
}

#[test]
fn eval_options_token_weights_and_per_token_losses_match_reference() {
    let d = tmpdir("options");
    let shape = Shape::new(2, 5, 301).unwrap();
    let (logits, ids) = common::random_inputs::<f32>(43, shape, 4.0);
    let w: Vec<f32> = (0..shape.rows()).map(|i| (i % 3) as f32 * 0.75).collect();
    write_npy(&d.join("L.npy"), &[2, 5, 301], &logits);
    write_npy(&d.join("I.npy"), &[2, 5], &ids);
    write_npy(&d.join("W.npy"), &[2, 5], &w);
    let spec = LossSpec::builder().z_loss(1e-3).label_smoothing(0.2).softcap(5.0).build().unwrap();
    let r = reference(&spec, shape, &logits, Tokens::new(&ids).with_token_weights(&w)).unwrap();
    let (g, p) = (d.join("G.npy"), d.join("P.npy"));
    let out = run(&[
        "eval",
        "--logits",
        s(&d.join("L.npy")),
        "--inputs",
        s(&d.join("I.npy")),
        "--token-weights",
        s(&d.join("W.npy")),
        "--z-loss",
        "1e-3",
        "--label-smoothing",
        "0.2",
        "--softcap",
        "5",
        "--backend",
        "cpu",
        "--grad-out",
        s(&g),
        "--token-loss-out",
        s(&p),
    ]);
    let j = json(&out);
    assert!(rel(j["loss"].as_f64().unwrap(), r.loss) <= 1e-5);
    assert!(rel(j["z_loss"].as_f64().unwrap(), r.z_loss) <= 1e-5);
    let (dims, grad) = read_f32_npy(&g);
    assert_eq!(dims, vec![2, 5, 301]);
    assert!(rel_err(&grad, &r.grad) <= 1e-5);
    let (dims, per_token) = read_f32_npy(&p);
    assert_eq!(dims, vec![2, 4]);
    assert!(rel_err(&per_token, &r.token_loss) <= 1e-5);
}

#[test]
fn eval_labels_int32_f16_and_dtype_rounding() {
    let d = tmpdir("f16");
    let shape = Shape::new(2, 5, 100).unwrap();
    let (logits, ids) = common::random_inputs::<f16>(43, shape, 3.0);
    let ids32: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let mut labels = ids32.clone();
    labels[2] = -100;
    labels[8] = -100;
    write_npy(&d.join("L.npy"), &[2, 5, 100], &logits);
    write_npy(&d.join("I.npy"), &[2, 5], &ids32);
    write_npy(&d.join("Y.npy"), &[2, 5], &labels);
    let spec = LossSpec::builder().row_mean(RowMean::ValidTokens).alpha(0.5).build().unwrap();
    let r = reference(&spec, shape, &logits, Tokens::new(&ids32).with_labels(&labels)).unwrap();
    let (lp, ip, yp) = (d.join("L.npy"), d.join("I.npy"), d.join("Y.npy"));
    let mut args = vec!["eval", "--logits", s(&lp), "--inputs", s(&ip), "--labels", s(&yp)];
    args.extend(["--row-mean", "valid", "--alpha", "0.5"]);
    let j = json(&run(&args));
    assert_eq!(j["dtype"], "f16");
    assert!(rel(j["loss"].as_f64().unwrap(), r.loss) <= 1e-5);
    assert_eq!(j["valid_tokens"], serde_json::json!([3, 3]));
    // --dtype bf16 rounds the f16 logits to bf16 first
    let bf: Vec<fused_weighted_loss::bf16> =
        logits.iter().map(|x| fused_weighted_loss::bf16::from_f32(x.to_f32())).collect();
    let rb = reference(&spec, shape, &bf, Tokens::new(&ids32).with_labels(&labels)).unwrap();
    args.extend(["--dtype", "bf16"]);
    let j = json(&run(&args));
    assert_eq!(j["dtype"], "bf16");
    assert!(rel(j["loss"].as_f64().unwrap(), rb.loss) <= 1e-5);
    assert!(rel(j["loss"].as_f64().unwrap(), r.loss) > 0.0, "bf16 rounding changes the loss");
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let r = run(args);
    assert_eq!(r.code, 2, "{args:?}: exit code (stderr {})", r.stderr);
    assert!(r.stdout.is_empty(), "{args:?}: stdout must be empty, got {}", r.stdout);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{args:?}: one line on stderr, got {:?}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
    assert!(r.stderr.to_lowercase().contains(&needle.to_lowercase()), "{args:?}: {:?} lacks {needle:?}", r.stderr);
}

#[test]
fn bad_inputs_exit_2_with_one_line() {
    let d = tmpdir("bad");
    let shape = Shape::new(2, 4, 10).unwrap();
    let (logits, ids) = common::random_inputs::<f32>(47, shape, 1.0);
    let (l, i) = (d.join("L.npy"), d.join("I.npy"));
    write_npy(&l, &[2, 4, 10], &logits);
    write_npy(&i, &[2, 4], &ids);
    let l64: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    write_npy(&d.join("L64.npy"), &[2, 4, 10], &l64);
    write_npy(&d.join("L2.npy"), &[8, 10], &logits);
    write_npy(&d.join("I3.npy"), &[2, 3], &ids[..6]);
    let mut bad = ids.clone();
    bad[3] = 10;
    write_npy(&d.join("Ibad.npy"), &[2, 4], &bad);
    write_npy(&d.join("Ifloat.npy"), &[2, 4], &logits[..8]);
    std::fs::write(d.join("junk.npy"), b"not an npy file at all").unwrap();
    let (l, i) = (s(&l), s(&i));
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let (l64, l2, i3, ibad, ifl, junk, missing) =
        (p("L64.npy"), p("L2.npy"), p("I3.npy"), p("Ibad.npy"), p("Ifloat.npy"), p("junk.npy"), p("nope.npy"));

    assert_usage_error(&["eval", "--logits", &missing, "--inputs", i], "nope.npy");
    assert_usage_error(&["eval", "--logits", &junk, "--inputs", i], "not a .npy");
    assert_usage_error(&["eval", "--logits", &l64, "--inputs", i], "float32");
    assert_usage_error(&["eval", "--logits", &l2, "--inputs", i], "rank 3");
    assert_usage_error(&["eval", "--logits", l, "--inputs", &i3], "shape mismatch");
    assert_usage_error(&["eval", "--logits", l, "--inputs", &ibad], "outside [0, 10)");
    assert_usage_error(&["eval", "--logits", l, "--inputs", &ifl], "int64");
    assert_usage_error(&["eval", "--logits", l, "--inputs", i, "--labels", &i3], "labels");
    assert_usage_error(&["eval", "--logits", l, "--inputs", i, "--keywords", "3,99"], "keyword id 99");
    assert_usage_error(&["eval", "--logits", l, "--inputs", i, "--keywords", "3,x"], "x");
    assert_usage_error(&["eval", "--logits", l, "--inputs", i, "--alpha", "-1"], "alpha");
    assert_usage_error(&["eval", "--logits", l, "--inputs", i, "--alpha", "nan"], "alpha");
    assert_usage_error(&["eval", "--logits", l, "--inputs", i, "--dtype", "f64"], "f64");
    assert_usage_error(&["eval", "--logits", l, "--inputs", i, "--row-mean", "median"], "median");
    assert_usage_error(&["eval", "--logits", l, "--inputs", i, "--frobnicate"], "frobnicate");
    assert_usage_error(&["eval", "--logits", l], "--inputs");
    assert_usage_error(&["eval", "--logits", l, "--inputs", i, "--grad-out", "/nonexistent-dir/G.npy"], "grad-out");
    assert_usage_error(&["train"], "train");
    assert_usage_error(&["bench", "--shape", "8x128"], "bxtxv");
    assert_usage_error(&["bench", "--shape", "0x128x10"], "batch size is 0");
    assert_usage_error(&["bench", "--shape", "2x1x10"], "sequence length");
    assert_usage_error(&["bench", "--shape", "2x2x10", "--threads", "0"], "threads");
    assert_usage_error(&["bench", "--shape", "1000000x1000000x1000000"], "memory");
    if fused_weighted_loss::cuda_status().is_err() {
        assert_usage_error(&["eval", "--logits", l, "--inputs", i, "--backend", "cuda"], "not available");
        assert_usage_error(&["bench", "--shape", "2x2x10", "--backend", "cuda"], "not available");
    }
}

#[test]
fn bench_json_contract() {
    let j = json(&run(&["bench", "--shape", "2x8x3000", "--json", "--iters", "3", "--warmup", "1", "--dtype", "bf16"]));
    for key in ["median_ms", "min_ms", "gbps", "floor_median_ms", "x_floor"] {
        let x = j[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {j}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    assert!(j["min_ms"].as_f64().unwrap() <= j["median_ms"].as_f64().unwrap());
    assert_eq!(j["backend"], "cpu");
    assert_eq!(j["dtype"], "bf16");
    assert_eq!(j["shape"], serde_json::json!([2, 8, 3000]));
    assert!(j["threads"].as_u64().unwrap() >= 1);
    assert!(j["reference_median_ms"].as_f64().unwrap() > 0.0);
    let text = run(&["bench", "--shape", "2x4x1000", "--iters", "2", "--threads", "1"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        text.stdout.contains("fused loss+grad")
            && text.stdout.contains("copy floor")
            && text.stdout.contains("threads 1")
    );
}

#[test]
fn bench_split_json_contract() {
    // one rank of 3 holds ⌈3001 / 3⌉ = 1001 columns, chunked as a rank of that group would be
    let args = ["bench-split", "--shape", "2x8x3001", "--ranks", "3", "--json", "--iters", "3", "--warmup", "1"];
    let j = json(&run(&[&args[..], &["--backend", "cpu"]].concat()));
    for key in ["single_ms", "split_ms", "ratio", "paired_ratio", "loss"] {
        let x = j[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {j}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    assert_eq!(j["backend"], "cpu");
    assert_eq!(j["shape"], serde_json::json!([2, 8, 3001]));
    assert_eq!(j["slice"], 1001);
    assert_eq!(j["chunk_rows"], fused_weighted_loss::parallel::default_chunk_rows(3001, 3));
    let r = run(&[
        "bench-split",
        "--shape",
        "2x5x700",
        "--ranks",
        "2",
        "--chunk-rows",
        "3",
        "--iters",
        "2",
        "--dtype",
        "bf16",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("one rank of 2") && r.stdout.contains("chunks of 3 rows"), "{}", r.stdout);
    let p = run(&["bench-split", "--shape", "2x5x700", "--ranks", "2", "--iters", "2", "--simd", "portable"]);
    assert_eq!(p.code, 0, "{}", p.stderr);
    assert!(p.stdout.contains("simd portable"), "{}", p.stdout);
    assert_usage_error(&["bench-split", "--shape", "2x4x10", "--ranks", "0"], "ranks");
    assert_usage_error(&["bench-split", "--shape", "2x4x10", "--ranks", "11"], "ranks");
    assert_usage_error(&["bench-split", "--shape", "2x4x10", "--chunk-rows", "0"], "chunk-rows");
    assert_usage_error(&["bench-split", "--shape", "2x4"], "bxtxv");
    if fused_weighted_loss::cuda_status().is_err() {
        assert_usage_error(&["bench-split", "--shape", "2x4x10", "--ranks", "2", "--backend", "cuda"], "not available");
    }
}

#[test]
fn eval_pins_the_simd_level_and_threads_with_the_same_bits() {
    // a level gives the same bits whatever the thread count; every level agrees with the
    // reference; a level this CPU lacks and --threads 0 are one-line errors
    let d = tmpdir("simd");
    let shape = Shape::new(4, 9, 3001).unwrap();
    let (logits, ids) = common::random_inputs::<f32>(53, shape, 4.0);
    write_npy(&d.join("L.npy"), &[4, 9, 3001], &logits);
    write_npy(&d.join("I.npy"), &[4, 9], &ids);
    let r = reference(&LossSpec::default(), shape, &logits, Tokens::new(&ids)).unwrap();
    let (l, i) = (d.join("L.npy"), d.join("I.npy"));
    for level in common::cpu_levels() {
        let name = level.to_string();
        let mut seen: Option<(String, Vec<u8>)> = None;
        for threads in ["1", "3"] {
            let g = d.join(format!("G-{name}-{threads}.npy"));
            let args = [
                "eval",
                "--logits",
                s(&l),
                "--inputs",
                s(&i),
                "--simd",
                &name,
                "--threads",
                threads,
                "--grad-out",
                s(&g),
            ];
            let j = json(&run(&args));
            assert!(rel(j["loss"].as_f64().unwrap(), r.loss) <= 1e-5, "{name}");
            let (_, grad) = read_f32_npy(&g);
            assert!(rel_err(&grad, &r.grad) <= 1e-5, "{name}");
            let now = (j["loss"].to_string(), std::fs::read(&g).unwrap());
            if let Some(first) = &seen {
                assert!(first == &now, "{name}: --threads {threads} changed the bits");
            }
            seen = Some(now);
        }
    }
    assert_usage_error(
        &["eval", "--logits", s(&l), "--inputs", s(&i), "--threads", "0"],
        "--threads must be at least 1",
    );
    if !fused_weighted_loss::cpu_simd_supported(fused_weighted_loss::CpuSimd::Avx512) {
        assert_usage_error(&["eval", "--logits", s(&l), "--inputs", s(&i), "--simd", "avx512"], "avx512");
    }
}
