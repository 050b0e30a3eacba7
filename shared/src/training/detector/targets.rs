//! FCOS targets and losses (arXiv 1904.01355): which location predicts which box, and the
//! focal, GIoU and centre-ness losses of a batch.

use candle_core::{Device, Tensor};

use crate::Result;

/// Size range of each level's boxes (largest distance from a location to a side, pixels).
fn level_ranges(levels: usize) -> Vec<(f32, f32)> {
    (0..levels)
        .map(|l| {
            let lo = if l == 0 { 0.0 } else { 64.0 * (1 << (l - 1)) as f32 };
            let hi = if l + 1 == levels { f32::INFINITY } else { 64.0 * (1 << l) as f32 };
            (lo, hi)
        })
        .collect()
}

/// What a location must predict: `(class, [l, t, r, b] in strides, centre-ness)`, or
/// background.
pub type LocationTarget = Option<(usize, [f32; 4], f32)>;

/// FCOS targets of one view at every location: `(class, [l, t, r, b] in strides,
/// centre-ness)` for positives.
pub fn assign(grid: &[(f32, f32, f32)], strides: &[usize], targets: &[(usize, [f32; 4])]) -> Vec<LocationTarget> {
    const RADIUS: f32 = 1.5;
    let ranges = level_ranges(strides.len());
    grid.iter()
        .map(|&(x, y, s)| {
            let level = strides.iter().position(|&st| st as f32 == s).unwrap_or(0);
            let (lo, hi) = ranges[level];
            let mut best: Option<(f32, usize, [f32; 4])> = None;
            for &(class, [x1, y1, x2, y2]) in targets {
                let (l, t, r, b) = (x - x1, y - y1, x2 - x, y2 - y);
                if l.min(t).min(r).min(b) <= 0.0 {
                    continue;
                }
                let (cx, cy) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
                let (cx1, cy1, cx2, cy2) = ((cx - RADIUS * s).max(x1), (cy - RADIUS * s).max(y1), (cx + RADIUS * s).min(x2), (cy + RADIUS * s).min(y2));
                if !(x > cx1 && x < cx2 && y > cy1 && y < cy2) {
                    continue;
                }
                let m = l.max(t).max(r).max(b);
                if m <= lo || m > hi {
                    continue;
                }
                let area = (x2 - x1) * (y2 - y1);
                if best.is_none_or(|(a, _, _)| area < a) {
                    best = Some((area, class, [l / s, t / s, r / s, b / s]));
                }
            }
            best.map(|(_, class, d)| {
                let centreness = ((d[0].min(d[2]) / d[0].max(d[2])) * (d[1].min(d[3]) / d[1].max(d[3]))).sqrt();
                (class, d, centreness)
            })
        })
        .collect()
}

/// Dense target tensors of a batch: one-hot classes `[b, k, n]`, distances `[b, 4, n]`
/// (1 at negatives), centre-ness `[b, 1, n]`, positive mask `[b, 1, n]`.
pub(super) fn target_tensors(assigned: &[Vec<LocationTarget>], k: usize, device: &Device) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (b, n) = (assigned.len(), assigned.first().map_or(0, Vec::len));
    let mut cls = vec![0f32; b * k * n];
    let mut reg = vec![1f32; b * 4 * n];
    let mut ctr = vec![0f32; b * n];
    let mut pos = vec![0f32; b * n];
    for (i, a) in assigned.iter().enumerate() {
        for (loc, t) in a.iter().enumerate() {
            if let Some((class, d, c)) = t {
                cls[(i * k + class) * n + loc] = 1.0;
                for (j, v) in d.iter().enumerate() {
                    reg[(i * 4 + j) * n + loc] = *v;
                }
                ctr[i * n + loc] = *c;
                pos[i * n + loc] = 1.0;
            }
        }
    }
    Ok((Tensor::from_vec(cls, (b, k, n), device)?, Tensor::from_vec(reg, (b, 4, n), device)?, Tensor::from_vec(ctr, (b, 1, n), device)?, Tensor::from_vec(pos, (b, 1, n), device)?))
}

/// Numerically stable binary cross-entropy with logits, elementwise.
fn bce_with_logits(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let log1p_exp = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    Ok(((x.relu()? - (x * t)?)? + log1p_exp)?)
}

/// The three FCOS losses of head output `out` `[b, k + 5, n]`: `(classes, boxes, centre-ness)`.
pub(super) fn losses(out: &Tensor, k: usize, cls_t: &Tensor, reg_t: &Tensor, ctr_t: &Tensor, pos: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let logits = out.narrow(1, 0, k)?;
    let dist = out.narrow(1, k, 4)?;
    let ctr_logit = out.narrow(1, k + 4, 1)?;
    let num_pos = pos.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;

    // Sigmoid focal loss, α = 0.25, γ = 2.
    let p = (logits.neg()?.exp()? + 1.0)?.recip()?;
    let ce = bce_with_logits(&logits, cls_t)?;
    let p_t = ((&p * cls_t)? + ((1.0 - &p)? * (1.0 - cls_t)?)?)?;
    let alpha_t = ((cls_t * 0.25)? + ((1.0 - cls_t)? * 0.75)?)?;
    let focal = (alpha_t * (1.0 - p_t)?.sqr()?)?.mul(&ce)?;
    let cls_loss = (focal.sum_all()? / num_pos)?;

    // GIoU of boxes around the same location, in strides.
    let side = |t: &Tensor, i: usize| t.narrow(1, i, 1);
    let (pl, pt, pr, pb) = (side(&dist, 0)?, side(&dist, 1)?, side(&dist, 2)?, side(&dist, 3)?);
    let (tl, tt, tr, tb) = (side(reg_t, 0)?, side(reg_t, 1)?, side(reg_t, 2)?, side(reg_t, 3)?);
    let area_p = ((&pl + &pr)? * (&pt + &pb)?)?;
    let area_t = ((&tl + &tr)? * (&tt + &tb)?)?;
    let inter = ((pl.minimum(&tl)? + pr.minimum(&tr)?)? * (pt.minimum(&tt)? + pb.minimum(&tb)?)?)?;
    let union = ((area_p + area_t)? - &inter)?;
    let enclose = ((pl.maximum(&tl)? + pr.maximum(&tr)?)? * (pt.maximum(&tt)? + pb.maximum(&tb)?)?)?;
    let iou = (&inter / &union)?;
    let giou = (iou - ((&enclose - &union)? / &enclose)?)?;
    let weight = (ctr_t * pos)?;
    let weight_sum = weight.sum_all()?.to_scalar::<f32>()?.max(1e-6) as f64;
    let box_loss = (((1.0 - giou)? * &weight)?.sum_all()? / weight_sum)?;

    let ctr_loss = ((bce_with_logits(&ctr_logit, ctr_t)? * pos)?.sum_all()? / num_pos)?;
    Ok((cls_loss, box_loss, ctr_loss))
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::models::detector::location_grid;

    #[test]
    fn level_ranges_follow_fcos() {
        assert_eq!(level_ranges(3), vec![(0.0, 64.0), (64.0, 128.0), (128.0, f32::INFINITY)]);
    }

    #[test]
    fn assignment_picks_level_centre_region_and_smallest_box() {
        let strides = [8, 16, 32];
        let grid = location_grid(64, &strides);
        // A 40-pixel box centred at (20, 20): largest distance ≤ 64 → stride 8 only; the
        // centre region is 1.5 strides (12 px) around the centre.
        let small = (1usize, [0.0f32, 0.0, 40.0, 40.0]);
        let a = assign(&grid, &strides, &[small]);
        let positives: Vec<(f32, f32, f32)> = a.iter().zip(&grid).filter(|(t, _)| t.is_some()).map(|(_, g)| *g).collect();
        assert!(positives.iter().all(|&(x, y, s)| s == 8.0 && (x - 20.0).abs() < 12.0 && (y - 20.0).abs() < 12.0), "{positives:?}");
        assert_eq!(positives.len(), 9, "{positives:?}");
        // At (20, 20): l = t = r = b = 20 px = 2.5 strides, centre-ness 1.
        let at = grid.iter().position(|&g| g == (20.0, 20.0, 8.0)).unwrap();
        let (class, d, c) = a[at].unwrap();
        assert_eq!((class, d, c), (1, [2.5; 4], 1.0));
        // A large box covering the same place: the small box still wins there.
        let large = (0usize, [0.0f32, 0.0, 64.0, 64.0]);
        let b = assign(&grid, &strides, &[large, small]);
        assert_eq!(b[at].unwrap().0, 1);
        // The large box's largest distance at the stride-16 centre (24, 24)… is 40 ≤ 64:
        // no stride-16 location takes it; one stride-32 location near its centre would need
        // a distance above 128, so the 64-px box is a stride-8 object as well.
        assert!(b.iter().zip(&grid).filter(|(t, g)| t.is_some() && g.2 > 8.0).count() == 0);
    }

    #[test]
    fn losses_fall_when_predictions_match_targets() {
        let dev = Device::Cpu;
        let strides = [8usize];
        let grid = location_grid(32, &strides);
        let assigned = vec![assign(&grid, &strides, &[(0, [0.0, 0.0, 30.0, 22.0])])];
        let (cls_t, reg_t, ctr_t, pos) = target_tensors(&assigned, 2, &dev).unwrap();
        let n = grid.len();
        // A perfect prediction: logits ±8 by the targets, distances equal, centre-ness logit
        // of its target.
        let good_cls = ((cls_t.clone() * 16.0).unwrap() - 8.0).unwrap();
        let logit = |p: f32| (p.clamp(1e-4, 1.0 - 1e-4) / (1.0 - p.clamp(1e-4, 1.0 - 1e-4))).ln();
        let ctr_vals: Vec<f32> = ctr_t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(logit).collect();
        let good = Tensor::cat(&[good_cls, reg_t.clone(), Tensor::from_vec(ctr_vals, (1, 1, n), &dev).unwrap()], 1).unwrap();
        let bad =
            Tensor::cat(&[Tensor::zeros((1, 2, n), DType::F32, &dev).unwrap(), (reg_t.clone() * 3.0).unwrap(), Tensor::zeros((1, 1, n), DType::F32, &dev).unwrap()], 1).unwrap();
        let total = |out: &Tensor| {
            let (a, b, c) = losses(out, 2, &cls_t, &reg_t, &ctr_t, &pos).unwrap();
            [a, b, c].map(|t| t.to_scalar::<f32>().unwrap())
        };
        let (g, b) = (total(&good), total(&bad));
        assert!(pos.sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        assert!(g[0] < 0.01 * b[0], "{g:?} {b:?}");
        assert!(g[1].abs() < 1e-5 && b[1] > 0.3, "{g:?} {b:?}");
        assert!(g[2] < b[2], "{g:?} {b:?}");
    }
}
