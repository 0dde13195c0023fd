//! KV block transfer between engines, with NIXL as the transport.
//!
//! This room owns everything that talks to NIXL: finding and loading its
//! libraries, agents, memory registration, descriptor lists, notifications and
//! deadlines. It never decides *what* to transfer; the engine and the worker
//! runtime above it do.

mod library;

pub use library::{NixlLibrary, NixlLoadError, load_nixl};
