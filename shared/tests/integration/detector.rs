//! The shipped detector (models/detector-lite0.safetensors + its backbone) on shop photos:
//! a lone garment on white is never split into parts of its class, and the catalog rule
//! indexes it as exactly one garment of its catalog category that frames it.
//!
//! The cut-outs are CC0 catalog photos from `demo/catalog` (flat-lay phone shots) whose
//! backdrop was replaced by white (`fixtures/cutouts/make_cutouts.py`): a harder domain than
//! the street2shop cut-outs the detector trained on (worn garments).

use std::path::{Path, PathBuf};

use candle_core::Device;
use shoplens::geometry::BBox;
use shoplens::indexing::item_garments;
use shoplens::models::detector::GarmentDetector;
use shoplens::vision::{DecodeLimits, decode_image};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cut-outs with their catalog category and the garment's extent (the foreground's box).
const CUTOUTS: [(&str, &str, [f32; 4]); 2] = [("pants.jpg", "pants", [34.0, 42.0, 187.0, 308.0]), ("top.jpg", "top", [25.0, 45.0, 230.0, 248.0])];

#[test]
fn a_cut_out_on_white_is_indexed_as_one_garment_that_frames_it() {
    let detector = GarmentDetector::load(&repo().join("models/detector-lite0.safetensors"), &Device::Cpu).unwrap();
    for (file, category, extent) in CUTOUTS {
        let bytes = std::fs::read(repo().join("shared/tests/fixtures/cutouts").join(file)).unwrap();
        let image = decode_image(&bytes, DecodeLimits::default()).unwrap();
        let found = detector.detect(&image).unwrap();
        let extent = BBox::new(extent[0], extent[1], extent[2], extent[3]);
        // At most one box of the garment's class: its parts are not garments of their own.
        let own: Vec<_> = found.iter().filter(|d| d.category == category).collect();
        assert!(own.len() <= 1, "{file}: the garment split into parts: {found:?}");
        // The catalog rule: one garment, of the catalog category, framing the garment —
        // the detection when it found one, else the whole photo.
        let garments = item_garments(Some(category), false, &found, image.width(), image.height());
        assert_eq!(garments.len(), 1, "{file}: {garments:?}");
        assert_eq!(garments[0].category, category);
        assert!(garments[0].bbox.iou(&extent) >= 0.5, "{file}: {:?} does not frame {extent:?}", garments[0].bbox);
        if let Some(d) = own.first() {
            assert_eq!(garments[0].crop, Some(d.bbox), "{file}: the detection frames it");
            assert!(d.bbox.iou(&extent) >= 0.7, "{file}: {:?} frames the garment {extent:?} badly (IoU {:.2})", d.bbox, d.bbox.iou(&extent));
        }
    }
    // The pants are found as pants (the test would pass on whole-photo fallbacks alone
    // otherwise).
    let bytes = std::fs::read(repo().join("shared/tests/fixtures/cutouts/pants.jpg")).unwrap();
    let found = detector.detect(&decode_image(&bytes, DecodeLimits::default()).unwrap()).unwrap();
    assert!(found.iter().any(|d| d.category == "pants"), "{found:?}");
}
