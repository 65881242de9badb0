//! The toy pictures: the shapes and colours the captions name, a [`Scene`] of one shape on a
//! background, drawn exactly, and its caption (parsed back by [`parse_caption`]).

use image::{Rgb, RgbImage};
use rand::Rng;

use super::TOY_RESOLUTION;

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

pub(super) fn jitter(rng: &mut impl Rng) -> f32 {
    CENTRE + rng.random_range(-MAX_JITTER..=MAX_JITTER)
}

pub(super) fn pick<T: Copy>(rng: &mut impl Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// A random item that is not in `except` (which must leave at least one).
pub(super) fn pick_other<T: Copy + PartialEq>(rng: &mut impl Rng, items: &[T], except: &[T]) -> T {
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
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

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
}
