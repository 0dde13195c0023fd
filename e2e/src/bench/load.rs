//! The load shape and the loop that sends a workload: requests arrive at
//! `request_rate` per second with gamma-distributed gaps (shape
//! `burstiness`, mean `1 / request_rate`; burstiness 1 is a Poisson process,
//! as in vLLM), or all at once when the rate is infinite; at most
//! `max_concurrency` are in flight. The run stops issuing after a request
//! count or a duration (every arrival drawn within it is sent, late or not;
//! the run reports how late at most, [`RunResult::max_late_s`]) and then
//! waits for what is in flight. Warm-up
//! requests go first and are reported apart, never mixed into the figures.
//!
//! A request's clock starts when it is sent, after it got a concurrency
//! slot, as in vLLM. Prompts are drawn in arrival order from one seeded
//! generator, so a seed fixes what is sent whatever the timing.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use xpyd_runtime::engine::tokenizer::Tokenizer;

use super::client::{self, Endpoint, RequestSpec};
use super::stats::RequestRecord;
use super::workload::{PromptVocab, Session, Workload, WorkloadError, input_length};

/// When and how many requests go out.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadShape {
    /// Requests per second; `f64::INFINITY` sends them all at once.
    pub request_rate: f64,
    /// Gamma shape of the gaps: 1 is Poisson, lower is burstier.
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    /// Stop issuing after this many requests (shared-prefix: sessions are
    /// issued whole, so the count is rounded up to whole sessions).
    pub num_requests: Option<usize>,
    /// Send the arrivals drawn within this long (all at once: stop issuing
    /// after it).
    pub duration: Option<Duration>,
    /// Requests sent and awaited before the measured run.
    pub warmup: usize,
    pub seed: u64,
}

/// Where and what to send.
#[derive(Debug, Clone)]
pub struct Target {
    pub base_url: String,
    pub endpoint: Endpoint,
    pub model: String,
    pub request_timeout: Duration,
    pub exact_output: bool,
}

/// The requests of one run, in issue order, and how long it took (from the
/// first request issued to the last one finished).
#[derive(Debug, Clone)]
pub struct RunResult {
    pub records: Vec<RequestRecord>,
    pub duration_s: f64,
    pub warmup: Vec<RequestRecord>,
    /// The latest any request was sent after its drawn arrival time, in
    /// seconds (0 when every one left on time, or with no arrival times).
    pub max_late_s: f64,
}

/// Gaps between arrivals: gamma(shape = burstiness, scale = 1 / (rate *
/// burstiness)), vLLM's choice; zero for an infinite rate.
pub struct Arrivals {
    rng: StdRng,
    rate: f64,
    burstiness: f64,
}

impl Arrivals {
    pub fn new(rate: f64, burstiness: f64, seed: u64) -> Self {
        Arrivals {
            // Its own stream, so the prompts do not depend on the rate.
            rng: StdRng::seed_from_u64(seed ^ 0x5eed_a771_7a15),
            rate,
            burstiness,
        }
    }

    /// Seconds until the next arrival.
    pub fn next_gap(&mut self) -> f64 {
        if !self.rate.is_finite() {
            return 0.0;
        }
        gamma(&mut self.rng, self.burstiness) / (self.rate * self.burstiness)
    }
}

/// A gamma(shape, 1) draw (Marsaglia and Tsang; shape < 1 boosted).
pub fn gamma(rng: &mut StdRng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = 1.0 - rng.random::<f64>();
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = super::workload::standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = 1.0 - rng.random::<f64>();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// One unit of work: a single request, or a whole session of turns.
enum Job {
    Single { prompt: String, prompt_len: usize },
    Session(Session),
}

/// Makes jobs in order from one seeded generator.
struct JobMaker<'a> {
    workload: &'a Workload,
    tokenizer: &'a Tokenizer,
    vocab: PromptVocab,
    rng: StdRng,
    system: String,
    made: usize,
}

impl<'a> JobMaker<'a> {
    fn new(
        workload: &'a Workload,
        tokenizer: &'a Tokenizer,
        seed: u64,
    ) -> Result<Self, WorkloadError> {
        let vocab = PromptVocab::new(tokenizer)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let system = match workload {
            Workload::SharedPrefix { system_len, .. } => {
                vocab.prompt(tokenizer, &mut rng, *system_len)?
            }
            Workload::Random { .. } => String::new(),
        };
        Ok(JobMaker {
            workload,
            tokenizer,
            vocab,
            rng,
            system,
            made: 0,
        })
    }

    /// Requests per job.
    fn requests_per_job(&self) -> usize {
        match self.workload {
            Workload::Random { .. } => 1,
            Workload::SharedPrefix { turns, .. } => *turns,
        }
    }

    /// The next job, or `None` when a fixed set (sessions) is used up.
    fn next(&mut self) -> Result<Option<Job>, WorkloadError> {
        let id = self.made;
        self.made += 1;
        match *self.workload {
            Workload::Random {
                input_len,
                input_stddev,
                ..
            } => {
                let len = input_length(&mut self.rng, input_len, input_stddev);
                let prompt = self.vocab.prompt(self.tokenizer, &mut self.rng, len)?;
                Ok(Some(Job::Single {
                    prompt,
                    prompt_len: len,
                }))
            }
            Workload::SharedPrefix {
                sessions,
                turns,
                turn_len,
                ..
            } => {
                if id >= sessions {
                    return Ok(None);
                }
                Ok(Some(Job::Session(Session::new(
                    id,
                    &self.system,
                    &self.vocab,
                    self.tokenizer,
                    &mut self.rng,
                    turns,
                    turn_len,
                )?)))
            }
        }
    }
}

/// What every job task shares.
struct Shared {
    http: reqwest::Client,
    target: Target,
    output_len: usize,
    slots: Option<Semaphore>,
    done: AtomicUsize,
    failed: AtomicUsize,
    start: Instant,
}

impl Shared {
    async fn request(
        &self,
        index: usize,
        prompt: String,
        prompt_len: usize,
    ) -> (RequestRecord, client::Generated) {
        let _slot = match &self.slots {
            // The semaphore is never closed, so acquire only fails if it was.
            Some(s) => s.acquire().await.ok(),
            None => None,
        };
        let spec = RequestSpec {
            endpoint: self.target.endpoint,
            model: self.target.model.clone(),
            prompt,
            output_len: self.output_len,
            exact_output: self.target.exact_output,
        };
        let mut record = RequestRecord::new(index, prompt_len, self.output_len);
        record.start_s = self.start.elapsed().as_secs_f64();
        let generated = client::send(
            &self.http,
            &self.target.base_url,
            &spec,
            self.target.request_timeout,
            &mut record,
        )
        .await;
        self.done.fetch_add(1, Ordering::Relaxed);
        if !record.success {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        (record, generated)
    }

    async fn run(&self, job: Job, first_index: usize, tokenizer: &Tokenizer) -> Vec<RequestRecord> {
        match job {
            Job::Single { prompt, prompt_len } => {
                vec![self.request(first_index, prompt, prompt_len).await.0]
            }
            Job::Session(mut session) => {
                let mut records = Vec::new();
                while let Some((turn, prompt)) = session.next_prompt() {
                    let prompt_len = tokenizer.encode(&prompt).map_or(0, |ids| ids.len());
                    let (mut record, generated) =
                        self.request(first_index + turn, prompt, prompt_len).await;
                    record.session = Some(session.id);
                    record.turn = Some(turn);
                    let ok = record.success;
                    records.push(record);
                    if !ok {
                        // The history is broken; the later turns are not sent
                        // and so not counted: the failure is.
                        break;
                    }
                    session.answer(&generated.text);
                }
                records
            }
        }
    }
}

/// Runs the warm-up, then the measured load, printing progress to stderr
/// when `progress` is set.
pub async fn run(
    workload: &Workload,
    shape: &LoadShape,
    target: &Target,
    tokenizer: Arc<Tokenizer>,
    progress: bool,
) -> anyhow::Result<RunResult> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let warmup = if shape.warmup > 0 {
        // Warm-up prompts have the measured run's shape but their own seed.
        let warm_shape = LoadShape {
            request_rate: f64::INFINITY,
            num_requests: Some(shape.warmup),
            duration: None,
            warmup: 0,
            seed: shape.seed.wrapping_add(0x7a43_u64),
            ..shape.clone()
        };
        let warm_workload = match workload {
            Workload::SharedPrefix { output_len, .. } => Workload::Random {
                input_len: 64,
                input_stddev: 0.0,
                output_len: *output_len,
            },
            w => w.clone(),
        };
        if progress {
            eprintln!("warm-up: {} requests", shape.warmup);
        }
        measure(
            &warm_workload,
            &warm_shape,
            target,
            &tokenizer,
            &http,
            false,
        )
        .await?
        .records
    } else {
        Vec::new()
    };
    let mut result = measure(workload, shape, target, &tokenizer, &http, progress).await?;
    result.warmup = warmup;
    Ok(result)
}

async fn measure(
    workload: &Workload,
    shape: &LoadShape,
    target: &Target,
    tokenizer: &Arc<Tokenizer>,
    http: &reqwest::Client,
    progress: bool,
) -> anyhow::Result<RunResult> {
    let mut maker = JobMaker::new(workload, tokenizer, shape.seed)?;
    if progress {
        eprintln!(
            "prompts drawn from {} word tokens of the tokenizer",
            maker.vocab.len()
        );
    }
    let per_job = maker.requests_per_job();
    let total = match (shape.num_requests, workload) {
        (Some(n), _) => Some(n.div_ceil(per_job) * per_job),
        (
            None,
            Workload::SharedPrefix {
                sessions, turns, ..
            },
        ) => Some(sessions * turns),
        (None, Workload::Random { .. }) => None,
    };
    let mut arrivals = Arrivals::new(shape.request_rate, shape.burstiness, shape.seed);
    let shared = Arc::new(Shared {
        http: http.clone(),
        target: target.clone(),
        output_len: workload.output_len(),
        slots: shape.max_concurrency.map(Semaphore::new),
        done: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        start: Instant::now(),
    });
    let ticker = progress.then(|| {
        let shared = shared.clone();
        let duration = shape.duration;
        tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let mut last_line = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let line = progress_line(&shared, total, duration);
                if tty {
                    eprint!("\r{line}   ");
                    let _ = std::io::stderr().flush();
                } else if last_line.elapsed() >= Duration::from_secs(10) {
                    eprintln!("{line}");
                    last_line = Instant::now();
                }
            }
        })
    });

    let mut tasks = JoinSet::new();
    let mut issued = 0usize;
    let mut next_at = 0.0f64;
    let mut max_late_s = 0.0f64;
    loop {
        if total.is_some_and(|t| issued >= t) {
            break;
        }
        // Every arrival drawn within the duration is sent, late if the
        // loop runs late: a wall-clock cut-off would silently drop a
        // phase's last arrivals whenever the client is busy. (All at once,
        // there are no arrival times, and the wall clock ends the run.)
        if shape.duration.is_some_and(|d| {
            if shape.request_rate.is_finite() {
                next_at >= d.as_secs_f64()
            } else {
                shared.start.elapsed() >= d
            }
        }) {
            break;
        }
        let Some(job) = maker.next()? else { break };
        let wait = next_at - shared.start.elapsed().as_secs_f64();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        } else if shape.request_rate.is_finite() {
            max_late_s = max_late_s.max(-wait);
        }
        next_at += arrivals.next_gap();
        let first_index = issued;
        issued += per_job;
        let (shared, tokenizer) = (shared.clone(), tokenizer.clone());
        tasks.spawn(async move { shared.run(job, first_index, &tokenizer).await });
    }
    let mut records = Vec::with_capacity(issued);
    while let Some(joined) = tasks.join_next().await {
        // A panicking job is a bug in this tool, not a server failure.
        records.extend(joined?);
    }
    let duration_s = shared.start.elapsed().as_secs_f64();
    if let Some(t) = ticker {
        t.abort();
        eprintln!("\r{}", progress_line(&shared, total, shape.duration));
    }
    records.sort_by_key(|r| r.index);
    Ok(RunResult {
        records,
        duration_s,
        warmup: Vec::new(),
        max_late_s,
    })
}

fn progress_line(shared: &Shared, total: Option<usize>, duration: Option<Duration>) -> String {
    let done = shared.done.load(Ordering::Relaxed);
    let failed = shared.failed.load(Ordering::Relaxed);
    let elapsed = shared.start.elapsed().as_secs_f64();
    let fraction = match (total, duration) {
        (Some(t), _) if t > 0 => done as f64 / t as f64,
        (_, Some(d)) => elapsed / d.as_secs_f64(),
        _ => 0.0,
    }
    .clamp(0.0, 1.0);
    let width = 30;
    let filled = (fraction * width as f64).round() as usize;
    let count = total.map_or(format!("{done}"), |t| format!("{done}/{t}"));
    format!(
        "[{}{}] {:>3.0}% {count} requests, {failed} failed, {elapsed:.1} s",
        "#".repeat(filled),
        "-".repeat(width - filled),
        fraction * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::{mean, std_dev};

    #[test]
    fn poisson_arrivals_have_the_asked_mean_rate() {
        let mut a = Arrivals::new(10.0, 1.0, 42);
        let gaps: Vec<f64> = (0..50_000).map(|_| a.next_gap()).collect();
        let m = mean(&gaps);
        // Exponential gaps: mean 0.1 s, stddev 0.1 s.
        assert!((m - 0.1).abs() < 0.002, "mean gap {m}");
        assert!((std_dev(&gaps) - 0.1).abs() < 0.003);
        // 50 000 arrivals span 5 000 s at 10/s.
        assert!((gaps.iter().sum::<f64>() / 5000.0 - 1.0).abs() < 0.02);
    }

    #[test]
    fn burstiness_keeps_the_rate_and_widens_the_gaps() {
        let mut bursty = Arrivals::new(4.0, 0.25, 1);
        let gaps: Vec<f64> = (0..50_000).map(|_| bursty.next_gap()).collect();
        // Gamma(k, 1/(r k)): mean 1/r = 0.25, stddev 1/(r sqrt k) = 0.5.
        assert!((mean(&gaps) - 0.25).abs() < 0.01, "{}", mean(&gaps));
        assert!((std_dev(&gaps) - 0.5).abs() < 0.03, "{}", std_dev(&gaps));
        assert_eq!(Arrivals::new(f64::INFINITY, 1.0, 0).next_gap(), 0.0);
    }

    #[test]
    fn arrivals_follow_the_seed() {
        let a: Vec<f64> = {
            let mut x = Arrivals::new(2.0, 1.0, 9);
            (0..5).map(|_| x.next_gap()).collect()
        };
        let b: Vec<f64> = {
            let mut x = Arrivals::new(2.0, 1.0, 9);
            (0..5).map(|_| x.next_gap()).collect()
        };
        assert_eq!(a, b);
    }
}
