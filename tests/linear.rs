//! The fused linear path (`hidden·Wᵀ + b` never built) against the float64 reference: random
//! shapes with odd H and V and V = 1, bias or not, ignored labels, every reduction, chunks of 1,
//! odd and more than N rows and from a byte budget, accumulation into the weight gradient,
//! every input dtype; bit-identical reruns; and the errors.

mod common;

use common::linear::{check, expected, Case};
use fused_weighted_loss::{
    bf16, f16, Chunking, Error, Grad, LinearGrads, LinearShape, Logit, LossSpec, Reduction, RowMean,
};

const CHUNKINGS: [Chunking; 5] =
    [Chunking::Rows(1), Chunking::Rows(3), Chunking::Rows(1000), Chunking::Budget(20_000), Chunking::Auto];

fn all_chunkings<L: Logit>(spec: &LossSpec, c: &Case<L>, what: &str) {
    let e = expected(spec, c);
    for ch in CHUNKINGS {
        check(spec, c, &e, ch, what);
    }
}

#[test]
fn random_shapes_f32() {
    // (B, T, H, V): odd H and V, V = 1, H = 1, more rows than one chunk
    let shapes = [(1, 2, 1, 1), (2, 3, 5, 1), (2, 5, 7, 33), (3, 4, 17, 257), (2, 9, 64, 1000), (1, 17, 33, 2049)];
    for (i, &(b, t, h, v)) in shapes.iter().enumerate() {
        for bias in [false, true] {
            let c = Case::<f32>::random(10 + i as u64, b, t, h, v, bias);
            let spec = LossSpec::builder().keywords([0i64, (v as i64 - 1) / 2]).build().unwrap();
            all_chunkings(&spec, &c, "random f32");
        }
    }
}

#[test]
fn random_shapes_16_bit() {
    for (i, &(b, t, h, v)) in [(2, 5, 7, 33), (3, 6, 40, 515), (1, 9, 129, 3001)].iter().enumerate() {
        let spec = LossSpec::builder().keywords([1i64]).build().unwrap();
        let c = Case::<bf16>::random(40 + i as u64, b, t, h, v, true);
        all_chunkings(&spec, &c, "random bf16");
        let c = Case::<f16>::random(50 + i as u64, b, t, h, v, i % 2 == 0);
        all_chunkings(&spec, &c, "random f16");
    }
}

#[test]
fn loss_options_and_token_weights() {
    // z-loss, label smoothing, soft-capping and token weights ride on the rows pass of each chunk
    let spec = LossSpec::builder().keywords([2i64]).z_loss(1e-3).label_smoothing(0.1).softcap(3.0).build().unwrap();
    let mut c = Case::<f32>::random(70, 3, 6, 19, 301, true);
    c.token_weights = Some((0..c.shape.rows()).map(|i| (i % 4) as f32 * 0.5).collect());
    let mut labels = c.ids.clone();
    labels[4] = -100;
    c.labels = Some(labels);
    all_chunkings(&spec, &c, "options f32");
    let mut c = Case::<bf16>::random(71, 2, 5, 24, 515, false);
    c.token_weights = Some((0..c.shape.rows()).map(|i| 0.25 + (i % 3) as f32).collect());
    all_chunkings(&spec, &c, "options bf16");
}

#[test]
fn wide_hidden_uses_several_vocabulary_panels() {
    // bf16 W is widened a 4 MiB panel at a time: H = 600 gives 1747-row panels, V = 4000 three
    let c = Case::<bf16>::random(7, 2, 4, 600, 4000, true);
    let spec = LossSpec::default();
    let e = expected(&spec, &c);
    check(&spec, &c, &e, Chunking::Rows(5), "panels");
}

#[test]
fn ignore_index_row_means_and_reductions() {
    let mut c = Case::<f32>::random(3, 3, 7, 11, 97, true);
    let mut labels = c.ids.clone();
    for i in [1usize, 2, 5, 9, 10, 11] {
        labels[i] = -100;
    }
    labels[14..21].fill(-100); // an all-ignored sample
    c.labels = Some(labels);
    for row_mean in [RowMean::AllPositions, RowMean::ValidTokens] {
        for reduction in [Reduction::Mean, Reduction::WeightedMean, Reduction::Sum] {
            let spec = LossSpec::builder()
                .keywords([c.ids[0], c.ids[0], c.ids[4]])
                .row_mean(row_mean)
                .reduction(reduction)
                .grad_scale(-0.75)
                .build()
                .unwrap();
            all_chunkings(&spec, &c, "ignore_index");
        }
    }
}

#[test]
fn every_target_ignored_gives_zero_loss_and_gradients() {
    let mut c = Case::<f32>::random(4, 2, 3, 5, 9, true);
    c.labels = Some(vec![-100; 6]);
    let spec = LossSpec::builder().row_mean(RowMean::ValidTokens).build().unwrap();
    let (out, dh, dw, db) = check(&spec, &c, &expected(&spec, &c), Chunking::Auto, "all ignored");
    // no chunk ran, and none is reported (it said chunks of 1 row, and their buffers)
    assert_eq!((out.loss.loss, out.chunks, out.chunk_rows, out.scratch_bytes), (0.0, 0, 0, 0));
    assert!(dh.iter().chain(&dw).chain(&db).all(|&x| x == 0.0));
}

#[test]
fn chunk_size_is_reported() {
    let c = Case::<f32>::random(5, 4, 8, 16, 300, false);
    let spec = LossSpec::default();
    let run = |ch| spec.linear_loss_and_grad(c.shape, c.inputs(), c.tokens(), LinearGrads::new(), ch).unwrap();
    // 4 samples x 7 targets: the last position of each sample needs no matrix work
    let out = run(Chunking::Rows(5));
    assert_eq!((out.chunk_rows, out.chunks), (5, 6));
    let out = run(Chunking::Rows(1000));
    assert_eq!((out.chunk_rows, out.chunks), (28, 1));
    // per row: 4 V bytes of logits + 12 H of hidden (gathered, column-major) and its gradient
    // + 4 per row of W's panel (here all 300 rows) for the column-major panel of logits = 2592;
    // 10 rows fit in 25_920. Held: the hidden rows and the logits for 10 rows, the column-major
    // hidden rows and logits panel for 16 (the chunk rounded up to 16), no d hidden
    let out = run(Chunking::Budget(25_920));
    assert_eq!((out.chunk_rows, out.chunks), (10, 3));
    assert_eq!(out.scratch_bytes, 10 * (4 * 16 + 4 * 300) + 16 * (4 * 16 + 4 * 300));
    assert_eq!(run(Chunking::Budget(1)).chunk_rows, 1, "at least one row");
}

#[test]
fn auto_chunking_gives_the_same_bits_on_any_thread_count() {
    // the default budget does not scale with the pool (it did: 12 MiB per thread changed the
    // chunks, and the order in which d W and d b add them up, with the thread count)
    let c = Case::<f32>::random(9, 8, 256, 64, 8000, true);
    let spec = LossSpec::builder().keywords([2i64]).build().unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let s = c.shape;
            let (mut dh, mut dw, mut db) =
                (vec![0f32; s.hidden_len()], vec![0f32; s.weight_len()], vec![0f32; s.vocab()]);
            let grads =
                LinearGrads::new().hidden(Grad::Into(&mut dh)).weight(Grad::Into(&mut dw)).bias(Grad::Into(&mut db));
            let out = spec.linear_loss_and_grad(s, c.inputs(), c.tokens(), grads, Chunking::Auto).unwrap();
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            (out.loss.loss.to_bits(), out.chunk_rows, bits(&dh), bits(&dw), bits(&db))
        })
    };
    let one = run(1);
    assert!(one.1 < 2048, "the case spans several chunks ({} rows each)", one.1);
    for threads in [2, 3] {
        assert!(run(threads) == one, "{threads} threads differ from one");
    }
}

#[test]
fn products_as_tasks_or_on_the_whole_pool_give_the_same_bits() {
    // pools of two threads run each product on one thread, as tasks beside each other; pools of
    // one or of three and more run each product on all of them: the bits must not tell. Shapes
    // where the GEMM crate changes its method: odd panels (H = 513, V = 4999), a panel of one
    // row (V = 2049 at H = 512: its second half is empty), chunks of one row (a product of one
    // row is a matrix-vector product there), products of at most 64 x 64 (other blocks of the
    // inner sum), half panels of one row (V = 2), V = 1
    fn case<L: Logit>(h: usize, v: usize, chunkings: &[Chunking], with_bias: bool) {
        let c = Case::<L>::random(31, 3, 40, h, v, with_bias);
        let spec = LossSpec::builder().keywords([0i64]).build().unwrap();
        for &ch in chunkings {
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let s = c.shape;
                    let (mut dh, mut dw, mut db) = (
                        vec![L::from_f32(f32::NAN); s.hidden_len()],
                        vec![L::from_f32(f32::NAN); s.weight_len()],
                        vec![L::from_f32(f32::NAN); s.vocab()],
                    );
                    let mut grads = LinearGrads::new().hidden(Grad::Into(&mut dh)).weight(Grad::Into(&mut dw));
                    if with_bias {
                        grads = grads.bias(Grad::Into(&mut db));
                    }
                    let out = spec.linear_loss_and_grad(s, c.inputs(), c.tokens(), grads, ch).unwrap();
                    let bits = |x: &[L]| x.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
                    (out.loss.loss.to_bits(), bits(&dh), bits(&dw), bits(&db))
                })
            };
            let pooled = run(3);
            assert!(pooled.2.iter().all(|&b| !f32::from_bits(b).is_nan()), "every entry of d W written");
            for threads in [1, 2, 4] {
                let what = format!("{} H {h} V {v} {ch:?} bias {with_bias}", L::DTYPE);
                assert!(run(threads) == pooled, "{what}: {threads} threads differ from 3");
            }
        }
    }
    let odd = [Chunking::Rows(17), Chunking::Rows(64), Chunking::Auto];
    for with_bias in [false, true] {
        case::<f32>(513, 4999, &odd, with_bias);
        case::<bf16>(513, 4999, &odd, with_bias);
    }
    case::<f32>(512, 2049, &[Chunking::Rows(1), Chunking::Rows(40)], true);
    case::<bf16>(512, 2049, &[Chunking::Rows(40)], false);
    case::<f32>(1000, 100, &[Chunking::Rows(20), Chunking::Rows(119)], false);
    case::<f32>(32, 100, &[Chunking::Rows(1000), Chunking::Rows(3)], false);
    case::<f32>(16, 2, &[Chunking::Rows(5), Chunking::Rows(1)], true);
    case::<f32>(8, 1, &[Chunking::Rows(7)], false);
}

#[test]
fn reruns_are_bit_identical() {
    fn twice<L: Logit>(c: &Case<L>) {
        let spec = LossSpec::builder().keywords([2i64]).build().unwrap();
        let run = || {
            let s = c.shape;
            let (mut dh, mut dw, mut db) =
                (vec![L::default(); s.hidden_len()], vec![L::default(); s.weight_len()], vec![L::default(); s.vocab()]);
            let grads =
                LinearGrads::new().hidden(Grad::Into(&mut dh)).weight(Grad::Into(&mut dw)).bias(Grad::Into(&mut db));
            let out = spec.linear_loss_and_grad(s, c.inputs(), c.tokens(), grads, Chunking::Rows(37)).unwrap();
            let bits = |x: &[L]| x.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
            (out, bits(&dh), bits(&dw), bits(&db))
        };
        assert!(run() == run(), "{}: reruns differ", L::DTYPE);
    }
    twice(&Case::<f32>::random(8, 4, 50, 96, 3000, true));
    twice(&Case::<bf16>::random(8, 4, 50, 96, 3000, true));
}

#[test]
fn agrees_with_the_logits_path() {
    // the same spec through the logits path, on the logits materialised
    let c = Case::<f32>::random(9, 2, 6, 24, 130, true);
    let spec = LossSpec::builder().keywords([c.ids[1]]).build().unwrap();
    let e = expected(&spec, &c);
    let (out, ..) = check(&spec, &c, &e, Chunking::Rows(4), "vs logits path");
    let full = spec.loss_and_grad(c.shape.tokens(), &e.logits, c.tokens(), Grad::Skip).unwrap();
    assert!(common::rel(out.loss.loss, full.loss) <= 1e-6, "{} vs {}", out.loss.loss, full.loss);
    assert_eq!(out.loss.weights, full.weights);
    assert_eq!(out.loss.valid_tokens, full.valid_tokens);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let c = Case::<f32>::random(11, 2, 3, 4, 10, true);
    let spec = LossSpec::default();
    let s = c.shape;
    assert!(matches!(LinearShape::new(2, 3, 0, 10), Err(Error::EmptyHidden)));
    assert!(matches!(LinearShape::new(2, 1, 4, 10), Err(Error::SequenceTooShort { .. })));
    let short = &c.hidden[1..];
    let r = spec.linear_loss_and_grad(
        s,
        fused_weighted_loss::LinearInputs::new(short, &c.weight),
        c.tokens(),
        LinearGrads::new(),
        Chunking::Auto,
    );
    assert!(matches!(r, Err(Error::LengthMismatch { what: "hidden", .. })), "{r:?}");
    let r = spec.linear_loss_and_grad(
        s,
        fused_weighted_loss::LinearInputs::new(&c.hidden, &c.weight[2..]),
        c.tokens(),
        LinearGrads::new(),
        Chunking::Auto,
    );
    assert!(matches!(r, Err(Error::LengthMismatch { what: "weight", .. })), "{r:?}");
    let r = spec.linear_loss_and_grad(s, c.inputs(), c.tokens(), LinearGrads::new(), Chunking::Rows(0));
    assert!(matches!(r, Err(Error::InvalidChunking(_))), "{r:?}");
    let mut dw = vec![7f32; s.weight_len() + 1];
    let r = spec.linear_loss_and_grad(
        s,
        c.inputs(),
        c.tokens(),
        LinearGrads::new().weight(Grad::Into(&mut dw)),
        Chunking::Auto,
    );
    assert!(matches!(r, Err(Error::LengthMismatch { what: "d weight", .. })), "{r:?}");
    assert!(dw.iter().all(|&x| x == 7.0), "nothing written on error");
    let mut db = vec![0f32; s.vocab()];
    let no_bias = fused_weighted_loss::LinearInputs::new(&c.hidden, &c.weight);
    let r =
        spec.linear_loss_and_grad(s, no_bias, c.tokens(), LinearGrads::new().bias(Grad::Into(&mut db)), Chunking::Auto);
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let bad_ids = vec![0i64, 1, 2, 3, 4, 10];
    let r = spec.linear_loss_and_grad(
        s,
        c.inputs(),
        fused_weighted_loss::Tokens::new(&bad_ids),
        LinearGrads::new(),
        Chunking::Auto,
    );
    assert!(matches!(r, Err(Error::IdOutOfRange { value: 10, .. })), "{r:?}");
}
