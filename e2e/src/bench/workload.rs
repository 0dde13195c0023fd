//! The prompts a benchmark sends, built with the served model's tokenizer so
//! that input lengths are exact token counts, and reproducible from a seed.
//!
//! Exact lengths come from a vocabulary of "word tokens": ids whose text is
//! one space followed by ASCII letters and which encode back to themselves
//! alone. The pre-tokenizer of GPT-2-style BPE splits text before every
//! space-letters run, so a prompt made of N such words encodes to exactly N
//! tokens; [`PromptVocab::prompt`] still re-encodes every prompt and refuses
//! one whose count differs. Prompts are text, so they work on chat and text
//! completions of any OpenAI-compatible server.
//!
//! Two workloads: [`Workload::Random`] (lengths drawn from a normal
//! distribution, vLLM's "random" dataset with exact lengths) and
//! [`Workload::SharedPrefix`] (sessions that share one system prompt and
//! send multi-turn follow-ups, the case a KV-aware router is for). Sending
//! them is `load`'s job.

use rand::RngExt;
use rand::rngs::StdRng;
use xpyd_runtime::engine::tokenizer::Tokenizer;

/// The workload cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] xpyd_runtime::engine::tokenizer::TokenizerError),
    #[error(
        "the tokenizer has only {0} word tokens (space + letters that encode to themselves); too few to build prompts"
    )]
    TooFewWords(usize),
    #[error("a {want}-token prompt encoded to {got} tokens; exact lengths cannot be guaranteed")]
    InexactLength { want: usize, got: usize },
}

/// Tokens that make exact-length prompts (see the module doc).
#[derive(Debug, Clone)]
pub struct PromptVocab {
    words: Vec<u32>,
}

impl PromptVocab {
    /// Picks the word tokens of `tokenizer`'s vocabulary.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, WorkloadError> {
        let mut words = Vec::new();
        for id in 0..tokenizer.vocab_size() as u32 {
            if tokenizer.is_special(id) {
                continue;
            }
            let text = tokenizer.decode(&[id], false)?;
            let Some(word) = text.strip_prefix(' ') else {
                continue;
            };
            if word.len() < 2 || !word.bytes().all(|b| b.is_ascii_alphabetic()) {
                continue;
            }
            if tokenizer.encode(&text)? == [id] {
                words.push(id);
            }
        }
        if words.len() < 100 {
            return Err(WorkloadError::TooFewWords(words.len()));
        }
        Ok(PromptVocab { words })
    }

    /// How many word tokens there are.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Text of exactly `len` tokens, drawn from `rng`; checked by re-encoding.
    pub fn prompt(
        &self,
        tokenizer: &Tokenizer,
        rng: &mut StdRng,
        len: usize,
    ) -> Result<String, WorkloadError> {
        let ids: Vec<u32> = (0..len)
            .map(|_| self.words[rng.random_range(0..self.words.len())])
            .collect();
        let text = tokenizer.decode(&ids, false)?;
        let got = tokenizer.encode(&text)?.len();
        if got != len {
            return Err(WorkloadError::InexactLength { want: len, got });
        }
        Ok(text)
    }
}

/// What to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// Independent prompts; input length ~ N(mean, stddev) rounded, at least
    /// 1; every output exactly `output_len` tokens.
    Random {
        input_len: usize,
        input_stddev: f64,
        output_len: usize,
    },
    /// `sessions` conversations, each with `turns` requests sent one after
    /// another; every prompt starts with the same `system_len`-token system
    /// prompt, then the session's history (its earlier questions and the
    /// server's answers), then a new `turn_len`-token question.
    SharedPrefix {
        sessions: usize,
        turns: usize,
        system_len: usize,
        turn_len: usize,
        output_len: usize,
    },
}

impl Workload {
    /// Output tokens asked for per request.
    pub fn output_len(&self) -> usize {
        match self {
            Workload::Random { output_len, .. } | Workload::SharedPrefix { output_len, .. } => {
                *output_len
            }
        }
    }
}

/// A draw from N(mean, stddev), rounded and at least 1.
pub fn input_length(rng: &mut StdRng, mean: usize, stddev: f64) -> usize {
    if stddev <= 0.0 {
        return mean.max(1);
    }
    let x = mean as f64 + stddev * standard_normal(rng);
    x.round().max(1.0) as usize
}

/// A standard normal draw (Box–Muller).
pub fn standard_normal(rng: &mut StdRng) -> f64 {
    // 1 - u keeps the logarithm's argument in (0, 1].
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// One conversation of the shared-prefix workload: the text sent so far and
/// the next question to ask.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: usize,
    history: String,
    questions: Vec<String>,
    next_turn: usize,
}

impl Session {
    /// A session whose prompts all start with `system`; its questions are
    /// drawn now, so a session's requests do not depend on timing.
    pub fn new(
        id: usize,
        system: &str,
        vocab: &PromptVocab,
        tokenizer: &Tokenizer,
        rng: &mut StdRng,
        turns: usize,
        turn_len: usize,
    ) -> Result<Self, WorkloadError> {
        let questions = (0..turns)
            .map(|_| vocab.prompt(tokenizer, rng, turn_len))
            .collect::<Result<_, _>>()?;
        Ok(Session {
            id,
            history: system.to_string(),
            questions,
            next_turn: 0,
        })
    }

    /// The next prompt (history plus the next question), or `None` when the
    /// session has asked all its questions.
    pub fn next_prompt(&mut self) -> Option<(usize, String)> {
        let question = self.questions.get(self.next_turn)?;
        self.history.push_str(question);
        let turn = self.next_turn;
        self.next_turn += 1;
        Some((turn, self.history.clone()))
    }

    /// Appends the server's answer to the history the next turn sends.
    pub fn answer(&mut self, text: &str) {
        self.history.push_str(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use xpyd_runtime::engine::gguf::GgufFile;

    fn tokenizer() -> Tokenizer {
        let path =
            xpyd_runtime::assets::bundled_model().expect("the bundled model (run scripts/setup)");
        Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
    }

    #[test]
    fn prompts_have_exact_token_counts_and_follow_the_seed() {
        let tok = tokenizer();
        let vocab = PromptVocab::new(&tok).unwrap();
        assert!(vocab.len() > 1000, "{} word tokens", vocab.len());
        let mut rng = StdRng::seed_from_u64(7);
        let mut made = Vec::new();
        for len in [1, 2, 17, 64, 1000, 3000] {
            let text = vocab.prompt(&tok, &mut rng, len).unwrap();
            assert_eq!(tok.encode(&text).unwrap().len(), len);
            made.push(text);
        }
        let mut again = StdRng::seed_from_u64(7);
        for (len, text) in [1, 2, 17, 64, 1000, 3000].into_iter().zip(&made) {
            assert_eq!(&vocab.prompt(&tok, &mut again, len).unwrap(), text);
        }
        let mut other = StdRng::seed_from_u64(8);
        assert_ne!(vocab.prompt(&tok, &mut other, 64).unwrap(), made[3]);
    }

    #[test]
    fn sessions_share_the_system_prompt_and_grow_their_history() {
        let tok = tokenizer();
        let vocab = PromptVocab::new(&tok).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let system = vocab.prompt(&tok, &mut rng, 100).unwrap();
        let mut a = Session::new(0, &system, &vocab, &tok, &mut rng, 2, 20).unwrap();
        let mut b = Session::new(1, &system, &vocab, &tok, &mut rng, 2, 20).unwrap();
        let (t0, a0) = a.next_prompt().unwrap();
        let (_, b0) = b.next_prompt().unwrap();
        assert_eq!(t0, 0);
        assert!(a0.starts_with(&system) && b0.starts_with(&system));
        assert_ne!(a0, b0);
        assert_eq!(tok.encode(&a0).unwrap().len(), 120);
        a.answer(" Paris");
        let (t1, a1) = a.next_prompt().unwrap();
        assert_eq!(t1, 1);
        assert!(a1.starts_with(&format!("{a0} Paris")));
        assert!(a.next_prompt().is_none());
    }

    #[test]
    fn input_lengths_follow_mean_and_stddev() {
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(input_length(&mut rng, 1000, 0.0), 1000);
        let draws: Vec<f64> = (0..20_000)
            .map(|_| input_length(&mut rng, 1000, 50.0) as f64)
            .collect();
        let m = crate::bench::stats::mean(&draws);
        let s = crate::bench::stats::std_dev(&draws);
        assert!((m - 1000.0).abs() < 2.0, "mean {m}");
        assert!((s - 50.0).abs() < 2.0, "stddev {s}");
    }
}
