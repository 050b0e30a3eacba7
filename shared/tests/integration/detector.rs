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
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::pipeline::GarmentPipeline;
use shoplens::vision::{DecodeLimits, decode_image, product_extent};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shipped detector and embedder.
fn shipped_models() -> (GarmentDetector, GarmentEmbedder) {
    let detector = GarmentDetector::load(&repo().join("models/detector-lite0.safetensors"), &Device::Cpu).unwrap();
    let embedder = GarmentEmbedder::load(&repo().join("models/embedder-lite0.safetensors"), &Device::Cpu).unwrap();
    (detector, embedder)
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
        // the detection when it found one, else the product's extent on the white.
        let garments = item_garments(Some(category), false, &found, image.width(), image.height(), product_extent(&image));
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

/// The pipeline's second look on packshots (the packshot rule, `CategoryFusion::lone_garment`):
/// a cut-out on white is served and indexed as one garment framed at the product's extent,
/// named by both networks, embedded from that crop — even the white top the detector alone
/// misses. The same photos framed by a busy border are no packshots: their garments are the
/// detector's boxes, renamed only.
#[test]
fn a_packshot_is_one_garment_framed_at_its_extent_and_other_photos_keep_the_detectors_boxes() {
    let (detector, embedder) = shipped_models();
    assert!(detector.config().postprocess.category_fusion > 0.0, "the shipped detector has a second look");
    let pipeline = GarmentPipeline { detector: Some(&detector), embedder: &embedder, limits: DecodeLimits::default() };
    for (file, category, extent) in CUTOUTS {
        let bytes = std::fs::read(repo().join("shared/tests/fixtures/cutouts").join(file)).unwrap();
        let image = decode_image(&bytes, DecodeLimits::default()).unwrap();
        let extent = BBox::new(extent[0], extent[1], extent[2], extent[3]);
        let found = pipeline.find_garments(&image).unwrap();
        assert_eq!(found.len(), 1, "{file}: {found:?}");
        let garment = &found[0];
        assert!(garment.detection.bbox.iou(&extent) >= 0.95, "{file}: {:?} is not the product's extent {extent:?}", garment.detection.bbox);
        assert_eq!(garment.detection.category, category, "{file}: {found:?}");
        assert_eq!(garment.embedding, pipeline.embed(&image, &[Some(garment.detection.bbox)]).unwrap()[0], "{file}: embedded from its own crop");

        // A striped frame: the garment is the same, the backdrop no longer plain.
        let mut framed = image.clone();
        let (w, h) = framed.dimensions();
        for (x, y, p) in framed.enumerate_pixels_mut() {
            if x < 4 || y < 4 || x >= w - 4 || y >= h - 4 {
                *p = if (x + y) % 6 < 3 { image::Rgb([20, 20, 20]) } else { image::Rgb([230, 200, 40]) };
            }
        }
        let plain = detector.detect(&framed).unwrap();
        let found = pipeline.find_garments(&framed).unwrap();
        assert!(found.len() <= plain.len(), "{file}: {found:?} from {plain:?}");
        assert!(category != "pants" || !found.is_empty(), "the framed pants are still found");
        for g in &found {
            let original = plain.iter().find(|d| d.bbox == g.detection.bbox).unwrap_or_else(|| panic!("{file}: {:?} is no box of the detector", g.detection));
            assert!((original.score - g.detection.score).abs() < 1e-6, "{file}: {g:?} vs {original:?}");
        }
    }
}

/// The batched passes (the GPU's indexing) apply the packshot rule as one photo's path does:
/// the same garments for cut-outs and for a CC0 photo on its floor, embeddings equal to
/// float rounding (kernels block by batch size).
#[test]
fn batched_passes_frame_packshots_as_one_photo_does() {
    let (detector, embedder) = shipped_models();
    let pipeline = GarmentPipeline { detector: Some(&detector), embedder: &embedder, limits: DecodeLimits::default() };
    let demo = std::fs::read_to_string(repo().join("demo/catalog/catalog.csv")).unwrap();
    let floor = demo.lines().nth(1).unwrap().split(',').nth(1).unwrap().to_string();
    let files = [repo().join("shared/tests/fixtures/cutouts/pants.jpg"), repo().join("demo/catalog").join(floor), repo().join("shared/tests/fixtures/cutouts/top.jpg")];
    let images: Vec<_> = files.iter().map(|f| decode_image(&std::fs::read(f).unwrap(), DecodeLimits::default()).unwrap()).collect();
    assert_eq!(images.iter().filter(|i| product_extent(i).is_some()).count(), 2, "two packshots and a photo on its floor");
    let batched = pipeline.find_garments_batched(&images.iter().collect::<Vec<_>>(), 2).unwrap();
    for ((image, file), batched) in images.iter().zip(&files).zip(&batched) {
        let single = pipeline.find_garments(image).unwrap();
        assert_eq!(single.len(), batched.len(), "{file:?}");
        for (a, b) in single.iter().zip(batched) {
            assert_eq!((&a.detection.category, a.detection.bbox), (&b.detection.category, b.detection.bbox), "{file:?}");
            let cosine: f32 = a.embedding.iter().zip(&b.embedding).map(|(x, y)| x * y).sum();
            assert!(cosine > 1.0 - 1e-5, "{file:?}: cosine {cosine}");
        }
    }
    assert_eq!(batched[0].len(), 1, "the pants cut-out is one garment");
}

/// An AP evaluation ranks a packshot as it is served: the lone garment's box once per class,
/// its served class first with its served score, each with the reading of its crop; at a
/// share of 0 (the detector alone, no second look) the detector's own boxes.
#[test]
fn an_evaluation_ranks_a_packshot_as_it_is_served() {
    let (detector, embedder) = shipped_models();
    let pipeline = GarmentPipeline { detector: Some(&detector), embedder: &embedder, limits: DecodeLimits::default() };
    let bytes = std::fs::read(repo().join("shared/tests/fixtures/cutouts/pants.jpg")).unwrap();
    let image = decode_image(&bytes, DecodeLimits::default()).unwrap();
    let served = pipeline.find_garments(&image).unwrap().remove(0).detection;
    let share = detector.config().postprocess.category_fusion;
    let [alone, second_look] = <[_; 2]>::try_from(pipeline.detections_for_evaluation(&image, &[0.0, share]).unwrap()).unwrap();
    assert!(!second_look.is_empty() && second_look.iter().all(|(d, r)| d.bbox == served.bbox && r.is_some()), "{second_look:?}");
    assert_eq!((second_look[0].0.category.as_str(), second_look[0].0.score), (served.category.as_str(), served.score));
    let mut classes: Vec<usize> = second_look.iter().map(|(d, _)| d.class).collect();
    classes.sort_unstable();
    classes.dedup();
    assert_eq!(classes.len(), second_look.len(), "one box per class");
    assert!(!alone.is_empty() && alone.iter().all(|(d, _)| d.bbox != served.bbox), "{alone:?}");
}

/// A detector file with tuned backbone blocks (`tuned_blocks`): loading runs them in the
/// detector's own backbone copy, its tensors and version carry them, and the file without
/// them still loads as the ImageNet backbone.
#[test]
fn a_detector_with_tuned_blocks_runs_them_and_versions_them() {
    use shoplens::models::detector::{DetectorConfig, tuned_block_prefix};
    let shipped = GarmentDetector::load(&repo().join("models/detector-lite0.safetensors"), &Device::Cpu).unwrap();
    let last = shipped.backbone().coarsest_stage().end - 1;
    let mut block = shipped.backbone().folded_block(last).unwrap();
    block.project = ((&block.project.0 * 2.0).unwrap(), (&block.project.1 * 2.0).unwrap());

    let dir = tempfile::tempdir().unwrap();
    let backbone = &shipped.config().backbone;
    std::fs::copy(repo().join("models").join(backbone), dir.path().join(backbone)).unwrap();
    let mut tensors = shipped.tensors();
    tensors.extend(block.tensors(&tuned_block_prefix(last)));
    let mut tuned_blocks = shipped.config().tuned_blocks.clone();
    if !tuned_blocks.contains(&last) {
        tuned_blocks.push(last);
    }
    let config = DetectorConfig { tuned_blocks, ..shipped.config().clone() }.versioned(&tensors).unwrap();
    let path = dir.path().join("tuned.safetensors");
    GarmentDetector::save(&path, &config, &tensors).unwrap();

    let tuned = GarmentDetector::load(&path, &Device::Cpu).unwrap();
    assert_ne!(tuned.version(), shipped.version(), "tuned blocks are part of the version");
    assert_eq!(tuned.tensors().len(), tensors.len(), "the tuned block's tensors come back");
    let input = candle_core::Tensor::randn(0f32, 1., (1, 3, 320, 320), &Device::Cpu).unwrap();
    let (plain, doubled) = (shipped.backbone().pyramid(&input).unwrap(), tuned.backbone().pyramid(&input).unwrap());
    let diff = (&doubled[2] - (&plain[2] * 2.0).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-3, "the detector runs its tuned block: {diff}");
    assert_ne!(tuned.forward(&input).unwrap().to_vec3::<f32>().unwrap(), shipped.forward(&input).unwrap().to_vec3::<f32>().unwrap());

    // Without tuned blocks (files from before the field), the ImageNet backbone as it is.
    let mut untuned = config.clone();
    untuned.tuned_blocks.clear();
    let plain_path = dir.path().join("plain.safetensors");
    GarmentDetector::save(&plain_path, &untuned, &shipped.head().tensors()).unwrap();
    let reloaded = GarmentDetector::load(&plain_path, &Device::Cpu).unwrap();
    let imagenet = shoplens::models::Backbone::load(&repo().join("models").join(backbone), &Device::Cpu).unwrap();
    let (a, b) = (reloaded.backbone().pyramid(&input).unwrap(), imagenet.pyramid(&input).unwrap());
    assert_eq!(a[2].flatten_all().unwrap().to_vec1::<f32>().unwrap(), b[2].flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

/// `indexer weights retune-detector --input-size`: the same weights letterboxed onto another
/// side run at that side (more locations), and the version changes with the side, so a
/// catalog detected at the old side is detected again.
#[test]
fn a_detector_at_another_input_side_runs_there_and_is_versioned_apart() {
    let shipped = GarmentDetector::load(&repo().join("models/detector-lite0.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backbone = &shipped.config().backbone;
    std::fs::copy(repo().join("models").join(backbone), dir.path().join(backbone)).unwrap();
    let tensors = shipped.tensors();
    let mut config = shipped.config().clone();
    config.preprocess.size = 384;
    let config = config.versioned(&tensors).unwrap();
    let path = dir.path().join("larger.safetensors");
    GarmentDetector::save(&path, &config, &tensors).unwrap();

    let larger = GarmentDetector::load(&path, &Device::Cpu).unwrap();
    let at_320 = shipped.config().clone().versioned(&tensors).unwrap();
    assert_ne!(larger.version(), at_320.version, "the input side is part of the version");
    let input = candle_core::Tensor::randn(0f32, 1., (1, 3, 384, 384), &Device::Cpu).unwrap();
    let locations: usize = config.strides.iter().map(|s| (384 / s).pow(2)).sum();
    assert_eq!(larger.forward(&input).unwrap().dims()[2], locations);
    let photo = image::RgbImage::from_pixel(300, 500, image::Rgb([250, 250, 250]));
    assert!(larger.detect(&photo).is_ok(), "a photo is letterboxed onto the new side");
}
