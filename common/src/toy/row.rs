//! One toy row: the caption's picture and a worse one (a [`Flaw`], or for a tie another good
//! picture), placed at random and JPEG-encoded. A row depends only on `(seed, index)`.

use image::{imageops, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::scene::{jitter, pick, pick_other, Colour, Scene, Shape};
use super::{TOY_JPEG_QUALITY, TOY_TIE_FRACTION};
use crate::dataset::DatasetError;

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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on failure
mod tests {
    use super::*;

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
