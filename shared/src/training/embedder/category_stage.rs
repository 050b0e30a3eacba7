//! Training the category head's own stage: a copy of the backbone's coarsest stage (Lite0's
//! blocks 11–15, stride 16 → 32), fine-tuned with a linear layer on its average-pooled
//! output to name a garment crop, read from the crop's frozen stride-16 features.
//!
//! Why: the category head on the embedding is a linear probe of frozen ImageNet features,
//! and those confuse top, outer, dress and skirt on one body (81 % of the validation street
//! garments named right, skirts 52 %). The embedding must stay as it is (the index holds
//! it), so the naming gets its own copy of the last stage, fed by the features the
//! embedding's pass computes anyway: serving costs that stage once more per crop.
//!
//! Data: every labelled crop of the embedder's training data (street garments, their shop
//! images, labelled CC0 catalog photos of training senders, pseudo-labelled street crops),
//! each as two cached views: its box, and the box moved and resized by up to a tenth of
//! its size per side (a detector's box is not the annotation); each drawn view is mirrored
//! with probability one half (on the feature map). The stride-16 features are cached in
//! f16. Validation: the validation street garments and shop images, named by the head on
//! the embedding (the file this run starts from) and by the tuned stage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::EmbedderTraining;
use super::data::{CropReader, CropSpec, Splits};
use crate::models::backbone::FoldedBlock;
use crate::models::embedder::{CATEGORY_STAGE_BIAS, CATEGORY_STAGE_WEIGHT, EmbedderConfig, GarmentEmbedder, category_stage_prefix};
use crate::models::formats::weights_file;
use crate::training::{Progress, ProgressFn};
use crate::{Error, Result};

/// Crops per backbone pass when caching features.
const CACHE_CHUNK: usize = 8;

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct CategoryStageTraining {
    /// DeepFashion2-format consumer-to-shop set (`user/`, `shop/`, `gallery_gt.json`).
    pub data: PathBuf,
    pub catalog: Option<PathBuf>,
    /// Tagged street photos whose detections of tagged classes become labelled crops.
    pub unlabelled: Option<PathBuf>,
    pub detector: PathBuf,
    pub pseudo_min_score: f32,
    /// The embedder whose category head is replaced (its embedding stays as it is).
    pub embedder: PathBuf,
    pub out: PathBuf,
    pub cache: PathBuf,
    pub epochs: usize,
    pub batch: usize,
    /// Learning rate of the linear layer.
    pub lr: f64,
    /// Learning rate of the tuned blocks.
    pub stage_lr: f64,
    pub seed: u64,
    /// The first block the head tunes (its copy runs from there to the last block); `None`:
    /// the coarsest stage (Lite0's blocks 11–15). A later block costs less per crop.
    pub first_block: Option<usize>,
    /// The share of each label spread evenly over all categories (0: plain cross-entropy).
    pub label_smoothing: f64,
    pub device: Device,
}

/// The blocks a run tunes: from `first` (or the coarsest stage's first block) to the end
/// of the coarsest stage, which is the network's last block.
fn tuned_blocks(coarsest: std::ops::Range<usize>, first: Option<usize>) -> Result<Vec<usize>> {
    let start = first.unwrap_or(coarsest.start);
    if coarsest.is_empty() || start == 0 || start >= coarsest.end {
        return Err(Error::InvalidSetting { name: "first-block", reason: format!("block {start} is not one of the backbone's blocks 1..{}", coarsest.end) });
    }
    Ok((start..coarsest.end).collect())
}

/// Share of crops named right, per validation domain.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Accuracy {
    pub street: f64,
    pub shop: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageEpoch {
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: Accuracy,
}

#[derive(Debug, Clone, Serialize)]
pub struct CategoryStageReport {
    /// The head on the embedding (the starting file), on the same validation crops.
    pub embedding_head: Accuracy,
    pub epochs: Vec<StageEpoch>,
    /// Per category on the validation street crops: (name, crops, right with the head on
    /// the embedding, right with the tuned stage at the last epoch).
    pub street_categories: Vec<(String, usize, usize, usize)>,
    pub train_crops: usize,
    pub val_crops: (usize, usize),
    pub seconds: f64,
}

/// Cached stride-16 features of a set of crops with their classes.
struct Cached {
    features: Tensor,
    classes: Vec<u32>,
}

pub fn train_category_stage(cfg: &CategoryStageTraining, progress: ProgressFn) -> Result<CategoryStageReport> {
    let started = Instant::now();
    let embedder = GarmentEmbedder::load(&cfg.embedder, &cfg.device)?;
    let base = embedder.config().clone();
    if base.categories.is_empty() {
        return Err(Error::InvalidSetting { name: "embedder", reason: "the embedder has no category head to replace".into() });
    }
    let backbone = embedder.backbone();
    let stage = tuned_blocks(backbone.coarsest_stage(), cfg.first_block)?;
    let start = stage[0];
    let crops = Splits::read(&splits_config(cfg, &base), progress)?.category_crops();
    let class_of = |name: &str| base.categories.iter().position(|n| n == name).map(|c| c as u32);

    let mut train_specs = Vec::with_capacity(crops.train.len() * 2);
    let mut train_classes = Vec::with_capacity(crops.train.len() * 2);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    for (spec, name) in &crops.train {
        let Some(class) = class_of(name) else { continue };
        train_specs.push(spec.clone());
        train_specs.push(jittered(spec, &mut rng));
        train_classes.extend([class, class]);
    }
    // A validation category the head does not know counts as named wrong.
    let unknown = base.categories.len() as u32;
    let val_classes = |crops: &[(CropSpec, String)]| crops.iter().map(|(_, n)| class_of(n).unwrap_or(unknown)).collect::<Vec<_>>();
    let key = backbone_key(&cfg.embedder, &base)?;
    let train = Cached { features: stage_inputs(&embedder, start, &train_specs, "train", &key, cfg, progress)?, classes: train_classes };
    let street_specs: Vec<CropSpec> = crops.val_street.iter().map(|(s, _)| s.clone()).collect();
    let shop_specs: Vec<CropSpec> = crops.val_shop.iter().map(|(s, _)| s.clone()).collect();
    let val_street = Cached { features: stage_inputs(&embedder, start, &street_specs, "val-street", &key, cfg, progress)?, classes: val_classes(&crops.val_street) };
    let val_shop = Cached { features: stage_inputs(&embedder, start, &shop_specs, "val-shop", &key, cfg, progress)?, classes: val_classes(&crops.val_shop) };

    let street_base = embedding_head_guesses(&embedder, start, &val_street.features)?;
    let shop_base = embedding_head_guesses(&embedder, start, &val_shop.features)?;
    let embedding_head = Accuracy { street: accuracy(&street_base, &val_street.classes), shop: accuracy(&shop_base, &val_shop.classes) };
    progress(Progress::Message(format!(
        "{} training views of {} crops, {} + {} validation crops; the head on the embedding names {:.3} of the street crops and {:.3} of the shop ones",
        train.classes.len(),
        crops.train.len(),
        val_street.classes.len(),
        val_shop.classes.len(),
        embedding_head.street,
        embedding_head.shop
    )));

    let params = Params::from_backbone(&embedder, &stage, base.categories.len(), cfg.seed, &cfg.device)?;
    let mut epochs = Vec::with_capacity(cfg.epochs);
    let mut street_last = Vec::new();
    let steps_per_epoch = (train.classes.len() / 2).div_ceil(cfg.batch);
    let total = (steps_per_epoch * cfg.epochs) as f64;
    let mut head_opt = AdamW::new(params.head_vars(), ParamsAdamW { lr: cfg.lr, weight_decay: 1e-4, ..Default::default() })?;
    let mut stage_opt = AdamW::new(params.stage_vars(), ParamsAdamW { lr: cfg.stage_lr, weight_decay: 1e-4, ..Default::default() })?;
    for epoch in 0..cfg.epochs {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ (0x5eed_0000 + epoch as u64));
        // One of each crop's two views per epoch.
        let mut picks: Vec<u32> = (0..train.classes.len() / 2).map(|i| (2 * i + rng.random_range(0..2)) as u32).collect();
        picks.shuffle(&mut rng);
        progress(Progress::Stage { name: format!("category stage epoch {}/{}", epoch + 1, cfg.epochs), total: picks.len() as u64 });
        let mut loss_sum = 0.0;
        for (b, batch) in picks.chunks(cfg.batch).enumerate() {
            let step = (epoch * steps_per_epoch + b) as f64;
            let scale = 0.02 + 0.98 * 0.5 * (1.0 + (std::f64::consts::PI * step / total).cos());
            head_opt.set_learning_rate(cfg.lr * scale);
            stage_opt.set_learning_rate(cfg.stage_lr * scale);
            let flips: Vec<bool> = batch.iter().map(|_| rng.random_bool(0.5)).collect();
            let x = mirrored(&train.features.index_select(&Tensor::new(batch, &Device::Cpu)?, 0)?.to_dtype(DType::F32)?, &flips)?.to_device(&cfg.device)?;
            let labels = Tensor::new(batch.iter().map(|&i| train.classes[i as usize]).collect::<Vec<_>>(), &cfg.device)?;
            let loss = smoothed_cross_entropy(&params.logits(&x)?, &labels, cfg.label_smoothing)?;
            let grads = loss.backward()?;
            head_opt.step(&grads)?;
            stage_opt.step(&grads)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            progress(Progress::Advance(batch.len() as u64));
        }
        let street = params.guesses(&val_street.features, &cfg.device)?;
        let shop = params.guesses(&val_shop.features, &cfg.device)?;
        let accuracy = Accuracy { street: accuracy(&street, &val_street.classes), shop: accuracy(&shop, &val_shop.classes) };
        let loss = loss_sum / steps_per_epoch.max(1) as f64;
        progress(Progress::Message(format!("epoch {}: loss {loss:.4}, validation named right: street {:.3}, shop {:.3}", epoch + 1, accuracy.street, accuracy.shop)));
        epochs.push(StageEpoch { epoch: epoch + 1, loss, accuracy });
        street_last = street;
    }
    let street_categories = base
        .categories
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let mine: Vec<usize> = (0..val_street.classes.len()).filter(|&i| val_street.classes[i] == c as u32).collect();
            let right = |guesses: &[u32]| mine.iter().filter(|&&i| guesses.get(i) == Some(&(c as u32))).count();
            (name.clone(), mine.len(), right(&street_base), right(&street_last))
        })
        .collect();
    let report = CategoryStageReport {
        embedding_head,
        epochs,
        street_categories,
        train_crops: crops.train.len(),
        val_crops: (val_street.classes.len(), val_shop.classes.len()),
        seconds: started.elapsed().as_secs_f64(),
    };
    let record = serde_json::json!({
        "command": "indexer train category-stage",
        "from": base.version,
        "epochs": cfg.epochs, "batch": cfg.batch, "lr": cfg.lr, "stage_lr": cfg.stage_lr, "seed": cfg.seed, "blocks": &stage, "label_smoothing": cfg.label_smoothing,
        "views": "2 per crop (the box, the box jittered by up to 0.1 per side), mirrored at random",
        "split": "validation = CCP id % 5 == 1; catalog senders % 5 in {1, 3} left out",
        "report": &report,
    });
    save(&cfg.embedder, &cfg.out, &base, &params, record)?;
    Ok(report)
}

/// What [`Splits::read`] needs from an embedder run: the data, and the pseudo-labels'
/// detector; no distractors or consumer views (this run names crops, it does not rank).
fn splits_config(cfg: &CategoryStageTraining, base: &EmbedderConfig) -> EmbedderTraining {
    EmbedderTraining {
        data: cfg.data.clone(),
        catalog: cfg.catalog.clone(),
        backbone: PathBuf::from(&base.backbone),
        out: cfg.out.clone(),
        cache: cfg.cache.clone(),
        epochs: 0,
        seed: cfg.seed,
        dim: base.dim,
        batch: cfg.batch,
        lr: cfg.lr,
        temperature: 0.07,
        augment_items: 0,
        distractors: 0,
        category_weight: 1.0,
        distill_weight: 0.0,
        render_share: 0.0,
        category_dim: 0,
        category_share: 0.0,
        unlabelled: cfg.unlabelled.clone(),
        detector: cfg.unlabelled.as_ref().map(|_| cfg.detector.clone()),
        pseudo_min_score: cfg.pseudo_min_score,
        exact_match_false_rate: 0.1,
        resume: false,
        device: cfg.device.clone(),
    }
}

/// The box moved and resized by up to a tenth of its width and height per side (a
/// detector's box is never the annotation); a whole photo stays whole.
fn jittered(spec: &CropSpec, rng: &mut ChaCha8Rng) -> CropSpec {
    match spec {
        CropSpec::Box { image, bbox: Some([x1, y1, x2, y2]) } => {
            let (w, h) = (x2 - x1, y2 - y1);
            let mut side = |extent: f32| extent * rng.random_range(-0.1f32..0.1);
            let b = [(x1 + side(w)).max(0.0), (y1 + side(h)).max(0.0), x2 + side(w), y2 + side(h)];
            let b = if b[2] > b[0] + 1.0 && b[3] > b[1] + 1.0 { b } else { [*x1, *y1, *x2, *y2] };
            CropSpec::Box { image: image.clone(), bbox: Some(b) }
        }
        other => other.clone(),
    }
}

/// Key of the features a backbone file gives before the tuned stage.
fn backbone_key(embedder: &Path, config: &EmbedderConfig) -> Result<blake3::Hash> {
    let path = GarmentEmbedder::backbone_path(embedder, config);
    Ok(blake3::hash(&std::fs::read(&path).map_err(|e| Error::io(&path, e))?))
}

/// The crops' features before block `start`, `[n, c, h, w]` in f16 on the CPU, cached in
/// `cfg.cache` under a key of the backbone file, `start` and the specs.
fn stage_inputs(embedder: &GarmentEmbedder, start: usize, specs: &[CropSpec], name: &str, key: &blake3::Hash, cfg: &CategoryStageTraining, progress: ProgressFn) -> Result<Tensor> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(key.as_bytes());
    hasher.update(&(start as u64).to_le_bytes());
    hasher.update(serde_json::to_string(specs).expect("specs serialise").as_bytes());
    let file = cfg.cache.join(format!("stage-inputs-{name}-{}.safetensors", &hasher.finalize().to_hex()[..16]));
    if let Ok(mut cached) = candle_core::safetensors::load(&file, &Device::Cpu)
        && let Some(features) = cached.remove("features")
    {
        progress(Progress::Message(format!("{name}: {} cached crop features from {}", specs.len(), file.display())));
        return Ok(features);
    }
    progress(Progress::Stage { name: format!("crop features before block {start}: {name}"), total: specs.len() as u64 });
    let mut reader = CropReader::new(embedder.config().preprocess);
    let mut parts = Vec::with_capacity(specs.len().div_ceil(CACHE_CHUNK));
    for chunk in specs.chunks(CACHE_CHUNK) {
        let inputs = reader.batch(chunk)?.to_device(&cfg.device)?;
        parts.push(embedder.backbone().features_before(&inputs, start)?.to_dtype(DType::F16)?.to_device(&Device::Cpu)?);
        progress(Progress::Advance(chunk.len() as u64));
    }
    let features = Tensor::cat(&parts, 0)?;
    std::fs::create_dir_all(&cfg.cache).map_err(|e| Error::io(&cfg.cache, e))?;
    candle_core::safetensors::save(&HashMap::from([("features".to_string(), features.clone())]), &file)?;
    Ok(features)
}

/// Each sample of `x` `[n, c, h, w]` mirrored left to right where `flips` says so.
fn mirrored(x: &Tensor, flips: &[bool]) -> Result<Tensor> {
    if !flips.iter().any(|&f| f) {
        return Ok(x.clone());
    }
    let w = x.dim(3)?;
    let reversed = Tensor::new((0..w as u32).rev().collect::<Vec<_>>(), x.device())?;
    let flipped = x.index_select(&reversed, 3)?;
    let rows = flips.iter().enumerate().map(|(i, &f)| if f { flipped.i(i..i + 1) } else { x.i(i..i + 1) }).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// The head on the embedding's guesses for crops given by their features before `start`:
/// the frozen blocks, the head convolution, the embedding and its linear head, as served.
fn embedding_head_guesses(embedder: &GarmentEmbedder, start: usize, features: &Tensor) -> Result<Vec<u32>> {
    let backbone = embedder.backbone();
    let mut guesses = Vec::with_capacity(features.dim(0)?);
    for i in (0..features.dim(0)?).step_by(64) {
        let n = 64.min(features.dim(0)? - i);
        let x = features.narrow(0, i, n)?.to_dtype(DType::F32)?.to_device(backbone.device())?;
        let fmap = backbone.head_features(&backbone.blocks_from(&x, start)?)?;
        for reading in embedder.read_feature_map(&fmap)? {
            guesses.push(reading.categories.map_or(u32::MAX, |p| argmax(&p)));
        }
    }
    Ok(guesses)
}

/// Cross-entropy against labels with `smoothing` of each spread evenly over the classes:
/// `(1 − ε) · CE(y) + ε · mean over classes of −log p` (ε = 0: plain cross-entropy).
fn smoothed_cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, 1)?;
    let chosen = log_p.gather(&labels.unsqueeze(1)?, 1)?.mean_all()?.neg()?;
    if smoothing <= 0.0 {
        return Ok(chosen);
    }
    let spread = log_p.mean_all()?.neg()?;
    Ok(((chosen * (1.0 - smoothing))? + (spread * smoothing)?)?)
}

fn argmax(values: &[f32]) -> u32 {
    values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map_or(u32::MAX, |(i, _)| i as u32)
}

fn accuracy(guesses: &[u32], classes: &[u32]) -> f64 {
    let right = guesses.iter().zip(classes).filter(|(g, c)| g == c).count();
    right as f64 / classes.len().max(1) as f64
}

/// The trained parameters: the tuned blocks (from the ImageNet ones) and the linear layer.
struct Params {
    blocks: Vec<(usize, FoldedBlock)>,
    stage_vars: Vec<Var>,
    weight: Var,
    bias: Var,
}

impl Params {
    fn from_backbone(embedder: &GarmentEmbedder, stage: &[usize], categories: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut stage_vars = Vec::new();
        let mut blocks = Vec::with_capacity(stage.len());
        for &i in stage {
            let imagenet = embedder.backbone().folded_block(i)?;
            let prefix = category_stage_prefix(i);
            let named: HashMap<String, Tensor> = imagenet.tensors(&prefix).into_iter().collect();
            let block = FoldedBlock::read(&imagenet.config, &prefix, &mut |name, _| {
                let var = Var::from_tensor(&named[name].to_device(device)?)?;
                let t = var.as_tensor().clone();
                stage_vars.push(var);
                Ok(t)
            })?;
            blocks.push((i, block));
        }
        let channels = blocks.last().map_or(0, |(_, b)| b.config.out_channels);
        // Small seeded weights: the run starts near uniform guesses.
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xca7e);
        let init: Vec<f32> = (0..categories * channels).map(|_| rng.random_range(-0.01f32..0.01)).collect();
        let weight = Var::from_tensor(&Tensor::from_vec(init, (categories, channels), device)?)?;
        let bias = Var::from_tensor(&Tensor::zeros(categories, DType::F32, device)?)?;
        Ok(Self { blocks, stage_vars, weight, bias })
    }

    fn stage_vars(&self) -> Vec<Var> {
        self.stage_vars.clone()
    }

    fn head_vars(&self) -> Vec<Var> {
        vec![self.weight.clone(), self.bias.clone()]
    }

    /// `[n, c, h, w]` features before the stage → `[n, categories]` logits, differentiable.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (_, block) in &self.blocks {
            h = block.forward_differentiable(&h)?;
        }
        let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        Ok(pooled.matmul(&self.weight.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())?)
    }

    fn guesses(&self, features: &Tensor, device: &Device) -> Result<Vec<u32>> {
        let mut guesses = Vec::with_capacity(features.dim(0)?);
        for i in (0..features.dim(0)?).step_by(64) {
            let n = 64.min(features.dim(0)? - i);
            let logits = self.logits(&features.narrow(0, i, n)?.to_dtype(DType::F32)?.to_device(device)?)?.detach();
            guesses.extend(logits.argmax(D::Minus1)?.to_device(&Device::Cpu)?.to_vec1::<u32>()?);
        }
        Ok(guesses)
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self.blocks.iter().flat_map(|(i, b)| b.tensors(&category_stage_prefix(*i))).collect();
        named.push((CATEGORY_STAGE_WEIGHT.to_string(), self.weight.as_tensor().clone()));
        named.push((CATEGORY_STAGE_BIAS.to_string(), self.bias.as_tensor().clone()));
        named
    }
}

/// Writes the starting file's tensors and the tuned stage, with the configuration saying
/// which blocks it replaces, how it was trained (`record`) and a new version (the
/// catalog's categories may change).
fn save(from: &Path, out: &Path, base: &EmbedderConfig, params: &Params, record: serde_json::Value) -> Result<()> {
    let mut tensors = candle_core::safetensors::load(from, &Device::Cpu)?;
    tensors.retain(|name, _| !name.starts_with("category_stage."));
    let mut hasher = blake3::Hasher::new();
    hasher.update(base.version.as_bytes());
    for (name, t) in params.tensors() {
        for v in t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()? {
            hasher.update(&v.to_le_bytes());
        }
        tensors.insert(name, t.detach());
    }
    let mut config = base.clone();
    config.category_stage = params.blocks.iter().map(|(i, _)| *i).collect();
    let embedding_version = base.version.split("-cs-").next().unwrap_or(&base.version);
    config.version = format!("{embedding_version}-cs-{}", &hasher.finalize().to_hex()[..8]);
    config.training = match base.training.clone() {
        serde_json::Value::Object(mut map) => {
            map.insert("category_stage".into(), record);
            serde_json::Value::Object(map)
        }
        other => serde_json::json!({"embedding": other, "category_stage": record}),
    };
    weights_file::save(out, &tensors, &config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped_embedder() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/embedder-lite0.safetensors")
    }

    #[test]
    fn a_jittered_box_moves_each_side_by_at_most_a_tenth_and_a_whole_photo_stays_whole() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let image = PathBuf::from("a.jpg");
        let spec = CropSpec::Box { image: image.clone(), bbox: Some([100.0, 50.0, 300.0, 450.0]) };
        let mut moved = 0;
        for _ in 0..200 {
            let CropSpec::Box { bbox: Some(b), .. } = jittered(&spec, &mut rng) else { panic!("a box stays a box") };
            let limits = [20.0, 40.0, 20.0, 40.0];
            for ((v, base), limit) in b.iter().zip([100.0, 50.0, 300.0, 450.0]).zip(limits) {
                assert!((v - base).abs() <= limit, "{b:?}");
            }
            moved += usize::from(b != [100.0, 50.0, 300.0, 450.0]);
        }
        assert!(moved > 190, "boxes should move: {moved}");
        let whole = CropSpec::Box { image, bbox: None };
        assert_eq!(jittered(&whole, &mut rng), whole);
    }

    #[test]
    fn the_tuned_blocks_run_to_the_last_block_from_the_chosen_one() {
        assert_eq!(tuned_blocks(11..16, None).unwrap(), [11, 12, 13, 14, 15]);
        assert_eq!(tuned_blocks(11..16, Some(14)).unwrap(), [14, 15]);
        assert_eq!(tuned_blocks(11..16, Some(3)).unwrap(), (3..16).collect::<Vec<_>>());
        for bad in [Some(0), Some(16), Some(40)] {
            assert!(matches!(tuned_blocks(11..16, bad), Err(Error::InvalidSetting { name: "first-block", .. })), "{bad:?}");
        }
    }

    #[test]
    fn smoothing_spreads_a_share_of_the_label_over_all_classes() {
        let logits = Tensor::new(&[[3.0f32, 0.0, -1.0], [0.5, 0.5, 2.0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let loss = |e: f64| smoothed_cross_entropy(&logits, &labels, e).unwrap().to_scalar::<f32>().unwrap();
        let plain = candle_nn::loss::cross_entropy(&logits, &labels).unwrap().to_scalar::<f32>().unwrap();
        assert!((loss(0.0) - plain).abs() < 1e-6);
        // By hand: (1 − ε) · CE + ε · the mean of −log p over every class of every sample.
        let rows = [[3.0f32, 0.0, -1.0], [0.5, 0.5, 2.0]];
        let log_p: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| {
                let z = r.iter().map(|v| v.exp()).sum::<f32>().ln();
                r.iter().map(|v| v - z).collect()
            })
            .collect();
        let spread = -log_p.iter().flatten().sum::<f32>() / 6.0;
        assert!((loss(0.1) - (0.9 * plain + 0.1 * spread)).abs() < 1e-5, "{} vs {}", loss(0.1), 0.9 * plain + 0.1 * spread);
        assert!(loss(0.1) > plain, "confident right answers cost more once smoothed");
    }

    #[test]
    fn mirroring_flips_only_the_chosen_samples() {
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((2, 1, 2, 3)).unwrap();
        let y = mirrored(&x, &[false, true]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(y, [0., 1., 2., 3., 4., 5., 8., 7., 6., 11., 10., 9.]);
    }

    /// What training computes is what the saved file serves: the stage's logits through the
    /// differentiable blocks, and the embedder loaded from the written file reading the
    /// same crop through its inference kernels, with the embedding unchanged.
    #[test]
    fn a_saved_stage_names_crops_as_in_training_and_leaves_the_embedding_as_it_was() {
        let device = Device::Cpu;
        let shipped = GarmentEmbedder::load(&shipped_embedder(), &device).unwrap();
        let stage: Vec<usize> = shipped.backbone().coarsest_stage().collect();
        let params = Params::from_backbone(&shipped, &stage, shipped.config().categories.len(), 7, &device).unwrap();
        // A linear layer that separates classes clearly, so a wrong path shows.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, c) = params.weight.as_tensor().dims2().unwrap();
        let w: Vec<f32> = (0..n * c).map(|_| rng.random_range(-0.5f32..0.5)).collect();
        params.weight.set(&Tensor::from_vec(w, (n, c), &device).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(GarmentEmbedder::backbone_path(&shipped_embedder(), shipped.config()), dir.path().join(&shipped.config().backbone)).unwrap();
        let out = dir.path().join("staged.safetensors");
        save(&shipped_embedder(), &out, shipped.config(), &params, serde_json::json!({"test": true})).unwrap();
        let staged = GarmentEmbedder::load(&out, &device).unwrap();
        assert!(staged.has_category_stage());
        assert_eq!(staged.config().category_stage, stage);
        assert_ne!(staged.version(), shipped.version(), "the catalog's categories may change: a new version");

        let input = Tensor::rand(-1f32, 1.0, (2, 3, 224, 224), &device).unwrap();
        let read = staged.read_batch(&input).unwrap();
        let before = shipped.read_batch(&input).unwrap();
        let features = shipped.backbone().features_before(&input, stage[0]).unwrap();
        let trained = candle_nn::ops::softmax_last_dim(&params.logits(&features).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        let embedded = staged.embed_batch(&input).unwrap();
        for (((r, b), t), e) in read.iter().zip(&before).zip(&trained).zip(&embedded) {
            assert_eq!(&r.embedding, e, "reading and embedding alone give the same vector");
            assert_eq!(r.embedding, b.embedding, "the embedding must not change");
            let p = r.categories.as_ref().unwrap();
            assert!(p.iter().zip(t).all(|(a, b)| (a - b).abs() < 1e-4), "{p:?} vs {t:?}");
            assert_ne!(p, b.categories.as_ref().unwrap(), "the stage, not the head on the embedding, names the crop");
        }
    }
}
