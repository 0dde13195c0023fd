//! What every worker process builds the same way: the model, its engine,
//! the NIXL agent over the engine's KV memory, and the registration record.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tokio::sync::mpsc::UnboundedSender;
use xpyd_runtime::assets;
use xpyd_runtime::discovery::{Capacity, InstanceRecord, Role};
use xpyd_runtime::engine::block_pool::KvEvent;
use xpyd_runtime::engine::device::{self, DeviceChoice, ResolvedDevice};
use xpyd_runtime::engine::gguf::GgufFile;
use xpyd_runtime::engine::model::Model;
use xpyd_runtime::engine::runner::{Engine, EngineConfig, EngineHandle};
use xpyd_runtime::engine::tokenizer::Tokenizer;
use xpyd_runtime::transfer::{KvMemory, TransferAgent};

/// Which model to serve and under what name.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file; default: the bundled SmolLM2-135M-Instruct.
    #[arg(long, env = "XPYD_MODEL")]
    pub model: Option<PathBuf>,
    /// The model name clients send in `model`.
    #[arg(
        long,
        env = "XPYD_SERVED_MODEL_NAME",
        default_value = "SmolLM2-135M-Instruct"
    )]
    pub served_model_name: String,
}

impl ModelArgs {
    /// The model file, checked to exist (and, for the bundled one, to be
    /// the pinned file).
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(path) => {
                anyhow::ensure!(
                    path.is_file(),
                    "model file {} (--model / XPYD_MODEL) does not exist",
                    path.display()
                );
                Ok(path.clone())
            }
            None => {
                let path = assets::bundled_model()?;
                assets::verify_sha256(&path, assets::BUNDLED_MODEL_SHA256)
                    .context("the bundled model is not the pinned SmolLM2-135M-Instruct file")?;
                Ok(path)
            }
        }
    }
}

/// Sizes of an engine.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// KV cache blocks.
    #[arg(long, env = "XPYD_NUM_BLOCKS", default_value_t = 512)]
    pub num_blocks: u32,
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
    /// Where the engine computes: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "XPYD_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
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
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            num_blocks: self.num_blocks,
            block_size: self.block_size,
            max_batch_tokens: self.max_batch_tokens,
            max_seqs: self.max_seqs,
            max_model_len: self.max_model_len,
        }
    }
}

/// The tokenizer of the model file at `path`.
pub fn load_tokenizer(path: &Path) -> anyhow::Result<Tokenizer> {
    let gguf = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Tokenizer::from_gguf(&gguf)?)
}

/// An engine over the model at `path` and a NIXL agent named
/// `agent_name` over its KV memory.
pub struct Node {
    pub engine: EngineHandle,
    pub agent: TransferAgent,
}

impl Node {
    pub fn start(
        path: &Path,
        config: EngineConfig,
        agent_name: &str,
        kv_events: Option<UnboundedSender<KvEvent>>,
    ) -> anyhow::Result<Node> {
        let gguf = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
        let model = Model::from_gguf(&gguf)?;
        let engine = Engine::start(model, Some(Tokenizer::from_gguf(&gguf)?), config, kv_events)?;
        let memory = engine
            // SAFETY: the engine keeps its KV memory in place until it shuts
            // down, and `Node::shutdown` drops every agent clone first.
            .with_kv_storage(|kv| unsafe { KvMemory::of_kv_storage(kv) })??;
        let agent = TransferAgent::new(agent_name, memory)
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
        InstanceRecord {
            instance_id: instance_id.to_string(),
            role,
            model: model.to_string(),
            http_address,
            transfer: Some(self.agent.metadata()),
            capacity: Some(Capacity {
                num_blocks: config.num_blocks,
                block_size: config.block_size as u32,
                max_model_len: config.max_model_len as u32,
                max_seqs: config.max_seqs as u32,
            }),
            devices,
        }
    }
}

/// A fresh instance id: `prefix` (the pod name) plus a random suffix, so a
/// restarted process never reuses its predecessor's id or NIXL agent name.
pub fn instance_id(prefix: &str) -> String {
    let suffix: u32 = rand::random();
    format!("{prefix}-{suffix:08x}")
}
