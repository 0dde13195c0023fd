//! Throughput of the CPU forward pass on the bundled SmolLM2-135M (Q4_1):
//! prefill of a 512- and a 2,048-token prompt, and greedy decode at batch 1
//! and 8 after 16 and after 1,024 tokens of context per sequence.
//!
//! Run with `cargo bench -p xpyd-runtime --bench engine`; it prints tokens
//! per second and asserts nothing. `XPYD_BENCH_STEPS` sets the decode steps
//! (default 32); `XPYD_CPU_KERNELS=avx2` runs the AVX2 kernels on a CPU
//! with AVX-512; `XPYD_BENCH_ONLY=decode batch 1` runs only the figures
//! whose label contains that text (for a profile of one of them).

use std::time::Instant;

use xpyd_runtime::assets::bundled_model;
use xpyd_runtime::engine::kv_storage::KvStorage;
use xpyd_runtime::engine::model::{LogitsFor, Model, SequenceInput, argmax};

const BLOCK_SIZE: usize = 16;

/// CPU seconds this process has used (all threads): on a shared machine it
/// shows the cost of the work where wall time shows the neighbours' load.
fn cpu_secs() -> f64 {
    // SAFETY: all-zero bytes are a valid `rusage` (plain integers).
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}
/// Prompt lengths of the prefill figures.
const PROMPTS: [usize; 2] = [512, 2048];
/// (context, batch) of the decode figures: every sequence has `context`
/// tokens in its cache before the timed steps.
const DECODES: [(usize, usize); 4] = [(16, 1), (16, 8), (1024, 1), (1024, 8)];

/// Token `k` of the bench's token stream (sequence `i` of a decode figure
/// starts at `i * context`).
fn token(k: usize) -> u32 {
    100 + ((k * 37) % 40_000) as u32
}

/// Whether the figure labelled `label` runs (see `XPYD_BENCH_ONLY`).
fn wanted(label: &str) -> bool {
    std::env::var("XPYD_BENCH_ONLY").map_or(true, |only| label.contains(only.as_str()))
}

fn main() {
    let model = Model::load_gguf(&bundled_model().expect("bundled model")).expect("model loads");
    let steps: usize = std::env::var("XPYD_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    println!(
        "threads: {}, kernels: {} ({} lowers them)",
        rayon::current_num_threads(),
        xpyd_runtime::engine::cpu::kernels().as_str(),
        xpyd_runtime::engine::cpu::matmul::KERNELS_ENV
    );

    // Prefill: one prompt, logits for its last token.
    for prompt_len in PROMPTS {
        let label = format!("prefill {prompt_len} tokens");
        if !wanted(&label) {
            continue;
        }
        let prompt: Vec<u32> = (0..prompt_len).map(token).collect();
        let blocks = prompt_len.div_ceil(BLOCK_SIZE);
        let mut kv = KvStorage::new(model.kv_shape(blocks, BLOCK_SIZE)).unwrap();
        let table: Vec<u32> = (0..blocks as u32).collect();
        let seq = SequenceInput {
            tokens: &prompt,
            start_pos: 0,
            block_table: &table,
        };
        let (start, cpu) = (Instant::now(), cpu_secs());
        model
            .forward(&mut kv, &[seq], LogitsFor::LastToken)
            .unwrap();
        let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_secs() - cpu);
        println!(
            "{label}: {secs:.2} s wall, {:.1} tok/s; {:.1} tok per CPU-s",
            prompt_len as f64 / secs,
            prompt_len as f64 / cpu
        );
    }

    for (context, batch) in DECODES {
        let label = format!("decode batch {batch}, context {context}");
        if !wanted(&label) {
            continue;
        }
        let blocks_per_seq = (context + steps).div_ceil(BLOCK_SIZE);
        let mut kv = KvStorage::new(model.kv_shape(batch * blocks_per_seq, BLOCK_SIZE)).unwrap();
        let tables: Vec<Vec<u32>> = (0..batch)
            .map(|i| ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect())
            .collect();
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|i| (i * context..(i + 1) * context).map(token).collect())
            .collect();
        let inputs: Vec<SequenceInput> = (0..batch)
            .map(|i| SequenceInput {
                tokens: &prompts[i],
                start_pos: 0,
                block_table: &tables[i],
            })
            .collect();
        let logits = model
            .forward(&mut kv, &inputs, LogitsFor::LastToken)
            .unwrap();
        let mut next: Vec<[u32; 1]> = logits.iter().map(|l| [argmax(l).unwrap() as u32]).collect();
        let (start, cpu) = (Instant::now(), cpu_secs());
        for step in 0..steps {
            let inputs: Vec<SequenceInput> = (0..batch)
                .map(|i| SequenceInput {
                    tokens: &next[i],
                    start_pos: context + step,
                    block_table: &tables[i],
                })
                .collect();
            let logits = model
                .forward(&mut kv, &inputs, LogitsFor::LastToken)
                .unwrap();
            next = logits.iter().map(|l| [argmax(l).unwrap() as u32]).collect();
        }
        let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_secs() - cpu);
        println!(
            "{label}: {steps} steps in {secs:.2} s wall, {:.1} tok/s ({:.1} ms/step); {:.1} tok per CPU-s",
            (batch * steps) as f64 / secs,
            secs * 1000.0 / steps as f64,
            (batch * steps) as f64 / cpu
        );
    }
}
