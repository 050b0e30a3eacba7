//! Top-k retrieval accuracy over embeddings: each query's correct gallery entries, ranked by
//! cosine similarity. With ground-truth boxes this is the DeepFashion2 rule (a hit is a
//! gallery image of the same `pair_id` and `style`; the gallery garment is that image's
//! ground-truth box, so the IoU ≥ 0.5 condition holds by construction).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::ann::exact::top_k;
use crate::evaluation::retrieval::TOP_K;

/// Fraction of queries with a correct gallery entry within the first k, for each k of
/// [`TOP_K`]. `queries` and `gallery` are row-major unit vectors of length `dim`;
/// `correct[q]` lists the gallery rows that count as hits for query q.
pub fn top_k_accuracy(queries: &[f32], gallery: &[f32], dim: usize, correct: &[Vec<u32>]) -> BTreeMap<usize, f64> {
    let max_k = *TOP_K.iter().max().expect("non-empty");
    accuracy_from_ranks(correct.iter().enumerate().map(|(q, right)| {
        let ranked = top_k(gallery, dim, &queries[q * dim..(q + 1) * dim], max_k, None);
        ranked.iter().position(|(row, _)| right.contains(row))
    }))
}

/// Top-k accuracy for each k of [`TOP_K`] from each query's rank of its first hit (`None`:
/// no hit).
fn accuracy_from_ranks(first_hits: impl Iterator<Item = Option<usize>>) -> BTreeMap<usize, f64> {
    let (mut n, mut hits) = (0usize, [0usize; TOP_K.len()]);
    for rank in first_hits {
        n += 1;
        for (i, k) in TOP_K.iter().enumerate() {
            if rank.is_some_and(|r| r < *k) {
                hits[i] += 1;
            }
        }
    }
    TOP_K.iter().zip(hits).map(|(k, h)| (*k, if n == 0 { 0.0 } else { h as f64 / n as f64 })).collect()
}

/// Gallery rows in the engine's default order for one query: rows at cosine ≥
/// `exact_above` first (likely the very item, whatever its category), then rows of
/// `preferred`, then the rest, each part by similarity.
pub fn ranked_rows(gallery: &[f32], dim: usize, query: &[f32], categories: &[usize], preferred: Option<usize>, exact_above: Option<f32>) -> Vec<u32> {
    let mut ranked = top_k(gallery, dim, query, categories.len(), None);
    if let Some(first) = preferred {
        // Stable: each tier keeps similarity order.
        ranked.sort_by_key(|&(row, score)| {
            if exact_above.is_some_and(|t| score >= t) {
                0
            } else if categories[row as usize] == first {
                1
            } else {
                2
            }
        });
    }
    ranked.into_iter().map(|(row, _)| row).collect()
}

/// [`top_k_accuracy`] with the engine's default order ([`ranked_rows`]).
pub fn ranked_top_k_accuracy(
    queries: &[f32],
    gallery: &[f32],
    dim: usize,
    correct: &[Vec<u32>],
    categories: &[usize],
    preferred: &[Option<usize>],
    exact_above: Option<f32>,
) -> BTreeMap<usize, f64> {
    accuracy_from_ranks(correct.iter().enumerate().map(|(q, right)| {
        let rows = ranked_rows(gallery, dim, &queries[q * dim..(q + 1) * dim], categories, preferred[q], exact_above);
        rows.iter().position(|row| right.contains(row))
    }))
}

/// Category precision: the mean share of a query's first k results that are of its
/// category.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CategoryPrecision {
    /// Over the queries whose category the gallery has.
    pub mean: f64,
    pub queries: usize,
    /// Queries left out: the gallery has none of their category.
    pub absent: usize,
    /// By category index: (queries, mean).
    pub per_category: BTreeMap<usize, (usize, f64)>,
}

/// Category precision@k of `queries` against `gallery` (row-major unit vectors of length
/// `dim`), ranked by cosine similarity. With `preferred`, a query's results of
/// `preferred[q]` come first (the engine's default ranking), each part in similarity order.
/// The arguments are parallel arrays of one evaluation, as the other measures here take.
#[allow(clippy::too_many_arguments)]
pub fn category_precision(
    queries: &[f32],
    query_categories: &[usize],
    gallery: &[f32],
    gallery_categories: &[usize],
    dim: usize,
    k: usize,
    preferred: Option<&[Option<usize>]>,
    exact_above: Option<f32>,
) -> CategoryPrecision {
    let present: HashSet<usize> = gallery_categories.iter().copied().collect();
    let mut sums: BTreeMap<usize, (usize, f64)> = BTreeMap::new();
    let mut absent = 0;
    for (q, &category) in query_categories.iter().enumerate() {
        if !present.contains(&category) {
            absent += 1;
            continue;
        }
        let rows = ranked_rows(gallery, dim, &queries[q * dim..(q + 1) * dim], gallery_categories, preferred.and_then(|p| p[q]), exact_above);
        let taken = rows.len().min(k);
        let right = rows[..taken].iter().filter(|&&r| gallery_categories[r as usize] == category).count();
        let entry = sums.entry(category).or_default();
        entry.0 += 1;
        entry.1 += right as f64 / k as f64;
    }
    let queries = sums.values().map(|(n, _)| n).sum::<usize>();
    let total: f64 = sums.values().map(|(_, s)| s).sum();
    CategoryPrecision {
        mean: if queries == 0 { 0.0 } else { total / queries as f64 },
        queries,
        absent,
        per_category: sums.into_iter().map(|(c, (n, s))| (c, (n, s / n as f64))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hits_within_k() {
        // Gallery: 3 unit vectors along axes; query 0 matches row 2, query 1 matches nothing.
        let gallery = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let queries = [0.1, 0.2, 0.97, 1.0, 0.0, 0.0];
        let acc = top_k_accuracy(&queries, &gallery, 3, &[vec![2], vec![]]);
        assert_eq!(acc[&1], 0.5);
        assert_eq!(acc[&20], 0.5);
        let acc = top_k_accuracy(&queries, &gallery, 3, &[vec![0], vec![0]]);
        assert_eq!((acc[&1], acc[&5]), (0.5, 1.0));
    }

    #[test]
    fn category_precision_counts_the_right_kind_and_honours_the_preference() {
        // Gallery rows 0, 1 of category 0 and row 2 of category 1; the query sits nearest
        // row 2, then row 0, then row 1.
        let gallery = [1.0, 0.0, 0.0, 0.8, 0.6, 0.0, 0.0, 0.0, 1.0];
        let g_cats = [0, 0, 1];
        let query = [0.3, 0.0, 0.954];
        let plain = category_precision(&query, &[0], &gallery, &g_cats, 3, 2, None, None);
        assert_eq!(plain.mean, 0.5);
        let ranked = category_precision(&query, &[0], &gallery, &g_cats, 3, 2, Some(&[Some(0)]), None);
        assert_eq!(ranked.mean, 1.0);
        // A near-certain match of another kind keeps its place in front.
        let exact = category_precision(&query, &[0], &gallery, &g_cats, 3, 2, Some(&[Some(0)]), Some(0.9));
        assert_eq!(exact.mean, 0.5);
        assert_eq!(ranked_rows(&gallery, 3, &query, &g_cats, Some(0), Some(0.9)), [2, 0, 1]);
        assert_eq!(ranked_rows(&gallery, 3, &query, &g_cats, Some(0), None), [0, 1, 2]);
        // The exact item (row 2) loses top-1 to its kind-first order unless it passes the
        // exact-match similarity.
        let kind_first = ranked_top_k_accuracy(&query, &gallery, 3, &[vec![2]], &g_cats, &[Some(0)], None);
        let excepted = ranked_top_k_accuracy(&query, &gallery, 3, &[vec![2]], &g_cats, &[Some(0)], Some(0.9));
        assert_eq!((kind_first[&1], kind_first[&5], excepted[&1]), (0.0, 1.0, 1.0));
        // A query of a category the gallery lacks is left out, not counted as zero.
        let absent = category_precision(&query, &[7], &gallery, &g_cats, 3, 2, None, None);
        assert_eq!((absent.queries, absent.absent, absent.mean), (0, 1, 0.0));
    }
}
