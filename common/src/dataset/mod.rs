//! The dataset layer: Pick-a-Pic parquet reading, image preprocessing and prompt numbering.
//!
//! Pick-a-Pic shards hold one preference pair per row: `caption`, the two encoded images
//! `jpg_0` and `jpg_1`, and the labels `label_0` and `label_1`. [`pickapic`] turns rows into
//! [`PreferencePair`]s (ties dropped, corrupt rows skipped and reported), [`mod@preprocess`] turns
//! encoded images into the CHW `[-1, 1]` floats the VAE expects, and [`prompts`] numbers and
//! splits the prompts deterministically.

mod columns;
pub mod job;
pub mod pickapic;
pub mod preprocess;
pub mod prompts;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use job::{shard_files, JobPrompts};
pub use pickapic::{
    list_shards, read_pairs, ImageCheck, PickAPicReader, PreferencePair, ReadReport,
    DEFAULT_BATCH_SIZE, REQUIRED_COLUMNS,
};
pub use preprocess::{decode, grid_png, preprocess, resize_center_crop, to_chw, to_png};
pub use prompts::{is_held_out, split_prompts, PromptSplit};

/// Where a row came from: the parquet file and the row's 0-based index within it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowRef {
    /// The parquet file the row was read from.
    pub file: Arc<Path>,
    /// The row's 0-based index within the file.
    pub row: u64,
}

impl RowRef {
    /// A reference to `row` of `file`.
    pub fn new(file: impl Into<Arc<Path>>, row: u64) -> Self {
        Self {
            file: file.into(),
            row,
        }
    }
}

impl fmt::Display for RowRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} row {}", self.file.display(), self.row)
    }
}

/// Everything that can go wrong reading, preprocessing or writing a dataset.
///
/// Every message names the file and, where there is one, the row and the column.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file or directory could not be opened, read, written or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The parquet reader or writer failed on a file.
    #[error("{}: parquet: {source}", file.display())]
    Parquet {
        /// The parquet file.
        file: PathBuf,
        /// What the parquet crate said.
        source: parquet::errors::ParquetError,
    },
    /// Decoding or building an arrow record batch failed.
    #[error("{}: arrow: {source}", file.display())]
    Arrow {
        /// The parquet file being read or written.
        file: PathBuf,
        /// What the arrow crate said.
        source: arrow_schema::ArrowError,
    },
    /// A required column is absent from a file's schema.
    #[error("{}: required column `{column}` is missing", file.display())]
    MissingColumn {
        /// The parquet file.
        file: PathBuf,
        /// The missing column.
        column: &'static str,
    },
    /// A required column has a type the reader does not accept.
    #[error("{}: column `{column}` has type {found}, expected {expected}", file.display())]
    ColumnType {
        /// The parquet file.
        file: PathBuf,
        /// The column.
        column: &'static str,
        /// The arrow type found in the file.
        found: String,
        /// The types accepted.
        expected: &'static str,
    },
    /// An image in a row could not be decoded or was unusable.
    #[error("{at} column `{column}`: {reason}")]
    BadImage {
        /// The row.
        at: RowRef,
        /// The image column (`jpg_0` or `jpg_1`).
        column: &'static str,
        /// Why the image is unusable.
        reason: String,
    },
    /// Encoded bytes that are not a decodable image (no row known yet; see
    /// [`DatasetError::in_row`]).
    #[error("cannot decode image: {0}")]
    Decode(#[source] image::ImageError),
    /// Encoding an image (PNG or JPEG) failed.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// What the image crate said.
        source: image::ImageError,
    },
    /// A caller passed an argument that cannot be used.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl DatasetError {
    /// Attach the row and image column to a [`DatasetError::Decode`] error, turning it into a
    /// [`DatasetError::BadImage`]; other errors are returned unchanged.
    pub fn in_row(self, at: &RowRef, column: &'static str) -> Self {
        match self {
            Self::Decode(source) => Self::BadImage {
                at: at.clone(),
                column,
                reason: format!("cannot decode image: {source}"),
            },
            other => other,
        }
    }
}
