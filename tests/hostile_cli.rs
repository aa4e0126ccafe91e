//! The CLI under hostile input: every bad case exits 2 with one line on stderr and nothing on
//! stdout, within a time bound, and leaves the directory it ran in exactly as it was (every
//! file byte for byte, no file added or removed). Each run is killed, and the test fails, if it
//! takes longer than [`LIMIT`].
#![cfg(feature = "cli")]

mod common;
#[path = "common/npy_raw.rs"]
mod npy_raw;

use npy_raw::npy_raw;
use npyz::WriterBuilder;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Far above what any of these runs needs; a 26-deep header once took over a minute, and
/// `--threads 100000` spawned threads for minutes before it was refused: the watchdog that
/// catches such a run (no test here asserts a time of its own: speed lives in the benches).
const LIMIT: Duration = Duration::from_secs(20);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary in `dir`; kills it (and fails) past [`LIMIT`].
fn run_in(dir: &Path, args: &[&str]) -> Run {
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fused-weighted-loss"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // stdout and stderr are read on threads so a chatty child cannot block on a full pipe
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let read_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut s).unwrap();
        s
    });
    let read_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut s).unwrap();
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > LIMIT {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{args:?}: still running after {LIMIT:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&read_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&read_err.join().unwrap()).into_owned(),
    }
}

/// Everything in a directory: name -> (kind, permissions, contents or link target).
type Snapshot = BTreeMap<String, (&'static str, u32, Vec<u8>)>;

fn snapshot(dir: &Path) -> Snapshot {
    let mut s = Snapshot::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let mode = permission_bits(&m);
        let entry = if m.file_type().is_symlink() {
            ("link", mode, std::fs::read_link(e.path()).unwrap().to_string_lossy().as_bytes().to_vec())
        } else if m.is_file() {
            ("file", mode, std::fs::read(e.path()).unwrap())
        } else {
            ("other", mode, Vec::new())
        };
        s.insert(e.file_name().to_string_lossy().into_owned(), entry);
    }
    s
}

#[cfg(unix)]
fn permission_bits(m: &std::fs::Metadata) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&m.permissions())
}

#[cfg(not(unix))]
fn permission_bits(m: &std::fs::Metadata) -> u32 {
    m.permissions().readonly() as u32
}

/// Runs a case that must fail: exit 2, one line on stderr naming `needle`, empty stdout, and
/// the directory unchanged.
fn assert_refused(dir: &Path, args: &[&str], needle: &str) -> Run {
    let before = snapshot(dir);
    let r = run_in(dir, args);
    assert_eq!(r.code, Some(2), "{args:?}: exit code (stderr {:?}, stdout {:?})", r.stderr, r.stdout);
    assert!(r.stdout.is_empty(), "{args:?}: stdout must be empty, got {:?}", r.stdout);
    assert_eq!(r.stderr.lines().count(), 1, "{args:?}: one line on stderr, got {:?}", r.stderr);
    assert!(r.stderr.ends_with('\n') && !r.stderr.contains("panicked"), "{args:?}: {:?}", r.stderr);
    assert!(r.stderr.to_lowercase().contains(&needle.to_lowercase()), "{args:?}: {:?} lacks {needle:?}", r.stderr);
    let after = snapshot(dir);
    for (name, was) in &before {
        assert_eq!(after.get(name), Some(was), "{args:?}: {name} changed or vanished");
    }
    let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert!(added.is_empty(), "{args:?}: left {added:?} behind");
    r
}

fn ok_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let r = run_in(dir, args);
    assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", r.stdout))
}

/// A directory of its own for one test, removed afterwards unless the test failed.
struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn fresh_dir(name: &str) -> TestDir {
    let d = std::env::temp_dir().join(format!("fwl-hostile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TestDir(d)
}

fn npy<T: npyz::AutoSerialize + Copy>(dims: &[u64], data: &[T]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = npyz::WriteOptions::new().default_dtype().shape(dims).writer(&mut buf).begin_nd().unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
    buf
}

/// L.npy [2,4,10] f32, I.npy [2,4] i64 (valid), G.npy (a pre-existing output), Lnan.npy (a NaN
/// at a target logit), Ibad.npy (an id out of range).
fn fixtures(name: &str) -> TestDir {
    let d = fresh_dir(name);
    let shape = fused_weighted_loss::Shape::new(2, 4, 10).unwrap();
    let (logits, ids) = common::random_inputs::<f32>(5, shape, 2.0);
    std::fs::write(d.join("L.npy"), npy(&[2, 4, 10], &logits)).unwrap();
    std::fs::write(d.join("I.npy"), npy(&[2, 4], &ids)).unwrap();
    std::fs::write(d.join("G.npy"), b"a file the user wants to keep").unwrap();
    let mut nan = logits.clone();
    nan[ids[1] as usize] = f32::NAN; // row (0, 0) predicts ids[1]
    std::fs::write(d.join("Lnan.npy"), npy(&[2, 4, 10], &nan)).unwrap();
    let mut bad = ids.clone();
    bad[5] = 10;
    std::fs::write(d.join("Ibad.npy"), npy(&[2, 4], &bad)).unwrap();
    d
}

#[test]
fn a_failed_eval_never_touches_an_existing_file() {
    let d = fixtures("keep");
    let eval = ["eval", "--logits", "L.npy", "--inputs", "I.npy"];
    let with = |extra: &[&'static str]| -> Vec<&str> { eval.iter().chain(extra).copied().collect() };
    // as reported: each of these deleted the file named by --grad-out
    assert_refused(&d, &with(&["--grad-out", "I.npy", "--keywords", "99"]), "same file");
    assert_refused(
        &d,
        &["eval", "--logits", "Lnan.npy", "--inputs", "I.npy", "--grad-out", "Lnan.npy", "--check-finite"],
        "same file",
    );
    assert_refused(
        &d,
        &["eval", "--logits", "L.npy", "--inputs", "Ibad.npy", "--grad-out", "G.npy"],
        "outside [0, 10)",
    );
    // errors found at every later stage leave G.npy as it was
    assert_refused(&d, &with(&["--grad-out", "G.npy", "--keywords", "99"]), "keyword id 99");
    assert_refused(
        &d,
        &["eval", "--logits", "Lnan.npy", "--inputs", "I.npy", "--grad-out", "G.npy", "--check-finite"],
        "non-finite",
    );
    assert_refused(&d, &with(&["--grad-out", "G.npy", "--labels", "missing.npy"]), "missing.npy");
    assert_refused(&d, &["eval", "--logits", "missing.npy", "--inputs", "I.npy", "--grad-out", "G.npy"], "missing.npy");
    assert_refused(&d, &["eval", "--logits", "I.npy", "--inputs", "I.npy", "--grad-out", "G.npy"], "float32");
    assert_refused(&d, &with(&["--grad-out", "G.npy", "--dtype", "f64"]), "f64");
}

#[test]
fn an_output_that_is_an_input_is_refused_before_any_work() {
    let d = fixtures("same");
    // a run that would succeed: on main it overwrote the input
    for out in ["I.npy", "L.npy", "./I.npy"] {
        assert_refused(&d, &["eval", "--logits", "L.npy", "--inputs", "I.npy", "--grad-out", out], "same file");
    }
    std::fs::copy(d.join("I.npy"), d.join("Y.npy")).unwrap();
    let labels = ["eval", "--logits", "L.npy", "--inputs", "I.npy", "--labels", "Y.npy", "--grad-out", "Y.npy"];
    assert_refused(&d, &labels, "same file as --labels");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("L.npy", d.join("link.npy")).unwrap();
        std::fs::hard_link(d.join("I.npy"), d.join("hard.npy")).unwrap();
        for out in ["link.npy", "hard.npy"] {
            assert_refused(&d, &["eval", "--logits", "L.npy", "--inputs", "I.npy", "--grad-out", out], "same file");
        }
        // through a link on the input side too
        assert_refused(&d, &["eval", "--logits", "link.npy", "--inputs", "I.npy", "--grad-out", "L.npy"], "same file");
    }
    // not a regular file, or read-only
    std::fs::create_dir(d.join("sub")).unwrap();
    assert_refused(&d, &["eval", "--logits", "L.npy", "--inputs", "I.npy", "--grad-out", "sub"], "directory");
    let mut p = std::fs::metadata(d.join("G.npy")).unwrap().permissions();
    p.set_readonly(true);
    std::fs::set_permissions(d.join("G.npy"), p).unwrap();
    assert_refused(&d, &["eval", "--logits", "L.npy", "--inputs", "I.npy", "--grad-out", "G.npy"], "read-only");
    assert_refused(&d, &["eval", "--logits", "L.npy", "--inputs", "I.npy", "--grad-out", "no-dir/G.npy"], "grad-out");
}

#[test]
fn a_successful_eval_replaces_the_output_whole() {
    let d = fixtures("replace");
    #[cfg(unix)]
    std::os::unix::fs::symlink("G.npy", d.join("G-link.npy")).unwrap();
    let j = ok_json(&d, &["eval", "--logits", "L.npy", "--inputs", "I.npy", "--grad-out", "G.npy"]);
    assert!(j["loss"].as_f64().unwrap().is_finite());
    let bytes = std::fs::read(d.join("G.npy")).unwrap();
    let g = npyz::NpyFile::new(&bytes[..]).unwrap();
    assert_eq!(g.shape(), &[2, 4, 10]);
    assert_eq!(g.into_vec::<f32>().unwrap().len(), 80);
    #[cfg(unix)]
    {
        // through a symbolic link: the file it names is replaced, the link stays a link
        std::fs::write(d.join("G.npy"), b"old").unwrap();
        ok_json(&d, &["eval", "--logits", "L.npy", "--inputs", "I.npy", "--grad-out", "G-link.npy"]);
        assert!(std::fs::symlink_metadata(d.join("G-link.npy")).unwrap().file_type().is_symlink());
        assert!(std::fs::read(d.join("G.npy")).unwrap().starts_with(b"\x93NUMPY"));
    }
    // no temporary file is left behind
    let names: Vec<String> = snapshot(&d).into_keys().collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

/// A report that cannot be written (stdout on a full device) fails the run, saying so (it exited
/// 2 without a word), before any output replaces its destination (they had been replaced).
#[test]
fn a_report_that_cannot_be_written_replaces_nothing() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        eprintln!("skipped: no /dev/full to write the report to");
        return;
    }
    let d = fixtures("report");
    let before = snapshot(&d);
    let out = Command::new(env!("CARGO_BIN_EXE_fused-weighted-loss"))
        .args(["eval", "--logits", "L.npy", "--inputs", "I.npy", "--grad-out", "G.npy", "--token-loss-out", "P.npy"])
        .current_dir(&*d)
        .stdin(Stdio::null())
        .stdout(std::fs::OpenOptions::new().write(true).open(full).unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr:?}");
    assert!(
        stderr.starts_with("error: cannot write the report to stdout") && stderr.lines().count() == 1,
        "{stderr:?}"
    );
    assert_eq!(snapshot(&d), before, "the directory changed");
}

/// A flag whose value may be negative, given without its value: the message names it (it said
/// "unexpected argument '2' found", about what came after the next flag); negative values still
/// reach the options' own checks.
#[test]
fn a_value_left_out_is_named() {
    let d = fixtures("missing-value");
    let eval = ["eval", "--logits", "L.npy", "--inputs", "I.npy"];
    let with = |more: &[&'static str]| [&eval[..], more].concat();
    assert_refused(&d, &with(&["--keywords", "--alpha", "2"]), "a value is required for '--keywords'");
    assert_refused(&d, &with(&["--z-loss", "--softcap", "30"]), "a value is required for '--z-loss'");
    assert_refused(&d, &with(&["--alpha", "-2"]), "alpha must be finite and >= 0, got -2");
    assert_refused(&d, &with(&["--softcap", "-inf"]), "softcap must be finite and > 0, got -inf");
}

#[test]
fn a_deeply_nested_header_is_refused_at_once() {
    let d = fixtures("deep");
    // the reported 118-byte file: a shape of lists nested 26 deep
    let h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {}{}, }}", "[".repeat(26), "]".repeat(26));
    std::fs::write(d.join("deep.npy"), npy_raw(&h, &[])).unwrap();
    assert_refused(&d, &["eval", "--logits", "deep.npy", "--inputs", "I.npy", "--grad-out", "G.npy"], "nest");
}

/// Malformed files derived from a valid logits file: every truncation of its header and some of
/// its data, a corrupted byte at every header position, and hand-written bad headers.
fn malformed_corpus() -> Vec<(String, Vec<u8>)> {
    let data: Vec<f32> = (0..80).map(|i| i as f32 * 0.25 - 10.0).collect();
    let valid = npy(&[2, 4, 10], &data);
    let header_end = 10 + u16::from_le_bytes([valid[8], valid[9]]) as usize;
    let mut corpus = Vec::new();
    for cut in (0..header_end).chain([header_end + 1, header_end + 100, valid.len() - 1]) {
        corpus.push((format!("cut{cut}"), valid[..cut].to_vec()));
    }
    for at in 0..header_end {
        let mut f = valid.clone();
        // a byte that breaks whatever stands there: magic, version, length, text or padding
        f[at] = if f[at] == 0xff { 0 } else { 0xff };
        corpus.push((format!("flip{at}"), f));
    }
    let body = |n: usize| vec![0x3cu8; n];
    let plain = |shape: &str| format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let raw: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("text", b"descr,shape\n1,2\n".to_vec()),
        ("version9", [&b"\x93NUMPY\x09\x00"[..], &valid[8..]].concat()),
        ("huge-header-len", [&b"\x93NUMPY\x02\x00\xff\xff\xff\xff"[..], &valid[10..]].concat()),
        ("deep-parens", npy_raw(&plain(&format!("{}{}", "(".repeat(40), ")".repeat(40))), &[])),
        ("deep-dicts", npy_raw(&format!("{}{}", "{'a': ".repeat(30), "}".repeat(30)), &[])),
        ("unclosed", npy_raw(&"[".repeat(5000), &[])),
        ("structured", npy_raw("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 4, 10), }", &body(320))),
        ("fortran", npy_raw("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 4, 10), }", &body(320))),
        ("f64", npy_raw("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 4, 10), }", &body(640))),
        ("object", npy_raw("{'descr': '|O', 'fortran_order': False, 'shape': (2, 4, 10), }", &body(640))),
        ("no-shape", npy_raw("{'descr': '<f4', 'fortran_order': False, }", &body(320))),
        ("extra-key", npy_raw("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4, 10), 'x': 1}", &body(320))),
        ("repeated-key", npy_raw(&plain("(2, 4, 10), 'shape': (2, 4, 10)"), &body(320))),
        ("negative-dim", npy_raw(&plain("(2, -4, 10)"), &body(320))),
        ("huge-dim", npy_raw(&plain("(99999999999999999999999, 4, 10)"), &body(320))),
        ("overflowing-shape", npy_raw(&plain("(4294967296, 4294967296, 4294967296)"), &body(320))),
        ("lying-shape", npy_raw(&plain("(1000000, 1000000, 10)"), &body(320))),
        ("short-data", npy_raw(&plain("(2, 4, 10)"), &body(319))),
        ("long-data", npy_raw(&plain("(2, 4, 10)"), &body(321))),
        ("control-char", npy_raw("{'descr': '<f4\u{0}', 'fortran_order': False, 'shape': (2, 4, 10), }", &body(320))),
        ("escape", npy_raw("{'descr': '<f\\x34', 'fortran_order': False, 'shape': (2, 4, 10), }", &body(320))),
        ("scalar-shape", npy_raw(&plain("()"), &body(4))),
        ("expression", npy_raw(&plain("(2*1, 4, 10)"), &body(320))),
    ];
    corpus.extend(raw.into_iter().map(|(n, b)| (n.to_string(), b)));
    corpus
}

#[test]
fn a_corpus_of_malformed_files_is_refused() {
    let d = fixtures("corpus");
    let corpus = malformed_corpus();
    assert!(corpus.len() > 250);
    for (name, bytes) in &corpus {
        let f = format!("{name}.npy");
        std::fs::write(d.join(&f), bytes).unwrap();
        assert_refused(&d, &["eval", "--logits", &f, "--inputs", "I.npy", "--grad-out", "G.npy"], "logits");
        assert_refused(&d, &["eval", "--logits", "L.npy", "--inputs", &f, "--grad-out", "G.npy"], "inputs");
        std::fs::remove_file(d.join(&f)).unwrap();
    }
    // not a regular file: a directory, a device, a pipe nobody writes to (would block)
    assert_refused(&d, &["eval", "--logits", ".", "--inputs", "I.npy"], "not a regular file");
    #[cfg(unix)]
    {
        assert_refused(&d, &["eval", "--logits", "/dev/zero", "--inputs", "I.npy"], "not a regular file");
        let fifo = d.join("fifo.npy");
        let made = Command::new("mkfifo").arg(&fifo).status().map(|s| s.success()).unwrap_or(false);
        if made {
            assert_refused(&d, &["eval", "--logits", "fifo.npy", "--inputs", "I.npy"], "not a regular file");
        }
    }
}

#[test]
fn bench_runs_at_every_vocabulary_size() {
    let d = fresh_dir("bench-v");
    // the bench's keywords 0, 1, 2 are clipped to the vocabulary
    for shape in ["1x2x1", "2x3x2", "1x2x3"] {
        let j = ok_json(&d, &["bench", "--shape", shape, "--json", "--iters", "1", "--warmup", "0"]);
        assert!(j["loss"].as_f64().unwrap().is_finite(), "{shape}: {j}");
    }
}

#[test]
fn bench_refuses_what_memory_cannot_hold_and_says_how_much() {
    let d = fresh_dir("bench-mem");
    // as reported: f16 at 8x100x1000000 aborted after 6.1 GB; logits, gradient (2 bytes each) and
    // the float64 reference's gradient (8 bytes) alone need 12 bytes per logit
    let args = ["bench", "--shape", "8x100x1000000", "--dtype", "f16", "--iters", "1", "--warmup", "0"];
    let r = assert_refused(&d, &[&args[..], &["--reference-iters", "1", "--max-memory", "4"]].concat(), "needs");
    let gb: f64 = r.stderr.split("needs ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(gb >= 8e8 * 12.0 * 1e-9, "{}", r.stderr);
    assert!(r.stderr.contains("(4.00 GB)") && r.stderr.contains("--reference-iters 0"), "{}", r.stderr);
    assert_refused(&d, &[&args[..], &["--max-memory", "0"]].concat(), "--max-memory");
}

#[cfg(target_os = "linux")]
#[test]
fn bench_memory_estimate_covers_what_it_uses() {
    let d = fresh_dir("bench-rss");
    // the float64 reference is the largest buffer here (8 bytes per logit against 2 + 2)
    let args = ["bench", "--shape", "4x64x100000", "--dtype", "f16", "--iters", "1", "--warmup", "0", "--json"];
    let j = ok_json(&d, &[&args[..], &["--reference-iters", "1", "--threads", "2"]].concat());
    let (estimate, peak) = (j["memory_estimate_bytes"].as_f64().unwrap(), j["peak_rss_bytes"].as_f64().unwrap());
    assert!(peak <= estimate, "peak RSS {peak} exceeds the estimate {estimate}");
    assert!(peak >= 0.8 * estimate, "estimate {estimate} far above the peak RSS {peak}");
}

#[test]
fn bench_memory_estimate_covers_many_short_rows() {
    // as reported: at a vocabulary of 1 the per-row arrays (targets, row losses, the plan's
    // token weights) are most of the memory, and the estimate counted 12 bytes of their 24 per
    // row (1.04 GB resident against 0.83 GB estimated here)
    let d = fresh_dir("bench-rss-rows");
    let args = ["bench", "--shape", "1x20000000x1", "--token-weights", "--iters", "1", "--warmup", "0"];
    let j = ok_json(&d, &[&args[..], &["--reference-iters", "0", "--threads", "2", "--json"]].concat());
    let (estimate, peak) = (j["memory_estimate_bytes"].as_f64().unwrap(), j["peak_rss_bytes"].as_f64().unwrap());
    assert!(peak <= estimate, "peak RSS {peak} exceeds the estimate {estimate}");
    assert!(peak >= 0.8 * estimate, "estimate {estimate} far above the peak RSS {peak}");
}

#[test]
fn bench_threads_are_bounded() {
    let d = fresh_dir("bench-threads");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let over = (4 * cores + 1).to_string();
    let ok = (4 * cores).to_string();
    let small = ["bench", "--shape", "2x3x100", "--iters", "1", "--warmup", "0", "--json"];
    assert_refused(&d, &[&small[..], &["--threads", &over]].concat(), "--threads");
    ok_json(&d, &[&small[..], &["--threads", &ok]].concat());
    // as reported: spawned threads for minutes
    assert_refused(&d, &[&small[..], &["--threads", "100000"]].concat(), "--threads");
}

#[test]
fn run_counts_are_bounded() {
    // as reported: a count of 2^64 - 1 panicked ("capacity overflow", exit 101) and 10^11
    // aborted on the allocation of its timings (exit 134)
    let d = fresh_dir("run-counts");
    let bench = ["bench", "--shape", "1x2x3", "--json"];
    let linear = ["bench-linear", "--tokens", "1x2", "--hidden", "2", "--vocab", "3"];
    // each count flag with `n`, the others small
    let with = |base: &[&'static str], flags: &[&'static str], flag: &str, n: &'static str| -> Vec<&'static str> {
        let mut args = base.to_vec();
        for &f in flags {
            args.extend([f, if f == flag { n } else { "1" }]);
        }
        args
    };
    let bench_flags = ["--iters", "--warmup", "--reference-iters"];
    let linear_flags = ["--iters", "--warmup"];
    for (base, flags) in [(&bench[..], &bench_flags[..]), (&linear[..], &linear_flags[..])] {
        for &flag in flags {
            for n in ["18446744073709551615", "100000000000", "1000001"] {
                assert_refused(&d, &with(base, flags, flag, n), "at most 1000000");
            }
        }
    }
    // a median of no timed runs is no figure: --iters 0 is refused (it ran once, unannounced)
    for (base, flags) in [(&bench[..], &bench_flags[..]), (&linear[..], &linear_flags[..])] {
        assert_refused(&d, &with(base, flags, "--iters", "0"), "at least 1");
    }
    // small counts run (the bound itself, a million, is the parser's unit test)
    let j = ok_json(&d, &with(&bench, &bench_flags, "--iters", "2"));
    assert_eq!(j["iters"], 2, "{j}");
    let r = run_in(&d, &with(&linear, &linear_flags, "--iters", "2"));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

#[test]
fn eval_refuses_what_memory_cannot_hold_and_leaves_nothing_behind() {
    // as reported: under an address-space limit the gradient's allocation aborted eval (exit
    // 134) and left its empty temporary output behind. Logits [1, 1000, 100000] f16 (200 MB,
    // a sparse file) need a 400 MB f32 gradient; the limit leaves room for the logits only.
    if !Path::new("/bin/sh").exists() {
        eprintln!("skipped: no /bin/sh to set an address-space limit with");
        return;
    }
    let d = fresh_dir("eval-memory");
    let (b, t, v) = (1u64, 1000u64, 100_000u64);
    // the header alone, then b·t·v zeros as a hole in the file
    let header = npy_raw("{'descr': '<f2', 'fortran_order': False, 'shape': (1, 1000, 100000), }", &[]);
    let f = std::fs::File::create(d.join("L.npy")).unwrap();
    std::io::Write::write_all(&mut &f, &header).unwrap();
    f.set_len(header.len() as u64 + b * t * v * 2).unwrap();
    drop(f);
    let ids: Vec<i64> = (0..t as i64).map(|i| i % v as i64).collect();
    std::fs::write(d.join("I.npy"), npy(&[b, t], &ids)).unwrap();
    std::fs::write(d.join("G.npy"), b"a file the user wants to keep").unwrap();
    let before = snapshot(&d);
    let bin = env!("CARGO_BIN_EXE_fused-weighted-loss");
    let script =
        format!("ulimit -v 500000 && exec '{bin}' eval --logits L.npy --inputs I.npy --grad-out G.npy --threads 1");
    let out = Command::new("/bin/sh").arg("-c").arg(&script).current_dir(&*d).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr {stderr:?}");
    assert!(stderr.contains("cannot allocate") && !stderr.contains("panicked"), "{stderr:?}");
    assert_eq!(snapshot(&d), before, "the directory changed");
}

/// An allocation the library makes that the allocator refuses (here its per-row buffers, for
/// ten million rows of a vocabulary of one) aborts the run, as Rust's allocation failure does:
/// the abort removes the temporary outputs first (SIGABRT; they were left behind, empty) and
/// leaves the destinations as they were.
#[cfg(unix)]
#[test]
fn an_aborted_eval_leaves_no_temporary_file() {
    if !Path::new("/bin/sh").exists() {
        eprintln!("skipped: no /bin/sh to set an address-space limit with");
        return;
    }
    let d = fresh_dir("eval-abort");
    let rows = 10_000_000u64;
    // headers, then the data as holes (the logits 40 MB, the ids 80 MB; ids of 0 are in range)
    for (name, descr, width) in [("L.npy", "'<f4'", 4), ("I.npy", "'<i8'", 8)] {
        let dims = if name == "L.npy" { format!("(1, {rows}, 1)") } else { format!("(1, {rows})") };
        let header = npy_raw(&format!("{{'descr': {descr}, 'fortran_order': False, 'shape': {dims}, }}"), &[]);
        let f = std::fs::File::create(d.join(name)).unwrap();
        std::io::Write::write_all(&mut &f, &header).unwrap();
        f.set_len(header.len() as u64 + rows * width).unwrap();
    }
    std::fs::write(d.join("G.npy"), b"a file the user wants to keep").unwrap();
    let bin = env!("CARGO_BIN_EXE_fused-weighted-loss");
    let script = format!(
        "ulimit -c 0 && ulimit -v 300000 && exec '{bin}' eval --logits L.npy --inputs I.npy --grad-out G.npy \
         --token-loss-out P.npy --threads 1"
    );
    let out = Command::new("/bin/sh").arg("-c").arg(&script).current_dir(&*d).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    // an abort, or (should the library come to refuse the allocation) exit code 2
    assert!(
        out.status.signal() == Some(libc::SIGABRT) || out.status.code() == Some(2),
        "{:?}; stderr {stderr:?}",
        out.status
    );
    // (names, and the one small file: the inputs' 120 MB stay out of a failure's message)
    let mut names: Vec<String> =
        std::fs::read_dir(&*d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["G.npy", "I.npy", "L.npy"], "files added or removed");
    assert_eq!(std::fs::read(d.join("G.npy")).unwrap(), b"a file the user wants to keep");
}

#[test]
fn an_output_path_ending_in_a_separator_is_refused_before_any_work() {
    // as reported: `--grad-out new/` (no such directory) ran the whole computation, then failed
    // at the rename
    let d = fixtures("trailing-separator");
    let r = assert_refused(
        &d,
        &["eval", "--logits", "L.npy", "--inputs", "I.npy", "--grad-out", "new/", "--keywords", "99"],
        "names a directory",
    );
    // refused before the spec's own check (keyword 99 is out of range): the outputs come first
    assert!(!r.stderr.contains("keyword"), "{:?}", r.stderr);
    // as reported: `nodir/.` (Path drops the trailing `.`) ran the whole computation, printed
    // the report, replaced an existing --grad-out, and only then failed its own rename
    std::fs::write(d.join("G.npy"), b"kept").unwrap();
    // (`.` and `..` exist: "is a directory")
    for bad in ["nodir/.", "nodir/..", ".", ".."] {
        let args = ["eval", "--logits", "L.npy", "--inputs", "I.npy", "--grad-out", "G.npy", "--token-loss-out", bad];
        assert_refused(&d, &args, "directory");
    }
}

#[test]
fn eval_checks_shapes_and_memory_from_the_headers_before_reading() {
    // as reported: eval read (and allocated) all of a large logits file before it compared the
    // ids' shape, and never compared its buffers with the memory available. A sparse file of
    // 1 TiB of float32 logits [1, 1024, 2^28] (no disk blocks) stands for the large file.
    let d = fresh_dir("eval-memory");
    // (the large file beside the directory the checks snapshot, which reads every file)
    let big = fresh_dir("eval-memory-logits");
    let logits = big.join("L.npy");
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1024, 268435456), }";
    let head = npy_raw(header, &[]);
    let file = std::fs::File::create(&logits).unwrap();
    std::io::Write::write_all(&mut &file, &head).unwrap();
    file.set_len(head.len() as u64 + (1u64 << 40)).expect("a sparse file of 1 TiB");
    drop(file);
    std::fs::write(d.join("I.npy"), npy(&[1, 1024], &vec![0i64; 1024])).unwrap();
    std::fs::write(d.join("bad.npy"), npy(&[1, 3], &[0i64; 3])).unwrap();
    std::fs::write(d.join("G.npy"), b"kept").unwrap();
    let logits = logits.to_str().unwrap();
    let eval = |ids| ["eval", "--logits", logits, "--inputs", ids, "--grad-out", "G.npy"];
    let t = Instant::now();
    assert_refused(&d, &eval("bad.npy"), "shape");
    assert_refused(&d, &eval("I.npy"), "more than the memory available");
    // (a read of the data would take minutes: both came from the headers)
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[cfg(target_os = "linux")]
#[test]
fn a_stderr_that_cannot_be_written_is_no_panic() {
    // as reported: eprintln! panicked on a full device (exit 101, a status the README does not list)
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_fused-weighted-loss"))
        .args(["eval", "--no-such-flag"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(full)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}

#[test]
fn bench_linear_refuses_what_it_cannot_run() {
    let d = fresh_dir("bench-linear");
    let small = ["bench-linear", "--tokens", "2x4", "--hidden", "8", "--vocab", "10", "--iters", "1", "--json"];
    // as reported: an allocation failure aborted (exit 134), threads spun for minutes, parts of
    // --tokens that did not parse were dropped, and a budget of 2^44 MiB wrapped to 0 bytes
    let huge = ["bench-linear", "--tokens", "100000x100000", "--hidden", "100000", "--vocab", "1000", "--iters", "1"];
    assert_refused(&d, &huge, "needs");
    assert_refused(&d, &[&small[..], &["--threads", "100000"]].concat(), "--threads");
    assert_refused(&d, &[&small[..], &["--threads", "0"]].concat(), "--threads");
    for tokens in ["2xfoox4", "2x4x", "2", "x4", ""] {
        let mut args = small.to_vec();
        args[2] = tokens;
        assert_refused(&d, &args, "--tokens");
    }
    assert_refused(&d, &[&small[..], &["--budget-mib", "17592186044416"]].concat(), "--budget-mib");
    // alternatives: --chunk-rows silently won over --budget-mib
    assert_refused(&d, &[&small[..], &["--chunk-rows", "2", "--budget-mib", "1"]].concat(), "--budget-mib");
    let j = ok_json(&d, &small);
    assert_eq!(j["chunks"], 1, "{j}");
}

#[test]
fn bench_linear_runs_tiny_vocabularies() {
    // as reported: keywords 0, 1, 2 were always set, so a vocabulary of 1 or 2 was refused over
    // a keyword nobody gave ("keyword id 2 is outside [0, 2)")
    let d = fresh_dir("bench-linear-tiny");
    for vocab in ["1", "2", "3"] {
        let args = ["bench-linear", "--tokens", "1x2", "--hidden", "2", "--vocab", vocab, "--iters", "1", "--json"];
        let j = ok_json(&d, &args);
        assert!(j["loss"].as_f64().is_some_and(f64::is_finite), "vocab {vocab}: {j}");
        assert_eq!(j["vocab"], vocab.parse::<u64>().unwrap(), "{j}");
    }
}

#[test]
fn bench_linear_runs_a_bias_and_f32_gradients() {
    let d = fresh_dir("bench-linear-extras");
    let (n, h, v) = (2 * 5, 8, 37);
    for dtype in ["f32", "bf16"] {
        let base = ["bench-linear", "--tokens", "2x5", "--hidden", "8", "--vocab", "37", "--iters", "1", "--json"];
        let run = |extra: &[&str]| ok_json(&d, &[&base[..], &["--dtype", dtype], extra].concat());
        let plain = run(&[]);
        let size = if dtype == "f32" { 4 } else { 2 };
        assert_eq!(plain["inputs_and_grads_bytes"], (n * h + v * h) * 2 * size, "{plain}");
        let f32_grads = run(&["--f32-grads"]);
        assert_eq!(f32_grads["f32_grads"], true, "{f32_grads}");
        assert_eq!(f32_grads["inputs_and_grads_bytes"], (n * h + v * h) * (size + 4), "{f32_grads}");
        // the gradients' dtype does not touch the loss
        assert_eq!(f32_grads["loss"], plain["loss"], "{dtype}");
        let bias = run(&["--bias", "--f32-grads"]);
        assert_eq!(bias["bias"], true, "{bias}");
        assert_eq!(bias["inputs_and_grads_bytes"], (n * h + v * h + v) * (size + 4), "{bias}");
        // the bias is in the logits (random values of scale 0.5: the loss moves)
        let (with, without) = (bias["loss"].as_f64().unwrap(), plain["loss"].as_f64().unwrap());
        assert!(with.is_finite() && (with - without).abs() > 1e-4 * without.abs(), "{with} vs {without}");
    }
}

#[test]
fn json_keeps_finite_losses_numbers_and_names_the_others() {
    let d = fixtures("json");
    // finite logits whose per-token losses exceed f32::MAX: the loss is a finite number
    let e: Vec<f32> = (0..12).map(|i| if i % 4 == 1 { -3e38 } else { 3e38 }).collect();
    std::fs::write(d.join("E.npy"), npy(&[1, 3, 4], &e)).unwrap();
    std::fs::write(d.join("EI.npy"), npy(&[1, 3], &[0i64, 1, 1])).unwrap();
    let j = ok_json(&d, &["eval", "--logits", "E.npy", "--inputs", "EI.npy"]);
    let loss = j["loss"].as_f64().unwrap_or_else(|| panic!("loss is not a number: {j}"));
    // rows 0 and 1 each: 3e38 + ln 3 - (-3e38)
    let want = 2.0 * 3e38f32 as f64;
    assert!(common::rel(loss, want) <= 1e-6, "{loss} vs {want}");
    // NaN and +inf are strings that tell them apart
    let j = ok_json(&d, &["eval", "--logits", "Lnan.npy", "--inputs", "I.npy"]);
    assert_eq!(j["loss"], "nan", "{j}");
    assert_eq!(j["per_sample_loss"][0], "nan", "{j}");
    assert!(j["per_sample_loss"][1].as_f64().unwrap().is_finite(), "{j}");
    let mut inf = vec![0f32; 12];
    inf[1] = f32::NEG_INFINITY; // the target of row (0, 0): an infinite loss
    std::fs::write(d.join("Linf.npy"), npy(&[1, 3, 4], &inf)).unwrap();
    let j = ok_json(&d, &["eval", "--logits", "Linf.npy", "--inputs", "EI.npy"]);
    assert_eq!(j["loss"], "inf", "{j}");
}

#[test]
fn the_per_token_output_follows_the_same_rules() {
    let d = fixtures("token-out");
    let w: Vec<f32> = vec![1.0; 8];
    std::fs::write(d.join("W.npy"), npy(&[2, 4], &w)).unwrap();
    let eval = ["eval", "--logits", "L.npy", "--inputs", "I.npy", "--token-weights", "W.npy"];
    let with = |extra: &[&'static str]| -> Vec<&str> { eval.iter().chain(extra).copied().collect() };
    assert_refused(&d, &with(&["--token-loss-out", "W.npy"]), "same file as --token-weights");
    assert_refused(&d, &with(&["--token-loss-out", "G.npy", "--grad-out", "./G.npy"]), "same file as --grad-out");
    // one existing file under two names (a case-insensitive file system's `G.npy` and `g.npy`
    // are this; a hard link stands in for it here)
    std::fs::write(d.join("H.npy"), b"kept").unwrap();
    std::fs::hard_link(d.join("H.npy"), d.join("H2.npy")).unwrap();
    assert_refused(&d, &with(&["--token-loss-out", "H2.npy", "--grad-out", "H.npy"]), "same file as --grad-out");
    assert_eq!(std::fs::read(d.join("H.npy")).unwrap(), b"kept");
    // a failure after both outputs were opened leaves both files as they were
    std::fs::write(d.join("P.npy"), b"per-token losses the user keeps").unwrap();
    assert_refused(&d, &with(&["--token-loss-out", "P.npy", "--grad-out", "G.npy", "--keywords", "99"]), "keyword");
    assert_refused(&d, &with(&["--token-loss-out", "P.npy", "--label-smoothing", "2"]), "label_smoothing");
    let mut bad = w.clone();
    bad[3] = f32::NAN;
    std::fs::write(d.join("Wnan.npy"), npy(&[2, 4], &bad)).unwrap();
    let nan = ["eval", "--logits", "L.npy", "--inputs", "I.npy", "--token-weights", "Wnan.npy", "--token-loss-out"];
    let nan: Vec<&str> = nan.iter().copied().chain(["P.npy"]).collect();
    assert_refused(&d, &nan, "token_weights[0, 3]");
    std::fs::write(d.join("W3.npy"), npy(&[2, 3], &w[..6])).unwrap();
    let short = ["eval", "--logits", "L.npy", "--inputs", "I.npy", "--token-weights", "W3.npy"];
    assert_refused(&d, &short, "token_weights");
    // both written on success
    let j = ok_json(&d, &with(&["--token-loss-out", "P.npy", "--grad-out", "G.npy", "--z-loss", "0.01"]));
    assert!(j["z_loss"].as_f64().unwrap() > 0.0);
    let bytes = std::fs::read(d.join("P.npy")).unwrap();
    let p = npyz::NpyFile::new(&bytes[..]).unwrap();
    assert_eq!(p.shape(), &[2, 3]);
}

/// A run ended by a signal (Ctrl-C, `kill`, `kill -USR1`, an alarm) while its outputs are pending removes their
/// temporary files and leaves the destinations as they were; its exit status is the signal's
/// (it left a `.g.npy.<pid>.0.tmp` as large as the gradient before).
#[cfg(unix)]
#[test]
fn an_interrupted_eval_leaves_no_temporary_file() {
    use std::os::unix::process::ExitStatusExt;
    let d = fresh_dir("interrupted");
    // 4 × 256 × 32000 f32 (131 MB): reading, the pass and writing the gradient take a while
    let shape = fused_weighted_loss::Shape::new(4, 256, 32_000).unwrap();
    let (logits, ids) = common::random_inputs::<f32>(9, shape, 2.0);
    std::fs::write(d.join("L.npy"), npy(&[4, 256, 32_000], &logits)).unwrap();
    std::fs::write(d.join("I.npy"), npy(&[4, 256], &ids)).unwrap();
    drop(logits);
    std::fs::write(d.join("G.npy"), b"a file the user wants to keep").unwrap();
    let temps = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    };
    let signals = [
        (libc::SIGTERM, "TERM"),
        (libc::SIGINT, "INT"),
        (libc::SIGQUIT, "QUIT"),
        (libc::SIGUSR1, "USR1"),
        (libc::SIGALRM, "ALRM"),
    ];
    for (sig, name) in signals {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fused-weighted-loss"));
        // the signal's default disposition in the child: a test run started in the background
        // by a non-interactive shell (`cmd &`) ignores SIGINT, which the child inherits and the
        // CLI rightly keeps ignoring (as under nohup), so it ran to the end (CI at df67d41 and
        // 52c1626 failed so: SIGINT, exit status 0)
        // SAFETY: `signal` is async-signal-safe, the only call between fork and exec here.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                libc::signal(sig, libc::SIG_DFL);
                // SIGQUIT's default action dumps core: no core file (as large as the process)
                let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                Ok(())
            });
        }
        let mut child = cmd
            .args([
                "eval",
                "--logits",
                "L.npy",
                "--inputs",
                "I.npy",
                "--grad-out",
                "G.npy",
                "--token-loss-out",
                "T.npy",
            ])
            .current_dir(&d.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // the temporary files appear before any work: signal the run as soon as both exist
        let t = Instant::now();
        while temps(&d.0).len() < 2 {
            assert!(child.try_wait().unwrap().is_none(), "SIG{name}: the run ended before its outputs were pending");
            assert!(t.elapsed() < LIMIT, "SIG{name}: no temporary files after {LIMIT:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: a plain libc call on the child just spawned, which has not been waited for.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0, "SIG{name}: kill");
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(sig), "SIG{name}: ended by the signal ({status:?})");
        assert_eq!(temps(&d.0), Vec::<String>::new(), "SIG{name}: temporary files left behind");
        assert_eq!(std::fs::read(d.join("G.npy")).unwrap(), b"a file the user wants to keep", "SIG{name}");
        assert!(!d.join("T.npy").exists(), "SIG{name}: an output that did not exist stays absent");
    }
}
