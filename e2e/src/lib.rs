//! `xpyd-e2e`: the harness xpyd's integration tests stand on.
//!
//! It starts real servers on loopback, each on free ports so test binaries can
//! run side by side: etcd ([`Etcd`]), NATS with JetStream ([`Nats`]), and a
//! Kubernetes control plane ([`ControlPlane`]: its own etcd, kube-apiserver
//! with a generated CA and client certificates, kube-controller-manager,
//! kube-scheduler, and kwok faking nodes that carry `nvidia.com/gpu`).
//! Every wait has a deadline; a server that fails to become ready is reported
//! with the tail of its log. Everything started is stopped when its owner is
//! dropped, and also when the test process exits, panics included (see
//! [`process`]). It is not a mock of anything: the binaries are the upstream
//! ones that `scripts/setup` builds.
//!
//! Starting a control plane takes tens of seconds, so a test binary shares
//! one through [`shared_control_plane`]; etcd and NATS start in well under a
//! second, so each test starts its own and may stop or restart it freely.
//!
//! [`ModelMirror`] serves model files over HTTP (a stand-in for a model host
//! or the Hugging Face hub, with Range, tokens and injected faults).
//!
//! A real node ([`RealNode`]: kubelet, containerd, runc, CNI, kube-proxy and
//! CoreDNS) joins a control plane from
//! [`ControlPlane::start_for_real_node`], so pods really run, from images
//! built here ([`images`]) and pulled from a local registry. It changes
//! host-global state, so one runs per host at a time ([`host`]). Traefik
//! runs on it as a real ingress controller on demand ([`ingress`]).
//!
//! [`release`] installs the whole product on a real node (images, a model
//! mirror, `helm install` of the chart) for the tests that need it running.
//!
//! [`child`] starts the running test binary again as a separate process;
//! [`pod_spec`] reads the pod spec the operator writes.
//!
//! [`bench`](mod@bench) is the load generator behind the `xpyd-bench` binary; it talks
//! to any OpenAI-compatible server and starts nothing itself.

pub mod bench;
mod certs;
pub mod child;
mod control_plane;
mod error;
mod etcd;
pub mod host;
pub mod images;
pub mod ingress;
pub mod mirror;
mod nats;
mod node;
pub mod pod_spec;
pub mod process;
pub mod release;
mod tools;
mod wait;
mod workdir;

pub use control_plane::{ControlPlane, ControlPlaneOptions, GPU_RESOURCE, shared_control_plane};
pub use error::HarnessError;
pub use etcd::Etcd;
pub use images::{ImageRef, ImageRegistry, ImageSpec, RegistryClient};
pub use ingress::Traefik;
pub use mirror::{Fault, ModelMirror};
pub use nats::Nats;
pub use node::{NODE_LABEL, NODE_NAME, RealNode, XpydImages};
pub use tools::{NodeTools, Tools};
pub use wait::wait_until;
pub use workdir::Workdir;
