//! The block pool and the sampler driven together through their public API,
//! the way a scheduler step uses them: allocate a prompt, "compute" it,
//! sample and append tokens until a stop condition, free; and the
//! remote-prefill path. A toy logits function stands in for the model.

use xpyd_runtime::engine::block_pool::{
    BlockPool, BlockPoolError, KvEvent, KvEventData, PrefixHit, SequenceId, TokenId, prefix_hashes,
};
use xpyd_runtime::engine::sampling::{FinishReason, Sampler, SamplingParams};

const EOS: TokenId = 0;
const VOCAB: usize = 64;

/// Logits that strongly favour `last + 1`.
fn toy_logits(last: TokenId) -> Vec<f32> {
    let mut logits = vec![0.0; VOCAB];
    logits[(last as usize + 1) % VOCAB] = 10.0;
    logits
}

/// Decode until the sampler stops, as a scheduler would one step at a time;
/// returns the text sent to the user and the finish reason.
fn generate(
    pool: &mut BlockPool,
    seq: SequenceId,
    sampler: &mut Sampler,
    mut last: TokenId,
) -> (String, FinishReason) {
    let mut text = String::new();
    loop {
        let n = pool.num_tokens(seq).expect("allocated");
        // The forward pass over the uncomputed tokens happens here.
        pool.mark_computed(seq, n).expect("forward pass done");
        let token = sampler.sample(&toy_logits(last));
        let step = sampler.accept(token, &format!("<{token}>"));
        text.push_str(&step.text);
        if let Some(reason) = step.finish {
            return (text, reason);
        }
        pool.append_tokens(seq, &[token])
            .expect("room for one token");
        last = token;
    }
}

fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<KvEvent>) -> Vec<KvEvent> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

#[test]
fn two_requests_share_a_system_prompt_and_the_router_sees_it() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut pool = BlockPool::new(32, 16).expect("pool").with_kv_events(tx);
    let system: Vec<TokenId> = (100..164).collect();

    let mut first = system.clone();
    first.extend([1, 2, 3]);
    assert_eq!(
        pool.allocate_prompt(SequenceId(1), &first),
        Ok(PrefixHit::default())
    );
    let mut sampler = Sampler::new(
        SamplingParams {
            temperature: 0.0,
            stop: vec!["<8>".into()],
            ..SamplingParams::default()
        },
        &[EOS],
    )
    .expect("valid");
    let (text, reason) = generate(&mut pool, SequenceId(1), &mut sampler, 3);
    assert_eq!(reason, FinishReason::Stop);
    assert_eq!(text, "<4><5><6><7>");
    pool.free_sequence(SequenceId(1)).expect("free");

    let mut second = system.clone();
    second.extend([9, 9]);
    let hit = pool.allocate_prompt(SequenceId(2), &second).expect("fits");
    assert_eq!(
        hit,
        PrefixHit {
            blocks: 4,
            tokens: 64
        }
    );

    // The router rebuilds the chain from events and finds the same hashes a
    // prompt lookup computes.
    let events = drain(&mut rx);
    assert!(
        events
            .windows(2)
            .all(|w| w[1].event_id == w[0].event_id + 1)
    );
    let stored: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.data {
            KvEventData::Stored { block_hashes, .. } => Some(block_hashes.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(stored[..4], prefix_hashes(&system, 16)[..]);
    let wire = serde_json::to_string(&events[1]).expect("serializable");
    assert!(wire.contains(r#""type":"stored""#), "{wire}");

    let mut sampler = Sampler::new(
        SamplingParams {
            temperature: 0.0,
            max_tokens: Some(3),
            ..SamplingParams::default()
        },
        &[EOS],
    )
    .expect("valid");
    let (text, reason) = generate(&mut pool, SequenceId(2), &mut sampler, 9);
    assert_eq!(
        (text.as_str(), reason),
        ("<10><11><12>", FinishReason::Length)
    );
    pool.free_sequence(SequenceId(2)).expect("free");
    assert_eq!(pool.used_blocks(), 0);
    assert_eq!(pool.free_blocks() + pool.cached_free_blocks(), 32);
}

#[test]
fn remote_prefill_then_local_decode() {
    let mut pool = BlockPool::new(8, 4).expect("pool");
    let prompt: Vec<TokenId> = (1..=10).collect();
    assert_eq!(pool.cached_prefix(&prompt).blocks, 0);
    pool.allocate_prompt(SequenceId(7), &prompt).expect("fits");
    let to_write = pool.begin_transfer(SequenceId(7)).expect("pin");
    assert_eq!(to_write.len(), 3);

    // The decode side must not free under a transfer; the scheduler cancels.
    assert_eq!(
        pool.free_sequence(SequenceId(7)),
        Err(BlockPoolError::TransferInFlight(SequenceId(7)))
    );
    pool.complete_transfer(SequenceId(7))
        .expect("notification arrived");
    assert_eq!(pool.num_computed_tokens(SequenceId(7)), Some(10));
    pool.append_tokens(SequenceId(7), &[42])
        .expect("first decoded token");
    pool.free_sequence(SequenceId(7)).expect("free");
    assert_eq!(
        pool.cached_free_blocks(),
        2,
        "the two full prompt blocks are cached"
    );

    // A later request with the same prompt reuses what the transfer wrote.
    let mut longer = prompt.clone();
    longer.push(11);
    assert_eq!(pool.cached_prefix(&longer).blocks, 2);
}
