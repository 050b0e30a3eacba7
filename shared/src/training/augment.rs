//! Augmentations that turn a clean shop photo into a consumer-like view: background swap
//! (the white studio background replaced by a random colour and noise, as a street scene
//! would surround the garment), perspective (the photo seen from a little aside), crop
//! jitter, horizontal flip, colour jitter and blur; and shop cut-outs rendered as a
//! consumer's catalog photo (`catalog_render`).

use image::{Rgb, RgbImage, imageops};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A consumer-like view of `image`.
pub fn consumer_view(image: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
    let mut view = background_swap(image, rng);
    view = perspective(&view, rng);
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

/// A random perspective warp: each corner of the image moves inwards by up to 12% of the
/// side, and the quadrilateral they form is stretched back onto the full frame (inverse
/// mapping through the homography, bilinear sampling, edges clamped).
pub fn perspective(image: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = (image.width() as f64, image.height() as f64);
    let mut jitter = |x: f64, y: f64, sx: f64, sy: f64| (x + sx * rng.random_range(0.0..0.12) * w, y + sy * rng.random_range(0.0..0.12) * h);
    // Where the output's corners come from in the input.
    let src = [jitter(0.0, 0.0, 1.0, 1.0), jitter(w, 0.0, -1.0, 1.0), jitter(w, h, -1.0, -1.0), jitter(0.0, h, 1.0, -1.0)];
    let dst = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)];
    let Some(m) = homography(&dst, &src) else { return image.clone() };
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
        let d = m[6] * px + m[7] * py + 1.0;
        let sx = (m[0] * px + m[1] * py + m[2]) / d - 0.5;
        let sy = (m[3] * px + m[4] * py + m[5]) / d - 0.5;
        bilinear(image, sx, sy)
    })
}

/// The 3×3 homography (h33 = 1, row-major, 8 values) mapping each `from[i]` to `to[i]`.
fn homography(from: &[(f64, f64); 4], to: &[(f64, f64); 4]) -> Option<[f64; 8]> {
    let mut a = [[0f64; 9]; 8];
    for i in 0..4 {
        let ((x, y), (u, v)) = (from[i], to[i]);
        a[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, u];
        a[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y, v];
    }
    // Gauss-Jordan elimination with partial pivoting on the 8×9 augmented matrix.
    for col in 0..8 {
        let pivot = (col..8).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        for row in 0..8 {
            if row != col {
                let f = a[row][col] / a[col][col];
                let pivot_row = a[col];
                for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut m = [0f64; 8];
    for i in 0..8 {
        m[i] = a[i][8] / a[i][i];
    }
    Some(m)
}

fn bilinear(image: &RgbImage, x: f64, y: f64) -> Rgb<u8> {
    let (w, h) = (image.width() as i64, image.height() as i64);
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let px = |xi: i64, yi: i64| image.get_pixel(xi.clamp(0, w - 1) as u32, yi.clamp(0, h - 1) as u32).0;
    let (x0, y0) = (x0 as i64, y0 as i64);
    let (a, b, c, d) = (px(x0, y0), px(x0 + 1, y0), px(x0, y0 + 1), px(x0 + 1, y0 + 1));
    Rgb(std::array::from_fn(|i| {
        let top = a[i] as f64 * (1.0 - fx) + b[i] as f64 * fx;
        let bottom = c[i] as f64 * (1.0 - fx) + d[i] as f64 * fx;
        (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8
    }))
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

/// Near-white pixels connected to the border: the studio background of a cut-out, row-major.
pub fn white_surround(image: &RgbImage) -> Vec<bool> {
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
    background
}

/// Replaces near-white pixels connected to the border (the studio background) by a random
/// colour with noise.
pub fn background_swap(image: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
    let background = white_surround(image);
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

/// A shop cut-out (one garment on white) rendered as a consumer's catalog photo: the garment
/// pasted at a random scale and place onto a texture taken from a corner of `backdrop` (a
/// real catalog photo: floors, beds, doors), seen a little aside, maybe mirrored, re-lit,
/// blurred and JPEG-compressed. Training pairs a street crop with this rather than with the
/// cut-out's own pixels, so the match has to come from the garment.
pub fn catalog_render(cutout: &RgbImage, backdrop: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = cutout.dimensions();
    let surround = white_surround(cutout);
    // Canvas 1.0–1.5× the garment, filled with the backdrop's corner stretched over it.
    let scale = rng.random_range(1.0..1.5f32);
    let (cw, ch) = (((w as f32 * scale) as u32).max(w), ((h as f32 * scale) as u32).max(h));
    let (bw, bh) = backdrop.dimensions();
    let (tw, th) = ((bw / 3).max(1), (bh / 3).max(1));
    let (tx, ty) = (if rng.random_bool(0.5) { 0 } else { bw - tw }, if rng.random_bool(0.5) { 0 } else { bh - th });
    let texture = imageops::crop_imm(backdrop, tx, ty, tw, th).to_image();
    let mut canvas = imageops::resize(&texture, cw, ch, imageops::FilterType::Triangle);
    let (ox, oy) = (rng.random_range(0..=cw - w), rng.random_range(0..=ch - h));
    for (i, p) in cutout.pixels().enumerate() {
        if !surround[i] {
            let (x, y) = (i as u32 % w, i as u32 / w);
            canvas.put_pixel(ox + x, oy + y, *p);
        }
    }
    let mut view = perspective(&canvas, rng);
    if rng.random_bool(0.5) {
        view = imageops::flip_horizontal(&view);
    }
    colour_jitter(&mut view, rng);
    if rng.random_bool(0.5) {
        view = imageops::blur(&view, rng.random_range(0.4..1.5));
    }
    jpeg_round_trip(&view, rng.random_range(30..90u8))
}

/// `image` encoded as a JPEG of `quality` and decoded again: the blocking and ringing of a
/// phone's upload.
pub fn jpeg_round_trip(image: &RgbImage, quality: u8) -> RgbImage {
    let mut bytes = Vec::new();
    let encoded = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality).encode_image(image);
    match encoded.ok().and_then(|_| image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).ok()) {
        Some(decoded) => decoded.to_rgb8(),
        None => image.clone(),
    }
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

    #[test]
    fn catalog_render_keeps_the_garment_and_replaces_the_white() {
        let mut cutout = RgbImage::from_pixel(40, 60, Rgb([255, 255, 255]));
        for y in 10..50 {
            for x in 10..30 {
                cutout.put_pixel(x, y, Rgb([200, 20, 20]));
            }
        }
        let backdrop = RgbImage::from_pixel(90, 90, Rgb([20, 60, 160]));
        let out = catalog_render(&cutout, &backdrop, &mut ChaCha8Rng::seed_from_u64(4));
        assert!(out.width() >= 40 && out.height() >= 60);
        let is_red = |p: &Rgb<u8>| p.0[0] > 120 && p.0[1] < 100 && p.0[2] < 100;
        let is_white = |p: &Rgb<u8>| p.0.iter().all(|&c| c > 235);
        let red = out.pixels().filter(|p| is_red(p)).count();
        // The garment survives (some of it may be warped out of frame), the white does not.
        assert!(red > 200, "{red} red pixels");
        assert!(out.pixels().filter(|p| is_white(p)).count() < 20);
    }

    #[test]
    fn homography_maps_the_four_corners_and_identity_is_a_no_op() {
        let from = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)];
        let to = [(1.0, 2.0), (9.0, 0.5), (10.0, 10.0), (0.0, 8.0)];
        let m = homography(&from, &to).unwrap();
        for ((x, y), (u, v)) in from.iter().zip(to) {
            let d = m[6] * x + m[7] * y + 1.0;
            assert!(((m[0] * x + m[1] * y + m[2]) / d - u).abs() < 1e-9);
            assert!(((m[3] * x + m[4] * y + m[5]) / d - v).abs() < 1e-9);
        }
        let img = RgbImage::from_fn(8, 6, |x, y| Rgb([x as u8 * 30, y as u8 * 40, 7]));
        let id = homography(&from, &from).unwrap();
        assert!(id.iter().zip([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]).all(|(a, b)| (a - b).abs() < 1e-9));
        assert_eq!(bilinear(&img, 3.0, 2.0).0, img.get_pixel(3, 2).0);
        let warped = perspective(&img, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(warped.dimensions(), img.dimensions());
    }
}
