//! KV block transfer between engines, with NIXL as the transport.
//!
//! This room owns everything that talks to NIXL: finding and loading its
//! libraries, agents, memory registration, descriptor lists, notifications and
//! deadlines. It never decides *what* to transfer; the engine and the worker
//! runtime above it do.

mod agent;
mod layout;
mod library;
mod protocol;
mod transport;

pub use agent::{
    DescRange, KvMemory, PeerLoad, ReceivedNotification, TransferAgent, TransferError,
    TransferHandle, TransferReport, WEIGHTS_DIGEST_BYTES, block_runs, plan_descriptors,
    weights_digest,
};
pub use layout::{KvDtype, KvLayout, LayoutMismatch};
pub use library::{NixlLibrary, NixlLoadError, load_nixl};
pub use protocol::{PeerInfo, TransferNotification};
pub use transport::{Endpoint, Transport, infer as infer_transport};
