//! `xpyd-runtime`: the library every xpyd process is built from.
//!
//! It holds what a worker or a router needs at run time, in rooms (engine,
//! transfer, discovery, bus, router, worker, frontend; see
//! `docs/architecture.md`); data flows one way through them and a lower room
//! never imports a higher one. Process wiring (flags, roles, signals) lives in the
//! `xpyd-agent` binary, not here.

#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod assets;
pub mod bus;
pub mod discovery;
pub mod engine;
pub mod frontend;
pub mod metrics;
pub mod model_source;
pub mod router;
pub mod sync;
pub mod transfer;
pub mod worker;
