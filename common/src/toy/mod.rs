//! The synthetic toy dataset: Pick-a-Pic-schema parquet shards of coloured shapes drawn by our
//! own code, so the demo, the tests and the benchmarks need no download.
//!
//! Each row has a caption such as "a red circle on a blue background", the matching 32x32
//! image (the shape in the named colour, centred with a little jitter, on the named
//! background) and a worse image (wrong colour, wrong shape, wrong background, heavy noise or
//! blur), placed at random as `jpg_0` or `jpg_1` with labels `(1, 0)` or `(0, 1)`. A few rows
//! are ties `(0.5, 0.5)`, which readers drop. Images are JPEG (quality 95), like the real data.
//!
//! `scene` draws the pictures and words the captions, `row` makes one preference row of a
//! good and a worse picture, and `writer` writes the rows as parquet shards.

mod row;
mod scene;
mod writer;

pub use row::{flawed, toy_row, Flaw, ToyRow};
pub use scene::{parse_caption, Colour, Scene, Shape};
pub use writer::{toy_schema, write_toy_dataset};

/// Side of every toy image, in pixels.
pub const TOY_RESOLUTION: u32 = 32;
/// Rows per parquet shard.
pub const TOY_ROWS_PER_SHARD: usize = 4096;
/// Rows per parquet row group (and per written record batch).
pub const TOY_ROWS_PER_ROW_GROUP: usize = 1024;
/// JPEG quality of the stored images.
pub const TOY_JPEG_QUALITY: u8 = 95;
/// Fraction of rows whose labels tie.
pub const TOY_TIE_FRACTION: f64 = 0.05;
