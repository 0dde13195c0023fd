//! What every worker process builds the same way: the model (the CPU one,
//! or the simulated one of `--device sim`), its engine, the NIXL agent over
//! the engine's KV memory, and the registration record.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::mpsc::UnboundedSender;
use xpyd_runtime::assets;
use xpyd_runtime::discovery::{Capacity, InstanceRecord, Role};
use xpyd_runtime::engine::block_pool::KvEvent;
use xpyd_runtime::engine::config::ModelConfig;
use xpyd_runtime::engine::device::{self, DeviceChoice, ResolvedDevice};
use xpyd_runtime::engine::forward::ForwardModel;
use xpyd_runtime::engine::gguf::GgufFile;
use xpyd_runtime::engine::kv_storage::KvShape;
use xpyd_runtime::engine::model::Model;
use xpyd_runtime::engine::runner::{Engine, EngineConfig, EngineHandle};
use xpyd_runtime::engine::sim::{SIM_DEVICE, SimModel, SimProfile};
use xpyd_runtime::engine::tokenizer::Tokenizer;
use xpyd_runtime::model_source::{self, ModelSource, ResolveOptions, Resolved};
use xpyd_runtime::transfer::{KvMemory, TransferAgent, weights_digest};

/// Which model to serve and under what name.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: a GGUF path, an `http(s)://` URL, `hf://<org>/<repo>[@<rev>]/<file>`
    /// or `pvc://<claim>/<path>`; default: the bundled SmolLM2-135M-Instruct.
    /// The hub is `HF_ENDPOINT` (default https://huggingface.co), its token `HF_TOKEN`.
    #[arg(long, env = "XPYD_MODEL")]
    pub model: Option<String>,
    /// Expected sha256 of the model file (64 hex digits).
    #[arg(long, env = "XPYD_MODEL_SHA256")]
    pub model_sha256: Option<String>,
    /// Folder downloads go to; default `$XPYD_CACHE/models` (`~/.cache/xpyd/models`).
    #[arg(long, env = "XPYD_MODEL_CACHE")]
    pub model_cache: Option<PathBuf>,
    /// Where `pvc://<claim>` sources are mounted (`<root>/<claim>`).
    #[arg(long, env = "XPYD_PVC_ROOT", default_value = model_source::DEFAULT_PVC_ROOT)]
    pub pvc_root: PathBuf,
    /// Seconds a download may take in all, waiting for another fetcher included.
    #[arg(long, env = "XPYD_MODEL_FETCH_TIMEOUT_SECONDS", default_value_t = 3600)]
    pub fetch_timeout_seconds: u64,
    /// Seconds without a byte from the server before a download is retried.
    #[arg(
        long,
        env = "XPYD_MODEL_FETCH_READ_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub fetch_read_timeout_seconds: u64,
    /// The model name clients send in `model`.
    #[arg(
        long,
        env = "XPYD_SERVED_MODEL_NAME",
        default_value = "SmolLM2-135M-Instruct"
    )]
    pub served_model_name: String,
}

impl ModelArgs {
    /// The model file on this machine: a path or claim file checked to
    /// exist (and to have `--model-sha256`), a URL downloaded into the
    /// model cache (or found there), or the bundled model checked to be the
    /// pinned file.
    pub async fn resolve(&self) -> anyhow::Result<Resolved> {
        let Some(text) = &self.model else {
            let path = assets::bundled_model()?;
            assets::verify_sha256(&path, assets::BUNDLED_MODEL_SHA256)
                .context("the bundled model is not the pinned SmolLM2-135M-Instruct file")?;
            return Ok(Resolved { path, fetch: None });
        };
        let source = ModelSource::parse(text).context("--model / XPYD_MODEL")?;
        let options = ResolveOptions {
            cache_dir: self
                .model_cache
                .clone()
                .unwrap_or_else(|| assets::cache_dir().join("models")),
            pvc_root: self.pvc_root.clone(),
            hf_endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| model_source::DEFAULT_HF_ENDPOINT.to_string()),
            hf_token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
            sha256: self.model_sha256.clone().filter(|s| !s.is_empty()),
            deadline: Duration::from_secs(self.fetch_timeout_seconds),
            read_timeout: Duration::from_secs(self.fetch_read_timeout_seconds.max(1)),
        };
        let resolved = model_source::resolve(&source, &options).await?;
        let (cached, downloaded) = resolved
            .fetch
            .as_ref()
            .map_or((true, 0), |r| (r.cached, r.bytes_downloaded));
        tracing::info!(
            source = %source,
            path = %resolved.path.display(),
            cached,
            bytes_downloaded = downloaded,
            "model ready"
        );
        Ok(resolved)
    }

    /// [`ModelArgs::resolve`], for callers that need only the file.
    pub async fn path(&self) -> anyhow::Result<PathBuf> {
        Ok(self.resolve().await?.path)
    }
}

/// Sizes of an engine.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// KV cache blocks, or `auto`: as many as the memory left after the
    /// weights allows (within the container's limit), up to what
    /// `--max-seqs` sequences of `--max-model-len` tokens can use.
    #[arg(long, env = "XPYD_NUM_BLOCKS", default_value = "512")]
    pub num_blocks: KvBlocks,
    /// Tokens per KV block.
    #[arg(long, env = "XPYD_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Most new tokens in one engine step (chunked-prefill budget).
    #[arg(long, env = "XPYD_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Most sequences in one engine step.
    #[arg(long, env = "XPYD_MAX_SEQS", default_value_t = 16)]
    pub max_seqs: usize,
    /// Most tokens (prompt plus output) of one request.
    #[arg(long, env = "XPYD_MAX_MODEL_LEN", default_value_t = 2048)]
    pub max_model_len: usize,
    /// Where the engine computes: auto, cpu, cuda or cuda:N; or sim, a
    /// simulated engine (real tokenizer, scheduler and KV blocks, timed
    /// steps, placeholder tokens: never an answer).
    #[arg(long, env = "XPYD_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// With `--device sim`: the timing profile (JSON, see docs/sim.md);
    /// default: the CPU engine's, measured on the development machine.
    #[arg(long, env = "XPYD_SIM_PROFILE")]
    pub sim_profile: Option<PathBuf>,
}

/// Check `--device` once at startup. The worker engine runs on the CPU
/// backend in this release: the CUDA kernels are built and tested without a
/// GPU, but the CUDA engine has not run on one yet, so `auto` stays on the
/// CPU and an explicit `cuda` is refused with the reason.
pub fn check_device(choice: DeviceChoice) -> anyhow::Result<()> {
    match device::resolve(choice)? {
        ResolvedDevice::Cpu {
            reason: Some(reason),
        } => {
            tracing::info!("--device auto chose the CPU: {reason}");
        }
        ResolvedDevice::Cpu { reason: None } => tracing::info!("computing on the CPU"),
        ResolvedDevice::Sim => tracing::warn!(
            "--device sim: the engine is SIMULATED; it computes nothing, its steps take the \
             profiled time and its tokens are placeholders, not model answers \
             (responses carry x-xpyd-simulated: true)"
        ),
        ResolvedDevice::Cuda(dev) if choice == DeviceChoice::Auto => tracing::info!(
            gpu = %dev.name,
            "--device auto chose the CPU: the CUDA engine is not enabled in this release"
        ),
        ResolvedDevice::Cuda(dev) => anyhow::bail!(
            "--device {choice}: {} is usable, but the CUDA engine is not enabled in this \
             release (its kernels are built, the engine is unverified on a GPU); use --device cpu",
            dev.name
        ),
    }
    Ok(())
}

impl EngineArgs {
    /// The simulated engine's profile with `--device sim` (`None`: a real
    /// engine); `--sim-profile` without `--device sim` is an error.
    pub fn sim_profile(&self) -> anyhow::Result<Option<SimProfile>> {
        match (&self.sim_profile, self.device) {
            (None, DeviceChoice::Sim) => Ok(Some(SimProfile::default_cpu())),
            (Some(path), DeviceChoice::Sim) => Ok(Some(SimProfile::load(path)?)),
            (Some(_), device) => anyhow::bail!(
                "--sim-profile (XPYD_SIM_PROFILE) needs --device sim, not --device {device}"
            ),
            (None, _) => Ok(None),
        }
    }

    /// The engine's configuration for the model at `model` (whose shape
    /// sizes an `auto` KV cache, split between the `engines` of this process).
    pub fn config(&self, model: &Path, engines: usize) -> anyhow::Result<EngineConfig> {
        let need = self.max_model_len.div_ceil(self.block_size.max(1));
        let num_blocks = match self.num_blocks {
            KvBlocks::Count(n) => {
                anyhow::ensure!(
                    n as usize >= need,
                    "--num-blocks {n} (XPYD_NUM_BLOCKS) of --block-size {} tokens holds {} tokens, \
                     less than one --max-model-len {} sequence: use at least {need} blocks",
                    self.block_size,
                    n as usize * self.block_size,
                    self.max_model_len
                );
                n
            }
            KvBlocks::Auto => {
                let gguf = GgufFile::open(model)
                    .with_context(|| format!("reading {}", model.display()))?;
                let config = ModelConfig::from_gguf(&gguf)?;
                let sim = self.device == DeviceChoice::Sim;
                let shape = if sim {
                    SimModel::kv_shape_for(1, self.block_size)
                } else {
                    KvShape::for_model(&config, 1, self.block_size)
                };
                let block_bytes = (shape.n_layers * 2 * shape.block_region_bytes()) as u64;
                // A simulated engine never loads the weights.
                let weights = match sim {
                    true => 0,
                    false => std::fs::metadata(model).map(|m| m.len()).unwrap_or(0),
                };
                let plan = kv_blocks_for_memory(
                    &memory::available(),
                    engines.max(1) as u64,
                    weights,
                    block_bytes,
                    need,
                    self.max_seqs * need,
                )?;
                tracing::info!(
                    blocks = plan,
                    block_mib = format!("{:.2}", block_bytes as f64 / (1 << 20) as f64),
                    "--num-blocks auto: sized the KV cache from free memory"
                );
                plan
            }
        };
        Ok(EngineConfig {
            num_blocks,
            block_size: self.block_size,
            max_batch_tokens: self.max_batch_tokens,
            max_seqs: self.max_seqs,
            max_model_len: self.max_model_len,
        })
    }
}

/// `--num-blocks`: a count, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvBlocks {
    /// Size from free memory.
    Auto,
    /// This many.
    Count(u32),
}

impl std::str::FromStr for KvBlocks {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(KvBlocks::Auto);
        }
        match s.parse::<u32>() {
            Ok(n) if n > 0 => Ok(KvBlocks::Count(n)),
            _ => Err(format!("{s:?} is neither a positive block count nor auto")),
        }
    }
}

/// Memory an engine must leave for everything but the KV cache: activations,
/// the tokenizer, NIXL and UCX buffers.
const NON_KV_RESERVE: u64 = 512 << 20;

/// KV blocks that fit one of `engines` engines sharing this memory: 90%
/// of the memory left after each engine's weights and [`NON_KV_RESERVE`],
/// split evenly, at most `max_useful`, and an error naming the figures when
/// not even `need` (one longest sequence) fits.
pub fn kv_blocks_for_memory(
    memory: &memory::Available,
    engines: u64,
    weights: u64,
    block_bytes: u64,
    need: usize,
    max_useful: usize,
) -> anyhow::Result<u32> {
    let free = memory.bytes();
    let budget = free.saturating_sub(engines * (weights + NON_KV_RESERVE)) / 10 * 9 / engines;
    let fit = (budget / block_bytes.max(1)) as usize;
    anyhow::ensure!(
        fit >= need,
        "--num-blocks auto: {} MiB free ({}) less {} MiB of weights and {} MiB reserved per \
         engine ({engines} engines) leaves room for {fit} KV blocks of {} KiB per engine, and one \
         --max-model-len sequence needs {need}: raise the memory limit, lower maxModelLen, or \
         set kvCacheBlocks",
        free >> 20,
        memory.source,
        weights >> 20,
        NON_KV_RESERVE >> 20,
        block_bytes >> 10,
    );
    Ok(fit.min(max_useful).min(u32::MAX as usize) as u32)
}

/// Memory this process may still use: the container's limit when there is
/// one, and the machine's available memory.
pub mod memory {
    use std::path::Path;

    /// Free memory and where the figure came from.
    #[derive(Clone, Debug)]
    pub struct Available {
        /// `MemAvailable` of `/proc/meminfo`.
        pub host: u64,
        /// Limit less usage of this process's memory cgroup, when limited.
        pub cgroup: Option<u64>,
        /// Which of the two bound it, for messages.
        pub source: &'static str,
    }

    impl Available {
        /// The binding figure.
        pub fn bytes(&self) -> u64 {
            self.cgroup.map_or(self.host, |c| c.min(self.host))
        }
    }

    fn read_u64(path: &Path) -> Option<u64> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Reads `/proc/meminfo` and the memory cgroup (v2, else v1).
    pub fn available() -> Available {
        let host = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024);
        let v2 = Path::new("/sys/fs/cgroup");
        let v1 = Path::new("/sys/fs/cgroup/memory");
        // "max" (v2) does not parse; a v1 "no limit" is a huge number.
        let cgroup = read_u64(&v2.join("memory.max"))
            .map(|limit| (limit, read_u64(&v2.join("memory.current")).unwrap_or(0)))
            .or_else(|| {
                read_u64(&v1.join("memory.limit_in_bytes"))
                    .filter(|&l| l < (1u64 << 60))
                    .map(|limit| {
                        (
                            limit,
                            read_u64(&v1.join("memory.usage_in_bytes")).unwrap_or(0),
                        )
                    })
            })
            .map(|(limit, usage)| limit.saturating_sub(usage));
        let source = match cgroup {
            Some(c) if c < host => "the container's memory limit",
            _ => "the machine's available memory",
        };
        Available {
            host,
            cgroup,
            source,
        }
    }
}

/// The tokenizer of the model file at `path`.
pub fn load_tokenizer(path: &Path) -> anyhow::Result<Tokenizer> {
    let gguf = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Tokenizer::from_gguf(&gguf)?)
}

/// The `devices` of a worker's record: [`SIM_DEVICE`] for a simulated
/// engine (frontends label its answers by it), else what NVML reports.
pub fn devices(sim: Option<&SimProfile>) -> Vec<String> {
    match sim {
        Some(_) => vec![SIM_DEVICE.to_string()],
        None => crate::gpu::report(),
    }
}

/// An engine over the model at `path` and a NIXL agent named
/// `agent_name` over its KV memory.
pub struct Node {
    pub engine: EngineHandle,
    pub agent: TransferAgent,
}

impl Node {
    /// `sim`: run the simulated engine with this profile instead of the
    /// CPU model (the checkpoint's shape and tokenizer are still read).
    pub fn start(
        path: &Path,
        config: EngineConfig,
        agent_name: &str,
        kv_events: Option<UnboundedSender<KvEvent>>,
        sim: Option<&SimProfile>,
    ) -> anyhow::Result<Node> {
        let gguf = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
        let model: Box<dyn ForwardModel> = match sim {
            Some(profile) => {
                tracing::warn!(profile = %profile.name, "starting a SIMULATED engine");
                Box::new(SimModel::from_gguf(&gguf, profile.clone())?)
            }
            None => Box::new(Model::from_gguf(&gguf)?),
        };
        let engine = Engine::start(model, Some(Tokenizer::from_gguf(&gguf)?), config, kv_events)?;
        let memory = engine
            // SAFETY: the engine keeps its KV memory in place until it shuts
            // down, and `Node::shutdown` drops every agent clone first.
            .with_kv_storage(|kv| unsafe { KvMemory::of_kv_storage(kv) })
            .wait()??;
        let weights =
            weights_digest(path).with_context(|| format!("reading {}", path.display()))?;
        let agent = TransferAgent::for_weights(agent_name, memory, Some(weights))
            .with_context(|| format!("creating NIXL agent {agent_name}"))?;
        Ok(Node { engine, agent })
    }

    /// The registration record of a worker of `role` on this node.
    pub fn record(
        &self,
        instance_id: &str,
        role: Role,
        model: &str,
        http_address: String,
        devices: Vec<String>,
    ) -> InstanceRecord {
        let config = self.engine.config();
        let metadata = self.agent.metadata();
        InstanceRecord {
            instance_id: instance_id.to_string(),
            role,
            model: model.to_string(),
            http_address,
            transfer: Some(metadata.to_metadata()),
            capacity: Some(Capacity {
                num_blocks: config.num_blocks,
                block_size: config.block_size as u32,
                max_model_len: config.max_model_len as u32,
                max_seqs: config.max_seqs as u32,
            }),
            devices,
            kv_layout: Some(metadata.kv_fingerprint(model)),
        }
    }
}

/// A fresh instance id: `prefix` (the pod name) plus a random suffix, so a
/// restarted process never reuses its predecessor's id or NIXL agent name.
pub fn instance_id(prefix: &str) -> String {
    let suffix: u32 = rand::random();
    format!("{prefix}-{suffix:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(host: u64, cgroup: Option<u64>) -> memory::Available {
        memory::Available {
            host,
            cgroup,
            source: "test",
        }
    }

    #[test]
    fn auto_blocks_fit_the_binding_limit_after_the_weights() {
        let gib = 1u64 << 30;
        let block = 720 * 1024;
        // 4 GiB container on a 64 GiB host: the container binds.
        let n = kv_blocks_for_memory(
            &mem(64 * gib, Some(4 * gib)),
            1,
            100 << 20,
            block,
            128,
            1 << 20,
        )
        .unwrap();
        let budget = (4 * gib - (100 << 20) - NON_KV_RESERVE) / 10 * 9;
        assert_eq!(n as u64, budget / block);
        // No more than the sequences can use.
        let n = kv_blocks_for_memory(&mem(64 * gib, None), 1, 100 << 20, block, 128, 2048).unwrap();
        assert_eq!(n, 2048);
        // Two engines in one process split what is left.
        let one =
            kv_blocks_for_memory(&mem(8 * gib, None), 1, 100 << 20, block, 128, 1 << 20).unwrap();
        let two =
            kv_blocks_for_memory(&mem(8 * gib, None), 2, 100 << 20, block, 128, 1 << 20).unwrap();
        let per_engine = (8 * gib - 2 * ((100 << 20) + NON_KV_RESERVE)) / 10 * 9 / 2;
        assert_eq!(two as u64, per_engine / block);
        assert!(two < one / 2, "{one} {two}");
    }

    #[test]
    fn auto_blocks_too_small_for_one_sequence_is_an_error_with_the_figures() {
        let err = kv_blocks_for_memory(
            &mem(1 << 30, Some(600 << 20)),
            1,
            100 << 20,
            720 * 1024,
            512,
            4096,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("one --max-model-len sequence needs 512"),
            "{err}"
        );
        assert!(err.contains("test"), "{err}");
    }

    #[test]
    fn num_blocks_parses_counts_and_auto() {
        assert_eq!("auto".parse::<KvBlocks>(), Ok(KvBlocks::Auto));
        assert_eq!("64".parse::<KvBlocks>(), Ok(KvBlocks::Count(64)));
        assert!("0".parse::<KvBlocks>().is_err());
        assert!("lots".parse::<KvBlocks>().is_err());
    }
}
