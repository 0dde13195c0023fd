// RMSNorm of the f32 residual stream into bf16, ready for a cuBLAS GEMM:
// out = x / sqrt(mean(x^2) + eps) * weight, the sum of squares in f32.
//
// grid (n_rows), block (a multiple of 32, up to 1024; 256 is a good choice).
extern "C" __global__ void rms_norm(
    const float* __restrict__ x,       // [n_rows, hidden]
    const float* __restrict__ weight,  // [hidden]
    bf16* __restrict__ out,            // [n_rows, hidden]
    int hidden, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (u64)blockIdx.x * hidden;
    bf16* orow = out + (u64)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float scale = rsqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        orow[i] = f32_to_bf16(xr[i] * scale * weight[i]);
}
