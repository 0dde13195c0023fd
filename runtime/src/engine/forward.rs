//! What the engine thread needs from a model: [`ForwardModel`], the one
//! seam between the step loop ([`super::runner`]) and whatever computes a
//! step — the CPU [`Model`], the simulated [`super::sim::SimModel`], and
//! later the CUDA model.
//!
//! It is not the scheduler, the block pool or sampling: those stay in the
//! runner and are the same for every model, which is what lets the
//! simulated model keep real prefix caching, block use and KV events.

use super::config::ModelConfig;
use super::kv_storage::{KvShape, KvStorage};
use super::model::{LogitsFor, Model, ModelError, SequenceInput};

/// A model the engine thread can run: its shape, the KV cache it wants,
/// and one batched forward step.
///
/// The runner is generic over it (`Engine::start<M: ForwardModel>`), not a
/// `Box<dyn ForwardModel>`: the CPU path then compiles exactly as before,
/// and since only the engine thread holds the model, the handle callers
/// see stays one non-generic type. A caller that picks the model at run
/// time (the agent's `--device`) passes a `Box<dyn ForwardModel>`, which
/// implements the trait too; one virtual call per step costs nothing next
/// to a forward pass.
///
/// # The CUDA model
///
/// `cuda::model::CudaModel` has the same `config`, `kv_shape` and
/// `forward` over a batch of [`SequenceInput`]s, but its K/V live in device
/// memory (`CudaKvCache`), not in a host [`KvStorage`]. It would implement
/// this trait once the KV memory becomes an associated type
/// (`type Kv`, built by the model from a [`KvShape`]) whose regions the
/// transfer agent registers (VRAM for NIXL); the runner's `WithKv` jobs
/// would then receive `&mut M::Kv`. That change waits for the CUDA model to
/// run on a GPU, so the trait keeps the host cache for now.
pub trait ForwardModel: Send + 'static {
    /// The model's shape: vocabulary and context length bound requests.
    fn config(&self) -> &ModelConfig;

    /// The KV cache this model needs for `num_blocks` blocks of
    /// `block_size` tokens. The runner allocates it once, and it is what a
    /// transfer engine registers and moves.
    fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape;

    /// Runs one step for a batch of sequences: writes the new tokens' K/V
    /// into their blocks and returns logits per sequence, as
    /// [`Model::forward`] documents. Inputs are validated here (token ids,
    /// context, block tables), never trusted.
    fn forward(
        &mut self,
        kv: &mut KvStorage,
        batch: &[SequenceInput<'_>],
        logits_for: LogitsFor<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError>;
}

impl ForwardModel for Model {
    fn config(&self) -> &ModelConfig {
        Model::config(self)
    }

    fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape {
        Model::kv_shape(self, num_blocks, block_size)
    }

    fn forward(
        &mut self,
        kv: &mut KvStorage,
        batch: &[SequenceInput<'_>],
        logits_for: LogitsFor<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        Model::forward(self, kv, batch, logits_for)
    }
}

impl<M: ForwardModel + ?Sized> ForwardModel for Box<M> {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }

    fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape {
        (**self).kv_shape(num_blocks, block_size)
    }

    fn forward(
        &mut self,
        kv: &mut KvStorage,
        batch: &[SequenceInput<'_>],
        logits_for: LogitsFor<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        (**self).forward(kv, batch, logits_for)
    }
}
