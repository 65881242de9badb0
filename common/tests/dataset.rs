//! Dataset layer end to end: toy shards written and read back, malformed files and rows,
//! preprocessing of non-square images and the held-out split.

#![allow(clippy::unwrap_used)] // tests may panic on failure

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Float32Array, Int64Array, RecordBatch, StringArray};
use image::{Rgb, RgbImage};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use spin_common::dataset::{
    decode, list_shards, preprocess, read_pairs, split_prompts, DatasetError, ImageCheck,
    PickAPicReader, ReadReport,
};
use spin_common::toy::{
    parse_caption, toy_row, write_toy_dataset, Colour, TOY_RESOLUTION, TOY_ROWS_PER_SHARD,
};

/// A fresh directory under the system temp dir, unique per process and call, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spin-common-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>, compression: Compression) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let props = WriterProperties::builder()
        .set_compression(compression)
        .build();
    let mut writer =
        ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn png(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn jpeg(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
        .encode_image(image)
        .unwrap();
    out
}

#[test]
fn toy_round_trip_keeps_winners_that_match_their_captions() {
    let dir = Scratch::new("toy");
    let rows = 300;
    let paths = write_toy_dataset(&dir, rows, 42).unwrap();
    assert_eq!(paths, vec![dir.join("toy-00000.parquet")]);

    let (pairs, report) = read_pairs(&paths).unwrap();
    let expected: Vec<_> = (0..rows as u64).map(|i| toy_row(42, i).unwrap()).collect();
    let ties = expected.iter().filter(|r| r.label_0 == r.label_1).count();
    assert!(ties > 0, "the toy set should contain a few ties");
    assert_eq!(report.rows, rows as u64);
    assert_eq!(report.ties_dropped, ties as u64);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(pairs.len(), rows - ties);
    assert_eq!(report.kept(), pairs.len() as u64);

    let centre = TOY_RESOLUTION / 2;
    for pair in &pairs {
        let row = &expected[pair.source.row as usize];
        assert_eq!(pair.caption, row.caption);
        assert_eq!(pair.winner_first, row.label_0 > row.label_1);
        let (_, fg, _) = parse_caption(&pair.caption).unwrap();
        let winner = decode(&pair.winner).unwrap();
        assert_eq!(winner.dimensions(), (TOY_RESOLUTION, TOY_RESOLUTION));
        let seen = Colour::nearest(winner.get_pixel(centre, centre).0);
        assert_eq!(seen, fg, "{} ({})", pair.caption, pair.source);
        assert_ne!(pair.winner, pair.loser);
        let pixels = pair.winner_pixels(16, true).unwrap();
        assert_eq!(pixels.len(), 3 * 16 * 16);
    }
}

#[test]
fn toy_writer_is_deterministic_and_shards_in_order() {
    let a = Scratch::new("det-a");
    let b = Scratch::new("det-b");
    let rows = TOY_ROWS_PER_SHARD + 5;
    let pa = write_toy_dataset(&a, rows, 7).unwrap();
    let pb = write_toy_dataset(&b, rows, 7).unwrap();
    assert_eq!(pa.len(), 2);
    for (x, y) in pa.iter().zip(&pb) {
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
    }
    assert_eq!(list_shards(&a).unwrap(), pa);

    let mut reader = PickAPicReader::open(&pa[1]).unwrap();
    assert_eq!(reader.num_rows(), 5);
    let mut report = ReadReport::default();
    let mut pairs = Vec::new();
    reader.read_to_end(&mut pairs, &mut report).unwrap();
    assert_eq!(report.rows, 5);

    // A smaller rewrite removes the stale second shard.
    let again = write_toy_dataset(&a, 10, 7).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(list_shards(&a).unwrap(), again);
}

#[test]
fn a_file_without_caption_names_the_column_and_the_file() {
    let dir = Scratch::new("nocaption");
    let path = dir.join("no-caption.parquet");
    let img = png(&RgbImage::new(2, 2));
    write_parquet(
        &path,
        vec![
            (
                "jpg_0",
                Arc::new(BinaryArray::from_vec(vec![&img])) as ArrayRef,
            ),
            ("jpg_1", Arc::new(BinaryArray::from_vec(vec![&img]))),
            ("label_0", Arc::new(Float32Array::from(vec![1.0]))),
            ("label_1", Arc::new(Float32Array::from(vec![0.0]))),
        ],
        Compression::UNCOMPRESSED,
    );
    let err = PickAPicReader::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::MissingColumn {
                column: "caption",
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("caption") && msg.contains("no-caption.parquet"),
        "{msg}"
    );
}

#[test]
fn corrupt_rows_are_skipped_counted_and_named() {
    let dir = Scratch::new("corrupt");
    let path = dir.join("corrupt.parquet");
    let red = RgbImage::from_pixel(8, 8, Rgb([220, 30, 30]));
    let good = jpeg(&red);
    let as_png = png(&red);
    // Rows: 0 good (PNG winner), 1 garbage jpg_1, 2 null caption, 3 tie, 4 empty jpg_0,
    // 5 good with integer labels and jpg_1 (PNG) winning.
    let captions: Vec<Option<&str>> = vec![
        Some("ok"),
        Some("garbage"),
        None,
        Some("tie"),
        Some("empty"),
        Some("second wins"),
    ];
    let jpg_0: Vec<Option<&[u8]>> = vec![
        Some(&as_png),
        Some(&good),
        Some(&good),
        Some(b"x"),
        Some(b""),
        Some(&good),
    ];
    let jpg_1: Vec<Option<&[u8]>> = vec![
        Some(&good),
        Some(b"not a jpeg at all"),
        Some(&good),
        Some(&good),
        Some(&good),
        Some(&as_png),
    ];
    let label_0 = Int64Array::from(vec![1, 1, 1, 0, 1, 0]);
    let label_1 = Int64Array::from(vec![0, 0, 0, 0, 0, 1]);
    write_parquet(
        &path,
        vec![
            ("caption", Arc::new(StringArray::from(captions)) as ArrayRef),
            ("jpg_0", Arc::new(BinaryArray::from_opt_vec(jpg_0))),
            ("jpg_1", Arc::new(BinaryArray::from_opt_vec(jpg_1))),
            ("label_0", Arc::new(label_0)),
            ("label_1", Arc::new(label_1)),
            ("extra", Arc::new(StringArray::from(vec!["x"; 6]))),
        ],
        Compression::ZSTD(ZstdLevel::default()),
    );

    let (pairs, report) = read_pairs(&[&path]).unwrap();
    assert_eq!(report.rows, 6);
    assert_eq!(report.ties_dropped, 1);
    let skipped: Vec<u64> = report.skipped.iter().map(|(at, _)| at.row).collect();
    assert_eq!(skipped, vec![1, 2, 4]);
    assert!(report.skipped[0].1.contains("jpg_1"));
    assert!(report.skipped[1].1.contains("null caption"));
    assert!(report.skipped[2].1.contains("empty"));
    assert!(report
        .skipped
        .iter()
        .all(|(at, _)| at.file.as_ref() == path));
    let rows: Vec<u64> = pairs.iter().map(|p| p.source.row).collect();
    assert_eq!(rows, vec![0, 5]);
    assert!(pairs[0].winner_first && !pairs[1].winner_first);
    assert_eq!(pairs[1].winner, as_png);
    assert!(pairs[0].winner_pixels(4, false).is_ok());

    // Without the header check the garbage row gets through, and decoding it names the row.
    let mut reader = PickAPicReader::open(&path)
        .unwrap()
        .with_image_check(ImageCheck::None);
    let mut report = ReadReport::default();
    let mut pairs = Vec::new();
    reader.read_to_end(&mut pairs, &mut report).unwrap();
    assert_eq!(pairs[1].source.row, 1);
    let err = pairs[1].loser_pixels(4, false).unwrap_err();
    assert!(matches!(
        err,
        DatasetError::BadImage {
            column: "jpg_1",
            ..
        }
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("corrupt.parquet row 1") && msg.contains("jpg_1"),
        "{msg}"
    );
    // The caller counts it as skipped in the same report.
    report.skip(pairs[1].source.clone(), msg);
    assert_eq!(report.kept(), 2);

    // A full decode check skips the same rows as the header check here.
    let mut reader = PickAPicReader::open(&path)
        .unwrap()
        .with_image_check(ImageCheck::Full);
    let mut report = ReadReport::default();
    let mut pairs = Vec::new();
    reader.read_to_end(&mut pairs, &mut report).unwrap();
    let skipped: Vec<u64> = report.skipped.iter().map(|(at, _)| at.row).collect();
    assert_eq!(skipped, vec![1, 2, 4]);
    assert_eq!(pairs.len(), 2);
}

#[test]
fn wrong_label_type_is_an_error_naming_the_column() {
    let dir = Scratch::new("labeltype");
    let path = dir.join("labels.parquet");
    write_parquet(
        &path,
        vec![
            (
                "caption",
                Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
            ),
            ("jpg_0", Arc::new(BinaryArray::from_vec(vec![b"x"]))),
            ("jpg_1", Arc::new(BinaryArray::from_vec(vec![b"x"]))),
            ("label_0", Arc::new(StringArray::from(vec!["1"]))),
            ("label_1", Arc::new(Float32Array::from(vec![0.0]))),
        ],
        Compression::SNAPPY,
    );
    let msg = PickAPicReader::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("label_0") && msg.contains("labels.parquet"),
        "{msg}"
    );
}

#[test]
fn preprocessing_crops_the_centre_of_a_wide_image_and_flips() {
    // 64x32: black | red | blue | black, 16 columns each. The short side goes to 16, the
    // 32x16 result is cropped to its middle 16 columns: red on the left, blue on the right.
    let wide = RgbImage::from_fn(64, 32, |x, _| match x {
        16..=31 => Rgb([255, 0, 0]),
        32..=47 => Rgb([0, 0, 255]),
        _ => Rgb([0, 0, 0]),
    });
    let res = 16usize;
    let plane = res * res;
    let bytes = png(&wide);
    let chw = preprocess(&bytes, 16, false).unwrap();
    assert_eq!(chw.len(), 3 * plane);
    assert!(chw.iter().all(|v| (-1.0..=1.0).contains(v)));
    let at = |chw: &[f32], c: usize, x: usize, y: usize| chw[c * plane + y * res + x];
    for y in [0, 8, 15] {
        assert!(
            at(&chw, 0, 2, y) > 0.9 && at(&chw, 2, 2, y) < -0.9,
            "left is red"
        );
        assert!(
            at(&chw, 2, 13, y) > 0.9 && at(&chw, 0, 13, y) < -0.9,
            "right is blue"
        );
    }
    // No black margin survived the crop.
    for x in 1..15 {
        assert!(
            at(&chw, 0, x, 8).max(at(&chw, 2, x, 8)) > 0.0,
            "column {x} is dark"
        );
    }
    let flipped = preprocess(&bytes, 16, true).unwrap();
    for c in 0..3 {
        for y in 0..res {
            for x in 0..res {
                assert_eq!(at(&flipped, c, x, y), at(&chw, c, res - 1 - x, y));
            }
        }
    }

    // A tall image is cropped top and bottom.
    let tall = RgbImage::from_fn(20, 60, |_, y| match y {
        20..=39 => Rgb([0, 255, 0]),
        _ => Rgb([0, 0, 0]),
    });
    let chw = preprocess(&png(&tall), 10, false).unwrap();
    let green = |y: usize| chw[100 + y * 10 + 5];
    assert!((0..10).all(|y| green(y) > 0.5), "green fills the crop");
    assert!((1..9).all(|y| green(y) > 0.9), "green fills the crop");
}

#[test]
fn held_out_split_is_deterministic_and_about_the_fraction() {
    let a = split_prompts(5000, 11, 0.2).unwrap();
    assert_eq!(a, split_prompts(5000, 11, 0.2).unwrap());
    let n = a.held_out.len();
    assert!((900..=1100).contains(&n), "{n} of 5000 held out at 0.2");
    let mut all: Vec<usize> = a.train.iter().chain(&a.held_out).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..5000).collect::<Vec<_>>());
}
