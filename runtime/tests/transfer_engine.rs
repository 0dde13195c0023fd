//! Disaggregated prefill across two OS processes on the bundled SmolLM2: a
//! prefill engine computes "The capital of France is" and NIXL-writes its KV
//! into the blocks a decode engine in another process reserved; the decode
//! engine continues with " Paris" as a local run would.
//!
//! The decode side is this test binary run again with `XPYD_TRANSFER_CHILD=
//! decode` (only `decode_process_entry` runs, a no-op otherwise); it prints
//! `XPYD:PEER`, `XPYD:BLOCKS` and finally `XPYD:TEXT` lines on stdout.

mod common;

use std::time::{Duration, Instant};

use tokio::sync::mpsc::Receiver;
use xpyd_e2e::child::ChildProcess;
use xpyd_runtime::engine::model::Model;
use xpyd_runtime::engine::runner::{Engine, EngineConfig, EngineHandle, OutputItem, Request};
use xpyd_runtime::engine::tokenizer::Tokenizer;
use xpyd_runtime::transfer::{KvMemory, PeerInfo, TransferAgent, TransferNotification};

const ROLE_ENV: &str = "XPYD_TRANSFER_CHILD";
const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];

fn start() -> EngineHandle {
    let model = Model::from_gguf(common::gguf()).expect("model loads");
    let tokenizer = Tokenizer::from_gguf(common::gguf()).expect("tokenizer loads");
    let config = EngineConfig {
        num_blocks: 64,
        block_size: 16,
        max_batch_tokens: 256,
        max_seqs: 16,
        max_model_len: 1024,
    };
    Engine::start(model, Some(tokenizer), config, None).expect("engine starts")
}

/// The greedy request for [`PROMPT`].
fn greedy(id: &str, max_tokens: u32) -> Request {
    common::greedy(id, &PROMPT, max_tokens)
}

/// Tokens and text a request streamed.
fn collect(rx: Receiver<OutputItem>) -> (Vec<u32>, String) {
    let out = common::collect(rx).ok();
    (out.tokens, out.text)
}

/// An agent over the engine's cache. The engine keeps its cache in place
/// until shutdown; callers drop the agent first.
fn agent_over(engine: &EngineHandle, name: &str) -> TransferAgent {
    let memory = engine
        // SAFETY: see above.
        .with_kv_storage(|kv| unsafe { KvMemory::of_kv_storage(kv) })
        .wait()
        .unwrap()
        .unwrap();
    TransferAgent::new(name, memory).unwrap()
}

/// The decode process. Does nothing unless started by the test below.
#[test]
fn decode_process_entry() {
    if std::env::var(ROLE_ENV).as_deref() != Ok("decode") {
        return;
    }
    let engine = start();
    let (rx, reservation) = engine.begin_remote_prefill(greedy("d", 8)).wait().unwrap();
    let agent = agent_over(&engine, "decode-engine");
    println!(
        "XPYD:PEER {}",
        serde_json::to_string(&agent.metadata()).unwrap()
    );
    println!(
        "XPYD:BLOCKS {}",
        serde_json::to_string(&reservation.block_ids).unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    match agent.wait_notification("d", deadline) {
        Ok(got) => engine
            .complete_remote_prefill("d", got.notification.first_token, None)
            .wait()
            .unwrap(),
        Err(e) => {
            engine.cancel_remote_prefill("d").wait().unwrap();
            panic!("{e}");
        }
    }
    let (_, text) = collect(rx);
    println!("XPYD:TEXT {}", serde_json::to_string(&text).unwrap());
    drop(agent);
    engine.shutdown(Duration::from_secs(10)).unwrap();
}

#[test]
fn a_prompt_prefilled_in_another_process_decodes_to_paris() {
    let prefill = start();
    let (first, _) = collect(prefill.submit_prefill(greedy("p", 1)).unwrap());
    let table = prefill.block_table("p").wait().unwrap();
    let agent = agent_over(&prefill, "prefill-engine");

    let mut child = ChildProcess::spawn("decode_process_entry", [(ROLE_ENV, "decode")]);
    let mut next = |tag: &str| -> String {
        let line = child
            .line_blocking(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("no {tag} line from the decode process: {e}"));
        line.strip_prefix(tag)
            .unwrap_or_else(|| panic!("expected {tag}, got {line}"))
            .to_string()
    };
    let peer: PeerInfo = serde_json::from_str(&next("PEER ")).unwrap();
    let blocks: Vec<u32> = serde_json::from_str(&next("BLOCKS ")).unwrap();
    assert_eq!(blocks.len(), table.len());
    agent.load_peer(peer).unwrap();
    let notification = TransferNotification {
        request_id: "d".into(),
        first_token: first[0],
        first_logprobs: None,
        num_blocks: blocks.len() as u32,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    agent
        .write_blocks(&table, "decode-engine", &blocks, &notification, deadline)
        .unwrap()
        .wait()
        .unwrap();
    prefill.cancel("p").unwrap();

    let text: String = serde_json::from_str(&next("TEXT ")).unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
    // The tokens after the first depend on the transferred KV: they match a
    // local run of the same prompt on the prefill engine.
    let (_, local) = collect(prefill.submit(greedy("local", 8)).unwrap());
    assert_eq!(text, local);
    assert!(child.wait().success());
    drop(agent);
    prefill.shutdown(Duration::from_secs(10)).unwrap();
}
