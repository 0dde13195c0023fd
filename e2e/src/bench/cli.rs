//! `xpyd-bench`'s command line and its top level: load the tokenizer, ask
//! the server for its model if none is named, run the load, print the
//! table, write the JSON export (and the plot). The binary is a thin shell
//! over [`main_with`], so tests run exactly what a user runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use xpyd_runtime::engine::gguf::GgufFile;
use xpyd_runtime::engine::tokenizer::Tokenizer;

use super::client::Endpoint;
use super::load::{self, LoadShape, RunResult, Target};
use super::report::{self, LatencyMetric, TableContext};
use super::stats::Metrics;
use super::workload::Workload;

/// Which prompts to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Independent prompts of `--input-len` ± `--input-len-stddev` tokens.
    Random,
    /// `--sessions` conversations sharing a `--system-prompt-len` prefix,
    /// `--turns` turns each of `--turn-len` new tokens.
    SharedPrefix,
}

/// Load generator for OpenAI-compatible servers; prints `vllm bench serve`'s table.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "xpyd-bench", version)]
pub struct BenchArgs {
    /// Server base URL (without /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// API the prompts go to.
    #[arg(long, value_enum, default_value = "completions")]
    pub endpoint: Endpoint,
    /// Model name to send; default: the first model of GET /v1/models.
    #[arg(long)]
    pub model: Option<String>,
    /// GGUF file whose tokenizer sizes the prompts; default: the bundled SmolLM2.
    #[arg(long)]
    pub tokenizer_model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "random")]
    pub workload: WorkloadKind,
    /// Mean prompt length in tokens (random workload).
    #[arg(long, default_value_t = 1000)]
    pub input_len: usize,
    /// Standard deviation of the prompt length (0: every prompt exactly --input-len).
    #[arg(long, default_value_t = 0.0)]
    pub input_len_stddev: f64,
    /// Output tokens per request (exact unless --no-exact-output).
    #[arg(long, default_value_t = 100)]
    pub output_len: usize,
    /// Do not send min_tokens/ignore_eos (for servers that reject them).
    #[arg(long)]
    pub no_exact_output: bool,
    /// Shared-prefix workload: number of sessions.
    #[arg(long, default_value_t = 8)]
    pub sessions: usize,
    /// Shared-prefix workload: requests per session, sent one after another.
    #[arg(long, default_value_t = 3)]
    pub turns: usize,
    /// Shared-prefix workload: tokens of the common system prompt.
    #[arg(long, default_value_t = 512)]
    pub system_prompt_len: usize,
    /// Shared-prefix workload: new tokens per turn.
    #[arg(long, default_value_t = 64)]
    pub turn_len: usize,
    /// Requests to send (random workload; default 100 unless --duration is set).
    #[arg(long)]
    pub num_prompts: Option<usize>,
    /// Stop issuing requests after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests per second (inf: all at once, limited by --max-concurrency).
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// Gamma shape of the arrival gaps: 1 is Poisson, below 1 burstier.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Most requests in flight.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Requests sent before the measured run, not counted.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds one request may take before it counts as timed out.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Latencies the table shows.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ttft,tpot,itl"
    )]
    pub percentile_metrics: Vec<LatencyMetric>,
    /// Percentiles the table shows.
    #[arg(long, value_delimiter = ',', default_value = "99")]
    pub metric_percentiles: Vec<f64>,
    /// Write the figures and every request's timings here (JSON).
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    /// Draw the TTFT, TPOT and ITL distributions into this PNG.
    #[arg(long)]
    pub plot_file: Option<PathBuf>,
    /// TrueType font for the plot's labels.
    #[arg(long, default_value = super::plot::DEFAULT_FONT)]
    pub plot_font: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// What a run produced.
pub struct Outcome {
    pub metrics: Metrics,
    pub run: RunResult,
    pub table: String,
}

/// Runs the benchmark `args` describe and prints its table to stdout.
pub async fn main_with(args: BenchArgs) -> anyhow::Result<Outcome> {
    check(&args)?;
    let tokenizer_path = match &args.tokenizer_model {
        Some(p) => p.clone(),
        None => xpyd_runtime::assets::bundled_model()?,
    };
    let tokenizer = {
        let gguf = GgufFile::open(&tokenizer_path)
            .with_context(|| format!("cannot open {}", tokenizer_path.display()))?;
        Arc::new(Tokenizer::from_gguf(&gguf)?)
    };
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&args.base_url).await?,
    };
    let workload = match args.workload {
        WorkloadKind::Random => Workload::Random {
            input_len: args.input_len,
            input_stddev: args.input_len_stddev,
            output_len: args.output_len,
        },
        WorkloadKind::SharedPrefix => Workload::SharedPrefix {
            sessions: args.sessions,
            turns: args.turns,
            system_len: args.system_prompt_len,
            turn_len: args.turn_len,
            output_len: args.output_len,
        },
    };
    let num_requests = match (args.num_prompts, args.duration, args.workload) {
        (Some(n), _, _) => Some(n),
        (None, None, WorkloadKind::Random) => Some(100),
        _ => None,
    };
    let shape = LoadShape {
        request_rate: args.request_rate,
        burstiness: args.burstiness,
        max_concurrency: args.max_concurrency,
        num_requests,
        duration: args.duration.map(Duration::from_secs_f64),
        warmup: args.warmup,
        seed: args.seed,
    };
    let target = Target {
        base_url: args.base_url.clone(),
        endpoint: args.endpoint,
        model,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
        exact_output: !args.no_exact_output,
    };
    println!(
        "xpyd-bench: {} {} model {}, {:?} workload, request rate {}, burstiness {}, max concurrency {}",
        target.base_url,
        target.endpoint.path(),
        target.model,
        args.workload,
        args.request_rate,
        args.burstiness,
        args.max_concurrency
            .map_or("unlimited".to_string(), |c| c.to_string()),
    );
    let run = load::run(&workload, &shape, &target, tokenizer, !args.no_progress).await?;
    let metrics = Metrics::compute(&run.records, run.duration_s, &args.metric_percentiles);
    let context = TableContext {
        max_concurrency: args.max_concurrency,
        request_rate: args.request_rate,
        warmup_requests: run.warmup.len(),
        warmup_failed: run.warmup.iter().filter(|r| !r.success).count(),
    };
    let table = report::table(&metrics, &context, &args.percentile_metrics);
    print!("{table}");
    if run.max_late_s > LATE_NOTE_S {
        println!(
            "note: requests were sent up to {:.0} ms after their drawn arrival times (this client ran late), so arrivals were later and more bunched than drawn",
            run.max_late_s * 1000.0
        );
    }
    if let Some(path) = &args.result_file {
        let export = report::Export {
            config: &args,
            model: &target.model,
            date: chrono::Utc::now().to_rfc3339(),
            metrics: &metrics,
            warmup: &run.warmup,
            requests: &run.records,
        };
        let json = serde_json::to_string_pretty(&export)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
        println!("results: {}", path.display());
    }
    if let Some(path) = &args.plot_file {
        super::plot::latency_png(&run.records, path, &args.plot_font)?;
        println!("plot: {}", path.display());
    }
    Ok(Outcome {
        metrics,
        run,
        table,
    })
}

/// Lateness of a send, in seconds, that the run's output points out.
const LATE_NOTE_S: f64 = 0.1;

fn check(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.request_rate > 0.0,
        "--request-rate must be positive (inf for all at once)"
    );
    anyhow::ensure!(args.burstiness > 0.0, "--burstiness must be positive");
    anyhow::ensure!(args.output_len > 0, "--output-len must be at least 1");
    anyhow::ensure!(
        args.max_concurrency != Some(0),
        "--max-concurrency must be at least 1"
    );
    anyhow::ensure!(
        args.request_timeout > 0.0,
        "--request-timeout must be positive"
    );
    if let Some(d) = args.duration {
        anyhow::ensure!(d > 0.0, "--duration must be positive");
    }
    if args.workload == WorkloadKind::Random {
        anyhow::ensure!(args.input_len > 0, "--input-len must be at least 1");
    }
    Ok(())
}

async fn first_model(base_url: &str) -> anyhow::Result<String> {
    let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let list: serde_json::Value = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()
        .with_context(|| format!("GET {url}"))?
        .json()
        .await
        .with_context(|| format!("GET {url}: not JSON"))?;
    list["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("GET {url} lists no model; pass --model"))
}
