//! AVX-512 VNNI matrix products of Q4_0/Q4_1/Q8_0 weights with Q8
//! activations, register-blocked: a tile of 4 weight rows by 4 tokens keeps
//! 16 accumulators in registers, so each unpacked weight group is used 4
//! times and each activation group 4 times from registers.
//!
//! The weights are repacked once per matrix ([`Packed`]): each row's
//! blocks in groups of 4. A Q4 group is the 4 blocks' 16 bytes of nibbles
//! side by side (one aligned 512-bit load); the low nibbles are its blocks'
//! values 0-15 and the high nibbles values 16-31, so one `and` and one
//! shift unpack 128 weights. A Q8_0 group is two lines, the 4 blocks'
//! values 0-15, then their values 16-31, each biased by 128 to an unsigned
//! byte (`vpdpbusd` takes one unsigned operand). Either way two `vpdpbusd`
//! multiply a group by the activations laid out to match ([`Q8Act`]) and
//! sum each block's products into its own four 32-bit lanes. The scales
//! (and Q4 constants) are stored after a row's weights.
//!
//! The activations are the same Q8 blocks the AVX2 kernels use
//! ([`super::quant::quantize_q8`]), relaid, so both paths compute the same
//! sums in a different order; the tests below hold each product to the
//! scalar reference. Callers check [`available`].
//!
//! Per block: Q4_1 weight `j` is `nibble_j * d + m`, Q4_0's is
//! `(nibble_j - 8) * d`, Q8_0's `(byte_j - 128) * d` with the biased byte.
//! So `row · x = sum_b d_b dx_b (u · qx)_b + sum_b c_b s_b` with `u` the
//! unsigned values, `c_b = m_b` (Q4_1), `-8 d_b` (Q4_0) or `-128 d_b`
//! (Q8_0) and `s_b = dx_b * sum(qx)_b`; both terms are summed in the same
//! registers.

use std::arch::x86_64::*;
use std::ops::Range;

use rayon::prelude::*;

use super::matmul::TOKEN_TILE;
use super::ops::{Cursor, KvSource};
use super::quant::{self, BlockQ8, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, QK, f16_at};
use crate::engine::kv_storage::KvElem;

/// Whether this CPU runs the kernels of this module (AVX-512 F, BW and
/// VNNI, and the AVX2/F16C set the rest of the engine uses).
pub fn available() -> bool {
    super::x86::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Which quantized format a weight matrix has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => Q4_0_BYTES,
            Format::Q4_1 => Q4_1_BYTES,
            Format::Q8_0 => Q8_0_BYTES,
        }
    }

    /// Where a block's quants start.
    fn quants_at(self) -> usize {
        match self {
            Format::Q4_0 | Format::Q8_0 => 2,
            Format::Q4_1 => 4,
        }
    }

    /// `c_b` of the module doc for the block `b`.
    fn constant(self, b: &[u8]) -> f32 {
        match self {
            Format::Q4_0 => -8.0 * f16_at(b, 0),
            Format::Q4_1 => f16_at(b, 2),
            Format::Q8_0 => Q8_BIAS * f16_at(b, 0),
        }
    }

    /// Bytes of scales and constants per group of a packed row: Q8_0's
    /// constants follow from its scales (`-128 d`), so it keeps only those.
    fn meta_bytes(self) -> usize {
        match self {
            Format::Q4_0 | Format::Q4_1 => 16,
            Format::Q8_0 => 8,
        }
    }
}

/// `c_b / d_b` of a Q8_0 block: its weights' bias, taken back.
const Q8_BIAS: f32 = -128.0;

/// Blocks per group: a group's nibbles fill one 512-bit register.
const GROUP: usize = 4;

/// One token's share of a [`Q8Act`] being filled, and its activations:
/// `(((quants, scales), sums), x)`.
type TokenRow<'a> = (((&'a mut [i8], &'a mut [f32]), &'a mut [f32]), &'a [f32]);

/// `n` tokens' Q8 activations laid out as [`Packed`] lays out a row: per
/// token and group of 4 blocks, 128 quants (the 4 blocks' values 0-15,
/// then their values 16-31), 16 scales (each block's `dx` once per 32-bit
/// lane of its products) and 16 scaled sums (block `k`'s `s` in lane `4k`,
/// zeros beside it); the last group padded with zeros.
pub struct Q8Act {
    n: usize,
    groups: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q8Act {
    /// Quantizes `n` rows of `cols` activations (a multiple of 32) to Q8,
    /// exactly as [`super::quant::quantize_q8`] does, in parallel over the
    /// tokens for a prefill.
    pub fn quantize(x: &[f32], n: usize, cols: usize) -> Q8Act {
        assert_eq!(x.len(), n * cols, "activation shape");
        let nb = cols / QK;
        let groups = nb.div_ceil(GROUP);
        // Per token: quants, and 16 lanes of scales or sums per group.
        let (quants, lanes) = (groups * GROUP * QK, groups * 4 * GROUP);
        let mut qs = vec![0i8; n * quants];
        let mut d = vec![0f32; n * lanes];
        let mut s = vec![0f32; n * lanes];
        let one = |scratch: &mut Vec<BlockQ8>, (((qs, d), s), x): TokenRow<'_>| {
            quant::quantize_q8(x, scratch);
            for (b, block) in scratch.iter().enumerate() {
                let (g, k) = (b / GROUP, b % GROUP);
                let at = g * GROUP * QK + k * 16;
                qs[at..at + 16].copy_from_slice(&block.qs[..16]);
                qs[at + 64..at + 80].copy_from_slice(&block.qs[16..]);
                d[4 * b..4 * b + 4].fill(block.d);
                s[4 * b] = block.s;
            }
        };
        let rows = qs
            .par_chunks_mut(quants)
            .zip(d.par_chunks_mut(lanes))
            .zip(s.par_chunks_mut(lanes))
            .zip(x.par_chunks(cols.max(1)));
        // Fanning out costs more than it saves for a few tokens (decode).
        if n >= 8 {
            rows.for_each_init(|| vec![BlockQ8::ZERO; nb], one);
        } else {
            let mut scratch = vec![BlockQ8::ZERO; nb];
            for row in qs
                .chunks_mut(quants)
                .zip(d.chunks_mut(lanes))
                .zip(s.chunks_mut(lanes))
                .zip(x.chunks(cols.max(1)))
            {
                one(&mut scratch, row);
            }
        }
        Q8Act {
            n,
            groups,
            qs,
            d,
            s,
        }
    }
}

/// A Q4_0/Q4_1/Q8_0 matrix repacked for [`gemm`]. Per row, 64-byte
/// aligned: the groups' weights (the module doc), a line per Q4 group and
/// two per Q8_0 group; then per group the metadata: for Q4 16 bytes, the
/// blocks' 4 scales and 4 constants (`c_b` of the module doc) as f16,
/// exactly as the GGUF holds them (Q4_0's `-8 d` is `d` times a power of
/// two); for Q8_0 8 bytes, the 4 scales. The last group is padded with
/// zero blocks, except that a last Q8_0 group of one or two blocks takes
/// one line (values 0-15 of its blocks, then values 16-31), not two. A
/// Q4_1 row takes the GGUF's bytes (20 per 32 weights), a Q8_0 row of 18
/// blocks 640 bytes for the GGUF's 612, up to the padding. Built once per
/// matrix, at load.
#[derive(Clone)]
pub struct Packed {
    format: Format,
    rows: usize,
    groups: usize,
    /// Whether the last group is a single Q8_0 line (one or two blocks).
    half_tail: bool,
    /// 64-byte lines of weights per row; the metadata follows them.
    quant_lines: usize,
    /// 64-byte lines per row.
    row_lines: usize,
    lines: Vec<Line>,
}

/// 64 bytes on a 64-byte boundary: one 512-bit load.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl Packed {
    /// Repacks `weights`: whole rows of `nb` blocks of `format`.
    /// `None` when a constant does not fit an f16 exactly (a Q4_0 scale
    /// over 8,188, or one that is not finite), which no real model has:
    /// the matrix then stays on the AVX2 kernels.
    pub fn new(format: Format, weights: &[u8], nb: usize) -> Option<Packed> {
        let (bytes, at) = (format.block_bytes(), format.quants_at());
        let rows = weights.len() / (nb * bytes).max(1);
        let groups = nb.div_ceil(GROUP);
        let half_tail = format == Format::Q8_0 && matches!(nb % GROUP, 1 | 2);
        let quant_lines = match format {
            Format::Q8_0 => 2 * groups - usize::from(half_tail),
            Format::Q4_0 | Format::Q4_1 => groups,
        };
        let meta_bytes = format.meta_bytes();
        let row_lines = quant_lines + (meta_bytes * groups).div_ceil(64);
        let mut lines = vec![Line([0; 64]); rows * row_lines];
        for (row, line) in weights
            .chunks_exact(nb * bytes)
            .zip(lines.chunks_exact_mut(row_lines))
        {
            let (quants, meta) = line.split_at_mut(quant_lines);
            for (b, block) in row.chunks_exact(bytes).enumerate() {
                let (g, k) = (b / GROUP, b % GROUP);
                // Group g's metadata at byte `meta_bytes * g` of the
                // metadata lines: the scale's f16 bits as they are, then
                // (Q4) the constant's.
                let m = &mut meta[meta_bytes * g / 64].0[meta_bytes * g % 64..][..meta_bytes];
                m[2 * k..2 * k + 2].copy_from_slice(&block[..2]);
                if format == Format::Q8_0 {
                    // Values 0-15, then 16-31, each `q + 128` as a byte.
                    let biased: [u8; QK] = std::array::from_fn(|j| block[at + j] ^ 0x80);
                    let (first, second) = biased.split_at(16);
                    if half_tail && g + 1 == groups {
                        let one = &mut quants[2 * g].0;
                        one[16 * k..][..16].copy_from_slice(first);
                        one[32 + 16 * k..][..16].copy_from_slice(second);
                    } else {
                        quants[2 * g].0[16 * k..][..16].copy_from_slice(first);
                        quants[2 * g + 1].0[16 * k..][..16].copy_from_slice(second);
                    }
                } else {
                    let constant = format.constant(block);
                    let c = half::f16::from_f32(constant);
                    if c.to_f32() != constant {
                        return None;
                    }
                    quants[g].0[16 * k..16 * k + 16].copy_from_slice(&block[at..at + 16]);
                    m[8 + 2 * k..8 + 2 * k + 2].copy_from_slice(&c.to_bits().to_le_bytes());
                }
            }
        }
        Some(Packed {
            format,
            rows,
            groups,
            half_tail,
            quant_lines,
            row_lines,
            lines,
        })
    }

    /// Rows of the matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Rows `rows` of the packed `weights` dotted with each token `t` of
/// `tokens`, into `out[(t - tokens.start) * rows.len() + r - rows.start]`:
/// a task's share of rows or tokens, laid out as the caller's output is.
/// Each (row, token) is computed the same way whatever the shares.
///
/// # Safety
/// The CPU must have the features [`available`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn gemm(
    weights: &Packed,
    rows: Range<usize>,
    act: &Q8Act,
    tokens: Range<usize>,
    out: &mut [f32],
) {
    // SAFETY: the caller's promise.
    unsafe {
        match weights.format {
            Format::Q8_0 => gemm_as::<true>(weights, rows, act, tokens, out),
            Format::Q4_0 | Format::Q4_1 => gemm_as::<false>(weights, rows, act, tokens, out),
        }
    }
}

/// [`gemm`] for Q8_0 weights (`Q8`) or Q4 ones.
///
/// # Safety
/// As [`gemm`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn gemm_as<const Q8: bool>(
    weights: &Packed,
    rows: Range<usize>,
    act: &Q8Act,
    tokens: Range<usize>,
    out: &mut [f32],
) {
    let w = weights;
    assert!(tokens.end <= act.n, "tokens out of range");
    assert!(rows.end <= w.rows, "rows out of range");
    assert_eq!(
        w.groups, act.groups,
        "weights and activations differ in width"
    );
    assert_eq!(out.len(), rows.len() * tokens.len(), "output shape");
    let mut put = |r0: usize, t0: usize, v: &[&[f32]]| {
        for (i, vr) in v.iter().enumerate() {
            for (j, &vt) in vr.iter().enumerate() {
                out[(t0 + j - tokens.start) * rows.len() + r0 + i - rows.start] = vt;
            }
        }
    };
    for t0 in tokens.clone().step_by(TOKEN_TILE) {
        let t1 = tokens.end.min(t0 + TOKEN_TILE);
        let mut r = rows.start;
        while r < rows.end {
            // Fewer than 4 tokens of Q8_0 weights (a small decode step)
            // are bound by reading the weights, and a row at a time reads
            // them faster than 4 side by side (measured: docs/benchmarks.md).
            if r + 4 <= rows.end && !(Q8 && t1 - t0 < 4) {
                let mut t = t0;
                while t + 4 <= t1 {
                    // SAFETY: the features are the caller's promise; the
                    // rows and tokens are in range (asserted above).
                    let v = unsafe { tile::<4, 4, Q8>(w, r, act, t) };
                    put(r, t, &[&v[0], &v[1], &v[2], &v[3]]);
                    t += 4;
                }
                while t < t1 {
                    // SAFETY: as above.
                    let v = unsafe { tile::<4, 1, Q8>(w, r, act, t) };
                    put(r, t, &[&v[0], &v[1], &v[2], &v[3]]);
                    t += 1;
                }
                r += 4;
            } else {
                let mut t = t0;
                while t + 4 <= t1 {
                    // SAFETY: as above.
                    let v = unsafe { tile::<1, 4, Q8>(w, r, act, t) };
                    put(r, t, &[&v[0]]);
                    t += 4;
                }
                while t < t1 {
                    // SAFETY: as above.
                    let v = unsafe { tile::<1, 1, Q8>(w, r, act, t) };
                    put(r, t, &[&v[0]]);
                    t += 1;
                }
                r += 1;
            }
        }
    }
}

/// How many rows ahead [`tile`] asks for the lines of the rows it reads.
/// A tile reads 4 rows side by side, which the hardware's prefetchers do
/// not follow as they follow one row after another.
const PREFETCH_ROWS: usize = 8;

/// `R` packed weight rows from `r0` times the `T` tokens from `t0`: per
/// block, `d dx (u · qx) + c s` (the module doc), summed by lane; `Q8`
/// says the weights are Q8_0's biased bytes, else Q4 nibbles.
///
/// # Safety
/// The CPU must have the features [`available`] checks, and the rows and
/// tokens must be in range.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
// The accumulators are a register array indexed by row, token and lane.
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const R: usize, const T: usize, const Q8: bool>(
    w: &Packed,
    r0: usize,
    act: &Q8Act,
    t0: usize,
) -> [[f32; T]; R] {
    let groups = w.groups;
    let meta_at = 64 * w.quant_lines;
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let low = _mm512_set1_epi8(0x0F);
    let bias = _mm512_set1_ps(Q8_BIAS);
    // Block k's scale (element k of the metadata) into lanes 4k..4k + 3,
    // and its constant (element 4 + k) into lane 4k (the token's scaled
    // sums are zero in the other three).
    let spread_d = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let spread_c = _mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4);
    // SAFETY: rows `r0..r0 + R` are in range (the caller's promise).
    let row: [*const u8; R] =
        std::array::from_fn(|i| unsafe { w.lines.as_ptr().add((r0 + i) * w.row_lines).cast() });
    let (xq, xd, xs) = (act.qs.as_ptr(), act.d.as_ptr(), act.s.as_ptr());
    for g in 0..groups {
        let mut lo = [_mm512_setzero_si512(); R];
        let mut hi = [_mm512_setzero_si512(); R];
        let mut wd = [_mm512_setzero_ps(); R];
        let mut wc = [_mm512_setzero_ps(); R];
        for i in 0..R {
            // The same lines `PREFETCH_ROWS` rows on (a hint: an address
            // past the matrix is not read).
            let ahead =
                row[i].wrapping_add(64 * (PREFETCH_ROWS * w.row_lines + g * (1 + usize::from(Q8))));
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            if Q8 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64).cast());
            }
            if g == 0 {
                let meta = row[i].wrapping_add(64 * (PREFETCH_ROWS * w.row_lines + w.quant_lines));
                _mm_prefetch::<_MM_HINT_T0>(meta.cast());
            }
            // SAFETY: a row holds `quant_lines` 64-byte aligned lines of
            // weights (one per Q4 group; two per Q8_0 group, one for a
            // half tail), then `meta_bytes` of metadata per group.
            unsafe {
                if Q8 {
                    let line = row[i].add(128 * g);
                    if w.half_tail && g + 1 == groups {
                        // Values 0-15 of its blocks, then 16-31: the
                        // activations' lanes of the missing blocks are
                        // zero, so what lies beside them multiplies zero.
                        let v = _mm512_load_si512(line.cast());
                        lo[i] = v;
                        hi[i] = _mm512_zextsi256_si512(_mm512_extracti64x4_epi64::<1>(v));
                    } else {
                        lo[i] = _mm512_load_si512(line.cast());
                        hi[i] = _mm512_load_si512(line.add(64).cast());
                    }
                    let meta = _mm_loadl_epi64(row[i].add(meta_at + 8 * g).cast());
                    let m = _mm512_zextps128_ps512(_mm_cvtph_ps(meta));
                    wd[i] = _mm512_permutexvar_ps(spread_d, m);
                    wc[i] = _mm512_mul_ps(wd[i], bias);
                } else {
                    let v = _mm512_load_si512(row[i].add(64 * g).cast());
                    let meta = _mm_loadu_si128(row[i].add(meta_at + 16 * g).cast());
                    lo[i] = _mm512_and_si512(v, low);
                    hi[i] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                    let m = _mm512_castps256_ps512(_mm256_cvtph_ps(meta));
                    wd[i] = _mm512_permutexvar_ps(spread_d, m);
                    wc[i] = _mm512_permutexvar_ps(spread_c, m);
                }
            }
        }
        for j in 0..T {
            let k = (t0 + j) * groups + g;
            // SAFETY: token `t0 + j` is in range: its group `g` has 128
            // quants, 16 scales and 16 scaled sums.
            let (xl, xh, d, s) = unsafe {
                (
                    _mm512_loadu_si512(xq.add(128 * k).cast()),
                    _mm512_loadu_si512(xq.add(128 * k + 64).cast()),
                    _mm512_loadu_ps(xd.add(16 * k)),
                    _mm512_loadu_ps(xs.add(16 * k)),
                )
            };
            for i in 0..R {
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[i], xl);
                let dot = _mm512_dpbusd_epi32(dot, hi[i], xh);
                let a =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd[i], d), acc[i][j]);
                acc[i][j] = _mm512_fmadd_ps(wc[i], s, a);
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for i in 0..R {
        for j in 0..T {
            out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
        }
    }
    out
}

/// Causal attention of `Q` queries of one head (of one sequence): query
/// `i` attends to positions `0..lens[i]`, `out[i] = sum_j softmax_j(scale *
/// q_i·k_j) v_j`, where `kv` gives position `j`'s key and value in place
/// in the paged cache, a block's run at a time. Each key and value is
/// looked up once for all `Q` queries, and the weighted values are summed
/// in registers (the per-query path sums them through memory).
///
/// Bit for bit what [`super::ops::attend`] gives each query alone on the
/// AVX2 path: the same dot product ([`super::x86::dot_kv`]), the same
/// softmax, and the same fused multiply-adds in the same key order, so a
/// token's attention does not depend on how many tokens share its step
/// (a prefill at once equals one in chunks, a prefix-cache hit a cold
/// prefill). `scores` is scratch (`Q` rows); `head_dim` must be a multiple
/// of 16 and at most 64 per pass (larger ones take several passes).
///
/// # Safety
/// The CPU must have the features [`available`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn attend<'a, K, const Q: usize>(
    q: [&[f32]; Q],
    lens: [usize; Q],
    scale: f32,
    kv: K,
    scores: &mut Vec<f32>,
    out: [&mut [f32]; Q],
) where
    K: KvSource<'a>,
{
    let hd = q.first().map_or(0, |q| q.len());
    let longest = lens.iter().copied().max().unwrap_or(0);
    scores.clear();
    scores.resize(Q * longest, 0.0);
    // SAFETY: the caller's promise.
    unsafe { score_keys(q, lens, scale, kv, 0..longest, rows_mut(scores, longest)) };
    for (row, &len) in scores.chunks_mut(longest.max(1)).zip(&lens) {
        super::x86::softmax(&mut row[..len]);
    }
    let probs: [&[f32]; Q] = std::array::from_fn(|i| &scores[i * longest..(i + 1) * longest]);
    // SAFETY: the caller's promise.
    unsafe { weigh_columns(kv, 0..hd, lens, probs, out) };
}

/// `buf`'s first `Q` rows of `width`.
fn rows<const Q: usize>(buf: &[f32], width: usize) -> [&[f32]; Q] {
    std::array::from_fn(|i| &buf[i * width..(i + 1) * width])
}

/// [`rows`], to write.
fn rows_mut<const Q: usize>(buf: &mut [f32], width: usize) -> [&mut [f32]; Q] {
    let mut rest = buf;
    std::array::from_fn(|_| {
        let (row, tail) = std::mem::take(&mut rest).split_at_mut(width);
        rest = tail;
        row
    })
}

/// The scores of positions `keys` for `Q` queries of one head:
/// `rows[i][j - keys.start] = scale * q_i·k_j` for each `j` in `keys` below
/// `lens[i]` (the rest of the row is left alone). Each is what
/// [`super::x86::dot_kv`] gives, times `scale`, however the positions are
/// split into ranges: tasks that score parts of a context give the same
/// bits as one that scores it all. `head_dim` must be a multiple of 16.
///
/// # Safety
/// The CPU must have the features [`available`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
// The query registers are indexed by query.
#[allow(clippy::needless_range_loop)]
pub unsafe fn score_keys<'a, K, const Q: usize>(
    q: [&[f32]; Q],
    lens: [usize; Q],
    scale: f32,
    kv: K,
    keys: Range<usize>,
    rows: [&mut [f32]; Q],
) where
    K: KvSource<'a>,
{
    let hd = q.first().map_or(0, |q| q.len());
    assert!(
        hd.is_multiple_of(16),
        "head_dim {hd} is not a multiple of 16"
    );
    // The queries in registers, 16 lanes at a time, when they fit.
    let chunks = hd / 16;
    let mut qz = [[_mm512_setzero_ps(); 4]; Q];
    if chunks <= 4 {
        for (qz, q) in qz.iter_mut().zip(q) {
            for (c, z) in qz.iter_mut().take(chunks).enumerate() {
                // SAFETY: `16 * c + 16 <= hd`, the query's length.
                *z = unsafe { _mm512_loadu_ps(q.as_ptr().add(16 * c)) };
            }
        }
    }
    let mut cursor = Cursor::starting_at(kv, keys.start);
    let mut j = keys.start;
    while j + 8 <= keys.end {
        let mut k8: [&[KvElem]; 8] = [&[]; 8];
        for k in k8.iter_mut() {
            *k = &cursor.next_kv().0[..hd];
        }
        let at = j - keys.start;
        for i in 0..Q {
            if j + 8 <= lens[i] {
                let dots = match chunks {
                    1 => dots8_held::<1>(&qz[i], &k8),
                    2 => dots8_held::<2>(&qz[i], &k8),
                    3 => dots8_held::<3>(&qz[i], &k8),
                    4 => dots8_held::<4>(&qz[i], &k8),
                    _ => dots8(q[i], &k8),
                };
                let s = _mm256_mul_ps(dots, _mm256_set1_ps(scale));
                let dst = &mut rows[i][at..at + 8];
                // SAFETY: `dst` holds the 8 stored lanes.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), s) };
            } else {
                for (m, k) in k8.iter().enumerate().take(lens[i].saturating_sub(j)) {
                    rows[i][at + m] = super::x86::dot_kv(q[i], k) * scale;
                }
            }
        }
        j += 8;
    }
    for j in j..keys.end {
        let k = &cursor.next_kv().0[..hd];
        for i in 0..Q {
            if j < lens[i] {
                rows[i][j - keys.start] = super::x86::dot_kv(q[i], k) * scale;
            }
        }
    }
}

/// Columns `cols` of each query's output: the values weighted by its
/// probabilities (`probs[i][j]` for position `j`), summed in key order
/// over `j < lens[i]`, into `out[i][cols]`. Columns do not mix, so tasks
/// that weigh parts of a head's columns give the same bits as one that
/// weighs them all. `cols` must start and end on multiples of 16.
///
/// # Safety
/// The CPU must have the features [`available`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn weigh_columns<'a, K, const Q: usize>(
    kv: K,
    cols: Range<usize>,
    lens: [usize; Q],
    probs: [&[f32]; Q],
    out: [&mut [f32]; Q],
) where
    K: KvSource<'a>,
{
    assert!(
        cols.start.is_multiple_of(16) && cols.end.is_multiple_of(16),
        "columns {cols:?} are not whole 16-lane chunks"
    );
    let longest = lens.iter().copied().max().unwrap_or(0);
    let mut out = out;
    let mut c0 = cols.start;
    while c0 < cols.end {
        // SAFETY: the caller's promise; `c0 + 16 * W <= cols.end` in each arm.
        unsafe {
            match (cols.end - c0) / 16 {
                1 => weigh_values::<K, Q, 1>(kv, c0, lens, &probs, longest, &mut out),
                2 => weigh_values::<K, Q, 2>(kv, c0, lens, &probs, longest, &mut out),
                3 => weigh_values::<K, Q, 3>(kv, c0, lens, &probs, longest, &mut out),
                _ => weigh_values::<K, Q, 4>(kv, c0, lens, &probs, longest, &mut out),
            }
        }
        c0 += 64.min(cols.end - c0);
    }
}

/// Columns `c0..c0 + 16 * W` of [`weigh_columns`]. `W` is a constant so
/// that the accumulators and the loaded values stay in registers.
///
/// # Safety
/// The CPU must have the features [`available`] checks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)]
unsafe fn weigh_values<'a, K, const Q: usize, const W: usize>(
    kv: K,
    c0: usize,
    lens: [usize; Q],
    probs: &[&[f32]; Q],
    longest: usize,
    out: &mut [&mut [f32]; Q],
) where
    K: KvSource<'a>,
{
    let mut acc = [[_mm512_setzero_ps(); W]; Q];
    let mut cursor = Cursor::new(kv);
    for j in 0..longest {
        let v = &cursor.next_kv().1[c0..c0 + 16 * W];
        let mut vv = [_mm512_setzero_ps(); W];
        for c in 0..W {
            // SAFETY: `16 * c + 16 <= v.len()`.
            vv[c] = unsafe { load16_kv(v.as_ptr().add(16 * c)) };
        }
        for i in 0..Q {
            if j < lens[i] {
                let p = _mm512_set1_ps(probs[i][j]);
                for c in 0..W {
                    acc[i][c] = _mm512_fmadd_ps(p, vv[c], acc[i][c]);
                }
            }
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        let o = &mut o[c0..c0 + 16 * W];
        for c in 0..W {
            // SAFETY: `16 * c + 16 <= o.len()`.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * c), acc[i][c]) };
        }
    }
}

/// `[dot_kv(q, keys[m]) for m in 0..8]`, bit for bit what
/// [`super::x86::dot_kv`] gives each key (`q.len()` a multiple of 16):
/// the same lanes per key ([`super::x86::dot_lanes_kv`]), and the 8 horizontal sums done
/// together with the same pairing as its `hsum` (lane `m` with `m + 4`,
/// then `m` with `m + 2`, then the two left), which is what the
/// per-key dot spends most of its time on.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn dots8(q: &[f32], keys: &[&[KvElem]; 8]) -> __m256 {
    let n = q.len();
    let mut x = [_mm256_setzero_ps(); 8];
    for (xk, k) in x.iter_mut().zip(keys) {
        assert!(k.len() >= n, "key shorter than the query");
        *xk = super::x86::dot_lanes_kv(q, k);
    }
    hsum8(x)
}

/// [`dots8`] for a query of `16 * C` elements held in registers (`q`):
/// one 16-lane multiply-add per 16 elements, whose low 8 lanes are
/// [`super::x86::dot_lanes_kv`]'s first accumulator and high 8 its second,
/// the same products added in the same order, so the same bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn dots8_held<const C: usize>(q: &[__m512; 4], keys: &[&[KvElem]; 8]) -> __m256 {
    let x: [__m256; 8] = std::array::from_fn(|m| {
        let k = keys[m];
        assert!(k.len() >= 16 * C, "key shorter than the query");
        let mut acc = _mm512_setzero_ps();
        for (c, &qc) in q.iter().take(C).enumerate() {
            // SAFETY: `16 * c + 16 <= k.len()`.
            let kc = unsafe { load16_kv(k.as_ptr().add(16 * c)) };
            acc = _mm512_fmadd_ps(qc, kc, acc);
        }
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
        _mm256_add_ps(_mm512_castps512_ps256(acc), high)
    });
    hsum8(x)
}

/// 16 f16 values from `p` as f32 (exact).
///
/// # Safety
/// `p..p + 16` must be readable, and the CPU must have the features
/// [`available`] checks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn load16_kv(p: *const KvElem) -> __m512 {
    // SAFETY: the caller's promise; an unaligned 32-byte load.
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.cast()) })
}

/// The 8 horizontal sums of `x` (one key each) in key order, with
/// [`super::x86::dot_kv`]'s pairing (see [`dots8`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn hsum8(x: [__m256; 8]) -> __m256 {
    // Lane m + lane m + 4, keys in pairs: [key 2p | key 2p + 1].
    let s: [__m256; 4] = std::array::from_fn(|p| {
        let (a, b) = (x[2 * p], x[2 * p + 1]);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    });
    // Lane m + lane m + 2: [k0 k0 k2 k2 | k1 k1 k3 k3] and the same for 4-7.
    let t = |a: __m256, b: __m256| {
        _mm256_add_ps(
            _mm256_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm256_shuffle_ps::<0b11_10_11_10>(a, b),
        )
    };
    let (t0, t1) = (t(s[0], s[1]), t(s[2], s[3]));
    // The two left: [r0 r2 r4 r6 | r1 r3 r5 r7], then in key order.
    let r = _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(t0, t1),
        _mm256_shuffle_ps::<0b11_01_11_01>(t0, t1),
    );
    _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Runs `$body` with `$q` a constant: the number of heads `$n` (1 to 4), so
/// the kernels' per-query arrays stay in registers.
macro_rules! with_heads {
    ($n:expr, |$q:ident| $body:expr) => {
        match $n {
            4 => {
                const $q: usize = 4;
                $body
            }
            3 => {
                const $q: usize = 3;
                $body
            }
            2 => {
                const $q: usize = 2;
                $body
            }
            _ => {
                const $q: usize = 1;
                $body
            }
        }
    };
}

/// [`attend`] for the query heads `q` (`head_dim` each, contiguous: the
/// heads that share a KV head, in a decode step) that attend to the same
/// `len` positions, into `out` (laid out as `q`), up to 4 heads at a time:
/// each key and value is looked up once per group.
///
/// # Safety
/// The CPU must have the features [`available`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn attend_group<'a, K>(
    q: &[f32],
    head_dim: usize,
    len: usize,
    scale: f32,
    kv: K,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) where
    K: KvSource<'a>,
{
    assert_eq!(q.len(), out.len(), "a query per output");
    for (qg, og) in q.chunks(4 * head_dim).zip(out.chunks_mut(4 * head_dim)) {
        with_heads!(qg.len() / head_dim, |Q| {
            let (q, out) = (rows::<Q>(qg, head_dim), rows_mut::<Q>(og, head_dim));
            // SAFETY: the caller's promise.
            unsafe { attend(q, [len; Q], scale, kv, scores, out) }
        });
    }
}

/// [`score_keys`] for the query heads `q` of [`attend_group`]: `rows`
/// holds a row of `keys.len()` scores per head.
///
/// # Safety
/// The CPU must have the features [`available`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn score_keys_group<'a, K>(
    q: &[f32],
    head_dim: usize,
    len: usize,
    scale: f32,
    kv: K,
    keys: Range<usize>,
    rows: &mut [f32],
) where
    K: KvSource<'a>,
{
    let width = keys.len();
    assert_eq!(q.len() / head_dim * width, rows.len(), "a row per query");
    if width == 0 {
        return;
    }
    for (qg, rg) in q.chunks(4 * head_dim).zip(rows.chunks_mut(4 * width)) {
        with_heads!(qg.len() / head_dim, |Q| {
            let (q, rows) = (self::rows::<Q>(qg, head_dim), rows_mut::<Q>(rg, width));
            // SAFETY: the caller's promise.
            unsafe { score_keys(q, [len; Q], scale, kv, keys.clone(), rows) }
        });
    }
}

/// [`weigh_columns`] for the heads of [`score_keys_group`]: `probs` holds
/// a row of `len` probabilities per head, `out` a row of `head_dim` per
/// head, of which columns `cols` are written.
///
/// # Safety
/// The CPU must have the features [`available`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn weigh_columns_group<'a, K>(
    kv: K,
    head_dim: usize,
    len: usize,
    cols: Range<usize>,
    probs: &[f32],
    out: &mut [f32],
) where
    K: KvSource<'a>,
{
    assert_eq!(out.len() / head_dim * len, probs.len(), "a row per output");
    if len == 0 {
        return;
    }
    for (pg, og) in probs.chunks(4 * len).zip(out.chunks_mut(4 * head_dim)) {
        with_heads!(og.len() / head_dim, |Q| {
            let (probs, out) = (rows::<Q>(pg, len), rows_mut::<Q>(og, head_dim));
            // SAFETY: the caller's promise.
            unsafe { weigh_columns(kv, cols.clone(), [len; Q], probs, out) }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_data as data;
    use crate::engine::kv_storage::to_kv_vec;

    /// Scores split into ranges of positions (not on multiples of 8) and
    /// values split into column ranges, put together, equal the attention
    /// done whole, bit for bit: how a decode step spreads a group's work
    /// over the threads changes no output.
    #[test]
    fn attention_split_by_positions_and_columns_equals_it_whole() {
        if !available() {
            return;
        }
        let (hd, n, heads) = (64, 37, 3);
        let keys = to_kv_vec(&data(n * hd, 31));
        let values = to_kv_vec(&data(n * hd, 32));
        let kv = |j: usize| (&keys[j * hd..(j + 1) * hd], &values[j * hd..(j + 1) * hd]);
        let q = data(heads * hd, 33);
        let scale = 0.125;
        let mut whole = vec![0f32; heads * hd];
        let mut scratch = Vec::new();
        // SAFETY: `available()` said the CPU has the features.
        unsafe { attend_group(&q, hd, n, scale, kv, &mut scratch, &mut whole) };
        let mut probs = vec![0f32; heads * n];
        for range in [0..18, 18..29, 29..n] {
            let mut part = vec![0f32; heads * range.len()];
            // SAFETY: as above.
            unsafe { score_keys_group(&q, hd, n, scale, kv, range.clone(), &mut part) };
            for (i, row) in part.chunks_exact(range.len()).enumerate() {
                probs[i * n + range.start..i * n + range.end].copy_from_slice(row);
            }
        }
        for row in probs.chunks_mut(n) {
            // SAFETY: as above.
            unsafe { super::super::x86::softmax(row) };
        }
        let mut split = vec![f32::NAN; heads * hd];
        for cols in [0..16, 16..64] {
            // SAFETY: as above.
            unsafe { weigh_columns_group(kv, hd, n, cols, &probs, &mut split) };
        }
        assert_eq!(split, whole);
    }

    /// The tiled attention equals the AVX2 per-query path bit for bit, for
    /// queries of different lengths, one and four at a time, and the
    /// scalar reference within float rounding.
    #[test]
    fn tiled_attention_equals_the_per_query_path_bit_for_bit() {
        if !available() {
            return;
        }
        let (hd, n) = (64, 37);
        let keys = to_kv_vec(&data(n * hd, 21));
        let values = to_kv_vec(&data(n * hd, 22));
        let kv = |j: usize| (&keys[j * hd..(j + 1) * hd], &values[j * hd..(j + 1) * hd]);
        let qs = data(4 * hd, 23);
        let q = |i: usize| &qs[i * hd..(i + 1) * hd];
        let lens = [1, 16, 17, 37];
        let scale = 0.125;
        let (mut simd, mut scalar) = (vec![0f32; 4 * hd], vec![0f32; 4 * hd]);
        let mut scratch = Vec::new();
        for (i, (s, r)) in simd.chunks_mut(hd).zip(scalar.chunks_mut(hd)).enumerate() {
            super::super::ops::attend(q(i), lens[i], scale, kv, &mut scratch, s, true);
            super::super::ops::attend(q(i), lens[i], scale, kv, &mut scratch, r, false);
        }
        let mut four = vec![0f32; 4 * hd];
        let mut one = vec![0f32; hd];
        {
            let (a, rest) = four.split_at_mut(hd);
            let (b, rest) = rest.split_at_mut(hd);
            let (c, d) = rest.split_at_mut(hd);
            // SAFETY: `available()` above.
            unsafe {
                attend(
                    [q(0), q(1), q(2), q(3)],
                    lens,
                    scale,
                    kv,
                    &mut scratch,
                    [a, b, c, d],
                );
                attend([q(2)], [lens[2]], scale, kv, &mut scratch, [&mut one]);
            }
        }
        let mut three = vec![0f32; 3 * hd];
        // SAFETY: `available()` above.
        unsafe { attend_group(&qs[..3 * hd], hd, 17, scale, kv, &mut scratch, &mut three) };
        for (i, o) in three.chunks(hd).enumerate() {
            let mut alone = vec![0f32; hd];
            super::super::ops::attend(q(i), 17, scale, kv, &mut scratch, &mut alone, true);
            assert_eq!(o, alone, "a group of three, query {i}");
        }
        assert_eq!(four, simd, "four at a time, against the AVX2 path");
        assert_eq!(
            one,
            simd[2 * hd..3 * hd],
            "one alone, against the AVX2 path"
        );
        for (i, (g, w)) in four.iter().zip(&scalar).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5,
                "query {} dim {}: {g} vs {w}",
                i / hd,
                i % hd
            );
        }
    }

    /// A Q4_0 scale whose constant `-8 d` an f16 cannot hold leaves the
    /// matrix unpacked (on the AVX2 kernels) rather than computing with an
    /// infinity.
    #[test]
    fn a_constant_beyond_f16_leaves_the_matrix_unpacked() {
        let block = |d: f32| {
            let mut b = half::f16::from_f32(d).to_le_bytes().to_vec();
            b.extend([0x88u8; 16]);
            b
        };
        assert!(Packed::new(Format::Q4_0, &block(0.01), 1).is_some());
        assert!(Packed::new(Format::Q4_0, &block(10_000.0), 1).is_none());
    }

    /// Every (row, token) of each format, of block counts that fill their
    /// last group or leave it with 1, 2 or 3 blocks (Q8_0's one-line tail
    /// and its two-line one), row counts that are not a multiple of 4 and
    /// token counts that are not a multiple of 4 (and over one token tile)
    /// equals the scalar dot within float rounding.
    #[test]
    fn blocked_products_equal_scalar_dots() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI here");
            return;
        }
        for (format, quantize, scalar) in [
            (
                Format::Q4_1,
                quant::quantize_q4_1 as fn(&[f32]) -> Vec<u8>,
                quant::dot_q4_1_q8 as fn(&[u8], &[BlockQ8]) -> f32,
            ),
            (Format::Q4_0, quant::quantize_q4_0, quant::dot_q4_0_q8),
            (Format::Q8_0, quant::quantize_q8_0, quant::dot_q8_0_q8),
        ] {
            for (rows, nb, n) in [(9, 3, 70), (8, 18, 5), (5, 1, 1), (4, 48, 4), (7, 6, 9)] {
                let cols = nb * QK;
                let w = quantize(&data(rows * cols, 7 + nb as u32));
                let x = data(n * cols, 3 + n as u32);
                let mut xq = vec![BlockQ8::ZERO; n * nb];
                quant::quantize_q8(&x, &mut xq);
                let act = Q8Act::quantize(&x, n, cols);
                // All tokens, a later share of them, and a later share of
                // the rows.
                let some = n / 3..n;
                let later = rows / 2..rows;
                let mut all = vec![0f32; rows * n];
                let mut part = vec![0f32; rows * some.len()];
                let mut by_rows = vec![0f32; later.len() * n];
                let packed = Packed::new(format, &w, nb).unwrap();
                // SAFETY: `available()` above.
                unsafe {
                    gemm(&packed, 0..rows, &act, 0..n, &mut all);
                    gemm(&packed, 0..rows, &act, some.clone(), &mut part);
                    gemm(&packed, later.clone(), &act, 0..n, &mut by_rows);
                }
                let row_bytes = w.len() / rows;
                for r in 0..rows {
                    for t in 0..n {
                        let want = scalar(
                            &w[r * row_bytes..(r + 1) * row_bytes],
                            &xq[t * nb..(t + 1) * nb],
                        );
                        let got = all[t * rows + r];
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{format:?} {rows}x{cols} by {n}: row {r} token {t}: {got} vs {want}"
                        );
                        if some.contains(&t) {
                            let got = part[(t - some.start) * rows + r];
                            assert_eq!(got, all[t * rows + r], "a share: row {r} token {t}");
                        }
                        if later.contains(&r) {
                            let got = by_rows[t * later.len() + r - later.start];
                            assert_eq!(got, all[t * rows + r], "rows: row {r} token {t}");
                        }
                    }
                }
            }
        }
    }
}
