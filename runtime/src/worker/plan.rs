//! The decode worker's prefill plan: where a prompt is prefilled (here or
//! by a prefill worker) and, when a remote prefill cannot happen, which
//! fallback forced it.
//!
//! A pure function of what the worker knows so far ([`PrefillFacts`]); the
//! worker learns facts one I/O at a time (the queue's depth, the prefix-cache
//! hit found by reserving blocks, whether the job went on the queue), and
//! asks [`prefill_step`] again after each. The I/O stays in
//! [`super::decode`].

/// Why a prompt over the threshold is prefilled locally after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// No prefill worker of this model is alive.
    NoPrefillWorker,
    /// The prefill queue holds more than the deployment allows.
    QueueFull,
    /// The queue could not be asked, or refused the job.
    EnqueueFailed,
    /// Every live prefill worker's path to this decode worker is
    /// quarantined (its recent transfers failed).
    PathsQuarantined,
}

impl Fallback {
    /// The `reason` label of `xpyd_decode_remote_prefill_fallbacks_total`.
    pub fn label(self) -> &'static str {
        match self {
            Fallback::NoPrefillWorker => "no_prefill_worker",
            Fallback::QueueFull => "queue_full",
            Fallback::EnqueueFailed => "enqueue_failed",
            Fallback::PathsQuarantined => "path_quarantined",
        }
    }
}

/// What to do next for one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillStep {
    /// Prefill here; `Some` names the fallback that forced it.
    Local(Option<Fallback>),
    /// Ask the prefill queue how deep it is.
    QueryQueueDepth,
    /// Reserve the prompt's blocks for a remote prefill, which tells how
    /// much of it our own prefix cache holds.
    Reserve,
    /// Put the job on the prefill queue.
    Enqueue,
    /// The job is queued: wait for its KV.
    Remote,
    /// A fallback was forced and the deployment's policy is to refuse
    /// (`router.onPrefillUnavailable: fail`): answer 503 naming it.
    Refuse(Fallback),
}

/// What the decode worker knows about one prompt so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefillFacts {
    pub prompt_len: usize,
    /// Prompts whose uncached part is at most this long are prefilled here.
    pub threshold: u32,
    /// The deployment's settings allow remote prefill at all.
    pub disaggregated: bool,
    /// A prefill worker of this model is alive.
    pub prefill_alive: bool,
    /// A live prefill worker's path to us is not quarantined.
    pub paths_open: bool,
    /// The deepest prefill queue the deployment allows.
    pub max_queue_depth: u32,
    /// The queue's depth once asked; `Some(None)`: the query failed.
    pub queue_depth: Option<Option<u64>>,
    /// Prompt tokens our prefix cache holds, once blocks are reserved.
    pub cached_tokens: Option<usize>,
    /// Whether the job went on the queue, once tried.
    pub enqueued: Option<bool>,
    /// `router.onPrefillUnavailable: fail`: refuse rather than fall back.
    pub refuse_fallbacks: bool,
}

/// The next step for a prompt, from what is known about it.
pub fn prefill_step(f: &PrefillFacts) -> PrefillStep {
    match next_step(f) {
        PrefillStep::Local(Some(fallback)) if f.refuse_fallbacks => PrefillStep::Refuse(fallback),
        step => step,
    }
}

fn next_step(f: &PrefillFacts) -> PrefillStep {
    use PrefillStep::*;
    let threshold = f.threshold as usize;
    if f.prompt_len <= threshold || !f.disaggregated {
        return Local(None);
    }
    if !f.prefill_alive {
        return Local(Some(Fallback::NoPrefillWorker));
    }
    if !f.paths_open {
        return Local(Some(Fallback::PathsQuarantined));
    }
    match f.queue_depth {
        None => return QueryQueueDepth,
        Some(None) => return Local(Some(Fallback::EnqueueFailed)),
        Some(Some(depth)) if depth > u64::from(f.max_queue_depth) => {
            return Local(Some(Fallback::QueueFull));
        }
        Some(Some(_)) => {}
    }
    let Some(cached) = f.cached_tokens else {
        return Reserve;
    };
    if f.prompt_len.saturating_sub(cached) <= threshold {
        // Our own prefix cache covers enough: the rest is cheap here.
        return Local(None);
    }
    match f.enqueued {
        None => Enqueue,
        Some(false) => Local(Some(Fallback::EnqueueFailed)),
        Some(true) => Remote,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PrefillStep::*;

    /// A 100-token prompt over a threshold of 32, everything available.
    fn long() -> PrefillFacts {
        PrefillFacts {
            prompt_len: 100,
            threshold: 32,
            disaggregated: true,
            prefill_alive: true,
            paths_open: true,
            max_queue_depth: 8,
            ..PrefillFacts::default()
        }
    }

    #[test]
    fn a_refusing_deployment_refuses_forced_fallbacks_only() {
        let refusing = |f: PrefillFacts| PrefillFacts {
            refuse_fallbacks: true,
            ..f
        };
        let cases = [
            (
                PrefillFacts {
                    prefill_alive: false,
                    ..long()
                },
                Refuse(Fallback::NoPrefillWorker),
            ),
            (
                PrefillFacts {
                    paths_open: false,
                    ..long()
                },
                Refuse(Fallback::PathsQuarantined),
            ),
            (
                PrefillFacts {
                    queue_depth: Some(Some(9)),
                    ..long()
                },
                Refuse(Fallback::QueueFull),
            ),
            (
                PrefillFacts {
                    queue_depth: Some(Some(0)),
                    cached_tokens: Some(0),
                    enqueued: Some(false),
                    ..long()
                },
                Refuse(Fallback::EnqueueFailed),
            ),
            // Short prompts and prefix-cache hits are local by choice.
            (
                PrefillFacts {
                    prompt_len: 10,
                    ..long()
                },
                Local(None),
            ),
            (
                PrefillFacts {
                    queue_depth: Some(Some(0)),
                    cached_tokens: Some(90),
                    ..long()
                },
                Local(None),
            ),
            (
                PrefillFacts {
                    queue_depth: Some(Some(0)),
                    cached_tokens: Some(0),
                    enqueued: Some(true),
                    ..long()
                },
                Remote,
            ),
        ];
        for (facts, want) in cases {
            assert_eq!(prefill_step(&refusing(facts.clone())), want, "{facts:?}");
        }
    }

    #[test]
    fn each_prompt_gets_one_plan() {
        let asked = |depth| PrefillFacts {
            queue_depth: Some(depth),
            ..long()
        };
        let reserved = |cached| PrefillFacts {
            cached_tokens: Some(cached),
            ..asked(Some(3))
        };
        let tried = |ok| PrefillFacts {
            enqueued: Some(ok),
            ..reserved(0)
        };
        let table = [
            (
                "short prompt",
                PrefillFacts {
                    prompt_len: 32,
                    ..long()
                },
                Local(None),
            ),
            (
                "empty prompt",
                PrefillFacts {
                    prompt_len: 0,
                    ..long()
                },
                Local(None),
            ),
            (
                "aggregated serving",
                PrefillFacts {
                    disaggregated: false,
                    ..long()
                },
                Local(None),
            ),
            (
                "no prefill worker",
                PrefillFacts {
                    prefill_alive: false,
                    ..long()
                },
                Local(Some(Fallback::NoPrefillWorker)),
            ),
            ("long prompt: ask the queue", long(), QueryQueueDepth),
            (
                "queue unreachable",
                asked(None),
                Local(Some(Fallback::EnqueueFailed)),
            ),
            (
                "queue full",
                asked(Some(9)),
                Local(Some(Fallback::QueueFull)),
            ),
            ("queue at its limit", asked(Some(8)), Reserve),
            ("queue has room", asked(Some(3)), Reserve),
            ("prefix cache covers it", reserved(68), Local(None)),
            ("prefix cache covers little", reserved(67), Enqueue),
            ("nothing cached", reserved(0), Enqueue),
            (
                "enqueue failed",
                tried(false),
                Local(Some(Fallback::EnqueueFailed)),
            ),
            ("queued", tried(true), Remote),
        ];
        for (name, facts, want) in table {
            assert_eq!(prefill_step(&facts), want, "{name}");
        }
    }

    #[test]
    fn fallbacks_keep_their_metric_labels() {
        assert_eq!(Fallback::NoPrefillWorker.label(), "no_prefill_worker");
        assert_eq!(Fallback::QueueFull.label(), "queue_full");
        assert_eq!(Fallback::EnqueueFailed.label(), "enqueue_failed");
    }
}
