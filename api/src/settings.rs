//! The deployment's router and disaggregation settings, as the operator
//! writes them at the settings key, and the acknowledgement every agent
//! writes once it runs them (see [`keys`](crate::keys) for the keys).
//!
//! `generation` is the custom resource's `metadata.generation` at which the
//! settings last changed. Not here: how the operator derives the settings
//! from its CRD, and how agents watch them.

use serde::{Deserialize, Serialize};

/// Decode-worker selection strategy (the CRD's `spec.router.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterStrategy {
    /// Best KV prefix overlap and load.
    #[default]
    Kv,
    /// In turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Sticky by the session header, falling back to KV routing.
    Session,
}

/// What a decode worker does with a long prompt when no prefill worker can
/// take it (none alive, the queue full, the enqueue failed) or the one that
/// took it failed (the CRD's `spec.router.onPrefillUnavailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefillUnavailable {
    /// Prefill it locally (slower, but answered).
    #[default]
    Fallback,
    /// Answer 503 at once, naming the reason (for deployments where a
    /// local prefill would break the decode workers' latency targets).
    Fail,
}

/// The deployment's router and disaggregation settings, as the operator
/// writes them (camelCase JSON). Unknown fields are ignored and missing ones
/// take their defaults, so operator and agents can be upgraded separately.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouterSettings {
    /// CR generation at which these settings last changed.
    pub generation: i64,
    /// Decode-worker selection.
    pub strategy: RouterStrategy,
    /// Remote prefill when the uncached prompt is longer than this.
    pub max_local_prefill_length: u32,
    /// Session-affinity header.
    pub session_header: String,
    /// Prefill locally when the prefill queue holds more than this.
    pub max_prefill_queue_depth: u32,
    /// Whether prefill workers exist (`numPrefill > 0`).
    pub disaggregated: bool,
    /// KV strategy: weight of prefix overlap (in blocks) in a worker's score.
    pub kv_overlap_weight: f64,
    /// KV strategy: weight of load (active blocks plus queued prompt blocks).
    pub kv_load_weight: f64,
    /// A long prompt no prefill worker can take.
    pub on_prefill_unavailable: PrefillUnavailable,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            generation: 0,
            strategy: RouterStrategy::Kv,
            max_local_prefill_length: 512,
            session_header: "session-id".to_string(),
            max_prefill_queue_depth: 64,
            disaggregated: true,
            kv_overlap_weight: 1.0,
            kv_load_weight: 1.0,
            on_prefill_unavailable: PrefillUnavailable::Fallback,
        }
    }
}

impl RouterSettings {
    /// Whether two settings differ in anything but the generation.
    pub fn same_settings(&self, other: &RouterSettings) -> bool {
        RouterSettings {
            generation: other.generation,
            ..self.clone()
        } == *other
    }
}

/// The value an agent writes at its ack key: the settings generation it
/// runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterAck {
    pub generation: i64,
}

impl RouterAck {
    /// The stored form, `{"generation":N}`.
    pub fn encode(&self) -> String {
        // A struct of one integer always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The generation in a stored ack: a [`RouterAck`], or a bare integer
    /// (what early agents wrote); `None` for anything else.
    pub fn parse_generation(value: &[u8]) -> Option<i64> {
        if let Ok(ack) = serde_json::from_slice::<RouterAck>(value) {
            return Some(ack.generation);
        }
        std::str::from_utf8(value).ok()?.trim().parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_serialize_in_camel_case_and_missing_fields_default() {
        let v = serde_json::to_value(RouterSettings {
            generation: 5,
            ..RouterSettings::default()
        })
        .unwrap();
        assert_eq!(v["generation"], 5);
        assert_eq!(v["maxLocalPrefillLength"], 512);
        assert_eq!(v["strategy"], "kv");
        assert_eq!(v["disaggregated"], true);
        let s: RouterSettings =
            serde_json::from_str(r#"{"generation":3,"strategy":"round_robin","unknown":1}"#)
                .unwrap();
        assert_eq!(
            s,
            RouterSettings {
                generation: 3,
                strategy: RouterStrategy::RoundRobin,
                ..RouterSettings::default()
            }
        );
    }

    #[test]
    fn settings_compare_without_their_generation() {
        let a = RouterSettings::default();
        let b = RouterSettings {
            generation: 7,
            ..a.clone()
        };
        assert!(a.same_settings(&b));
        let c = RouterSettings {
            max_local_prefill_length: 1,
            ..a.clone()
        };
        assert!(!a.same_settings(&c));
    }

    #[test]
    fn acks_encode_as_json_and_parse_from_json_or_a_bare_integer() {
        assert_eq!(RouterAck { generation: 7 }.encode(), r#"{"generation":7}"#);
        assert_eq!(RouterAck::parse_generation(br#"{"generation":4}"#), Some(4));
        assert_eq!(RouterAck::parse_generation(b"9"), Some(9));
        assert_eq!(RouterAck::parse_generation(b"nonsense"), None);
    }
}
