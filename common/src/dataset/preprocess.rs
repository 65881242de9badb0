//! Image preprocessing as pure functions: decode, resize the short side, center crop, flip,
//! CHW floats in `[-1, 1]`, and back to PNG for sample grids.

use std::io::Cursor;

use image::imageops::{self, FilterType};
use image::{ImageFormat, RgbImage};

use super::DatasetError;

/// Decode encoded image bytes, whatever the format (JPEG or PNG), recognised from the content
/// rather than from a name; the result is 8-bit RGB.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, DatasetError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DatasetError::Decode(image::ImageError::IoError(e)))?;
    let image = reader.decode().map_err(DatasetError::Decode)?;
    Ok(image.to_rgb8())
}

/// Longest side, in short sides, that is resized whole; a longer image has its long side
/// cropped to this first (only the centre square survives anyway).
const MAX_ASPECT: u32 = 4;

/// Resize so the short side is `resolution` (bilinear, antialiased when shrinking), then crop
/// the centre `resolution x resolution` square.
///
/// An image more than [`MAX_ASPECT`] times longer than wide (or wide than long) is first
/// cropped to its centre `MAX_ASPECT : 1` part: resizing a 1 x 40000 image whole to a short
/// side of 512 would ask for a 512 x 20480000 buffer.
pub fn resize_center_crop(image: &RgbImage, resolution: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    if (w, h) == (resolution, resolution) || w == 0 || h == 0 {
        return image.clone();
    }
    let limit = |short: u32| short.saturating_mul(MAX_ASPECT);
    if w > limit(h) || h > limit(w) {
        let (cw, ch) = (w.min(limit(h)), h.min(limit(w)));
        let cropped = imageops::crop_imm(image, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image();
        return resize_center_crop(&cropped, resolution);
    }
    let scale = |long: u32, short: u32| -> u32 {
        let scaled =
            (u64::from(long) * u64::from(resolution) + u64::from(short) / 2) / u64::from(short);
        u32::try_from(scaled).unwrap_or(u32::MAX).max(resolution)
    };
    let (nw, nh) = if w <= h {
        (resolution, scale(h, w))
    } else {
        (scale(w, h), resolution)
    };
    let resized = imageops::resize(image, nw, nh, FilterType::Triangle);
    let x = (nw - resolution) / 2;
    let y = (nh - resolution) / 2;
    imageops::crop_imm(&resized, x, y, resolution, resolution).to_image()
}

/// Planar CHW `f32`s in `[-1, 1]` (`3 * width * height` values), mirrored left to right when
/// `flip` is set.
pub fn to_chw(image: &RgbImage, flip: bool) -> Vec<f32> {
    let (w, h) = image.dimensions();
    let plane = (w as usize) * (h as usize);
    let mut out = vec![0.0f32; 3 * plane];
    for (x, y, pixel) in image.enumerate_pixels() {
        let x = if flip { w - 1 - x } else { x };
        let i = (y as usize) * (w as usize) + x as usize;
        for c in 0..3 {
            out[c * plane + i] = f32::from(pixel[c]) / 127.5 - 1.0;
        }
    }
    out
}

/// Decode, resize the short side to `resolution`, center crop, optionally flip, and scale to
/// `[-1, 1]`: `3 * resolution * resolution` values in CHW order.
///
/// A decode failure is a [`DatasetError::Decode`]; attach the row with
/// [`DatasetError::in_row`].
pub fn preprocess(bytes: &[u8], resolution: u32, flip: bool) -> Result<Vec<f32>, DatasetError> {
    if resolution == 0 {
        return Err(DatasetError::InvalidArgument("resolution 0".into()));
    }
    let image = decode(bytes)?;
    Ok(to_chw(&resize_center_crop(&image, resolution), flip))
}

/// The inverse of [`to_chw`] for a square image: CHW values in `[-1, 1]` (clamped) to an RGB
/// image.
fn from_chw(chw: &[f32], resolution: u32) -> Result<RgbImage, DatasetError> {
    let plane = (resolution as usize) * (resolution as usize);
    if resolution == 0 || chw.len() != 3 * plane {
        return Err(DatasetError::InvalidArgument(format!(
            "{} values for a {resolution}x{resolution} RGB image (expected {})",
            chw.len(),
            3 * plane
        )));
    }
    let to_u8 = |v: f32| {
        let v = if v.is_nan() { 0.0 } else { v.clamp(-1.0, 1.0) };
        ((v + 1.0) * 127.5).round() as u8
    };
    Ok(RgbImage::from_fn(resolution, resolution, |x, y| {
        let i = (y as usize) * (resolution as usize) + x as usize;
        image::Rgb([
            to_u8(chw[i]),
            to_u8(chw[plane + i]),
            to_u8(chw[2 * plane + i]),
        ])
    }))
}

fn encode_png(image: &RgbImage) -> Result<Vec<u8>, DatasetError> {
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .map_err(|source| DatasetError::Encode {
            what: "png",
            source,
        })?;
    Ok(out)
}

/// CHW values in `[-1, 1]` (clamped) of a `resolution x resolution` image to 8-bit PNG bytes.
pub fn to_png(chw: &[f32], resolution: u32) -> Result<Vec<u8>, DatasetError> {
    encode_png(&from_chw(chw, resolution)?)
}

/// Tile square CHW images into one PNG, `columns` per row, row-major, no gaps; missing cells
/// of the last row are black.
pub fn grid_png(
    images: &[Vec<f32>],
    resolution: u32,
    columns: u32,
) -> Result<Vec<u8>, DatasetError> {
    if images.is_empty() || columns == 0 {
        return Err(DatasetError::InvalidArgument(format!(
            "a grid of {} images in {columns} columns",
            images.len()
        )));
    }
    let count = u32::try_from(images.len())
        .map_err(|_| DatasetError::InvalidArgument("too many images for a grid".into()))?;
    let columns = columns.min(count);
    let rows = count.div_ceil(columns);
    let mut grid = RgbImage::new(columns * resolution, rows * resolution);
    for (i, chw) in (0u32..).zip(images) {
        let tile = from_chw(chw, resolution)?;
        let (x, y) = ((i % columns) * resolution, (i / columns) * resolution);
        imageops::replace(&mut grid, &tile, i64::from(x), i64::from(y));
    }
    encode_png(&grid)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on failure
mod tests {
    use super::*;

    /// A 6x4 image whose red channel is the column index * 40 and green the row index * 60.
    fn gradient() -> RgbImage {
        RgbImage::from_fn(6, 4, |x, y| {
            image::Rgb([(x * 40) as u8, (y * 60) as u8, 200])
        })
    }

    #[test]
    fn chw_layout_range_and_flip() {
        let img = gradient();
        let chw = to_chw(&img, false);
        assert_eq!(chw.len(), 3 * 6 * 4);
        assert!(chw.iter().all(|v| (-1.0..=1.0).contains(v)));
        // red plane, row 0: increasing with x; green plane, column 0: increasing with y.
        assert_eq!(chw[0], -1.0);
        assert!((chw[5] - (200.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert!((chw[24 + 6] - (60.0 / 127.5 - 1.0)).abs() < 1e-6);
        let flipped = to_chw(&img, true);
        for y in 0..4 {
            for x in 0..6 {
                assert_eq!(flipped[y * 6 + x], chw[y * 6 + (5 - x)]);
            }
        }
    }

    #[test]
    fn center_crop_keeps_the_middle() {
        // 6x4 -> short side 2: 3x2, crop the middle 2x2 (columns 0..2 of 3 -> offset 0).
        let out = resize_center_crop(&gradient(), 2);
        assert_eq!(out.dimensions(), (2, 2));
        // A tall image: the crop drops rows at the top and bottom equally.
        let tall = RgbImage::from_fn(2, 6, |_, y| image::Rgb([(y * 40) as u8, 0, 0]));
        let crop = resize_center_crop(&tall, 2);
        assert_eq!(crop.dimensions(), (2, 2));
        assert_eq!(crop.get_pixel(0, 0)[0], 80);
        assert_eq!(crop.get_pixel(0, 1)[0], 120);
    }

    #[test]
    fn png_round_trip_is_within_one_level() {
        let img = RgbImage::from_fn(4, 4, |x, y| image::Rgb([(x * 60) as u8, (y * 60) as u8, 7]));
        let chw = to_chw(&img, false);
        let png = to_png(&chw, 4).unwrap();
        let back = decode(&png).unwrap();
        assert_eq!(back, img);
    }

    #[test]
    fn grid_places_tiles_row_major() {
        let tiles: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                to_chw(
                    &RgbImage::from_pixel(2, 2, image::Rgb([i * 100, 0, 0])),
                    false,
                )
            })
            .collect();
        let grid = decode(&grid_png(&tiles, 2, 2).unwrap()).unwrap();
        assert_eq!(grid.dimensions(), (4, 4));
        assert_eq!(grid.get_pixel(2, 0)[0], 100);
        assert_eq!(grid.get_pixel(0, 2)[0], 200);
        assert_eq!(grid.get_pixel(3, 3)[0], 0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(decode(b"nope"), Err(DatasetError::Decode(_))));
        assert!(to_png(&[0.0; 5], 2).is_err());
        assert!(grid_png(&[], 2, 2).is_err());
        assert!(preprocess(b"nope", 0, false).is_err());
    }
}
