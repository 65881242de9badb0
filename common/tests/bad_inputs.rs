//! Bad inputs to the shared layer: job specs and Pick-a-Pic parquet shards and images. Each
//! test feeds one malformed input and checks the error names the thing (field, file, row,
//! column). The table in `docs/bad-inputs.md` points at these tests.

#![allow(clippy::unwrap_used)] // tests may panic on failure

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arrow_array::{ArrayRef, BinaryArray, Float64Array, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use spin_common::dataset::{preprocess, read_pairs, DatasetError, ImageCheck, PickAPicReader};
use spin_common::dataset::{JobPrompts, PreferencePair, ReadReport};
use spin_common::spec::{JobSpec, RawJobSpec, SpecError};

const MINIMAL: &str =
    "[model]\nbase = \"base\"\n[data]\ntrain = [\"data\"]\n[[iteration]]\nlr = 2e-5\nsteps = 50\n";

/// A fresh folder under the system temp dir, unique per process and call, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spin-common-bad-{name}-{}-{}",
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

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bytes of one small toy shard, written once per test binary and kept in memory.
fn toy_shard() -> &'static [u8] {
    static SHARD: OnceLock<Vec<u8>> = OnceLock::new();
    SHARD.get_or_init(|| {
        let dir = Scratch::new("toy");
        let paths = spin_common::toy::write_toy_dataset(&*dir, 16, 3).unwrap();
        std::fs::read(&paths[0]).unwrap()
    })
}

/// A good JPEG from the toy shard.
fn toy_jpeg() -> Vec<u8> {
    let dir = Scratch::new("toy-read");
    let path = dir.join("toy.parquet");
    std::fs::write(&path, toy_shard()).unwrap();
    let (pairs, _) = read_pairs(&[&path]).unwrap();
    pairs[0].winner.clone()
}

/// The error of parsing and validating `text` as a spec file `job.toml`.
fn spec_error(text: &str) -> String {
    let source = Path::new("/jobs/job.toml");
    RawJobSpec::parse(text, source, &HashMap::new())
        .and_then(|raw| raw.validate(Path::new("/jobs")))
        .map(|_| ())
        .expect_err("the spec should be refused")
        .to_string()
}

fn assert_names(err: &str, things: &[&str]) {
    eprintln!("{err}");
    for thing in things {
        assert!(err.contains(thing), "{thing:?} not named in: {err}");
    }
}

#[test]
fn spec_wrong_type_names_the_key() {
    let err = spec_error(&MINIMAL.replace("steps = 50", "steps = \"ten\""));
    assert_names(&err, &["job.toml", "steps", "\"ten\"", "integer"]);
}

#[test]
fn spec_negative_steps_names_the_key() {
    let err = spec_error(&MINIMAL.replace("steps = 50", "steps = -5"));
    assert_names(&err, &["job.toml", "steps", "-5"]);
}

#[test]
fn spec_zero_steps_names_the_field() {
    let err = spec_error(&MINIMAL.replace("steps = 50", "steps = 0"));
    assert_names(&err, &["iteration[0].steps", "= 0"]);
}

#[test]
fn spec_without_iterations_names_the_section() {
    let text = MINIMAL.replace("[[iteration]]\nlr = 2e-5\nsteps = 50\n", "");
    let err = spec_error(&text);
    assert_names(&err, &["`iteration`", "[[iteration]]"]);
}

#[test]
fn spec_learning_rate_out_of_range_names_the_field() {
    let err = spec_error(&MINIMAL.replace("lr = 2e-5", "lr = 2.0"));
    assert_names(&err, &["iteration[0].lr", "= 2", "(0, 1)"]);
}

#[test]
fn spec_unknown_objective_names_the_value_and_key() {
    let err = spec_error(&format!("{MINIMAL}[training]\nobjective = \"spinn\"\n"));
    assert_names(&err, &["spinn", "training.objective"]);
}

#[test]
fn spec_without_model_names_the_section() {
    let err = spec_error(&MINIMAL.replace("[model]\nbase = \"base\"\n", ""));
    assert_names(&err, &["job.toml", "missing", "model"]);
    let err = spec_error(&MINIMAL.replace("base = \"base\"", "base = \"\""));
    assert_names(&err, &["model.base"]);
}

#[test]
fn spec_held_out_fraction_of_one_names_the_field() {
    let err = spec_error(&MINIMAL.replace(
        "train = [\"data\"]",
        "train = [\"data\"]\nheld_out_fraction = 1.0",
    ));
    assert_names(&err, &["data.held_out_fraction", "[0, 1)"]);
}

#[test]
fn spec_with_a_huge_name_is_refused() {
    let name = "n".repeat(100_000);
    let err = spec_error(&format!("[job]\nname = \"{name}\"\n{MINIMAL}"));
    assert_names(&err, &["job.name", "100000 bytes", "1 to 200 characters"]);
    assert!(err.len() < 300, "the name is not echoed back: {err}");
}

#[test]
fn spec_syntax_error_names_file_and_line() {
    let err = spec_error("[model\nbase = \"x\"\n");
    assert_names(&err, &["job.toml", "line 1", "unclosed table"]);
}

#[test]
fn spec_file_that_does_not_exist_is_named() {
    let dir = Scratch::new("nospec");
    let path = dir.join("missing.toml");
    let err = JobSpec::load(&path, &HashMap::new()).unwrap_err();
    assert!(matches!(err, SpecError::Parse { .. }), "{err:?}");
    assert_names(&err.to_string(), &["missing.toml"]);
}

#[test]
fn spec_environment_override_of_the_wrong_type_names_the_key() {
    let dir = Scratch::new("envspec");
    let path = dir.join("job.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let env = HashMap::from([(
        "SPIN_JOB__TRAINING__BATCH_SIZE".to_string(),
        "abc".to_string(),
    )]);
    let err = JobSpec::load(&path, &env).unwrap_err().to_string();
    assert_names(&err, &["training.batch_size", "\"abc\""]);
}

fn write_batch(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let mut writer =
        ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_that_is_not_parquet_names_the_file() {
    let dir = Scratch::new("notparquet");
    let path = dir.join("notes.parquet");
    std::fs::write(&path, "caption,jpg_0\nhello,world\n").unwrap();
    let err = PickAPicReader::open(&path).unwrap_err();
    assert!(matches!(err, DatasetError::Parquet { .. }), "{err:?}");
    assert_names(&err.to_string(), &["notes.parquet", "parquet"]);
}

#[test]
fn parquet_truncated_names_the_file() {
    let bytes = toy_shard();
    let dir = Scratch::new("truncated");
    let path = dir.join("cut.parquet");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_pairs(&[&path]).unwrap_err();
    assert_names(&err.to_string(), &["cut.parquet"]);
}

/// Byte offset of the first JPEG marker `0xFF kind`.
fn marker(jpeg: &[u8], kind: u8) -> usize {
    jpeg.windows(2).position(|w| w == [0xFF, kind]).unwrap()
}

/// A one-row shard `dir/{name}.parquet` whose `jpg_0` is `bad` (it wins) and `jpg_1` a good
/// JPEG.
fn one_row_shard(dir: &Path, name: &str, bad: &[u8]) -> PathBuf {
    let good = toy_jpeg();
    let path = dir.join(format!("{name}.parquet"));
    write_batch(
        &path,
        vec![
            (
                "caption",
                Arc::new(StringArray::from(vec!["a red circle"])) as ArrayRef,
            ),
            ("jpg_0", Arc::new(BinaryArray::from_vec(vec![bad]))),
            ("jpg_1", Arc::new(BinaryArray::from_vec(vec![&good]))),
            ("label_0", Arc::new(Float64Array::from(vec![1.0]))),
            ("label_1", Arc::new(Float64Array::from(vec![0.0]))),
        ],
    );
    path
}

fn read_with(path: &Path, check: ImageCheck) -> (Vec<PreferencePair>, ReadReport) {
    let mut reader = PickAPicReader::open(path).unwrap().with_image_check(check);
    let mut pairs = Vec::new();
    let mut report = ReadReport::default();
    reader.read_to_end(&mut pairs, &mut report).unwrap();
    (pairs, report)
}

#[test]
fn jpeg_without_huffman_tables_names_row_and_column() {
    // The frame header is intact, so the cheap header check passes; the Huffman table marker
    // (DHT) is broken, so decoding fails.
    let mut bad = toy_jpeg();
    let dht = marker(&bad, 0xC4);
    bad[dht + 1] = 0xEE;
    let dir = Scratch::new("no-dht");
    let path = one_row_shard(&dir, "no-dht", &bad);
    let (pairs, _) = read_with(&path, ImageCheck::Header);
    assert_eq!(pairs.len(), 1, "the header check lets it through");
    let err = pairs[0].winner_pixels(32, false).unwrap_err();
    assert!(matches!(err, DatasetError::BadImage { .. }), "{err:?}");
    assert_names(
        &err.to_string(),
        &["no-dht.parquet row 0", "jpg_0", "huffman"],
    );

    // The full check skips the row at read time instead, naming the column.
    let (pairs, report) = read_with(&path, ImageCheck::Full);
    assert!(pairs.is_empty());
    assert_eq!(report.skipped.len(), 1);
    assert_names(&report.skipped[0].1, &["jpg_0", "huffman"]);
}

#[test]
fn jpeg_cut_after_its_header_is_skipped_naming_the_column() {
    let good = toy_jpeg();
    let sos = marker(&good, 0xDA);
    let dir = Scratch::new("cut-jpeg");
    let path = one_row_shard(&dir, "cut-jpeg", &good[..sos + 4]);
    let (pairs, report) = read_with(&path, ImageCheck::Header);
    assert!(pairs.is_empty());
    assert_eq!((report.rows, report.skipped.len()), (1, 1));
    let (at, reason) = &report.skipped[0];
    assert_eq!(at.row, 0);
    assert!(at.file.ends_with("cut-jpeg.parquet"));
    assert_names(reason, &["jpg_0", "Not enough bytes"]);
}

#[test]
fn a_very_elongated_image_is_preprocessed_without_a_huge_allocation() {
    // 1 x 40000 pixels: resizing the short side to 512 first would ask for a
    // 512 x 20480000 image (about 31 GB); the long side is cropped first instead.
    let tall = image::RgbImage::from_pixel(1, 40_000, image::Rgb([200, 10, 10]));
    let mut png = Vec::new();
    tall.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let chw = preprocess(&png, 512, false).unwrap();
    assert_eq!(chw.len(), 3 * 512 * 512);
    assert!(chw[..512 * 512].iter().all(|v| *v > 0.5), "red survives");
}

fn spec_over(data: &Path) -> JobSpec {
    let text = MINIMAL.replace("\"data\"", &format!("\"{}\"", data.display()));
    RawJobSpec::parse(&text, Path::new("job.toml"), &HashMap::new())
        .unwrap()
        .validate(Path::new("/"))
        .unwrap()
}

#[test]
fn a_dataset_of_ties_has_no_usable_pairs() {
    let dir = Scratch::new("ties");
    let jpeg = toy_jpeg();
    let images: Vec<&[u8]> = vec![&jpeg; 4];
    write_batch(
        &dir.join("ties.parquet"),
        vec![
            (
                "caption",
                Arc::new(StringArray::from(vec!["a"; 4])) as ArrayRef,
            ),
            ("jpg_0", Arc::new(BinaryArray::from_vec(images.clone()))),
            ("jpg_1", Arc::new(BinaryArray::from_vec(images))),
            ("label_0", Arc::new(Float64Array::from(vec![0.5; 4]))),
            ("label_1", Arc::new(Float64Array::from(vec![0.5; 4]))),
        ],
    );
    let err = JobPrompts::read(&spec_over(&dir)).unwrap_err().to_string();
    assert_names(&err, &["no training prompts", "0 usable pairs", "4 ties"]);
}

#[test]
fn a_missing_data_path_is_named() {
    let dir = Scratch::new("nodata");
    let missing = dir.join("no-such-data");
    let err = JobPrompts::read(&spec_over(&missing))
        .unwrap_err()
        .to_string();
    assert_names(&err, &["data.train", "no-such-data", "does not exist"]);
}

#[test]
fn a_data_folder_without_shards_is_named() {
    let dir = Scratch::new("emptydata");
    let empty = dir.join("empty-folder");
    std::fs::create_dir_all(&empty).unwrap();
    let err = JobPrompts::read(&spec_over(&empty))
        .unwrap_err()
        .to_string();
    assert_names(&err, &["data.train", "empty-folder", "no parquet shards"]);
}
