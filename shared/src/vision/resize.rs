//! The triangle-filter resize of `image::imageops::resize`, value for value, in a form that
//! is fast and runs rows side by side.
//!
//! Every photo is resized twice on the served path (letterboxed for the detector, each
//! garment for the embedder), and the detector's resize runs alone on one core before
//! anything else can start. The image crate's version reads each pixel through a generic
//! accessor, four channels of which one is unused: 5 % of a search. Here the same weights,
//! the same products and the same order of additions per value (so the same bits: the
//! model was trained on those pixels) run as plain loops over rows of bytes, which the
//! compiler vectorises, and output rows are split over the rayon pool.

use image::RgbImage;
use rayon::prelude::*;

/// One output coordinate's filter: the first source index and the normalised weights of
/// the source indices from there on.
struct Taps {
    first: usize,
    weights: Vec<f32>,
}

/// The image crate's triangle filter, widened by the shrink ratio (antialiased): `Filter`
/// with `support` 1.0 in `imageops::sample`, computed in the same f32 operations.
fn filter_taps(src_len: u32, dst_len: u32) -> Vec<Taps> {
    let ratio = src_len as f32 / dst_len as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = sratio;
    (0..dst_len)
        .map(|out| {
            let centre = (out as f32 + 0.5) * ratio;
            let left = ((centre - support).floor() as i64).clamp(0, src_len as i64 - 1);
            let right = ((centre + support).ceil() as i64).clamp(left + 1, src_len as i64);
            let centre = centre - 0.5;
            let mut weights: Vec<f32> = (left..right)
                .map(|i| {
                    let x = (i as f32 - centre) / sratio;
                    if x.abs() < 1.0 { 1.0 - x.abs() } else { 0.0 }
                })
                .collect();
            let sum = weights.iter().fold(0.0f32, |s, &w| s + w);
            weights.iter_mut().for_each(|w| *w /= sum);
            Taps { first: left as usize, weights }
        })
        .collect()
}

/// `image::imageops::resize(image, width, height, FilterType::Triangle)`, the same bytes.
pub fn resize_triangle(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 || width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    if (w, h) == (width, height) {
        return image.clone();
    }
    let (src_row, mid_row, out_row) = (w as usize * 3, w as usize * 3, width as usize * 3);
    let src = image.as_raw();
    // Rows first (the crate's order): each output row a weighted sum of source rows, in f32.
    let rows = filter_taps(h, height);
    let mut mid = vec![0f32; height as usize * mid_row];
    mid.par_chunks_mut(mid_row).zip(&rows).for_each(|(sums, taps)| {
        for (i, &weight) in taps.weights.iter().enumerate() {
            let row = &src[(taps.first + i) * src_row..][..src_row];
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += v as f32 * weight;
            }
        }
    });
    // Then columns, rounded to bytes.
    let columns = filter_taps(w, width);
    let mut out = vec![0u8; height as usize * out_row];
    out.par_chunks_mut(out_row).zip(mid.par_chunks(mid_row)).for_each(|(bytes, sums)| {
        for (pixel, taps) in bytes.chunks_exact_mut(3).zip(&columns) {
            let mut t = [0f32; 3];
            for (i, &weight) in taps.weights.iter().enumerate() {
                let source = &sums[(taps.first + i) * 3..][..3];
                for (t, &v) in t.iter_mut().zip(source) {
                    *t += v * weight;
                }
            }
            for (byte, t) in pixel.iter_mut().zip(t) {
                *byte = t.clamp(0.0, 255.0).round() as u8;
            }
        }
    });
    RgbImage::from_raw(width, height, out).expect("width × height × 3 bytes")
}

#[cfg(test)]
mod tests {
    use image::imageops::{self, FilterType};

    use super::*;

    fn photo(w: u32, h: u32, seed: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ seed).wrapping_mul(2246822519);
            image::Rgb([(v >> 24) as u8, (v >> 16) as u8, (v >> 8) as u8])
        })
    }

    #[test]
    fn gives_the_image_crates_bytes_shrinking_enlarging_and_on_thin_images() {
        for (w, h, nw, nh) in [(550, 832, 211, 320), (37, 53, 156, 224), (640, 427, 224, 149), (1, 1, 7, 3), (300, 2, 224, 1), (5, 900, 1, 224), (224, 224, 224, 100)] {
            let image = photo(w, h, w * 31 + h);
            let want = imageops::resize(&image, nw, nh, FilterType::Triangle);
            let got = resize_triangle(&image, nw, nh);
            assert_eq!(got.dimensions(), want.dimensions());
            let differing = got.as_raw().iter().zip(want.as_raw()).filter(|(a, b)| a != b).count();
            assert_eq!(differing, 0, "{w}×{h} → {nw}×{nh}");
        }
    }
}
