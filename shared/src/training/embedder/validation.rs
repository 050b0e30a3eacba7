//! Measuring a head on the validation crops: the proxy's top-k (by similarity and in the
//! engine's order), the category precision against distractors, the category head's
//! accuracy, and the exact-match threshold, beside the untrained backbone's numbers.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{D, Device, Tensor};

use super::PRECISION_K;
use super::data::Pooled;
use crate::Result;
use crate::catalog::related::preferred_category;
use crate::models::embedder::{CategoryHead, EmbeddingHead, l2_normalise};
use crate::training::retrieval::{CategoryPrecision, category_precision, ranked_top_k_accuracy, top_k_accuracy};

/// Row-major unit vectors of the head's embeddings of `pooled` (GeM features).
fn embed_rows(pooled: &Tensor, head: &EmbeddingHead, device: &Device) -> Result<Vec<f32>> {
    Ok(head.project(&pooled.to_device(device)?)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Row-major unit vectors of average-pooled features: the untrained backbone's embedding.
fn unit_rows(avg: &Tensor) -> Result<Vec<f32>> {
    Ok(l2_normalise(avg)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The validation sets by global rows.
pub(super) struct Validation {
    pub queries: Vec<u32>,
    pub query_categories: Vec<usize>,
    pub gallery: Vec<u32>,
    /// Category of each gallery row (the validation shop images take their street
    /// garment's).
    pub gallery_categories: Vec<usize>,
    pub correct: Vec<Vec<u32>>,
    pub distractors: Vec<u32>,
    pub distractor_categories: Vec<usize>,
}

impl Validation {
    fn rows(pooled: &Tensor, rows: &[u32]) -> Result<Tensor> {
        Ok(pooled.index_select(&Tensor::new(rows, &Device::Cpu)?, 0)?)
    }

    /// The untrained backbone's numbers: the floor.
    pub(super) fn baseline(&self, pooled: &Pooled) -> Result<(BTreeMap<usize, f64>, CategoryPrecision)> {
        let queries = unit_rows(&Self::rows(&pooled.avg, &self.queries)?)?;
        let gallery = unit_rows(&Self::rows(&pooled.avg, &self.gallery)?)?;
        let distractors = unit_rows(&Self::rows(&pooled.avg, &self.distractors)?)?;
        let features = pooled.avg.dim(1)?;
        Ok((
            top_k_accuracy(&queries, &gallery, features, &self.correct),
            category_precision(&queries, &self.query_categories, &distractors, &self.distractor_categories, features, PRECISION_K, None, None),
        ))
    }

    /// Everything an epoch is judged by; the exact-match threshold is calibrated here.
    pub(super) fn measure(&self, pooled: &Pooled, head: &EmbeddingHead, categories: &CategoryHead, names: &[String], false_rate: f64, device: &Device) -> Result<Measured> {
        let dim = head.weight.dim(0)?;
        let query_t = head.project(&Self::rows(&pooled.gem, &self.queries)?.to_device(device)?)?;
        let queries = query_t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let gallery = embed_rows(&Self::rows(&pooled.gem, &self.gallery)?, head, device)?;
        let distractors = embed_rows(&Self::rows(&pooled.gem, &self.distractors)?, head, device)?;
        let guesses: Vec<usize> = categories.logits(&query_t)?.argmax(D::Minus1)?.to_device(&Device::Cpu)?.to_vec1::<u32>()?.into_iter().map(|c| c as usize).collect();
        let accuracy = guesses.iter().zip(&self.query_categories).filter(|(g, t)| g == t).count() as f64 / guesses.len().max(1) as f64;
        let index_of: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let preferred_in = |present: &[usize]| -> Vec<Option<usize>> {
            let present: HashSet<usize> = present.iter().copied().collect();
            guesses.iter().map(|&g| preferred_category(&names[g], |c| index_of.get(c).is_some_and(|i| present.contains(i))).map(|(c, _)| index_of[c])).collect()
        };
        let (in_distractors, in_gallery) = (preferred_in(&self.distractor_categories), preferred_in(&self.gallery_categories));
        let exact_above = exact_match_threshold(&queries, &gallery, dim, &self.correct, false_rate);
        Ok(Measured {
            top_k: top_k_accuracy(&queries, &gallery, dim, &self.correct),
            ranked_top_k: ranked_top_k_accuracy(&queries, &gallery, dim, &self.correct, &self.gallery_categories, &in_gallery, Some(exact_above)),
            strict_top_k: ranked_top_k_accuracy(&queries, &gallery, dim, &self.correct, &self.gallery_categories, &in_gallery, None),
            precision: category_precision(&queries, &self.query_categories, &distractors, &self.distractor_categories, dim, PRECISION_K, None, None),
            ranked_precision: category_precision(
                &queries,
                &self.query_categories,
                &distractors,
                &self.distractor_categories,
                dim,
                PRECISION_K,
                Some(&in_distractors),
                Some(exact_above),
            ),
            accuracy,
            exact_above,
        })
    }
}

/// One head's validation numbers.
pub(super) struct Measured {
    /// Proxy top-k by similarity alone.
    pub top_k: BTreeMap<usize, f64>,
    /// Proxy top-k in the engine's default order (with the exact-match exception).
    pub ranked_top_k: BTreeMap<usize, f64>,
    /// Proxy top-k with the category strictly first (no exception), for the record.
    pub strict_top_k: BTreeMap<usize, f64>,
    pub precision: CategoryPrecision,
    pub ranked_precision: CategoryPrecision,
    pub accuracy: f64,
    pub exact_above: f32,
}

/// The cosine above which a result is taken for the very item and kept in front whatever its
/// category: the (1 − `false_rate`) quantile of each query's best similarity to a gallery
/// entry that is *not* its item, so that a wrong item jumps the category order for about
/// that share of queries.
fn exact_match_threshold(queries: &[f32], gallery: &[f32], dim: usize, correct: &[Vec<u32>], false_rate: f64) -> f32 {
    let mut best_wrong: Vec<f32> = correct
        .iter()
        .enumerate()
        .map(|(q, right)| {
            let query = &queries[q * dim..(q + 1) * dim];
            let ranked = crate::ann::exact::top_k(gallery, dim, query, right.len() + 1, None);
            ranked.into_iter().find(|(row, _)| !right.contains(row)).map_or(-1.0, |(_, s)| s)
        })
        .collect();
    if best_wrong.is_empty() {
        return 1.0;
    }
    best_wrong.sort_by(f32::total_cmp);
    let at = ((best_wrong.len() as f64 * (1.0 - false_rate)).ceil() as usize).min(best_wrong.len() - 1);
    best_wrong[at]
}
