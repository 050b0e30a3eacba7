//! A synthetic DeepFashion2-format consumer-to-shop set, drawn from a seed.
//!
//! Tests need consumer photos, shop photos of the same items and exact boxes without
//! `../shared`. Each garment is a category shape (top, pants, skirt, dress, bag, footwear)
//! filled with a pattern drawn in the garment's own coordinates, so its consumer view (on a
//! noisy background among other garments) and its shop view (alone on white, at another
//! scale) look alike the way a real item's photos do. Boxes are exact: every shape touches
//! all four sides of its box.

use std::fs;
use std::io::BufWriter;
use std::path::Path;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::geometry::BBox;
use crate::{Error, Result};

/// The categories the generator draws, as (DeepFashion2-style id, street taxonomy name).
pub const CATEGORIES: [(u32, &str); 6] = [(9, "top"), (8, "pants"), (11, "skirt"), (6, "dress"), (1, "bag"), (4, "footwear")];

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Consumer images (one pair id each).
    pub images: usize,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// At most this many garments per consumer image (at least 1).
    pub max_items: usize,
    /// Chance that a garment has no shop counterpart (style 0).
    pub unmatched_rate: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self { images: 12, seed: 7, width: 240, height: 320, max_items: 3, unmatched_rate: 0.2 }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    pub user_images: usize,
    pub shop_images: usize,
    /// Consumer garments with a shop counterpart (the queries).
    pub matched_items: usize,
    /// Consumer garments without one (style 0).
    pub unmatched_items: usize,
}

#[derive(Debug, Clone, Copy)]
enum Pattern {
    Solid,
    HStripes(f32),
    VStripes(f32),
    Checks(f32),
    Dots(f32),
}

/// How one garment looks, in its own unit coordinates.
#[derive(Debug, Clone, Copy)]
struct Look {
    category: usize,
    base: [u8; 3],
    accent: [u8; 3],
    pattern: Pattern,
}

impl Look {
    fn random(rng: &mut ChaCha8Rng) -> Self {
        let colour = |rng: &mut ChaCha8Rng| [rng.random_range(0..=255), rng.random_range(0..=255), rng.random_range(0..=255)];
        let period = rng.random_range(3.0..9.0f32);
        let pattern = match rng.random_range(0..5) {
            0 => Pattern::Solid,
            1 => Pattern::HStripes(period),
            2 => Pattern::VStripes(period),
            3 => Pattern::Checks(period),
            _ => Pattern::Dots(period),
        };
        Self { category: rng.random_range(0..CATEGORIES.len()), base: colour(rng), accent: colour(rng), pattern }
    }

    /// Whether unit point (u, v) lies inside the category's shape. Every shape reaches all
    /// four sides of the unit square, so the drawn box is the tight box.
    fn covers(&self, u: f32, v: f32) -> bool {
        match CATEGORIES[self.category].1 {
            "top" => v < 0.35 || (0.25..=0.75).contains(&u),
            "pants" => v < 0.3 || !(0.45..=0.55).contains(&u),
            "skirt" => (u - 0.5).abs() <= 0.3 + 0.2 * v,
            "dress" => (u - 0.5).abs() <= 0.2 + 0.3 * v,
            "bag" => v > 0.2 || (0.2..=0.3).contains(&(u - 0.5).abs()),
            _ => (u - 0.5).powi(2) + (v - 0.5).powi(2) <= 0.25,
        }
    }

    fn colour(&self, u: f32, v: f32) -> [u8; 3] {
        let accent = match self.pattern {
            Pattern::Solid => false,
            Pattern::HStripes(p) => ((v * p * 2.0) as i32) % 2 == 0,
            Pattern::VStripes(p) => ((u * p * 2.0) as i32) % 2 == 0,
            Pattern::Checks(p) => (((u * p) as i32) + ((v * p) as i32)) % 2 == 0,
            Pattern::Dots(p) => {
                let (fu, fv) = ((u * p).fract() - 0.5, (v * p).fract() - 0.5);
                fu * fu + fv * fv < 0.08
            }
        };
        if accent { self.accent } else { self.base }
    }

    /// Paints the garment into `bbox` (integer pixel edges) of `img`.
    fn paint(&self, img: &mut RgbImage, bbox: BBox) {
        let (x1, y1, x2, y2) = (bbox.x1 as u32, bbox.y1 as u32, bbox.x2 as u32, bbox.y2 as u32);
        let (w, h) = ((x2 - x1) as f32, (y2 - y1) as f32);
        for y in y1..y2 {
            for x in x1..x2 {
                // Pixel centres mapped so the first and last rows/columns reach 0 and 1.
                let u = if w > 1.0 { (x - x1) as f32 / (w - 1.0) } else { 0.5 };
                let v = if h > 1.0 { (y - y1) as f32 / (h - 1.0) } else { 0.5 };
                if self.covers(u, v) {
                    img.put_pixel(x, y, Rgb(self.colour(u, v)));
                }
            }
        }
    }
}

fn write_jpeg(img: &RgbImage, path: &Path) -> Result<()> {
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(BufWriter::new(file), 92);
    encoder.encode_image(img).map_err(|source| Error::ImageWrite { path: path.to_path_buf(), source })
}

fn write_json(value: &Value, path: &Path) -> Result<()> {
    fs::write(path, serde_json::to_vec(value).expect("JSON values serialise")).map_err(|e| Error::io(path, e))
}

fn item_json(look: &Look, style: u32, bbox: BBox, image_area: f32) -> Value {
    let (id, name) = CATEGORIES[look.category];
    let ratio = bbox.area() / image_area;
    let scale = if ratio < 0.05 {
        1
    } else if ratio < 0.2 {
        2
    } else {
        3
    };
    json!({"category_id": id, "category_name": name, "style": style, "bounding_box": bbox.to_array().map(|v| v as i64),
           "landmarks": [], "segmentation": [], "scale": scale, "occlusion": 1, "zoom_in": 1, "viewpoint": 2})
}

/// A random box of about `min..max` of the image's shorter side, inside the image.
fn random_box(rng: &mut ChaCha8Rng, width: u32, height: u32, min: f32, max: f32) -> BBox {
    let side = width.min(height) as f32;
    let w = (side * rng.random_range(min..max)).max(8.0) as u32;
    let h = ((w as f32) * rng.random_range(0.8..1.5)).min(height as f32 - 2.0) as u32;
    let x1 = rng.random_range(0..=(width - w));
    let y1 = rng.random_range(0..=(height - h));
    BBox::new(x1 as f32, y1 as f32, (x1 + w) as f32, (y1 + h) as f32)
}

/// Writes the set into `dir`: `user/{image,annos}`, `shop/{image,annos}`, `query_gt.json`,
/// `gallery_gt.json`. The same config always gives the same bytes.
pub fn generate(dir: &Path, cfg: &SynthConfig) -> Result<SynthSummary> {
    if cfg.images == 0 || cfg.max_items == 0 || cfg.width < 64 || cfg.height < 64 {
        return Err(Error::InvalidSetting { name: "synth", reason: "need at least one image and one item per image, and images of at least 64×64".into() });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    for sub in ["user/image", "user/annos", "shop/image", "shop/annos"] {
        let path = dir.join(sub);
        fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    }
    let mut summary = SynthSummary { user_images: 0, shop_images: 0, matched_items: 0, unmatched_items: 0 };
    let (mut queries, mut gallery) = (Vec::new(), Vec::new());
    for pair_id in 1..=cfg.images as u64 {
        let mut img = RgbImage::from_fn(cfg.width, cfg.height, |x, y| {
            let g = (x + y) as f32 / (cfg.width + cfg.height) as f32;
            Rgb([(90.0 + 80.0 * g) as u8, (110.0 + 40.0 * g) as u8, (100.0 + 60.0 * (1.0 - g)) as u8])
        });
        for p in img.pixels_mut() {
            let n: i16 = rng.random_range(-20..=20);
            p.0 = p.0.map(|c| (c as i16 + n).clamp(0, 255) as u8);
        }
        let n_items = rng.random_range(1..=cfg.max_items);
        let mut anno = serde_json::Map::new();
        anno.insert("source".into(), json!("user"));
        anno.insert("pair_id".into(), json!(pair_id));
        let mut style = 0;
        // Drawn in order, so later garments may hide part of earlier ones, as in a street photo.
        for k in 1..=n_items {
            let look = Look::random(&mut rng);
            let bbox = random_box(&mut rng, cfg.width, cfg.height, 0.25, 0.6);
            look.paint(&mut img, bbox);
            let matched = !rng.random_bool(cfg.unmatched_rate);
            let item_style = if matched {
                style += 1;
                style
            } else {
                0
            };
            anno.insert(format!("item{k}"), item_json(&look, item_style, bbox, (cfg.width * cfg.height) as f32));
            if !matched {
                summary.unmatched_items += 1;
                continue;
            }
            summary.matched_items += 1;
            let (cls, _) = CATEGORIES[look.category];
            queries.push(json!({"query_image_id": pair_id, "style": item_style, "cls": cls, "pair_id": pair_id, "bbox": bbox.to_array().map(|v| v as i64)}));

            let shop_id = gallery.len() as u64 + 1;
            let (sw, sh) = (200u32, 240u32);
            let mut shop = RgbImage::from_pixel(sw, sh, Rgb([255, 255, 255]));
            let shop_box = random_box(&mut rng, sw, sh, 0.6, 0.85);
            look.paint(&mut shop, shop_box);
            write_jpeg(&shop, &dir.join(format!("shop/image/{shop_id:06}.jpg")))?;
            write_json(
                &json!({"source": "shop", "pair_id": pair_id, "item1": item_json(&look, item_style, shop_box, (sw * sh) as f32)}),
                &dir.join(format!("shop/annos/{shop_id:06}.json")),
            )?;
            gallery.push(json!({"gallery_image_id": shop_id, "style": item_style, "pair_id": pair_id, "bbox": shop_box.to_array().map(|v| v as i64)}));
            summary.shop_images += 1;
        }
        write_jpeg(&img, &dir.join(format!("user/image/{pair_id:06}.jpg")))?;
        write_json(&Value::Object(anno), &dir.join(format!("user/annos/{pair_id:06}.json")))?;
        summary.user_images += 1;
    }
    write_json(&Value::Array(queries), &dir.join("query_gt.json"))?;
    write_json(&Value::Array(gallery), &dir.join("gallery_gt.json"))?;
    Ok(summary)
}
