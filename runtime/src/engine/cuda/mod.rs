//! The CUDA backend: kernels for every part of a Llama step except the
//! GEMMs (which go to cuBLAS), compiled at run time by NVRTC, and the code
//! that finds the CUDA libraries.
//!
//! Everything is loaded at run time (cudarc's `dynamic-loading`), so one
//! binary serves both backends and builds without CUDA; which device a
//! process uses is [`super::device::resolve`]'s decision. The host-side
//! forward pass (`model`, feature `cuda`) is not verified on a GPU yet.

#[cfg(feature = "cuda")]
pub mod backend;
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod model;
pub mod nvrtc;
