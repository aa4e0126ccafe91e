//! The CUDA backend (feature `cuda`): the caller's device buffers and stream, three launches per
//! call, no host synchronisation until the caller asks for results on the host.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use fused_weighted_loss::cuda::{cudarc::driver::CudaContext, CudaLoss, DeviceInputs};
//! use fused_weighted_loss::{bf16, LossSpec, Shape};
//!
//! let ctx = CudaContext::new(0)?;
//! let stream = ctx.default_stream();
//! let shape = Shape::new(8, 1024, 128_256)?;
//! let logits = stream.alloc_zeros::<bf16>(shape.logits_len())?; // your model's output
//! let ids = stream.alloc_zeros::<i64>(shape.rows())?;
//! let mut grad = stream.alloc_zeros::<bf16>(shape.logits_len())?;
//!
//! let loss = CudaLoss::new(&ctx)?;
//! let spec = LossSpec::builder().keywords([3, 17]).build()?;
//! let ids = ids.as_view();
//! let out = loss.loss_and_grad(&spec, shape, &stream, &logits.as_view(), &DeviceInputs::new(&ids), &mut grad.as_view_mut())?;
//! // everything so far is queued on `stream`; this synchronises and checks the ids:
//! let host = out.to_host(&stream)?;
//! println!("loss {}", host.loss);
//! # Ok(()) }
//! ```
//!
//! Ids and labels live on the device, so their range is checked there: an id or label outside
//! `[0, V)` is treated as "no target" by the kernels (never read out of bounds) and reported as
//! [`Error::IdOutOfRange`] by [`DeviceLossOutput::to_host`] or [`DeviceLossOutput::check`].

mod params {
    #![allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code, missing_docs)]
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/params.rs"));
}

pub use cudarc;
pub mod external;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod split;

use crate::dtype::{DType, Logit, TokenId};
use crate::error::{Error, Result};
use crate::spec::{check_len, LossOutput, LossSpec, Reduction, RowMean, Shape, Tokens};
use crate::{Backend, Grad};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg,
};
use params::{FwlFinishParams, FwlPlanParams, FwlRowParams, FwlScaleParams, FwlStatus};
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// The kernels, compiled by build.rs (SASS for sm_80/86/89/90, PTX for compute_80).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/weighted_loss.fatbin"));

/// Threads per block of every kernel.
const THREADS: u32 = params::FWL_THREADS;

/// Most keywords one launch carries (`FWL_MAX_KEYWORDS`).
pub const MAX_KEYWORDS: usize = params::FWL_MAX_KEYWORDS as usize;

// SAFETY: bindgen's #[repr(C)] copies of kernels/params.h, plain data (device addresses and
// numbers) that the kernels take by value; their layout is the C layout nvcc uses.
unsafe impl DeviceRepr for FwlPlanParams {}
unsafe impl DeviceRepr for FwlRowParams {}
unsafe impl DeviceRepr for FwlFinishParams {}
unsafe impl DeviceRepr for FwlScaleParams {}
unsafe impl DeviceRepr for FwlStatus {}

/// Maps a driver error to [`Error::Cuda`] with what the crate was doing.
fn drv(context: &'static str) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Cuda { context, message: e.to_string() }
}

/// A device buffer of `n` elements for a kernel output, ordered on `stream` and left
/// uninitialised: every caller passes it to a launch that writes all of it before anything reads
/// it (see each use).
fn output<T: DeviceRepr>(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: see above; the memory is only ever read after the kernel that fills it.
    unsafe { stream.alloc::<T>(n) }.map_err(drv("allocating device memory"))
}

/// Whether a CUDA driver and at least one device are present (checked once per process,
/// without touching cudarc until the driver library is known to load).
pub(crate) fn status() -> std::result::Result<(), String> {
    static STATUS: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATUS
        .get_or_init(|| {
            let present = ["libcuda.so.1", "libcuda.so", "nvcuda.dll"].iter().any(|name| {
                // SAFETY: loads the CUDA driver library, as cudarc itself would; its
                // initialisers are the driver's own.
                unsafe { libloading::Library::new(name) }.is_ok()
            });
            if !present {
                return Err("no CUDA driver (libcuda) on this machine".into());
            }
            match CudaContext::device_count() {
                Ok(n) if n > 0 => Ok(()),
                Ok(_) => Err("the CUDA driver reports no device".into()),
                Err(e) => Err(format!("the CUDA driver did not initialise: {e}")),
            }
        })
        .clone()
}

/// How the rows kernel is launched: threads per block, resident blocks per multiprocessor, loads
/// in flight per thread and blocks per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RowLaunch {
    threads: u32,
    blocks_per_sm: u32,
    unroll: u32,
    /// 1, or the size of the thread-block cluster that shares a row (sm_90 and later).
    cluster: u32,
}

impl RowLaunch {
    /// 1024 threads, 2 blocks per multiprocessor, 1 load in flight, one block per row (the
    /// configuration measured on hardware), unless the tuning knobs say otherwise:
    /// `FWL_CUDA_ROW_THREADS` (256, 512 or 1024), `FWL_CUDA_BLOCKS_PER_SM` (1 to 8, at most 2048
    /// threads per multiprocessor), `FWL_CUDA_ROW_UNROLL` (1, 2 or 4) and `FWL_CUDA_ROW_CLUSTER`
    /// (1, 2 or 4; with an unroll of 1 or 2). A value outside those sets is ignored. Read when a
    /// context loads the kernels.
    fn from_env() -> RowLaunch {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(get: impl Fn(&str) -> Option<String>) -> RowLaunch {
        let var = |name: &str| get(name).and_then(|v| v.trim().parse::<u32>().ok());
        let threads = var("FWL_CUDA_ROW_THREADS").filter(|t| [256, 512, 1024].contains(t)).unwrap_or(THREADS);
        let blocks_per_sm =
            var("FWL_CUDA_BLOCKS_PER_SM").filter(|b| (1..=8).contains(b) && b * threads <= 2048).unwrap_or(2);
        let unroll = var("FWL_CUDA_ROW_UNROLL").filter(|u| [1, 2, 4].contains(u)).unwrap_or(1);
        let cluster = var("FWL_CUDA_ROW_CLUSTER").filter(|c| [1, 2, 4].contains(c) && unroll <= 2).unwrap_or(1);
        RowLaunch { threads, blocks_per_sm, unroll, cluster }
    }

    /// The rows kernel for `l` logits and a `g` gradient in this configuration.
    fn kernel_name(&self, l: DType, g: DType) -> String {
        let unroll = if self.unroll > 1 { self.unroll.to_string() } else { String::new() };
        let cluster = if self.cluster > 1 { format!("c{}", self.cluster) } else { String::new() };
        format!("fwl_rows{unroll}{cluster}_{}_{}", l.name(), g.name())
    }
}

/// The loaded kernels of one context.
struct Module {
    plan_i32: CudaFunction,
    plan_i64: CudaFunction,
    plan_u32: CudaFunction,
    rows: [(DType, DType, CudaFunction); 5],
    finish: CudaFunction,
    scale: [(DType, CudaFunction); 3],
    num_sms: u32,
    /// Dynamic shared memory a rows block may use (bytes, multiple of 16), sized for the
    /// resident blocks per multiprocessor of [`RowLaunch`].
    smem_max: usize,
    /// How the rows kernel is launched (threads per block: `launch.threads`).
    launch: RowLaunch,
    /// The vocabulary- and data-parallel split's kernels.
    split: split::SplitFns,
}

impl Module {
    fn load(ctx: &Arc<CudaContext>) -> Result<Module> {
        Self::load_with(ctx, RowLaunch::from_env())
    }

    fn load_with(ctx: &Arc<CudaContext>, mut launch: RowLaunch) -> Result<Module> {
        let module =
            ctx.load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec())).map_err(drv("loading the kernels"))?;
        let f = |name: &str| module.load_function(name).map_err(drv("finding a kernel"));
        let num_sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv("querying the device"))?;
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(drv("querying the device"))?;
        let per_sm = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)
            .map_err(drv("querying the device"))?;
        if launch.cluster > 1 {
            // the cluster kernels are empty where the device runs code built below sm_90 (an
            // older device, or a newer one that compiles the embedded PTX): they carry no
            // cluster width there (or a driver cannot say), and one block per row is used instead
            let probe = f(&launch.kernel_name(DType::F32, DType::F32))?;
            let width =
                probe.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH).unwrap_or(0);
            if width != launch.cluster as i32 {
                launch.cluster = 1;
            }
        }
        let row = |l: DType, g: DType| f(&launch.kernel_name(l, g)).map(|func| (l, g, func));
        let rows = [
            row(DType::F32, DType::F32)?,
            row(DType::F16, DType::F16)?,
            row(DType::F16, DType::F32)?,
            row(DType::BF16, DType::BF16)?,
            row(DType::BF16, DType::F32)?,
        ];
        let blocks_per_sm = launch.blocks_per_sm;
        let mut smem_max = usize::MAX;
        for (_, _, func) in &rows {
            let fixed = func
                .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(drv("querying a kernel"))?;
            // room for `blocks_per_sm` resident blocks per multiprocessor (the driver keeps 1 KiB
            // per block), so that one block's gradient writes overlap another's reads; a row
            // longer than that re-reads its remainder, from L2
            let share = per_sm / blocks_per_sm as i32 - fixed - 1024;
            let dynamic = (optin - fixed).min(share).max(0) as usize / 16 * 16;
            func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic as i32)
                .map_err(drv("configuring a kernel"))?;
            smem_max = smem_max.min(dynamic);
        }
        if launch.cluster > 1 {
            // a cluster whose blocks cannot all be resident at once would never launch
            let stream = ctx.default_stream();
            for (_, _, func) in &rows {
                let probe = LaunchConfig {
                    grid_dim: (num_sms.max(1) as u32 * launch.cluster, 1, 1),
                    block_dim: (launch.threads, 1, 1),
                    shared_mem_bytes: smem_max as u32,
                };
                if func.occupancy_max_active_clusters(probe, &stream).unwrap_or(0) == 0 {
                    return Self::load_with(ctx, RowLaunch { cluster: 1, ..launch });
                }
            }
        }
        Ok(Module {
            plan_i32: f("fwl_plan_i32")?,
            plan_i64: f("fwl_plan_i64")?,
            plan_u32: f("fwl_plan_u32")?,
            rows,
            finish: f("fwl_finish")?,
            scale: [
                (DType::F32, f("fwl_scale_f32")?),
                (DType::F16, f("fwl_scale_f16")?),
                (DType::BF16, f("fwl_scale_bf16")?),
            ],
            num_sms: num_sms.max(1) as u32,
            smem_max,
            launch,
            split: split::SplitFns::load(f)?,
        })
    }

    /// The module of `ctx`, loaded once per context and shared while anyone holds it.
    fn of(ctx: &Arc<CudaContext>) -> Result<Arc<Module>> {
        static CACHE: Mutex<Vec<(usize, Weak<Module>)>> = Mutex::new(Vec::new());
        let key = ctx.cu_ctx() as usize;
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(_, m)| m.strong_count() > 0);
        if let Some(m) = cache.iter().find(|(k, _)| *k == key).and_then(|(_, m)| m.upgrade()) {
            return Ok(m);
        }
        let m = Arc::new(Module::load(ctx)?);
        cache.push((key, Arc::downgrade(&m)));
        Ok(m)
    }

    fn plan_fn<I: TokenId>(&self) -> &CudaFunction {
        match I::NAME {
            "i32" => &self.plan_i32,
            "u32" => &self.plan_u32,
            _ => &self.plan_i64,
        }
    }

    fn rows_fn(&self, l: DType, g: DType) -> Option<&CudaFunction> {
        self.rows.iter().find(|(a, b, _)| *a == l && *b == g).map(|(_, _, f)| f)
    }
}

/// The per-call token inputs on the device: ids `[B, T]`, optional labels and token weights
/// `[B, T]` and an optional device scalar for the upstream gradient (instead of the spec's host
/// value).
#[derive(Debug)]
pub struct DeviceInputs<'a, I: TokenId> {
    ids: &'a CudaView<'a, I>,
    labels: Option<&'a CudaView<'a, I>>,
    token_weights: Option<&'a CudaView<'a, f32>>,
    grad_scale: Option<&'a CudaView<'a, f32>>,
}

impl<'a, I: TokenId> DeviceInputs<'a, I> {
    /// Ids only: the labels are the ids.
    pub fn new(ids: &'a CudaView<'a, I>) -> Self {
        DeviceInputs { ids, labels: None, token_weights: None, grad_scale: None }
    }
    /// Separate labels (values in `[0, V)` or `ignore_index`).
    pub fn with_labels(self, labels: &'a CudaView<'a, I>) -> Self {
        DeviceInputs { labels: Some(labels), ..self }
    }
    /// Per-token weights `[B, T]`, aligned with the labels as in
    /// [`Tokens::with_token_weights`]; a non-finite weight is reported by
    /// [`DeviceLossOutput::check`].
    pub fn with_token_weights(self, weights: &'a CudaView<'a, f32>) -> Self {
        DeviceInputs { token_weights: Some(weights), ..self }
    }
    /// Reads the upstream gradient scale from this one-element device buffer (no host sync),
    /// instead of [`LossSpec::grad_scale`].
    pub fn with_grad_scale(self, scale: &'a CudaView<'a, f32>) -> Self {
        DeviceInputs { grad_scale: Some(scale), ..self }
    }
}

/// Results left on the device; [`to_host`](Self::to_host) brings them back (and synchronises).
#[derive(Debug)]
pub struct DeviceLossOutput {
    /// The batch loss, one `f64`.
    pub loss: CudaSlice<f64>,
    /// Each sample's mean per-token loss, `[B]`.
    pub per_sample_loss: CudaSlice<f64>,
    /// Each sample's weight, `[B]`.
    pub weights: CudaSlice<f64>,
    /// Each sample's number of non-ignored targets, `[B]`.
    pub valid_tokens: CudaSlice<u32>,
    /// The batch loss rounded to `f32`, one element (what frameworks' scalar losses hold).
    pub loss_f32: CudaSlice<f32>,
    /// Each position's loss (0 where there is no target), `[B * T]`: the per-token losses
    /// (with smoothing and z-loss, before token and sample weights); position `T - 1` of each
    /// sample has no target.
    pub row_loss: CudaSlice<f64>,
    /// The z-loss part of the batch loss, one `f64` (0 when z-loss is off).
    pub z_loss: CudaSlice<f64>,
    status: CudaSlice<FwlStatus>,
    shape: Shape,
    check_finite: bool,
}

impl DeviceLossOutput {
    /// Waits for the call's work on `stream` and reports what the kernels found: ids or labels
    /// outside the vocabulary, and (with `check_finite`) a non-finite loss.
    pub fn check(&self, stream: &Arc<CudaStream>) -> Result<()> {
        let mut st = [FwlStatus::default()];
        stream.memcpy_dtoh(&self.status, &mut st).map_err(drv("reading the status"))?;
        stream.synchronize().map_err(drv("synchronising"))?;
        let st = st[0];
        let t = self.shape.seq() as i64;
        let at = |what, i: i64, value| Error::IdOutOfRange {
            what,
            batch: (i / t) as usize,
            position: (i % t) as usize,
            value,
            vocab: self.shape.vocab(),
        };
        if st.flags & params::FWL_STATUS_BAD_ID != 0 {
            return Err(at("ids", st.bad_id_index, st.bad_id_value));
        }
        if st.flags & params::FWL_STATUS_BAD_LABEL != 0 {
            return Err(at("labels", st.bad_label_index, st.bad_label_value));
        }
        if st.flags & params::FWL_STATUS_BAD_TOKEN_WEIGHT != 0 {
            let i = st.bad_weight_index;
            return Err(Error::InvalidTokenWeight {
                batch: (i / t) as usize,
                position: (i % t) as usize,
                value: st.bad_weight_value,
            });
        }
        if self.check_finite && st.flags & params::FWL_STATUS_NON_FINITE != 0 {
            let i = st.non_finite_row;
            let mut v = [0f64];
            stream.memcpy_dtoh(&self.row_loss.slice(i as usize..i as usize + 1), &mut v).map_err(drv("reading"))?;
            stream.synchronize().map_err(drv("synchronising"))?;
            return Err(Error::NonFinite { batch: (i / t) as usize, position: (i % t) as usize, value: v[0] });
        }
        Ok(())
    }

    /// Copies the results to the host (synchronising `stream`) after [`check`](Self::check).
    pub fn to_host(&self, stream: &Arc<CudaStream>) -> Result<LossOutput> {
        self.check(stream)?;
        let copy = |e| Error::Cuda { context: "copying results to the host", message: DriverError::to_string(&e) };
        let loss = stream.clone_dtoh(&self.loss).map_err(copy)?;
        let z_loss = stream.clone_dtoh(&self.z_loss).map_err(copy)?;
        let per_sample_loss = stream.clone_dtoh(&self.per_sample_loss).map_err(copy)?;
        let weights = stream.clone_dtoh(&self.weights).map_err(copy)?;
        let valid: Vec<u32> = stream.clone_dtoh(&self.valid_tokens).map_err(copy)?;
        stream.synchronize().map_err(drv("synchronising"))?;
        Ok(LossOutput {
            loss: loss[0],
            per_sample_loss,
            weights,
            valid_tokens: valid.into_iter().map(u64::from).collect(),
            z_loss: z_loss[0],
            backend: Backend::Cuda,
        })
    }

    /// Copies the per-token losses `[B, T - 1]` (see [`row_loss`](Self::row_loss)) into `out`,
    /// synchronising `stream`.
    pub fn token_loss_to_host(&self, stream: &Arc<CudaStream>, out: &mut [f32]) -> Result<()> {
        let (b, t) = (self.shape.batch(), self.shape.seq());
        if out.len() != b * (t - 1) {
            return Err(Error::TokenLossLength { expected: b * (t - 1), got: out.len() });
        }
        let rows = stream.clone_dtoh(&self.row_loss).map_err(drv("copying results to the host"))?;
        stream.synchronize().map_err(drv("synchronising"))?;
        for (o, r) in out.chunks_exact_mut(t - 1).zip(rows.chunks_exact(t)) {
            for (o, &r) in o.iter_mut().zip(r) {
                *o = r as f32;
            }
        }
        Ok(())
    }
}

/// The fused loss on one CUDA context. Cheap to clone; the kernels are loaded once per context
/// and unloaded when the last `CudaLoss` of that context is dropped.
#[derive(Clone)]
pub struct CudaLoss {
    ctx: Arc<CudaContext>,
    module: Arc<Module>,
}

impl std::fmt::Debug for CudaLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLoss").field("ordinal", &self.ctx.ordinal()).finish()
    }
}

/// The plan kernel's outputs and the row losses the kernels after it fill.
struct Planned {
    targets: CudaSlice<i32>,
    weights: CudaSlice<f64>,
    valid: CudaSlice<u32>,
    row_div: CudaSlice<f64>,
    reduce: CudaSlice<f64>,
    coef: CudaSlice<f32>,
    status: CudaSlice<FwlStatus>,
    row_loss: CudaSlice<f64>,
    /// The z-loss part of each row's loss (one unused element when z-loss is off).
    row_z: CudaSlice<f64>,
    z_on: bool,
}

/// Device addresses of one call (0 for absent), held while the launches are queued.
struct Ptrs {
    logits: u64,
    grad: u64,
    ids: u64,
    labels: u64,
    token_weights: u64,
    scale: u64,
}

impl CudaLoss {
    /// Loads (or reuses) the kernels on `ctx`.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<CudaLoss> {
        Ok(CudaLoss { ctx: ctx.clone(), module: Module::of(ctx)? })
    }

    /// The context the kernels are loaded on.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The loss only: the logits are read once, nothing is written to them.
    pub fn loss<L: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        logits: &CudaView<'_, L>,
        inputs: &DeviceInputs<'_, I>,
    ) -> Result<DeviceLossOutput> {
        self.validate(spec, shape, logits.len(), inputs, None)?;
        let (l, _gl) = logits.device_ptr(stream);
        self.with_inputs(stream, inputs, l, 0, |s, p| self.launch::<L, L, I>(spec, shape, s, p))
    }

    /// Loss and gradient, the gradient into `grad` (`B * T * V` elements), whose dtype `G` is
    /// the logits' own or `f32` (another pairing is [`Error::Unsupported`]).
    pub fn loss_and_grad<L: Logit, G: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        logits: &CudaView<'_, L>,
        inputs: &DeviceInputs<'_, I>,
        grad: &mut CudaViewMut<'_, G>,
    ) -> Result<DeviceLossOutput> {
        self.validate(spec, shape, logits.len(), inputs, Some(grad.len()))?;
        let (l, _gl) = logits.device_ptr(stream);
        let (g, _gg) = grad.device_ptr_mut(stream);
        self.with_inputs(stream, inputs, l, g, |s, p| self.launch::<L, G, I>(spec, shape, s, p))
    }

    /// Loss and gradient, the gradient written over the logits.
    pub fn loss_and_grad_in_place<L: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        logits: &mut CudaViewMut<'_, L>,
        inputs: &DeviceInputs<'_, I>,
    ) -> Result<DeviceLossOutput> {
        self.validate(spec, shape, logits.len(), inputs, None)?;
        let (l, _gl) = logits.device_ptr_mut(stream);
        self.with_inputs(stream, inputs, l, l, |s, p| self.launch::<L, L, I>(spec, shape, s, p))
    }

    /// Everything that can be checked without reading device memory.
    fn validate<I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        logits_len: usize,
        inputs: &DeviceInputs<'_, I>,
        grad_len: Option<usize>,
    ) -> Result<()> {
        check_len("logits", logits_len, shape.logits_len(), shape)?;
        if let Some(got) = grad_len {
            if got != shape.logits_len() {
                return Err(Error::GradLength { expected: shape.logits_len(), got });
            }
        }
        check_len("ids", inputs.ids.len(), shape.rows(), shape)?;
        if let Some(labels) = inputs.labels {
            check_len("labels", labels.len(), shape.rows(), shape)?;
        }
        if let Some(w) = inputs.token_weights {
            check_len("token_weights", w.len(), shape.rows(), shape)?;
        }
        if let Some(s) = inputs.grad_scale {
            check_len("grad_scale", s.len(), 1, shape)?;
        }
        if spec.keywords.len() > MAX_KEYWORDS {
            return Err(Error::Unsupported(format!(
                "the CUDA backend takes at most {MAX_KEYWORDS} keywords, got {}",
                spec.keywords.len()
            )));
        }
        for k in &spec.keywords {
            if !(0..shape.vocab() as i64).contains(&k.id) {
                return Err(Error::KeywordOutOfRange { id: k.id, vocab: shape.vocab() });
            }
        }
        if shape.vocab() > i32::MAX as usize || shape.batch() > u32::MAX as usize {
            return Err(Error::Unsupported("shape too large for the CUDA kernels".into()));
        }
        Ok(())
    }

    /// Takes the device addresses of the token inputs and runs `f` while they are held.
    fn with_inputs<I: TokenId, R>(
        &self,
        stream: &Arc<CudaStream>,
        inputs: &DeviceInputs<'_, I>,
        logits: u64,
        grad: u64,
        f: impl FnOnce(&Arc<CudaStream>, &Ptrs) -> Result<R>,
    ) -> Result<R> {
        let (ids, _gi) = inputs.ids.device_ptr(stream);
        let labels = inputs.labels.map(|l| l.device_ptr(stream));
        let weights = inputs.token_weights.map(|w| w.device_ptr(stream));
        let scale = inputs.grad_scale.map(|s| s.device_ptr(stream));
        let ptrs = Ptrs {
            logits,
            grad,
            ids,
            labels: labels.as_ref().map_or(0, |l| l.0),
            token_weights: weights.as_ref().map_or(0, |w| w.0),
            scale: scale.as_ref().map_or(0, |s| s.0),
        };
        f(stream, &ptrs)
    }

    /// Queues plan, rows and finish on `stream`.
    fn launch<L: Logit, G: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
    ) -> Result<DeviceLossOutput> {
        let mut planned = self.launch_plan::<I>(spec, shape, stream, p)?;
        self.launch_rows::<L, G>(spec, shape, stream, p, &mut planned)?;
        self.launch_finish(spec, shape, stream, p, planned)
    }

    /// Queues the plan kernel; its outputs, and the row losses the kernels after it fill, are
    /// allocated here.
    fn launch_plan<I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
    ) -> Result<Planned> {
        let m = &self.module;
        let (b, rows) = (shape.batch(), shape.rows());
        // plan writes targets (all B*T), the per-sample arrays (all B) and the status; rows
        // writes every row loss
        let mut targets = output::<i32>(stream, rows)?;
        let mut weights = output::<f64>(stream, b)?;
        let mut valid = output::<u32>(stream, b)?;
        let mut row_div = output::<f64>(stream, b)?;
        let mut reduce = output::<f64>(stream, b)?;
        let mut coef = output::<f32>(stream, b)?;
        let mut status = output::<FwlStatus>(stream, 1)?;
        let row_loss = output::<f64>(stream, rows)?;
        // the z-loss parts only with z-loss on (the kernels take NULL otherwise)
        let z_on = spec.z_loss != 0.0;
        let row_z = output::<f64>(stream, if z_on { rows } else { 1 })?;

        // plan: one block
        {
            let (t, _g1) = targets.device_ptr_mut(stream);
            let (w, _g2) = weights.device_ptr_mut(stream);
            let (v, _g3) = valid.device_ptr_mut(stream);
            let (d, _g4) = row_div.device_ptr_mut(stream);
            let (r, _g5) = reduce.device_ptr_mut(stream);
            let (c, _g6) = coef.device_ptr_mut(stream);
            let (s, _g7) = status.device_ptr_mut(stream);
            let mut pp = FwlPlanParams {
                ids: p.ids as *const c_void,
                labels: p.labels as *const c_void,
                batch: b as i64,
                seq: shape.seq() as i64,
                vocab: shape.vocab() as i64,
                ignore_index: spec.ignore_index,
                row_mean: match spec.row_mean {
                    RowMean::AllPositions => params::FWL_ROW_MEAN_ALL as i32,
                    RowMean::ValidTokens => params::FWL_ROW_MEAN_VALID as i32,
                },
                reduction: match spec.reduction {
                    Reduction::Mean => params::FWL_REDUCE_MEAN as i32,
                    Reduction::WeightedMean => params::FWL_REDUCE_WEIGHTED_MEAN as i32,
                    Reduction::Sum => params::FWL_REDUCE_SUM as i32,
                },
                num_keywords: spec.keywords.len() as i32,
                alpha: spec.alpha,
                grad_scale: spec.grad_scale,
                grad_scale_ptr: p.scale as *const f32,
                token_weights: p.token_weights as *const f32,
                targets: t as *mut i32,
                weights: w as *mut f64,
                valid: v as *mut u32,
                row_div: d as *mut f64,
                reduce: r as *mut f64,
                coef: c as *mut f32,
                status: s as *mut FwlStatus,
                ..Default::default()
            };
            for (i, k) in spec.keywords.iter().enumerate() {
                pp.keyword_ids[i] = k.id;
                pp.keyword_weights[i] = k.weight;
            }
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the parameters match fwl_plan_*'s; every pointer is a live device buffer of
            // the length the kernel indexes (B*T ids/labels/targets, B per-sample arrays, 1 status).
            unsafe { stream.launch_builder(m.plan_fn::<I>()).arg(&pp).launch(cfg) }.map_err(drv("launching plan"))?;
        }
        Ok(Planned { targets, weights, valid, row_div, reduce, coef, status, row_loss, row_z, z_on })
    }

    /// Queues the rows kernel over every row.
    fn launch_rows<L: Logit, G: Logit>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
        planned: &mut Planned,
    ) -> Result<()> {
        let (m, rows, z_on) = (&self.module, shape.rows(), planned.z_on);
        let Planned { targets, coef, row_loss, row_z, .. } = planned;
        // rows: grid-stride, as many resident blocks as the shared memory allows
        {
            let func = m.rows_fn(L::DTYPE, G::DTYPE).ok_or_else(|| {
                Error::Unsupported(format!("no CUDA kernel for {} logits with a {} gradient", L::DTYPE, G::DTYPE))
            })?;
            // each of the `cluster` blocks of a row keeps its slice of the row
            let cluster = m.launch.cluster as usize;
            let slice_vectors = (shape.vocab() * L::DTYPE.size()).div_ceil(16).div_ceil(cluster);
            let smem_vectors = if p.grad != 0 { slice_vectors.min(m.smem_max / 16) } else { 0 };
            let smem = smem_vectors * 16;
            let block = (m.launch.threads, 1, 1);
            let grid = if cluster > 1 {
                let probe = LaunchConfig {
                    grid_dim: (m.num_sms * m.launch.cluster, 1, 1),
                    block_dim: block,
                    shared_mem_bytes: smem as u32,
                };
                let clusters =
                    func.occupancy_max_active_clusters(probe, stream).map_err(drv("querying occupancy"))?.max(1);
                (clusters as usize).min(rows).max(1) * cluster
            } else {
                let per_sm = func
                    .occupancy_max_active_blocks_per_multiprocessor(m.launch.threads, smem, None)
                    .map_err(drv("querying occupancy"))?
                    .max(1);
                (m.num_sms as usize * per_sm as usize).min(rows).max(1)
            } as u32;
            let (t, _g1) = targets.device_ptr(stream);
            let (c, _g2) = coef.device_ptr(stream);
            let (rl, _g3) = row_loss.device_ptr_mut(stream);
            let (rz, _g4) = row_z.device_ptr_mut(stream);
            let rp = FwlRowParams {
                logits: p.logits as *const c_void,
                grad: p.grad as *mut c_void,
                targets: t as *const i32,
                coef: c as *const f32,
                token_weights: p.token_weights as *const f32,
                row_loss: rl as *mut f64,
                row_z: if z_on { rz as *mut f64 } else { std::ptr::null_mut() },
                rows: rows as i64,
                seq: shape.seq() as i64,
                vocab: shape.vocab() as i64,
                smem_vectors: smem_vectors as i64,
                vector_stores: (L::DTYPE.size() == G::DTYPE.size() && p.grad % 16 == p.logits % 16) as i32,
                softcap: spec.softcap.map_or(0.0, |c| c as f32),
                z_loss: spec.z_loss,
                smoothing: spec.label_smoothing,
            };
            let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: block, shared_mem_bytes: smem as u32 };
            // SAFETY: the parameters match fwl_rows*_<L>_<G>'s; logits and grad (when not 0) hold
            // rows * vocab elements of L and G, targets, row_loss, row_z (when not NULL) and
            // token_weights (when not 0) `rows`, coef `B`; the
            // dynamic shared memory requested is what smem_vectors covers and at most the
            // maximum set on the function at load; the grid is a whole number of clusters.
            unsafe { stream.launch_builder(func).arg(&rp).launch(cfg) }.map_err(drv("launching rows"))?;
        }
        Ok(())
    }

    /// Queues the finish kernel over every row's loss (all written by then).
    fn launch_finish(
        &self,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
        planned: Planned,
    ) -> Result<DeviceLossOutput> {
        let (m, b) = (&self.module, shape.batch());
        let Planned { targets, weights, valid, row_div, reduce, mut status, row_loss, row_z, z_on, .. } = planned;
        // finish writes per_sample (and per_sample_z), loss, z_loss and loss_f32
        let mut per_sample_z = output::<f64>(stream, if z_on { b } else { 1 })?;
        let mut per_sample = output::<f64>(stream, b)?;
        let mut loss = output::<f64>(stream, 1)?;
        let mut z_loss = output::<f64>(stream, 1)?;
        let mut loss_f32 = output::<f32>(stream, 1)?;
        // finish: one block
        {
            let (rl, _g1) = row_loss.device_ptr(stream);
            let (t, _g2) = targets.device_ptr(stream);
            let (d, _g3) = row_div.device_ptr(stream);
            let (r, _g4) = reduce.device_ptr(stream);
            let (ps, _g5) = per_sample.device_ptr_mut(stream);
            let (l, _g6) = loss.device_ptr_mut(stream);
            let (l32, _g8) = loss_f32.device_ptr_mut(stream);
            let (s, _g7) = status.device_ptr_mut(stream);
            let (rz, _g9) = row_z.device_ptr(stream);
            let (psz, _g10) = per_sample_z.device_ptr_mut(stream);
            let (zl, _g11) = z_loss.device_ptr_mut(stream);
            let fp = FwlFinishParams {
                row_loss: rl as *const f64,
                row_z: if z_on { rz as *const f64 } else { std::ptr::null() },
                token_weights: p.token_weights as *const f32,
                targets: t as *const i32,
                row_div: d as *const f64,
                reduce: r as *const f64,
                per_sample: ps as *mut f64,
                per_sample_z: psz as *mut f64,
                loss: l as *mut f64,
                z_loss: zl as *mut f64,
                loss_f32: l32 as *mut f32,
                status: s as *mut FwlStatus,
                batch: b as i64,
                seq: shape.seq() as i64,
            };
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the parameters match fwl_finish's; buffers as allocated above.
            unsafe { stream.launch_builder(&m.finish).arg(&fp).launch(cfg) }.map_err(drv("launching finish"))?;
        }

        Ok(DeviceLossOutput {
            loss,
            loss_f32,
            per_sample_loss: per_sample,
            weights,
            valid_tokens: valid,
            row_loss,
            z_loss,
            status,
            shape,
            check_finite: spec.check_finite,
        })
    }
}

impl CudaLoss {
    /// `grad *= scale[0]` on `stream`, where `scale` is a device scalar (an upstream gradient);
    /// when it is exactly 1 the kernel returns at once, so the usual case costs no pass over the
    /// gradient and no host synchronisation.
    pub fn scale_by_device_scalar<G: Logit>(
        &self,
        stream: &Arc<CudaStream>,
        grad: &mut CudaViewMut<'_, G>,
        scale: &CudaView<'_, f32>,
    ) -> Result<()> {
        if scale.len() != 1 {
            return Err(Error::Unsupported(format!("the scale must be one element, got {}", scale.len())));
        }
        let func = self.module.scale.iter().find(|(d, _)| *d == G::DTYPE).map(|(_, f)| f);
        let func = func.ok_or_else(|| Error::Unsupported(format!("no scale kernel for {}", G::DTYPE)))?;
        let n = grad.len();
        let (g, _gg) = grad.device_ptr_mut(stream);
        let (s, _gs) = scale.device_ptr(stream);
        let sp = FwlScaleParams { grad: g as *mut c_void, scale: s as *const f32, n: n as i64 };
        let grid = (n.div_ceil(THREADS as usize)).clamp(1, self.module.num_sms as usize * 4) as u32;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the parameters match fwl_scale_<G>'s; grad holds n elements of G, scale one f32.
        unsafe { stream.launch_builder(func).arg(&sp).launch(cfg) }.map_err(drv("launching scale"))?;
        Ok(())
    }
}

/// A device buffer for a gradient, left uninitialised: the rows kernel writes every element
/// (each row with a target in full, each row without one with zeros), so zeroing it first would
/// only add a pass over `B * T * V` elements.
pub(crate) fn grad_buffer<G: Logit>(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<G>> {
    // SAFETY: the memory is written in full by the launch it is passed to before anyone reads it.
    unsafe { stream.alloc::<G>(n) }.map_err(drv("allocating device memory"))
}

/// The context and kernels used for host-memory calls with [`Backend::Cuda`] (device 0).
fn host_device() -> Result<&'static (Arc<CudaContext>, CudaLoss)> {
    static HOST: OnceLock<std::result::Result<(Arc<CudaContext>, CudaLoss), Error>> = OnceLock::new();
    HOST.get_or_init(|| {
        status().map_err(|reason| Error::BackendUnavailable { backend: Backend::Cuda, reason })?;
        let ctx = CudaContext::new(0).map_err(drv("creating a context on device 0"))?;
        let loss = CudaLoss::new(&ctx)?;
        Ok((ctx, loss))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Host token inputs copied to the device.
struct Uploaded<I: TokenId> {
    ids: CudaSlice<I>,
    labels: Option<CudaSlice<I>>,
    token_weights: Option<CudaSlice<f32>>,
}

impl<I: TokenId> Uploaded<I> {
    fn new(stream: &Arc<CudaStream>, tokens: &Tokens<'_, I>) -> Result<Self> {
        let up = |t: &[I]| stream.clone_htod(t).map_err(drv("copying inputs to the device"));
        let token_weights = tokens
            .token_weights
            .map(|w| stream.clone_htod(w).map_err(drv("copying inputs to the device")))
            .transpose()?;
        Ok(Uploaded { ids: up(tokens.ids)?, labels: tokens.labels.map(up).transpose()?, token_weights })
    }

    /// Runs `f` with the uploaded tokens as [`DeviceInputs`].
    fn with<R>(&self, f: impl FnOnce(&DeviceInputs<'_, I>) -> R) -> R {
        let (ids, labels) = (self.ids.as_view(), self.labels.as_ref().map(|l| l.as_view()));
        let weights = self.token_weights.as_ref().map(|w| w.as_view());
        let mut inputs = DeviceInputs::new(&ids);
        if let Some(l) = labels.as_ref() {
            inputs = inputs.with_labels(l);
        }
        if let Some(w) = weights.as_ref() {
            inputs = inputs.with_token_weights(w);
        }
        f(&inputs)
    }
}

/// Loss and gradient on the device, the gradient copied into the host buffer `g`.
fn grad_to_host<L: Logit, G: Logit, I: TokenId>(
    loss: &CudaLoss,
    spec: &LossSpec,
    shape: Shape,
    stream: &Arc<CudaStream>,
    logits: &CudaSlice<L>,
    inputs: &DeviceInputs<'_, I>,
    g: &mut [G],
) -> Result<DeviceLossOutput> {
    let mut d_grad = grad_buffer::<G>(stream, shape.logits_len())?;
    let out = loss.loss_and_grad(spec, shape, stream, &logits.as_view(), inputs, &mut d_grad.as_view_mut())?;
    stream.memcpy_dtoh(&d_grad, g).map_err(drv("copying the gradient to the host"))?;
    Ok(out)
}

/// Host slices through the GPU: upload, run, download (the host API with `Backend::Cuda`).
pub(crate) fn run_host<L: Logit, I: TokenId>(
    spec: &LossSpec,
    shape: Shape,
    logits: &[L],
    tokens: Tokens<'_, I>,
    grad: Grad<'_, L>,
    token_loss: Option<&mut [f32]>,
) -> Result<LossOutput> {
    let (ctx, loss) = host_device()?;
    let stream = ctx.default_stream();
    let d_logits = stream.clone_htod(logits).map_err(drv("copying inputs to the device"))?;
    let out = Uploaded::new(&stream, &tokens)?.with(|inputs| match grad {
        Grad::Skip => loss.loss(spec, shape, &stream, &d_logits.as_view(), inputs),
        Grad::Into(g) => grad_to_host(loss, spec, shape, &stream, &d_logits, inputs, g),
        Grad::IntoF32(g) => grad_to_host(loss, spec, shape, &stream, &d_logits, inputs, g),
    })?;
    finish_host(&out, &stream, token_loss)
}

/// The host results of a host call, with the per-token losses when asked for.
fn finish_host(out: &DeviceLossOutput, stream: &Arc<CudaStream>, token_loss: Option<&mut [f32]>) -> Result<LossOutput> {
    let host = out.to_host(stream)?;
    if let Some(t) = token_loss {
        out.token_loss_to_host(stream, t)?;
    }
    Ok(host)
}

/// [`run_host`] in place: the gradient comes back over the host logits.
pub(crate) fn run_host_in_place<L: Logit, I: TokenId>(
    spec: &LossSpec,
    shape: Shape,
    logits: &mut [L],
    tokens: Tokens<'_, I>,
    token_loss: Option<&mut [f32]>,
) -> Result<LossOutput> {
    let (ctx, loss) = host_device()?;
    let stream = ctx.default_stream();
    let mut d_logits = stream.clone_htod(logits).map_err(drv("copying inputs to the device"))?;
    let out = Uploaded::new(&stream, &tokens)?
        .with(|inputs| loss.loss_and_grad_in_place(spec, shape, &stream, &mut d_logits.as_view_mut(), inputs))?;
    stream.memcpy_dtoh(&d_logits, logits).map_err(drv("copying the gradient to the host"))?;
    finish_host(&out, &stream, token_loss)
}

/// Device timings of one shape (CLI `bench --backend cuda`, scripts/gpu-check.sh).
#[derive(Debug, Clone)]
pub struct DeviceBench {
    /// The device's name.
    pub device: String,
    /// Milliseconds of each timed fused call (CUDA events around the three launches).
    pub fused_ms: Vec<f64>,
    /// Milliseconds of each timed device-to-device copy of the same bytes (the copy floor).
    pub copy_ms: Vec<f64>,
    /// The loss of the last call (a sanity value).
    pub loss: f64,
    /// The rows kernel's launch: threads per block, resident blocks per multiprocessor, loads in
    /// flight per thread and blocks per row (see the `FWL_CUDA_*` tuning knobs in the README).
    pub row_launch: [u32; 4],
}

/// Times loss + gradient (into the logits' dtype) on random device data of `shape`, alternating
/// with a device copy of the same byte count, after `warmup` untimed rounds; with random
/// per-token weights in `[0.5, 1.5)` when `token_weights`.
pub fn bench_device<L: Logit>(
    spec: &LossSpec,
    shape: Shape,
    warmup: usize,
    iters: usize,
    token_weights: bool,
) -> Result<DeviceBench> {
    let (ctx, loss) = host_device()?;
    let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
    let logits: Vec<L> = crate::synthetic::logits(1, shape.logits_len(), 4.0);
    let ids: Vec<i64> = crate::synthetic::ids(2, shape.rows(), shape.vocab());
    let d_logits = stream.clone_htod(&logits).map_err(drv("copying inputs to the device"))?;
    drop(logits);
    let d_ids = stream.clone_htod(&ids).map_err(drv("copying inputs to the device"))?;
    let mut d_grad = grad_buffer::<L>(&stream, shape.logits_len())?;
    // the copy floor moves the same bytes: logits read once, gradient written once
    let mut copy_dst = grad_buffer::<L>(&stream, shape.logits_len())?;
    let weights: Vec<f32> = crate::synthetic::logits::<f32>(3, shape.rows(), 0.5).iter().map(|w| w + 1.0).collect();
    let d_weights = stream.clone_htod(&weights).map_err(drv("copying inputs to the device"))?;
    let (ids_view, weights_view) = (d_ids.as_view(), d_weights.as_view());
    let mut inputs = DeviceInputs::new(&ids_view);
    if token_weights {
        inputs = inputs.with_token_weights(&weights_view);
    }
    let timed = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("recording an event"));
    let (mut fused_ms, mut copy_ms, mut last) = (Vec::new(), Vec::new(), None);
    for i in 0..warmup + iters {
        let a = timed()?;
        let out = loss.loss_and_grad(spec, shape, &stream, &d_logits.as_view(), &inputs, &mut d_grad.as_view_mut())?;
        let b = timed()?;
        stream.memcpy_dtod(&d_logits, &mut copy_dst).map_err(drv("copying on the device"))?;
        let c = timed()?;
        if i >= warmup {
            fused_ms.push(a.elapsed_ms(&b).map_err(drv("timing"))? as f64);
            copy_ms.push(b.elapsed_ms(&c).map_err(drv("timing"))? as f64);
        }
        last = Some(out);
    }
    let host = match last {
        Some(out) => out.to_host(&stream)?,
        None => return Err(Error::Unsupported("bench needs at least one iteration".into())),
    };
    let l = loss.module.launch;
    Ok(DeviceBench {
        device: ctx.name().map_err(drv("querying the device"))?,
        fused_ms,
        copy_ms,
        loss: host.loss,
        row_launch: [l.threads, l.blocks_per_sm, l.unroll, l.cluster],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> RowLaunch {
        RowLaunch::from_vars(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn row_launch_defaults_and_knobs() {
        let default = RowLaunch { threads: 1024, blocks_per_sm: 2, unroll: 1, cluster: 1 };
        assert_eq!(launch(&[]), default);
        let tuned =
            launch(&[("FWL_CUDA_ROW_THREADS", "512"), ("FWL_CUDA_BLOCKS_PER_SM", "3"), ("FWL_CUDA_ROW_UNROLL", "4")]);
        assert_eq!(tuned, RowLaunch { threads: 512, blocks_per_sm: 3, unroll: 4, cluster: 1 });
        let clustered = launch(&[("FWL_CUDA_ROW_UNROLL", "2"), ("FWL_CUDA_ROW_CLUSTER", "4")]);
        assert_eq!(clustered, RowLaunch { unroll: 2, cluster: 4, ..default });
        // clusters come with an unroll of 1 or 2 only
        assert_eq!(launch(&[("FWL_CUDA_ROW_UNROLL", "4"), ("FWL_CUDA_ROW_CLUSTER", "2")]).cluster, 1);
        // out of range or unparsable values fall back to the defaults
        let bad =
            launch(&[("FWL_CUDA_ROW_THREADS", "300"), ("FWL_CUDA_BLOCKS_PER_SM", "x"), ("FWL_CUDA_ROW_UNROLL", "3")]);
        assert_eq!(bad, default);
        assert_eq!(launch(&[("FWL_CUDA_ROW_CLUSTER", "3")]), default);
        // more than 2048 threads per multiprocessor is refused
        assert_eq!(launch(&[("FWL_CUDA_BLOCKS_PER_SM", "4")]).blocks_per_sm, 2);
        assert_eq!(launch(&[("FWL_CUDA_ROW_THREADS", "256"), ("FWL_CUDA_BLOCKS_PER_SM", "8")]).blocks_per_sm, 8);
    }

    #[test]
    fn every_configured_rows_kernel_is_in_the_fatbin() {
        let contains = |name: &str| {
            FATBIN.windows(name.len() + 1).any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
        };
        let configs = [("1", "1"), ("2", "1"), ("4", "1"), ("1", "2"), ("2", "2"), ("1", "4"), ("2", "4")];
        for (unroll, cluster) in configs {
            let l = launch(&[("FWL_CUDA_ROW_UNROLL", unroll), ("FWL_CUDA_ROW_CLUSTER", cluster)]);
            assert_eq!((l.unroll, l.cluster), (unroll.parse().unwrap(), cluster.parse().unwrap()));
            for (a, b) in [
                (DType::F32, DType::F32),
                (DType::F16, DType::F16),
                (DType::F16, DType::F32),
                (DType::BF16, DType::BF16),
                (DType::BF16, DType::F32),
            ] {
                let name = l.kernel_name(a, b);
                assert!(contains(&name), "{name} is missing from the embedded kernels");
            }
        }
        assert!(!contains("fwl_rows4_f32_bf16"), "the search must be able to fail");
        assert!(!contains("fwl_rows4c2_f32_f32"));
    }
}
