//! The second look at a detected garment: its class read again from its own crop.
//!
//! Match R-CNN classifies each garment twice: once in the region proposals, once from the
//! garment's own pooled features. Our detector names a garment from the whole photo at
//! 320² on frozen features, and confuses the kinds that share a body (top, dress, skirt,
//! outer); the embedder sees the garment's crop at 224² and its category head, trained
//! on far more labelled crops, names it better (measured in `models/README.md`). Every
//! detected garment is embedded anyway (that is what the index searches), so the second
//! look costs one small matrix product per garment.
//!
//! Per class `c` of the detector, with `p_c` the detector's probability at the box's
//! location, `q_c` the category head's softmax and `w` the configured share, the classes
//! are weighed by `g_c = p_c^(1−w) · q_c^w` (a weighted geometric mean: each network can
//! veto a class the other likes). How sure we are that a garment is there stays the
//! detector's word: the best class of `g` gets the detector's own best score, and the
//! others that score scaled by their `g` relative to the best, `sqrt(ctr · p_max · g_c /
//! g_max)`, so `w = 0` gives back the detector's scores exactly, and a box served or
//! indexed is the same box with or without the second look (only its class, and what
//! suppression makes of two boxes that now share a class, change). A class the category
//! head does not know keeps the detector's probability alone.
//!
//! On a packshot (a product on a plain backdrop, [`crate::vision::product_extent`]) the
//! category head also reads the whole product, and [`CategoryFusion::lone_garment`] decides
//! whether the detector's garments there are parts of one garment.

use super::detector::{Category, Detection, Postprocess};
use crate::geometry::BBox;

/// A packshot's product read as one garment (see [`CategoryFusion::lone_garment`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LoneGarment {
    /// The garment under its best class, framed at the product's extent.
    pub detection: Detection,
    /// Its score for every detector class: what an AP evaluation ranks (a box per class).
    pub class_scores: Vec<f32>,
}

/// A box lying at least this share inside another (or holding it) is a part of the same
/// garment on a packshot: a dress's bodice read as a top, trouser legs read as outer.
const PART_OF_GARMENT: f32 = 0.5;

/// The detector's and the category head's readings of a class, weighed.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryFusion {
    /// The category head's share `w`, in (0, 1].
    share: f32,
    /// Detector class → the category head's output of the same name.
    head_of: Vec<Option<usize>>,
    /// Detector class → its name.
    names: Vec<String>,
}

impl CategoryFusion {
    /// The fusion of a detector's `categories` with a category head naming `head`; `None`
    /// when there is nothing to fuse (share 0, or no category head).
    pub fn new(categories: &[Category], head: &[String], share: f32) -> Option<Self> {
        if share <= 0.0 || head.is_empty() {
            return None;
        }
        let head_of = categories.iter().map(|c| head.iter().position(|h| *h == c.name)).collect();
        Some(Self { share: share.min(1.0), head_of, names: categories.iter().map(|c| c.name.clone()).collect() })
    }

    /// The fused score of every detector class of `detection`, given the category head's
    /// probabilities for its crop; `None` when the detection carries no class
    /// probabilities or they do not fit this detector.
    pub fn class_scores(&self, detection: &Detection, head: &[f32]) -> Option<Vec<f32>> {
        if detection.class_probs.len() != self.head_of.len() {
            return None;
        }
        let weighed: Vec<f32> = detection
            .class_probs
            .iter()
            .zip(&self.head_of)
            .map(|(&p, h)| match h.and_then(|h| head.get(h)) {
                Some(&q) => p.powf(1.0 - self.share) * q.powf(self.share),
                None => p,
            })
            .collect();
        let best = weighed.iter().copied().fold(0.0f32, f32::max);
        let present = detection.class_probs.iter().copied().fold(0.0f32, f32::max);
        let scores = weighed.iter().map(|&g| if best > 0.0 { (detection.centreness * present * g / best).sqrt() } else { 0.0 }).collect();
        Some(scores)
    }

    /// What shoppers and the indexer get: each detection under its best fused class and
    /// score, those below `post.min_score` dropped, then suppressed again by `post` (two
    /// boxes the detector called differently may now be one garment seen twice). Returns
    /// each kept detection with its index in `detections`, best first.
    pub fn relabel(&self, detections: Vec<Detection>, head: &[Option<Vec<f32>>], post: &Postprocess) -> Vec<(Detection, usize)> {
        let mut relabelled: Vec<(Detection, usize)> = detections
            .into_iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let Some(scores) = head.get(i).and_then(Option::as_ref).and_then(|h| self.class_scores(&d, h)) else {
                    return Some((d, i));
                };
                let (class, &score) = scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))?;
                (score >= post.min_score).then(|| (Detection { class, category: self.names[class].clone(), score, ..d }, i))
            })
            .collect();
        relabelled.sort_by(|a, b| b.0.score.total_cmp(&a.0.score));
        post.suppress(relabelled, |(d, _)| (d.bbox, d.class))
    }

    /// The packshot rule: a photo whose product on a plain backdrop (`product`, its crop
    /// read by the category head as `head`) is one garment, when the detector's `served`
    /// garments there (after the second look) say nothing against it. The head names the
    /// whole product; the product is that garment when the detector served a garment of the
    /// same class and every other served garment is either of that class too (the two
    /// shoes of a pair) or nested with it (a part of it named otherwise: a dress's bodice
    /// as a top). Several garments side by side (a top above trousers: an outfit on a
    /// ghost mannequin) keep the detector's boxes. With nothing served, the product is a
    /// garment of the head's class scored at the serving threshold: a packshot shows a
    /// product, and the detector missing it is what the rule exists for. The named garment
    /// takes the second look of the detector's reading and the head's reading of the
    /// whole product. `None`: the detector's garments stand.
    pub fn lone_garment(&self, product: BBox, head: &[f32], served: &[Detection], post: &Postprocess) -> Option<LoneGarment> {
        let named = self.head_class(head)?;
        if served.is_empty() {
            let probability = |c: usize| self.head_of[c].and_then(|h| head.get(h)).copied().unwrap_or(0.0);
            let best = probability(named);
            if best <= 0.0 {
                return None;
            }
            let class_scores = (0..self.names.len()).map(|c| post.min_score * (probability(c) / best).sqrt()).collect();
            let detection = Detection { bbox: product, class: named, category: self.names[named].clone(), score: post.min_score, class_probs: Vec::new(), centreness: 0.0 };
            return Some(LoneGarment { detection, class_scores });
        }
        let anchor = served.iter().filter(|d| d.class == named).max_by(|a, b| a.score.total_cmp(&b.score))?;
        if !served.iter().all(|d| d.class == named || d.bbox.containment(&anchor.bbox) >= PART_OF_GARMENT) {
            return None;
        }
        let class_scores = self.class_scores(anchor, head)?;
        let (class, &score) = class_scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))?;
        let detection = Detection { bbox: product, class, category: self.names[class].clone(), score, ..anchor.clone() };
        Some(LoneGarment { detection, class_scores })
    }

    /// The detector class the category head likes best among those it knows; `None` when
    /// it knows none of them (or its reading is empty).
    fn head_class(&self, head: &[f32]) -> Option<usize> {
        self.head_of.iter().enumerate().filter_map(|(c, h)| h.and_then(|h| head.get(h)).map(|&q| (c, q))).max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0))).map(|(c, _)| c)
    }

    /// What an AP evaluation ranks: the detector's own detections (a box may appear once
    /// per class), each rescored for its class, then suppressed again by `post` in the new
    /// order, best first. `head[i]` reads the box of `detections[i]`.
    pub fn rescore(&self, detections: &[Detection], head: &[Option<Vec<f32>>], post: &Postprocess) -> Vec<Detection> {
        let mut out: Vec<Detection> = detections
            .iter()
            .zip(head)
            .map(|(d, h)| match h.as_ref().and_then(|h| self.class_scores(d, h)) {
                Some(scores) => Detection { score: scores[d.class], ..d.clone() },
                None => d.clone(),
            })
            .collect();
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        post.suppress(out, |d| (d.bbox, d.class))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::BBox;

    fn categories() -> Vec<Category> {
        ["skirt", "dress", "belt"].iter().enumerate().map(|(i, n)| Category { id: i as u32 + 1, name: n.to_string() }).collect()
    }

    fn det(x1: f32, probs: [f32; 3], centreness: f32) -> Detection {
        let (class, p) = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
        Detection {
            bbox: BBox::new(x1, 0.0, x1 + 100.0, 200.0),
            class,
            category: categories()[class].name.clone(),
            score: (p * centreness).sqrt(),
            class_probs: probs.to_vec(),
            centreness,
        }
    }

    /// The category head of these tests knows dress and skirt (in another order), not belt.
    fn head_names() -> Vec<String> {
        vec!["dress".into(), "skirt".into(), "top".into()]
    }

    #[test]
    fn nothing_to_fuse_without_a_share_or_a_head() {
        assert!(CategoryFusion::new(&categories(), &head_names(), 0.0).is_none());
        assert!(CategoryFusion::new(&categories(), &[], 0.5).is_none());
    }

    #[test]
    fn scores_are_the_weighted_geometric_mean_by_name() {
        let fusion = CategoryFusion::new(&categories(), &head_names(), 0.5).unwrap();
        let d = det(0.0, [0.6, 0.3, 0.2], 0.8);
        let s = fusion.class_scores(&d, &[0.9, 0.05, 0.05]).unwrap();
        // skirt: head "skirt" is output 1; dress: output 0; belt: unknown to the head.
        let g = [(0.6f32 * 0.05).sqrt(), (0.3f32 * 0.9).sqrt(), 0.2];
        // Dress is now the best class and keeps the detector's best score; the others
        // scale down with their weight.
        let expect = g.map(|x| (0.8 * 0.6 * x / g[1]).sqrt());
        for (a, b) in s.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{s:?} vs {expect:?}");
        }
        assert!((s[1] - d.score).abs() < 1e-6);
        // A share of 0 would be the detector itself.
        let none = CategoryFusion { share: 0.0, ..fusion.clone() };
        let same = none.class_scores(&d, &[0.9, 0.05, 0.05]).unwrap();
        for (a, p) in same.iter().zip(&d.class_probs) {
            assert!((a - (p * 0.8).sqrt()).abs() < 1e-6, "{same:?}");
        }
        // A detection without class probabilities (or of another detector) is not rescored.
        assert!(fusion.class_scores(&Detection { class_probs: vec![0.5], ..d }, &[0.9, 0.05, 0.05]).is_none());
    }

    #[test]
    fn the_category_head_can_rename_a_garment_and_merge_what_becomes_one() {
        let fusion = CategoryFusion::new(&categories(), &head_names(), 0.5).unwrap();
        let post = Postprocess { min_score: 0.3, nms_iou: 0.5, max_detections: 8, cross_class_iou: 0.9, containment: 1.0, cross_class_containment: 1.0, category_fusion: 0.5 };
        // Two boxes on one body, the detector says skirt for one and dress for the other.
        let a = det(0.0, [0.6, 0.4, 0.01], 0.9);
        let b = det(10.0, [0.2, 0.5, 0.01], 0.9);
        let out = fusion.relabel(vec![a.clone(), b], &[Some(vec![0.9, 0.1, 0.0]), Some(vec![0.6, 0.4, 0.0])], &post);
        // Both are dresses to the category head: one dress, the better one, remains.
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!((out[0].0.category.as_str(), out[0].1), ("dress", 0));
        // Without a reading the detection stays as the detector said.
        let kept = fusion.relabel(vec![a.clone()], &[None], &post);
        assert_eq!(kept, vec![(a.clone(), 0)]);
        // Renamed, the garment keeps the detector's confidence that it is there.
        assert!((out[0].0.score - a.score).abs() < 1e-6, "{out:?} vs {a:?}");
    }

    #[test]
    fn an_evaluation_rescores_each_detection_for_its_class() {
        let fusion = CategoryFusion::new(&categories(), &head_names(), 0.5).unwrap();
        // One box, found as a skirt and as a dress by the detector.
        let skirt = det(0.0, [0.6, 0.4, 0.01], 0.9);
        let dress = Detection { class: 1, category: "dress".into(), score: (0.4f32 * 0.9).sqrt(), ..skirt.clone() };
        let head = Some(vec![0.7, 0.3, 0.0]);
        let out = fusion.rescore(&[skirt.clone(), dress], &[head.clone(), head], &Postprocess::EVALUATION);
        let classes: Vec<&str> = out.iter().map(|d| d.category.as_str()).collect();
        assert_eq!(classes, vec!["dress", "skirt"], "{out:?}");
        assert!((out[0].score - skirt.score).abs() < 1e-6, "the best class keeps the detector's best score");
        assert!(out[1].score < out[0].score);
    }

    #[test]
    fn a_packshot_is_one_garment_unless_the_detector_sees_several_side_by_side() {
        let fusion = CategoryFusion::new(&categories(), &head_names(), 0.5).unwrap();
        let post = Postprocess { min_score: 0.4, category_fusion: 0.5, ..Postprocess::SERVING };
        let product = BBox::new(0.0, 0.0, 100.0, 400.0);
        // The head reads the whole product as a dress (its output 0).
        let dress_reading = [0.8, 0.15, 0.05];
        // Nothing served: the product is a dress, at the serving threshold.
        let lone = fusion.lone_garment(product, &dress_reading, &[], &post).unwrap();
        assert_eq!((lone.detection.bbox, lone.detection.category.as_str(), lone.detection.score), (product, "dress", 0.4));
        assert_eq!(lone.class_scores[1], 0.4);
        assert!(lone.class_scores[0] < 0.4 && lone.class_scores[2] == 0.0, "{:?}", lone.class_scores);
        // A dress served with its bodice read as a skirt inside it: one dress, framed at
        // the product, as sure as the detector was of the dress.
        let dress = Detection { class: 1, category: "dress".into(), ..det(0.0, [0.2, 0.7, 0.01], 0.9) };
        let bodice = Detection { bbox: BBox::new(10.0, 10.0, 90.0, 120.0), ..det(0.0, [0.6, 0.3, 0.01], 0.9) };
        let lone = fusion.lone_garment(product, &dress_reading, &[bodice.clone(), dress.clone()], &post).unwrap();
        assert_eq!((lone.detection.bbox, lone.detection.category.as_str()), (product, "dress"));
        assert!((lone.detection.score - dress.score).abs() < 1e-6);
        // A skirt beside the dress, not inside it: two garments, the detector's boxes stand.
        let beside = Detection { bbox: BBox::new(0.0, 250.0, 100.0, 400.0), ..bodice };
        assert_eq!(fusion.lone_garment(product, &dress_reading, &[dress.clone(), beside], &post), None);
        // The head names a class the detector did not serve: nothing says it is one garment.
        assert_eq!(fusion.lone_garment(product, &[0.2, 0.7, 0.1], &[dress], &post), None);
    }
}
