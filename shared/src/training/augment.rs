//! Augmentations that turn a clean shop photo into a consumer-like view: crop jitter,
//! horizontal flip, colour jitter, blur and background swap (the white studio background
//! replaced by a random colour and noise, as a street scene would surround the garment).

use image::{Rgb, RgbImage, imageops};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A consumer-like view of `image`.
pub fn consumer_view(image: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
    let mut view = background_swap(image, rng);
    view = crop_jitter(&view, rng);
    if rng.random_bool(0.5) {
        view = imageops::flip_horizontal(&view);
    }
    colour_jitter(&mut view, rng);
    if rng.random_bool(0.5) {
        view = imageops::blur(&view, rng.random_range(0.5..1.8));
    }
    view
}

/// Keeps a random 70–100% sub-window of each side.
pub fn crop_jitter(image: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = image.dimensions();
    let cw = ((w as f32 * rng.random_range(0.7..=1.0)) as u32).max(1);
    let ch = ((h as f32 * rng.random_range(0.7..=1.0)) as u32).max(1);
    let x = rng.random_range(0..=w - cw);
    let y = rng.random_range(0..=h - ch);
    imageops::crop_imm(image, x, y, cw, ch).to_image()
}

/// Brightness, contrast and saturation jitter.
pub fn colour_jitter(image: &mut RgbImage, rng: &mut ChaCha8Rng) {
    let brightness = rng.random_range(-30.0..30.0f32);
    let contrast = rng.random_range(0.75..1.25f32);
    let saturation = rng.random_range(0.7..1.3f32);
    for p in image.pixels_mut() {
        let [r, g, b] = p.0.map(|c| c as f32);
        let grey = 0.299 * r + 0.587 * g + 0.114 * b;
        p.0 = [r, g, b].map(|c| {
            let c = grey + (c - grey) * saturation;
            ((c - 128.0) * contrast + 128.0 + brightness).clamp(0.0, 255.0) as u8
        });
    }
}

/// Replaces near-white pixels connected to the border (the studio background) by a random
/// colour with noise.
pub fn background_swap(image: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = image.dimensions();
    let near_white = |p: &Rgb<u8>| p.0.iter().all(|&c| c > 235);
    let mut background = vec![false; (w * h) as usize];
    let mut stack: Vec<(u32, u32)> = Vec::new();
    for x in 0..w {
        stack.push((x, 0));
        stack.push((x, h - 1));
    }
    for y in 0..h {
        stack.push((0, y));
        stack.push((w - 1, y));
    }
    while let Some((x, y)) = stack.pop() {
        let i = (y * w + x) as usize;
        if background[i] || !near_white(image.get_pixel(x, y)) {
            continue;
        }
        background[i] = true;
        if x > 0 {
            stack.push((x - 1, y));
        }
        if x + 1 < w {
            stack.push((x + 1, y));
        }
        if y > 0 {
            stack.push((x, y - 1));
        }
        if y + 1 < h {
            stack.push((x, y + 1));
        }
    }
    let base = [rng.random_range(0..=255u8), rng.random_range(0..=255u8), rng.random_range(0..=255u8)];
    let mut out = image.clone();
    for (i, p) in out.pixels_mut().enumerate() {
        if background[i] {
            let n: i16 = rng.random_range(-25..=25);
            p.0 = base.map(|c| (c as i16 + n).clamp(0, 255) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn background_swap_touches_only_the_white_surround() {
        let mut img = RgbImage::from_pixel(20, 20, Rgb([255, 255, 255]));
        for y in 5..15 {
            for x in 5..15 {
                img.put_pixel(x, y, Rgb([10, 200, 10]));
            }
        }
        let out = background_swap(&img, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(out.get_pixel(10, 10).0, [10, 200, 10]);
        assert_ne!(out.get_pixel(0, 0).0, [255, 255, 255]);
        let view = consumer_view(&img, &mut ChaCha8Rng::seed_from_u64(2));
        assert!(view.width() >= 14 && view.height() >= 14);
    }
}
