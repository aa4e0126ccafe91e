//! Host slices through the GPU (the host API with `Backend::Cuda`): upload, run, download.

use super::*;

/// The context and kernels used for host-memory calls with [`Backend::Cuda`] (device 0).
pub(super) fn host_device() -> Result<&'static (Arc<CudaContext>, CudaLoss)> {
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
pub(super) struct Uploaded<I: TokenId> {
    pub(super) ids: CudaSlice<I>,
    pub(super) labels: Option<CudaSlice<I>>,
    pub(super) token_weights: Option<CudaSlice<f32>>,
}

impl<I: TokenId> Uploaded<I> {
    pub(super) fn new(stream: &Arc<CudaStream>, tokens: &Tokens<'_, I>) -> Result<Self> {
        let up = |t: &[I]| stream.clone_htod(t).map_err(drv("copying inputs to the device"));
        let token_weights = tokens
            .token_weights
            .map(|w| stream.clone_htod(w).map_err(drv("copying inputs to the device")))
            .transpose()?;
        Ok(Uploaded { ids: up(tokens.ids)?, labels: tokens.labels.map(up).transpose()?, token_weights })
    }

    /// Runs `f` with the uploaded tokens as [`DeviceInputs`].
    pub(super) fn with<R>(&self, f: impl FnOnce(&DeviceInputs<'_, I>) -> R) -> R {
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
pub(super) fn grad_to_host<L: Logit, G: Logit, I: TokenId>(
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
pub(super) fn finish_host(
    out: &DeviceLossOutput,
    stream: &Arc<CudaStream>,
    token_loss: Option<&mut [f32]>,
) -> Result<LossOutput> {
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
