//! Block formats of ggml's quantized types and their scalar kernels: row
//! dequantization, activation quantization to [`BlockQ8`], and the
//! weight-row · activation dot products that every SIMD version must match.
//!
//! Layouts (32 weights per block, little-endian f16 scales):
//! - Q4_0: `d: f16, qs: [u8; 16]`, weight `j` = `(nibble_j - 8) * d`
//! - Q4_1: `d: f16, m: f16, qs: [u8; 16]`, weight `j` = `nibble_j * d + m`
//! - Q8_0: `d: f16, qs: [i8; 32]`, weight `j` = `qs[j] * d`
//!
//! where `nibble_j` is the low nibble of `qs[j]` for `j < 16` and the high
//! nibble of `qs[j - 16]` otherwise.

use half::{bf16, f16};

/// Elements per quantization block.
pub const QK: usize = 32;
pub const Q4_0_BYTES: usize = 18;
pub const Q4_1_BYTES: usize = 20;
pub const Q8_0_BYTES: usize = 34;

/// An activation block quantized to 8 bits: `x[j] ≈ qs[j] * d`. The scaled
/// sum `s = d * sum(qs)` is kept so Q4_0's offset and Q4_1's minimum cost one
/// multiply-add per block (llama.cpp's Q8_1 does the same).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8 {
    pub qs: [i8; QK],
    pub d: f32,
    pub s: f32,
}

impl BlockQ8 {
    pub const ZERO: Self = Self {
        qs: [0; QK],
        d: 0.0,
        s: 0.0,
    };
}

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Quantizes `x` (length a multiple of 32) into `out` (one block per 32).
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::available() {
        // SAFETY: `available()` checked the target features.
        return unsafe { super::x86::quantize_q8(x, out) };
    }
    quantize_q8_scalar(x, out);
}

/// The scalar [`quantize_q8`]: the reference its AVX2 version matches bit
/// for bit.
pub(crate) fn quantize_q8_scalar(x: &[f32], out: &mut [BlockQ8]) {
    for (xs, block) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            let r = (v * id).round() as i32;
            *q = r as i8;
            sum += r;
        }
        block.d = d;
        block.s = d * sum as f32;
    }
}

/// Scalar Q4_0 row · Q8 activation.
pub fn dot_q4_0_q8(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in row.chunks_exact(Q4_0_BYTES).zip(x) {
        let d = f16_at(b, 0);
        let mut isum = 0i32;
        for j in 0..16 {
            let q = b[2 + j];
            isum += i32::from(q & 0x0F) * i32::from(xb.qs[j]);
            isum += i32::from(q >> 4) * i32::from(xb.qs[j + 16]);
        }
        acc += d * (xb.d * isum as f32 - 8.0 * xb.s);
    }
    acc
}

/// Scalar Q4_1 row · Q8 activation.
pub fn dot_q4_1_q8(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in row.chunks_exact(Q4_1_BYTES).zip(x) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let mut isum = 0i32;
        for j in 0..16 {
            let q = b[4 + j];
            isum += i32::from(q & 0x0F) * i32::from(xb.qs[j]);
            isum += i32::from(q >> 4) * i32::from(xb.qs[j + 16]);
        }
        acc += d * xb.d * isum as f32 + m * xb.s;
    }
    acc
}

/// Scalar Q8_0 row · Q8 activation.
pub fn dot_q8_0_q8(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in row.chunks_exact(Q8_0_BYTES).zip(x) {
        let d = f16_at(b, 0);
        let isum: i32 = b[2..34]
            .iter()
            .zip(&xb.qs)
            .map(|(&w, &a)| i32::from(w as i8) * i32::from(a))
            .sum();
        acc += d * xb.d * isum as f32;
    }
    acc
}

/// f32 dot with eight independent accumulators (so the compiler vectorizes).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_as_f32(a, b, |y| y)
}

/// [`dot_f32`] of `a` and `b`'s elements read as f32 by `to_f32`.
#[inline(always)]
pub(crate) fn dot_as_f32<T: Copy>(a: &[f32], b: &[T], to_f32: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len().min(b.len()));
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * to_f32(y[i]);
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, &y)| x * to_f32(y)).sum();
    acc.iter().sum::<f32>() + tail
}

/// Dequantizes a Q4_0 row into `out`.
pub fn dequantize_q4_0(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for j in 0..16 {
            o[j] = (f32::from(b[2 + j] & 0x0F) - 8.0) * d;
            o[j + 16] = (f32::from(b[2 + j] >> 4) - 8.0) * d;
        }
    }
}

/// Dequantizes a Q4_1 row into `out`.
pub fn dequantize_q4_1(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(Q4_1_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        for j in 0..16 {
            o[j] = f32::from(b[4 + j] & 0x0F) * d + m;
            o[j + 16] = f32::from(b[4 + j] >> 4) * d + m;
        }
    }
}

/// Dequantizes a Q8_0 row into `out`.
pub fn dequantize_q8_0(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for j in 0..QK {
            o[j] = f32::from(b[2 + j] as i8) * d;
        }
    }
}

/// Bytes of one 256-element Q4_K super-block.
pub const Q4_K_BYTES: usize = 144;
/// Bytes of one 256-element Q6_K super-block.
pub const Q6_K_BYTES: usize = 210;
/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// Scale and minimum `j` (0..8) of a Q4_K block's packed 6-bit scales.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantizes a Q4_K row (`d: f16, dmin: f16, scales: [u8; 12],
/// qs: [u8; 128]` per 256 values) into `out`, as ggml does.
pub fn dequantize_q4_k(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(Q4_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let scales = &b[4..16];
        let qs = &b[16..144];
        for (k, (q, y)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = scale_min_k4(2 * k, scales);
            let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
            let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
            for l in 0..32 {
                y[l] = d1 * f32::from(q[l] & 0x0F) - m1;
                y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
            }
        }
    }
}

/// Dequantizes a Q6_K row (`ql: [u8; 128], qh: [u8; 64], scales: [i8; 16],
/// d: f16` per 256 values) into `out`, as ggml does.
pub fn dequantize_q6_k(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(Q6_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 208);
        for half in 0..2 {
            let ql = &b[half * 64..half * 64 + 64];
            let qh = &b[128 + half * 32..128 + half * 32 + 32];
            let sc = &b[192 + half * 8..192 + half * 8 + 8];
            let y = &mut o[half * 128..half * 128 + 128];
            for l in 0..32 {
                let is = l / 16;
                let q = |low: u8, shift: u32| {
                    f32::from((low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32)
                };
                let s = |i: usize| d * f32::from(sc[i] as i8);
                y[l] = s(is) * q(ql[l] & 0x0F, 0);
                y[l + 32] = s(is + 2) * q(ql[l + 32] & 0x0F, 2);
                y[l + 64] = s(is + 4) * q(ql[l] >> 4, 4);
                y[l + 96] = s(is + 6) * q(ql[l + 32] >> 4, 6);
            }
        }
    }
}

/// Converts little-endian F32 bytes into `out`.
pub fn dequantize_f32(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(4).zip(out.iter_mut()) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Converts little-endian F16 bytes into `out`.
pub fn dequantize_f16(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(2).zip(out.iter_mut()) {
        *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

/// Converts little-endian BF16 bytes into `out`.
pub fn dequantize_bf16(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(2).zip(out.iter_mut()) {
        *o = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

/// Quantizes f32 values to Q4_1 blocks (for tests and tools).
pub fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * Q4_1_BYTES);
    for xs in x.chunks_exact(QK) {
        let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
        let q = |v: f32| (((v - min) * id).round() as i32).clamp(0, 15) as u8;
        for j in 0..16 {
            out.push(q(xs[j]) | (q(xs[j + 16]) << 4));
        }
    }
    out
}

/// Quantizes f32 values to Q4_0 blocks (for tests and tools).
pub fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * Q4_0_BYTES);
    for xs in x.chunks_exact(QK) {
        let max = xs
            .iter()
            .copied()
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
        for j in 0..16 {
            out.push(q(xs[j]) | (q(xs[j + 16]) << 4));
        }
    }
    out
}

/// Quantizes f32 values to Q8_0 blocks (for tests and tools).
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * Q8_0_BYTES);
    for xs in x.chunks_exact(QK) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(xs.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}
