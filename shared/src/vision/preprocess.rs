//! The one path from a decoded image (and optionally a garment box) to a network input.

use candle_core::{Device, Tensor};
use image::{Rgb, RgbImage, imageops};
use serde::{Deserialize, Serialize};

use crate::geometry::BBox;
use crate::{Error, Result};

/// How pixel values become network inputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalisation {
    /// `(x - 127) / 128`, the EfficientNet-Lite TensorFlow convention.
    TfLite,
}

/// Square letterboxed input of a network, as its weights' metadata describe it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Side of the square input.
    pub size: u32,
    pub normalisation: Normalisation,
    /// Colour of the letterbox bars.
    pub pad_rgb: [u8; 3],
}

impl Preprocess {
    /// EfficientNet-Lite0's input: 224², white bars, `(x - 127) / 128`.
    pub const LITE0: Preprocess = Preprocess { size: 224, normalisation: Normalisation::TfLite, pad_rgb: [255, 255, 255] };

    /// Crops `bbox` (clipped to the image; the whole image when `None`), letterboxes it and
    /// returns the `[3, size, size]` input tensor.
    pub fn crop_to_tensor(&self, image: &RgbImage, bbox: Option<BBox>, device: &Device) -> Result<Tensor> {
        let boxed = self.crop_letterboxed(image, bbox)?;
        self.to_tensor(&boxed, device)
    }

    /// Crops and letterboxes, as pixels (for checks and debugging).
    pub fn crop_letterboxed(&self, image: &RgbImage, bbox: Option<BBox>) -> Result<RgbImage> {
        let region = match bbox {
            None => None,
            Some(b) => {
                let b = b.clip(image.width(), image.height());
                let (x1, y1) = (b.x1.floor() as u32, b.y1.floor() as u32);
                let (x2, y2) = (b.x2.ceil() as u32, b.y2.ceil() as u32);
                if x2 <= x1 || y2 <= y1 {
                    return Err(Error::InvalidBox { reason: format!("{:?} covers no pixel of a {}×{} image", bbox.map(BBox::to_array), image.width(), image.height()) });
                }
                Some((x1, y1, x2 - x1, y2 - y1))
            }
        };
        Ok(match region {
            None => letterbox(image, self.size, self.pad_rgb),
            Some((x, y, w, h)) => letterbox(&imageops::crop_imm(image, x, y, w, h).to_image(), self.size, self.pad_rgb),
        })
    }

    /// `[3, size, size]` normalised tensor of an already letterboxed image.
    pub fn to_tensor(&self, boxed: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = boxed.dimensions();
        let plane = (w * h) as usize;
        let mut data = vec![0f32; 3 * plane];
        for (i, p) in boxed.pixels().enumerate() {
            for c in 0..3 {
                data[c * plane + i] = match self.normalisation {
                    Normalisation::TfLite => (p.0[c] as f32 - 127.0) / 128.0,
                };
            }
        }
        Ok(Tensor::from_vec(data, (3, h as usize, w as usize), device)?)
    }
}

/// Where an image of `width` × `height` lands in its letterboxed square: resized to
/// `resized` and pasted at `offset`. Detectors use it to map boxes both ways.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LetterboxGeometry {
    pub source: (u32, u32),
    pub resized: (u32, u32),
    pub offset: (u32, u32),
}

impl LetterboxGeometry {
    pub fn new(width: u32, height: u32, size: u32) -> Self {
        let s = size as f64 / width.max(height).max(1) as f64;
        let nw = (round_half_even(width as f64 * s) as u32).clamp(1, size);
        let nh = (round_half_even(height as f64 * s) as u32).clamp(1, size);
        Self { source: (width, height), resized: (nw, nh), offset: ((size - nw) / 2, (size - nh) / 2) }
    }

    fn scales(&self) -> (f32, f32) {
        (self.resized.0 as f32 / self.source.0.max(1) as f32, self.resized.1 as f32 / self.source.1.max(1) as f32)
    }

    /// A box of the source image in input coordinates.
    pub fn to_input(&self, b: BBox) -> BBox {
        let (sx, sy) = self.scales();
        let (ox, oy) = (self.offset.0 as f32, self.offset.1 as f32);
        BBox::new(b.x1 * sx + ox, b.y1 * sy + oy, b.x2 * sx + ox, b.y2 * sy + oy)
    }

    /// A box in input coordinates back in the source image, clipped to it.
    pub fn to_source(&self, b: BBox) -> BBox {
        let (sx, sy) = self.scales();
        let (ox, oy) = (self.offset.0 as f32, self.offset.1 as f32);
        BBox::new((b.x1 - ox) / sx, (b.y1 - oy) / sy, (b.x2 - ox) / sx, (b.y2 - oy) / sy).clip(self.source.0, self.source.1)
    }
}

/// Scales `image` to fit a `size`² square (aspect kept, Python-style rounding of the new
/// size) and centres it on bars of `pad`. The resize is a triangle filter widened when
/// shrinking (antialiased), like PIL's BILINEAR that the reference outputs used.
pub fn letterbox(image: &RgbImage, size: u32, pad: [u8; 3]) -> RgbImage {
    let (w, h) = image.dimensions();
    let LetterboxGeometry { resized: (nw, nh), .. } = LetterboxGeometry::new(w, h, size);
    let resized = super::resize::resize_triangle(image, nw, nh);
    let mut canvas = RgbImage::from_pixel(size, size, Rgb(pad));
    imageops::replace(&mut canvas, &resized, ((size - nw) / 2) as i64, ((size - nh) / 2) as i64);
    canvas
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - x.signum() } else { r }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letterbox_keeps_aspect_and_centres() {
        let img = RgbImage::from_pixel(400, 534, Rgb([0, 0, 0]));
        let boxed = letterbox(&img, 224, [255, 255, 255]);
        assert_eq!(boxed.dimensions(), (224, 224));
        // The reference: resized to 168×224, pasted at x = 28.
        assert_eq!(boxed.get_pixel(27, 100).0, [255, 255, 255]);
        assert_eq!(boxed.get_pixel(28, 100).0, [0, 0, 0]);
        assert_eq!(boxed.get_pixel(195, 100).0, [0, 0, 0]);
        assert_eq!(boxed.get_pixel(196, 100).0, [255, 255, 255]);
        assert_eq!((round_half_even(2.5), round_half_even(3.5), round_half_even(2.4)), (2.0, 4.0, 2.0));
    }

    #[test]
    fn crops_are_clipped_and_empty_crops_refused() {
        let img = RgbImage::from_fn(50, 40, |x, _| Rgb([x as u8, 0, 0]));
        let p = Preprocess::LITE0;
        let t = p.crop_to_tensor(&img, Some(BBox::new(-10.0, 0.0, 25.0, 80.0)), &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 224, 224]);
        assert!(p.crop_to_tensor(&img, Some(BBox::new(60.0, 0.0, 70.0, 10.0)), &Device::Cpu).unwrap_err().is_user_error());
        let g = LetterboxGeometry::new(400, 534, 224);
        assert_eq!((g.resized, g.offset), ((168, 224), (28, 0)));
        let b = BBox::new(40.0, 53.4, 400.0, 534.0);
        let back = g.to_source(g.to_input(b));
        assert!((back.x1 - 40.0).abs() < 1e-3 && (back.y1 - 53.4).abs() < 1e-3 && back.x2 == 400.0, "{back:?}");
        let white = p.to_tensor(&RgbImage::from_pixel(2, 2, Rgb([255, 255, 255])), &Device::Cpu).unwrap();
        assert_eq!(white.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], 1.0);
    }
}
