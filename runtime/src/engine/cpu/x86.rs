//! AVX2/FMA/F16C versions of the dot products in [`super::quant`]. Callers
//! check [`available`] first; results equal the scalar ones up to float
//! summation order (tested below). The quantized kernels take several
//! activation rows per weight row so a prefill unpacks each weight block once
//! per tile of tokens, not once per token.

use std::arch::x86_64::*;

use super::quant::{BlockQ8, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};
use crate::engine::kv_storage::KvElem;

/// Whether this CPU runs the kernels of this module.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// [`super::ops::softmax`] 8 lanes at a time: each exponential bit for bit
/// [`super::ops::exp`], summed by lane.
///
/// # Safety
/// The CPU must have what [`available`] checks.
#[target_feature(enable = "avx2,fma")]
pub fn softmax(x: &mut [f32]) {
    let (body, tail) = x.split_at_mut(x.len() / 8 * 8);
    let mut max = tail.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !body.is_empty() {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in body.chunks_exact(8) {
            // SAFETY: 8 floats.
            m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        max = lanes.iter().copied().fold(max, f32::max);
    }
    let vmax = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    for c in body.chunks_exact_mut(8) {
        // SAFETY: 8 floats.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), vmax));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
    }
    let mut sum = hsum(acc);
    for v in tail.iter_mut() {
        *v = super::ops::exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    let vinv = _mm256_set1_ps(inv);
    for c in body.chunks_exact_mut(8) {
        // SAFETY: 8 floats.
        unsafe {
            _mm256_storeu_ps(
                c.as_mut_ptr(),
                _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), vinv),
            )
        };
    }
    for v in tail.iter_mut() {
        *v *= inv;
    }
}

/// [`super::ops::exp`] of 8 lanes, the same operations in the same order.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp8(x: __m256) -> __m256 {
    use super::ops::{EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO, LOG2E};
    // `max(x, lo)` first, as `f32::max`: a NaN becomes `lo` in both.
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(EXP_LO)),
        _mm256_set1_ps(EXP_HI),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(LOG2E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(two_n))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// 16 bytes of packed nibbles → 32 bytes 0..15 in element order.
///
/// # Safety
/// `p` must point to 16 readable bytes; AVX2 must be available.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    let q = unsafe { _mm_loadu_si128(p.cast()) };
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(q, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// Sum over the block of unsigned `a` times signed `b`, as 8 i32 lanes in f32.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn mul_sum_us8(a: __m256i, b: __m256i) -> __m256 {
    let p16 = _mm256_maddubs_epi16(a, b);
    let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
    _mm256_cvtepi32_ps(p32)
}

/// An f16 scale at `b[at..at + 2]` as f32, with F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn h2f(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// Tokens per pass over a weight row: each row block is unpacked once and
/// used against this many activation rows. (`rows_kernel` spells out 4.)
const TILE: usize = 4;

/// [`super::quant::quantize_q8`] in AVX2, bit for bit the same results.
/// (The scalar loop compiled for AVX2 kept its max-abs reduction and the
/// rounding scalar: 8 % of a prefill.) `round` is half away from zero, as
/// `f32::round`: `trunc(v + copysign(0.49999997, v))`, the form LLVM
/// lowers it to.
#[target_feature(enable = "avx2,fma,f16c")]
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    let sign = _mm256_set1_ps(-0.0);
    let below_half = _mm256_set1_ps(0.499_999_97);
    // packs interleave the 128-bit lanes; this puts the bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (xs, block) in x.chunks_exact(super::quant::QK).zip(out.iter_mut()) {
        // SAFETY: `xs` has 32 floats.
        let v: [__m256; 4] = unsafe {
            let p = xs.as_ptr();
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        };
        let abs = |v: __m256| _mm256_andnot_ps(sign, v);
        let m = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        let amax = _mm_cvtss_f32(m);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let mut q = [_mm256_setzero_si256(); 4];
        let mut sum = _mm256_setzero_si256();
        for (qi, &vi) in q.iter_mut().zip(&v) {
            let s = _mm256_mul_ps(vi, id);
            let half = _mm256_or_ps(_mm256_and_ps(s, sign), below_half);
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm256_add_ps(
                s, half,
            ));
            *qi = _mm256_cvttps_epi32(r);
            sum = _mm256_add_epi32(sum, *qi);
        }
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let packed = _mm256_permutevar8x32_epi32(packed, order);
        // SAFETY: `qs` has 32 bytes.
        unsafe { _mm256_storeu_si256(block.qs.as_mut_ptr().cast(), packed) };
        let s = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
        block.d = d;
        block.s = d * _mm_cvtsi128_si32(s) as f32;
    }
}

/// Runs `kernel` over `out.len()` activation rows of `nb` blocks each, in
/// tiles of [`TILE`] then one by one.
macro_rules! rows_kernel {
    ($name:ident, $tile:ident, $doc:literal) => {
        #[doc = $doc]
        ///
        /// `x` holds `out.len()` activation rows of `nb` blocks each;
        /// `out[t] = row · x[t]`.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub fn $name(row: &[u8], x: &[BlockQ8], nb: usize, out: &mut [f32]) {
            let mut t = 0;
            while t + TILE <= out.len() {
                let row_of = |i: usize| &x[(t + i) * nb..(t + i + 1) * nb];
                let xs: [&[BlockQ8]; TILE] = [row_of(0), row_of(1), row_of(2), row_of(3)];
                out[t..t + TILE].copy_from_slice(&$tile(row, xs));
                t += TILE;
            }
            while t < out.len() {
                out[t] = $tile(row, [&x[t * nb..(t + 1) * nb]])[0];
                t += 1;
            }
        }
    };
}

/// Adds one Q4_0 block's products with `N` activation rows into `acc`
/// (`off` collects the `-8` offset's share).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_0_block<const N: usize>(
    b: &[u8],
    bi: usize,
    xs: &[&[BlockQ8]; N],
    acc: &mut [__m256; N],
    off: &mut [f32; N],
) {
    let d = h2f(b, 0);
    // SAFETY: a Q4_0 block has 18 bytes, the nibbles start at 2.
    let q4 = unsafe { nibbles(b.as_ptr().add(2)) };
    for t in 0..N {
        let xb = &xs[t][bi];
        // SAFETY: `xb.qs` has 32 bytes.
        let q8 = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), mul_sum_us8(q4, q8), acc[t]);
        off[t] = (-8.0 * d).mul_add(xb.s, off[t]);
    }
}

/// Adds one Q4_1 block's products with `N` activation rows into `acc`
/// (`mins` collects the block minimum's share).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_1_block<const N: usize>(
    b: &[u8],
    bi: usize,
    xs: &[&[BlockQ8]; N],
    acc: &mut [__m256; N],
    mins: &mut [f32; N],
) {
    let d = h2f(b, 0);
    let m = h2f(b, 2);
    // SAFETY: a Q4_1 block has 20 bytes, the nibbles start at 4.
    let q4 = unsafe { nibbles(b.as_ptr().add(4)) };
    for t in 0..N {
        let xb = &xs[t][bi];
        // SAFETY: `xb.qs` has 32 bytes.
        let q8 = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), mul_sum_us8(q4, q8), acc[t]);
        mins[t] = m.mul_add(xb.s, mins[t]);
    }
}

/// Adds one Q8_0 block's products with `N` activation rows into `acc`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_block<const N: usize>(
    b: &[u8],
    bi: usize,
    xs: &[&[BlockQ8]; N],
    acc: &mut [__m256; N],
    _unused: &mut [f32; N],
) {
    let d = h2f(b, 0);
    // SAFETY: a Q8_0 block has 34 bytes, the quants start at 2.
    let w = unsafe { _mm256_loadu_si256(b.as_ptr().add(2).cast()) };
    // maddubs needs one unsigned operand: move w's sign onto x.
    let aw = _mm256_sign_epi8(w, w);
    for t in 0..N {
        let xb = &xs[t][bi];
        // SAFETY: `xb.qs` has 32 bytes.
        let a = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
        let sa = _mm256_sign_epi8(a, w);
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), mul_sum_us8(aw, sa), acc[t]);
    }
}

/// Dots a weight row with `N` activation rows, block by block, alternating
/// two accumulator sets so consecutive blocks do not wait on each other's
/// FMA latency; the scalar terms (offsets, minimums) are added at the end.
macro_rules! tile {
    ($name:ident, $block:ident, $bytes:expr) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $name<const N: usize>(row: &[u8], xs: [&[BlockQ8]; N]) -> [f32; N] {
            let mut acc0 = [_mm256_setzero_ps(); N];
            let mut acc1 = [_mm256_setzero_ps(); N];
            let mut scalar0 = [0f32; N];
            let mut scalar1 = [0f32; N];
            let mut pairs = row.chunks_exact(2 * $bytes);
            let mut bi = 0;
            for pair in &mut pairs {
                $block(&pair[..$bytes], bi, &xs, &mut acc0, &mut scalar0);
                $block(&pair[$bytes..], bi + 1, &xs, &mut acc1, &mut scalar1);
                bi += 2;
            }
            if !pairs.remainder().is_empty() {
                $block(pairs.remainder(), bi, &xs, &mut acc0, &mut scalar0);
            }
            // A plain loop, not `array::from_fn`: its closure would not
            // inherit this function's target features and would not inline.
            let mut out = [0f32; N];
            for t in 0..N {
                out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t])) + (scalar0[t] + scalar1[t]);
            }
            out
        }
    };
}

tile!(q4_0_tile, q4_0_block, Q4_0_BYTES);
tile!(q4_1_tile, q4_1_block, Q4_1_BYTES);
tile!(q8_0_tile, q8_0_block, Q8_0_BYTES);

rows_kernel!(
    dot_q4_0_q8_rows,
    q4_0_tile,
    "Q4_0 row · Q8 activation rows."
);
rows_kernel!(
    dot_q4_1_q8_rows,
    q4_1_tile,
    "Q4_1 row · Q8 activation rows."
);
rows_kernel!(
    dot_q8_0_q8_rows,
    q8_0_tile,
    "Q8_0 row · Q8 activation rows."
);

/// f32 dot product.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: this function enables AVX2.
    unsafe { finish_dot(a, b, dot_lanes(a, b), |y| y) }
}

/// A dot product from its `lanes` ([`dot_lanes`] or [`dot_lanes_kv`] of
/// `a` and `b`): their horizontal sum, then the products past the last
/// whole 16 elements, `b`'s read as f32 by `to_f32`.
///
/// # Safety
/// The CPU must have AVX2.
#[inline(always)]
unsafe fn finish_dot<T: Copy>(a: &[f32], b: &[T], lanes: __m256, to_f32: impl Fn(T) -> f32) -> f32 {
    let n = a.len().min(b.len());
    // SAFETY: the caller's promise.
    let mut sum = unsafe { hsum(lanes) };
    for i in n / 16 * 16..n {
        sum += a[i] * to_f32(b[i]);
    }
    sum
}

/// The 8 lanes [`dot_f32`] sums horizontally: its products over the first
/// `16 * (n / 16)` elements in two accumulators (elements `16i..16i + 8`
/// and `16i + 8..16i + 16`), added ([`dot_lanes_kv`] is the same over
/// f16 keys).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn dot_lanes(a: &[f32], b: &[f32]) -> __m256 {
    // SAFETY: `lanes` reads 8 floats at each pointer it is given.
    unsafe { lanes(a, b, |p| _mm256_loadu_ps(p)) }
}

/// The body of [`dot_lanes`] and [`dot_lanes_kv`]: `load` reads 8 of `b`'s
/// elements as f32. Inlined into its callers, which enable the features.
///
/// # Safety
/// `load(p)` must be sound for 8 readable elements at `p`, and the CPU
/// must have AVX2 and FMA.
#[inline(always)]
unsafe fn lanes<T>(a: &[f32], b: &[T], load: impl Fn(*const T) -> __m256) -> __m256 {
    let n = a.len().min(b.len());
    // SAFETY: the caller's promise of AVX2.
    let (mut acc0, mut acc1) = unsafe { (_mm256_setzero_ps(), _mm256_setzero_ps()) };
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, both slices have n elements.
        unsafe {
            let pa = a.as_ptr().add(i);
            let pb = b.as_ptr().add(i);
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), load(pb), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), load(pb.add(8)), acc1);
        }
        i += 16;
    }
    // SAFETY: as above.
    unsafe { _mm256_add_ps(acc0, acc1) }
}

/// 8 f16 values from `p` as f32 (exact).
///
/// # Safety
/// `p..p + 8` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8_kv(p: *const KvElem) -> __m256 {
    // SAFETY: the caller's promise; an unaligned 16-byte load.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
}

/// [`dot_f32`] for an f32 query and an f16 key: the same products (each
/// key element converted exactly) in the same order, summed the same way.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dot_kv(q: &[f32], k: &[KvElem]) -> f32 {
    // SAFETY: this function enables AVX2.
    unsafe { finish_dot(q, k, dot_lanes_kv(q, k), KvElem::to_f32) }
}

/// [`dot_lanes`] for [`dot_kv`]: the 8 lanes it sums horizontally. Shared
/// with the AVX-512 attention, which must get the same bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dot_lanes_kv(q: &[f32], k: &[KvElem]) -> __m256 {
    // SAFETY: `lanes` reads 8 elements at each pointer it is given.
    unsafe { lanes(q, k, |p| load8_kv(p)) }
}

/// [`super::ops::attend`] with the AVX2 dot and axpy inlined.
#[target_feature(enable = "avx2,fma,f16c")]
pub fn attend<'a, K>(q: &[f32], n: usize, scale: f32, kv: K, scores: &mut Vec<f32>, out: &mut [f32])
where
    K: super::ops::KvSource<'a>,
{
    super::ops::attend_body(
        q,
        n,
        scale,
        kv,
        scores,
        out,
        |a, b| dot_kv(a, b),
        |y, a, x| axpy_kv(y, a, x),
        true,
    );
}

/// `y += a * x` for f32 `y` and an f16 value row `x`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn axpy_kv(y: &mut [f32], a: f32, x: &[KvElem]) {
    let n = y.len().min(x.len());
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, both slices have n elements.
        unsafe {
            let py = y.as_mut_ptr().add(i);
            let r = _mm256_fmadd_ps(va, load8_kv(x.as_ptr().add(i)), _mm256_loadu_ps(py));
            _mm256_storeu_ps(py, r);
        }
        i += 8;
    }
    while i < n {
        y[i] += a * x[i].to_f32();
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant;
    use super::*;

    use super::super::test_data as data;
    use crate::engine::kv_storage::to_kv_vec;

    type RowsKernel = unsafe fn(&[u8], &[BlockQ8], usize, &mut [f32]);
    type ScalarKernel = fn(&[u8], &[BlockQ8]) -> f32;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-4 * (1.0 + a.abs().max(b.abs()))
    }

    /// The polynomial `exp` is within 2 ulp of the C library's on the
    /// range a softmax uses, its 8 lanes give each value the same bits,
    /// and the AVX2 softmax sums to one and equals the scalar one within
    /// float rounding.
    #[test]
    fn the_vector_exponential_is_the_scalar_one_bit_for_bit() {
        if !available() {
            return;
        }
        let xs: Vec<f32> = (0..20_000).map(|i| -87.0 + i as f32 * 0.0044).collect();
        for c in xs.chunks_exact(8) {
            let mut lanes = [0f32; 8];
            // SAFETY: `available()` above; 8 floats each.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
            for (&x, &got) in c.iter().zip(&lanes) {
                let scalar = super::super::ops::exp(x);
                assert_eq!(
                    got.to_bits(),
                    scalar.to_bits(),
                    "exp({x}): lane {got} scalar {scalar}"
                );
                let want = x.exp();
                let ulp = (scalar.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulp <= 2, "exp({x}) = {scalar}, libm {want}: {ulp} ulp");
            }
        }
        for n in [1, 7, 8, 37, 1025] {
            let x: Vec<f32> = data(n, n as u32).iter().map(|v| v * 12.0).collect();
            let (mut simd, mut scalar) = (x.clone(), x.clone());
            super::super::ops::softmax(&mut simd, true);
            super::super::ops::softmax(&mut scalar, false);
            let sum: f32 = simd.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{n}: sums to {sum}");
            for (a, b) in simd.iter().zip(&scalar) {
                assert!((a - b).abs() <= 1e-6, "{n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn quantizing_activations_equals_the_scalar_quantizer_bit_for_bit() {
        if !available() {
            return;
        }
        let mut x = data(64 * 32, 11);
        // Exact ties of the rounding (v * 127 / amax = k + 0.5), zeros,
        // a zero block and large values.
        for (i, v) in x.iter_mut().enumerate().take(32) {
            *v = (i as f32 - 16.0) + 0.5;
        }
        x[40] = 127.0;
        x[41] = -63.5;
        for v in &mut x[64..96] {
            *v = 0.0;
        }
        x[100] = 3.0e30;
        let mut simd = vec![BlockQ8::ZERO; 64];
        let mut scalar = vec![BlockQ8::ZERO; 64];
        // SAFETY: `available()` above.
        unsafe { quantize_q8(&x, &mut simd) };
        quant::quantize_q8_scalar(&x, &mut scalar);
        for (b, (a, e)) in simd.iter().zip(&scalar).enumerate() {
            assert_eq!(a.qs, e.qs, "block {b}");
            assert_eq!(a.d.to_bits(), e.d.to_bits(), "block {b}");
            assert_eq!(a.s.to_bits(), e.s.to_bits(), "block {b}");
        }
    }

    #[test]
    fn tiled_kernels_equal_scalar_dots_for_every_row() {
        if !available() {
            return;
        }
        let nb = 18;
        let w = data(nb * 32, 7);
        let q41 = quant::quantize_q4_1(&w);
        let q40 = quant::quantize_q4_0(&w);
        let q80 = quant::quantize_q8_0(&w);
        for n in [1, 3, 4, 5, 9] {
            let a = data(n * nb * 32, 8 + n as u32);
            let mut xq = vec![BlockQ8::ZERO; n * nb];
            quant::quantize_q8(&a, &mut xq);
            let kernels: [(RowsKernel, ScalarKernel, &[u8]); 3] = [
                (dot_q4_0_q8_rows, quant::dot_q4_0_q8, &q40),
                (dot_q4_1_q8_rows, quant::dot_q4_1_q8, &q41),
                (dot_q8_0_q8_rows, quant::dot_q8_0_q8, &q80),
            ];
            for (k, (simd, scalar, row)) in kernels.into_iter().enumerate() {
                let mut out = vec![0f32; n];
                // SAFETY: the test returns early unless `available()`.
                unsafe { simd(row, &xq, nb, &mut out) };
                for (t, &v) in out.iter().enumerate() {
                    let s = scalar(row, &xq[t * nb..(t + 1) * nb]);
                    assert!(
                        close(s, v),
                        "kernel {k}, {n} rows, row {t}: scalar {s} simd {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_dots_equal_scalar_dots() {
        if !available() {
            eprintln!("no AVX2/FMA on this CPU: nothing to compare");
            return;
        }
        for (n, seed) in [(32, 1), (64, 2), (576, 3), (1536, 4)] {
            let w = data(n, seed);
            let a = data(n, seed + 100);
            let mut xq = vec![BlockQ8::ZERO; n / 32];
            quant::quantize_q8(&a, &mut xq);
            let q40 = quant::quantize_q4_0(&w);
            let q41 = quant::quantize_q4_1(&w);
            let q80 = quant::quantize_q8_0(&w);
            let wk = to_kv_vec(&w);
            let one = |f: unsafe fn(&[u8], &[BlockQ8], usize, &mut [f32]), row: &[u8]| {
                let mut out = [0f32];
                // SAFETY: the test returns early unless `available()`.
                unsafe { f(row, &xq, n / 32, &mut out) };
                out[0]
            };
            let pairs = [
                (quant::dot_q4_0_q8(&q40, &xq), one(dot_q4_0_q8_rows, &q40)),
                (quant::dot_q4_1_q8(&q41, &xq), one(dot_q4_1_q8_rows, &q41)),
                (quant::dot_q8_0_q8(&q80, &xq), one(dot_q8_0_q8_rows, &q80)),
                // SAFETY: the test returns early unless `available()`.
                (quant::dot_f32(&w, &a), unsafe { dot_f32(&w, &a) }),
                // SAFETY: as above.
                (super::super::ops::dot_kv(&a, &wk), unsafe {
                    dot_kv(&a, &wk)
                }),
            ];
            for (i, (s, v)) in pairs.into_iter().enumerate() {
                assert!(close(s, v), "kernel {i}, n {n}: scalar {s} simd {v}");
            }
            // The quantized dots approximate the exact one.
            let exact: f32 = w.iter().zip(&a).map(|(x, y)| x * y).sum();
            assert!((pairs[2].0 - exact).abs() < 0.05 * (1.0 + exact.abs()));
            let mut y = a.clone();
            // SAFETY: the test returns early unless `available()`.
            unsafe { axpy_kv(&mut y, 0.5, &wk) };
            for ((yy, aa), ww) in y.iter().zip(&a).zip(&wk) {
                assert!(close(*yy, aa + 0.5 * ww.to_f32()));
            }
        }
    }
}
