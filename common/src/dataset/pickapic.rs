//! Pick-a-Pic parquet shards to preference pairs: streamed record batches, ties dropped,
//! corrupt rows skipped and reported.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;

use super::columns::{check_column_type, label_values, BytesColumn, TextColumn};
use super::{preprocess, DatasetError, RowRef};

/// The columns every shard must have; any others are ignored (and never read).
pub const REQUIRED_COLUMNS: [&str; 5] = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"];

/// Rows per record batch when streaming a shard.
pub const DEFAULT_BATCH_SIZE: usize = 256;

/// How much of each image the reader verifies before accepting a row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageCheck {
    /// Only that the bytes are present and non-empty.
    None,
    /// The format is recognised from the content and the header yields dimensions (cheap).
    #[default]
    Header,
    /// Both images decode fully (expensive: a JPEG decode per image).
    Full,
}

/// One usable row: a caption with its preferred and rejected images, still encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    /// The prompt.
    pub caption: String,
    /// Encoded bytes (JPEG or PNG) of the preferred image.
    pub winner: Vec<u8>,
    /// Encoded bytes of the rejected image.
    pub loser: Vec<u8>,
    /// Whether the winner came from `jpg_0` (else from `jpg_1`).
    pub winner_first: bool,
    /// The row this pair was read from.
    pub source: RowRef,
}

impl PreferencePair {
    /// The column the winner was read from.
    pub fn winner_column(&self) -> &'static str {
        if self.winner_first {
            "jpg_0"
        } else {
            "jpg_1"
        }
    }

    /// The column the loser was read from.
    pub fn loser_column(&self) -> &'static str {
        if self.winner_first {
            "jpg_1"
        } else {
            "jpg_0"
        }
    }

    /// The winner preprocessed to CHW `[-1, 1]` floats; a decode error names the row.
    pub fn winner_pixels(&self, resolution: u32, flip: bool) -> Result<Vec<f32>, DatasetError> {
        preprocess::preprocess(&self.winner, resolution, flip)
            .map_err(|e| e.in_row(&self.source, self.winner_column()))
    }

    /// The loser preprocessed to CHW `[-1, 1]` floats; a decode error names the row.
    pub fn loser_pixels(&self, resolution: u32, flip: bool) -> Result<Vec<f32>, DatasetError> {
        preprocess::preprocess(&self.loser, resolution, flip)
            .map_err(|e| e.in_row(&self.source, self.loser_column()))
    }
}

/// What happened to the rows read: how many, how many ties were dropped, which were skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadReport {
    /// Rows read, whatever became of them.
    pub rows: u64,
    /// Rows dropped because their labels tie.
    pub ties_dropped: u64,
    /// Rows skipped as corrupt, with the reason.
    pub skipped: Vec<(RowRef, String)>,
}

impl ReadReport {
    /// Record a skipped row and log it. Callers that find a bad image later (at decode time)
    /// use this too, so one report counts every skipped row.
    pub fn skip(&mut self, at: RowRef, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::warn!(file = %at.file.display(), row = at.row, %reason, "skipping row");
        self.skipped.push((at, reason));
    }

    /// Add another report's counts to this one.
    pub fn merge(&mut self, other: ReadReport) {
        self.rows += other.rows;
        self.ties_dropped += other.ties_dropped;
        self.skipped.extend(other.skipped);
    }

    /// Rows kept as pairs: read, less ties, less skipped.
    pub fn kept(&self) -> u64 {
        self.rows - self.ties_dropped - self.skipped.len() as u64
    }
}

/// What becomes of one row.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RowOutcome {
    /// A usable pair; `winner_first` says whether `jpg_0` won.
    Pair { winner_first: bool },
    /// The labels tie: dropped, not an error.
    Tie,
    /// A corrupt row, with the reason.
    Skip(String),
}

/// The raw cells of one row, borrowed from a record batch.
struct RawRow<'a> {
    caption: Option<&'a str>,
    images: [Option<&'a [u8]>; 2],
    labels: [Option<f64>; 2],
}

/// Decide what a row becomes. Ties are decided before the images are looked at, so a tie
/// with a broken image is counted as a tie, not as a skip.
fn classify(row: &RawRow<'_>, check: ImageCheck) -> RowOutcome {
    if row.caption.is_none() {
        return RowOutcome::Skip("null caption".into());
    }
    let mut labels = [0.0; 2];
    for (i, label) in row.labels.iter().enumerate() {
        match label {
            None => return RowOutcome::Skip(format!("null label_{i}")),
            Some(v) if v.is_nan() => return RowOutcome::Skip(format!("label_{i} is NaN")),
            Some(v) => labels[i] = *v,
        }
    }
    if labels[0] == labels[1] {
        return RowOutcome::Tie;
    }
    for (i, image) in row.images.iter().enumerate() {
        let reason = match image {
            None => Some("null image".to_string()),
            Some([]) => Some("empty image".to_string()),
            Some(bytes) => check_image(bytes, check).err(),
        };
        if let Some(reason) = reason {
            return RowOutcome::Skip(format!("column `jpg_{i}`: {reason}"));
        }
    }
    RowOutcome::Pair {
        winner_first: labels[0] > labels[1],
    }
}

/// Verify encoded image bytes as far as `check` asks.
fn check_image(bytes: &[u8], check: ImageCheck) -> Result<(), String> {
    match check {
        ImageCheck::None => Ok(()),
        ImageCheck::Header => {
            let reader = image::ImageReader::new(Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| e.to_string())?;
            if reader.format().is_none() {
                return Err("unrecognised image format".into());
            }
            reader
                .into_dimensions()
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        ImageCheck::Full => preprocess::decode(bytes)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    }
}

/// Streams one Pick-a-Pic shard as batches of [`PreferencePair`]s, reading only the required
/// columns.
pub struct PickAPicReader {
    file: Arc<Path>,
    batches: ParquetRecordBatchReader,
    num_rows: u64,
    next_row: u64,
    check: ImageCheck,
}

impl std::fmt::Debug for PickAPicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickAPicReader")
            .field("file", &self.file)
            .field("num_rows", &self.num_rows)
            .field("next_row", &self.next_row)
            .field("check", &self.check)
            .finish()
    }
}

impl PickAPicReader {
    /// Open a shard with [`DEFAULT_BATCH_SIZE`]; fails if a required column is missing or has
    /// a type the reader does not accept.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DatasetError> {
        Self::open_with_batch_size(path, DEFAULT_BATCH_SIZE)
    }

    /// Open a shard, streaming `batch_size` rows at a time.
    #[tracing::instrument(skip_all, fields(file = %path.as_ref().display()))]
    pub fn open_with_batch_size(
        path: impl AsRef<Path>,
        batch_size: usize,
    ) -> Result<Self, DatasetError> {
        let path = path.as_ref();
        if batch_size == 0 {
            return Err(DatasetError::InvalidArgument(format!(
                "batch size 0 for {}",
                path.display()
            )));
        }
        let parquet_err = |source| DatasetError::Parquet {
            file: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(|source| DatasetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err)?;
        let schema = builder.schema().clone();
        let mut roots = Vec::with_capacity(REQUIRED_COLUMNS.len());
        for column in REQUIRED_COLUMNS {
            let index = schema
                .index_of(column)
                .map_err(|_| DatasetError::MissingColumn {
                    file: path.to_path_buf(),
                    column,
                })?;
            check_column_type(path, column, schema.field(index).data_type())?;
            roots.push(index);
        }
        let num_rows = u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let batches = builder
            .with_projection(mask)
            .with_batch_size(batch_size)
            .build()
            .map_err(parquet_err)?;
        Ok(Self {
            file: Arc::from(path),
            batches,
            num_rows,
            next_row: 0,
            check: ImageCheck::default(),
        })
    }

    /// Choose how much of each image is verified while reading (default: the header).
    pub fn with_image_check(mut self, check: ImageCheck) -> Self {
        self.check = check;
        self
    }

    /// The shard being read.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Rows in the shard, from its footer.
    pub fn num_rows(&self) -> u64 {
        self.num_rows
    }

    /// The pairs of the next record batch, with ties and skips recorded in `report`;
    /// `None` at the end of the file.
    pub fn next_batch(
        &mut self,
        report: &mut ReadReport,
    ) -> Option<Result<Vec<PreferencePair>, DatasetError>> {
        let batch = match self.batches.next()? {
            Ok(batch) => batch,
            Err(source) => {
                return Some(Err(DatasetError::Arrow {
                    file: self.file.to_path_buf(),
                    source,
                }))
            }
        };
        Some(self.convert(&batch, report))
    }

    /// Read the rest of the shard, appending pairs to `pairs`.
    pub fn read_to_end(
        &mut self,
        pairs: &mut Vec<PreferencePair>,
        report: &mut ReadReport,
    ) -> Result<(), DatasetError> {
        while let Some(batch) = self.next_batch(report) {
            pairs.extend(batch?);
        }
        Ok(())
    }

    fn convert(
        &mut self,
        batch: &RecordBatch,
        report: &mut ReadReport,
    ) -> Result<Vec<PreferencePair>, DatasetError> {
        let file = &self.file;
        let captions = TextColumn::of(batch, file, "caption")?;
        let images = [
            BytesColumn::of(batch, file, "jpg_0")?,
            BytesColumn::of(batch, file, "jpg_1")?,
        ];
        let labels_0 = label_values(batch, file, "label_0")?;
        let labels_1 = label_values(batch, file, "label_1")?;
        let mut pairs = Vec::with_capacity(batch.num_rows());
        for (i, (&label_0, &label_1)) in labels_0.iter().zip(&labels_1).enumerate() {
            let at = RowRef::new(Arc::clone(file), self.next_row);
            self.next_row += 1;
            report.rows += 1;
            let row = RawRow {
                caption: captions.get(i),
                images: [images[0].get(i), images[1].get(i)],
                labels: [label_0, label_1],
            };
            match classify(&row, self.check) {
                RowOutcome::Tie => report.ties_dropped += 1,
                RowOutcome::Skip(reason) => report.skip(at, reason),
                RowOutcome::Pair { winner_first } => {
                    let (w, l) = if winner_first { (0, 1) } else { (1, 0) };
                    pairs.push(PreferencePair {
                        caption: row.caption.unwrap_or_default().to_string(),
                        winner: row.images[w].unwrap_or_default().to_vec(),
                        loser: row.images[l].unwrap_or_default().to_vec(),
                        winner_first,
                        source: at,
                    });
                }
            }
        }
        Ok(pairs)
    }
}

/// Read every shard in order: pairs in file order then row order, one report for all.
pub fn read_pairs<P: AsRef<Path>>(
    paths: &[P],
) -> Result<(Vec<PreferencePair>, ReadReport), DatasetError> {
    let mut pairs = Vec::new();
    let mut report = ReadReport::default();
    for path in paths {
        PickAPicReader::open(path)?.read_to_end(&mut pairs, &mut report)?;
    }
    Ok((pairs, report))
}

/// The `*.parquet` files directly in `dir`, sorted by name so dataset order is stable.
pub fn list_shards(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>, DatasetError> {
    let dir = dir.as_ref();
    let io_err = |source| DatasetError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let path = entry.map_err(io_err)?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "parquet") {
            shards.push(path);
        }
    }
    shards.sort();
    Ok(shards)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on failure
mod tests {
    use super::*;
    use arrow_schema::DataType;

    fn png() -> Vec<u8> {
        let img = image::RgbImage::from_pixel(4, 4, image::Rgb([10, 20, 30]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn row<'a>(caption: Option<&'a str>, images: [&'a [u8]; 2], labels: [f64; 2]) -> RawRow<'a> {
        RawRow {
            caption,
            images: [Some(images[0]), Some(images[1])],
            labels: [Some(labels[0]), Some(labels[1])],
        }
    }

    #[test]
    fn winner_follows_the_larger_label() {
        let img = png();
        let first = row(Some("a"), [&img, &img], [1.0, 0.0]);
        let second = row(Some("a"), [&img, &img], [0.0, 1.0]);
        assert_eq!(
            classify(&first, ImageCheck::Header),
            RowOutcome::Pair { winner_first: true }
        );
        assert_eq!(
            classify(&second, ImageCheck::Header),
            RowOutcome::Pair {
                winner_first: false
            }
        );
    }

    #[test]
    fn ties_are_dropped_before_images_are_checked() {
        let tie = row(Some("a"), [b"junk", b""], [0.5, 0.5]);
        assert_eq!(classify(&tie, ImageCheck::Full), RowOutcome::Tie);
    }

    #[test]
    fn corrupt_rows_are_skipped_with_a_reason() {
        let img = png();
        let cases = [
            (row(None, [&img, &img], [1.0, 0.0]), "null caption"),
            (row(Some("a"), [&img, b""], [1.0, 0.0]), "jpg_1"),
            (row(Some("a"), [b"not an image", &img], [1.0, 0.0]), "jpg_0"),
            (row(Some("a"), [&img, &img], [f64::NAN, 0.0]), "NaN"),
        ];
        for (r, expect) in cases {
            match classify(&r, ImageCheck::Header) {
                RowOutcome::Skip(reason) => assert!(reason.contains(expect), "{reason}"),
                other => panic!("expected a skip, got {other:?}"),
            }
        }
        let mut null_image = row(Some("a"), [&img, &img], [1.0, 0.0]);
        null_image.images[0] = None;
        assert_eq!(
            classify(&null_image, ImageCheck::None),
            RowOutcome::Skip("column `jpg_0`: null image".into())
        );
    }

    #[test]
    fn report_counts_kept_rows() {
        let mut report = ReadReport {
            rows: 10,
            ties_dropped: 2,
            skipped: Vec::new(),
        };
        report.skip(RowRef::new(Path::new("x.parquet"), 3), "bad");
        assert_eq!(report.kept(), 7);
        report.merge(report.clone());
        assert_eq!(
            (report.rows, report.ties_dropped, report.kept()),
            (20, 4, 14)
        );
    }

    #[test]
    fn label_types_are_checked() {
        let file = Path::new("f.parquet");
        assert!(check_column_type(file, "label_0", &DataType::Float64).is_ok());
        assert!(check_column_type(file, "label_0", &DataType::Int64).is_ok());
        assert!(check_column_type(file, "jpg_0", &DataType::LargeBinary).is_ok());
        let err = check_column_type(file, "label_1", &DataType::Utf8).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("f.parquet") && msg.contains("label_1"),
            "{msg}"
        );
    }
}
