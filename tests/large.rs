//! B·T·V > 2^31: 64-bit offsets end to end (bf16, in place, 4.4 GB): 130 rows of 2^24 + 3, so
//! that the rows after the 2^31st element (one with a target, one without) and the row across it
//! are rows like any other, and a GPU spreads the rows over its multiprocessors. Checked against
//! float64 recomputed here: the loss (the mean of every row's), and a sample of gradient entries
//! of some rows, including those past 2^31. On the CPU also one row of 2^29 + 1 entries (its sum
//! of exponentials, over 2^15 chunks, keeps f32 accuracy).

mod common;

use common::hashed_logit as value;
use fused_weighted_loss::reference::rel_err;
use fused_weighted_loss::{bf16, Backend, LossOutput, LossSpec, Shape, Tokens};
use rayon::prelude::*;

/// Builds the >2^31-element problem, runs `compute` on it (in place) and checks the result.
fn more_than_2_pow_31(compute: impl FnOnce(&LossSpec, Shape, &mut [bf16], &[i64]) -> LossOutput) {
    let (b, t, v) = (1usize, 130usize, (1usize << 24) + 3);
    let shape = Shape::new(b, t, v).unwrap();
    assert!(shape.logits_len() > 1 << 31);
    // row t - 2 (the last with a target) starts past the 2^31st element, row t - 3 crosses it
    assert!((t - 3) * v < 1 << 31 && (t - 2) * v > 1 << 31);
    let mut logits: Vec<bf16> = Vec::new();
    if logits.try_reserve_exact(shape.logits_len()).is_err() {
        panic!("cannot allocate {} bytes for the >2^31 test", shape.logits_len() * 2);
    }
    (0..shape.logits_len()).into_par_iter().map(value).collect_into_vec(&mut logits);
    // one keyword (3) hit; targets at both ends of the vocabulary and spread between
    let mut ids: Vec<i64> = vec![3, v as i64 - 1, 0, 12345, v as i64 - 2];
    ids.extend((ids.len()..t).map(|k| ((k * 1_000_003) % v) as i64));
    assert_eq!(ids.iter().filter(|&&i| i == 3).count(), 1);
    let spec = LossSpec::builder().keywords([3]).build().unwrap();
    let out = compute(&spec, shape, &mut logits, &ids);

    let coef = 2.0 / (t - 1) as f64; // weight 1 + one hit, mean over T-1 positions, B = 1
    let losses: Vec<f64> = (0..t - 1)
        .into_par_iter()
        .map(|p| {
            let base = p * v;
            let y = ids[p + 1] as usize;
            let m = (0..v).map(|j| value(base + j).to_f64()).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = (0..v).map(|j| (value(base + j).to_f64() - m).exp()).sum();
            let lse = m + s.ln();
            if [0, 1, 2, 3, 4, t / 2, t - 3, t - 2].contains(&p) {
                // sampled gradient entries: a stride across the row, the target, and the row's end
                let mut js: Vec<usize> = (0..v).step_by(4099).collect();
                js.extend([y, v - 1, v - 2]);
                let want: Vec<f64> = js
                    .iter()
                    .map(|&j| coef * ((value(base + j).to_f64() - lse).exp() - if j == y { 1.0 } else { 0.0 }))
                    .collect();
                let got: Vec<f64> = js.iter().map(|&j| logits[base + j].to_f64()).collect();
                let e = rel_err(&got, &want);
                assert!(e <= 1.5e-2, "row {p}: gradient rel err {e:e}");
                let e = ((got[got.len() - 3] - want[want.len() - 3]) / want[want.len() - 3]).abs();
                assert!(e <= 1e-2, "row {p}: target gradient {} vs {}", got[got.len() - 3], want[want.len() - 3]);
            }
            lse - value(base + y).to_f64()
        })
        .collect();
    let per_sample = losses.iter().sum::<f64>() / (t - 1) as f64;
    assert!(
        ((out.per_sample_loss[0] - per_sample) / per_sample).abs() <= 1e-4,
        "{} vs {per_sample}",
        out.per_sample_loss[0]
    );
    assert!(((out.loss - 2.0 * per_sample) / (2.0 * per_sample)).abs() <= 1e-4);
    // the last position (entirely past 2^31) has no target: zero gradient
    let last = (t - 1) * v;
    assert!(last > 1 << 31);
    assert!(logits[last..].par_iter().all(|g| g.to_f32() == 0.0));
}

#[test]
#[cfg_attr(debug_assertions, ignore = "4.4 GB; run with --release")]
fn more_than_2_pow_31_elements_cpu() {
    more_than_2_pow_31(|spec, shape, logits, ids| {
        let spec = spec.to_builder().backend(Backend::Cpu).build().unwrap();
        spec.loss_and_grad_in_place(shape, logits, Tokens::new(ids)).unwrap()
    });
}

#[test]
#[cfg_attr(debug_assertions, ignore = "4.4 GB; run with --release")]
fn more_than_2_pow_31_elements_cuda() {
    if !common::gpu_or_skip("more_than_2_pow_31_elements_cuda") {
        return;
    }
    more_than_2_pow_31(|spec, shape, logits, ids| {
        let spec = spec.to_builder().backend(Backend::Cuda).build().unwrap();
        spec.loss_and_grad_in_place(shape, logits, Tokens::new(ids)).unwrap()
    });
}

#[test]
#[cfg_attr(debug_assertions, ignore = "2.1 GB; run with --release")]
fn a_row_of_2_pow_29_entries_cpu() {
    let v = (1usize << 29) + 1;
    let shape = Shape::new(1, 2, v).unwrap();
    let mut logits: Vec<bf16> = Vec::new();
    if logits.try_reserve_exact(shape.logits_len()).is_err() {
        panic!("cannot allocate {} bytes for the 2^29-entry row", shape.logits_len() * 2);
    }
    (0..shape.logits_len()).into_par_iter().map(value).collect_into_vec(&mut logits);
    let ids = [0i64, v as i64 - 7];
    let y = ids[1] as usize;
    let spec = LossSpec::builder().backend(Backend::Cpu).build().unwrap();
    let out = spec.loss_and_grad_in_place(shape, &mut logits, Tokens::new(&ids)).unwrap();
    let m = (0..v).into_par_iter().map(|j| value(j).to_f64()).reduce(|| f64::NEG_INFINITY, f64::max);
    let s: f64 = (0..v).into_par_iter().map(|j| (value(j).to_f64() - m).exp()).sum();
    let lse = m + s.ln();
    let want = lse - value(y).to_f64();
    assert!(((out.loss - want) / want).abs() <= 1e-5, "{} vs {want}", out.loss);
    let js: Vec<usize> = (0..v).step_by(65_537).chain([y, v - 1]).collect();
    let w: Vec<f64> = js.iter().map(|&j| (value(j).to_f64() - lse).exp() - if j == y { 1.0 } else { 0.0 }).collect();
    let got: Vec<f64> = js.iter().map(|&j| logits[j].to_f64()).collect();
    let e = rel_err(&got, &w);
    assert!(e <= 1.5e-2, "gradient rel err {e:e}");
    assert!(logits[v..].par_iter().all(|g| g.to_f32() == 0.0));
}
