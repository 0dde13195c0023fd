//! The CUDA device as the forward pass uses it (feature `cuda`): a context
//! and stream on the resolved device, cuBLAS for the GEMMs, every kernel of
//! [`super::kernels`] compiled by NVRTC for the device's architecture and
//! loaded, and one typed launch function per kernel, so the model code reads
//! as a list of operations.
//!
//! NOT YET RUN ON A GPU: it compiles and its launch shapes follow the
//! kernels' documented grids, but nothing here has executed. The kernels
//! themselves are checked on the CPU (`tests/cuda_kernels_emulated.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, DriverError, LaunchConfig, PushKernelArg,
};

use super::kernels;
use super::nvrtc::{self, ComputeCapability, NvrtcError};
use crate::engine::device::CudaDevice;

/// A bf16 value on the device, as its raw bits.
pub type Bf16 = u16;

/// The CUDA backend could not start or a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA driver: {0:?}")]
    Driver(#[from] DriverError),
    #[error(
        "cuBLAS (libcublas.so.13, with libcublasLt.so.13) not found on the loader path: install CUDA 13's cuBLAS (e.g. the nvidia-cublas wheel's lib folder on LD_LIBRARY_PATH)"
    )]
    CublasMissing,
    #[error("cuBLAS: {0:?}")]
    Cublas(#[from] cublas::result::CublasError),
    #[error(transparent)]
    Nvrtc(#[from] NvrtcError),
    #[error("head_dim {0} is not supported by the CUDA kernels (a multiple of 32, at most 256)")]
    HeadDim(usize),
}

/// Context, stream, cuBLAS and the loaded kernels of one device.
pub struct CudaBackend {
    pub device: CudaDevice,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
}

fn grid(x: usize, y: usize, z: usize, threads: u32, shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

impl CudaBackend {
    /// Opens `device`, compiles and loads every kernel (a few seconds).
    pub fn new(device: CudaDevice) -> Result<Self, CudaError> {
        // SAFETY: only dlopens libcublas by its candidate names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::CublasMissing);
        }
        let ctx = CudaContext::new(device.ordinal as usize)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())?;
        let arch: ComputeCapability = device.compute_capability;
        let mut functions = HashMap::new();
        for k in kernels::ALL {
            let module = ctx.load_module(nvrtc::compile_kernel(k, arch)?)?;
            for entry in k.entry_points {
                functions.insert(*entry, module.load_function(entry)?);
            }
        }
        // head_dim 256 needs more than the default 48 KiB.
        functions["prefill_attention"].set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            kernels::prefill_shared_bytes(kernels::MAX_HEAD_DIM) as i32,
        )?;
        Ok(Self {
            device,
            ctx,
            stream,
            blas,
            functions,
        })
    }

    fn f(&self, entry: &str) -> &CudaFunction {
        debug_assert!(kernels::source_of(entry).is_some());
        &self.functions[entry]
    }

    /// `y[n, out] = x[n, in] · w[out, in]ᵀ + beta · y`: bf16 inputs, f32
    /// output and accumulation (beta 1 adds into the residual stream).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        w: &CudaView<'_, Bf16>,
        x: &CudaView<'_, Bf16>,
        y: &mut CudaViewMut<'_, f32>,
        n: usize,
        out: usize,
        inner: usize,
        beta: f32,
    ) -> Result<(), CudaError> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
        };
        let alpha = 1.0f32;
        let (wp, _w) = w.device_ptr(&self.stream);
        let (xp, _x) = x.device_ptr(&self.stream);
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        // Column-major view: yᵀ[out, n] = (w as [in, out])ᵀ · (x as [in, n]).
        // SAFETY: the views hold at least out*in, n*in and n*out elements
        // (callers slice them so); alpha/beta are host f32 as COMPUTE_32F wants.
        unsafe {
            cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                out as i32,
                n as i32,
                inner as i32,
                (&alpha as *const f32).cast(),
                wp as *const _,
                cudaDataType::CUDA_R_16BF,
                inner as i32,
                xp as *const _,
                cudaDataType::CUDA_R_16BF,
                inner as i32,
                (&beta as *const f32).cast(),
                yp as *mut _,
                cudaDataType::CUDA_R_32F,
                out as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }

    pub fn embedding(
        &self,
        table: &CudaSlice<Bf16>,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        hidden: usize,
    ) -> Result<(), CudaError> {
        let h = hidden as i32;
        let mut b = self.stream.launch_builder(self.f("embedding_gather"));
        b.arg(table).arg(ids).arg(out).arg(&h);
        // SAFETY: argument list matches embedding.cu; ids < vocab checked by the caller.
        unsafe { b.launch(grid(n, 1, 1, 256, 0)) }?;
        Ok(())
    }

    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        out: &mut CudaSlice<Bf16>,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let h = hidden as i32;
        let mut b = self.stream.launch_builder(self.f("rms_norm"));
        b.arg(x).arg(weight).arg(out).arg(&h).arg(&eps);
        // SAFETY: argument list matches rms_norm.cu.
        unsafe { b.launch(grid(rows, 1, 1, 256, 0)) }?;
        Ok(())
    }

    /// RoPE in place on `x` ([n, heads, head_dim]); `halves` picks the HF order.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        positions: &CudaSlice<u32>,
        freqs: &CudaSlice<f32>,
        n: usize,
        heads: usize,
        head_dim: usize,
        halves: bool,
    ) -> Result<(), CudaError> {
        let (h, d) = (heads as i32, head_dim as i32);
        let entry = if halves {
            "rope_halves"
        } else {
            "rope_adjacent"
        };
        let mut b = self.stream.launch_builder(self.f(entry));
        b.arg(x).arg(positions).arg(freqs).arg(&h).arg(&d);
        // SAFETY: argument list matches rope.cu.
        unsafe { b.launch(grid(n, 1, 1, 128, 0)) }?;
        Ok(())
    }

    /// `out = silu(gu[:, :ffn]) * gu[:, ffn:]` for a fused gate|up output.
    pub fn swiglu(
        &self,
        gate_up: &CudaSlice<f32>,
        out: &mut CudaSlice<Bf16>,
        n: usize,
        ffn: usize,
    ) -> Result<(), CudaError> {
        let gate = gate_up.slice(..);
        let up = gate_up.slice(ffn..);
        let (stride, n_i, f_i) = ((2 * ffn) as i32, n as i32, ffn as i32);
        let mut b = self.stream.launch_builder(self.f("swiglu"));
        b.arg(&gate)
            .arg(&up)
            .arg(&stride)
            .arg(out)
            .arg(&n_i)
            .arg(&f_i);
        // SAFETY: argument list matches swiglu.cu.
        unsafe { b.launch(grid((n * ffn).div_ceil(256), 1, 1, 256, 0)) }?;
        Ok(())
    }

    /// Writes K/V rows into one layer's caches at `slots`.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        k: &CudaView<'_, f32>,
        v: &CudaView<'_, f32>,
        k_cache: &mut CudaViewMut<'_, Bf16>,
        v_cache: &mut CudaViewMut<'_, Bf16>,
        slots: &CudaSlice<u32>,
        n: usize,
        kv_dim: usize,
    ) -> Result<(), CudaError> {
        let d = kv_dim as i32;
        let mut b = self.stream.launch_builder(self.f("kv_write"));
        b.arg(k).arg(v).arg(k_cache).arg(v_cache).arg(slots).arg(&d);
        // SAFETY: argument list matches kv_write.cu; slots < num_blocks * block_size.
        unsafe { b.launch(grid(n, 1, 1, 128, 0)) }?;
        Ok(())
    }

    /// Attention of every new token: `decode` (one token per sequence) or
    /// causal prefill after a cached prefix. `out` is bf16 [n, heads*head_dim].
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        shape: &AttentionShape,
        tables: &AttentionTables,
        q: &CudaView<'_, f32>,
        k_cache: &CudaView<'_, Bf16>,
        v_cache: &CudaView<'_, Bf16>,
        out: &mut CudaSlice<Bf16>,
    ) -> Result<(), CudaError> {
        let s = shape;
        if !s.head_dim.is_multiple_of(32) || s.head_dim > kernels::MAX_HEAD_DIM {
            return Err(CudaError::HeadDim(s.head_dim));
        }
        let (mb, nh, nkv, hd, bs) = (
            tables.max_blocks as i32,
            s.n_heads as i32,
            s.n_kv_heads as i32,
            s.head_dim as i32,
            s.block_size as i32,
        );
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        if tables.decode {
            let mut b = self.stream.launch_builder(self.f("paged_attention_decode"));
            b.arg(out).arg(q).arg(k_cache).arg(v_cache);
            b.arg(&tables.block_tables).arg(&tables.context_lens);
            b.arg(&mb).arg(&nh).arg(&nkv).arg(&hd).arg(&bs).arg(&scale);
            let cfg = grid(s.n_heads, tables.n_seqs, 1, kernels::DECODE_THREADS, 0);
            // SAFETY: argument list matches paged_attention_decode.cu.
            unsafe { b.launch(cfg) }?;
        } else {
            let group = s.n_heads / s.n_kv_heads;
            let row_tiles =
                (tables.max_new_tokens * group).div_ceil(kernels::PREFILL_ROWS as usize);
            let mut b = self.stream.launch_builder(self.f("prefill_attention"));
            b.arg(out).arg(q).arg(k_cache).arg(v_cache);
            b.arg(&tables.block_tables)
                .arg(&tables.query_start)
                .arg(&tables.start_pos);
            b.arg(&mb).arg(&nh).arg(&nkv).arg(&hd).arg(&bs).arg(&scale);
            let cfg = grid(
                row_tiles,
                s.n_kv_heads,
                tables.n_seqs,
                kernels::PREFILL_THREADS,
                kernels::prefill_shared_bytes(s.head_dim),
            );
            // SAFETY: argument list matches prefill_attention.cu.
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }

    /// Greedy ids of `rows` rows of logits.
    pub fn argmax(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        out: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        let v = vocab as i32;
        let mut b = self.stream.launch_builder(self.f("argmax"));
        b.arg(logits).arg(&v).arg(out);
        // SAFETY: argument list matches sampling.cu.
        unsafe { b.launch(grid(rows, 1, 1, 256, 0)) }?;
        Ok(())
    }

    /// One temperature / top-k / top-p draw per row (per-row parameters).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        temperature: &CudaSlice<f32>,
        top_k: &CudaSlice<u32>,
        top_p: &CudaSlice<f32>,
        uniform: &CudaSlice<f32>,
        out: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        let v = vocab as i32;
        let mut b = self.stream.launch_builder(self.f("sample_top_k_top_p"));
        b.arg(logits)
            .arg(&v)
            .arg(temperature)
            .arg(top_k)
            .arg(top_p)
            .arg(uniform)
            .arg(out);
        // SAFETY: argument list matches sampling.cu.
        unsafe { b.launch(grid(rows, 1, 1, kernels::SAMPLE_THREADS, 0)) }?;
        Ok(())
    }
}

/// Model dimensions the attention kernels need.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// A batch's block tables and offsets, on the device.
pub struct AttentionTables {
    /// Every sequence brings exactly one new token.
    pub decode: bool,
    pub n_seqs: usize,
    pub max_blocks: usize,
    pub max_new_tokens: usize,
    /// [n_seqs, max_blocks]
    pub block_tables: CudaSlice<u32>,
    /// [n_seqs]: keys per sequence including the new token (decode).
    pub context_lens: CudaSlice<u32>,
    /// [n_seqs + 1]: row offsets of each sequence's new tokens (prefill).
    pub query_start: CudaSlice<u32>,
    /// [n_seqs]: position of each sequence's first new token (prefill).
    pub start_pos: CudaSlice<u32>,
}
