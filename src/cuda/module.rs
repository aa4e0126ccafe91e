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
/// multiprocessor, loads in flight per thread, and whether the lean kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RowLaunch {
    pub(super) threads: u32,
    pub(super) blocks_per_sm: u32,
    pub(super) unroll: u32,
    /// The lean kernels: `fwl_rowsl*` for the plain loss (no soft-capping, label smoothing or
    /// z-loss), `fwl_rowslo_*` (one load in flight) for a loss with any of them; with an unroll
    /// of 1 or 2 only (else off).
    pub(super) lean: bool,
}

/// Which family of rows kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RowKernel {
    /// `fwl_rows<U>_*`: every loss.
    Default,
    /// `fwl_rowsl<U>_*`: the plain loss's lean loops.
    Lean,
    /// `fwl_rowslo_*`: the lean loops with the loss options (one load in flight whatever `U`).
    LeanOptions,
}

impl RowLaunch {
    /// 1024 threads, 1 block per multiprocessor, 1 load in flight (the fastest configuration
    /// measured on an H200: at 1024 threads the default kernel's registers leave room for one
    /// resident block anyway, and a lone block keeps twice as much of its row in shared memory),
    /// unless the tuning knobs say otherwise:
    /// `FWL_CUDA_ROW_THREADS` (256, 512 or 1024), `FWL_CUDA_BLOCKS_PER_SM` (1 to 8, at most 2048
    /// threads per multiprocessor), `FWL_CUDA_ROW_UNROLL` (1, 2 or 4), `FWL_CUDA_ROW_LEAN` (0 or
    /// 1: the lean kernels, whose loops compute less per element (for the plain loss, none of the
    /// options' arithmetic) and flush exponentials below 2^-126 to 0; with an unroll of 1 or 2;
    /// off until measured on a device).
    /// A value outside those sets is ignored. Read when a context loads the kernels.
    pub(super) fn from_env() -> RowLaunch {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    pub(super) fn from_vars(get: impl Fn(&str) -> Option<String>) -> RowLaunch {
        let var = |name: &str| get(name).and_then(|v| v.trim().parse::<u32>().ok());
        let threads = var("FWL_CUDA_ROW_THREADS").filter(|t| [256, 512, 1024].contains(t)).unwrap_or(THREADS);
        let blocks_per_sm =
            var("FWL_CUDA_BLOCKS_PER_SM").filter(|b| (1..=8).contains(b) && b * threads <= 2048).unwrap_or(1);
        let unroll = var("FWL_CUDA_ROW_UNROLL").filter(|u| [1, 2, 4].contains(u)).unwrap_or(1);
        let lean = var("FWL_CUDA_ROW_LEAN").filter(|l| *l <= 1).unwrap_or(0) == 1 && unroll <= 2;
        RowLaunch { threads, blocks_per_sm, unroll, lean }
    }

    /// The rows kernel of family `k` for `l` logits and a `g` gradient in this configuration:
    /// `fwl_rows<U>_*`, `fwl_rowsl<U>_*` or `fwl_rowslo_*` (`U` the unroll, left out when 1).
    pub(super) fn kernel_name(&self, k: RowKernel, l: DType, g: DType) -> String {
        let unroll = if self.unroll > 1 { self.unroll.to_string() } else { String::new() };
        let (pre, unroll) = match k {
            RowKernel::Default => ("", unroll),
            RowKernel::Lean => ("l", unroll),
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
        Self::load_with(ctx, RowLaunch::from_env())
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

    pub(super) fn launch(vars: &[(&str, &str)]) -> RowLaunch {
        RowLaunch::from_vars(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
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
        let default = RowLaunch { threads: 1024, blocks_per_sm: 1, unroll: 1, lean: false };
        assert_eq!(launch(&[]), default);
        let tuned =
            launch(&[("FWL_CUDA_ROW_THREADS", "512"), ("FWL_CUDA_BLOCKS_PER_SM", "3"), ("FWL_CUDA_ROW_UNROLL", "4")]);
        assert_eq!(tuned, RowLaunch { threads: 512, blocks_per_sm: 3, unroll: 4, ..default });
        assert_eq!(launch(&[("FWL_CUDA_ROW_LEAN", "1")]), RowLaunch { lean: true, ..default });
        assert_eq!(launch(&[("FWL_CUDA_ROW_LEAN", "0")]), default);
        assert_eq!(launch(&[("FWL_CUDA_ROW_LEAN", "2")]), default);
        // an unroll of 4 turns the lean kernels off (no lean kernel for it)
        let four = launch(&[("FWL_CUDA_ROW_LEAN", "1"), ("FWL_CUDA_ROW_UNROLL", "4")]);
        assert_eq!((four.lean, four.unroll), (false, 4));
        let two = launch(&[("FWL_CUDA_ROW_LEAN", "1"), ("FWL_CUDA_ROW_UNROLL", "2")]);
        assert_eq!((two.lean, two.unroll), (true, 2));
        // out of range or unparsable values fall back to the defaults
        let bad =
            launch(&[("FWL_CUDA_ROW_THREADS", "300"), ("FWL_CUDA_BLOCKS_PER_SM", "x"), ("FWL_CUDA_ROW_UNROLL", "3")]);
        assert_eq!(bad, default);
        // the knob of the thread-block clusters, removed, is ignored
        assert_eq!(launch(&[("FWL_CUDA_ROW_CLUSTER", "2")]), default);
        // more than 2048 threads per multiprocessor is refused
        assert_eq!(launch(&[("FWL_CUDA_BLOCKS_PER_SM", "4")]).blocks_per_sm, 1);
        assert_eq!(launch(&[("FWL_CUDA_BLOCKS_PER_SM", "2")]).blocks_per_sm, 2);
        assert_eq!(launch(&[("FWL_CUDA_ROW_THREADS", "256"), ("FWL_CUDA_BLOCKS_PER_SM", "8")]).blocks_per_sm, 8);
    }

    #[test]
    pub(super) fn every_configured_rows_kernel_is_in_the_fatbin() {
        let contains = fatbin_has_kernel;
        for unroll in ["1", "2", "4"] {
            let l = launch(&[("FWL_CUDA_ROW_UNROLL", unroll), ("FWL_CUDA_ROW_LEAN", "1")]);
            assert_eq!((l.unroll, l.lean), (unroll.parse().unwrap(), unroll != "4"));
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
        assert!(!contains("fwl_rowsl4_f32_f32"), "no lean kernel with 4 loads in flight");
        assert!(!contains("fwl_rowsc2_f32_f32"), "no cluster kernels any more");
        assert!(!contains("fwl_rowslo2_f32_f32"), "one lean options kernel per pair, one load in flight");
        let two = launch(&[("FWL_CUDA_ROW_UNROLL", "2")]);
        assert_eq!(launch(&[]).kernel_name(RowKernel::Default, DType::BF16, DType::F32), "fwl_rows_bf16_f32");
        assert_eq!(two.kernel_name(RowKernel::Lean, DType::F16, DType::F16), "fwl_rowsl2_f16_f16");
        assert_eq!(two.kernel_name(RowKernel::LeanOptions, DType::F16, DType::F16), "fwl_rowslo_f16_f16");
    }
}
