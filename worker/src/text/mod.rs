//! The text side of the pipeline: the CLIP BPE tokenizer and the frozen CLIP text encoder.

pub mod clip;
pub mod tokenizer;

pub use clip::{ClipTextConfig, ClipTextModel};
pub use tokenizer::ClipTokenizer;
