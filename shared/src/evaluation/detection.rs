//! COCO-style box AP (Lin et al., arXiv 1405.0312; the `pycocotools` rules): for each class
//! and IoU threshold, detections of all images sorted by score are matched greedily to the
//! unmatched ground-truth box of the same image and class they overlap most (IoU ≥ the
//! threshold); precision is made monotone from the right and read at the 101 recall points
//! 0, 0.01, …, 1; AP is their mean. AP is the mean over the thresholds 0.50:0.05:0.95.
//! A class without ground truth has no AP and stays out of the means. Every box counts
//! (DeepFashion2 has no crowd regions; we use one area range), at most
//! [`MAX_DETECTIONS`] detections per image, the best.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use image::RgbImage;

use crate::datasets::{Df2Annotation, Df2Folder};
use crate::geometry::BBox;
use crate::models::detector::{Detection, GarmentDetector, Postprocess};
use crate::pipeline::GarmentPipeline;
use crate::progress::{Progress, ProgressFn};
use crate::vision::{DecodeLimits, decode_image};
use crate::{Error, Result};

/// Categories whose mean AP50 the detector issue sets its target on.
pub const HEADLINE: [&str; 8] = ["top", "outer", "dress", "pants", "skirt", "shorts", "footwear", "bag"];

/// Detections per image that count (COCO's `maxDets` = 100).
pub const MAX_DETECTIONS: usize = 100;
/// COCO's IoU thresholds 0.50, 0.55, …, 0.95.
pub const IOU_THRESHOLDS: [f32; 10] = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95];

#[derive(Debug, Clone, PartialEq)]
pub struct GroundTruth {
    pub image: u64,
    pub class: usize,
    pub bbox: BBox,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub image: u64,
    pub class: usize,
    pub bbox: BBox,
    pub score: f32,
}

/// AP of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassAp {
    pub ap: f64,
    pub ap50: f64,
    pub ap75: f64,
    pub instances: usize,
    pub detections: usize,
}

/// AP of every class with ground truth, and the means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApSummary {
    pub ap: f64,
    pub ap50: f64,
    pub ap75: f64,
    pub per_class: BTreeMap<usize, ClassAp>,
}

impl ApSummary {
    /// Mean AP50 over `classes` that have ground truth (`None` when none has).
    pub fn mean_ap50_over(&self, classes: &[usize]) -> Option<f64> {
        let v: Vec<f64> = classes.iter().filter_map(|c| self.per_class.get(c)).map(|c| c.ap50).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// AP at one IoU threshold for one class: `gts` and `dets` of that class only.
pub fn average_precision(gts: &[&GroundTruth], dets: &[&Detected], iou_threshold: f32) -> f64 {
    if gts.is_empty() {
        return f64::NAN;
    }
    let mut by_image: HashMap<u64, Vec<(BBox, bool)>> = HashMap::new();
    for g in gts {
        by_image.entry(g.image).or_default().push((g.bbox, false));
    }
    let mut order: Vec<&&Detected> = dets.iter().collect();
    // Stable sort by descending score: ties keep input order, as pycocotools' mergesort.
    order.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut tp = Vec::with_capacity(order.len());
    for d in order {
        let mut best: Option<(usize, f32)> = None;
        if let Some(boxes) = by_image.get(&d.image) {
            for (i, (g, used)) in boxes.iter().enumerate() {
                if *used {
                    continue;
                }
                let iou = d.bbox.iou(g);
                if iou >= iou_threshold && best.is_none_or(|(_, b)| iou > b) {
                    best = Some((i, iou));
                }
            }
        }
        match best {
            Some((i, _)) => {
                by_image.get_mut(&d.image).expect("matched image")[i].1 = true;
                tp.push(true);
            }
            None => tp.push(false),
        }
    }
    let total = gts.len() as f64;
    let (mut hits, mut precision, mut recall) = (0usize, Vec::new(), Vec::new());
    for (i, hit) in tp.iter().enumerate() {
        hits += *hit as usize;
        precision.push(hits as f64 / (i + 1) as f64);
        recall.push(hits as f64 / total);
    }
    // Monotone envelope from the right.
    for i in (0..precision.len().saturating_sub(1)).rev() {
        precision[i] = precision[i].max(precision[i + 1]);
    }
    let mut sum = 0.0;
    for step in 0..=100 {
        let r = step as f64 / 100.0;
        // First detection whose recall reaches r (pycocotools: searchsorted left).
        let at = recall.partition_point(|&x| x < r - 1e-12);
        if at < precision.len() {
            sum += precision[at];
        }
    }
    sum / 101.0
}

/// COCO box AP of `dets` against `gts` over `num_classes` classes.
pub fn evaluate(gts: &[GroundTruth], dets: &[Detected], num_classes: usize) -> ApSummary {
    // At most MAX_DETECTIONS per image, the best-scoring ones.
    let mut per_image: HashMap<u64, Vec<&Detected>> = HashMap::new();
    for d in dets {
        per_image.entry(d.image).or_default().push(d);
    }
    let mut kept: Vec<&Detected> = Vec::new();
    for (_, mut v) in per_image {
        v.sort_by(|a, b| b.score.total_cmp(&a.score));
        v.truncate(MAX_DETECTIONS);
        kept.extend(v);
    }
    let mut per_class = BTreeMap::new();
    for class in 0..num_classes {
        let g: Vec<&GroundTruth> = gts.iter().filter(|g| g.class == class).collect();
        if g.is_empty() {
            continue;
        }
        let mut d: Vec<&Detected> = kept.iter().copied().filter(|d| d.class == class).collect();
        // Deterministic order before the stable score sort: by image, then input position.
        d.sort_by_key(|d| d.image);
        let aps: Vec<f64> = IOU_THRESHOLDS.iter().map(|&t| average_precision(&g, &d, t)).collect();
        per_class.insert(class, ClassAp { ap: aps.iter().sum::<f64>() / aps.len() as f64, ap50: aps[0], ap75: aps[5], instances: g.len(), detections: d.len() });
    }
    let mean = |f: fn(&ClassAp) -> f64| if per_class.is_empty() { 0.0 } else { per_class.values().map(f).sum::<f64>() / per_class.len() as f64 };
    ApSummary { ap: mean(|c| c.ap), ap50: mean(|c| c.ap50), ap75: mean(|c| c.ap75), per_class }
}

/// The report of `indexer eval detection`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetectionReport {
    pub protocol: String,
    pub images: usize,
    pub ap: f64,
    pub ap50: f64,
    pub ap75: f64,
    /// By category name; categories of the data that the detector does not know appear
    /// with AP 0 (they can never be found) and count in the means.
    pub per_category: BTreeMap<String, ClassAp>,
    /// Mean AP50 over the eight headline categories present in the data.
    pub headline_ap50: Option<f64>,
    /// AP50 with every box of one class: how well garments are framed, whatever they are
    /// called (the DeepFashion2 retrieval rule checks the box, not its class).
    #[serde(default)]
    pub class_agnostic_ap50: f64,
    /// What shoppers and the indexer get: the detector's serving post-processing at a
    /// range of score thresholds (the configured one marked), so a threshold is chosen on
    /// numbers, per domain.
    #[serde(default)]
    pub served: Vec<ServedPoint>,
    /// The detector with its second look at each share measured (the shipped one marked).
    #[serde(default)]
    pub second_look: Vec<SecondLookPoint>,
    pub detector: String,
    pub input_size: u32,
    /// Wall time per image: decode, detect, and the embeddings of the second look.
    pub ms_per_image: f64,
    pub seconds: f64,
}

/// AP50 of `dets` against `gts` with every class merged into one.
fn class_agnostic_ap50(gts: &[GroundTruth], dets: &[Detected]) -> f64 {
    let gts: Vec<GroundTruth> = gts.iter().map(|g| GroundTruth { class: 0, ..g.clone() }).collect();
    let dets: Vec<Detected> = dets.iter().map(|d| Detected { class: 0, ..d.clone() }).collect();
    evaluate(&gts, &dets, 1).ap50
}

/// The served detections at one score threshold: a box is right when it overlaps an
/// unmatched annotated garment of its category by IoU ≥ 0.5 (best score first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedPoint {
    pub min_score: f32,
    /// The threshold the detector is configured with.
    pub configured: bool,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub garments_per_image: f64,
    /// Annotated garments per image, for comparison.
    pub annotated_per_image: f64,
}

/// Score thresholds of the served sweep.
const SERVED_THRESHOLDS: [f32; 11] = [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7];

/// The sweep's thresholds with the configured one among them, ascending.
fn sweep_thresholds(configured: f32) -> Vec<f32> {
    let mut thresholds: Vec<f32> = SERVED_THRESHOLDS.to_vec();
    if !thresholds.iter().any(|t| (t - configured).abs() < 1e-6) {
        thresholds.push(configured);
        thresholds.sort_by(f32::total_cmp);
    }
    thresholds
}

/// The served sweep: `served_at` holds, per threshold (ascending), what the serving
/// post-processing keeps at it over all images.
fn served_points(gts: &[GroundTruth], served_at: &[(f32, Vec<Detected>)], images: usize, configured: f32) -> Vec<ServedPoint> {
    let mut truth: HashMap<u64, Vec<&GroundTruth>> = HashMap::new();
    for g in gts {
        truth.entry(g.image).or_default().push(g);
    }
    served_at
        .iter()
        .map(|(t, served)| {
            let mut by_image: HashMap<u64, Vec<&Detected>> = HashMap::new();
            for d in served {
                by_image.entry(d.image).or_default().push(d);
            }
            let (mut right, found) = (0usize, served.len());
            for (image, dets) in by_image.iter_mut() {
                dets.sort_by(|a, b| b.score.total_cmp(&a.score));
                let g = truth.get(image).map(Vec::as_slice).unwrap_or(&[]);
                let mut taken = vec![false; g.len()];
                for d in dets.iter() {
                    let best = g
                        .iter()
                        .enumerate()
                        .filter(|(i, x)| !taken[*i] && x.class == d.class)
                        .map(|(i, x)| (i, x.bbox.iou(&d.bbox)))
                        .filter(|(_, iou)| *iou >= 0.5)
                        .max_by(|a, b| a.1.total_cmp(&b.1));
                    if let Some((i, _)) = best {
                        taken[i] = true;
                        right += 1;
                    }
                }
            }
            let precision = if found == 0 { 0.0 } else { right as f64 / found as f64 };
            let recall = if gts.is_empty() { 0.0 } else { right as f64 / gts.len() as f64 };
            let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
            let n = images.max(1) as f64;
            ServedPoint {
                min_score: *t,
                configured: (t - configured).abs() < 1e-6,
                precision,
                recall,
                f1,
                garments_per_image: found as f64 / n,
                annotated_per_image: gts.len() as f64 / n,
            }
        })
        .collect()
}

/// The detector's numbers with the second look at one share of the category head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondLookPoint {
    /// The category head's share (0: the detector's classes).
    pub share: f32,
    /// Mean AP50 over the headline categories of the second look's output (the detector's
    /// detections at its evaluation floor, each rescored for its class).
    pub headline_ap50: Option<f64>,
    pub class_agnostic_ap50: f64,
    /// What is served at the configured score threshold.
    pub served: ServedPoint,
    /// The shipped configuration's share.
    pub configured: bool,
}

/// One image's detections at every operating point an evaluation reads.
struct ImageDetections {
    /// The detector alone, at the evaluation floor.
    ranked: Vec<Detected>,
    /// Per share: the second look's detections.
    by_share: Vec<Vec<Detected>>,
    /// Per share, per sweep threshold: the served detections.
    served: Vec<Vec<Vec<Detected>>>,
}

/// Detections of one photo for every share and threshold, from one forward pass of each
/// network: the evaluation proposals and the sweep's boxes are embedded once.
fn detect_image(pipeline: &GarmentPipeline<'_>, detector: &GarmentDetector, image: &RgbImage, id: u64, shares: &[f32], thresholds: &[f32]) -> Result<ImageDetections> {
    let configured = detector.config().postprocess;
    let sweep = Postprocess { min_score: thresholds[0], ..configured };
    let [ranked, swept] = <[_; 2]>::try_from(detector.detect_each(image, &[&Postprocess::EVALUATION, &sweep])?).expect("one list per post-processing");
    let detected = |d: &Detection| Detected { image: id, class: d.class, bbox: d.bbox, score: d.score };
    let by_share = pipeline.detections_for_evaluation(image, shares)?.into_iter().map(|found| found.iter().map(|(d, _)| detected(d)).collect()).collect();
    let crops: Vec<Option<BBox>> = swept.iter().map(|d| Some(d.bbox)).collect();
    let head: Vec<Option<Vec<f32>>> = pipeline.read(image, &crops)?.into_iter().map(|r| r.categories).collect();
    let packshot = pipeline.read_product(image)?;
    let served = shares
        .iter()
        .map(|&share| {
            thresholds
                .iter()
                .map(|&t| {
                    // Exactly what serving at threshold `t` keeps: greedy suppression lets a
                    // box go only for a better one, so the detector's boxes at `t` are the
                    // sweep's scoring ≥ `t`; the second look then reads those.
                    let post = Postprocess { min_score: t, category_fusion: share, ..configured };
                    let (at, heads): (Vec<Detection>, Vec<Option<Vec<f32>>>) = swept.iter().zip(&head).filter(|(d, _)| d.score >= t).map(|(d, h)| (d.clone(), h.clone())).unzip();
                    let Some(fusion) = pipeline.fusion(share) else { return at.iter().map(detected).collect() };
                    let relabelled: Vec<Detection> = fusion.relabel(at, &heads, &post).into_iter().map(|(d, _)| d).collect();
                    // And the packshot rule, as served.
                    let lone = packshot.as_ref().and_then(|(product, reading)| fusion.lone_garment(*product, reading.categories.as_deref()?, &relabelled, &post));
                    match lone {
                        Some(lone) => vec![detected(&lone.detection)],
                        None => relabelled.iter().map(detected).collect(),
                    }
                })
                .collect()
        })
        .collect();
    Ok(ImageDetections { ranked: ranked.iter().map(detected).collect(), by_share, served })
}

/// Runs the pipeline's detector on every image of `folder` whose `pair_id` `keep` accepts
/// (the split key: a street photo and its shop images fall on the same side) and measures
/// COCO box AP against the annotations, and the served sweep, as shipped (the detector's
/// second-look share); `shares` adds a row per share of the category head to choose it
/// by. Ground truth and detections meet by category id.
pub fn evaluate_detector(pipeline: &GarmentPipeline<'_>, folder: &Df2Folder, keep: &dyn Fn(u64) -> bool, shares: &[f32], progress: ProgressFn) -> Result<DetectionReport> {
    let started = Instant::now();
    let detector = pipeline.detector.ok_or_else(|| Error::InvalidSetting { name: "detector", reason: "a detection evaluation needs a detector".into() })?;
    let known = &detector.config().categories;
    // Classes: the detector's, then any category only the data has.
    let mut names: Vec<String> = known.iter().map(|c| c.name.clone()).collect();
    let mut class_of: HashMap<u32, usize> = known.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
    let mut images = Vec::new();
    for entry in folder.images() {
        let anno = Df2Annotation::read(&entry.annotation)?;
        if keep(anno.pair_id) {
            images.push((entry, anno));
        }
    }
    progress(Progress::Stage { name: "detecting".into(), total: images.len() as u64 });
    let configured = detector.config().postprocess;
    let mut all_shares: Vec<f32> = vec![configured.category_fusion];
    all_shares.extend(shares.iter().filter(|s| !all_shares.contains(s)).copied().collect::<Vec<_>>());
    let thresholds = sweep_thresholds(configured.min_score);
    let mut gts = Vec::new();
    let mut ranked = Vec::new();
    let mut by_share: Vec<Vec<Detected>> = vec![Vec::new(); all_shares.len()];
    let mut served: Vec<Vec<Vec<Detected>>> = vec![vec![Vec::new(); thresholds.len()]; all_shares.len()];
    let mut detect_seconds = 0.0;
    for (entry, anno) in &images {
        for item in &anno.items {
            let class = *class_of.entry(item.category_id).or_insert_with(|| {
                names.push(item.category_name.clone());
                names.len() - 1
            });
            gts.push(GroundTruth { image: entry.id, class, bbox: item.bbox });
        }
        let bytes = std::fs::read(&entry.image).map_err(|e| crate::Error::io(&entry.image, e))?;
        let timer = Instant::now();
        let image = decode_image(&bytes, DecodeLimits::default())?;
        let found = detect_image(pipeline, detector, &image, entry.id, &all_shares, &thresholds)?;
        detect_seconds += timer.elapsed().as_secs_f64();
        ranked.extend(found.ranked);
        for (s, dets) in found.by_share.into_iter().enumerate() {
            by_share[s].extend(dets);
        }
        for (s, per_threshold) in found.served.into_iter().enumerate() {
            for (t, dets) in per_threshold.into_iter().enumerate() {
                served[s][t].extend(dets);
            }
        }
        progress(Progress::Advance(1));
    }
    let seconds = started.elapsed().as_secs_f64();
    let headline: Vec<usize> = names.iter().enumerate().filter(|(_, n)| HEADLINE.contains(&n.as_str())).map(|(i, _)| i).collect();
    let sweeps: Vec<Vec<ServedPoint>> = served
        .into_iter()
        .map(|per_threshold| served_points(&gts, &thresholds.iter().copied().zip(per_threshold).collect::<Vec<_>>(), images.len(), configured.min_score))
        .collect();
    let second_look = all_shares
        .iter()
        .zip(&by_share)
        .zip(&sweeps)
        .map(|((&share, dets), sweep)| SecondLookPoint {
            share,
            headline_ap50: evaluate(&gts, dets, names.len()).mean_ap50_over(&headline),
            class_agnostic_ap50: class_agnostic_ap50(&gts, dets),
            served: sweep.iter().find(|p| p.configured).cloned().expect("the configured threshold is in the sweep"),
            configured: share == configured.category_fusion,
        })
        .collect();
    // The headline numbers are what ships: the detector alone, or its second look.
    let shipped = if configured.category_fusion > 0.0 { &by_share[0] } else { &ranked };
    let summary = evaluate(&gts, shipped, names.len());
    Ok(DetectionReport {
        protocol: "coco-box".into(),
        images: images.len(),
        ap: summary.ap,
        ap50: summary.ap50,
        ap75: summary.ap75,
        headline_ap50: summary.mean_ap50_over(&headline),
        class_agnostic_ap50: class_agnostic_ap50(&gts, shipped),
        per_category: summary.per_class.into_iter().map(|(c, ap)| (names[c].clone(), ap)).collect(),
        detector: detector.version().to_string(),
        input_size: detector.config().preprocess.size,
        served: sweeps.into_iter().next().unwrap_or_default(),
        second_look,
        ms_per_image: 1000.0 * detect_seconds / images.len().max(1) as f64,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(image: u64, class: usize, b: [f32; 4]) -> GroundTruth {
        GroundTruth { image, class, bbox: BBox::new(b[0], b[1], b[2], b[3]) }
    }

    fn det(image: u64, class: usize, b: [f32; 4], score: f32) -> Detected {
        Detected { image, class, bbox: BBox::new(b[0], b[1], b[2], b[3]), score }
    }

    #[test]
    fn served_points_count_right_boxes_and_garments_per_threshold() {
        // Two images, three garments. Image 1: its dress found (0.9) and found again as a
        // fragment (0.4); image 2: its top found with the wrong class (0.6), its bag missed.
        let gts = [gt(1, 0, [0.0, 0.0, 10.0, 20.0]), gt(2, 1, [0.0, 0.0, 10.0, 10.0]), gt(2, 2, [20.0, 20.0, 30.0, 30.0])];
        let served = [det(1, 0, [0.0, 0.0, 10.0, 19.0], 0.9), det(1, 0, [0.0, 0.0, 10.0, 8.0], 0.4), det(2, 3, [0.0, 0.0, 10.0, 10.0], 0.6)];
        let at_threshold: Vec<(f32, Vec<Detected>)> = sweep_thresholds(0.42).into_iter().map(|t| (t, served.iter().filter(|d| d.score >= t).cloned().collect())).collect();
        let points = served_points(&gts, &at_threshold, 2, 0.42);
        let at = |t: f32| points.iter().find(|p| (p.min_score - t).abs() < 1e-6).unwrap();
        let low = at(0.3);
        assert_eq!((low.garments_per_image, low.annotated_per_image), (1.5, 1.5));
        assert!((low.precision - 1.0 / 3.0).abs() < 1e-9 && (low.recall - 1.0 / 3.0).abs() < 1e-9);
        let mid = at(0.5);
        assert_eq!(mid.garments_per_image, 1.0);
        assert!((mid.precision - 0.5).abs() < 1e-9 && (mid.f1 - 0.4).abs() < 1e-9);
        let high = at(0.7);
        assert_eq!((high.precision, high.garments_per_image), (1.0, 0.5));
        // The configured threshold is in the sweep, marked, and only it.
        assert_eq!(points.iter().filter(|p| p.configured).map(|p| p.min_score).collect::<Vec<_>>(), vec![0.42]);
        assert!(points.windows(2).all(|w| w[0].min_score < w[1].min_score));
    }

    #[test]
    fn class_agnostic_ap_ignores_the_class_only() {
        let gts = [gt(1, 0, [0.0, 0.0, 10.0, 10.0]), gt(2, 1, [0.0, 0.0, 10.0, 10.0])];
        // Both framed, one misnamed: half the classes' AP, all of the framing.
        let dets = [det(1, 0, [0.0, 0.0, 10.0, 10.0], 0.9), det(2, 0, [0.0, 0.0, 10.0, 10.0], 0.8)];
        assert!((class_agnostic_ap50(&gts, &dets) - 1.0).abs() < 1e-9);
        assert!(evaluate(&gts, &dets, 2).ap50 < 0.6);
        // A box in the wrong place still misses.
        let off = [det(1, 0, [20.0, 20.0, 30.0, 30.0], 0.8), det(2, 1, [0.0, 0.0, 10.0, 10.0], 0.9)];
        assert!((class_agnostic_ap50(&gts, &off) - 0.5).abs() < 0.02);
    }

    #[test]
    fn perfect_detections_give_one() {
        let g = vec![gt(1, 0, [0., 0., 10., 10.]), gt(2, 0, [5., 5., 20., 20.])];
        let d = vec![det(1, 0, [0., 0., 10., 10.], 0.9), det(2, 0, [5., 5., 20., 20.], 0.8)];
        let s = evaluate(&g, &d, 1);
        assert_eq!((s.ap, s.ap50, s.ap75), (1.0, 1.0, 1.0));
    }

    #[test]
    fn worked_example_with_a_false_positive_ranked_first() {
        // Two ground-truth boxes. Ranked detections: FP (0.9), TP (0.8), TP (0.7).
        // Precision 0, 1/2, 2/3 at recall 0, 0.5, 1. Envelope: 2/3, 2/3, 2/3.
        // Recall points 0..=1: all 101 read 2/3 → AP = 2/3.
        let g = vec![gt(1, 0, [0., 0., 10., 10.]), gt(1, 0, [20., 20., 30., 30.])];
        let d = vec![det(1, 0, [50., 50., 60., 60.], 0.9), det(1, 0, [0., 0., 10., 10.], 0.8), det(1, 0, [20., 20., 30., 30.], 0.7)];
        let s = evaluate(&g, &d, 1);
        assert!((s.ap50 - 2.0 / 3.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn worked_example_with_a_miss() {
        // Two ground-truth boxes, one found at rank 1: precision 1 up to recall 0.5 and
        // nothing beyond. Recall points 0, 0.01, …, 0.50 (51 of them) read 1 → 51/101.
        let g = vec![gt(1, 0, [0., 0., 10., 10.]), gt(2, 0, [0., 0., 10., 10.])];
        let d = vec![det(1, 0, [0., 0., 10., 10.], 0.9)];
        let s = evaluate(&g, &d, 1);
        assert!((s.ap50 - 51.0 / 101.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn iou_thresholds_and_duplicates() {
        // Box [0,0,10,10] against [0,0,10,6]: IoU 0.6. Counts at 0.50..0.60 (3 of 10
        // thresholds), not at 0.75. A duplicate detection of the same box is a false
        // positive after the first match.
        let g = vec![gt(1, 0, [0., 0., 10., 10.])];
        let d = vec![det(1, 0, [0., 0., 10., 6.], 0.9), det(1, 0, [0., 0., 10., 6.], 0.8)];
        let s = evaluate(&g, &d, 1);
        assert_eq!(s.ap50, 1.0);
        assert_eq!(s.ap75, 0.0);
        assert!((s.ap - 0.3).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn class_and_image_must_match_and_empty_classes_stay_out() {
        let g = vec![gt(1, 0, [0., 0., 10., 10.]), gt(1, 1, [0., 0., 10., 10.])];
        // Right box, wrong class for class 1; right class, wrong image for class 0.
        let d = vec![det(2, 0, [0., 0., 10., 10.], 0.9), det(1, 0, [0., 0., 10., 10.], 0.5)];
        let s = evaluate(&g, &d, 3);
        assert_eq!(s.per_class.len(), 2, "class 2 has no ground truth");
        // Class 0: FP then TP: precision envelope 1/2 everywhere → 0.5.
        assert!((s.per_class[&0].ap50 - 0.5).abs() < 1e-9);
        assert_eq!(s.per_class[&1].ap50, 0.0);
        assert!((s.ap50 - 0.25).abs() < 1e-9);
        assert_eq!(s.mean_ap50_over(&[1, 2]), Some(0.0));
        assert_eq!(s.mean_ap50_over(&[2]), None);
    }
}
