//! `indexer train ...`: training our networks, with progress bars.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use shoplens::device::{DevicePreference, describe, select_device};
use crate::progress::Reporter;
use shoplens::training::detector::{DetectorTraining, train_detector};
use shoplens::training::embedder::{EmbedderTraining, fmt_top_k, train_embedder};

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Train the embedding head (GeM + projection) for consumer-to-shop matching on a
    /// DeepFashion2-format set, on top of the frozen pretrained backbone.
    Embedder {
        /// DeepFashion2-format consumer-to-shop set (user/, shop/, gallery_gt.json).
        #[arg(long)]
        data: PathBuf,
        /// CC0 catalog folder (catalog.csv) for augmentation positives and distractors.
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Backbone weights (the output references it by file name: keep them together).
        #[arg(long, default_value = "models/efficientnet-lite0.safetensors")]
        backbone: PathBuf,
        #[arg(long, default_value = "models/embedder-lite0.safetensors")]
        out: PathBuf,
        /// Cache of backbone feature maps, reused by later runs.
        #[arg(long, default_value = "target/feature-cache")]
        cache: PathBuf,
        #[arg(long, default_value_t = 40)]
        epochs: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 256)]
        dim: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0.05)]
        temperature: f64,
        #[arg(long, default_value_t = 600)]
        augment_items: usize,
        #[arg(long, default_value_t = 1000)]
        distractors: usize,
        /// Continue from the checkpoint beside --out.
        #[arg(long)]
        resume: bool,
        /// Run on the CPU even when a GPU is available.
        #[arg(long)]
        cpu: bool,
    },
    /// Train the garment detector's head (FCOS-style pyramid and tower) on a
    /// DeepFashion2-format folder of photos (image/, annos/), on top of the frozen
    /// pretrained backbone. The taxonomy is the annotations' categories.
    Detector {
        /// DeepFashion2-format folder: image/ and annos/ (e.g. street2shop-ccp/user).
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "models/efficientnet-lite0.safetensors")]
        backbone: PathBuf,
        #[arg(long, default_value = "models/detector-lite0.safetensors")]
        out: PathBuf,
        /// Cache of backbone features of the augmented views, reused by later runs.
        #[arg(long, default_value = "target/feature-cache")]
        cache: PathBuf,
        #[arg(long, default_value_t = 36)]
        epochs: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Augmented views cached per training photo (the photo, its mirror, random ones).
        #[arg(long, default_value_t = 8)]
        views: usize,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        /// Square input side (a multiple of 32).
        #[arg(long, default_value_t = 320)]
        size: u32,
        /// Pyramid and tower width.
        #[arg(long, default_value_t = 64)]
        channels: usize,
        /// 3×3 convolutions in the shared tower.
        #[arg(long, default_value_t = 2)]
        tower: usize,
        /// Feed the backbone's 1280-d head features (ImageNet semantics) as the coarsest
        /// level instead of the last block's output.
        #[arg(long)]
        semantic_top: bool,
        /// Validate every this many epochs.
        #[arg(long, default_value_t = 4)]
        eval_every: usize,
        /// Continue from the checkpoint beside --out.
        #[arg(long)]
        resume: bool,
        /// Run on the CPU even when a GPU is available.
        #[arg(long)]
        cpu: bool,
    },
}

pub fn run(cmd: TrainCommand) -> Result<()> {
    match cmd {
        TrainCommand::Detector { data, backbone, out, cache, epochs, seed, views, batch, lr, size, channels, tower, semantic_top, eval_every, resume, cpu } => {
            let device = select_device(if cpu { DevicePreference::Cpu } else { DevicePreference::Auto })?;
            eprintln!("training on {}", describe(&device));
            let cfg = DetectorTraining { data, backbone, out: out.clone(), cache, epochs, seed, views, batch, lr, size, channels, tower, semantic_top, eval_every, resume, device };
            let mut reporter = Reporter::default();
            let report = train_detector(&cfg, &mut |event| reporter.handle(event))?;
            reporter.finish();
            println!("validation AP50 per category:");
            for (name, ap) in &report.validation {
                println!("  {name:<12} AP50 {:.3}  AP {:.3}  ({} instances)", ap.ap50, ap.ap, ap.instances);
            }
            println!(
                "mean AP {:.3}, AP50 {:.3}, AP75 {:.3}; headline AP50 (top, outer, dress, pants, skirt, shorts, footwear, bag) {}",
                report.ap,
                report.ap50,
                report.ap75,
                report.headline_ap50.map_or("-".into(), |v| format!("{v:.3}"))
            );
            println!(
                "{} training photos × {} views, {} validation photos; features {:.0} s, training {:.0} s; wrote {}",
                report.train_images, report.views, report.val_images, report.feature_seconds, report.train_seconds, out.display()
            );
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        TrainCommand::Embedder { data, catalog, backbone, out, cache, epochs, seed, dim, batch, lr, temperature, augment_items, distractors, resume, cpu } => {
            let device = select_device(if cpu { DevicePreference::Cpu } else { DevicePreference::Auto })?;
            eprintln!("training on {}", describe(&device));
            let cfg = EmbedderTraining { data, catalog, backbone, out: out.clone(), cache, epochs, seed, dim, batch, lr, temperature, augment_items, distractors, resume, device };
            let mut reporter = Reporter::default();
            let report = train_embedder(&cfg, &mut |event| reporter.handle(event))?;
            reporter.finish();
            println!("untrained backbone: {}", fmt_top_k(&report.baseline_top_k));
            println!("trained (epoch {}): {}", report.best_epoch, fmt_top_k(&report.top_k));
            println!(
                "{} training pairs + {} augmentation pairs; {} validation queries against {} gallery garments; features {:.0} s, training {:.0} s; wrote {}",
                report.train_pairs,
                report.augment_pairs,
                report.val_queries,
                report.gallery,
                report.feature_seconds,
                report.train_seconds,
                out.display()
            );
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}
