// The CUDA kernels of kernels/weighted_loss.cu run on the host (emu.h) as the crate launches them:
//   - one device (src/cuda/launch.rs): plan (one block), rows (a grid-stride grid, dynamic shared
//     memory for what fits of a row), finish (one block);
//   - the vocabulary- and data-parallel split (src/cuda/split/call.rs and steps.rs) on a grid of
//     data x vocabulary ranks, the exchanges done here in rank order: on each rank the plan of
//     its samples; on a data group of more than one the batch totals (fwl_split_batch),
//     gathered over the data ranks ([0, 0] from a rank without samples), and the denominator;
//     per chunk of rows the statistics of its columns (fwl_split_stats), gathered over the
//     vocabulary ranks, the merge, losses and gradient (fwl_split_grad), or with one vocabulary
//     rank its whole rows through the rows kernel; the finish, and on a data group of more
//     than one the data ranks' losses combined (fwl_split_batch). Every rank of a vocabulary
//     group (the same samples) must come to the same bits of its plan, row and per-sample
//     losses, and every rank to the same combined loss (else exit 3).
// Driven by tests/kernel_emulated.rs, which writes the calls to a file (`calls <in> <out>`) and
// compares the outputs with the float64 reference; tests/common/kernel_calls.rs describes the
// file's layout (`Call` and `Outputs` there, `read_call` and `write_outputs` here). Exits 0 after
// the last call, 1 on a malformed file, 2 on an emulation failure (emu.h), 3 when ranks disagree.
#include <memory>

#include "emu.h"

#include "../../kernels/weighted_loss.cu"

namespace {

FILE *in_file = nullptr;

[[noreturn]] void fail(int code, const char *what) {
    std::fprintf(stderr, "calls: %s\n", what);
    std::exit(code);
}

template <class T> std::vector<T> read_vec(size_t n) {
    std::vector<T> v(n);
    if (n && std::fread(v.data(), sizeof(T), n, in_file) != n) fail(1, "truncated input");
    return v;
}

constexpr int64_t MAGIC = 0x46574c4b01;        // "FWLK", version 1: one device
constexpr int64_t MAGIC_SPLIT = 0x46574c4b02;  // a grid of data x vocabulary ranks
constexpr int HEADER = 22;

// A 16-byte aligned buffer of `n` elements of `size` bytes at `offset` elements past the
// alignment, filled with 0xff bytes (NaN for every float type) as a fresh device allocation could
// hold anything: an element no kernel writes shows.
struct Buffer {
    unsigned char *base = nullptr, *at = nullptr;
    Buffer(size_t n, size_t size, size_t offset) {
        const size_t bytes = ((n + offset) * size + 64 + 63) / 64 * 64;
        base = static_cast<unsigned char *>(std::aligned_alloc(64, bytes));
        std::memset(base, 0xff, bytes);
        at = base + offset * size;
    }
    ~Buffer() { std::free(base); }
    Buffer(const Buffer &) = delete;
    Buffer &operator=(const Buffer &) = delete;
};

size_t dsize(int64_t d) { return d == 0 ? 4 : 2; }
template <class T> void store_as(void *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; ++i) static_cast<T *>(dst)[i] = from_f32<T>(src[i]);
}
void store_dtype(int64_t d, void *dst, const float *src, size_t n) {
    if (d == 0) store_as<float>(dst, src, n);
    else if (d == 1) store_as<__half>(dst, src, n);
    else store_as<__nv_bfloat16>(dst, src, n);
}
float load_dtype(int64_t d, const void *src, size_t i) {
    if (d == 0) return static_cast<const float *>(src)[i];
    if (d == 1) return to_f32(static_cast<const __half *>(src)[i]);
    return to_f32(static_cast<const __nv_bfloat16 *>(src)[i]);
}

// One call as tests/common/kernel_calls.rs writes it (`Call::write`).
struct Call {
    int64_t magic, ldt, gdt, idt, family, B, T, V, ignore_index, row_mean, reduction;
    unsigned threads, grid;
    int64_t smem_cap, loff, grad_mode, goff;
    bool has_labels, has_tw, scale_on_device;
    double alpha, grad_scale, softcap, z_loss, smoothing;
    std::vector<int64_t> kw;
    std::vector<double> kww;
    std::vector<float> logits, tw;
    std::vector<int64_t> ids, labels;
    int64_t chunk = 0;  // rows per launch of the rows (or the split's) kernels
    // the split: sample cuts (data ranks + 1, from 0 to B), column cuts (vocabulary ranks + 1,
    // from 0 to V); with one vocabulary rank, whether the rows kernel of `family` takes the
    // rows whole (launch_whole_rows) instead of the statistics, exchange and gradient
    std::vector<int64_t> sample_cuts, column_cuts;
    bool whole_rows = false;
};

// Returns false at the end of the input.
bool read_call(Call &c) {
    int64_t h[HEADER];
    const size_t got = std::fread(h, sizeof(int64_t), HEADER, in_file);
    if (got == 0 && std::feof(in_file)) return false;
    if (got != HEADER || (h[0] != MAGIC && h[0] != MAGIC_SPLIT)) fail(1, "not a call header");
    c.magic = h[0];
    c.ldt = h[1], c.gdt = h[2], c.idt = h[3], c.family = h[4], c.B = h[5], c.T = h[6], c.V = h[7];
    c.ignore_index = h[8], c.row_mean = h[9], c.reduction = h[10];
    const int64_t nk = h[11];
    c.threads = static_cast<unsigned>(h[12]), c.grid = static_cast<unsigned>(h[13]);
    c.smem_cap = h[14], c.loff = h[15], c.grad_mode = h[16], c.goff = h[17];
    c.has_labels = h[18], c.has_tw = h[19], c.scale_on_device = h[20], c.chunk = h[21];
    const auto f = read_vec<double>(5);
    c.alpha = f[0], c.grad_scale = f[1], c.softcap = f[2], c.z_loss = f[3], c.smoothing = f[4];
    if (nk < 0 || nk > FWL_MAX_KEYWORDS || c.B < 1 || c.T < 2 || c.V < 1 || c.family < 0 || c.family > 5 || c.chunk < 1 ||
        c.ldt < 0 || c.ldt > 2 || c.gdt < 0 || c.gdt > 2 || c.idt < 0 || c.idt > 2 || c.grad_mode < 0 || c.grad_mode > 2 ||
        (c.grad_mode == 2 && c.ldt != c.gdt))
        fail(1, "a call out of range");
    c.kw = read_vec<int64_t>(static_cast<size_t>(nk));
    c.kww = read_vec<double>(static_cast<size_t>(nk));
    const size_t bt = static_cast<size_t>(c.B * c.T);
    c.logits = read_vec<float>(bt * static_cast<size_t>(c.V));
    c.ids = read_vec<int64_t>(bt);
    c.labels = c.has_labels ? read_vec<int64_t>(bt) : std::vector<int64_t>{};
    c.tw = c.has_tw ? read_vec<float>(bt) : std::vector<float>{};
    if (c.magic == MAGIC_SPLIT) {
        const auto n = read_vec<int64_t>(3);  // data ranks, vocabulary ranks, whole rows?
        if (n[0] < 1 || n[1] < 1 || n[1] > c.V || (n[2] && n[1] != 1)) fail(1, "a split out of range");
        c.sample_cuts = read_vec<int64_t>(static_cast<size_t>(n[0] + 1));
        c.column_cuts = read_vec<int64_t>(static_cast<size_t>(n[1] + 1));
        c.whole_rows = n[2];
        for (size_t i = 1; i < c.sample_cuts.size(); ++i)  // (a data rank may hold no sample)
            if (c.sample_cuts[i] < c.sample_cuts[i - 1]) fail(1, "sample cuts in order");
        for (size_t i = 1; i < c.column_cuts.size(); ++i)
            if (c.column_cuts[i] <= c.column_cuts[i - 1]) fail(1, "column cuts: every rank holds columns");
        if (c.sample_cuts.front() != 0 || c.sample_cuts.back() != c.B || c.column_cuts.front() != 0 ||
            c.column_cuts.back() != c.V)
            fail(1, "cuts from 0 to the end");
    }
    return true;
}

// What the plan kernel writes for samples [s0, s1), and the buffers the later kernels fill.
struct Planned {
    int64_t B, T;
    std::vector<int32_t> targets;
    std::vector<double> weights, row_div, reduce, per_sample, per_sample_z, row_loss, row_z;
    std::vector<uint32_t> valid;
    std::vector<float> coef, tw;
    double loss = NAN, zl = NAN;
    float loss_f32 = NAN;
    FwlStatus status;
    float device_scale = NAN;  // the upstream gradient on the device, when the call asks for it
};

// Launches the plan kernel on samples [s0, s1) of the call (filling its outputs with what a fresh
// allocation could hold first).
void plan(const Call &c, int64_t s0, int64_t s1, Planned &p) {
    const int64_t B = s1 - s0, T = c.T;
    const size_t bt = static_cast<size_t>(B * T), first = static_cast<size_t>(s0 * T);
    p.B = B, p.T = T;
    p.targets.assign(bt, 12345);
    for (auto *v : {&p.weights, &p.row_div, &p.reduce, &p.per_sample, &p.per_sample_z}) v->assign(B, NAN);
    p.row_loss.assign(bt, NAN);
    p.row_z.assign(bt, NAN);
    p.valid.assign(B, 777);
    p.coef.assign(B, NAN);
    if (c.has_tw) p.tw.assign(c.tw.begin() + first, c.tw.begin() + first + bt);
    std::memset(&p.status, 0xab, sizeof p.status);
    p.device_scale = static_cast<float>(c.grad_scale);
    const size_t isz = c.idt == 1 ? 8 : 4;
    static std::vector<unsigned char> id_buf, lab_buf;
    id_buf.assign(bt * isz, 0);
    lab_buf.assign(bt * isz, 0);
    for (size_t i = 0; i < bt; ++i) {
        if (c.idt == 1) {
            std::memcpy(&id_buf[i * 8], &c.ids[first + i], 8);
            if (c.has_labels) std::memcpy(&lab_buf[i * 8], &c.labels[first + i], 8);
        } else {  // i32 / u32: the same 4 bytes
            const uint32_t id = static_cast<uint32_t>(c.ids[first + i]);
            std::memcpy(&id_buf[i * 4], &id, 4);
            if (c.has_labels) {
                const uint32_t l = static_cast<uint32_t>(c.labels[first + i]);
                std::memcpy(&lab_buf[i * 4], &l, 4);
            }
        }
    }
    FwlPlanParams pp{};
    pp.ids = id_buf.data();
    pp.labels = c.has_labels ? lab_buf.data() : nullptr;
    pp.batch = B;
    pp.seq = T;
    pp.vocab = c.V;
    pp.ignore_index = c.ignore_index;
    pp.row_mean = static_cast<int32_t>(c.row_mean);
    pp.reduction = static_cast<int32_t>(c.reduction);
    pp.num_keywords = static_cast<int32_t>(c.kw.size());
    for (size_t k = 0; k < c.kw.size(); ++k) {
        pp.keyword_ids[k] = c.kw[k];
        pp.keyword_weights[k] = c.kww[k];
    }
    pp.alpha = c.alpha;
    pp.grad_scale = c.scale_on_device ? 987.0 : c.grad_scale;  // (ignored with the device scalar)
    pp.grad_scale_ptr = c.scale_on_device ? &p.device_scale : nullptr;
    pp.token_weights = c.has_tw ? p.tw.data() : nullptr;
    pp.targets = p.targets.data();
    pp.weights = p.weights.data();
    pp.valid = p.valid.data();
    pp.row_div = p.row_div.data();
    pp.reduce = p.reduce.data();
    pp.coef = p.coef.data();
    pp.status = &p.status;
    emu::launch(1, c.threads, 0, [&] {
        if (c.idt == 0) fwl_plan_i32(pp);
        else if (c.idt == 1) fwl_plan_i64(pp);
        else fwl_plan_u32(pp);
    });
}

void finish(const Call &c, Planned &p) {
    FwlFinishParams fp{};
    fp.row_loss = p.row_loss.data();
    fp.row_z = c.z_loss != 0.0 ? p.row_z.data() : nullptr;
    fp.token_weights = c.has_tw ? p.tw.data() : nullptr;
    fp.targets = p.targets.data();
    fp.row_div = p.row_div.data();
    fp.reduce = p.reduce.data();
    fp.per_sample = p.per_sample.data();
    fp.per_sample_z = p.per_sample_z.data();
    fp.loss = &p.loss;
    fp.z_loss = &p.zl;
    fp.loss_f32 = &p.loss_f32;
    fp.status = &p.status;
    fp.batch = p.B;
    fp.seq = p.T;
    emu::launch(1, c.threads, 0, [&] { fwl_finish(fp); });
}

template <class T> void write_vec(FILE *out, const std::vector<T> &v) {
    if (!v.empty()) std::fwrite(v.data(), sizeof(T), v.size(), out);
}

// The outputs (see tests/common/kernel_calls.rs, `Outputs`) of the data ranks' plans `parts` (in
// sample order), the loss scalars of `loss` and the gradient `grad` (empty: none).
void write_outputs(FILE *out, const std::vector<const Planned *> &parts, const std::vector<float> &grad,
                   const Planned *loss) {
    const Planned &p0 = *loss;
    const double scalars[3] = {p0.loss, p0.zl, static_cast<double>(p0.loss_f32)};
    std::fwrite(scalars, sizeof(double), 3, out);
    // the first rank's report that has one
    const FwlStatus *st = &parts[0]->status;
    for (const Planned *p : parts)
        if (p->status.flags && !st->flags) st = &p->status;
    const int64_t s[7] = {static_cast<int64_t>(st->flags), st->bad_id_index, st->bad_id_value, st->bad_label_index,
                          st->bad_label_value,                st->non_finite_row, st->bad_weight_index};
    std::fwrite(s, sizeof(int64_t), 7, out);
    for (auto field : {&Planned::weights, &Planned::per_sample, &Planned::per_sample_z})
        for (const Planned *p : parts) write_vec(out, p->*field);
    for (const Planned *p : parts) write_vec(out, std::vector<int64_t>(p->valid.begin(), p->valid.end()));
    for (const Planned *p : parts) write_vec(out, p->row_loss);
    write_vec(out, grad);
}

using RowsFn = void (*)(FwlRowParams);
// by (logits, gradient) dtypes, then family: rows, rows2, rows4, rowsl, rowsl2, rowslo
#define FWL_FAMILY(s) {fwl_rows_##s, fwl_rows2_##s, fwl_rows4_##s, fwl_rowsl_##s, fwl_rowsl2_##s, fwl_rowslo_##s}
struct Pair {
    int64_t l, g;
    RowsFn rows[6];
    void (*split_grad)(FwlSplitGradParams);
};
const Pair PAIRS[] = {
    {0, 0, FWL_FAMILY(f32_f32), fwl_split_grad_f32_f32},       {1, 1, FWL_FAMILY(f16_f16), fwl_split_grad_f16_f16},
    {1, 0, FWL_FAMILY(f16_f32), fwl_split_grad_f16_f32},       {2, 2, FWL_FAMILY(bf16_bf16), fwl_split_grad_bf16_bf16},
    {2, 0, FWL_FAMILY(bf16_f32), fwl_split_grad_bf16_f32},     {0, 1, FWL_FAMILY(f32_f16), fwl_split_grad_f32_f16},
    {0, 2, FWL_FAMILY(f32_bf16), fwl_split_grad_f32_bf16},
};
const Pair &pair_of(const Call &c) {
    for (const Pair &p : PAIRS)
        if (p.l == c.ldt && p.g == c.gdt) return p;
    fail(1, "no kernel for these dtypes");
}

// The rows kernel of the call's family on `rows` rows of logits at `x` (gradient at `grad`, or
// none), in launches of `chunk` rows with the plan's row offset, as launch_rows sets them up.
void launch_rows(const Call &c, Planned &p, unsigned char *x, unsigned char *grad, int64_t rows, int64_t chunk) {
    const RowsFn kernel = pair_of(c).rows[c.family];
    const int64_t row_vectors = (c.V * static_cast<int64_t>(dsize(c.ldt)) + 15) / 16;
    const int64_t smem_vectors = grad ? std::min(row_vectors, c.smem_cap) : 0;
    for (int64_t c0 = 0; c0 < rows; c0 += chunk) {
        unsigned char *xc = x + static_cast<size_t>(c0 * c.V) * dsize(c.ldt);
        unsigned char *gc = grad ? grad + static_cast<size_t>(c0 * c.V) * dsize(c.gdt) : nullptr;
        FwlRowParams rp{};
        rp.logits = xc;
        rp.grad = gc;
        rp.targets = p.targets.data();
        rp.coef = p.coef.data();
        rp.token_weights = c.has_tw ? p.tw.data() : nullptr;
        rp.row_loss = p.row_loss.data();
        rp.row_z = c.z_loss != 0.0 ? p.row_z.data() : nullptr;
        rp.rows = std::min(chunk, rows - c0);
        rp.seq = c.T;
        rp.vocab = c.V;
        rp.smem_vectors = smem_vectors;
        rp.vector_stores = dsize(c.ldt) == dsize(c.gdt) &&
                           reinterpret_cast<uintptr_t>(gc) % 16 == reinterpret_cast<uintptr_t>(xc) % 16;
        rp.softcap = static_cast<float>(c.softcap);
        rp.z_loss = c.z_loss;
        rp.smoothing = c.smoothing;
        rp.row_offset = c0;
        emu::launch(c.grid, c.threads, static_cast<size_t>(smem_vectors) * 16, [&] { kernel(rp); });
    }
}

void one_device(const Call &c, FILE *out) {
    const size_t n = c.logits.size();
    Buffer x(n, dsize(c.ldt), static_cast<size_t>(c.loff));
    store_dtype(c.ldt, x.at, c.logits.data(), n);
    Buffer gbuf(c.grad_mode == 1 ? n : 0, dsize(c.gdt), static_cast<size_t>(c.goff));
    void *grad = c.grad_mode == 0 ? nullptr : c.grad_mode == 2 ? x.at : gbuf.at;
    Planned p;
    plan(c, 0, c.B, p);

    launch_rows(c, p, x.at, static_cast<unsigned char *>(grad), c.B * c.T, c.chunk);
    finish(c, p);

    std::vector<float> g(grad ? n : 0);
    for (size_t i = 0; i < g.size(); ++i) g[i] = load_dtype(c.gdt, grad, i);
    write_outputs(out, {&p}, g, &p);
}

void batch(const Call &c, FwlSplitBatchParams bp) { emu::launch(1, c.threads, 0, [&] { fwl_split_batch(bp); }); }

void split(const Call &c, FILE *out) {
    const size_t D = c.sample_cuts.size() - 1, R = c.column_cuts.size() - 1, V = static_cast<size_t>(c.V);
    const int64_t T = c.T;
    const int words = c.smoothing != 0.0 ? FWL_SPLIT_WORDS_SMOOTHING : FWL_SPLIT_WORDS;
    const Pair &pair = pair_of(c);
    const auto stats = c.ldt == 0 ? fwl_split_stats_f32 : c.ldt == 1 ? fwl_split_stats_f16 : fwl_split_stats_bf16;
    auto samples = [&](size_t d) { return c.sample_cuts[d + 1] - c.sample_cuts[d]; };
    if (D == 1 && samples(0) == 0) fail(1, "a data group of one without samples");
    // rank (d, r) holds the plan of data rank d (one copy per rank: every rank runs its own); a
    // data rank without samples runs no kernel but the loss's combination (call.rs, no_samples)
    std::vector<std::vector<Planned>> ranks(D, std::vector<Planned>(R));
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
    std::vector<float> grad(c.grad_mode ? c.logits.size() : 0, NAN);
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
                const int64_t len = c.column_cuts[r + 1] - c.column_cuts[r];
                FwlSplitStatsParams sp{};
                sp.logits = xs[r]->at + static_cast<size_t>(c0 * len) * dsize(c.ldt);
                sp.targets = ranks[d][r].targets.data();
                sp.partials = &gathered[r * static_cast<size_t>(n * words)];
                sp.rows = n;
                sp.row0 = c0;
                sp.len = len;
                sp.v0 = c.column_cuts[r];
                sp.words = words;
                sp.softcap = static_cast<float>(c.softcap);
                emu::launch(c.grid, c.threads, 0, [&] { stats(sp); });
            }
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
    std::vector<const Planned *> parts;
    for (size_t d = 0; d < D; ++d)
        if (samples(d) > 0) parts.push_back(&ranks[d][0]);
    write_outputs(out, parts, grad, D > 1 ? &ranks[0][0] : parts[0]);
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 3) fail(1, "usage: calls <input> <output>");
    in_file = std::fopen(argv[1], "rb");
    FILE *out = std::fopen(argv[2], "wb");
    if (!in_file || !out) fail(1, "cannot open the files");
    emu::call_index = 0;
    for (Call c; read_call(c); ++emu::call_index) {
        emu::order_seed = 0x2545f4914f6cdd1dull;  // each call's own thread orders, alone or not
        if (c.magic == MAGIC_SPLIT) split(c, out);
        else one_device(c, out);
    }
    return std::fclose(out) == 0 ? 0 : 1;
}
