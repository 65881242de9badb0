//! Errors of model loading and running: each names the thing and the file it came from.

use std::path::PathBuf;

/// What went wrong reading, building or saving a model component.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file the pipeline needs is not there.
    #[error("missing file {path}")]
    MissingFile {
        /// The file that was expected.
        path: PathBuf,
    },
    /// A JSON config could not be parsed.
    #[error("invalid config {path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A config option has a value this implementation does not support.
    #[error("unsupported option `{option}` = {value} in {path}")]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// The option name, as in the file.
        option: String,
        /// The value found.
        value: String,
    },
    /// A weight file is not valid safetensors, or holds a dtype we cannot read.
    #[error("invalid weight file {path}: {message}")]
    WeightFile {
        /// The weight file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the model needs is not in the weight file.
    #[error("tensor `{key}` is missing from {path}")]
    MissingTensor {
        /// The diffusers key.
        key: String,
        /// The weight file.
        path: PathBuf,
    },
    /// A tensor in the weight file has the wrong shape for the model's config.
    #[error("tensor `{key}` in {path} has shape {found:?}, the config needs {expected:?}")]
    ShapeMismatch {
        /// The diffusers key.
        key: String,
        /// The weight file.
        path: PathBuf,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// The tokenizer files could not be loaded.
    #[error("invalid tokenizer in {path}: {message}")]
    Tokenizer {
        /// The tokenizer folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An input tensor has the wrong shape.
    #[error("{what} has shape {found:?}, expected {expected}")]
    InputShape {
        /// Which input.
        what: String,
        /// Shape found.
        found: Vec<usize>,
        /// Shape expected, in words.
        expected: String,
    },
}

impl ModelError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            return Self::MissingFile { path: path.into() };
        }
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// An unsupported option value in a config file.
    pub fn unsupported(
        path: impl Into<PathBuf>,
        option: &str,
        value: impl std::fmt::Debug,
    ) -> Self {
        Self::Unsupported {
            path: path.into(),
            option: option.to_string(),
            value: format!("{value:?}"),
        }
    }
}
