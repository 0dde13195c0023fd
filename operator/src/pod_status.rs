//! What the operator reads from a deployment's pods: why they are not
//! coming up, when the reason is one a user must act on.
//!
//! A pure function of the observed pods ([`pod_problem`]) so it is tested
//! with tables and no server; the controller lists the pods and puts the
//! answer in the `Degraded` condition. Not here: replica counts (they come
//! from the Deployments' status) and the agents' own health (probes).

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;

use crate::resources::FETCH_CONTAINER;

/// `Degraded` reason: a pod's image cannot be pulled.
pub const IMAGE_PULL_FAILED: &str = "ImagePullFailed";
/// `Degraded` reason: a pod's model fetch fails.
pub const MODEL_UNAVAILABLE: &str = "ModelUnavailable";

/// Longest container message copied into a condition (a termination
/// message falling back to the log's tail may be kilobytes).
const MAX_MESSAGE: usize = 1024;

/// Waiting reasons of a container whose image the kubelet cannot get.
const PULL_FAILURES: [&str; 4] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
];

/// A reason the pods do not come up, for the `Degraded` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodProblem {
    /// [`IMAGE_PULL_FAILED`] or [`MODEL_UNAVAILABLE`].
    pub reason: &'static str,
    /// What a user reads: the pod, the image or the fetch's last error.
    pub message: String,
}

/// The most pressing problem among `pods`, if any: an image that cannot be
/// pulled comes first (nothing else can run), then a failing model fetch.
/// Pods being deleted are ignored; the first pod by name speaks for the
/// others, which are counted.
pub fn pod_problem(pods: &[Pod]) -> Option<PodProblem> {
    let mut pods: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    pods.sort_by_key(|p| p.name_any());
    for (reason, find) in [
        (
            IMAGE_PULL_FAILED,
            image_pull_failure as fn(&Pod) -> Option<String>,
        ),
        (MODEL_UNAVAILABLE, fetch_failure),
    ] {
        let mut hits = pods.iter().filter_map(|p| Some((p.name_any(), find(p)?)));
        if let Some((pod, what)) = hits.next() {
            let others = hits.count();
            let more = match others {
                0 => String::new(),
                1 => " (and 1 more pod)".to_string(),
                n => format!(" (and {n} more pods)"),
            };
            return Some(PodProblem {
                reason,
                message: format!("pod {pod}: {what}{more}"),
            });
        }
    }
    None
}

fn statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    let status = pod.status.as_ref();
    let init = status.and_then(|s| s.init_container_statuses.as_deref());
    let main = status.and_then(|s| s.container_statuses.as_deref());
    init.unwrap_or_default()
        .iter()
        .chain(main.unwrap_or_default())
}

fn image_pull_failure(pod: &Pod) -> Option<String> {
    statuses(pod).find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        PULL_FAILURES.contains(&reason).then(|| {
            let detail = waiting
                .message
                .as_deref()
                .map(|m| format!(": {}", clip(m)))
                .unwrap_or_default();
            format!(
                "image {} cannot be pulled ({reason}){detail}",
                image_of(pod, c)
            )
        })
    })
}

/// The image a container asks for: the spec's, which is what the user
/// wrote (the status may show a resolved or empty name while pulling).
fn image_of(pod: &Pod, status: &ContainerStatus) -> String {
    let spec = pod.spec.as_ref();
    let containers = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default()
        .iter()
        .chain(spec.map(|s| s.containers.as_slice()).unwrap_or_default());
    containers
        .into_iter()
        .find(|c| c.name == status.name)
        .and_then(|c| c.image.clone())
        .unwrap_or_else(|| status.image.clone())
}

fn fetch_failure(pod: &Pod) -> Option<String> {
    let fetch = pod
        .status
        .as_ref()?
        .init_container_statuses
        .as_deref()?
        .iter()
        .find(|c| c.name == FETCH_CONTAINER)?;
    let state = fetch.state.as_ref()?;
    let failed = |t: &k8s_openapi::api::core::v1::ContainerStateTerminated| {
        let said = t
            .message
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(clip)
            .unwrap_or_else(|| {
                format!(
                    "exit code {}{}",
                    t.exit_code,
                    t.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )
            });
        format!("model fetch failed: {said}")
    };
    if let Some(t) = state.terminated.as_ref()
        && t.exit_code != 0
    {
        return Some(failed(t));
    }
    let waiting = state.waiting.as_ref()?;
    if waiting.reason.as_deref() != Some("CrashLoopBackOff") {
        return None;
    }
    match fetch
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
    {
        Some(t) => Some(format!(
            "{}; retried {} times",
            failed(t),
            fetch.restart_count
        )),
        None => Some("model fetch is crash-looping".to_string()),
    }
}

fn clip(message: &str) -> String {
    let message = message.trim();
    if message.len() <= MAX_MESSAGE {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn pod(name: &str, status: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "initContainers": [{"name": "fetch-model", "image": "xpyd/agent:1"}],
                "containers": [{"name": "agent", "image": "xpyd/agent:1"}],
            },
            "status": status,
        }))
        .unwrap()
    }

    fn fetch(state: Value, last: Value) -> Value {
        json!({"initContainerStatuses": [{
            "name": "fetch-model", "image": "", "imageID": "", "ready": false,
            "restartCount": 3, "state": state, "lastState": last,
        }]})
    }

    fn main_waiting(reason: &str, message: &str) -> Value {
        json!({"containerStatuses": [{
            "name": "agent", "image": "", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": message}},
        }]})
    }

    #[test]
    fn problems_are_found_in_the_pods_statuses() {
        let crash = fetch(
            json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            json!({"terminated": {"exitCode": 1,
                "message": "GET https://huggingface.co/o/r/resolve/main/m.gguf: 404 Not Found"}}),
        );
        /// Name, observed pods, the (reason, message) wanted.
        type Case = (&'static str, Vec<Pod>, Option<(&'static str, &'static str)>);
        let cases: Vec<Case> = vec![
            ("no pods", vec![], None),
            ("running", vec![pod("a", json!({"phase": "Running"}))], None),
            (
                "fetch still downloading",
                vec![pod("a", fetch(json!({"running": {}}), json!({})))],
                None,
            ),
            (
                "fetch done",
                vec![pod(
                    "a",
                    fetch(json!({"terminated": {"exitCode": 0}}), json!({})),
                )],
                None,
            ),
            (
                "fetch crash-looping with its message",
                vec![pod("a", crash.clone())],
                Some((
                    MODEL_UNAVAILABLE,
                    "pod a: model fetch failed: GET https://huggingface.co/o/r/resolve/main/m.gguf: 404 Not Found; retried 3 times",
                )),
            ),
            (
                "fetch failed once, no message",
                vec![pod(
                    "a",
                    fetch(
                        json!({"terminated": {"exitCode": 2, "reason": "Error"}}),
                        json!({}),
                    ),
                )],
                Some((
                    MODEL_UNAVAILABLE,
                    "pod a: model fetch failed: exit code 2 (Error)",
                )),
            ),
            (
                "the agent's image cannot be pulled",
                vec![pod(
                    "a",
                    main_waiting(
                        "ImagePullBackOff",
                        "Back-off pulling image \"xpyd/agent:1\"",
                    ),
                )],
                Some((
                    IMAGE_PULL_FAILED,
                    "pod a: image xpyd/agent:1 cannot be pulled (ImagePullBackOff): Back-off pulling image \"xpyd/agent:1\"",
                )),
            ),
            (
                "the init container's image cannot be pulled",
                vec![pod(
                    "a",
                    fetch(json!({"waiting": {"reason": "ErrImagePull"}}), json!({})),
                )],
                Some((
                    IMAGE_PULL_FAILED,
                    "pod a: image xpyd/agent:1 cannot be pulled (ErrImagePull)",
                )),
            ),
            (
                "a pull failure outranks a fetch failure, and others are counted",
                vec![
                    pod("c", crash.clone()),
                    pod("b", main_waiting("ErrImagePull", "not found")),
                    pod("a", main_waiting("ImagePullBackOff", "back-off")),
                ],
                Some((
                    IMAGE_PULL_FAILED,
                    "pod a: image xpyd/agent:1 cannot be pulled (ImagePullBackOff): back-off (and 1 more pod)",
                )),
            ),
            (
                "an agent crash-looping is not a model problem",
                vec![pod("a", main_waiting("CrashLoopBackOff", "back-off"))],
                None,
            ),
        ];
        for (name, pods, want) in cases {
            let got = pod_problem(&pods);
            let got = got.as_ref().map(|p| (p.reason, p.message.as_str()));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_pod_being_deleted_does_not_speak() {
        let mut p = pod("a", main_waiting("ErrImagePull", "gone"));
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        assert_eq!(pod_problem(&[p]), None);
    }

    #[test]
    fn a_long_message_is_clipped_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let p = pod(
            "a",
            fetch(
                json!({"terminated": {"exitCode": 1, "message": long}}),
                json!({}),
            ),
        );
        let problem = pod_problem(&[p]).unwrap();
        assert!(
            problem.message.len() < MAX_MESSAGE + 100,
            "{}",
            problem.message.len()
        );
        assert!(problem.message.ends_with('…'));
    }
}
