//! The model's tokenizer, rebuilt from GGUF metadata (`tokenizer.ggml.*`)
//! with the `tokenizers` crate: GPT-2 byte-level BPE, the pre-tokenizer named
//! by `tokenizer.ggml.pre`, and the control tokens as special tokens.
//!
//! [`StreamDecoder`] turns generated ids into text piece by piece without
//! ever emitting a broken UTF-8 character. Chat formatting lives in
//! [`super::chat_template`]; sampling and stop rules are not here.

use serde_json::json;

use super::gguf::{GgufError, GgufFile, MetaValue};

/// GGUF token type of control (special) tokens.
const TOKEN_TYPE_CONTROL: u64 = 3;
/// GGUF token type of user-defined tokens (added, matched verbatim).
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// The tokenizer cannot be built, or text/ids cannot be converted.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: tokenizer {what} {value:?} is not supported")]
    Unsupported {
        path: String,
        what: &'static str,
        value: String,
    },
    #[error("{path}: tokenizer metadata: {reason}")]
    Invalid { path: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("token id {id} is not in the vocabulary (size {vocab})")]
    UnknownId { id: u32, vocab: usize },
}

/// A byte-level BPE tokenizer with its special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    special: Vec<bool>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let path = file.path().to_string();
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported {
                path,
                what: "model",
                value: model.to_string(),
            });
        }
        let pre = file.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match pre {
            // SmolLM2's tokenizer.json: single digits, then GPT-2's regex.
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
            "default" | "gpt2" => byte_level.clone(),
            other => {
                return Err(TokenizerError::Unsupported {
                    path,
                    what: "pre-tokenizer",
                    value: other.to_string(),
                });
            }
        };
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let merges = file.get_str_array("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match file.get_array("tokenizer.ggml.token_type") {
            Ok(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            Err(_) => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::Invalid {
                path,
                reason: format!("{} token types for {} tokens", types.len(), tokens.len()),
            });
        }
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let mut special = vec![false; tokens.len()];
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, ty))| **ty == TOKEN_TYPE_CONTROL || **ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(i, (t, ty))| {
                let is_special = *ty == TOKEN_TYPE_CONTROL;
                special[i] = is_special;
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": is_special})
            })
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true,
                "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        });
        let inner =
            tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| {
                TokenizerError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
        let id = |key: &str| {
            file.get(key)
                .ok()
                .and_then(MetaValue::as_u64)
                .filter(|&i| (i as usize) < tokens.len())
                .map(|i| i as u32)
        };
        Ok(Self {
            inner,
            vocab: tokens.len(),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: matches!(
                file.get("tokenizer.ggml.add_bos_token"),
                Ok(MetaValue::Bool(true))
            ),
            special,
            chat_template: file
                .get_str("tokenizer.chat_template")
                .ok()
                .map(str::to_string),
        })
    }

    /// Encodes `text`; special tokens written in it (`<|im_start|>`) become
    /// their ids. No BOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids`; with `skip_special`, control tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(TokenizerError::UnknownId {
                id,
                vocab: self.vocab,
            });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model expects BOS before a raw (non-chat) prompt
    /// (`tokenizer.ggml.add_bos_token`; false for SmolLM2). [`Tokenizer::encode`]
    /// never adds it: chat templates usually write it themselves.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// Whether `id` is a control token (`<|im_end|>`, …).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The text of one token as stored (byte-level symbols, not decoded).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes one token stands for (byte-level symbols mapped back to
    /// bytes; a control token's own text): what OpenAI's logprobs report
    /// as `bytes`. `None` for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let text = self.inner.id_to_token(id)?;
        let mut bytes = Vec::with_capacity(text.len());
        for c in text.chars() {
            match byte_of_symbol(c) {
                Some(b) => bytes.push(b),
                // Not a byte-level symbol (an added token's own text).
                None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        Some(bytes)
    }

    /// The `tokenizer.chat_template` Jinja source, if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}

/// The byte GPT-2's byte-level alphabet writes as `c`: printable Latin-1
/// bytes stand for themselves, the other 68 bytes for U+0100.. in order.
fn byte_of_symbol(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let code = c as u32;
    if code < 256 && printable(code) {
        return u8::try_from(code).ok();
    }
    let index = code.checked_sub(256)? as usize;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(index)
        .and_then(|b| u8::try_from(b).ok())
}

/// Incremental detokenization for streaming: feed ids one at a time, get the
/// text they complete. Text is only emitted once it forms whole UTF-8
/// characters, and a token's leading space is kept (decoding the ids one by
/// one would lose context).
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
    skip_special: bool,
}

impl StreamDecoder {
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            ..Self::default()
        }
    }

    /// Adds `id`; returns the newly completed text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = tok.decode(&self.ids[self.prefix..], self.skip_special)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let text = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(text))
        } else {
            Ok(None)
        }
    }

    /// Text held back because it did not (yet) form whole characters; call
    /// when the sequence ends. Incomplete bytes come out as U+FFFD.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>, TokenizerError> {
        let before = tok.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = tok.decode(&self.ids[self.prefix..], self.skip_special)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now
            .strip_prefix(&before)
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }
}
