//! CPU kernels for the forward pass: dot products that work directly on
//! quantized GGUF blocks (Q4_0, Q4_1, Q8_0 against activations quantized to
//! Q8, as llama.cpp does; F32/F16/BF16, and Q4_K/Q6_K row by row, against
//! f32), their AVX2/FMA/F16C versions and AVX-512 VNNI tiles for Q4 weights
//! ([`Kernels`], chosen at run time), row-parallel matrix products on the
//! rayon pool, and the small f32 operations of a Llama layer (RMSNorm, RoPE,
//! softmax, SiLU).
//!
//! Nothing here knows about layers, sequences or the KV cache; that is
//! [`super::model`]'s job.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub mod matmul;
pub mod ops;
pub mod quant;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use matmul::{Activations, KernelError, Kernels, QMatrix, WeightBytes, kernels};

/// Pseudo-random values in [-1, 1) (xorshift) for the kernel tests.
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}
