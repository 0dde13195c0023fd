//! Polling with a deadline, the only way the harness waits.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

/// Polls `probe` until it returns `Ok(true)` or `timeout` passes. The last
/// `Err` the probe returned is included in the timeout error, so a failure
/// says what was wrong, not only that time ran out.
pub async fn wait_until<F, Fut, E>(what: &str, timeout: Duration, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<bool, E>>,
    E: std::fmt::Display,
{
    let start = Instant::now();
    let mut last_err = None;
    let mut pause = Duration::from_millis(50);
    loop {
        match probe().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e.to_string()),
        }
        if start.elapsed() >= timeout {
            return Err(HarnessError::Timeout {
                what: what.to_string(),
                secs: start.elapsed().as_secs_f64(),
                detail: last_err
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_probe_that_never_succeeds_times_out_with_its_last_error() {
        let err = wait_until("the impossible", Duration::from_millis(200), || async {
            Err::<bool, _>("still broken")
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("the impossible"), "{err}");
        assert!(err.contains("still broken"), "{err}");
    }

    #[tokio::test]
    async fn a_probe_that_succeeds_returns() {
        let mut n = 0;
        wait_until("third time", Duration::from_secs(5), || {
            n += 1;
            let done = n >= 3;
            async move { Ok::<_, String>(done) }
        })
        .await
        .unwrap();
        assert_eq!(n, 3);
    }
}
