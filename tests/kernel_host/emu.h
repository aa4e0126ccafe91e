// CUDA's execution model on the host, for tests: the kernels of kernels/*.cu compiled by the
// system C++ compiler and run on the CPU, where no GPU is. Enough of CUDA for these kernels and
// no more:
//
//   - a launch runs its blocks one after the other; each block's threads are fibers of one OS
//     thread (entered through ucontext, then switched with _setjmp/_longjmp), switched only at
//     a barrier: warps in a random order, each as far as it goes (so one can run many barriers
//     of its own ahead of another), its lanes in a random order (so that a race shows);
//   - a block's `__shared__` variables are that OS thread's statics (`thread_local`, which also
//     lets the kernels' `extern __shared__` array name one global array). Every block finds all
//     of them filled with 0xff bytes (NaN floats, -1 integers), as the executable's whole
//     thread-local block is refilled before it runs, and a guard band after the part of the
//     dynamic array its launch asked for: a read of what no thread of the block wrote, or a
//     write beyond what the launch asked for, shows. (So emu.h and its includers declare no
//     `thread_local` of their own: it would be overwritten.);
//   - `__syncthreads()` waits for the block's threads (all at one place in the source, else it
//     aborts), `__shfl_xor_sync` / `__shfl_sync` for the 32 lanes of the caller's warp (a
//     barrier before and after the exchange); a barrier that can never complete (a thread
//     returned while others wait) aborts with a message;
//   - `__half` and `__nv_bfloat16` are 16-bit storage with round-to-nearest-even conversions;
//     the intrinsics are their IEEE meaning, `__expf` as the device rounds its argument (its
//     ex2.approx's own last bits aside).
//
// Not emulated: concurrent blocks (the kernels share nothing across blocks: no atomics), memory
// ordering between blocks, launch bounds and occupancy, the device's fused multiply-adds, warp
// shuffles with partial masks (none used: they abort).
#pragma once

#include <errno.h>
#include <link.h>
#include <math.h>
#include <stdint.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#define FWL_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local

using std::max;
using std::min;

struct EmuDim3 {
    unsigned x = 1, y = 1, z = 1;
};
// (indices: .y and .z are 0, as on a GPU; the dimensions' are 1)
// (external linkage: a fiber switch is an opaque call, after which the compiler reloads them)
EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

// dynamic shared memory (the kernels' `extern __shared__ ... fwl_smem[]`)
constexpr size_t EMU_SMEM_BYTES = 256 * 1024, GUARD_BYTES = 4096;
constexpr unsigned char GUARD = 0x5a;
alignas(16) thread_local unsigned char fwl_smem[EMU_SMEM_BYTES];

namespace emu {

inline long call_index = -1;  // set by the caller: the call a failure names

[[noreturn]] inline void die(const char *what) {
    std::fprintf(stderr, "emu (call %ld of the file): %s\n", call_index, what);
    std::exit(2);
}

// The executable's thread-local block (this OS thread's copy): the kernels' static `__shared__`
// variables and fwl_smem, found once through the program headers.
struct TlsBlock {
    unsigned char *begin = nullptr;
    size_t bytes = 0;
};
inline TlsBlock find_tls_block() {
    TlsBlock found;
    dl_iterate_phdr(
        [](dl_phdr_info *info, size_t, void *out) -> int {
            for (int i = 0; i < info->dlpi_phnum; ++i) {
                if (info->dlpi_phdr[i].p_type != PT_TLS || !info->dlpi_tls_data) continue;
                auto *begin = static_cast<unsigned char *>(info->dlpi_tls_data);
                const size_t bytes = info->dlpi_phdr[i].p_memsz;
                if (fwl_smem >= begin && fwl_smem + EMU_SMEM_BYTES <= begin + bytes) {
                    *static_cast<TlsBlock *>(out) = TlsBlock{begin, bytes};
                    return 1;
                }
            }
            return 0;
        },
        &found);
    if (!found.begin) die("the thread-local block holding the __shared__ variables was not found");
    // (a static link would put the C library's thread-locals in it too, which the refill would
    // overwrite)
    const auto *e = reinterpret_cast<const unsigned char *>(&errno);
    if (e >= found.begin && e < found.begin + found.bytes) die("errno in the block of the __shared__ variables");
    return found;
}

// Every `__shared__` variable as a fresh block finds it: 0xff bytes (NaN floats, -1 integers),
// then the guard band after the `smem` bytes of dynamic shared memory its launch asked for.
inline void fill_shared(size_t smem) {
    static const TlsBlock tls = find_tls_block();  // (a plain static: a thread_local would lie in the block)
    std::memset(tls.begin, 0xff, tls.bytes);
    std::memset(fwl_smem + smem, GUARD, std::min(EMU_SMEM_BYTES - smem, GUARD_BYTES));
}

struct Fiber {
    ucontext_t ctx;     // the first entry
    jmp_buf at;         // where it waits (after its first switch back)
    bool started = false, done = false;
};

// Switches: the first entry into a fiber through swapcontext, every later one through
// _setjmp/_longjmp (no signal mask saved: a fraction of swapcontext's cost per switch).
inline ucontext_t main_ctx;
inline jmp_buf scheduler;
inline std::vector<Fiber> fibers;
inline std::vector<char *> stacks;
constexpr size_t STACK_BYTES = 128 * 1024;
inline int current = -1;
inline bool progress = false;
inline void (*entry_fn)(void *) = nullptr;
inline void *entry_arg = nullptr;

// Back to the scheduler; the next switch into this fiber returns here.
__attribute__((noinline)) inline void yield() {
    if (!_setjmp(fibers[current].at)) _longjmp(scheduler, 1);
    asm volatile("" ::: "memory");
}

struct Barrier {
    unsigned count = 0, need = 0;
    uint64_t gen = 0;
    const char *file = "";  // where the generation's first thread waits (__syncthreads only)
    int line = 0;
};
inline Barrier block_bar;
inline std::vector<Barrier> warp_bars;
inline std::vector<uint64_t> slots;  // one shuffle slot per thread

// Every thread, the last to arrive too, goes back to the scheduler, which picks who goes on.
inline void arrive(Barrier &b, const char *file = "", int line = 0) {
    const uint64_t g = b.gen;
    progress = true;
    if (b.count == 0) {
        b.file = file;
        b.line = line;
    } else if (b.line != line || std::strcmp(b.file, file) != 0) {
        die("a barrier (__syncthreads, or a warp's shuffle) reached at different places by one block's or "
            "warp's threads (undefined on a GPU)");
    }
    if (++b.count == b.need) {
        b.count = 0;
        ++b.gen;
    }
    do yield();
    while (b.gen == g);
}

// The scheduler's orders (warps, and lanes at each step): fresh permutations (xorshift from
// `order_seed`), so that a read of what another thread writes without a barrier between (a race
// on a GPU) sees it written in some runs and not in others. `order_seed` is set by the caller
// (the same seed: the same orders, so a failing call replays alone).
inline uint64_t order_seed = 1;
inline void shuffle_order(std::vector<unsigned> &v) {
    for (size_t i = v.size(); i > 1; --i) {
        order_seed ^= order_seed << 13;
        order_seed ^= order_seed >> 7;
        order_seed ^= order_seed << 17;
        std::swap(v[i - 1], v[order_seed % i]);
    }
}

inline void fiber_main() {
    entry_fn(entry_arg);
    fibers[current].done = true;
    progress = true;
    _longjmp(scheduler, 1);
}

// Runs fiber `f` until it waits at a barrier or ends (a frame of its own: nothing of the
// scheduler's loop lives across the jump).
__attribute__((noinline)) inline void resume(Fiber &f) {
    if (!_setjmp(scheduler)) {
        if (!f.started) {
            f.started = true;
            swapcontext(&main_ctx, &f.ctx);
        } else {
            _longjmp(f.at, 1);
        }
    }
    asm volatile("" ::: "memory");
}

// Runs `kernel()` as a grid of `grid` blocks of `block` threads (a multiple of 32, at most
// 1024) with `smem` bytes of dynamic shared memory.
// cp.async (the prefetching rows kernels' copies into shared memory), as late as a GPU may
// complete it: a copy takes effect at the calling thread's wait that covers its group, not at
// issue; its destination is poisoned (0xff) at issue, so that a read before that wait shows;
// its source must not change in between, no destination takes a second copy while one is
// pending, and a block must end with none pending (each a failure of the run).
struct AsyncCopy {
    unsigned char *dst;
    const unsigned char *src;
    unsigned char snap[16];
    long group;  // -1 until committed
};
inline std::vector<std::vector<AsyncCopy>> async_copies;  // by thread of the block
inline std::vector<long> async_groups;                     // groups committed, by thread

inline void async_copy16(void *dst, const void *src) {
    auto &mine = async_copies.at(threadIdx.x);
    for (const AsyncCopy &c : mine)
        if (c.dst == dst) die("cp.async: a second copy into a slot whose copy is still pending");
    AsyncCopy c{static_cast<unsigned char *>(dst), static_cast<const unsigned char *>(src), {}, -1};
    std::memcpy(c.snap, src, 16);
    std::memset(dst, 0xff, 16);
    mine.push_back(c);
}

inline void async_commit() {
    const unsigned t = threadIdx.x;
    for (AsyncCopy &c : async_copies.at(t))
        if (c.group < 0) c.group = async_groups[t];
    ++async_groups[t];
}

// completes the calling thread's copies of every group but the `n` last committed
inline void async_wait(int n) {
    const unsigned t = threadIdx.x;
    std::vector<AsyncCopy> pending;
    for (const AsyncCopy &c : async_copies.at(t)) {
        if (c.group >= 0 && c.group < async_groups[t] - n) {
            if (std::memcmp(c.snap, c.src, 16)) die("cp.async: its source changed before the copy was waited for");
            std::memcpy(c.dst, c.src, 16);
        } else {
            pending.push_back(c);
        }
    }
    async_copies[t].swap(pending);
}

template <class F> void launch(unsigned grid, unsigned block, size_t smem, F &&kernel) {
    if (block == 0 || block % 32 || block > 1024) die("block size: a multiple of 32 up to 1024");
    if (smem > EMU_SMEM_BYTES) die("dynamic shared memory beyond the emulator's");
    while (stacks.size() < block) stacks.push_back(static_cast<char *>(std::malloc(STACK_BYTES)));
    fibers.assign(block, Fiber{});
    warp_bars.assign(block / 32, Barrier{0, 32, 0});
    slots.assign(block, 0);
    block_bar = Barrier{0, block, 0};
    gridDim = EmuDim3{grid, 1, 1};
    blockDim = EmuDim3{block, 1, 1};
    using K = std::remove_reference_t<F>;
    entry_fn = [](void *k) { (*static_cast<K *>(k))(); };
    entry_arg = &kernel;
    // blocks in a random order too: a GPU runs them in any order (and side by side), so a block
    // that writes into the next block's part of a buffer (past its own row) is overwritten by it
    // only when it runs first; in ascending order every such write was hidden
    std::vector<unsigned> blocks(grid);
    for (unsigned b = 0; b < grid; ++b) blocks[b] = b;
    shuffle_order(blocks);
    for (unsigned b : blocks) {
        blockIdx = EmuDim3{b, 0, 0};
        fill_shared(smem);
        async_copies.assign(block, {});
        async_groups.assign(block, 0);
        for (unsigned t = 0; t < block; ++t) {
            Fiber &f = fibers[t];
            f.started = f.done = false;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = stacks[t];
            f.ctx.uc_stack.ss_size = STACK_BYTES;
            f.ctx.uc_link = nullptr;  // fiber_main never returns
            makecontext(&f.ctx, fiber_main, 0);
        }
        // warps in a random order, each run as far as it goes (through its own shuffles, up
        // to a barrier of the block), its lanes in a random order at every step: one warp can
        // run many stretches ahead of another, as on a GPU
        std::vector<unsigned> warps(block / 32), lanes(32);
        for (unsigned w = 0; w < warps.size(); ++w) warps[w] = w;
        for (unsigned l = 0; l < 32; ++l) lanes[l] = l;
        for (bool live = true; live;) {
            live = false;
            bool moved = false;
            shuffle_order(warps);
            for (unsigned w : warps) {
                for (bool warp_live = true; warp_live;) {
                    warp_live = false;
                    progress = false;
                    shuffle_order(lanes);
                    for (unsigned l : lanes) {
                        const unsigned t = w * 32 + l;
                        Fiber &f = fibers[t];
                        if (f.done) continue;
                        warp_live = live = true;
                        current = static_cast<int>(t);
                        threadIdx = EmuDim3{t, 0, 0};
                        resume(f);
                    }
                    if (!progress) break;  // every lane waits for other warps (or is done)
                    moved = true;
                }
            }
            if (live && !moved) die("deadlock: threads wait at a barrier that others never reach");
        }
        if (block_bar.count || std::any_of(warp_bars.begin(), warp_bars.end(), [](const Barrier &w) { return w.count; }))
            die("a block ended with threads still counted at a barrier");
        for (size_t i = smem; i < std::min(EMU_SMEM_BYTES, smem + GUARD_BYTES); ++i)
            if (fwl_smem[i] != GUARD) die("a block wrote dynamic shared memory beyond what its launch asked for");
        for (const auto &mine : async_copies)
            if (!mine.empty()) die("cp.async: a block ended with copies still pending");
    }
    current = -1;
}

// (`file`, `line`: the shuffle's place in the kernel, which every lane of the warp must reach)
template <class T> T shuffle(T v, unsigned mask, unsigned src_lane, const char *file, int line) {
    static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
    if (mask != 0xffffffffu) die("shuffle masks other than the full warp");
    const unsigned t = threadIdx.x, w = t / 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[t] = bits;
    arrive(warp_bars[w], file, line);  // every lane's value is in
    const uint64_t o = slots[w * 32 + (src_lane & 31)];
    arrive(warp_bars[w], file, line);  // every lane has read before the slots are reused
    T r;
    std::memcpy(&r, &o, sizeof(T));
    return r;
}

}  // namespace emu

inline void emu_syncthreads(const char *file, int line) { emu::arrive(emu::block_bar, file, line); }
#define __syncthreads() emu_syncthreads(__FILE__, __LINE__)
template <class T> T emu_shfl_xor_sync(unsigned mask, T v, int lane_mask, const char *file, int line) {
    return emu::shuffle(v, mask, (threadIdx.x & 31) ^ static_cast<unsigned>(lane_mask), file, line);
}
template <class T> T emu_shfl_sync(unsigned mask, T v, int src_lane, const char *file, int line) {
    return emu::shuffle(v, mask, static_cast<unsigned>(src_lane), file, line);
}
#define __shfl_xor_sync(mask, v, lane_mask) emu_shfl_xor_sync(mask, v, lane_mask, __FILE__, __LINE__)
#define __shfl_sync(mask, v, src_lane) emu_shfl_sync(mask, v, src_lane, __FILE__, __LINE__)

// A vector access's alignment (FWL_ALIGNED in the kernels): misaligned, it faults on a GPU,
// where the host would mostly take it without a word.
inline void emu_check_aligned(const void *p, size_t align, const char *file, int line) {
    if (reinterpret_cast<uintptr_t>(p) % align) {
        std::fprintf(stderr, "%s:%d: ", file, line);
        emu::die("a vector access at an address not aligned to its size (a fault on a GPU)");
    }
}

// ---- intrinsics --------------------------------------------------------------------------------

// __expf and ex2.approx as the device takes them: 2^(x·log2 e) with the product rounded to f32
// (its error, |x|·6e-8 relative, is most of __expf's far from 0), then the host's exp2f
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __frcp_rn(float x) { return 1.f / x; }
// ex2.approx.ftz: results below 2^-126 flushed to 0
inline float fwl_host_exp_ftz(float x) {
    const float y = exp2f(x * 1.4426950408889634f);
    return y < 1.17549435e-38f ? 0.f : y;
}

struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// ---- 16-bit floats -----------------------------------------------------------------------------

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
struct __attribute__((aligned(4))) __half2 {
    __half x, y;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

inline uint32_t emu_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float emu_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float __half2float(__half h) {
    const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff;
    if (e == 0) {  // zero or subnormal: m * 2^-24
        const float v = std::ldexp(static_cast<float>(m), -24);
        return sign ? -v : v;
    }
    if (e == 31) return emu_float(sign | 0x7f800000u | (m << 13));
    return emu_float(sign | ((e - 15 + 127) << 23) | (m << 13));
}

inline __half __float2half_rn(float f) {
    const uint32_t u = emu_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
    if (a >= 0x38800000u) {                                                    // normal in f16, or beyond
        if (a >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // 65520 and up (and inf)
        const uint32_t m = a & 0x7fffffu, rest = m & 0x1fffu;
        uint32_t h = ((((a >> 23) - 127 + 15) << 10) | (m >> 13));
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;
        return __half{static_cast<uint16_t>(sign | h)};
    }
    // below 2^-14: a multiple of 2^-24, rounded to nearest even (the default rounding mode)
    const float q = std::nearbyint(emu_float(a) * 16777216.0f);
    return __half{static_cast<uint16_t>(sign | static_cast<uint32_t>(q))};
}

inline float __bfloat162float(__nv_bfloat16 h) { return emu_float(static_cast<uint32_t>(h.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t u = emu_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
    return __nv_bfloat16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
