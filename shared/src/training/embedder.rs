//! Training the embedding head for consumer-to-shop matching.
//!
//! The backbone stays frozen (ImageNet EfficientNet-Lite): training a backbone on a 2-core
//! CPU runs at about 1 image/s (`../shared/STACK-NOTES.md` §4). Its feature maps are computed
//! once per crop and cached (f16, on disk), then GeM pooling and the projection are trained
//! with a symmetric InfoNCE loss: in each batch, a consumer garment's positive is its shop
//! image (same `pair_id` and `style`, the DeepFashion2 rule) and every other shop image of
//! the batch is a negative. Augmentation positives come from the CC0 catalog: a
//! consumer-like view (background swap, crop jitter, flip, colour, blur) against the clean
//! photo.
//!
//! Split (from the data's README): validation = CCP ids with `id % 5 == 1`, training = the
//! rest. The catalog splits by `sender_id` (a sender's shots are often near-duplicates):
//! senders with `sender_id % 5` in {1, 3} give the distractors (about 1,000 of its 2,048
//! photos), the others give augmentation pairs, one photo per sender so that no batch holds
//! two shots of one item as false negatives. Validation gallery = the validation shop
//! cut-outs plus the distractors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Init, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::retrieval::top_k_accuracy;
use super::checkpoint::Checkpoint;
use super::{Progress, ProgressFn, augment};
use crate::datasets::{Df2Annotation, Df2Folder, read_gallery_gt};
use crate::geometry::BBox;
use crate::models::efficientnet_lite::{EfficientNetLite, FEATURE_DIM};
use crate::models::embedder::{EmbedderConfig, EmbeddingHead, GarmentEmbedder};
use crate::vision::{DecodeLimits, Preprocess, decode_image};
use crate::{Error, Result};

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct EmbedderTraining {
    /// DeepFashion2-format consumer-to-shop set (`user/`, `shop/`, `gallery_gt.json`).
    pub data: PathBuf,
    /// CC0 catalog (`catalog.csv` + images) for augmentation positives and distractors.
    pub catalog: Option<PathBuf>,
    /// Backbone weights.
    pub backbone: PathBuf,
    /// Output weights file (the backbone is referenced by its file name, so keep both in one
    /// directory).
    pub out: PathBuf,
    /// Where backbone features are cached between runs.
    pub cache: PathBuf,
    pub epochs: usize,
    pub seed: u64,
    pub dim: usize,
    pub batch: usize,
    pub lr: f64,
    pub temperature: f64,
    /// Catalog photos used as augmentation pairs (one per sender).
    pub augment_items: usize,
    /// Catalog photos added to the validation gallery.
    pub distractors: usize,
    /// Continue from the checkpoint beside `out`.
    pub resume: bool,
    pub device: Device,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingReport {
    /// Top-k of the untrained backbone (average-pooled 1280-d features).
    pub baseline_top_k: BTreeMap<usize, f64>,
    /// Top-k of the best epoch's head.
    pub top_k: BTreeMap<usize, f64>,
    pub best_epoch: usize,
    pub train_pairs: usize,
    pub augment_pairs: usize,
    pub val_queries: usize,
    pub gallery: usize,
    pub feature_seconds: f64,
    pub train_seconds: f64,
}

/// Version of the augmentation code, part of the feature cache key: bump it whenever
/// `augment.rs` changes what a seed produces, or stale cached views would be reused.
const AUGMENT_VERSION: u32 = 2;

/// One crop to run through the backbone.
#[derive(Debug, Clone, PartialEq, Serialize)]
enum CropSpec {
    Box { image: PathBuf, bbox: Option<[f32; 4]> },
    ConsumerView { image: PathBuf, seed: u64, augment_version: u32 },
}

impl CropSpec {
    fn image(&self) -> &Path {
        match self {
            CropSpec::Box { image, .. } | CropSpec::ConsumerView { image, .. } => image,
        }
    }
}

struct CcpPair {
    pair_id: u64,
    style: u32,
    consumer: CropSpec,
    shop: CropSpec,
}

fn ccp_pairs(data: &Path) -> Result<(Vec<CcpPair>, Vec<(u64, u32, CropSpec)>)> {
    let user = Df2Folder::open(data.join("user"))?;
    let shop = Df2Folder::open(data.join("shop"))?;
    let gallery = read_gallery_gt(&data.join("gallery_gt.json"))?;
    let mut shop_of: HashMap<(u64, u32), CropSpec> = HashMap::new();
    let mut shop_items = Vec::new();
    for g in &gallery {
        let image = shop
            .image(g.gallery_image_id)
            .ok_or_else(|| Error::InvalidDatasetLayout { path: data.join("gallery_gt.json"), reason: format!("gallery image {} has no file", g.gallery_image_id) })?;
        let spec = CropSpec::Box { image: image.image.clone(), bbox: Some(g.bbox) };
        shop_of.insert((g.pair_id, g.style), spec.clone());
        shop_items.push((g.pair_id, g.style, spec));
    }
    let mut pairs = Vec::new();
    for entry in user.images() {
        let anno = Df2Annotation::read(&entry.annotation)?;
        for item in anno.items.iter().filter(|i| i.style > 0) {
            if let Some(shop) = shop_of.get(&(anno.pair_id, item.style)) {
                pairs.push(CcpPair {
                    pair_id: anno.pair_id,
                    style: item.style,
                    consumer: CropSpec::Box { image: entry.image.clone(), bbox: Some(item.bbox.to_array()) },
                    shop: shop.clone(),
                });
            }
        }
    }
    Ok((pairs, shop_items))
}

/// Catalog rows `(image path, sender_id)`.
fn catalog_rows(catalog: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let csv_path = catalog.join("catalog.csv");
    let mut reader = csv::Reader::from_path(&csv_path).map_err(|e| Error::MalformedDataset { file: csv_path.clone(), field: "(document)".into(), reason: e.to_string() })?;
    let headers = reader.headers().map_err(|e| Error::MalformedDataset { file: csv_path.clone(), field: "(header)".into(), reason: e.to_string() })?.clone();
    let col = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| Error::MalformedDataset { file: csv_path.clone(), field: name.into(), reason: "column missing".into() })
    };
    let (image_col, sender_col) = (col("image")?, col("sender_id")?);
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| Error::MalformedDataset { file: csv_path.clone(), field: format!("row {}", i + 2), reason: e.to_string() })?;
        let sender = record.get(sender_col).and_then(|s| s.parse().ok()).unwrap_or(0);
        rows.push((catalog.join(record.get(image_col).unwrap_or_default()), sender));
    }
    Ok(rows)
}

/// Backbone feature maps `[n, 1280, h, w]` (f16, CPU) of `specs`, cached in `cache` under a
/// key of the backbone file's hash and the specs.
fn features(backbone: &EfficientNetLite, backbone_hash: &blake3::Hash, specs: &[CropSpec], name: &str, cache: &Path, device: &Device, progress: ProgressFn) -> Result<Tensor> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(backbone_hash.as_bytes());
    hasher.update(serde_json::to_string(specs).expect("specs serialise").as_bytes());
    let key = &hasher.finalize().to_hex()[..16];
    let file = cache.join(format!("{name}-{key}.safetensors"));
    if let Ok(mut cached) = candle_core::safetensors::load(&file, &Device::Cpu)
        && let Some(t) = cached.remove("features") {
            progress(Progress::Message(format!("{name}: {} cached feature maps from {}", specs.len(), file.display())));
            return Ok(t);
        }
    progress(Progress::Stage { name: format!("backbone features: {name}"), total: specs.len() as u64 });
    let preprocess = Preprocess::LITE0;
    let mut maps = Vec::with_capacity(specs.len());
    let mut decoded: Option<(PathBuf, image::RgbImage)> = None;
    for chunk in specs.chunks(8) {
        let mut inputs = Vec::with_capacity(chunk.len());
        for spec in chunk {
            if decoded.as_ref().map(|(p, _)| p.as_path()) != Some(spec.image()) {
                let bytes = std::fs::read(spec.image()).map_err(|e| Error::io(spec.image(), e))?;
                decoded = Some((spec.image().to_path_buf(), decode_image(&bytes, DecodeLimits::default())?));
            }
            let image = &decoded.as_ref().expect("just decoded").1;
            let input = match spec {
                CropSpec::Box { bbox, .. } => preprocess.crop_to_tensor(image, bbox.map(|b| BBox::new(b[0], b[1], b[2], b[3])), &Device::Cpu)?,
                CropSpec::ConsumerView { seed, .. } => {
                    let view = augment::consumer_view(image, &mut ChaCha8Rng::seed_from_u64(*seed));
                    preprocess.crop_to_tensor(&view, None, &Device::Cpu)?
                }
            };
            inputs.push(input);
        }
        let batch = Tensor::stack(&inputs, 0)?.to_device(device)?;
        maps.push(backbone.feature_map(&batch)?.to_dtype(DType::F16)?.to_device(&Device::Cpu)?);
        progress(Progress::Advance(chunk.len() as u64));
    }
    let all = Tensor::cat(&maps, 0)?;
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    candle_core::safetensors::save(&HashMap::from([("features".to_string(), all.clone())]), &file)?;
    Ok(all)
}

/// Applies `head` (or plain average pooling when `None`) to feature maps in chunks; returns
/// row-major unit vectors.
fn embed_maps(maps: &Tensor, head: Option<&EmbeddingHead>, device: &Device) -> Result<Vec<f32>> {
    let n = maps.dim(0)?;
    let mut out = Vec::new();
    for start in (0..n).step_by(256) {
        let len = 256.min(n - start);
        let chunk = maps.narrow(0, start, len)?.to_device(device)?.to_dtype(DType::F32)?;
        let emb = match head {
            Some(h) => h.forward(&chunk)?,
            None => crate::models::embedder::l2_normalise(&chunk.mean(candle_core::D::Minus1)?.mean(candle_core::D::Minus1)?)?,
        };
        out.extend(emb.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

fn model_version(head: &EmbeddingHead) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    for t in [&head.p, &head.weight, &head.bias] {
        for v in t.flatten_all()?.to_vec1::<f32>()? {
            hasher.update(&v.to_le_bytes());
        }
    }
    Ok(format!("embedder-lite0-gem-{}", &hasher.finalize().to_hex()[..12]))
}

/// Trains the head and writes the best epoch's weights to `cfg.out`.
pub fn train_embedder(cfg: &EmbedderTraining, progress: ProgressFn) -> Result<TrainingReport> {
    if cfg.epochs == 0 || cfg.batch < 2 || cfg.dim == 0 {
        return Err(Error::InvalidSetting { name: "training", reason: "need epochs ≥ 1, batch ≥ 2 and dim ≥ 1".into() });
    }
    let started = Instant::now();
    let backbone = EfficientNetLite::load(&cfg.backbone, &cfg.device)?;
    let (pairs, shop_items) = ccp_pairs(&cfg.data)?;
    let is_val = |pair_id: u64| pair_id % 5 == 1;
    let (val_pairs, train_pairs): (Vec<&CcpPair>, Vec<&CcpPair>) = pairs.iter().partition(|p| is_val(p.pair_id));

    // Catalog: one photo per sender, split by sender.
    let mut aug_images = Vec::new();
    let mut distractor_images = Vec::new();
    if let Some(catalog) = &cfg.catalog {
        let mut rows = catalog_rows(catalog)?;
        rows.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
        let mut seen = std::collections::HashSet::new();
        for (image, sender) in rows {
            if sender % 5 == 1 || sender % 5 == 3 {
                if distractor_images.len() < cfg.distractors {
                    distractor_images.push(image);
                }
            } else if seen.insert(sender) && aug_images.len() < cfg.augment_items {
                aug_images.push(image);
            }
        }
    }

    let mut train_a: Vec<CropSpec> = train_pairs.iter().map(|p| p.consumer.clone()).collect();
    let mut train_b: Vec<CropSpec> = train_pairs.iter().map(|p| p.shop.clone()).collect();
    for (i, image) in aug_images.iter().enumerate() {
        train_a.push(CropSpec::ConsumerView { image: image.clone(), seed: cfg.seed ^ (i as u64 + 1), augment_version: AUGMENT_VERSION });
        train_b.push(CropSpec::Box { image: image.clone(), bbox: None });
    }
    let val_queries: Vec<CropSpec> = val_pairs.iter().map(|p| p.consumer.clone()).collect();
    let val_shop: Vec<&(u64, u32, CropSpec)> = shop_items.iter().filter(|(pair_id, _, _)| is_val(*pair_id)).collect();
    let mut gallery: Vec<CropSpec> = val_shop.iter().map(|(_, _, s)| s.clone()).collect();
    gallery.extend(distractor_images.iter().map(|image| CropSpec::Box { image: image.clone(), bbox: None }));
    let correct: Vec<Vec<u32>> = val_pairs
        .iter()
        .map(|p| val_shop.iter().enumerate().filter(|(_, (pid, st, _))| *pid == p.pair_id && *st == p.style).map(|(i, _)| i as u32).collect())
        .collect();

    let backbone_hash = blake3::hash(&std::fs::read(&cfg.backbone).map_err(|e| Error::io(&cfg.backbone, e))?);
    let f_train_a = features(&backbone, &backbone_hash, &train_a, "train-consumer", &cfg.cache, &cfg.device, progress)?;
    let f_train_b = features(&backbone, &backbone_hash, &train_b, "train-shop", &cfg.cache, &cfg.device, progress)?;
    let f_val = features(&backbone, &backbone_hash, &val_queries, "val-consumer", &cfg.cache, &cfg.device, progress)?;
    let f_gallery = features(&backbone, &backbone_hash, &gallery, "val-gallery", &cfg.cache, &cfg.device, progress)?;
    let feature_seconds = started.elapsed().as_secs_f64();

    let baseline = top_k_accuracy(&embed_maps(&f_val, None, &cfg.device)?, &embed_maps(&f_gallery, None, &cfg.device)?, FEATURE_DIM, &correct);
    progress(Progress::Message(format!("untrained backbone (average pool, 1280-d): {}", fmt_top_k(&baseline))));

    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &cfg.device);
    let head = EmbeddingHead {
        p: vb.get_with_hints(1, "gem.p", Init::Const(3.0))?,
        weight: vb.get_with_hints((cfg.dim, FEATURE_DIM), "proj.weight", Init::Randn { mean: 0.0, stdev: (1.0 / FEATURE_DIM as f64).sqrt() })?,
        bias: vb.get_with_hints(cfg.dim, "proj.bias", Init::Const(0.0))?,
    };
    let checkpoint = Checkpoint::beside(&cfg.out);
    let first_epoch = checkpoint.resume(cfg.resume, &mut varmap, progress)?;
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: cfg.lr, weight_decay: 1e-4, ..Default::default() })?;

    let n = train_a.len();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut best: Option<(f64, f64, usize, BTreeMap<usize, f64>, EmbeddingHead)> = None;
    let train_started = Instant::now();
    for epoch in first_epoch..cfg.epochs {
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.shuffle(&mut rng);
        progress(Progress::Stage { name: format!("epoch {}/{}", epoch + 1, cfg.epochs), total: n as u64 });
        let (mut loss_sum, mut steps) = (0.0, 0);
        for batch in order.chunks(cfg.batch).filter(|b| b.len() >= 2) {
            let idx = Tensor::new(batch, &Device::Cpu)?;
            let a = f_train_a.index_select(&idx, 0)?.to_device(&cfg.device)?.to_dtype(DType::F32)?;
            let b = f_train_b.index_select(&idx, 0)?.to_device(&cfg.device)?.to_dtype(DType::F32)?;
            let (ea, eb) = (head.forward(&a)?, head.forward(&b)?);
            let logits = (ea.matmul(&eb.t()?)? / cfg.temperature)?;
            let labels = Tensor::arange(0u32, batch.len() as u32, &cfg.device)?;
            let loss = ((candle_nn::loss::cross_entropy(&logits, &labels)? + candle_nn::loss::cross_entropy(&logits.t()?, &labels)?)? / 2.0)?;
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            steps += 1;
            progress(Progress::Advance(batch.len() as u64));
        }
        let frozen = EmbeddingHead { p: head.p.detach(), weight: head.weight.detach(), bias: head.bias.detach() };
        let acc = top_k_accuracy(&embed_maps(&f_val, Some(&frozen), &cfg.device)?, &embed_maps(&f_gallery, Some(&frozen), &cfg.device)?, cfg.dim, &correct);
        progress(Progress::Message(format!(
            "epoch {}: loss {:.4}, GeM p {:.2}, validation {}",
            epoch + 1,
            loss_sum / steps.max(1) as f64,
            frozen.p.to_vec1::<f32>()?[0],
            fmt_top_k(&acc)
        )));
        let score = (acc[&1], acc[&20]);
        if best.as_ref().is_none_or(|b| score > (b.0, b.1)) {
            let copy = EmbeddingHead { p: frozen.p.copy()?, weight: frozen.weight.copy()?, bias: frozen.bias.copy()? };
            best = Some((score.0, score.1, epoch + 1, acc, copy));
        }
        checkpoint.save(&varmap, epoch + 1)?;
    }
    let (_, _, best_epoch, top_k, best_head) = best.ok_or_else(|| Error::InvalidSetting { name: "epochs", reason: "no epoch left to run (resumed past --epochs)".into() })?;
    let report = TrainingReport {
        baseline_top_k: baseline,
        top_k,
        best_epoch,
        train_pairs: train_pairs.len(),
        augment_pairs: aug_images.len(),
        val_queries: val_queries.len(),
        gallery: gallery.len(),
        feature_seconds,
        train_seconds: train_started.elapsed().as_secs_f64(),
    };
    let config = EmbedderConfig {
        backbone: cfg.backbone.file_name().and_then(|f| f.to_str()).unwrap_or("efficientnet-lite0.safetensors").to_string(),
        dim: cfg.dim,
        preprocess: Preprocess::LITE0,
        version: model_version(&best_head)?,
        training: serde_json::json!({
            "data": cfg.data, "catalog": cfg.catalog, "epochs": cfg.epochs, "seed": cfg.seed, "batch": cfg.batch,
            "lr": cfg.lr, "temperature": cfg.temperature, "augment_items": cfg.augment_items,
            "distractors": cfg.distractors, "report": &report,
        }),
    };
    GarmentEmbedder::save_head(&cfg.out, &config, &best_head)?;
    Ok(report)
}

/// `top-1 0.812, top-5 ...` for messages.
pub fn fmt_top_k(acc: &BTreeMap<usize, f64>) -> String {
    acc.iter().map(|(k, v)| format!("top-{k} {v:.3}")).collect::<Vec<_>>().join(", ")
}
