// Embedding gather: one row of the bf16 table per token, widened to the f32
// residual stream.
//
// grid (n_tokens), block (256). out: [n_tokens, hidden] f32.
// Token ids are validated on the host (the model rejects ids >= vocab).
extern "C" __global__ void embedding_gather(
    const bf16* __restrict__ table,   // [vocab, hidden]
    const u32* __restrict__ ids,      // [n_tokens]
    float* __restrict__ out,          // [n_tokens, hidden]
    int hidden) {
    const u64 row = ids[blockIdx.x];
    const bf16* src = table + row * (u64)hidden;
    float* dst = out + (u64)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = bf16_to_f32(src[i]);
}
