//! The router's hot paths at deployment scale: decision latency with 64
//! workers and about 1M indexed blocks, and KV event ingestion throughput
//! on one core (index only, through the `Router`, and from JSON bytes).
//!
//! Run with `cargo bench -p xpyd-runtime --bench router`; it prints a table
//! and asserts nothing. `XPYD_BENCH_SELECTS` sets the number of decisions
//! timed (default 200000).
//!
//! The cache population: 256 system prompts of 32–128 blocks, each held by
//! 4 random workers and by the workers of its conversations (a system
//! prompt plus 64–192 blocks of their own, spread evenly over the workers)
//! until 1M distinct blocks are indexed. Requests
//! of 64–256 blocks: 50% continue a cached conversation, 30% start a new
//! one on a cached system prompt, 20% are cold. Block hashes are synthetic
//! chains (a cheap mixer, not SHA-256): the router never recomputes them.

use std::time::Instant;

use xpyd_runtime::discovery::{RouterSettings, RouterStrategy};
use xpyd_runtime::engine::block_pool::{KvEvent, KvEventData, PrefixHash};
use xpyd_runtime::router::{
    KvEventBatch, KvEventPublisher, KvIndexer, RouteRequest, Router, WorkerId, WorkerLoad,
};

const WORKERS: usize = 64;
const TARGET_BLOCKS: usize = 1_000_000;
const SYSTEM_PROMPTS: usize = 256;
const BLOCK_SIZE: usize = 16;
const EVENTS_PER_BATCH: usize = 64;

/// splitmix64: the synthetic hash chain and the bench's random numbers.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = mix(self.0);
        self.0
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }
}

/// `n` new blocks chained after `parent` (fresh content from `rng`).
fn extend(chain: &mut Vec<PrefixHash>, n: usize, rng: &mut Rng) {
    let mut parent = chain.last().map_or(0, |h| h.0);
    for _ in 0..n {
        parent = mix(parent ^ rng.next());
        chain.push(PrefixHash(parent));
    }
}

fn stored(parent: Option<PrefixHash>, hashes: &[PrefixHash], with_tokens: bool) -> KvEventData {
    KvEventData::Stored {
        parent_hash: parent,
        block_hashes: hashes.to_vec(),
        block_size: BLOCK_SIZE as u32,
        token_ids: if with_tokens {
            (0..(hashes.len() * BLOCK_SIZE) as u32)
                .map(|t| 1000 + t * 7)
                .collect()
        } else {
            Vec::new()
        },
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

fn main() {
    let selects: usize = std::env::var("XPYD_BENCH_SELECTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let mut rng = Rng(42);
    let names: Vec<String> = (0..WORKERS).map(|w| format!("decode-{w:02}")).collect();
    let router = Router::new(BLOCK_SIZE, &RouterSettings::default());
    router.set_workers(&names);
    let mut publishers: Vec<KvEventPublisher> = names.iter().map(KvEventPublisher::new).collect();
    let mut event_ids = vec![0u64; WORKERS];
    let load = WorkerLoad {
        active_blocks: 2000,
        total_blocks: 40_000,
        running: 8,
        waiting: 1,
    };
    let mut publish = |router: &Router, w: usize, data: Vec<KvEventData>| {
        let events = data
            .into_iter()
            .map(|data| {
                event_ids[w] += 1;
                KvEvent {
                    event_id: event_ids[w] - 1,
                    data,
                }
            })
            .collect();
        let batch = publishers[w].batch(events, load);
        router.apply_batch(&batch).expect("known worker");
    };

    // Population.
    let start = Instant::now();
    let systems: Vec<Vec<PrefixHash>> = (0..SYSTEM_PROMPTS)
        .map(|_| {
            let mut chain = Vec::new();
            let n = rng.range(32, 129);
            extend(&mut chain, n, &mut rng);
            chain
        })
        .collect();
    for system in &systems {
        for _ in 0..4 {
            let w = rng.range(0, WORKERS);
            publish(&router, w, vec![stored(None, system, false)]);
        }
    }
    let mut conversations: Vec<(usize, Vec<PrefixHash>)> = Vec::new();
    while router.indexed_blocks() < TARGET_BLOCKS {
        let w = conversations.len() % WORKERS;
        let mut chain = systems[rng.range(0, SYSTEM_PROMPTS)].clone();
        let parent = chain.last().copied();
        let from = chain.len();
        let n = rng.range(64, 193);
        extend(&mut chain, n, &mut rng);
        publish(
            &router,
            w,
            vec![
                stored(None, &chain[..from], false),
                stored(parent, &chain[from..], false),
            ],
        );
        conversations.push((w, chain));
    }
    let populated = start.elapsed().as_secs_f64();

    // Requests.
    let requests: Vec<Vec<PrefixHash>> = (0..10_000)
        .map(|_| {
            let len = rng.range(64, 257);
            let kind = rng.range(0, 10);
            let mut chain = if kind < 5 {
                let (_, conv) = &conversations[rng.range(0, conversations.len())];
                conv[..conv.len().min(len * 3 / 4)].to_vec()
            } else if kind < 8 {
                let s = &systems[rng.range(0, SYSTEM_PROMPTS)];
                s[..s.len().min(len)].to_vec()
            } else {
                Vec::new()
            };
            let more = len.saturating_sub(chain.len());
            extend(&mut chain, more, &mut rng);
            chain
        })
        .collect();

    println!(
        "router bench: {WORKERS} workers, {} distinct blocks indexed ({} conversations), populated in {populated:.2} s",
        router.indexed_blocks(),
        conversations.len()
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");

    for strategy in [RouterStrategy::Kv, RouterStrategy::RoundRobin] {
        router.apply_settings(&RouterSettings {
            strategy,
            ..RouterSettings::default()
        });
        let mut lat = Vec::with_capacity(selects);
        let (mut hit, mut total) = (0u64, 0u64);
        let ids: Vec<String> = (0..64).map(|i| format!("req-{i}")).collect();
        for i in 0..selects {
            let hashes = &requests[i % requests.len()];
            let id = &ids[i % ids.len()];
            let t = Instant::now();
            let d = router
                .select(&RouteRequest {
                    request_id: id,
                    block_hashes: hashes,
                    session: None,
                })
                .expect("workers");
            lat.push(t.elapsed().as_nanos() as u64);
            hit += u64::from(d.overlap_blocks);
            total += u64::from(d.request_blocks);
            // Keep 64 requests in flight.
            router.finish(&ids[(i + 1) % ids.len()]);
        }
        lat.sort_unstable();
        let name = match strategy {
            RouterStrategy::Kv => "kv",
            _ => "round_robin",
        };
        println!(
            "| select ({name}) p50 / p99 / p99.9 / max | {:.1} / {:.1} / {:.1} / {:.1} µs |",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            *lat.last().unwrap_or(&0) as f64 / 1000.0
        );
        println!(
            "| select ({name}) prefix hit rate (router overlap) | {:.1}% |",
            100.0 * hit as f64 / total as f64
        );
    }

    // find_matches alone on a standalone index (no locks, no load).
    let mut index = KvIndexer::new();
    for (w, chain) in &conversations {
        index.apply(WorkerId(*w as u32), &stored(None, chain, false));
    }
    let t = Instant::now();
    let mut sink = 0usize;
    for i in 0..selects {
        sink += index
            .find_matches(&requests[i % requests.len()])
            .scores
            .len();
    }
    println!(
        "| find_matches mean (standalone index, {} blocks) | {:.2} µs |",
        index.num_blocks(),
        t.elapsed().as_secs_f64() * 1e6 / selects as f64
    );
    std::hint::black_box(sink);
    drop(index);

    // Ingestion: a steady state of decode (1-block stores), prefill chunks
    // (16-block stores) and evictions (16-block removes, oldest first).
    let mut held: Vec<std::collections::VecDeque<PrefixHash>> = vec![Default::default(); WORKERS];
    let mut chains: Vec<Vec<PrefixHash>> = vec![Vec::new(); WORKERS];
    let mut batches: Vec<KvEventBatch> = Vec::new();
    let total_events = 1_000_000;
    let mut blocks_moved = 0usize;
    let mut gen_ids = vec![0u64; WORKERS];
    let mut gen_pubs: Vec<KvEventPublisher> = names.iter().map(KvEventPublisher::new).collect();
    let mut made = 0;
    while made < total_events {
        let w = rng.range(0, WORKERS);
        let mut events = Vec::with_capacity(EVENTS_PER_BATCH);
        for _ in 0..EVENTS_PER_BATCH {
            let kind = rng.range(0, 10);
            let data = if kind < 2 && held[w].len() >= 16 {
                let gone: Vec<PrefixHash> = held[w].drain(..16).collect();
                blocks_moved += 16;
                KvEventData::Removed { block_hashes: gone }
            } else {
                let n = if kind < 4 { 16 } else { 1 };
                let chain = &mut chains[w];
                if chain.len() > 512 {
                    chain.clear();
                }
                let parent = chain.last().copied();
                let from = chain.len();
                extend(chain, n, &mut rng);
                held[w].extend(&chain[from..]);
                blocks_moved += n;
                stored(parent, &chain[from..], false)
            };
            gen_ids[w] += 1;
            events.push(KvEvent {
                event_id: gen_ids[w] - 1,
                data,
            });
        }
        made += events.len();
        batches.push(gen_pubs[w].batch(events, load));
    }

    let mut index = KvIndexer::new();
    let t = Instant::now();
    for b in &batches {
        let w = b.instance_id[7..].parse::<u32>().unwrap_or(0);
        index.apply_batch(WorkerId(w), b.seq, &b.events);
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "| ingest, KvIndexer::apply_batch (one core) | {:.2} M events/s ({:.2} M blocks/s) |",
        made as f64 / secs / 1e6,
        blocks_moved as f64 / secs / 1e6
    );
    drop(index);

    let fresh = Router::new(BLOCK_SIZE, &RouterSettings::default());
    fresh.set_workers(&names);
    let t = Instant::now();
    for b in &batches {
        fresh.apply_batch(b).expect("known worker");
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "| ingest, Router::apply_batch (locks, load, one core) | {:.2} M events/s |",
        made as f64 / secs / 1e6
    );
    drop(fresh);

    // The wire: the same kind of batches with token ids, as engines send.
    let wire_batches: Vec<KvEventBatch> = batches
        .iter()
        .take(4000)
        .map(|b| KvEventBatch {
            events: b
                .events
                .iter()
                .map(|e| KvEvent {
                    event_id: e.event_id,
                    data: match &e.data {
                        KvEventData::Stored {
                            parent_hash,
                            block_hashes,
                            ..
                        } => stored(*parent_hash, block_hashes, true),
                        other => other.clone(),
                    },
                })
                .collect(),
            ..b.clone()
        })
        .collect();
    let wire_events: usize = wire_batches.iter().map(|b| b.events.len()).sum();
    for (name, encode) in [
        (
            "binary",
            KvEventBatch::encode as fn(&KvEventBatch) -> Vec<u8>,
        ),
        ("JSON", KvEventBatch::encode_json),
    ] {
        let t = Instant::now();
        let payloads: Vec<Vec<u8>> = wire_batches.iter().map(encode).collect();
        let encode_secs = t.elapsed().as_secs_f64();
        let bytes: usize = payloads.iter().map(Vec::len).sum();
        let wired = Router::new(BLOCK_SIZE, &RouterSettings::default());
        wired.set_workers(&names);
        let t = Instant::now();
        for p in &payloads {
            wired.ingest(p).expect("decodes");
        }
        let ingest_secs = t.elapsed().as_secs_f64();
        println!(
            "| wire {name} (token ids included): bytes per event, encode | {:.0} B, {:.2} M events/s |",
            bytes as f64 / wire_events as f64,
            wire_events as f64 / encode_secs / 1e6,
        );
        println!(
            "| ingest, Router::ingest ({name} decode + apply, one core) | {:.2} M events/s ({:.0} MB/s) |",
            wire_events as f64 / ingest_secs / 1e6,
            bytes as f64 / ingest_secs / 1e6
        );
    }
}
