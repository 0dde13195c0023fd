//! Router settings in etcd, the operator's side: the [`RouterSettings`] a
//! spec asks for ([`router_settings`]), and the small etcd client the
//! controller writes them and counts acks with.
//!
//! The key layout, the settings and the acks are contracts with the agents
//! and live in `xpyd-api` ([`xpyd_api::keys`], [`xpyd_api::settings`]).
//! Per `DisaggDeployment`, the operator writes the settings key, each agent
//! (every role) writes an ack, and the instance keys are read here for their
//! role only.
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
use xpyd_api::{PrefillUnavailable, RouterAck, RouterSettings, RouterStrategy, Scope};

use crate::crd::{self, RouterSpec};

/// Deadline of every etcd call the operator makes.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

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
/// under [`Scope::acks_prefix`]; `instances` the keys under
/// [`Scope::instances_prefix`].
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
        if RouterAck::parse_generation(value).is_none_or(|acked| acked < generation) {
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

impl From<crd::RouterStrategy> for RouterStrategy {
    fn from(strategy: crd::RouterStrategy) -> RouterStrategy {
        match strategy {
            crd::RouterStrategy::Kv => RouterStrategy::Kv,
            crd::RouterStrategy::RoundRobin => RouterStrategy::RoundRobin,
            crd::RouterStrategy::Random => RouterStrategy::Random,
            crd::RouterStrategy::Session => RouterStrategy::Session,
        }
    }
}

/// The settings a spec asks for, stamped with `generation`. The CRD's
/// integers are signed (its schema keeps them non-negative); one below zero
/// is refused rather than wrapped.
pub fn router_settings(
    router: &RouterSpec,
    num_prefill: i32,
    generation: i64,
) -> Result<RouterSettings, EtcdError> {
    let unsigned = |field: &'static str, value: i32| {
        u32::try_from(value).map_err(|_| EtcdError::OutOfRange { field, value })
    };
    Ok(RouterSettings {
        generation,
        strategy: router.strategy.into(),
        max_local_prefill_length: unsigned(
            "maxLocalPrefillLength",
            router.max_local_prefill_length,
        )?,
        session_header: router.session_header.clone(),
        max_prefill_queue_depth: unsigned("maxPrefillQueueDepth", router.max_prefill_queue_depth)?,
        disaggregated: num_prefill > 0,
        kv_overlap_weight: router.kv_overlap_weight,
        kv_load_weight: router.kv_load_weight,
        on_prefill_unavailable: match router.on_prefill_unavailable {
            crd::PrefillUnavailable::Fallback => PrefillUnavailable::Fallback,
            crd::PrefillUnavailable::Fail => PrefillUnavailable::Fail,
        },
    })
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
    /// A spec value the settings cannot carry (the CRD schema forbids it).
    #[error("router settings: spec.router.{field} is {value}, below 0")]
    OutOfRange {
        /// The CRD field.
        field: &'static str,
        /// Its value.
        value: i32,
    },
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
        crate::sync::lock(&self.clients)
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
        let scope = Scope::new(namespace, name);
        let acks_prefix = scope.acks_prefix();
        let instances_prefix = scope.instances_prefix();
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
        let scope = Scope::new(namespace, name);
        deadline(
            endpoints,
            "delete router settings",
            client.delete(scope.settings_key(), None),
        )
        .await?;
        deadline(
            endpoints,
            "delete router acks",
            client.delete(
                scope.acks_prefix(),
                Some(DeleteOptions::new().with_prefix()),
            ),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_compare_without_their_generation() {
        let spec = RouterSpec::default();
        let a = router_settings(&spec, 1, 3).unwrap();
        let b = router_settings(&spec, 1, 7).unwrap();
        assert!(a.same_settings(&b));
        let c = router_settings(
            &RouterSpec {
                max_local_prefill_length: 1,
                ..spec
            },
            1,
            3,
        )
        .unwrap();
        assert!(!a.same_settings(&c));
    }

    #[test]
    fn settings_serialize_in_camel_case() {
        let s = router_settings(&RouterSpec::default(), 2, 5).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["generation"], 5);
        assert_eq!(v["maxLocalPrefillLength"], 512);
        assert_eq!(v["strategy"], "kv");
        assert_eq!(v["disaggregated"], true);
    }

    #[test]
    fn settings_carry_every_value_of_the_spec() {
        let spec = RouterSpec {
            strategy: crd::RouterStrategy::Session,
            max_local_prefill_length: 300,
            session_header: "x-user".to_string(),
            max_prefill_queue_depth: 7,
            kv_overlap_weight: 2.5,
            kv_load_weight: 0.25,
            on_prefill_unavailable: crd::PrefillUnavailable::Fail,
        };
        assert_eq!(
            router_settings(&spec, 2, 11).unwrap(),
            RouterSettings {
                generation: 11,
                strategy: RouterStrategy::Session,
                max_local_prefill_length: 300,
                session_header: "x-user".to_string(),
                max_prefill_queue_depth: 7,
                disaggregated: true,
                kv_overlap_weight: 2.5,
                kv_load_weight: 0.25,
                on_prefill_unavailable: PrefillUnavailable::Fail,
            }
        );
        let negative = RouterSpec {
            max_prefill_queue_depth: -1,
            ..spec
        };
        assert_eq!(
            router_settings(&negative, 2, 11).unwrap_err().to_string(),
            "router settings: spec.router.maxPrefillQueueDepth is -1, below 0"
        );
    }

    #[test]
    fn crd_defaults_are_the_settings_defaults() {
        assert_eq!(
            router_settings(&RouterSpec::default(), 1, 0).unwrap(),
            RouterSettings::default()
        );
        for (crd, agent) in [
            (crd::RouterStrategy::Kv, RouterStrategy::Kv),
            (crd::RouterStrategy::RoundRobin, RouterStrategy::RoundRobin),
            (crd::RouterStrategy::Random, RouterStrategy::Random),
            (crd::RouterStrategy::Session, RouterStrategy::Session),
        ] {
            let spec = RouterSpec {
                strategy: crd,
                ..RouterSpec::default()
            };
            assert_eq!(router_settings(&spec, 0, 1).unwrap().strategy, agent);
            // The same word on both sides of the wire.
            assert_eq!(
                serde_json::to_value(crd).unwrap(),
                serde_json::to_value(agent).unwrap()
            );
        }
    }

    #[test]
    fn the_prefill_unavailable_policy_is_the_same_word_on_both_sides() {
        for (crd, agent) in [
            (
                crd::PrefillUnavailable::Fallback,
                PrefillUnavailable::Fallback,
            ),
            (crd::PrefillUnavailable::Fail, PrefillUnavailable::Fail),
        ] {
            let spec = RouterSpec {
                on_prefill_unavailable: crd,
                ..RouterSpec::default()
            };
            let settings = router_settings(&spec, 1, 1).unwrap();
            assert_eq!(settings.on_prefill_unavailable, agent);
            assert_eq!(
                serde_json::to_value(crd).unwrap(),
                serde_json::to_value(agent).unwrap()
            );
        }
        assert_eq!(
            router_settings(&RouterSpec::default(), 1, 1)
                .unwrap()
                .on_prefill_unavailable,
            RouterSettings::default().on_prefill_unavailable
        );
    }

    #[test]
    fn a_spec_without_the_new_fields_gets_the_defaults() {
        let spec: RouterSpec = serde_json::from_str(r#"{"strategy":"kv"}"#).expect("parses");
        assert_eq!(spec.session_header, "session-id");
        assert_eq!((spec.kv_overlap_weight, spec.kv_load_weight), (1.0, 1.0));
    }

    #[test]
    fn acks_count_by_the_role_of_their_instance() {
        let scope = Scope::new("ns", "d");
        let acks = scope.acks_prefix();
        let instances = scope.instances_prefix();
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
}
