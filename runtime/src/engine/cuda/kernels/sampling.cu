// Token selection on the GPU, one thread block per row of f32 logits, so
// only the chosen ids come back to the host.
//
// - argmax: the largest logit, the lowest index on ties (as the CPU's
//   `model::argmax`).
// - sample_top_k_top_p: temperature, then top-k, then top-p (nucleus), then
//   one draw with the host's uniform number u in [0, 1). Nothing is sorted:
//   the k-th largest logit and the nucleus' smallest logit are found by a
//   radix select over the logits' order-preserving 32-bit keys (32 block-wide
//   counting / summing passes), and the draw walks the kept tokens in index
//   order (any fixed order draws from the same distribution). Ties at a
//   threshold are all kept. top_k == 0 keeps all; top_p >= 1 keeps all.
//
// grid (n_rows), block (SAMPLE_THREADS, a multiple of 32 up to 1024).

#define SAMPLE_THREADS 1024

// Maps a float to a u32 whose unsigned order is the float order.
__device__ __forceinline__ u32 order_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Block-wide (max value, lowest index); every thread gets the index.
__device__ __forceinline__ u32 block_argmax(float v, u32 i, float* sv, u32* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(XPYD_FULL_MASK, v, o);
        const u32 oi = __shfl_xor_sync(XPYD_FULL_MASK, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    __syncthreads();
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    v = lane < n_warps ? sv[lane] : XPYD_NEG_INF;
    i = lane < n_warps ? si[lane] : 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(XPYD_FULL_MASK, v, o);
        const u32 oi = __shfl_xor_sync(XPYD_FULL_MASK, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    return i;
}

__device__ __forceinline__ u32 row_argmax(const float* row, int vocab, float* sv, u32* si) {
    float best = XPYD_NEG_INF;
    u32 best_i = 0xffffffffu;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float v = row[j];
        if (v > best || best_i == 0xffffffffu) { best = v; best_i = j; }
    }
    return block_argmax(best, best_i, sv, si);
}

extern "C" __global__ void argmax(const float* __restrict__ logits, int vocab, u32* __restrict__ out) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    const u32 i = row_argmax(logits + (u64)blockIdx.x * vocab, vocab, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = i;
}

extern "C" __global__ void sample_top_k_top_p(
    const float* __restrict__ logits,       // [n_rows, vocab]
    int vocab,
    const float* __restrict__ temperature,  // [n_rows], > 0
    const u32* __restrict__ top_k,          // [n_rows], 0 = no limit
    const float* __restrict__ top_p,        // [n_rows], in (0, 1]
    const float* __restrict__ uniform,      // [n_rows], in [0, 1)
    u32* __restrict__ out) {                // [n_rows]
    __shared__ float scratch[32];
    __shared__ float sv[32];
    __shared__ u32 si[32];
    __shared__ float incl_s[SAMPLE_THREADS];
    const int tid = threadIdx.x;
    const float* row = logits + (u64)blockIdx.x * vocab;
    const float inv_t = 1.0f / temperature[blockIdx.x];
    const u32 k = top_k[blockIdx.x];
    const float p_keep = top_p[blockIdx.x];

    // The most likely token: the softmax's reference point and the fallback.
    const u32 best = row_argmax(row, vocab, sv, si);
    const float mx = row[best];

    // k-th largest key: the largest key K with count(key >= K) >= k.
    u32 k_thr = 0;
    if (k > 0 && k < (u32)vocab) {
        for (int bit = 31; bit >= 0; --bit) {
            const u32 cand = k_thr | (1u << bit);
            float c = 0.0f;
            for (int j = tid; j < vocab; j += blockDim.x) c += order_key(row[j]) >= cand ? 1.0f : 0.0f;
            if (block_sum(c, scratch) >= (float)k) k_thr = cand;
        }
    }
    // Nucleus: the largest key P with mass(key >= max(P, k_thr)) >= top_p * Z.
    u32 thr = k_thr;
    if (p_keep < 1.0f) {
        float z = 0.0f;
        for (int j = tid; j < vocab; j += blockDim.x)
            if (order_key(row[j]) >= k_thr) z += __expf((row[j] - mx) * inv_t);
        const float target = p_keep * block_sum(z, scratch);
        u32 p_thr = 0;
        for (int bit = 31; bit >= 0; --bit) {
            const u32 cand = p_thr | (1u << bit);
            const u32 lim = max(cand, k_thr);
            float mass = 0.0f;
            for (int j = tid; j < vocab; j += blockDim.x)
                if (order_key(row[j]) >= lim) mass += __expf((row[j] - mx) * inv_t);
            if (block_sum(mass, scratch) >= target) p_thr = cand;
        }
        thr = max(p_thr, k_thr);
    }

    // Draw: each thread owns a contiguous chunk; an inclusive scan of the
    // chunks' masses tells which chunk holds u * total.
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int lo = min(tid * chunk, vocab), hi = min(lo + chunk, vocab);
    float mine = 0.0f;
    for (int j = lo; j < hi; ++j)
        if (order_key(row[j]) >= thr) mine += __expf((row[j] - mx) * inv_t);
    // Inclusive scan: within warps by shuffle, then over warp totals.
    const int lane = tid & 31, warp = tid >> 5;
    float incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float up = __shfl_up_sync(XPYD_FULL_MASK, incl, o);
        if (lane >= o) incl += up;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        float w = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0f;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float up = __shfl_up_sync(XPYD_FULL_MASK, w, o);
            if (lane >= o) w += up;
        }
        scratch[lane] = w;  // inclusive totals of warps 0..=lane
    }
    __syncthreads();
    if (warp > 0) incl += scratch[warp - 1];
    incl_s[tid] = incl;
    __syncthreads();
    const float total = incl_s[blockDim.x - 1];
    const float r = uniform[blockIdx.x] * total;
    if (tid == 0) out[blockIdx.x] = best;  // if rounding leaves r past every chunk
    __syncthreads();
    const float excl = tid == 0 ? 0.0f : incl_s[tid - 1];
    if (mine > 0.0f && r >= excl && r < incl) {
        float acc = excl;
        u32 pick = 0xffffffffu;
        for (int j = lo; j < hi; ++j) {
            if (order_key(row[j]) < thr) continue;
            pick = j;
            acc += __expf((row[j] - mx) * inv_t);
            if (r < acc) break;
        }
        out[blockIdx.x] = pick;
    }
}
