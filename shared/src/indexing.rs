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
//! category (on a packshot, the product's extent stands for the whole image: see
//! [`crate::vision::product_extent`]). Without a detector every item is one whole-image garment;
//! `BoxMode::Gt` uses the annotated boxes of DeepFashion2 folders instead (other catalogs
//! in the same build are detected as usual).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use image::RgbImage;
use rayon::prelude::*;
use serde::Serialize;

use crate::Result;
use crate::ann::{AnnParams, GarmentIndex, GarmentVectors, LoadOutcome, graph};
use crate::catalog::{CatalogEntry, CatalogSource, LabelMap, read_catalog};
use crate::geometry::BBox;
use crate::models::detector::{Detection, GarmentDetector};
use crate::models::embedder::GarmentEmbedder;
use crate::pipeline::{FoundGarment, GarmentPipeline};
use crate::progress::{Progress, ProgressFn};
use crate::serving::snapshot::{self, Snapshot};
use crate::store::{CatalogStore, ContentHash, GenerationBuilder, GenerationSpec, ItemRecord, NewGarment, PruneReport};
use crate::vision::{DecodeLimits, product_extent};

/// Largest image file read, in bytes.
pub const MAX_IMAGE_BYTES: u64 = 50 << 20;
/// Items decoded and embedded together (in parallel) and then saved together: the default of
/// [`BuildOptions::save_every`].
pub const SAVE_EVERY: usize = 32;

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
    /// Items embedded between two flushes of the store: a build killed in the embedding
    /// stage resumes after the last flush. Progress advances at each flush, so what the
    /// progress shows is what a rerun keeps.
    pub save_every: usize,
    /// Items per forward pass. 1 (the CPU's way): each item goes through the networks
    /// alone, items side by side on the cores, and an item's embeddings are the same bits
    /// whatever else is built. N > 1 (the GPU's way, which idles at batch 1): the items to
    /// embed form fixed batches of N in catalog order, each detected in one pass and its
    /// garments embedded in passes of N crops, the store saved after each batch (so
    /// `save_every` does not apply); a resumed build forms the same batches and re-does the
    /// unfinished one whole, so it equals an uninterrupted build bit for bit. Embeddings of
    /// batched and unbatched builds differ in the last bits (kernels block by batch size).
    pub batch: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self { boxes: BoxMode::Detected, retain: crate::store::DEFAULT_RETAIN, ann: AnnParams::default(), limits: DecodeLimits::default(), save_every: SAVE_EVERY, batch: 1 }
    }
}

/// Items per forward pass on a GPU by default ([`BuildOptions::batch`]).
pub const GPU_BATCH: usize = 64;

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
    /// Items per forward pass ([`BuildOptions::batch`]).
    pub batch: usize,
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
    /// Already written by the interrupted run this build resumes (batched builds keep such
    /// items in their batch; see [`BuildOptions::batch`]).
    written: bool,
}

fn spec_for(embedder: &GarmentEmbedder, detector: Option<&GarmentDetector>, boxes: BoxMode) -> GenerationSpec {
    let detector = match (boxes, detector) {
        (BoxMode::Detected, Some(d)) => d.version().to_string(),
        (BoxMode::Detected, None) => "none: whole-image garments".to_string(),
        (BoxMode::Gt, Some(d)) => format!("ground-truth boxes; {}", d.version()),
        (BoxMode::Gt, None) => "ground-truth boxes; whole-image garments".to_string(),
    };
    GenerationSpec { dim: embedder.dim() as u32, models: BTreeMap::from([("embedder".to_string(), embedder.version().to_string()), ("detector".to_string(), detector)]) }
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
/// `product`: on a packshot, the product's extent, which replaces the whole image when no
/// detection is kept (a shirt on white that the second look named a top is still framed).
pub fn item_garments(category: Option<&str>, gallery: bool, detections: &[Detection], width: u32, height: u32, product: Option<BBox>) -> Vec<ItemGarment> {
    let whole = product.unwrap_or(BBox::new(0.0, 0.0, width as f32, height as f32));
    let keep: Vec<&Detection> = match category {
        // One sku, one garment: the best detection of the item's category (a pair of
        // shoes, or a garment found twice, must not become several garments).
        Some(c) if !gallery => detections.iter().filter(|d| d.category == c).max_by(|a, b| a.score.total_cmp(&b.score)).into_iter().collect(),
        _ => detections.iter().collect(),
    };
    if keep.is_empty() {
        return vec![ItemGarment { crop: product, bbox: whole, category: category.unwrap_or("unknown").to_string(), score: 1.0 }];
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

/// Items added, updated (new revision) and unchanged (carried) by a build.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    added: u64,
    updated: u64,
    unchanged: u64,
}

impl Tally {
    fn changed(&mut self, is_new: bool) {
        if is_new { self.added += 1 } else { self.updated += 1 }
    }
}

/// Builds and publishes a generation of `sources` in `store`: read the catalogs → plan
/// (carry / new revision / re-embed / remove) → embed → publish and prune.
pub fn build_generation(store: &CatalogStore, sources: &[CatalogSource], labels: &LabelMap, models: Models<'_>, opts: &BuildOptions, progress: ProgressFn) -> Result<BuildReport> {
    let started = Instant::now();
    let (entries, mut failures) = read_entries(sources, labels)?;
    let spec = spec_for(models.embedder, models.detector, opts.boxes);
    let builder = store.begin_generation(spec.clone())?;
    let previous = store.published_id()?;
    progress(Progress::Message(format!(
        "generation {}{}: {} catalog items, previous generation {}",
        builder.id(),
        if builder.resumed() { " (resuming an interrupted build)" } else { "" },
        entries.len(),
        previous.map_or("none".to_string(), |p| p.to_string())
    )));
    let (pending, mut tally) = plan_items(store, &builder, previous, &entries, &mut failures, progress)?;
    let wanted: HashSet<&str> = entries.iter().map(|e| e.metadata.sku.as_str()).collect();
    remove_dropped_members(&builder, &wanted)?;

    let pipeline = GarmentPipeline { detector: models.detector, embedder: models.embedder, limits: opts.limits };
    let embed_started = Instant::now();
    let mut sink = Sink { builder: &builder, tally: &mut tally, failures: &mut failures };
    if opts.batch > 1 {
        embed_in_batches(&mut sink, &pending, &pipeline, opts, progress)?;
    } else {
        embed_items(&mut sink, &pending, &pipeline, opts, progress)?;
    }
    let embed_seconds = embed_started.elapsed().as_secs_f64();
    for f in &failures {
        progress(Progress::Message(format!("skipped {} ({}): {}", f.sku.as_deref().unwrap_or("?"), f.origin, f.reason)));
    }

    let resumed = builder.resumed();
    let mut builder = builder;
    builder.describe(opts.ann.clone(), sources.iter().map(|s| s.path().display().to_string()).collect());
    let published = publish(store, builder, opts, progress)?;
    let removed = match previous {
        Some(p) => store.generation_members(p)?.iter().filter(|(sku, _)| !wanted.contains(sku.as_str())).count() as u64,
        None => 0,
    };
    let pruned = prune(store, opts.retain)?;
    let embedded_items = pending.iter().filter(|p| !p.written).count() as u64;
    Ok(BuildReport {
        generation: published.manifest.id,
        resumed,
        added: tally.added,
        updated: tally.updated,
        unchanged: tally.unchanged,
        removed,
        items: published.manifest.items,
        garments: published.manifest.garments,
        failures,
        embedded_items,
        batch: opts.batch,
        embed_items_per_second: if embed_seconds > 0.0 { embedded_items as f64 / embed_seconds } else { 0.0 },
        seconds: started.elapsed().as_secs_f64(),
        ann: match published.ann {
            LoadOutcome::ExactOnly => "exact search (small index, no graph)".into(),
            LoadOutcome::Loaded => "graph dump reused".into(),
            LoadOutcome::Built { .. } => "graph built and dumped".into(),
        },
        pruned_generations: pruned.store.generations,
    })
}

/// Every catalog entry of `sources`; rows that cannot be read and repeated skus become
/// failures (the first row of a sku wins).
fn read_entries(sources: &[CatalogSource], labels: &LabelMap) -> Result<(Vec<CatalogEntry>, Vec<BuildFailure>)> {
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
    Ok((entries, failures))
}

/// Compares each entry with the previous generation and settles what needs no network:
/// unchanged items are carried, items whose metadata alone changed get a new revision with
/// the same embeddings, unreadable files keep the last good version. Returns the items to
/// embed, with those the interrupted run embedded and wrote marked `written` (the
/// embedding loop decides what to do again).
fn plan_items(
    store: &CatalogStore,
    builder: &GenerationBuilder,
    previous: Option<u64>,
    entries: &[CatalogEntry],
    failures: &mut Vec<BuildFailure>,
    progress: ProgressFn,
) -> Result<(Vec<Pending>, Tally)> {
    let models = &builder.spec().models;
    let mut tally = Tally::default();
    let mut pending = Vec::new();
    progress(Progress::Stage { name: "comparing".into(), total: entries.len() as u64 });
    for entry in entries {
        progress(Progress::Advance(1));
        let sku = &entry.metadata.sku;
        let fail = |reason: String| BuildFailure { sku: Some(sku.clone()), origin: entry.origin.clone(), reason };
        let old = match previous {
            Some(p) => store.item_in_generation(p, sku)?,
            None => None,
        };
        let bytes = match crate::catalog::files::read_catalog_file(&entry.image_path, Some(&entry.root), MAX_IMAGE_BYTES) {
            Ok(b) => b,
            Err(reason) => {
                // Keep serving the last good version rather than drop the item on a
                // transient file problem.
                if let Some((rev, _)) = &old {
                    builder.carry_item(sku, *rev)?;
                    tally.unchanged += 1;
                    failures.push(fail(format!("{reason}; kept the previously indexed version")));
                } else {
                    builder.remove_item(sku)?;
                    failures.push(fail(reason));
                }
                continue;
            }
        };
        let hash = ContentHash::of_bytes(&bytes);
        let same_pixels = |item: &ItemRecord| item.content_hash == hash && &item.models == models;
        let path = entry.image_path.to_string_lossy();
        let same_item = |item: &ItemRecord| same_pixels(item) && item.metadata == entry.metadata && item.image_path.as_deref() == Some(&*path);
        if let Some((_, done)) = builder.member(sku)?
            && same_item(&done)
        {
            // Written by the interrupted run this build resumes.
            if !matches!(&old, Some((_, o)) if same_pixels(o)) {
                // It was embedded: a batched build forms its batch again as that run did.
                pending.push(Pending { entry: entry.clone(), bytes, hash, is_new: old.is_none(), written: true });
                continue;
            }
            match &old {
                Some((_, o)) if same_item(o) => tally.unchanged += 1,
                _ => tally.changed(old.is_none()),
            }
            continue;
        }
        match &old {
            Some((rev, item)) if same_item(item) => {
                builder.carry_item(sku, *rev)?;
                tally.unchanged += 1;
            }
            Some((_, item)) if same_pixels(item) => {
                // Only the metadata (or the file's place) changed: a new revision with the
                // same embeddings.
                builder.put_item_with_image(entry.metadata.clone(), hash, Some(path.to_string()), copied_garments(store, item)?)?;
                tally.updated += 1;
            }
            _ => pending.push(Pending { entry: entry.clone(), bytes, hash, is_new: old.is_none(), written: false }),
        }
    }
    Ok((pending, tally))
}

/// Removes items an interrupted run wrote that the catalog no longer has.
fn remove_dropped_members(builder: &GenerationBuilder, wanted: &HashSet<&str>) -> Result<()> {
    for (sku, _) in builder.members()? {
        if !wanted.contains(sku.as_str()) {
            builder.remove_item(&sku)?;
        }
    }
    Ok(())
}

/// Decodes and embeds `pending` in parallel chunks and writes each item's garments in
/// order, flushing the store after each chunk; an item that cannot be decoded or embedded
/// is a failure and leaves the generation.
fn embed_items(sink: &mut Sink<'_>, pending: &[Pending], pipeline: &GarmentPipeline<'_>, opts: &BuildOptions, progress: ProgressFn) -> Result<()> {
    // Items alone depend on nothing else: what the interrupted run wrote stays.
    let (written, pending): (Vec<&Pending>, Vec<&Pending>) = pending.iter().partition(|p| p.written);
    written.iter().for_each(|p| sink.tally.changed(p.is_new));
    progress(Progress::Stage { name: "embedding".into(), total: pending.len() as u64 });
    for chunk in pending.chunks(opts.save_every.max(1)) {
        // The chunk's items go through the networks side by side, one per core, rather than
        // one at a time with each operation split over the cores: small operations split
        // two ways spend much of their time waiting for each other. An item's garments are
        // the same bits either way (kernels block by shape, never by thread count), and
        // they are written in catalog order, so a resumed build still equals an
        // uninterrupted one.
        let embedded: Vec<Result<Vec<NewGarment>>> =
            chunk.par_iter().map(|p| pipeline.decode(&p.bytes).and_then(|image| entry_garments(pipeline, &p.entry, &image, opts.boxes))).collect();
        sink.write(chunk.iter().copied(), embedded)?;
        progress(Progress::Advance(chunk.len() as u64));
    }
    Ok(())
}

/// Where the embedding stage puts what it made: the generation being built, and the
/// build's tally and failures.
struct Sink<'a> {
    builder: &'a GenerationBuilder,
    tally: &'a mut Tally,
    failures: &'a mut Vec<BuildFailure>,
}

impl Sink<'_> {
    /// Writes each item's garments (or its failure) in order and saves the store.
    fn write<'p>(&mut self, items: impl IntoIterator<Item = &'p Pending>, embedded: Vec<Result<Vec<NewGarment>>>) -> Result<()> {
        for (p, garments) in items.into_iter().zip(embedded) {
            let sku = &p.entry.metadata.sku;
            match garments {
                Ok(new) => {
                    self.builder.put_item_with_image(p.entry.metadata.clone(), p.hash, Some(p.entry.image_path.to_string_lossy().into_owned()), new)?;
                    self.tally.changed(p.is_new);
                }
                Err(e) => {
                    self.builder.remove_item(sku)?;
                    self.failures.push(BuildFailure { sku: Some(sku.clone()), origin: p.entry.origin.clone(), reason: e.to_string() });
                }
            }
        }
        self.builder.flush()
    }
}

/// The batched way ([`BuildOptions::batch`]): `pending` in fixed batches, each decoded on
/// the CPU cores while the networks run the batch before it, then detected and embedded in
/// passes of `batch`, written and saved. A batch the interrupted run wrote whole is kept;
/// one it left unfinished is re-done whole, so that its passes see the same items.
fn embed_in_batches(sink: &mut Sink<'_>, pending: &[Pending], pipeline: &GarmentPipeline<'_>, opts: &BuildOptions, progress: ProgressFn) -> Result<()> {
    progress(Progress::Stage { name: "embedding".into(), total: pending.len() as u64 });
    let written_whole = |batch: &[Pending]| batch.iter().all(|p| p.written);
    let decode = |batch: &[Pending]| -> Vec<Result<RgbImage>> { if written_whole(batch) { Vec::new() } else { batch.par_iter().map(|p| pipeline.decode(&p.bytes)).collect() } };
    let batches: Vec<&[Pending]> = pending.chunks(opts.batch).collect();
    let mut decoded = batches.first().map(|b| decode(b)).unwrap_or_default();
    for (k, batch) in batches.iter().enumerate() {
        let (embedded, next) = std::thread::scope(|s| {
            let next = batches.get(k + 1).map(|b| s.spawn(|| decode(b)));
            let embedded = (!written_whole(batch)).then(|| batch_garments(pipeline, batch, std::mem::take(&mut decoded), opts, progress));
            (embedded, next.map(|n| n.join().expect("decoding threads do not panic")))
        });
        decoded = next.unwrap_or_default();
        match embedded {
            // Written whole by the interrupted run.
            None => batch.iter().for_each(|p| sink.tally.changed(p.is_new)),
            Some(embedded) => sink.write(batch.iter(), embedded)?,
        }
        progress(Progress::Advance(batch.len() as u64));
    }
    Ok(())
}

/// The garments of one batch of items, each item's result in order: the batched passes
/// over the decoded ones; if those fail (a GPU out of memory), each item alone, so that
/// one bad item costs only itself.
fn batch_garments(pipeline: &GarmentPipeline<'_>, batch: &[Pending], decoded: Vec<Result<RgbImage>>, opts: &BuildOptions, progress: ProgressFn) -> Vec<Result<Vec<NewGarment>>> {
    let images: Vec<(&CatalogEntry, &RgbImage)> = batch.iter().zip(&decoded).filter_map(|(p, d)| d.as_ref().ok().map(|image| (&p.entry, image))).collect();
    let mut batched = match entries_garments(pipeline, &images, opts) {
        Ok(garments) => garments.into_iter().map(Ok).collect::<Vec<_>>().into_iter(),
        Err(e) => {
            progress(Progress::Message(format!("a batch of {} items failed in the networks ({e}); embedding them one at a time", images.len())));
            images.iter().map(|(entry, image)| entry_garments(pipeline, entry, image, opts.boxes)).collect::<Vec<_>>().into_iter()
        }
    };
    decoded.into_iter().map(|d| d.and_then(|_| batched.next().expect("one result per decoded item"))).collect()
}

/// Where an item's garments come from, before the last embeddings.
enum Sighting {
    /// Its annotated boxes (`BoxMode::Gt` on a DeepFashion2 folder).
    Annotated,
    /// The detector's garments through the second look, embedded already.
    Found(Vec<FoundGarment>),
    /// The detector's garments without the second look.
    Detected(Vec<Detection>),
}

/// Whether an item's garments come from the detector: items without annotated boxes
/// (CSV/JSONL catalogs) are detected in both modes.
fn is_detected(entry: &CatalogEntry, boxes: BoxMode) -> bool {
    boxes == BoxMode::Detected || entry.boxes.is_empty()
}

/// An item's garments to index, with the embeddings the second look made already (`None`:
/// still to embed: annotated boxes, the whole photo, garments of a detector without the
/// second look).
struct PlannedItem {
    garments: Vec<ItemGarment>,
    ready: Vec<Option<Vec<f32>>>,
}

impl PlannedItem {
    fn new(entry: &CatalogEntry, image: &RgbImage, sighting: Sighting) -> Self {
        let rule =
            |detections: &[Detection]| item_garments(entry.metadata.category.as_deref(), !entry.boxes.is_empty(), detections, image.width(), image.height(), product_extent(image));
        match sighting {
            Sighting::Annotated => {
                let garments: Vec<ItemGarment> = entry.boxes.iter().map(|(b, c)| ItemGarment { crop: Some(*b), bbox: *b, category: c.clone(), score: 1.0 }).collect();
                Self { ready: vec![None; garments.len()], garments }
            }
            // With the second look every detection was embedded (the category head must
            // read it before the catalog rule can choose): its embeddings are reused.
            Sighting::Found(mut found) => {
                let detections: Vec<Detection> = found.iter().map(|g| g.detection.clone()).collect();
                let garments = rule(&detections);
                let ready = garments.iter().map(|g| found.iter().position(|f| Some(f.detection.bbox) == g.crop).map(|i| std::mem::take(&mut found[i].embedding))).collect();
                Self { garments, ready }
            }
            Sighting::Detected(detections) => {
                let garments = rule(&detections);
                Self { ready: vec![None; garments.len()], garments }
            }
        }
    }

    /// The crops still to embed, in garment order.
    fn missing(&self) -> Vec<Option<BBox>> {
        self.garments.iter().zip(&self.ready).filter(|(_, e)| e.is_none()).map(|(g, _)| g.crop).collect()
    }

    /// The garments, given the embeddings of [`Self::missing`] in its order.
    fn finish(self, fresh: &mut impl Iterator<Item = Vec<f32>>) -> Vec<NewGarment> {
        self.garments
            .into_iter()
            .zip(self.ready)
            .map(|(g, e)| NewGarment { bbox: g.bbox, category: g.category, score: g.score, embedding: e.unwrap_or_else(|| fresh.next().unwrap_or_default()) })
            .collect()
    }
}

/// The embedded garments of one decoded catalog image, its networks run for it alone.
fn entry_garments(pipeline: &GarmentPipeline<'_>, entry: &CatalogEntry, image: &RgbImage, boxes: BoxMode) -> Result<Vec<NewGarment>> {
    let sighting = if !is_detected(entry, boxes) {
        Sighting::Annotated
    } else if pipeline.second_look_share() > 0.0 {
        Sighting::Found(pipeline.find_garments(image)?)
    } else {
        Sighting::Detected(pipeline.detect(image)?)
    };
    let planned = PlannedItem::new(entry, image, sighting);
    let fresh = pipeline.embed(image, &planned.missing())?;
    Ok(planned.finish(&mut fresh.into_iter()))
}

/// The embedded garments of many decoded catalog images through the batched passes
/// ([`BuildOptions::batch`]), in order.
fn entries_garments(pipeline: &GarmentPipeline<'_>, items: &[(&CatalogEntry, &RgbImage)], opts: &BuildOptions) -> Result<Vec<Vec<NewGarment>>> {
    let detected: Vec<&RgbImage> = items.iter().filter(|(entry, _)| is_detected(entry, opts.boxes)).map(|(_, image)| *image).collect();
    let mut sightings: Box<dyn Iterator<Item = Sighting>> = if pipeline.second_look_share() > 0.0 {
        Box::new(pipeline.find_garments_batched(&detected, opts.batch)?.into_iter().map(Sighting::Found))
    } else {
        Box::new(pipeline.detect_batched(&detected, opts.batch)?.into_iter().map(Sighting::Detected))
    };
    let planned: Vec<PlannedItem> = items
        .iter()
        .map(|(entry, image)| {
            let sighting = if is_detected(entry, opts.boxes) { sightings.next().expect("one sighting per detected item") } else { Sighting::Annotated };
            PlannedItem::new(entry, image, sighting)
        })
        .collect();
    let crops: Vec<(&RgbImage, Option<BBox>)> = items.iter().zip(&planned).flat_map(|((_, image), p)| p.missing().into_iter().map(move |b| (*image, b))).collect();
    let mut fresh = pipeline.embed_batched(&crops, opts.batch)?.into_iter().map(|r| r.embedding);
    Ok(planned.into_iter().map(|p| p.finish(&mut fresh)).collect())
}

/// What publishing produced.
struct Published {
    manifest: crate::store::GenerationManifest,
    ann: LoadOutcome,
}

/// Dumps the generation's graph, publishes it, then writes its serving snapshot and moves
/// `serving/CURRENT`: the graph is ready before a searcher can switch to the generation.
fn publish(store: &CatalogStore, builder: GenerationBuilder, opts: &BuildOptions, progress: ProgressFn) -> Result<Published> {
    let id = builder.id();
    progress(Progress::Stage { name: "ANN graph".into(), total: 1 });
    let vectors = GarmentVectors::from_generation(&store.generation_garments(id)?)?;
    let (_, ann) = GarmentIndex::open(store.ann_dir().as_deref(), id, vectors, opts.ann.clone())?;
    progress(Progress::Advance(1));
    let manifest = builder.publish()?;
    write_serving_snapshot(store)?;
    Ok(Published { manifest, ann })
}

/// Writes the published generation's serving snapshot, derived from the store alone, and
/// then points `serving/CURRENT` at it; returns the generation. `indexer serving rebuild`
/// runs it to restore a lost or damaged snapshot.
pub fn write_serving_snapshot(store: &CatalogStore) -> Result<Option<u64>> {
    let Some(dir) = store.serving_dir() else { return Ok(None) };
    let snapshot = Snapshot::from_store(store)?;
    snapshot.write(&dir)?;
    snapshot::set_current(&dir, snapshot.generation)?;
    Ok(Some(snapshot.generation))
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Default)]
pub struct PruneOutcome {
    pub store: PruneReport,
    pub graph_dumps: usize,
    pub snapshots: usize,
    /// Generations left.
    pub kept: Vec<u64>,
}

/// Keeps the newest `retain` generations in the store, and the graph dumps and serving
/// snapshots of the kept ones only: the one prune path of `indexer build` and
/// `indexer prune`.
pub fn prune(store: &CatalogStore, retain: usize) -> Result<PruneOutcome> {
    let report = store.prune(retain)?;
    let kept: Vec<u64> = store.generations()?.iter().map(|g| g.id).collect();
    let graph_dumps = match store.ann_dir() {
        Some(dir) => graph::remove_dumps_except(&dir, &kept)?,
        None => 0,
    };
    let snapshots = match store.serving_dir() {
        Some(dir) => snapshot::remove_except(&dir, &kept)?,
        None => 0,
    };
    Ok(PruneOutcome { store: report, graph_dumps, snapshots, kept })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(category: &str, x1: f32, score: f32) -> Detection {
        Detection { bbox: BBox::new(x1, 0.0, x1 + 10.0, 10.0), class: 0, category: category.into(), score, class_probs: Vec::new(), centreness: 1.0 }
    }

    #[test]
    fn catalog_items_keep_detections_of_their_category_else_the_whole_image() {
        let found = [det("top", 0.0, 0.9), det("pants", 20.0, 0.8), det("top", 40.0, 0.5)];
        let g = item_garments(Some("top"), false, &found, 100, 50, None);
        assert_eq!(g.iter().map(|g| (g.category.as_str(), g.bbox.x1)).collect::<Vec<_>>(), [("top", 0.0)], "the best top only");
        assert_eq!(g[0].crop, Some(found[0].bbox));
        // No detection of the item's category: the whole image, with the catalog category.
        let g = item_garments(Some("skirt"), false, &found, 100, 50, None);
        assert_eq!(g, vec![ItemGarment { crop: None, bbox: BBox::new(0.0, 0.0, 100.0, 50.0), category: "skirt".into(), score: 1.0 }]);
        // No category: every detection; nothing detected: the whole image as "unknown".
        assert_eq!(item_garments(None, false, &found, 100, 50, None).len(), 3);
        assert_eq!(item_garments(None, false, &[], 100, 50, None)[0].category, "unknown");
        // On a packshot the product's extent stands for the whole image.
        let product = BBox::new(10.0, 5.0, 60.0, 45.0);
        let g = item_garments(Some("skirt"), false, &found, 100, 50, Some(product));
        assert_eq!(g, vec![ItemGarment { crop: Some(product), bbox: product, category: "skirt".into(), score: 1.0 }]);
        // A DeepFashion2 gallery image keeps every garment whatever its first item's class.
        assert_eq!(item_garments(Some("top"), true, &found, 100, 50, None).len(), 3);
    }
}
