// The CUDA kernels of kernels/weighted_loss.cu run on the host (emu.h) as the crate launches
// them, from calls in a file:
//   - one device (launch.h, as src/cuda/launch.rs does): plan (one block), rows (a grid-stride
//     grid, dynamic shared memory for what fits of a row) in chunks of rows, finish (one block);
//   - the vocabulary- and data-parallel split (split.h, as src/cuda/split/ does) on a grid of
//     data x vocabulary ranks, every rank of a vocabulary group checked to come to the same bits;
//   - the gradient scaled by a device scalar (fwl_scale, as src/cuda/api.rs's
//     scale_by_device_scalar launches it);
//   - f32 rounded into a 16-bit buffer (fwl_narrow, as api.rs's launch_narrow launches it for
//     the tiled fused linear schedule's d hidden).
// Driven by tests/kernel_emulated.rs, which writes the calls to a file (`calls <in> <out>`) and
// compares the outputs with the float64 reference; tests/common/kernel_calls.rs describes the
// file's layout (`Call`, `ScaleCall`, `NarrowCall` and `Outputs` there, `read_call`,
// `scale_call`, `narrow_call` and `write_outputs` here). Exits 0 after the last call, 1 on a malformed file, 2 on an emulation
// failure (emu.h), 3 when ranks disagree.
#include "emu.h"

#include <initializer_list>

#include "../../kernels/weighted_loss.cu"

#include "launch.h"
#include "split.h"

namespace {

FILE *in_file = nullptr;

template <class T> std::vector<T> read_vec(size_t n) {
    std::vector<T> v(n);
    if (n && std::fread(v.data(), sizeof(T), n, in_file) != n) fail(1, "truncated input");
    return v;
}

constexpr int64_t MAGIC = 0x46574c4b01;        // "FWLK", version 1: one device
constexpr int64_t MAGIC_SPLIT = 0x46574c4b02;  // a grid of data x vocabulary ranks
constexpr int64_t MAGIC_SCALE = 0x46574c4b03;  // fwl_scale on a gradient
constexpr int64_t MAGIC_NARROW = 0x46574c4b04; // fwl_narrow from f32
constexpr int HEADER = 22;

// The first word of the next call; false at the end of the input.
bool read_magic(int64_t &magic) {
    const size_t got = std::fread(&magic, sizeof(int64_t), 1, in_file);
    if (got == 0 && std::feof(in_file)) return false;
    if (got != 1 || (magic != MAGIC && magic != MAGIC_SPLIT && magic != MAGIC_SCALE && magic != MAGIC_NARROW))
        fail(1, "not a call header");
    return true;
}

// The rest of a call of magic MAGIC or MAGIC_SPLIT (its first word).
void read_call(Call &c, int64_t magic) {
    int64_t h[HEADER];
    h[0] = magic;
    if (std::fread(h + 1, sizeof(int64_t), HEADER - 1, in_file) != HEADER - 1) fail(1, "truncated input");
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
    const double values[2] = {st->bad_weight_value, st->bad_sample_weight};
    std::fwrite(values, sizeof(double), 2, out);
    for (auto field : {&Planned::weights, &Planned::per_sample, &Planned::per_sample_z})
        for (const Planned *p : parts) write_vec(out, p->*field);
    for (const Planned *p : parts) write_vec(out, std::vector<int64_t>(p->valid.begin(), p->valid.end()));
    for (const Planned *p : parts) write_vec(out, p->row_loss);
    write_vec(out, grad);
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
    x.check_guards("logits");
    gbuf.check_guards("gradient");

    std::vector<float> g(grad ? n : 0);
    for (size_t i = 0; i < g.size(); ++i) g[i] = load_dtype(c.gdt, grad, i);
    write_outputs(out, {&p}, g, &p);
}

void split_call(const Call &c, FILE *out) {
    SplitRun run;
    split(c, run);
    write_outputs(out, run.parts, run.grad, run.loss);
}

// A call's own scheduling orders come from a hash of what it holds (so that it replays alone),
// different from call to call: with one seed for all, every call of a size drew the same orders.
uint64_t order_hash(std::initializer_list<uint64_t> vs) {
    uint64_t h = 0x9e3779b97f4a7c15ull;
    for (uint64_t v : vs) h = (h ^ v) * 0x100000001b3ull;
    return h | 1;
}

// An elementwise call's header (after its magic): 5 i64 (dtype, elements n, grid, threads,
// offset of its buffer past its alignment), dtypes from `lowest` to 2; and its buffer of n
// elements with `offset` elements before them and 8 after, all 0x5a bytes (a finite number of
// each type) until the call fills it.
struct Elementwise {
    int64_t d, n, off;
    unsigned grid, threads;
    size_t es;
    Buffer g;
    Elementwise(const std::vector<int64_t> &h, int64_t lowest, const char *what)
        : d(h[0]), n(h[1]), off(h[4]), grid(static_cast<unsigned>(h[2])), threads(static_cast<unsigned>(h[3])),
          es(dsize(checked(h, lowest, what))), g(static_cast<size_t>(n + 8), es, static_cast<size_t>(off)) {
        std::memset(start(), 0x5a, total() * es);
    }
    // the window's first byte: `off` elements before the call's
    unsigned char *start() const { return g.at - static_cast<size_t>(off) * es; }
    static int64_t checked(const std::vector<int64_t> &h, int64_t lowest, const char *what) {
        if (h[0] < lowest || h[0] > 2 || h[1] < 0 || h[2] < 1 || h[3] < 1 || h[4] < 0 || h[4] > 64) fail(1, what);
        return h[0];
    }
    size_t total() const { return static_cast<size_t>(off + n + 8); }
    // this call's own thread orders, from what it holds (as a loss call's, in main)
    static void seed(std::initializer_list<uint64_t> vs) { emu::order_seed ^= order_hash(vs); }
    // The buffer's bits (u32 each, zero-extended) from `offset` elements before the call's
    // elements to 8 after them: what the kernel left, and that it wrote nothing around them.
    void write_window(FILE *out) const {
        std::vector<uint32_t> bits(total(), 0);
        for (size_t i = 0; i < total(); ++i) std::memcpy(&bits[i], start() + i * es, es);
        write_vec(out, bits);
    }
};

// A call of fwl_scale (after its magic): the header (any dtype), the scale (f32), the n
// elements' bits (u32 each, the low 16 for 16-bit types); writes the window.
void scale_call(FILE *out) {
    Elementwise e(read_vec<int64_t>(5), 0, "a scale call out of range");
    const auto s = read_vec<float>(1);
    const auto bits_in = read_vec<uint32_t>(static_cast<size_t>(e.n));
    for (size_t i = 0; i < bits_in.size(); ++i) std::memcpy(e.g.at + i * e.es, &bits_in[i], e.es);
    float scale = s[0];
    uint32_t first = bits_in.empty() ? 0 : bits_in[0];
    e.seed({uint64_t(e.d), uint64_t(e.n), e.grid, e.threads, uint64_t(first)});
    FwlScaleParams sp{};
    sp.grad = e.g.at;
    sp.scale = &scale;
    sp.n = e.n;
    const auto kernel = e.d == 0 ? fwl_scale_f32 : e.d == 1 ? fwl_scale_f16 : fwl_scale_bf16;
    emu::launch(e.grid, e.threads, 0, [&] { kernel(sp); });
    e.write_window(out);
}

// A call of fwl_narrow (after its magic): the header (destination dtype 1 or 2), the n f32
// sources' bits (u32 each); writes the destination's window.
void narrow_call(FILE *out) {
    Elementwise e(read_vec<int64_t>(5), 1, "a narrow call out of range");
    const auto src = read_vec<float>(static_cast<size_t>(e.n));
    uint32_t first = 0;
    if (!src.empty()) std::memcpy(&first, src.data(), 4);
    e.seed({uint64_t(e.d), uint64_t(e.n), e.grid, e.threads, uint64_t(first)});
    FwlNarrowParams np{};
    np.src = src.data();
    np.dst = e.g.at;
    np.n = e.n;
    const auto kernel = e.d == 1 ? fwl_narrow_f16 : fwl_narrow_bf16;
    emu::launch(e.grid, e.threads, 0, [&] { kernel(np); });
    e.write_window(out);
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 3) fail(1, "usage: calls <input> <output>");
    in_file = std::fopen(argv[1], "rb");
    FILE *out = std::fopen(argv[2], "wb");
    if (!in_file || !out) fail(1, "cannot open the files");
    emu::call_index = 0;
    for (int64_t magic; read_magic(magic); ++emu::call_index) {
        emu::order_seed = 0x2545f4914f6cdd1dull;  // each call's own thread orders, alone or not
        if (magic == MAGIC_SCALE) {
            scale_call(out);
            continue;
        }
        if (magic == MAGIC_NARROW) {
            narrow_call(out);
            continue;
        }
        Call c;
        read_call(c, magic);
        // this call's own orders (order_hash)
        uint32_t first = 0;
        if (!c.logits.empty()) std::memcpy(&first, c.logits.data(), 4);
        emu::order_seed ^= order_hash({uint64_t(c.B), uint64_t(c.T), uint64_t(c.V), uint64_t(c.threads),
                                       uint64_t(c.chunk), uint64_t(c.grid), uint64_t(first)});
        if (c.magic == MAGIC_SPLIT) split_call(c, out);
        else one_device(c, out);
    }
    return std::fclose(out) == 0 ? 0 : 1;
}
