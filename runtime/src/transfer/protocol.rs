//! Wire types of KV transfer: what one engine publishes about itself
//! ([`PeerInfo`]) and what rides with a finished write ([`TransferNotification`]).
//!
//! For: serde types shared by sender and receiver, versioned by adding fields.
//! Not for: moving bytes or deciding when to transfer (see `agent`).

use serde::{Deserialize, Serialize};
use xpyd_api::{TransferMetadata, WireLogprobs};

use super::layout::KvLayout;

/// What a peer needs to write into our KV memory: published (later in etcd)
/// and passed to `TransferAgent::load_peer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The NIXL agent name; also the key notifications arrive under.
    pub agent_name: String,
    /// `get_local_md()` of the agent: connection info and registered memory.
    pub nixl_metadata: Vec<u8>,
    pub layout: KvLayout,
    /// Digest of the model weights the KV comes from
    /// ([`super::agent::weights_digest`]); `None` from agents that do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// Address of block 0 of each (layer, K|V) region, K before V within a
    /// layer; `2 * layout.n_layers` entries. Blocks follow at
    /// `layout.block_region_bytes` strides.
    pub region_addrs: Vec<u64>,
    /// What UCX's choice of transport to this agent depends on
    /// ([`super::infer_transport`]); `None` from agents that do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<super::Endpoint>,
}

impl PeerInfo {
    /// The KV-layout fingerprint of KV that `model` computes into this
    /// layout: the model name, the weights digest, the dtype, the block size
    /// and the head layout (layers, and bytes of one layer's block, which
    /// fix heads times head size), not the number of blocks. Two workers
    /// may exchange KV only when theirs are equal; a deployment's prefill
    /// queues are named by it. Twelve hex digits of a SHA-256.
    pub fn kv_fingerprint(&self, model: &str) -> String {
        use sha2::{Digest, Sha256};
        let l = &self.layout;
        let canonical = format!(
            "model={model};weights={};dtype={:?};block_size={};layers={};block_region_bytes={}",
            self.weights.as_deref().unwrap_or("-"),
            l.dtype,
            l.block_size,
            l.n_layers,
            l.block_region_bytes,
        );
        Sha256::digest(canonical.as_bytes())[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The opaque form discovery records and prefill jobs carry.
    pub fn to_metadata(&self) -> TransferMetadata {
        TransferMetadata::encode(self)
    }

    /// Back from the opaque form; an error for metadata that is not ours.
    pub fn from_metadata(metadata: &TransferMetadata) -> Result<PeerInfo, serde_json::Error> {
        metadata.decode()
    }
}

/// Sent with a WRITE and delivered to the receiver only after all its bytes
/// have landed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferNotification {
    pub request_id: String,
    /// The first token the prefill side sampled.
    pub first_token: u32,
    /// Its log-probabilities, when the request asked for them (computed
    /// from the prefill side's logits). Absent from older senders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_logprobs: Option<WireLogprobs>,
    /// Blocks written, so the receiver can check it got what it reserved.
    pub num_blocks: u32,
}

impl TransferNotification {
    pub(crate) fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_round_trips_and_garbage_is_an_error() {
        let n = TransferNotification {
            request_id: "req-1".into(),
            first_token: 7,
            first_logprobs: None,
            num_blocks: 3,
        };
        assert_eq!(TransferNotification::decode(&n.encode()).unwrap(), n);
        let with = TransferNotification {
            first_logprobs: Some(WireLogprobs {
                token_id: 7,
                logprob: -0.5,
                top: vec![xpyd_api::WireTopLogprob {
                    token_id: 7,
                    logprob: -0.5,
                }],
            }),
            ..n.clone()
        };
        assert_eq!(TransferNotification::decode(&with.encode()).unwrap(), with);
        // What senders that predate logprobs wrote.
        let old = br#"{"request_id":"req-1","first_token":7,"num_blocks":3}"#;
        assert_eq!(TransferNotification::decode(old).unwrap(), n);
        assert!(TransferNotification::decode(b"\xff not json").is_err());
    }

    #[test]
    fn peer_info_travels_as_the_same_json_in_its_opaque_form() {
        let peer = PeerInfo {
            agent_name: "decode-1".into(),
            nixl_metadata: vec![0, 1, 255],
            layout: KvLayout {
                n_layers: 2,
                block_size: 16,
                block_region_bytes: 4096,
                dtype: crate::transfer::KvDtype::F32,
                num_blocks: 8,
            },
            weights: Some("0123456789abcdef".into()),
            region_addrs: vec![0x1000, 0x2000, 0x3000, 0x4000],
            endpoint: Some(crate::transfer::Endpoint {
                system: "boot ipc:[1] pid:[2]".into(),
                ucx_tls: "tcp".into(),
                rdma_devices: vec!["mlx5_0".into()],
            }),
        };
        let metadata = peer.to_metadata();
        // What records written before the opaque form held, byte for byte.
        assert_eq!(metadata.json(), serde_json::to_string(&peer).unwrap());
        assert_eq!(PeerInfo::from_metadata(&metadata).unwrap(), peer);
    }
}
