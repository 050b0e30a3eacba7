//! The run's crops: the consumer-to-shop pairs and labelled crops read from the data, split
//! into training and validation, laid out as row ranges of one pooled-feature matrix, and
//! pooled through the frozen backbone (cached on disk).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{D, Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::validation::Validation;
use super::{EmbedderTraining, GEM_P};
use crate::datasets::{Df2Annotation, Df2Folder, read_gallery_gt};
use crate::geometry::BBox;
use crate::models::Backbone;
use crate::models::embedder::gem;
use crate::training::tagged::read_tagged;
use crate::training::{CatalogPhoto, Progress, ProgressFn, augment, catalog_photos, is_validation_sender};
use crate::vision::{DecodeLimits, Preprocess, decode_image};
use crate::{Error, Result};

/// Version of the augmentation code, part of the feature cache key: bump it whenever
/// `augment.rs` changes what a seed produces, or stale cached views would be reused.
const AUGMENT_VERSION: u32 = 3;

/// One crop to run through the backbone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) enum CropSpec {
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
pub(super) struct CcpPair {
    pair_id: u64,
    style: u32,
    category: String,
    consumer: CropSpec,
    shop: CropSpec,
    shop_image: PathBuf,
    shop_box: [f32; 4],
}

/// A labelled garment crop without a shop image (style 0 or no gallery entry).
pub(super) struct StreetCrop {
    pair_id: u64,
    category: String,
    spec: CropSpec,
}

type CcpData = (Vec<CcpPair>, Vec<StreetCrop>, Vec<(u64, u32, CropSpec)>);

/// The street garments with a shop image, those without, and every shop image as
/// `(pair_id, style, crop)`.
fn ccp_pairs(data: &Path) -> Result<CcpData> {
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
pub(super) struct PseudoBox {
    image: PathBuf,
    bbox: [f32; 4],
    category: String,
}

/// Detects garments in the tagged photos of `folder` and keeps those whose class is tagged;
/// cached under a key of the detector's bytes, the tags and the threshold.
fn pseudo_boxes(folder: &Path, detector: &Path, min_score: f32, cache: &Path, device: &Device, progress: ProgressFn) -> Result<Vec<PseudoBox>> {
    let (tags_bytes, photos) = read_tagged(folder)?;
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
    let detector = crate::models::detector::GarmentDetector::load(detector, device)?;
    progress(Progress::Stage { name: "pseudo-labels: detecting garments in tagged photos".into(), total: photos.len() as u64 });
    let mut boxes = Vec::new();
    for photo in &photos {
        progress(Progress::Advance(1));
        // A missing or unreadable photo only means fewer pseudo-labels.
        let Ok(image) = read_image(&photo.image) else { continue };
        for d in detector.detect(&image)? {
            if d.score >= min_score && photo.classes.contains(&d.category) {
                boxes.push(PseudoBox { image: photo.image.clone(), bbox: d.bbox.to_array(), category: d.category });
            }
        }
    }
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    std::fs::write(&file, serde_json::to_vec(&boxes).expect("boxes serialise")).map_err(|e| Error::io(&file, e))?;
    Ok(boxes)
}

/// Pooled backbone features of a set of crops: GeM (p = [`GEM_P`]) and average, `[n, 1280]`
/// each, f32 on the CPU.
pub(super) struct Pooled {
    pub gem: Tensor,
    pub avg: Tensor,
}

/// Pools `specs` through the backbone, cached in `cache` under a key of the backbone file's
/// hash and the specs.
fn pooled_features(backbone: &Backbone, backbone_hash: &blake3::Hash, specs: &[CropSpec], name: &str, cache: &Path, device: &Device, progress: ProgressFn) -> Result<Pooled> {
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
    let preprocess = backbone.embedding_preprocess();
    let p = Tensor::new(&[GEM_P as f32], device)?;
    let (mut gems, mut avgs) = (Vec::new(), Vec::new());
    let mut reader = CropReader::new(preprocess);
    for chunk in specs.chunks(8) {
        let batch = reader.batch(chunk)?.to_device(device)?;
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

/// Turns crop specs into the backbone's inputs, decoding each photo once for the specs of
/// it that follow each other.
pub(super) struct CropReader {
    preprocess: Preprocess,
    decoded: Option<(PathBuf, image::RgbImage)>,
}

impl CropReader {
    pub(super) fn new(preprocess: Preprocess) -> Self {
        Self { preprocess, decoded: None }
    }

    /// `[n, 3, s, s]` preprocessed inputs of `specs`, on the CPU.
    pub(super) fn batch(&mut self, specs: &[CropSpec]) -> Result<Tensor> {
        let inputs = specs.iter().map(|spec| self.input(spec)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&inputs, 0)?)
    }

    fn input(&mut self, spec: &CropSpec) -> Result<Tensor> {
        if self.decoded.as_ref().map(|(p, _)| p.as_path()) != Some(spec.image()) {
            self.decoded = Some((spec.image().to_path_buf(), read_image(spec.image())?));
        }
        let image = &self.decoded.as_ref().expect("just decoded").1;
        let preprocess = &self.preprocess;
        match spec {
            CropSpec::Box { bbox, .. } => preprocess.crop_to_tensor(image, bbox.map(|b| BBox::new(b[0], b[1], b[2], b[3])), &Device::Cpu),
            CropSpec::ConsumerView { seed, .. } => {
                let view = augment::consumer_view(image, &mut ChaCha8Rng::seed_from_u64(*seed));
                preprocess.crop_to_tensor(&view, None, &Device::Cpu)
            }
            CropSpec::CatalogRender { bbox, backdrop, seed, .. } => {
                let cutout = preprocess.crop_letterboxed(image, Some(BBox::new(bbox[0], bbox[1], bbox[2], bbox[3])))?;
                let view = augment::catalog_render(&cutout, &read_image(backdrop)?, &mut ChaCha8Rng::seed_from_u64(*seed));
                preprocess.crop_to_tensor(&view, None, &Device::Cpu)
            }
        }
    }
}

fn read_image(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, DecodeLimits::default())
}

/// All crops of a run, pooled into one matrix; groups are row ranges.
#[derive(Default)]
pub(super) struct CropTable {
    specs: Vec<(String, Vec<CropSpec>)>,
}

impl CropTable {
    /// Adds a group; returns the global row of its first crop.
    fn group(&mut self, name: &str, specs: Vec<CropSpec>) -> usize {
        let start = self.specs.iter().map(|(_, s)| s.len()).sum();
        self.specs.push((name.to_string(), specs));
        start
    }

    pub(super) fn pool(&self, backbone: &Backbone, backbone_hash: &blake3::Hash, cache: &Path, device: &Device, progress: ProgressFn) -> Result<Pooled> {
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
pub(super) struct Pair {
    pub consumer: u32,
    pub shop: u32,
    pub shop_render: Option<u32>,
    pub category: u32,
}

/// The run's data, split: validation by CCP pair id (`id % 5 == 1`) and by catalog sender,
/// training the rest.
pub(super) struct Splits {
    train_pairs: Vec<CcpPair>,
    val_pairs: Vec<CcpPair>,
    train_unpaired: Vec<StreetCrop>,
    /// The validation shop images: `(pair_id, style, crop)`.
    val_shop: Vec<(u64, u32, CropSpec)>,
    train_photos: Vec<CatalogPhoto>,
    distractor_photos: Vec<CatalogPhoto>,
    /// Training photos (indices) that become consumer-view pairs, one per sender.
    aug_photos: Vec<usize>,
    pseudo: Vec<PseudoBox>,
    /// The category vocabulary: what the training data labels.
    pub names: Vec<String>,
}

fn is_validation_pair(pair_id: u64) -> bool {
    pair_id % 5 == 1
}

impl Splits {
    pub(super) fn read(cfg: &EmbedderTraining, progress: ProgressFn) -> Result<Self> {
        let (pairs, unpaired, shop_items) = ccp_pairs(&cfg.data)?;
        let (val_pairs, train_pairs): (Vec<CcpPair>, Vec<CcpPair>) = pairs.into_iter().partition(|p| is_validation_pair(p.pair_id));
        let train_unpaired: Vec<StreetCrop> = unpaired.into_iter().filter(|c| !is_validation_pair(c.pair_id)).collect();
        let val_shop = shop_items.into_iter().filter(|(pair_id, _, _)| is_validation_pair(*pair_id)).collect();

        // Catalog: distractor senders for validation, the others for training.
        let mut photos = match &cfg.catalog {
            Some(catalog) => catalog_photos(catalog)?,
            None => Vec::new(),
        };
        photos.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
        let (val_photos, train_photos): (Vec<CatalogPhoto>, Vec<CatalogPhoto>) = photos.into_iter().partition(|p| is_validation_sender(p.sender));
        let distractor_photos = val_photos.into_iter().take(cfg.distractors).collect();
        let mut seen = HashSet::new();
        let aug_photos = (0..train_photos.len()).filter(|&i| seen.insert(train_photos[i].sender)).take(cfg.augment_items).collect();

        let pseudo = match (&cfg.unlabelled, &cfg.detector) {
            (Some(folder), Some(detector)) => pseudo_boxes(folder, detector, cfg.pseudo_min_score, &cfg.cache, &cfg.device, progress)?,
            (Some(_), None) => return Err(Error::InvalidSetting { name: "unlabelled", reason: "pseudo-labels need a detector".into() }),
            _ => Vec::new(),
        };
        let names = train_pairs
            .iter()
            .map(|p| p.category.clone())
            .chain(train_unpaired.iter().map(|c| c.category.clone()))
            .chain(train_photos.iter().map(|p| p.category.clone()))
            .chain(pseudo.iter().map(|p| p.category.clone()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Ok(Self { train_pairs, val_pairs, train_unpaired, val_shop, train_photos, distractor_photos, aug_photos, pseudo, names })
    }

    fn class_of(&self, name: &str) -> Result<u32> {
        let position = self.names.iter().position(|n| n == name);
        position.map(|c| c as u32).ok_or_else(|| Error::InvalidSetting { name: "categories", reason: format!("category {name:?} is not in the training vocabulary") })
    }

    /// Validation categories the training never saw get an index past the vocabulary, so
    /// they count as wrong guesses instead of disappearing.
    fn validation_class(&self, name: &str) -> usize {
        self.names.iter().position(|n| n == name).unwrap_or(self.names.len())
    }

    /// Lays every crop out in one table; the returned rows say where each group starts.
    pub(super) fn lay_out(&self, cfg: &EmbedderTraining) -> (CropTable, Rows) {
        let mut table = CropTable::default();
        let street = table.group("train-street", self.train_pairs.iter().map(|p| p.consumer.clone()).collect());
        let shop = table.group("train-shop", self.train_pairs.iter().map(|p| p.shop.clone()).collect());
        let render = if self.train_photos.is_empty() || cfg.render_share <= 0.0 {
            None
        } else {
            let specs = self
                .train_pairs
                .iter()
                .enumerate()
                .map(|(i, p)| CropSpec::CatalogRender {
                    image: p.shop_image.clone(),
                    bbox: p.shop_box,
                    backdrop: self.train_photos[i % self.train_photos.len()].image.clone(),
                    seed: cfg.seed ^ (0x5eed_0000 + i as u64),
                    augment_version: AUGMENT_VERSION,
                })
                .collect();
            Some(table.group("train-shop-render", specs))
        };
        let unpaired = table.group("train-street-unpaired", self.train_unpaired.iter().map(|c| c.spec.clone()).collect());
        let catalog = table.group("train-catalog", self.train_photos.iter().map(|p| CropSpec::Box { image: p.image.clone(), bbox: None }).collect());
        let views = table.group(
            "train-catalog-views",
            self.aug_photos
                .iter()
                .enumerate()
                .map(|(i, &p)| CropSpec::ConsumerView { image: self.train_photos[p].image.clone(), seed: cfg.seed ^ (i as u64 + 1), augment_version: AUGMENT_VERSION })
                .collect(),
        );
        let pseudo = table.group("train-pseudo", self.pseudo.iter().map(|p| CropSpec::Box { image: p.image.clone(), bbox: Some(p.bbox) }).collect());
        let val = table.group("val-street", self.val_pairs.iter().map(|p| p.consumer.clone()).collect());
        let gallery = table.group("val-shop", self.val_shop.iter().map(|(_, _, s)| s.clone()).collect());
        let distractors = table.group("val-distractors", self.distractor_photos.iter().map(|p| CropSpec::Box { image: p.image.clone(), bbox: None }).collect());
        (table, Rows { street, shop, render, unpaired, catalog, views, pseudo, val, gallery, distractors })
    }

    /// Instance pairs by global row: the street garments with their shop images, then the
    /// catalog's consumer views with their clean photos.
    pub(super) fn instance_pairs(&self, rows: &Rows) -> Result<Vec<Pair>> {
        let mut pairs = Vec::with_capacity(self.train_pairs.len() + self.aug_photos.len());
        for (i, p) in self.train_pairs.iter().enumerate() {
            let (consumer, shop) = ((rows.street + i) as u32, (rows.shop + i) as u32);
            pairs.push(Pair { consumer, shop, shop_render: rows.render.map(|r| (r + i) as u32), category: self.class_of(&p.category)? });
        }
        for (i, &p) in self.aug_photos.iter().enumerate() {
            let photo = &self.train_photos[p];
            pairs.push(Pair { consumer: (rows.views + i) as u32, shop: (rows.catalog + p) as u32, shop_render: None, category: self.class_of(&photo.category)? });
        }
        Ok(pairs)
    }

    /// Labelled crops without a pair, `(row, class)`: unpaired street garments, the
    /// catalog's photos and the pseudo-labelled street crops.
    pub(super) fn labelled(&self, rows: &Rows) -> Result<Vec<(u32, u32)>> {
        let mut labelled = Vec::new();
        for (i, c) in self.train_unpaired.iter().enumerate() {
            labelled.push(((rows.unpaired + i) as u32, self.class_of(&c.category)?));
        }
        for (i, p) in self.train_photos.iter().enumerate() {
            labelled.push(((rows.catalog + i) as u32, self.class_of(&p.category)?));
        }
        for (i, p) in self.pseudo.iter().enumerate() {
            labelled.push(((rows.pseudo + i) as u32, self.class_of(&p.category)?));
        }
        Ok(labelled)
    }

    pub(super) fn validation(&self, rows: &Rows) -> Validation {
        let same_item = |(pid, st): (u64, u32), p: &CcpPair| pid == p.pair_id && st == p.style;
        let distractor_categories: Vec<usize> = self.distractor_photos.iter().map(|p| self.validation_class(&p.category)).collect();
        let shop_categories = self.val_shop.iter().map(|(pid, st, _)| {
            let pair = self.val_pairs.iter().find(|p| same_item((*pid, *st), p));
            pair.map_or(self.names.len(), |p| self.validation_class(&p.category))
        });
        Validation {
            queries: (rows.val..rows.val + self.val_pairs.len()).map(|r| r as u32).collect(),
            query_categories: self.val_pairs.iter().map(|p| self.validation_class(&p.category)).collect(),
            gallery: (rows.gallery..rows.gallery + self.val_shop.len()).chain(rows.distractors..rows.distractors + self.distractor_photos.len()).map(|r| r as u32).collect(),
            gallery_categories: shop_categories.chain(distractor_categories.iter().copied()).collect(),
            correct: self
                .val_pairs
                .iter()
                .map(|p| self.val_shop.iter().enumerate().filter(|(_, (pid, st, _))| same_item((*pid, *st), p)).map(|(i, _)| i as u32).collect())
                .collect(),
            distractors: (rows.distractors..rows.distractors + self.distractor_photos.len()).map(|r| r as u32).collect(),
            distractor_categories,
        }
    }

    /// Every labelled garment crop of the data, named by category: the training ones (street
    /// garments, their shop images, labelled catalog photos, pseudo-labelled street crops)
    /// and the validation street garments and shop images; what a reader of categories
    /// alone trains and is measured on.
    pub(super) fn category_crops(&self) -> CategoryCrops {
        let street = self.train_pairs.iter().map(|p| (p.consumer.clone(), p.category.clone())).chain(self.train_unpaired.iter().map(|c| (c.spec.clone(), c.category.clone())));
        let shop = self.train_pairs.iter().map(|p| (p.shop.clone(), p.category.clone()));
        let catalog = self.train_photos.iter().map(|p| (CropSpec::Box { image: p.image.clone(), bbox: None }, p.category.clone()));
        let pseudo = self.pseudo.iter().map(|p| (CropSpec::Box { image: p.image.clone(), bbox: Some(p.bbox) }, p.category.clone()));
        let val_shop = self.val_shop.iter().filter_map(|(pid, st, spec)| {
            let pair = self.val_pairs.iter().find(|p| p.pair_id == *pid && p.style == *st)?;
            Some((spec.clone(), pair.category.clone()))
        });
        CategoryCrops {
            train: street.chain(shop).chain(catalog).chain(pseudo).collect(),
            val_street: self.val_pairs.iter().map(|p| (p.consumer.clone(), p.category.clone())).collect(),
            val_shop: val_shop.collect(),
        }
    }

    /// The counts a report gives.
    pub(super) fn counts(&self, rows: &Rows) -> DataCounts {
        DataCounts {
            train_pairs: self.train_pairs.len(),
            rendered_pairs: if rows.render.is_some() { self.train_pairs.len() } else { 0 },
            augment_pairs: self.aug_photos.len(),
            labelled_catalog: self.train_photos.len(),
            pseudo_labelled: self.pseudo.len(),
        }
    }
}

/// Where each group of crops starts in the pooled-feature matrix.
pub(super) struct Rows {
    pub street: usize,
    shop: usize,
    render: Option<usize>,
    unpaired: usize,
    catalog: usize,
    views: usize,
    pseudo: usize,
    /// The first validation row; every row before it is training data.
    pub val: usize,
    gallery: usize,
    distractors: usize,
}

pub(super) struct DataCounts {
    pub train_pairs: usize,
    pub rendered_pairs: usize,
    pub augment_pairs: usize,
    pub labelled_catalog: usize,
    pub pseudo_labelled: usize,
}

/// Labelled crops by split (see [`Splits::category_crops`]).
pub(super) struct CategoryCrops {
    pub train: Vec<(CropSpec, String)>,
    pub val_street: Vec<(CropSpec, String)>,
    pub val_shop: Vec<(CropSpec, String)>,
}
