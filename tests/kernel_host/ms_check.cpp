// Host check of the CUDA kernels' online-softmax statistics (struct MS, z_rebase, ms_merge,
// ms_push from kernels/weighted_loss.cu, included as "ms.inc" by tests/kernel_host.rs): rows folded
// as a block folds them (pushes of 1..8 values per thread, a butterfly per warp of 32 lanes, the
// warps' results merged the same way), and as the split folds them (uneven slices merged in rank
// order), against float64. Prints one line per check; exits 1 on the first failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __expf expf
// the lean loops' exponential (ex2.approx.ftz on the device; flushing aside, exp)
static inline float fwl_exp_ftz(float x) { return expf(x); }
#include "ms.inc"

static int failures = 0;

static void expect(bool ok, const char *what, double a, double b) {
    if (!ok) {
        std::printf("FAIL %s: %.9g vs %.9g\n", what, a, b);
        ++failures;
    }
}

static const MS EMPTY{-INFINITY, 0.f, 0.f, 0.f};

// What one block computes for a row: thread k folds elements k*8.., k*8+T*8.. in pushes of up to
// 8 (as a 16-byte vector of f16/bf16), then the butterfly of each warp and of the warps' results.
// LEAN: the plain loss's fold (maximum and sum only).
template <bool LEAN = false> static MS block_fold(const std::vector<float> &x, int threads) {
    std::vector<MS> t(threads, EMPTY);
    for (size_t i = 0, k = 0; i < x.size(); i += 8, k = (k + 1) % threads) {
        const int n = static_cast<int>(std::min<size_t>(8, x.size() - i));
        ms_push<LEAN>(t[k], &x[i], n);
    }
    auto butterfly = [](std::vector<MS> lanes) {  // 32 lanes, every lane ends with a merge
        for (int o = 16; o > 0; o >>= 1) {
            std::vector<MS> next(32);
            for (int l = 0; l < 32; ++l) next[l] = ms_merge(lanes[l], lanes[l ^ o]);
            lanes = next;
        }
        return lanes[0];
    };
    std::vector<MS> red(32, EMPTY);
    for (int w = 0; w * 32 < threads; ++w)
        red[w] = butterfly(std::vector<MS>(t.begin() + w * 32, t.begin() + w * 32 + 32));
    return butterfly(red);
}

// lse - mean z in float64 from the statistics, as row_finish takes it.
static double smoothing_term(const MS &st, size_t v) {
    return std::log(static_cast<double>(st.s)) - static_cast<double>(st.z) / static_cast<double>(v);
}

int main() {
    std::mt19937 g(7);
    double worst = 0, worst_raw_at_offset = 0, worst_lean = 0;
    for (int trial = 0; trial < 600; ++trial) {
        const size_t v = 1 + g() % 6000;
        const double offset = std::vector<double>{0, 1e4, -1e4, 1e6, -1e6}[trial % 5];
        std::normal_distribution<float> nd(0.f, 3.f);
        std::vector<float> x(v);
        for (auto &e : x) e = static_cast<float>(offset + nd(g));
        double m = -INFINITY, s = 0, sz = 0;
        for (float e : x) m = std::max(m, static_cast<double>(e));
        for (float e : x) {
            s += std::exp(static_cast<double>(e) - m);
            sz += static_cast<double>(e);
        }
        const double want = std::log(s) - (sz / static_cast<double>(v) - m);
        const int threads = 32 * (1 + static_cast<int>(g() % 8));
        const MS st = block_fold(x, threads);
        expect(st.n == static_cast<float>(v), "count", st.n, static_cast<double>(v));
        // the lean fold: the same maximum, the sum to f32 accuracy, no logit sum or count
        const MS lean = block_fold<true>(x, threads);
        const double lse = m + std::log(s), lean_lse = static_cast<double>(lean.m) + std::log(static_cast<double>(lean.s));
        worst_lean = std::max(worst_lean, std::fabs(lean_lse - lse) / std::max(1.0, std::fabs(lse)));
        expect(lean.m == st.m && lean.z == 0.f && lean.n == 0.f, "lean fold: maximum, no sums", lean.z, 0);
        const double e = std::fabs(smoothing_term(st, v) - want) / std::fabs(want);
        worst = std::max(worst, e);
        // the same row cut into 1..4 uneven slices, each its own block, merged in rank order
        const int ranks = 1 + static_cast<int>(g() % 4);
        std::vector<size_t> cuts{0};
        for (int r = 1; r < ranks; ++r) cuts.push_back(g() % (v + 1));
        cuts.push_back(v);
        std::sort(cuts.begin(), cuts.end());
        MS merged = EMPTY;
        for (int r = 0; r < ranks; ++r) {
            std::vector<float> part(x.begin() + cuts[r], x.begin() + cuts[r + 1]);
            merged = ms_merge(merged, block_fold(part, 64));
        }
        const double es = std::fabs(smoothing_term(merged, v) - want) / std::fabs(want);
        worst = std::max(worst, es);
        if (std::fabs(offset) >= 1e6) {  // what the kernels summed before: the raw logits in f32
            float raw = 0;
            for (float e : x) raw += e;
            const double old = (static_cast<double>(st.m) + std::log(static_cast<double>(st.s))) -
                               static_cast<double>(raw) / static_cast<double>(v);
            worst_raw_at_offset = std::max(worst_raw_at_offset, std::fabs(old - want) / std::fabs(want));
        }
    }
    std::printf("lse - mean z: worst relative error %.3e (a raw f32 sum at offsets of 1e6: %.3e)\n", worst,
                worst_raw_at_offset);
    expect(worst <= 1e-5, "accuracy of lse - mean z", worst, 1e-5);
    std::printf("lse of the lean fold: worst error %.3e (relative, or absolute below 1)\n", worst_lean);
    expect(worst_lean <= 1e-6, "accuracy of the lean fold's lse", worst_lean, 1e-6);
    expect(worst_raw_at_offset >= 1e-3, "the offsets exercise the cancellation", worst_raw_at_offset, 1e-3);

    // edges: an empty side changes nothing; -inf makes the sum -inf (the smoothing term +inf);
    // NaN stays NaN; a row of -inf only has no finite maximum
    const float row[5] = {1.f, 2.f, 3.f, -INFINITY, 4.f};
    MS a = EMPTY;
    ms_push(a, row, 3);
    const MS b = ms_merge(a, EMPTY), c = ms_merge(EMPTY, a);
    expect(b.m == a.m && b.s == a.s && b.z == a.z && b.n == a.n, "merge with an empty side", b.z, a.z);
    expect(c.m == a.m && c.s == a.s && c.z == a.z && c.n == a.n, "merge of an empty side", c.z, a.z);
    MS with_inf = a;
    ms_push(with_inf, row + 3, 2);
    expect(std::isinf(with_inf.z) && with_inf.z < 0 && with_inf.n == 5.f, "-inf logit", with_inf.z, -INFINITY);
    expect(std::isinf(smoothing_term(with_inf, 5)) && smoothing_term(with_inf, 5) > 0, "+inf smoothing term",
           smoothing_term(with_inf, 5), INFINITY);
    const float nan_row[2] = {NAN, 1.f};
    MS with_nan = EMPTY;
    ms_push(with_nan, nan_row, 2);
    expect(std::isnan(with_nan.z) && std::isnan(with_nan.s), "NaN logit", with_nan.z, NAN);
    const float neg[3] = {-INFINITY, -INFINITY, -INFINITY};
    MS all_neg = EMPTY;
    ms_push(all_neg, neg, 3);
    MS later = all_neg;
    ms_push(later, row, 3);  // finite values after -inf ones: the sum stays -inf
    expect(all_neg.m == -INFINITY && all_neg.s == 0.f, "a row of -inf only", all_neg.s, 0);
    expect(std::isinf(later.z) && later.z < 0 && later.m == 3.f, "finite after -inf", later.z, -INFINITY);
    // the rebase: a merge of two sides with different maxima equals one fold of both
    const float left[4] = {10.f, 11.f, 12.f, 13.f}, right[4] = {20.f, 19.f, 18.f, 21.f};
    MS l = EMPTY, r = EMPTY, both = EMPTY;
    ms_push(l, left, 4);
    ms_push(r, right, 4);
    ms_push(both, left, 4);
    ms_push(both, right, 4);
    const MS lr = ms_merge(l, r);
    const float want_z = (10.f + 11.f + 12.f + 13.f + 20.f + 19.f + 18.f + 21.f) - 8.f * 21.f;  // exact
    expect(lr.m == 21.f && lr.z == want_z && lr.n == 8.f, "merge of sides with different maxima", lr.z, want_z);
    expect(both.m == 21.f && both.z == want_z && both.n == 8.f, "one fold across a new maximum", both.z, want_z);
    std::printf(failures ? "FAILED (%d)\n" : "ok\n", failures);
    return failures ? 1 : 0;
}
