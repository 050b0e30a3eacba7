//! Top-k retrieval accuracy over embeddings: each query's correct gallery entries, ranked by
//! cosine similarity. With ground-truth boxes this is the DeepFashion2 rule (a hit is a
//! gallery image of the same `pair_id` and `style`; the gallery garment is that image's
//! ground-truth box, so the IoU ≥ 0.5 condition holds by construction).

use std::collections::BTreeMap;

use crate::ann::exact::top_k;
use crate::evaluation::retrieval::TOP_K;

/// Fraction of queries with a correct gallery entry within the first k, for each k of
/// [`TOP_K`]. `queries` and `gallery` are row-major unit vectors of length `dim`;
/// `correct[q]` lists the gallery rows that count as hits for query q.
pub fn top_k_accuracy(queries: &[f32], gallery: &[f32], dim: usize, correct: &[Vec<u32>]) -> BTreeMap<usize, f64> {
    let n = correct.len();
    let max_k = *TOP_K.iter().max().expect("non-empty");
    let mut hits = [0usize; TOP_K.len()];
    for (q, right) in correct.iter().enumerate() {
        let ranked = top_k(gallery, dim, &queries[q * dim..(q + 1) * dim], max_k, None);
        if let Some(rank) = ranked.iter().position(|(row, _)| right.contains(row)) {
            for (i, k) in TOP_K.iter().enumerate() {
                if rank < *k {
                    hits[i] += 1;
                }
            }
        }
    }
    TOP_K
        .iter()
        .zip(hits)
        .map(|(k, h)| (*k, if n == 0 { 0.0 } else { h as f64 / n as f64 }))
        .collect()
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
}
