//! Reading the pod spec the operator writes, for tests of the
//! operator↔agent contract: a Deployment's pod template, a container's env
//! and mounts, and the model-fetch init container's fixed shape.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};

/// The pod template's spec of a Deployment.
pub fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .expect("a Deployment spec")
        .template
        .spec
        .as_ref()
        .expect("a pod spec")
}

/// The env variable `name` of `c`.
pub fn env_var<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
    c.env.as_ref()?.iter().find(|e| e.name == name)
}

/// The literal value of env variable `name` of `c`.
pub fn env_value(c: &Container, name: &str) -> Option<String> {
    env_var(c, name)?.value.clone()
}

/// Every literal env value of `c`, by name.
pub fn env_values(c: &Container) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

/// Where `c` mounts `volume`, and whether read-only.
pub fn mount_path(c: &Container, volume: &str) -> Option<(String, bool)> {
    let m = c
        .volume_mounts
        .as_ref()?
        .iter()
        .find(|m| m.name == volume)?;
    Some((m.mount_path.clone(), m.read_only.unwrap_or(false)))
}

/// Asserts the model-fetch init container's fixed shape: its name, the
/// agent's `image`, the `fetch-model` command, and logs as the
/// termination message.
pub fn assert_fetch_container(fetch: &Container, image: &str) {
    assert_eq!(fetch.name, "fetch-model");
    assert_eq!(fetch.image.as_deref(), Some(image));
    assert_eq!(
        fetch.command.as_deref(),
        Some(&["xpyd-agent".to_string(), "fetch-model".to_string()][..])
    );
    assert_eq!(
        fetch.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
}
