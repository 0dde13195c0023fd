// A tiny CUDA execution model on the CPU, enough to run the backend's
// kernels for testing their logic without a GPU: one OS thread per CUDA
// thread, one block at a time, __syncthreads as a block barrier, warp
// shuffles as a per-warp exchange between two barriers (so every shuffle must
// be reached by the whole warp, as the kernels do). Not a model of memory
// ordering, timing or occupancy.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct EmuDim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local EmuDim3 threadIdx, blockIdx;
static EmuDim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(n)
#define __shared__ static

struct uint4 { unsigned x, y, z, w; };

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

// Dynamic shared memory (`extern __shared__ float smem[]` is rewritten to
// point here by the test that builds this file).
static float emu_dynamic_smem[1 << 16];

struct EmuWarp {
    std::unique_ptr<std::barrier<>> bar;
    unsigned buf[32];
};
static std::unique_ptr<std::barrier<>> emu_block_bar;
static std::vector<EmuWarp> emu_warps;

inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }

template <class T>
inline T emu_shfl(T v, int src) {
    EmuWarp& w = emu_warps[threadIdx.x >> 5];
    unsigned bits;
    std::memcpy(&bits, &v, 4);
    w.buf[threadIdx.x & 31] = bits;
    w.bar->arrive_and_wait();
    bits = w.buf[src & 31];
    w.bar->arrive_and_wait();
    T r;
    std::memcpy(&r, &bits, 4);
    return r;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, (threadIdx.x & 31) ^ o); }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, src); }
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned o) {
    const int lane = threadIdx.x & 31;
    return emu_shfl(v, lane >= (int)o ? lane - (int)o : lane);
}

// Runs `kernel` over grid x block (1-D blocks, a multiple of 32 threads).
inline void emu_launch(EmuDim3 grid, unsigned threads, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = EmuDim3{threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                emu_block_bar = std::make_unique<std::barrier<>>(threads);
                emu_warps = std::vector<EmuWarp>(threads / 32);
                for (auto& w : emu_warps) w.bar = std::make_unique<std::barrier<>>(32);
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < threads; ++t)
                    ts.emplace_back([=, &kernel] {
                        threadIdx = EmuDim3{t, 0, 0};
                        blockIdx = EmuDim3{x, y, z};
                        kernel();
                    });
                for (auto& t : ts) t.join();
            }
}
