//! Constrained decoding: a JSON schema compiled by llguidance into a
//! grammar whose token mask the sampler applies before it picks a token
//! (structured output, forced tool calls).
//!
//! [`GrammarCompiler`] is built once per engine from the model's tokenizer
//! (each token's bytes, the EOS id) and compiles schemas, at most once per
//! distinct schema text while it stays in a small cache. [`Grammar`] is one
//! sequence's parse state: the mask of tokens that keep the output valid,
//! advanced with each accepted token. Not here: reading `response_format` or
//! `tools` (the frontend turns both into a schema) and the sampling itself.
//!
//! The trie is built from our own tokenizer rather than through
//! `toktrie_hf_tokenizers`, which would pull a second `tokenizers` version
//! into the build and wants a `tokenizer.json` that a GGUF does not have.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory, TokenParser};

use super::block_pool::TokenId;
use super::tokenizer::Tokenizer;
use crate::sync::lock;

/// Distinct schemas whose compiled grammar an engine keeps; the least
/// recently used goes first.
pub const GRAMMAR_CACHE_ENTRIES: usize = 64;

/// The JSON layout forced on output unless a schema says otherwise
/// (llguidance's `x-guidance`): one space after `,` and `:`, no other
/// whitespace. Flexible whitespace lets a small model emit newlines
/// forever; this keeps the output compact and close to OpenAI's.
fn default_layout() -> serde_json::Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// Why a grammar could not be built or followed. The message is meant for
/// the user (an HTTP 400 when the schema is at fault).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    /// The schema is not JSON, or llguidance cannot compile it.
    #[error("the JSON schema cannot be used for constrained decoding: {0}")]
    Schema(String),
    /// The model has no tokenizer or no EOS token to build a grammar on.
    #[error("structured output needs the model's tokenizer and EOS token: {0}")]
    Unsupported(String),
    /// The parser failed while decoding (an llguidance fault).
    #[error("constrained decoding failed: {0}")]
    Decoding(String),
}

/// Compiles JSON schemas into grammars over one tokenizer's vocabulary.
pub struct GrammarCompiler {
    /// Each token's bytes (special tokens marked as toktrie wants them)
    /// and the trie's token info, kept until the factory is first needed.
    words: Vec<Vec<u8>>,
    info: TokRxInfo,
    /// Built on first use: it indexes the whole vocabulary (tens of ms),
    /// which engines that never see a schema need not pay.
    factory: OnceLock<Result<ParserFactory, String>>,
    cache: Mutex<SchemaCache>,
    /// Schemas compiled (cache misses) since start.
    compilations: AtomicU64,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab", &self.words.len())
            .finish_non_exhaustive()
    }
}

/// Compiled grammars by schema text, least recently used evicted first.
#[derive(Default)]
struct SchemaCache {
    entries: HashMap<u64, CacheEntry>,
    clock: u64,
}

struct CacheEntry {
    /// The full text, so that two schemas with one hash are told apart.
    schema: String,
    parser: TokenParser,
    used: u64,
}

fn schema_hash(schema: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    schema.hash(&mut hasher);
    hasher.finish()
}

impl GrammarCompiler {
    /// A compiler over `tokenizer`'s vocabulary; `vocab` is the model's
    /// (the logits' length), which may exceed the tokenizer's.
    pub fn new(tokenizer: &Tokenizer, vocab: usize) -> Result<Self, GrammarError> {
        let eos = tokenizer
            .eos_token_id()
            .ok_or_else(|| GrammarError::Unsupported("the tokenizer has no EOS token".into()))?;
        let vocab = vocab.max(tokenizer.vocab_size());
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| match tokenizer.token_bytes(id) {
                Some(bytes) if tokenizer.is_special(id) => {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(&bytes);
                    marked
                }
                Some(bytes) => bytes,
                // Ids the model has and the tokenizer lacks: never output.
                None => Vec::new(),
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, eos);
        Ok(GrammarCompiler {
            words,
            info,
            factory: OnceLock::new(),
            cache: Mutex::new(SchemaCache::default()),
            compilations: AtomicU64::new(0),
        })
    }

    fn factory(&self) -> Result<&ParserFactory, GrammarError> {
        self.factory
            .get_or_init(|| {
                let trie = TokTrie::from(&self.info, &self.words);
                let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                // Warnings go to our log through errors, not to stderr.
                factory.quiet();
                Ok(factory)
            })
            .as_ref()
            .map_err(|e| GrammarError::Unsupported(e.clone()))
    }

    /// The grammar of `schema` (a JSON schema's text), ready for one
    /// sequence. Compiled on the first request for that text, then taken
    /// from the cache.
    pub fn compile(&self, schema: &str) -> Result<Grammar, GrammarError> {
        let key = schema_hash(schema);
        {
            let mut cache = lock(&self.cache);
            cache.clock += 1;
            let now = cache.clock;
            if let Some(entry) = cache.entries.get_mut(&key)
                && entry.schema == schema
            {
                entry.used = now;
                return Ok(Grammar::new(entry.parser.clone()));
            }
        }
        let parser = self.compile_uncached(schema)?;
        self.compilations.fetch_add(1, Ordering::Relaxed);
        let mut cache = lock(&self.cache);
        if cache.entries.len() >= GRAMMAR_CACHE_ENTRIES
            && let Some(oldest) = cache
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(&k, _)| k)
        {
            cache.entries.remove(&oldest);
        }
        let used = cache.clock;
        cache.entries.insert(
            key,
            CacheEntry {
                schema: schema.to_string(),
                parser: parser.clone(),
                used,
            },
        );
        Ok(Grammar::new(parser))
    }

    /// How many schemas were compiled rather than taken from the cache.
    pub fn compilations(&self) -> u64 {
        self.compilations.load(Ordering::Relaxed)
    }

    /// How many compiled schemas the cache holds.
    pub fn cached(&self) -> usize {
        lock(&self.cache).entries.len()
    }

    fn compile_uncached(&self, schema: &str) -> Result<TokenParser, GrammarError> {
        let mut value: serde_json::Value =
            serde_json::from_str(schema).map_err(|e| GrammarError::Schema(e.to_string()))?;
        let Some(object) = value.as_object_mut() else {
            return Err(GrammarError::Schema(format!(
                "a schema is a JSON object, got {schema}"
            )));
        };
        object.entry("x-guidance").or_insert_with(default_layout);
        self.factory()?
            .create_parser(TopLevelGrammar::from_json_schema(value))
            .map_err(|e| GrammarError::Schema(e.to_string()))
    }
}

/// One sequence's place in its grammar.
pub struct Grammar {
    matcher: Matcher,
    /// Time spent computing masks, and how many, for the mask cost.
    mask_time: Duration,
    masks: u32,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("masks", &self.masks)
            .field("mask_time", &self.mask_time)
            .finish_non_exhaustive()
    }
}

impl Grammar {
    fn new(parser: TokenParser) -> Self {
        Grammar {
            matcher: Matcher::new(Ok(parser)),
            mask_time: Duration::ZERO,
            masks: 0,
        }
    }

    /// Set the logits of every token the grammar does not allow next to
    /// `-inf` (EOS is allowed only where the output may end).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let started = Instant::now();
        let allowed = self
            .matcher
            .compute_mask()
            .map_err(|e| GrammarError::Decoding(e.to_string()))?;
        let known = allowed.len();
        for (token, logit) in logits.iter_mut().enumerate() {
            if token >= known || !allowed.is_allowed(token as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        self.mask_time += started.elapsed();
        self.masks += 1;
        Ok(())
    }

    /// Advance past `token`, which the sampler chose.
    pub fn accept(&mut self, token: TokenId) -> Result<(), GrammarError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Decoding(e.to_string()))
    }

    /// Whether the output is complete: nothing more may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Mean time one mask took so far (zero before the first).
    pub fn mean_mask_time(&self) -> Duration {
        self.mask_time
            .checked_div(self.masks)
            .unwrap_or(Duration::ZERO)
    }
}
