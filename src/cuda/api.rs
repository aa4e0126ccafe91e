//! The device API: the caller's buffers and stream in ([`DeviceInputs`]), results left on the device
//! ([`DeviceLossOutput`]), and [`CudaLoss`], whose calls queue the kernels without synchronising.

use super::*;

/// The per-call token inputs on the device: ids `[B, T]`, optional labels and token weights
/// `[B, T]` and an optional device scalar for the upstream gradient (instead of the spec's host
/// value).
#[derive(Debug)]
pub struct DeviceInputs<'a, I: TokenId> {
    pub(super) ids: &'a CudaView<'a, I>,
    pub(super) labels: Option<&'a CudaView<'a, I>>,
    pub(super) token_weights: Option<&'a CudaView<'a, f32>>,
    pub(super) grad_scale: Option<&'a CudaView<'a, f32>>,
}

impl<'a, I: TokenId> DeviceInputs<'a, I> {
    /// Ids only: the labels are the ids (in `[0, V)` or `ignore_index`, as in [`Tokens::new`](crate::Tokens::new)).
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
///
/// On a data-parallel rank without samples (`Shape::without_samples`, through
/// `cuda::split::DeviceSharded`) the `[B]` and `[B·T]` buffers hold one element that is not
/// part of the results (CUDA allocates no zero-byte buffers); `to_host` leaves it out.
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
    pub(super) status: CudaSlice<FwlStatus>,
    pub(super) shape: Shape,
    pub(super) check_finite: bool,
    /// Whether `loss` is a data group's ([`CudaSharded::combine_loss`](crate::cuda::split::CudaSharded::combine_loss)):
    /// `check` then also fails when the group's loss is not finite.
    pub(super) over_group: bool,
}

impl DeviceLossOutput {
    /// Waits for the call's work on `stream` and reports what the kernels found: ids or labels
    /// outside the vocabulary, non-finite token weights, sample weights `alpha · (1 + hits)` (or,
    /// for the weighted mean, their sum) beyond `f64`, and (with `check_finite`) a non-finite loss.
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
        if st.flags & params::FWL_STATUS_BAD_SAMPLE_WEIGHT != 0 {
            return Err(crate::plan::weights_overflow(st.bad_sample_weight));
        }
        if self.check_finite && st.flags & params::FWL_STATUS_NON_FINITE != 0 {
            let i = st.non_finite_row;
            let mut v = [0f64];
            stream.memcpy_dtoh(&self.row_loss.slice(i as usize..i as usize + 1), &mut v).map_err(drv("reading"))?;
            stream.synchronize().map_err(drv("synchronising"))?;
            return Err(Error::NonFinite { batch: (i / t) as usize, position: (i % t) as usize, value: v[0] });
        }
        if self.check_finite && self.over_group {
            // a non-finite position on another rank of the data group: every rank fails
            let mut v = [0f64];
            stream.memcpy_dtoh(&self.loss, &mut v).map_err(drv("reading"))?;
            stream.synchronize().map_err(drv("synchronising"))?;
            if !v[0].is_finite() {
                return Err(Error::NonFiniteInGroup { value: v[0] });
            }
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
        // (a rank without samples has one element beyond its `[B]`)
        let b = self.shape.batch();
        let (mut per_sample_loss, mut weights, mut valid) = (per_sample_loss, weights, valid);
        per_sample_loss.truncate(b);
        weights.truncate(b);
        valid.truncate(b);
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
    pub(super) ctx: Arc<CudaContext>,
    pub(super) module: Arc<Module>,
}

impl std::fmt::Debug for CudaLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLoss").field("ordinal", &self.ctx.ordinal()).finish()
    }
}

impl CudaLoss {
    /// Loads (or reuses) the kernels on `ctx`. The kernels stay loaded while any `CudaLoss` of
    /// the context lives: keep one for the run (or use [`shared`](Self::shared)), since making
    /// one per step after the last was dropped loads the module again (~6 MB of fatbin).
    pub fn new(ctx: &Arc<CudaContext>) -> Result<CudaLoss> {
        Ok(CudaLoss { ctx: ctx.clone(), module: Module::of(ctx)? })
    }

    /// The instance of `ctx` whose kernels stay loaded for the life of the process, for callers
    /// that cannot keep one between steps (the candle op makes one per forward).
    pub fn shared(ctx: &Arc<CudaContext>) -> Result<CudaLoss> {
        static KEPT: Mutex<Vec<(usize, CudaLoss)>> = Mutex::new(Vec::new());
        let key = ctx.cu_ctx() as usize;
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, l)) = kept.iter().find(|(k, _)| *k == key) {
            return Ok(l.clone());
        }
        let l = CudaLoss::new(ctx)?;
        kept.push((key, l.clone()));
        Ok(l)
    }

    /// How many times this process has loaded the kernels into a context (a check that
    /// callers reuse them; not part of the stable API).
    #[doc(hidden)]
    pub fn module_loads() -> usize {
        Module::loads()
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
    pub(super) fn validate<I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        logits_len: usize,
        inputs: &DeviceInputs<'_, I>,
        grad_len: Option<usize>,
    ) -> Result<()> {
        shape.require_samples()?;
        self.validate_of_rank(spec, shape, logits_len, inputs, grad_len)
    }

    /// [`validate`](Self::validate) for a shape that may hold no samples (a sharded call's rank
    /// without samples checks what its peers check before their first exchange).
    pub(super) fn validate_of_rank<I: TokenId>(
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
        // target ids are i32 on the device and each sample's count of targets a u32 (samples
        // and positions are indexed in 64 bits)
        if !cuda_shape_fits(shape) {
            return Err(Error::Unsupported("shape too large for the CUDA kernels".into()));
        }
        Ok(())
    }

    /// Takes the device addresses of the token inputs and runs `f` while they are held.
    pub(super) fn with_inputs<I: TokenId, R>(
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
        self.same_context(stream)?;
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

impl CudaLoss {
    /// Queues `dst[i] = src[i]` rounded to `dst`'s 16-bit type, for `n` elements at device
    /// addresses `src` (f32) and `dst` (`dtype`), both checked by the caller and held while this
    /// runs.
    pub(crate) fn launch_narrow(
        &self,
        stream: &Arc<CudaStream>,
        dtype: DType,
        src: u64,
        dst: u64,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.same_context(stream)?;
        let func = self.module.narrow.iter().find(|(d, _)| *d == dtype).map(|(_, f)| f);
        let func = func.ok_or_else(|| Error::Unsupported(format!("no narrowing kernel to {dtype}")))?;
        let p = FwlNarrowParams { src: src as *const f32, dst: dst as *mut c_void, n: n as i64 };
        let grid = (n.div_ceil(THREADS as usize)).clamp(1, self.module.num_sms as usize * 4) as u32;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the parameters match fwl_narrow_<dtype>'s; src holds n f32 and dst n elements
        // of dtype (the caller's checks).
        unsafe { stream.launch_builder(func).arg(&p).launch(cfg) }.map_err(drv("launching narrow"))?;
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

/// Whether the kernels' 32-bit fields hold `shape`: target ids (i32, so `V <= 2^31 − 1`) and each
/// sample's count of targets (u32, so `T − 1 <= 2^32 − 1`).
pub(crate) fn cuda_shape_fits(shape: Shape) -> bool {
    shape.vocab() <= i32::MAX as usize && shape.seq() - 1 <= u32::MAX as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_32_bit_fields_bound_vocabulary_and_positions_not_batch() {
        let fits = |b, t, v| cuda_shape_fits(Shape::new(b, t, v).unwrap());
        assert!(fits(1, 2, 1));
        assert!(fits(1, (u32::MAX as usize) + 1, 1), "2^32 - 1 targets per sample");
        assert!(!fits(1, (u32::MAX as usize) + 2, 1), "2^32 targets overflow a sample's count");
        assert!(fits((u32::MAX as usize) + 1, 2, 1), "the batch is indexed in 64 bits");
        assert!(fits(1, 2, i32::MAX as usize));
    }
}
