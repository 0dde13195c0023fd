//! The optional PNG of the latency distributions.

use std::path::Path;

use super::stats::RequestRecord;

/// Draws TTFT, TPOT and ITL histograms of the successful requests into `path`.
pub fn latency_png(_records: &[RequestRecord], path: &Path) -> anyhow::Result<()> {
    anyhow::bail!("cannot write {}: plotting is not built yet", path.display())
}
