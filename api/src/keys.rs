//! Which deployment a process belongs to ([`Scope`]), what it does
//! ([`Role`]), and where its records live in etcd.
//!
//! Key layout, per deployment `<dep>` in namespace `<ns>`:
//!
//! | key | value | written by | lease |
//! |---|---|---|---|
//! | `/xpyd/<ns>/<dep>/instances/<role>/<instance_id>` | JSON [`InstanceRecord`](crate::InstanceRecord) | each agent | the instance's |
//! | `/xpyd/<ns>/<dep>/router` | JSON [`RouterSettings`](crate::RouterSettings) | the operator | none |
//! | `/xpyd/<ns>/<dep>/router-acks/<instance_id>` | JSON [`RouterAck`](crate::RouterAck) | each agent | the instance's |
//!
//! Not here: the clients that read and write these keys (the runtime's
//! `discovery`, the operator's `router_settings`).

use serde::{Deserialize, Serialize};

/// Which deployment a process belongs to: the key and subject prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scope {
    pub namespace: String,
    pub deployment: String,
}

impl Scope {
    pub fn new(namespace: impl Into<String>, deployment: impl Into<String>) -> Scope {
        Scope {
            namespace: namespace.into(),
            deployment: deployment.into(),
        }
    }

    /// `/xpyd/<ns>/<dep>/`: everything of this deployment.
    pub fn prefix(&self) -> String {
        format!("/xpyd/{}/{}/", self.namespace, self.deployment)
    }

    /// `/xpyd/<ns>/<dep>/instances/`: keys `<prefix><role>/<instance_id>`.
    pub fn instances_prefix(&self) -> String {
        format!("{}instances/", self.prefix())
    }

    /// The key of one instance's record.
    pub fn instance_key(&self, role: Role, instance_id: &str) -> String {
        format!(
            "{}{}/{}",
            self.instances_prefix(),
            role.as_str(),
            instance_id
        )
    }

    /// The router settings the operator writes.
    pub fn settings_key(&self) -> String {
        format!("{}router", self.prefix())
    }

    /// `/xpyd/<ns>/<dep>/router-acks/`: where instances acknowledge settings.
    pub fn acks_prefix(&self) -> String {
        format!("{}router-acks/", self.prefix())
    }

    /// Where an instance acknowledges the settings generation it runs.
    pub fn ack_key(&self, instance_id: &str) -> String {
        format!("{}{}", self.acks_prefix(), instance_id)
    }
}

/// What a process does: the agent's role argument, the name in instance
/// keys, labels and object names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// HTTP API, tokenizer and router.
    Frontend,
    /// Computes KV caches of long prompts.
    Prefill,
    /// Decodes, prefilling short prompts locally.
    Decode,
}

impl Role {
    /// All roles.
    pub const ALL: [Role; 3] = [Role::Frontend, Role::Prefill, Role::Decode];

    /// The name used in keys, labels, object names and the agent's argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Frontend => "frontend",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let scope = Scope::new("ns", "llama");
        assert_eq!(scope.settings_key(), "/xpyd/ns/llama/router");
        assert_eq!(scope.acks_prefix(), "/xpyd/ns/llama/router-acks/");
        assert_eq!(scope.ack_key("fe-1"), "/xpyd/ns/llama/router-acks/fe-1");
        assert_eq!(scope.instances_prefix(), "/xpyd/ns/llama/instances/");
        assert_eq!(
            scope.instance_key(Role::Decode, "d-1"),
            "/xpyd/ns/llama/instances/decode/d-1"
        );
    }
}
