//! `xpyd-bench` against the real `xpyd-agent up`: a short load completes
//! with zero errors, every request has the exact lengths asked for, and the
//! JSON export holds every request with plausible timings. Speed is not
//! asserted (see docs/benchmarks.md for figures).

mod common;

use clap::Parser;
use xpyd_e2e::bench::cli::{BenchArgs, main_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_load_against_up_completes_with_exact_lengths_and_no_errors() {
    let up = common::Up::start(&["--num-blocks", "256"]);
    let dir = std::env::temp_dir().join(format!("xpyd-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let result_file = dir.join("result.json");
    let args = BenchArgs::parse_from([
        "xpyd-bench",
        "--base-url",
        &up.url,
        "--input-len",
        "64",
        "--output-len",
        "16",
        "--num-prompts",
        "8",
        "--max-concurrency",
        "2",
        "--warmup",
        "1",
        "--request-timeout",
        "120",
        "--seed",
        "1",
        "--no-progress",
        "--result-file",
        result_file.to_str().unwrap(),
    ]);
    let outcome = main_with(args).await.expect("the benchmark runs");
    let m = &outcome.metrics;
    assert_eq!(m.failed, 0, "{}", outcome.table);
    assert_eq!(m.completed, 8, "{}", outcome.table);
    assert_eq!(m.total_input, 8 * 64);
    assert_eq!(m.total_output, 8 * 16);
    assert!(
        outcome
            .table
            .contains("Successful requests:                     8")
    );

    let export: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&result_file).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let requests = export["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 8);
    assert_eq!(export["warmup"].as_array().unwrap().len(), 1);
    assert_eq!(export["metrics"]["completed"], 8);
    for r in requests {
        let ttft = r["ttft_s"].as_f64().unwrap();
        let e2e = r["e2e_s"].as_f64().unwrap();
        assert!(r["success"].as_bool().unwrap(), "{r}");
        assert!(ttft > 0.0 && ttft <= e2e && e2e < 120.0, "{r}");
        assert_eq!(r["output_tokens"], 16, "{r}");
        assert_eq!(r["output_tokens_source"], "usage", "{r}");
        // The server counts the prompt as the client's tokenizer did.
        assert_eq!(r["prompt_len"], 64, "{r}");
        assert_eq!(r["server_prompt_tokens"], 64, "{r}");
        // Each gap is one streamed chunk after the first; 16 tokens give at
        // most 15, and their sum is the time after the first chunk.
        let itl: Vec<f64> = r["itl_s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(!itl.is_empty() && itl.len() <= 15, "{r}");
        assert!((itl.iter().sum::<f64>() - (e2e - ttft)).abs() < 1e-6, "{r}");
    }
}
