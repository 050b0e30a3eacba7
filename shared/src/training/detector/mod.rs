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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::checkpoint::Checkpoint;
use views::Targets;
use super::{Progress, ProgressFn};
use crate::datasets::{Df2Annotation, Df2Folder, Df2Image};
use crate::evaluation::detection::{self, ApSummary, HEADLINE};
use crate::geometry::BBox;
use crate::models::detector::{Category, DetectorConfig, DetectorHead, ParamInit, Postprocess, decode, head_inputs, input_channels, location_grid};
use crate::models::efficientnet_lite::EfficientNetLite;
use crate::vision::{DecodeLimits, Normalisation, Preprocess, decode_image};
use crate::{Error, Result};

mod views;

/// Version of the view generation, part of the feature cache key: bump it whenever
/// [`views`] changes what a seed produces.
const VIEW_VERSION: u32 = 1;
/// Views per cache shard.
const SHARD: usize = 64;

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
    pub batch: usize,
    pub lr: f64,
    pub size: u32,
    pub channels: usize,
    pub tower: usize,
    /// Coarsest level from the backbone's 1280-d head features.
    pub semantic_top: bool,
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

/// A photo with its boxes.
#[derive(Debug, Clone)]
struct Sample {
    /// The split key: the DeepFashion2 `pair_id` (for CCP photos the CCP id), so a street
    /// photo and its shop images fall on the same side.
    pair_id: u64,
    image: PathBuf,
    boxes: Vec<(usize, BBox)>,
    /// The item number (`itemN`) of each box: its value in the mask.
    items: Vec<u32>,
    /// `masks/<stem>.png` beside `image/`, when the folder has one (copy-paste donors).
    mask: Option<PathBuf>,
}

/// One cached view: which image, which augmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ViewSpec {
    image: PathBuf,
    view: u32,
    seed: u64,
    /// A shop view (see [`views::shop_view`]); street otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    shop: bool,
    /// Further cut-outs placed on the same canvas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    partners: Vec<PathBuf>,
    /// A catalog photo whose corner may become the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backdrop: Option<PathBuf>,
    /// A street photo whose garments are pasted into this one (copy-paste).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    donor: Option<PathBuf>,
}

impl ViewSpec {
    fn street(image: &Path, view: u32, seed: u64) -> Self {
        Self { image: image.to_path_buf(), view, seed, shop: false, partners: Vec::new(), backdrop: None, donor: None }
    }
}

/// The cached views of each training street photo: view 0 the photo, 1 its mirror, later
/// ones random; with `copy_paste`, half of the random ones take garments from another
/// training photo with a mask.
fn street_specs(train: &[&Sample], views: usize, copy_paste: bool, seed: u64) -> Vec<ViewSpec> {
    let donors: Vec<&PathBuf> = train.iter().filter(|s| s.mask.is_some()).map(|s| &s.image).collect();
    let mut specs = Vec::with_capacity(train.len() * views);
    for s in train {
        for v in 0..views as u32 {
            let mut spec = ViewSpec::street(&s.image, v, seed.wrapping_mul(1_000_003) ^ (s.pair_id << 8) ^ v as u64);
            let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0xd0_0a);
            if copy_paste && v >= 2 && !donors.is_empty() && rng.random_bool(0.5) {
                spec.donor = Some(donors[rng.random_range(0..donors.len())].clone());
            }
            specs.push(spec);
        }
    }
    specs
}

/// A folder's images with their annotations, read once.
struct Annotated<'a> {
    folder: &'a Df2Folder,
    annos: Vec<(&'a Df2Image, Df2Annotation)>,
}

impl<'a> Annotated<'a> {
    fn read(folder: &'a Df2Folder) -> Result<Self> {
        let annos = folder.images().iter().map(|entry| Ok((entry, Df2Annotation::read(&entry.annotation)?))).collect::<Result<_>>()?;
        Ok(Self { folder, annos })
    }
}

/// The category names of `folders` by id; one id must keep one name.
fn taxonomy(folders: &[&Annotated<'_>]) -> Result<Vec<Category>> {
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for (entry, anno) in folders.iter().flat_map(|f| &f.annos) {
        for item in &anno.items {
            match names.get(&item.category_id) {
                Some(n) if *n != item.category_name => {
                    return Err(Error::MalformedDataset {
                        file: entry.annotation.clone(),
                        field: format!("item{}.category_name", item.index),
                        reason: format!("category {} is called {n:?} elsewhere, {:?} here", item.category_id, item.category_name),
                    });
                }
                Some(_) => {}
                None => {
                    names.insert(item.category_id, item.category_name.clone());
                }
            }
        }
    }
    Ok(names.into_iter().map(|(id, name)| Category { id, name }).collect())
}

/// The images of `folder` with their valid boxes as class indices of `categories`.
fn read_samples(folder: &Annotated<'_>, categories: &[Category]) -> Vec<Sample> {
    let index: HashMap<u32, usize> = categories.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
    folder
        .annos
        .iter()
        .map(|(entry, anno)| {
            let (boxes, items) = anno.items.iter().filter(|i| i.bbox.is_valid()).filter_map(|i| Some(((*index.get(&i.category_id)?, i.bbox), i.index))).unzip();
            let mask = entry.image.file_stem().map(|stem| folder.folder.root().join("masks").join(stem).with_extension("png")).filter(|m| m.is_file());
            Sample { pair_id: anno.pair_id, image: entry.image.clone(), boxes, items, mask }
        })
        .collect()
}

/// Training photos of the CC0 catalog's training senders, as shop-view backgrounds.
fn backdrops(catalog: &Path) -> Result<Vec<PathBuf>> {
    Ok(super::catalog_photos(catalog)?.into_iter().filter(|p| !super::is_validation_sender(p.sender)).map(|p| p.image).collect())
}

/// The shop views of each training shop image: view 0 alone; each later view adds up to
/// two partners (none for about half of them) and maybe a backdrop, all drawn from `seed`.
fn shop_specs(train: &[&Sample], backdrops: &[PathBuf], views: usize, seed: u64) -> Vec<ViewSpec> {
    let mut specs = Vec::with_capacity(train.len() * views);
    for (i, s) in train.iter().enumerate() {
        for v in 0..views as u32 {
            let view_seed = seed.wrapping_mul(1_000_003) ^ ((i as u64) << 12) ^ 0x5409 ^ v as u64;
            let mut rng = ChaCha8Rng::seed_from_u64(view_seed);
            let partners = match (v, rng.random_range(0..100u32)) {
                (0, _) | (_, 0..50) => 0,
                (_, 50..80) => 1,
                _ => 2,
            };
            let partners = (0..partners).map(|_| train[rng.random_range(0..train.len())].image.clone()).collect();
            let backdrop = (v > 0 && !backdrops.is_empty()).then(|| backdrops[rng.random_range(0..backdrops.len())].clone());
            specs.push(ViewSpec { image: s.image.clone(), view: v, seed: view_seed, shop: true, partners, backdrop, donor: None });
        }
    }
    specs
}

/// Pyramid features (f16, CPU, one tensor per level) and targets of `specs`, cached in
/// shards keyed by the backbone's hash and the shard's specs.
#[allow(clippy::too_many_arguments)]
fn view_features(
    backbone: &EfficientNetLite,
    backbone_hash: &blake3::Hash,
    specs: &[ViewSpec],
    samples: &HashMap<&Path, &Sample>,
    pre: &Preprocess,
    name: &str,
    cache: &Path,
    device: &Device,
    progress: ProgressFn,
) -> Result<(Vec<Tensor>, Vec<Targets>)> {
    progress(Progress::Stage { name: format!("backbone features: {name}"), total: specs.len() as u64 });
    let mut levels: Vec<Vec<Tensor>> = Vec::new();
    let mut targets = Vec::with_capacity(specs.len());
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    let mut decoded = HashMap::new();
    for shard in specs.chunks(SHARD) {
        let mut hasher = blake3::Hasher::new();
        hasher.update(backbone_hash.as_bytes());
        hasher.update(&VIEW_VERSION.to_le_bytes());
        hasher.update(serde_json::to_string(&(pre, shard)).expect("specs serialise").as_bytes());
        let file = cache.join(format!("detector-{name}-{}.safetensors", &hasher.finalize().to_hex()[..16]));
        if let Some((maps, t)) = read_shard(&file) {
            for (i, m) in maps.into_iter().enumerate() {
                if levels.len() <= i {
                    levels.push(Vec::new());
                }
                levels[i].push(m);
            }
            targets.extend(t);
            progress(Progress::Advance(shard.len() as u64));
            continue;
        }
        let mut shard_maps: Vec<Vec<Tensor>> = Vec::new();
        let mut shard_targets = Vec::new();
        for chunk in shard.chunks(8) {
            let mut inputs = Vec::with_capacity(chunk.len());
            for spec in chunk {
                let (view, t) = render_view(spec, &mut decoded, samples, pre)?;
                inputs.push(pre.to_tensor(&view, &Device::Cpu)?);
                shard_targets.push(t);
            }
            let batch = Tensor::stack(&inputs, 0)?.to_device(device)?;
            for (i, level) in backbone.pyramid(&batch)?.into_iter().enumerate() {
                if shard_maps.len() <= i {
                    shard_maps.push(Vec::new());
                }
                shard_maps[i].push(level.to_dtype(DType::F16)?.to_device(&Device::Cpu)?);
            }
            progress(Progress::Advance(chunk.len() as u64));
        }
        let maps: Vec<Tensor> = shard_maps.iter().map(|m| Tensor::cat(m, 0)).collect::<candle_core::Result<_>>()?;
        write_shard(&file, &maps, &shard_targets)?;
        for (i, m) in maps.into_iter().enumerate() {
            if levels.len() <= i {
                levels.push(Vec::new());
            }
            levels[i].push(m);
        }
        targets.extend(shard_targets);
    }
    let levels = levels.iter().map(|l| Tensor::cat(l, 0)).collect::<candle_core::Result<Vec<_>>>()?;
    Ok((levels, targets))
}

/// The view `spec` names, with its targets. `decoded` keeps the images (and masks) of the
/// views rendered so far: cut-outs and photos are reused by the next views.
fn render_view(spec: &ViewSpec, decoded: &mut HashMap<PathBuf, RgbImage>, samples: &HashMap<&Path, &Sample>, pre: &Preprocess) -> Result<(RgbImage, Targets)> {
    // Views come grouped by image; keeping more than a few photos decoded gains nothing.
    if decoded.len() > 64 {
        decoded.clear();
    }
    let paths: Vec<&PathBuf> = std::iter::once(&spec.image).chain(&spec.partners).chain(&spec.backdrop).chain(&spec.donor).collect();
    for path in &paths {
        if !decoded.contains_key(*path) {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            decoded.insert((*path).clone(), decode_image(&bytes, DecodeLimits::default())?);
        }
    }
    let labelled = |p: &PathBuf| views::Labelled { image: &decoded[p], boxes: samples.get(p.as_path()).map_or(&[][..], |s| s.boxes.as_slice()) };
    if !spec.shop {
        let donor = match spec.donor.as_ref().and_then(|d| samples.get(d.as_path())) {
            Some(d) => {
                let mask_path = d.mask.as_ref().expect("donors have masks");
                let bytes = std::fs::read(mask_path).map_err(|e| Error::io(mask_path, e))?;
                let mask = image::load_from_memory(&bytes).map_err(|e| Error::MalformedDataset { file: mask_path.clone(), field: "(mask)".into(), reason: e.to_string() })?.to_luma8();
                let garments: Vec<(usize, BBox, u32)> = d.boxes.iter().zip(&d.items).map(|(&(c, b), &i)| (c, b, i)).collect();
                Some((mask, garments, &decoded[&d.image]))
            }
            None => None,
        };
        let donor = donor.as_ref().map(|(mask, garments, image)| views::Donor { image, mask, garments });
        return Ok(views::street_view(labelled(&spec.image), donor, spec.view, spec.seed, pre));
    }
    let cutouts: Vec<views::Labelled> = std::iter::once(&spec.image).chain(&spec.partners).map(labelled).collect();
    Ok(views::shop_view(&cutouts, spec.backdrop.as_ref().map(|b| &decoded[b]), spec.view, spec.seed, pre))
}

fn read_shard(file: &Path) -> Option<(Vec<Tensor>, Vec<Targets>)> {
    let bytes = std::fs::read(file).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    let targets: Vec<Targets> = serde_json::from_str(meta.metadata().as_ref()?.get("targets")?).ok()?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).ok()?;
    let mut maps = Vec::new();
    while let Some(t) = tensors.remove(&format!("level{}", maps.len())) {
        maps.push(t);
    }
    (!maps.is_empty()).then_some((maps, targets))
}

fn write_shard(file: &Path, maps: &[Tensor], targets: &[Targets]) -> Result<()> {
    let meta = HashMap::from([("targets".to_string(), serde_json::to_string(targets).expect("targets serialise"))]);
    let named: Vec<(String, &Tensor)> = maps.iter().enumerate().map(|(i, t)| (format!("level{i}"), t)).collect();
    let tmp = file.with_extension("tmp");
    safetensors::serialize_to_file(named.iter().map(|(k, t)| (k.as_str(), *t)), Some(meta), &tmp)
        .map_err(|e| Error::InvalidWeights { reason: format!("writing {}: {e}", tmp.display()) })?;
    std::fs::rename(&tmp, file).map_err(|e| Error::io(file, e))
}

/// Size range of each level's boxes (largest distance from a location to a side, pixels).
fn level_ranges(levels: usize) -> Vec<(f32, f32)> {
    (0..levels)
        .map(|l| {
            let lo = if l == 0 { 0.0 } else { 64.0 * (1 << (l - 1)) as f32 };
            let hi = if l + 1 == levels { f32::INFINITY } else { 64.0 * (1 << l) as f32 };
            (lo, hi)
        })
        .collect()
}

/// What a location must predict: `(class, [l, t, r, b] in strides, centre-ness)`, or
/// background.
pub type LocationTarget = Option<(usize, [f32; 4], f32)>;

/// FCOS targets of one view at every location: `(class, [l, t, r, b] in strides,
/// centre-ness)` for positives.
pub fn assign(grid: &[(f32, f32, f32)], strides: &[usize], targets: &[(usize, [f32; 4])]) -> Vec<LocationTarget> {
    const RADIUS: f32 = 1.5;
    let ranges = level_ranges(strides.len());
    grid.iter()
        .map(|&(x, y, s)| {
            let level = strides.iter().position(|&st| st as f32 == s).unwrap_or(0);
            let (lo, hi) = ranges[level];
            let mut best: Option<(f32, usize, [f32; 4])> = None;
            for &(class, [x1, y1, x2, y2]) in targets {
                let (l, t, r, b) = (x - x1, y - y1, x2 - x, y2 - y);
                if l.min(t).min(r).min(b) <= 0.0 {
                    continue;
                }
                let (cx, cy) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
                let (cx1, cy1, cx2, cy2) = ((cx - RADIUS * s).max(x1), (cy - RADIUS * s).max(y1), (cx + RADIUS * s).min(x2), (cy + RADIUS * s).min(y2));
                if !(x > cx1 && x < cx2 && y > cy1 && y < cy2) {
                    continue;
                }
                let m = l.max(t).max(r).max(b);
                if m <= lo || m > hi {
                    continue;
                }
                let area = (x2 - x1) * (y2 - y1);
                if best.is_none_or(|(a, _, _)| area < a) {
                    best = Some((area, class, [l / s, t / s, r / s, b / s]));
                }
            }
            best.map(|(_, class, d)| {
                let centreness = ((d[0].min(d[2]) / d[0].max(d[2])) * (d[1].min(d[3]) / d[1].max(d[3]))).sqrt();
                (class, d, centreness)
            })
        })
        .collect()
}

/// Dense target tensors of a batch: one-hot classes `[b, k, n]`, distances `[b, 4, n]`
/// (1 at negatives), centre-ness `[b, 1, n]`, positive mask `[b, 1, n]`.
fn target_tensors(assigned: &[Vec<LocationTarget>], k: usize, device: &Device) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (b, n) = (assigned.len(), assigned.first().map_or(0, Vec::len));
    let mut cls = vec![0f32; b * k * n];
    let mut reg = vec![1f32; b * 4 * n];
    let mut ctr = vec![0f32; b * n];
    let mut pos = vec![0f32; b * n];
    for (i, a) in assigned.iter().enumerate() {
        for (loc, t) in a.iter().enumerate() {
            if let Some((class, d, c)) = t {
                cls[(i * k + class) * n + loc] = 1.0;
                for (j, v) in d.iter().enumerate() {
                    reg[(i * 4 + j) * n + loc] = *v;
                }
                ctr[i * n + loc] = *c;
                pos[i * n + loc] = 1.0;
            }
        }
    }
    Ok((
        Tensor::from_vec(cls, (b, k, n), device)?,
        Tensor::from_vec(reg, (b, 4, n), device)?,
        Tensor::from_vec(ctr, (b, 1, n), device)?,
        Tensor::from_vec(pos, (b, 1, n), device)?,
    ))
}

/// Numerically stable binary cross-entropy with logits, elementwise.
fn bce_with_logits(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let log1p_exp = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    Ok(((x.relu()? - (x * t)?)? + log1p_exp)?)
}

/// The three FCOS losses of head output `out` `[b, k + 5, n]`: `(classes, boxes, centre-ness)`.
fn losses(out: &Tensor, k: usize, cls_t: &Tensor, reg_t: &Tensor, ctr_t: &Tensor, pos: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let logits = out.narrow(1, 0, k)?;
    let dist = out.narrow(1, k, 4)?;
    let ctr_logit = out.narrow(1, k + 4, 1)?;
    let num_pos = pos.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;

    // Sigmoid focal loss, α = 0.25, γ = 2.
    let p = (logits.neg()?.exp()? + 1.0)?.recip()?;
    let ce = bce_with_logits(&logits, cls_t)?;
    let p_t = ((&p * cls_t)? + ((1.0 - &p)? * (1.0 - cls_t)?)?)?;
    let alpha_t = ((cls_t * 0.25)? + ((1.0 - cls_t)? * 0.75)?)?;
    let focal = (alpha_t * (1.0 - p_t)?.sqr()?)?.mul(&ce)?;
    let cls_loss = (focal.sum_all()? / num_pos)?;

    // GIoU of boxes around the same location, in strides.
    let side = |t: &Tensor, i: usize| t.narrow(1, i, 1);
    let (pl, pt, pr, pb) = (side(&dist, 0)?, side(&dist, 1)?, side(&dist, 2)?, side(&dist, 3)?);
    let (tl, tt, tr, tb) = (side(reg_t, 0)?, side(reg_t, 1)?, side(reg_t, 2)?, side(reg_t, 3)?);
    let area_p = ((&pl + &pr)? * (&pt + &pb)?)?;
    let area_t = ((&tl + &tr)? * (&tt + &tb)?)?;
    let inter = ((pl.minimum(&tl)? + pr.minimum(&tr)?)? * (pt.minimum(&tt)? + pb.minimum(&tb)?)?)?;
    let union = ((area_p + area_t)? - &inter)?;
    let enclose = ((pl.maximum(&tl)? + pr.maximum(&tr)?)? * (pt.maximum(&tt)? + pb.maximum(&tb)?)?)?;
    let iou = (&inter / &union)?;
    let giou = (iou - ((&enclose - &union)? / &enclose)?)?;
    let weight = (ctr_t * pos)?;
    let weight_sum = weight.sum_all()?.to_scalar::<f32>()?.max(1e-6) as f64;
    let box_loss = (((1.0 - giou)? * &weight)?.sum_all()? / weight_sum)?;

    let ctr_loss = ((bce_with_logits(&ctr_logit, ctr_t)? * pos)?.sum_all()? / num_pos)?;
    Ok((cls_loss, box_loss, ctr_loss))
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

/// Runs `head` on cached features: each view's raw output `[k + 5, locations]`, flattened.
fn head_outputs(backbone: &EfficientNetLite, config: &DetectorConfig, head: &DetectorHead, levels: &[Tensor], device: &Device) -> Result<Vec<Vec<f32>>> {
    let n = levels[0].dim(0)?;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(32) {
        let len = 32.min(n - start);
        let feats = levels.iter().map(|l| l.narrow(0, start, len)?.to_device(device)?.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
        let raw = head.forward(&head_inputs(backbone, config, feats)?)?.to_device(&Device::Cpu)?;
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

/// The training and validation images of one domain.
struct Split<'a> {
    train: Vec<&'a Sample>,
    val: Vec<&'a Sample>,
}

impl<'a> Split<'a> {
    /// Validation = `pair_id % 5 == 1`; images without a box are left out.
    fn of(samples: &'a [Sample]) -> Self {
        let (val, train) = samples.iter().filter(|s| !s.boxes.is_empty()).partition(|s| s.pair_id % 5 == 1);
        Self { train, val }
    }
}

/// A head's parameters taken from an earlier detector (`--init`): its config must match
/// the run's taxonomy and shape.
fn init_weights(path: &Path, config: &DetectorConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
    let earlier: DetectorConfig = crate::models::weights_file::read_config(path)?;
    let same = earlier.categories == config.categories && earlier.channels == config.channels && earlier.tower == config.tower && earlier.strides == config.strides && earlier.semantic_top == config.semantic_top;
    if !same {
        return Err(Error::InvalidSetting { name: "init", reason: format!("{} has another taxonomy or head shape than this run", path.display()) });
    }
    candle_core::safetensors::load(path, device).map_err(|e| Error::InvalidWeights { reason: format!("{}: {e}", path.display()) })
}

/// Validation of `head` on cached features: AP (evaluation post-processing) and garments
/// per image (the config's serving post-processing).
fn validate(backbone: &EfficientNetLite, config: &DetectorConfig, head: &DetectorHead, levels: &[Tensor], targets: &[Targets], grid: &[(f32, f32, f32)], device: &Device) -> Result<(ApSummary, f64)> {
    let outputs = head_outputs(backbone, config, head, levels, device)?;
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
    let backbone = EfficientNetLite::load(&cfg.backbone, &cfg.device)?;
    let street_folder = Df2Folder::open(&cfg.data)?;
    let shop_folder = cfg.shop.as_ref().map(Df2Folder::open).transpose()?;
    let street_annos = Annotated::read(&street_folder)?;
    let shop_annos = shop_folder.as_ref().map(Annotated::read).transpose()?;
    let categories = taxonomy(&std::iter::once(&street_annos).chain(shop_annos.as_ref()).collect::<Vec<_>>())?;
    let k = categories.len();
    let street_samples = read_samples(&street_annos, &categories);
    let shop_samples = shop_annos.as_ref().map(|a| read_samples(a, &categories)).unwrap_or_default();
    let (street, shop) = (Split::of(&street_samples), Split::of(&shop_samples));
    if street.train.is_empty() || street.val.is_empty() || (cfg.shop.is_some() && (shop.train.is_empty() || shop.val.is_empty())) {
        return Err(Error::InvalidSetting {
            name: "data",
            reason: format!("{}/{} training/validation photos and {}/{} shop images with boxes: need both of each", street.train.len(), street.val.len(), shop.train.len(), shop.val.len()),
        });
    }
    progress(Progress::Message(format!(
        "{} categories ({}); {} training photos, {} validation photos; {} training shop images, {} validation shop images",
        k,
        categories.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "),
        street.train.len(),
        street.val.len(),
        shop.train.len(),
        shop.val.len()
    )));
    let pre = Preprocess { size: cfg.size, normalisation: Normalisation::TfLite, pad_rgb: [255, 255, 255] };
    let mut config = DetectorConfig {
        backbone: cfg.backbone.file_name().and_then(|f| f.to_str()).unwrap_or("efficientnet-lite0.safetensors").to_string(),
        categories: categories.clone(),
        preprocess: pre,
        channels: cfg.channels,
        tower: cfg.tower,
        groups: 16.min(cfg.channels).max(1),
        strides: vec![8, 16, 32],
        semantic_top: cfg.semantic_top,
        postprocess: Postprocess::SERVING,
        version: String::new(),
        training: serde_json::Value::Null,
    };
    while !config.channels.is_multiple_of(config.groups) {
        config.groups -= 1;
    }
    config.validate()?;
    let in_channels = input_channels(&backbone, &config);
    if in_channels.len() != config.strides.len() {
        return Err(Error::InvalidWeights { reason: format!("the backbone gives {} pyramid levels, expected 3", in_channels.len()) });
    }
    let init = cfg.init.as_ref().map(|p| init_weights(p, &config, &cfg.device)).transpose()?;

    let samples: HashMap<&Path, &Sample> = street_samples.iter().chain(&shop_samples).map(|s| (s.image.as_path(), s)).collect();
    let mut train_specs = street_specs(&street.train, cfg.views, cfg.copy_paste, cfg.seed);
    let shop_offset = train_specs.len();
    let backdrops = cfg.catalog.as_deref().map(backdrops).transpose()?.unwrap_or_default();
    train_specs.extend(shop_specs(&shop.train, &backdrops, cfg.shop_views, cfg.seed));
    let val_specs: Vec<ViewSpec> = street.val.iter().map(|s| ViewSpec::street(&s.image, 0, 0)).collect();
    let shop_val_specs: Vec<ViewSpec> = shop.val.iter().map(|s| ViewSpec { shop: true, ..ViewSpec::street(&s.image, 0, 0) }).collect();
    let backbone_hash = blake3::hash(&std::fs::read(&cfg.backbone).map_err(|e| Error::io(&cfg.backbone, e))?);
    let features = |specs: &[ViewSpec], name: &str, progress: ProgressFn| view_features(&backbone, &backbone_hash, specs, &samples, &pre, name, &cfg.cache, &cfg.device, progress);
    let (train_levels, train_targets) = features(&train_specs, "train", progress)?;
    let (val_levels, val_targets) = features(&val_specs, "val", progress)?;
    let shop_val = if shop_val_specs.is_empty() { None } else { Some(features(&shop_val_specs, "shop-val", progress)?) };
    let feature_seconds = started.elapsed().as_secs_f64();
    let grid = location_grid(cfg.size as usize, &config.strides);
    let assigned: Vec<_> = train_targets.iter().map(|t| assign(&grid, &config.strides, t)).collect();
    let positives: usize = assigned.iter().map(|a| a.iter().filter(|x| x.is_some()).count()).sum();
    progress(Progress::Message(format!("{} cached views, {:.1} positive locations per view", train_targets.len(), positives as f64 / train_targets.len() as f64)));

    // Parameters: drawn from the seed (or taken from --init), held in a VarMap for saving
    // and resuming.
    let mut varmap = VarMap::new();
    let mut init_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let head = {
        let data = varmap.data();
        DetectorHead::build(&config, &in_channels, &mut |name, shape, param_init| {
            let value = match init.as_ref().and_then(|t| t.get(name)) {
                Some(t) if t.dims() == shape => t.to_dtype(DType::F32)?,
                Some(t) => return Err(Error::InvalidWeights { reason: format!("--init: {name} has shape {:?}, expected {shape:?}", t.dims()) }),
                None => init_tensor(shape, &param_init, &mut init_rng, &cfg.device)?,
            };
            let var = Var::from_tensor(&value)?;
            let t = var.as_tensor().clone();
            data.lock().expect("varmap lock").insert(name.to_string(), var);
            Ok(t)
        })?
    };
    let checkpoint = Checkpoint::beside(&cfg.out);
    let first_epoch = checkpoint.resume(cfg.resume, &mut varmap, progress)?;
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: cfg.lr, weight_decay: 1e-4, ..Default::default() })?;
    let shop_per_epoch = if shop.train.is_empty() { 0 } else { cfg.shop_per_epoch.min(shop.train.len()) };
    let steps_per_epoch = (street.train.len() + shop_per_epoch).div_ceil(cfg.batch);
    let total_steps = (steps_per_epoch * cfg.epochs) as f64;
    let warmup = (steps_per_epoch as f64).min(100.0);

    let train_started = Instant::now();
    let mut last: Option<(ApSummary, Option<(ApSummary, f64)>)> = None;
    let evaluate = |head: &DetectorHead| -> Result<(ApSummary, Option<(ApSummary, f64)>)> {
        let (street_ap, _) = validate(&backbone, &config, head, &val_levels, &val_targets, &grid, &cfg.device)?;
        let shop_ap = shop_val.as_ref().map(|(levels, targets)| validate(&backbone, &config, head, levels, targets, &grid, &cfg.device)).transpose()?;
        Ok((street_ap, shop_ap))
    };
    for epoch in first_epoch..cfg.epochs {
        // Each epoch's order and views follow from the seed and the epoch alone, so a
        // resumed run sees what an uninterrupted one would: every street photo once, and
        // `shop_per_epoch` shop images, each through one of its cached views.
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ (0x5eed_0000 + epoch as u64));
        let mut picks: Vec<u32> = (0..street.train.len()).map(|i| (i * cfg.views + rng.random_range(0..cfg.views)) as u32).collect();
        let mut shop_order: Vec<usize> = (0..shop.train.len()).collect();
        shop_order.shuffle(&mut rng);
        picks.extend(shop_order[..shop_per_epoch].iter().map(|&j| (shop_offset + j * cfg.shop_views + rng.random_range(0..cfg.shop_views)) as u32));
        picks.shuffle(&mut rng);
        progress(Progress::Stage { name: format!("epoch {}/{}", epoch + 1, cfg.epochs), total: picks.len() as u64 });
        let mut sums = [0f64; 3];
        let mut steps = 0;
        for (b, batch) in picks.chunks(cfg.batch).enumerate() {
            let step = (epoch * steps_per_epoch + b) as f64;
            let lr = if step < warmup {
                cfg.lr * (0.1 + 0.9 * step / warmup)
            } else {
                cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + (std::f64::consts::PI * step / total_steps).cos()))
            };
            opt.set_learning_rate(lr);
            let idx = Tensor::new(batch, &Device::Cpu)?;
            let feats = train_levels.iter().map(|l| l.index_select(&idx, 0)?.to_device(&cfg.device)?.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
            let feats = head_inputs(&backbone, &config, feats)?;
            let batch_assigned: Vec<_> = batch.iter().map(|&i| assigned[i as usize].clone()).collect();
            let (cls_t, reg_t, ctr_t, pos) = target_tensors(&batch_assigned, k, &cfg.device)?;
            let out = head.forward(&feats)?;
            let (l_cls, l_box, l_ctr) = losses(&out, k, &cls_t, &reg_t, &ctr_t, &pos)?;
            let loss = ((&l_cls + &l_box)? + &l_ctr)?;
            opt.backward_step(&loss)?;
            for (s, l) in sums.iter_mut().zip([&l_cls, &l_box, &l_ctr]) {
                *s += l.to_scalar::<f32>()? as f64;
            }
            steps += 1;
            progress(Progress::Advance(batch.len() as u64));
        }
        let n = steps.max(1) as f64;
        let mut line = format!("epoch {}: loss classes {:.4}, boxes {:.4}, centre-ness {:.4}", epoch + 1, sums[0] / n, sums[1] / n, sums[2] / n);
        checkpoint.save(&varmap, epoch + 1)?;
        if (epoch + 1) % cfg.eval_every == 0 || epoch + 1 == cfg.epochs {
            let (summary, shop_summary) = evaluate(&head)?;
            let headline = summary.mean_ap50_over(&headline_classes(&categories));
            line += &format!(
                "; validation AP {:.3}, AP50 {:.3}, headline AP50 {} ({})",
                summary.ap,
                summary.ap50,
                headline.map_or("-".into(), |h| format!("{h:.3}")),
                fmt_ap50(&summary, &categories)
            );
            if let Some((s, per_image)) = &shop_summary {
                let h = s.mean_ap50_over(&headline_classes(&categories));
                line += &format!("; shop AP50 {:.3}, headline {}, {per_image:.2} garments per image ({})", s.ap50, h.map_or("-".into(), |h| format!("{h:.3}")), fmt_ap50(s, &categories));
            }
            last = Some((summary, shop_summary));
        }
        progress(Progress::Message(line));
    }
    let (summary, shop_summary) = match last {
        Some(s) => s,
        None => evaluate(&head)?,
    };
    let final_head = head.detached()?;
    let report = DetectorReport {
        train_images: street.train.len(),
        val_images: street.val.len(),
        train_shop_images: shop.train.len(),
        val_shop_images: shop.val.len(),
        views: cfg.views,
        epochs: cfg.epochs,
        validation: summary.per_class.iter().map(|(c, ap)| (categories[*c].name.clone(), ap.clone())).collect(),
        ap: summary.ap,
        ap50: summary.ap50,
        ap75: summary.ap75,
        headline_ap50: summary.mean_ap50_over(&headline_classes(&categories)),
        shop: shop_summary.map(|(s, per_image)| ShopValidation { ap50: s.ap50, headline_ap50: s.mean_ap50_over(&headline_classes(&categories)), garments_per_image: per_image }),
        feature_seconds,
        train_seconds: train_started.elapsed().as_secs_f64(),
    };
    let mut config = config.versioned(&final_head)?;
    config.training = serde_json::json!({
        "data": cfg.data, "shop": cfg.shop, "catalog_backdrops": cfg.catalog, "init": cfg.init,
        "epochs": cfg.epochs, "seed": cfg.seed, "views": cfg.views, "shop_views": cfg.shop_views, "shop_per_epoch": cfg.shop_per_epoch, "copy_paste": cfg.copy_paste,
        "batch": cfg.batch, "lr": cfg.lr, "semantic_top": cfg.semantic_top, "split": "validation = pair_id % 5 == 1", "report": &report,
    });
    crate::models::detector::GarmentDetector::save_head(&cfg.out, &config, &final_head)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_ranges_follow_fcos() {
        assert_eq!(level_ranges(3), vec![(0.0, 64.0), (64.0, 128.0), (128.0, f32::INFINITY)]);
    }

    #[test]
    fn assignment_picks_level_centre_region_and_smallest_box() {
        let strides = [8, 16, 32];
        let grid = location_grid(64, &strides);
        // A 40-pixel box centred at (20, 20): largest distance ≤ 64 → stride 8 only; the
        // centre region is 1.5 strides (12 px) around the centre.
        let small = (1usize, [0.0f32, 0.0, 40.0, 40.0]);
        let a = assign(&grid, &strides, &[small]);
        let positives: Vec<(f32, f32, f32)> = a.iter().zip(&grid).filter(|(t, _)| t.is_some()).map(|(_, g)| *g).collect();
        assert!(positives.iter().all(|&(x, y, s)| s == 8.0 && (x - 20.0).abs() < 12.0 && (y - 20.0).abs() < 12.0), "{positives:?}");
        assert_eq!(positives.len(), 9, "{positives:?}");
        // At (20, 20): l = t = r = b = 20 px = 2.5 strides, centre-ness 1.
        let at = grid.iter().position(|&g| g == (20.0, 20.0, 8.0)).unwrap();
        let (class, d, c) = a[at].unwrap();
        assert_eq!((class, d, c), (1, [2.5; 4], 1.0));
        // A large box covering the same place: the small box still wins there.
        let large = (0usize, [0.0f32, 0.0, 64.0, 64.0]);
        let b = assign(&grid, &strides, &[large, small]);
        assert_eq!(b[at].unwrap().0, 1);
        // The large box's largest distance at the stride-16 centre (24, 24)… is 40 ≤ 64:
        // no stride-16 location takes it; one stride-32 location near its centre would need
        // a distance above 128, so the 64-px box is a stride-8 object as well.
        assert!(b.iter().zip(&grid).filter(|(t, g)| t.is_some() && g.2 > 8.0).count() == 0);
    }

    #[test]
    fn losses_fall_when_predictions_match_targets() {
        let dev = Device::Cpu;
        let strides = [8usize];
        let grid = location_grid(32, &strides);
        let assigned = vec![assign(&grid, &strides, &[(0, [0.0, 0.0, 30.0, 22.0])])];
        let (cls_t, reg_t, ctr_t, pos) = target_tensors(&assigned, 2, &dev).unwrap();
        let n = grid.len();
        // A perfect prediction: logits ±8 by the targets, distances equal, centre-ness logit
        // of its target.
        let good_cls = ((cls_t.clone() * 16.0).unwrap() - 8.0).unwrap();
        let logit = |p: f32| (p.clamp(1e-4, 1.0 - 1e-4) / (1.0 - p.clamp(1e-4, 1.0 - 1e-4))).ln();
        let ctr_vals: Vec<f32> = ctr_t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(logit).collect();
        let good = Tensor::cat(&[good_cls, reg_t.clone(), Tensor::from_vec(ctr_vals, (1, 1, n), &dev).unwrap()], 1).unwrap();
        let bad = Tensor::cat(&[Tensor::zeros((1, 2, n), DType::F32, &dev).unwrap(), (reg_t.clone() * 3.0).unwrap(), Tensor::zeros((1, 1, n), DType::F32, &dev).unwrap()], 1).unwrap();
        let total = |out: &Tensor| {
            let (a, b, c) = losses(out, 2, &cls_t, &reg_t, &ctr_t, &pos).unwrap();
            [a, b, c].map(|t| t.to_scalar::<f32>().unwrap())
        };
        let (g, b) = (total(&good), total(&bad));
        assert!(pos.sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        assert!(g[0] < 0.01 * b[0], "{g:?} {b:?}");
        assert!(g[1].abs() < 1e-5 && b[1] > 0.3, "{g:?} {b:?}");
        assert!(g[2] < b[2], "{g:?} {b:?}");
    }
}
