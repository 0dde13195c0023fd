// Writes the new tokens' K and V (f32, after RoPE on K) into their paged
// cache slots as bf16. The cache of one layer is [num_blocks, block_size,
// n_kv_heads, head_dim] for K and the same for V (the engine's
// [layer][K|V][block][slot][head][dim] layout); slots[t] = block * block_size
// + offset, computed by the host from the sequence's block table.
//
// grid (n_tokens), block (128).
extern "C" __global__ void kv_write(
    const float* __restrict__ k, const float* __restrict__ v,  // [n_tokens, kv_dim]
    bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,    // one layer
    const u32* __restrict__ slots,                             // [n_tokens]
    int kv_dim) {
    const u64 slot = slots[blockIdx.x];
    const float* ks = k + (u64)blockIdx.x * kv_dim;
    const float* vs = v + (u64)blockIdx.x * kv_dim;
    bf16* kd = k_cache + slot * kv_dim;
    bf16* vd = v_cache + slot * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kd[i] = f32_to_bf16(ks[i]);
        vd[i] = f32_to_bf16(vs[i]);
    }
}
