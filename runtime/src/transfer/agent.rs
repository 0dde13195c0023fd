//! One NIXL agent with the UCX backend over one engine's KV memory: registers
//! it, publishes it ([`PeerInfo`]), loads peers, WRITEs blocks into them with a
//! notification, and collects the notifications peers send us.
//!
//! For: moving whole KV blocks between engines, with deadlines on both sides.
//! Not for: choosing blocks or peers, discovery (etcd), or retry policy; the
//! worker runtime above decides those and cancels a remote prefill on error.
//!
//! Every NIXL call goes through one mutex per agent: NIXL may deadlock when an
//! agent is driven from several threads at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nixl_sys::{
    Agent, AgentConfig, MemType, MemoryRegion, NixlDescriptor, NixlError, NotificationMap, OptArgs,
    RegistrationHandle, ThreadSync, XferDescList, XferOp, XferRequest, XferStatus,
};

use super::layout::{KvLayout, LayoutMismatch};
use super::library::{NixlLoadError, load_nixl};
use super::protocol::{PeerInfo, TransferNotification};
use super::transport::Endpoint;
use crate::engine::kv_storage::{KvKind, KvStorage};

/// Something went wrong moving KV blocks. Every variant is final for the
/// request it names: the caller cancels (or locally recomputes) it.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("NIXL is not available: {0}")]
    Load(#[from] NixlLoadError),
    #[error("NIXL {op} failed: {source}")]
    Nixl {
        op: &'static str,
        #[source]
        source: NixlError,
    },
    #[error("peer {peer}: {source}")]
    Layout {
        peer: String,
        #[source]
        source: LayoutMismatch,
    },
    /// The peer's model weights differ from ours: its KV would be computed
    /// by another model, and an answer from it wrong under HTTP 200.
    #[error(
        "peer {peer} serves other model weights (digest {theirs}, ours {ours}): its KV cannot be used here"
    )]
    OtherWeights {
        peer: String,
        ours: String,
        theirs: String,
    },
    #[error("peer info is invalid: {0}")]
    BadPeerInfo(String),
    #[error("peer {0} is not loaded")]
    UnknownPeer(String),
    #[error("KV memory is invalid: {0}")]
    BadMemory(String),
    #[error("invalid block lists: {0}")]
    BadBlocks(String),
    #[error("transfer of {request_id} to {peer} failed: {reason}")]
    Failed {
        peer: String,
        request_id: String,
        reason: String,
    },
    #[error("transfer of {request_id} to {peer} did not finish by its deadline")]
    DeadlineExceeded { peer: String, request_id: String },
    #[error("no notification for {request_id} arrived by its deadline")]
    NotificationDeadline { request_id: String },
    /// A setting for the transfer agent is malformed (the message names it).
    #[error("{0}")]
    Config(String),
}

fn nixl(op: &'static str) -> impl FnOnce(NixlError) -> TransferError {
    move |source| TransferError::Nixl { op, source }
}

/// Where one engine's KV memory lives: one region per (layer, K|V) holding all
/// blocks at `layout.block_region_bytes` strides.
#[derive(Debug, Clone)]
pub struct KvMemory {
    layout: KvLayout,
    region_addrs: Vec<usize>,
}

impl KvMemory {
    /// # Safety
    /// Each `region_addrs[i] .. + layout.region_bytes()` must be writable
    /// memory that stays allocated and in place for as long as any
    /// [`TransferAgent`] built from this value lives, and the owner must accept
    /// that peers write into it at any time.
    pub unsafe fn from_raw(
        layout: KvLayout,
        region_addrs: Vec<usize>,
    ) -> Result<KvMemory, TransferError> {
        if region_addrs.len() != layout.region_count() {
            return Err(TransferError::BadMemory(format!(
                "{} regions for {} layers (want K and V per layer)",
                region_addrs.len(),
                layout.n_layers
            )));
        }
        if layout.num_blocks == 0 || layout.block_region_bytes == 0 {
            return Err(TransferError::BadMemory("empty KV layout".into()));
        }
        Ok(KvMemory {
            layout,
            region_addrs,
        })
    }

    /// The memory of an engine's cache.
    ///
    /// # Safety
    /// `storage` must outlive every [`TransferAgent`] built from the result
    /// (an engine's `KvStorage` never moves its memory).
    pub unsafe fn of_kv_storage(storage: &mut KvStorage) -> Result<KvMemory, TransferError> {
        let layout = KvLayout::of_shape(&storage.shape());
        let mut addrs = Vec::with_capacity(layout.region_count());
        for layer in 0..layout.n_layers as usize {
            for kind in [KvKind::K, KvKind::V] {
                let (ptr, _) = storage
                    .layer_region(layer, kind)
                    .map_err(|e| TransferError::BadMemory(e.to_string()))?;
                addrs.push(ptr as usize);
            }
        }
        // SAFETY: forwarded to the caller.
        unsafe { KvMemory::from_raw(layout, addrs) }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
}

/// A contiguous DRAM range handed to NIXL for registration.
#[derive(Debug)]
struct DramRange {
    addr: usize,
    len: usize,
}

impl MemoryRegion for DramRange {
    unsafe fn as_ptr(&self) -> *const u8 {
        self.addr as *const u8
    }
    fn size(&self) -> usize {
        self.len
    }
}

impl NixlDescriptor for DramRange {
    fn mem_type(&self) -> MemType {
        MemType::Dram
    }
    fn device_id(&self) -> u64 {
        0
    }
}

/// Merges `(src, dst)` block pairs into runs where both sides are
/// consecutive: `(src_start, dst_start, len)`.
pub fn block_runs(src_blocks: &[u32], dst_blocks: &[u32]) -> Vec<(u32, u32, u32)> {
    let mut runs: Vec<(u32, u32, u32)> = Vec::new();
    for (&s, &d) in src_blocks.iter().zip(dst_blocks) {
        match runs.last_mut() {
            Some((s0, d0, n)) if s0.checked_add(*n) == Some(s) && d0.checked_add(*n) == Some(d) => {
                *n += 1
            }
            _ => runs.push((s, d, 1)),
        }
    }
    runs
}

/// `(address, bytes)` of one NIXL descriptor.
pub type DescRange = (usize, usize);

/// `(addr, len)` descriptors for moving `runs` across every (layer, K|V)
/// region: local ones and, in the same order, remote ones.
pub fn plan_descriptors(
    runs: &[(u32, u32, u32)],
    block_region_bytes: u64,
    local_regions: &[usize],
    remote_regions: &[u64],
) -> (Vec<DescRange>, Vec<DescRange>) {
    let stride = block_region_bytes as usize;
    let mut local = Vec::with_capacity(runs.len() * local_regions.len());
    let mut remote = Vec::with_capacity(local.capacity());
    for (&l, &r) in local_regions.iter().zip(remote_regions) {
        for &(s, d, n) in runs {
            let len = n as usize * stride;
            local.push((l + s as usize * stride, len));
            remote.push((r as usize + d as usize * stride, len));
        }
    }
    (local, remote)
}

/// A notification a peer sent us, with the agent it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedNotification {
    pub from_agent: String,
    pub notification: TransferNotification,
}

/// What [`TransferAgent::load_peer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLoad {
    New,
    /// Same agent name, new metadata (a restarted peer): the old one was invalidated.
    Reloaded,
    Unchanged,
}

/// What a finished WRITE moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferReport {
    pub bytes: u64,
    pub descriptors: usize,
    pub elapsed: Duration,
}

struct State {
    agent: Agent,
    _registrations: Vec<RegistrationHandle>,
    peers: HashMap<String, PeerInfo>,
    pending: HashMap<String, ReceivedNotification>,
    /// Requests whose wait timed out: a late notification for them is dropped.
    abandoned: HashSet<String>,
}

struct Shared {
    name: String,
    memory: KvMemory,
    /// Digest of the model weights whose KV this agent's memory holds.
    weights: Option<String>,
    metadata: Vec<u8>,
    /// Read when the UCX backend was created (when UCX read `UCX_TLS`).
    endpoint: Endpoint,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves NIXL state as NIXL left it;
        // continuing is no worse than what the panicking call saw.
        crate::sync::lock(&self.state)
    }
}

/// A NIXL agent (UCX backend) over one engine's KV memory. Cheap to clone;
/// clones share the agent.
#[derive(Clone)]
pub struct TransferAgent {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TransferAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferAgent")
            .field("name", &self.shared.name)
            .field("layout", &self.shared.memory.layout)
            .finish()
    }
}

const POLL_MIN: Duration = Duration::from_micros(20);
const POLL_MAX: Duration = Duration::from_millis(2);

fn backoff(wait: &mut Duration, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    std::thread::sleep((*wait).min(left));
    *wait = (*wait * 2).min(POLL_MAX);
}

impl TransferAgent {
    /// Loads NIXL, creates agent `name` with the UCX backend and registers
    /// every (layer, K|V) region of `memory`.
    pub fn new(name: &str, memory: KvMemory) -> Result<TransferAgent, TransferError> {
        Self::for_weights(name, memory, None)
    }

    /// As [`new`](Self::new), for KV computed by the model weights with
    /// digest `weights` (see [`weights_digest`]): peers whose metadata name
    /// other weights are refused before any write.
    pub fn for_weights(
        name: &str,
        memory: KvMemory,
        weights: Option<String>,
    ) -> Result<TransferAgent, TransferError> {
        load_nixl()?;
        let config = AgentConfig {
            thread_sync: ThreadSync::Strict,
            pthr_delay_us: progress_delay_us(),
            ..AgentConfig::default()
        };
        let agent = Agent::new_configured(name, &config).map_err(nixl("create agent"))?;
        let endpoint = Endpoint::local();
        let (_mems, mut params) = agent
            .get_plugin_params("UCX")
            .map_err(nixl("get UCX params"))?;
        for (key, value) in ucx_params()? {
            params.set(&key, &value).map_err(nixl("set UCX param"))?;
        }
        agent
            .create_backend("UCX", &params)
            .map_err(nixl("create UCX backend"))?;
        let region_len = usize::try_from(memory.layout.region_bytes())
            .map_err(|_| TransferError::BadMemory("region larger than the address space".into()))?;
        let mut registrations = Vec::with_capacity(memory.region_addrs.len());
        for &addr in &memory.region_addrs {
            let range = DramRange {
                addr,
                len: region_len,
            };
            registrations.push(
                agent
                    .register_memory(&range, None)
                    .map_err(nixl("register memory"))?,
            );
        }
        let metadata = agent.get_local_md().map_err(nixl("get local metadata"))?;
        Ok(TransferAgent {
            shared: Arc::new(Shared {
                name: name.to_string(),
                memory,
                weights,
                metadata,
                endpoint,
                state: Mutex::new(State {
                    agent,
                    _registrations: registrations,
                    peers: HashMap::new(),
                    pending: HashMap::new(),
                    abandoned: HashSet::new(),
                }),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn layout(&self) -> &KvLayout {
        &self.shared.memory.layout
    }

    /// What UCX's choice of transport to this agent depends on.
    pub fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoint
    }

    /// What peers need to write into our memory.
    pub fn metadata(&self) -> PeerInfo {
        PeerInfo {
            agent_name: self.shared.name.clone(),
            nixl_metadata: self.shared.metadata.clone(),
            layout: self.shared.memory.layout,
            weights: self.shared.weights.clone(),
            region_addrs: self
                .shared
                .memory
                .region_addrs
                .iter()
                .map(|&a| a as u64)
                .collect(),
            endpoint: Some(self.shared.endpoint.clone()),
        }
    }

    /// Loads a peer so we can write to it. A peer already loaded under the
    /// same name with other metadata (it restarted) is invalidated first.
    pub fn load_peer(&self, peer: PeerInfo) -> Result<PeerLoad, TransferError> {
        self.layout()
            .check_compatible(&peer.layout)
            .map_err(|source| TransferError::Layout {
                peer: peer.agent_name.clone(),
                source,
            })?;
        if let (Some(ours), Some(theirs)) = (&self.shared.weights, &peer.weights)
            && ours != theirs
        {
            return Err(TransferError::OtherWeights {
                peer: peer.agent_name.clone(),
                ours: ours.clone(),
                theirs: theirs.clone(),
            });
        }
        if peer.region_addrs.len() != peer.layout.region_count() {
            return Err(TransferError::BadPeerInfo(format!(
                "{} lists {} regions for {} layers",
                peer.agent_name,
                peer.region_addrs.len(),
                peer.layout.n_layers
            )));
        }
        if peer.agent_name == self.shared.name {
            return Err(TransferError::BadPeerInfo(format!(
                "{} is this agent's own name",
                peer.agent_name
            )));
        }
        let mut state = self.shared.lock();
        let outcome = match state.peers.get(&peer.agent_name) {
            Some(old) if *old == peer => return Ok(PeerLoad::Unchanged),
            Some(_) => {
                state
                    .agent
                    .invalidate_remote_md(&peer.agent_name)
                    .map_err(nixl("invalidate remote metadata"))?;
                state.peers.remove(&peer.agent_name);
                PeerLoad::Reloaded
            }
            None => PeerLoad::New,
        };
        let loaded = state
            .agent
            .load_remote_md(&peer.nixl_metadata)
            .map_err(nixl("load remote metadata"))?;
        if loaded != peer.agent_name {
            let _ = state.agent.invalidate_remote_md(&loaded);
            return Err(TransferError::BadPeerInfo(format!(
                "metadata published as {} belongs to agent {loaded}",
                peer.agent_name
            )));
        }
        tracing::info!(peer = %peer.agent_name, ?outcome, "loaded KV transfer peer");
        state.peers.insert(peer.agent_name.clone(), peer);
        Ok(outcome)
    }

    /// Forgets a peer (it left); later writes to it fail with `UnknownPeer`.
    pub fn remove_peer(&self, agent_name: &str) -> Result<(), TransferError> {
        let mut state = self.shared.lock();
        if state.peers.remove(agent_name).is_some() {
            state
                .agent
                .invalidate_remote_md(agent_name)
                .map_err(nixl("invalidate remote metadata"))?;
        }
        Ok(())
    }

    /// Posts a WRITE of our `src_blocks` into the peer's `dst_blocks` (pairwise,
    /// all layers, K and V) carrying `notification`. Wait on the handle; it
    /// reports an error once `deadline` passes.
    pub fn write_blocks(
        &self,
        src_blocks: &[u32],
        peer: &str,
        dst_blocks: &[u32],
        notification: &TransferNotification,
        deadline: Instant,
    ) -> Result<TransferHandle, TransferError> {
        let request_id = notification.request_id.as_str();
        self.post_write(
            src_blocks,
            peer,
            dst_blocks,
            request_id,
            Some(notification),
            deadline,
        )
    }

    /// As [`write_blocks`](Self::write_blocks), but the peer is not told:
    /// no notification rides with the write. Only a test fault uses it, to
    /// leave a peer's blocks half written with the writer gone.
    pub fn write_blocks_unannounced(
        &self,
        src_blocks: &[u32],
        peer: &str,
        dst_blocks: &[u32],
        request_id: &str,
        deadline: Instant,
    ) -> Result<TransferHandle, TransferError> {
        self.post_write(src_blocks, peer, dst_blocks, request_id, None, deadline)
    }

    fn post_write(
        &self,
        src_blocks: &[u32],
        peer: &str,
        dst_blocks: &[u32],
        request_id: &str,
        notification: Option<&TransferNotification>,
        deadline: Instant,
    ) -> Result<TransferHandle, TransferError> {
        let layout = self.shared.memory.layout;
        if src_blocks.len() != dst_blocks.len() || src_blocks.is_empty() {
            return Err(TransferError::BadBlocks(format!(
                "{} source blocks for {} destination blocks",
                src_blocks.len(),
                dst_blocks.len()
            )));
        }
        if let Some(b) = src_blocks.iter().find(|&&b| b >= layout.num_blocks) {
            return Err(TransferError::BadBlocks(format!(
                "source block {b} is out of range: we hold {}",
                layout.num_blocks
            )));
        }
        let mut seen = HashSet::with_capacity(dst_blocks.len());
        if let Some(b) = dst_blocks.iter().find(|&&b| !seen.insert(b)) {
            return Err(TransferError::BadBlocks(format!(
                "destination block {b} is listed twice"
            )));
        }
        let state = self.shared.lock();
        let info = state
            .peers
            .get(peer)
            .ok_or_else(|| TransferError::UnknownPeer(peer.to_string()))?;
        if let Some(b) = dst_blocks.iter().find(|&&b| b >= info.layout.num_blocks) {
            return Err(TransferError::BadBlocks(format!(
                "destination block {b} is out of range: {peer} holds {}",
                info.layout.num_blocks
            )));
        }
        let runs = block_runs(src_blocks, dst_blocks);
        let (local, remote) = plan_descriptors(
            &runs,
            layout.block_region_bytes,
            &self.shared.memory.region_addrs,
            &info.region_addrs,
        );
        let mut local_list = XferDescList::new(MemType::Dram).map_err(nixl("descriptor list"))?;
        let mut remote_list = XferDescList::new(MemType::Dram).map_err(nixl("descriptor list"))?;
        for &(addr, len) in &local {
            local_list.add_desc(addr, len, 0);
        }
        for &(addr, len) in &remote {
            remote_list.add_desc(addr, len, 0);
        }
        let args = match notification {
            Some(notification) => {
                let mut args = OptArgs::new().map_err(nixl("opt args"))?;
                args.set_has_notification(true)
                    .map_err(nixl("set notification"))?;
                args.set_notification_message(&notification.encode())
                    .map_err(nixl("set notification"))?;
                Some(args)
            }
            None => None,
        };
        let request = state
            .agent
            .create_xfer_req(
                XferOp::Write,
                &local_list,
                &remote_list,
                peer,
                args.as_ref(),
            )
            .map_err(nixl("create transfer"))?;
        let started = Instant::now();
        let failed = |reason: String| TransferError::Failed {
            peer: peer.to_string(),
            request_id: request_id.to_string(),
            reason,
        };
        let in_progress = state
            .agent
            .post_xfer_req(&request, None)
            .map_err(|e| failed(format!("post: {e}")))?;
        drop(state);
        Ok(TransferHandle {
            shared: self.shared.clone(),
            request: Some(request),
            done: !in_progress,
            peer: peer.to_string(),
            request_id: request_id.to_string(),
            deadline,
            started,
            bytes: local.iter().map(|&(_, len)| len as u64).sum(),
            descriptors: local.len(),
        })
    }

    fn fetch_notifications(&self, state: &mut State) -> Result<(), TransferError> {
        let mut map = NotificationMap::new().map_err(nixl("notification map"))?;
        state
            .agent
            .get_notifications(&mut map, None)
            .map_err(nixl("get notifications"))?;
        let agents: Vec<String> = map
            .agents()
            .filter_map(|a| a.ok().map(str::to_string))
            .collect();
        for from in agents {
            let count = map
                .get_notifications_size(&from)
                .map_err(nixl("read notifications"))?;
            for i in 0..count {
                let bytes = map
                    .get_notification_bytes(&from, i)
                    .map_err(nixl("read notifications"))?;
                match TransferNotification::decode(&bytes) {
                    Ok(n) if state.abandoned.remove(&n.request_id) => {
                        tracing::warn!(request_id = %n.request_id, from = %from,
                            "notification arrived after its deadline; dropped");
                    }
                    Ok(n) => {
                        state.pending.insert(
                            n.request_id.clone(),
                            ReceivedNotification {
                                from_agent: from.clone(),
                                notification: n,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(from = %from, error = %e, "malformed transfer notification dropped");
                    }
                }
            }
        }
        Ok(())
    }

    /// Every notification received and not yet waited for.
    pub fn poll_notifications(&self) -> Result<Vec<ReceivedNotification>, TransferError> {
        let mut state = self.shared.lock();
        self.fetch_notifications(&mut state)?;
        Ok(state.pending.drain().map(|(_, n)| n).collect())
    }

    /// Blocks until the notification for `request_id` arrives (all its bytes
    /// have landed) or `deadline` passes. After a deadline error a late
    /// notification for the request is dropped: the caller has cancelled it.
    pub fn wait_notification(
        &self,
        request_id: &str,
        deadline: Instant,
    ) -> Result<ReceivedNotification, TransferError> {
        let mut wait = POLL_MIN;
        loop {
            {
                let mut state = self.shared.lock();
                self.fetch_notifications(&mut state)?;
                if let Some(n) = state.pending.remove(request_id) {
                    return Ok(n);
                }
                if Instant::now() >= deadline {
                    state.abandoned.insert(request_id.to_string());
                    return Err(TransferError::NotificationDeadline {
                        request_id: request_id.to_string(),
                    });
                }
            }
            backoff(&mut wait, deadline);
        }
    }

    /// [`TransferAgent::wait_notification`] on a blocking thread.
    pub async fn wait_notification_async(
        &self,
        request_id: &str,
        deadline: Instant,
    ) -> Result<ReceivedNotification, TransferError> {
        let agent = self.clone();
        let id = request_id.to_string();
        tokio::task::spawn_blocking(move || agent.wait_notification(&id, deadline))
            .await
            .unwrap_or_else(|e| {
                Err(TransferError::NotificationDeadline {
                    request_id: format!("{request_id} (waiter died: {e})"),
                })
            })
    }
}

/// A posted WRITE. Dropping it releases the NIXL request (cancelling it if it
/// is still in flight).
pub struct TransferHandle {
    shared: Arc<Shared>,
    request: Option<XferRequest>,
    done: bool,
    peer: String,
    request_id: String,
    deadline: Instant,
    started: Instant,
    bytes: u64,
    descriptors: usize,
}

impl std::fmt::Debug for TransferHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferHandle")
            .field("peer", &self.peer)
            .field("request_id", &self.request_id)
            .field("descriptors", &self.descriptors)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl TransferHandle {
    /// Descriptors per side after merging contiguous block runs.
    pub fn descriptor_count(&self) -> usize {
        self.descriptors
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Checks once: `Ok(true)` when the transfer finished, `Ok(false)` while
    /// it is in flight, an error on failure or once the deadline passed.
    pub fn poll(&mut self) -> Result<bool, TransferError> {
        if self.done {
            return Ok(true);
        }
        let Some(request) = &self.request else {
            return Err(self.failed("already failed".into()));
        };
        let status = self.shared.lock().agent.get_xfer_status(request);
        match status {
            Ok(XferStatus::Success) => {
                self.done = true;
                Ok(true)
            }
            Ok(XferStatus::InProgress) if Instant::now() < self.deadline => Ok(false),
            Ok(XferStatus::InProgress) => {
                self.release();
                Err(TransferError::DeadlineExceeded {
                    peer: self.peer.clone(),
                    request_id: self.request_id.clone(),
                })
            }
            Err(e) => {
                self.release();
                Err(self.failed(e.to_string()))
            }
        }
    }

    /// Blocks (polling with backoff) until the transfer finished, failed or
    /// missed its deadline. Do not call on an async runtime thread: use
    /// [`TransferHandle::wait_async`].
    pub fn wait(mut self) -> Result<TransferReport, TransferError> {
        let mut wait = POLL_MIN;
        while !self.poll()? {
            backoff(&mut wait, self.deadline);
        }
        Ok(TransferReport {
            bytes: self.bytes,
            descriptors: self.descriptors,
            elapsed: self.started.elapsed(),
        })
    }

    /// [`TransferHandle::wait`] on a blocking thread.
    pub async fn wait_async(self) -> Result<TransferReport, TransferError> {
        let (peer, request_id) = (self.peer.clone(), self.request_id.clone());
        tokio::task::spawn_blocking(move || self.wait())
            .await
            .unwrap_or_else(|e| {
                Err(TransferError::Failed {
                    peer,
                    request_id,
                    reason: format!("waiter died: {e}"),
                })
            })
    }

    /// Gives up on the transfer and releases its NIXL request.
    pub fn cancel(mut self) {
        self.release();
    }

    fn failed(&self, reason: String) -> TransferError {
        TransferError::Failed {
            peer: self.peer.clone(),
            request_id: self.request_id.clone(),
            reason,
        }
    }

    fn release(&mut self) {
        if let Some(request) = self.request.take() {
            // Release under the agent lock like every other NIXL call.
            let _state = self.shared.lock();
            drop(request);
        }
    }
}

impl Drop for TransferHandle {
    fn drop(&mut self) {
        self.release();
    }
}

/// Bytes of a model file read into its [`weights_digest`].
pub const WEIGHTS_DIGEST_BYTES: u64 = 16 << 20;

/// A short digest that tells model files apart: sha256 over the file's
/// length and its first [`WEIGHTS_DIGEST_BYTES`] (a GGUF's header, tensor
/// table and the first tensors' data), 16 hex digits. Two workers whose
/// KV layouts agree but whose weights differ (another fine-tune, another
/// quantization) thus never exchange KV.
pub fn weights_digest(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = Sha256::new();
    hasher.update(len.to_le_bytes());
    let mut head = Vec::new();
    file.take(WEIGHTS_DIGEST_BYTES).read_to_end(&mut head)?;
    hasher.update(&head);
    Ok(hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// How long NIXL's UCX progress thread waits for an event on its armed
/// workers before it polls them again, in microseconds. The nixl-sys
/// default, 0, makes it spin: an idle `up` with one prefill and one decode
/// worker took both cores of this machine (198.6 % of a core) and slowed
/// its own requests fourfold; with 1 ms it takes 3.4 %, and transfers are
/// as fast or faster (`docs/benchmarks.md`). Incoming events wake the
/// thread, so the delay bounds only its polling.
/// `XPYD_NIXL_PROGRESS_DELAY_US` overrides [`PROGRESS_DELAY_US`].
fn progress_delay_us() -> u64 {
    std::env::var("XPYD_NIXL_PROGRESS_DELAY_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PROGRESS_DELAY_US)
}

/// The default of [`progress_delay_us`].
pub const PROGRESS_DELAY_US: u64 = 1000;

/// The UCX backend's parameters besides the plugin's defaults.
///
/// `num_threads` gives the backend that many dedicated worker threads, and
/// `split_batch_size` of 1 lets one transfer's descriptors spread over all
/// of them. Between two processes on one host UCX copies with CMA
/// (`process_vm_writev`) on the thread that posts the request, so with one
/// thread a transfer runs at one core's copy rate. Two threads nearly
/// doubled it on this 2-core machine (5.5–5.7 to 9.5–11.2 GB/s at 256 MiB
/// and 1 GiB; 3.1–3.4 to 4.8–5.7 GB/s for 1,920 descriptors of 12 KiB) at
/// no idle cost: the threads wait for work (`docs/benchmarks.md`). vLLM's
/// NixlConnector uses the same knob (4 threads by default).
pub const UCX_PARAMS: [(&str, &str); 2] = [("num_threads", "2"), ("split_batch_size", "1")];

/// [`UCX_PARAMS`], then `XPYD_NIXL_UCX_PARAMS` (`key=value,…`, for
/// example `num_threads=4,device_list=mlx5_0`), whose entries add to or
/// override them. An entry without `=` is an error naming the variable.
fn ucx_params() -> Result<Vec<(String, String)>, TransferError> {
    ucx_params_with(&std::env::var("XPYD_NIXL_UCX_PARAMS").unwrap_or_default())
}

/// [`ucx_params`] with `extra` as the variable's value.
fn ucx_params_with(extra: &str) -> Result<Vec<(String, String)>, TransferError> {
    let mut params: Vec<(String, String)> = UCX_PARAMS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for entry in extra.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (key, value) = entry
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| {
                TransferError::Config(format!("XPYD_NIXL_UCX_PARAMS: {entry:?} is not key=value"))
            })?;
        let (key, value) = (key.trim().to_string(), value.trim().to_string());
        params.retain(|(k, _)| *k != key);
        params.push((key, value));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ucx_params_take_the_variable_over_the_defaults() {
        let get = |p: &[(String, String)], k: &str| -> Vec<String> {
            p.iter()
                .filter(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .collect()
        };
        let params = ucx_params_with(" num_threads=4 , device_list=mlx5_0,").unwrap();
        assert_eq!(get(&params, "num_threads"), ["4"]);
        assert_eq!(get(&params, "split_batch_size"), ["1"]);
        assert_eq!(get(&params, "device_list"), ["mlx5_0"]);
        assert_eq!(get(&ucx_params_with("").unwrap(), "num_threads"), ["2"]);
        for bad in ["num_threads", "=4"] {
            let err = ucx_params_with(bad).unwrap_err().to_string();
            assert!(
                err.contains("XPYD_NIXL_UCX_PARAMS") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn contiguous_block_pairs_merge_into_runs() {
        assert_eq!(
            block_runs(&[4, 5, 6, 9, 10], &[0, 1, 2, 3, 7]),
            vec![(4, 0, 3), (9, 3, 1), (10, 7, 1)]
        );
        assert_eq!(block_runs(&[3, 2], &[0, 1]), vec![(3, 0, 1), (2, 1, 1)]);
        assert_eq!(block_runs(&[u32::MAX, 0], &[0, 1]).len(), 2);
    }

    #[test]
    fn descriptors_cover_every_layer_k_and_v_once_per_run() {
        // 2 layers -> 4 regions; two runs.
        let runs = block_runs(&[0, 1, 2, 7], &[10, 11, 12, 3]);
        let local = [1000, 2000, 3000, 4000];
        let remote = [100_000, 200_000, 300_000, 400_000];
        let (l, r) = plan_descriptors(&runs, 10, &local, &remote);
        assert_eq!(l.len(), 8);
        assert_eq!(l[0], (1000, 30));
        assert_eq!(r[0], (100_000 + 100, 30));
        assert_eq!(l[1], (1070, 10));
        assert_eq!(r[1], (100_030, 10));
        assert_eq!(l[7], (4070, 10));
        assert_eq!(r[7], (400_030, 10));
    }
}
