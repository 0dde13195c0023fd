//! Which device a process computes on: the `--device auto|cpu|cuda|cuda:N|sim`
//! choice, parsed ([`DeviceChoice`]) and resolved against what this machine
//! has ([`resolve`]). `sim` is no device: the simulated engine
//! ([`super::sim`]), which computes nothing and is always available.
//!
//! `cuda` is a promise: without the NVIDIA driver (`libcuda.so.1`), a device
//! at that ordinal or NVRTC, [`resolve`] fails with an error naming what is
//! missing, and the process should exit at startup. `auto` never fails: it
//! takes the GPU when all of that is there, else the CPU, with the reason.
//!
//! For the agent: parse the flag with `str::parse::<DeviceChoice>()` (clap's
//! `value_parser` works, the error is a readable message), call
//! [`resolve`] once at startup and exit on `Err`; on
//! `Ok(ResolvedDevice::Cpu { reason: Some(r) })` the CPU was chosen by
//! `auto` (already logged here). Nothing here allocates GPU memory or
//! creates a context.

use std::str::FromStr;

use super::cuda::nvrtc::{self, ComputeCapability, NvrtcError};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The GPU if one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device `ordinal` (`cuda` is `cuda:0`).
    Cuda {
        ordinal: u32,
    },
    /// No computation: the simulated engine ([`super::sim::SimModel`]).
    Sim,
}

/// `--device` is not one of `auto`, `cpu`, `cuda`, `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid device {given:?}: expected auto, cpu, cuda or cuda:N (N a device number, e.g. cuda:0), or sim (a simulated engine)"
)]
pub struct DeviceParseError {
    pub given: String,
}

impl FromStr for DeviceChoice {
    type Err = DeviceParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeviceParseError {
            given: s.to_string(),
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda { ordinal: 0 }),
            "sim" => Ok(Self::Sim),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let ordinal = n.parse().map_err(|_| bad())?;
                Ok(Self::Cuda { ordinal })
            }
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
            Self::Sim => f.write_str(super::sim::SIM_DEVICE),
        }
    }
}

/// A CUDA device that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDevice {
    pub ordinal: u32,
    pub name: String,
    pub compute_capability: ComputeCapability,
    pub total_memory_bytes: usize,
}

/// Where the process will compute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedDevice {
    /// The CPU; `reason` says why `auto` did not take a GPU (`None` when the
    /// user asked for the CPU).
    Cpu {
        reason: Option<String>,
    },
    Cuda(CudaDevice),
    /// The simulated engine: nothing is computed.
    Sim,
}

/// The oldest GPU the kernels are written for (bf16, Ampere).
pub const MIN_COMPUTE_CAPABILITY: ComputeCapability = ComputeCapability { major: 8, minor: 0 };

/// A CUDA device was asked for and cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device {choice}: the NVIDIA driver library libcuda.so (libcuda.so.1) was not found: is the NVIDIA driver installed and its library on the loader path (in a container: the NVIDIA container runtime)? Use --device cpu to run without a GPU"
    )]
    DriverMissing { choice: DeviceChoice },
    #[error(
        "--device {choice}: the NVIDIA driver (libcuda.so) failed in {call}: {code}. Use --device cpu to run without a GPU"
    )]
    Driver {
        choice: DeviceChoice,
        call: &'static str,
        code: String,
    },
    #[error("--device {choice}: the NVIDIA driver sees no CUDA device")]
    NoDevice { choice: DeviceChoice },
    #[error("--device {choice}: there is no CUDA device {ordinal}; this machine has {count}")]
    NoSuchOrdinal {
        choice: DeviceChoice,
        ordinal: u32,
        count: u32,
    },
    #[error(
        "--device {choice}: {name} is {cc}; the CUDA kernels need {MIN_COMPUTE_CAPABILITY} or newer (bf16)"
    )]
    TooOld {
        choice: DeviceChoice,
        name: String,
        cc: ComputeCapability,
    },
    #[error("--device {choice}: {source}")]
    Nvrtc {
        choice: DeviceChoice,
        source: NvrtcError,
    },
}

/// Resolves `choice` against this machine. `cuda`/`cuda:N` fail with the
/// missing piece named; `auto` falls back to the CPU with a logged reason.
pub fn resolve(choice: DeviceChoice) -> Result<ResolvedDevice, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(ResolvedDevice::Cpu { reason: None }),
        DeviceChoice::Sim => Ok(ResolvedDevice::Sim),
        DeviceChoice::Cuda { ordinal } => probe_cuda(choice, ordinal).map(ResolvedDevice::Cuda),
        DeviceChoice::Auto => match probe_cuda(choice, 0) {
            Ok(dev) => {
                tracing::info!(device = %dev.name, cc = %dev.compute_capability, "--device auto chose CUDA device 0");
                Ok(ResolvedDevice::Cuda(dev))
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::info!(%reason, "--device auto chose the CPU");
                Ok(ResolvedDevice::Cpu {
                    reason: Some(reason),
                })
            }
        },
    }
}

/// Checks the driver, the device at `ordinal` and NVRTC.
fn probe_cuda(choice: DeviceChoice, ordinal: u32) -> Result<CudaDevice, DeviceError> {
    use cudarc::driver::{result, sys};

    // SAFETY: only dlopens libcuda by its candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err(DeviceError::DriverMissing { choice });
    }
    let drv = |call: &'static str| {
        move |e: result::DriverError| DeviceError::Driver {
            choice,
            call,
            code: e
                .error_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|_| format!("{:?}", e.0)),
        }
    };
    // cudarc panics when a symbol is missing from an old driver: keep that
    // a startup error, not an abort.
    let probed = std::panic::catch_unwind(|| -> Result<CudaDevice, DeviceError> {
        match result::init() {
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => {
                return Err(DeviceError::NoDevice { choice });
            }
            other => other.map_err(drv("cuInit"))?,
        }
        let count = result::device::get_count().map_err(drv("cuDeviceGetCount"))? as u32;
        if count == 0 {
            return Err(DeviceError::NoDevice { choice });
        }
        if ordinal >= count {
            return Err(DeviceError::NoSuchOrdinal {
                choice,
                ordinal,
                count,
            });
        }
        let dev = result::device::get(ordinal as i32).map_err(drv("cuDeviceGet"))?;
        let name = result::device::get_name(dev).map_err(drv("cuDeviceGetName"))?;
        use sys::CUdevice_attribute::*;
        // SAFETY: `dev` came from cuDeviceGet.
        let (major, minor, total) = unsafe {
            (
                result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                    .map_err(drv("cuDeviceGetAttribute"))?,
                result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                    .map_err(drv("cuDeviceGetAttribute"))?,
                result::device::total_mem(dev).map_err(drv("cuDeviceTotalMem"))?,
            )
        };
        Ok(CudaDevice {
            ordinal,
            name,
            compute_capability: ComputeCapability {
                major: major as u32,
                minor: minor as u32,
            },
            total_memory_bytes: total,
        })
    })
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(DeviceError::Driver {
            choice,
            call: "loading the driver API",
            code: what,
        })
    })?;
    let cc = probed.compute_capability;
    if (cc.major, cc.minor) < (MIN_COMPUTE_CAPABILITY.major, MIN_COMPUTE_CAPABILITY.minor) {
        return Err(DeviceError::TooOld {
            choice,
            name: probed.name,
            cc,
        });
    }
    nvrtc::load_nvrtc().map_err(|source| DeviceError::Nvrtc { choice, source })?;
    Ok(probed)
}

/// Whether this process can load the NVIDIA driver library at all.
pub fn driver_present() -> bool {
    // SAFETY: only dlopens libcuda by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        let p = |s: &str| s.parse::<DeviceChoice>();
        assert_eq!(p("auto"), Ok(DeviceChoice::Auto));
        assert_eq!(p("cpu"), Ok(DeviceChoice::Cpu));
        assert_eq!(p("CPU"), Ok(DeviceChoice::Cpu));
        assert_eq!(p("cuda"), Ok(DeviceChoice::Cuda { ordinal: 0 }));
        assert_eq!(p("cuda:3"), Ok(DeviceChoice::Cuda { ordinal: 3 }));
        for bad in [
            "", "gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:1:2", "cuda0", "cuda:+1",
        ] {
            let err = p(bad).unwrap_err().to_string();
            assert!(
                err.contains("expected auto, cpu, cuda or cuda:N"),
                "{bad}: {err}"
            );
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
        assert_eq!(DeviceChoice::Cuda { ordinal: 2 }.to_string(), "cuda:2");
        assert_eq!(p("sim"), Ok(DeviceChoice::Sim));
        assert_eq!(p(&DeviceChoice::Sim.to_string()), Ok(DeviceChoice::Sim));
        assert_eq!(resolve(DeviceChoice::Sim).unwrap(), ResolvedDevice::Sim);
        assert_eq!(p(&DeviceChoice::Auto.to_string()), Ok(DeviceChoice::Auto));
    }

    #[test]
    fn cpu_is_always_available() {
        assert_eq!(
            resolve(DeviceChoice::Cpu).unwrap(),
            ResolvedDevice::Cpu { reason: None }
        );
    }

    /// On a machine without the NVIDIA driver (this one, CI): `cuda` is a
    /// startup error naming libcuda.so and `auto` is the CPU with that reason.
    #[test]
    fn without_a_driver_cuda_fails_and_auto_takes_the_cpu() {
        if driver_present() {
            eprintln!(
                "skipped: the NVIDIA driver is present (tests/cuda_gpu.rs covers this machine)"
            );
            return;
        }
        let err = resolve(DeviceChoice::Cuda { ordinal: 0 }).unwrap_err();
        assert!(matches!(err, DeviceError::DriverMissing { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("libcuda.so"), "{msg}");
        assert!(msg.contains("--device cuda:0"), "{msg}");
        assert!(msg.contains("--device cpu"), "{msg}");
        match resolve(DeviceChoice::Auto).unwrap() {
            ResolvedDevice::Cpu { reason: Some(r) } => assert!(r.contains("libcuda.so"), "{r}"),
            other => panic!("auto without a driver chose {other:?}"),
        }
    }
}
