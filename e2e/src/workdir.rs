//! Temporary folders for servers' data and logs, removed by their owner, at
//! process exit, or (after a hard kill) by the next harness run.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{HarnessError, Result};
use crate::process;

/// A folder under `$TMPDIR/xpyd-e2e/<pid>-<n>-<name>`, deleted on drop.
#[derive(Debug)]
pub struct Workdir {
    path: PathBuf,
}

fn base() -> PathBuf {
    std::env::temp_dir().join("xpyd-e2e")
}

impl Workdir {
    pub fn new(name: &str) -> Result<Self> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_dead_runs);
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = base().join(format!("{}-{n}-{name}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(HarnessError::io(format!("create {}", path.display())))?;
        process::remove_at_exit(&path);
        Ok(Workdir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subfolder, created.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).map_err(HarnessError::io(format!("create {}", p.display())))?;
        Ok(p)
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        process::forget_dir(&self.path);
    }
}

/// Removes folders left by harness runs whose process no longer exists.
fn sweep_dead_runs() {
    let Ok(entries) = std::fs::read_dir(base()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) == 0 }
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        // A real node's folder with mounts still in it (its run was killed)
        // is left to the host sweep, which unmounts first (crate::host).
        if !alive && crate::host::mounts_under(&entry.path()).is_empty() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workdir_is_removed_on_drop() {
        let dir = Workdir::new("drop").unwrap();
        let path = dir.path().to_path_buf();
        std::fs::write(path.join("x"), b"x").unwrap();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn folders_of_dead_runs_are_swept() {
        // pid 0x7ffffffe is far above pid_max, so never alive.
        let stale = base().join("2147483646-0-stale");
        std::fs::create_dir_all(&stale).unwrap();
        sweep_dead_runs();
        assert!(!stale.exists());
    }
}
