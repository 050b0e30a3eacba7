//! Training the garment detector's head (pyramid, tower, outputs) on DeepFashion2-format
//! photos, FCOS-style (arXiv 1904.01355).
//!
//! The backbone stays frozen, as for the embedder: backpropagating through EfficientNet on a
//! 2-core CPU runs at about one image a second (`../shared/STACK-NOTES.md` §4), which would
//! not fit the hour. Instead each training image gets its augmented views (`views` per
//! street photo, `shop_views` per shop image), the backbone's pyramid features of every
//! view are computed once and cached on disk (f16, in shards, so an interrupted run keeps
//! what it computed), and each epoch
//! draws one view per image it uses.
//!
//! Targets (FCOS): a location is positive for a box when it lies inside the box's centre
//! region (1.5 strides around its centre, clipped to the box) and the box's largest
//! distance from it falls in the level's size range (0–64, 64–128, 128+ pixels); of several
//! such boxes the smallest wins. Losses: sigmoid focal loss on the classes (α 0.25, γ 2),
//! GIoU on the box distances weighted by the centre-ness target, binary cross-entropy on the
//! centre-ness; all divided by the number of positives.
//!
//! Two domains (see [`views`]): street photos and, with a shop folder, shop images (cut-outs
//! alone or composed on catalog-like backgrounds); each epoch draws every street photo once
//! and a seeded sample of the shop images, and validation measures both apart.
//!
//! Split: validation = `pair_id % 5 == 1` (for CCP, the CCP id; a street photo and its shop
//! images share it), training = the rest. The reported validation AP is the last epoch's:
//! no epoch is picked by its validation score.

mod data;
mod fit;
mod targets;
mod views;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use self::data::PseudoLabels;
use self::data::{CachedViews, Domains, Split};
use self::fit::Run;
pub use self::targets::{LocationTarget, assign};
use self::views::Targets;
use super::{Progress, ProgressFn};
use crate::evaluation::detection::{self, ApSummary, HEADLINE};
use crate::geometry::BBox;
use crate::models::Backbone;
use crate::models::backbone::FoldedBlock;
use crate::models::detector::{
    Category, DetectorConfig, DetectorHead, ParamInit, Postprocess, decode, detector_tensors, head_inputs, input_channels, location_grid, tuned_block_prefix,
};
use crate::models::formats::tensors::NamedTensors;
use crate::vision::Preprocess;
use crate::{Error, Result};

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct DetectorTraining {
    /// DeepFashion2-format folder (`image/`, `annos/`) of consumer photos.
    pub data: PathBuf,
    /// DeepFashion2-format folder of shop images (e.g. `street2shop-ccp/shop`: garments cut
    /// out on white), trained on beside the street photos and validated on their own.
    pub shop: Option<PathBuf>,
    /// CC0 catalog folder (`catalog.csv`): corners of its training senders' photos serve
    /// as backgrounds of shop views.
    pub catalog: Option<PathBuf>,
    /// Starts from this detector's head (same taxonomy and shape) instead of random weights.
    pub init: Option<PathBuf>,
    pub backbone: PathBuf,
    pub out: PathBuf,
    pub cache: PathBuf,
    pub epochs: usize,
    pub seed: u64,
    /// Cached augmented views per training photo (≥ 2: the photo and its mirror).
    pub views: usize,
    /// Cached views per shop image (≥ 1: the image alone, then composites).
    pub shop_views: usize,
    /// Shop images drawn per epoch (all street photos are, every epoch).
    pub shop_per_epoch: usize,
    /// Half of the random street views get garments of another training photo pasted in
    /// through its mask (the folder's `masks/`).
    pub copy_paste: bool,
    /// The CC0 catalog's training photos (`catalog`) become training photos, each with the
    /// `init` detector's best box of its catalog category (see `data::catalog_samples`).
    pub catalog_boxes: bool,
    /// Tagged street photos without boxes (`ccp-unlabelled`): the `init` detector's boxes
    /// that their tags confirm become training street photos (self-training).
    pub unlabelled: Option<PathBuf>,
    /// Score a pseudo-box needs.
    pub pseudo_min_score: f32,
    pub batch: usize,
    pub lr: f64,
    pub size: u32,
    pub channels: usize,
    pub tower: usize,
    /// Coarsest level from the backbone's semantic head features.
    pub semantic_top: bool,
    /// A tower of its own for the class logits (see `DetectorConfig::class_tower`).
    pub class_tower: bool,
    /// Fine-tunes the backbone's coarsest stage (`Backbone::coarsest_stage`) at this
    /// learning rate, from the cached stride-16 features; `None` keeps it frozen.
    pub stage_lr: Option<f64>,
    /// Validate every this many epochs (and after the last).
    pub eval_every: usize,
    pub resume: bool,
    pub device: Device,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetectorReport {
    pub train_images: usize,
    pub val_images: usize,
    #[serde(default)]
    pub train_shop_images: usize,
    #[serde(default)]
    pub val_shop_images: usize,
    pub views: usize,
    pub epochs: usize,
    /// Validation AP of the final weights on street photos, per category name.
    pub validation: BTreeMap<String, detection::ClassAp>,
    pub ap: f64,
    pub ap50: f64,
    pub ap75: f64,
    /// Mean AP50 over [`HEADLINE`].
    pub headline_ap50: Option<f64>,
    /// The same on the validation shop images, when trained with them.
    #[serde(default)]
    pub shop: Option<ShopValidation>,
    pub feature_seconds: f64,
    pub train_seconds: f64,
}

/// Validation on shop images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShopValidation {
    pub ap50: f64,
    pub headline_ap50: Option<f64>,
    /// Garments per shop image after the serving post-processing (one is right for a
    /// cut-out: more are fragments or doubles).
    pub garments_per_image: f64,
}

/// A tensor drawn from `init` with our seeded generator, so a seed fixes the run.
pub(super) fn init_tensor(shape: &[usize], init: &ParamInit, rng: &mut ChaCha8Rng, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = match init {
        ParamInit::Const(v) => vec![*v as f32; n],
        ParamInit::Values(v) => v.clone(),
        ParamInit::Normal(std) => (0..n)
            .map(|_| {
                // Box–Muller.
                let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
            })
            .collect(),
    };
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// The pyramid the head sees from cached features: with tuned blocks, the coarsest level
/// recomputed from the stride-16 one through them (the cache holds the ImageNet
/// backbone's coarsest level, which they replace).
fn tuned_levels(stage: &[(usize, FoldedBlock)], mut levels: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let n = levels.len();
    if stage.is_empty() || n < 2 {
        return Ok(levels);
    }
    let mut x = levels[n - 2].clone();
    for (_, block) in stage {
        x = block.forward_differentiable(&x)?;
    }
    levels[n - 1] = x;
    Ok(levels)
}

/// Runs `head` on cached features: each view's raw output `[k + 5, locations]`, flattened.
fn head_outputs(backbone: &Backbone, config: &DetectorConfig, (head, stage): Tuned<'_>, levels: &[Tensor], device: &Device) -> Result<Vec<Vec<f32>>> {
    let n = levels[0].dim(0)?;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(32) {
        let len = 32.min(n - start);
        let feats = levels.iter().map(|l| l.narrow(0, start, len)?.to_device(device)?.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
        let raw = head.forward(&head_inputs(backbone, config, tuned_levels(stage, feats)?)?)?.to_device(&Device::Cpu)?;
        for i in 0..len {
            out.push(raw.get(i)?.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}

/// AP of predictions against targets (both in input coordinates).
fn validation_ap(predictions: &[Vec<(BBox, usize, f32)>], targets: &[Targets], k: usize) -> ApSummary {
    let mut gts = Vec::new();
    let mut dets = Vec::new();
    for (i, (p, t)) in predictions.iter().zip(targets).enumerate() {
        gts.extend(t.iter().map(|&(class, b)| detection::GroundTruth { image: i as u64, class, bbox: BBox::new(b[0], b[1], b[2], b[3]) }));
        dets.extend(p.iter().map(|&(bbox, class, score)| detection::Detected { image: i as u64, class, bbox, score }));
    }
    detection::evaluate(&gts, &dets, k)
}

fn headline_classes(categories: &[Category]) -> Vec<usize> {
    categories.iter().enumerate().filter(|(_, c)| HEADLINE.contains(&c.name.as_str())).map(|(i, _)| i).collect()
}

/// `top 0.71, outer 0.52, …` for messages.
pub fn fmt_ap50(summary: &ApSummary, categories: &[Category]) -> String {
    summary.per_class.iter().map(|(c, ap)| format!("{} {:.2}", categories[*c].name, ap.ap50)).collect::<Vec<_>>().join(", ")
}

/// A head's parameters taken from an earlier detector (`--init`): its config must match
/// the run's taxonomy and shape.
fn init_weights(path: &Path, config: &DetectorConfig, device: &Device) -> Result<NamedTensors> {
    let earlier: DetectorConfig = crate::models::formats::weights_file::read_config(path)?;
    let same = earlier.categories == config.categories
        && earlier.channels == config.channels
        && earlier.tower == config.tower
        && earlier.strides == config.strides
        && earlier.semantic_top == config.semantic_top
        // A shared tower may seed a run with a class tower (see `build_head`), not the reverse.
        && (earlier.class_tower == config.class_tower || !earlier.class_tower);
    if !same {
        return Err(Error::InvalidSetting { name: "init", reason: format!("{} has another taxonomy or head shape than this run", path.display()) });
    }
    NamedTensors::read(path, device)
}

/// Validation of `head` on cached features: AP (evaluation post-processing) and garments
/// per image (the config's serving post-processing).
fn validate(
    backbone: &Backbone,
    config: &DetectorConfig,
    tuned: Tuned<'_>,
    levels: &[Tensor],
    targets: &[Targets],
    grid: &[(f32, f32, f32)],
    device: &Device,
) -> Result<(ApSummary, f64)> {
    let outputs = head_outputs(backbone, config, tuned, levels, device)?;
    let k = config.num_classes();
    let predictions: Vec<_> = outputs.iter().map(|o| decode(o, k, grid, &Postprocess::EVALUATION)).collect();
    let served: usize = outputs.iter().map(|o| decode(o, k, grid, &config.postprocess).len()).sum();
    Ok((validation_ap(&predictions, targets, k), served as f64 / outputs.len().max(1) as f64))
}

/// Trains the head and writes the final weights to `cfg.out`.
pub fn train_detector(cfg: &DetectorTraining, progress: ProgressFn) -> Result<DetectorReport> {
    if cfg.epochs == 0 || cfg.batch == 0 || cfg.views < 2 || cfg.eval_every == 0 || (cfg.shop.is_some() && cfg.shop_views == 0) {
        return Err(Error::InvalidSetting { name: "training", reason: "need epochs ≥ 1, batch ≥ 1, views ≥ 2, shop views ≥ 1 and eval-every ≥ 1".into() });
    }
    let started = Instant::now();
    let backbone = Backbone::load(&cfg.backbone, &cfg.device)?;
    let domains = Domains::read(cfg, progress)?;
    let (street, shop) = domains.split(cfg.shop.is_some())?;
    progress(Progress::Message(data_message(&domains.categories, &street, &shop)));
    if let Some(p) = &domains.pseudo_labels {
        progress(Progress::Message(format!(
            "pseudo-labels: {} of {} tagged photos kept (every tagged headline class found), {} boxes, {} boxes of untagged classes dropped",
            p.kept, p.photos, p.boxes, p.untagged_boxes
        )));
    }
    if let Some(p) = &domains.catalog_labels {
        progress(Progress::Message(format!(
            "catalog boxes: {} of {} training catalog photos kept (a box of their category found), {} other boxes dropped",
            p.kept, p.photos, p.untagged_boxes
        )));
    }
    let config = detector_config(cfg, &backbone, domains.categories.clone())?;
    let in_channels = input_channels(&backbone, &config);
    if in_channels.len() != config.strides.len() {
        return Err(Error::InvalidWeights { reason: format!("the backbone gives {} pyramid levels, expected 3", in_channels.len()) });
    }
    let init = cfg.init.as_ref().map(|p| init_weights(p, &config, &cfg.device)).transpose()?;
    let views = CachedViews::compute(cfg, &backbone, &domains, &street, &shop, &config.preprocess, progress)?;
    let feature_seconds = started.elapsed().as_secs_f64();
    let grid = location_grid(cfg.size as usize, &config.strides);
    let assigned: Vec<_> = views.train_targets.iter().map(|t| assign(&grid, &config.strides, t)).collect();
    let positives: usize = assigned.iter().map(|a| a.iter().filter(|x| x.is_some()).count()).sum();
    let per_view = positives as f64 / views.train_targets.len() as f64;
    progress(Progress::Message(format!("{} cached views, {per_view:.1} positive locations per view", views.train_targets.len())));

    let (varmap, head, stage) = build_head(cfg, &backbone, &config, &in_channels, init.as_ref())?;
    let train_started = Instant::now();
    let run = Run {
        cfg,
        backbone: &backbone,
        config: &config,
        views: &views,
        grid: &grid,
        assigned: &assigned,
        street_train: street.train.len(),
        shop_train: shop.train.len(),
        catalog_train: domains.catalog.len(),
    };
    let (summary, shop_summary) = run.fit((&head, &stage), varmap, progress)?;
    let final_head = head.detached()?;
    let final_stage = stage.iter().map(|(i, b)| Ok((*i, detached_block(b)?))).collect::<Result<Vec<_>>>()?;
    let headline = headline_classes(&config.categories);
    let report = DetectorReport {
        train_images: street.train.len(),
        val_images: street.val.len(),
        train_shop_images: shop.train.len(),
        val_shop_images: shop.val.len(),
        views: cfg.views,
        epochs: cfg.epochs,
        validation: summary.per_class.iter().map(|(c, ap)| (config.categories[*c].name.clone(), ap.clone())).collect(),
        ap: summary.ap,
        ap50: summary.ap50,
        ap75: summary.ap75,
        headline_ap50: summary.mean_ap50_over(&headline),
        shop: shop_summary.map(|(s, per_image)| ShopValidation { ap50: s.ap50, headline_ap50: s.mean_ap50_over(&headline), garments_per_image: per_image }),
        feature_seconds,
        train_seconds: train_started.elapsed().as_secs_f64(),
    };
    let tensors = detector_tensors(&final_head, &final_stage);
    let mut config = config.versioned(&tensors)?;
    config.training = serde_json::json!({
        "data": cfg.data, "shop": cfg.shop, "catalog_backdrops": cfg.catalog, "init": cfg.init,
        "unlabelled": cfg.unlabelled, "catalog_boxes": cfg.catalog_boxes, "catalog_labels": domains.catalog_labels, "pseudo_min_score": cfg.pseudo_min_score, "pseudo_labels": domains.pseudo_labels,
        "epochs": cfg.epochs, "seed": cfg.seed, "views": cfg.views, "shop_views": cfg.shop_views, "shop_per_epoch": cfg.shop_per_epoch, "copy_paste": cfg.copy_paste,
        "batch": cfg.batch, "lr": cfg.lr, "semantic_top": cfg.semantic_top, "class_tower": cfg.class_tower, "stage_lr": cfg.stage_lr, "split": "validation = pair_id % 5 == 1", "report": &report,
    });
    crate::models::detector::GarmentDetector::save(&cfg.out, &config, &tensors)?;
    Ok(report)
}

fn data_message(categories: &[Category], street: &Split<'_>, shop: &Split<'_>) -> String {
    format!(
        "{} categories ({}); {} training photos, {} validation photos; {} training shop images, {} validation shop images",
        categories.len(),
        categories.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "),
        street.train.len(),
        street.val.len(),
        shop.train.len(),
        shop.val.len()
    )
}

/// The head's configuration from the run's settings (version and training record are
/// filled in once trained).
fn detector_config(cfg: &DetectorTraining, backbone: &Backbone, categories: Vec<Category>) -> Result<DetectorConfig> {
    let mut config = DetectorConfig {
        backbone: cfg.backbone.file_name().and_then(|f| f.to_str()).unwrap_or("efficientnet-lite0.safetensors").to_string(),
        categories,
        preprocess: Preprocess { size: cfg.size, normalisation: backbone.normalisation(), pad_rgb: [255, 255, 255] },
        channels: cfg.channels,
        tower: cfg.tower,
        groups: 16.min(cfg.channels).max(1),
        strides: vec![8, 16, 32],
        semantic_top: cfg.semantic_top,
        class_tower: cfg.class_tower,
        tuned_blocks: if cfg.stage_lr.is_some() { backbone.coarsest_stage().collect() } else { Vec::new() },
        postprocess: Postprocess::SERVING,
        version: String::new(),
        training: serde_json::Value::Null,
    };
    while !config.channels.is_multiple_of(config.groups) {
        config.groups -= 1;
    }
    config.validate()?;
    Ok(config)
}

/// Backbone blocks a run fine-tunes, by block index.
type TunedBlocks = Vec<(usize, FoldedBlock)>;

/// A head and the backbone blocks trained with it (none when the backbone is frozen).
pub(super) type Tuned<'a> = (&'a DetectorHead, &'a [(usize, FoldedBlock)]);

/// A block's parameters cut from the training graph.
fn detached_block(block: &FoldedBlock) -> Result<FoldedBlock> {
    let pair = |(w, b): &(Tensor, Tensor)| (w.detach(), b.detach());
    Ok(FoldedBlock { config: block.config.clone(), expand: block.expand.as_ref().map(pair), depthwise: pair(&block.depthwise), project: pair(&block.project) })
}

/// The parameters a run trains, drawn from the seed or taken from `--init` (the tuned
/// blocks from the ImageNet backbone when `--init` has none), held in a VarMap for saving
/// and resuming: the head, and the backbone's coarsest stage when `config` tunes it.
fn build_head(
    cfg: &DetectorTraining,
    backbone: &Backbone,
    config: &DetectorConfig,
    in_channels: &[usize],
    init: Option<&NamedTensors>,
) -> Result<(VarMap, DetectorHead, TunedBlocks)> {
    let varmap = VarMap::new();
    let mut init_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let stage = {
        let data = varmap.data();
        let mut blocks = Vec::new();
        for &i in &config.tuned_blocks {
            let imagenet = backbone.folded_block(i)?;
            let prefix = tuned_block_prefix(i);
            let imagenet_tensors: std::collections::HashMap<String, Tensor> = imagenet.tensors(&prefix).into_iter().collect();
            let block = FoldedBlock::read(&imagenet.config, &prefix, &mut |name, shape| {
                let value = match init {
                    Some(t) if t.contains(name) => t.get(name, shape)?,
                    _ => imagenet_tensors[name].to_device(&cfg.device)?,
                };
                let var = Var::from_tensor(&value)?;
                let t = var.as_tensor().clone();
                data.lock().expect("varmap lock").insert(name.to_string(), var);
                Ok(t)
            })?;
            blocks.push((i, block));
        }
        blocks
    };
    let head = {
        let data = varmap.data();
        DetectorHead::build(config, in_channels, &mut |name, shape, param_init| {
            // A class tower missing from `--init` starts as a copy of its shared tower, so
            // the run begins from the earlier head's very outputs.
            let copied = name.strip_prefix("class_").filter(|_| name.starts_with("class_tower."));
            let value = match init {
                Some(t) if t.contains(name) => t.get(name, shape)?,
                Some(t) if copied.is_some_and(|n| t.contains(n)) => t.get(copied.expect("checked"), shape)?,
                _ => init_tensor(shape, &param_init, &mut init_rng, &cfg.device)?,
            };
            let var = Var::from_tensor(&value)?;
            let t = var.as_tensor().clone();
            data.lock().expect("varmap lock").insert(name.to_string(), var);
            Ok(t)
        })?
    };
    Ok((varmap, head, stage))
}
