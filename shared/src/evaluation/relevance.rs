//! Category precision: are a garment's shop items *of its kind*? What a shopper gets when the
//! shop lacks the exact item (a real shop rarely has it in the exact pixels), which the
//! DeepFashion2 top-k, scored on exact items only, cannot see.
//!
//! For each labelled garment of a DeepFashion2-format folder, the search a shopper's request
//! makes ([`SearchEngine::search_image`]: the same detection, crops, embedding and ranking):
//! with annotated boxes, the box as the shopper's own region (its category then comes from
//! the embedder's category head, as for a drawn box); with detected boxes, the photo as
//! uploaded, each annotated garment taking the found garment of highest IoU (≥ 0.5). The
//! score of a garment is the share of its first k items whose catalog category equals its
//! annotated category; the report gives the mean over garments and per category.
//! Garments whose category the catalog does not hold at all are left out and counted: no
//! ranking can return what the shop lacks.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::datasets::{Df2Annotation, Df2Folder};
use crate::progress::{Progress, ProgressFn};
use crate::serving::engine::{GarmentResult, Ranking, SearchEngine, SearchRequest, ServingIndex};
use crate::vision::decode_image;
use crate::{Error, Result};

/// Where the query garments come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelevanceBoxes {
    /// The annotated boxes, searched as a shopper's drawn box.
    GroundTruth,
    /// The photo searched as uploaded; the detector finds the garments.
    Detected,
}

impl RelevanceBoxes {
    pub fn as_str(self) -> &'static str {
        match self {
            RelevanceBoxes::GroundTruth => "gt",
            RelevanceBoxes::Detected => "detected",
        }
    }
}

/// Precision of one group of garments.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CategoryRow {
    /// Garments scored (their category is in the catalog).
    pub queries: usize,
    /// Mean share of the first k items of the garment's category (a miss counts 0).
    pub precision: f64,
    /// Share of garments whose search used their annotated category (the detector's class
    /// or the category head's guess).
    pub category_accuracy: f64,
    /// With detected boxes: garments no found garment overlapped with IoU ≥ 0.5.
    pub misses: usize,
}

/// The report of `indexer eval relevance`.
#[derive(Debug, Clone, Serialize)]
pub struct RelevanceReport {
    pub protocol: &'static str,
    pub boxes: &'static str,
    pub ranking: &'static str,
    pub k: usize,
    /// Labelled garments of the chosen images.
    pub garments: usize,
    pub overall: CategoryRow,
    pub per_category: BTreeMap<String, CategoryRow>,
    /// Garments left out because the catalog has none of their category, by category.
    pub absent: BTreeMap<String, usize>,
    /// Garments of the catalog by category.
    pub catalog: BTreeMap<String, usize>,
    pub generation: u64,
    pub embedder: String,
    pub detector: Option<String>,
    pub seconds: f64,
}

/// What the evaluation reads.
pub struct RelevanceInputs<'a> {
    pub engine: &'a SearchEngine,
    pub index: &'a ServingIndex,
    pub queries: &'a Df2Folder,
    /// Which image ids to use (the split).
    pub keep: &'a dyn Fn(u64) -> bool,
    pub boxes: RelevanceBoxes,
    pub ranking: Ranking,
    pub k: usize,
}

/// One scored garment.
struct Scored {
    category: String,
    precision: f64,
    right_category: bool,
    found: bool,
}

/// The share of `garment`'s first `k` items that are of `category`.
fn precision_of(garment: &GarmentResult, category: &str, k: usize) -> f64 {
    garment.results.iter().take(k).filter(|r| r.category.as_deref() == Some(category)).count() as f64 / k as f64
}

fn row(scored: &[&Scored]) -> CategoryRow {
    let n = scored.len();
    let mean = |f: &dyn Fn(&Scored) -> f64| if n == 0 { 0.0 } else { scored.iter().map(|s| f(s)).sum::<f64>() / n as f64 };
    CategoryRow {
        queries: n,
        precision: mean(&|s| s.precision),
        category_accuracy: mean(&|s| f64::from(u8::from(s.right_category))),
        misses: scored.iter().filter(|s| !s.found).count(),
    }
}

/// Runs the protocol.
pub fn evaluate_relevance(inputs: &RelevanceInputs<'_>, progress: ProgressFn) -> Result<RelevanceReport> {
    if inputs.k == 0 || inputs.k > crate::serving::engine::MAX_RESULTS {
        return Err(Error::InvalidK { k: inputs.k, max: crate::serving::engine::MAX_RESULTS });
    }
    let started = Instant::now();
    let images: Vec<_> = inputs.queries.images().iter().filter(|i| (inputs.keep)(i.id)).collect();
    let request = |region| SearchRequest { k: inputs.k, category: None, region, ranking: inputs.ranking };
    let mut scored = Vec::new();
    let mut absent: BTreeMap<String, usize> = BTreeMap::new();
    let mut garments = 0;
    progress(Progress::Stage { name: "relevance queries".into(), total: images.len() as u64 });
    for entry in images {
        let annotation = Df2Annotation::read(&entry.annotation)?;
        let bytes = std::fs::read(&entry.image).map_err(|e| Error::io(&entry.image, e))?;
        let image = decode_image(&bytes, inputs.engine.limits)?;
        let uploaded = match inputs.boxes {
            RelevanceBoxes::Detected => Some(inputs.engine.search_image(inputs.index, &image, &request(None))?),
            RelevanceBoxes::GroundTruth => None,
        };
        for item in &annotation.items {
            garments += 1;
            let category = item.category_name.clone();
            if !inputs.index.has_category(&category) {
                *absent.entry(category).or_default() += 1;
                continue;
            }
            let found = match &uploaded {
                None => inputs.engine.search_image(inputs.index, &image, &request(Some(item.bbox)))?.garments.into_iter().next(),
                Some(outcome) => outcome
                    .garments
                    .iter()
                    .map(|g| (g, item.bbox.iou(&crate::geometry::BBox::new(g.bbox[0], g.bbox[1], g.bbox[2], g.bbox[3]))))
                    .filter(|(_, iou)| *iou >= 0.5)
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(g, _)| g.clone()),
            };
            scored.push(match found {
                Some(g) => Scored { precision: precision_of(&g, &category, inputs.k), right_category: g.category == category, found: true, category },
                None => Scored { precision: 0.0, right_category: false, found: false, category },
            });
        }
        progress(Progress::Advance(1));
    }
    let mut by_category: BTreeMap<String, Vec<&Scored>> = BTreeMap::new();
    for s in &scored {
        by_category.entry(s.category.clone()).or_default().push(s);
    }
    let embedder = inputs.engine.embedder.version().to_string();
    let detector = match inputs.boxes {
        RelevanceBoxes::Detected => inputs.engine.detector.as_ref().map(|d| d.version().to_string()),
        RelevanceBoxes::GroundTruth => None,
    };
    Ok(RelevanceReport {
        protocol: "category-precision",
        boxes: inputs.boxes.as_str(),
        ranking: inputs.ranking.as_str(),
        k: inputs.k,
        garments,
        overall: row(&scored.iter().collect::<Vec<_>>()),
        per_category: by_category.iter().map(|(c, rows)| (c.clone(), row(rows))).collect(),
        absent,
        catalog: inputs.index.categories().into_iter().collect(),
        generation: inputs.index.generation(),
        embedder,
        detector,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::engine::{CategorySource, ItemHit};

    fn hit(category: &str) -> ItemHit {
        ItemHit { sku: "s".into(), score: 0.5, title: None, label: None, category: Some(category.into()), price: None, currency: None, url: None, bbox: [0.0; 4] }
    }

    #[test]
    fn precision_is_the_share_of_the_first_k_of_the_right_kind() {
        let g = GarmentResult {
            bbox: [0.0; 4],
            category: "dress".into(),
            category_source: CategorySource::Classifier,
            category_probability: Some(0.9),
            score: 1.0,
            source: "region",
            ranked_first: None,
            results: vec![hit("dress"), hit("skirt"), hit("dress"), hit("dress")],
        };
        assert_eq!(precision_of(&g, "dress", 2), 0.5);
        assert_eq!(precision_of(&g, "dress", 4), 0.75);
        // Fewer results than k count as wrong ones.
        assert_eq!(precision_of(&g, "dress", 8), 0.375);
    }
}
