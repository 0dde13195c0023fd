//! Hands NIXL notifications to the requests waiting for them.
//!
//! One thread per decode worker polls the agent and completes the waiter of
//! each notification's request; a notification nobody waits for (its
//! request timed out or was cancelled) is dropped with a log line. One
//! poller instead of a blocking wait per request keeps the thread count flat
//! under load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::sync::lock;
use crate::transfer::{ReceivedNotification, TransferAgent};

/// Poll interval bounds: fast while notifications flow, slower when idle.
const POLL_MIN: Duration = Duration::from_micros(200);
const POLL_MAX: Duration = Duration::from_millis(2);

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<ReceivedNotification>>>>;

/// The poller. Stops (and joins its thread) on drop.
pub(crate) struct NotificationHub {
    waiters: Waiters,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NotificationHub {
    pub(crate) fn start(agent: TransferAgent) -> std::io::Result<NotificationHub> {
        let waiters: Waiters = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("xpyd-notify".into())
            .spawn({
                let (waiters, stop) = (waiters.clone(), stop.clone());
                move || poll_loop(&agent, &waiters, &stop)
            })?;
        Ok(NotificationHub {
            waiters,
            stop,
            thread: Some(thread),
        })
    }

    /// Expect the notification of `request_id`; register before the peer
    /// can possibly send it. Dropping the receiver withdraws the wait.
    pub(crate) fn expect(&self, request_id: &str) -> oneshot::Receiver<ReceivedNotification> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(request_id.to_string(), tx);
        rx
    }

    /// Stop waiting for `request_id`: a later notification is dropped.
    pub(crate) fn forget(&self, request_id: &str) {
        lock(&self.waiters).remove(request_id);
    }
}

impl Drop for NotificationHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn poll_loop(agent: &TransferAgent, waiters: &Waiters, stop: &AtomicBool) {
    let mut wait = POLL_MIN;
    while !stop.load(Ordering::Relaxed) {
        let got = match agent.poll_notifications() {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!("polling NIXL notifications failed: {e}");
                Vec::new()
            }
        };
        wait = if got.is_empty() {
            (wait * 2).min(POLL_MAX)
        } else {
            POLL_MIN
        };
        for n in got {
            let id = n.notification.request_id.clone();
            match lock(waiters).remove(&id) {
                Some(tx) => {
                    let _ = tx.send(n);
                }
                None => tracing::info!(
                    request_id = %id,
                    from = %n.from_agent,
                    "late KV notification dropped: the request no longer waits"
                ),
            }
        }
        std::thread::sleep(wait);
    }
}
