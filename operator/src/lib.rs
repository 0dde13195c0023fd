//! `xpyd-operator`: the `DisaggDeployment` custom resource and the controller
//! that reconciles it into prefill, decode and frontend workloads.
