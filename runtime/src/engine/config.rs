//! The shape of a Llama-family model: layer count, widths, heads, RoPE and
//! norm constants, read from GGUF metadata (`llama.*` keys) or from a
//! Hugging Face `config.json`.
//!
//! It only describes the model; it loads no weights (see [`super::model`]).

use super::gguf::{GgufError, GgufFile};

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimensions `(2i, 2i+1)` rotate together: llama.cpp's order, which its
    /// GGUF conversion produces by permuting the Q and K weights.
    Adjacent,
    /// Dimensions `(i, i + head_dim/2)` rotate together: Hugging Face's order.
    Halves,
}

/// What the forward pass needs to know about the model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub rope_style: RopeStyle,
}

/// A config that cannot describe a working model.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{source_name}: {field}: {reason}")]
    Invalid {
        source_name: String,
        field: String,
        reason: String,
    },
    #[error("{source_name}: not valid JSON: {error}")]
    Json {
        source_name: String,
        error: serde_json::Error,
    },
}

/// Upper bound on any dimension, so a corrupt file cannot ask for terabytes.
const MAX_DIM: u64 = 1 << 20;

impl ModelConfig {
    /// Reads the `llama.*` metadata of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ConfigError> {
        let arch = file.get_str("general.architecture")?;
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            source_name: file.path().to_string(),
            field: field.to_string(),
            reason,
        };
        if arch != "llama" {
            return Err(invalid(
                "general.architecture",
                format!("{arch:?} is not supported (only llama)"),
            ));
        }
        let dim = |key: &str| -> Result<usize, ConfigError> {
            let v = file.get_u64(key)?;
            if v == 0 || v > MAX_DIM {
                return Err(invalid(key, format!("{v} is out of range 1..={MAX_DIM}")));
            }
            Ok(v as usize)
        };
        let n_heads = dim("llama.attention.head_count")?;
        let n_kv_heads = match file.get_u64("llama.attention.head_count_kv") {
            Ok(_) => dim("llama.attention.head_count_kv")?,
            Err(_) => n_heads,
        };
        let hidden = dim("llama.embedding_length")?;
        let vocab = match file.get_u64("llama.vocab_size") {
            Ok(_) => dim("llama.vocab_size")?,
            Err(_) => file.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let head_dim = match file.get_u64("llama.attention.key_length") {
            Ok(_) => dim("llama.attention.key_length")?,
            Err(_) => hidden / n_heads,
        };
        let rope_base = file.get_f64("llama.rope.freq_base").unwrap_or(10000.0) as f32;
        let cfg = Self {
            n_layers: dim("llama.block_count")?,
            hidden,
            ffn: dim("llama.feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            context_length: dim("llama.context_length")?,
            rope_base,
            rms_eps: file.get_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
            rope_style: RopeStyle::Adjacent,
        };
        cfg.validate(file.path())?;
        Ok(cfg)
    }

    /// Parses a Hugging Face `config.json` of a `LlamaForCausalLM`.
    pub fn from_hf_json(source_name: &str, json: &str) -> Result<Self, ConfigError> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|error| ConfigError::Json {
                source_name: source_name.to_string(),
                error,
            })?;
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            source_name: source_name.to_string(),
            field: field.to_string(),
            reason,
        };
        let dim = |key: &str| -> Result<usize, ConfigError> {
            match v.get(key).and_then(serde_json::Value::as_u64) {
                Some(x) if x > 0 && x <= MAX_DIM => Ok(x as usize),
                Some(x) => Err(invalid(key, format!("{x} is out of range 1..={MAX_DIM}"))),
                None => Err(invalid(key, "missing or not a positive integer".into())),
            }
        };
        let float = |key: &str, default: f64| -> Result<f32, ConfigError> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default as f32),
                Some(x) => x
                    .as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| invalid(key, "not a number".into())),
            }
        };
        if let Some(t) = v.get("model_type").and_then(|t| t.as_str())
            && t != "llama"
        {
            return Err(invalid("model_type", format!("{t:?} is not supported")));
        }
        let hidden = dim("hidden_size")?;
        let n_heads = dim("num_attention_heads")?;
        let n_kv_heads = if v.get("num_key_value_heads").is_some() {
            dim("num_key_value_heads")?
        } else {
            n_heads
        };
        let head_dim = if v.get("head_dim").is_some_and(|h| !h.is_null()) {
            dim("head_dim")?
        } else {
            hidden / n_heads
        };
        let cfg = Self {
            n_layers: dim("num_hidden_layers")?,
            hidden,
            ffn: dim("intermediate_size")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab: dim("vocab_size")?,
            context_length: dim("max_position_embeddings")?,
            rope_base: float("rope_theta", 10000.0)?,
            rms_eps: float("rms_norm_eps", 1e-6)?,
            rope_style: RopeStyle::Halves,
        };
        cfg.validate(source_name)?;
        Ok(cfg)
    }

    fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| {
            Err(ConfigError::Invalid {
                source_name: source_name.to_string(),
                field: field.to_string(),
                reason,
            })
        };
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return invalid(
                "head counts",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.n_heads, self.n_kv_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return invalid("head_dim", format!("{} is odd", self.head_dim));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return invalid("rms_norm_eps", format!("{} is not usable", self.rms_eps));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return invalid("rope_theta", format!("{} is not usable", self.rope_base));
        }
        Ok(())
    }

    /// Width of the query projection output (`n_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the key/value projection outputs (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_reads_and_rejects() {
        let json = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":2,
            "vocab_size":100,"max_position_embeddings":256,"rope_theta":10000.0,
            "rms_norm_eps":1e-5}"#;
        let c = ModelConfig::from_hf_json("config.json", json).unwrap();
        assert_eq!((c.head_dim, c.kv_dim(), c.q_dim()), (16, 32, 64));
        assert_eq!(c.rope_style, RopeStyle::Halves);
        let bad = json.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        let err = ModelConfig::from_hf_json("config.json", &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("KV heads"),
            "{err}"
        );
        let err = ModelConfig::from_hf_json("config.json", "{")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }
}
