//! The shipped embedder (models/embedder-lite0.safetensors + its backbone) embeds garments
//! of a real photo on a fresh clone.

use std::path::{Path, PathBuf};

use candle_core::Device;
use image::{Rgb, RgbImage};
use shoplens::geometry::BBox;
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::pipeline::GarmentPipeline;
use shoplens::vision::{DecodeLimits, decode_image};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn pipeline(embedder: &GarmentEmbedder) -> GarmentPipeline<'_> {
    GarmentPipeline { detector: None, embedder, limits: DecodeLimits::default() }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn shipped_embedder_embeds_a_real_photo_consistently() {
    let embedder = GarmentEmbedder::load(&repo().join("models/embedder-lite0.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(embedder.dim(), 512);
    assert!(embedder.version().starts_with("embedder-lite0-gem-"));
    // Instance and kind parts, and a category head over the street taxonomy.
    assert_eq!(embedder.config().parts.iter().map(|p| p.len).sum::<usize>(), 512);
    assert!(embedder.config().categories.iter().any(|c| c == "top"));
    let photo = decode_image(&std::fs::read(repo().join("shared/tests/fixtures/lite0/catalog-t-shirt-00003aeb.jpg")).unwrap(), DecodeLimits::default()).unwrap();
    let (w, h) = (photo.width() as f32, photo.height() as f32);
    let boxes = [None, Some(BBox::new(0.05 * w, 0.05 * h, 0.95 * w, 0.95 * h)), Some(BBox::new(0.0, 0.0, 0.3 * w, 0.2 * h))];
    let e = pipeline(&embedder).embed(&photo, &boxes).unwrap();
    for v in &e {
        assert_eq!(v.len(), 512);
        assert!((dot(v, v) - 1.0).abs() < 1e-4, "unit length");
    }
    // The same garment, slightly recropped, stays closer than a corner of the background or
    // a flat grey picture.
    let grey = pipeline(&embedder).embed(&RgbImage::from_pixel(300, 300, Rgb([128, 128, 128])), &[None]).unwrap();
    assert!(dot(&e[0], &e[1]) > dot(&e[0], &e[2]), "{} vs {}", dot(&e[0], &e[1]), dot(&e[0], &e[2]));
    assert!(dot(&e[0], &e[1]) > dot(&e[0], &grey[0]));
    assert!(dot(&e[0], &e[1]) > 0.8, "{}", dot(&e[0], &e[1]));
}

#[test]
fn a_garment_embeds_the_same_alone_or_among_its_photos_other_garments() {
    let embedder = GarmentEmbedder::load(&repo().join("models/embedder-lite0.safetensors"), &Device::Cpu).unwrap();
    let pipeline = pipeline(&embedder);
    let photo = decode_image(&std::fs::read(repo().join("shared/tests/fixtures/lite0/catalog-t-shirt-00003aeb.jpg")).unwrap(), DecodeLimits::default()).unwrap();
    // Nine different crops of one photo, as a photo with nine garments is embedded.
    let boxes: Vec<Option<BBox>> = (0..9).map(|i| Some(BBox::new(i as f32 * 25.0, i as f32 * 10.0, 120.0 + i as f32 * 25.0, 150.0 + i as f32 * 15.0))).collect();
    let together = pipeline.embed(&photo, &boxes).unwrap();
    assert_eq!(together.len(), 9);
    for (i, b) in boxes.iter().enumerate() {
        let alone = pipeline.embed(&photo, std::slice::from_ref(b)).unwrap().remove(0);
        // Each garment is embedded alone, so beside others it has the very same bits...
        assert_eq!(together[i], alone, "crop {i}: {}", dot(&together[i], &alone));
        // ...and each row is its own crop's: the crops differ far more than that.
        for (j, other) in together.iter().enumerate().filter(|(j, _)| *j != i) {
            assert!(dot(other, &alone) < 0.9999, "crop {j} embeds like crop {i}");
        }
    }
}
