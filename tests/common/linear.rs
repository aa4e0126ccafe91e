//! The fused linear path against a float64 reference: the logits `h·Wᵀ + b` in f64, the crate's
//! f64 `reference` for loss and logits gradient, and the three gradient products in f64.

use super::{assert_outputs, tolerances};
use fused_weighted_loss::reference::{reference, rel_err, ReferenceOutput};
use fused_weighted_loss::{
    synthetic, Chunking, Grad, LinearGrads, LinearInputs, LinearOutput, LinearShape, Logit, LossSpec, Tokens,
};

/// Inputs of one fused linear case.
pub struct Case<L: Logit> {
    pub shape: LinearShape,
    pub hidden: Vec<L>,
    pub weight: Vec<L>,
    pub bias: Option<Vec<L>>,
    pub ids: Vec<i64>,
    pub labels: Option<Vec<i64>>,
    pub token_weights: Option<Vec<f32>>,
}

impl<L: Logit> Case<L> {
    /// Random inputs: hidden uniform in [-1, 1), weight scaled so that logits are O(1), ids
    /// uniform in [0, V).
    pub fn random(seed: u64, b: usize, t: usize, h: usize, v: usize, with_bias: bool) -> Self {
        let shape = LinearShape::new(b, t, h, v).unwrap();
        let w_scale = 3.0 / (h as f32).sqrt();
        Case {
            shape,
            hidden: synthetic::logits(seed, shape.hidden_len(), 1.0),
            weight: synthetic::logits(seed + 1, shape.weight_len(), w_scale),
            bias: with_bias.then(|| synthetic::logits(seed + 2, v, 0.5)),
            ids: synthetic::ids(seed + 3, shape.rows(), v),
            labels: None,
            token_weights: None,
        }
    }

    pub fn tokens(&self) -> Tokens<'_, i64> {
        let t = match &self.labels {
            Some(l) => Tokens::new(&self.ids).with_labels(l),
            None => Tokens::new(&self.ids),
        };
        match &self.token_weights {
            Some(w) => t.with_token_weights(w),
            None => t,
        }
    }

    pub fn inputs(&self) -> LinearInputs<'_, L> {
        let i = LinearInputs::new(&self.hidden, &self.weight);
        match &self.bias {
            Some(b) => i.with_bias(b),
            None => i,
        }
    }
}

/// What the float64 reference gives.
pub struct Expected {
    /// `h·Wᵀ + b`, computed in f64 and rounded to f32.
    pub logits: Vec<f32>,
    pub out: ReferenceOutput,
    pub dh: Vec<f64>,
    pub dw: Vec<f64>,
    pub db: Vec<f64>,
}

/// Loss and gradients in f64: logits `h·Wᵀ + b` (from the inputs' values), the crate's reference
/// on those logits (rounded to f32, within 6e-8 of the f64 values), then `d h = G·W`,
/// `d W = Gᵀ·h`, `d b = Σ_rows G`.
pub fn expected<L: Logit>(spec: &LossSpec, c: &Case<L>) -> Expected {
    let (n, h, v) = (c.shape.rows(), c.shape.hidden(), c.shape.vocab());
    let f = |x: &L| x.to_f32() as f64;
    let hid: Vec<f64> = c.hidden.iter().map(f).collect();
    let w: Vec<f64> = c.weight.iter().map(f).collect();
    let mut logits = vec![0f32; n * v];
    for r in 0..n {
        for j in 0..v {
            let mut z: f64 = (0..h).map(|k| hid[r * h + k] * w[j * h + k]).sum();
            if let Some(b) = &c.bias {
                z += b[j].to_f32() as f64;
            }
            logits[r * v + j] = z as f32;
        }
    }
    let out = reference(spec, c.shape.tokens(), &logits, c.tokens()).expect("reference");
    assert!(out.loss.is_finite(), "test data must give a finite reference loss");
    let g = &out.grad;
    let mut dh = vec![0f64; n * h];
    let mut dw = vec![0f64; v * h];
    let mut db = vec![0f64; v];
    for r in 0..n {
        for j in 0..v {
            let gj = g[r * v + j];
            if gj == 0.0 {
                continue;
            }
            db[j] += gj;
            for k in 0..h {
                dh[r * h + k] += gj * w[j * h + k];
                dw[j * h + k] += gj * hid[r * h + k];
            }
        }
    }
    Expected { logits, out, dh, dw, db }
}

/// Runs the fused linear path with gradients into `L` buffers and into f32 buffers (and the
/// loss only), with `accumulate` on pre-filled weight and bias gradients, and checks all of it
/// against `e`. Returns the f32 run's output and gradients `(dh, dw, db)`.
pub fn check<L: Logit>(
    spec: &LossSpec,
    c: &Case<L>,
    e: &Expected,
    chunking: Chunking,
    what: &str,
) -> (LinearOutput, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (grad_tol, loss_tol) = tolerances(L::DTYPE);
    let s = c.shape;
    let has_bias = c.bias.is_some();
    let what = format!("{what} {} {} {chunking:?}", s, L::DTYPE);

    let out = spec
        .linear_loss_and_grad(s, c.inputs(), c.tokens(), LinearGrads::new(), chunking)
        .unwrap_or_else(|err| panic!("{what}: loss only: {err}"));
    assert_outputs(&out.loss, &e.out, loss_tol, &format!("{what}: loss only"));

    // f32 gradients: on the CPU computed in f32 from the same values, so the f32 bound applies
    let (mut dh, mut dw, mut db) =
        (vec![f32::NAN; s.hidden_len()], vec![f32::NAN; s.weight_len()], vec![f32::NAN; s.vocab()]);
    let mut grads = LinearGrads::new().hidden(Grad::IntoF32(&mut dh)).weight(Grad::IntoF32(&mut dw));
    if has_bias {
        grads = grads.bias(Grad::IntoF32(&mut db));
    }
    let out32 = spec.linear_loss_and_grad(s, c.inputs(), c.tokens(), grads, chunking).expect("f32 grads");
    assert_outputs(&out32.loss, &e.out, loss_tol, &format!("{what}: f32 grads"));
    let check = |name: &str, got: &[f32], want: &[f64], tol: f64| {
        let err = rel_err(got, want);
        assert!(err <= tol, "{what}: {name}: rel err {err:e} > {tol:e}");
    };
    // on CUDA the chunk's gradient is in the inputs' dtype (the products' operands)
    let f32_tol = match spec.backend() {
        fused_weighted_loss::Backend::Cuda => grad_tol,
        _ => 1e-5,
    };
    check("d hidden (f32)", &dh, &e.dh, f32_tol);
    check("d weight (f32)", &dw, &e.dw, f32_tol);
    if has_bias {
        check("d bias (f32)", &db, &e.db, f32_tol);
    }

    // gradients in the inputs' dtype, weight and bias added to a prior value
    let prior_w: Vec<L> = synthetic::logits(99, s.weight_len(), 0.01);
    let prior_b: Vec<L> = synthetic::logits(98, s.vocab(), 0.01);
    let (mut dh_l, mut dw_l, mut db_l) =
        (vec![L::from_f32(f32::NAN); s.hidden_len()], prior_w.clone(), prior_b.clone());
    let mut grads = LinearGrads::new().hidden(Grad::Into(&mut dh_l)).weight(Grad::Into(&mut dw_l)).accumulate(true);
    if has_bias {
        grads = grads.bias(Grad::Into(&mut db_l));
    }
    let out_l = spec.linear_loss_and_grad(s, c.inputs(), c.tokens(), grads, chunking).expect("grads in L");
    assert_outputs(&out_l.loss, &e.out, loss_tol, &format!("{what}: grads in {}", L::DTYPE));
    let widen = |x: &[L]| -> Vec<f32> { x.iter().map(|x| x.to_f32()).collect() };
    let plus =
        |prior: &[L], g: &[f64]| -> Vec<f64> { prior.iter().zip(g).map(|(p, g)| p.to_f32() as f64 + g).collect() };
    check("d hidden", &widen(&dh_l), &e.dh, grad_tol);
    check("d weight accumulated", &widen(&dw_l), &plus(&prior_w, &e.dw), grad_tol);
    if has_bias {
        check("d bias accumulated", &widen(&db_l), &plus(&prior_b, &e.db), grad_tol);
    }

    // d weight in the inputs' dtype, not accumulated: every entry written over what it held
    let mut dw_fresh = vec![L::from_f32(f32::NAN); s.weight_len()];
    let grads = LinearGrads::new().weight(Grad::Into(&mut dw_fresh));
    spec.linear_loss_and_grad(s, c.inputs(), c.tokens(), grads, chunking).expect("d weight in L");
    check("d weight", &widen(&dw_fresh), &e.dw, grad_tol);
    (out32, dh, dw, db)
}
