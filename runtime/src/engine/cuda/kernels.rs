//! The CUDA backend's kernel sources, compiled at run time by NVRTC (see
//! [`super::nvrtc`]), and the launch constants their host code must match.
//!
//! Every source is one `.cu` file under `kernels/` with `common.cuh` (bf16
//! conversions, warp and block reductions) prepended, so each compiles on its
//! own without any CUDA header on disk. Storage is bf16 (weights, the KV
//! cache, GEMM inputs), arithmetic and the residual stream f32. This module
//! lists the sources and their entry points; it launches nothing.

/// One kernel source file and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// The file's stem, `kernels/<name>.cu`; also the NVRTC program name.
    pub name: &'static str,
    /// The complete source NVRTC compiles (common header included).
    pub source: &'static str,
    /// The `extern "C" __global__` functions it defines.
    pub entry_points: &'static [&'static str],
}

macro_rules! kernel_source {
    ($name:literal, [$($entry:literal),+ $(,)?]) => {
        KernelSource {
            name: $name,
            source: concat!(
                include_str!("kernels/common.cuh"),
                "\n#line 1 \"",
                $name,
                ".cu\"\n",
                include_str!(concat!("kernels/", $name, ".cu")),
            ),
            entry_points: &[$($entry),+],
        }
    };
}

/// Embedding rows (bf16) gathered into the f32 residual stream.
pub const EMBEDDING: KernelSource = kernel_source!("embedding", ["embedding_gather"]);
/// RMSNorm of f32 rows into bf16 GEMM inputs.
pub const RMS_NORM: KernelSource = kernel_source!("rms_norm", ["rms_norm"]);
/// RoPE in llama.cpp's adjacent-pair order and Hugging Face's split halves.
pub const ROPE: KernelSource = kernel_source!("rope", ["rope_adjacent", "rope_halves"]);
/// silu(gate) * up into bf16.
pub const SWIGLU: KernelSource = kernel_source!("swiglu", ["swiglu"]);
/// New tokens' K/V into their paged cache slots.
pub const KV_WRITE: KernelSource = kernel_source!("kv_write", ["kv_write"]);
/// One-token-per-sequence attention over block tables, GQA.
pub const PAGED_ATTENTION_DECODE: KernelSource =
    kernel_source!("paged_attention_decode", ["paged_attention_decode"]);
/// Causal, tiled (flash-style) attention for prefill chunks after a cached prefix.
pub const PREFILL_ATTENTION: KernelSource =
    kernel_source!("prefill_attention", ["prefill_attention"]);
/// Greedy and temperature / top-k / top-p token selection.
pub const SAMPLING: KernelSource = kernel_source!("sampling", ["argmax", "sample_top_k_top_p"]);

/// Every kernel source of the backend.
pub const ALL: &[KernelSource] = &[
    EMBEDDING,
    RMS_NORM,
    ROPE,
    SWIGLU,
    KV_WRITE,
    PAGED_ATTENTION_DECODE,
    PREFILL_ATTENTION,
    SAMPLING,
];

/// `paged_attention_decode`: threads per block (`DECODE_THREADS`).
pub const DECODE_THREADS: u32 = 128;
/// `paged_attention_decode` and `prefill_attention`: largest head_dim.
pub const MAX_HEAD_DIM: usize = 256;
/// `prefill_attention`: threads per block (`PREFILL_THREADS`).
pub const PREFILL_THREADS: u32 = 128;
/// `prefill_attention`: (token, query head) rows per block (`PREFILL_ROWS`).
pub const PREFILL_ROWS: u32 = 16;
/// `prefill_attention`: keys per shared-memory tile (`PREFILL_KEYS`).
pub const PREFILL_KEYS: u32 = 32;
/// `sample_top_k_top_p`: threads per block (`SAMPLE_THREADS`).
pub const SAMPLE_THREADS: u32 = 1024;

/// Dynamic shared memory `prefill_attention` needs for `head_dim`.
pub fn prefill_shared_bytes(head_dim: usize) -> usize {
    let (rows, keys) = (PREFILL_ROWS as usize, PREFILL_KEYS as usize);
    (rows * head_dim + keys * (2 * head_dim + 1)) * size_of::<f32>()
}

/// The kernel source that defines `entry`, if any.
pub fn source_of(entry: &str) -> Option<&'static KernelSource> {
    ALL.iter().find(|k| k.entry_points.contains(&entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `#define NAME value` in a source.
    fn define(source: &str, name: &str) -> Option<u64> {
        source.lines().find_map(|line| {
            let rest = line.trim().strip_prefix("#define ")?;
            let (key, value) = rest.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok())?
        })
    }

    #[test]
    fn host_launch_constants_match_the_kernels() {
        let dec = PAGED_ATTENTION_DECODE.source;
        assert_eq!(define(dec, "DECODE_THREADS"), Some(DECODE_THREADS.into()));
        assert_eq!(
            define(dec, "DECODE_MAX_HEAD_DIM"),
            Some(MAX_HEAD_DIM as u64)
        );
        let pre = PREFILL_ATTENTION.source;
        assert_eq!(define(pre, "PREFILL_THREADS"), Some(PREFILL_THREADS.into()));
        assert_eq!(define(pre, "PREFILL_ROWS"), Some(PREFILL_ROWS.into()));
        assert_eq!(define(pre, "PREFILL_KEYS"), Some(PREFILL_KEYS.into()));
        assert_eq!(
            define(pre, "PREFILL_MAX_DIMS_PER_LANE"),
            Some(MAX_HEAD_DIM as u64 / 32)
        );
        assert_eq!(
            define(SAMPLING.source, "SAMPLE_THREADS"),
            Some(SAMPLE_THREADS.into())
        );
    }

    #[test]
    fn every_entry_point_is_defined_once_in_its_source() {
        let mut seen = std::collections::HashSet::new();
        for k in ALL {
            for entry in k.entry_points {
                assert!(seen.insert(*entry), "{entry} listed twice");
                let sig = format!("{entry}(");
                assert!(
                    k.source.contains("extern \"C\" __global__") && k.source.contains(&sig),
                    "{}.cu does not define {entry}",
                    k.name
                );
                assert_eq!(source_of(entry).map(|s| s.name), Some(k.name));
            }
        }
        // 64: SmolLM2's head_dim; 20.1 KiB fits the default 48 KiB.
        assert_eq!(prefill_shared_bytes(64), 20_608);
    }
}
