// Keyword-weighted causal LM loss and its gradient: three launches per call, no float atomics.
//
//   fwl_plan_*    one block: validate ids/labels, targets, keyword weights, per-sample
//                 coefficients (depends only on the tokens, so it runs before the logits are read)
//   fwl_rows_*    grid-stride over rows, one block per row at a time: pass 1 reads the row once
//                 (16-byte vector loads) for its max / sum-exp (online softmax, f32), keeping as
//                 much of the row as fits in shared memory; pass 2 writes the gradient from shared
//                 memory (and, for the part of a long row that did not fit, from L2).
//                 The lean kernels (FWL_CUDA_ROW_LEAN, the default on sm_90), fwl_rowsl* for
//                 the plain loss (1 or 2 loads in flight per thread, FWL_CUDA_ROW_UNROLL: the
//                 same bits) and fwl_rowslo* with the options (rows.cuh)
//   fwl_finish    one block: per-sample means and the batch loss in a fixed order
//
// The options ride on the same passes, as uniform branches: soft-capping maps each logit to
// c * tanh(z / c) as it is read (both passes), the sum of the logits (against the running
// maximum) comes with the statistics (label smoothing), z-loss and token weights change per-row
// factors only. Every option off computes the plain loss. With label smoothing the sum of
// z - max over a row is an f32: a row where V * |mean(z - max)| exceeds the f32 range (3.4e38;
// at V = 262144 a spread of about 1.3e33) gets an infinite smoothing term where float64 would
// give a finite one; the cross-entropy itself is taken in double.
//
// Every reduction has a fixed shape (warp butterflies, then warp 0), so reruns are bit-identical.

#ifndef FWL_HOST_EMULATION  // (tests/kernel_host/emu.h: these kernels run on the host in the tests)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <stdint.h>

#include "params.h"

// `p` is aligned to `n` bytes, as the vector access after it needs: checked in the host
// emulation of the tests (tests/kernel_host/emu.h), where a misaligned access would not fault.
#ifdef FWL_HOST_EMULATION
#define FWL_ALIGNED(p, n) emu_check_aligned((p), (n), __FILE__, __LINE__)
#else
#define FWL_ALIGNED(p, n) ((void)0)
#endif

// ---- element types -------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// o[0], o[1] = a, b in G: for 16-bit types one paired conversion (cvt.rn.{bf16,f16}x2.f32,
// the same rounding as two single ones); o is 4-byte aligned.
template <typename G> __device__ __forceinline__ void from_f32x2(G *o, float a, float b) {
    o[0] = from_f32<G>(a);
    o[1] = from_f32<G>(b);
}
template <> __device__ __forceinline__ void from_f32x2<__half>(__half *o, float a, float b) {
    FWL_ALIGNED(o, 4);
    *reinterpret_cast<__half2 *>(o) = __floats2half2_rn(a, b);
}
template <> __device__ __forceinline__ void from_f32x2<__nv_bfloat16>(__nv_bfloat16 *o, float a, float b) {
    FWL_ALIGNED(o, 4);
    *reinterpret_cast<__nv_bfloat162 *>(o) = __floats2bfloat162_rn(a, b);
}

// 16 bytes of elements, loaded and stored as one vector.
template <typename T> struct __align__(16) Vec16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

// The values of a vector in f32, as to_f32 gives them: a bfloat16 pair taken apart by two bit
// operations on its 32-bit word (a bfloat16 is the high half of the f32 it stands for; the
// lower address holds the low half), where converting each element would unpack the pair
// first.
template <typename T> __device__ __forceinline__ void vec_f32(const Vec16<T> &r, float *v) {
    for (int i = 0; i < Vec16<T>::N; ++i) v[i] = to_f32(r.v[i]);
}
template <> __device__ __forceinline__ void vec_f32<__nv_bfloat16>(const Vec16<__nv_bfloat16> &r, float *v) {
    const uint32_t *w = reinterpret_cast<const uint32_t *>(r.v);
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

template <typename T> __device__ __forceinline__ Vec16<T> load16(const T *p) {
    Vec16<T> r;
    FWL_ALIGNED(p, 16);
    *reinterpret_cast<uint4 *>(r.v) = *reinterpret_cast<const uint4 *>(p);
    return r;
}

template <typename T> __device__ __forceinline__ void store16(T *p, const Vec16<T> &r) {
    FWL_ALIGNED(p, 16);
    *reinterpret_cast<uint4 *>(p) = *reinterpret_cast<const uint4 *>(r.v);
}

// The same accesses with L2 eviction hints (the lean plain kernels with hints, fwl_rowslh_*,
// rows.cuh): load16_first for what is read once (evict first: a row's part that its block keeps
// in shared memory, and the rest at its second, last read), load16_last for the rest at its first
// read (the evict-last policy of fwl_evict_last: kept in L2 for the gradient pass), store16_stream
// for the gradient (evict first), so that the gradient and the cached parts passing through L2
// do not push out the parts still to be read again. Plain accesses in the host emulation.
// (fwl_l2_policy: evict-last where `last`, else evict-first, for all of an access's lines)
__device__ __forceinline__ uint64_t fwl_l2_policy(bool last) {
#ifdef FWL_HOST_EMULATION
    (void)last;
    return 0;
#else
    uint64_t policy;
    if (last)
        asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
    else
        asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
#endif
}
__device__ __forceinline__ uint64_t fwl_evict_last() { return fwl_l2_policy(true); }

template <typename T> __device__ __forceinline__ Vec16<T> load16_first(const T *p) {
#ifdef FWL_HOST_EMULATION
    return load16(p);
#else
    Vec16<T> r;
    *reinterpret_cast<uint4 *>(r.v) = __ldcs(reinterpret_cast<const uint4 *>(p));
    return r;
#endif
}

template <typename T> __device__ __forceinline__ Vec16<T> load16_last(const T *p, uint64_t policy) {
#ifdef FWL_HOST_EMULATION
    (void)policy;
    return load16(p);
#else
    Vec16<T> r;
    uint4 &u = *reinterpret_cast<uint4 *>(r.v);
    asm volatile("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
                 : "l"(p), "l"(policy));
    return r;
#endif
}

template <typename T> __device__ __forceinline__ void store16_stream(T *p, const Vec16<T> &r) {
#ifdef FWL_HOST_EMULATION
    store16(p, r);
#else
    __stcs(reinterpret_cast<uint4 *>(p), *reinterpret_cast<const uint4 *>(r.v));
#endif
}

// Asynchronous copies into shared memory (the prefetching lean kernels, fwl_rowslp_*, rows.cuh):
// cp_async16 moves 16 bytes from global to shared memory without passing through registers
// (cp.async.cg, sm_80 and later, read with the L2 policy `policy`), so that a thread can have a
// whole row's share in flight at once; cp_async_commit closes the calling thread's current
// group of copies, cp_async_wait(n) waits until at most n of its groups are still pending (n
// above 7 waits as for 7), after which the thread sees what its completed copies wrote (another
// thread only after a barrier). fwl_evict_first: the L2 policy of what is read once. On the
// host: tests/kernel_host/emu.h's model, each copy made at the latest wait that may complete it.
__device__ __forceinline__ uint64_t fwl_evict_first() { return fwl_l2_policy(false); }

template <typename T> __device__ __forceinline__ void cp_async16(Vec16<T> *dst, const T *src, uint64_t policy) {
#ifdef FWL_HOST_EMULATION
    (void)policy;
    FWL_ALIGNED(dst, 16);
    FWL_ALIGNED(src, 16);
    emu::async_copy16(dst, src);
#else
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "l"(policy)
                 : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef FWL_HOST_EMULATION
    emu::async_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait(int n) {
#ifndef FWL_HOST_EMULATION
    switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 7;" ::: "memory"); break;
    }
#else
    emu::async_wait(n < 7 ? n : 7);
#endif
}

// ---- online softmax statistics -------------------------------------------------------------

// exp(x) as `ex2.approx.ftz` of x·log2(e): `__expf` without its subnormal handling (a compare
// and two predicated multiplies per element), results below 2^-126 (x < -87.3) flushed to 0:
// under 1e-38 of a row's sum with its target's term (at least 1). The sum without it (ms_push's
// skip), a confident row's small loss, keeps its relative accuracy down to about 1e-36 (a target
// some 85 above every other logit), an absolute one of V · 1.2e-38 below (__expf keeps
// subnormals, some 16 further). The lean rows loops' exponential (rows_body).
__device__ __forceinline__ float fwl_exp_ftz(float x) {
#ifdef FWL_HOST_EMULATION
    return fwl_host_exp_ftz(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
    return y;
#endif
}

// fwl-host: begin (tests/kernel_host.rs compiles what lies between these markers for the host
// and checks it against float64: plain C++ and the device functions below only)

// (max, sum of exp(z - max), sum of (z - max), count); NaN logits are skipped by fmaxf and
// reach the sums. The sum of z serves label smoothing only: kept against the running maximum, so
// a large common offset of the logits does not cancel it (a raw f32 sum of 1e6-sized logits loses
// the smoothing term), with the count to move it when the maximum moves. While the maximum is
// still -inf (nothing finite yet) it holds the raw sum, which is then -inf or NaN and stays so.
struct MS {
    float m;
    float s;
    float z;
    float n;
};

// `z`, a sum of `n` values against `from`, against `to` instead.
__device__ __forceinline__ float z_rebase(float z, float n, float from, float to) {
    return n == 0.f || from == to ? z : z + n * (from - to);
}

__device__ __forceinline__ MS ms_merge(MS a, MS b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return MS{m, a.s + b.s, a.z + b.z, a.n + b.n};  // all -inf so far: sums are 0 (or NaN)
    return MS{m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m), z_rebase(a.z, a.n, a.m, m) + z_rebase(b.z, b.n, b.m, m),
              a.n + b.n};
}

// Folds n values (n <= 8) into a thread's running statistics: one exponential per value, and
// one more only when the running maximum grows. LEAN (the plain loss: no label smoothing) keeps
// the maximum and the sum only, its exponentials from fwl_exp_ftz; z and n stay 0. Value `skip`
// (the row's target, when it is one of these; -1: none) counts in the maximum and the logit sum
// but stays out of the sum of exponentials: a row's `s` is the sum over the others, and the
// target's term is taken from its logit (row_loss, row_factors), so that a target far above the
// rest (a term near 1 against others near 1e-8) does not round the others away.
template <bool LEAN = false>
__device__ __forceinline__ void ms_push(MS &a, const float *v, int n, int skip = -1) {
    float lm = -INFINITY;
    for (int i = 0; i < n; ++i) lm = fmaxf(lm, v[i]);
    if (lm > a.m) {  // exp(-inf - lm) = 0 keeps an empty or NaN sum as it is
        a.s *= __expf(a.m - lm);
        if constexpr (!LEAN) a.z = z_rebase(a.z, a.n, a.m, lm);
        a.m = lm;
    }
    const float shift = a.m == -INFINITY ? 0.f : a.m;  // all -inf so far: -inf adds 0, NaN adds NaN
    if constexpr (LEAN) {
        for (int i = 0; i < n; ++i)
            if (i != skip) a.s += fwl_exp_ftz(v[i] - shift);
    } else {
        for (int i = 0; i < n; ++i) {
            const float d = v[i] - shift;
            if (i != skip) a.s += __expf(d);
            a.z += d;
        }
        a.n += static_cast<float>(n);
    }
}

// A row's terms from its merged statistics `st` (`st.s`: the sum without the target's term,
// ms_push's `skip`) and its (capped) target logit `tl`. With e_t = exp(tl - m), S = s + e_t and
// lse = m + ln S:
//   row_loss (double, by the one thread that writes it): the cross-entropy ln(1 + s / e_t)
//   (ln_1p) where e_t >= s, so that a confident row's small loss keeps its relative accuracy,
//   else (m - tl) + ln S (m - tl may exceed the float range); with label smoothing `eps`
//   (1 - eps) CE + eps (ln S - z / V); with the z-loss coefficient `zc` zc lse^2 (`zl`), added.
//   row_factors (f32, by every thread): inv_s = 1 / S, a = 1 + 2 zc lse and the target's
//   gradient entry before the soft-cap's chain factor, tgrad = coef ((a - 1) e_t / S - s / S +
//   eps (1 - 1 / V)): coef (a softmax_t - (1 - eps) - eps / V) with softmax_t - 1 taken as -s / S.
struct RowLoss {
    double loss, zl;
};

__device__ __forceinline__ RowLoss row_loss(const MS &st, float tl, double eps, double zc, int64_t V) {
    const double m = st.m, s = st.s, t = tl;
    const double et = exp(t - m), ln_s = log(s + et), lse = m + ln_s;
    double l = et >= s ? log1p(s / et) : (m - t) + ln_s;
    // lse - mean z = ln S - (sum of (z - max)) / V: no large terms to cancel
    if (eps != 0.0) l = (1.0 - eps) * l + eps * (ln_s - static_cast<double>(st.z) / static_cast<double>(V));
    const double zl = zc * lse * lse;
    return RowLoss{zc != 0.0 ? l + zl : l, zl};
}

struct RowFactors {
    float inv_s, a, tgrad;
};

__device__ __forceinline__ RowFactors row_factors(const MS &st, float tl, float eps, float zc, float coef,
                                                  int64_t V) {
    const float et = expf(tl - st.m), S = st.s + et, inv_s = 1.f / S;
    const float a1 = zc != 0.f ? 2.f * zc * (st.m + logf(S)) : 0.f;  // a - 1
    const float off = eps != 0.f ? eps * (1.f - 1.f / static_cast<float>(V)) : 0.f;
    return RowFactors{inv_s, 1.f + a1, coef * (a1 * (et * inv_s) - st.s * inv_s + off)};
}

// fwl-host: end

__device__ __forceinline__ MS warp_merge(MS a) {
    for (int o = 16; o > 0; o >>= 1) {
        MS b{__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o),
             __shfl_xor_sync(0xffffffffu, a.z, o), __shfl_xor_sync(0xffffffffu, a.n, o)};
        a = ms_merge(a, b);
    }
    return a;
}

// Merges every thread's statistics; all threads get the same bits (lane 0's: a butterfly's
// partners may round differently, since the merge is not commutative to the last bit).
__device__ __forceinline__ MS block_merge(MS a, MS *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    a = warp_merge(a);
    __syncthreads();  // red may still be read from the previous row
    if (lane == 0) red[warp] = a;
    __syncthreads();
    MS r = lane < nwarps ? red[lane] : MS{-INFINITY, 0.f, 0.f, 0.f};
    r = warp_merge(r);
    return MS{__shfl_sync(0xffffffffu, r.m, 0), __shfl_sync(0xffffffffu, r.s, 0), __shfl_sync(0xffffffffu, r.z, 0),
              __shfl_sync(0xffffffffu, r.n, 0)};
}

template <typename T> __device__ __forceinline__ T warp_sum(T x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// ---- plan ----------------------------------------------------------------------------------

template <typename I> __device__ void plan_impl(const FwlPlanParams &p) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int64_t B = p.batch, T = p.seq, V = p.vocab;
    const I *ids = static_cast<const I *>(p.ids);
    const I *labels = p.labels ? static_cast<const I *>(p.labels) : ids;
    __shared__ int64_t kw[FWL_MAX_KEYWORDS];
    __shared__ double kww[FWL_MAX_KEYWORDS];
    // per warp: id index, id value, label index, label value, token weight index, sample index of
    // a non-finite sample weight
    __shared__ int64_t bad[6][32];
    __shared__ double part[32];
    for (int k = threadIdx.x; k < p.num_keywords; k += blockDim.x) {
        kw[k] = p.keyword_ids[k];
        kww[k] = p.keyword_weights[k];
    }
    __syncthreads();

    int64_t bad_id = INT64_MAX, bad_id_v = 0, bad_lab = INT64_MAX, bad_lab_v = 0, bad_w = INT64_MAX, bad_sw = INT64_MAX;
    // one warp per sample: lanes stride over positions, then a fixed butterfly
    for (int64_t b = warp; b < B; b += nwarps) {
        double hits = 0.0;
        uint32_t valid = 0;
        for (int64_t t = lane; t < T; t += 32) {
            const int64_t i = b * T + t;
            const int64_t id = static_cast<int64_t>(ids[i]);
            // an id equal to ignore_index is an ignored target when the ids are the labels (below:
            // never a target), as in the course function
            if (id != p.ignore_index && (id < 0 || id >= V) && i < bad_id) {
                bad_id = i;
                bad_id_v = id;
            }
            for (int k = 0; k < p.num_keywords; ++k)
                if (id == kw[k]) hits += kww[k];
            const int64_t lab = static_cast<int64_t>(labels[i]);
            if (lab != p.ignore_index && (lab < 0 || lab >= V) && i < bad_lab) {
                bad_lab = i;
                bad_lab_v = lab;
            }
            if (p.token_weights && !isfinite(p.token_weights[i]) && i < bad_w) bad_w = i;
            int32_t target = -1;
            if (t + 1 < T) {
                const int64_t y = static_cast<int64_t>(labels[i + 1]);
                if (y != p.ignore_index && y >= 0 && y < V) {
                    target = static_cast<int32_t>(y);
                    ++valid;
                }
            }
            p.targets[i] = target;
        }
        hits = warp_sum(hits);
        valid = warp_sum(valid);
        if (lane == 0) {
            p.weights[b] = p.alpha * (1.0 + hits);
            // beyond double (alpha near its range): the host reports it, as the CPU plan does
            if (!isfinite(p.weights[b]) && b < bad_sw) bad_sw = b;
            p.valid[b] = valid;
            p.row_div[b] = p.row_mean == FWL_ROW_MEAN_ALL ? static_cast<double>(T - 1) : static_cast<double>(valid);
        }
    }
    // first bad id and label over the block (minimum flat index)
    for (int o = 16; o > 0; o >>= 1) {
        const int64_t oi = __shfl_xor_sync(0xffffffffu, bad_id, o), ov = __shfl_xor_sync(0xffffffffu, bad_id_v, o);
        if (oi < bad_id) { bad_id = oi; bad_id_v = ov; }
        const int64_t li = __shfl_xor_sync(0xffffffffu, bad_lab, o), lv = __shfl_xor_sync(0xffffffffu, bad_lab_v, o);
        if (li < bad_lab) { bad_lab = li; bad_lab_v = lv; }
        const int64_t wi = __shfl_xor_sync(0xffffffffu, bad_w, o);
        if (wi < bad_w) bad_w = wi;
    }
    if (lane == 0) {
        bad[0][warp] = bad_id;
        bad[1][warp] = bad_id_v;
        bad[2][warp] = bad_lab;
        bad[3][warp] = bad_lab_v;
        bad[4][warp] = bad_w;
        bad[5][warp] = bad_sw;  // lane 0's: the only lane that sets it
    }
    __syncthreads();  // also makes this block's weights/row_div writes visible to all its threads

    // the reduction's denominator: B, sum of weights (fixed order), or 1
    double denom = 1.0;
    if (p.reduction == FWL_REDUCE_MEAN) {
        denom = static_cast<double>(B);
    } else if (p.reduction == FWL_REDUCE_WEIGHTED_MEAN) {
        double w = 0.0;
        for (int64_t b = threadIdx.x; b < B; b += blockDim.x) w += p.weights[b];
        w = warp_sum(w);
        if (lane == 0) part[warp] = w;
        __syncthreads();
        double total = lane < nwarps ? part[lane] : 0.0;
        denom = warp_sum(total);
    }
    const double scale = p.grad_scale_ptr ? static_cast<double>(*p.grad_scale_ptr) : p.grad_scale;
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
        const double r = denom > 0.0 ? p.weights[b] / denom : 0.0;
        const double d = p.row_div[b];
        p.reduce[b] = r;
        p.coef[b] = d > 0.0 ? static_cast<float>(scale * r / d) : 0.f;
    }
    if (threadIdx.x == 0) {
        FwlStatus st;
        st.flags = 0;
        st.reserved = 0;
        st.bad_id_index = -1;
        st.bad_id_value = 0;
        st.bad_label_index = -1;
        st.bad_label_value = 0;
        st.bad_weight_index = -1;
        st.bad_weight_value = 0.f;
        st.reserved2 = 0;
        st.bad_sample_weight = 0.0;
        for (int w = 0; w < nwarps; ++w) {
            if (bad[4][w] != INT64_MAX && (st.bad_weight_index < 0 || bad[4][w] < st.bad_weight_index))
                st.bad_weight_index = bad[4][w];
            if (bad[0][w] != INT64_MAX && (st.bad_id_index < 0 || bad[0][w] < st.bad_id_index)) {
                st.bad_id_index = bad[0][w];
                st.bad_id_value = bad[1][w];
            }
            if (bad[2][w] != INT64_MAX && (st.bad_label_index < 0 || bad[2][w] < st.bad_label_index)) {
                st.bad_label_index = bad[2][w];
                st.bad_label_value = bad[3][w];
            }
        }
        if (st.bad_id_index >= 0) st.flags |= FWL_STATUS_BAD_ID;
        if (st.bad_label_index >= 0) st.flags |= FWL_STATUS_BAD_LABEL;
        if (st.bad_weight_index >= 0) {
            st.flags |= FWL_STATUS_BAD_TOKEN_WEIGHT;
            st.bad_weight_value = p.token_weights[st.bad_weight_index];
        }
        int64_t sw = INT64_MAX;
        for (int w = 0; w < nwarps; ++w) sw = bad[5][w] < sw ? bad[5][w] : sw;
        if (sw != INT64_MAX) {
            st.flags |= FWL_STATUS_BAD_SAMPLE_WEIGHT;
            st.bad_sample_weight = p.weights[sw];
        } else if (p.reduction == FWL_REDUCE_WEIGHTED_MEAN && !isfinite(denom)) {
            // every weight finite, their sum not: every w_b / sum would be 0
            st.flags |= FWL_STATUS_BAD_SAMPLE_WEIGHT;
            st.bad_sample_weight = denom;
        }
        st.non_finite_row = -1;
        *p.status = st;
    }
}

extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_plan_i32(FwlPlanParams p) { plan_impl<int32_t>(p); }
extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_plan_i64(FwlPlanParams p) { plan_impl<int64_t>(p); }
extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_plan_u32(FwlPlanParams p) { plan_impl<uint32_t>(p); }

// ---- rows ----------------------------------------------------------------------------------

#include "rows.cuh"

// ---- finish --------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_finish(FwlFinishParams p) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int64_t B = p.batch, T = p.seq;
    __shared__ double part[32];
    __shared__ double part_z[32];
    __shared__ int64_t nonfinite[32];
    int64_t first_bad = INT64_MAX;
    for (int64_t b = warp; b < B; b += nwarps) {
        double sum = 0.0, zsum = 0.0;
        for (int64_t t = lane; t < T; t += 32) {
            const int64_t i = b * T + t;
            if (p.targets[i] < 0) continue;
            const double l = p.row_loss[i];
            if (!isfinite(l) && i < first_bad) first_bad = i;
            const double w = p.token_weights ? static_cast<double>(p.token_weights[i + 1]) : 1.0;
            sum += w * l;
            if (p.row_z) zsum += w * p.row_z[i];
        }
        sum = warp_sum(sum);
        zsum = warp_sum(zsum);
        if (lane == 0) {
            const double d = p.row_div[b];
            p.per_sample[b] = d > 0.0 ? sum / d : 0.0;
            if (p.row_z) p.per_sample_z[b] = d > 0.0 ? zsum / d : 0.0;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const int64_t other = __shfl_xor_sync(0xffffffffu, first_bad, o);
        first_bad = other < first_bad ? other : first_bad;
    }
    if (lane == 0) nonfinite[warp] = first_bad;
    __syncthreads();  // per_sample written by this block is now visible to all its threads
    double total = 0.0, total_z = 0.0;
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
        total += p.per_sample[b] * p.reduce[b];
        if (p.row_z) total_z += p.per_sample_z[b] * p.reduce[b];
    }
    total = warp_sum(total);
    total_z = warp_sum(total_z);
    if (lane == 0) {
        part[warp] = total;
        part_z[warp] = total_z;
    }
    __syncthreads();
    if (warp == 0) {
        double t = lane < nwarps ? part[lane] : 0.0;
        t = warp_sum(t);
        double tz = lane < nwarps ? part_z[lane] : 0.0;
        tz = warp_sum(tz);
        int64_t nf = lane < nwarps ? nonfinite[lane] : INT64_MAX;
        for (int o = 16; o > 0; o >>= 1) {
            const int64_t other = __shfl_xor_sync(0xffffffffu, nf, o);
            nf = other < nf ? other : nf;
        }
        if (lane == 0) {
            *p.loss = t;
            *p.z_loss = tz;
            if (p.loss_f32) *p.loss_f32 = static_cast<float>(t);
            if (nf != INT64_MAX) {
                p.status->flags |= FWL_STATUS_NON_FINITE;
                p.status->non_finite_row = nf;
            }
        }
    }
}

// ---- scale ---------------------------------------------------------------------------------

template <typename G> __device__ void scale_impl(const FwlScaleParams &p) {
    const float s = *p.scale;
    if (s == 1.f) return;  // the usual upstream gradient: nothing to do
    G *g = static_cast<G *>(p.grad);
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
        g[i] = from_f32<G>(to_f32(g[i]) * s);
}

extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_scale_f32(FwlScaleParams p) { scale_impl<float>(p); }
extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_scale_f16(FwlScaleParams p) { scale_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_scale_bf16(FwlScaleParams p) { scale_impl<__nv_bfloat16>(p); }

// ---- narrow ---------------------------------------------------------------------------------

template <typename G> __device__ void narrow_impl(const FwlNarrowParams &p) {
    G *d = static_cast<G *>(p.dst);
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
        d[i] = from_f32<G>(p.src[i]);
}

extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_narrow_f16(FwlNarrowParams p) { narrow_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_narrow_bf16(FwlNarrowParams p) { narrow_impl<__nv_bfloat16>(p); }

// ---- the vocabulary- and data-parallel split -----------------------------------------------

#include "split.cuh"
