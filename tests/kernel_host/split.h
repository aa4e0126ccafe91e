// The vocabulary- and data-parallel split's kernels launched on the emulated device as
// src/cuda/split/call.rs and steps.rs drive them, on a grid of data x vocabulary ranks, the
// exchanges done here in rank order: on each rank the plan of its samples; on a data group of
// more than one the batch totals (fwl_split_batch), gathered over the data ranks ([0, 0] from a
// rank without samples), and the denominator; per chunk of rows the statistics of its columns
// (fwl_split_stats), gathered over the vocabulary ranks, the merge, losses and gradient
// (fwl_split_grad), or with one vocabulary rank its whole rows through the rows kernel; the
// finish, and on a data group of more than one the data ranks' losses combined
// (fwl_split_batch). Every rank of a vocabulary group (the same samples) must come to the same
// bits of its plan, row and per-sample losses, and every rank to the same combined loss (else
// exit 3). Included once, by calls.cpp, after launch.h.
#pragma once

namespace {

// What a split call leaves: every rank's plan and losses, the whole gradient (empty: none), the
// data ranks with samples in sample order, and the rank whose loss scalars are the call's.
struct SplitRun {
    std::vector<std::vector<Planned>> ranks;  // [data rank][vocabulary rank]
    std::vector<float> grad;
    std::vector<const Planned *> parts;
    const Planned *loss = nullptr;
};

// The statistics kernel of the call's logits dtype.
inline auto stats_kernel(const Call &c) {
    return c.ldt == 0 ? fwl_split_stats_f32 : c.ldt == 1 ? fwl_split_stats_f16 : fwl_split_stats_bf16;
}

// The statistics launch of vocabulary rank `r`'s columns (its logits `x`) of rows c0..c0 + n
// into `out`.
inline FwlSplitStatsParams stats_params(const Call &c, const std::vector<int32_t> &targets, const Buffer &x,
                                        size_t r, int64_t c0, int64_t n, int words, float *out) {
    const int64_t len = c.column_cuts[r + 1] - c.column_cuts[r];
    FwlSplitStatsParams sp{};
    sp.logits = x.at + static_cast<size_t>(c0 * len) * dsize(c.ldt);
    sp.targets = targets.data();
    sp.partials = out;
    sp.rows = n;
    sp.row0 = c0;
    sp.len = len;
    sp.v0 = c.column_cuts[r];
    sp.words = words;
    sp.softcap = static_cast<float>(c.softcap);
    return sp;
}

// The statistics kernel's `fold` (the tiled fused linear path on one device: vocabulary blocks
// for ranks): the ranks' statistics of the chunk folded one after another into one buffer must
// be, bit for bit, what the gradient kernel's rank-order merge of the gathered ones gives (it
// then runs with one "rank"). Rows with a target only (the others' merge is never read).
inline void check_fold(const Call &c, const std::vector<int32_t> &targets,
                       const std::vector<std::unique_ptr<Buffer>> &xs, int64_t c0, int64_t n, int words,
                       const std::vector<float> &gathered) {
    const size_t R = xs.size(), W = static_cast<size_t>(words);
    std::vector<float> folded(static_cast<size_t>(n) * W, NAN);
    for (size_t r = 0; r < R; ++r) {
        const int64_t len = c.column_cuts[r + 1] - c.column_cuts[r];
        FwlSplitStatsParams sp = stats_params(c, targets, *xs[r], r, c0, n, words, folded.data());
        sp.fold = r > 0;
        emu::launch(c.grid, c.threads, 0, [&] { stats_kernel(c)(sp); });
    }
    const bool sum_z = words > FWL_SPLIT_WORDS;
    for (int64_t i = 0; i < n; ++i) {
        if (targets[static_cast<size_t>(c0 + i)] < 0) continue;
        const float *q = &gathered[static_cast<size_t>(i) * W];
        MS st{q[0], q[1], sum_z ? q[3] : 0.f, sum_z ? q[4] : 0.f};
        float target = q[2];
        for (size_t r = 1; r < R; ++r) {
            const float *o = q + r * static_cast<size_t>(n) * W;
            st = ms_merge(st, MS{o[0], o[1], sum_z ? o[3] : 0.f, sum_z ? o[4] : 0.f});
            target += o[2];
        }
        float want[5] = {st.m, st.s, target, st.z, st.n};
        if (std::memcmp(want, &folded[static_cast<size_t>(i) * W], W * sizeof(float)) != 0)
            fail(3, "the folded statistics differ from the rank-order merge of the gathered ones");
    }
}


void split(const Call &c, SplitRun &run) {
    const size_t D = c.sample_cuts.size() - 1, R = c.column_cuts.size() - 1, V = static_cast<size_t>(c.V);
    const int64_t T = c.T;
    const int words = c.smoothing != 0.0 ? FWL_SPLIT_WORDS_SMOOTHING : FWL_SPLIT_WORDS;
    const Pair &pair = pair_of(c);
    const auto stats = stats_kernel(c);
    auto samples = [&](size_t d) { return c.sample_cuts[d + 1] - c.sample_cuts[d]; };
    if (D == 1 && samples(0) == 0) fail(1, "a data group of one without samples");
    // rank (d, r) holds the plan of data rank d (one copy per rank: every rank runs its own); a
    // data rank without samples runs no kernel but the loss's combination (call.rs, no_samples)
    auto &ranks = run.ranks;
    ranks.assign(D, std::vector<Planned>(R));
    for (size_t d = 0; d < D; ++d)
        for (size_t r = 0; r < R && samples(d) > 0; ++r) plan(c, c.sample_cuts[d], c.sample_cuts[d + 1], ranks[d][r]);
    // on a data group of more than one (call.rs, begin): the batch totals, all-gathered over the
    // data ranks of each vocabulary rank in rank order ([0, 0] from a rank without samples), and
    // the denominator from them
    for (size_t r = 0; r < R && D > 1; ++r) {
        std::vector<double> gathered(2 * D, NAN);
        for (size_t d = 0; d < D; ++d) {
            if (samples(d) == 0) {
                gathered[2 * d] = gathered[2 * d + 1] = 0.0;
                continue;
            }
            FwlSplitBatchParams bp{};
            bp.weights = ranks[d][r].weights.data();
            bp.totals = &gathered[2 * d];
            bp.batch = ranks[d][r].B;
            bp.mode = FWL_SPLIT_TOTALS;
            batch(c, bp);
        }
        for (size_t d = 0; d < D; ++d) {
            if (samples(d) == 0) continue;
            Planned &p = ranks[d][r];
            FwlSplitBatchParams bp{};
            bp.weights = p.weights.data();
            bp.row_div = p.row_div.data();
            bp.gathered = gathered.data();
            bp.reduce = p.reduce.data();
            bp.coef = p.coef.data();
            bp.grad_scale_ptr = c.scale_on_device ? &p.device_scale : nullptr;
            bp.status = &p.status;
            bp.grad_scale = c.scale_on_device ? 987.0 : c.grad_scale;  // (ignored with the device scalar)
            bp.batch = p.B;
            bp.ranks = static_cast<int32_t>(D);
            bp.reduction = static_cast<int32_t>(c.reduction);
            bp.mode = FWL_SPLIT_DENOMINATOR;
            batch(c, bp);
        }
    }
    auto &grad = run.grad;
    grad.assign(c.grad_mode ? c.logits.size() : 0, NAN);
    for (size_t d = 0; d < D; ++d) {
        if (samples(d) == 0) continue;
        const int64_t rows = ranks[d][0].B * T, row_first = c.sample_cuts[d] * T;
        // each vocabulary rank's columns of the data rank's rows, as that rank holds them
        std::vector<std::unique_ptr<Buffer>> xs, gs;
        for (size_t r = 0; r < R; ++r) {
            const size_t v0 = static_cast<size_t>(c.column_cuts[r]), len = static_cast<size_t>(c.column_cuts[r + 1]) - v0;
            const size_t n = static_cast<size_t>(rows) * len;
            xs.push_back(std::make_unique<Buffer>(n, dsize(c.ldt), static_cast<size_t>(c.loff)));
            std::vector<float> part(n);
            for (int64_t i = 0; i < rows; ++i)
                std::memcpy(&part[static_cast<size_t>(i) * len], &c.logits[static_cast<size_t>(row_first + i) * V + v0],
                            len * sizeof(float));
            store_dtype(c.ldt, xs.back()->at, part.data(), n);
            gs.push_back(std::make_unique<Buffer>(c.grad_mode == 1 ? n : 0, dsize(c.gdt), static_cast<size_t>(c.goff)));
        }
        if (c.whole_rows) {  // one vocabulary rank: its rows whole in one launch (call.rs)
            unsigned char *x = xs[0]->at;
            launch_rows(c, ranks[d][0], x, c.grad_mode == 0 ? nullptr : c.grad_mode == 2 ? x : gs[0]->at, rows, rows);
        }
        for (int64_t c0 = 0; c0 < rows && !c.whole_rows; c0 += c.chunk) {
            const int64_t n = std::min(c.chunk, rows - c0);
            // every rank's statistics of the chunk, concatenated in rank order (the all-gather)
            std::vector<float> gathered(R * static_cast<size_t>(n * words), NAN);
            for (size_t r = 0; r < R; ++r) {
                const FwlSplitStatsParams sp = stats_params(c, ranks[d][r].targets, *xs[r], r, c0, n, words,
                                                            &gathered[r * static_cast<size_t>(n * words)]);
                emu::launch(c.grid, c.threads, 0, [&] { stats(sp); });
            }
            check_fold(c, ranks[d][0].targets, xs, c0, n, words, gathered);
            for (size_t r = 0; r < R; ++r) {
                Planned &p = ranks[d][r];
                const int64_t len = c.column_cuts[r + 1] - c.column_cuts[r];
                unsigned char *x = xs[r]->at + static_cast<size_t>(c0 * len) * dsize(c.ldt);
                unsigned char *g = c.grad_mode == 0   ? nullptr
                                   : c.grad_mode == 2 ? x
                                                      : gs[r]->at + static_cast<size_t>(c0 * len) * dsize(c.gdt);
                FwlSplitGradParams gp{};
                gp.logits = x;
                gp.grad = g;
                gp.gathered = gathered.data();
                gp.targets = p.targets.data();
                gp.coef = p.coef.data();
                gp.token_weights = c.has_tw ? p.tw.data() : nullptr;
                gp.row_loss = p.row_loss.data();
                gp.row_z = c.z_loss != 0.0 ? p.row_z.data() : nullptr;
                gp.rows = n;
                gp.row0 = c0;
                gp.seq = T;
                gp.len = len;
                gp.v0 = c.column_cuts[r];
                gp.vocab = c.V;
                gp.ranks = static_cast<int32_t>(R);
                gp.words = words;
                gp.vector_stores = dsize(c.ldt) == dsize(c.gdt) &&
                                   reinterpret_cast<uintptr_t>(g) % 16 == reinterpret_cast<uintptr_t>(x) % 16;
                gp.softcap = static_cast<float>(c.softcap);
                gp.z_loss = c.z_loss;
                gp.smoothing = c.smoothing;
                emu::launch(c.grid, c.threads, 0, [&] { pair.split_grad(gp); });
            }
        }
        for (size_t r = 0; r < R; ++r) {
            xs[r]->check_guards("logits");
            gs[r]->check_guards("gradient");
        }
        // each rank's gradient of its columns into the whole
        for (size_t r = 0; r < R && c.grad_mode; ++r) {
            const size_t v0 = static_cast<size_t>(c.column_cuts[r]), len = static_cast<size_t>(c.column_cuts[r + 1]) - v0;
            const void *g = c.grad_mode == 2 ? xs[r]->at : gs[r]->at;
            for (int64_t i = 0; i < rows; ++i)
                for (size_t j = 0; j < len; ++j)
                    grad[static_cast<size_t>(row_first + i) * V + v0 + j] = load_dtype(c.gdt, g, static_cast<size_t>(i) * len + j);
        }
        for (size_t r = 0; r < R; ++r) finish(c, ranks[d][r]);
    }
    // on a data group of more than one (call.rs, end; no_samples): the data ranks' losses
    // all-gathered and summed in rank order, on every rank ([0, 0] from a rank without samples)
    for (size_t r = 0; r < R && D > 1; ++r) {
        std::vector<double> gathered(2 * D, 0.0);
        for (size_t d = 0; d < D; ++d)
            if (samples(d) > 0) gathered[2 * d] = ranks[d][r].loss, gathered[2 * d + 1] = ranks[d][r].zl;
        for (size_t d = 0; d < D; ++d) {
            Planned &p = ranks[d][r];
            FwlSplitBatchParams bp{};
            bp.gathered = gathered.data();
            bp.loss = &p.loss;
            bp.z_loss = &p.zl;
            bp.loss_f32 = &p.loss_f32;
            bp.ranks = static_cast<int32_t>(D);
            bp.mode = FWL_SPLIT_LOSS;
            batch(c, bp);
        }
    }
    // every rank of a vocabulary group (the same samples) the same bits, and every rank the same loss
    auto same = [](const auto &a, const auto &b) {
        return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0;
    };
    const Planned &first = ranks[0][0];
    for (size_t d = 0; d < D; ++d)
        for (size_t r = 0; r < R; ++r) {
            const Planned &b = ranks[d][r], &s = ranks[d][0];
            if (std::memcmp(&first.loss, &b.loss, 8) || std::memcmp(&first.zl, &b.zl, 8) ||
                std::memcmp(&first.loss_f32, &b.loss_f32, 4))
                fail(3, "the ranks' combined losses differ");
            if (samples(d) == 0) continue;
            if (!same(s.row_loss, b.row_loss) || !same(s.per_sample, b.per_sample) || !same(s.reduce, b.reduce) ||
                !same(s.coef, b.coef) || !same(s.weights, b.weights) || !same(s.valid, b.valid) ||
                (c.z_loss != 0.0 && (!same(s.row_z, b.row_z) || !same(s.per_sample_z, b.per_sample_z))) ||
                s.status.flags != b.status.flags)
                fail(3, "the ranks of a vocabulary group differ");
        }
    for (size_t d = 0; d < D; ++d)
        if (samples(d) > 0) run.parts.push_back(&ranks[d][0]);
    run.loss = D > 1 ? &ranks[0][0] : run.parts[0];
}

}  // namespace
