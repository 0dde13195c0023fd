//! Hugging Face checkpoints: a folder with `config.json` and `*.safetensors`
//! files (F32, F16 or BF16 tensors, memory-mapped, not converted) loaded into
//! a [`Model`] with Hugging Face's split-halves RoPE.
//!
//! Tensor names are mapped to the GGUF names the model uses
//! (`model.layers.0.self_attn.q_proj.weight` → `blk.0.attn_q.weight`). The
//! tokenizer of such a checkpoint (`tokenizer.json`) is not handled here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::safetensors::{Dtype, SafeTensors};

use super::config::{ConfigError, ModelConfig};
use super::cpu::WeightBytes;
use super::gguf::{GgmlType, GgufBytes};
use super::model::{Model, ModelError, RawTensor};

/// A checkpoint folder cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: no *.safetensors files")]
    NoWeights { path: PathBuf },
    #[error("{path}: tensor {tensor}: dtype {dtype} is not supported (F32, F16, BF16 are)")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: tensor {tensor} appears in more than one file")]
    Duplicate { path: PathBuf, tensor: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The GGUF name of a Hugging Face Llama tensor; `None` for tensors the
/// model does not use (e.g. `rotary_emb.inv_freq`).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let short = match part {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// Loads `dir/config.json` and every `dir/*.safetensors`.
pub fn load_hf_model(dir: &Path) -> Result<Model, SafetensorsError> {
    let config_path = dir.join("config.json");
    let json = std::fs::read_to_string(&config_path).map_err(|source| SafetensorsError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config = ModelConfig::from_hf_json(&config_path.display().to_string(), &json)?;

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SafetensorsError::Io { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(SafetensorsError::NoWeights {
            path: dir.to_path_buf(),
        });
    }

    let mut tensors = HashMap::new();
    for path in &files {
        let file = std::fs::File::open(path).map_err(io(path))?;
        // SAFETY: read-only map; the checkpoint must not be truncated while
        // the model is loaded (as for every mmap-based loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(path))?;
        let bytes = Arc::new(GgufBytes::Mapped(map));
        let base = bytes.as_slice().as_ptr() as usize;
        let st =
            SafeTensors::deserialize(bytes.as_slice()).map_err(|e| SafetensorsError::Parse {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        for (name, view) in st.iter() {
            let Some(gguf) = gguf_name(name) else {
                continue;
            };
            let ty = match view.dtype() {
                Dtype::F32 => GgmlType::F32,
                Dtype::F16 => GgmlType::F16,
                Dtype::BF16 => GgmlType::BF16,
                other => {
                    return Err(SafetensorsError::UnsupportedDtype {
                        path: path.clone(),
                        tensor: name.to_string(),
                        dtype: format!("{other:?}"),
                    });
                }
            };
            let data = view.data();
            let raw = RawTensor {
                ty,
                // safetensors shapes are row-major [out, in]; ggml dims are
                // the reverse.
                dims: view.shape().iter().rev().copied().collect(),
                bytes: WeightBytes::Mapped {
                    file: bytes.clone(),
                    start: data.as_ptr() as usize - base,
                    len: data.len(),
                },
            };
            if tensors.insert(gguf, raw).is_some() {
                return Err(SafetensorsError::Duplicate {
                    path: path.clone(),
                    tensor: name.to_string(),
                });
            }
        }
    }
    Ok(Model::from_tensors(
        config,
        &dir.display().to_string(),
        &tensors,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map_to_gguf_names() {
        assert_eq!(
            gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(),
            Some("blk.12.ffn_down.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
            None
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    }
}
