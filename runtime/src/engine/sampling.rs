//! Token selection and stop conditions for one sequence: the user's sampling
//! parameters (validated into errors fit for an HTTP 400 body), greedy or
//! temperature / top-k / top-p sampling with a seeded generator, and the
//! decision to stop (stop tokens, EOS, `max_tokens`, stop strings matched on
//! the detokenized text as it grows).
//!
//! It is not the detokenizer (the tokenizer's incremental decoder hands over
//! each token's text), not the forward pass that produces logits, and not a
//! batch scheduler: one [`Sampler`] serves one sequence. Penalties
//! (repetition, presence, frequency) are not implemented yet.
//!
//! Log-probabilities ([`token_logprobs`]) are those of the model's own
//! distribution: the log-softmax of the raw logits, before temperature,
//! top-k and top-p (vLLM's default), computed only for requests that ask.
//!
//! A request with a JSON schema gets a [`Grammar`]: its mask sets the
//! logits of tokens the schema does not allow to `-inf` before anything
//! else (greedy pick, temperature, top-k, top-p), and each accepted token
//! advances it. Log-probabilities stay those of the unmasked distribution.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::block_pool::TokenId;
use super::grammar::Grammar;
/// Why generation ended; a wire type (it is streamed back to frontends).
pub use xpyd_api::FinishReason;

/// What the user asked for, in OpenAI's vocabulary (plus vLLM's `top_k`,
/// `min_tokens` and `ignore_eos`). Call [`SamplingParams::validate`] (or
/// build a [`Sampler`], which does) before trusting the values. Not a wire
/// type: on the bus it travels as `xpyd_api::WireSamplingParams`.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token; higher flattens the distribution.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` keeps all.
    pub top_k: Option<u32>,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p`.
    pub top_p: f32,
    /// Same seed, same logits ⇒ same tokens. `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// Most tokens to generate; `None` leaves the limit to the context window
    /// (enforced by the scheduler, which also reports `length` then).
    pub max_tokens: Option<u32>,
    /// EOS and stop tokens are not sampled, and stop strings not matched,
    /// before this many tokens have been generated.
    pub min_tokens: u32,
    /// Token ids that end generation (not included in the output).
    pub stop_token_ids: Vec<TokenId>,
    /// Keep generating past the model's EOS token.
    pub ignore_eos: bool,
    /// Strings that end generation when they appear in the output text; the
    /// returned text stops just before the match.
    pub stop: Vec<String>,
    /// Return each sampled token's log-probability and this many most
    /// likely alternatives (at most [`MAX_TOP_LOGPROBS`]); `None` computes
    /// nothing.
    pub logprobs: Option<u32>,
    /// The output must be JSON matching this JSON schema (its text): each
    /// token is drawn only from those the schema's grammar allows, and the
    /// sequence stops when the JSON is complete. `None` constrains nothing.
    pub json_schema: Option<String>,
}

/// Most alternatives a request may ask log-probabilities for (OpenAI's
/// limit for chat `top_logprobs`).
pub const MAX_TOP_LOGPROBS: u32 = 20;

impl Default for SamplingParams {
    /// OpenAI's defaults: temperature 1, no top-k, top-p 1, no limits.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            seed: None,
            max_tokens: None,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            stop: Vec::new(),
            logprobs: None,
            json_schema: None,
        }
    }
}

/// A sampling parameter the engine cannot honour. The message names the
/// field and is meant to reach the user unchanged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingParamsError {
    #[error("temperature must be between 0 and 2, got {0}")]
    Temperature(f32),
    #[error("top_p must be greater than 0 and at most 1, got {0}")]
    TopP(f32),
    #[error("top_k must be at least 1 (omit it to consider every token), got 0")]
    TopKZero,
    #[error("max_tokens must be at least 1, got 0")]
    MaxTokensZero,
    #[error("min_tokens ({min_tokens}) must not be greater than max_tokens ({max_tokens})")]
    MinTokensAboveMax { min_tokens: u32, max_tokens: u32 },
    #[error("stop strings must not be empty, but stop[{0}] is \"\"")]
    EmptyStop(usize),
    #[error("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {0}")]
    TopLogprobs(u32),
}

impl SamplingParamsError {
    /// The request field at fault, for the `param` of an OpenAI error body.
    pub fn param(&self) -> &'static str {
        match self {
            SamplingParamsError::Temperature(_) => "temperature",
            SamplingParamsError::TopP(_) => "top_p",
            SamplingParamsError::TopKZero => "top_k",
            SamplingParamsError::MaxTokensZero => "max_tokens",
            SamplingParamsError::MinTokensAboveMax { .. } => "min_tokens",
            SamplingParamsError::EmptyStop(_) => "stop",
            SamplingParamsError::TopLogprobs(_) => "top_logprobs",
        }
    }
}

impl SamplingParams {
    /// The parameters of choice `index` of a request with several (`n`):
    /// each its own random stream. With a seed, choice `index` draws from a
    /// seed derived from it and `index`, so every choice is reproducible;
    /// choice 0 keeps the seed itself (as with `n` = 1).
    pub fn for_choice(&self, index: u32) -> SamplingParams {
        // Multiplying by an odd constant (2^64 / golden ratio) maps distinct
        // indices to distinct, well spread offsets.
        const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;
        SamplingParams {
            seed: self
                .seed
                .map(|seed| seed ^ u64::from(index).wrapping_mul(SPREAD)),
            ..self.clone()
        }
    }

    /// Check every field; the first fault found is returned.
    pub fn validate(&self) -> Result<(), SamplingParamsError> {
        // Written as negated ranges so that NaN is rejected too.
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(SamplingParamsError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingParamsError::TopP(self.top_p));
        }
        if self.top_k == Some(0) {
            return Err(SamplingParamsError::TopKZero);
        }
        if let Some(max_tokens) = self.max_tokens {
            if max_tokens == 0 {
                return Err(SamplingParamsError::MaxTokensZero);
            }
            if self.min_tokens > max_tokens {
                return Err(SamplingParamsError::MinTokensAboveMax {
                    min_tokens: self.min_tokens,
                    max_tokens,
                });
            }
        }
        if let Some(index) = self.stop.iter().position(String::is_empty) {
            return Err(SamplingParamsError::EmptyStop(index));
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(SamplingParamsError::TopLogprobs(n));
        }
        Ok(())
    }
}

/// The outcome of accepting one token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    /// Text that is now safe to send to the user (may be empty while a
    /// possible stop string is held back).
    pub text: String,
    /// Set when this token ended generation; no more tokens should follow.
    pub finish: Option<FinishReason>,
}

/// Sampling and stop state of one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    /// Tokens that end generation (stop ids, and EOS unless ignored); the
    /// ones `min_tokens` keeps from being sampled.
    ending_token_ids: Vec<TokenId>,
    rng: StdRng,
    generated: u32,
    stop_text: StopText,
    finished: Option<FinishReason>,
    /// The schema's grammar, for requests with one.
    grammar: Option<Grammar>,
    /// The masked logits of the last step (reused to spare an allocation).
    masked: Vec<f32>,
}

impl Sampler {
    /// A sampler for one sequence of a model whose end-of-sequence tokens are
    /// `eos_token_ids`.
    pub fn new(
        params: SamplingParams,
        eos_token_ids: &[TokenId],
    ) -> Result<Self, SamplingParamsError> {
        params.validate()?;
        let mut ending_token_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            ending_token_ids.extend_from_slice(eos_token_ids);
        }
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        Ok(Sampler {
            stop_text: StopText::new(params.stop.clone()),
            params,
            ending_token_ids,
            rng,
            generated: 0,
            finished: None,
            grammar: None,
            masked: Vec::new(),
        })
    }

    /// Constrain this sequence's tokens to `grammar` (compiled from the
    /// params' `json_schema`).
    pub fn with_grammar(mut self, grammar: Grammar) -> Self {
        self.grammar = Some(grammar);
        self
    }

    /// The sequence's grammar, if it has one.
    pub fn grammar(&self) -> Option<&Grammar> {
        self.grammar.as_ref()
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Tokens accepted so far.
    pub fn num_generated(&self) -> u32 {
        self.generated
    }

    /// Set once a token ended generation.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Pick the next token from the model's `logits` (one per vocabulary
    /// entry). Greedy when temperature is 0 (ties go to the lowest id);
    /// otherwise temperature, then top-k, then top-p, then a draw.
    pub fn sample(&mut self, logits: &[f32]) -> TokenId {
        let Some(grammar) = &mut self.grammar else {
            return self.sample_unmasked(logits);
        };
        let mut masked = std::mem::take(&mut self.masked);
        masked.clear();
        masked.extend_from_slice(logits);
        let token = match grammar.mask(&mut masked) {
            Ok(()) => self.sample_unmasked(&masked),
            Err(e) => {
                // `accept` ends the sequence when the grammar cannot go on.
                tracing::error!(error = %e, "no grammar mask; sampling unconstrained");
                self.sample_unmasked(logits)
            }
        };
        self.masked = masked;
        token
    }

    fn sample_unmasked(&mut self, logits: &[f32]) -> TokenId {
        let suppressed: &[TokenId] = if self.generated < self.params.min_tokens {
            &self.ending_token_ids
        } else {
            &[]
        };
        if self.params.temperature == 0.0 || self.params.top_k == Some(1) {
            return greedy(logits, suppressed);
        }
        let kept = candidates(logits, suppressed, &self.params);
        let mass: f64 = kept.iter().map(|c| c.probability).sum();
        if kept.is_empty() || mass.is_nan() || mass <= 0.0 {
            // Every logit was masked or not finite: the model is broken, but
            // a token is still owed; greedy is the least surprising answer.
            return greedy(logits, suppressed);
        }
        let mut draw = self.rng.random::<f64>() * mass;
        for candidate in &kept {
            draw -= candidate.probability;
            if draw < 0.0 {
                return candidate.token;
            }
        }
        // Rounding left `draw` a hair above zero: the last candidate it is.
        kept[kept.len() - 1].token
    }

    /// Record the token chosen for this sequence and its detokenized `text`
    /// (the incremental decoder's delta), and decide whether to stop.
    pub fn accept(&mut self, token: TokenId, text: &str) -> Step {
        if let Some(reason) = self.finished {
            return Step {
                text: String::new(),
                finish: Some(reason),
            };
        }
        self.generated += 1;
        let may_stop = self.generated > self.params.min_tokens;

        if may_stop && self.ending_token_ids.contains(&token) {
            // The stop token's own text is not output, but text held back as
            // a possible stop string is: it turned out not to be one.
            let held = self.stop_text.flush();
            return self.finish(held, FinishReason::Stop);
        }
        let (mut released, matched) = if may_stop {
            self.stop_text.push(text)
        } else {
            (self.stop_text.push_unmatched(text), false)
        };
        if matched {
            return self.finish(released, FinishReason::Stop);
        }
        if let Some(grammar) = &mut self.grammar {
            let advanced = grammar.accept(token);
            if let Err(e) = &advanced {
                tracing::error!(error = %e, token, "the grammar refused a token; stopping");
            }
            if advanced.is_err() || grammar.is_finished() {
                // The JSON is complete: nothing may follow it.
                released.push_str(&self.stop_text.flush());
                return self.finish(released, FinishReason::Stop);
            }
        }
        if self
            .params
            .max_tokens
            .is_some_and(|max| self.generated >= max)
        {
            released.push_str(&self.stop_text.flush());
            return self.finish(released, FinishReason::Length);
        }
        Step {
            text: released,
            finish: None,
        }
    }

    /// The scheduler ends the sequence for length (the context window is
    /// full): release the held-back text and finish with `length`. Returns
    /// empty text and the earlier reason if the sequence had already finished.
    pub fn finish_for_length(&mut self) -> Step {
        if let Some(reason) = self.finished {
            return Step {
                text: String::new(),
                finish: Some(reason),
            };
        }
        let held = self.stop_text.flush();
        self.finish(held, FinishReason::Length)
    }

    fn finish(&mut self, text: String, reason: FinishReason) -> Step {
        self.finished = Some(reason);
        Step {
            text,
            finish: Some(reason),
        }
    }
}

/// The log-probabilities of one sampled token: its own and those of the
/// most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: TokenId,
    pub logprob: f32,
    /// Most likely first (ties: lowest id); as many as the request asked.
    pub top: Vec<(TokenId, f32)>,
}

/// `token`'s log-probability under `logits` and the `top_n` most likely
/// tokens': the log-softmax of the raw logits (no temperature, top-k or
/// top-p), in f64. A NaN logit counts as impossible (`-inf`).
pub fn token_logprobs(logits: &[f32], token: TokenId, top_n: usize) -> TokenLogprobs {
    let finite = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let max = logits
        .iter()
        .map(|&l| finite(l))
        .fold(f32::NEG_INFINITY, f32::max);
    let max = f64::from(max);
    let sum: f64 = logits
        .iter()
        .map(|&l| (f64::from(finite(l)) - max).exp())
        .sum();
    let log_total = max + sum.ln();
    let logprob_of = |t: TokenId| {
        logits.get(t as usize).map_or(f32::NEG_INFINITY, |&l| {
            (f64::from(finite(l)) - log_total) as f32
        })
    };
    let mut top: Vec<(TokenId, f32)> = (0..).zip(logits.iter().map(|&l| finite(l))).collect();
    let order = |a: &(TokenId, f32), b: &(TokenId, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let top_n = top_n.min(top.len());
    if top_n > 0 && top_n < top.len() {
        top.select_nth_unstable_by(top_n - 1, order);
    }
    top.truncate(top_n);
    top.sort_unstable_by(order);
    TokenLogprobs {
        token,
        logprob: logprob_of(token),
        top: top.into_iter().map(|(t, _)| (t, logprob_of(t))).collect(),
    }
}

/// One token still in the running after temperature, top-k and top-p.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    token: TokenId,
    /// Probability after temperature and top-k (before top-p truncation, so
    /// the kept set's mass is visible).
    probability: f64,
}

/// Highest logit not in `suppressed` (NaN ignored), lowest id on ties;
/// token 0 when there is none.
fn greedy(logits: &[f32], suppressed: &[TokenId]) -> TokenId {
    let mut best: Option<(TokenId, f32)> = None;
    for (token, &logit) in (0..).zip(logits) {
        if logit.is_nan() || suppressed.contains(&token) {
            continue;
        }
        // Strictly greater keeps the first (lowest) id among equals.
        if best.is_none_or(|(_, b)| logit > b) {
            best = Some((token, logit));
        }
    }
    best.map_or(0, |(token, _)| token)
}

/// The tokens sampling may draw from with their probabilities; most likely
/// first (ties: lowest id) when top-p applies, in vocabulary order otherwise.
fn candidates(logits: &[f32], suppressed: &[TokenId], params: &SamplingParams) -> Vec<Candidate> {
    let mut kept: Vec<(TokenId, f32)> = (0..)
        .zip(logits.iter().copied())
        .filter(|(token, logit)| logit.is_finite() && !suppressed.contains(token))
        .collect();
    let order = |a: &(TokenId, f32), b: &(TokenId, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if let Some(k) = params.top_k.map(|k| k as usize)
        && k > 0
        && k < kept.len()
    {
        kept.select_nth_unstable_by(k - 1, order);
        kept.truncate(k);
    }
    // Only top-p needs the order; skipping the sort of a whole vocabulary
    // otherwise saves most of the cost of a plain temperature draw.
    if params.top_p < 1.0 {
        kept.sort_unstable_by(order);
    }
    let Some(max_logit) = kept.iter().map(|&(_, logit)| logit).reduce(f32::max) else {
        return Vec::new();
    };
    let inverse_temperature = 1.0 / f64::from(params.temperature);
    let mut out: Vec<Candidate> = kept
        .iter()
        .map(|&(token, logit)| Candidate {
            token,
            // Subtracting the max keeps exp() from overflowing.
            probability: ((f64::from(logit) - f64::from(max_logit)) * inverse_temperature).exp(),
        })
        .collect();
    let total: f64 = out.iter().map(|c| c.probability).sum();
    for candidate in &mut out {
        candidate.probability /= total;
    }
    if params.top_p < 1.0 {
        let top_p = f64::from(params.top_p);
        let mut mass = 0.0;
        // Logits and top_p arrive as f32 (about 7 significant digits): a
        // mass within 1e-6 of top_p counts as reaching it, so that 0.5 + 0.3
        // reaches 0.8 as the user meant.
        let keep = out
            .iter()
            .position(|c| {
                mass += c.probability;
                mass >= top_p - 1e-6
            })
            .map_or(out.len(), |last| last + 1);
        out.truncate(keep);
    }
    out
}

/// Stop strings matched on text that arrives a token at a time. Text that
/// could be the start of a stop string is held back until the next tokens
/// show whether it is one.
#[derive(Debug)]
struct StopText {
    stops: Vec<String>,
    held: String,
}

impl StopText {
    fn new(stops: Vec<String>) -> Self {
        StopText {
            stops,
            held: String::new(),
        }
    }

    /// Add `delta`; returns the text now safe to release and whether a stop
    /// string matched (then the released text ends just before it).
    fn push(&mut self, delta: &str) -> (String, bool) {
        self.held.push_str(delta);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.held), false);
        }
        // Everything before `held` was checked to contain neither a stop
        // string nor the start of one, so any match lies within `held`.
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = earliest {
            self.held.truncate(at);
            return (std::mem::take(&mut self.held), true);
        }
        let hold_from = self
            .held
            .char_indices()
            .map(|(at, _)| at)
            .find(|&at| {
                let suffix = &self.held[at..];
                self.stops.iter().any(|stop| stop.starts_with(suffix))
            })
            .unwrap_or(self.held.len());
        let released = self.held[..hold_from].to_string();
        self.held.drain(..hold_from);
        (released, false)
    }

    /// Add `delta` without matching (before `min_tokens`): everything goes out.
    fn push_unmatched(&mut self, delta: &str) -> String {
        self.held.push_str(delta);
        std::mem::take(&mut self.held)
    }

    /// Generation ended for another reason: release what was held.
    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: TokenId = 2;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params, &[EOS]).expect("valid params")
    }

    /// Logits whose softmax is `probabilities`.
    fn logits_of(probabilities: &[f64]) -> Vec<f32> {
        probabilities.iter().map(|p| p.ln() as f32).collect()
    }

    fn frequencies(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn invalid_params_name_the_field() {
        let cases = [
            (
                SamplingParams {
                    temperature: -0.1,
                    ..params()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: 2.5,
                    ..params()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..params()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..params()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..params()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..params()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    max_tokens: Some(0),
                    ..params()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    max_tokens: Some(3),
                    min_tokens: 4,
                    ..params()
                },
                "min_tokens",
            ),
            (
                SamplingParams {
                    stop: vec!["ok".into(), String::new()],
                    ..params()
                },
                "stop",
            ),
        ];
        for (params, field) in cases {
            let error = Sampler::new(params.clone(), &[EOS]).expect_err("invalid");
            assert_eq!(error.param(), field, "{params:?}");
            assert!(error.to_string().contains(field), "{error}");
        }
        assert_eq!(
            SamplingParams {
                temperature: 3.0,
                ..params()
            }
            .validate()
            .map_err(|e| e.to_string()),
            Err("temperature must be between 0 and 2, got 3".to_string())
        );
        assert!(params().validate().is_ok());
    }

    #[test]
    fn params_deserialize_with_defaults() {
        // As they arrive from the bus: missing fields take the defaults.
        let parsed: SamplingParams = serde_json::from_str::<xpyd_api::WireSamplingParams>(
            r#"{"temperature":0.5,"stop":["\n"]}"#,
        )
        .expect("json")
        .into();
        assert_eq!(
            parsed,
            SamplingParams {
                temperature: 0.5,
                stop: vec!["\n".into()],
                ..params()
            }
        );
        assert_eq!(
            serde_json::to_string(&FinishReason::Length).expect("json"),
            r#""length""#
        );
    }

    #[test]
    fn greedy_takes_argmax_and_lowest_id_on_ties() {
        let mut greedy = sampler(SamplingParams {
            temperature: 0.0,
            ..params()
        });
        let logits = [0.1, 3.0, -1.0, 3.0, f32::NAN];
        for _ in 0..5 {
            assert_eq!(greedy.sample(&logits), 1);
        }
    }

    #[test]
    fn same_seed_gives_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = sampler(SamplingParams {
                seed: Some(seed),
                ..params()
            });
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut top1 = sampler(SamplingParams {
            top_k: Some(1),
            temperature: 1.5,
            seed: Some(3),
            ..params()
        });
        for shift in 0..20 {
            let logits: Vec<f32> = (0..50).map(|i| ((i * 13 + shift) % 17) as f32).collect();
            assert_eq!(top1.sample(&logits), greedy(&logits, &[]));
        }
    }

    #[test]
    fn top_k_limits_the_draw_to_the_k_most_likely() {
        let logits = logits_of(&[0.1, 0.4, 0.2, 0.3]);
        let mut s = sampler(SamplingParams {
            top_k: Some(2),
            seed: Some(11),
            ..params()
        });
        let freq = frequencies(&mut s, &logits, 2000);
        assert_eq!(freq[0] + freq[2], 0.0);
        assert!((freq[1] - 4.0 / 7.0).abs() < 0.05, "{freq:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let logits = logits_of(&[0.15, 0.5, 0.05, 0.3]);
        let kept = |top_p| -> Vec<TokenId> {
            let p = SamplingParams { top_p, ..params() };
            candidates(&logits, &[], &p)
                .iter()
                .map(|c| c.token)
                .collect()
        };
        assert_eq!(kept(0.5), vec![1]);
        assert_eq!(kept(0.8), vec![1, 3]);
        assert_eq!(kept(0.81), vec![1, 3, 0]);
        assert_eq!(kept(1.0), vec![0, 1, 2, 3]);

        let mut s = sampler(SamplingParams {
            top_p: 0.8,
            seed: Some(5),
            ..params()
        });
        let freq = frequencies(&mut s, &logits, 2000);
        assert_eq!(freq[0] + freq[2], 0.0, "{freq:?}");
        assert!((freq[1] - 0.5 / 0.8).abs() < 0.05, "{freq:?}");
    }

    #[test]
    fn lower_temperature_sharpens_the_distribution() {
        let probabilities = [0.5, 0.3, 0.2];
        let logits = logits_of(&probabilities);
        let expected_top = |t: f64| {
            let weights: Vec<f64> = probabilities
                .iter()
                .map(|p: &f64| p.powf(1.0 / t))
                .collect();
            weights[0] / weights.iter().sum::<f64>()
        };
        let observed_top = |temperature: f32| {
            let mut s = sampler(SamplingParams {
                temperature,
                seed: Some(1234),
                ..params()
            });
            frequencies(&mut s, &logits, 4000)[0]
        };
        let (cold, neutral, hot) = (observed_top(0.5), observed_top(1.0), observed_top(1.8));
        assert!(cold > neutral && neutral > hot, "{cold} {neutral} {hot}");
        assert!((cold - expected_top(0.5)).abs() < 0.04, "{cold}");
        assert!((neutral - 0.5).abs() < 0.04, "{neutral}");
        assert!((hot - expected_top(1.8)).abs() < 0.04, "{hot}");
    }

    #[test]
    fn min_tokens_holds_off_eos_then_eos_stops() {
        let mut s = sampler(SamplingParams {
            temperature: 0.0,
            min_tokens: 2,
            ..params()
        });
        let logits = [0.0, 1.0, 5.0, 2.0];
        for _ in 0..2 {
            let token = s.sample(&logits);
            assert_eq!(token, 3, "EOS is suppressed before min_tokens");
            assert_eq!(s.accept(token, "x").finish, None);
        }
        let token = s.sample(&logits);
        assert_eq!(token, EOS);
        assert_eq!(
            s.accept(token, "</s>"),
            Step {
                text: String::new(),
                finish: Some(FinishReason::Stop)
            }
        );
        assert_eq!(s.finish_reason(), Some(FinishReason::Stop));
    }

    #[test]
    fn ignore_eos_and_stop_token_ids() {
        let mut s = sampler(SamplingParams {
            ignore_eos: true,
            stop_token_ids: vec![9],
            ..params()
        });
        assert_eq!(s.accept(EOS, "").finish, None);
        assert_eq!(s.accept(5, "a").text, "a");
        assert_eq!(s.accept(9, "<stop>").finish, Some(FinishReason::Stop));
    }

    #[test]
    fn max_tokens_finishes_with_length() {
        let mut s = sampler(SamplingParams {
            max_tokens: Some(2),
            stop: vec!["END".into()],
            ..params()
        });
        assert_eq!(s.accept(5, "a").finish, None);
        let mut at_context_limit = sampler(SamplingParams {
            stop: vec!["END".into()],
            ..params()
        });
        assert_eq!(at_context_limit.accept(5, "xEN").text, "x");
        assert_eq!(
            at_context_limit.finish_for_length(),
            Step {
                text: "EN".into(),
                finish: Some(FinishReason::Length)
            }
        );
        assert_eq!(
            s.accept(6, "E"),
            Step {
                text: "E".into(),
                finish: Some(FinishReason::Length)
            },
            "held-back text is released at the end"
        );
    }

    #[test]
    fn stop_string_spanning_tokens_is_cut_from_the_output() {
        let mut s = sampler(SamplingParams {
            stop: vec!["</end>".into(), "STOP".into()],
            ..params()
        });
        let deltas = ["Hello <", "/en", "d> trailing"];
        let steps: Vec<Step> = deltas.iter().map(|d| s.accept(5, d)).collect();
        assert_eq!(steps[0].text, "Hello ");
        assert_eq!(steps[1].text, "");
        assert_eq!(
            steps[2],
            Step {
                text: String::new(),
                finish: Some(FinishReason::Stop)
            }
        );

        let mut s = sampler(SamplingParams {
            stop: vec!["STOP".into()],
            ..params()
        });
        assert_eq!(s.accept(5, "abST").text, "ab");
        assert_eq!(
            s.accept(5, "OP now"),
            Step {
                text: String::new(),
                finish: Some(FinishReason::Stop)
            }
        );
        assert_eq!(s.accept(5, "more").finish, Some(FinishReason::Stop));
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        let mut s = sampler(SamplingParams {
            stop: vec!["</end>".into(), "é!".into()],
            ..params()
        });
        assert_eq!(s.accept(5, "a </e").text, "a ");
        assert_eq!(s.accept(5, "m>").text, "</em>");
        assert_eq!(
            s.accept(5, "café").text,
            "caf",
            "held back on a char boundary"
        );
        assert_eq!(s.accept(5, "?").text, "é?");
        assert_eq!(s.accept(5, "x é!").text, "x ");
        assert_eq!(s.finish_reason(), Some(FinishReason::Stop));
    }

    #[test]
    fn stop_strings_wait_for_min_tokens() {
        let mut s = sampler(SamplingParams {
            stop: vec!["."].into_iter().map(String::from).collect(),
            min_tokens: 1,
            ..params()
        });
        assert_eq!(
            s.accept(5, "a."),
            Step {
                text: "a.".into(),
                finish: None
            }
        );
        assert_eq!(s.accept(5, "b.c").text, "b");
        assert_eq!(s.finish_reason(), Some(FinishReason::Stop));
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_raw_logits() {
        let logits = [1.0f32, 3.0, -2.0, 0.5, 3.0, f32::NAN];
        let total: f64 = logits
            .iter()
            .filter(|l| !l.is_nan())
            .map(|&l| f64::from(l).exp())
            .sum();
        let expected = |t: usize| (f64::from(logits[t]) - total.ln()) as f32;
        let lp = token_logprobs(&logits, 3, 0);
        assert!((lp.logprob - expected(3)).abs() < 1e-6, "{lp:?}");
        assert!(lp.top.is_empty(), "top 0 asks for none");
        assert_eq!(token_logprobs(&logits, 5, 0).logprob, f32::NEG_INFINITY);

        // Temperature does not change them: they describe the model.
        let lp = token_logprobs(&logits, 0, 3);
        assert_eq!(
            lp.top.iter().map(|&(t, _)| t).collect::<Vec<_>>(),
            vec![1, 4, 0],
            "most likely first, lowest id on ties"
        );
        for &(t, l) in &lp.top {
            assert!((l - expected(t as usize)).abs() < 1e-6);
        }
        let mass: f64 = (0..5)
            .map(|t| f64::from(token_logprobs(&logits, t, 0).logprob).exp())
            .sum();
        assert!((mass - 1.0).abs() < 1e-6, "{mass}");
        assert_eq!(token_logprobs(&logits, 0, 50).top.len(), logits.len());
    }

    #[test]
    fn the_greedy_token_has_the_largest_logprob() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01)
            .collect();
        let mut s = sampler(SamplingParams {
            temperature: 0.0,
            logprobs: Some(20),
            ..params()
        });
        let token = s.sample(&logits);
        let lp = token_logprobs(&logits, token, 20);
        assert_eq!(lp.top.len(), 20);
        assert_eq!(lp.top[0], (token, lp.logprob));
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "{:?}", lp.top);
        assert_eq!(
            SamplingParams {
                logprobs: Some(21),
                ..params()
            }
            .validate()
            .map_err(|e| e.param()),
            Err("top_logprobs")
        );
    }

    #[test]
    fn each_choice_has_its_own_reproducible_seed() {
        let seeded = SamplingParams {
            seed: Some(42),
            ..params()
        };
        assert_eq!(seeded.for_choice(0), seeded);
        let seeds: Vec<Option<u64>> = (0..16).map(|i| seeded.for_choice(i).seed).collect();
        let mut distinct = seeds.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 16, "{seeds:?}");
        assert_eq!(seeded.for_choice(3), seeded.for_choice(3));
        assert_eq!(params().for_choice(5).seed, None, "no seed: fresh draws");
    }

    proptest::proptest! {
        /// However the text is cut into tokens, the user gets exactly the
        /// text before the first stop string (and `stop`), or all of it (and
        /// `length`).
        #[test]
        fn stop_string_matching_ignores_token_boundaries(
            pieces in proptest::collection::vec("[abé]{0,3}", 1..15),
            stop in "[abé]{1,4}",
        ) {
            let mut s = sampler(SamplingParams {
                stop: vec![stop.clone()],
                max_tokens: Some(pieces.len() as u32),
                ..params()
            });
            let mut output = String::new();
            let mut finish = None;
            for piece in &pieces {
                let step = s.accept(5, piece);
                output.push_str(&step.text);
                if step.finish.is_some() {
                    finish = step.finish;
                    break;
                }
            }
            let text = pieces.concat();
            match text.find(&stop) {
                Some(at) => {
                    proptest::prop_assert_eq!(&output, &text[..at]);
                    proptest::prop_assert_eq!(finish, Some(FinishReason::Stop));
                }
                None => {
                    proptest::prop_assert_eq!(&output, &text);
                    proptest::prop_assert_eq!(finish, Some(FinishReason::Length));
                }
            }
        }
    }
}
