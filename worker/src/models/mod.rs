//! The diffusers image models in burn: `UNet2DConditionModel` and `AutoencoderKL`, with their
//! building blocks, laid out so that every parameter path is its diffusers state-dict key.

pub mod attention;
pub mod embeddings;
pub mod resampling;
pub mod resnet;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod vae;

use std::fmt::Debug;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ModelError;

pub use unet_2d_condition::{OneOrMany, UNet2DConditionConfig, UNet2DConditionModel};
pub use vae::{AutoencoderKL, AutoencoderKLConfig};

/// The weight file name diffusers uses inside a component folder.
pub const WEIGHTS_NAME: &str = "diffusion_pytorch_model.safetensors";
/// The config file name diffusers uses inside a component folder.
pub const CONFIG_NAME: &str = "config.json";
/// The diffusers version whose code these models mirror (written into saved configs).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// Reads and parses a JSON config; errors name the file.
pub(crate) fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes `config` as a diffusers `config.json` with `_class_name` and `_diffusers_version`.
pub(crate) fn write_config<T: Serialize>(
    config: &T,
    class_name: &str,
    path: &Path,
) -> Result<(), ModelError> {
    let invalid = |message: String| ModelError::Config {
        path: path.to_path_buf(),
        message,
    };
    let value = serde_json::to_value(config).map_err(|e| invalid(e.to_string()))?;
    let serde_json::Value::Object(fields) = value else {
        return Err(invalid("config is not a JSON object".to_string()));
    };
    let mut object = serde_json::Map::new();
    object.insert("_class_name".to_string(), class_name.into());
    object.insert("_diffusers_version".to_string(), DIFFUSERS_VERSION.into());
    object.extend(fields);
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(object))
        .map_err(|e| invalid(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}

/// `Err(Unsupported)` naming `option`, its value and the file unless `value == supported`.
pub(crate) fn require_value<T: PartialEq + Debug>(
    path: &Path,
    option: &str,
    value: &T,
    supported: &T,
) -> Result<(), ModelError> {
    if value == supported {
        Ok(())
    } else {
        Err(ModelError::unsupported(path, option, value))
    }
}

/// An `Unsupported` error naming `option`, its value as JSON text, and the file.
pub(crate) fn unsupported_json(path: &Path, option: &str, value: &impl Serialize) -> ModelError {
    ModelError::Unsupported {
        path: path.to_path_buf(),
        option: option.to_string(),
        value: serde_json::to_string(value).unwrap_or_else(|_| "?".to_string()),
    }
}

/// `Err(Unsupported)` naming `option`, its value and the file unless the option is unset
/// (absent or `null`).
pub(crate) fn require_unset(
    path: &Path,
    option: &str,
    value: &Option<serde_json::Value>,
) -> Result<(), ModelError> {
    match value {
        None => Ok(()),
        Some(value) => Err(unsupported_json(path, option, value)),
    }
}

/// `Err(Unsupported)` unless the activation is SiLU (diffusers accepts `silu` and `swish`).
pub(crate) fn require_silu(path: &Path, option: &str, value: &str) -> Result<(), ModelError> {
    if value == "silu" || value == "swish" {
        Ok(())
    } else {
        Err(ModelError::unsupported(path, option, value))
    }
}

/// A `ModelError::Config` about `path`.
pub(crate) fn config_error(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        message: message.into(),
    }
}
