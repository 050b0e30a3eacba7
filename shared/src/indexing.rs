//! Building an index generation from catalogs: the pipeline behind `indexer build`.
//!
//! read catalogs → for each item, compare with the published generation (image content
//! hash, models, metadata) → carry what is unchanged, re-embed what changed (decode with
//! limits → garments → crop/letterbox → embed in batches) → build and dump the ANN graph of
//! the new generation → publish it in one transaction → prune old generations.
//!
//! Crash safety: everything is written into a `Building` generation that readers never see;
//! a rerun after a kill resumes it (items already written are kept when unchanged), and the
//! published generation only moves in the final transaction.
//!
//! Garments ([`item_garments`]): the detector's confident garments; a catalog item with a
//! category keeps its best detection of that category (a shirt's photo on a model also
//! shows trousers, which must not be sold as the shirt), a DeepFashion2 gallery image keeps
//! all of them, and an item without any becomes one whole-image garment with its catalog
//! category. Without a detector every item is one whole-image garment;
//! `BoxMode::Gt` uses the annotated boxes of DeepFashion2 folders instead (other catalogs
//! in the same build are detected as usual).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use serde::Serialize;

use crate::ann::{AnnParams, GarmentIndex, GarmentVectors, LoadOutcome, graph};
use crate::catalog::{CatalogEntry, CatalogSource, LabelMap, read_catalog};
use crate::geometry::BBox;
use crate::models::detector::{Detection, GarmentDetector};
use crate::models::embedder::GarmentEmbedder;
use crate::progress::{Progress, ProgressFn};
use crate::serving::snapshot::{self, Snapshot};
use crate::store::{CatalogStore, ContentHash, GenerationSpec, ItemMetadata, ItemRecord, NewGarment};
use crate::vision::{DecodeLimits, decode_image};
use crate::Result;

/// Largest image file read, in bytes.
pub const MAX_IMAGE_BYTES: u64 = 50 << 20;
/// Items decoded together (in parallel) before their forward passes.
const CHUNK: usize = 32;

/// Where garment boxes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxMode {
    /// The detector's boxes (whole-image garments when no detector is given).
    Detected,
    /// The annotated boxes of DeepFashion2 folders (CSV/JSONL items are detected as usual).
    Gt,
}

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub boxes: BoxMode,
    /// Generations kept by the prune after publishing.
    pub retain: usize,
    pub ann: AnnParams,
    pub limits: DecodeLimits,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self { boxes: BoxMode::Detected, retain: crate::store::DEFAULT_RETAIN, ann: AnnParams::default(), limits: DecodeLimits::default() }
    }
}

/// An item (or row) that could not be indexed as asked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildFailure {
    pub sku: Option<String>,
    /// `file:line` of the row.
    pub origin: String,
    pub reason: String,
}

/// What a build did.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub generation: u64,
    /// The build continued one that was interrupted.
    pub resumed: bool,
    pub added: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub removed: u64,
    pub items: u64,
    pub garments: u64,
    pub failures: Vec<BuildFailure>,
    /// Items embedded in this run and the rate of that stage.
    pub embedded_items: u64,
    pub embed_items_per_second: f64,
    pub seconds: f64,
    /// How the ANN graph was obtained.
    pub ann: String,
    pub pruned_generations: Vec<u64>,
}

/// One item to (re-)embed.
struct Pending {
    entry: CatalogEntry,
    bytes: Vec<u8>,
    hash: ContentHash,
    is_new: bool,
}

fn spec_for(embedder: &GarmentEmbedder, detector: Option<&GarmentDetector>, boxes: BoxMode) -> GenerationSpec {
    let detector = match (boxes, detector) {
        (BoxMode::Detected, Some(d)) => d.version().to_string(),
        (BoxMode::Detected, None) => "none: whole-image garments".to_string(),
        (BoxMode::Gt, Some(d)) => format!("ground-truth boxes; {}", d.version()),
        (BoxMode::Gt, None) => "ground-truth boxes; whole-image garments".to_string(),
    };
    GenerationSpec {
        dim: embedder.dim() as u32,
        models: BTreeMap::from([("embedder".to_string(), embedder.version().to_string()), ("detector".to_string(), detector)]),
    }
}

/// The garments of an item whose image needs no new embedding: its previous revision's.
fn copied_garments(store: &CatalogStore, item: &ItemRecord) -> Result<Vec<NewGarment>> {
    item.garments
        .iter()
        .map(|id| {
            let g = store.garment(*id)?;
            Ok(NewGarment { bbox: g.bbox, category: g.category, score: g.score, embedding: g.embedding })
        })
        .collect()
}

/// A garment to embed: the crop (`None`: the whole image), its stored box, category and
/// detection score.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemGarment {
    pub crop: Option<BBox>,
    pub bbox: BBox,
    pub category: String,
    pub score: f32,
}

/// The garments an item is indexed with, from its detections (see the module notes).
/// `gallery`: a DeepFashion2 gallery image, whose every garment is a retrieval target.
pub fn item_garments(category: Option<&str>, gallery: bool, detections: &[Detection], width: u32, height: u32) -> Vec<ItemGarment> {
    let whole = BBox::new(0.0, 0.0, width as f32, height as f32);
    let keep: Vec<&Detection> = match category {
        // One sku, one garment: the best detection of the item's category (a pair of
        // shoes, or a garment found twice, must not become several garments).
        Some(c) if !gallery => detections.iter().filter(|d| d.category == c).max_by(|a, b| a.score.total_cmp(&b.score)).into_iter().collect(),
        _ => detections.iter().collect(),
    };
    if keep.is_empty() {
        return vec![ItemGarment { crop: None, bbox: whole, category: category.unwrap_or("unknown").to_string(), score: 1.0 }];
    }
    keep.into_iter().map(|d| ItemGarment { crop: Some(d.bbox), bbox: d.bbox, category: d.category.clone(), score: d.score }).collect()
}

/// The networks a build runs.
#[derive(Clone, Copy)]
pub struct Models<'a> {
    pub embedder: &'a GarmentEmbedder,
    /// `None`: every item is one whole-image garment (or its annotated boxes).
    pub detector: Option<&'a GarmentDetector>,
}

/// Builds and publishes a generation of `sources` in `store`.
pub fn build_generation(store: &CatalogStore, sources: &[CatalogSource], labels: &LabelMap, models: Models<'_>, opts: &BuildOptions, progress: ProgressFn) -> Result<BuildReport> {
    let Models { embedder, detector } = models;
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut entries: Vec<CatalogEntry> = Vec::new();
    let mut first_origin: HashMap<String, String> = HashMap::new();
    for source in sources {
        let (read, errors) = read_catalog(source, labels)?;
        failures.extend(errors.into_iter().map(|e| BuildFailure { sku: e.sku, origin: e.origin, reason: e.reason }));
        for entry in read {
            if let Some(first) = first_origin.get(&entry.metadata.sku) {
                failures.push(BuildFailure { sku: Some(entry.metadata.sku.clone()), origin: entry.origin.clone(), reason: format!("duplicate sku, first given at {first}") });
                continue;
            }
            first_origin.insert(entry.metadata.sku.clone(), entry.origin.clone());
            entries.push(entry);
        }
    }
    let spec = spec_for(embedder, detector, opts.boxes);
    let builder = store.begin_generation(spec.clone())?;
    let previous = store.published_id()?;
    progress(Progress::Message(format!(
        "generation {}{}: {} catalog items, previous generation {}",
        builder.id(),
        if builder.resumed() { " (resuming an interrupted build)" } else { "" },
        entries.len(),
        previous.map_or("none".to_string(), |p| p.to_string())
    )));

    let (mut added, mut updated, mut unchanged) = (0u64, 0u64, 0u64);
    let mut pending: Vec<Pending> = Vec::new();
    progress(Progress::Stage { name: "comparing".into(), total: entries.len() as u64 });
    for entry in entries.iter() {
        progress(Progress::Advance(1));
        let sku = entry.metadata.sku.clone();
        let fail = |reason: String| BuildFailure { sku: Some(sku.clone()), origin: entry.origin.clone(), reason };
        let old = match previous {
            Some(p) => store.item_in_generation(p, &sku)?,
            None => None,
        };
        let bytes = crate::catalog::files::read_catalog_file(&entry.image_path, Some(&entry.root), MAX_IMAGE_BYTES);
        let bytes = match bytes {
            Ok(b) => b,
            Err(reason) => {
                // Keep serving the last good version rather than drop the item on a
                // transient file problem.
                if let Some((rev, _)) = &old {
                    builder.carry_item(&sku, *rev)?;
                    unchanged += 1;
                    failures.push(fail(format!("{reason}; kept the previously indexed version")));
                } else {
                    builder.remove_item(&sku)?;
                    failures.push(fail(reason));
                }
                continue;
            }
        };
        let hash = ContentHash::of_bytes(&bytes);
        let same_as = |item: &ItemRecord| item.content_hash == hash && item.models == spec.models;
        if let Some((_, done)) = builder.member(&sku)?
            && same_as(&done) && done.metadata == entry.metadata {
                // Written by the interrupted run this build resumes.
                if old.as_ref().is_some_and(|(_, o)| same_as(o) && o.metadata == entry.metadata) { unchanged += 1 } else if old.is_some() { updated += 1 } else { added += 1 }
                continue;
            }
        match &old {
            Some((rev, item)) if same_as(item) && item.metadata == entry.metadata => {
                builder.carry_item(&sku, *rev)?;
                unchanged += 1;
            }
            Some((_, item)) if same_as(item) => {
                // Only the metadata changed: a new revision with the same embeddings.
                builder.put_item(entry.metadata.clone(), hash, copied_garments(store, item)?)?;
                updated += 1;
            }
            _ => pending.push(Pending { entry: entry.clone(), bytes, hash, is_new: old.is_none() }),
        }
    }

    // Items of an interrupted run that the catalog no longer has.
    let wanted: HashSet<&str> = entries.iter().map(|e| e.metadata.sku.as_str()).collect();
    for (sku, _) in builder.members()? {
        if !wanted.contains(sku.as_str()) {
            builder.remove_item(&sku)?;
        }
    }

    let embed_started = Instant::now();
    let embedded_items = pending.len() as u64;
    progress(Progress::Stage { name: "embedding".into(), total: pending.len() as u64 });
    for chunk in pending.chunks(CHUNK) {
        let decoded: Vec<std::result::Result<RgbImage, String>> = chunk.par_iter().map(|p| decode_image(&p.bytes, opts.limits).map_err(|e| e.to_string())).collect();
        for (p, image) in chunk.iter().zip(decoded) {
            // One forward pass per item (detection, then its crops): a result must not
            // depend on which other items shared a batch (matrix kernels block differently
            // by batch size, which moves the last bits), or a build resumed after a crash
            // would differ from an uninterrupted one.
            let garments = image.and_then(|image| {
                let garments = match (opts.boxes, detector) {
                    (BoxMode::Gt, _) if !p.entry.boxes.is_empty() => {
                        p.entry.boxes.iter().map(|(b, c)| ItemGarment { crop: Some(*b), bbox: *b, category: c.clone(), score: 1.0 }).collect()
                    }
                    // Items without annotated boxes (CSV/JSONL catalogs) are detected in
                    // both modes.
                    (_, Some(d)) => {
                        let found = d.detect(&image).map_err(|e| e.to_string())?;
                        item_garments(p.entry.metadata.category.as_deref(), !p.entry.boxes.is_empty(), &found, image.width(), image.height())
                    }
                    _ => item_garments(p.entry.metadata.category.as_deref(), false, &[], image.width(), image.height()),
                };
                let inputs = garments
                    .iter()
                    .map(|g| embedder.config().preprocess.crop_to_tensor(&image, g.crop, &Device::Cpu))
                    .collect::<Result<Vec<_>>>()
                    .map_err(|e| e.to_string())?;
                let embeddings = embedder.embed_batch(&Tensor::stack(&inputs, 0).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
                Ok(garments
                    .into_iter()
                    .zip(embeddings)
                    .map(|(g, embedding)| NewGarment { bbox: g.bbox, category: g.category, score: g.score, embedding })
                    .collect::<Vec<_>>())
            });
            let sku = &p.entry.metadata.sku;
            match garments {
                Ok(new) => {
                    builder.put_item(p.entry.metadata.clone(), p.hash, new)?;
                    if p.is_new { added += 1 } else { updated += 1 }
                }
                Err(reason) => {
                    builder.remove_item(sku)?;
                    failures.push(BuildFailure { sku: Some(sku.clone()), origin: p.entry.origin.clone(), reason });
                }
            }
            progress(Progress::Advance(1));
        }
    }
    let embed_seconds = embed_started.elapsed().as_secs_f64();
    for f in &failures {
        progress(Progress::Message(format!("skipped {} ({}): {}", f.sku.as_deref().unwrap_or("?"), f.origin, f.reason)));
    }

    // The graph of the new generation is dumped before it is published, so a searcher
    // switching to it finds its graph ready.
    let id = builder.id();
    progress(Progress::Stage { name: "ANN graph".into(), total: 1 });
    let vectors = GarmentVectors::from_generation(&store.generation_garments(id)?)?;
    let (_, outcome) = GarmentIndex::open(store.ann_dir().as_deref(), id, vectors, opts.ann.clone())?;
    progress(Progress::Advance(1));
    let resumed = builder.resumed();
    let manifest = builder.publish()?;
    let removed = match previous {
        Some(p) => store.generation_members(p)?.iter().filter(|(sku, _)| !wanted.contains(sku.as_str())).count() as u64,
        None => 0,
    };
    if let Some(dir) = store.serving_dir() {
        // What the searcher reads: the snapshot, then the pointer to it.
        let image_paths: HashMap<&str, &std::path::Path> = entries.iter().map(|e| (e.metadata.sku.as_str(), e.image_path.as_path())).collect();
        let snapshot = Snapshot::from_store(store, &|m: &ItemMetadata| image_paths.get(m.sku.as_str()).map(|p| p.to_path_buf()).unwrap_or_default())?;
        snapshot.write(&dir)?;
        snapshot::set_current(&dir, snapshot.generation)?;
    }
    let pruned = store.prune(opts.retain)?;
    let kept: Vec<u64> = store.generations()?.iter().map(|g| g.id).collect();
    if let Some(dir) = store.ann_dir() {
        graph::remove_dumps_except(&dir, &kept)?;
    }
    if let Some(dir) = store.serving_dir() {
        snapshot::remove_except(&dir, &kept)?;
    }
    Ok(BuildReport {
        generation: manifest.id,
        resumed,
        added,
        updated,
        unchanged,
        removed,
        items: manifest.items,
        garments: manifest.garments,
        failures,
        embedded_items,
        embed_items_per_second: if embed_seconds > 0.0 { embedded_items as f64 / embed_seconds } else { 0.0 },
        seconds: started.elapsed().as_secs_f64(),
        ann: match outcome {
            LoadOutcome::ExactOnly => "exact search (small index, no graph)".into(),
            LoadOutcome::Loaded => "graph dump reused".into(),
            LoadOutcome::Built { .. } => "graph built and dumped".into(),
        },
        pruned_generations: pruned.generations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(category: &str, x1: f32, score: f32) -> Detection {
        Detection { bbox: BBox::new(x1, 0.0, x1 + 10.0, 10.0), class: 0, category: category.into(), score }
    }

    #[test]
    fn catalog_items_keep_detections_of_their_category_else_the_whole_image() {
        let found = [det("top", 0.0, 0.9), det("pants", 20.0, 0.8), det("top", 40.0, 0.5)];
        let g = item_garments(Some("top"), false, &found, 100, 50);
        assert_eq!(g.iter().map(|g| (g.category.as_str(), g.bbox.x1)).collect::<Vec<_>>(), [("top", 0.0)], "the best top only");
        assert_eq!(g[0].crop, Some(found[0].bbox));
        // No detection of the item's category: the whole image, with the catalog category.
        let g = item_garments(Some("skirt"), false, &found, 100, 50);
        assert_eq!(g, vec![ItemGarment { crop: None, bbox: BBox::new(0.0, 0.0, 100.0, 50.0), category: "skirt".into(), score: 1.0 }]);
        // No category: every detection; nothing detected: the whole image as "unknown".
        assert_eq!(item_garments(None, false, &found, 100, 50).len(), 3);
        assert_eq!(item_garments(None, false, &[], 100, 50)[0].category, "unknown");
        // A DeepFashion2 gallery image keeps every garment whatever its first item's class.
        assert_eq!(item_garments(Some("top"), true, &found, 100, 50).len(), 3);
    }
}
