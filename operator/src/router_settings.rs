//! Router settings in etcd: the key layout the operator writes and routers
//! read, and the small etcd client the controller uses for it.
//!
//! Layout, per `DisaggDeployment` `<name>` in namespace `<namespace>`:
//!
//! | key | written by | value |
//! |---|---|---|
//! | `/xpyd/<namespace>/<name>/router` | operator | JSON [`RouterSettings`] |
//! | `/xpyd/<namespace>/<name>/router-acks/<instance>` | each agent (every role) | JSON [`RouterAck`] |
//! | `/xpyd/<namespace>/<name>/instances/<role>/<instance>` | each agent (runtime discovery) | read here for its key only |
//!
//! `generation` in the settings is the CR `metadata.generation` at which the
//! settings last changed (an image bump does not make routers re-ack). Every
//! agent writes an ack, under its own lease, once it runs that generation;
//! the ack names no role, so the operator finds it from the instance's
//! discovery key and counts acks of at least the current generation per
//! role ([`AckCounts`]); routers are the frontends.
//! The finalizer deletes the settings key and the ack prefix. Every call has
//! a deadline ([`ETCD_TIMEOUT`]) so a dead etcd fails a reconcile quickly.
//! Not here: instance discovery records (the runtime's `discovery` owns them).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, DeleteOptions, GetOptions};
use serde::{Deserialize, Serialize};

use crate::crd::{RouterSpec, RouterStrategy};

/// Deadline of every etcd call the operator makes.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

/// The etcd key of a deployment's router settings.
pub fn settings_key(namespace: &str, name: &str) -> String {
    format!("/xpyd/{namespace}/{name}/router")
}

/// The prefix under which routers acknowledge settings.
pub fn acks_prefix(namespace: &str, name: &str) -> String {
    format!("/xpyd/{namespace}/{name}/router-acks/")
}

/// The prefix of the instance records (keys `<prefix><role>/<instance>`).
pub fn instances_prefix(namespace: &str, name: &str) -> String {
    format!("/xpyd/{namespace}/{name}/instances/")
}

/// Acknowledgements of a settings generation, by the role of the instance
/// that wrote them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckCounts {
    /// Frontends: the routers.
    pub frontend: i32,
    /// Prefill workers.
    pub prefill: i32,
    /// Decode workers.
    pub decode: i32,
    /// Acks whose instance has no record (it is going, or not this
    /// deployment's kind of process).
    pub unknown: i32,
}

/// Counts acks of `generation` or later by role. `acks` are (key, value)
/// under `acks_prefix`; `instances` the keys under `instances_prefix`.
pub fn tally_acks<'a>(
    acks_prefix: &str,
    acks: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    instances_prefix: &str,
    instances: impl IntoIterator<Item = &'a str>,
    generation: i64,
) -> AckCounts {
    let roles: HashMap<&str, &str> = instances
        .into_iter()
        .filter_map(|key| key.strip_prefix(instances_prefix)?.split_once('/'))
        .map(|(role, id)| (id, role))
        .collect();
    let mut counts = AckCounts::default();
    for (key, value) in acks {
        let Some(id) = key.strip_prefix(acks_prefix) else {
            continue;
        };
        if parse_ack(value).is_none_or(|acked| acked < generation) {
            continue;
        }
        let slot = match roles.get(id) {
            Some(&"frontend") => &mut counts.frontend,
            Some(&"prefill") => &mut counts.prefill,
            Some(&"decode") => &mut counts.decode,
            _ => &mut counts.unknown,
        };
        *slot = slot.saturating_add(1);
    }
    counts
}

/// The value stored at [`settings_key`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterSettings {
    /// CR generation at which these settings last changed.
    pub generation: i64,
    /// Decode-worker selection.
    pub strategy: RouterStrategy,
    /// Remote-prefill threshold, in uncached prompt tokens.
    pub max_local_prefill_length: i32,
    /// Session-affinity header.
    pub session_header: String,
    /// Prefill queue depth above which decode workers prefill locally.
    pub max_prefill_queue_depth: i32,
    /// Whether prefill workers exist (`numPrefill > 0`).
    pub disaggregated: bool,
    /// KV strategy: weight of the prefix overlap in a worker's cost.
    pub kv_overlap_weight: f64,
    /// KV strategy: weight of the load in a worker's cost.
    pub kv_load_weight: f64,
}

impl RouterSettings {
    /// Settings for a spec, stamped with `generation`.
    pub fn new(router: &RouterSpec, num_prefill: i32, generation: i64) -> RouterSettings {
        RouterSettings {
            generation,
            strategy: router.strategy,
            max_local_prefill_length: router.max_local_prefill_length,
            session_header: router.session_header.clone(),
            max_prefill_queue_depth: router.max_prefill_queue_depth,
            disaggregated: num_prefill > 0,
            kv_overlap_weight: router.kv_overlap_weight,
            kv_load_weight: router.kv_load_weight,
        }
    }

    /// Whether two settings differ in anything but the generation.
    pub fn same_settings(&self, other: &RouterSettings) -> bool {
        RouterSettings {
            generation: other.generation,
            ..self.clone()
        } == *other
    }
}

/// The value a router writes under [`acks_prefix`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RouterAck {
    /// The settings generation the router runs.
    pub generation: i64,
}

/// Errors talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No answer within [`ETCD_TIMEOUT`].
    #[error("etcd at {endpoints} did not answer within {}s during {op}", ETCD_TIMEOUT.as_secs())]
    Timeout {
        /// The endpoints tried.
        endpoints: String,
        /// What was being done.
        op: &'static str,
    },
    /// etcd answered with an error, or could not be reached.
    #[error("etcd at {endpoints} failed during {op}: {source}")]
    Client {
        /// The endpoints tried.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// The stored settings could not be encoded.
    #[error("encoding router settings: {0}")]
    Encode(#[from] serde_json::Error),
}

/// etcd clients, one per endpoint set, shared by all reconciles.
#[derive(Default)]
pub struct EtcdClients {
    clients: Mutex<HashMap<Vec<String>, Client>>,
}

impl std::fmt::Debug for EtcdClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClients").finish_non_exhaustive()
    }
}

async fn deadline<T>(
    endpoints: &[String],
    op: &'static str,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(ETCD_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(EtcdError::Client {
            endpoints: endpoints.join(","),
            op,
            source,
        }),
        Err(_) => Err(EtcdError::Timeout {
            endpoints: endpoints.join(","),
            op,
        }),
    }
}

impl EtcdClients {
    /// A client for `endpoints`, connecting on first use.
    pub async fn client(&self, endpoints: &[String]) -> Result<Client, EtcdError> {
        let mut key = endpoints.to_vec();
        key.sort();
        if let Some(client) = self.lock().get(&key) {
            return Ok(client.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(ETCD_TIMEOUT)
            .with_timeout(ETCD_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), ETCD_TIMEOUT);
        let client = deadline(endpoints, "connect", Client::connect(&key, Some(opts))).await?;
        self.lock().insert(key, client.clone());
        Ok(client)
    }

    /// Forgets the client for `endpoints`, so the next call reconnects.
    pub fn forget(&self, endpoints: &[String]) {
        let mut key = endpoints.to_vec();
        key.sort();
        self.lock().remove(&key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<String>, Client>> {
        // A panic while holding the lock leaves the map consistent.
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes `want` the settings at `key`, unless etcd already holds the same
    /// settings. Returns the settings now stored (with their generation) and
    /// whether this call wrote them.
    pub async fn ensure_settings(
        &self,
        endpoints: &[String],
        key: &str,
        want: &RouterSettings,
    ) -> Result<(RouterSettings, bool), EtcdError> {
        let mut client = self.client(endpoints).await?;
        let got = deadline(endpoints, "get router settings", client.get(key, None)).await?;
        let current = got
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<RouterSettings>(kv.value()).ok());
        if let Some(current) = current
            && current.same_settings(want)
        {
            return Ok((current, false));
        }
        let value = serde_json::to_vec(want)?;
        deadline(
            endpoints,
            "put router settings",
            client.put(key, value, None),
        )
        .await?;
        Ok((want.clone(), true))
    }

    /// Counts the acks of one deployment for `generation` or later, by
    /// role. Values that are not a [`RouterAck`] (or a bare integer) are
    /// ignored.
    pub async fn count_acks(
        &self,
        endpoints: &[String],
        namespace: &str,
        name: &str,
        generation: i64,
    ) -> Result<AckCounts, EtcdError> {
        let mut client = self.client(endpoints).await?;
        let acks_prefix = acks_prefix(namespace, name);
        let instances_prefix = instances_prefix(namespace, name);
        let acks = deadline(
            endpoints,
            "list router acks",
            client.get(acks_prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let instances = deadline(
            endpoints,
            "list instances",
            client.get(
                instances_prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        )
        .await?;
        Ok(tally_acks(
            &acks_prefix,
            acks.kvs()
                .iter()
                .filter_map(|kv| Some((kv.key_str().ok()?, kv.value()))),
            &instances_prefix,
            instances.kvs().iter().filter_map(|kv| kv.key_str().ok()),
            generation,
        ))
    }

    /// Deletes the settings key and every ack of one deployment.
    pub async fn delete_deployment_keys(
        &self,
        endpoints: &[String],
        namespace: &str,
        name: &str,
    ) -> Result<(), EtcdError> {
        let mut client = self.client(endpoints).await?;
        deadline(
            endpoints,
            "delete router settings",
            client.delete(settings_key(namespace, name), None),
        )
        .await?;
        deadline(
            endpoints,
            "delete router acks",
            client.delete(
                acks_prefix(namespace, name),
                Some(DeleteOptions::new().with_prefix()),
            ),
        )
        .await?;
        Ok(())
    }
}

fn parse_ack(value: &[u8]) -> Option<i64> {
    if let Ok(ack) = serde_json::from_slice::<RouterAck>(value) {
        return Some(ack.generation);
    }
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        assert_eq!(settings_key("ns", "llama"), "/xpyd/ns/llama/router");
        assert_eq!(acks_prefix("ns", "llama"), "/xpyd/ns/llama/router-acks/");
    }

    #[test]
    fn settings_compare_without_their_generation() {
        let spec = RouterSpec::default();
        let a = RouterSettings::new(&spec, 1, 3);
        let b = RouterSettings::new(&spec, 1, 7);
        assert!(a.same_settings(&b));
        let c = RouterSettings::new(
            &RouterSpec {
                max_local_prefill_length: 1,
                ..spec
            },
            1,
            3,
        );
        assert!(!a.same_settings(&c));
    }

    #[test]
    fn settings_serialize_in_camel_case() {
        let s = RouterSettings::new(&RouterSpec::default(), 2, 5);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["generation"], 5);
        assert_eq!(v["maxLocalPrefillLength"], 512);
        assert_eq!(v["strategy"], "kv");
        assert_eq!(v["disaggregated"], true);
    }

    #[test]
    fn acks_count_by_the_role_of_their_instance() {
        let acks = acks_prefix("ns", "d");
        let instances = instances_prefix("ns", "d");
        let ack_keys: Vec<String> = ["fe-1", "fe-2", "pre-1", "dec-1", "dec-2", "gone"]
            .iter()
            .map(|id| format!("{acks}{id}"))
            .collect();
        let values: [&[u8]; 6] = [
            br#"{"generation":3}"#,
            br#"{"generation":2}"#, // an older generation: not counted
            br#"{"generation":3}"#,
            br#"{"generation":4}"#,
            b"junk",
            br#"{"generation":3}"#,
        ];
        let instance_keys: Vec<String> = [
            "frontend/fe-1",
            "frontend/fe-2",
            "prefill/pre-1",
            "decode/dec-1",
            "decode/dec-2",
        ]
        .iter()
        .map(|k| format!("{instances}{k}"))
        .collect();
        let counts = tally_acks(
            &acks,
            ack_keys.iter().map(String::as_str).zip(values),
            &instances,
            instance_keys.iter().map(String::as_str),
            3,
        );
        assert_eq!(
            counts,
            AckCounts {
                frontend: 1,
                prefill: 1,
                decode: 1,
                unknown: 1
            }
        );
    }

    #[test]
    fn acks_parse_from_json_or_a_bare_integer() {
        assert_eq!(parse_ack(br#"{"generation":4}"#), Some(4));
        assert_eq!(parse_ack(b"9"), Some(9));
        assert_eq!(parse_ack(b"nonsense"), None);
    }
}
