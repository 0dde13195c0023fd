// SwiGLU: out = silu(gate) * up, from the f32 GEMM outputs to bf16 for the
// down projection. `gate` and `up` rows are `stride` floats apart, so a fused
// gate|up GEMM output ([n, 2*ffn], stride 2*ffn, up = gate + ffn) and two
// separate outputs (stride ffn) both work.
//
// grid (ceil(n_tokens*ffn / 256)), block (256). out: [n_tokens, ffn].
extern "C" __global__ void swiglu(
    const float* __restrict__ gate, const float* __restrict__ up, int stride,
    bf16* __restrict__ out, int n_tokens, int ffn) {
    const u64 k = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (u64)n_tokens * ffn) return;
    const u64 t = k / ffn, i = k % ffn;
    const float g = gate[t * stride + i];
    const float u = up[t * stride + i];
    out[k] = f32_to_bf16(g / (1.0f + __expf(-g)) * u);
}
