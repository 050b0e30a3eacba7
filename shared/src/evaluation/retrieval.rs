//! Consumer-to-shop retrieval accuracy by the DeepFashion2 protocol (arXiv 1901.07973, §5.3),
//! run against a built index through the search a shopper's query makes.
//!
//! 1. In each consumer image, every detected garment is assigned to the ground-truth item it
//!    overlaps most (arg-max IoU, no minimum). Style-0 items absorb detections but are never
//!    scored.
//! 2. For each ground-truth query item (an entry of `query_gt.json`), the candidates are the
//!    detections assigned to it whose class equals its class; the highest-scoring one is its
//!    query. None → a miss.
//! 3. A retrieved shop garment at rank t is a hit when its shop image is one of the item's
//!    ground-truth gallery images (same `pair_id` and `style`) and its box overlaps that
//!    image's ground-truth box with IoU ≥ 0.5.
//! 4. top-k accuracy = items with a hit within the first k / all query items.
//!
//! Ranking is the searcher's own ([`SearchEngine::search_garments`] over the generation's
//! serving snapshot, similarity order): the query is embedded by the one garment pipeline,
//! and a shop image appears once, with its best-matching garment, as a shopper sees it.
//! That garment must be the right one (IoU ≥ 0.5): a shop photo whose trousers match
//! better than its top is no hit for the top.
//!
//! With `--boxes gt` the detections are the ground-truth items themselves (score 1), which
//! measures retrieval alone. Shop garments map to gallery images through their sku: a
//! DeepFashion2 shop folder indexes each image under its file stem (`000123` → 123); other
//! skus (catalog distractors) can never be hits.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use image::RgbImage;
use serde::Serialize;

use crate::datasets::{Df2Annotation, Df2Folder, GalleryGt, QueryGt};
use crate::geometry::BBox;
use crate::models::detector::Postprocess;
use crate::models::embedder::GarmentReading;
use crate::progress::{Progress, ProgressFn};
use crate::serving::engine::{QueryGarment, Ranking, SearchEngine, SearchRequest, ServingIndex};
use crate::{Error, Result};

/// The ranks DeepFashion2 reports.
pub const TOP_K: [usize; 5] = [1, 5, 10, 15, 20];

/// A detection in a consumer image.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub bbox: BBox,
    pub category_id: u32,
    pub score: f32,
    /// The garment's reading (embedding and category probabilities) when the pipeline
    /// made it with the detection.
    pub reading: Option<GarmentReading>,
}

/// Accuracy of one group of queries.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupAccuracy {
    pub queries: usize,
    /// Queries with no detection of their class assigned to them.
    pub misses: usize,
    pub top_k: BTreeMap<String, f64>,
}

/// The report of `indexer eval retrieval`.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    pub protocol: &'static str,
    pub boxes: &'static str,
    pub queries: usize,
    pub top_k: BTreeMap<String, f64>,
    pub misses: usize,
    /// By ground-truth category name.
    pub per_category: BTreeMap<String, GroupAccuracy>,
    /// By DeepFashion2 scale (1 small, 2 moderate, 3 large).
    pub per_scale: BTreeMap<String, GroupAccuracy>,
    pub gallery_garments: usize,
    pub generation: u64,
    pub embedder: String,
    /// The detector's version with `--boxes detected`.
    pub detector: Option<String>,
    pub seconds: f64,
}

/// One row of the DeepFashion2 submission file.
#[derive(Debug, Clone, Serialize)]
pub struct SubmissionEntry {
    pub query_image_id: u64,
    pub query_bbox: [f32; 4],
    pub query_cls: u32,
    pub query_score: f32,
    pub gallery_image_id: Vec<u64>,
    pub gallery_bbox: Vec<[f32; 4]>,
}

/// Step 1 and 2: the query detection of each ground-truth item of one image, by item index.
pub fn assign_queries(items: &[(BBox, u32, u32)], detections: &[Detection]) -> Vec<Option<usize>> {
    // items: (box, category_id, style)
    let mut best: Vec<Option<usize>> = vec![None; items.len()];
    for (d, det) in detections.iter().enumerate() {
        let Some((owner, _)) = items.iter().enumerate().map(|(i, (b, _, _))| (i, det.bbox.iou(b))).max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0))) else {
            continue;
        };
        let (_, class, style) = items[owner];
        if style == 0 || det.category_id != class {
            continue;
        }
        if best[owner].is_none_or(|cur| det.score > detections[cur].score) {
            best[owner] = Some(d);
        }
    }
    best
}

/// Step 3: a retrieved shop garment (its gallery image and box) is a hit when it is one
/// of the item's ground-truth gallery images with IoU ≥ 0.5 against that image's box.
pub fn is_hit(gallery_image: u64, garment_box: &BBox, right: &[(u64, BBox)]) -> bool {
    right.iter().any(|(id, b)| *id == gallery_image && garment_box.iou(b) >= 0.5)
}

struct Scored {
    category: String,
    scale: u8,
    first_hit: Option<usize>,
    detected: bool,
}

/// One scored query, for reports that show individual queries (the worst ones).
#[derive(Debug, Clone, Serialize)]
pub struct QueryDetail {
    pub query_image_id: u64,
    pub category: String,
    /// The ground-truth box of the item.
    pub gt_bbox: [f32; 4],
    /// The detection used as its query; `None` for a miss.
    pub query_bbox: Option<[f32; 4]>,
    /// Rank (0-based) of the first hit within the top 20.
    pub first_hit: Option<usize>,
    /// The first five results: sku, garment box, score.
    pub retrieved: Vec<(String, [f32; 4], f32)>,
}

/// Everything an evaluation produces.
pub struct RetrievalOutput {
    pub report: RetrievalReport,
    pub submission: Vec<SubmissionEntry>,
    pub details: Vec<QueryDetail>,
}

fn group(rows: &[&Scored]) -> GroupAccuracy {
    let n = rows.len();
    GroupAccuracy {
        queries: n,
        misses: rows.iter().filter(|r| !r.detected).count(),
        top_k: TOP_K.iter().map(|k| (k.to_string(), if n == 0 { 0.0 } else { rows.iter().filter(|r| r.first_hit.is_some_and(|h| h < *k)).count() as f64 / n as f64 })).collect(),
    }
}

/// What the evaluation reads.
pub struct RetrievalInputs<'a> {
    /// The networks, searched as a shopper's request is ([`SearchEngine::search_garments`]).
    pub engine: &'a SearchEngine,
    /// The published generation as the searcher serves it.
    pub index: &'a ServingIndex,
    pub queries: &'a Df2Folder,
    pub query_gt: &'a [QueryGt],
    pub gallery_gt: &'a [GalleryGt],
}

/// Where the query garments come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryBoxes {
    /// The annotation's items as detections with score 1: retrieval alone.
    GroundTruth,
    /// The engine's garment detector, with its evaluation post-processing (low score
    /// floor, up to 100 per image), as DeepFashion2 scores Match R-CNN.
    Detected,
}

/// Runs the protocol with ground-truth boxes as detections.
pub fn evaluate_with_gt_boxes(inputs: &RetrievalInputs<'_>, progress: ProgressFn) -> Result<(RetrievalReport, Vec<SubmissionEntry>)> {
    let out = evaluate(inputs, QueryBoxes::GroundTruth, progress)?;
    Ok((out.report, out.submission))
}

/// A query image's detections: the annotated items, or the detector's garments.
fn query_detections(engine: &SearchEngine, image: &RgbImage, anno: &Df2Annotation, boxes: QueryBoxes) -> Result<Vec<Detection>> {
    match boxes {
        QueryBoxes::GroundTruth => Ok(anno.items.iter().map(|i| Detection { bbox: i.bbox, category_id: i.category_id, score: 1.0, reading: None }).collect()),
        QueryBoxes::Detected => {
            let detector = engine.detector.as_ref().ok_or_else(|| Error::InvalidSetting { name: "boxes", reason: "detected query boxes need a detector".into() })?;
            let categories = &detector.config().categories;
            let share = detector.config().postprocess.category_fusion;
            if share <= 0.0 {
                // The detector alone: its evaluation floor, each query embedded when searched.
                return Ok(engine
                    .pipeline()
                    .detect_with(image, &Postprocess::EVALUATION)?
                    .into_iter()
                    .map(|d| Detection { bbox: d.bbox, category_id: categories[d.class].id, score: d.score, reading: None })
                    .collect());
            }
            // The detector's proposals named again by the category head at the shipped share.
            Ok(engine
                .pipeline()
                .detections_for_evaluation(image, &[share])?
                .into_iter()
                .flatten()
                .map(|(d, reading)| Detection { bbox: d.bbox, category_id: categories[d.class].id, score: d.score, reading })
                .collect())
        }
    }
}

/// A query item of one image: its ground truth and the detection assigned to it.
struct QueryItem<'q> {
    gt: &'q QueryGt,
    detection: Option<usize>,
    category: String,
    scale: u8,
    gt_bbox: [f32; 4],
}

/// Runs the protocol with query garments from `boxes`; each query is ranked by the engine's
/// search (similarity ranking, the shop's best garment of each item), so the numbers are
/// what a shopper's request gets.
pub fn evaluate(inputs: &RetrievalInputs<'_>, boxes: QueryBoxes, progress: ProgressFn) -> Result<RetrievalOutput> {
    let started = Instant::now();
    let mut gallery_of: HashMap<(u64, u32), Vec<(u64, BBox)>> = HashMap::new();
    for g in inputs.gallery_gt {
        gallery_of.entry((g.pair_id, g.style)).or_default().push((g.gallery_image_id, g.bbox()));
    }
    let mut by_image: BTreeMap<u64, Vec<&QueryGt>> = BTreeMap::new();
    for q in inputs.query_gt {
        by_image.entry(q.query_image_id).or_default().push(q);
    }
    let max_k = *TOP_K.iter().max().expect("non-empty");
    let request = SearchRequest { k: max_k, category: None, region: None, ranking: Ranking::Similarity };
    let mut scored = Vec::new();
    let mut submission = Vec::new();
    let mut details = Vec::new();
    progress(Progress::Stage { name: "retrieval queries".into(), total: inputs.query_gt.len() as u64 });
    for (image_id, queries) in by_image {
        let entry = inputs.queries.image(image_id).ok_or_else(|| Error::InvalidDatasetLayout {
            path: inputs.queries.root().to_path_buf(),
            reason: format!("query image {image_id} of query_gt.json has no image/annotation"),
        })?;
        let anno = Df2Annotation::read(&entry.annotation)?;
        let items: Vec<(BBox, u32, u32)> = anno.items.iter().map(|i| (i.bbox, i.category_id, i.style)).collect();
        let image = inputs.engine.pipeline().decode(&std::fs::read(&entry.image).map_err(|e| Error::io(&entry.image, e))?)?;
        let detections = query_detections(inputs.engine, &image, &anno, boxes)?;
        let assigned = assign_queries(&items, &detections);
        let todo: Vec<QueryItem<'_>> = queries
            .iter()
            .map(|q| {
                let item = anno.items.iter().position(|i| i.style == q.style && i.category_id == q.cls);
                QueryItem {
                    gt: q,
                    detection: item.and_then(|i| assigned[i]),
                    category: item.map(|i| anno.items[i].category_name.clone()).unwrap_or_else(|| q.cls.to_string()),
                    scale: item.map_or(0, |i| anno.items[i].scale),
                    gt_bbox: item.map_or(q.bbox, |i| anno.items[i].bbox.to_array()),
                }
            })
            .collect();
        let garments: Vec<QueryGarment> = todo
            .iter()
            .filter_map(|q| q.detection)
            .map(|d| QueryGarment { bbox: detections[d].bbox, known: None, score: detections[d].score, source: "detected", reading: detections[d].reading.clone() })
            .collect();
        let (results, _) = inputs.engine.search_garments(inputs.index, &image, garments, &request)?;
        let mut results = results.into_iter();
        for q in todo {
            progress(Progress::Advance(1));
            let Some(det) = q.detection else {
                details.push(QueryDetail { query_image_id: image_id, category: q.category.clone(), gt_bbox: q.gt_bbox, query_bbox: None, first_hit: None, retrieved: Vec::new() });
                scored.push(Scored { category: q.category, scale: q.scale, first_hit: None, detected: false });
                continue;
            };
            let found = results.next().expect("one result per detected query");
            let right = gallery_of.get(&(q.gt.pair_id, q.gt.style)).map(Vec::as_slice).unwrap_or(&[]);
            let gallery: Vec<(Option<u64>, BBox)> = found.results.iter().map(|hit| (hit.sku.parse::<u64>().ok(), BBox::from_array(hit.bbox))).collect();
            let first_hit = gallery.iter().position(|(id, bbox)| id.is_some_and(|g| is_hit(g, bbox, right)));
            submission.push(SubmissionEntry {
                query_image_id: image_id,
                query_bbox: detections[det].bbox.to_array(),
                query_cls: detections[det].category_id,
                query_score: detections[det].score,
                gallery_image_id: gallery.iter().map(|(id, _)| id.unwrap_or(0)).collect(),
                gallery_bbox: gallery.iter().map(|(_, b)| b.to_array()).collect(),
            });
            let retrieved = found.results.iter().take(5).map(|hit| (hit.sku.clone(), hit.bbox, hit.score)).collect();
            details.push(QueryDetail {
                query_image_id: image_id,
                category: q.category.clone(),
                gt_bbox: q.gt_bbox,
                query_bbox: Some(detections[det].bbox.to_array()),
                first_hit,
                retrieved,
            });
            scored.push(Scored { category: q.category, scale: q.scale, first_hit, detected: true });
        }
    }
    let all: Vec<&Scored> = scored.iter().collect();
    let overall = group(&all);
    let mut per_category: BTreeMap<String, Vec<&Scored>> = BTreeMap::new();
    let mut per_scale: BTreeMap<String, Vec<&Scored>> = BTreeMap::new();
    for s in &scored {
        per_category.entry(s.category.clone()).or_default().push(s);
        per_scale
            .entry(
                match s.scale {
                    1 => "small",
                    2 => "moderate",
                    3 => "large",
                    _ => "unknown",
                }
                .to_string(),
            )
            .or_default()
            .push(s);
    }
    let report = RetrievalReport {
        protocol: "deepfashion2-retrieval",
        boxes: match boxes {
            QueryBoxes::GroundTruth => "gt",
            QueryBoxes::Detected => "detected",
        },
        detector: match boxes {
            QueryBoxes::GroundTruth => None,
            QueryBoxes::Detected => inputs.engine.detector.as_ref().map(|d| d.version().to_string()),
        },
        queries: overall.queries,
        top_k: overall.top_k,
        misses: overall.misses,
        per_category: per_category.into_iter().map(|(k, v)| (k, group(&v))).collect(),
        per_scale: per_scale.into_iter().map(|(k, v)| (k, group(&v))).collect(),
        gallery_garments: inputs.index.garments(),
        generation: inputs.index.generation(),
        embedder: inputs.engine.embedder.version().to_string(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(RetrievalOutput { report, submission, details })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(x1: f32, class: u32, score: f32) -> Detection {
        Detection { bbox: BBox::new(x1, 0.0, x1 + 10.0, 10.0), category_id: class, score, reading: None }
    }

    #[test]
    fn detections_go_to_the_item_they_overlap_most_and_the_best_of_the_right_class_wins() {
        // Items: A (class 1, style 1) at 0..10, B (class 2, style 0) at 20..30, C (class 3, style 2) at 40..50.
        let items = [(BBox::new(0.0, 0.0, 10.0, 10.0), 1, 1), (BBox::new(20.0, 0.0, 30.0, 10.0), 2, 0), (BBox::new(40.0, 0.0, 50.0, 10.0), 3, 2)];
        let dets = [
            det(1.0, 1, 0.6),   // A, right class
            det(2.0, 1, 0.9),   // A, right class, better
            det(19.0, 1, 0.99), // overlaps B most: absorbed by the style-0 item, never scored
            det(41.0, 9, 0.8),  // C, wrong class
            det(100.0, 3, 0.9), // overlaps nothing: arg-max picks an item with IoU 0; C's class but no overlap
        ];
        let q = assign_queries(&items, &dets);
        assert_eq!(q[0], Some(1));
        assert_eq!(q[1], None, "style-0 items are never scored");
        // Detection 4 has IoU 0 with every item; arg-max without minimum ties to the first
        // item (class 1), so it is not C's either.
        assert_eq!(q[2], None);
    }

    #[test]
    fn a_hit_needs_the_right_gallery_image_and_iou_of_one_half() {
        let right = [(7u64, BBox::new(0.0, 0.0, 100.0, 100.0))];
        // IoU of [0,0,100,h] with the 100×100 box is h/100.
        assert!(is_hit(7, &BBox::new(0.0, 0.0, 100.0, 51.0), &right));
        assert!(!is_hit(7, &BBox::new(0.0, 0.0, 100.0, 49.0), &right));
        assert!(!is_hit(8, &BBox::new(0.0, 0.0, 100.0, 100.0), &right), "another gallery image");
        assert!(!is_hit(7, &BBox::new(0.0, 0.0, 100.0, 100.0), &[]), "an item without gallery images");
    }

    #[test]
    fn misses_stay_in_the_denominator() {
        // Four query items: hits at rank 0 and 4, one retrieved but never hit, one with no
        // detection at all. top-1 = 1/4, top-5 = 2/4, top-20 = 2/4.
        let rows = [
            Scored { category: "top".into(), scale: 2, first_hit: Some(0), detected: true },
            Scored { category: "top".into(), scale: 2, first_hit: Some(4), detected: true },
            Scored { category: "top".into(), scale: 2, first_hit: None, detected: true },
            Scored { category: "top".into(), scale: 2, first_hit: None, detected: false },
        ];
        let g = group(&rows.iter().collect::<Vec<_>>());
        assert_eq!((g.queries, g.misses), (4, 1));
        assert_eq!((g.top_k["1"], g.top_k["5"], g.top_k["20"]), (0.25, 0.5, 0.5));
    }
}
