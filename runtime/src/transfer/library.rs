//! Finding and loading the NIXL shared libraries at run time.
//!
//! `nixl-sys` is built with `stub-api`: it `dlopen`s `libnixl_capi.so` by its
//! soname on first use and aborts the process when it is not found. We load it
//! first, by absolute path from the folder `scripts/setup` installs (or
//! `XPYD_NIXL_LIB_DIR`), so the process finds NIXL without `LD_LIBRARY_PATH`
//! and a missing library is a clear startup error instead of an abort.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::assets::{self, AssetError};

/// The loaded NIXL libraries.
#[derive(Debug, Clone)]
pub struct NixlLibrary {
    /// Folder holding `libnixl_capi.so`.
    pub lib_dir: PathBuf,
    /// Folder NIXL loads its backends (UCX, POSIX, …) from.
    pub plugin_dir: PathBuf,
}

/// NIXL could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NixlLoadError {
    #[error("{0}")]
    NotInstalled(String),
    #[error("{path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error(
        "loaded {path}, but nixl-sys still reports the stub API: the library did not register under its soname"
    )]
    StillStub { path: PathBuf },
}

impl From<AssetError> for NixlLoadError {
    fn from(e: AssetError) -> Self {
        NixlLoadError::NotInstalled(e.to_string())
    }
}

static LOADED: OnceLock<Result<NixlLibrary, NixlLoadError>> = OnceLock::new();

/// Loads NIXL once per process from the installed folder; later calls return
/// the first outcome.
pub fn load_nixl() -> Result<NixlLibrary, NixlLoadError> {
    LOADED
        .get_or_init(|| load_from(&assets::nixl_lib_dir()?))
        .clone()
}

fn load_from(lib_dir: &Path) -> Result<NixlLibrary, NixlLoadError> {
    let path = lib_dir.join("libnixl_capi.so");
    if !path.is_file() {
        return Err(NixlLoadError::Load {
            path,
            reason: "file not found".into(),
        });
    }
    let plugin_dir = lib_dir.join("plugins");
    // NIXL reads its plugin folder from the environment when an agent is
    // created. Set it before any agent exists unless the operator chose one.
    if std::env::var_os("NIXL_PLUGIN_DIR").is_none() {
        // SAFETY: called once, before any NIXL agent (the only reader) exists.
        unsafe { std::env::set_var("NIXL_PLUGIN_DIR", &plugin_dir) };
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| NixlLoadError::Load {
        path: path.clone(),
        reason: "path contains a NUL byte".into(),
    })?;
    // SAFETY: dlopen with a valid C string; the handle is kept for the life of
    // the process (never dlclosed), so nixl-sys' later dlopen by soname finds it.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let reason = unsafe {
            let err = libc::dlerror();
            if err.is_null() {
                "dlopen failed".to_string()
            } else {
                CStr::from_ptr(err).to_string_lossy().into_owned()
            }
        };
        return Err(NixlLoadError::Load { path, reason });
    }
    if nixl_sys::is_stub() {
        return Err(NixlLoadError::StillStub { path });
    }
    tracing::info!(lib_dir = %lib_dir.display(), "NIXL libraries loaded");
    Ok(NixlLibrary {
        lib_dir: lib_dir.to_path_buf(),
        plugin_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_without_nixl_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_from(dir.path()).unwrap_err().to_string();
        assert!(err.contains("libnixl_capi.so"), "{err}");
        assert!(err.contains("file not found"), "{err}");
    }
}
