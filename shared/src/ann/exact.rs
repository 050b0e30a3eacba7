//! Exact (brute-force) top-k search over unit vectors.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;

/// Below this many candidate rows one thread is faster than splitting the work.
const PARALLEL_MIN_ROWS: usize = 16_384;

/// Dot product, with AVX2+FMA when the CPU has them (detected once, cached by std). This is
/// the distance of the whole index, exact and graph paths alike. (An AVX-512 variant measured
/// no faster here: see benches/NOTES.md.)
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features this function is compiled for were just detected.
            return unsafe { dot_avx2_fma(a, b) };
        }
    }
    dot_lanes::<16>(a, b, |acc, x, y| acc + x * y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    // Inlined here, the lane loop compiles to 256-bit fused multiply-adds.
    dot_lanes::<16>(a, b, |acc, x, y| x.mul_add(y, acc))
}

/// `N` independent accumulators, so several SIMD registers work at once instead of one
/// dependent chain; `step` is plain multiply-add or fused.
#[inline(always)]
fn dot_lanes<const N: usize>(a: &[f32], b: &[f32], step: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; N];
    let (ca, cb) = (a.chunks_exact(N), b.chunks_exact(N));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..N {
            acc[i] = step(acc[i], x[i], y[i]);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// A (score, row) pair ordered so that a max-heap pops the *worst* hit first.
#[derive(Clone, Copy, PartialEq)]
struct Worst(f32, u32);
impl Eq for Worst {}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.total_cmp(&self.0).then(self.1.cmp(&other.1))
    }
}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn top_k_of(scored: impl Iterator<Item = (u32, f32)>, k: usize) -> Vec<(u32, f32)> {
    let mut heap: BinaryHeap<Worst> = BinaryHeap::with_capacity(k + 1);
    for (row, score) in scored {
        if heap.len() < k {
            heap.push(Worst(score, row));
        } else if let Some(worst) = heap.peek()
            && (score > worst.0 || (score == worst.0 && row < worst.1))
        {
            heap.pop();
            heap.push(Worst(score, row));
        }
    }
    let mut out: Vec<(u32, f32)> = heap.into_iter().map(|Worst(s, r)| (r, s)).collect();
    sort_hits(&mut out);
    out
}

/// Sorts by descending score, ties by ascending row, so results are deterministic.
fn sort_hits(hits: &mut [(u32, f32)]) {
    hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

/// The `k` rows of `matrix` (row-major, `dim` wide) with the highest dot product with
/// `query`, best first; only `rows` when given.
pub fn top_k(matrix: &[f32], dim: usize, query: &[f32], k: usize, rows: Option<&[u32]>) -> Vec<(u32, f32)> {
    let score = |row: u32| {
        let at = row as usize * dim;
        (row, dot(&matrix[at..at + dim], query))
    };
    let n = rows.map_or(matrix.len() / dim.max(1), <[u32]>::len);
    if n < PARALLEL_MIN_ROWS {
        return match rows {
            Some(rows) => top_k_of(rows.iter().map(|&r| score(r)), k),
            None => top_k_of((0..n as u32).map(score), k),
        };
    }
    let chunk = n.div_ceil(rayon::current_num_threads().max(1) * 4);
    let partials: Vec<Vec<(u32, f32)>> = match rows {
        Some(rows) => rows.par_chunks(chunk).map(|c| top_k_of(c.iter().map(|&r| score(r)), k)).collect(),
        None => (0..n as u32).collect::<Vec<_>>().par_chunks(chunk).map(|c| top_k_of(c.iter().map(|&r| score(r)), k)).collect(),
    };
    top_k_of(partials.into_iter().flatten(), k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_sum_for_odd_lengths() {
        for len in [1usize, 7, 8, 9, 16, 33, 64, 100, 256] {
            let a: Vec<f32> = (0..len).map(|i| i as f32 * 0.5).collect();
            let b: Vec<f32> = (0..len).map(|i| 1.0 - i as f32 * 0.1).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() <= 1e-4 * plain.abs().max(1.0), "len {len}");
            let portable = dot_lanes::<16>(&a, &b, |acc, x, y| acc + x * y);
            assert!((dot(&a, &b) - portable).abs() <= 1e-4 * plain.abs().max(1.0), "len {len}: dispatched vs portable");
        }
    }

    #[test]
    fn top_k_is_sorted_deterministic_and_respects_the_subset() {
        // 1-d "vectors": the score is the value itself.
        let matrix: Vec<f32> = (0..40_000).map(|i| ((i * 7919) % 1000) as f32).collect();
        let all = top_k(&matrix, 1, &[1.0], 5, None);
        assert_eq!(all.iter().map(|h| h.1).collect::<Vec<_>>(), vec![999.0; 5]);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "ties break by row");
        let subset: Vec<u32> = (0..100).collect();
        let some = top_k(&matrix, 1, &[1.0], 3, Some(&subset));
        assert!(some.iter().all(|h| h.0 < 100));
        let best_in_subset = subset.iter().map(|&r| matrix[r as usize]).fold(f32::MIN, f32::max);
        assert_eq!(some[0].1, best_in_subset);
        // The parallel path agrees with the serial one.
        let big: Vec<u32> = (0..40_000).collect();
        assert_eq!(top_k(&matrix, 1, &[1.0], 7, Some(&big)), top_k(&matrix, 1, &[1.0], 7, None));
        assert_eq!(top_k(&matrix[..10], 1, &[1.0], 50, None).len(), 10);
    }
}
