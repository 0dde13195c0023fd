//! The record every process publishes under its lease at its instance key
//! (see [`keys`](crate::keys)): who it is, what it serves, where to reach it.
//!
//! The KV transfer metadata in it is an opaque JSON blob here
//! ([`TransferMetadata`]): its format belongs to the transfer layer, which
//! converts it at the edge. Not here: leases, watches (the runtime's
//! `discovery`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::keys::Role;

/// KV capacity of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub num_blocks: u32,
    pub block_size: u32,
    pub max_model_len: u32,
    pub max_seqs: u32,
}

/// One live process, as published under its lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Unique per process incarnation (a restarted process gets a new one).
    pub instance_id: String,
    pub role: Role,
    /// Served model name (workers); empty for frontends.
    pub model: String,
    /// `host:port` of the process's HTTP server (health, metrics; the API
    /// for frontends).
    pub http_address: String,
    /// Where peers write KV (decode workers) and who writes (prefill).
    #[serde(default)]
    pub transfer: Option<TransferMetadata>,
    #[serde(default)]
    pub capacity: Option<Capacity>,
    /// Compute devices in use, e.g. `"cpu"` or `"cuda:0 NVIDIA H100 80GB HBM3"`;
    /// exactly [`SIM_DEVICE`] for a simulated engine.
    #[serde(default)]
    pub devices: Vec<String>,
    /// The worker's KV-layout fingerprint (model, weights digest, dtype,
    /// block size, head layout): prefill and decode workers exchange KV
    /// only when theirs are equal. `None` for frontends and older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_layout: Option<String>,
}

/// The `devices` entry of a worker whose engine is simulated (`--device
/// sim`): frontends label what such workers answer as simulated.
pub const SIM_DEVICE: &str = "sim";

impl InstanceRecord {
    /// Whether this worker's engine is simulated.
    pub fn is_simulated(&self) -> bool {
        self.devices.iter().any(|d| d == SIM_DEVICE)
    }
}

/// All live instances of a deployment, by instance id.
pub type InstanceSet = Arc<BTreeMap<String, InstanceRecord>>;

/// A peer's KV transfer metadata (the transfer layer's `PeerInfo`), kept as
/// the exact JSON it was written as: records pass through readers that do
/// not understand it byte for byte.
#[derive(Debug, Clone)]
pub struct TransferMetadata(Box<RawValue>);

impl TransferMetadata {
    /// Wraps the JSON form of a transfer layer value: plain data, which
    /// always serializes (anything else becomes `null`, which no reader
    /// accepts as metadata).
    pub fn encode<T: Serialize>(value: &T) -> TransferMetadata {
        TransferMetadata(
            serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned()),
        )
    }

    /// Reads it back as the transfer layer's type.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// The JSON text.
    pub fn json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for TransferMetadata {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl Serialize for TransferMetadata {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TransferMetadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(TransferMetadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Peer {
        agent_name: String,
        nixl_metadata: Vec<u8>,
    }

    #[test]
    fn transfer_metadata_is_carried_byte_for_byte() {
        let peer = Peer {
            agent_name: "a".into(),
            nixl_metadata: vec![1, 2],
        };
        let record = InstanceRecord {
            instance_id: "d-1".into(),
            role: Role::Decode,
            model: "m".into(),
            http_address: "10.0.0.1:8080".into(),
            transfer: Some(TransferMetadata::encode(&peer)),
            capacity: None,
            devices: vec!["cpu".into()],
            kv_layout: None,
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(
            json.contains(r#""transfer":{"agent_name":"a","nixl_metadata":[1,2]}"#),
            "{json}"
        );
        let back: InstanceRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.transfer.unwrap().decode::<Peer>().unwrap(), peer);
        // Records without the field (frontends) still read.
        let bare: InstanceRecord = serde_json::from_str(
            r#"{"instance_id":"f","role":"frontend","model":"","http_address":"h"}"#,
        )
        .unwrap();
        assert_eq!(bare.transfer, None);
    }
}
