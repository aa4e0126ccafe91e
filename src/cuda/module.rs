//! The kernels of one context: loaded once per context from the embedded fatbin, with the rows
//! kernel's launch configuration (the tuning knobs).

use super::*;

/// Modules loaded by [`Module::of`] in this process (see [`CudaLoss::module_loads`]).
static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The kernels, compiled by build.rs (SASS for sm_80/86/89/90, PTX for compute_80; each entry
/// zstd-compressed, inflated by the driver at load).
pub(super) static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/weighted_loss.fatbin"));

/// Whether a kernel named `name` is in [`FATBIN`]: its name in the text of the inflated entries
/// (PTX and ELF symbol tables), followed by a character that cannot continue a name.
#[cfg(test)]
pub(crate) fn fatbin_has_kernel(name: &str) -> bool {
    use std::io::Read;
    static TEXT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let text = TEXT.get_or_init(|| {
        // every zstd frame in the fatbin (a false start fails to decode and is skipped), and the
        // raw bytes for any entry left uncompressed
        let mut text = FATBIN.to_vec();
        const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
        for at in (0..FATBIN.len().saturating_sub(3)).filter(|&i| FATBIN[i..i + 4] == MAGIC) {
            let mut src = &FATBIN[at..];
            if let Ok(mut frame) = ruzstd::decoding::StreamingDecoder::new(&mut src) {
                let mut out = Vec::new();
                if frame.read_to_end(&mut out).is_ok() {
                    text.extend_from_slice(&out);
                }
            }
        }
        text
    });
    let name_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    text.windows(name.len() + 1).any(|w| &w[..name.len()] == name.as_bytes() && !name_char(w[name.len()]))
}

/// How the rows kernel is launched (one block per row): threads per block, resident blocks per
/// multiprocessor, loads in flight per thread (the lean plain kernels only), and whether the lean
/// kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RowLaunch {
    pub(super) threads: u32,
    pub(super) blocks_per_sm: u32,
    /// 1 or 2; always 1 when not [`lean`](Self::lean) (the other kernels have one load in flight).
    pub(super) unroll: u32,
    /// The lean kernels: `fwl_rowsl*` for the plain loss (no soft-capping, label smoothing or
    /// z-loss), `fwl_rowslo_*` (one load in flight) for a loss with any of them.
    pub(super) lean: bool,
    /// The lean plain kernels with L2 eviction hints, `fwl_rowslh_*` (with `lean` and an unroll
    /// of 1 only, else off).
    pub(super) hints: bool,
    /// The prefetching lean plain kernels, `fwl_rowslp_*`: a block's next row copied into shared
    /// memory asynchronously while it writes this row's gradient (with `lean` and an unroll of 1
    /// only, else off; takes the place of `hints`, whose accesses it keeps for the part of a row
    /// beyond the cache).
    pub(super) prefetch: bool,
}

/// Which family of rows kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RowKernel {
    /// `fwl_rows_*`: every loss.
    Default,
    /// `fwl_rowsl<U>_*` (`fwl_rowslh_*` with [`RowLaunch::hints`], `fwl_rowslp_*` with
    /// [`RowLaunch::prefetch`]): the plain loss's lean loops.
    Lean,
    /// `fwl_rowslo_*`: the lean loops with the loss options (one load in flight whatever `U`).
    LeanOptions,
}

impl RowLaunch {
    /// The fastest configuration measured on a device of compute capability `major`.`x`:
    /// on 9.x (H200, 2026-12-04 sweeps) the lean kernels with 1024 threads, two resident blocks
    /// per multiprocessor, one load in flight and the L2 hints (bf16 8x1024x128256 1.48 ms
    /// against 1.61 ms without the hints and 2.20 ms for the earlier default, f32 32x128x50000
    /// 0.589 against 0.638 and 0.742); elsewhere, not measured, the earlier default: the
    /// `fwl_rows_*` kernels, 1024 threads, one block per multiprocessor.
    pub(super) fn default_for(major: i32) -> RowLaunch {
        match major {
            9 => RowLaunch { threads: THREADS, blocks_per_sm: 2, unroll: 1, lean: true, hints: true, prefetch: false },
            _ => {
                RowLaunch { threads: THREADS, blocks_per_sm: 1, unroll: 1, lean: false, hints: false, prefetch: false }
            }
        }
    }

    /// [`default_for`](Self::default_for) the device's compute capability, unless the tuning
    /// knobs say otherwise: `FWL_CUDA_ROW_THREADS` (256, 512 or 1024), `FWL_CUDA_BLOCKS_PER_SM`
    /// (1 to 8, at most 2048 threads per multiprocessor), `FWL_CUDA_ROW_LEAN` (0 or 1: the lean
    /// kernels, whose loops compute less per element (for the plain loss, none of the options'
    /// arithmetic) and flush exponentials below 2^-126 to 0), `FWL_CUDA_ROW_UNROLL` (1 or 2:
    /// loads in flight in the lean plain kernels; ignored without them), `FWL_CUDA_ROW_HINTS` (0
    /// or 1: the lean plain kernels with L2 eviction hints, `fwl_rowslh_*`, with the lean kernels
    /// and one load in flight only; on by default on 9.x),
    /// `FWL_CUDA_ROW_PREFETCH` (0 or 1: the prefetching lean plain kernels, `fwl_rowslp_*`, under
    /// the same conditions; off: on the H200 2–3% slower than the hints). A value outside those
    /// sets is ignored; a changed thread count without a block count takes one block per
    /// multiprocessor where the default's count would not fit 2048 threads. Read when a context
    /// loads the kernels.
    pub(super) fn from_env(major: i32) -> RowLaunch {
        Self::from_vars(Self::default_for(major), |name| std::env::var(name).ok())
    }

    pub(super) fn from_vars(default: RowLaunch, get: impl Fn(&str) -> Option<String>) -> RowLaunch {
        let var = |name: &str| get(name).and_then(|v| v.trim().parse::<u32>().ok());
        let threads = var("FWL_CUDA_ROW_THREADS").filter(|t| [256, 512, 1024].contains(t)).unwrap_or(default.threads);
        let fits = |b: &u32| (1..=8).contains(b) && b * threads <= 2048;
        let blocks_per_sm = var("FWL_CUDA_BLOCKS_PER_SM").filter(fits).unwrap_or(if fits(&default.blocks_per_sm) {
            default.blocks_per_sm
        } else {
            1
        });
        let lean = var("FWL_CUDA_ROW_LEAN").filter(|l| *l <= 1).map_or(default.lean, |l| l == 1);
        let unroll = var("FWL_CUDA_ROW_UNROLL").filter(|u| [1, 2].contains(u)).unwrap_or(default.unroll);
        let unroll = if lean { unroll } else { 1 };
        let hints = var("FWL_CUDA_ROW_HINTS").filter(|h| *h <= 1).map_or(default.hints, |h| h == 1);
        let prefetch = var("FWL_CUDA_ROW_PREFETCH").filter(|h| *h <= 1).map_or(default.prefetch, |h| h == 1);
        let (hints, prefetch) = (hints && lean && unroll == 1, prefetch && lean && unroll == 1);
        RowLaunch { threads, blocks_per_sm, unroll, lean, hints: hints && !prefetch, prefetch }
    }

    /// The rows kernel of family `k` for `l` logits and a `g` gradient in this configuration:
    /// `fwl_rows_*`, `fwl_rowsl<U>_*` (`fwl_rowslh_*` with hints, `fwl_rowslp_*` with prefetching)
    /// or `fwl_rowslo_*` (`U` the
    /// unroll, left out when 1).
    pub(super) fn kernel_name(&self, k: RowKernel, l: DType, g: DType) -> String {
        let (pre, unroll) = match k {
            RowKernel::Default => ("", String::new()),
            RowKernel::Lean if self.prefetch => ("lp", String::new()),
            RowKernel::Lean if self.hints => ("lh", String::new()),
            RowKernel::Lean if self.unroll > 1 => ("l", self.unroll.to_string()),
            RowKernel::Lean => ("l", String::new()),
            RowKernel::LeanOptions => ("lo", String::new()),
        };
        format!("fwl_rows{pre}{unroll}_{}_{}", l.name(), g.name())
    }
}

/// A rows kernel of one dtype pair, with the dynamic shared memory a block of it may use.
pub(super) struct RowFn {
    l: DType,
    g: DType,
    pub(super) func: CudaFunction,
    /// Bytes (a multiple of 16), sized for the blocks of this kernel that can be resident on a
    /// multiprocessor: [`RowLaunch::blocks_per_sm`], or fewer where its registers allow fewer.
    pub(super) smem: usize,
}

/// The (logits, gradient) dtype pairs with a rows kernel.
pub(super) const ROW_PAIRS: [(DType, DType); 7] = [
    (DType::F32, DType::F32),
    (DType::F16, DType::F16),
    (DType::F16, DType::F32),
    (DType::BF16, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::F32, DType::F16),
    (DType::F32, DType::BF16),
];

/// Dynamic shared memory (bytes, a multiple of 16) for a rows block when `blocks` of them are
/// resident on a multiprocessor of `per_sm` bytes, each with `fixed` bytes of static shared
/// memory and at most `optin` bytes in all. The driver keeps 1 KiB per block and allocates a
/// block's shared memory in units of 128 bytes, so each block's share is rounded down to 128.
fn row_smem(per_sm: i32, optin: i32, fixed: i32, blocks: u32) -> usize {
    let share = per_sm / blocks.max(1) as i32 / 128 * 128 - 1024 - fixed;
    (optin - fixed).min(share).max(0) as usize / 16 * 16
}

/// The loaded kernels of one context.
pub(super) struct Module {
    plan_i32: CudaFunction,
    plan_i64: CudaFunction,
    plan_u32: CudaFunction,
    /// The rows kernels of [`ROW_PAIRS`].
    rows: Vec<RowFn>,
    /// The lean kernels of the same pairs when [`RowLaunch::lean`] (else empty): the plain
    /// loss's and the options'.
    rows_lean: Vec<RowFn>,
    rows_lean_options: Vec<RowFn>,
    pub(super) finish: CudaFunction,
    pub(super) scale: [(DType, CudaFunction); 3],
    /// f32 to 16-bit copies (the tiled fused linear path's `d hidden`).
    pub(super) narrow: [(DType, CudaFunction); 2],
    pub(super) num_sms: u32,
    /// How the rows kernel is launched (threads per block: `launch.threads`).
    pub(super) launch: RowLaunch,
    /// The vocabulary- and data-parallel split's kernels.
    pub(super) split: super::split::SplitFns,
    /// Resident blocks per multiprocessor by (kernel, threads, dynamic shared memory), asked of
    /// the driver once each: the tiled fused linear path launches the split's kernels some 400
    /// times a call.
    occupancy: Mutex<Vec<(usize, u32, usize, usize)>>,
}

impl Module {
    pub(super) fn load(ctx: &Arc<CudaContext>) -> Result<Module> {
        let major = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(drv("querying the device"))?;
        Self::load_with(ctx, RowLaunch::from_env(major))
    }

    pub(super) fn load_with(ctx: &Arc<CudaContext>, launch: RowLaunch) -> Result<Module> {
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
        // room for the resident blocks of each rows kernel per multiprocessor (the driver keeps
        // 1 KiB per block), so that one block's gradient writes overlap another's reads: as many
        // as `blocks_per_sm`, fewer where the kernel's registers (or threads) leave room for
        // fewer, so that a kernel that runs one block keeps the whole share; a row longer than
        // its share re-reads its remainder, from L2
        let row_fn = |l: DType, g: DType, kind: RowKernel| -> Result<RowFn> {
            let func = f(&launch.kernel_name(kind, l, g))?;
            let fixed = func
                .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(drv("querying a kernel"))?;
            let fit = func
                .occupancy_max_active_blocks_per_multiprocessor(launch.threads, 0, None)
                .map_err(drv("querying occupancy"))?;
            let smem = row_smem(per_sm, optin, fixed, launch.blocks_per_sm.min(fit));
            func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .map_err(drv("configuring a kernel"))?;
            Ok(RowFn { l, g, func, smem })
        };
        let family = |k: RowKernel| -> Result<Vec<RowFn>> {
            if k != RowKernel::Default && !launch.lean {
                return Ok(Vec::new());
            }
            ROW_PAIRS.iter().map(|&(l, g)| row_fn(l, g, k)).collect()
        };
        let rows = family(RowKernel::Default)?;
        let (rows_lean, rows_lean_options) = (family(RowKernel::Lean)?, family(RowKernel::LeanOptions)?);
        Ok(Module {
            plan_i32: f("fwl_plan_i32")?,
            plan_i64: f("fwl_plan_i64")?,
            plan_u32: f("fwl_plan_u32")?,
            rows,
            rows_lean,
            rows_lean_options,
            finish: f("fwl_finish")?,
            scale: [
                (DType::F32, f("fwl_scale_f32")?),
                (DType::F16, f("fwl_scale_f16")?),
                (DType::BF16, f("fwl_scale_bf16")?),
            ],
            narrow: [(DType::F16, f("fwl_narrow_f16")?), (DType::BF16, f("fwl_narrow_bf16")?)],
            num_sms: num_sms.max(1) as u32,
            launch,
            split: super::split::SplitFns::load(f)?,
            occupancy: Mutex::new(Vec::new()),
        })
    }

    /// How many blocks of `threads` threads with `smem` bytes of dynamic shared memory `func` (a
    /// kernel of this module) keeps resident on a multiprocessor: at least 1.
    pub(super) fn blocks_per_sm(&self, func: &CudaFunction, threads: u32, smem: usize) -> Result<usize> {
        let key = (func.cu_function() as usize, threads, smem);
        let mut known = self.occupancy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(.., n)) = known.iter().find(|&&(f, t, m, _)| (f, t, m) == key) {
            return Ok(n);
        }
        let n = func
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
            .map_err(drv("querying occupancy"))?
            .max(1) as usize;
        known.push((key.0, key.1, key.2, n));
        Ok(n)
    }

    /// The module of `ctx`, loaded once per context and shared while anyone holds it (loaded
    /// again after the last holder dropped it).
    pub(super) fn of(ctx: &Arc<CudaContext>) -> Result<Arc<Module>> {
        static CACHE: Mutex<Vec<(usize, Weak<Module>)>> = Mutex::new(Vec::new());
        let key = ctx.cu_ctx() as usize;
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(_, m)| m.strong_count() > 0);
        if let Some(m) = cache.iter().find(|(k, _)| *k == key).and_then(|(_, m)| m.upgrade()) {
            return Ok(m);
        }
        let m = Arc::new(Module::load(ctx)?);
        LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        cache.push((key, Arc::downgrade(&m)));
        Ok(m)
    }

    /// How many modules [`of`](Self::of) has loaded in this process.
    pub(super) fn loads() -> usize {
        LOADS.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn plan_fn<I: TokenId>(&self) -> &CudaFunction {
        match I::NAME {
            "i32" => &self.plan_i32,
            "u32" => &self.plan_u32,
            _ => &self.plan_i64,
        }
    }

    /// The lean rows kernel of `l` logits into a `g` gradient, when the lean kernels are on: the
    /// plain loss's, or with `options` the one with the loss options.
    pub(super) fn rows_lean_fn(&self, l: DType, g: DType, options: bool) -> Option<&RowFn> {
        let family = if options { &self.rows_lean_options } else { &self.rows_lean };
        family.iter().find(|r| r.l == l && r.g == g)
    }

    /// The rows kernel of `l` logits into a `g` gradient, or [`Error::Unsupported`].
    pub(super) fn rows_fn(&self, l: DType, g: DType) -> Result<&RowFn> {
        let found = self.rows.iter().find(|r| r.l == l && r.g == g);
        found.ok_or_else(|| Error::Unsupported(format!("no CUDA kernel for {l} logits with a {g} gradient")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The knobs of `vars` over the default of a compute capability 9.x device.
    pub(super) fn launch(vars: &[(&str, &str)]) -> RowLaunch {
        launch_on(9, vars)
    }

    pub(super) fn launch_on(major: i32, vars: &[(&str, &str)]) -> RowLaunch {
        let get = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        RowLaunch::from_vars(RowLaunch::default_for(major), get)
    }

    #[test]
    fn shared_memory_per_rows_block() {
        // an H100/H200 multiprocessor: 228 KiB, 227 KiB for one block
        let (per_sm, optin) = (233_472, 232_448);
        // one block: the whole opt-in size less the static part
        assert_eq!(row_smem(per_sm, optin, 64, 1), 232_384);
        // two blocks: half the multiprocessor each, less the driver's 1 KiB and the static part
        assert_eq!(row_smem(per_sm, optin, 64, 2), 115_648);
        // five blocks of 256 threads: 46 694 bytes each, rounded down to 46 592, less 1 KiB
        // and the static part; five such blocks fit
        assert_eq!(row_smem(per_sm, optin, 64, 5), 45_504);
        assert!(5 * (45_504 + 64 + 1024) <= per_sm);
        // nothing left: 0, never negative
        assert_eq!(row_smem(4096, optin, 4096, 8), 0);
        assert_eq!(row_smem(per_sm, optin, 0, 0), row_smem(per_sm, optin, 0, 1));
    }

    #[test]
    pub(super) fn row_launch_defaults_and_knobs() {
        // sm_90: the lean kernels with L2 hints, two blocks of 1024 threads per multiprocessor
        let default =
            RowLaunch { threads: 1024, blocks_per_sm: 2, unroll: 1, lean: true, hints: true, prefetch: false };
        assert_eq!(launch(&[]), default);
        // elsewhere (not measured): the earlier default
        let other =
            RowLaunch { threads: 1024, blocks_per_sm: 1, unroll: 1, lean: false, hints: false, prefetch: false };
        for major in [7, 8, 10, 12] {
            assert_eq!(launch_on(major, &[]), other, "compute capability {major}.x");
        }
        assert_eq!(launch_on(8, &[("FWL_CUDA_ROW_LEAN", "1")]), RowLaunch { lean: true, ..other });
        let tuned =
            launch(&[("FWL_CUDA_ROW_THREADS", "512"), ("FWL_CUDA_BLOCKS_PER_SM", "3"), ("FWL_CUDA_ROW_UNROLL", "2")]);
        assert_eq!(tuned, RowLaunch { threads: 512, blocks_per_sm: 3, unroll: 2, hints: false, ..default });
        assert_eq!(launch(&[("FWL_CUDA_ROW_LEAN", "0")]), RowLaunch { lean: false, hints: false, ..default });
        assert_eq!(launch(&[("FWL_CUDA_ROW_LEAN", "1")]), default);
        assert_eq!(launch(&[("FWL_CUDA_ROW_LEAN", "2")]), default);
        // the earlier default, by its knobs
        assert_eq!(launch(&[("FWL_CUDA_ROW_LEAN", "0"), ("FWL_CUDA_BLOCKS_PER_SM", "1")]), other);
        // loads in flight are the lean plain kernels' only: ignored without them
        let two = launch(&[("FWL_CUDA_ROW_UNROLL", "2")]);
        assert_eq!((two.lean, two.unroll), (true, 2));
        let off = launch(&[("FWL_CUDA_ROW_LEAN", "0"), ("FWL_CUDA_ROW_UNROLL", "2")]);
        assert_eq!((off.lean, off.unroll), (false, 1));
        // 4 loads in flight are gone (the kernels lost every sweep): ignored
        assert_eq!(launch(&[("FWL_CUDA_ROW_UNROLL", "4")]), default);
        assert_eq!(launch_on(8, &[("FWL_CUDA_ROW_UNROLL", "4")]), other);
        // out of range or unparsable values fall back to the defaults
        let bad =
            launch(&[("FWL_CUDA_ROW_THREADS", "300"), ("FWL_CUDA_BLOCKS_PER_SM", "x"), ("FWL_CUDA_ROW_UNROLL", "3")]);
        assert_eq!(bad, default);
        // the knob of the thread-block clusters, removed, is ignored
        assert_eq!(launch(&[("FWL_CUDA_ROW_CLUSTER", "2")]), default);
        // more than 2048 threads per multiprocessor is refused
        assert_eq!(launch(&[("FWL_CUDA_BLOCKS_PER_SM", "4")]).blocks_per_sm, 2);
        assert_eq!(launch_on(8, &[("FWL_CUDA_BLOCKS_PER_SM", "4")]).blocks_per_sm, 1);
        assert_eq!(launch_on(8, &[("FWL_CUDA_BLOCKS_PER_SM", "2")]).blocks_per_sm, 2);
        assert_eq!(launch(&[("FWL_CUDA_ROW_THREADS", "256"), ("FWL_CUDA_BLOCKS_PER_SM", "8")]).blocks_per_sm, 8);
        // other thread counts keep the default's two blocks where they fit
        assert_eq!(launch(&[("FWL_CUDA_ROW_THREADS", "512")]).blocks_per_sm, 2);
        // the L2 hints: on by default on sm_90, with the lean kernels and one load in flight only
        assert_eq!(launch(&[("FWL_CUDA_ROW_HINTS", "1")]), default);
        assert_eq!(launch(&[("FWL_CUDA_ROW_HINTS", "0")]), RowLaunch { hints: false, ..default });
        assert_eq!(launch(&[("FWL_CUDA_ROW_HINTS", "2")]), default);
        assert!(!launch(&[("FWL_CUDA_ROW_HINTS", "1"), ("FWL_CUDA_ROW_UNROLL", "2")]).hints);
        assert!(!launch(&[("FWL_CUDA_ROW_HINTS", "1"), ("FWL_CUDA_ROW_LEAN", "0")]).hints);
        assert!(!launch_on(8, &[("FWL_CUDA_ROW_HINTS", "1")]).hints);
        assert!(launch_on(8, &[("FWL_CUDA_ROW_HINTS", "1"), ("FWL_CUDA_ROW_LEAN", "1")]).hints);
        // prefetching: the same conditions, and it takes the hints' place
        let prefetching = RowLaunch { prefetch: true, hints: false, ..default };
        assert_eq!(launch(&[("FWL_CUDA_ROW_PREFETCH", "1")]), prefetching);
        assert_eq!(launch(&[("FWL_CUDA_ROW_PREFETCH", "1"), ("FWL_CUDA_ROW_HINTS", "1")]), prefetching);
        assert_eq!(launch(&[("FWL_CUDA_ROW_PREFETCH", "0")]), default);
        assert!(!launch(&[("FWL_CUDA_ROW_PREFETCH", "1"), ("FWL_CUDA_ROW_UNROLL", "2")]).prefetch);
        assert!(!launch(&[("FWL_CUDA_ROW_PREFETCH", "1"), ("FWL_CUDA_ROW_LEAN", "0")]).prefetch);
        assert!(!launch(&[("FWL_CUDA_ROW_PREFETCH", "2")]).prefetch);
    }

    #[test]
    pub(super) fn every_configured_rows_kernel_is_in_the_fatbin() {
        let contains = fatbin_has_kernel;
        let configs = [
            &[][..],
            &[("FWL_CUDA_ROW_UNROLL", "2")],
            &[("FWL_CUDA_ROW_LEAN", "0")],
            &[("FWL_CUDA_ROW_HINTS", "0")],
            &[("FWL_CUDA_ROW_PREFETCH", "1")],
        ];
        for vars in configs {
            let l = launch(vars);
            for (a, b) in ROW_PAIRS {
                let name = l.kernel_name(RowKernel::Default, a, b);
                assert!(contains(&name), "{name} is missing from the embedded kernels");
                if l.lean {
                    for k in [RowKernel::Lean, RowKernel::LeanOptions] {
                        let lean = l.kernel_name(k, a, b);
                        assert!(contains(&lean), "{lean} is missing from the embedded kernels");
                    }
                }
            }
        }
        // the kernels launched by name outside the rows families
        for name in ["fwl_plan_i64", "fwl_finish", "fwl_scale_bf16", "fwl_narrow_f16", "fwl_narrow_bf16"] {
            assert!(contains(name), "{name} is missing from the embedded kernels");
        }
        assert!(!contains("fwl_narrow_f32"), "no narrowing to f32");
        assert!(!contains("fwl_rows4_bf16_f16"), "the search must be able to fail");
        assert!(!contains("fwl_rows2_f32_f32") && !contains("fwl_rows4_f32_f32"), "pruned after the H200 sweeps");
        assert!(!contains("fwl_rowsl4_f32_f32"), "no lean kernel with 4 loads in flight");
        assert!(!contains("fwl_rowsc2_f32_f32"), "no cluster kernels any more");
        assert!(!contains("fwl_rowslo2_f32_f32"), "one lean options kernel per pair, one load in flight");
        let two = launch(&[("FWL_CUDA_ROW_UNROLL", "2")]);
        assert_eq!(launch(&[]).kernel_name(RowKernel::Default, DType::BF16, DType::F32), "fwl_rows_bf16_f32");
        assert_eq!(two.kernel_name(RowKernel::Default, DType::BF16, DType::F32), "fwl_rows_bf16_f32");
        assert_eq!(launch(&[]).kernel_name(RowKernel::Lean, DType::F16, DType::F16), "fwl_rowslh_f16_f16");
        let plain = launch(&[("FWL_CUDA_ROW_HINTS", "0")]);
        assert_eq!(plain.kernel_name(RowKernel::Lean, DType::F16, DType::F16), "fwl_rowsl_f16_f16");
        assert_eq!(two.kernel_name(RowKernel::Lean, DType::F16, DType::F16), "fwl_rowsl2_f16_f16");
        assert_eq!(two.kernel_name(RowKernel::LeanOptions, DType::F16, DType::F16), "fwl_rowslo_f16_f16");
        let hints = launch(&[("FWL_CUDA_ROW_HINTS", "1")]);
        assert_eq!(hints.kernel_name(RowKernel::Lean, DType::BF16, DType::BF16), "fwl_rowslh_bf16_bf16");
        assert_eq!(hints.kernel_name(RowKernel::LeanOptions, DType::BF16, DType::BF16), "fwl_rowslo_bf16_bf16");
        let prefetch = launch(&[("FWL_CUDA_ROW_PREFETCH", "1")]);
        assert_eq!(prefetch.kernel_name(RowKernel::Lean, DType::F32, DType::F32), "fwl_rowslp_f32_f32");
        assert_eq!(prefetch.kernel_name(RowKernel::LeanOptions, DType::F32, DType::F32), "fwl_rowslo_f32_f32");
    }
}
