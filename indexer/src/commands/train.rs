//! `indexer train ...`: training our networks, with progress bars.

use std::path::{Path, PathBuf};

use crate::progress::Reporter;
use anyhow::Result;
use candle_core::Device;
use clap::{Args, Subcommand};
use shoplens::device::{DevicePreference, describe, select_device};
use shoplens::training::detector::{DetectorReport, DetectorTraining, train_detector};
use shoplens::training::embedder::{
    CategoryStageReport, CategoryStageTraining, EmbedderTraining, PRECISION_K, TrainingReport as EmbedderReport, fmt_top_k, train_category_stage, train_embedder,
};

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Train the embedding head (GeM + projection) for consumer-to-shop matching on a
    /// DeepFashion2-format set, on top of the frozen pretrained backbone.
    Embedder(EmbedderArgs),
    /// Train the garment detector's head (FCOS-style pyramid and tower) on a
    /// DeepFashion2-format folder of photos (image/, annos/), on top of the frozen
    /// pretrained backbone. The taxonomy is the annotations' categories.
    Detector(DetectorArgs),
    /// Give an embedder's category head its own fine-tuned copy of the backbone's last
    /// stage, read from each crop's stride-16 features (the embedding stays as it is).
    CategoryStage(CategoryStageArgs),
}

#[derive(Debug, Args)]
pub struct CategoryStageArgs {
    /// DeepFashion2-format consumer-to-shop set (user/, shop/, gallery_gt.json).
    #[arg(long)]
    data: PathBuf,
    /// CC0 catalog folder: its training senders' photos are labelled crops.
    #[arg(long)]
    catalog: Option<PathBuf>,
    #[command(flatten)]
    pseudo: PseudoLabelArgs,
    /// The embedder whose category head gets the stage.
    #[arg(long, default_value = "models/embedder-lite0.safetensors")]
    embedder: PathBuf,
    /// Where the new embedder file goes (beside the backbone file it names).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "target/feature-cache")]
    cache: PathBuf,
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Learning rate of the linear layer on the stage.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Learning rate of the tuned blocks.
    #[arg(long, default_value_t = 1e-4)]
    stage_lr: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The first backbone block the head tunes (default: the coarsest stage's first, Lite0's
    /// 11); a later one costs less per crop when serving.
    #[arg(long)]
    first_block: Option<usize>,
    /// Share of each label spread evenly over all categories (0: plain cross-entropy): the
    /// head's probabilities are weighed into the detector's, so over-sure ones veto too much.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    cpu: bool,
}

/// Weak labels for a category term: tagged street photos and the detector that boxes them.
#[derive(Debug, Args)]
pub struct PseudoLabelArgs {
    /// Tagged street photos (ccp-unlabelled: image/ + tags.json): the detector's boxes of
    /// tagged classes become labelled crops.
    #[arg(long)]
    unlabelled: Option<PathBuf>,
    /// The detector for those pseudo-labels.
    #[arg(long, default_value = "models/detector-lite0.safetensors")]
    detector: PathBuf,
    #[arg(long, default_value_t = 0.5)]
    pseudo_min_score: f32,
}

#[derive(Debug, Args)]
pub struct EmbedderArgs {
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
    /// Embedding length (instance part + kind part).
    #[arg(long, default_value_t = 512)]
    dim: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
    #[arg(long, default_value_t = 600)]
    augment_items: usize,
    #[arg(long, default_value_t = 1000)]
    distractors: usize,
    /// Weight of the category cross-entropy (street crops, shop side, labelled catalog
    /// photos) against the instance pairs.
    #[arg(long, default_value_t = 1.0)]
    category_weight: f64,
    /// Weight of the distillation from the untrained backbone's average-pooled features
    /// (off by default: on validation it cost proxy top-1 and gave no category precision).
    #[arg(long, default_value_t = 0.0)]
    distill_weight: f64,
    /// Share of instance pairs whose shop side is the cut-out rendered as a catalog photo
    /// (off by default: on validation it lowered proxy top-1 and did not raise category
    /// precision; see the model card).
    #[arg(long, default_value_t = 0.0)]
    render_share: f64,
    /// Length of the embedding's kind part (0: one part); the rest is the instance part.
    #[arg(long, default_value_t = 128)]
    category_dim: usize,
    /// The kind part's share of the cosine similarity. 0.2 chosen on validation: 0.3 and
    /// 0.25 kept more category precision on the embedding alone but proxy top-20 under 0.98
    /// (models/README.md).
    #[arg(long, default_value_t = 0.2)]
    category_share: f64,
    #[command(flatten)]
    pseudo: PseudoLabelArgs,
    /// Share of validation queries whose best wrong match may pass the exact-match
    /// threshold (a result above it is listed first whatever its category).
    #[arg(long, default_value_t = 0.1)]
    exact_match_false_rate: f64,
    /// Continue from the checkpoint beside --out.
    #[arg(long)]
    resume: bool,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    cpu: bool,
}

#[derive(Debug, Args)]
pub struct DetectorArgs {
    /// DeepFashion2-format folder: image/ and annos/ (e.g. street2shop-ccp/user).
    #[arg(long)]
    data: PathBuf,
    /// DeepFashion2-format folder of shop images (e.g. street2shop-ccp/shop), trained on
    /// beside the street photos so that a lone garment on white is one box.
    #[arg(long)]
    shop: Option<PathBuf>,
    /// CC0 catalog folder (catalog.csv): its training senders' photos become backgrounds
    /// of shop composites.
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Start from this detector's head (same taxonomy and shape) instead of random weights.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Cached views per shop image (the image alone, then composites of 1–3 cut-outs).
    #[arg(long, default_value_t = 3)]
    shop_views: usize,
    /// Shop images drawn per epoch (every street photo is drawn once).
    #[arg(long, default_value_t = 600)]
    shop_per_epoch: usize,
    /// Paste garments of other training photos (through the folder's masks/) into half
    /// of the random street views.
    #[arg(long)]
    copy_paste: bool,
    /// Train on the CC0 catalog's training photos (--catalog) too, each with one box: the
    /// --init detector's best box of the photo's catalog category (its other boxes are
    /// dropped: one garment a photo); photos without one are left out.
    #[arg(long)]
    catalog_boxes: bool,
    /// Tagged street photos without boxes (ccp-unlabelled: image/ + tags.json): the --init
    /// detector's boxes that each photo's tags confirm make it a training photo, when every
    /// tagged headline class was found (self-training).
    #[arg(long)]
    unlabelled: Option<PathBuf>,
    /// Score a pseudo-box needs.
    #[arg(long, default_value_t = 0.5)]
    pseudo_min_score: f32,
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
    /// Give the class logits a tower of their own (the shared tower keeps boxes and
    /// centre-ness); from an `--init` without one, it starts as a copy of the shared tower.
    #[arg(long)]
    class_tower: bool,
    /// Fine-tune the backbone's coarsest stage (the blocks from the stride-16 level to the
    /// stride-32 one) at this learning rate, e.g. 1e-4; the detector file then carries
    /// those blocks. Without it the backbone stays frozen.
    #[arg(long)]
    stage_lr: Option<f64>,
    /// Validate every this many epochs.
    #[arg(long, default_value_t = 4)]
    eval_every: usize,
    /// Continue from the checkpoint beside --out.
    #[arg(long)]
    resume: bool,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    cpu: bool,
}

pub fn run(cmd: TrainCommand) -> Result<()> {
    match cmd {
        TrainCommand::Detector(args) => detector(args),
        TrainCommand::Embedder(args) => embedder(args),
        TrainCommand::CategoryStage(args) => category_stage(args),
    }
}

/// `indexer train category-stage`: as [`detector`], for the category head's stage.
fn category_stage(args: CategoryStageArgs) -> Result<()> {
    let out = args.out.clone();
    let cfg = CategoryStageTraining {
        data: args.data,
        catalog: args.catalog,
        unlabelled: args.pseudo.unlabelled,
        detector: args.pseudo.detector,
        pseudo_min_score: args.pseudo.pseudo_min_score,
        embedder: args.embedder,
        out: args.out,
        cache: args.cache,
        epochs: args.epochs,
        batch: args.batch,
        lr: args.lr,
        stage_lr: args.stage_lr,
        seed: args.seed,
        first_block: args.first_block,
        label_smoothing: args.label_smoothing,
        device: device(args.cpu)?,
    };
    let mut reporter = Reporter::default();
    let report = train_category_stage(&cfg, &mut |event| reporter.handle(event))?;
    reporter.finish();
    print_category_stage_report(&report, &out)
}

fn print_category_stage_report(report: &CategoryStageReport, out: &Path) -> Result<()> {
    let head = report.embedding_head;
    println!("named right on validation, the head on the embedding: street {:.3}, shop {:.3}", head.street, head.shop);
    for e in &report.epochs {
        println!("epoch {}: loss {:.4}; the tuned stage: street {:.3}, shop {:.3}", e.epoch, e.loss, e.accuracy.street, e.accuracy.shop);
    }
    for (name, n, before, after) in &report.street_categories {
        println!("  {name:<12} {n:>4} street crops  embedding head {before:>4}  tuned stage {after:>4}");
    }
    println!("{} training crops, {} + {} validation crops, {:.0} s; wrote {}", report.train_crops, report.val_crops.0, report.val_crops.1, report.seconds, out.display());
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn device(cpu: bool) -> Result<Device> {
    let device = select_device(if cpu { DevicePreference::Cpu } else { DevicePreference::Auto })?;
    eprintln!("training on {}", describe(&device));
    Ok(device)
}

/// `indexer train detector`: trains with progress bars, then prints the validation report
/// and, last, the report as one JSON line.
fn detector(args: DetectorArgs) -> Result<()> {
    let out = args.out.clone();
    let cfg = args.into_training()?;
    let mut reporter = Reporter::default();
    let report = train_detector(&cfg, &mut |event| reporter.handle(event))?;
    reporter.finish();
    print_detector_report(&report, &out)
}

/// `indexer train embedder`: as [`detector`], for the match network.
fn embedder(args: EmbedderArgs) -> Result<()> {
    let out = args.out.clone();
    let cfg = args.into_training()?;
    let mut reporter = Reporter::default();
    let report = train_embedder(&cfg, &mut |event| reporter.handle(event))?;
    reporter.finish();
    print_embedder_report(&report, &out)
}

impl DetectorArgs {
    fn into_training(self) -> Result<DetectorTraining> {
        Ok(DetectorTraining {
            data: self.data,
            shop: self.shop,
            catalog: self.catalog,
            init: self.init,
            shop_views: self.shop_views,
            shop_per_epoch: self.shop_per_epoch,
            copy_paste: self.copy_paste,
            catalog_boxes: self.catalog_boxes,
            unlabelled: self.unlabelled,
            pseudo_min_score: self.pseudo_min_score,
            backbone: self.backbone,
            out: self.out,
            cache: self.cache,
            epochs: self.epochs,
            seed: self.seed,
            views: self.views,
            batch: self.batch,
            lr: self.lr,
            size: self.size,
            channels: self.channels,
            tower: self.tower,
            semantic_top: self.semantic_top,
            class_tower: self.class_tower,
            stage_lr: self.stage_lr,
            eval_every: self.eval_every,
            resume: self.resume,
            device: device(self.cpu)?,
        })
    }
}

impl EmbedderArgs {
    fn into_training(self) -> Result<EmbedderTraining> {
        Ok(EmbedderTraining {
            data: self.data,
            catalog: self.catalog,
            backbone: self.backbone,
            out: self.out,
            cache: self.cache,
            epochs: self.epochs,
            seed: self.seed,
            dim: self.dim,
            batch: self.batch,
            lr: self.lr,
            temperature: self.temperature,
            augment_items: self.augment_items,
            distractors: self.distractors,
            category_weight: self.category_weight,
            distill_weight: self.distill_weight,
            render_share: self.render_share,
            category_dim: self.category_dim,
            category_share: self.category_share,
            detector: self.pseudo.unlabelled.as_ref().map(|_| self.pseudo.detector),
            unlabelled: self.pseudo.unlabelled,
            pseudo_min_score: self.pseudo.pseudo_min_score,
            exact_match_false_rate: self.exact_match_false_rate,
            resume: self.resume,
            device: device(self.cpu)?,
        })
    }
}

fn print_detector_report(report: &DetectorReport, out: &Path) -> Result<()> {
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
    if let Some(shop) = &report.shop {
        println!(
            "shop images: AP50 {:.3}, headline AP50 {}, {:.2} garments per image (serving post-processing)",
            shop.ap50,
            shop.headline_ap50.map_or("-".into(), |v| format!("{v:.3}")),
            shop.garments_per_image
        );
    }
    println!(
        "{} training photos × {} views, {} validation photos; features {:.0} s, training {:.0} s; wrote {}",
        report.train_images,
        report.views,
        report.val_images,
        report.feature_seconds,
        report.train_seconds,
        out.display()
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn print_embedder_report(report: &EmbedderReport, out: &Path) -> Result<()> {
    println!("untrained backbone: {}; category precision@{PRECISION_K} {:.3}", fmt_top_k(&report.baseline_top_k), report.baseline_precision.mean);
    println!(
        "trained (epoch {}): {} (default ranking: {}; exact match ≥ {:.3}); category precision@{PRECISION_K} {:.3} alone, {:.3} with the default ranking; category head accuracy {:.3}",
        report.best_epoch,
        fmt_top_k(&report.top_k),
        fmt_top_k(&report.ranked_top_k),
        report.exact_match_similarity,
        report.precision.mean,
        report.ranked_precision.mean,
        report.category_accuracy
    );
    for (c, (n, p)) in &report.precision.per_category {
        let name = report.categories.get(*c).map_or("(unseen)", String::as_str);
        let base = report.baseline_precision.per_category.get(c).map_or(0.0, |b| b.1);
        let ranked = report.ranked_precision.per_category.get(c).map_or(0.0, |b| b.1);
        println!("  {name:<12} {n:>4} queries  precision {p:.3}  ranked {ranked:.3}  untrained {base:.3}");
    }
    println!(
        "{} training pairs ({} with a rendered shop side) + {} augmentation pairs, {} labelled catalog photos, {} pseudo-labelled street crops; {} validation queries against {} gallery garments ({} distractors); features {:.0} s, training {:.0} s; wrote {}",
        report.train_pairs,
        report.rendered_pairs,
        report.augment_pairs,
        report.labelled_catalog,
        report.pseudo_labelled,
        report.val_queries,
        report.gallery,
        report.distractors,
        report.feature_seconds,
        report.train_seconds,
        out.display()
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
