//! Every bad input gets its typed error, before anything is written, and never a panic.

use fused_weighted_loss::reference::reference;
use fused_weighted_loss::{Backend, Error, Grad, LossSpec, Shape, Tokens};

fn ok_inputs() -> (Shape, Vec<f32>, Vec<i64>) {
    let shape = Shape::new(2, 3, 5).unwrap();
    let logits = fused_weighted_loss::synthetic::logits::<f32>(1, 30, 1.0);
    (shape, logits, vec![0, 1, 2, 3, 4, 0])
}

#[test]
fn shapes() {
    assert_eq!(Shape::new(0, 3, 5), Err(Error::EmptyBatch));
    assert_eq!(Shape::new(2, 1, 5), Err(Error::SequenceTooShort { seq: 1 }));
    assert_eq!(Shape::new(2, 0, 5), Err(Error::SequenceTooShort { seq: 0 }));
    assert_eq!(Shape::new(2, 3, 0), Err(Error::EmptyVocab));
    assert!(matches!(Shape::new(1, 2, 1 << 31), Err(Error::VocabTooLarge { .. })));
    assert_eq!(Shape::new(usize::MAX / 2, 4, 1000), Err(Error::SizeOverflow { product: "batch * seq * vocab" }));
    use fused_weighted_loss::LinearShape;
    let linear = |b, t, h, v| LinearShape::new(b, t, h, v).unwrap_err().to_string();
    assert_eq!(linear(1, 2, usize::MAX, 10), "batch * seq * hidden overflows the address space");
    assert_eq!(linear(1, 2, usize::MAX / 4, 10), "vocab * hidden overflows the address space");
    assert!(matches!(Shape::from_dims(&[2, 3], &[2, 3]), Err(Error::LogitsRank { rank: 2, .. })));
    assert!(matches!(Shape::from_dims(&[2, 3, 5, 1], &[2, 3]), Err(Error::LogitsRank { rank: 4, .. })));
    assert!(matches!(Shape::from_dims(&[2, 3, 5], &[6]), Err(Error::TokensRank { what: "ids", rank: 1, .. })));
    assert!(matches!(Shape::from_dims(&[2, 3, 5], &[3, 3]), Err(Error::ShapeMismatch { what: "ids", .. })));
}

#[test]
fn lengths() {
    let (shape, logits, ids) = ok_inputs();
    let spec = LossSpec::default();
    let e = spec.loss_and_grad(shape, &logits[..29], Tokens::new(&ids), Grad::Skip).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "logits", expected: 30, got: 29, .. }), "{e}");
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids[..5]), Grad::Skip).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "ids", .. }), "{e}");
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids).with_labels(&ids[..4]), Grad::Skip).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "labels", .. }), "{e}");
    let mut g = vec![7f32; 31];
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut g)).unwrap_err();
    assert_eq!(e, Error::GradLength { expected: 30, got: 31 });
    // a buffer of the right length is left untouched when another input is bad
    let mut g = vec![7f32; 30];
    let mut bad = ids.clone();
    bad[5] = 99;
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&bad), Grad::Into(&mut g)).unwrap_err();
    assert!(matches!(e, Error::IdOutOfRange { value: 99, .. }), "{e}");
    assert!(g.iter().all(|&x| x == 7.0), "nothing written on error");
    let mut l = logits.clone();
    assert!(spec.loss_and_grad_in_place(shape, &mut l, Tokens::new(&bad)).is_err());
    assert_eq!(l, logits, "in place: the logits are untouched on error");
    let mut g = vec![7f32; 29];
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap_err();
    assert_eq!(e, Error::GradLength { expected: 30, got: 29 });
    let mut l = logits.clone();
    let e = spec.loss_and_grad_in_place(shape, &mut l[..20], Tokens::new(&ids)).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "logits", .. }), "{e}");
}

#[test]
fn ids_and_labels_out_of_range() {
    let (shape, logits, mut ids) = ok_inputs();
    let spec = LossSpec::default();
    ids[4] = 5;
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap_err();
    assert_eq!(e, Error::IdOutOfRange { what: "ids", batch: 1, position: 1, value: 5, vocab: 5 });
    ids[4] = -1;
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap_err();
    assert!(matches!(e, Error::IdOutOfRange { what: "ids", value: -1, .. }), "{e}");
    // an id equal to ignore_index is an ignored target (as in the course function), any other
    // negative id is out of range
    ids[4] = -100;
    spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
    let other = LossSpec::builder().ignore_index(-1).build().unwrap();
    let e = other.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap_err();
    assert!(matches!(e, Error::IdOutOfRange { what: "ids", value: -100, .. }), "{e}");
    let ids = vec![0i64, 1, 2, 3, 4, 0];
    let labels = vec![-100i64, 1, 2, 3, 9, -100];
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids).with_labels(&labels), Grad::Skip).unwrap_err();
    assert_eq!(e, Error::IdOutOfRange { what: "labels", batch: 1, position: 1, value: 9, vocab: 5 });
    let labels = vec![-100i64, 1, 2, 3, -7, -100];
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids).with_labels(&labels), Grad::Skip).unwrap_err();
    assert!(matches!(e, Error::IdOutOfRange { what: "labels", value: -7, .. }), "{e}");
    let idsu = vec![0u32, 1, 2, 3, u32::MAX, 0];
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&idsu), Grad::Skip).unwrap_err();
    assert!(matches!(e, Error::IdOutOfRange { value: 4294967295, .. }), "{e}");
}

#[test]
fn keywords_alpha_weights_scale() {
    let (shape, logits, ids) = ok_inputs();
    let spec = LossSpec::builder().keywords([2, 5]).build().unwrap();
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap_err();
    assert_eq!(e, Error::KeywordOutOfRange { id: 5, vocab: 5 });
    let spec = LossSpec::builder().keywords([-3]).build().unwrap();
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap_err();
    assert_eq!(e, Error::KeywordOutOfRange { id: -3, vocab: 5 });
    for a in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(LossSpec::builder().alpha(a).build(), Err(Error::InvalidAlpha(_))));
    }
    for w in [-0.5, f64::NAN, f64::NEG_INFINITY] {
        let e = LossSpec::builder().weighted_keywords([(1, 1.0), (2, w)]).build().unwrap_err();
        assert!(matches!(e, Error::InvalidKeywordWeight { id: 2, .. }), "{e}");
    }
    assert!(matches!(LossSpec::builder().grad_scale(f64::NAN).build(), Err(Error::InvalidGradScale(_))));
}

#[test]
fn sample_weights_that_overflow_are_errors() {
    let (shape, logits, ids) = ok_inputs();
    let mut grad = vec![f32::NAN; logits.len()];
    // finite sample weights whose sum is not: the weighted mean divided by inf (a zero loss
    // and gradient, silently)
    let spec =
        LossSpec::builder().alpha(1e308).reduction(fused_weighted_loss::Reduction::WeightedMean).build().unwrap();
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad)).unwrap_err();
    assert!(matches!(e, Error::InvalidOption { name: "alpha and the keyword weights", .. }), "{e}");
    assert!(grad.iter().all(|g| g.is_nan()), "nothing written");
    // the float64 oracle refuses the same input with the same error (it returned a NaN loss and
    // a zero gradient)
    let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap_err();
    assert!(matches!(r, Error::InvalidOption { name: "alpha and the keyword weights", .. }), "{r}");
    // (the plain mean of the same weights is finite)
    assert!(LossSpec::builder()
        .alpha(1e308)
        .build()
        .unwrap()
        .loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip)
        .is_ok());
    // a keyword weight that overflows a sample's weight (id 0 twice in the first sample)
    let spec = LossSpec::builder().weighted_keywords([(0, f64::MAX)]).build().unwrap();
    let twice = [0i64, 0, 2, 3, 4, 1];
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&twice), Grad::Skip).unwrap_err();
    assert!(matches!(e, Error::InvalidOption { value, .. } if value == f64::INFINITY), "{e}");
    let r = reference(&spec, shape, &logits, Tokens::new(&twice)).unwrap_err();
    assert!(matches!(r, Error::InvalidOption { value, .. } if value == f64::INFINITY), "{r}");
}

/// A gradient factor `grad_scale · w_b / (D · N_b) · token weight` beyond f32 (every entry of
/// its row infinite or NaN, the loss in f64 finite, `check_finite` passing) is refused before
/// anything is written, by every call that writes a gradient; a loss-only call needs no factor.
#[test]
fn gradient_factors_beyond_f32_are_errors() {
    use fused_weighted_loss::linear::{Chunking, LinearGrads, LinearInputs, LinearShape};
    let (shape, logits, ids) = ok_inputs();
    let is_factor_error = |e: &Error| matches!(e, Error::InvalidOption { name: "grad_scale, alpha, the keyword weights and the token weights", value, .. } if *value > f32::MAX as f64);
    // D · N_b = 2 · 2: a scale of 1e40 gives 2.5e39 per row
    for spec in [
        LossSpec::builder().grad_scale(1e40).check_finite(true).build().unwrap(),
        LossSpec::builder().alpha(1e40).build().unwrap(),
        // a keyword weight: id 0 in both samples
        LossSpec::builder().weighted_keywords([(0, 1e40)]).build().unwrap(),
    ] {
        let mut g = vec![7f32; logits.len()];
        let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut g)).unwrap_err();
        assert!(is_factor_error(&e), "{e}");
        assert!(g.iter().all(|&x| x == 7.0), "nothing written");
        let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::IntoF32(&mut g)).unwrap_err();
        assert!(is_factor_error(&e), "{e}");
        let mut in_place = logits.clone();
        let e = spec.loss_and_grad_in_place(shape, &mut in_place, Tokens::new(&ids)).unwrap_err();
        assert!(is_factor_error(&e) && in_place == logits, "{e}: nothing written");
        let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
        assert!(out.loss.is_finite(), "the loss alone: {}", out.loss);
        // the fused linear path (logits = hidden · Wᵀ, H = 1)
        let ls = LinearShape::new(2, 3, 1, 5).unwrap();
        let (hidden, weight) = ([0.5f32, -1.0, 2.0, 0.25, 1.0, -0.5], [1.0f32, -2.0, 0.5, 3.0, -1.0]);
        let mut dh = [7f32; 6];
        let grads = LinearGrads::new().hidden(Grad::Into(&mut dh));
        let e = spec
            .linear_loss_and_grad(ls, LinearInputs::new(&hidden, &weight), Tokens::new(&ids), grads, Chunking::Auto)
            .unwrap_err();
        assert!(is_factor_error(&e) && dh == [7.0; 6], "{e}: nothing written");
        let loss_only = LinearGrads::new();
        let out = spec.linear_loss_and_grad(
            ls,
            LinearInputs::new(&hidden, &weight),
            Tokens::new(&ids),
            loss_only,
            Chunking::Auto,
        );
        assert!(out.is_ok(), "{out:?}");
    }
    // a token weight takes a factor within f32 past it; on a row whose target is ignored it
    // does not count (that row has no gradient)
    let spec = LossSpec::builder().grad_scale(1e37).build().unwrap();
    let mut tw = vec![1f32; 6];
    tw[1] = 1000.0; // row (0, 0): 2.5e36 · 1000
    let mut g = vec![7f32; logits.len()];
    let e =
        spec.loss_and_grad(shape, &logits, Tokens::new(&ids).with_token_weights(&tw), Grad::Into(&mut g)).unwrap_err();
    assert!(is_factor_error(&e), "{e}");
    let labels = [0i64, -100, 2, 3, 4, 0];
    let tokens = Tokens::new(&ids).with_labels(&labels).with_token_weights(&tw);
    let out = spec.loss_and_grad(shape, &logits, tokens, Grad::Into(&mut g)).unwrap();
    assert!(out.loss.is_finite() && g.iter().all(|x| x.is_finite()), "the ignored row's weight is not used");
    // the largest factor f32 holds still runs, every entry finite
    let spec = LossSpec::builder().grad_scale(1e38).build().unwrap();
    spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut g)).unwrap();
    assert!(g.iter().all(|x| x.is_finite()), "2.5e37 per row: finite entries");
}

#[test]
fn the_z_loss_part_is_0_when_off_also_over_non_finite_logits() {
    let (shape, mut logits, ids) = ok_inputs();
    // +inf on a non-target entry of the first row: its lse is not finite
    let y = ids[1] as usize;
    logits[(y + 1) % shape.vocab()] = f32::INFINITY;
    let spec = LossSpec::default();
    let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
    let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
    assert!(out.loss.is_nan() && r.loss.is_nan(), "{} {}", out.loss, r.loss);
    assert_eq!((out.z_loss, r.z_loss), (0.0, 0.0));
    // with z-loss on, the part propagates the NaN in both
    let spec = LossSpec::builder().z_loss(1e-4).build().unwrap();
    let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
    let r = reference(&spec, shape, &logits, Tokens::new(&ids)).unwrap();
    assert!(out.z_loss.is_nan() && r.z_loss.is_nan(), "{} {}", out.z_loss, r.z_loss);
}

#[test]
fn cuda_backend_unavailable_is_an_error() {
    if fused_weighted_loss::cuda_status().is_ok() {
        eprintln!("skipped: CUDA is available here");
        return;
    }
    let (shape, logits, ids) = ok_inputs();
    let spec = LossSpec::builder().backend(Backend::Cuda).build().unwrap();
    let e = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap_err();
    assert!(matches!(e, Error::BackendUnavailable { backend: Backend::Cuda, .. }), "{e}");
    let auto = LossSpec::default().loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
    assert_eq!(auto.backend, Backend::Cpu);
}

#[test]
fn errors_display_one_line() {
    let (shape, logits, ids) = ok_inputs();
    let e = LossSpec::default().loss_and_grad(shape, &logits[1..], Tokens::new(&ids), Grad::Skip).unwrap_err();
    let msg = e.to_string();
    assert!(!msg.contains('\n') && msg.contains("logits") && msg.contains("30"), "{msg}");
}

/// Options of -0 are 0: `-0 >= 0` let them through as given, and an alpha of -0 came out as
/// weights and a loss of -0 (the CLI printed `"loss": -0.0`).
#[test]
fn options_of_negative_zero_are_zero() {
    let spec = LossSpec::builder()
        .alpha(-0.0)
        .z_loss(-0.0)
        .label_smoothing(-0.0)
        .weighted_keywords([(3, -0.0)])
        .reduction(fused_weighted_loss::Reduction::Sum)
        .build()
        .unwrap();
    let positive = |x: f64| x == 0.0 && x.is_sign_positive();
    assert!(positive(spec.alpha()) && positive(spec.z_loss()) && positive(spec.label_smoothing()));
    assert!(positive(spec.keywords()[0].weight));
    let (shape, logits, ids) = ok_inputs();
    let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip).unwrap();
    assert!(positive(out.loss), "{}", out.loss);
    assert!(out.weights.iter().all(|&w| positive(w)), "{:?}", out.weights);
}
