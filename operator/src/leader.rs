//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several
//! operator replicas exactly one reconciles.
//!
//! The holder renews the Lease every [`LeaderElection::renew_every`]; a
//! candidate takes it over once it has not been renewed for its duration.
//! Conflicts are settled by the API server's optimistic concurrency
//! (`resourceVersion` on replace). Not a general-purpose lock: a leader that
//! cannot renew must stop reconciling (the caller does, by exiting).
//!
//! Nothing is left behind: on shutdown the leader deletes the Lease (a
//! standby creates a new one), and in a pod the Lease names the leading pod
//! as its owner, so garbage collection removes it even when the leader
//! could not (`helm uninstall` may remove the RBAC before the pod stops).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};

/// A candidate for one Lease.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_every: Duration,
    owner: Option<OwnerReference>,
}

impl LeaderElection {
    /// A candidate named `identity` for Lease `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> LeaderElection {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            owner: None,
        }
    }

    /// Makes the pod this process runs in (same namespace as the Lease) the
    /// Lease's owner while it leads.
    pub fn owned_by_pod(mut self, name: &str, uid: &str) -> LeaderElection {
        self.owner = Some(OwnerReference {
            api_version: "v1".to_string(),
            kind: "Pod".to_string(),
            name: name.to_string(),
            uid: uid.to_string(),
            ..OwnerReference::default()
        });
        self
    }

    fn owners(&self) -> Option<Vec<OwnerReference>> {
        self.owner.clone().map(|o| vec![o])
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.lease_duration.as_secs()).unwrap_or(15),
            ),
            acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Tries once to hold (or keep) the Lease. `Ok(true)`: this process leads.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    owner_references: self.owners(),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(secs)) => {
                renewed.0 + SignedDuration::from_secs(i64::from(secs)) < now
            }
            _ => true,
        };
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        if !ours && !expired && !free {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquire = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(now, acquire, transitions));
        lease.metadata.owner_references = self.owners();
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this process leads.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, lease = %self.name, "leader election"),
            }
            tokio::time::sleep(self.renew_every).await;
        }
    }

    /// Renews until renewal fails for longer than the lease duration;
    /// returns then (leadership is lost).
    pub async fn keep(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => return,
                Err(e) => tracing::warn!(error = %e, "renewing the leader lease"),
            }
            if last_ok.elapsed() > self.lease_duration {
                return;
            }
        }
    }

    /// Gives the Lease up so a standby takes over at once: deletes it, if
    /// this process still holds it (a standby then creates a new one).
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref());
        if holder != Some(self.identity.as_str()) {
            return Ok(());
        }
        // Only the version we read: a standby that took over meanwhile
        // keeps its Lease.
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: lease.metadata.uid.clone(),
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(&self.name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}
