//! The models crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid GGUF file: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("{path}: invalid model config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unsupported architecture `{0}` (supported: llama, qwen2, deepseek2 / DeepSeek-V2 / V3)")]
    UnsupportedArchitecture(String),
    #[error("weight `{0}` is missing from the checkpoint")]
    MissingWeight(String),
    #[error("weight `{name}` has shape {actual:?}, expected {expected:?}")]
    WeightShape { name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("model `{spec}` not found: {reason}")]
    NotFound { spec: String, reason: String },
    #[error("could not fetch `{file}` from the Hugging Face Hub repo `{repo}`: {reason}")]
    Hub { repo: String, file: String, reason: String },
    #[error("device {device}: {message}")]
    Device { device: String, message: String },
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Kernel(#[from] ragnode_kernels::quant::QuantError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
