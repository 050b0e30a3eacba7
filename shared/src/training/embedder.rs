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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::checkpoint::Checkpoint;
use super::retrieval::{CategoryPrecision, category_precision, ranked_top_k_accuracy, top_k_accuracy};
use super::{CatalogPhoto, Progress, ProgressFn, augment, catalog_photos, is_validation_sender};
use crate::catalog::related::preferred_category;
use crate::datasets::{Df2Annotation, Df2Folder, read_gallery_gt};
use crate::geometry::BBox;
use crate::models::detector::ParamInit;
use crate::models::efficientnet_lite::{EfficientNetLite, FEATURE_DIM};
use crate::models::embedder::{CategoryHead, EmbedderConfig, EmbeddingHead, EmbeddingPart, GarmentEmbedder, gem, l2_normalise};
use crate::vision::{DecodeLimits, Preprocess, decode_image};
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

/// Version of the augmentation code, part of the feature cache key: bump it whenever
/// `augment.rs` changes what a seed produces, or stale cached views would be reused.
const AUGMENT_VERSION: u32 = 3;

/// One crop to run through the backbone.
#[derive(Debug, Clone, PartialEq, Serialize)]
enum CropSpec {
    Box { image: PathBuf, bbox: Option<[f32; 4]> },
    ConsumerView { image: PathBuf, seed: u64, augment_version: u32 },
    CatalogRender { image: PathBuf, bbox: [f32; 4], backdrop: PathBuf, seed: u64, augment_version: u32 },
}

impl CropSpec {
    fn image(&self) -> &Path {
        match self {
            CropSpec::Box { image, .. } | CropSpec::ConsumerView { image, .. } | CropSpec::CatalogRender { image, .. } => image,
        }
    }
}

/// A street garment with its shop image.
struct CcpPair {
    pair_id: u64,
    style: u32,
    category: String,
    consumer: CropSpec,
    shop: CropSpec,
    shop_image: PathBuf,
    shop_box: [f32; 4],
}

/// A labelled garment crop without a shop image (style 0 or no gallery entry).
struct StreetCrop {
    pair_id: u64,
    category: String,
    spec: CropSpec,
}

fn ccp_pairs(data: &Path) -> Result<(Vec<CcpPair>, Vec<StreetCrop>, Vec<(u64, u32, CropSpec)>)> {
    let user = Df2Folder::open(data.join("user"))?;
    let shop = Df2Folder::open(data.join("shop"))?;
    let gallery = read_gallery_gt(&data.join("gallery_gt.json"))?;
    let mut shop_of: HashMap<(u64, u32), (PathBuf, [f32; 4])> = HashMap::new();
    let mut shop_items = Vec::new();
    for g in &gallery {
        let image = shop
            .image(g.gallery_image_id)
            .ok_or_else(|| Error::InvalidDatasetLayout { path: data.join("gallery_gt.json"), reason: format!("gallery image {} has no file", g.gallery_image_id) })?;
        shop_of.insert((g.pair_id, g.style), (image.image.clone(), g.bbox));
        shop_items.push((g.pair_id, g.style, CropSpec::Box { image: image.image.clone(), bbox: Some(g.bbox) }));
    }
    let mut pairs = Vec::new();
    let mut unpaired = Vec::new();
    for entry in user.images() {
        let anno = Df2Annotation::read(&entry.annotation)?;
        for item in &anno.items {
            let consumer = CropSpec::Box { image: entry.image.clone(), bbox: Some(item.bbox.to_array()) };
            match shop_of.get(&(anno.pair_id, item.style)).filter(|_| item.style > 0) {
                Some((image, bbox)) => pairs.push(CcpPair {
                    pair_id: anno.pair_id,
                    style: item.style,
                    category: item.category_name.clone(),
                    consumer,
                    shop: CropSpec::Box { image: image.clone(), bbox: Some(*bbox) },
                    shop_image: image.clone(),
                    shop_box: *bbox,
                }),
                None => unpaired.push(StreetCrop { pair_id: anno.pair_id, category: item.category_name.clone(), spec: consumer }),
            }
        }
    }
    Ok((pairs, unpaired, shop_items))
}

/// A pseudo-labelled street crop: a detection whose class the photo's tags confirm.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PseudoBox {
    image: PathBuf,
    bbox: [f32; 4],
    category: String,
}

/// Detects garments in the tagged photos of `folder` and keeps those whose class is tagged;
/// cached under a key of the detector's bytes, the tags and the threshold.
fn pseudo_boxes(folder: &Path, detector: &Path, min_score: f32, cache: &Path, device: &Device, progress: ProgressFn) -> Result<Vec<PseudoBox>> {
    let tags_path = folder.join("tags.json");
    let tags_bytes = std::fs::read(&tags_path).map_err(|e| Error::io(&tags_path, e))?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&std::fs::read(detector).map_err(|e| Error::io(detector, e))?);
    hasher.update(&tags_bytes);
    hasher.update(&min_score.to_le_bytes());
    let file = cache.join(format!("pseudo-boxes-{}.json", &hasher.finalize().to_hex()[..16]));
    if let Ok(bytes) = std::fs::read(&file)
        && let Ok(boxes) = serde_json::from_slice::<Vec<PseudoBox>>(&bytes)
    {
        progress(Progress::Message(format!("{} cached pseudo-labelled crops from {}", boxes.len(), file.display())));
        return Ok(boxes);
    }
    #[derive(Deserialize)]
    struct Tags {
        classes: Vec<String>,
    }
    let tags: BTreeMap<String, Tags> = serde_json::from_slice(&tags_bytes).map_err(|e| Error::MalformedDataset { file: tags_path.clone(), field: "(document)".into(), reason: e.to_string() })?;
    let detector = crate::models::detector::GarmentDetector::load(detector, device)?;
    progress(Progress::Stage { name: "pseudo-labels: detecting garments in tagged photos".into(), total: tags.len() as u64 });
    let mut boxes = Vec::new();
    for (id, tags) in &tags {
        let image_path = folder.join("image").join(format!("{id}.jpg"));
        progress(Progress::Advance(1));
        // A missing or unreadable photo only means fewer pseudo-labels.
        let Ok(image) = read_image(&image_path) else { continue };
        for d in detector.detect(&image)? {
            if d.score >= min_score && tags.classes.contains(&d.category) {
                boxes.push(PseudoBox { image: image_path.clone(), bbox: d.bbox.to_array(), category: d.category });
            }
        }
    }
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    std::fs::write(&file, serde_json::to_vec(&boxes).expect("boxes serialise")).map_err(|e| Error::io(&file, e))?;
    Ok(boxes)
}

/// Pooled backbone features of a set of crops: GeM (p = [`GEM_P`]) and average, `[n, 1280]`
/// each, f32 on the CPU.
struct Pooled {
    gem: Tensor,
    avg: Tensor,
}

/// Pools `specs` through the backbone, cached in `cache` under a key of the backbone file's
/// hash and the specs.
fn pooled_features(backbone: &EfficientNetLite, backbone_hash: &blake3::Hash, specs: &[CropSpec], name: &str, cache: &Path, device: &Device, progress: ProgressFn) -> Result<Pooled> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(backbone_hash.as_bytes());
    hasher.update(&GEM_P.to_le_bytes());
    hasher.update(serde_json::to_string(specs).expect("specs serialise").as_bytes());
    let key = &hasher.finalize().to_hex()[..16];
    let file = cache.join(format!("pooled-{name}-{key}.safetensors"));
    if let Ok(mut cached) = candle_core::safetensors::load(&file, &Device::Cpu)
        && let (Some(gem), Some(avg)) = (cached.remove("gem"), cached.remove("avg"))
    {
        progress(Progress::Message(format!("{name}: {} cached pooled features from {}", specs.len(), file.display())));
        return Ok(Pooled { gem, avg });
    }
    progress(Progress::Stage { name: format!("backbone features: {name}"), total: specs.len() as u64 });
    let preprocess = Preprocess::LITE0;
    let p = Tensor::new(&[GEM_P as f32], device)?;
    let (mut gems, mut avgs) = (Vec::new(), Vec::new());
    let mut decoded: Option<(PathBuf, image::RgbImage)> = None;
    for chunk in specs.chunks(8) {
        let mut inputs = Vec::with_capacity(chunk.len());
        for spec in chunk {
            if decoded.as_ref().map(|(p, _)| p.as_path()) != Some(spec.image()) {
                decoded = Some((spec.image().to_path_buf(), read_image(spec.image())?));
            }
            let image = &decoded.as_ref().expect("just decoded").1;
            let input = match spec {
                CropSpec::Box { bbox, .. } => preprocess.crop_to_tensor(image, bbox.map(|b| BBox::new(b[0], b[1], b[2], b[3])), &Device::Cpu)?,
                CropSpec::ConsumerView { seed, .. } => {
                    let view = augment::consumer_view(image, &mut ChaCha8Rng::seed_from_u64(*seed));
                    preprocess.crop_to_tensor(&view, None, &Device::Cpu)?
                }
                CropSpec::CatalogRender { bbox, backdrop, seed, .. } => {
                    let cutout = preprocess.crop_letterboxed(image, Some(BBox::new(bbox[0], bbox[1], bbox[2], bbox[3])))?;
                    let view = augment::catalog_render(&cutout, &read_image(backdrop)?, &mut ChaCha8Rng::seed_from_u64(*seed));
                    preprocess.crop_to_tensor(&view, None, &Device::Cpu)?
                }
            };
            inputs.push(input);
        }
        let batch = Tensor::stack(&inputs, 0)?.to_device(device)?;
        let map = crate::models::on_pool(|| backbone.feature_map(&batch))?;
        gems.push(gem(&map, &p)?.to_device(&Device::Cpu)?);
        avgs.push(map.mean(D::Minus1)?.mean(D::Minus1)?.to_device(&Device::Cpu)?);
        progress(Progress::Advance(chunk.len() as u64));
    }
    let pooled = Pooled { gem: Tensor::cat(&gems, 0)?, avg: Tensor::cat(&avgs, 0)? };
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    candle_core::safetensors::save(&HashMap::from([("gem".to_string(), pooled.gem.clone()), ("avg".to_string(), pooled.avg.clone())]), &file)?;
    Ok(pooled)
}

fn read_image(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, DecodeLimits::default())
}

/// Row-major unit vectors of the head's embeddings of `pooled` (GeM features).
fn embed_rows(pooled: &Tensor, head: &EmbeddingHead, device: &Device) -> Result<Vec<f32>> {
    Ok(head.project(&pooled.to_device(device)?)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Row-major unit vectors of average-pooled features: the untrained backbone's embedding.
fn unit_rows(avg: &Tensor) -> Result<Vec<f32>> {
    Ok(l2_normalise(avg)?.flatten_all()?.to_vec1::<f32>()?)
}

fn model_version(head: &EmbeddingHead, categories: &CategoryHead) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    for t in [&head.p, &head.weight, &head.bias, &categories.weight, &categories.bias] {
        for v in t.flatten_all()?.to_vec1::<f32>()? {
            hasher.update(&v.to_le_bytes());
        }
    }
    Ok(format!("embedder-lite0-gem-{}", &hasher.finalize().to_hex()[..12]))
}

/// All crops of a run, pooled into one matrix; groups are row ranges.
#[derive(Default)]
struct CropTable {
    specs: Vec<(String, Vec<CropSpec>)>,
}

impl CropTable {
    /// Adds a group; returns the global row of its first crop.
    fn group(&mut self, name: &str, specs: Vec<CropSpec>) -> usize {
        let start = self.specs.iter().map(|(_, s)| s.len()).sum();
        self.specs.push((name.to_string(), specs));
        start
    }

    fn pool(&self, backbone: &EfficientNetLite, backbone_hash: &blake3::Hash, cache: &Path, device: &Device, progress: ProgressFn) -> Result<Pooled> {
        let (mut gems, mut avgs) = (Vec::new(), Vec::new());
        for (name, specs) in &self.specs {
            if specs.is_empty() {
                continue;
            }
            let p = pooled_features(backbone, backbone_hash, specs, name, cache, device, progress)?;
            gems.push(p.gem);
            avgs.push(p.avg);
        }
        Ok(Pooled { gem: Tensor::cat(&gems, 0)?, avg: Tensor::cat(&avgs, 0)? })
    }
}

/// An instance pair by global rows; `shop_render` is the rendered alternative of `shop`.
#[derive(Debug, Clone, Copy)]
struct Pair {
    consumer: u32,
    shop: u32,
    shop_render: Option<u32>,
    category: u32,
}

/// The validation sets by global rows.
struct Validation {
    queries: Vec<u32>,
    query_categories: Vec<usize>,
    gallery: Vec<u32>,
    /// Category of each gallery row (the validation shop images take their street
    /// garment's).
    gallery_categories: Vec<usize>,
    correct: Vec<Vec<u32>>,
    distractors: Vec<u32>,
    distractor_categories: Vec<usize>,
}

impl Validation {
    fn rows(pooled: &Tensor, rows: &[u32]) -> Result<Tensor> {
        Ok(pooled.index_select(&Tensor::new(rows, &Device::Cpu)?, 0)?)
    }

    /// The untrained backbone's numbers: the floor.
    fn baseline(&self, pooled: &Pooled) -> Result<(BTreeMap<usize, f64>, CategoryPrecision)> {
        let queries = unit_rows(&Self::rows(&pooled.avg, &self.queries)?)?;
        let gallery = unit_rows(&Self::rows(&pooled.avg, &self.gallery)?)?;
        let distractors = unit_rows(&Self::rows(&pooled.avg, &self.distractors)?)?;
        Ok((
            top_k_accuracy(&queries, &gallery, FEATURE_DIM, &self.correct),
            category_precision(&queries, &self.query_categories, &distractors, &self.distractor_categories, FEATURE_DIM, PRECISION_K, None, None),
        ))
    }

    /// Everything an epoch is judged by; the exact-match threshold is calibrated here.
    fn measure(&self, pooled: &Pooled, head: &EmbeddingHead, categories: &CategoryHead, names: &[String], false_rate: f64, device: &Device) -> Result<Measured> {
        let dim = head.weight.dim(0)?;
        let query_t = head.project(&Self::rows(&pooled.gem, &self.queries)?.to_device(device)?)?;
        let queries = query_t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let gallery = embed_rows(&Self::rows(&pooled.gem, &self.gallery)?, head, device)?;
        let distractors = embed_rows(&Self::rows(&pooled.gem, &self.distractors)?, head, device)?;
        let guesses: Vec<usize> = categories.logits(&query_t)?.argmax(D::Minus1)?.to_device(&Device::Cpu)?.to_vec1::<u32>()?.into_iter().map(|c| c as usize).collect();
        let accuracy = guesses.iter().zip(&self.query_categories).filter(|(g, t)| g == t).count() as f64 / guesses.len().max(1) as f64;
        let index_of: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let preferred_in = |present: &[usize]| -> Vec<Option<usize>> {
            let present: HashSet<usize> = present.iter().copied().collect();
            guesses.iter().map(|&g| preferred_category(&names[g], |c| index_of.get(c).is_some_and(|i| present.contains(i))).map(|(c, _)| index_of[c])).collect()
        };
        let (in_distractors, in_gallery) = (preferred_in(&self.distractor_categories), preferred_in(&self.gallery_categories));
        let exact_above = exact_match_threshold(&queries, &gallery, dim, &self.correct, false_rate);
        Ok(Measured {
            top_k: top_k_accuracy(&queries, &gallery, dim, &self.correct),
            ranked_top_k: ranked_top_k_accuracy(&queries, &gallery, dim, &self.correct, &self.gallery_categories, &in_gallery, Some(exact_above)),
            strict_top_k: ranked_top_k_accuracy(&queries, &gallery, dim, &self.correct, &self.gallery_categories, &in_gallery, None),
            precision: category_precision(&queries, &self.query_categories, &distractors, &self.distractor_categories, dim, PRECISION_K, None, None),
            ranked_precision: category_precision(&queries, &self.query_categories, &distractors, &self.distractor_categories, dim, PRECISION_K, Some(&in_distractors), Some(exact_above)),
            accuracy,
            exact_above,
        })
    }
}

/// One head's validation numbers.
struct Measured {
    /// Proxy top-k by similarity alone.
    top_k: BTreeMap<usize, f64>,
    /// Proxy top-k in the engine's default order (with the exact-match exception).
    ranked_top_k: BTreeMap<usize, f64>,
    /// Proxy top-k with the category strictly first (no exception), for the record.
    strict_top_k: BTreeMap<usize, f64>,
    precision: CategoryPrecision,
    ranked_precision: CategoryPrecision,
    accuracy: f64,
    exact_above: f32,
}

/// The cosine above which a result is taken for the very item and kept in front whatever its
/// category: the (1 − `false_rate`) quantile of each query's best similarity to a gallery
/// entry that is *not* its item, so that a wrong item jumps the category order for about
/// that share of queries.
fn exact_match_threshold(queries: &[f32], gallery: &[f32], dim: usize, correct: &[Vec<u32>], false_rate: f64) -> f32 {
    let mut best_wrong: Vec<f32> = correct
        .iter()
        .enumerate()
        .map(|(q, right)| {
            let query = &queries[q * dim..(q + 1) * dim];
            let ranked = crate::ann::exact::top_k(gallery, dim, query, right.len() + 1, None);
            ranked.into_iter().find(|(row, _)| !right.contains(row)).map_or(-1.0, |(_, s)| s)
        })
        .collect();
    if best_wrong.is_empty() {
        return 1.0;
    }
    best_wrong.sort_by(f32::total_cmp);
    let at = ((best_wrong.len() as f64 * (1.0 - false_rate)).ceil() as usize).min(best_wrong.len() - 1);
    best_wrong[at]
}

/// The trainable variables.
struct Heads {
    embedding: EmbeddingHead,
    categories: CategoryHead,
}

impl Heads {
    /// Variables drawn from `seed` (candle's CPU generator cannot be seeded) and held in
    /// `varmap` for the optimiser, saving and resuming.
    fn new(varmap: &VarMap, seed: u64, dim: usize, classes: usize, parts: Vec<EmbeddingPart>, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut var = |name: &str, shape: &[usize], init: ParamInit| -> Result<Tensor> {
            let v = candle_core::Var::from_tensor(&super::detector::init_tensor(shape, &init, &mut rng, device)?)?;
            let t = v.as_tensor().clone();
            varmap.data().lock().expect("varmap lock").insert(name.to_string(), v);
            Ok(t)
        };
        Ok(Self {
            embedding: EmbeddingHead {
                // Fixed: see GEM_P; stored so the weights file keeps its format.
                p: Tensor::new(&[GEM_P as f32], device)?,
                weight: var("proj.weight", &[dim, FEATURE_DIM], ParamInit::Normal((1.0 / FEATURE_DIM as f64).sqrt()))?,
                bias: var("proj.bias", &[dim], ParamInit::Const(0.0))?,
                parts,
            },
            categories: CategoryHead { weight: var("cls.weight", &[classes, dim], ParamInit::Normal(1.0))?, bias: var("cls.bias", &[classes], ParamInit::Const(0.0))? },
        })
    }

    /// What each loss sees of a batch of pooled features: the instance part (InfoNCE), the
    /// embedding as served (the category head, with the instance part detached so that
    /// categories shape only the kind part) and the kind part (distillation). With one part
    /// all three are the embedding.
    fn training_views(&self, pooled: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let head = &self.embedding;
        let projected = pooled.matmul(&head.weight.t()?)?.broadcast_add(&head.bias)?;
        let [instance, kind] = head.parts.as_slice() else {
            let e = l2_normalise(&projected)?;
            return Ok((e.clone(), e.clone(), e));
        };
        let inst = l2_normalise(&projected.narrow(1, 0, instance.len)?)?;
        let kinds = l2_normalise(&projected.narrow(1, instance.len, kind.len)?)?;
        let served = Tensor::cat(&[(inst.detach() * instance.weight as f64)?, (&kinds * kind.weight as f64)?], 1)?;
        Ok((inst, served, kinds))
    }

    fn frozen_copy(&self) -> Result<Self> {
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.detach().copy()?) };
        Ok(Self {
            embedding: EmbeddingHead { p: c(&self.embedding.p)?, weight: c(&self.embedding.weight)?, bias: c(&self.embedding.bias)?, parts: self.embedding.parts.clone() },
            categories: CategoryHead { weight: c(&self.categories.weight)?, bias: c(&self.categories.bias)? },
        })
    }
}

/// Symmetric InfoNCE of row-aligned unit embeddings: row i of `a` matches row i of `b`.
fn info_nce(a: &Tensor, b: &Tensor, temperature: f64) -> Result<Tensor> {
    let logits = (a.matmul(&b.t()?)? / temperature)?;
    let labels = Tensor::arange(0u32, a.dim(0)? as u32, a.device())?;
    Ok(((candle_nn::loss::cross_entropy(&logits, &labels)? + candle_nn::loss::cross_entropy(&logits.t()?, &labels)?)? / 2.0)?)
}

/// KL(teacher ‖ student) of the row softmaxes of in-batch similarities (self-similarity
/// masked): the student keeps which garments the ImageNet features find alike.
fn similarity_distillation(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let n = student.dim(0)?;
    let mask = (Tensor::eye(n, DType::F32, student.device())? * 1e4)?;
    let s = ((student.matmul(&student.t()?)? / temperature)? - &mask)?;
    let t = ((teacher.matmul(&teacher.t()?)? / temperature)? - &mask)?;
    let log_s = candle_nn::ops::log_softmax(&s, D::Minus1)?;
    let log_t = candle_nn::ops::log_softmax(&t, D::Minus1)?;
    Ok((log_t.exp()? * (log_t - log_s)?)?.sum(D::Minus1)?.mean_all()?)
}

/// Trains the heads and writes the best epoch's weights to `cfg.out`.
pub fn train_embedder(cfg: &EmbedderTraining, progress: ProgressFn) -> Result<TrainingReport> {
    if cfg.epochs == 0 || cfg.batch < 2 || cfg.dim == 0 {
        return Err(Error::InvalidSetting { name: "training", reason: "need epochs ≥ 1, batch ≥ 2 and dim ≥ 1".into() });
    }
    let started = Instant::now();
    // The checkpoint goes beside the output from the first epoch on.
    if let Some(dir) = cfg.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let backbone = EfficientNetLite::load(&cfg.backbone, &cfg.device)?;
    let (pairs, unpaired, shop_items) = ccp_pairs(&cfg.data)?;
    let is_val = |pair_id: u64| pair_id % 5 == 1;
    let (val_pairs, train_pairs): (Vec<&CcpPair>, Vec<&CcpPair>) = pairs.iter().partition(|p| is_val(p.pair_id));
    let train_unpaired: Vec<&StreetCrop> = unpaired.iter().filter(|c| !is_val(c.pair_id)).collect();

    // Catalog: distractor senders for validation, the others for training.
    let mut photos = match &cfg.catalog {
        Some(catalog) => catalog_photos(catalog)?,
        None => Vec::new(),
    };
    photos.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
    let (val_photos, train_photos): (Vec<&CatalogPhoto>, Vec<&CatalogPhoto>) = photos.iter().partition(|p| is_validation_sender(p.sender));
    let distractor_photos: Vec<&CatalogPhoto> = val_photos.into_iter().take(cfg.distractors).collect();
    let mut seen = HashSet::new();
    let aug_photos: Vec<&CatalogPhoto> = train_photos.iter().copied().filter(|p| seen.insert(p.sender)).take(cfg.augment_items).collect();

    let pseudo = match (&cfg.unlabelled, &cfg.detector) {
        (Some(folder), Some(detector)) => pseudo_boxes(folder, detector, cfg.pseudo_min_score, &cfg.cache, &cfg.device, progress)?,
        (Some(_), None) => return Err(Error::InvalidSetting { name: "unlabelled", reason: "pseudo-labels need a detector".into() }),
        _ => Vec::new(),
    };

    // Category vocabulary: what the training data labels.
    let names: Vec<String> = train_pairs
        .iter()
        .map(|p| p.category.clone())
        .chain(train_unpaired.iter().map(|c| c.category.clone()))
        .chain(train_photos.iter().map(|p| p.category.clone()))
        .chain(pseudo.iter().map(|p| p.category.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let class_of = |name: &str| names.iter().position(|n| n == name);

    let mut table = CropTable::default();
    let street0 = table.group("train-street", train_pairs.iter().map(|p| p.consumer.clone()).collect());
    let shop0 = table.group("train-shop", train_pairs.iter().map(|p| p.shop.clone()).collect());
    let render0 = if train_photos.is_empty() || cfg.render_share <= 0.0 {
        None
    } else {
        let specs = train_pairs
            .iter()
            .enumerate()
            .map(|(i, p)| CropSpec::CatalogRender {
                image: p.shop_image.clone(),
                bbox: p.shop_box,
                backdrop: train_photos[i % train_photos.len()].image.clone(),
                seed: cfg.seed ^ (0x5eed_0000 + i as u64),
                augment_version: AUGMENT_VERSION,
            })
            .collect();
        Some(table.group("train-shop-render", specs))
    };
    let unpaired0 = table.group("train-street-unpaired", train_unpaired.iter().map(|c| c.spec.clone()).collect());
    let catalog0 = table.group("train-catalog", train_photos.iter().map(|p| CropSpec::Box { image: p.image.clone(), bbox: None }).collect());
    let views0 = table.group(
        "train-catalog-views",
        aug_photos.iter().enumerate().map(|(i, p)| CropSpec::ConsumerView { image: p.image.clone(), seed: cfg.seed ^ (i as u64 + 1), augment_version: AUGMENT_VERSION }).collect(),
    );
    let pseudo0 = table.group("train-pseudo", pseudo.iter().map(|p| CropSpec::Box { image: p.image.clone(), bbox: Some(p.bbox) }).collect());
    let val0 = table.group("val-street", val_pairs.iter().map(|p| p.consumer.clone()).collect());
    let val_shop: Vec<&(u64, u32, CropSpec)> = shop_items.iter().filter(|(pair_id, _, _)| is_val(*pair_id)).collect();
    let gallery0 = table.group("val-shop", val_shop.iter().map(|(_, _, s)| s.clone()).collect());
    let distractor0 = table.group("val-distractors", distractor_photos.iter().map(|p| CropSpec::Box { image: p.image.clone(), bbox: None }).collect());

    let backbone_hash = blake3::hash(&std::fs::read(&cfg.backbone).map_err(|e| Error::io(&cfg.backbone, e))?);
    let pooled = table.pool(&backbone, &backbone_hash, &cfg.cache, &cfg.device, progress)?;
    let feature_seconds = started.elapsed().as_secs_f64();

    // Instance pairs and labelled crops, by global row.
    let unknown = |name: &str| Error::InvalidSetting { name: "categories", reason: format!("category {name:?} is not in the training vocabulary") };
    let mut instance_pairs = Vec::new();
    for (i, p) in train_pairs.iter().enumerate() {
        let category = class_of(&p.category).ok_or_else(|| unknown(&p.category))? as u32;
        instance_pairs.push(Pair { consumer: (street0 + i) as u32, shop: (shop0 + i) as u32, shop_render: render0.map(|r| (r + i) as u32), category });
    }
    let clean_row: HashMap<&Path, usize> = train_photos.iter().enumerate().map(|(i, p)| (p.image.as_path(), catalog0 + i)).collect();
    for (i, p) in aug_photos.iter().enumerate() {
        let category = class_of(&p.category).ok_or_else(|| unknown(&p.category))? as u32;
        instance_pairs.push(Pair { consumer: (views0 + i) as u32, shop: clean_row[p.image.as_path()] as u32, shop_render: None, category });
    }
    let mut labelled: Vec<(u32, u32)> = Vec::new();
    for (i, c) in train_unpaired.iter().enumerate() {
        labelled.push(((unpaired0 + i) as u32, class_of(&c.category).ok_or_else(|| unknown(&c.category))? as u32));
    }
    for (i, p) in train_photos.iter().enumerate() {
        labelled.push(((catalog0 + i) as u32, class_of(&p.category).ok_or_else(|| unknown(&p.category))? as u32));
    }
    for (i, p) in pseudo.iter().enumerate() {
        labelled.push(((pseudo0 + i) as u32, class_of(&p.category).ok_or_else(|| unknown(&p.category))? as u32));
    }

    // Validation; categories the training never saw get an index past the vocabulary, so
    // they count as wrong guesses instead of disappearing.
    let val_class = |name: &str| class_of(name).unwrap_or(names.len());
    let validation = Validation {
        queries: (val0..val0 + val_pairs.len()).map(|r| r as u32).collect(),
        query_categories: val_pairs.iter().map(|p| val_class(&p.category)).collect(),
        gallery: (gallery0..gallery0 + val_shop.len()).chain(distractor0..distractor0 + distractor_photos.len()).map(|r| r as u32).collect(),
        gallery_categories: val_shop
            .iter()
            .map(|(pid, st, _)| val_pairs.iter().find(|p| p.pair_id == *pid && p.style == *st).map_or(names.len(), |p| val_class(&p.category)))
            .chain(distractor_photos.iter().map(|p| val_class(&p.category)))
            .collect(),
        correct: val_pairs
            .iter()
            .map(|p| val_shop.iter().enumerate().filter(|(_, (pid, st, _))| *pid == p.pair_id && *st == p.style).map(|(i, _)| i as u32).collect())
            .collect(),
        distractors: (distractor0..distractor0 + distractor_photos.len()).map(|r| r as u32).collect(),
        distractor_categories: distractor_photos.iter().map(|p| val_class(&p.category)).collect(),
    };
    let (baseline_top_k, baseline_precision) = validation.baseline(&pooled)?;
    progress(Progress::Message(format!(
        "untrained backbone (average pool, 1280-d): {}; category precision@{PRECISION_K} {:.3}",
        fmt_top_k(&baseline_top_k),
        baseline_precision.mean
    )));

    // The distillation teacher: average-pooled features centred on the training mean (raw
    // ReLU6 features are all positive, so their cosines crowd near 1).
    let train_rows = street0..val0;
    let mean = pooled.avg.narrow(0, train_rows.start, train_rows.len())?.mean_keepdim(0)?;
    let teacher = l2_normalise(&pooled.avg.broadcast_sub(&mean)?)?.to_device(&cfg.device)?;
    let features = pooled.gem.to_device(&cfg.device)?;

    let mut varmap = VarMap::new();
    if cfg.category_dim >= cfg.dim || !(0.0..=1.0).contains(&cfg.category_share) {
        return Err(Error::InvalidSetting { name: "category_dim", reason: format!("need category_dim < dim ({}) and a share in [0, 1]", cfg.dim) });
    }
    let parts = match cfg.category_dim {
        0 => Vec::new(),
        kind => vec![
            EmbeddingPart { len: cfg.dim - kind, weight: (1.0 - cfg.category_share).sqrt() as f32 },
            EmbeddingPart { len: kind, weight: cfg.category_share.sqrt() as f32 },
        ],
    };
    let heads = Heads::new(&varmap, cfg.seed, cfg.dim, names.len(), parts.clone(), &cfg.device)?;
    let checkpoint = Checkpoint::beside(&cfg.out);
    let first_epoch = checkpoint.resume(cfg.resume, &mut varmap, progress)?;
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: cfg.lr, weight_decay: 1e-4, ..Default::default() })?;

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut labelled_order: Vec<usize> = (0..labelled.len()).collect();
    let mut labelled_at = 0usize;
    let mut epochs = Vec::new();
    let mut best: Option<(f64, usize, Heads)> = None;
    let train_started = Instant::now();
    for epoch in first_epoch..cfg.epochs {
        let mut order: Vec<usize> = (0..instance_pairs.len()).collect();
        order.shuffle(&mut rng);
        progress(Progress::Stage { name: format!("epoch {}/{}", epoch + 1, cfg.epochs), total: order.len() as u64 });
        let (mut loss_sum, mut steps) = (0.0, 0);
        for batch in order.chunks(cfg.batch).filter(|b| b.len() >= 2) {
            let chosen: Vec<Pair> = batch.iter().map(|&i| instance_pairs[i]).collect();
            let shops: Vec<u32> = chosen.iter().map(|p| match p.shop_render {
                Some(r) if rng.random_bool(cfg.render_share.clamp(0.0, 1.0)) => r,
                _ => p.shop,
            }).collect();
            // As many labelled crops as pairs, drawn without replacement through the epoch.
            let mut extra = Vec::with_capacity(batch.len());
            while extra.len() < batch.len() && !labelled.is_empty() {
                if labelled_at == 0 {
                    labelled_order.shuffle(&mut rng);
                }
                extra.push(labelled[labelled_order[labelled_at]]);
                labelled_at = (labelled_at + 1) % labelled.len();
            }
            let rows: Vec<u32> = chosen.iter().map(|p| p.consumer).chain(shops).chain(extra.iter().map(|e| e.0)).collect();
            let classes: Vec<u32> = chosen.iter().map(|p| p.category).chain(chosen.iter().map(|p| p.category)).chain(extra.iter().map(|e| e.1)).collect();
            let idx = Tensor::new(rows.as_slice(), &cfg.device)?;
            let n = batch.len();
            let (instance, classified, kind) = heads.training_views(&features.index_select(&idx, 0)?)?;
            let mut loss = info_nce(&instance.narrow(0, 0, n)?, &instance.narrow(0, n, n)?, cfg.temperature)?;
            if cfg.category_weight > 0.0 {
                let labels = Tensor::new(classes.as_slice(), &cfg.device)?;
                loss = (loss + (candle_nn::loss::cross_entropy(&heads.categories.logits(&classified)?, &labels)? * cfg.category_weight)?)?;
            }
            if cfg.distill_weight > 0.0 {
                loss = (loss + (similarity_distillation(&kind, &teacher.index_select(&idx, 0)?, cfg.temperature)? * cfg.distill_weight)?)?;
            }
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            steps += 1;
            progress(Progress::Advance(n as u64));
        }
        let frozen = heads.frozen_copy()?;
        let m = validation.measure(&pooled, &frozen.embedding, &frozen.categories, &names, cfg.exact_match_false_rate, &cfg.device)?;
        let metrics = EpochMetrics {
            epoch: epoch + 1,
            loss: loss_sum / steps.max(1) as f64,
            top_k: m.top_k.clone(),
            ranked_top_k: m.ranked_top_k.clone(),
            precision: m.precision.mean,
            ranked_precision: m.ranked_precision.mean,
            category_accuracy: m.accuracy,
            exact_match_similarity: m.exact_above,
        };
        progress(Progress::Message(format!(
            "epoch {}: loss {:.4}, validation {} (ranked: top-1 {:.3}, top-20 {:.3}; category strictly first: top-1 {:.3}), category precision@{PRECISION_K} {:.3} (ranked {:.3}), category accuracy {:.3}, exact match ≥ {:.3}",
            epoch + 1,
            metrics.loss,
            fmt_top_k(&m.top_k),
            m.ranked_top_k[&1],
            m.ranked_top_k[&20],
            m.strict_top_k[&1],
            m.precision.mean,
            m.ranked_precision.mean,
            m.accuracy,
            m.exact_above
        )));
        // Both things a shopper gets count: the same item, and the same kind.
        let score = m.top_k[&1] + m.precision.mean;
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, epoch + 1, frozen));
        }
        epochs.push(metrics);
        checkpoint.save(&varmap, epoch + 1)?;
    }
    let (_, best_epoch, best_heads) = best.ok_or_else(|| Error::InvalidSetting { name: "epochs", reason: "no epoch left to run (resumed past --epochs)".into() })?;
    let m = validation.measure(&pooled, &best_heads.embedding, &best_heads.categories, &names, cfg.exact_match_false_rate, &cfg.device)?;
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
        categories: names.clone(),
        train_pairs: train_pairs.len(),
        rendered_pairs: if render0.is_some() { train_pairs.len() } else { 0 },
        augment_pairs: aug_photos.len(),
        labelled_catalog: train_photos.len(),
        pseudo_labelled: pseudo.len(),
        val_queries: validation.queries.len(),
        gallery: validation.gallery.len(),
        distractors: validation.distractors.len(),
        feature_seconds,
        train_seconds: train_started.elapsed().as_secs_f64(),
    };
    let config = EmbedderConfig {
        backbone: cfg.backbone.file_name().and_then(|f| f.to_str()).unwrap_or("efficientnet-lite0.safetensors").to_string(),
        dim: cfg.dim,
        preprocess: Preprocess::LITE0,
        version: model_version(&best_heads.embedding, &best_heads.categories)?,
        training: serde_json::json!({
            "data": cfg.data, "catalog": cfg.catalog, "epochs": cfg.epochs, "seed": cfg.seed, "batch": cfg.batch,
            "lr": cfg.lr, "temperature": cfg.temperature, "augment_items": cfg.augment_items,
            "distractors": cfg.distractors, "category_weight": cfg.category_weight,
            "distill_weight": cfg.distill_weight, "render_share": cfg.render_share,
            "category_dim": cfg.category_dim, "category_share": cfg.category_share,
            "unlabelled": cfg.unlabelled, "detector": cfg.detector, "pseudo_min_score": cfg.pseudo_min_score,
            "exact_match_false_rate": cfg.exact_match_false_rate, "report": &report,
        }),
        categories: names,
        parts,
        exact_match_similarity: Some(report.exact_match_similarity),
    };
    GarmentEmbedder::save_head(&cfg.out, &config, &best_heads.embedding, Some(&best_heads.categories))?;
    Ok(report)
}

/// `top-1 0.812, top-5 ...` for messages.
pub fn fmt_top_k(acc: &BTreeMap<usize, f64>) -> String {
    acc.iter().map(|(k, v)| format!("top-{k} {v:.3}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
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
