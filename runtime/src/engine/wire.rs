//! The engine's types and their wire mirrors in `xpyd-api`: sampling
//! parameters, outputs and usage as they travel on the bus, and the load a
//! worker reports with its KV events.
//!
//! The wire types are kept apart so that an engine refactor cannot change
//! what other processes read; the conversions live here, once, for every
//! room that puts engine values on the wire or takes them off it.

use xpyd_api::{
    GenerateEvent, WireLogprobs, WireSamplingParams, WireTopLogprob, WireUsage, WorkerLoad,
};

use super::runner::{EngineStats, Output, Usage};
use super::sampling::{SamplingParams, TokenLogprobs};

impl From<SamplingParams> for WireSamplingParams {
    fn from(p: SamplingParams) -> Self {
        WireSamplingParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            seed: p.seed,
            max_tokens: p.max_tokens,
            min_tokens: p.min_tokens,
            stop_token_ids: p.stop_token_ids,
            ignore_eos: p.ignore_eos,
            stop: p.stop,
            logprobs: p.logprobs,
            json_schema: p.json_schema,
        }
    }
}

impl From<WireSamplingParams> for SamplingParams {
    fn from(p: WireSamplingParams) -> Self {
        SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            seed: p.seed,
            max_tokens: p.max_tokens,
            min_tokens: p.min_tokens,
            stop_token_ids: p.stop_token_ids,
            ignore_eos: p.ignore_eos,
            stop: p.stop,
            logprobs: p.logprobs,
            json_schema: p.json_schema,
        }
    }
}

impl From<TokenLogprobs> for WireLogprobs {
    fn from(l: TokenLogprobs) -> Self {
        WireLogprobs {
            token_id: l.token,
            logprob: l.logprob,
            top: l
                .top
                .into_iter()
                .map(|(token_id, logprob)| WireTopLogprob { token_id, logprob })
                .collect(),
        }
    }
}

impl From<WireLogprobs> for TokenLogprobs {
    fn from(l: WireLogprobs) -> Self {
        TokenLogprobs {
            token: l.token_id,
            logprob: l.logprob,
            top: l.top.into_iter().map(|t| (t.token_id, t.logprob)).collect(),
        }
    }
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        WireUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.cached_tokens,
        }
    }
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.cached_tokens,
        }
    }
}

impl From<Output> for GenerateEvent {
    fn from(o: Output) -> Self {
        GenerateEvent::Token {
            token_id: o.token_id,
            text: o.text,
            finish: o.finish,
            usage: o.usage.map(WireUsage::from),
            logprobs: o.logprobs.map(WireLogprobs::from),
        }
    }
}

/// The engine output a `Token` event carries (`None` for errors).
pub fn output_of(event: GenerateEvent) -> Option<Output> {
    match event {
        GenerateEvent::Token {
            token_id,
            text,
            finish,
            usage,
            logprobs,
        } => Some(Output {
            token_id,
            text,
            finish,
            usage: usage.map(Usage::from),
            logprobs: logprobs.map(TokenLogprobs::from),
        }),
        GenerateEvent::Error { .. } => None,
    }
}

impl From<&EngineStats> for WorkerLoad {
    fn from(stats: &EngineStats) -> WorkerLoad {
        let idle = stats.free_blocks + stats.cached_free_blocks;
        WorkerLoad {
            active_blocks: stats.total_blocks.saturating_sub(idle) as u64,
            total_blocks: stats.total_blocks as u64,
            running: stats.running as u64,
            waiting: stats.waiting as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use xpyd_api::FinishReason;
    use xpyd_api::messages::{decode, encode};

    use super::*;

    #[test]
    fn sampling_params_cross_the_wire_unchanged() {
        let params = SamplingParams {
            temperature: 0.5,
            top_k: Some(3),
            seed: Some(9),
            max_tokens: Some(7),
            min_tokens: 2,
            stop_token_ids: vec![4],
            ignore_eos: true,
            stop: vec!["\n".into()],
            logprobs: Some(5),
            json_schema: Some(r#"{"type":"object"}"#.into()),
            ..SamplingParams::default()
        };
        let wire: WireSamplingParams = decode(
            "sampling",
            &encode(&WireSamplingParams::from(params.clone())),
        )
        .unwrap();
        assert_eq!(SamplingParams::from(wire), params);
        assert_eq!(
            SamplingParams::from(WireSamplingParams::default()),
            SamplingParams::default()
        );
    }

    #[test]
    fn an_output_round_trips_through_its_event() {
        let e = GenerateEvent::from(Output {
            token_id: 5,
            text: "x".into(),
            finish: Some(FinishReason::Length),
            usage: Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 1,
                cached_tokens: 0,
            }),
            logprobs: Some(TokenLogprobs {
                token: 5,
                logprob: -0.25,
                top: vec![(5, -0.25), (9, -1.5)],
            }),
        });
        let back: GenerateEvent = decode("event", &encode(&e)).unwrap();
        let out = output_of(back).unwrap();
        assert_eq!(out.logprobs.as_ref().unwrap().top[1], (9, -1.5));
        assert_eq!(out.usage.unwrap().prompt_tokens, 3);
        assert_eq!(out.finish, Some(FinishReason::Length));
    }

    #[test]
    fn load_from_engine_stats_counts_held_blocks_only() {
        let stats = EngineStats {
            total_blocks: 100,
            free_blocks: 60,
            cached_free_blocks: 30,
            running: 2,
            waiting: 1,
            ..EngineStats::default()
        };
        assert_eq!(
            WorkerLoad::from(&stats),
            WorkerLoad {
                active_blocks: 10,
                total_blocks: 100,
                running: 2,
                waiting: 1
            }
        );
    }
}
