use super::math::EXP_LO;
use super::*;

fn ulp_at(b: f64) -> f64 {
    let b32 = b as f32;
    (f32::from_bits(b32.to_bits() + 1) - b32) as f64
}

fn ulps(a: f32, b: f64) -> f64 {
    (a as f64 - b).abs() / ulp_at(b)
}

#[test]
fn exp_error_bound() {
    for k in levels() {
        let n = 1 << 20;
        // the domain callers use: down to the zero threshold, up to the reference margin
        let x: Vec<f32> = (0..n).map(|i| EXP_LO + (20.0 - EXP_LO) * i as f32 / (n - 1) as f32).collect();
        let mut out = vec![0f32; n];
        k.exp_sum(&x, 0.0, &mut out, Ahead::NONE);
        for (&x, &y) in x.iter().zip(&out) {
            let want = (x as f64).exp();
            let bound = 2.0 + (x as f64).abs() * 1e-7 * want / ulp_at(want);
            let e = ulps(y, want);
            assert!(e <= bound, "{:?}: exp({x}) = {y}, want {want}: {e} ulp > {bound}", k.level);
            assert!(((y as f64 - want) / want).abs() <= 1e-5);
        }
    }
}

#[test]
fn exp_special_values() {
    for k in levels() {
        let x = [0.0, -0.0, f32::NEG_INFINITY, -110.0, -1e30, f32::NAN, -86.6, -88.0, -100.0];
        let mut out = [1f32; 9];
        k.exp_sum(&x, 0.0, &mut out, Ahead::NONE);
        assert_eq!(&out[..5], &[1.0, 1.0, 0.0, 0.0, 0.0], "{:?}", k.level);
        assert!(out[5].is_nan());
        assert!(out[6] > 0.0 && out[6].is_normal());
        // below exp(-86.6), levels return 0 or a subnormal
        assert!(out[7..].iter().all(|&y| (0.0..f32::MIN_POSITIVE).contains(&y)), "{:?}", &out[7..]);
        // above 88, exp(88) or +inf (never a wrapped 2^n); NaN whatever its payload; in the
        // vector steps and the tail (37 elements)
        let special =
            [88.0, 89.0, 100.0, 1e30, f32::INFINITY, f32::from_bits(0x7FC0_0001), f32::from_bits(0xFF80_01FF)];
        let x: Vec<f32> = (0..37).map(|i| special[i % 7]).collect();
        let mut out = vec![1f32; 37];
        k.exp_sum(&x, 0.0, &mut out, Ahead::NONE);
        for (i, y) in out.iter().enumerate() {
            let ok = if i % 7 < 5 { *y >= 1.6e38 } else { y.is_nan() };
            assert!(ok, "{:?}: exp({}) = {y}", k.level, x[i]);
        }
    }
}

fn levels() -> impl Iterator<Item = Kernels> {
    [CpuSimd::Portable, CpuSimd::Avx2, CpuSimd::Avx512].into_iter().filter_map(Kernels::select)
}

/// [`levels`], plus AVX-512 with the bf16 rounding emulated (the kernels of CPUs without the BF16
/// conversions), whatever this CPU has.
fn levels_and_emulations() -> Vec<Kernels> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut kernels: Vec<Kernels> = levels().collect();
    #[cfg(target_arch = "x86_64")]
    if let Some(mut k) = Kernels::select(CpuSimd::Avx512) {
        k.exp_sum_side = Some(x86_side::exp_sum_side_512);
        k.scale_bf16 = x86::scale_bf16_512::<false>;
        k.scale_ahead.bf16 = x86::scale_bf16_512::<true>;
        k.scale_bf16_finite = x86::scale_bf16_finite_512;
        kernels.push(k);
    }
    kernels
}

/// 70 000 spread bit patterns, with the special values below after the first 1000, in the middle
/// and at the end (so that the vector bodies meet them, not only the scalar tails; not at the
/// start, where short prefixes are summed).
fn test_floats() -> Vec<f32> {
    let special = [
        f32::NAN,
        f32::INFINITY,
        -0.0,
        3.389_531_4e38,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        6.0e-8,
        1e-39,
        -1e-40,
        // NaN whose payload lies in the low half only (rounding alone would make it an
        // infinity), would round up or carries out of it, negative NaN, the largest finite values
        f32::from_bits(0x7F80_0001),
        f32::from_bits(0x7FC0_8001),
        f32::from_bits(0xFF80_8000),
        f32::from_bits(0x7FFF_FFFF),
        f32::from_bits(0xFFBF_FFFF),
        f32::MAX,
        f32::MIN,
    ];
    let spread = |r: std::ops::Range<u32>| r.map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)));
    let parts = [spread(0..1000), spread(1000..35_000), spread(35_000..70_000)];
    parts.into_iter().flat_map(|p| p.chain(special)).collect()
}

#[test]
fn conversions_match_half_at_every_level_alignment_and_stream_mode() {
    let xs = test_floats();
    for k in levels_and_emulations() {
        for (off, stream) in [(0, false), (0, true), (1, true), (7, true), (13, false)] {
            let x = &xs[off..];
            let mut b = vec![0u16; x.len()];
            let mut h = vec![0u16; x.len()];
            k.scale_sub_bf16(x, 1.0, 0.0, &mut b, stream);
            k.scale_sub_f16(x, 1.0, 0.0, &mut h, stream);
            k.fence();
            for ((&v, &b), &h) in x.iter().zip(&b).zip(&h) {
                let want =
                    if v.is_subnormal() { half::bf16::from_f32(v.signum() * 0.0) } else { half::bf16::from_f32(v) };
                // a NaN: the high half, quietened, at every level (as the AVX-512 instruction)
                assert!(
                    want.to_bits() == b || (want.is_nan() && b == bf16_round(v)),
                    "{:?}: bf16({v}) = {b:#x}, want {want}",
                    k.level
                );
                let want = half::f16::from_f32(v);
                assert!(
                    want.to_bits() == h || (want.is_nan() && half::f16::from_bits(h).is_nan()),
                    "{:?}: f16({v}) = {h:#x}, want {want}",
                    k.level
                );
            }
            let mut wb = vec![0f32; b.len()];
            let mut wh = vec![0f32; h.len()];
            k.widen_bf16(&b, &mut wb);
            k.widen_f16(&h, &mut wh);
            for (i, (&b, &h)) in b.iter().zip(&h).enumerate() {
                let (eb, eh) = (half::bf16::from_bits(b).to_f32(), half::f16::from_bits(h).to_f32());
                assert!(eb.to_bits() == wb[i].to_bits() || (eb.is_nan() && wb[i].is_nan()));
                assert!(eh.to_bits() == wh[i].to_bits() || (eh.is_nan() && wh[i].is_nan()));
            }
        }
    }
}

#[test]
fn the_finite_bf16_store_rounds_every_high_half_and_tie_as_the_lane_code() {
    // every finite f32 high half (both signs, subnormals, the largest finite values), each with
    // the low halves where rounding turns (ties, one either side, 0, all ones), at offsets that
    // move each value through the lanes of the store's 16-lane body
    let lows = [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234];
    let xs: Vec<f32> = (0..=0xFFFFu32)
        .filter(|h| h & 0x7F80 != 0x7F80)
        .flat_map(|h| lows.iter().map(move |&l| f32::from_bits(h << 16 | l)))
        .collect();
    let want: Vec<u16> = xs.iter().map(|&v| bf16_round(v)).collect();
    for k in levels_and_emulations() {
        for (off, stream) in [(0, false), (0, true), (3, true), (9, false)] {
            let mut got = vec![0u16; xs.len() - off];
            k.scale_sub_bf16_finite(&xs[off..], 1.0, 0.0, &mut got, stream);
            k.fence();
            for (i, (&g, &w)) in got.iter().zip(&want[off..]).enumerate() {
                assert_eq!(g, w, "{:?} off {off}: bf16({:e} = {:#010x})", k.level, xs[off + i], xs[off + i].to_bits());
            }
        }
    }
}

#[test]
fn streaming_scale_equals_plain_scale() {
    for k in levels() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 50.0).collect();
        for off in 0..17 {
            let mut a = vec![0f32; 1100];
            let mut b = vec![0f32; 1100];
            k.scale_f32(&x[off..], 0.3, &mut a[off..], true);
            k.fence();
            k.scale_f32(&x[off..], 0.3, &mut b[off..], false);
            assert_eq!(a, b, "{:?} offset {off}", k.level);
            let want: Vec<f32> = x[off..].iter().map(|v| v * 0.3).collect();
            assert_eq!(&a[off..off + want.len()], &want[..]);
        }
    }
}

#[test]
fn exp_of_16_bit_input_within_the_short_bound() {
    // 16-bit logits use the degree-4 polynomial: within 3e-6 (+ the reduction's |x|·1e-7)
    // of exp, over the domain callers use, and the sum the values say
    for k in levels() {
        let n = 4000;
        let xs: Vec<f32> = (0..n).map(|i| EXP_LO + (20.0 - EXP_LO) * i as f32 / (n - 1) as f32).collect();
        for (bf, bits) in [
            (true, xs.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect::<Vec<_>>()),
            (false, xs.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect::<Vec<_>>()),
        ] {
            for m in [4000, 3999, 17, 3] {
                let mut w = vec![0f32; m];
                if bf {
                    k.widen_bf16(&bits[..m], &mut w)
                } else {
                    k.widen_f16(&bits[..m], &mut w)
                }
                let mut e = vec![0f32; m];
                let sum = k.exp_sum_bits(bf, &bits[..m], 0.0, &mut e, Ahead::NONE);
                let mut want_sum = 0f64;
                for (&x, &y) in w.iter().zip(&e) {
                    let want = (x as f64).exp();
                    want_sum += want;
                    if want < f32::MIN_POSITIVE as f64 {
                        assert!(y >= 0.0 && (y as f64) < f32::MIN_POSITIVE as f64);
                        continue;
                    }
                    let rel = ((y as f64 - want) / want).abs();
                    assert!(
                        rel <= 3e-6 + (x as f64).abs() * 1e-7,
                        "{:?} bf16={bf}: exp({x}) = {y}, rel {rel:e}",
                        k.level
                    );
                }
                assert!(((sum as f64 - want_sum) / want_sum).abs() <= 1e-5, "{:?}: sum {sum} vs {want_sum}", k.level);
            }
        }
    }
}

#[test]
fn the_stores_that_prefetch_their_source_give_the_plain_stores_bits() {
    // every level (and AVX-512 with the bf16 rounding emulated), every output dtype, outputs at
    // every offset within a line and lengths around the vector steps, NaN and inf included
    let vals = test_floats();
    for k in levels_and_emulations() {
        for (len, skew) in [(0, 0), (1, 3), (31, 1), (64, 0), (1000, 5), (4099, 15), (vals.len() - 16, 7)] {
            let x = &vals[..len];
            let mut want = vec![0f32; len + 32];
            let mut got = vec![1f32; len + 32];
            let off = want.as_ptr().align_offset(64) + skew;
            let off_got = got.as_ptr().align_offset(64) + skew;
            k.scale_f32(x, 0.75, &mut want[off..off + len], true);
            k.scale_sub_ahead(x, 0.75, SideDst::F32(&mut got[off_got..off_got + len]));
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&want[off..off + len]),
                bits(&got[off_got..off_got + len]),
                "{:?} f32 {len}+{skew}",
                k.level
            );
            for bf16 in [true, false] {
                let mut want = vec![0u16; len + 64];
                let mut got = vec![1u16; len + 64];
                let (ow, og) = (want.as_ptr().align_offset(64) + skew, got.as_ptr().align_offset(64) + skew);
                let (w, g) = (&mut want[ow..ow + len], &mut got[og..og + len]);
                if bf16 {
                    k.scale_sub_bf16(x, 0.75, 0.0, w, true);
                    k.scale_sub_ahead(x, 0.75, SideDst::Bf16(g));
                } else {
                    k.scale_sub_f16(x, 0.75, 0.0, w, true);
                    k.scale_sub_ahead(x, 0.75, SideDst::F16(g));
                }
                assert_eq!(w, g, "{:?} bf16={bf16} {len}+{skew}", k.level);
            }
        }
        k.fence();
    }
}

#[test]
fn max_skips_nan() {
    let k = Kernels::select(CpuSimd::Auto).unwrap();
    let mut x = vec![1f32; 37];
    x[3] = f32::NAN;
    x[36] = 2.0;
    assert_eq!(k.max_of(Input::F32(&x)), 2.0);
    assert_eq!(k.max_of(Input::F32(&[])), f32::NEG_INFINITY);
}

#[test]
fn the_maximum_of_16_bit_input_is_that_of_its_widened_values() {
    // every 16-bit pattern (NaN, infinities, zeros of both signs, subnormals) in a scrambled
    // order, cut at lengths around the lanes and the chunk, at every level and both dtypes:
    // the maximum taken in registers has the bits of the one over the widened buffer
    let mut all: Vec<u16> = (0..=u16::MAX).collect();
    let mut state = 0x9E37_79B9u32;
    for i in (1..all.len()).rev() {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        all.swap(i, state as usize % (i + 1));
    }
    for k in levels() {
        for bf16 in [true, false] {
            let mut wide = vec![0f32; all.len()];
            if bf16 {
                k.widen_bf16(&all, &mut wide);
            } else {
                k.widen_f16(&all, &mut wide);
            }
            for (start, len) in [(0, 0), (5, 1), (9, 15), (100, 16), (7, 17), (1000, 2048), (0, all.len())] {
                let bits = &all[start..start + len];
                let got = if bf16 { k.max_of(Input::Bf16(bits)) } else { k.max_of(Input::F16(bits)) };
                let want = k.max_of(Input::F32(&wide[start..start + len]));
                assert_eq!(got.to_bits(), want.to_bits(), "{:?} bf16={bf16} {start}+{len}", k.level);
            }
            // edge cases against a plain scalar maximum (NaN skipped, `-inf` when none): zeros
            // of both signs in either order, all NaN, subnormals only, a NaN and the maximum in
            // the elements past the last whole group of 16
            let (nan, pos_sub, neg_sub) = if bf16 { (0x7FC1, 0x0001, 0x8005) } else { (0x7E01, 0x0001, 0x8005) };
            let widen = |b: u16| if bf16 { f32::from_bits((b as u32) << 16) } else { half::f16::from_bits(b).to_f32() };
            let mut tail = vec![0x8000u16; 17];
            tail[16] = nan;
            tail[15] = pos_sub;
            for case in [
                vec![0x8000, 0x0000],
                vec![0x0000, 0x8000],
                vec![0x8000; 16],
                vec![0x8000; 17],
                vec![nan; 1],
                vec![nan; 16],
                vec![nan; 17],
                vec![neg_sub, pos_sub, neg_sub],
                vec![neg_sub; 33],
                tail,
            ] {
                let got = if bf16 { k.max_of(Input::Bf16(&case)) } else { k.max_of(Input::F16(&case)) };
                let want = case.iter().map(|&b| widen(b)).filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(got, want, "{:?} bf16={bf16} {case:x?}", k.level);
                let wide: Vec<f32> = case.iter().map(|&b| widen(b)).collect();
                assert_eq!(got.to_bits(), k.max_of(Input::F32(&wide)).to_bits(), "{:?} bf16={bf16} {case:x?}", k.level);
            }
            // only NaN and -inf below the finite maximum: all patterns give the largest finite
            let top = if bf16 { f32::from_bits(0x7F7F << 16) } else { 65504.0 };
            assert_eq!(if bf16 { k.max_of(Input::Bf16(&all)) } else { k.max_of(Input::F16(&all)) }, f32::INFINITY);
            let finite: Vec<u16> = all
                .iter()
                .copied()
                .filter(|&b| if bf16 { b & 0x7F80 != 0x7F80 } else { b & 0x7C00 != 0x7C00 })
                .collect();
            let got = if bf16 { k.max_of(Input::Bf16(&finite)) } else { k.max_of(Input::F16(&finite)) };
            assert_eq!(got, top, "{:?} bf16={bf16}", k.level);
        }
    }
}

#[test]
fn the_store_with_an_offset_gives_affine_then_the_store() {
    // `x * f - k` in the store (label smoothing's gradient) = `affine` in place, then the store
    // by 1: the same bits at every level, dtype, offset (streaming head) and stream mode, NaN
    // and inf included; and `k` = 0 is the plain product
    let vals = test_floats();
    for k in levels_and_emulations() {
        for (n, off) in [(0, 0), (5, 0), (100, 3), (2048, 0), (2048, 7), (1001, 13)] {
            for stream in [false, true] {
                let x: Vec<f32> = (0..n).map(|i| vals[(i * 11 + 3) % vals.len()] % 40.0).collect();
                for (f, c) in [(0.37f32, 1.5e-6f32), (-2.5, 0.25), (1e-30, 3e-39), (0.5, 0.0)] {
                    let what = format!("{:?} n {n} off {off} stream {stream} f {f} k {c}", k.level);
                    let mut q = x.clone();
                    k.affine(&mut q, f, c, &[]);
                    let (mut a, mut b) = (vec![9f32; n + off], vec![9f32; n + off]);
                    k.scale_sub_f32(&x, f, c, &mut a[off..], stream);
                    k.scale_f32(&q, 1.0, &mut b[off..], stream);
                    let (mut a16, mut b16) = (vec![7u16; n + off], vec![7u16; n + off]);
                    let (mut af, mut bf) = (vec![7u16; n + off], vec![7u16; n + off]);
                    k.scale_sub_bf16(&x, f, c, &mut a16[off..], stream);
                    k.scale_sub_bf16(&q, 1.0, 0.0, &mut b16[off..], stream);
                    k.scale_sub_f16(&x, f, c, &mut af[off..], stream);
                    k.scale_sub_f16(&q, 1.0, 0.0, &mut bf[off..], stream);
                    k.fence();
                    assert!(a.iter().zip(&b).all(|(p, q)| same(*p, *q)), "{what}: f32");
                    let nan16 = |a: u16, b: u16| {
                        a == b || (half::bf16::from_bits(a).is_nan() && half::bf16::from_bits(b).is_nan())
                    };
                    assert!(a16.iter().zip(&b16).all(|(p, q)| nan16(*p, *q)), "{what}: bf16");
                    let nanh = |a: u16, b: u16| {
                        a == b || (half::f16::from_bits(a).is_nan() && half::f16::from_bits(b).is_nan())
                    };
                    assert!(af.iter().zip(&bf).all(|(p, q)| nanh(*p, *q)), "{what}: f16");
                    if c == 0.0 {
                        let want: Vec<f32> = x.iter().map(|v| v * f).collect();
                        assert!(a[off..].iter().zip(&want).all(|(p, q)| same(*p, *q)), "{what}: plain product");
                    }
                    // finite results: the bf16 store without NaN handling gives the same bits
                    let xf: Vec<f32> = x.iter().map(|v| if v.is_finite() { *v } else { 1.0 }).collect();
                    let (mut c1, mut c2) = (vec![7u16; n + off], vec![7u16; n + off]);
                    k.scale_sub_bf16(&xf, f, c, &mut c1[off..], stream);
                    k.scale_sub_bf16_finite(&xf, f, c, &mut c2[off..], stream);
                    k.fence();
                    assert_eq!(c1, c2, "{what}: bf16 finite");
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_intrinsics_give_the_lane_code_bits() {
    // the AVX2 statistics loop is the lane code's arithmetic and summation order in intrinsics:
    // every output and sum must be the same bits, for every length and 16-bit type
    let Some(k) = Kernels::select(CpuSimd::Avx2) else {
        eprintln!("avx2_intrinsics_give_the_lane_code_bits: skipped, no AVX2 on this CPU");
        return;
    };
    let xs: Vec<f32> = test_floats().iter().map(|v| if v.is_finite() { v.clamp(-200.0, 30.0) } else { *v }).collect();
    let wide: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 4001) as f32 * 0.01 - 30.0).collect();
    for data in [&xs[..], &wide[..]] {
        for n in [0usize, 1, 7, 15, 16, 17, 255, 256, 257, 1000, data.len()] {
            let x = &data[..n.min(data.len())];
            for shift in [0.0f32, 3.5] {
                let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
                // SAFETY: AVX2 and FMA were detected by Kernels::select.
                let want = unsafe { lane_avx2(|| exp_sum_body::<true, false>(x, shift, &mut b, Ahead::NONE)) };
                let got = k.exp_sum(x, shift, &mut a, Ahead::NONE);
                assert!(same(got, want), "f32 n={n}: {got:?} vs {want:?}");
                assert!(a.iter().zip(&b).all(|(&p, &q)| same(p, q)), "f32 n={n}");
                for bf in [true, false] {
                    let bits: Vec<u16> = x
                        .iter()
                        .map(|&v| if bf { half::bf16::from_f32(v).to_bits() } else { half::f16::from_f32(v).to_bits() })
                        .collect();
                    let widen = if bf { widen_bf16_body } else { widen_f16_body };
                    // SAFETY: as above.
                    let want =
                        unsafe { lane_avx2(|| exp_sum_bits_body::<true>(&bits, widen, shift, &mut b, Ahead::NONE)) };
                    let got = k.exp_sum_bits(bf, &bits, shift, &mut a, Ahead::NONE);
                    assert!(same(got, want), "bf16={bf} n={n}: {got:?} vs {want:?}");
                    assert!(a.iter().zip(&b).all(|(&p, &q)| same(p, q)), "bf16={bf} n={n}");
                    // label smoothing's loop (the elements summed too) over the same bits
                    let input = if bf { Input::Bf16(&bits) } else { Input::F16(&bits) };
                    let got = k.exp_opts(input, shift, SMOOTHING, &mut a, &mut [], Ahead::NONE);
                    // SAFETY: as above.
                    let want = unsafe {
                        lane_avx2(|| {
                            exp_opts_bits_body::<true>(&bits, widen, shift, SMOOTHING, &mut b, &mut [], Ahead::NONE)
                        })
                    };
                    let ok = same(got.0, want.0) && same(got.1, want.1);
                    assert!(ok, "smoothing bf16={bf} n={n}: {got:?} vs {want:?}");
                    assert!(a.iter().zip(&b).all(|(&p, &q)| same(p, q)), "smoothing bf16={bf} n={n}");
                }
                let got = k.exp_opts(Input::F32(x), shift, SMOOTHING, &mut a, &mut [], Ahead::NONE);
                // SAFETY: as above.
                let want = unsafe {
                    lane_avx2(|| exp_opts_body::<true, false>(x, shift, SMOOTHING, &mut b, &mut [], Ahead::NONE))
                };
                let ok = same(got.0, want.0) && same(got.1, want.1);
                assert!(ok, "smoothing f32 n={n}: {got:?} vs {want:?}");
                assert!(a.iter().zip(&b).all(|(&p, &q)| same(p, q)), "smoothing f32 n={n}");
            }
        }
    }
}

/// Label smoothing alone: the statistics loop also sums the elements.
#[cfg(target_arch = "x86_64")]
const SMOOTHING: ElemOpts = ElemOpts { cap: 0.0, inv_cap: 0.0, sum: true };

/// The same bits, or both NaN (a NaN's sign and payload depend on which operand an instruction
/// passes on, which carries no meaning).
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Runs lane code compiled with the AVX2 level's features (so `mul_add` is the FMA instruction).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lane_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[test]
fn the_store_inside_the_statistics_loop_gives_the_two_calls_bits() {
    // exp_sum_side = exp_sum (f32 or 16-bit input), then the store of the side (f32, bf16 or
    // f16): the same bits at every level, length, offset of the store (the streaming head) and
    // stream mode, NaN and inf included
    let vals = test_floats();
    for k in levels_and_emulations() {
        for (n, side_n) in [(0, 0), (1, 1), (15, 15), (16, 16), (47, 47), (2048, 2048), (2000, 2048), (2048, 333)] {
            let x: Vec<f32> = (0..n).map(|i| (vals[(i * 7) % vals.len()] % 30.0) - 8.0).collect();
            let xb: Vec<u16> = x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let xh: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let inputs = [Input::F32(&x), Input::Bf16(&xb), Input::F16(&xh)];
            let src: Vec<f32> = (0..side_n).map(|i| vals[(i * 13 + 5) % vals.len()] * 1e-3).collect();
            // the store told that every product is finite (the AVX2 bf16 store then skips the
            // NaN handling), on finite data
            let finite_src: Vec<f32> = src.iter().map(|&v| if v.is_finite() { v } else { 1.5 }).collect();
            for (input, store, off, stream) in itertools_product(inputs, [0, 1, 2, 3], [0, 1, 5, 16, 33], [false, true])
            {
                let (src, finite) = if store == 3 { (&finite_src, true) } else { (&src, false) };
                let (mut out1, mut out2) = (vec![0f32; n], vec![0f32; n]);
                let f = 0.37;
                let r1 = match input {
                    Input::F32(x) => k.exp_sum(x, 1.5, &mut out1, Ahead::NONE),
                    Input::Bf16(b) => k.exp_sum_bits(true, b, 1.5, &mut out1, Ahead::NONE),
                    Input::F16(b) => k.exp_sum_bits(false, b, 1.5, &mut out1, Ahead::NONE),
                };
                let (mut d1, mut d2) = (vec![7f32; side_n + off + 3], vec![7f32; side_n + off + 3]);
                let (mut h1, mut h2) = (vec![7u16; side_n + off + 3], vec![7u16; side_n + off + 3]);
                let dst = match store {
                    0 => {
                        k.scale_f32(src, f, &mut d1[off..off + side_n], stream);
                        SideDst::F32(&mut d2[off..off + side_n])
                    }
                    1 => {
                        k.scale_sub_bf16(src, f, 0.0, &mut h1[off..off + side_n], stream);
                        SideDst::Bf16(&mut h2[off..off + side_n])
                    }
                    3 => {
                        k.scale_sub_bf16_finite(src, f, 0.0, &mut h1[off..off + side_n], stream);
                        SideDst::Bf16(&mut h2[off..off + side_n])
                    }
                    _ => {
                        k.scale_sub_f16(src, f, 0.0, &mut h1[off..off + side_n], stream);
                        SideDst::F16(&mut h2[off..off + side_n])
                    }
                };
                let r2 = k.exp_sum_side(
                    input,
                    1.5,
                    &mut out2,
                    Ahead::NONE,
                    Side { src, f, dst, stream, finite, cached: None },
                );
                k.fence();
                let what = format!("{:?} n {n} side {side_n} store {store} off {off} stream {stream}", k.level);
                assert!(same(r1, r2), "{what}: {r1:?} vs {r2:?}");
                assert!(out1.iter().zip(&out2).all(|(a, b)| same(*a, *b)), "{what}: exponentials");
                assert!(d1.iter().zip(&d2).all(|(a, b)| same(*a, *b)), "{what}: f32 store");
                assert_eq!(h1, h2, "{what}: 16-bit store");
            }
        }
    }
}

/// Every combination of the four lists.
fn itertools_product<A: Copy, B: Copy, C: Copy, D: Copy>(
    a: impl IntoIterator<Item = A>,
    b: impl IntoIterator<Item = B> + Clone,
    c: impl IntoIterator<Item = C> + Clone,
    d: impl IntoIterator<Item = D> + Clone,
) -> Vec<(A, B, C, D)> {
    let mut v = vec![];
    for a in a {
        for b in b.clone() {
            for c in c.clone() {
                for d in d.clone() {
                    v.push((a, b, c, d));
                }
            }
        }
    }
    v
}

/// The lane code's f16 conversions against `half` (F16C where the CPU has it) on every input:
/// all 65 536 f16 and all 2^32 f32 bit patterns, NaN bits included.
#[test]
fn the_lane_code_f16_conversions_match_half_on_every_input() {
    use super::lanes::{f16_round, f16_widen};
    use rayon::prelude::*;
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h).to_f32().to_bits();
        assert_eq!(f16_widen(h).to_bits(), want, "f16 {h:#06x} widened");
    }
    let first_wrong = (0u32..=0xFFFF).into_par_iter().find_map_first(|hi| {
        (0u32..=0xFFFF).map(|lo| hi << 16 | lo).find_map(|b| {
            let (got, want) = (f16_round(f32::from_bits(b)), half::f16::from_f32(f32::from_bits(b)).to_bits());
            (got != want).then_some((b, got, want))
        })
    });
    assert_eq!(first_wrong, None, "(f32 bits, f16_round, half)");
}

#[test]
fn a_soft_capped_element_is_the_same_number_under_any_shift() {
    // the target's capped value (`cap_one`: the loop at shift 0) must be the loop's own at the
    // row's shift: for capped values in [4, 16], `z − 8` is exact (Sterbenz), so the loop's sum
    // of `z − shift` over one element at shift 8 is the shift-0 sum less 8 exactly when both
    // loops capped it alike. Caps from 30 to 86 (on both sides of 64, up to which a shorter
    // `tanh` was once taken, and of c ≈ 86, the bound of a since-removed clamp skip), at every
    // level
    for k in levels() {
        for cap in [30.0f32, 43.0, 44.0, 64.0, 65.0, 80.0, 86.0] {
            let o = ElemOpts { cap, inv_cap: 1.0 / cap, sum: true };
            for i in 0..64 {
                let x = [4.5 + i as f32 * 0.173];
                let (mut out, mut chain) = ([0f32; 1], [0f32; 1]);
                let z0 = k.exp_opts(Input::F32(&x), 0.0, o, &mut out, &mut chain, Ahead::NONE).1;
                let z8 = k.exp_opts(Input::F32(&x), 8.0, o, &mut out, &mut chain, Ahead::NONE).1;
                assert!((4.0..=16.0).contains(&z0), "{z0}");
                assert!(same(z0 - 8.0, z8), "{:?} cap {cap} x {}: {z0} at shift 0, {z8} + 8 at shift 8", k.level, x[0]);
            }
        }
    }
}
