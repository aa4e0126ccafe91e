// The vocabulary- and data-parallel split, included at the end of weighted_loss.cu (it uses the
// element types and the online-softmax statistics defined there, and the gradient formula of
// rows.cuh). A rank
// holds columns [v0, v0 + len) of each row; the steps run on chunks of rows:
//
//   fwl_split_stats_<L>      per row: this rank's statistics (max, sum of exp(z - max) over its
//                            columns but the target, the raw target logit when the target is one
//                            of its columns; with label smoothing the sum of (z - max) and the
//                            slice's length), f32; or, with `fold`, those merged into the
//                            previous slices' (one device's vocabulary blocks)
//   (the caller all-gathers them: NCCL, torch.distributed, ...)
//   fwl_split_grad_<L>_<G>   per row: every rank's statistics merged in rank order (the same bits on
//                            every rank), the row's loss in double, the gradient of this rank's
//                            columns (the logits re-read; a chunk small enough stays in L2)
//   fwl_split_batch          one block: data-parallel totals, denominators and loss sums
//
// No float atomics; fixed reduction shapes: reruns are bit-identical.

// The first `head` elements of a row at `x` are unaligned, then `nvec` 16-byte vectors, then the tail.
template <typename L> struct RowSpan {
    int64_t head, nvec, tail0;
    __device__ RowSpan(const L *x, int64_t n) {
        constexpr int N = Vec16<L>::N;
        const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) & 15) / sizeof(L);
        head = min(n, mis ? N - mis : 0);
        nvec = (n - head) / N;
        tail0 = head + nvec * N;
    }
};

template <typename L> __device__ void split_stats_impl(const FwlSplitStatsParams &p) {
    constexpr int N = Vec16<L>::N;
    __shared__ MS red[32];
    const float cap = p.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f;
    const int64_t n = p.len;
    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const L *x = static_cast<const L *>(p.logits) + row * n;
        float *out = p.partials + row * p.words;
        const int32_t y = p.targets[p.row0 + row];  // the same for the whole block: uniform branches
        if (y < 0) {
            if (threadIdx.x == 0) {  // an empty slice's statistics: merging them changes nothing
                out[0] = -INFINITY;
                out[1] = 0.f;
                out[2] = 0.f;
                if (p.words > FWL_SPLIT_WORDS) out[3] = out[4] = 0.f;
            }
            continue;
        }
        const RowSpan<L> s(x, n);
        // the target's column here (-1: another rank's) stays out of the sum of exponentials
        // (ms_push's skip): the merged sum is the others', as the rows kernel's
        const int64_t j = static_cast<int64_t>(y) - p.v0;
        const int64_t jt = j >= 0 && j < n ? j : -1, yo = jt - s.head;
        const int64_t ky = jt >= 0 && yo >= 0 && yo < s.nvec * N ? yo / N : -1;
        MS acc{-INFINITY, 0.f, 0.f, 0.f};
        if (threadIdx.x < s.head) {
            const float v = capped(to_f32(x[threadIdx.x]), cap, inv_cap);
            ms_push(acc, &v, 1, static_cast<int64_t>(threadIdx.x) == jt ? 0 : -1);
        }
        for (int64_t k = threadIdx.x; k < s.nvec; k += blockDim.x) {
            const Vec16<L> r = load16(x + s.head + k * N);
            float v[N];
            for (int i = 0; i < N; ++i) v[i] = capped(to_f32(r.v[i]), cap, inv_cap);
            if (k != ky)
                ms_push(acc, v, N);
            else
                ms_push(acc, v, N, static_cast<int>(yo - ky * N));
        }
        if (s.tail0 + threadIdx.x < n) {
            const float v = capped(to_f32(x[s.tail0 + threadIdx.x]), cap, inv_cap);
            ms_push(acc, &v, 1, s.tail0 + threadIdx.x == jt ? 0 : -1);
        }
        MS st = block_merge(acc, red);
        if (threadIdx.x == 0) {
            float target = j >= 0 && j < n ? to_f32(x[j]) : 0.f;  // raw: capped after the merge
            if (p.fold) {  // the gradient kernel's merge, one slice at a time: the same operations
                const bool sum_z = p.words > FWL_SPLIT_WORDS;
                st = ms_merge(MS{out[0], out[1], sum_z ? out[3] : 0.f, sum_z ? out[4] : 0.f}, st);
                target = out[2] + target;
            }
            out[0] = st.m;
            out[1] = st.s;
            out[2] = target;
            if (p.words > FWL_SPLIT_WORDS) {
                out[3] = st.z;  // against this slice's maximum out[0]
                out[4] = st.n;  // the slice's length: the merge moves out[3] to the row's maximum
            }
        }
    }
}

template <typename L, typename G> __device__ void split_grad_impl(const FwlSplitGradParams &p) {
    constexpr int N = Vec16<L>::N;
    const float cap = p.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f;
    const int64_t n = p.len, per_rank = p.rows * p.words;
    const bool sum_z = p.words > FWL_SPLIT_WORDS;
    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const int64_t grow = p.row0 + row;
        const L *x = static_cast<const L *>(p.logits) + row * n;
        G *g = p.grad ? static_cast<G *>(p.grad) + row * n : nullptr;
        const int32_t y = p.targets[grow];
        if (y < 0) {
            ignored_row(p, g, n, grow);
            continue;
        }
        // every thread merges the ranks' statistics in rank order: the same bits on every rank
        const float *q = p.gathered + row * p.words;
        MS st{q[0], q[1], sum_z ? q[3] : 0.f, sum_z ? q[4] : 0.f};
        float target = q[2];  // held by one rank, 0 in the others: the sum is exact
        for (int r = 1; r < p.ranks; ++r) {
            const float *o = q + r * per_rank;
            st = ms_merge(st, MS{o[0], o[1], sum_z ? o[3] : 0.f, sum_z ? o[4] : 0.f});
            target += o[2];
        }
        const float coef = p.coef[grow / p.seq] * (p.token_weights ? p.token_weights[grow + 1] : 1.f);
        // the row's loss in double and its gradient's terms, as the rows kernel computes them
        const RowGrad rg = row_finish(p, st, target, coef, cap, inv_cap, p.vocab, grow, threadIdx.x == 0);
        if (!g) continue;
        const int64_t jt = static_cast<int64_t>(y) - p.v0;
        const int32_t t = jt >= 0 && jt < n ? static_cast<int32_t>(jt) : -1;  // the target's column here
        // each thread writes exactly the elements it read (in place too)
        const RowSpan<L> s(x, n);
        if (threadIdx.x < s.head) {
            const float v = to_f32(x[threadIdx.x]);
            grad_scalar(g + threadIdx.x, &v, 1, threadIdx.x, t, rg);
        }
        for (int64_t k = threadIdx.x; k < s.nvec; k += blockDim.x) {
            const int64_t j = s.head + k * N;
            const Vec16<L> r = load16(x + j);
            float v[N];
            for (int i = 0; i < N; ++i) v[i] = to_f32(r.v[i]);
            bool done = false;
            if constexpr (sizeof(G) == sizeof(L)) {
                if (p.vector_stores) {
                    const int ti = t >= j && t < j + N ? static_cast<int>(t - j) : -1;
                    Vec16<G> o;
                    for (int i = 0; i < N; ++i) o.v[i] = from_f32<G>(elem_grad(v[i], i == ti, rg));
                    store16(g + j, o);
                    done = true;
                }
            }
            if (!done) grad_scalar(g + j, v, N, j, t, rg);
        }
        if (s.tail0 + threadIdx.x < n) {
            const int64_t j = s.tail0 + threadIdx.x;
            const float v = to_f32(x[j]);
            grad_scalar(g + j, &v, 1, j, t, rg);
        }
    }
}

extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_split_stats_f32(FwlSplitStatsParams p) {
    split_stats_impl<float>(p);
}
extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_split_stats_f16(FwlSplitStatsParams p) {
    split_stats_impl<__half>(p);
}
extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_split_stats_bf16(FwlSplitStatsParams p) {
    split_stats_impl<__nv_bfloat16>(p);
}

#define FWL_SPLIT_GRAD(suffix, L, G)                                                            \
    extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_split_grad_##suffix(FwlSplitGradParams p) { \
        split_grad_impl<L, G>(p);                                                               \
    }
FWL_SPLIT_GRAD(f32_f32, float, float)
FWL_SPLIT_GRAD(f16_f16, __half, __half)
FWL_SPLIT_GRAD(f16_f32, __half, float)
FWL_SPLIT_GRAD(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
FWL_SPLIT_GRAD(bf16_f32, __nv_bfloat16, float)
// the fused linear split: a chunk's f32 logits (the product's output) into 16-bit gradient rows
FWL_SPLIT_GRAD(f32_f16, float, __half)
FWL_SPLIT_GRAD(f32_bf16, float, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(FWL_THREADS) fwl_split_batch(FwlSplitBatchParams p) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (p.mode == FWL_SPLIT_TOTALS) {  // this rank's B and sum of weights (the plan kernel's order)
        __shared__ double part[32];
        double w = 0.0;
        for (int64_t b = threadIdx.x; b < p.batch; b += blockDim.x) w += p.weights[b];
        w = warp_sum(w);
        if (lane == 0) part[warp] = w;
        __syncthreads();
        if (warp == 0) {
            double total = lane < nwarps ? part[lane] : 0.0;
            total = warp_sum(total);
            if (lane == 0) {
                p.totals[0] = static_cast<double>(p.batch);
                p.totals[1] = total;
            }
        }
        return;
    }
    // the other modes sum the gathered pairs in rank order (every thread: the same bits)
    double first = 0.0, second = 0.0;
    for (int r = 0; r < p.ranks; ++r) {
        first += p.gathered[2 * r];
        second += p.gathered[2 * r + 1];
    }
    if (p.mode == FWL_SPLIT_LOSS) {
        if (threadIdx.x == 0) {
            *p.loss = first;
            *p.z_loss = second;
            if (p.loss_f32) *p.loss_f32 = static_cast<float>(first);
        }
        return;
    }
    const double denom = p.reduction == FWL_REDUCE_MEAN ? first : p.reduction == FWL_REDUCE_WEIGHTED_MEAN ? second : 1.0;
    if (threadIdx.x == 0 && p.status && p.reduction == FWL_REDUCE_WEIGHTED_MEAN && !isfinite(denom) &&
        !(p.status->flags & FWL_STATUS_BAD_SAMPLE_WEIGHT)) {
        // every rank's sum finite, the group's not: every w_b / sum would be 0 (the plan kernel's
        // own report of a rank's sum, or of one weight, comes first)
        p.status->flags |= FWL_STATUS_BAD_SAMPLE_WEIGHT;
        p.status->bad_sample_weight = denom;
    }
    const double scale = p.grad_scale_ptr ? static_cast<double>(*p.grad_scale_ptr) : p.grad_scale;
    for (int64_t b = threadIdx.x; b < p.batch; b += blockDim.x) {
        const double r = denom > 0.0 ? p.weights[b] / denom : 0.0;
        const double d = p.row_div[b];
        p.reduce[b] = r;
        p.coef[b] = d > 0.0 ? static_cast<float>(scale * r / d) : 0.f;
    }
}
