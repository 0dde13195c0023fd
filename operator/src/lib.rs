//! `xpyd-operator`: the `DisaggDeployment` custom resource and the controller
//! that reconciles it into prefill, decode and frontend workloads.
//!
//! [`crd`] holds the API types, [`resources`] the pure builders of child
//! objects, [`router_settings`] the etcd key layout, [`pod_status`] what the
//! pods' statuses say, [`planner`] the SLO planner's decision, [`signals`]
//! the planner's inputs from the agents' metrics, [`autoscaler`] the
//! planner's I/O, [`status`] the reconciler's decisions (status,
//! conditions, events, requeue) as pure functions, [`controller`] the
//! reconciler's I/O, [`metrics`] and
//! [`leader`] what the binary adds around it.
//! The binary (`xpyd-operator run | crd`) lives in `main.rs`.

#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod autoscaler;
pub mod controller;
pub mod crd;
pub mod effectiveness;
pub mod leader;
pub mod metrics;
pub mod planner;
pub mod pod_status;
pub mod resources;
pub mod router_settings;
pub mod scrape;
pub mod signals;
pub mod status;
pub mod sync;
