//! The element-wise and per-row f32 operations of a Llama layer, and one
//! head's attention over keys and values kept as f16 ([`KvElem`]).

use crate::engine::config::RopeStyle;
use crate::engine::kv_storage::KvElem;

/// `out = x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// RoPE inverse frequencies `base^(-2i/head_dim)` for `i < head_dim/2`.
pub fn rope_freqs(head_dim: usize, base: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (base as f64).powf(-2.0 * i as f64 / head_dim as f64) as f32)
        .collect()
}

/// Rotates every head of `x` (`[n_heads, head_dim]`) to position `pos`.
pub fn rope(x: &mut [f32], head_dim: usize, pos: usize, freqs: &[f32], style: RopeStyle) {
    let half = head_dim / 2;
    // Angles in f64 so that long positions keep their precision.
    let cs: Vec<(f32, f32)> = freqs
        .iter()
        .map(|&f| {
            let a = pos as f64 * f as f64;
            (a.cos() as f32, a.sin() as f32)
        })
        .collect();
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in cs.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

/// In-place softmax, with [`exp`]; `simd` (from
/// [`super::matmul::simd_available`]) runs it on AVX2, 8 lanes at a time
/// (the same exponentials, summed in another order).
pub fn softmax(x: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when the CPU has the features.
        return unsafe { super::x86::softmax(x) };
    }
    let _ = simd;
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Lower and upper clamps of [`exp`]'s argument: 2^n stays a normal
/// float (e^-87.34 is about the smallest normal, 1.2e-38).
pub(crate) const EXP_LO: f32 = -87.336_54;
pub(crate) const EXP_HI: f32 = 88.0;
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts, so that `x - n ln 2` loses nothing (Cephes' `expf`).
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// The polynomial of `(e^r - 1 - r) / r^2` on |r| <= ln 2 / 2, highest
/// power first.
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` within 2 ulp on the clamped range (Cephes' `expf`): `x = n ln 2 +
/// r`, a polynomial in `r`, times `2^n`. Every step is one IEEE operation
/// or a fused multiply-add, so the AVX2 version ([`super::x86`]'s `exp8`)
/// gives each lane the same bits; several times faster than the C
/// library's `expf`, which a softmax over long contexts calls once per key.
// Not `clamp`: a NaN becomes `EXP_LO` here, as in the vector version.
#[allow(clippy::manual_clamp)]
pub fn exp(x: f32) -> f32 {
    let x = x.max(EXP_LO).min(EXP_HI);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let p = EXP_POLY[1..]
        .iter()
        .fold(EXP_POLY[0], |p, &c| p.mul_add(r, c));
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Where one sequence's cached keys and values of one KV head are, for the
/// attention kernels, which read them in place. A closure `j -> (key,
/// value)` is one, a position at a time; the paged cache gives runs of a
/// block's positions, which lie at one stride.
pub trait KvSource<'a>: Copy {
    /// The positions from `j` on that lie at one stride (at least `j`).
    fn run(self, j: usize) -> Run<'a>;
}

/// Positions `j..j + n` of a [`KvSource`]: the key of `j + m` starts at
/// `keys[m * stride]`, its value at `values[m * stride]`, and each slice
/// holds the last one's `head_dim` elements.
#[derive(Clone, Copy)]
pub struct Run<'a> {
    pub keys: &'a [KvElem],
    pub values: &'a [KvElem],
    pub stride: usize,
    pub n: usize,
}

impl<'a, F> KvSource<'a> for F
where
    F: Fn(usize) -> (&'a [KvElem], &'a [KvElem]) + Copy,
{
    #[inline(always)]
    fn run(self, j: usize) -> Run<'a> {
        let (keys, values) = self(j);
        Run {
            keys,
            values,
            stride: 0,
            n: 1,
        }
    }
}

/// The positions of a [`KvSource`] in order, a run at a time: what the
/// kernels walk instead of looking each position up.
pub(crate) struct Cursor<'a, K> {
    kv: K,
    /// The next position, and where it is in `run` (`taken` of its `n`).
    pos: usize,
    run: Run<'a>,
    taken: usize,
    offset: usize,
}

impl<'a, K: KvSource<'a>> Cursor<'a, K> {
    pub(crate) fn new(kv: K) -> Self {
        Self::starting_at(kv, 0)
    }

    /// A cursor whose first position is `pos`.
    pub(crate) fn starting_at(kv: K, pos: usize) -> Self {
        Cursor {
            kv,
            pos,
            run: Run {
                keys: &[],
                values: &[],
                stride: 0,
                n: 0,
            },
            taken: 0,
            offset: 0,
        }
    }

    /// The next position's key and value, each running on to the end of
    /// its run (take the first `head_dim`).
    #[inline(always)]
    pub(crate) fn next_kv(&mut self) -> (&'a [KvElem], &'a [KvElem]) {
        if self.taken == self.run.n {
            self.run = self.kv.run(self.pos);
            (self.taken, self.offset) = (0, 0);
        }
        let at = self.offset;
        self.taken += 1;
        self.offset += self.run.stride;
        self.pos += 1;
        (&self.run.keys[at..], &self.run.values[at..])
    }
}

/// One head's causal attention: `out = sum_j softmax_j(scale * q·k_j) v_j`
/// over positions `j < n`, where `kv` gives position `j`'s key and value
/// (`head_dim` each, read in place from the paged cache). `scores` is scratch.
/// `simd` comes from [`super::matmul::simd_available`].
pub fn attend<'a, K>(
    q: &[f32],
    n: usize,
    scale: f32,
    kv: K,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    simd: bool,
) where
    K: KvSource<'a>,
{
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when the CPU has the features.
        return unsafe { super::x86::attend(q, n, scale, kv, scores, out) };
    }
    let _ = simd;
    let axpy = |y: &mut [f32], a: f32, x: &[KvElem]| {
        for (yy, xx) in y.iter_mut().zip(x) {
            *yy += a * xx.to_f32();
        }
    };
    attend_body(q, n, scale, kv, scores, out, dot_kv, axpy, false);
}

/// `q · k` for an f32 query and an f16 key, with [`super::quant::dot_f32`]'s
/// eight accumulators (the scalar path's dot; the keys convert exactly).
pub fn dot_kv(q: &[f32], k: &[KvElem]) -> f32 {
    super::quant::dot_as_f32(q, k, KvElem::to_f32)
}

/// The body of [`attend`], generic over the dot and axpy kernels so the SIMD
/// caller gets them inlined; `simd` picks the softmax.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_body<'a, K, D, A>(
    q: &[f32],
    n: usize,
    scale: f32,
    kv: K,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    dot: D,
    axpy: A,
    simd: bool,
) where
    K: KvSource<'a>,
    D: Fn(&[f32], &[KvElem]) -> f32,
    A: Fn(&mut [f32], f32, &[KvElem]),
{
    let hd = q.len();
    scores.clear();
    let mut keys = Cursor::new(kv);
    scores.extend((0..n).map(|_| dot(q, &keys.next_kv().0[..hd]) * scale));
    softmax(scores, simd);
    out.fill(0.0);
    let mut values = Cursor::new(kv);
    for &a in scores.iter() {
        axpy(out, a, &values.next_kv().1[..hd]);
    }
}

/// `gate = silu(gate) * up`, SwiGLU's combination.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a float64 softmax average of the keys and values as the
    /// cache holds them (rounded to f16 once, when written).
    #[test]
    fn attention_matches_a_naive_softmax_average() {
        use crate::engine::kv_storage::to_kv_vec;
        let (hd, n) = (16, 37);
        let val = |i: usize| ((i * 7919) % 97) as f32 / 97.0 - 0.5;
        let q: Vec<f32> = (0..hd).map(val).collect();
        let keys: Vec<Vec<KvElem>> = (0..n)
            .map(|j| to_kv_vec(&(0..hd).map(|d| val(j * 31 + d + 5)).collect::<Vec<_>>()))
            .collect();
        let values: Vec<Vec<KvElem>> = (0..n)
            .map(|j| to_kv_vec(&(0..hd).map(|d| val(j * 17 + d * 3)).collect::<Vec<_>>()))
            .collect();
        let logits: Vec<f64> = keys
            .iter()
            .map(|k| {
                k.iter()
                    .zip(&q)
                    .map(|(a, &b)| a.to_f64() * b as f64)
                    .sum::<f64>()
                    * 0.25
            })
            .collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum();
        let want: Vec<f32> = (0..hd)
            .map(|d| {
                (0..n)
                    .map(|j| logits[j].exp() / z * values[j][d].to_f64())
                    .sum::<f64>() as f32
            })
            .collect();
        for simd in [false, super::super::matmul::simd_available()] {
            let mut out = vec![0f32; hd];
            let kv = |j: usize| (keys[j].as_slice(), values[j].as_slice());
            attend(&q, n, 0.25, kv, &mut Vec::new(), &mut out, simd);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "simd {simd}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rope_styles_agree_up_to_a_permutation() {
        let head_dim = 8;
        let freqs = rope_freqs(head_dim, 10000.0);
        let x: Vec<f32> = (0..head_dim).map(|i| i as f32 + 1.0).collect();
        // Halves order `[a0 a1 a2 a3 b0 b1 b2 b3]` is adjacent order
        // `[a0 b0 a1 b1 ...]` after interleaving.
        let inter: Vec<f32> = (0..head_dim / 2).flat_map(|i| [x[i], x[i + 4]]).collect();
        let (mut h, mut a) = (x.clone(), inter);
        rope(&mut h, head_dim, 7, &freqs, RopeStyle::Halves);
        rope(&mut a, head_dim, 7, &freqs, RopeStyle::Adjacent);
        for i in 0..4 {
            assert!((h[i] - a[2 * i]).abs() < 1e-6 && (h[i + 4] - a[2 * i + 1]).abs() < 1e-6);
        }
        // Position 0 is the identity; rotation keeps the norm.
        let mut z = x.clone();
        rope(&mut z, head_dim, 0, &freqs, RopeStyle::Adjacent);
        assert_eq!(z, x);
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((n(&h) - n(&x)).abs() < 1e-3);
    }
}
