//! `indexer detect`: the garments of photos as served and indexed (the detector's boxes
//! after the second look of the embedder's category head), for a quick look.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use shoplens::device::{DevicePreference, select_device};
use shoplens::models::detector::{Detection, GarmentDetector};
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::pipeline::GarmentPipeline;
use shoplens::vision::{DecodeLimits, decode_image};

pub fn run(images: &[PathBuf], weights: &Path, embedder: &Path, min_score: Option<f32>, json: bool) -> Result<()> {
    let device = select_device(DevicePreference::Auto)?;
    let detector = GarmentDetector::load(weights, &device).with_context(|| format!("loading the detector {}", weights.display()))?;
    let embedder = GarmentEmbedder::load(embedder, &device).with_context(|| format!("loading the embedder {}", embedder.display()))?;
    let pipeline = GarmentPipeline { detector: Some(&detector), embedder: &embedder, limits: DecodeLimits::default() };
    let mut post = detector.config().postprocess;
    post.min_score = min_score.unwrap_or(post.min_score);
    let mut failed = 0;
    for path in images {
        // A bad file is reported and skipped; the others are still detected.
        let result = std::fs::read(path).map_err(anyhow::Error::from).and_then(|bytes| Ok(decode_image(&bytes, DecodeLimits::default())?));
        let image = match result {
            Ok(i) => i,
            Err(e) => {
                eprintln!("{}: {e:#}", path.display());
                failed += 1;
                continue;
            }
        };
        let started = Instant::now();
        let found: Vec<Detection> = pipeline.second_look(&image, detector.detect_with(&image, &post)?, &post)?.into_iter().map(|g| g.detection).collect();
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if json {
            println!("{}", serde_json::json!({"image": path, "width": image.width(), "height": image.height(), "ms": ms, "garments": found}));
        } else {
            println!("{} ({}×{}, {ms:.0} ms): {} garments", path.display(), image.width(), image.height(), found.len());
            for d in &found {
                let b = d.bbox;
                println!("  {:<12} {:.2}  [{:.0}, {:.0}, {:.0}, {:.0}]", d.category, d.score, b.x1, b.y1, b.x2, b.y2);
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} images could not be read", images.len());
    }
    Ok(())
}
