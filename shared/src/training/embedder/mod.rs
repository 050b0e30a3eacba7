//! Training the match network's head: an embedding that finds the same item across domains
//! and, when the shop lacks it, items of the same kind.
//!
//! The backbone stays frozen (ImageNet EfficientNet-Lite): training it on a 2-core CPU runs
//! at about 1 image/s (`../shared/STACK-NOTES.md` §4). Each crop goes through it once; its
//! 1280×7×7 feature map is pooled twice, by generalised mean with the exponent fixed at
//! [`GEM_P`] (what the head embeds) and by plain averaging (the ImageNet features the head
//! must not forget), and the pooled vectors are cached on disk. The head is then a linear
//! projection to `dim`, L2-normalised, with a linear category head on the embedding, and an
//! epoch takes seconds. Three terms, weighted:
//! - **instances**: symmetric InfoNCE over in-batch negatives: a street garment (annotated
//!   box) against its shop image (same `pair_id` and `style`, the DeepFashion2 rule). The
//!   proxy's shop image is the street garment's own pixels cut out on white, so with
//!   probability `render_share` the shop side is that cut-out *rendered as a catalog photo*
//!   instead (`augment::catalog_render`: real catalog backdrops, scale, perspective, mirror,
//!   light, blur, JPEG): the pair has to be solved by the garment, not by its pixels. CC0
//!   catalog photos add pairs of a consumer-like view against the clean photo;
//! - **categories**: cross-entropy of the category head over the street crops, the shop
//!   side and labelled CC0 catalog photos (labels through the label map), so both domains
//!   meet in one embedding organised by kind of garment;
//! - **ImageNet knowledge**: distillation of the batch's similarity structure from the
//!   (centred) average-pooled backbone features, a KL divergence between row softmaxes.
//!
//! Every epoch is measured on both things a shopper gets, beside the untrained backbone's
//! numbers (the floor): the proxy's top-k and the category precision@10 of the validation
//! street garments against the validation distractors alone (no exact item there), with
//! the embedding alone and with the engine's default ranking (the category head's guess, or
//! its substitute, first).
//!
//! Split (from the data's README): validation = CCP ids with `id % 5 == 1`, training = the
//! rest. The catalog splits by `sender_id` (a sender's shots are often near-duplicates):
//! senders with `sender_id % 5` in {1, 3} give the distractors, the others give labelled
//! training photos and backdrops; instance pairs take one photo per sender so that no batch
//! holds two shots of one item as false negatives.

mod category_stage;
mod data;
mod fit;
mod heads;
mod validation;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

pub use self::category_stage::{Accuracy, CategoryStageReport, CategoryStageTraining, StageEpoch, train_category_stage};
use self::data::{DataCounts, Pooled, Rows, Splits};
use self::fit::{Examples, Fitted, fit};
use self::heads::{Heads, model_version};
use crate::models::Backbone;
use crate::models::embedder::{EmbedderConfig, EmbeddingPart, GarmentEmbedder, l2_normalise};
use crate::training::retrieval::CategoryPrecision;
use crate::training::{Progress, ProgressFn};
use crate::{Error, Result};

/// The GeM exponent. Fixed (the previous head learnt it and ended near 2.9) so that pooled
/// features can be cached and an epoch costs seconds instead of minutes.
pub const GEM_P: f64 = 3.0;

/// Results per query for the category precision (the and the README's k).
pub const PRECISION_K: usize = 10;

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct EmbedderTraining {
    /// DeepFashion2-format consumer-to-shop set (`user/`, `shop/`, `gallery_gt.json`).
    pub data: PathBuf,
    /// CC0 catalog (`catalog.csv` + images): labelled photos, backdrops, augmentation pairs
    /// and distractors.
    pub catalog: Option<PathBuf>,
    /// Backbone weights.
    pub backbone: PathBuf,
    /// Output weights file (the backbone is referenced by its file name, so keep both in one
    /// directory).
    pub out: PathBuf,
    /// Where pooled backbone features are cached between runs.
    pub cache: PathBuf,
    pub epochs: usize,
    pub seed: u64,
    pub dim: usize,
    pub batch: usize,
    pub lr: f64,
    pub temperature: f64,
    /// Catalog photos used as instance pairs (one per sender).
    pub augment_items: usize,
    /// Catalog photos added to the validation gallery.
    pub distractors: usize,
    /// Weight of the category cross-entropy.
    pub category_weight: f64,
    /// Weight of the distillation from the ImageNet features.
    pub distill_weight: f64,
    /// Share of instance pairs whose shop side is the rendered cut-out.
    pub render_share: f64,
    /// Length of the kind part of the embedding (0: one part for everything). The instance
    /// part (`dim - category_dim`) learns only the pairs; the kind part only categories and
    /// the ImageNet structure.
    pub category_dim: usize,
    /// The kind part's share of the cosine similarity (its weight squared).
    pub category_share: f64,
    /// Street photos with image-level tags (`image/`, `tags.json`: ccp-unlabelled): the
    /// detector's boxes whose class the photo is tagged with become labelled crops for the
    /// category term (weak supervision; an untagged class is a wrong box).
    pub unlabelled: Option<PathBuf>,
    /// The detector giving those boxes.
    pub detector: Option<PathBuf>,
    /// Lowest detection score kept as a pseudo-label.
    pub pseudo_min_score: f32,
    /// Calibrates the exact-match threshold: the share of validation queries whose best
    /// wrong match may pass it.
    pub exact_match_false_rate: f64,
    /// Continue from the checkpoint beside `out`.
    pub resume: bool,
    pub device: Device,
}

/// One epoch's validation numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub loss: f64,
    /// Proxy top-k (DeepFashion2 rule, annotated boxes).
    pub top_k: BTreeMap<usize, f64>,
    /// The same in the engine's default order.
    pub ranked_top_k: BTreeMap<usize, f64>,
    /// Category precision@10 against the distractors, embedding alone.
    pub precision: f64,
    /// The same with the default ranking (the category head's guess first).
    pub ranked_precision: f64,
    /// The category head's accuracy on the validation street garments.
    pub category_accuracy: f64,
    pub exact_match_similarity: f32,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingReport {
    /// Top-k of the untrained backbone (average-pooled 1280-d features).
    pub baseline_top_k: BTreeMap<usize, f64>,
    /// Category precision@10 of the untrained backbone, per category and overall.
    pub baseline_precision: CategoryPrecision,
    /// Top-k of the chosen epoch's head, by similarity alone.
    pub top_k: BTreeMap<usize, f64>,
    /// Top-k of the chosen epoch's head in the engine's default order.
    pub ranked_top_k: BTreeMap<usize, f64>,
    /// Category precision@10 of the chosen epoch, embedding alone.
    pub precision: CategoryPrecision,
    /// Category precision@10 of the chosen epoch with the default ranking.
    pub ranked_precision: CategoryPrecision,
    pub category_accuracy: f64,
    /// The calibrated exact-match threshold (see `exact_match_threshold`).
    pub exact_match_similarity: f32,
    pub best_epoch: usize,
    pub epochs: Vec<EpochMetrics>,
    pub categories: Vec<String>,
    pub train_pairs: usize,
    pub rendered_pairs: usize,
    pub augment_pairs: usize,
    pub labelled_catalog: usize,
    /// Pseudo-labelled street crops from tagged photos.
    pub pseudo_labelled: usize,
    pub val_queries: usize,
    pub gallery: usize,
    pub distractors: usize,
    pub feature_seconds: f64,
    pub train_seconds: f64,
}

/// Trains the heads and writes the best epoch's weights to `cfg.out`.
pub fn train_embedder(cfg: &EmbedderTraining, progress: ProgressFn) -> Result<TrainingReport> {
    let parts = embedding_parts(cfg)?;
    let started = Instant::now();
    // The checkpoint goes beside the output from the first epoch on.
    if let Some(dir) = cfg.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let backbone = Backbone::load(&cfg.backbone, &cfg.device)?;
    let splits = Splits::read(cfg, progress)?;
    let (table, rows) = splits.lay_out(cfg);
    let backbone_hash = blake3::hash(&std::fs::read(&cfg.backbone).map_err(|e| Error::io(&cfg.backbone, e))?);
    let pooled = table.pool(&backbone, &backbone_hash, &cfg.cache, &cfg.device, progress)?;
    let feature_seconds = started.elapsed().as_secs_f64();

    let (pairs, labelled) = (splits.instance_pairs(&rows)?, splits.labelled(&rows)?);
    let validation = splits.validation(&rows);
    let (baseline_top_k, baseline_precision) = validation.baseline(&pooled)?;
    progress(Progress::Message(format!(
        "untrained backbone (average pool, {}-d): {}; category precision@{PRECISION_K} {:.3}",
        backbone.feature_dim(),
        fmt_top_k(&baseline_top_k),
        baseline_precision.mean
    )));

    let teacher = distillation_teacher(&pooled, &rows, &cfg.device)?;
    let features = pooled.gem.to_device(&cfg.device)?;
    let varmap = VarMap::new();
    let heads = Heads::new(&varmap, cfg.seed, backbone.feature_dim(), cfg.dim, splits.names.len(), parts.clone(), &cfg.device)?;
    let train_started = Instant::now();
    let examples = Examples { features: &features, teacher: &teacher, pairs: &pairs, labelled: &labelled, validation: &validation, pooled: &pooled, names: &splits.names };
    let Fitted { epochs, best_epoch, best } = fit(cfg, varmap, heads, &examples, progress)?;
    let train_seconds = train_started.elapsed().as_secs_f64();

    let m = validation.measure(&pooled, &best.embedding, &best.categories, &splits.names, cfg.exact_match_false_rate, &cfg.device)?;
    let DataCounts { train_pairs, rendered_pairs, augment_pairs, labelled_catalog, pseudo_labelled } = splits.counts(&rows);
    let report = TrainingReport {
        baseline_top_k,
        baseline_precision,
        top_k: m.top_k,
        ranked_top_k: m.ranked_top_k,
        precision: m.precision,
        ranked_precision: m.ranked_precision,
        category_accuracy: m.accuracy,
        exact_match_similarity: m.exact_above,
        best_epoch,
        epochs,
        categories: splits.names.clone(),
        train_pairs,
        rendered_pairs,
        augment_pairs,
        labelled_catalog,
        pseudo_labelled,
        val_queries: validation.queries.len(),
        gallery: validation.gallery.len(),
        distractors: validation.distractors.len(),
        feature_seconds,
        train_seconds,
    };
    let config = embedder_config(cfg, &backbone, &best, splits.names, parts, &report)?;
    GarmentEmbedder::save_head(&cfg.out, &config, &best.embedding, Some(&best.categories))?;
    Ok(report)
}

/// The embedding's parts (none: one part) from the settings, which are checked first so
/// that a bad setting fails before any feature is pooled.
fn embedding_parts(cfg: &EmbedderTraining) -> Result<Vec<EmbeddingPart>> {
    if cfg.epochs == 0 || cfg.batch < 2 || cfg.dim == 0 {
        return Err(Error::InvalidSetting { name: "training", reason: "need epochs ≥ 1, batch ≥ 2 and dim ≥ 1".into() });
    }
    if cfg.category_dim >= cfg.dim || !(0.0..=1.0).contains(&cfg.category_share) {
        return Err(Error::InvalidSetting { name: "category_dim", reason: format!("need category_dim < dim ({}) and a share in [0, 1]", cfg.dim) });
    }
    Ok(match cfg.category_dim {
        0 => Vec::new(),
        kind => {
            vec![EmbeddingPart { len: cfg.dim - kind, weight: (1.0 - cfg.category_share).sqrt() as f32 }, EmbeddingPart { len: kind, weight: cfg.category_share.sqrt() as f32 }]
        }
    })
}

/// The distillation teacher: average-pooled features centred on the training mean (raw
/// ReLU6 features are all positive, so their cosines crowd near 1).
fn distillation_teacher(pooled: &Pooled, rows: &Rows, device: &Device) -> Result<candle_core::Tensor> {
    let train_rows = rows.street..rows.val;
    let mean = pooled.avg.narrow(0, train_rows.start, train_rows.len())?.mean_keepdim(0)?;
    Ok(l2_normalise(&pooled.avg.broadcast_sub(&mean)?)?.to_device(device)?)
}

/// The weights file's description of the trained head, with the recipe and its report.
fn embedder_config(
    cfg: &EmbedderTraining,
    backbone: &Backbone,
    best: &Heads,
    categories: Vec<String>,
    parts: Vec<EmbeddingPart>,
    report: &TrainingReport,
) -> Result<EmbedderConfig> {
    let backbone_file = cfg.backbone.file_name().and_then(|f| f.to_str()).unwrap_or("efficientnet-lite0.safetensors").to_string();
    Ok(EmbedderConfig {
        version: model_version(&backbone_file, &best.embedding, &best.categories)?,
        backbone: backbone_file,
        dim: cfg.dim,
        preprocess: backbone.embedding_preprocess(),
        training: serde_json::json!({
            "data": cfg.data, "catalog": cfg.catalog, "epochs": cfg.epochs, "seed": cfg.seed, "batch": cfg.batch,
            "lr": cfg.lr, "temperature": cfg.temperature, "augment_items": cfg.augment_items,
            "distractors": cfg.distractors, "category_weight": cfg.category_weight,
            "distill_weight": cfg.distill_weight, "render_share": cfg.render_share,
            "category_dim": cfg.category_dim, "category_share": cfg.category_share,
            "unlabelled": cfg.unlabelled, "detector": cfg.detector, "pseudo_min_score": cfg.pseudo_min_score,
            "exact_match_false_rate": cfg.exact_match_false_rate, "report": report,
        }),
        categories,
        parts,
        exact_match_similarity: Some(report.exact_match_similarity),
        category_stage: Vec::new(),
    })
}

/// `top-1 0.812, top-5 ...` for messages.
pub fn fmt_top_k(acc: &BTreeMap<usize, f64>) -> String {
    acc.iter().map(|(k, v)| format!("top-{k} {v:.3}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::heads::{info_nce, similarity_distillation};
    use super::*;

    #[test]
    fn distillation_is_zero_for_the_teacher_itself_and_positive_otherwise() {
        let dev = Device::Cpu;
        let t = l2_normalise(&Tensor::new(&[[1f32, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.4, 1.0], [0.7, 0.7, 0.0]], &dev).unwrap()).unwrap();
        let s = l2_normalise(&Tensor::new(&[[0f32, 0.2, 1.0], [1.0, 0.0, 0.3], [0.5, 0.4, 0.0], [0.0, 0.7, 0.7]], &dev).unwrap()).unwrap();
        let same = similarity_distillation(&t, &t, 0.1).unwrap().to_scalar::<f32>().unwrap();
        let other = similarity_distillation(&s, &t, 0.1).unwrap().to_scalar::<f32>().unwrap();
        assert!(same.abs() < 1e-5, "{same}");
        assert!(other > 0.05, "{other}");
    }

    #[test]
    fn info_nce_prefers_aligned_pairs() {
        let dev = Device::Cpu;
        let a = l2_normalise(&Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap()).unwrap();
        let swapped = l2_normalise(&Tensor::new(&[[0f32, 1.0], [1.0, 0.0]], &dev).unwrap()).unwrap();
        let aligned = info_nce(&a, &a, 0.1).unwrap().to_scalar::<f32>().unwrap();
        let crossed = info_nce(&a, &swapped, 0.1).unwrap().to_scalar::<f32>().unwrap();
        assert!(aligned < 0.01 && crossed > 5.0, "{aligned} {crossed}");
    }
}
