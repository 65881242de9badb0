//! The CLIP BPE tokenizer, through the HF `tokenizers` crate: from a `tokenizer/` folder's
//! `tokenizer.json`, or built from `vocab.json` + `merges.txt` exactly as transformers converts
//! the slow `CLIPTokenizer` (NFC, whitespace squeeze, lowercase, CLIP's split regex, byte-level,
//! `</w>` word suffix). Sequences are `<|startoftext|> ... <|endoftext|>`, truncated to the
//! model length and padded with the folder's pad token (the end token for SD-1.5).

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::error::ModelError;

/// CLIP's word split: contractions, letter runs, single digits, punctuation runs.
const CLIP_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const START_TOKEN: &str = "<|startoftext|>";
const END_TOKEN: &str = "<|endoftext|>";

/// A CLIP tokenizer producing fixed-length id sequences.
pub struct ClipTokenizer {
    inner: Tokenizer,
    start_id: u32,
    end_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("start_id", &self.start_id)
            .field("end_id", &self.end_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

/// Why the tokenizer could not be built from `vocab.json` and `merges.txt`.
#[derive(Debug, thiserror::Error)]
enum BuildError {
    /// The files do not make a BPE model.
    #[error("vocab.json / merges.txt: {0}")]
    Bpe(tokenizers::Error),
    /// A normalizer or split pattern did not compile.
    #[error("{0}")]
    Pattern(tokenizers::Error),
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json`, or `vocab.json` + `merges.txt`;
    /// the pad token and length come from `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let error = |message: String| ModelError::Tokenizer {
            path: dir.to_path_buf(),
            message,
        };
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let mut inner = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| error(format!("tokenizer.json: {e}")))?
        } else {
            for file in [&vocab, &merges] {
                if !file.exists() {
                    return Err(ModelError::MissingFile { path: file.clone() });
                }
            }
            Self::from_vocab_and_merges(&vocab, &merges).map_err(|e| error(e.to_string()))?
        };
        // Special tokens and padding are applied here, the same way for both sources.
        inner.with_post_processor(None::<tokenizers::processors::PostProcessorWrapper>);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| error(e.to_string()))?;

        let settings = TokenizerSettings::read(dir)?;
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| error(format!("token {token:?} is not in the vocabulary")))
        };
        Ok(Self {
            start_id: id(START_TOKEN)?,
            end_id: id(END_TOKEN)?,
            pad_id: id(settings.pad_token.as_deref().unwrap_or(END_TOKEN))?,
            max_length: settings.model_max_length.unwrap_or(77),
            inner,
        })
    }

    /// The CLIP pipeline (normalizer, pre-tokenizer, BPE) over `vocab.json` and `merges.txt`.
    fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<Tokenizer, BuildError> {
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .end_of_word_suffix("</w>".to_string())
            .unk_token(END_TOKEN.to_string())
            .build()
            .map_err(BuildError::Bpe)?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(BuildError::Pattern)?;
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.to_string()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(BuildError::Pattern)?;
        let byte_level = ByteLevel::default()
            .add_prefix_space(false)
            .use_regex(false);
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            byte_level.into(),
        ])));
        Ok(tokenizer)
    }

    /// Sequence length of every encoding (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// One past the largest token id this tokenizer can produce (the text encoder's
    /// `vocab_size` must be at least this).
    pub fn id_limit(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1)
    }

    /// `<|startoftext|> tokens <|endoftext|> pad...`, exactly `max_length` ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: "<tokenizer>".into(),
                message: format!("cannot encode {text:?}: {e}"),
            })?;
        let body = encoding.get_ids();
        let keep = body.len().min(self.max_length.saturating_sub(2));
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.start_id);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.end_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }
}

/// The parts of `tokenizer_config.json` and `special_tokens_map.json` we read.
#[derive(Default)]
struct TokenizerSettings {
    pad_token: Option<String>,
    model_max_length: Option<usize>,
}

impl TokenizerSettings {
    fn read(dir: &Path) -> Result<Self, ModelError> {
        let mut settings = Self::default();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Config {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            // A token is a string or an AddedToken object with a `content` field.
            if let Some(pad) = value.get("pad_token") {
                let token = pad
                    .as_str()
                    .or_else(|| pad.get("content").and_then(|c| c.as_str()));
                if let Some(token) = token {
                    settings.pad_token = Some(token.to_string());
                }
            }
            if let Some(len) = value.get("model_max_length").and_then(|v| v.as_u64()) {
                // transformers writes a huge sentinel when no length is set.
                if len <= 4096 {
                    settings.model_max_length = Some(len as usize);
                }
            }
        }
        Ok(settings)
    }
}
