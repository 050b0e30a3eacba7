//! The detector's training data: both domains' photos with their boxes in one taxonomy,
//! split by `pair_id`, the augmented views each training image gets, and the backbone's
//! pyramid features of every view, computed once and cached on disk in shards.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::DetectorTraining;
use super::views::{self, Targets};
use crate::datasets::{Df2Annotation, Df2Folder, Df2Image};
use crate::evaluation::detection::HEADLINE;
use crate::geometry::BBox;
use crate::models::Backbone;
use crate::models::detector::{Category, Detection, GarmentDetector, Postprocess};
use crate::training::tagged::read_tagged;
use crate::training::{Progress, ProgressFn, catalog_photos, is_validation_sender};
use crate::vision::{DecodeLimits, Preprocess, decode_image};
use crate::{Error, Result};

/// Version of the view generation, part of the feature cache key: bump it whenever
/// [`views`] changes what a seed produces.
const VIEW_VERSION: u32 = 1;
/// Views per cache shard.
const SHARD: usize = 64;

/// A photo with its boxes.
#[derive(Debug, Clone)]
pub(super) struct Sample {
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

/// What the pseudo-labelling of tagged photos kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PseudoLabels {
    pub photos: usize,
    /// Photos kept: every headline class their tags name was found.
    pub kept: usize,
    pub boxes: usize,
    /// Boxes of a class the photo's tags do not name, dropped.
    pub untagged_boxes: usize,
}

/// Photos of a tagged folder (see [`crate::training::tagged`]) as training street samples,
/// with the boxes `labeller` serves at `min_score` or above whose class the photo's tags
/// name. A photo is kept only when every headline class its tags name has a box: a
/// garment the labeller missed would otherwise be taught as background.
pub(super) fn pseudo_samples(folder: &Path, labeller: &GarmentDetector, categories: &[Category], min_score: f32, progress: ProgressFn) -> Result<(Vec<Sample>, PseudoLabels)> {
    let (_, photos) = read_tagged(folder)?;
    let index: HashMap<&str, usize> = categories.iter().enumerate().map(|(i, c)| (c.name.as_str(), i)).collect();
    let post = Postprocess { min_score, ..labeller.config().postprocess };
    let mut stats = PseudoLabels { photos: photos.len(), ..Default::default() };
    let mut samples = Vec::new();
    progress(Progress::Stage { name: "pseudo-labels: detecting garments in tagged photos".into(), total: photos.len() as u64 });
    for (n, photo) in photos.iter().enumerate() {
        progress(Progress::Advance(1));
        let Some(found) = labeller_boxes(&photo.image, labeller, &post)? else { continue };
        stats.untagged_boxes += found.iter().filter(|d| !photo.classes.contains(&d.category)).count();
        let Some(boxes) = confirmed_boxes(&photo.classes, &found, &index) else { continue };
        stats.kept += 1;
        stats.boxes += boxes.len();
        // Outside every split key of the annotated data (pair ids are CCP ids below 10⁶),
        // and distinct per photo for the views' seeds.
        let pair_id = PSEUDO_PAIR_IDS + n as u64;
        samples.push(Sample { pair_id, image: photo.image.clone(), items: (1..=boxes.len() as u32).collect(), boxes, mask: None });
    }
    Ok((samples, stats))
}

/// `labeller`'s boxes in the photo at `image`; `None` when it is missing or unreadable,
/// which only means fewer pseudo-labelled photos (a network error still fails the run).
fn labeller_boxes(image: &Path, labeller: &GarmentDetector, post: &Postprocess) -> Result<Option<Vec<Detection>>> {
    let Ok(decoded) = std::fs::read(image).map_err(|e| Error::io(image, e)).and_then(|b| decode_image(&b, DecodeLimits::default())) else { return Ok(None) };
    Ok(Some(labeller.detect_with(&decoded, post)?))
}

/// The boxes of `found` whose class the photo's `tags` name, as class indices of `index`;
/// `None` when a headline class the tags name has no box (the photo would teach a missed
/// garment as background) or nothing is left.
fn confirmed_boxes(tags: &[String], found: &[Detection], index: &HashMap<&str, usize>) -> Option<Vec<(usize, BBox)>> {
    let tagged: Vec<&Detection> = found.iter().filter(|d| tags.contains(&d.category)).collect();
    let complete = tags.iter().filter(|c| HEADLINE.contains(&c.as_str())).all(|c| tagged.iter().any(|d| &d.category == c));
    let boxes: Vec<(usize, BBox)> = tagged.iter().filter_map(|d| Some((*index.get(d.category.as_str())?, d.bbox))).collect();
    (complete && !boxes.is_empty()).then_some(boxes)
}

/// Where the pair ids of pseudo-labelled photos start.
const PSEUDO_PAIR_IDS: u64 = 1 << 40;
/// Where the pair ids of pseudo-boxed catalog photos start (after the tagged photos').
const CATALOG_PAIR_IDS: u64 = 1 << 41;
/// Cached views per catalog photo: the photo, its mirror and two random ones (street-style
/// augmentations: they are photos with backgrounds, not cut-outs). Fewer than a street
/// photo's eight: each shows one garment, and 1,200 of them at eight views would double
/// the feature cache.
pub(super) const CATALOG_VIEWS: usize = 4;

/// The CC0 catalog's training photos (never a validation sender's) as training photos, each
/// with one pseudo-box: `labeller`'s best box of the photo's catalog category at
/// `min_score` or above. A catalog photo shows one garment, so the labeller's other boxes
/// (a trouser's legs as outer, its waistband as belt) are dropped and the photo teaches
/// them as background; a photo without a box of its category is left out.
pub(super) fn catalog_samples(catalog: &Path, labeller: &GarmentDetector, categories: &[Category], min_score: f32, progress: ProgressFn) -> Result<(Vec<Sample>, PseudoLabels)> {
    let photos: Vec<_> = catalog_photos(catalog)?.into_iter().filter(|p| !is_validation_sender(p.sender)).collect();
    let index: HashMap<&str, usize> = categories.iter().enumerate().map(|(i, c)| (c.name.as_str(), i)).collect();
    let post = Postprocess { min_score, ..labeller.config().postprocess };
    let mut stats = PseudoLabels { photos: photos.len(), ..Default::default() };
    let mut samples = Vec::new();
    progress(Progress::Stage { name: "catalog boxes: detecting the garment of each catalog photo".into(), total: photos.len() as u64 });
    for (n, photo) in photos.iter().enumerate() {
        progress(Progress::Advance(1));
        let Some(&class) = index.get(photo.category.as_str()) else { continue };
        let Some(found) = labeller_boxes(&photo.image, labeller, &post)? else { continue };
        let Some(best) = best_of_class(&found, &photo.category) else { continue };
        stats.untagged_boxes += found.len() - 1;
        stats.kept += 1;
        stats.boxes += 1;
        samples.push(Sample { pair_id: CATALOG_PAIR_IDS + n as u64, image: photo.image.clone(), items: vec![1], boxes: vec![(class, best.bbox)], mask: None });
    }
    Ok((samples, stats))
}

/// The highest-scoring detection named `category`.
fn best_of_class<'a>(found: &'a [Detection], category: &str) -> Option<&'a Detection> {
    found.iter().filter(|d| d.category == category).max_by(|a, b| a.score.total_cmp(&b.score))
}

/// Training photos of the CC0 catalog's training senders, as shop-view backgrounds.
fn backdrops(catalog: &Path) -> Result<Vec<PathBuf>> {
    Ok(catalog_photos(catalog)?.into_iter().filter(|p| !is_validation_sender(p.sender)).map(|p| p.image).collect())
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
    backbone: &Backbone,
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
                let mask =
                    image::load_from_memory(&bytes).map_err(|e| Error::MalformedDataset { file: mask_path.clone(), field: "(mask)".into(), reason: e.to_string() })?.to_luma8();
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
    crate::durable::replace_with(file, |tmp| {
        safetensors::serialize_to_file(named.iter().map(|(k, t)| (k.as_str(), *t)), Some(meta), tmp)
            .map_err(|e| Error::InvalidWeights { reason: format!("writing {}: {e}", tmp.display()) })
    })
}

/// The training and validation images of one domain.
pub(super) struct Split<'a> {
    pub train: Vec<&'a Sample>,
    pub val: Vec<&'a Sample>,
}

impl<'a> Split<'a> {
    /// Validation = `pair_id % 5 == 1`; images without a box are left out.
    fn of(samples: &'a [Sample]) -> Self {
        let (val, train) = samples.iter().filter(|s| !s.boxes.is_empty()).partition(|s| s.pair_id % 5 == 1);
        Self { train, val }
    }
}

/// Both domains' photos with their boxes, in one taxonomy.
pub(super) struct Domains {
    pub categories: Vec<Category>,
    street: Vec<Sample>,
    shop: Vec<Sample>,
    /// Pseudo-labelled street photos: training only.
    pseudo: Vec<Sample>,
    pub pseudo_labels: Option<PseudoLabels>,
    /// Pseudo-boxed catalog photos of training senders: training only.
    pub catalog: Vec<Sample>,
    pub catalog_labels: Option<PseudoLabels>,
}

impl Domains {
    pub(super) fn read(cfg: &DetectorTraining, progress: ProgressFn) -> Result<Self> {
        let street_folder = Df2Folder::open(&cfg.data)?;
        let shop_folder = cfg.shop.as_ref().map(Df2Folder::open).transpose()?;
        let street_annos = Annotated::read(&street_folder)?;
        let shop_annos = shop_folder.as_ref().map(Annotated::read).transpose()?;
        let categories = taxonomy(&std::iter::once(&street_annos).chain(shop_annos.as_ref()).collect::<Vec<_>>())?;
        let street = read_samples(&street_annos, &categories);
        let shop = shop_annos.as_ref().map(|a| read_samples(a, &categories)).unwrap_or_default();
        let labeller = |setting: &'static str| -> Result<GarmentDetector> {
            let init = cfg.init.as_ref().ok_or_else(|| Error::InvalidSetting { name: setting, reason: "pseudo-boxes come from the --init detector: pass one".into() })?;
            GarmentDetector::load(init, &cfg.device)
        };
        let (pseudo, pseudo_labels) = match &cfg.unlabelled {
            Some(folder) => {
                let (samples, stats) = pseudo_samples(folder, &labeller("unlabelled")?, &categories, cfg.pseudo_min_score, progress)?;
                (samples, Some(stats))
            }
            None => (Vec::new(), None),
        };
        let (catalog, catalog_labels) = match (&cfg.catalog, cfg.catalog_boxes) {
            (Some(folder), true) => {
                let (samples, stats) = catalog_samples(folder, &labeller("catalog-boxes")?, &categories, cfg.pseudo_min_score, progress)?;
                (samples, Some(stats))
            }
            (None, true) => return Err(Error::InvalidSetting { name: "catalog-boxes", reason: "needs the catalog folder (--catalog)".into() }),
            (_, false) => (Vec::new(), None),
        };
        Ok(Self { categories, street, shop, pseudo, pseudo_labels, catalog, catalog_labels })
    }

    /// The street and shop splits; each side of each domain the run uses must hold images.
    pub(super) fn split(&self, with_shop: bool) -> Result<(Split<'_>, Split<'_>)> {
        let (mut street, shop) = (Split::of(&self.street), Split::of(&self.shop));
        street.train.extend(self.pseudo.iter());
        if street.train.is_empty() || street.val.is_empty() || (with_shop && (shop.train.is_empty() || shop.val.is_empty())) {
            return Err(Error::InvalidSetting {
                name: "data",
                reason: format!(
                    "{}/{} training/validation photos and {}/{} shop images with boxes: need both of each",
                    street.train.len(),
                    street.val.len(),
                    shop.train.len(),
                    shop.val.len()
                ),
            });
        }
        Ok((street, shop))
    }
}

/// The backbone features of every view the run uses: `[views, c, h, w]` per level (f16,
/// CPU) with each view's boxes.
pub(super) struct CachedViews {
    pub train_levels: Vec<Tensor>,
    pub train_targets: Vec<Targets>,
    pub val_levels: Vec<Tensor>,
    pub val_targets: Vec<Targets>,
    pub shop_val: Option<(Vec<Tensor>, Vec<Targets>)>,
    /// The first shop view among the training views (street views come first).
    pub shop_offset: usize,
    /// The first catalog view (after the shop views; [`CATALOG_VIEWS`] a photo).
    pub catalog_offset: usize,
}

impl CachedViews {
    pub(super) fn compute(
        cfg: &DetectorTraining,
        backbone: &Backbone,
        domains: &Domains,
        street: &Split<'_>,
        shop: &Split<'_>,
        pre: &Preprocess,
        progress: ProgressFn,
    ) -> Result<Self> {
        let samples: HashMap<&Path, &Sample> = domains.street.iter().chain(&domains.shop).chain(&domains.pseudo).chain(&domains.catalog).map(|s| (s.image.as_path(), s)).collect();
        let mut train_specs = street_specs(&street.train, cfg.views, cfg.copy_paste, cfg.seed);
        let shop_offset = train_specs.len();
        let backdrops = cfg.catalog.as_deref().map(backdrops).transpose()?.unwrap_or_default();
        train_specs.extend(shop_specs(&shop.train, &backdrops, cfg.shop_views, cfg.seed));
        let val_specs: Vec<ViewSpec> = street.val.iter().map(|s| ViewSpec::street(&s.image, 0, 0)).collect();
        let shop_val_specs: Vec<ViewSpec> = shop.val.iter().map(|s| ViewSpec { shop: true, ..ViewSpec::street(&s.image, 0, 0) }).collect();
        let backbone_hash = blake3::hash(&std::fs::read(&cfg.backbone).map_err(|e| Error::io(&cfg.backbone, e))?);
        let features =
            |specs: &[ViewSpec], name: &str, progress: ProgressFn| view_features(backbone, &backbone_hash, specs, &samples, pre, name, &cfg.cache, &cfg.device, progress);
        let (mut train_levels, mut train_targets) = features(&train_specs, "train", progress)?;
        // Catalog views are cached on their own, after the others: adding them leaves the
        // street and shop shards (and their cache keys) as they were.
        let catalog_offset = train_specs.len();
        if !domains.catalog.is_empty() {
            let catalog_specs = street_specs(&domains.catalog.iter().collect::<Vec<_>>(), CATALOG_VIEWS, false, cfg.seed);
            let (levels, targets) = features(&catalog_specs, "train-catalog", progress)?;
            train_levels = train_levels.iter().zip(&levels).map(|(a, b)| Tensor::cat(&[a, b], 0)).collect::<candle_core::Result<_>>()?;
            train_targets.extend(targets);
        }
        let (val_levels, val_targets) = features(&val_specs, "val", progress)?;
        let shop_val = if shop_val_specs.is_empty() { None } else { Some(features(&shop_val_specs, "shop-val", progress)?) };
        Ok(Self { train_levels, train_targets, val_levels, val_targets, shop_val, shop_offset, catalog_offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(category: &str, x1: f32) -> Detection {
        Detection { bbox: BBox::new(x1, 0.0, x1 + 10.0, 10.0), class: 0, category: category.into(), score: 0.9, class_probs: Vec::new(), centreness: 1.0 }
    }

    #[test]
    fn pseudo_boxes_need_their_tags_and_every_tagged_headline_class() {
        let index: HashMap<&str, usize> = HashMap::from([("top", 0), ("skirt", 1), ("belt", 2), ("bag", 3)]);
        let tags: Vec<String> = ["top", "skirt", "belt"].iter().map(|s| s.to_string()).collect();
        // A bag the tags do not name goes; a belt they name but nobody found is no headline
        // class, so the photo stays.
        let found = [det("top", 0.0), det("bag", 20.0), det("skirt", 40.0)];
        assert_eq!(confirmed_boxes(&tags, &found, &index), Some(vec![(0, BBox::new(0.0, 0.0, 10.0, 10.0)), (1, BBox::new(40.0, 0.0, 50.0, 10.0))]));
        // The skirt missed: its pixels would be taught as background, so the photo goes.
        assert_eq!(confirmed_boxes(&tags, &found[..2], &index), None);
        // Nothing confirmed, nothing to learn.
        assert_eq!(confirmed_boxes(&["belt".to_string()], &found, &index), None);
    }

    #[test]
    fn a_catalog_photo_keeps_the_best_box_of_its_own_category_only() {
        let mut found = [det("outer", 0.0), det("pants", 20.0), det("pants", 40.0), det("belt", 60.0)];
        found[0].score = 0.95;
        found[2].score = 0.8;
        found[1].score = 0.6;
        assert_eq!(best_of_class(&found, "pants").map(|d| d.bbox), Some(BBox::new(40.0, 0.0, 50.0, 10.0)));
        assert!(best_of_class(&found, "skirt").is_none(), "no box of the category: the photo is left out");
    }
}
