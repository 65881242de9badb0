//! Choosing the compute device at run time: `flex` (pure-Rust CPU, the default), `wgpu`
//! (Vulkan/Metal GPUs) and `cuda`, the last two when built with their cargo features.

use burn::tensor::Device;

/// Device names this build accepts.
pub fn available_devices() -> Vec<&'static str> {
    let mut names = vec!["flex"];
    if cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        names.push("cuda");
    }
    names
}

/// Why a device name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Not a device this build has.
    #[error("unknown device {name:?}; this build has: {}", available.join(", "))]
    Unknown {
        /// The name given.
        name: String,
        /// The devices this build has.
        available: Vec<&'static str>,
    },
    /// `cuda:N` with an `N` that is not an index.
    #[error("bad cuda device index in {0:?}")]
    BadIndex(String),
}

/// The device called `name` (`flex`, `wgpu`, `cuda` or `cuda:N`), or an error listing the
/// devices this build has.
pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    match name {
        "flex" | "cpu" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "cuda")]
        other if other == "cuda" || other.starts_with("cuda:") => {
            let index = other
                .strip_prefix("cuda:")
                .map(|i| {
                    i.parse::<usize>()
                        .map_err(|_| DeviceError::BadIndex(other.to_string()))
                })
                .transpose()?
                .unwrap_or(0);
            Ok(Device::cuda(index))
        }
        other => Err(DeviceError::Unknown {
            name: other.to_string(),
            available: available_devices(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_device_lists_the_known_ones() {
        let err = parse_device("tpu").expect_err("no tpu").to_string();
        assert!(err.contains("tpu") && err.contains("flex"), "{err}");
        assert!(parse_device("flex").is_ok());
    }
}
