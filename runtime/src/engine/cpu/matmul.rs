//! A weight matrix in its stored format ([`QMatrix`]) and the product of it
//! with a batch of activation rows, split by weight rows across the rayon
//! pool. Q4_0/Q4_1/Q8_0 weights stay quantized: each row is dotted block by
//! block against the activations quantized once per call to Q8. F32/F16/BF16
//! and the K-quants (Q4_K, Q6_K) are converted one row at a time into a small
//! f32 buffer and dotted in f32: correct, but the K-quants are not fast yet.

use std::sync::Arc;

use rayon::prelude::*;

use super::quant::{self, BlockQ8, QK};
use crate::engine::gguf::{GgmlType, GgufBytes};

/// A matrix cannot be built from the given bytes.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("tensor {name}: {reason}")]
    BadShape { name: String, reason: String },
}

/// Where a weight's bytes live: borrowed from a mapped GGUF file or owned.
#[derive(Clone)]
pub enum WeightBytes {
    Mapped {
        file: Arc<GgufBytes>,
        start: usize,
        len: usize,
    },
    Owned(Arc<Vec<u8>>),
}

impl WeightBytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Self::Mapped { file, start, len } => &file.as_slice()[*start..*start + *len],
            Self::Owned(v) => v,
        }
    }
}

/// A `rows x cols` weight matrix (row-major, `cols` contiguous, as ggml's
/// `ne[0] = cols`), in one of the types the kernels read directly.
#[derive(Clone)]
pub struct QMatrix {
    name: String,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    bytes: WeightBytes,
    /// The matrix repacked for the AVX-512 products (`None`: not a Q4_0,
    /// Q4_1 or Q8_0 matrix, or one they do not take), at load or on its
    /// first product.
    #[cfg(target_arch = "x86_64")]
    packed: std::sync::OnceLock<Option<super::avx512::Packed>>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({} {} {}x{})",
            self.name, self.ty, self.rows, self.cols
        )
    }
}

fn uses_q8_activations(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

impl QMatrix {
    /// Wraps `bytes` as a `rows x cols` matrix of type `ty`.
    pub fn new(
        name: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: WeightBytes,
    ) -> Result<Self, KernelError> {
        let bad = |reason: String| KernelError::BadShape {
            name: name.to_string(),
            reason,
        };
        match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {}
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                if !cols.is_multiple_of(QK) {
                    return Err(bad(format!("{cols} columns are not a multiple of {QK}")));
                }
            }
            GgmlType::Q4K | GgmlType::Q6K => {
                if !cols.is_multiple_of(quant::QK_K) {
                    return Err(bad(format!(
                        "{cols} columns are not a multiple of {}",
                        quant::QK_K
                    )));
                }
            }
        }
        let row_bytes = ty
            .bytes_for(cols as u64)
            .ok_or_else(|| bad(format!("{cols} columns do not fill whole {ty} blocks")))?
            as usize;
        let want = row_bytes.checked_mul(rows);
        if want != Some(bytes.as_slice().len()) {
            return Err(bad(format!(
                "{rows}x{cols} {ty} needs {want:?} bytes, got {}",
                bytes.as_slice().len()
            )));
        }
        Ok(Self {
            name: name.to_string(),
            ty,
            rows,
            cols,
            row_bytes,
            bytes,
            #[cfg(target_arch = "x86_64")]
            packed: std::sync::OnceLock::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.bytes.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Writes row `r` as f32 into `out` (`cols` long): embedding look-ups.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        match self.ty {
            GgmlType::F32 => quant::dequantize_f32(row, out),
            GgmlType::F16 => quant::dequantize_f16(row, out),
            GgmlType::BF16 => quant::dequantize_bf16(row, out),
            GgmlType::Q4_0 => quant::dequantize_q4_0(row, out),
            GgmlType::Q4_1 => quant::dequantize_q4_1(row, out),
            GgmlType::Q8_0 => quant::dequantize_q8_0(row, out),
            GgmlType::Q4K => quant::dequantize_q4_k(row, out),
            GgmlType::Q6K => quant::dequantize_q6_k(row, out),
        }
    }

    /// `out[t][r] = sum_c self[r][c] * x[t][c]` for `n` activation rows,
    /// with activations quantized to Q8 for quantized weights.
    ///
    /// `x` is `[n, cols]`, `out` is `[n, rows]`, both row-major.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_with(x, n, out, Activations::Q8);
    }

    /// Builds what the chosen [`kernels`] keep per matrix (the AVX-512
    /// repacking of a Q4 or Q8_0 matrix) now rather than on its first product, so
    /// a loaded model's first request does not pay for it.
    pub fn prepare(&self) {
        #[cfg(target_arch = "x86_64")]
        if kernels() == Kernels::Avx512 {
            self.packed();
        }
    }

    /// This matrix repacked for the AVX-512 kernels (once), if they take
    /// it: a Q8_0 matrix, or a Q4_0 or Q4_1 one whose constants fit an f16.
    #[cfg(target_arch = "x86_64")]
    fn packed(&self) -> Option<&super::avx512::Packed> {
        use super::avx512::{Format, Packed};
        self.packed
            .get_or_init(|| {
                let format = match self.ty {
                    GgmlType::Q4_0 => Format::Q4_0,
                    GgmlType::Q4_1 => Format::Q4_1,
                    GgmlType::Q8_0 => Format::Q8_0,
                    _ => return None,
                };
                Packed::new(format, self.bytes.as_slice(), self.cols / QK)
            })
            .as_ref()
    }

    /// [`QMatrix::matmul`] with a choice of activation precision, on the
    /// [`kernels`].
    pub fn matmul_with(&self, x: &[f32], n: usize, out: &mut [f32], act: Activations) {
        assert_eq!(x.len(), n * self.cols, "{self:?}: activation shape");
        assert_eq!(out.len(), n * self.rows, "{self:?}: output shape");
        // A step of only partial prefills asks for no logits at all.
        if n == 0 {
            return;
        }
        let chosen = kernels();
        let simd = chosen >= Kernels::Avx2;
        let chunk = rows_per_task(self.rows);
        #[cfg(target_arch = "x86_64")]
        if act == Activations::Q8
            && chosen == Kernels::Avx512
            && let Some(packed) = self.packed()
        {
            // SAFETY: `kernels()` is at most what `detect()` found, and it
            // finds Avx512 only where `avx512::available()`.
            unsafe { self.matmul_avx512(packed, x, n, out) };
            return;
        }
        // Results are produced transposed ([rows, n]) so that each task owns
        // one contiguous slice, then transposed back.
        let mut tmp = split_scratch(n, self.rows);
        let dst: &mut [f32] = if n == 1 { out } else { &mut tmp };

        if uses_q8_activations(self.ty) && act == Activations::Q8 {
            let nb = self.cols / QK;
            let mut xq = vec![BlockQ8::ZERO; n * nb];
            // xq: [n, cols/32] blocks
            // Fanning out costs more than it saves for a few rows (decode).
            if n >= 8 {
                xq.par_chunks_mut(nb)
                    .zip(x.par_chunks(self.cols))
                    .for_each(|(q, xs)| quant::quantize_q8(xs, q));
            } else {
                quant::quantize_q8(x, &mut xq);
            }
            let dot = q8_kernel(self.ty, simd);
            dst.par_chunks_mut(chunk * n)
                .enumerate()
                .for_each(|(ci, o)| {
                    // Tokens in tiles, so that a tile's activations and the
                    // task's weight rows both stay in L2 during a prefill.
                    for t0 in (0..n).step_by(TOKEN_TILE) {
                        let t1 = n.min(t0 + TOKEN_TILE);
                        for (i, orow) in o.chunks_mut(n).enumerate() {
                            let xs = &xq[t0 * nb..t1 * nb];
                            dot(self.row(ci * chunk + i), xs, nb, &mut orow[t0..t1]);
                        }
                    }
                });
        } else {
            dst.par_chunks_mut(chunk * n)
                .enumerate()
                .for_each(|(ci, o)| {
                    let mut wrow = vec![0f32; self.cols];
                    for (i, orow) in o.chunks_mut(n).enumerate() {
                        self.dequantize_row(ci * chunk + i, &mut wrow);
                        for (t, v) in orow.iter_mut().enumerate() {
                            *v = dot_f32(&wrow, &x[t * self.cols..(t + 1) * self.cols], simd);
                        }
                    }
                });
        }
        if n > 1 {
            for (r, col) in tmp.chunks_exact(n).enumerate() {
                for (t, &v) in col.iter().enumerate() {
                    out[t * self.rows + r] = v;
                }
            }
        }
    }

    /// The AVX-512 product of a packed (Q4 or Q8_0) matrix. A prefill (at least
    /// [`TOKEN_SPLIT`] tokens) is split by tokens: each task computes whole
    /// output rows of its tokens in place, so nothing is transposed or
    /// gathered on one thread after. Every (row, token) is computed the
    /// same way whatever the split and the tile, so a token's result does
    /// not depend on the batch it is in.
    ///
    /// # Safety
    /// The CPU must have what `avx512::available()` checks.
    #[cfg(target_arch = "x86_64")]
    unsafe fn matmul_avx512(
        &self,
        packed: &super::avx512::Packed,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        use super::avx512::{self, Q8Act};
        let act = Q8Act::quantize(x, n, self.cols);
        let rows = packed.rows();
        if n >= TOKEN_SPLIT {
            let threads = rayon::current_num_threads().max(1);
            let tile = n
                .div_ceil(threads * 4)
                .next_multiple_of(4)
                .clamp(16, TOKEN_TILE);
            out.par_chunks_mut(tile * rows)
                .enumerate()
                .for_each(|(i, o)| {
                    let t0 = i * tile;
                    let tokens = t0..t0 + o.len() / rows;
                    // SAFETY: the caller's promise.
                    unsafe { avx512::gemm(packed, 0..rows, &act, tokens, o) };
                });
            return;
        }
        // SAFETY: the caller's promise.
        unsafe { split_by_rows(&[(packed, rows_per_task(rows))], &act, n, &mut [out]) };
    }

    /// `outs[i] = mats[i] · x` for matrices of the same width that take the
    /// same activations (a layer's query, key and value projections; its
    /// gate and up projections). A decode step on AVX-512 quantizes the
    /// activations once and splits the rows of all the products among the
    /// pool in one pass, where one product at a time would make the pool
    /// start and join once per matrix. Each (row, token) is computed
    /// exactly as [`QMatrix::matmul_with`] computes it.
    pub fn matmul_each(
        mats: &[&QMatrix],
        x: &[f32],
        n: usize,
        outs: &mut [&mut [f32]],
        act: Activations,
    ) {
        assert_eq!(mats.len(), outs.len(), "an output per matrix");
        #[cfg(target_arch = "x86_64")]
        if act == Activations::Q8
            && kernels() == Kernels::Avx512
            && (1..TOKEN_SPLIT).contains(&n)
            && let Some(cols) = mats.first().map(|m| m.cols)
            && mats.iter().all(|m| m.cols == cols)
            && let Some(parts) = mats
                .iter()
                .map(|m| Some((m.packed()?, rows_per_task(m.rows))))
                .collect::<Option<Vec<_>>>()
        {
            for (m, out) in mats.iter().zip(outs.iter()) {
                assert_eq!(x.len(), n * m.cols, "{m:?}: activation shape");
                assert_eq!(out.len(), n * m.rows, "{m:?}: output shape");
            }
            let act = super::avx512::Q8Act::quantize(x, n, cols);
            // SAFETY: `kernels()` is at most what `detect()` found, and it
            // finds Avx512 only where `avx512::available()`.
            unsafe { split_by_rows(&parts, &act, n, outs) };
            return;
        }
        for (m, out) in mats.iter().zip(outs.iter_mut()) {
            m.matmul_with(x, n, out, act);
        }
    }
}

/// The AVX-512 products of a few tokens (a decode step) with the packed
/// matrices `parts` (each with its rows per task), split by weight rows
/// into one parallel pass: each task writes its rows of every token, then
/// they are copied into place.
///
/// # Safety
/// The CPU must have what `avx512::available()` checks.
#[cfg(target_arch = "x86_64")]
unsafe fn split_by_rows(
    parts: &[(&super::avx512::Packed, usize)],
    act: &super::avx512::Q8Act,
    n: usize,
    outs: &mut [&mut [f32]],
) {
    let mut tmps: Vec<Vec<f32>> = parts
        .iter()
        .map(|(p, _)| split_scratch(n, p.rows()))
        .collect();
    let mut tasks = Vec::new();
    for ((&(packed, chunk), out), tmp) in parts.iter().zip(outs.iter_mut()).zip(&mut tmps) {
        let dst: &mut [f32] = if n == 1 { out } else { tmp };
        for (ci, o) in dst.chunks_mut(chunk * n).enumerate() {
            tasks.push((packed, ci * chunk, o));
        }
    }
    tasks.into_par_iter().for_each(|(packed, r0, o)| {
        // SAFETY: the caller's promise.
        unsafe { super::avx512::gemm(packed, r0..r0 + o.len() / n, act, 0..n, o) };
    });
    if n > 1 {
        for ((&(packed, chunk), out), tmp) in parts.iter().zip(outs.iter_mut()).zip(&tmps) {
            let rows = packed.rows();
            for (ci, part) in tmp.chunks(chunk * n).enumerate() {
                let part_rows = part.len() / n;
                for (t, src) in part.chunks_exact(part_rows).enumerate() {
                    out[t * rows + ci * chunk..][..part_rows].copy_from_slice(src);
                }
            }
        }
    }
}

/// Weight rows per task of a product split by rows: enough work to amortise
/// scheduling, enough tasks to balance the pool.
fn rows_per_task(rows: usize) -> usize {
    (rows / (rayon::current_num_threads().max(1) * 4)).clamp(16, 1024)
}

/// Scratch for a product split by weight rows: none for one token (the
/// tasks write the output directly), else `n * rows` floats.
fn split_scratch(n: usize, rows: usize) -> Vec<f32> {
    if n == 1 {
        Vec::new()
    } else {
        vec![0f32; n * rows]
    }
}

/// From this many tokens on, the AVX-512 product splits by tokens.
const TOKEN_SPLIT: usize = 16;

/// How activations meet quantized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// Quantize activations to Q8 and use integer dot products (fast; what
    /// llama.cpp does).
    #[default]
    Q8,
    /// Dequantize weight rows and use f32 dot products (slower; isolates the
    /// weights' own quantization error, for reference checks).
    F32,
}

/// Activation rows per pass over a task's weight rows (about 60-120 KiB of
/// Q8 blocks at this model's widths): they stay in L2 while the rows
/// stream. The AVX-512 products tile by it too.
pub(super) const TOKEN_TILE: usize = 64;

/// `out[t] = row · x[t * nb..(t + 1) * nb]` for every `t < out.len()`.
type Q8Dot = fn(&[u8], &[BlockQ8], usize, &mut [f32]);

/// Which kernels the quantized matrix products use: the scalar reference,
/// AVX2/FMA/F16C (one weight row by a few tokens), or AVX-512 VNNI
/// (register-blocked tiles, for Q4_0, Q4_1 and Q8_0; the other types use
/// AVX2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernels {
    Scalar,
    Avx2,
    Avx512,
}

impl Kernels {
    /// The best set this CPU runs.
    pub fn detect() -> Kernels {
        static BEST: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if super::avx512::available() {
                return Kernels::Avx512;
            }
            if simd_available() {
                Kernels::Avx2
            } else {
                Kernels::Scalar
            }
        })
    }

    fn from_env(v: &str) -> Option<Kernels> {
        match v {
            "avx512" => Some(Kernels::Avx512),
            "avx2" => Some(Kernels::Avx2),
            "scalar" => Some(Kernels::Scalar),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kernels::Scalar => "scalar",
            Kernels::Avx2 => "avx2",
            Kernels::Avx512 => "avx512",
        }
    }
}

/// Environment variable that lowers the kernels the engine uses
/// (`avx2` or `scalar`), to compare them or to work around a CPU.
pub const KERNELS_ENV: &str = "XPYD_CPU_KERNELS";

/// The kernels [`QMatrix::matmul`] uses: [`Kernels::detect`], lowered by
/// [`KERNELS_ENV`] when it names a lesser set (an unknown value is ignored
/// with a warning).
pub fn kernels() -> Kernels {
    static CHOSEN: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = Kernels::detect();
        match std::env::var(KERNELS_ENV) {
            Ok(v) => match Kernels::from_env(&v) {
                Some(k) => k.min(best),
                None => {
                    tracing::warn!(
                        "{KERNELS_ENV}={v} is not one of avx512, avx2, scalar; using {}",
                        best.as_str()
                    );
                    best
                }
            },
            Err(_) => best,
        }
    })
}

/// Whether the AVX2/FMA/F16C kernels can run here.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::x86::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn q8_kernel(ty: GgmlType, simd: bool) -> Q8Dot {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // `simd` is true only when `x86::available()` said AVX2, FMA and
        // F16C are present: what each kernel below requires.
        return match ty {
            // SAFETY: the CPU has the features (above).
            GgmlType::Q4_0 => |w, x, nb, o| unsafe { super::x86::dot_q4_0_q8_rows(w, x, nb, o) },
            // SAFETY: the CPU has the features (above).
            GgmlType::Q4_1 => |w, x, nb, o| unsafe { super::x86::dot_q4_1_q8_rows(w, x, nb, o) },
            // SAFETY: the CPU has the features (above).
            _ => |w, x, nb, o| unsafe { super::x86::dot_q8_0_q8_rows(w, x, nb, o) },
        };
    }
    let _ = simd;
    fn rows<const K: u8>(w: &[u8], x: &[BlockQ8], nb: usize, out: &mut [f32]) {
        let dot = match K {
            0 => quant::dot_q4_0_q8,
            1 => quant::dot_q4_1_q8,
            _ => quant::dot_q8_0_q8,
        };
        for (t, o) in out.iter_mut().enumerate() {
            *o = dot(w, &x[t * nb..(t + 1) * nb]);
        }
    }
    match ty {
        GgmlType::Q4_0 => rows::<0>,
        GgmlType::Q4_1 => rows::<1>,
        _ => rows::<2>,
    }
}

/// f32 dot product, SIMD when `simd` (from [`simd_available`]).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` comes from `simd_available()`.
        return unsafe { super::x86::dot_f32(a, b) };
    }
    let _ = simd;
    quant::dot_f32(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn quantized_matmul_matches_f32_matmul() {
        let (rows, cols, n) = (70, 96, 5);
        let w = data(rows * cols, 1);
        let x = data(n * cols, 2);
        let f32_bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        // Only the activation's Q8 rounding separates the kernels from an f32
        // product with the dequantized weights.
        let cases = [
            (GgmlType::F32, f32_bytes, 1e-4),
            (GgmlType::Q8_0, quant::quantize_q8_0(&w), 0.06),
            (GgmlType::Q4_1, quant::quantize_q4_1(&w), 0.06),
            (GgmlType::Q4_0, quant::quantize_q4_0(&w), 0.06),
        ];
        for (ty, bytes, tol) in cases {
            let m = QMatrix::new("w", ty, rows, cols, WeightBytes::Owned(Arc::new(bytes))).unwrap();
            let mut wd = vec![0f32; rows * cols];
            for (r, row) in wd.chunks_exact_mut(cols).enumerate() {
                m.dequantize_row(r, row);
            }
            let worst_weight = wd
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst_weight < 0.15,
                "{ty}: dequantized weights off by {worst_weight}"
            );
            let mut want = vec![0f32; n * rows];
            for t in 0..n {
                for r in 0..rows {
                    want[t * rows + r] =
                        (0..cols).map(|c| wd[r * cols + c] * x[t * cols + c]).sum();
                }
            }
            let mut got = vec![0f32; n * rows];
            m.matmul(&x, n, &mut got);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < tol, "{ty}: max abs error {worst}");
            let mut exact = vec![0f32; n * rows];
            m.matmul_with(&x, n, &mut exact, Activations::F32);
            let worst = exact
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{ty} with f32 activations: max abs error {worst}"
            );
            // One row at a time gives the same answer as the batch.
            let mut single = vec![0f32; rows];
            m.matmul(&x[cols..2 * cols], 1, &mut single);
            assert_eq!(single, got[rows..2 * rows], "{ty}");
        }
    }

    /// Products taken together (one pass of the pool) give each matrix's
    /// own product bit for bit, at decode and prefill sizes, whatever the
    /// formats and the kernels.
    #[test]
    fn products_taken_together_equal_products_one_at_a_time() {
        let cols = 160;
        let mats: Vec<QMatrix> = [
            (GgmlType::Q4_1, 70),
            (GgmlType::Q4_0, 37),
            (GgmlType::Q8_0, 20),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (ty, rows))| {
            let w = data(rows * cols, 10 + i as u64);
            let bytes = match ty {
                GgmlType::Q4_1 => quant::quantize_q4_1(&w),
                GgmlType::Q4_0 => quant::quantize_q4_0(&w),
                _ => quant::quantize_q8_0(&w),
            };
            QMatrix::new("w", ty, rows, cols, WeightBytes::Owned(Arc::new(bytes))).unwrap()
        })
        .collect();
        for set in [&mats[..2], &mats[..]] {
            for n in [1, 3, 20] {
                let x = data(n * cols, n as u64);
                let mut together: Vec<Vec<f32>> =
                    set.iter().map(|m| vec![0f32; n * m.rows]).collect();
                let mut outs: Vec<&mut [f32]> = together.iter_mut().map(|o| &mut o[..]).collect();
                let refs: Vec<&QMatrix> = set.iter().collect();
                QMatrix::matmul_each(&refs, &x, n, &mut outs, Activations::Q8);
                for (m, got) in set.iter().zip(&together) {
                    let mut alone = vec![0f32; n * m.rows];
                    m.matmul(&x, n, &mut alone);
                    assert_eq!(*got, alone, "{} rows of {}, {n} tokens", m.rows, m.ty);
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let err = QMatrix::new(
            "w",
            GgmlType::Q4_1,
            2,
            32,
            WeightBytes::Owned(Arc::new(vec![0; 39])),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tensor w"), "{err}");
        let err = QMatrix::new(
            "k",
            GgmlType::Q4K,
            1,
            128,
            WeightBytes::Owned(Arc::new(vec![0; 72])),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tensor k") && err.contains("256"), "{err}");
    }
}
