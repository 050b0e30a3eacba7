//! From the head's raw output to garments: the location grid, score and box decoding, and
//! the suppression of a garment seen twice or in parts.

use serde::{Deserialize, Serialize};

use crate::geometry::BBox;

/// Score threshold, overlap suppression and the cap on garments per photo.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Postprocess {
    /// Detections scoring below are dropped.
    pub min_score: f32,
    /// Two boxes of one category overlapping more than this: the lower-scoring one goes.
    pub nms_iou: f32,
    /// At most this many garments per photo, best first.
    pub max_detections: usize,
    /// Two boxes of different categories overlapping more than this: one garment seen
    /// twice (a top that might be a dress); the lower-scoring one goes. 1 turns it off.
    #[serde(default = "off")]
    pub cross_class_iou: f32,
    /// A box of one category lying more than this share inside a better box of the same
    /// category: a part of that garment (a dress's bodice, one shoe of the pair), which IoU
    /// misses because the part is small; it goes. 1 turns it off.
    #[serde(default = "off")]
    pub containment: f32,
    /// The same across categories: a box of another category almost wholly inside a better
    /// box (the lower legs of trousers read as a skirt). Street photos have real garments
    /// inside others (a top under an open jacket), so this stays near 1. 1 turns it off.
    #[serde(default = "off")]
    pub cross_class_containment: f32,
    /// The second look: the share the match network's category head gets in a detected
    /// garment's class (see [`crate::models::fusion`]); 0 leaves the detector's class.
    #[serde(default)]
    pub category_fusion: f32,
}

/// The value that turns an overlap rule off: nothing overlaps more than all of itself.
fn off() -> f32 {
    1.0
}

impl Postprocess {
    /// For measuring AP: everything down to a low score, class by class, as COCO
    /// evaluations do.
    pub const EVALUATION: Postprocess =
        Postprocess { min_score: 0.05, nms_iou: 0.6, max_detections: 100, cross_class_iou: 1.0, containment: 1.0, cross_class_containment: 1.0, category_fusion: 0.0 };
    /// For shoppers and indexing: confident garments, each once.
    pub const SERVING: Postprocess =
        Postprocess { min_score: 0.45, nms_iou: 0.5, max_detections: 8, cross_class_iou: 0.7, containment: 0.8, cross_class_containment: 1.0, category_fusion: 0.0 };
}

/// Centre of every location, in input pixels, levels finest first (the order of
/// [`DetectorHead::forward`]'s locations), with the level's stride.
pub fn location_grid(size: usize, strides: &[usize]) -> Vec<(f32, f32, f32)> {
    let mut out = Vec::new();
    for &s in strides {
        let n = size.div_ceil(s);
        for i in 0..n {
            for j in 0..n {
                out.push(((j as f32 + 0.5) * s as f32, (i as f32 + 0.5) * s as f32, s as f32));
            }
        }
    }
    out
}

/// A decoded box in input coordinates: its class, score and the location that produced it
/// (where the class probabilities of its second look are read).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Located {
    pub bbox: BBox,
    pub class: usize,
    pub score: f32,
    pub location: usize,
}

/// Decodes one image's head output `[num_classes + 5, locations]` into boxes in input
/// coordinates, then suppresses overlaps class by class.
pub fn decode(output: &[f32], num_classes: usize, grid: &[(f32, f32, f32)], post: &Postprocess) -> Vec<(BBox, usize, f32)> {
    decode_located(output, num_classes, grid, post).into_iter().map(|d| (d.bbox, d.class, d.score)).collect()
}

/// [`decode`] keeping each box's location.
pub fn decode_located(output: &[f32], num_classes: usize, grid: &[(f32, f32, f32)], post: &Postprocess) -> Vec<Located> {
    let n = grid.len();
    debug_assert_eq!(output.len(), (num_classes + 5) * n);
    let mut candidates = Vec::new();
    for (loc, &(cx, cy, s)) in grid.iter().enumerate() {
        let centreness = sigmoid(output[(num_classes + 4) * n + loc]);
        for class in 0..num_classes {
            let score = (sigmoid(output[class * n + loc]) * centreness).sqrt();
            if score >= post.min_score {
                let d = |i: usize| output[(num_classes + i) * n + loc] * s;
                candidates.push(Located { bbox: BBox::new(cx - d(0), cy - d(1), cx + d(2), cy + d(3)), class, score, location: loc });
            }
        }
    }
    // Before suppression keep the 1,000 best, as FCOS does: bounds the quadratic NMS.
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    candidates.truncate(1000);
    post.suppress(candidates, |c| (c.bbox, c.class))
}

/// The class probabilities (sigmoid of each class logit) and the centre-ness at one
/// location of a head output.
pub fn location_probabilities(output: &[f32], num_classes: usize, locations: usize, loc: usize) -> (Vec<f32>, f32) {
    ((0..num_classes).map(|c| sigmoid(output[c * locations + loc])).collect(), sigmoid(output[(num_classes + 4) * locations + loc]))
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Postprocess {
    /// Greedy suppression of `sorted` (best first) by the overlap rules, at most
    /// `max_detections` kept; `key` gives an entry's box and class.
    pub fn suppress<T>(&self, sorted: Vec<T>, key: impl Fn(&T) -> (BBox, usize)) -> Vec<T> {
        let mut kept: Vec<T> = Vec::new();
        for c in sorted {
            if kept.len() >= self.max_detections {
                break;
            }
            let candidate = key(&c);
            if kept.iter().all(|k| !self.suppresses(&key(k), &candidate)) {
                kept.push(c);
            }
        }
        kept
    }
}

impl Postprocess {
    /// Whether `kept` (scoring higher) suppresses `candidate`: the same garment seen twice,
    /// or a part of it.
    fn suppresses(&self, kept: &(BBox, usize), candidate: &(BBox, usize)) -> bool {
        let iou = kept.0.iou(&candidate.0);
        if kept.1 != candidate.1 {
            return iou > self.cross_class_iou || kept.0.containment(&candidate.0) > self.cross_class_containment;
        }
        // Either way round: a part scoring above its whole still means one garment, told
        // once, by its best-scoring box.
        iou > self.nms_iou || kept.0.containment(&candidate.0) > self.containment
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_orders_levels_finest_first() {
        let g = location_grid(64, &[8, 16, 32]);
        assert_eq!(g.len(), 64 + 16 + 4);
        assert_eq!(g[0], (4.0, 4.0, 8.0));
        assert_eq!(g[1], (12.0, 4.0, 8.0));
        assert_eq!(g[8], (4.0, 12.0, 8.0));
        assert_eq!(g[64], (8.0, 8.0, 16.0));
        assert_eq!(g[83], (48.0, 48.0, 32.0));
    }

    #[test]
    fn decode_thresholds_and_suppresses_per_class() {
        // Two classes, three locations of stride 8.
        let grid = [(8.0, 8.0, 8.0), (12.0, 8.0, 8.0), (40.0, 40.0, 8.0)];
        let big = 10.0f32;
        // Rows: class 0, class 1, l, t, r, b (in strides), centre-ness.
        let out = [
            [big, big, -big], // class 0: locations 0 and 1
            [-big, big, big], // class 1: locations 1 and 2
            [1.0, 1.5, 1.0],  // l
            [1.0, 1.0, 1.0],  // t
            [1.0, 0.5, 1.0],  // r
            [1.0, 1.0, 1.0],  // b
            [big, big, big],  // centre-ness
        ]
        .concat();
        let post = Postprocess { min_score: 0.5, nms_iou: 0.5, max_detections: 10, cross_class_iou: 1.0, containment: 1.0, cross_class_containment: 1.0, category_fusion: 0.0 };
        let mut d = decode(&out, 2, &grid, &post);
        d.sort_by_key(|a| (a.1, a.0.x1 as i32));
        // Class 0: locations 0 and 1 decode to the same box [0,0,16,16]: one survives.
        // Class 1: location 1's box and location 2's box [32,32,48,48] do not overlap.
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!((d[0].1, d[0].0), (0, BBox::new(0.0, 0.0, 16.0, 16.0)));
        assert_eq!((d[1].1, d[1].0), (1, BBox::new(0.0, 0.0, 16.0, 16.0)));
        assert_eq!((d[2].1, d[2].0), (1, BBox::new(32.0, 32.0, 48.0, 48.0)));
        let capped = decode(&out, 2, &grid, &Postprocess { max_detections: 1, ..post });
        assert_eq!(capped.len(), 1);
        assert!(decode(&out, 2, &grid, &Postprocess { min_score: 0.9999999, ..post }).is_empty());
        // Across classes: the class-1 box at location 1 is the class-0 box seen again.
        let merged = decode(&out, 2, &grid, &Postprocess { cross_class_iou: 0.8, ..post });
        assert_eq!(merged.len(), 2, "{merged:?}");
    }

    #[test]
    fn parts_inside_a_better_box_of_their_class_go() {
        // One class, three locations of stride 8: a whole dress (score high), its bodice
        // inside it (lower score) and, elsewhere, another garment of the class.
        let grid = [(40.0, 40.0, 8.0), (40.0, 24.0, 8.0), (120.0, 40.0, 8.0)];
        let out = [
            [4.0, 2.0, 3.0], // class 0 logits: whole, part, elsewhere
            [4.0, 1.0, 1.0], // l (strides)
            [4.0, 1.0, 1.0], // t
            [4.0, 1.0, 1.0], // r
            [4.0, 1.0, 1.0], // b
            [9.0, 9.0, 9.0], // centre-ness
        ]
        .concat();
        let post = Postprocess { min_score: 0.5, nms_iou: 0.5, max_detections: 10, cross_class_iou: 1.0, containment: 0.8, cross_class_containment: 1.0, category_fusion: 0.0 };
        let d = decode(&out, 1, &grid, &post);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![BBox::new(8.0, 8.0, 72.0, 72.0), BBox::new(112.0, 32.0, 128.0, 48.0)], "{d:?}");
        // Off, the part (IoU 1/16 with the whole) stays.
        assert_eq!(decode(&out, 1, &grid, &Postprocess { containment: 1.0, ..post }).len(), 3);
        // A part scoring above its whole: still one garment, by the better box.
        let part_first = [[2.0, 4.0, 3.0], [4.0, 1.0, 1.0], [4.0, 1.0, 1.0], [4.0, 1.0, 1.0], [4.0, 1.0, 1.0], [9.0, 9.0, 9.0]].concat();
        assert_eq!(decode(&part_first, 1, &grid, &post).iter().map(|x| x.0).collect::<Vec<_>>(), vec![BBox::new(32.0, 16.0, 48.0, 32.0), BBox::new(112.0, 32.0, 128.0, 48.0)]);
    }
}
