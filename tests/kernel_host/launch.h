// The kernels of kernels/weighted_loss.cu launched on the emulated device (emu.h) as
// src/cuda/launch.rs sets them up: the call they run (`Call`, which calls.cpp reads), device
// buffers as a fresh allocation leaves them, the plan kernel, the rows kernels in chunks at their
// row offsets, the finish. Included once, by calls.cpp, after the kernels.
#pragma once

#include <memory>

namespace {

[[noreturn]] void fail(int code, const char *what) {
    std::fprintf(stderr, "calls: %s\n", what);
    std::exit(code);
}

// A buffer of `n` elements of `size` bytes at `offset` elements past a 64-byte alignment, filled
// with 0xff bytes (NaN for every float type) as a fresh device allocation could hold anything: an
// element no kernel writes shows. At least 64 guard bytes lie before the elements (whatever the
// offset) and after them; they stay 0xff unless a kernel writes outside the elements:
// `check_guards` says so.
struct Buffer {
    static constexpr size_t kGuard = 64;
    unsigned char *base = nullptr, *at = nullptr;
    size_t bytes = 0, used = 0;
    Buffer(size_t n, size_t size, size_t offset) {
        bytes = (kGuard + (n + offset) * size + kGuard + 63) / 64 * 64;
        used = n * size;
        base = static_cast<unsigned char *>(std::aligned_alloc(64, bytes));
        std::memset(base, 0xff, bytes);
        at = base + kGuard + offset * size;
    }
    // Ends the run (exit 3) if a byte before or after the elements changed (a write outside the
    // buffer on a GPU, into another allocation).
    void check_guards(const char *what) const {
        for (const unsigned char *p = base; p < base + bytes; ++p) {
            if (p == at) p += used;
            if (p < base + bytes && *p != 0xff) {
                std::fprintf(stderr, "calls (call %ld): a write %td bytes from the start of the %s's elements, outside them\n",
                             emu::call_index, p - at, what);
                std::exit(3);
            }
        }
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

using RowsFn = void (*)(FwlRowParams);
// by (logits, gradient) dtypes, then family: rows, rowsl, rowsl2, rowslo, rowslh, rowslp
#define FWL_FAMILY(s) {fwl_rows_##s, fwl_rowsl_##s, fwl_rowsl2_##s, fwl_rowslo_##s, fwl_rowslh_##s, fwl_rowslp_##s}
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

void batch(const Call &c, FwlSplitBatchParams bp) { emu::launch(1, c.threads, 0, [&] { fwl_split_batch(bp); }); }

}  // namespace
