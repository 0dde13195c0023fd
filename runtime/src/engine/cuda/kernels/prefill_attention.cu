// Causal attention for prefill (a whole prompt or a chunk of one, after a
// cached prefix): flash-attention style tiling over the paged KV cache, with
// the online softmax, so no [tokens, keys] score matrix is ever stored.
//
// The new tokens of sequence s are rows query_start[s]..query_start[s+1] of
// q/out; the first of them is at position start_pos[s], so positions
// 0..start_pos[s] (the cached prefix) and the new tokens themselves (already
// written by kv_write) are read through the block table. New token i sees
// keys 0..=start_pos[s] + i.
//
// Grouped-query attention: one thread block serves one KV head and
// PREFILL_ROWS "rows", a row being a (new token, query head of the group)
// pair, so each K/V tile loaded into shared memory serves all the query
// heads that share it. 4 warps, 4 rows each; within a tile of PREFILL_KEYS
// keys, lane j scores key j for the warp's rows, then every lane accumulates
// its head_dim/32 output dimensions over the tile's keys (probabilities
// broadcast by shuffle).
//
// Dynamic shared memory: (PREFILL_ROWS * head_dim + PREFILL_KEYS *
// (2 * head_dim + 1)) floats: 20.1 KiB for head_dim 64, 40.1 KiB for 128;
// head_dim 256 needs the 48 KiB opt-in (cuFuncSetAttribute). Constraints
// (checked by the host): head_dim % 32 == 0, head_dim <= 256.
//
// grid (ceil(max_new_tokens * group / PREFILL_ROWS), n_kv_heads, n_seqs),
// block (PREFILL_THREADS).

#define PREFILL_THREADS 128
#define PREFILL_ROWS 16
#define PREFILL_ROWS_PER_WARP 4
#define PREFILL_KEYS 32
#define PREFILL_MAX_DIMS_PER_LANE 8

extern "C" __global__ void __launch_bounds__(PREFILL_THREADS) prefill_attention(
    bf16* __restrict__ out,                 // [n_tokens, n_heads * head_dim]
    const float* __restrict__ q,            // [n_tokens, n_heads * head_dim], after RoPE
    const bf16* __restrict__ k_cache,       // one layer: [num_blocks, block_size, n_kv_heads, head_dim]
    const bf16* __restrict__ v_cache,       // same
    const u32* __restrict__ block_tables,   // [n_seqs, max_blocks]
    const u32* __restrict__ query_start,    // [n_seqs + 1]
    const u32* __restrict__ start_pos,      // [n_seqs]
    int max_blocks, int n_heads, int n_kv_heads, int head_dim, int block_size, float scale) {
    extern __shared__ float smem[];
    float* q_s = smem;                                // [ROWS][head_dim]
    float* k_s = q_s + PREFILL_ROWS * head_dim;       // [KEYS][head_dim + 1]
    float* v_s = k_s + PREFILL_KEYS * (head_dim + 1); // [KEYS][head_dim]

    const int kv_head = blockIdx.y, seq = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = n_heads / n_kv_heads;
    const int kv_dim = n_kv_heads * head_dim;
    const int q_dim = n_heads * head_dim;
    const int first = (int)query_start[seq];
    const int n_new = (int)query_start[seq + 1] - first;
    const int start = (int)start_pos[seq];
    const int row0 = blockIdx.x * PREFILL_ROWS;
    if (row0 >= n_new * group) return;
    const u32* table = block_tables + (u64)seq * max_blocks;

    // Load the block's query rows, pre-scaled; rows past the sequence are 0.
    for (int idx = tid; idx < PREFILL_ROWS * head_dim; idx += blockDim.x) {
        const int r = idx / head_dim, d = idx % head_dim;
        const int gr = row0 + r;
        float v = 0.0f;
        if (gr < n_new * group) {
            const int i = gr / group, head = kv_head * group + gr % group;
            v = q[(u64)(first + i) * q_dim + (u64)head * head_dim + d] * scale;
        }
        q_s[idx] = v;
    }

    // This warp's rows: their query positions (-1: no such row).
    int qpos[PREFILL_ROWS_PER_WARP];
#pragma unroll
    for (int rr = 0; rr < PREFILL_ROWS_PER_WARP; ++rr) {
        const int gr = row0 + warp * PREFILL_ROWS_PER_WARP + rr;
        qpos[rr] = gr < n_new * group ? start + gr / group : -1;
    }
    // Keys this block needs: up to its last row's position.
    const int last_row = min(row0 + PREFILL_ROWS, n_new * group) - 1;
    const int n_keys = start + last_row / group + 1;
    const int dims = head_dim / 32;

    float m[PREFILL_ROWS_PER_WARP], l[PREFILL_ROWS_PER_WARP];
    float acc[PREFILL_ROWS_PER_WARP][PREFILL_MAX_DIMS_PER_LANE];
#pragma unroll
    for (int rr = 0; rr < PREFILL_ROWS_PER_WARP; ++rr) {
        m[rr] = XPYD_NEG_INF;
        l[rr] = 0.0f;
#pragma unroll
        for (int k = 0; k < PREFILL_MAX_DIMS_PER_LANE; ++k) acc[rr][k] = 0.0f;
    }

    for (int t0 = 0; t0 < n_keys; t0 += PREFILL_KEYS) {
        __syncthreads();  // q_s loaded / previous tile consumed
        for (int idx = tid; idx < PREFILL_KEYS * head_dim; idx += blockDim.x) {
            const int j = idx / head_dim, d = idx % head_dim;
            const int pos = t0 + j;
            float kv = 0.0f, vv = 0.0f;
            if (pos < n_keys) {
                const u64 slot = (u64)table[pos / block_size] * block_size + pos % block_size;
                const u64 at = slot * kv_dim + (u64)kv_head * head_dim + d;
                kv = bf16_to_f32(k_cache[at]);
                vv = bf16_to_f32(v_cache[at]);
            }
            k_s[j * (head_dim + 1) + d] = kv;
            v_s[j * head_dim + d] = vv;
        }
        __syncthreads();

        const int key = t0 + lane;
#pragma unroll
        for (int rr = 0; rr < PREFILL_ROWS_PER_WARP; ++rr) {
            if (qpos[rr] < 0 || t0 > qpos[rr]) continue;  // warp-uniform
            const float* qr = q_s + (warp * PREFILL_ROWS_PER_WARP + rr) * head_dim;
            const float* kr = k_s + lane * (head_dim + 1);
            float s = 0.0f;
            for (int d = 0; d < head_dim; ++d) s += qr[d] * kr[d];
            if (key > qpos[rr]) s = XPYD_NEG_INF;
            const float m_new = fmaxf(m[rr], warp_max(s));  // finite: key t0 <= qpos
            const float p = __expf(s - m_new);
            const float corr = __expf(m[rr] - m_new);
            l[rr] = l[rr] * corr + warp_sum(p);
            m[rr] = m_new;
#pragma unroll
            for (int k = 0; k < PREFILL_MAX_DIMS_PER_LANE; ++k) acc[rr][k] *= corr;
            for (int j = 0; j < PREFILL_KEYS; ++j) {
                const float pj = __shfl_sync(XPYD_FULL_MASK, p, j);
                const float* vr = v_s + j * head_dim + lane;
#pragma unroll
                for (int k = 0; k < PREFILL_MAX_DIMS_PER_LANE; ++k)
                    if (k < dims) acc[rr][k] += pj * vr[k * 32];
            }
        }
    }

#pragma unroll
    for (int rr = 0; rr < PREFILL_ROWS_PER_WARP; ++rr) {
        if (qpos[rr] < 0) continue;
        const int gr = row0 + warp * PREFILL_ROWS_PER_WARP + rr;
        const int i = gr / group, head = kv_head * group + gr % group;
        bf16* orow = out + (u64)(first + i) * q_dim + (u64)head * head_dim;
        const float inv_l = 1.0f / l[rr];
#pragma unroll
        for (int k = 0; k < PREFILL_MAX_DIMS_PER_LANE; ++k)
            if (k < dims) orow[lane + k * 32] = f32_to_bf16(acc[rr][k] * inv_l);
    }
}
