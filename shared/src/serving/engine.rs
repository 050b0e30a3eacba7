//! The search a shopper's photo goes through: decode with limits → detect garments (or
//! take the shopper's own box) → crop and embed each (the pipeline's second look renames detected ones) → nearest shop garments
//! of each → their items. Decoding, detection and embedding are the indexer's own
//! ([`GarmentPipeline`]), so a shop photo searched for finds itself; the evaluators rank
//! through [`SearchEngine::search_garments`], so they measure this search.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use image::RgbImage;
use serde::Serialize;

use super::snapshot::{self, ServedGarment, ServedItem, Snapshot};
use crate::ann::{GarmentIndex, LoadOutcome, SearchHit};
use crate::catalog::related::{preferred_category, substitutes};
use crate::geometry::BBox;
use crate::models::detector::{Detection, GarmentDetector};
use crate::models::embedder::{GarmentEmbedder, GarmentReading};
use crate::pipeline::{FoundGarment, GarmentPipeline};
use crate::store::ItemMetadata;
use crate::store::StoreDir;
use crate::vision::DecodeLimits;
use crate::{Error, Result};

/// Largest `k` a search may ask for.
pub const MAX_RESULTS: usize = 100;

/// One generation loaded for serving: its snapshot and ANN index.
pub struct ServingIndex {
    snapshot: Snapshot,
    index: GarmentIndex,
    by_sku: HashMap<String, u32>,
    /// How the ANN index was obtained.
    pub outcome: LoadOutcome,
}

impl std::fmt::Debug for ServingIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingIndex").field("generation", &self.snapshot.generation).field("garments", &self.snapshot.garments.len()).finish()
    }
}

impl ServingIndex {
    /// Loads generation `generation` of the store in `store_dir` from its serving snapshot
    /// and graph dump (building the graph in memory when the dump is missing or stale).
    pub fn load(store_dir: &Path, generation: u64) -> Result<Self> {
        let dir = StoreDir::new(store_dir);
        let path = dir.serving().join(snapshot::file_name(generation));
        let snapshot = Snapshot::read(&path)?;
        // A file renamed or copied by hand: serving it would leave CURRENT unmatched, and
        // a watcher would reload it forever.
        if snapshot.generation != generation {
            let reason = format!("holds generation {}, but its name and CURRENT say {generation}", snapshot.generation);
            return Err(Error::Snapshot { path, reason });
        }
        Self::from_snapshot(snapshot, Some(&dir.ann()))
    }

    /// Loads the generation `serving/CURRENT` points at; `None` before the first build.
    pub fn load_current(store_dir: &Path) -> Result<Option<Self>> {
        match snapshot::current(&StoreDir::new(store_dir).serving())? {
            Some(generation) => Ok(Some(Self::load(store_dir, generation)?)),
            None => Ok(None),
        }
    }

    /// Serves `snapshot`, with the ANN parameters its generation was built with (so its
    /// graph dump in `ann_dir` is loaded, not rebuilt).
    pub fn from_snapshot(snapshot: Snapshot, ann_dir: Option<&Path>) -> Result<Self> {
        let params = snapshot.ann.clone().unwrap_or_default();
        let vectors = snapshot.vectors()?;
        // Read the dump only: writing one is the indexer's job, and a searcher writing
        // into the directory the indexer prunes would race with it.
        let (index, outcome) = GarmentIndex::open_read_only(ann_dir, snapshot.generation, vectors, params)?;
        let by_sku = snapshot.items.iter().enumerate().map(|(i, it)| (it.metadata.sku.clone(), i as u32)).collect();
        Ok(Self { snapshot, index, by_sku, outcome })
    }

    pub fn generation(&self) -> u64 {
        self.snapshot.generation
    }

    pub fn items(&self) -> usize {
        self.snapshot.items.len()
    }

    pub fn garments(&self) -> usize {
        self.snapshot.garments.len()
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The item with `sku`.
    pub fn item(&self, sku: &str) -> Option<&ServedItem> {
        self.by_sku.get(sku).map(|&i| &self.snapshot.items[i as usize])
    }

    /// The garments of the item with `sku`.
    pub fn item_garments(&self, sku: &str) -> Vec<&ServedGarment> {
        match self.by_sku.get(sku) {
            Some(&i) => self.snapshot.garments.iter().filter(|g| g.item == i).collect(),
            None => Vec::new(),
        }
    }

    /// Whether any indexed garment has `category`.
    pub fn has_category(&self, category: &str) -> bool {
        self.category_garments(Some(category)) > 0
    }

    /// Indexed garments of `category` (all of them for `None`).
    pub fn category_garments(&self, category: Option<&str>) -> usize {
        match category {
            Some(category) => self.index.categories().find(|(c, _)| *c == category).map_or(0, |(_, n)| n),
            None => self.garments(),
        }
    }

    /// The `k` best distinct items for `embedding`, each with its best-matching garment,
    /// among garments of `category` (all for `None`), skipping items in `skip`. Over-fetches
    /// garments until `k` distinct items are found or the category is exhausted: an item may
    /// own many garments.
    fn nearest_items(&self, embedding: &[f32], k: usize, category: Option<&str>, skip: &HashSet<u32>) -> Result<Vec<(SearchHit, u32)>> {
        let available = self.category_garments(category);
        if available == 0 || k == 0 {
            return Ok(Vec::new());
        }
        let mut fetch = (k + skip.len()).saturating_mul(3).min(available).min(crate::ann::MAX_K);
        loop {
            let mut seen = skip.clone();
            let mut items = Vec::with_capacity(k);
            for hit in self.index.search(embedding, fetch, category)? {
                let item = self.snapshot.garments[hit.row as usize].item;
                if seen.insert(item) {
                    items.push((hit, item));
                    if items.len() == k {
                        break;
                    }
                }
            }
            let cap = available.min(crate::ann::MAX_K);
            if items.len() == k || fetch >= cap {
                return Ok(items);
            }
            fetch = fetch.saturating_mul(4).min(cap);
        }
    }

    /// Category names of the indexed garments with their counts.
    pub fn categories(&self) -> Vec<(String, usize)> {
        self.index.categories().map(|(c, n)| (c.to_string(), n)).collect()
    }
}

/// What a shopper asks.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchRequest {
    /// Shop items per garment, 1..=[`MAX_RESULTS`].
    pub k: usize,
    /// Only garments (found and returned) of this category.
    pub category: Option<String>,
    /// The shopper's own box: search this region only, no detection.
    pub region: Option<BBox>,
    /// How results are ordered when `category` is not given.
    pub ranking: Ranking,
}

/// How a garment's shop items are ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ranking {
    /// Items of the garment's category first (a substitute category when the shop has none
    /// of it), then the rest, each part by similarity: what a shopper expects when the shop
    /// lacks the exact item. Items above the embedder's exact-match similarity come before
    /// both: the very item photographed, whatever category it was given.
    #[default]
    SameKindFirst,
    /// Similarity alone.
    Similarity,
}

impl Ranking {
    pub fn as_str(self) -> &'static str {
        match self {
            Ranking::SameKindFirst => "category",
            Ranking::Similarity => "similarity",
        }
    }
}

/// Where a garment's category came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CategorySource {
    /// The detector's class.
    Detector,
    /// The request's `category`.
    Request,
    /// The embedder's category head (a drawn box, the whole photo).
    Classifier,
    /// Nothing knew it (an embedder without a category head).
    Unknown,
}

/// The category whose items a garment's results list first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankedFirst {
    pub category: String,
    /// `same` (the garment's own category) or `substitute` (the shop has none of it),
    /// `filter` (the request's `category`, results of no other kind).
    pub relation: &'static str,
    /// Results of that category listed in that place (after any exact matches).
    pub results: usize,
}

/// A shop item found for a garment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemHit {
    pub sku: String,
    /// Cosine similarity of the best-matching garment of the item.
    pub score: f32,
    pub title: Option<String>,
    pub label: Option<String>,
    pub category: Option<String>,
    pub price: Option<f64>,
    pub currency: Option<String>,
    pub url: Option<String>,
    /// The matched garment's box in the shop image.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

/// A garment of the shopper's photo with its shop items.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GarmentResult {
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    pub category: String,
    pub category_source: CategorySource,
    /// The category head's probability for a classified garment.
    pub category_probability: Option<f32>,
    /// Detection score (1 for the shopper's own box and the whole-image fallback).
    pub score: f32,
    /// How the garment was found: `detected`, `region` or `whole_image`.
    pub source: &'static str,
    /// The category listed first; `None` with similarity ranking or when the shop has
    /// neither the garment's category nor a substitute.
    pub ranked_first: Option<RankedFirst>,
    pub results: Vec<ItemHit>,
}

/// Milliseconds per stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    pub decode: f64,
    pub detect: f64,
    pub embed: f64,
    pub search: f64,
    pub fetch: f64,
    pub total: f64,
}

/// The answer to a search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchOutcome {
    pub width: u32,
    pub height: u32,
    pub generation: u64,
    pub garments: Vec<GarmentResult>,
    pub timings_ms: Timings,
}

/// A garment of the shopper's photo to search for.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryGarment {
    pub bbox: BBox,
    /// Its category when known before embedding (the detector's class, the request's);
    /// `None`: the embedder's category head guesses it.
    pub known: Option<(String, CategorySource)>,
    /// Detection score (1 for a drawn box and the whole photo).
    pub score: f32,
    /// `detected`, `region` or `whole_image`.
    pub source: &'static str,
    /// Its reading (embedding, and the category head's probabilities where they were kept)
    /// when the pipeline already made it (the second look at a detected garment); `None`:
    /// read with the request's other garments.
    pub reading: Option<GarmentReading>,
}

/// The networks of a searcher.
pub struct SearchEngine {
    pub detector: Option<GarmentDetector>,
    pub embedder: GarmentEmbedder,
    pub limits: DecodeLimits,
}

impl SearchEngine {
    /// The garment pipeline of these networks: the same one the indexer runs.
    pub fn pipeline(&self) -> GarmentPipeline<'_> {
        GarmentPipeline { detector: self.detector.as_ref(), embedder: &self.embedder, limits: self.limits }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

impl SearchEngine {
    /// Checks a request before any work: `k` in range, a category somebody knows.
    pub fn validate(&self, index: &ServingIndex, req: &SearchRequest) -> Result<()> {
        if req.k == 0 || req.k > MAX_RESULTS {
            return Err(Error::InvalidK { k: req.k, max: MAX_RESULTS });
        }
        if let Some(c) = &req.category {
            let known = self.detector.as_ref().is_some_and(|d| d.config().categories.iter().any(|k| &k.name == c)) || index.has_category(c);
            if !known {
                return Err(Error::UnknownCategory(c.clone()));
            }
        }
        if let Some(b) = req.region
            && !b.is_valid()
        {
            return Err(Error::InvalidBox { reason: format!("{:?} is not a box with x1 < x2 and y1 < y2", b.to_array()) });
        }
        Ok(())
    }

    /// Searches the shop for the garments of a photo given as file bytes.
    pub fn search(&self, index: &ServingIndex, bytes: &[u8], req: &SearchRequest) -> Result<SearchOutcome> {
        self.search_unless(index, bytes, req, &|| false)
    }

    /// As [`Self::search`], asking `cancelled` between stages (after decoding, after
    /// detection) and stopping with [`Error::Cancelled`] when it says yes: a server passes
    /// "has the client gone", so a search nobody will read does not run to its end.
    pub fn search_unless(&self, index: &ServingIndex, bytes: &[u8], req: &SearchRequest, cancelled: &dyn Fn() -> bool) -> Result<SearchOutcome> {
        let started = Instant::now();
        self.validate(index, req)?;
        let t = Instant::now();
        let image = self.pipeline().decode(bytes)?;
        let decode = ms(t);
        let mut outcome = self.search_image_unless(index, &image, req, cancelled, "decoding")?;
        outcome.timings_ms.decode = decode;
        outcome.timings_ms.total = ms(started);
        Ok(outcome)
    }

    /// Searches the shop for the garments of a decoded photo.
    pub fn search_image(&self, index: &ServingIndex, image: &RgbImage, req: &SearchRequest) -> Result<SearchOutcome> {
        self.search_image_unless(index, image, req, &|| false, "decoding")
    }

    fn search_image_unless(&self, index: &ServingIndex, image: &RgbImage, req: &SearchRequest, cancelled: &dyn Fn() -> bool, done: &'static str) -> Result<SearchOutcome> {
        self.validate(index, req)?;
        if cancelled() {
            return Err(Error::Cancelled { stage: done });
        }
        let t = Instant::now();
        let detections = if req.region.is_some() { Vec::new() } else { self.pipeline().detect(image)? };
        let detect = ms(t);
        if cancelled() {
            return Err(Error::Cancelled { stage: "detection" });
        }
        let t = Instant::now();
        let garments = self.query_garments(image, req, detections)?;
        let second_look = ms(t);
        let (garments, mut timings) = self.search_garments(index, image, garments, req)?;
        timings.detect = detect;
        timings.embed += second_look;
        let (width, height) = image.dimensions();
        Ok(SearchOutcome { width, height, generation: index.generation(), garments, timings_ms: timings })
    }

    /// The garments a request searches for: the shopper's box, or the detector's
    /// `detections` after the pipeline's second look (of the request's category only, when
    /// it names one), or the whole photo when there are none.
    fn query_garments(&self, image: &RgbImage, req: &SearchRequest, detections: Vec<Detection>) -> Result<Vec<QueryGarment>> {
        let (w, h) = image.dimensions();
        let requested = req.category.as_ref().map(|c| (c.clone(), CategorySource::Request));
        let mut garments: Vec<QueryGarment> = match req.region {
            Some(region) => {
                let clipped = region.clip(w, h);
                if !clipped.is_valid() {
                    return Err(Error::InvalidBox { reason: format!("{:?} lies outside the {w}×{h} photo", region.to_array()) });
                }
                vec![QueryGarment { bbox: clipped, known: requested.clone(), score: 1.0, source: "region", reading: None }]
            }
            None => self
                .second_look(image, detections)?
                .into_iter()
                .filter(|g| req.category.as_ref().is_none_or(|c| &g.detection.category == c))
                .map(|g| QueryGarment {
                    bbox: g.detection.bbox,
                    known: Some((g.detection.category, CategorySource::Detector)),
                    score: g.detection.score,
                    source: "detected",
                    reading: Some(GarmentReading { embedding: g.embedding, categories: None }),
                })
                .collect(),
        };
        if garments.is_empty() {
            garments.push(QueryGarment { bbox: BBox::new(0.0, 0.0, w as f32, h as f32), known: requested, score: 1.0, source: "whole_image", reading: None });
        }
        Ok(garments)
    }

    /// The pipeline's second look at the detector's garments under its shipped
    /// post-processing (none without a detector).
    fn second_look(&self, image: &RgbImage, detections: Vec<Detection>) -> Result<Vec<FoundGarment>> {
        match &self.detector {
            Some(d) => self.pipeline().second_look(image, detections, &d.config().postprocess),
            None => Ok(Vec::new()),
        }
    }

    /// Embeds `garments` of `image` (by the one pipeline; those already embedded are reused) and ranks the shop
    /// items of each as the request asks: the second half of every search, and what the
    /// evaluators call with the garments their protocol chooses. A garment whose category
    /// is not known gets the category head's guess.
    pub fn search_garments(&self, index: &ServingIndex, image: &RgbImage, garments: Vec<QueryGarment>, req: &SearchRequest) -> Result<(Vec<GarmentResult>, Timings)> {
        let mut timings = Timings::default();
        let t = Instant::now();
        // Garments found by the detector were embedded by the second look; the rest (a
        // drawn box, the whole photo, an evaluator's boxes) here.
        let crops: Vec<Option<BBox>> = garments.iter().filter(|g| g.reading.is_none()).map(|g| Some(g.bbox)).collect();
        let mut fresh = self.pipeline().read(image, &crops)?.into_iter();
        timings.embed = ms(t);
        let mut results = Vec::with_capacity(garments.len());
        for mut garment in garments {
            // `embed` gives one vector per crop; were one missing, the index would refuse the
            // empty vector (a dimension error), not answer wrongly.
            let reading = garment.reading.take().or_else(|| fresh.next()).unwrap_or(GarmentReading { embedding: Vec::new(), categories: None });
            let (embedding, probabilities) = (reading.embedding, reading.categories);
            let (category, category_source, category_probability) = match garment.known {
                Some((c, s)) => (c, s, None),
                None => match probabilities.and_then(|p| self.embedder.guess_category(&p)) {
                    Some(g) => (g.category, CategorySource::Classifier, Some(g.probability)),
                    None => ("any".to_string(), CategorySource::Unknown, None),
                },
            };
            let t = Instant::now();
            let (hits, ranked_first) = self.rank(index, &embedding, &category, req)?;
            timings.search += ms(t);
            let t = Instant::now();
            let items =
                hits.iter().map(|(hit, item)| item_hit(&index.snapshot.items[*item as usize].metadata, hit.score, index.snapshot.garments[hit.row as usize].bbox)).collect();
            timings.fetch += ms(t);
            results.push(GarmentResult {
                bbox: garment.bbox.to_array(),
                category,
                category_source,
                category_probability,
                score: garment.score,
                source: garment.source,
                ranked_first,
                results: items,
            });
        }
        Ok((results, timings))
    }
}

/// A garment's items (each hit with its item's row), and which kind was put first.
type Ranked = (Vec<(SearchHit, u32)>, Option<RankedFirst>);

impl SearchEngine {
    /// A garment's `k` items in the order the request asks: the request's category only;
    /// or, by default, its own category's items (or a substitute's) first and then the rest;
    /// or similarity alone.
    fn rank(&self, index: &ServingIndex, embedding: &[f32], category: &str, req: &SearchRequest) -> Result<Ranked> {
        let none = HashSet::new();
        if let Some(filter) = req.category.as_deref() {
            let hits = index.nearest_items(embedding, req.k, Some(filter), &none)?;
            let ranked = RankedFirst { category: filter.to_string(), relation: "filter", results: hits.len() };
            return Ok((hits, Some(ranked)));
        }
        let preferred = match req.ranking {
            Ranking::SameKindFirst => preferred_category(category, |c| index.has_category(c)),
            Ranking::Similarity => None,
        };
        let Some((first, relation)) = preferred else {
            return Ok((index.nearest_items(embedding, req.k, None, &none)?, None));
        };
        // A result so close that it is the very item photographed stays in front whatever its
        // category (the category may be misjudged; the item cannot be).
        let mut hits: Vec<(SearchHit, u32)> = match self.embedder.config().exact_match_similarity {
            Some(threshold) => index.nearest_items(embedding, req.k, None, &none)?.into_iter().take_while(|(hit, _)| hit.score >= threshold).collect(),
            None => Vec::new(),
        };
        let mut taken: HashSet<u32> = hits.iter().map(|(_, item)| *item).collect();
        let same_kind = index.nearest_items(embedding, req.k - hits.len(), Some(first), &taken)?;
        let ranked = RankedFirst { category: first.to_string(), relation: relation.as_str(), results: same_kind.len() };
        hits.extend(same_kind);
        // Too few of that kind: its substitutes next (a dress after the shop's last skirt),
        // then anything.
        let fill = substitutes(category).iter().copied().filter(|c| *c != first).map(Some).chain(std::iter::once(None));
        for tier in fill {
            if hits.len() >= req.k {
                break;
            }
            taken = hits.iter().map(|(_, item)| *item).collect();
            hits.extend(index.nearest_items(embedding, req.k - hits.len(), tier, &taken)?);
        }
        Ok((hits, Some(ranked)))
    }
}

fn item_hit(m: &ItemMetadata, score: f32, bbox: BBox) -> ItemHit {
    ItemHit {
        sku: m.sku.clone(),
        score,
        title: m.title.clone(),
        label: m.label.clone(),
        category: m.category.clone(),
        price: m.price,
        currency: m.currency.clone(),
        url: m.url.clone(),
        bbox: bbox.to_array(),
    }
}
