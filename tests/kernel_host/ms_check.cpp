// Host check of the CUDA kernels' online-softmax statistics (struct MS, z_rebase, ms_merge,
// ms_push, row_loss, row_factors from kernels/weighted_loss.cu, included as "ms.inc" by tests/kernel_host.rs): rows folded
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

// The larger of a running worst error and a new one, NaN kept (std::max(worst, NaN) keeps worst:
// a NaN error never reached the bound's check)
// (a NaN, once in, stays: the bounds' `<=` then fails)
static double worse(double worst, double e) { return std::isnan(worst) || e <= worst ? worst : e; }

// What one block computes for a row: thread k folds elements k*8.., k*8+T*8.. in pushes of up to
// 8 (as a 16-byte vector of f16/bf16), then the butterfly of each warp and of the warps' results.
// LEAN: the plain loss's fold (maximum and sum only).
// `skip`: the index of the row's target, left out of the sum (-1: none here), as the kernels push it.
template <bool LEAN = false> static MS block_fold(const std::vector<float> &x, int threads, long skip = -1) {
    std::vector<MS> t(threads, EMPTY);
    for (size_t i = 0, k = 0; i < x.size(); i += 8, k = (k + 1) % threads) {
        const int n = static_cast<int>(std::min<size_t>(8, x.size() - i));
        const long at = skip - static_cast<long>(i);
        ms_push<LEAN>(t[k], &x[i], n, at >= 0 && at < n ? static_cast<int>(at) : -1);
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

// The row's loss and the target's gradient entry (row_loss, row_factors) from statistics folded
// with the target left out of the sum, against float64, for rows whose target stands `margin`
// above logits uniform in [-1, 1]: at margins of 14 and more the loss is below 0.03 and a sum that
// holds the target's term (near 1) rounds the others (near 1e-6 each) to a few digits. Folded as
// one block and as uneven slices merged in rank order, with and without smoothing and z-loss.
static void confident_rows() {
    std::mt19937 g(11);
    double worst_loss = 0, worst_grad = 0, worst_old = 0;
    for (int trial = 0; trial < 400; ++trial) {
        const size_t v = 2 + g() % 40000;
        const double margin = std::vector<double>{0, 4, 8, 14, 18, 22, 26}[trial % 7];
        const double eps = trial % 3 == 1 ? 0.1 : 0.0, zc = trial % 4 == 2 ? 1e-4 : 0.0;
        const float coef = 0.5f + static_cast<float>(g() % 100) / 100.f;
        std::uniform_real_distribution<float> ud(-1.f, 1.f);
        std::vector<float> x(v);
        for (auto &e : x) e = ud(g);
        const size_t y = g() % v;
        x[y] = static_cast<float>(margin + ud(g));
        // float64: lse, the loss and the target's gradient entry (coef (a p_t - (1 - eps) - eps / V))
        double m = -INFINITY, others = 0, sz = 0;
        for (float e : x) m = std::max(m, static_cast<double>(e));
        for (size_t j = 0; j < v; ++j) {
            if (j != y) others += std::exp(static_cast<double>(x[j]) - m);
            sz += static_cast<double>(x[j]) - m;
        }
        const double et = std::exp(static_cast<double>(x[y]) - m), S = others + et, lse = m + std::log(S);
        const double ce = std::log1p(others / et), a = 1.0 + 2.0 * zc * lse;
        const double want = (1.0 - eps) * ce + eps * (std::log(S) - sz / static_cast<double>(v)) + zc * lse * lse;
        const double want_g = coef * (a * (et / S) - (1.0 - eps) - eps / static_cast<double>(v));
        const int threads = 32 * (1 + static_cast<int>(g() % 8));
        MS st = block_fold(x, threads, static_cast<long>(y));
        if (trial % 2) {  // the split: 1..4 uneven slices, the target's slice skipping it
            const int ranks = 1 + static_cast<int>(g() % 4);
            std::vector<size_t> cuts{0};
            for (int r = 1; r < ranks; ++r) cuts.push_back(g() % (v + 1));
            cuts.push_back(v);
            std::sort(cuts.begin(), cuts.end());
            st = EMPTY;
            for (int r = 0; r < ranks; ++r) {
                std::vector<float> part(x.begin() + cuts[r], x.begin() + cuts[r + 1]);
                const long at = static_cast<long>(y) - static_cast<long>(cuts[r]);
                st = ms_merge(st, block_fold(part, 64, at >= 0 && at < static_cast<long>(part.size()) ? at : -1));
            }
        }
        const RowLoss l = row_loss(st, x[y], eps, zc, static_cast<int64_t>(v));
        const RowFactors f = row_factors(st, x[y], static_cast<float>(eps), static_cast<float>(zc), coef,
                                         static_cast<int64_t>(v));
        worst_loss = worse(worst_loss, std::fabs(l.loss - want) / want);
        worst_grad = worse(worst_grad, std::fabs(f.tgrad - want_g) / std::fabs(want_g));
        expect(std::fabs(l.zl - zc * lse * lse) <= 1e-6 * zc * lse * lse, "z-loss term", l.zl,
               zc * lse * lse);
        if (eps == 0.0 && zc == 0.0) {  // what the kernels computed before: the target in the f32 sum
            const MS old = block_fold(x, threads);
            const double old_l = (static_cast<double>(old.m) - x[y]) + std::log(static_cast<double>(old.s));
            worst_old = worse(worst_old, std::fabs(old_l - want) / want);
        }
    }
    std::printf("confident rows: loss worst relative error %.3e, target gradient %.3e (the target in the f32 "
                "sum: %.3e)\n",
                worst_loss, worst_grad, worst_old);
    expect(worst_loss <= 1e-5, "confident rows: the loss", worst_loss, 1e-5);
    expect(worst_grad <= 1e-5, "confident rows: the target's gradient", worst_grad, 1e-5);
    expect(worst_old >= 1e-3, "confident rows: the margins reach the old sum's rounding", worst_old, 1e-3);
    // V = 1: the target alone; a row of one -inf target among finite others
    const float one[1] = {3.f};
    MS a1 = EMPTY;
    ms_push(a1, one, 1, 0);
    const RowLoss l1 = row_loss(a1, one[0], 0.0, 0.0, 1);
    const RowFactors f1 = row_factors(a1, one[0], 0.f, 0.f, 1.f, 1);
    expect(a1.m == 3.f && a1.s == 0.f && l1.loss == 0.0 && f1.tgrad == 0.f && f1.inv_s == 1.f, "V = 1", l1.loss, 0);
    const float low[3] = {1.f, -INFINITY, 2.f};
    MS a3 = EMPTY;
    ms_push(a3, low, 3, 1);
    const RowLoss l3 = row_loss(a3, low[1], 0.0, 0.0, 3);
    expect(std::isinf(l3.loss) && l3.loss > 0, "a -inf target: an infinite loss", l3.loss, INFINITY);
    const float nan_t[2] = {1.f, NAN};
    MS a2 = EMPTY;
    ms_push(a2, nan_t, 2, 1);
    expect(std::isnan(row_loss(a2, nan_t[1], 0.0, 0.0, 2).loss), "a NaN target: a NaN loss", 0, NAN);
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
        worst_lean = worse(worst_lean, std::fabs(lean_lse - lse) / std::max(1.0, std::fabs(lse)));
        expect(lean.m == st.m && lean.z == 0.f && lean.n == 0.f, "lean fold: maximum, no sums", lean.z, 0);
        const double e = std::fabs(smoothing_term(st, v) - want) / std::fabs(want);
        worst = worse(worst, e);
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
        worst = worse(worst, es);
        if (std::fabs(offset) >= 1e6) {  // what the kernels summed before: the raw logits in f32
            float raw = 0;
            for (float e : x) raw += e;
            const double old = (static_cast<double>(st.m) + std::log(static_cast<double>(st.s))) -
                               static_cast<double>(raw) / static_cast<double>(v);
            worst_raw_at_offset = worse(worst_raw_at_offset, std::fabs(old - want) / std::fabs(want));
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

    confident_rows();
    std::printf(failures ? "FAILED (%d)\n" : "ok\n", failures);
    return failures ? 1 : 0;
}
