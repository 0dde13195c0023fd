//! The router in front of two real engines (bundled SmolLM2-135M-Instruct):
//! requests sharing long system prompts, routed by a `Router` fed with the
//! engines' own KV events (batched as a decode worker publishes them), then
//! run on the chosen engine. KV routing must get far more prefix-cache hits
//! from the engines than round robin on the same request sequence, and the
//! router's overlap must be exactly what the engines then find cached.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::gguf;

use tokio::sync::mpsc::{Receiver, UnboundedReceiver, unbounded_channel};
use xpyd_runtime::discovery::{RouterSettings, RouterStrategy};
use xpyd_runtime::engine::block_pool::{KvEvent, TokenId};
use xpyd_runtime::engine::model::Model;
use xpyd_runtime::engine::runner::{Engine, EngineConfig, EngineHandle, OutputItem, Usage};
use xpyd_runtime::engine::tokenizer::Tokenizer;
use xpyd_runtime::router::{BatchOutcome, KvEventPublisher, Router, WorkerLoad};

const BLOCK_SIZE: usize = 16;

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_gguf(gguf()).expect("tokenizer loads"))
}

fn encode(text: &str) -> Vec<TokenId> {
    tokenizer().encode(text).expect("encodes")
}

/// One decode worker: an engine, its KV event channel and its publisher.
struct Worker {
    name: String,
    engine: EngineHandle,
    events: UnboundedReceiver<KvEvent>,
    publisher: KvEventPublisher,
}

impl Worker {
    fn start(name: &str) -> Worker {
        let (tx, events) = unbounded_channel();
        let config = EngineConfig {
            num_blocks: 160,
            block_size: BLOCK_SIZE,
            max_batch_tokens: 512,
            max_seqs: 4,
            max_model_len: 1024,
        };
        let model = Model::from_gguf(gguf()).expect("model loads");
        let engine = Engine::start(
            model,
            Some(Tokenizer::from_gguf(gguf()).expect("tokenizer loads")),
            config,
            Some(tx),
        )
        .expect("engine starts");
        Worker {
            name: name.to_string(),
            engine,
            events,
            publisher: KvEventPublisher::new(name),
        }
    }

    /// Publish what happened since the last batch, as a worker's event
    /// forwarder does, straight into the router (encoded and decoded, as on
    /// the bus).
    fn publish(&mut self, router: &Router) {
        let events: Vec<KvEvent> = std::iter::from_fn(|| self.events.try_recv().ok()).collect();
        let load = WorkerLoad::from(&self.engine.stats());
        let batch = self.publisher.batch(events, load);
        let outcome = router.ingest(&batch.encode()).expect("known worker");
        assert_eq!(outcome, BatchOutcome::Applied);
    }
}

fn run(engine: &EngineHandle, id: &str, prompt: &[TokenId]) -> Usage {
    let rx = engine
        .submit(common::greedy(id, prompt, 2))
        .expect("valid request");
    usage(rx)
}

fn usage(rx: Receiver<OutputItem>) -> Usage {
    let out = common::collect(rx).ok();
    out.usage.expect("the last output carries usage")
}

/// Three long system prompts, each followed by four different questions,
/// interleaved A, B, C, A, B, C, …: round robin over two workers sends
/// each group alternately to both.
fn requests() -> Vec<Vec<TokenId>> {
    let topics = ["astronomy", "cooking", "sailing"];
    let systems: Vec<Vec<TokenId>> = topics
        .iter()
        .map(|topic| {
            let mut text = format!("You are a patient assistant who knows {topic} well.\n");
            for rule in 1..=11 {
                text.push_str(&format!(
                    "Rule {rule}: when asked about {topic}, answer briefly and cite rule {rule}.\n"
                ));
            }
            let tokens = encode(&text);
            assert!(
                tokens.len() >= 180,
                "system prompt of {} tokens",
                tokens.len()
            );
            tokens
        })
        .collect();
    let questions = [
        "What should a beginner learn first?",
        "Which mistake is the most common?",
        "How long does it take to get good?",
        "What tools do I need?",
    ];
    let mut out = Vec::new();
    for question in questions {
        for system in &systems {
            let mut prompt = system.clone();
            prompt.extend(encode(&format!("\nQuestion: {question}\nAnswer:")));
            out.push(prompt);
        }
    }
    out
}

/// Prefix-cache hit rate the engines report over the sequence, and
/// whether the router's overlaps matched the engines' hits.
struct Outcome {
    engine_hit_blocks: usize,
    router_hit_blocks: usize,
    prompt_blocks: usize,
}

fn route_all(strategy: RouterStrategy, prompts: &[Vec<TokenId>]) -> Outcome {
    let mut workers = [Worker::start("decode-0"), Worker::start("decode-1")];
    let router = Router::new(
        BLOCK_SIZE,
        &RouterSettings {
            strategy,
            ..RouterSettings::default()
        },
    );
    router.set_workers(workers.iter().map(|w| w.name.clone()));
    let mut outcome = Outcome {
        engine_hit_blocks: 0,
        router_hit_blocks: 0,
        prompt_blocks: 0,
    };
    for (i, prompt) in prompts.iter().enumerate() {
        for worker in &mut workers {
            worker.publish(&router);
        }
        let id = format!("req-{i}");
        let decision = router
            .select_tokens(&id, prompt, None)
            .expect("two workers");
        assert_eq!(decision.strategy, strategy);
        let worker = workers
            .iter()
            .find(|w| w.name == decision.instance_id)
            .expect("a live worker");
        let usage = run(&worker.engine, &id, prompt);
        router.finish(&id);
        assert_eq!(usage.cached_tokens % BLOCK_SIZE, 0);
        outcome.engine_hit_blocks += usage.cached_tokens / BLOCK_SIZE;
        outcome.router_hit_blocks += decision.overlap_blocks as usize;
        outcome.prompt_blocks += prompt.len() / BLOCK_SIZE;
    }
    for worker in &workers {
        worker
            .engine
            .shutdown(Duration::from_secs(10))
            .expect("engine stops");
    }
    outcome
}

#[test]
fn kv_routing_gets_far_more_prefix_hits_than_round_robin() {
    let prompts = requests();
    assert_eq!(prompts.len(), 12);

    let kv = route_all(RouterStrategy::Kv, &prompts);
    let rr = route_all(RouterStrategy::RoundRobin, &prompts);
    let rate = |o: &Outcome| o.engine_hit_blocks as f64 / o.prompt_blocks as f64;
    eprintln!(
        "prefix hit rate: kv {:.2} ({} / {} blocks), round robin {:.2} ({} / {} blocks)",
        rate(&kv),
        kv.engine_hit_blocks,
        kv.prompt_blocks,
        rate(&rr),
        rr.engine_hit_blocks,
        rr.prompt_blocks
    );

    // The router's index mirrors the engines' caches exactly.
    assert_eq!(kv.router_hit_blocks, kv.engine_hit_blocks);
    assert_eq!(rr.router_hit_blocks, rr.engine_hit_blocks);
    // KV routing misses once per system prompt (3 of 12 requests); round
    // robin over two workers misses twice per system prompt (6 of 12).
    assert!(rate(&kv) > 0.6, "kv hit rate {:.2}", rate(&kv));
    assert!(
        rate(&kv) >= rate(&rr) + 0.2,
        "kv {:.2} vs round robin {:.2}",
        rate(&kv),
        rate(&rr)
    );
}
