// The rows kernels (fwl_rows*, and the lean fwl_rowsl*), included by weighted_loss.cu after the
// element types, the online-softmax statistics and the plan: grid-stride over rows, one block
// per row, the statistics pass keeping what fits of the row in shared memory, then the gradient
// pass; the loss options as weighted_loss.cu's header says.

// Soft-capping in an element loop: CAP = 0 off, 1 on (the rows kernel's two instantiations:
// no dead tanhf per element in the plain loops), -1 decided per call by cap > 0.
constexpr int CAP_OFF = 0, CAP_ON = 1, CAP_RUNTIME = -1;

// A logit as the loss sees it: c * tanh(z / c) with soft-capping (cap > 0), else z.
// (__fmul_rn: the product is rounded here, never fused into a following subtraction, so every
// use of a capped logit, the target's included, sees the same value)
template <int CAP = CAP_RUNTIME> __device__ __forceinline__ float capped(float z, float cap, float inv_cap) {
    if constexpr (CAP == CAP_OFF) return z;
    else if constexpr (CAP == CAP_ON) return __fmul_rn(cap, tanhf(z * inv_cap));
    else return cap > 0.f ? __fmul_rn(cap, tanhf(z * inv_cap)) : z;
}

// What a row's gradient entries follow from, once its statistics are known:
//   non-target: (e * scale - koff) * s,  target: tgrad * s
// with e = exp(z - mx), scale = coef * a / S (row_factors: a = 1 + 2 z_loss lse, S the sum of
// all the row's exponentials), koff = coef * eps / V,
// tgrad as row_factors gives it and s = 1 - tanh^2(z / c) (1 without soft-capping). With every
// option off (a = 1, koff = 0, s = 1) this is coef * (softmax - onehot), the target's entry
// -coef * (sum of the others) / (sum of all).
struct RowGrad {
    float mx, scale, koff, tgrad, cap, inv_cap;
};

// The row's loss in double (row_loss), written by the calling thread when `write`, and its
// RowGrad (row_factors), from the row's merged statistics (`st.s` without the target's term), its
// raw target logit and its weight `coef`: the one definition the rows kernel and the split's
// finish kernel share. `P` is either kernel's parameters (row_loss, row_z, z_loss, smoothing).
template <class P>
__device__ __forceinline__ RowGrad row_finish(const P &p, const MS &st, float target, float coef, float cap,
                                              float inv_cap, int64_t V, int64_t grow, bool write) {
    // the target capped as every element of the row was (`capped`, f32 tanhf): with the double
    // tanh, a row its target dominates could come out with a loss below 0
    const float tl = capped(target, cap, inv_cap);
    if (write) {
        const RowLoss l = row_loss(st, tl, p.smoothing, p.z_loss, V);
        p.row_loss[grow] = l.loss;
        if (p.row_z) p.row_z[grow] = l.zl;
    }
    const RowFactors f = row_factors(st, tl, static_cast<float>(p.smoothing), static_cast<float>(p.z_loss), coef, V);
    RowGrad rg;
    rg.mx = st.m;
    rg.scale = coef * f.a * f.inv_s;
    rg.koff = static_cast<float>(static_cast<double>(coef) * p.smoothing / static_cast<double>(V));
    rg.tgrad = f.tgrad;
    rg.cap = cap;
    rg.inv_cap = inv_cap;
    return rg;
}

// A row whose target is ignored: its `n` gradient entries (when `g`) and its loss terms are 0,
// by the whole block. Shared by the rows kernel and the split's gradient kernel, like row_finish.
template <typename G, class P> __device__ __forceinline__ void ignored_row(const P &p, G *g, int64_t n, int64_t grow) {
    if (g)
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) g[j] = from_f32<G>(0.f);
    if (threadIdx.x == 0) {
        p.row_loss[grow] = 0.0;
        if (p.row_z) p.row_z[grow] = 0.0;
    }
}

// The soft-cap's chain factor 1 − tanh²(x), t = tanhf(x): from t while |x| < 1/2 (1 − t² >
// 0.78, no cancellation), beyond as 4u / (1 + u)² with u = e^{−2|x|}. Taken from the rounded t
// everywhere it kept only an absolute error of an ulp of 1: 2e-4 of itself at |x| = 5, all of it
// from |x| = 8.7 on (exactly 0), where the row's largest logits, whose softmax weighs most, are.
__device__ __forceinline__ float sech2(float x, float t) {
    const float a = fabsf(x);
    if (a < 0.5f) return fmaf(-t, t, 1.f);
    const float u = expf(-2.f * a);
    const float r = __frcp_rn(1.f + u);
    return 4.f * u * r * r;
}

template <int CAP = CAP_RUNTIME> __device__ __forceinline__ float elem_grad(float z, bool is_target, const RowGrad &r) {
    float s = 1.f;
    if (CAP == CAP_ON || (CAP == CAP_RUNTIME && r.cap > 0.f)) {
        const float x = z * r.inv_cap;
        const float t = tanhf(x);
        z = __fmul_rn(r.cap, t);  // as `capped`
        s = sech2(x, t);
    }
    return is_target ? r.tgrad * s : (__expf(z - r.mx) * r.scale - r.koff) * s;
}

// The gradient of `n` consecutive elements starting at element `j` of a row.
template <int CAP = CAP_RUNTIME, typename G>
__device__ __forceinline__ void grad_scalar(G *g, const float *v, int n, int64_t j, int32_t y, const RowGrad &r) {
    const int t = y >= j && y < j + n ? static_cast<int>(y - j) : -1;  // the target's slot, if here
    for (int i = 0; i < n; ++i) g[i] = from_f32<G>(elem_grad<CAP>(v[i], i == t, r));
}

// A non-target gradient entry of logit z in the lean loops: `e · scale` for the plain loss;
// with OPTS (the fwl_rowslo* kernels) elem_grad's `(e · scale − koff) · s`, soft-capped when CAP
// is CAP_ON. Exponentials from fwl_exp_ftz.
template <int CAP, bool OPTS> __device__ __forceinline__ float lean_entry(float z, const RowGrad &rg) {
    if constexpr (!OPTS) {
        return fwl_exp_ftz(z - rg.mx) * rg.scale;
    } else if constexpr (CAP == CAP_ON) {
        const float x = z * rg.inv_cap;
        const float t = tanhf(x);
        return (fwl_exp_ftz(__fmul_rn(rg.cap, t) - rg.mx) * rg.scale - rg.koff) * sech2(x, t);
    } else {
        return fwl_exp_ftz(z - rg.mx) * rg.scale - rg.koff;
    }
}

// Where a row's 16-byte vectors lie (rows_body's split): `head` unaligned elements, vectors
// [0, nvec) from element `head`, the tail from `tail0`; the vectors below `cached` kept in
// shared memory.
struct RowSplit {
    int64_t head, nvec, tail0, cached;
};

template <typename L> __device__ __forceinline__ RowSplit row_split(const L *x, int64_t V, int64_t cache_vectors) {
    constexpr int N = Vec16<L>::N;
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) & 15) / sizeof(L);
    const int64_t head = min(V, mis ? N - mis : 0);
    const int64_t nvec = (V - head) / N;
    return RowSplit{head, nvec, head + nvec * N, min(nvec, cache_vectors)};
}

// A vector's gradient entries in the lean loops, every one as a non-target entry (lean_entry),
// 16-bit ones converted in pairs: what lean_grad_sweep and the prefetching kernels store.
template <typename G, int CAP, bool OPTS, typename L>
__device__ __forceinline__ Vec16<G> lean_vector(const Vec16<L> &r, const RowGrad &rg) {
    static_assert(sizeof(G) == sizeof(L), "one vector of gradient per vector of logits");
    constexpr int N = Vec16<L>::N;
    float z[N];
    vec_f32(r, z);
    Vec16<G> o;
    if constexpr (sizeof(G) == 2) {
        for (int i = 0; i < N; i += 2)
            from_f32x2<G>(&o.v[i], lean_entry<CAP, OPTS>(z[i], rg), lean_entry<CAP, OPTS>(z[i + 1], rg));
    } else {
        for (int i = 0; i < N; ++i) o.v[i] = from_f32<G>(lean_entry<CAP, OPTS>(z[i], rg));
    }
    return o;
}

// The lean gradient pass over vectors [from, to) of a row (see rows_body's LEAN), read from
// shared memory (FROM_CACHE) or from the logits: every entry written as a non-target one
// (lean_entry), 16-bit ones converted in pairs, then the target's entry `tval` again by the
// thread whose vector holds it (vector `ky`, entry `y`). 32-bit vector indices (a row's vectors
// number under 2^31) and pointers at the row's first whole vector keep the loop's integer work
// small. HINTS: the logits read from global memory for the last time (load16_first), the
// gradient stored streaming (store16_stream).
template <typename L, typename G, int U, bool FROM_CACHE, int CAP = CAP_OFF, bool OPTS = false, bool HINTS = false>
__device__ __forceinline__ void lean_grad_sweep(G *gh, const L *xh, const Vec16<L> *cache, int from, int to, int ky,
                                                G *gy, float tval, const RowGrad &rg) {
    constexpr int N = Vec16<L>::N;
    const int stride = U * static_cast<int>(blockDim.x);
    for (int k0 = from + static_cast<int>(threadIdx.x); k0 < to; k0 += stride) {
        Vec16<L> r[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {  // all U reads before any write (in place: own vectors only)
            const int k = k0 + u * static_cast<int>(blockDim.x);
            if (k < to) r[u] = FROM_CACHE ? cache[k] : HINTS ? load16_first(xh + k * N) : load16(xh + k * N);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = k0 + u * static_cast<int>(blockDim.x);
            if (k >= to) continue;
            const Vec16<G> o = lean_vector<G, CAP, OPTS>(r[u], rg);
            if constexpr (HINTS)
                store16_stream(gh + k * N, o);
            else
                store16(gh + k * N, o);
            if (k == ky) *gy = from_f32<G>(tval);
        }
    }
}

// U: 16-byte loads each thread keeps in flight (1 or 2). For a given block size the statistics,
// loss and gradient are the same bits for every U.
// CAP: CAP_OFF or CAP_ON (see rows_impl). LEAN (the fwl_rowsl* kernels, plain loss, CAP_OFF):
// loops with the options' arithmetic left out: the statistics without the logit sum,
// exponentials from fwl_exp_ftz, 32-bit vector indices; where G has L's size and the two share
// their alignment (vector_stores), each vector of the gradient written as non-target entries
// `e · scale` (16-bit: converted in pairs), the target's entry written again after it by the
// same thread from the target logit read in pass 1 (lean_grad_sweep); otherwise the default
// gradient loop. LEAN with OPTS (the fwl_rowslo* kernels, any options): the same loops with the
// default kernel's statistics (logit sum, __expf, soft-capped values when CAP_ON) and the
// options' gradient entries (lean_entry). HINTS (the fwl_rowslh* kernels, plain lean loops, one
// load in flight): L2 eviction hints on the vector accesses (see load16_first): in pass 1 the
// cached vectors read evict-first and the others evict-last, in pass 2 the others read
// evict-first and the gradient stored streaming (plain accesses where the row has no gradient or
// the gradient loop is not lean_grad_sweep). The same bits as without.
template <typename L, typename G, int U, int CAP, bool LEAN = false, bool OPTS = false, bool HINTS = false>
__device__ void rows_body(const FwlRowParams &p) {
    static_assert(!OPTS || LEAN, "OPTS: the lean loops with the options");
    static_assert(!HINTS || (LEAN && !OPTS && U == 1), "HINTS: the plain lean loops, one load in flight");
    static_assert(!LEAN || OPTS || CAP == CAP_OFF, "the plain lean loops: no soft-capping");
    // the lean statistics (fwl_exp_ftz, no logit sum) where the loss is plain
    constexpr bool FTZ_STATS = LEAN && !OPTS;
    constexpr int N = Vec16<L>::N;
    extern __shared__ __align__(16) unsigned char fwl_smem[];
    Vec16<L> *cache = reinterpret_cast<Vec16<L> *>(fwl_smem);
    __shared__ MS red[32];
    __shared__ float target_logit;
    const int64_t V = p.vocab;
    const uint64_t keep = HINTS ? fwl_evict_last() : 0;  // (the L2 policy of the re-read vectors)

    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const L *x = static_cast<const L *>(p.logits) + row * V;
        G *g = p.grad ? static_cast<G *>(p.grad) + row * V : nullptr;
        const int64_t grow = p.row_offset + row;  // the plan's row: targets, coef, row_loss
        const int32_t y = p.targets[grow];  // the same for the whole block: uniform branches
        if (y < 0) {
            ignored_row(p, g, V, grow);
            continue;
        }
        // read before any write (in place)
        if (threadIdx.x == 0) target_logit = to_f32(x[y]);

        // split: unaligned head, 16-byte vectors [0, nvec), tail; vectors below `cached` cached
        const RowSplit sp = row_split(x, V, p.smem_vectors);
        const int64_t head = sp.head, nvec = sp.nvec, tail0 = sp.tail0, cached = sp.cached;

        // pass 1: statistics, keeping the vectors below `cached` in shared memory. U loads in
        // flight per thread; each thread still folds its vectors in the order k, k + blockDim.x,
        // ..., so the statistics do not depend on U
        const float cap = p.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f;
        // the target's vector (-1: in the head or the tail); its value stays out of the sum of
        // exponentials (ms_push's skip), pushed by the one thread that reads it
        const int64_t yo = y - head;
        const int64_t ky = yo >= 0 && yo < nvec * N ? yo / N : -1;
        MS acc{-INFINITY, 0.f, 0.f, 0.f};
        if (threadIdx.x < head) {
            const float v = capped<CAP>(to_f32(x[threadIdx.x]), cap, inv_cap);
            ms_push<FTZ_STATS>(acc, &v, 1, static_cast<int64_t>(threadIdx.x) == y ? 0 : -1);
        }
        if constexpr (LEAN) {
            // 32-bit vector indices, as in lean_grad_sweep
            const L *xh = x + head;
            // (HINTS: the vectors past `cached` are read again by lean_grad_sweep, as below; a
            // call without a gradient or without vector stores keeps plain accesses)
            const bool rereads = HINTS && g && sizeof(G) == sizeof(L) && p.vector_stores;
            const int kn = static_cast<int>(nvec), kc = static_cast<int>(cached), kt = static_cast<int>(ky);
            // a vector's values into the statistics (the target's slot, when it is this one, left
            // out of the sum)
            auto fold = [&](const Vec16<L> &r, int k) {
                float v[N];
                vec_f32(r, v);
                for (int i = 0; i < N; ++i) v[i] = capped<CAP>(v[i], cap, inv_cap);
                if (k != kt)
                    ms_push<FTZ_STATS>(acc, v, N);
                else
                    ms_push<FTZ_STATS>(acc, v, N, static_cast<int>(yo) - k * N);
            };
            if constexpr (U == 1) {
                // the cached vectors, then the others, each thread in its order k, k + blockDim.x, ...
                // (the loads as arguments: one loop per kind of access, no choice per vector)
                const int bd = static_cast<int>(blockDim.x);
                auto sweep = [&](auto first, auto rest) {
                    int k = static_cast<int>(threadIdx.x);
                    for (; k < kc; k += bd) {
                        const Vec16<L> r = first(xh + k * N);
                        cache[k] = r;
                        fold(r, k);
                    }
                    for (; k < kn; k += bd) fold(rest(xh + k * N), k);
                };
                auto plain = [](const L *a) { return load16(a); };
                if (rereads)
                    sweep([](const L *a) { return load16_first(a); }, [&](const L *a) { return load16_last(a, keep); });
                else
                    sweep(plain, plain);
            } else {
                const int stride = U * static_cast<int>(blockDim.x);
                for (int k0 = static_cast<int>(threadIdx.x); k0 < kn; k0 += stride) {
                    Vec16<L> r[U];
#pragma unroll
                    for (int u = 0; u < U; ++u) {
                        const int k = k0 + u * static_cast<int>(blockDim.x);
                        if (k < kn) r[u] = load16(xh + k * N);
                    }
#pragma unroll
                    for (int u = 0; u < U; ++u) {
                        const int k = k0 + u * static_cast<int>(blockDim.x);
                        if (k < kn) {
                            if (k < kc) cache[k] = r[u];
                            fold(r[u], k);
                        }
                    }
                }
            }
        } else {
            for (int64_t k0 = threadIdx.x; k0 < nvec; k0 += static_cast<int64_t>(U) * blockDim.x) {
                Vec16<L> r[U];
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int64_t k = k0 + static_cast<int64_t>(u) * blockDim.x;
                    if (k < nvec) r[u] = load16(x + head + k * N);
                }
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int64_t k = k0 + static_cast<int64_t>(u) * blockDim.x;
                    if (k < nvec) {
                        if (k < cached) cache[k] = r[u];
                        float v[N];
                        for (int i = 0; i < N; ++i) v[i] = capped<CAP>(to_f32(r[u].v[i]), cap, inv_cap);
                        if (k != ky)
                            ms_push<false>(acc, v, N);
                        else
                            ms_push<false>(acc, v, N, static_cast<int>(yo - ky * N));
                    }
                }
            }
        }
        if (tail0 + threadIdx.x < V) {
            const float v = capped<CAP>(to_f32(x[tail0 + threadIdx.x]), cap, inv_cap);
            ms_push<FTZ_STATS>(acc, &v, 1, tail0 + threadIdx.x == y ? 0 : -1);
        }
        const MS st = block_merge(acc, red);  // its barriers also publish the cache and target_logit
        // the row's loss in double: z_max - z[target] can exceed the float range; the options'
        // terms as RowGrad describes
        const float coef = p.coef[grow / p.seq] * (p.token_weights ? p.token_weights[grow + 1] : 1.f);
        // without a gradient only the writing thread (thread 0, which also writes target_logit)
        // reads it: the next row may begin before every thread is past this line, and the others
        // need no RowGrad. With a gradient every thread reads it (the target's term is in
        // RowGrad's factors) before this row's last barrier.
        const bool writer = threadIdx.x == 0;
        const RowGrad rg =
            row_finish(p, st, writer || g ? target_logit : 0.f, coef, cap, inv_cap, V, grow, writer);
        if (!g) continue;

        // pass 2: gradient, each thread writing exactly what it read
        if (threadIdx.x < head) {
            const float v = to_f32(x[threadIdx.x]);
            grad_scalar<CAP>(g + threadIdx.x, &v, 1, threadIdx.x, y, rg);
        }
        bool swept = false;
        if constexpr (LEAN && sizeof(G) == sizeof(L)) {
            if (p.vector_stores) {
                // target_logit: read in pass 1, published by block_merge's barriers, written again
                // only after this row's last barrier
                // the target's entry as the default loop writes it (tgrad, times the soft-cap's
                // chain factor; CAP is CAP_OFF in the plain lean kernels)
                const float tval = elem_grad<CAP>(target_logit, true, rg);
                const int kc = static_cast<int>(cached), kn = static_cast<int>(nvec), kt = static_cast<int>(ky);
                lean_grad_sweep<L, G, U, true, CAP, OPTS, HINTS>(g + head, x + head, cache, 0, kc, kt, g + y, tval, rg);
                lean_grad_sweep<L, G, U, false, CAP, OPTS, HINTS>(g + head, x + head, cache, kc, kn, kt, g + y, tval,
                                                                  rg);
                swept = true;
            }
        }
        if (!swept) {
            for (int64_t k0 = threadIdx.x; k0 < nvec; k0 += static_cast<int64_t>(U) * blockDim.x) {
                Vec16<L> r[U];
#pragma unroll
                for (int u = 0; u < U; ++u) {  // all U reads before any write (in place: own vectors only)
                    const int64_t k = k0 + static_cast<int64_t>(u) * blockDim.x;
                    if (k < nvec) r[u] = k < cached ? cache[k] : load16(x + head + k * N);
                }
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int64_t k = k0 + static_cast<int64_t>(u) * blockDim.x;
                    if (k >= nvec) continue;
                    const int64_t j = head + k * N;
                    float v[N];
                    for (int i = 0; i < N; ++i) v[i] = to_f32(r[u].v[i]);
                    bool done = false;
                    if constexpr (sizeof(G) == sizeof(L)) {
                        if (p.vector_stores) {
                            const int t = y >= j && y < j + N ? static_cast<int>(y - j) : -1;
                            Vec16<G> o;
                            for (int i = 0; i < N; ++i) o.v[i] = from_f32<G>(elem_grad<CAP>(v[i], i == t, rg));
                            store16(g + j, o);
                            done = true;
                        }
                    }
                    if (!done) grad_scalar<CAP>(g + j, v, N, j, y, rg);
                }
            }
        }
        if (tail0 + threadIdx.x < V) {
            const int64_t j = tail0 + threadIdx.x;
            const float v = to_f32(x[j]);
            grad_scalar<CAP>(g + j, &v, 1, j, y, rg);
        }
        // the next row's pass 1 overwrites the cache: wait until every thread is done with it
        __syncthreads();
    }
}

// A compile-time flag as a value (a generic lambda's argument picks its instantiation).
template <bool B> struct Flag {
    static constexpr bool value = B;
};

// The next row's cached vectors, copied into shared memory by each thread for its own vectors
// (k = threadIdx.x + i · blockDim.x, the order both passes visit them) while this row is still
// being worked on: `mine` of them, the i-th issued only once this row is done with the i-th
// (`issue(i)`, in order), in at most 8 groups of `per` (the pass that reads them waits for the
// groups one after the other).
template <typename L> struct RowPrefetch {
    const L *x;  // the next row's first whole vector
    int mine, per;
    int left;  // copies until the current group closes
    uint64_t policy;

    __device__ __forceinline__ static int own(int64_t cached) {
        const int t = static_cast<int>(threadIdx.x), c = static_cast<int>(cached), b = static_cast<int>(blockDim.x);
        return c > t ? (c - 1 - t) / b + 1 : 0;
    }
    __device__ __forceinline__ static int group_size(int mine) { return mine > 8 ? (mine + 7) / 8 : 1; }
    __device__ __forceinline__ void issue(Vec16<L> *cache, int i) {
        const int k = static_cast<int>(threadIdx.x) + i * static_cast<int>(blockDim.x);
        cp_async16(cache + k, x + k * Vec16<L>::N, policy);
        if (--left == 0 || i + 1 == mine) {
            cp_async_commit();
            left = per;
        }
    }
};

// The prefetching lean kernels (fwl_rowslp_*, the plain loss): rows_body's lean loops with
// HINTS, the same bits, but a row's cached part comes into shared memory by asynchronous copies
// (cp_async16) issued while the block works on its previous row, each vector's copy as soon as
// the gradient pass is done with that slot: the block's next row is on its way while this one's
// gradient is written, and no thread waits for a load it could have issued earlier. The part of
// a row beyond the cache is read as the hints kernels read it (evict-last, then evict-first).
// Meant for one block per multiprocessor with the whole shared memory (227 KiB on sm_90: all of
// a 50000-entry f32 row, 90% of a 128256-entry bf16 one).
template <typename L, typename G> __device__ void rows_prefetch_body(const FwlRowParams &p) {
    constexpr int N = Vec16<L>::N;
    extern __shared__ __align__(16) unsigned char fwl_smem[];
    Vec16<L> *cache = reinterpret_cast<Vec16<L> *>(fwl_smem);
    __shared__ MS red[32];
    __shared__ float target_logit;
    const int64_t V = p.vocab;
    const L *logits = static_cast<const L *>(p.logits);
    const uint64_t keep = fwl_evict_last(), once = fwl_evict_first();
    const int t = static_cast<int>(threadIdx.x), bd = static_cast<int>(blockDim.x);
    // without a gradient nothing is kept (the pass reads each vector once)
    const int64_t cache_vectors = p.grad ? p.smem_vectors : 0;
    // the next row's copies (none past the last row, none for a row whose target is ignored:
    // its gradient is zeros and its logits are not read)
    auto next_of = [&](int64_t row) {
        RowPrefetch<L> n{nullptr, 0, 1, 1, once};
        if (row < p.rows && p.targets[p.row_offset + row] >= 0) {
            const L *x = logits + row * V;
            const RowSplit s = row_split(x, V, cache_vectors);
            n.x = x + s.head;
            n.mine = RowPrefetch<L>::own(s.cached);
            n.per = n.left = RowPrefetch<L>::group_size(n.mine);
        }
        return n;
    };
    {
        RowPrefetch<L> first = next_of(blockIdx.x);
        for (int i = 0; i < first.mine; ++i) first.issue(cache, i);
    }

    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const L *x = logits + row * V;
        G *g = p.grad ? static_cast<G *>(p.grad) + row * V : nullptr;
        const int64_t grow = p.row_offset + row;
        const int32_t y = p.targets[grow];
        const RowSplit sp = row_split(x, V, cache_vectors);
        const int my = RowPrefetch<L>::own(sp.cached), per = RowPrefetch<L>::group_size(my);
        const int groups = (my + per - 1) / per;
        RowPrefetch<L> next = next_of(row + gridDim.x);
        if (y < 0) {
            // (no copy of this row was issued: next_of; the earlier rows' were all waited for)
            for (int i = 0; i < next.mine; ++i) next.issue(cache, i);
            ignored_row(p, g, V, grow);
            continue;
        }
        if (threadIdx.x == 0) target_logit = to_f32(x[y]);
        const int64_t head = sp.head, tail0 = sp.tail0;
        const int64_t yo = y - head;
        const int64_t ky = yo >= 0 && yo < sp.nvec * N ? yo / N : -1;
        MS acc{-INFINITY, 0.f, 0.f, 0.f};
        if (threadIdx.x < head) {
            const float v = to_f32(x[threadIdx.x]);
            ms_push<true>(acc, &v, 1, static_cast<int64_t>(threadIdx.x) == y ? 0 : -1);
        }
        const L *xh = x + head;
        const bool vec = sizeof(G) == sizeof(L) && p.vector_stores;
        const bool rereads = g && vec;  // (as rows_body's HINTS)
        const int kn = static_cast<int>(sp.nvec), kc = static_cast<int>(sp.cached), kt = static_cast<int>(ky);
        // pass 1: the cached vectors as their copies' groups complete, the rest from global memory
        {
            auto fold = [&](const Vec16<L> &r, int k) {
                float v[N];
                vec_f32(r, v);
                if (k != kt)
                    ms_push<true>(acc, v, N);
                else
                    ms_push<true>(acc, v, N, static_cast<int>(yo) - k * N);
            };
            // (group by group: before the first vector of each, wait until the later ones alone
            // may be pending)
            int k = t, pending = groups;
            for (int i = 0; k < kc; k += bd) {
                if (i-- == 0) {
                    cp_async_wait(--pending);
                    i = per - 1;
                }
                fold(cache[k], k);
            }
            if (rereads)
                for (; k < kn; k += bd) fold(load16_last(xh + k * N, keep), k);
            else
                for (; k < kn; k += bd) fold(load16(xh + k * N), k);
        }
        if (tail0 + threadIdx.x < V) {
            const float v = to_f32(x[tail0 + threadIdx.x]);
            ms_push<true>(acc, &v, 1, tail0 + threadIdx.x == y ? 0 : -1);
        }
        const MS st = block_merge(acc, red);  // its barriers also publish target_logit
        const float coef = p.coef[grow / p.seq] * (p.token_weights ? p.token_weights[grow + 1] : 1.f);
        const bool writer = threadIdx.x == 0;
        const RowGrad rg =
            row_finish(p, st, writer || g ? target_logit : 0.f, coef, 0.f, 0.f, V, grow, writer);
        if (!g) continue;  // (no cache without a gradient: nothing of the next row to copy)

        // pass 2: the gradient, each thread writing what it read; each cached slot, once done
        // with, receives the next row's vector
        if (threadIdx.x < head) {
            const float v = to_f32(x[threadIdx.x]);
            grad_scalar<CAP_OFF>(g + threadIdx.x, &v, 1, threadIdx.x, y, rg);
        }
        const float tval = elem_grad<CAP_OFF>(target_logit, true, rg);
        G *gh = g + head;
        // the loops once with vector stores (VEC) and once without, so that no vector chooses
        auto sweep = [&](auto vector) {
            constexpr bool VEC = decltype(vector)::value && sizeof(G) == sizeof(L);
            // a vector's gradient entries, written (with vector stores the target's again after
            // its vector)
            auto write = [&](const Vec16<L> &r, int k) {
                if constexpr (VEC) {
                    store16_stream(gh + k * N, lean_vector<G, CAP_OFF, false>(r, rg));
                    if (k == kt) g[y] = from_f32<G>(tval);
                } else {
                    float v[N];
                    for (int j = 0; j < N; ++j) v[j] = to_f32(r.v[j]);
                    const int64_t j0 = head + static_cast<int64_t>(k) * N;
                    grad_scalar<CAP_OFF>(g + j0, v, N, j0, y, rg);
                }
            };
            // the cached vectors, each slot then taking the next row's; then the others
            int k = t;
            for (int i = 0; k < kc; k += bd, ++i) {
                write(cache[k], k);
                if (i < next.mine) next.issue(cache, i);
            }
            if (rereads)
                for (; k < kn; k += bd) write(load16_first(xh + k * N), k);
            else
                for (; k < kn; k += bd) write(load16(xh + k * N), k);
        };
        if (vec)
            sweep(Flag<true>{});
        else
            sweep(Flag<false>{});
        for (int j = my; j < next.mine; ++j) next.issue(cache, j);  // slots this row did not cache
        if (tail0 + threadIdx.x < V) {
            const int64_t j = tail0 + threadIdx.x;
            const float v = to_f32(x[j]);
            grad_scalar<CAP_OFF>(g + j, &v, 1, j, y, rg);
        }
        // target_logit and red are rewritten by the next row (the cache slots are each thread's own)
        __syncthreads();
    }
}

// The rows kernel: the soft-cap decided once per launch (uniform), so that the loops of each
// instantiation carry only their own arithmetic.
template <typename L, typename G, int U> __device__ void rows_impl(const FwlRowParams &p) {
    if (p.softcap > 0.f)
        rows_body<L, G, U, CAP_ON>(p);
    else
        rows_body<L, G, U, CAP_OFF>(p);
}

// One rows kernel per (logits, gradient) pair, one load in flight: fwl_rows_* (the kernels with
// 2 and 4 loads in flight lost to the lean ones at every shape of the H200's sweeps and are gone).
#define FWL_ROWS_ONE(name, L, G, U)                                                             \
    extern "C" __global__ void __launch_bounds__(FWL_THREADS) name(FwlRowParams p) { rows_impl<L, G, U>(p); }
// The lean kernels fwl_rowsl<U>_* (U = 1, 2): rows_body's LEAN loops alone, kernels of their own
// so that their registers are allocated apart from the options' loops. The host launches them only
// for the plain loss (no soft-capping, label smoothing or z-loss). With U = 1, on the
// architectures with 2048 threads per SM (sm_80, sm_90), at most 32 registers: two resident
// blocks of 1024 threads (FWL_CUDA_BLOCKS_PER_SM=2; a few bytes of per-row spills, none in the
// loops), where ptxas left to itself takes 40 and leaves room for one.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 800 || __CUDA_ARCH__ >= 900)
#define FWL_LEAN_MIN_BLOCKS(U) ((U) == 1 ? 2 : 1)
#else
#define FWL_LEAN_MIN_BLOCKS(U) 1
#endif
#define FWL_ROWS_LEAN(name, L, G, U)                                                            \
    extern "C" __global__ void __launch_bounds__(FWL_THREADS, FWL_LEAN_MIN_BLOCKS(U)) name(FwlRowParams p) { \
        rows_body<L, G, U, CAP_OFF, true>(p);                                                   \
    }
// The lean kernels with the loss options, fwl_rowslo_* (one load in flight): the soft-cap decided
// once per launch, as rows_impl does. The host launches them where the loss has an option.
#define FWL_ROWS_LEAN_OPTS(name, L, G)                                                          \
    extern "C" __global__ void __launch_bounds__(FWL_THREADS) name(FwlRowParams p) {            \
        if (p.softcap > 0.f)                                                                    \
            rows_body<L, G, 1, CAP_ON, true, true>(p);                                          \
        else                                                                                    \
            rows_body<L, G, 1, CAP_OFF, true, true>(p);                                         \
    }
// The lean plain kernels with L2 eviction hints, fwl_rowslh_* (FWL_CUDA_ROW_HINTS; one load in
// flight, the register bound of fwl_rowsl_*).
#define FWL_ROWS_LEAN_HINTS(name, L, G)                                                         \
    extern "C" __global__ void __launch_bounds__(FWL_THREADS, FWL_LEAN_MIN_BLOCKS(1)) name(FwlRowParams p) { \
        rows_body<L, G, 1, CAP_OFF, true, false, true>(p);                                      \
    }
// The prefetching lean plain kernels, fwl_rowslp_* (FWL_CUDA_ROW_PREFETCH): one block per
// multiprocessor and the whole shared memory (see rows_prefetch_body).
#define FWL_ROWS_LEAN_PREFETCH(name, L, G)                                                      \
    extern "C" __global__ void __launch_bounds__(FWL_THREADS, 1) name(FwlRowParams p) {         \
        rows_prefetch_body<L, G>(p);                                                            \
    }
#define FWL_ROWS(suffix, L, G)                                                                  \
    FWL_ROWS_LEAN(fwl_rowsl_##suffix, L, G, 1)                                                  \
    FWL_ROWS_LEAN_HINTS(fwl_rowslh_##suffix, L, G)                                              \
    FWL_ROWS_LEAN_PREFETCH(fwl_rowslp_##suffix, L, G)                                           \
    FWL_ROWS_LEAN_OPTS(fwl_rowslo_##suffix, L, G)                                               \
    FWL_ROWS_LEAN(fwl_rowsl2_##suffix, L, G, 2)                                                 \
    FWL_ROWS_ONE(fwl_rows_##suffix, L, G, 1)

FWL_ROWS(f32_f32, float, float)
FWL_ROWS(f16_f16, __half, __half)
FWL_ROWS(f16_f32, __half, float)
FWL_ROWS(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
FWL_ROWS(bf16_f32, __nv_bfloat16, float)
// f32 logits with a 16-bit gradient: the fused linear path's f32 chunk logits of 16-bit inputs
FWL_ROWS(f32_f16, float, __half)
FWL_ROWS(f32_bf16, float, __nv_bfloat16)
