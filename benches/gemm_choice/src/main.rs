//! Times the three GEMMs of the chunked fused linear loss (N=1024, H=512, V=32000, f32) with
//! three CPU GEMM crates, for several chunk sizes C, on the rayon pool (all threads). Each
//! repetition runs every crate once (interleaved, so load drift hits all alike); the medians of
//! five repetitions are printed (each product's, and the total's: the median of the
//! repetitions' totals, not a sum of medians). faer is given the transposed (column-major) problem: with a
//! row-major destination its AVX-512 kernel crashed (faer 0.23.2 on Zen 4).
use std::time::Instant;

const N: usize = 1024;
const H: usize = 512;
const V: usize = 32000;

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n).map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5 }).collect()
}

/// c[m x n] (row stride ldc) = alpha? a[m x k] (rs a_rs, cs a_cs) * b[k x n] (rs b_rs, cs b_cs) + beta*c
#[allow(clippy::too_many_arguments)]
fn run(lib: &str, m: usize, n: usize, k: usize, a: &[f32], a_rs: usize, a_cs: usize, b: &[f32], b_rs: usize, b_cs: usize, c: &mut [f32], ldc: usize, acc: bool) {
    let threads = rayon::current_num_threads();
    match lib {
        "gemm" => unsafe {
            gemm::gemm(m, n, k, c.as_mut_ptr(), 1, ldc as isize, acc, a.as_ptr(), a_cs as isize, a_rs as isize,
                b.as_ptr(), b_cs as isize, b_rs as isize, if acc { 1.0 } else { 0.0 }, 1.0, false, false, false,
                gemm::Parallelism::Rayon(threads))
        },
        "faer" => {
            use faer::{MatMut, MatRef};
            // column-major formulation: C^T (n x m) = B^T (n x k) . A^T (k x m)
            let at = unsafe { MatRef::from_raw_parts(a.as_ptr(), k, m, a_cs as isize, a_rs as isize) };
            let bt = unsafe { MatRef::from_raw_parts(b.as_ptr(), n, k, b_cs as isize, b_rs as isize) };
            let ct = MatMut::from_column_major_slice_with_stride_mut(c, n, m, ldc);
            faer::linalg::matmul::matmul(ct, if acc { faer::Accum::Add } else { faer::Accum::Replace }, bt, at, 1.0f32,
                faer::Par::Rayon(std::num::NonZeroUsize::new(threads).unwrap()));
        }
        "matrixmultiply" => unsafe {
            matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), a_rs as isize, a_cs as isize, b.as_ptr(), b_rs as isize,
                b_cs as isize, if acc { 1.0 } else { 0.0 }, c.as_mut_ptr(), ldc as isize, 1)
        },
        _ => unreachable!(),
    }
}

fn main() {
    let hidden = data(N * H, 1);
    let weight = data(V * H, 2);
    let mut logits = vec![0f32; N * V];
    let mut dh = vec![0f32; N * H];
    let mut dw = vec![0f32; V * H];
    let libs: Vec<String> = std::env::args().skip(1).collect();
    let libs = if libs.is_empty() { vec!["gemm".into(), "faer".into(), "matrixmultiply".into()] } else { libs };
    println!("threads {}", rayon::current_num_threads());
    let gflop = 3.0 * 2.0 * (N * H * V) as f64 / 1e9;
    for &c in &[64usize, 128, 256, 1024] {
        // interleaved: each repetition runs every library once, so load drift hits all alike
        let mut reps: Vec<Vec<[f64; 3]>> = vec![Vec::new(); libs.len()];
        for _rep in 0..5 {
            for (li, lib) in libs.iter().enumerate() {
                let mut t = [0f64; 3];
                for r0 in (0..N).step_by(c) {
                    let rows = c.min(N - r0);
                    let h = &hidden[r0 * H..(r0 + rows) * H];
                    let lg = &mut logits[..rows * V];
                    let s = Instant::now();
                    // logits_c = h . W^T : m=rows, k=H, n=V; b[k][n] = W[n][k] -> rs 1, cs H
                    run(lib, rows, V, H, h, H, 1, &weight, 1, H, lg, V, false);
                    t[0] += s.elapsed().as_secs_f64();
                    let s = Instant::now();
                    // dh_c = G . W : m=rows, k=V, n=H
                    run(lib, rows, H, V, lg, V, 1, &weight, H, 1, &mut dh[r0 * H..(r0 + rows) * H], H, false);
                    t[1] += s.elapsed().as_secs_f64();
                    let s = Instant::now();
                    // dW += G^T . h : m=V, k=rows, n=H; a[m][k] = G[k][m] -> rs 1, cs V
                    run(lib, V, H, rows, lg, 1, V, h, H, 1, &mut dw, H, r0 > 0);
                    t[2] += s.elapsed().as_secs_f64();
                }
                reps[li].push(t);
            }
        }
        let median = |mut x: Vec<f64>| {
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        for (lib, r) in libs.iter().zip(&reps) {
            let b: Vec<f64> = (0..3).map(|i| median(r.iter().map(|t| t[i]).collect())).collect();
            let tot = median(r.iter().map(|t| t.iter().sum()).collect());
            println!("{lib:<15} C={c:<5} fwd {:>7.1} ms  dH {:>7.1} ms  dW {:>7.1} ms  total {:>7.1} ms  {:>6.1} GFLOP/s",
                b[0] * 1e3, b[1] * 1e3, b[2] * 1e3, tot * 1e3, gflop / tot);
        }
    }
    std::hint::black_box((&logits, &dh, &dw));
}
