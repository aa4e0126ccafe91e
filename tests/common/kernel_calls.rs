//! The calls of `tests/kernel_host/calls.cpp` (the CUDA kernels emulated on the host, see
//! `tests/kernel_emulated.rs`): the program compiled once, the file layout of a call and of its
//! outputs, a run of many calls in one process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::host_cxx::{compile, TempDir};
use fused_weighted_loss::{DType, LossSpec, Reduction, RowMean, Shape};

/// The emulated kernels' program, compiled once per test binary (`None`: no C++ compiler):
/// built in a folder of this process's own, then renamed to one name in cargo's temporary
/// folder for tests (a static is never dropped: a folder held by it was left in /tmp by every
/// run). Processes that build it at once rename the same program over each other, and one that
/// runs it meanwhile keeps the file it started.
pub fn calls_exe() -> Option<&'static Path> {
    static EXE: OnceLock<Option<PathBuf>> = OnceLock::new();
    EXE.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // (in the same folder as the program's name: the rename never crosses file systems)
        let dir = TempDir::new_in(tmp, "kernel-calls");
        let built = compile(
            "kernels_emulated_on_the_host",
            "calls.cpp",
            &dir.0,
            &["-Wno-unknown-pragmas", "-fno-extern-tls-init"],
        )?;
        let exe = tmp.join("fwl-kernel-calls");
        std::fs::rename(&built, &exe)
            .unwrap_or_else(|e| panic!("moving {} to {}: {e}", built.display(), exe.display()));
        Some(exe)
    })
    .as_deref()
}

/// The rows kernel families, in `calls.cpp`'s order: `fwl_rows_*`, the lean `fwl_rowsl_*`,
/// `fwl_rowsl2_*` (the plain loss only, as the crate launches them), `fwl_rowslo_*` (the
/// options'), `fwl_rowslh_*` (the plain loss, with L2 hints: plain accesses on the host) and
/// `fwl_rowslp_*` (the plain loss, the cache filled by asynchronous copies: copies made at once
/// on the host).
pub const FAMILIES: [&str; 6] = ["rows", "rowsl", "rowsl2", "rowslo", "rowslh", "rowslp"];

/// The (logits, gradient) pairs that have kernels.
pub const PAIRS: [(DType, DType); 7] = [
    (DType::F32, DType::F32),
    (DType::F16, DType::F16),
    (DType::F16, DType::F32),
    (DType::BF16, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::F32, DType::F16),
    (DType::F32, DType::BF16),
];

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum GradMode {
    None,
    Separate,
    InPlace,
}

/// One call of the emulated kernels. Its file layout (little-endian), which `calls.cpp` reads:
/// 22 i64 (magic, logits / gradient dtype 0 f32 1 f16 2 bf16, id type 0 i32 1 i64 2 u32,
/// family, B, T, V, ignore_index, row mean 0 all 1 valid, reduction 0 mean 1 weighted 2 sum,
/// keywords, threads, grid, shared-memory vectors at most, logits offset, gradient mode 0 none
/// 1 separate 2 in place, gradient offset, labels?, token weights?, grad scale on the device?,
/// rows per chunk), 5 f64 (alpha, grad scale, softcap or 0, z-loss, smoothing), keyword ids
/// (i64) and weights (f64), logits (f32, values the dtype holds), ids (i64), labels, token
/// weights (f32); for the split (its own magic) then data ranks, vocabulary ranks, whole rows?,
/// the sample and the column cuts (i64).
#[derive(Debug, Clone)]
pub struct Call {
    pub pair: (DType, DType),
    pub id_type: i64,
    pub family: usize,
    pub shape: Shape,
    pub spec: LossSpec,
    pub threads: u32,
    pub grid: u32,
    pub smem_cap: i64,
    pub logits_offset: i64,
    pub grad: GradMode,
    pub grad_offset: i64,
    pub scale_on_device: bool,
    pub logits: Vec<f32>,
    pub ids: Vec<i64>,
    pub labels: Option<Vec<i64>>,
    pub token_weights: Option<Vec<f32>>,
    /// Through the vocabulary- and data-parallel split's kernels instead of the one-device ones.
    pub split: Option<Split>,
    /// Rows per launch of the rows (or the split's) kernels, each launch at its row offset.
    pub chunk: i64,
}

/// A grid of ranks: sample cuts from 0 to B (data ranks + 1; a data rank may hold no sample),
/// column cuts from 0 to V (vocabulary ranks + 1, every rank with columns).
#[derive(Debug, Clone)]
pub struct Split {
    pub sample_cuts: Vec<i64>,
    pub column_cuts: Vec<i64>,
    /// With one vocabulary rank: the rows kernel of the call's family on whole rows (the
    /// crate's `launch_whole_rows`) instead of the statistics, exchange and gradient.
    pub whole_rows: bool,
}

const MAGIC: i64 = 0x46574c4b01;
const MAGIC_SPLIT: i64 = 0x46574c4b02;
const MAGIC_SCALE: i64 = 0x46574c4b03;
const MAGIC_NARROW: i64 = 0x46574c4b04;

fn dtype_code(d: DType) -> i64 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

impl Call {
    pub fn write(&self, out: &mut Vec<u8>) {
        let s = &self.spec;
        let header: [i64; 22] = [
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
            self.chunk,
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
            let n = [sp.sample_cuts.len() as i64 - 1, sp.column_cuts.len() as i64 - 1, sp.whole_rows as i64];
            n.iter()
                .chain(&sp.sample_cuts)
                .chain(&sp.column_cuts)
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
    }
}

/// What `calls.cpp` writes per call: loss, z-loss and the f32 loss (f64), the status (flags, bad
/// id index and value, bad label index and value, non-finite row, bad token weight index; i64;
/// then the bad token weight's value and the bad sample weight, f64),
/// weights, per-sample losses and z-losses (f64 [B]), valid targets (i64 [B]), each row's loss
/// (f64 [B·T]), then the gradient as f32 [B·T·V] when the call asks for one.
#[derive(Debug)]
pub struct Outputs {
    pub loss: f64,
    pub z_loss: f64,
    pub loss_f32: f64,
    pub status: [i64; 7],
    /// The status's values: the first bad token weight, the bad sample weight (or sum); 0 when
    /// there is none.
    pub status_values: [f64; 2],
    pub weights: Vec<f64>,
    pub per_sample: Vec<f64>,
    pub per_sample_z: Vec<f64>,
    pub valid: Vec<i64>,
    pub row_loss: Vec<f64>,
    pub grad: Vec<f32>,
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

/// The program on a file of calls (one process for all of them): what it wrote.
fn execute(exe: &Path, input: &[u8], tag: &str) -> Vec<u8> {
    let dir = TempDir::new(&format!("kernel-run-{tag}"));
    let (inp, outp) = (dir.0.join("calls.bin"), dir.0.join("outputs.bin"));
    std::fs::write(&inp, input).unwrap();
    let run = Command::new(exe).arg(&inp).arg(&outp).output().unwrap();
    if !run.status.success() {
        if let Ok(keep) = std::env::var("FWL_EMU_KEEP") {
            std::fs::copy(&inp, keep).unwrap();
        }
    }
    assert!(
        run.status.success(),
        "the emulated kernels failed ({}):\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read(&outp).unwrap()
}

/// Runs the calls through the emulated kernels (one process for all of them).
pub fn run(exe: &Path, calls: &[Call], tag: &str) -> Vec<Outputs> {
    let mut input = Vec::new();
    calls.iter().for_each(|c| c.write(&mut input));
    let bytes = execute(exe, &input, tag);
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
                status_values: r.f64s(2).try_into().unwrap(),
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

/// With `FWL_EMU_KEEP=<file>`, writes the call about to be checked there (overwritten call by
/// call: after a failure it holds the failing one, for `calls <file> <out>` by hand).
pub fn keep(c: &Call) {
    if let Ok(path) = std::env::var("FWL_EMU_KEEP") {
        let mut bytes = Vec::new();
        c.write(&mut bytes);
        std::fs::write(path, bytes).unwrap();
    }
}

/// One launch of `fwl_scale_<dtype>` (`grad *= scale`, the candle op's upstream gradient as a
/// device scalar). File layout: 6 i64 (magic, dtype, n, grid, threads, offset of the buffer past
/// its alignment), the scale (f32), the n elements' bits (u32 each, the low 16 for 16-bit types).
/// The elements around them hold [`SCALE_GUARD`] bytes.
#[derive(Debug, Clone)]
pub struct ScaleCall {
    pub dtype: DType,
    pub grid: u32,
    pub threads: u32,
    pub offset: i64,
    pub scale: f32,
    pub bits: Vec<u32>,
}

/// The byte of the `offset` elements before a scale call's gradient and the 8 after it (a finite
/// number of every type: a write there shows).
pub const SCALE_GUARD: u8 = 0x5a;

impl ScaleCall {
    fn write(&self, out: &mut Vec<u8>) {
        let h = [
            MAGIC_SCALE,
            dtype_code(self.dtype),
            self.bits.len() as i64,
            self.grid as i64,
            self.threads as i64,
            self.offset,
        ];
        h.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        out.extend_from_slice(&self.scale.to_le_bytes());
        self.bits.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    }
}

/// One launch of `fwl_narrow_<dtype>` (`dst = src` rounded to 16 bits, the tiled fused linear
/// schedule's `d hidden`). File layout: 6 i64 (magic, dtype 1 or 2, n, grid, threads, offset of
/// the destination past its alignment), the n sources' bits (u32). The elements around the
/// destination hold [`SCALE_GUARD`] bytes.
#[derive(Debug, Clone)]
pub struct NarrowCall {
    pub dtype: DType,
    pub grid: u32,
    pub threads: u32,
    pub offset: i64,
    pub src: Vec<f32>,
}

impl NarrowCall {
    fn write(&self, out: &mut Vec<u8>) {
        let h = [
            MAGIC_NARROW,
            dtype_code(self.dtype),
            self.src.len() as i64,
            self.grid as i64,
            self.threads as i64,
            self.offset,
        ];
        h.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        self.src.iter().for_each(|v| out.extend_from_slice(&v.to_bits().to_le_bytes()));
    }
}

/// Runs the narrow calls: for each, the bits of its destination (each element's, zero-extended)
/// from `offset` elements before it to 8 after it.
pub fn run_narrow(exe: &Path, calls: &[NarrowCall]) -> Vec<Vec<u32>> {
    let mut input = Vec::new();
    calls.iter().for_each(|c| c.write(&mut input));
    let bytes = execute(exe, &input, "narrow");
    let mut r = Reader(&bytes);
    let outs = calls
        .iter()
        .map(|c| (0..c.offset as usize + c.src.len() + 8).map(|_| u32::from_le_bytes(r.take())).collect())
        .collect();
    assert!(r.0.is_empty(), "the emulated kernels wrote more than the calls asked for");
    outs
}

/// Runs the scale calls: for each, the bits of its buffer (each element's, zero-extended) from
/// `offset` elements before the gradient to 8 after it.
pub fn run_scale(exe: &Path, calls: &[ScaleCall]) -> Vec<Vec<u32>> {
    let mut input = Vec::new();
    calls.iter().for_each(|c| c.write(&mut input));
    let bytes = execute(exe, &input, "scale");
    let mut r = Reader(&bytes);
    let outs = calls
        .iter()
        .map(|c| (0..c.offset as usize + c.bits.len() + 8).map(|_| u32::from_le_bytes(r.take())).collect())
        .collect();
    assert!(r.0.is_empty(), "the emulated kernels wrote more than the calls asked for");
    outs
}
