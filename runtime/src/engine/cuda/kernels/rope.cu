// Rotary position embedding, in place on f32 Q or K rows, in both layouts:
// - rope_adjacent: pairs (2i, 2i+1), llama.cpp's order (GGUF checkpoints);
// - rope_halves:   pairs (i, i + head_dim/2), Hugging Face's order.
// `freqs` are the host's f32 inverse frequencies base^(-2i/head_dim); the
// angle pos * freq and its sine/cosine are taken in f64, as the CPU backend
// does, so that long positions keep their precision.
//
// grid (n_tokens), block (128). x: [n_tokens, n_heads, head_dim].
// positions: [n_tokens], each token's absolute position.

__device__ __forceinline__ void rope_pair(float* a, float* b, double angle) {
    double s, c;
    sincos(angle, &s, &c);
    const float cf = (float)c, sf = (float)s;
    const float x0 = *a, x1 = *b;
    *a = x0 * cf - x1 * sf;
    *b = x0 * sf + x1 * cf;
}

extern "C" __global__ void rope_adjacent(
    float* __restrict__ x, const u32* __restrict__ positions,
    const float* __restrict__ freqs, int n_heads, int head_dim) {
    const int half = head_dim / 2;
    const double pos = (double)positions[blockIdx.x];
    float* row = x + (u64)blockIdx.x * n_heads * head_dim;
    for (int k = threadIdx.x; k < n_heads * half; k += blockDim.x) {
        const int head = k / half, i = k % half;
        float* h = row + head * head_dim;
        rope_pair(h + 2 * i, h + 2 * i + 1, pos * (double)freqs[i]);
    }
}

extern "C" __global__ void rope_halves(
    float* __restrict__ x, const u32* __restrict__ positions,
    const float* __restrict__ freqs, int n_heads, int head_dim) {
    const int half = head_dim / 2;
    const double pos = (double)positions[blockIdx.x];
    float* row = x + (u64)blockIdx.x * n_heads * head_dim;
    for (int k = threadIdx.x; k < n_heads * half; k += blockDim.x) {
        const int head = k / half, i = k % half;
        float* h = row + head * head_dim;
        rope_pair(h + i, h + i + half, pos * (double)freqs[i]);
    }
}
