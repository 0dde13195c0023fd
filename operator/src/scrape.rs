//! Reading the agents' own `/metrics` from the operator: every Ready pod
//! of a deployment (or of some of its roles) at once, each on its pod IP
//! over plain HTTP as Prometheus does, with a deadline per scrape and a cap
//! on the body. The SLO planner ([`crate::autoscaler`]) and the check that
//! disaggregation is happening ([`crate::effectiveness`]) read what this
//! returns; the parsing is [`crate::signals::parse`].

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::metrics::Metrics;
use crate::resources::{DEPLOYMENT_LABEL, METRICS_PORT, Owner, ROLE_LABEL, Role};
use crate::signals::{self, PodScrape};

/// Deadline of one pod's scrape.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The pod annotation naming its metrics port (set on every pod the
/// operator writes; [`METRICS_PORT`] when absent).
pub const METRICS_PORT_ANNOTATION: &str = "prometheus.io/port";

/// The annotation a ReplicaSet orders scale-in by (lowest cost goes first).
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Largest `/metrics` body read from a pod.
const MAX_BODY: usize = 8 << 20;

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("GET {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: body over {MAX_BODY} bytes")]
    TooLarge { url: String },
    #[error("{url}: {source}")]
    Parse {
        url: String,
        #[source]
        source: signals::ParseError,
    },
}

/// What one round of scrapes of a deployment's pods gave.
#[derive(Debug, Default)]
pub struct PodsScrape {
    /// The pods that answered.
    pub scrapes: Vec<PodScrape>,
    /// Each listed pod's current `controller.kubernetes.io/pod-deletion-cost`.
    pub costs: HashMap<String, String>,
    /// Pods whose scrape failed or timed out.
    pub failed: i32,
}

/// Scrapes pods; cheap to share.
pub struct Scraper {
    http: reqwest::Client,
}

impl Default for Scraper {
    fn default() -> Self {
        Scraper {
            // Pods are scraped on their IPs over plain HTTP, as Prometheus
            // does, never through a proxy from the environment; a client
            // that cannot be built falls back to defaults.
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(SCRAPE_TIMEOUT)
                .connect_timeout(SCRAPE_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }
}

impl Scraper {
    /// Scrapes every Ready pod of the deployment whose role is in `roles`
    /// at once, each within [`SCRAPE_TIMEOUT`].
    pub async fn pods(
        &self,
        client: &Client,
        metrics: &Metrics,
        owner: &Owner,
        roles: &[Role],
    ) -> PodsScrape {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &owner.namespace);
        let selector = format!("{DEPLOYMENT_LABEL}={}", owner.name);
        let list = match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!(error = %e, name = %owner.name, "listing pods to scrape");
                return PodsScrape::default();
            }
        };
        let costs: HashMap<String, String> = list
            .iter()
            .filter_map(|p| {
                let cost = p.annotations().get(DELETION_COST_ANNOTATION)?;
                Some((p.name_any(), cost.clone()))
            })
            .collect();
        let targets: Vec<(String, Role, String)> = list
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
            .filter_map(|p| {
                let role = role_of(p).filter(|r| roles.contains(r))?;
                let ip = p.status.as_ref()?.pod_ip.clone()?;
                let port = p
                    .annotations()
                    .get(METRICS_PORT_ANNOTATION)
                    .and_then(|v| v.parse::<u16>().ok())
                    .map_or(METRICS_PORT, i32::from);
                let host = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip
                };
                Some((p.name_any(), role, format!("http://{host}:{port}/metrics")))
            })
            .collect();
        let results = join_all(targets.into_iter().map(|(pod, role, url)| async move {
            let got = tokio::time::timeout(SCRAPE_TIMEOUT, self.scrape(&url)).await;
            (pod, role, url, got)
        }))
        .await;
        let mut scrapes = Vec::new();
        let mut failed = 0;
        for (pod, role, url, got) in results {
            match got {
                Ok(Ok(metrics)) => scrapes.push(PodScrape { pod, role, metrics }),
                Ok(Err(e)) => {
                    tracing::debug!(%pod, error = %e, "scrape failed");
                    failed += 1;
                    metrics
                        .planner_scrape_failures
                        .with_label_values(&[role.as_str()])
                        .inc();
                }
                Err(_) => {
                    tracing::debug!(%pod, %url, "scrape timed out");
                    failed += 1;
                    metrics
                        .planner_scrape_failures
                        .with_label_values(&[role.as_str()])
                        .inc();
                }
            }
        }
        PodsScrape {
            scrapes,
            costs,
            failed,
        }
    }

    async fn scrape(&self, url: &str) -> Result<signals::Exposition, ScrapeError> {
        let http = |source| ScrapeError::Http {
            url: url.to_string(),
            source,
        };
        let response = self.http.get(url).send().await.map_err(http)?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status {
                url: url.to_string(),
                status: response.status().as_u16(),
            });
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(ScrapeError::TooLarge {
                url: url.to_string(),
            });
        }
        let body = response.text().await.map_err(http)?;
        if body.len() > MAX_BODY {
            return Err(ScrapeError::TooLarge {
                url: url.to_string(),
            });
        }
        signals::parse(&body).map_err(|source| ScrapeError::Parse {
            url: url.to_string(),
            source,
        })
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn role_of(pod: &Pod) -> Option<Role> {
    match pod.labels().get(ROLE_LABEL)?.as_str() {
        "frontend" => Some(Role::Frontend),
        "prefill" => Some(Role::Prefill),
        "decode" => Some(Role::Decode),
        _ => None,
    }
}
