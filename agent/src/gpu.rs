//! Which GPUs this process can use, through NVML (`nvml-wrapper`, which
//! loads `libnvidia-ml.so` at run time): a machine without the driver or
//! without devices is reported as "no GPU: CPU backend", never an error.

/// One NVIDIA GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub utilization_percent: u32,
}

impl Gpu {
    /// How a registration record names it.
    pub fn describe(&self) -> String {
        format!(
            "cuda:{} {} ({} MiB)",
            self.index,
            self.name,
            self.memory_total_bytes >> 20
        )
    }
}

/// The GPUs NVML sees, or why there are none.
pub fn discover() -> Result<Vec<Gpu>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML unavailable ({e})"))?;
    let count = nvml
        .device_count()
        .map_err(|e| format!("NVML cannot count devices ({e})"))?;
    let mut gpus = Vec::new();
    for index in 0..count {
        let device = nvml
            .device_by_index(index)
            .map_err(|e| format!("NVML device {index}: {e}"))?;
        let memory = device.memory_info().ok();
        gpus.push(Gpu {
            index,
            name: device.name().unwrap_or_else(|_| "unknown".into()),
            memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
            memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
            utilization_percent: device.utilization_rates().map_or(0, |u| u.gpu),
        });
    }
    Ok(gpus)
}

/// Log what this process will compute on, and return the devices for the
/// registration record.
pub fn report() -> Vec<String> {
    match discover() {
        Ok(gpus) if !gpus.is_empty() => {
            for gpu in &gpus {
                tracing::info!(
                    gpu = %gpu.describe(),
                    used_mib = gpu.memory_used_bytes >> 20,
                    utilization = gpu.utilization_percent,
                    "GPU found (this build computes on the CPU backend)"
                );
            }
            let mut devices = vec!["cpu".to_string()];
            devices.extend(gpus.iter().map(Gpu::describe));
            devices
        }
        Ok(_) => {
            tracing::info!("no GPU: CPU backend (NVML sees no devices)");
            vec!["cpu".to_string()]
        }
        Err(why) => {
            tracing::info!("no GPU: CPU backend ({why})");
            vec!["cpu".to_string()]
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_machine_without_the_driver_reports_why_instead_of_failing() {
        // This machine may or may not have NVML: either way `report` gives
        // the CPU backend first and never panics.
        let devices = super::report();
        assert_eq!(devices[0], "cpu");
        if let Err(why) = super::discover() {
            assert!(why.contains("NVML"), "{why}");
        }
    }
}
