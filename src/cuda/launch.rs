//! The launches of one call: plan, rows (over all rows or a range of them) and finish, and the
//! device buffers that carry results from one kernel to the next.

use super::*;

/// The plan kernel's outputs and the buffers the rows and finish kernels fill.
pub(super) struct Planned {
    pub(super) targets: CudaSlice<i32>,
    pub(super) weights: CudaSlice<f64>,
    pub(super) valid: CudaSlice<u32>,
    pub(super) row_div: CudaSlice<f64>,
    pub(super) reduce: CudaSlice<f64>,
    pub(super) coef: CudaSlice<f32>,
    pub(super) status: CudaSlice<FwlStatus>,
    pub(super) row_loss: CudaSlice<f64>,
    /// The z-loss parts of the rows and samples (one-element placeholders when it is off).
    pub(super) row_z: CudaSlice<f64>,
    pub(super) per_sample_z: CudaSlice<f64>,
    pub(super) per_sample: CudaSlice<f64>,
    pub(super) loss: CudaSlice<f64>,
    pub(super) z_loss: CudaSlice<f64>,
    loss_f32: CudaSlice<f32>,
    pub(super) opts: PlannedOptions,
}

/// The call's per-row options, as the rows and finish kernels take them.
#[derive(Debug, Clone, Copy)]
pub(super) struct PlannedOptions {
    pub(super) softcap: f32,
    pub(super) z_loss: f64,
    pub(super) smoothing: f64,
    /// Device address of the token weights (0: none).
    pub(super) token_weights: u64,
}

/// Device addresses of one call (0 for absent), held while the launches are queued.
pub(super) struct Ptrs {
    pub(super) logits: u64,
    pub(super) grad: u64,
    pub(super) ids: u64,
    pub(super) labels: u64,
    pub(super) token_weights: u64,
    pub(super) scale: u64,
}

impl CudaLoss {
    /// [`Error::ContextMismatch`] unless `stream` is of the context the kernels are loaded on
    /// (every launch asks first: the kernels of one context cannot run on another's stream).
    pub(super) fn same_context(&self, stream: &Arc<CudaStream>) -> Result<()> {
        same_context(&self.ctx, stream)
    }

    /// Queues plan, rows and finish on `stream`.
    pub(super) fn launch<L: Logit, G: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
    ) -> Result<DeviceLossOutput> {
        let mut planned = self.launch_plan::<I>(spec, shape, stream, p)?;
        self.launch_rows::<L, G>(shape, stream, p, 0, shape.rows(), &mut planned)?;
        self.launch_finish(spec, shape, stream, planned)
    }

    /// Queues the plan kernel; its outputs, and those of the kernels after it, are allocated here.
    pub(super) fn launch_plan<I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
    ) -> Result<Planned> {
        self.same_context(stream)?;
        let m = &self.module;
        let (b, rows) = (shape.batch(), shape.rows());
        // plan writes targets (all B*T), the per-sample arrays (all B) and the status; rows
        // writes every row loss; finish writes per_sample, loss and loss_f32
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
        let per_sample_z = output::<f64>(stream, if z_on { b } else { 1 })?;
        let per_sample = output::<f64>(stream, b)?;
        let loss = output::<f64>(stream, 1)?;
        let z_loss = output::<f64>(stream, 1)?;
        let loss_f32 = output::<f32>(stream, 1)?;

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

        let opts = PlannedOptions {
            softcap: spec.softcap.map_or(0.0, |c| c as f32),
            z_loss: spec.z_loss,
            smoothing: spec.label_smoothing,
            token_weights: p.token_weights,
        };
        Ok(Planned {
            targets,
            weights,
            valid,
            row_div,
            reduce,
            coef,
            status,
            row_loss,
            row_z,
            per_sample_z,
            per_sample,
            loss,
            z_loss,
            loss_f32,
            opts,
        })
    }

    /// Queues the rows kernel on `rows` rows of `p.logits` (and `p.grad`), which are the plan's
    /// rows `row_offset..row_offset + rows`.
    pub(super) fn launch_rows<L: Logit, G: Logit>(
        &self,
        shape: Shape,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
        row_offset: usize,
        rows: usize,
        planned: &mut Planned,
    ) -> Result<()> {
        self.same_context(stream)?;
        let m = &self.module;
        let Planned { targets, coef, row_loss, row_z, opts: planned_opts, .. } = planned;
        let z_on = planned_opts.z_loss != 0.0;
        // rows: grid-stride, as many resident blocks as the shared memory allows
        {
            // the lean kernels (FWL_CUDA_ROW_LEAN): the plain loss's, or the options' where any
            // option changes the arithmetic per element or per row (token weights do not)
            let plain = planned_opts.softcap == 0.0 && planned_opts.z_loss == 0.0 && planned_opts.smoothing == 0.0;
            let row_fn = match m.rows_lean_fn(L::DTYPE, G::DTYPE, !plain) {
                Some(f) => f,
                None => m.rows_fn(L::DTYPE, G::DTYPE)?,
            };
            let func = &row_fn.func;
            // a row's block keeps what fits of the row in shared memory
            let row_vectors = (shape.vocab() * L::DTYPE.size()).div_ceil(16);
            let smem_vectors = if p.grad != 0 { row_vectors.min(row_fn.smem / 16) } else { 0 };
            let smem = smem_vectors * 16;
            let block = (m.launch.threads, 1, 1);
            let per_sm = m.blocks_per_sm(func, m.launch.threads, smem)?;
            let grid = (m.num_sms as usize * per_sm).min(rows).max(1) as u32;
            let (t, _g1) = targets.device_ptr(stream);
            let (c, _g2) = coef.device_ptr(stream);
            let (rl, _g3) = row_loss.device_ptr_mut(stream);
            let (rz, _g4) = row_z.device_ptr_mut(stream);
            let rp = FwlRowParams {
                logits: p.logits as *const c_void,
                grad: p.grad as *mut c_void,
                targets: t as *const i32,
                coef: c as *const f32,
                token_weights: planned_opts.token_weights as *const f32,
                row_loss: rl as *mut f64,
                row_z: if z_on { rz as *mut f64 } else { std::ptr::null_mut() },
                rows: rows as i64,
                seq: shape.seq() as i64,
                vocab: shape.vocab() as i64,
                smem_vectors: smem_vectors as i64,
                vector_stores: (L::DTYPE.size() == G::DTYPE.size() && p.grad % 16 == p.logits % 16) as i32,
                softcap: planned_opts.softcap,
                z_loss: planned_opts.z_loss,
                smoothing: planned_opts.smoothing,
                row_offset: row_offset as i64,
            };
            let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: block, shared_mem_bytes: smem as u32 };
            // SAFETY: the parameters match fwl_rows*_<L>_<G>'s; logits and grad (when not 0) hold
            // rows * vocab elements of L and G, targets, row_loss, row_z (when not NULL) and
            // token_weights (when not 0) `rows`, coef `B`; the
            // dynamic shared memory requested is what smem_vectors covers and at most the
            // maximum set on the function at load.
            unsafe { stream.launch_builder(func).arg(&rp).launch(cfg) }.map_err(drv("launching rows"))?;
        }

        Ok(())
    }

    /// Queues the finish kernel over every row's loss.
    pub(super) fn launch_finish(
        &self,
        spec: &LossSpec,
        shape: Shape,
        stream: &Arc<CudaStream>,
        planned: Planned,
    ) -> Result<DeviceLossOutput> {
        let (m, b) = (&self.module, shape.batch());
        let Planned {
            targets,
            weights,
            valid,
            row_div,
            reduce,
            mut status,
            row_loss,
            row_z,
            mut per_sample_z,
            mut per_sample,
            mut loss,
            mut z_loss,
            mut loss_f32,
            opts,
            ..
        } = planned;
        let z_on = opts.z_loss != 0.0;
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
                token_weights: opts.token_weights as *const f32,
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
            over_group: false,
        })
    }
}
