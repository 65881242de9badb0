//! The synthetic toy dataset: Pick-a-Pic-schema parquet shards of coloured shapes drawn by our
//! own code, so the demo, the tests and the benchmarks need no download.
//!
//! Each row has a caption such as "a red circle on a blue background", the matching 32x32
//! image (the shape in the named colour, centred with a little jitter, on the named
//! background) and a worse image (wrong colour, wrong shape, wrong background, heavy noise or
//! blur), placed at random as `jpg_0` or `jpg_1` with labels `(1, 0)` or `(0, 1)`. A few rows
//! are ties `(0.5, 0.5)`, which readers drop. Images are JPEG (quality 95), like the real data.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use image::{imageops, Rgb, RgbImage};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dataset::DatasetError;

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

const CENTRE: f32 = TOY_RESOLUTION as f32 / 2.0;
/// Largest offset of a shape's centre from the image centre, in pixels.
const MAX_JITTER: f32 = 1.5;
/// Range of a shape's radius, in pixels.
const RADIUS: std::ops::RangeInclusive<f32> = 10.0..=12.0;

/// A shape the toy captions name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A filled disc.
    Circle,
    /// A filled axis-aligned square.
    Square,
    /// A filled triangle, apex up.
    Triangle,
    /// A plus sign with thick arms.
    Cross,
    /// A square turned 45 degrees.
    Diamond,
}

impl Shape {
    /// Every shape, in caption-vocabulary order.
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Cross,
        Shape::Diamond,
    ];

    /// The word used in captions.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
            Shape::Diamond => "diamond",
        }
    }

    /// Whether the point `(dx, dy)` from the shape's centre lies inside a shape of radius `r`.
    fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= 0.8 * r && dy.abs() <= 0.8 * r,
            // Apex at dy = -r, base at dy = r / 2: the centre is the centroid.
            Shape::Triangle => (-r..=0.5 * r).contains(&dy) && dx.abs() <= 0.577 * (dy + r),
            Shape::Cross => {
                let arm = 0.4 * r;
                (dx.abs() <= arm && dy.abs() <= r) || (dy.abs() <= arm && dx.abs() <= r)
            }
            Shape::Diamond => dx.abs() + dy.abs() <= r,
        }
    }
}

/// A colour the toy captions name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
    /// White.
    White,
    /// Black.
    Black,
    /// Purple.
    Purple,
    /// Orange.
    Orange,
}

impl Colour {
    /// Every colour, in caption-vocabulary order.
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::White,
        Colour::Black,
        Colour::Purple,
        Colour::Orange,
    ];

    /// The word used in captions.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::White => "white",
            Colour::Black => "black",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    /// The RGB value drawn for this colour.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 170, 50],
            Colour::Blue => [30, 70, 220],
            Colour::Yellow => [240, 220, 30],
            Colour::White => [245, 245, 245],
            Colour::Black => [15, 15, 15],
            Colour::Purple => [140, 40, 170],
            Colour::Orange => [245, 140, 20],
        }
    }

    /// The palette colour closest to `rgb` (squared Euclidean distance).
    pub fn nearest(rgb: [u8; 3]) -> Colour {
        let distance = |c: Colour| -> u32 {
            c.rgb()
                .iter()
                .zip(rgb)
                .map(|(&a, b)| u32::from(a.abs_diff(b)).pow(2))
                .sum()
        };
        let mut best = Colour::ALL[0];
        for c in Colour::ALL {
            if distance(c) < distance(best) {
                best = c;
            }
        }
        best
    }
}

/// One toy picture: a shape of one colour on a background of another.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scene {
    /// The shape.
    pub shape: Shape,
    /// The shape's colour.
    pub foreground: Colour,
    /// The background colour (never the foreground).
    pub background: Colour,
    /// The shape's centre in pixels, `(x, y)`.
    pub centre: (f32, f32),
    /// The shape's radius in pixels.
    pub radius: f32,
}

impl Scene {
    /// A random scene: any shape, two different colours, jittered position and size.
    pub fn random(rng: &mut impl Rng) -> Scene {
        let foreground = pick(rng, &Colour::ALL);
        Scene {
            shape: pick(rng, &Shape::ALL),
            foreground,
            background: pick_other(rng, &Colour::ALL, &[foreground]),
            centre: (jitter(rng), jitter(rng)),
            radius: rng.random_range(RADIUS),
        }
    }

    /// The caption, e.g. "a red circle on a blue background".
    pub fn caption(&self) -> String {
        format!(
            "a {} {} on a {} background",
            self.foreground.name(),
            self.shape.name(),
            self.background.name()
        )
    }

    /// The scene drawn exactly (no antialiasing) at [`TOY_RESOLUTION`].
    pub fn draw(&self) -> RgbImage {
        let (cx, cy) = self.centre;
        RgbImage::from_fn(TOY_RESOLUTION, TOY_RESOLUTION, |x, y| {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            if self.shape.contains(dx, dy, self.radius) {
                Rgb(self.foreground.rgb())
            } else {
                Rgb(self.background.rgb())
            }
        })
    }
}

/// Parse a toy caption back into `(shape, foreground, background)`.
pub fn parse_caption(caption: &str) -> Option<(Shape, Colour, Colour)> {
    let words: Vec<&str> = caption.split_whitespace().collect();
    let [_, fg, shape, _, _, bg, _] = words.as_slice() else {
        return None;
    };
    let colour = |w: &str| Colour::ALL.into_iter().find(|c| c.name() == w);
    let shape = Shape::ALL.into_iter().find(|s| s.name() == *shape)?;
    Some((shape, colour(fg)?, colour(bg)?))
}

/// How the worse image of a pair differs from the caption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flaw {
    /// The shape has another colour.
    WrongColour,
    /// Another shape, same colours.
    WrongShape,
    /// The background has another colour.
    WrongBackground,
    /// The right picture under heavy uniform noise.
    Noise,
    /// The right picture heavily blurred.
    Blur,
}

impl Flaw {
    /// Every flaw.
    pub const ALL: [Flaw; 5] = [
        Flaw::WrongColour,
        Flaw::WrongShape,
        Flaw::WrongBackground,
        Flaw::Noise,
        Flaw::Blur,
    ];
}

/// The picture of `scene` spoiled by `flaw`.
pub fn flawed(scene: &Scene, flaw: Flaw, rng: &mut impl Rng) -> RgbImage {
    let both = [scene.foreground, scene.background];
    match flaw {
        Flaw::WrongColour => Scene {
            foreground: pick_other(rng, &Colour::ALL, &both),
            ..*scene
        }
        .draw(),
        Flaw::WrongShape => Scene {
            shape: pick_other(rng, &Shape::ALL, &[scene.shape]),
            ..*scene
        }
        .draw(),
        Flaw::WrongBackground => Scene {
            background: pick_other(rng, &Colour::ALL, &both),
            ..*scene
        }
        .draw(),
        Flaw::Noise => {
            let mut image = scene.draw();
            for p in image.pixels_mut() {
                for c in p.0.iter_mut() {
                    let noisy = i32::from(*c) + rng.random_range(-110..=110);
                    *c = noisy.clamp(0, 255) as u8;
                }
            }
            image
        }
        Flaw::Blur => imageops::blur(&scene.draw(), 4.0),
    }
}

/// One toy row, images already JPEG-encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct ToyRow {
    /// The caption.
    pub caption: String,
    /// The first image (JPEG).
    pub jpg_0: Vec<u8>,
    /// The second image (JPEG).
    pub jpg_1: Vec<u8>,
    /// Preference for the first image: 1, 0 or 0.5.
    pub label_0: f64,
    /// Preference for the second image: 1, 0 or 0.5.
    pub label_1: f64,
}

/// Row `index` of the toy dataset for `seed`: depends only on `(seed, index)`, so shards can be
/// generated independently and reproduce exactly.
pub fn toy_row(seed: u64, index: u64) -> Result<ToyRow, DatasetError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let scene = Scene::random(&mut rng);
    let good = scene.draw();
    let (other, tie) = if rng.random_bool(TOY_TIE_FRACTION) {
        // An equally good picture: same caption, different jitter.
        let again = Scene {
            centre: (jitter(&mut rng), jitter(&mut rng)),
            ..scene
        };
        (again.draw(), true)
    } else {
        let flaw = pick(&mut rng, &Flaw::ALL);
        (flawed(&scene, flaw, &mut rng), false)
    };
    let good_first = rng.random_bool(0.5);
    let (first, second) = if good_first {
        (&good, &other)
    } else {
        (&other, &good)
    };
    let (label_0, label_1) = match (tie, good_first) {
        (true, _) => (0.5, 0.5),
        (false, true) => (1.0, 0.0),
        (false, false) => (0.0, 1.0),
    };
    Ok(ToyRow {
        caption: scene.caption(),
        jpg_0: encode_jpeg(first)?,
        jpg_1: encode_jpeg(second)?,
        label_0,
        label_1,
    })
}

/// Write `rows` toy rows for `seed` into `dir` as snappy-compressed parquet shards
/// `toy-00000.parquet`, `toy-00001.parquet`, ... of at most [`TOY_ROWS_PER_SHARD`] rows, and
/// return their paths in order. Each shard is written under a temporary name and renamed, and
/// stale `toy-*.parquet` shards from a larger earlier run are removed.
pub fn write_toy_dataset(
    dir: impl AsRef<Path>,
    rows: usize,
    seed: u64,
) -> Result<Vec<PathBuf>, DatasetError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| DatasetError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let shards = rows.div_ceil(TOY_ROWS_PER_SHARD);
    remove_stale_shards(dir, shards)?;
    let mut paths = Vec::with_capacity(shards);
    for shard in 0..shards {
        let start = shard * TOY_ROWS_PER_SHARD;
        let end = rows.min(start + TOY_ROWS_PER_SHARD);
        let path = dir.join(shard_name(shard));
        write_shard(&path, seed, start as u64..end as u64)?;
        paths.push(path);
    }
    tracing::debug!(dir = %dir.display(), rows, shards, "wrote toy dataset");
    Ok(paths)
}

fn shard_name(shard: usize) -> String {
    format!("toy-{shard:05}.parquet")
}

fn remove_stale_shards(dir: &Path, keep: usize) -> Result<(), DatasetError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DatasetError::Io { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let index = name
            .strip_prefix("toy-")
            .and_then(|n| n.strip_suffix(".parquet"))
            .and_then(|n| n.parse::<usize>().ok());
        if index.is_some_and(|i| i >= keep) {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// The schema of toy shards: Pick-a-Pic's required columns plus an extra `ranking_id`.
pub fn toy_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("ranking_id", DataType::Int64, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("jpg_0", DataType::Binary, true),
        Field::new("jpg_1", DataType::Binary, true),
        Field::new("label_0", DataType::Float64, true),
        Field::new("label_1", DataType::Float64, true),
    ]))
}

fn write_shard(path: &Path, seed: u64, rows: std::ops::Range<u64>) -> Result<(), DatasetError> {
    let tmp = path.with_extension("parquet.tmp");
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DatasetError::Io { path, source }
    };
    let parquet_err = |source| DatasetError::Parquet {
        file: path.to_path_buf(),
        source,
    };
    let schema = toy_schema();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(TOY_ROWS_PER_ROW_GROUP))
        .build();
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut writer =
        ArrowWriter::try_new(file, Arc::clone(&schema), Some(props)).map_err(parquet_err)?;
    let mut start = rows.start;
    while start < rows.end {
        let end = rows.end.min(start + TOY_ROWS_PER_ROW_GROUP as u64);
        let batch = toy_batch(path, &schema, seed, start..end)?;
        writer.write(&batch).map_err(parquet_err)?;
        start = end;
    }
    writer.close().map_err(parquet_err)?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

fn toy_batch(
    path: &Path,
    schema: &Arc<Schema>,
    seed: u64,
    rows: std::ops::Range<u64>,
) -> Result<RecordBatch, DatasetError> {
    let ids: Vec<i64> = rows.clone().map(|i| i as i64).collect();
    let rows = rows
        .map(|i| toy_row(seed, i))
        .collect::<Result<Vec<_>, _>>()?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids)),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.caption.as_str()),
        )),
        Arc::new(BinaryArray::from_iter_values(
            rows.iter().map(|r| r.jpg_0.as_slice()),
        )),
        Arc::new(BinaryArray::from_iter_values(
            rows.iter().map(|r| r.jpg_1.as_slice()),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.label_0),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.label_1),
        )),
    ];
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(|source| DatasetError::Arrow {
        file: path.to_path_buf(),
        source,
    })
}

fn encode_jpeg(image: &RgbImage) -> Result<Vec<u8>, DatasetError> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, TOY_JPEG_QUALITY)
        .encode_image(image)
        .map_err(|source| DatasetError::Encode {
            what: "jpeg",
            source,
        })?;
    Ok(out)
}

fn jitter(rng: &mut impl Rng) -> f32 {
    CENTRE + rng.random_range(-MAX_JITTER..=MAX_JITTER)
}

fn pick<T: Copy>(rng: &mut impl Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// A random item that is not in `except` (which must leave at least one).
fn pick_other<T: Copy + PartialEq>(rng: &mut impl Rng, items: &[T], except: &[T]) -> T {
    let allowed: Vec<T> = items
        .iter()
        .copied()
        .filter(|i| !except.contains(i))
        .collect();
    pick(rng, &allowed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on failure
mod tests {
    use super::*;

    #[test]
    fn every_shape_covers_the_centre_whatever_the_jitter() {
        // The pixels around the image centre are inside the shape for the smallest radius
        // and the largest jitter, so the centre pixel always shows the foreground colour.
        let r = *RADIUS.start();
        for shape in Shape::ALL {
            for cx in [CENTRE - MAX_JITTER, CENTRE, CENTRE + MAX_JITTER] {
                for cy in [CENTRE - MAX_JITTER, CENTRE, CENTRE + MAX_JITTER] {
                    for px in 15..=17 {
                        for py in 15..=17 {
                            let (dx, dy) = (px as f32 + 0.5 - cx, py as f32 + 0.5 - cy);
                            assert!(shape.contains(dx, dy, r), "{shape:?} ({cx}, {cy})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shapes_stay_inside_the_image_and_differ() {
        let scene = |shape| Scene {
            shape,
            foreground: Colour::Red,
            background: Colour::Blue,
            centre: (CENTRE + MAX_JITTER, CENTRE + MAX_JITTER),
            radius: *RADIUS.end(),
        };
        let images: Vec<RgbImage> = Shape::ALL.iter().map(|&s| scene(s).draw()).collect();
        for img in &images {
            let border = (0..TOY_RESOLUTION).all(|i| {
                [
                    (i, 0),
                    (0, i),
                    (i, TOY_RESOLUTION - 1),
                    (TOY_RESOLUTION - 1, i),
                ]
                .iter()
                .all(|&(x, y)| img.get_pixel(x, y).0 == Colour::Blue.rgb())
            });
            assert!(border, "a shape touches the border");
        }
        for (i, a) in images.iter().enumerate() {
            for b in &images[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn captions_round_trip_and_colours_are_distinct() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..50 {
            let scene = Scene::random(&mut rng);
            assert_ne!(scene.foreground, scene.background);
            assert_eq!(
                parse_caption(&scene.caption()),
                Some((scene.shape, scene.foreground, scene.background))
            );
        }
        assert_eq!(parse_caption("a cat"), None);
        for c in Colour::ALL {
            assert_eq!(Colour::nearest(c.rgb()), c);
        }
    }

    #[test]
    fn rows_are_deterministic_and_labelled() {
        assert_eq!(toy_row(3, 17).unwrap(), toy_row(3, 17).unwrap());
        assert_ne!(toy_row(3, 17).unwrap(), toy_row(4, 17).unwrap());
        let mut ties = 0;
        for i in 0..200 {
            let row = toy_row(9, i).unwrap();
            match (row.label_0, row.label_1) {
                (0.5, 0.5) => ties += 1,
                (1.0, 0.0) | (0.0, 1.0) => {}
                other => panic!("labels {other:?}"),
            }
            assert!(row.jpg_0.starts_with(&[0xFF, 0xD8]), "not a JPEG");
        }
        assert!((1..=30).contains(&ties), "{ties} ties in 200 rows");
    }
}
