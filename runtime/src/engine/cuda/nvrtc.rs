//! Compiling kernel sources to PTX with NVRTC, loaded at run time.
//!
//! cudarc (feature `dynamic-loading`) `dlopen`s NVRTC by soname on first use
//! and panics when it is missing. We load `libnvrtc.so.13` first, by absolute
//! path from the folder `scripts/setup` installs (`XPYD_NVRTC_LIB_DIR`, read
//! through [`crate::assets::setting`]), so cudarc's later `dlopen` by soname
//! finds the already-loaded library and a missing NVRTC is a typed error.
//! Without the setting, the system's library path is tried (a CUDA toolkit).
//!
//! Compiling needs no GPU: CI compiles every kernel for `sm_90` this way.
//! This module does not load modules onto a device.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::kernels::KernelSource;
use crate::assets;

/// Environment variable naming the folder that holds `libnvrtc.so.13`.
pub const NVRTC_LIB_DIR_VAR: &str = "XPYD_NVRTC_LIB_DIR";
/// The NVRTC library this build expects (cudarc's `cuda-13000`).
pub const NVRTC_LIB: &str = "libnvrtc.so.13";
/// NVRTC's companion library, loaded by NVRTC itself when compiling.
pub const NVRTC_BUILTINS_LIB: &str = "libnvrtc-builtins.so.13.0";
/// The architecture the CI check compiles for (H100).
pub const DEFAULT_ARCH: ComputeCapability = ComputeCapability { major: 9, minor: 0 };

/// A GPU architecture as compute capability, e.g. 9.0 for H100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeCapability {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// NVRTC could not be loaded or a kernel did not compile.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NvrtcError {
    #[error("{lib} could not be loaded from {path}: {reason}")]
    Load {
        lib: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "NVRTC ({NVRTC_LIB}) not found: set {NVRTC_LIB_DIR_VAR} to the folder holding it, or run scripts/setup (it installs NVRTC and records the folder), or put a CUDA 13 toolkit's lib folder on LD_LIBRARY_PATH"
    )]
    NotFound,
    #[error("NVRTC could not compile kernel source {kernel}.cu for {arch}: {first_error}\n{log}")]
    Compile {
        kernel: String,
        arch: ComputeCapability,
        /// The log's first `error` line (file, line and message).
        first_error: String,
        /// NVRTC's whole log.
        log: String,
    },
    #[error("NVRTC failed on kernel source {kernel}.cu: {message}")]
    Nvrtc { kernel: String, message: String },
    #[error(
        "the NVRTC found is {major}.{minor}; this build needs 13.x ({NVRTC_LIB}): set {NVRTC_LIB_DIR_VAR} (scripts/setup does) or remove the other libnvrtc.so from the loader path"
    )]
    WrongVersion { major: i32, minor: i32 },
    #[error("the PTX of {kernel}.cu lacks its entry point {entry}")]
    MissingEntryPoint { kernel: String, entry: String },
}

static LOADED: OnceLock<Result<Option<PathBuf>, NvrtcError>> = OnceLock::new();

/// Loads NVRTC once per process: from `XPYD_NVRTC_LIB_DIR` when set (the
/// folder is returned), else from the library path (`None`). Later calls
/// return the first outcome.
pub fn load_nvrtc() -> Result<Option<PathBuf>, NvrtcError> {
    LOADED
        .get_or_init(|| {
            let dir = assets::setting(NVRTC_LIB_DIR_VAR).map(PathBuf::from);
            if let Some(dir) = &dir {
                load_from(dir)?;
            }
            // SAFETY: only tries dlopen by the candidate names; after our
            // load the soname match returns the library already in memory.
            if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Err(NvrtcError::NotFound);
            }
            // cudarc tries `libnvrtc.so` before `libnvrtc.so.13`: a toolkit's
            // unversioned NVRTC on the loader path would win over ours.
            let (major, minor) = raw_version()?;
            if major != 13 {
                return Err(NvrtcError::WrongVersion { major, minor });
            }
            Ok(dir)
        })
        .clone()
}

fn load_from(dir: &Path) -> Result<(), NvrtcError> {
    // The builtins first: NVRTC opens them by soname when it compiles.
    for lib in [NVRTC_BUILTINS_LIB, NVRTC_LIB] {
        dlopen_global(lib, &dir.join(lib))?;
    }
    Ok(())
}

/// `dlopen`s `path` for the life of the process (never closed).
pub(crate) fn dlopen_global(lib: &'static str, path: &Path) -> Result<(), NvrtcError> {
    let fail = |reason: String| NvrtcError::Load {
        lib,
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_file() {
        return Err(fail("file not found".into()));
    }
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| fail("path has a NUL byte".into()))?;
    // SAFETY: dlopen with a valid C string; the handle is deliberately leaked
    // so later dlopens by soname (cudarc's) find this library.
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
        return Err(fail(reason));
    }
    Ok(())
}

/// The NVRTC version loaded, as (major, minor).
pub fn version() -> Result<(i32, i32), NvrtcError> {
    load_nvrtc()?;
    raw_version()
}

fn raw_version() -> Result<(i32, i32), NvrtcError> {
    let mut major = 0;
    let mut minor = 0;
    // SAFETY: called after is_culib_present (NVRTC loads); out-pointers are valid.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(NvrtcError::Nvrtc {
            kernel: "-".into(),
            message: format!("nvrtcVersion: {rc:?}"),
        });
    }
    Ok((major, minor))
}

/// Compiles one of the backend's kernel sources to PTX for `arch` and checks
/// that every listed entry point is in it.
pub fn compile_kernel(kernel: &KernelSource, arch: ComputeCapability) -> Result<Ptx, NvrtcError> {
    let ptx = compile_source(kernel.name, kernel.source, arch)?;
    let text = ptx.to_src();
    for entry in kernel.entry_points {
        if !text.contains(&format!(".entry {entry}(")) {
            return Err(NvrtcError::MissingEntryPoint {
                kernel: kernel.name.to_string(),
                entry: entry.to_string(),
            });
        }
    }
    Ok(ptx)
}

/// Compiles CUDA C++ `source` (named `name` in errors and NVRTC's log) to PTX
/// for the virtual architecture of `arch` (`compute_90` for 9.0).
pub fn compile_source(
    name: &str,
    source: &str,
    arch: ComputeCapability,
) -> Result<Ptx, NvrtcError> {
    load_nvrtc()?;
    if source.as_bytes().contains(&0) {
        return Err(NvrtcError::Nvrtc {
            kernel: name.to_string(),
            message: "the source contains a NUL byte".into(),
        });
    }
    let opts = CompileOptions {
        name: Some(format!("{name}.cu")),
        options: vec![
            format!("--gpu-architecture=compute_{}{}", arch.major, arch.minor),
            "--std=c++17".into(),
            // Line info lets profilers map PTX back to the .cu lines.
            "--generate-line-info".into(),
        ],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            let log = log.to_string_lossy().into_owned();
            let first_error = log
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or("(no error line in the log)")
                .trim()
                .to_string();
            NvrtcError::Compile {
                kernel: name.to_string(),
                arch,
                first_error,
                log,
            }
        }
        other => NvrtcError::Nvrtc {
            kernel: name.to_string(),
            message: format!("{other:?}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_without_nvrtc_names_the_library() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_from(dir.path()).unwrap_err().to_string();
        assert!(err.contains("libnvrtc"), "{err}");
        assert!(err.contains("file not found"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn not_found_says_how_to_install() {
        let msg = NvrtcError::NotFound.to_string();
        assert!(msg.contains("libnvrtc.so.13"), "{msg}");
        assert!(msg.contains("XPYD_NVRTC_LIB_DIR"), "{msg}");
        assert!(msg.contains("scripts/setup"), "{msg}");
    }

    #[test]
    fn arch_prints_as_sm() {
        assert_eq!(DEFAULT_ARCH.to_string(), "sm_90");
    }
}
