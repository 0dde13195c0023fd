//! CPU kernels for the forward pass: dot products that work directly on
//! quantized GGUF blocks (Q4_0, Q4_1, Q8_0 against activations quantized to
//! Q8, as llama.cpp does; F32/F16/BF16, and Q4_K/Q6_K row by row, against
//! f32), their AVX2/FMA/F16C versions chosen at run time, row-parallel matrix
//! products on the rayon pool, and the small f32 operations of a Llama layer
//! (RMSNorm, RoPE, softmax, SiLU).
//!
//! Nothing here knows about layers, sequences or the KV cache; that is
//! [`super::model`]'s job.

pub mod matmul;
pub mod ops;
pub mod quant;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use matmul::{Activations, KernelError, QMatrix, WeightBytes};
