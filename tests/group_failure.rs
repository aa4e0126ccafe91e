//! A rank of a sharded call that fails on an error of its own before the call's first exchange
//! (its sample weights beyond f64, its ids, labels or token weights invalid, a buffer of the
//! wrong length, no samples beside such a peer) fails every rank of its data and vocabulary
//! groups: itself with its own error, the others with `Error::PeerFailed`, and then every rank
//! makes the next call in step. The ranks are threads whose exchanges wait as NCCL's or gloo's
//! do (a rank that returned is waited for forever), each call under a timeout: a rank left
//! waiting fails the test instead of hanging it.

#[path = "common/shards.rs"]
mod shards;

use fused_weighted_loss::parallel::{Sharded, VocabSlice};
use fused_weighted_loss::synthetic;
use fused_weighted_loss::{
    Chunking, Error, Grad, LinearGrads, LinearInputs, LinearShape, LossOutput, LossSpec, Reduction, Result, Shape,
    Tokens,
};
use shards::{columns, run_grid_or_hang, ThreadGroup};
use std::time::Duration;

const T: usize = 6;
const V: usize = 16;
const H: usize = 4;
/// A keyword of weight 1e308: a sample that holds it twice weighs `1 + 2e308`, beyond f64.
const KEY: i64 = 3;
/// Far beyond what these calls take (milliseconds) on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

/// How a rank's inputs go wrong in the first call (the second call has none of them).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    None,
    /// A sample holds the keyword twice: its weight overflows (`plan`).
    WeightOverflow,
    /// An id outside the vocabulary.
    IdOutOfRange,
    /// A label outside the vocabulary (not `ignore_index`).
    LabelOutOfRange,
    /// A NaN token weight.
    TokenWeightNan,
    /// One logit (or, fused linear, one weight row element) short.
    ShortLogits,
    /// The gradient buffer (fused linear: `d weight`) one element short.
    ShortGrad,
    /// No samples this step (`Shape::without_samples`): not a fault by itself.
    NoSamples,
    /// One sample fewer than the rank's vocabulary-group peers hold.
    FewerSamples,
    /// The same rows as its peers' samples, as twice the samples of half their length.
    OtherSeq,
    /// Other loss options than its peers' (label smoothing on): not a fault of its own.
    OtherOptions,
    /// Another chunking than its peers' (rows per exchange): not a fault of its own.
    OtherChunking,
    /// One id other than its vocabulary-group peers' (in range): not a fault of its own.
    OtherIds,
    /// Hidden states (and weight rows) one wider than its peers' (fused linear): not a fault of
    /// its own.
    OtherHidden,
    /// Another label and token weight than its peers' at each sample's position 0, which is
    /// never a target: the same call as theirs, not a fault at all.
    OtherFirstLabels,
}

fn spec(reduction: Reduction) -> LossSpec {
    LossSpec::builder().weighted_keywords([(KEY, 1e308)]).reduction(reduction).build().unwrap()
}

/// The samples of data rank `d` (the same on every rank of its vocabulary group): `b` of them,
/// with `fault` in them; the logits, hidden states and weight of the whole vocabulary.
struct Samples {
    b: usize,
    t: usize,
    /// The hidden size.
    h: usize,
    ids: Vec<i64>,
    labels: Vec<i64>,
    token_weights: Vec<f32>,
    logits: Vec<f32>,
    hidden: Vec<f32>,
    weight: Vec<f32>,
}

impl Samples {
    fn new(d: usize, b: usize, fault: Fault) -> Samples {
        let (b, t) = match fault {
            Fault::NoSamples => (0, T),
            Fault::FewerSamples => (b - 1, T),
            Fault::OtherSeq => (2 * b, T / 2),
            _ => (b, T),
        };
        let rows = b * t;
        let seed = d as u64 + 1;
        // (no sample holds the keyword unless the fault puts it there)
        let mut ids: Vec<i64> =
            synthetic::ids::<i64>(seed, rows, V).into_iter().map(|x| if x == KEY { KEY + 1 } else { x }).collect();
        let mut labels = ids.clone();
        let mut token_weights = vec![1.0f32; rows];
        match fault {
            Fault::WeightOverflow => (ids[0], ids[1]) = (KEY, KEY),
            Fault::IdOutOfRange => ids[2] = V as i64,
            Fault::LabelOutOfRange => labels[3] = -5,
            Fault::TokenWeightNan => token_weights[4] = f32::NAN,
            Fault::OtherIds => ids[5] = if ids[5] + 1 == KEY || ids[5] + 1 == V as i64 { 0 } else { ids[5] + 1 },
            Fault::OtherFirstLabels => {
                for s in 0..b {
                    labels[s * t] = (labels[s * t] + 1) % V as i64;
                    token_weights[s * t] = 7.5;
                }
            }
            _ => {}
        }
        let h = if fault == Fault::OtherHidden { H + 1 } else { H };
        Samples {
            b,
            t,
            h,
            ids,
            labels,
            token_weights,
            logits: synthetic::logits::<f32>(seed, rows * V, 2.0),
            hidden: synthetic::logits::<f32>(seed ^ 5, rows * h, 1.0),
            weight: synthetic::logits::<f32>(7, V * h, 0.5),
        }
    }

    fn tokens(&self) -> Tokens<'_, i64> {
        Tokens::new(&self.ids).with_labels(&self.labels).with_token_weights(&self.token_weights)
    }

    fn shape(&self) -> Shape {
        if self.b == 0 {
            Shape::without_samples(self.t, V).unwrap()
        } else {
            Shape::new(self.b, self.t, V).unwrap()
        }
    }

    /// The logits call of the rank that holds `slice`, with a gradient when `grad`.
    fn logits_call(
        &self,
        call: Sharded<'_>,
        spec: &LossSpec,
        slice: VocabSlice,
        fault: Fault,
        grad: bool,
    ) -> Result<f64> {
        let mut local = columns(&self.logits, V, slice);
        if fault == Fault::ShortLogits {
            local.pop();
        }
        let n = self.b * self.t * slice.len();
        let mut g = vec![0f32; if fault == Fault::ShortGrad { n - 1 } else { n }];
        let dest = if grad { Grad::Into(&mut g) } else { Grad::Skip };
        call.loss_and_grad(spec, self.shape(), &local, self.tokens(), dest).map(|o: LossOutput| o.loss)
    }

    /// The fused linear call of the rank that holds `slice` of the weight's rows (`d weight` and
    /// `d hidden` asked for).
    fn linear_call(
        &self,
        call: Sharded<'_>,
        spec: &LossSpec,
        slice: VocabSlice,
        fault: Fault,
        chunking: Chunking,
    ) -> Result<f64> {
        let h = self.h;
        let shape = if self.b == 0 {
            LinearShape::without_samples(self.t, h, V).unwrap()
        } else {
            LinearShape::new(self.b, self.t, h, V).unwrap()
        };
        let mut w = self.weight[slice.start() * h..slice.end() * h].to_vec();
        if fault == Fault::ShortLogits {
            w.pop();
        }
        let n = slice.len() * h;
        let mut dw = vec![0f32; if fault == Fault::ShortGrad { n - 1 } else { n }];
        let mut dh = vec![0f32; self.hidden.len()];
        let grads = LinearGrads::new().weight(Grad::Into(&mut dw)).hidden(Grad::Into(&mut dh));
        let inputs = LinearInputs::new(&self.hidden, &w);
        call.linear_loss_and_grad(spec, shape, inputs, self.tokens(), grads, chunking).map(|o| o.loss.loss)
    }
}

/// Which call a test makes.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// Loss only.
    Loss,
    /// Loss and gradient, one row per exchange (the pipelined chunk loop on a vocabulary group).
    Grad,
    /// The fused linear split.
    Linear,
}

/// Runs two calls on a `data × vocab` grid (a data group alone: `vocab` 1, the single-device
/// pass; a vocabulary group alone: `data` 1): the first with `fault(d, v)` on rank `(d, v)`, the
/// second with none. Every rank must have answered both (none left waiting); returns the first
/// call's results in rank order (`d * vocab + v`) after checking that the second gave every
/// rank the same loss.
fn two_calls(
    data: usize,
    vocab: usize,
    reduction: Reduction,
    path: Path,
    fault: impl Fn(usize, usize) -> Fault + Send + Sync + 'static,
) -> Vec<Result<f64>> {
    let spec = spec(reduction);
    let outs = run_grid_or_hang(data, vocab, 2, WAIT, move |call, d, v, vg: &ThreadGroup, dg: &ThreadGroup| {
        let fault = if call == 0 { fault(d, v) } else { Fault::None };
        let samples = Samples::new(d, 2 + d, fault);
        let slice = VocabSlice::even(v, vocab, V).unwrap();
        let other = fault == Fault::OtherChunking;
        let sharded = Sharded::vocab_parallel(slice, vg).with_data_group(dg).with_chunk_rows(if other { 2 } else { 1 });
        let spec = match fault {
            Fault::OtherOptions => spec.to_builder().label_smoothing(0.1).build().unwrap(),
            _ => spec.clone(),
        };
        match path {
            Path::Loss => samples.logits_call(sharded, &spec, slice, fault, false),
            Path::Grad => samples.logits_call(sharded, &spec, slice, fault, true),
            Path::Linear => {
                samples.linear_call(sharded, &spec, slice, fault, Chunking::Rows(if other { 3 } else { 2 }))
            }
        }
    });
    let what = format!("{data} x {vocab} ranks, {path:?}, {reduction:?}");
    let mut first = Vec::new();
    let mut second = Vec::new();
    for (r, o) in outs.into_iter().enumerate() {
        let Some(mut calls) = o else {
            panic!("{what}: rank {r} did not finish its two calls within {WAIT:?}: left waiting in an exchange");
        };
        second.push(calls.pop().unwrap());
        first.push(calls.pop().unwrap());
    }
    let loss0 = second[0].as_ref().unwrap_or_else(|e| panic!("{what}: the second call failed: {e}"));
    for (r, s) in second.iter().enumerate() {
        assert_eq!(s.as_ref().map(|l| l.to_bits()), Ok(loss0.to_bits()), "{what}: rank {r}'s second call");
    }
    first
}

/// Which error a rank reports.
type ErrorKind = fn(&Error) -> bool;

fn is_overflow(e: &Error) -> bool {
    matches!(e, Error::InvalidOption { name: "alpha and the keyword weights", value, .. } if value.is_infinite())
}

/// Asserts that `failed` ranks report their own error (`own`) and every other rank a peer's
/// failure (`peer`: the group and rank it names).
fn assert_group_failed(
    got: &[Result<f64>],
    what: &str,
    failed: impl Fn(usize) -> bool,
    own: impl Fn(&Error) -> bool,
    peer: impl Fn(usize) -> (&'static str, usize),
) {
    for (r, g) in got.iter().enumerate() {
        if failed(r) {
            assert!(matches!(g, Err(e) if own(e)), "{what}: rank {r} (its own error): {got:?}");
        } else {
            let (group, rank) = peer(r);
            assert_eq!(g, &Err(Error::PeerFailed { group, rank }), "{what}: rank {r} (a peer's failure): {got:?}");
        }
    }
}

/// The reported defect: a data-parallel rank whose own sample weights overflow returned its error
/// at once (while planning), and its peers waited for it in the exchange of the batch totals.
#[test]
fn sample_weights_that_overflow_on_one_data_rank_fail_every_rank() {
    for path in [Path::Loss, Path::Grad, Path::Linear] {
        for reduction in [Reduction::Mean, Reduction::WeightedMean, Reduction::Sum] {
            let got = two_calls(3, 1, reduction, path, |d, _| if d == 1 { Fault::WeightOverflow } else { Fault::None });
            let what = format!("data group of 3, {path:?}, {reduction:?}");
            assert_group_failed(&got, &what, |r| r == 1, is_overflow, |_| ("data", 1));
        }
    }
}

/// Every kind of rank-local input error, on one data rank of a 2 x 2 grid (both ranks of its
/// vocabulary group hold the same samples, so both find it): the other data row learns it in the
/// data group's exchange.
#[test]
fn a_data_row_of_a_grid_with_bad_tokens_fails_every_rank() {
    let kinds: [(Fault, ErrorKind); 4] = [
        (Fault::WeightOverflow, is_overflow),
        (Fault::IdOutOfRange, |e| matches!(e, Error::IdOutOfRange { what: "ids", .. })),
        (Fault::LabelOutOfRange, |e| matches!(e, Error::IdOutOfRange { what: "labels", value: -5, .. })),
        (Fault::TokenWeightNan, |e| matches!(e, Error::InvalidTokenWeight { .. })),
    ];
    for path in [Path::Loss, Path::Grad, Path::Linear] {
        for (fault, own) in kinds {
            let got =
                two_calls(2, 2, Reduction::WeightedMean, path, move |d, _| if d == 0 { fault } else { Fault::None });
            let what = format!("2 x 2 grid, {fault:?} on data row 0, {path:?}");
            // ranks (0, 0), (0, 1) fail; (1, v) hears it from (0, v) in its data group
            assert_group_failed(&got, &what, |r| r < 2, own, |_| ("data", 0));
        }
    }
}

/// An error only one rank of a grid sees (a buffer of its own of the wrong length): its
/// vocabulary group learns it in the first exchange, its data group in the second, and the rank
/// diagonal to it from its own data group, whose other rank learnt it from the vocabulary group.
#[test]
fn one_rank_of_a_grid_with_a_short_buffer_fails_all_four() {
    for path in [Path::Loss, Path::Grad, Path::Linear] {
        for fault in [Fault::ShortLogits, Fault::ShortGrad] {
            if matches!((path, fault), (Path::Loss, Fault::ShortGrad)) {
                continue; // no gradient buffer
            }
            let got =
                two_calls(2, 2, Reduction::Mean, path, move |d, v| if (d, v) == (0, 0) { fault } else { Fault::None });
            let what = format!("2 x 2 grid, {fault:?} on rank (0, 0), {path:?}");
            let own = |e: &Error| {
                matches!(e, Error::LengthMismatch { .. } | Error::GradLength { .. } | Error::ShapeMismatch { .. })
            };
            // (0, 1): vocabulary rank 0; (1, 0): data rank 0; (1, 1): data rank 0, i.e. (0, 1)
            let peer = |r| if r == 1 { ("vocabulary", 0) } else { ("data", 0) };
            assert_group_failed(&got, &what, |r| r == 0, own, peer);
        }
    }
}

/// A vocabulary group alone: a rank whose own buffer is wrong fails, the others hear it in the
/// exchange of the slices.
#[test]
fn one_rank_of_a_vocabulary_group_with_a_short_buffer_fails_every_rank() {
    for path in [Path::Loss, Path::Grad, Path::Linear] {
        let got = two_calls(1, 3, Reduction::Mean, path, |_, v| if v == 2 { Fault::ShortLogits } else { Fault::None });
        let own = |e: &Error| matches!(e, Error::LengthMismatch { .. } | Error::ShapeMismatch { .. });
        assert_group_failed(&got, &format!("vocabulary group of 3, {path:?}"), |r| r == 2, own, |_| ("vocabulary", 2));
    }
}

/// A rank without samples beside a rank that fails: it fails too (it joins the same exchanges).
#[test]
fn a_rank_without_samples_fails_with_its_failing_peer() {
    for path in [Path::Loss, Path::Grad, Path::Linear] {
        let fault = |d: usize, _| match d {
            0 => Fault::NoSamples,
            1 => Fault::WeightOverflow,
            _ => Fault::None,
        };
        let got = two_calls(3, 1, Reduction::WeightedMean, path, fault);
        assert_group_failed(&got, &format!("data group of 3, {path:?}"), |r| r == 1, is_overflow, |_| ("data", 1));
        // and on a grid, whose empty data row also joins its vocabulary group's exchange
        let got = two_calls(2, 2, Reduction::WeightedMean, path, fault);
        assert_group_failed(&got, &format!("2 x 2 grid, {path:?}"), |r| r >= 2, is_overflow, |_| ("data", 1));
    }
}

/// Every rank's own sample weights finite, their sum over the data group not, with a rank
/// without samples: under the weighted mean every rank fails alike, the empty one included (it
/// took its peers' denominator to be fine and waited for them in the exchange of the loss).
#[test]
fn a_rank_without_samples_fails_with_a_group_whose_weight_sum_overflows() {
    for (data, vocab) in [(3, 1), (3, 2)] {
        let spec = LossSpec::builder().alpha(1e308).reduction(Reduction::WeightedMean).build().unwrap();
        let outs = run_grid_or_hang(data, vocab, 1, WAIT, move |_, d, v, vg, dg| {
            let samples = Samples::new(d, 1, if d == 0 { Fault::NoSamples } else { Fault::None });
            let slice = VocabSlice::even(v, vocab, V).unwrap();
            let sharded = Sharded::vocab_parallel(slice, vg).with_data_group(dg);
            samples.logits_call(sharded, &spec, slice, Fault::None, false)
        });
        for (r, o) in outs.iter().enumerate() {
            let got = o.as_ref().unwrap_or_else(|| panic!("{data} x {vocab}: rank {r} left waiting in an exchange"));
            assert!(matches!(&got[0], Err(e) if is_overflow(e)), "{data} x {vocab}: rank {r}: {got:?}");
        }
    }
}

/// The reported defect: ranks of one vocabulary group called with tokens of different shapes (a
/// sample fewer, the same rows as samples of another length, no samples beside samples) cut
/// different chunks, so their later exchanges differed in number or length (a hang or an abort
/// with NCCL or gloo; the same rows in another `[B, T]`, a wrong loss). The group's first
/// exchange carries every rank's `[B, T]`: every rank of the group fails alike, naming the first
/// rank whose shape is not rank 0's, and on a grid the other data row hears it from its data
/// group; then every rank makes the next call in step.
#[test]
fn ranks_of_a_vocabulary_group_with_different_shapes_fail_every_rank() {
    // (fault, rank of the vocabulary group that has it, rank 0's [B, T], that rank's)
    let cases = [
        (Fault::FewerSamples, 1, [2, T], [1, T]),
        (Fault::FewerSamples, 0, [1, T], [2, T]),
        (Fault::OtherSeq, 1, [2, T], [4, T / 2]),
        (Fault::NoSamples, 1, [2, T], [0, T]),
    ];
    for path in [Path::Loss, Path::Grad, Path::Linear] {
        for (fault, odd, expected, got_shape) in cases {
            let mismatch = Error::GroupShapeMismatch { rank: if odd == 0 { 1 } else { odd }, expected, got: got_shape };
            // a vocabulary group alone, of 2 and of 3 ranks (a rank without samples needs a data
            // group: alone, its call is an error of its own, EmptyBatch, told to its peers)
            for vocab in [2, 3] {
                if fault == Fault::NoSamples {
                    continue;
                }
                let got =
                    two_calls(1, vocab, Reduction::Mean, path, move |_, v| if v == odd { fault } else { Fault::None });
                let what = format!("vocabulary group of {vocab}, {fault:?} on rank {odd}, {path:?}");
                for (r, g) in got.iter().enumerate() {
                    assert_eq!(g, &Err(mismatch.clone()), "{what}: rank {r}: {got:?}");
                }
            }
            // a 2 x 2 grid, the fault on rank (0, odd): vocabulary row 0 fails alike, row 1 hears
            // it from its data groups
            let got =
                two_calls(
                    2,
                    2,
                    Reduction::WeightedMean,
                    path,
                    move |d, v| {
                        if (d, v) == (0, odd) {
                            fault
                        } else {
                            Fault::None
                        }
                    },
                );
            let what = format!("2 x 2 grid, {fault:?} on rank (0, {odd}), {path:?}");
            assert_group_failed(&got, &what, |r| r < 2, |e| e == &mismatch, |_| ("data", 0));
        }
    }
}

/// Ranks of one group that make different calls: other loss options (label smoothing on one
/// rank: its exchanges carry another number of words per row), another chunking (another number
/// of exchanges), other ids in a vocabulary group (silently other losses), another hidden size on
/// the fused linear path (other chunks under a memory budget). The first exchanges
/// carry a digest of each: every rank of the group fails alike, naming the first rank whose
/// call differs and what differs, and on a grid the other data row hears it from its data
/// group; then every rank makes the next call in step. A data group's ranks may chunk their
/// (unshared) rows as they like.
#[test]
fn ranks_of_a_group_that_make_different_calls_fail_every_rank() {
    let parts = [
        (Fault::OtherOptions, "loss options or vocabulary size"),
        (Fault::OtherChunking, "call or its chunking (rows per exchange)"),
        (Fault::OtherIds, "ids, labels or token weights"),
        (Fault::OtherHidden, "call or its chunking (rows per exchange)"),
    ];
    for path in [Path::Loss, Path::Grad, Path::Linear] {
        for (fault, what) in parts {
            if fault == Fault::OtherHidden && !matches!(path, Path::Linear) {
                continue; // (the logits paths have no hidden states)
            }
            for (vocab, odd) in [(2, 0), (2, 1), (3, 2)] {
                let mismatch = Error::GroupCallMismatch { group: "vocabulary", rank: odd.max(1), what };
                let got =
                    two_calls(1, vocab, Reduction::Mean, path, move |_, v| if v == odd { fault } else { Fault::None });
                let desc = format!("vocabulary group of {vocab}, {fault:?} on rank {odd}, {path:?}");
                for (r, g) in got.iter().enumerate() {
                    assert_eq!(g, &Err(mismatch.clone()), "{desc}: rank {r}: {got:?}");
                }
            }
            // a 2 x 2 grid, the call of rank (0, 1) differs: vocabulary row 0 fails alike, row 1
            // hears it from its data groups
            let mismatch = Error::GroupCallMismatch { group: "vocabulary", rank: 1, what };
            let got =
                two_calls(
                    2,
                    2,
                    Reduction::WeightedMean,
                    path,
                    move |d, v| {
                        if (d, v) == (0, 1) {
                            fault
                        } else {
                            Fault::None
                        }
                    },
                );
            let desc = format!("2 x 2 grid, {fault:?} on rank (0, 1), {path:?}");
            assert_group_failed(&got, &desc, |r| r < 2, |e| e == &mismatch, |_| ("data", 0));
            // a data group alone: other options fail every rank alike; another chunking or other
            // ids are no fault there (each rank's samples are its own)
            for odd in [0, 2] {
                let got = two_calls(
                    3,
                    1,
                    Reduction::WeightedMean,
                    path,
                    move |d, _| {
                        if d == odd {
                            fault
                        } else {
                            Fault::None
                        }
                    },
                );
                let desc = format!("data group of 3, {fault:?} on rank {odd}, {path:?}");
                if fault == Fault::OtherHidden {
                    continue; // (each rank's own whole weight: nothing shared to compare)
                }
                if fault == Fault::OtherOptions {
                    let mismatch = Error::GroupCallMismatch { group: "data", rank: odd.max(1), what };
                    for (r, g) in got.iter().enumerate() {
                        assert_eq!(g, &Err(mismatch.clone()), "{desc}: rank {r}: {got:?}");
                    }
                } else {
                    let first = got[0].as_ref().unwrap_or_else(|e| panic!("{desc}: rank 0: {e}"));
                    for (r, g) in got.iter().enumerate() {
                        assert_eq!(g.as_ref().map(|l| l.to_bits()), Ok(first.to_bits()), "{desc}: rank {r}");
                    }
                }
            }
        }
    }
}

/// Ranks whose labels and token weights differ only at each sample's position 0 (never a
/// target) make the same call: no `GroupCallMismatch`, and the loss every rank of the group
/// returns is the one of a call where they do not differ at all.
#[test]
fn labels_that_differ_only_where_no_target_is_are_the_same_call() {
    for path in [Path::Loss, Path::Grad, Path::Linear] {
        for (data, vocab, odd) in [(1, 2, 1), (1, 3, 0), (2, 2, 3)] {
            let reduction = Reduction::WeightedMean;
            let desc = format!("{data} x {vocab} ranks, position 0 other on rank {odd}, {path:?}");
            let ranks =
                move |d: usize, v: usize| if d * vocab + v == odd { Fault::OtherFirstLabels } else { Fault::None };
            let got = two_calls(data, vocab, reduction, path, ranks);
            let plain = two_calls(data, vocab, reduction, path, |_, _| Fault::None);
            for (r, (g, p)) in got.iter().zip(&plain).enumerate() {
                let p = p.as_ref().unwrap_or_else(|e| panic!("{desc}: rank {r} without the difference: {e}"));
                assert_eq!(g.as_ref().map(|l| l.to_bits()), Ok(p.to_bits()), "{desc}: rank {r}");
            }
        }
    }
}

/// A caller that fails before it can make its call (a binding's own checks of its tensors)
/// fails its groups through `Sharded::fail_with`: its peers' calls return `PeerFailed` instead
/// of waiting for it, and every rank makes the next call in step.
#[test]
fn a_rank_that_fails_before_its_call_fails_every_rank() {
    for path in [Path::Loss, Path::Grad, Path::Linear] {
        for (data, vocab) in [(1, 3), (3, 1), (2, 2)] {
            let spec = spec(Reduction::Mean);
            let outs = run_grid_or_hang(data, vocab, 2, WAIT, move |call, d, v, vg: &ThreadGroup, dg: &ThreadGroup| {
                let samples = Samples::new(d, 2 + d, Fault::None);
                let slice = VocabSlice::even(v, vocab, V).unwrap();
                let sharded = Sharded::vocab_parallel(slice, vg).with_data_group(dg).with_chunk_rows(1);
                if call == 0 && (d, v) == (data - 1, vocab - 1) {
                    return Err(sharded.fail_with(Error::EmptyHidden));
                }
                match path {
                    Path::Loss => samples.logits_call(sharded, &spec, slice, Fault::None, false),
                    Path::Grad => samples.logits_call(sharded, &spec, slice, Fault::None, true),
                    Path::Linear => samples.linear_call(sharded, &spec, slice, Fault::None, Chunking::Rows(2)),
                }
            });
            let what = format!("{data} x {vocab}, {path:?}");
            let last = data * vocab - 1;
            let mut first = Vec::new();
            for (r, o) in outs.into_iter().enumerate() {
                let calls = o.unwrap_or_else(|| panic!("{what}: rank {r} left waiting in an exchange"));
                assert!(calls[1].is_ok(), "{what}: rank {r}'s second call: {calls:?}");
                first.push(calls[0].clone());
            }
            // (the failed rank is the last of its groups: its vocabulary group hears it first)
            let peer = |r: usize| if r / vocab == data - 1 { ("vocabulary", vocab - 1) } else { ("data", data - 1) };
            assert_group_failed(&first, &what, |r| r == last, |e| e == &Error::EmptyHidden, peer);
        }
    }
}

/// A driver of the steps (`ShardedLoss`) whose rank fails before it has a `ShardedLoss` sends
/// `failed_partials` (the length of a healthy rank's partials for the same options) and
/// `FAILED_TOTALS`: its peers' merge and `set_batch_totals` return `PeerFailed`, naming it.
#[test]
fn a_steps_driver_whose_rank_failed_fails_its_peers() {
    use fused_weighted_loss::parallel::ShardedLoss;
    let shape = Shape::new(2, T, V).unwrap();
    let ok = Samples::new(0, 2, Fault::None);
    for spec in [
        spec(Reduction::WeightedMean),
        spec(Reduction::Mean).to_builder().label_smoothing(0.1).build().unwrap(),
        spec(Reduction::Sum).to_builder().softcap(20.0).build().unwrap(),
    ] {
        let slices = [VocabSlice::even(0, 2, V).unwrap(), VocabSlice::even(1, 2, V).unwrap()];
        let mut rank0 = ShardedLoss::new(&spec, shape, slices[0], ok.tokens()).unwrap();
        let rows = 0..shape.rows();
        let mut gathered = vec![0.0; rank0.partials_len(rows.len())];
        rank0.partials(rows.clone(), &columns(&ok.logits, V, slices[0]), &mut gathered).unwrap();
        let failed = ShardedLoss::failed_partials(&spec, rows.len());
        assert_eq!(failed.len(), gathered.len(), "{spec:?}: the length of a healthy rank's partials");
        gathered.extend(failed);
        let mut grad = vec![0f32; rows.len() * slices[0].len()];
        let got = rank0.finish_rows_grad(rows.clone(), &gathered, &columns(&ok.logits, V, slices[0]), &mut grad);
        assert_eq!(got, Err(Error::PeerFailed { group: "vocabulary", rank: 1 }), "{spec:?}");
        // the data group: rank 1 of three failed
        let mut data0 = ShardedLoss::new(&spec, shape, VocabSlice::full(V).unwrap(), ok.tokens()).unwrap();
        let mine = data0.batch_totals();
        let totals = [mine, ShardedLoss::FAILED_TOTALS, mine].concat();
        assert_eq!(data0.set_batch_totals(&totals), Err(Error::PeerFailed { group: "data", rank: 1 }), "{spec:?}");
    }
}

/// The steps on a 2 × 2 grid, driven as their docs say: rank (0, 0) fails before it has a
/// `ShardedLoss` and sends the failed words in both of its groups' first exchanges; rank (1, 0)
/// hears of it from its data group's totals and passes it on in its vocabulary exchange, so
/// that rank (1, 1), which the failed rank never told, fails too instead of waiting there; rank
/// (0, 1) hears of it in its vocabulary merge. Every rank returns, the failed one with its own
/// error, the others with `PeerFailed`.
#[test]
fn a_steps_driver_on_a_grid_passes_a_failure_on() {
    use fused_weighted_loss::parallel::Collective;
    use fused_weighted_loss::parallel::ShardedLoss;
    let got = run_grid_or_hang(2, 2, 1, WAIT, |_, d, v, vg: &ThreadGroup, dg: &ThreadGroup| -> Result<LossOutput> {
        let s = spec(Reduction::WeightedMean);
        let slice = VocabSlice::even(v, 2, V).unwrap();
        let fault = if (d, v) == (0, 0) { Fault::IdOutOfRange } else { Fault::None };
        let samples = Samples::new(d, 2, fault);
        let shape = Shape::new(samples.b, samples.t, V).unwrap();
        let rows = 0..shape.rows();
        // the failed words in both first exchanges, then this rank's own error
        let fail = |e: Error| -> Result<LossOutput> {
            let mut totals = vec![0.0; 2 * dg.size()];
            dg.all_gather_f64(&ShardedLoss::FAILED_TOTALS, &mut totals)?;
            let words = ShardedLoss::failed_partials(&s, rows.len());
            let mut gathered = vec![0.0; words.len() * vg.size()];
            vg.all_gather_f64(&words, &mut gathered)?;
            Err(e)
        };
        let mut st = match ShardedLoss::new(&s, shape, slice, samples.tokens()) {
            Ok(st) => st,
            Err(e) => return fail(e),
        };
        let mut totals = vec![0.0; 2 * dg.size()];
        dg.all_gather_f64(&st.batch_totals(), &mut totals)?;
        if let Err(e) = st.set_batch_totals(&totals) {
            // passed on: the vocabulary peers' merge fails too
            let words = ShardedLoss::failed_partials(&s, rows.len());
            let mut gathered = vec![0.0; words.len() * vg.size()];
            vg.all_gather_f64(&words, &mut gathered)?;
            return Err(e);
        }
        let logits = columns(&samples.logits, V, slice);
        let mut words = vec![0.0; st.partials_len(rows.len())];
        st.partials(rows.clone(), &logits, &mut words)?;
        let mut gathered = vec![0.0; words.len() * vg.size()];
        vg.all_gather_f64(&words, &mut gathered)?;
        let mut grad = vec![0f32; logits.len()];
        st.finish_rows_grad(rows, &gathered, &logits, &mut grad)?;
        let mut out = st.finish()?;
        let mut shares = vec![0.0; 2 * dg.size()];
        dg.all_gather_f64(&ShardedLoss::loss_totals(&out), &mut shares)?;
        ShardedLoss::combine_loss(&mut out, &shares)?;
        Ok(out)
    });
    let results: Vec<Result<LossOutput>> = got
        .into_iter()
        .enumerate()
        .map(|(r, g)| g.unwrap_or_else(|| panic!("rank {r} was left waiting")).pop().unwrap())
        .collect();
    assert!(matches!(results[0], Err(Error::IdOutOfRange { .. })), "{:?}", results[0]);
    assert_eq!(results[1], Err(Error::PeerFailed { group: "vocabulary", rank: 0 }));
    assert_eq!(results[2], Err(Error::PeerFailed { group: "data", rank: 0 }));
    assert_eq!(results[3], Err(Error::PeerFailed { group: "vocabulary", rank: 0 }));
}
