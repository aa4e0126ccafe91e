//! The whole of `kernels/weighted_loss.cu` (plan, every rows kernel variant, finish, and the
//! vocabulary- and data-parallel split's kernels) compiled by the system C++ compiler (`$CXX`,
//! else `c++`; without one each test prints that it skipped) against `tests/kernel_host/emu.h`,
//! which runs a block's threads as fibers with CUDA's barriers and warp shuffles, launched as
//! the crate launches them (`tests/kernel_host/calls.cpp`), on random calls compared with the
//! float64 reference: every dtype pair, block sizes 32 to 1024, grids that stride, shared-memory
//! budgets from none to the whole row, misaligned and in-place buffers, every option, and grids
//! of 1–3 data × 1–5 vocabulary ranks with chunked rows. What this checks is the kernels' logic
//! (indexing, reductions, barriers, the options, the split's exchanges), not the device's
//! arithmetic (`__expf` and friends are the host's) nor its memory model: the GPU tests still
//! wait for a GPU.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::host_cxx::{compile, TempDir};
use common::{cases, rel};
use fused_weighted_loss::reference::{reference, rel_err};
use fused_weighted_loss::synthetic::Rng;
use fused_weighted_loss::{bf16, f16, DType, LossSpec, Reduction, RowMean, Shape, Tokens};

/// The emulated kernels' program, compiled once per test binary (`None`: no C++ compiler).
fn calls_exe() -> Option<&'static Path> {
    static EXE: OnceLock<Option<(TempDir, PathBuf)>> = OnceLock::new();
    EXE.get_or_init(|| {
        let dir = TempDir::new("kernel-calls");
        let exe = compile(
            "kernels_emulated_on_the_host",
            "calls.cpp",
            &dir.0,
            &["-Wno-unknown-pragmas", "-fno-extern-tls-init"],
        )?;
        Some((dir, exe))
    })
    .as_ref()
    .map(|(_, exe)| exe.as_path())
}

/// The rows kernel families, in `calls.cpp`'s order: `fwl_rows_*`, `fwl_rows2_*`, `fwl_rows4_*`,
/// the lean `fwl_rowsl_*`, `fwl_rowsl2_*` (the plain loss only, as the crate launches them) and
/// `fwl_rowslo_*` (the options').
const FAMILIES: [&str; 6] = ["rows", "rows2", "rows4", "rowsl", "rowsl2", "rowslo"];

/// The (logits, gradient) pairs that have kernels.
const PAIRS: [(DType, DType); 7] = [
    (DType::F32, DType::F32),
    (DType::F16, DType::F16),
    (DType::F16, DType::F32),
    (DType::BF16, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::F32, DType::F16),
    (DType::F32, DType::BF16),
];

#[derive(Clone, Copy, PartialEq, Debug)]
enum GradMode {
    None,
    Separate,
    InPlace,
}

/// One call of the emulated kernels. Its file layout (little-endian), which `calls.cpp` reads:
/// 21 i64 (magic, logits / gradient dtype 0 f32 1 f16 2 bf16, id type 0 i32 1 i64 2 u32,
/// family, B, T, V, ignore_index, row mean 0 all 1 valid, reduction 0 mean 1 weighted 2 sum,
/// keywords, threads, grid, shared-memory vectors at most, logits offset, gradient mode 0 none
/// 1 separate 2 in place, gradient offset, labels?, token weights?, grad scale on the device?),
/// 5 f64 (alpha, grad scale, softcap or 0, z-loss, smoothing), keyword ids (i64) and weights
/// (f64), logits (f32, values the dtype holds), ids (i64), labels, token weights (f32); for the
/// split (its own magic) then data ranks, vocabulary ranks, rows per chunk, the sample and the
/// column cuts (i64).
#[derive(Debug, Clone)]
struct Call {
    pair: (DType, DType),
    id_type: i64,
    family: usize,
    shape: Shape,
    spec: LossSpec,
    threads: u32,
    grid: u32,
    smem_cap: i64,
    logits_offset: i64,
    grad: GradMode,
    grad_offset: i64,
    scale_on_device: bool,
    logits: Vec<f32>,
    ids: Vec<i64>,
    labels: Option<Vec<i64>>,
    token_weights: Option<Vec<f32>>,
    /// Through the vocabulary- and data-parallel split's kernels instead of the one-device ones.
    split: Option<Split>,
}

/// A grid of ranks: sample cuts from 0 to B (data ranks + 1, every rank with samples), column
/// cuts from 0 to V (vocabulary ranks + 1, every rank with columns), rows per chunk.
#[derive(Debug, Clone)]
struct Split {
    sample_cuts: Vec<i64>,
    column_cuts: Vec<i64>,
    chunk: i64,
}

const MAGIC: i64 = 0x46574c4b01;
const MAGIC_SPLIT: i64 = 0x46574c4b02;

fn dtype_code(d: DType) -> i64 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

impl Call {
    fn write(&self, out: &mut Vec<u8>) {
        let s = &self.spec;
        let header: [i64; 21] = [
            if self.split.is_some() { MAGIC_SPLIT } else { MAGIC },
            dtype_code(self.pair.0),
            dtype_code(self.pair.1),
            self.id_type,
            self.family as i64,
            self.shape.batch() as i64,
            self.shape.seq() as i64,
            self.shape.vocab() as i64,
            s.ignore_index(),
            match s.row_mean() {
                RowMean::AllPositions => 0,
                RowMean::ValidTokens => 1,
            },
            match s.reduction() {
                Reduction::Mean => 0,
                Reduction::WeightedMean => 1,
                Reduction::Sum => 2,
            },
            s.keywords().len() as i64,
            self.threads as i64,
            self.grid as i64,
            self.smem_cap,
            self.logits_offset,
            match self.grad {
                GradMode::None => 0,
                GradMode::Separate => 1,
                GradMode::InPlace => 2,
            },
            self.grad_offset,
            self.labels.is_some() as i64,
            self.token_weights.is_some() as i64,
            self.scale_on_device as i64,
        ];
        header.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        let f = [s.alpha(), s.grad_scale(), s.softcap().unwrap_or(0.0), s.z_loss(), s.label_smoothing()];
        f.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        s.keywords().iter().for_each(|k| out.extend_from_slice(&k.id.to_le_bytes()));
        s.keywords().iter().for_each(|k| out.extend_from_slice(&k.weight.to_le_bytes()));
        self.logits.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        self.ids.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        self.labels.iter().flatten().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        self.token_weights.iter().flatten().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        if let Some(sp) = &self.split {
            let n = [sp.sample_cuts.len() as i64 - 1, sp.column_cuts.len() as i64 - 1, sp.chunk];
            n.iter()
                .chain(&sp.sample_cuts)
                .chain(&sp.column_cuts)
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
    }
}

/// What `calls.cpp` writes per call: loss, z-loss and the f32 loss (f64), the status (flags, bad
/// id index and value, bad label index and value, non-finite row, bad token weight index; i64),
/// weights, per-sample losses and z-losses (f64 [B]), valid targets (i64 [B]), each row's loss
/// (f64 [B·T]), then the gradient as f32 [B·T·V] when the call asks for one.
#[derive(Debug)]
struct Outputs {
    loss: f64,
    z_loss: f64,
    loss_f32: f64,
    status: [i64; 7],
    weights: Vec<f64>,
    per_sample: Vec<f64>,
    per_sample_z: Vec<f64>,
    valid: Vec<i64>,
    row_loss: Vec<f64>,
    grad: Vec<f32>,
}

struct Reader<'a>(&'a [u8]);
impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        assert!(self.0.len() >= N, "the emulated kernels' outputs end early");
        let (a, rest) = self.0.split_at(N);
        self.0 = rest;
        a.try_into().unwrap()
    }
    fn f64s(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| f64::from_le_bytes(self.take())).collect()
    }
    fn i64s(&mut self, n: usize) -> Vec<i64> {
        (0..n).map(|_| i64::from_le_bytes(self.take())).collect()
    }
}

/// Runs the calls through the emulated kernels (one process for all of them).
fn run(exe: &Path, calls: &[Call], tag: &str) -> Vec<Outputs> {
    let dir = TempDir::new(&format!("kernel-run-{tag}"));
    let mut input = Vec::new();
    calls.iter().for_each(|c| c.write(&mut input));
    let (inp, outp) = (dir.0.join("calls.bin"), dir.0.join("outputs.bin"));
    std::fs::write(&inp, &input).unwrap();
    let run = Command::new(exe).arg(&inp).arg(&outp).output().unwrap();
    assert!(
        run.status.success(),
        "the emulated kernels failed ({}):\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let bytes = std::fs::read(&outp).unwrap();
    let mut r = Reader(&bytes);
    let outs = calls
        .iter()
        .map(|c| {
            let (b, bt) = (c.shape.batch(), c.shape.batch() * c.shape.seq());
            let s = r.f64s(3);
            Outputs {
                loss: s[0],
                z_loss: s[1],
                loss_f32: s[2],
                status: r.i64s(7).try_into().unwrap(),
                weights: r.f64s(b),
                per_sample: r.f64s(b),
                per_sample_z: r.f64s(b),
                valid: r.i64s(b),
                row_loss: r.f64s(bt),
                grad: match c.grad {
                    GradMode::None => Vec::new(),
                    _ => (0..c.shape.logits_len()).map(|_| f32::from_le_bytes(r.take())).collect(),
                },
            }
        })
        .collect();
    assert!(r.0.is_empty(), "the emulated kernels wrote more than the calls asked for");
    outs
}

/// `x` as the dtype holds it.
fn round_to(d: DType, x: f32) -> f32 {
    match d {
        DType::F32 => x,
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
    }
}

/// A random call: shapes with odd and tiny vocabularies, every option, every launch geometry.
fn random_call(rng: &mut Rng) -> Call {
    let pair = PAIRS[rng.below(PAIRS.len() as u64) as usize];
    let big_block = rng.below(8) == 0;
    let threads = if big_block { 1024 } else { 32 * (1 + rng.below(8) as u32) };
    let v = match rng.below(6) {
        0 => 1 + rng.below(9) as usize,
        1 => [31, 32, 33, 63, 64, 65, 127, 128, 129][rng.below(9) as usize],
        _ => 1 + rng.below(if big_block { 12_000 } else { 3000 }) as usize,
    };
    let (b, t) = (1 + rng.below(3) as usize, 2 + rng.below(if big_block { 2 } else { 4 }) as usize);
    let shape = Shape::new(b, t, v).unwrap();
    let rows = b * t;
    let mut builder = LossSpec::builder()
        .row_mean(if rng.below(2) == 0 { RowMean::AllPositions } else { RowMean::ValidTokens })
        .reduction([Reduction::Mean, Reduction::WeightedMean, Reduction::Sum][rng.below(3) as usize])
        .alpha([1.0, 0.5, 2.5][rng.below(3) as usize])
        .grad_scale([1.0, 0.25, 3.0][rng.below(3) as usize]);
    // plain loss one call in three (the lean kernels' case), else random options
    let (mut cap, plain) = (None, rng.below(3) == 0);
    if !plain {
        let (bld, c) = common::random_options(rng, builder);
        builder = bld;
        cap = c;
    }
    let id_type = rng.below(3) as i64;
    // an ignored id: the usual -100 (i32 / i64 ids), or an id of the vocabulary (u32 too)
    let ignore = if id_type != 2 && rng.below(2) == 0 { -100 } else { rng.below(v as u64) as i64 };
    builder = builder.ignore_index(ignore);
    let mut ids: Vec<i64> = (0..rows).map(|_| rng.below(v as u64) as i64).collect();
    for id in ids.iter_mut() {
        if rng.below(6) == 0 {
            *id = ignore;
        }
    }
    let labels = (rng.below(4) == 0).then(|| {
        (0..rows).map(|_| if rng.below(6) == 0 { ignore } else { rng.below(v as u64) as i64 }).collect::<Vec<_>>()
    });
    let nk = rng.below(4) as usize;
    let keywords: Vec<(i64, f64)> =
        (0..nk).map(|_| (rng.below(v as u64) as i64, [1.0, 0.5, 2.0][rng.below(3) as usize])).collect();
    builder = builder.weighted_keywords(keywords);
    let token_weights =
        (rng.below(3) == 0).then(|| (0..rows).map(|_| (rng.below(5) as f32) * 0.5).collect::<Vec<f32>>());
    let spec = builder.build().unwrap();
    // logits of scale 0.5 to 8 around a common offset, a spike now and then; with a cap, within
    // three caps and offsets of at most 30 (capped logits near ±150 are f32 values 1.5e-5 apart:
    // a softmax error of up to 7.6e-6 from their rounding alone, whatever computes them)
    let scale = [0.5f32, 2.0, 8.0][rng.below(3) as usize];
    let offset = [0.0f32, 0.0, 30.0, if cap.is_some() { -30.0 } else { -200.0 }][rng.below(4) as usize];
    let mut logits = (0..shape.logits_len())
        .map(|_| {
            let mut z = offset + scale * (2.0 * rng.unit() as f32 - 1.0);
            if rng.below(500) == 0 {
                z += 25.0;
            }
            if let Some(c) = cap {
                z = z.clamp(-3.0 * c, 3.0 * c);
            }
            round_to(pair.0, z)
        })
        .collect::<Vec<f32>>();
    // one call in six without a cap: confident rows, each target 14 to 26 above the rest (a loss
    // of 1e-6 to 1e-11 that only the target's term kept out of the others' sum keeps accurate)
    if cap.is_none() && rng.below(6) == 0 {
        let targets = labels.as_ref().unwrap_or(&ids);
        for (row, pos) in (0..rows).filter(|r| (r + 1) % t != 0).map(|r| (r, r + 1)) {
            let y = targets[pos];
            if (0..v as i64).contains(&y) {
                let z = &mut logits[row * v + y as usize];
                *z = round_to(pair.0, offset + scale + [14.0, 20.0, 26.0][rng.below(3) as usize]);
            }
        }
    }
    let family = if plain { rng.below(6) as usize } else { [0, 1, 2, 5][rng.below(4) as usize] };
    let grad = match rng.below(5) {
        0 => GradMode::None,
        1 if pair.0 == pair.1 => GradMode::InPlace,
        _ => GradMode::Separate,
    };
    let row_vectors = (v * pair.0.size()).div_ceil(16) as i64;
    Call {
        pair,
        id_type,
        family,
        shape,
        spec,
        threads,
        grid: 1 + rng.below(rows.min(4) as u64) as u32,
        smem_cap: [0, 1 + rng.below(row_vectors as u64) as i64, row_vectors, 1 << 20][rng.below(4) as usize],
        logits_offset: rng.below(8) as i64,
        grad,
        grad_offset: rng.below(8) as i64,
        scale_on_device: rng.below(2) == 0,
        logits,
        ids,
        labels,
        token_weights,
        split: None,
    }
}

/// Compares one call's outputs with the float64 reference; returns the gradient's error.
fn check(c: &Call, o: &Outputs) -> f64 {
    let what = format!(
        "{} {:?}->{:?} {:?} threads {} grid {} smem {} offsets {}/{} {:?} spec {:?} split {:?}",
        if c.split.is_some() { "split" } else { FAMILIES[c.family] },
        c.pair.0,
        c.pair.1,
        c.shape,
        c.threads,
        c.grid,
        c.smem_cap,
        c.logits_offset,
        c.grad_offset,
        c.grad,
        c.spec,
        c.split
    );
    let mut tokens = Tokens::new(&c.ids);
    if let Some(l) = &c.labels {
        tokens = tokens.with_labels(l);
    }
    if let Some(w) = &c.token_weights {
        tokens = tokens.with_token_weights(w);
    }
    let r = reference(&c.spec, c.shape, &c.logits, tokens).unwrap();
    let (grad_tol, loss_tol) =
        (if c.pair.1 == DType::F32 { 1e-5 } else { 1.5e-2 }, if c.pair.0 == DType::F32 { 1e-5 } else { 1e-4 });
    assert_eq!(o.status, [0, -1, 0, -1, 0, -1, -1], "{what}: status");
    let e = rel(o.loss, r.loss);
    assert!(e <= loss_tol, "{what}: loss {} vs {} ({e:e})", o.loss, r.loss);
    assert!(rel(o.loss_f32, r.loss) <= loss_tol.max(1e-6), "{what}: the f32 loss {} vs {}", o.loss_f32, r.loss);
    let e = rel(o.z_loss, r.z_loss);
    assert!(e <= loss_tol, "{what}: z-loss {} vs {} ({e:e})", o.z_loss, r.z_loss);
    // the z-loss per sample, reduced as the loss is (sample weight over the reduction's divisor)
    if c.spec.z_loss() != 0.0 {
        let denom = match c.spec.reduction() {
            Reduction::Mean => c.shape.batch() as f64,
            Reduction::WeightedMean => r.weights.iter().sum(),
            Reduction::Sum => 1.0,
        };
        let z: f64 = o.per_sample_z.iter().zip(&r.weights).map(|(z, w)| z * w / denom).sum();
        let e = rel(z, r.z_loss);
        assert!(e <= loss_tol, "{what}: per-sample z-losses reduced {z} vs {} ({e:e})", r.z_loss);
    }
    let e = rel_err(&o.per_sample, &r.per_sample_loss);
    assert!(e <= loss_tol, "{what}: per-sample losses ({e:e})");
    assert!(rel_err(&o.weights, &r.weights) <= 1e-12, "{what}: weights {:?} vs {:?}", o.weights, r.weights);
    let valid: Vec<i64> = r.valid_tokens.iter().map(|&v| v as i64).collect();
    assert_eq!(o.valid, valid, "{what}: valid targets");
    // each row's loss (the last position of a sample predicts nothing: 0)
    let (b, t) = (c.shape.batch(), c.shape.seq());
    let mut rows = Vec::new();
    for s in 0..b {
        assert_eq!(o.row_loss[s * t + t - 1], 0.0, "{what}: a sample's last position");
        rows.extend_from_slice(&o.row_loss[s * t..s * t + t - 1]);
    }
    let e = rel_err(&rows, &r.token_loss);
    assert!(e <= loss_tol, "{what}: per-token losses ({e:e})");
    if c.grad == GradMode::None {
        return 0.0;
    }
    let e = rel_err(&o.grad, &r.grad);
    assert!(e <= grad_tol, "{what}: gradient ({e:e})");
    e
}

/// `n` sorted cuts from 0 to `len` with every piece non-empty (`pieces` at most `len`).
fn random_cuts(rng: &mut Rng, len: usize, pieces: usize) -> Vec<i64> {
    let mut inner: Vec<i64> = Vec::new();
    while inner.len() + 1 < pieces {
        let c = 1 + rng.below(len as u64 - 1) as i64;
        if !inner.contains(&c) {
            inner.push(c);
        }
    }
    inner.sort_unstable();
    std::iter::once(0).chain(inner).chain(std::iter::once(len as i64)).collect()
}

/// A random call of the split's kernels: 1–3 data ranks, 1–5 vocabulary ranks (uneven, some
/// without the targets), chunks of 1 row to more than all.
fn random_split_call(rng: &mut Rng) -> Call {
    let mut c = random_call(rng);
    let (b, v, rows) = (c.shape.batch(), c.shape.vocab(), c.shape.batch() * c.shape.seq());
    let data = 1 + rng.below(b.min(3) as u64) as usize;
    let vocab = 1 + rng.below(v.min(5) as u64) as usize;
    c.split = Some(Split {
        sample_cuts: random_cuts(rng, b, data),
        column_cuts: random_cuts(rng, v, vocab),
        chunk: 1 + rng.below(rows as u64 + 2) as i64,
    });
    c.family = 0; // (the split has one kernel per step)
    c
}

#[test]
fn split_kernels_emulated_on_the_host_match_the_reference() {
    let Some(exe) = calls_exe() else { return };
    let n = cases(40);
    let mut rng = Rng::new(0x73706c6974);
    let calls: Vec<Call> = (0..n).map(|_| random_split_call(&mut rng)).collect();
    let outs = run(exe, &calls, "split");
    let mut worst = 0f64;
    for (c, o) in calls.iter().zip(&outs) {
        worst = worst.max(check(c, o));
    }
    println!("{n} split calls; worst gradient error {worst:.2e}");
}

#[test]
fn kernels_emulated_on_the_host_match_the_reference() {
    let Some(exe) = calls_exe() else { return };
    let n = cases(60);
    let mut rng = Rng::new(0x6b65726e);
    let calls: Vec<Call> = (0..n).map(|_| random_call(&mut rng)).collect();
    let outs = run(exe, &calls, "random");
    let mut worst = [0f64; 3];
    let mut seen = [[0u32; 6]; 7];
    for (c, o) in calls.iter().zip(&outs) {
        let e = check(c, o);
        let k = match c.pair.1 {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        };
        if e > worst[k] && std::env::var("FWL_SHOW_WORST").is_ok() {
            println!(
                "new worst {e:.3e}: {} {:?}->{:?} {:?} spec {:?}",
                FAMILIES[c.family], c.pair.0, c.pair.1, c.shape, c.spec
            );
        }
        worst[k] = worst[k].max(e);
        seen[PAIRS.iter().position(|&p| p == c.pair).unwrap()][c.family] += 1;
    }
    println!("{n} calls; worst gradient error f32 {:.2e}, f16 {:.2e}, bf16 {:.2e}", worst[0], worst[1], worst[2]);
    println!("calls per (dtype pair, family): {seen:?}");
}

/// A plain f32 call of `b × t × v` with logits in [-1, 1] and ids `1, 2, 3, ...` (mod `v`), 64
/// threads: two warps, so that a block-wide report merges the warps'.
fn plain_call(b: usize, t: usize, v: usize) -> Call {
    let shape = Shape::new(b, t, v).unwrap();
    let mut rng = Rng::new(5);
    Call {
        pair: (DType::F32, DType::F32),
        id_type: 1,
        family: 0,
        shape,
        spec: LossSpec::default(),
        threads: 64,
        grid: 2,
        smem_cap: 1 << 20,
        logits_offset: 0,
        grad: GradMode::Separate,
        grad_offset: 0,
        scale_on_device: false,
        logits: (0..shape.logits_len()).map(|_| 2.0 * rng.unit() as f32 - 1.0).collect(),
        ids: (0..b * t).map(|i| (1 + i % (v - 1)) as i64).collect(),
        labels: None,
        token_weights: None,
        split: None,
    }
}

/// What the plan and finish kernels report of bad tokens and non-finite rows (the host turns
/// the report into the typed errors): the first (smallest flat index) of each kind, across the
/// warps of the block. Status: flags, bad id index and value, bad label index and value,
/// non-finite row, bad token weight index.
#[test]
fn emulated_kernels_report_bad_inputs() {
    let Some(exe) = calls_exe() else { return };
    let (b, t, v) = (3, 4, 50);
    let mut calls = Vec::new();
    let mut want = Vec::new();
    // ids out of range in sample 2 (warp 0's second sample) and sample 1 (warp 1): the first is
    // sample 1's; the ids are the labels, so the label report says the same
    let mut c = plain_call(b, t, v);
    c.ids[9] = 70;
    c.ids[5] = -3;
    calls.push(c);
    want.push([1 | 2, 5, -3, 5, -3, -1, -1]);
    // separate labels: a label out of range, the ids fine; -100 (ignored) is not out of range
    let mut c = plain_call(b, t, v);
    let mut labels = c.ids.clone();
    labels[2] = -100;
    labels[6] = 50;
    labels[10] = -7;
    c.labels = Some(labels);
    c.spec = LossSpec::builder().ignore_index(-100).build().unwrap();
    calls.push(c);
    want.push([2, -1, 0, 6, 50, -1, -1]);
    // a token weight that is not finite
    let mut c = plain_call(b, t, v);
    let mut w = vec![1f32; b * t];
    w[7] = f32::INFINITY;
    w[3] = f32::NAN;
    c.token_weights = Some(w);
    calls.push(c);
    want.push([8, -1, 0, -1, 0, -1, 3]);
    // non-finite logits in rows 6 and 1 (both with a target): row 1 is reported
    let mut c = plain_call(b, t, v);
    c.logits[6 * v + 4] = f32::NAN;
    c.logits[v + 7] = f32::INFINITY;
    calls.push(c);
    want.push([4, -1, 0, -1, 0, 1, -1]);
    let outs = run(exe, &calls, "bad");
    for (i, (o, w)) in outs.iter().zip(&want).enumerate() {
        assert_eq!(&o.status, w, "case {i}: status");
    }
}

/// The rows kernels promise the same bits for any loads in flight (`fwl_rows`, `fwl_rows2`,
/// `fwl_rows4`; the lean `fwl_rowsl`, `fwl_rowsl2`) at one block size, and any grid (a row is
/// one block's): the same call through each, compared bit for bit.
#[test]
fn emulated_rows_kernels_give_the_same_bits_for_any_loads_in_flight_and_grid() {
    let Some(exe) = calls_exe() else { return };
    let n = cases(16);
    let mut rng = Rng::new(0x62697473);
    let (mut calls, mut groups) = (Vec::new(), Vec::new());
    for _ in 0..n {
        // one or two warps: most rows then hold more vectors than a block reads at once, and
        // every thread keeps 2 or 4 in flight
        let c = Call { threads: 32 * (1 + rng.below(2) as u32), ..random_call(&mut rng) };
        let lean = c.family == 3 || c.family == 4;
        let group: &[usize] = if lean { &[3, 4] } else { &[0, 1, 2] };
        groups.push(calls.len()..calls.len() + group.len());
        for (&family, grid) in group.iter().zip([1, 3, 2]) {
            calls.push(Call { family, grid, ..c.clone() });
        }
    }
    let outs = run(exe, &calls, "bits");
    let bits = |o: &Outputs| {
        let mut v = vec![o.loss.to_bits(), o.z_loss.to_bits()];
        v.extend(o.per_sample.iter().chain(&o.row_loss).map(|x| x.to_bits()));
        v.extend(o.grad.iter().map(|x| u64::from(x.to_bits())));
        v
    };
    for g in groups {
        let first = bits(&outs[g.start]);
        for j in g.clone().skip(1) {
            let (a, b) = (&calls[g.start], &calls[j]);
            assert!(
                bits(&outs[j]) == first,
                "{} vs {}: {:?} {:?}",
                FAMILIES[b.family],
                FAMILIES[a.family],
                a.pair,
                a.shape
            );
        }
    }
}
