// Decode attention over the paged KV cache: one new query token per
// sequence attends to the `context_lens[s]` cached keys of its sequence
// (which already include its own K/V, written by kv_write), found through
// the sequence's block table. Grouped-query attention: query head h reads KV
// head h / (n_heads / n_kv_heads).
//
// One thread block per (query head, sequence), 128 threads. Keys are taken
// in tiles of DECODE_TILE with an online (running max) softmax, so any
// context length works with fixed shared memory:
//   1. scores: each thread dots the (pre-scaled) query with whole keys,
//      16-byte loads of 8 bf16 at a time;
//   2. the tile's max and sum are block reductions (warp shuffles);
//   3. V: each thread owns one dimension (of one of `parts` interleaved key
//      subsets when head_dim < 128), so consecutive threads read
//      consecutive values of a V row.
// Constraints (checked by the host): head_dim % 8 == 0, head_dim <= 256,
// blockDim.x == DECODE_THREADS.
//
// grid (n_heads, n_seqs), block (DECODE_THREADS).

#define DECODE_THREADS 128
#define DECODE_TILE 512
#define DECODE_MAX_HEAD_DIM 256

extern "C" __global__ void __launch_bounds__(DECODE_THREADS) paged_attention_decode(
    bf16* __restrict__ out,                 // [n_seqs, n_heads * head_dim]
    const float* __restrict__ q,            // [n_seqs, n_heads * head_dim]
    const bf16* __restrict__ k_cache,       // one layer: [num_blocks, block_size, n_kv_heads, head_dim]
    const bf16* __restrict__ v_cache,       // same
    const u32* __restrict__ block_tables,   // [n_seqs, max_blocks]
    const u32* __restrict__ context_lens,   // [n_seqs]
    int max_blocks, int n_heads, int n_kv_heads, int head_dim, int block_size, float scale) {
    __shared__ float q_s[DECODE_MAX_HEAD_DIM];
    __shared__ float p_s[DECODE_TILE];
    __shared__ float red_s[DECODE_THREADS * 2];
    __shared__ float scratch[32];

    const int head = blockIdx.x, seq = blockIdx.y, tid = threadIdx.x;
    const int kv_head = head / (n_heads / n_kv_heads);
    const int kv_dim = n_kv_heads * head_dim;
    const int ctx = (int)context_lens[seq];
    const u32* table = block_tables + (u64)seq * max_blocks;
    const float* qh = q + ((u64)seq * n_heads + head) * head_dim;
    bf16* oh = out + ((u64)seq * n_heads + head) * head_dim;

    for (int d = tid; d < head_dim; d += blockDim.x) q_s[d] = qh[d] * scale;
    __syncthreads();

    // Phase-3 layout: thread = part * head_dim + dim when head_dim <= 128.
    const int parts = head_dim <= (int)blockDim.x ? (int)blockDim.x / head_dim : 1;
    const int part = head_dim <= (int)blockDim.x ? tid / head_dim : 0;
    const int dim0 = head_dim <= (int)blockDim.x ? tid % head_dim : tid;
    float acc[2] = {0.0f, 0.0f};
    float m = XPYD_NEG_INF, l = 0.0f;

    for (int t0 = 0; t0 < ctx; t0 += DECODE_TILE) {
        const int n = min(DECODE_TILE, ctx - t0);
        float tile_max = XPYD_NEG_INF;
        for (int j = tid; j < n; j += blockDim.x) {
            const int pos = t0 + j;
            const u64 slot = (u64)table[pos / block_size] * block_size + pos % block_size;
            const uint4* kr = (const uint4*)(k_cache + slot * kv_dim + (u64)kv_head * head_dim);
            float s = 0.0f;
            for (int c = 0; c < head_dim / 8; ++c) {
                const uint4 w = kr[c];
                const float* qc = q_s + c * 8;
                s += qc[0] * __uint_as_float(w.x << 16) + qc[1] * __uint_as_float(w.x & 0xffff0000u);
                s += qc[2] * __uint_as_float(w.y << 16) + qc[3] * __uint_as_float(w.y & 0xffff0000u);
                s += qc[4] * __uint_as_float(w.z << 16) + qc[5] * __uint_as_float(w.z & 0xffff0000u);
                s += qc[6] * __uint_as_float(w.w << 16) + qc[7] * __uint_as_float(w.w & 0xffff0000u);
            }
            p_s[j] = s;
            tile_max = fmaxf(tile_max, s);
        }
        tile_max = block_max(tile_max, scratch);  // its barriers publish p_s
        const float m_new = fmaxf(m, tile_max);
        const float corr = __expf(m - m_new);  // 0 on the first tile
        float tile_sum = 0.0f;
        for (int j = tid; j < n; j += blockDim.x) {
            const float p = __expf(p_s[j] - m_new);
            p_s[j] = p;
            tile_sum += p;
        }
        tile_sum = block_sum(tile_sum, scratch);
        l = l * corr + tile_sum;
        m = m_new;
        if (part < parts) {
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const int d = dim0 + k * (int)blockDim.x;
                if (d >= head_dim) continue;
                float a = acc[k] * corr;
                for (int j = part; j < n; j += parts) {
                    const int pos = t0 + j;
                    const u64 slot = (u64)table[pos / block_size] * block_size + pos % block_size;
                    a += p_s[j] * bf16_to_f32(v_cache[slot * kv_dim + (u64)kv_head * head_dim + d]);
                }
                acc[k] = a;
            }
        }
        __syncthreads();  // p_s is rewritten by the next tile
    }

    // Sum the parts, normalise, store.
    red_s[tid] = acc[0];
    red_s[tid + DECODE_THREADS] = acc[1];
    __syncthreads();
    const float inv_l = ctx > 0 ? 1.0f / l : 0.0f;
    if (part == 0 && tid < head_dim) {
        float a = 0.0f;
        for (int p = 0; p < parts; ++p) a += red_s[p * head_dim + dim0];
        oh[dim0] = f32_to_bf16(a * inv_l);
        const int d1 = dim0 + DECODE_THREADS;
        if (d1 < head_dim) oh[d1] = f32_to_bf16(red_s[tid + DECODE_THREADS] * inv_l);
    }
}
