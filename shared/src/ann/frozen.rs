//! The HNSW graph as it is served: hnsw_rs builds it, then it is frozen into flat arrays of
//! row numbers over the generation's own vectors.
//!
//! Why: hnsw_rs keeps a copy of every vector inside its points, an `Arc` and a lock per
//! point and a `Vec` of neighbour lists per layer. At 100k × 256-d that was 4,050 bytes per
//! garment beside the 1,024 of the vector we already hold, and its search walked pointers
//! through those locks (benches/RESULTS.md: 0.19× hnswlib's queries/s). Frozen, a garment
//! costs its base-layer links (`2·M` u32, 128 B at M = 16) plus its share of the sparse upper
//! layers, and a search reads one contiguous link row per visited node and scores it
//! against [`GarmentVectors`] rows with the exact path's dot product.
//!
//! The search is the usual HNSW one (Malkov & Yashunin, arXiv 1603.09320): greedy descent
//! through the upper layers from the entry point, then a best-first beam of width `ef` on the
//! base layer. Visited nodes are marked with a per-thread array of search stamps, so nothing
//! is cleared between searches.
//!
//! The file format (little-endian u32 words; `SLFG` magic, format version) is ours and read
//! with every field checked, so a damaged file is an error, never a panic or a wild index.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::GarmentVectors;
use super::exact::dot;

/// Marks an unused slot of a base-layer link row.
const NO_LINK: u32 = u32::MAX;
/// Most links a base-layer row may have (hnsw_rs keeps `2·M`, and M ≤ 256).
const MAX_WIDTH: usize = 512;
const MAGIC: u32 = u32::from_le_bytes(*b"SLFG");
const FORMAT: u32 = 1;

/// One upper layer: the rows present in it (ascending) and their links (CSR).
#[derive(Debug, Clone, PartialEq, Eq)]
struct UpperLayer {
    rows: Vec<u32>,
    /// `links[starts[i]..starts[i + 1]]` are the links of `rows[i]`.
    starts: Vec<u32>,
    links: Vec<u32>,
}

impl UpperLayer {
    fn links_of(&self, row: u32) -> &[u32] {
        match self.rows.binary_search(&row) {
            Ok(i) => &self.links[self.starts[i] as usize..self.starts[i + 1] as usize],
            Err(_) => &[],
        }
    }
}

/// A frozen HNSW graph over `n` rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrozenGraph {
    n: usize,
    entry: u32,
    /// Slots per row of the base layer.
    width: usize,
    /// `n × width` links, unused slots [`NO_LINK`].
    base: Vec<u32>,
    /// Layers 1, 2, … up to the entry point's.
    upper: Vec<UpperLayer>,
}

/// A candidate: distance `-dot` and row; ordered by distance, then row. (Negation is exact,
/// so the score a search returns is bit for bit the exact path's `dot`.)
#[derive(Debug, Clone, Copy, PartialEq)]
struct Near(f32, u32);

impl Eq for Near {}

impl Ord for Near {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

impl PartialOrd for Near {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Re-selects every row's base-layer links with HNSW's neighbour heuristic (Malkov &
/// Yashunin, algorithm 4, with pruned candidates filling the free slots) over the links
/// hnsw_rs gave the row and the rows that link to it.
///
/// Why: when a new point's link overflows an older point's full list, hnsw_rs keeps the
/// older point's `2·M` closest (`reverse_update_neighborhood_simple`), where hnswlib
/// applies the heuristic again. In clustered data the lists then fill with near twins and
/// lose the links that lead out of a cluster: at 1M clustered vectors, recall@10 topped out
/// at 0.931 at ef 384 (hnswlib 0.999, benches/NOTES.md). The rows linking to a row are where
/// those long links survive; the heuristic keeps a candidate only if it is closer to the
/// row than to every link already kept, i.e. a direction not yet covered.
///
/// Rows are independent and read only the links as hnsw_rs left them, so the result does
/// not depend on the thread count.
fn diversify(base: &[u32], width: usize, vectors: &GarmentVectors) -> Vec<u32> {
    use rayon::prelude::*;
    let n = vectors.len();
    let links_of = |row: usize| base[row * width..(row + 1) * width].iter().copied().take_while(|&r| r != NO_LINK);
    // Who links to each row, as CSR.
    let mut starts = vec![0u32; n + 1];
    for row in 0..n {
        for to in links_of(row) {
            starts[to as usize + 1] += 1;
        }
    }
    for i in 0..n {
        starts[i + 1] += starts[i];
    }
    let mut filled = starts.clone();
    let mut incoming = vec![0u32; starts[n] as usize];
    for row in 0..n {
        for to in links_of(row) {
            incoming[filled[to as usize] as usize] = row as u32;
            filled[to as usize] += 1;
        }
    }
    let mut out = vec![NO_LINK; n * width];
    out.par_chunks_mut(width).enumerate().for_each(|(row, slots)| {
        let here = vectors.row(row);
        let mut candidates: Vec<(f32, u32)> = links_of(row)
            .chain(incoming[starts[row] as usize..starts[row + 1] as usize].iter().copied())
            .filter(|&c| c as usize != row)
            .map(|c| (dot(here, vectors.row(c as usize)), c))
            .collect();
        // Nearest first; ties by row, so the order is the same on every run.
        candidates.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        candidates.dedup_by_key(|c| c.1);
        let mut kept = 0;
        let mut pruned = Vec::new();
        for &(to_row, c) in &candidates {
            if kept == width {
                break;
            }
            let there = vectors.row(c as usize);
            if slots[..kept].iter().all(|&s| dot(there, vectors.row(s as usize)) < to_row) {
                slots[kept] = c;
                kept += 1;
            } else {
                pruned.push(c);
            }
        }
        for c in pruned.into_iter().take(width - kept) {
            slots[kept] = c;
            kept += 1;
        }
    });
    out
}

/// Per-thread visit marks: `stamps[row] == stamp` means visited in the current search.
struct Visits {
    stamps: Vec<u32>,
    stamp: u32,
}

impl Visits {
    /// Starts a search over `n` rows.
    fn start(&mut self, n: usize) {
        if self.stamps.len() < n {
            self.stamps.resize(n, 0);
        }
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            // Wrapped after 4 billion searches: old marks could collide, so clear them.
            self.stamps.fill(0);
            self.stamp = 1;
        }
    }

    /// Marks `row`; whether it was unvisited.
    fn first_visit(&mut self, row: u32) -> bool {
        let slot = &mut self.stamps[row as usize];
        let first = *slot != self.stamp;
        *slot = self.stamp;
        first
    }
}

thread_local! {
    static VISITS: RefCell<Visits> = const { RefCell::new(Visits { stamps: Vec::new(), stamp: 0 }) };
}

impl FrozenGraph {
    /// Freezes an hnsw_rs graph whose data ids are the rows of `vectors`, re-selecting the
    /// base layer's links ([`diversify`]).
    pub fn freeze(graph: &super::graph::Graph, vectors: &GarmentVectors) -> Self {
        Self::freeze_with(graph, vectors, true)
    }

    fn freeze_with(graph: &super::graph::Graph, vectors: &GarmentVectors, diversified: bool) -> Self {
        let n = vectors.len();
        let mut rows_links: Vec<Vec<Vec<u32>>> = vec![Vec::new(); n];
        let mut levels = vec![0u8; n];
        for point in graph.get_point_indexation() {
            let row = point.get_origin_id();
            levels[row] = point.get_point_id().0;
            rows_links[row] = point.get_neighborhood_id().into_iter().map(|layer| layer.into_iter().map(|nb| nb.get_origin_id() as u32).collect()).collect();
        }
        // The entry point: the lowest row of the highest level, so a graph freezes the same
        // way whatever order hnsw_rs lists its points in.
        let entry = (0..n).max_by_key(|&row| (levels[row], Reverse(row))).map_or((0, 0), |row| (row as u32, levels[row]));
        let top = entry.1 as usize;
        let width = rows_links.iter().filter_map(|layers| layers.first().map(Vec::len)).max().unwrap_or(0).clamp(1, MAX_WIDTH);
        let mut base = vec![NO_LINK; n * width];
        for (row, layers) in rows_links.iter().enumerate() {
            if let Some(links) = layers.first() {
                let links = &links[..links.len().min(width)];
                base[row * width..row * width + links.len()].copy_from_slice(links);
            }
        }
        let base = if diversified { diversify(&base, width, vectors) } else { base };
        let upper = (1..=top)
            .map(|layer| {
                let mut out = UpperLayer { rows: Vec::new(), starts: vec![0], links: Vec::new() };
                for (row, layers) in rows_links.iter().enumerate().filter(|(row, _)| levels[*row] as usize >= layer) {
                    out.rows.push(row as u32);
                    out.links.extend_from_slice(layers.get(layer).map_or(&[][..], Vec::as_slice));
                    out.starts.push(out.links.len() as u32);
                }
                out
            })
            .collect();
        Self { n, entry: entry.0, width, base, upper }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes the graph holds (links and their indexes), for memory reports.
    pub fn heap_bytes(&self) -> usize {
        4 * (self.base.len() + self.upper.iter().map(|l| l.rows.len() + l.starts.len() + l.links.len()).sum::<usize>())
    }

    /// Up to `k` rows nearest to the unit `query` (of `vectors`, the rows it was built
    /// over), best first, with their score (the exact path's [`dot`], bit for bit), found
    /// with a beam of `ef` (at least `k`); only rows `keep` accepts enter the results, all
    /// are walked through.
    pub fn search(&self, vectors: &GarmentVectors, query: &[f32], k: usize, ef: usize, keep: Option<&dyn Fn(u32) -> bool>) -> Vec<(u32, f32)> {
        if self.n == 0 || k == 0 {
            return Vec::new();
        }
        let distance = |row: u32| -dot(vectors.row(row as usize), query);
        let mut at = Near(distance(self.entry), self.entry);
        for layer in self.upper.iter().rev() {
            loop {
                let best = layer.links_of(at.1).iter().map(|&r| Near(distance(r), r)).min().filter(|c| *c < at);
                match best {
                    Some(closer) => at = closer,
                    None => break,
                }
            }
        }
        let ef = ef.max(k);
        VISITS.with(|visits| {
            let visits = &mut *visits.borrow_mut();
            visits.start(self.n);
            self.beam(vectors, at, ef, keep, visits, &distance, k)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn beam(
        &self,
        vectors: &GarmentVectors,
        start: Near,
        ef: usize,
        keep: Option<&dyn Fn(u32) -> bool>,
        visits: &mut Visits,
        distance: &dyn Fn(u32) -> f32,
        k: usize,
    ) -> Vec<(u32, f32)> {
        let accepts = |row: u32| keep.is_none_or(|f| f(row));
        let mut candidates = BinaryHeap::with_capacity(ef * 2);
        let mut results: BinaryHeap<Near> = BinaryHeap::with_capacity(ef + 1);
        visits.first_visit(start.1);
        candidates.push(Reverse(start));
        if accepts(start.1) {
            results.push(start);
        }
        while let Some(Reverse(nearest)) = candidates.pop() {
            if results.len() >= ef && results.peek().is_some_and(|worst| nearest.0 > worst.0) {
                break;
            }
            let links = &self.base[nearest.1 as usize * self.width..(nearest.1 as usize + 1) * self.width];
            // The vectors of a node's unvisited neighbours are scattered over the whole
            // matrix: asking for all of them before scoring the first overlaps the cache
            // misses instead of paying them one after another.
            let mut fresh = [0u32; MAX_WIDTH];
            let mut count = 0;
            for &row in links.iter().take_while(|&&r| r != NO_LINK) {
                if visits.first_visit(row) {
                    prefetch(vectors.row(row as usize));
                    fresh[count] = row;
                    count += 1;
                }
            }
            for (i, &row) in fresh[..count].iter().enumerate() {
                if let Some(&next) = fresh.get(i + 1).filter(|_| i + 1 < count) {
                    prefetch_all(vectors.row(next as usize));
                }
                let near = Near(distance(row), row);
                let full = results.len() >= ef;
                if full && results.peek().is_some_and(|worst| near >= *worst) {
                    continue;
                }
                candidates.push(Reverse(near));
                if accepts(row) {
                    results.push(near);
                    if results.len() > ef {
                        results.pop();
                    }
                }
            }
        }
        let mut found: Vec<(u32, f32)> = results.into_sorted_vec().into_iter().map(|Near(d, row)| (row, -d)).collect();
        found.truncate(k);
        found
    }

    /// The graph as bytes (see the module notes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut words = vec![MAGIC, FORMAT, self.n as u32, self.width as u32, self.entry, self.upper.len() as u32];
        words.extend_from_slice(&self.base);
        for layer in &self.upper {
            words.push(layer.rows.len() as u32);
            words.push(layer.links.len() as u32);
            words.extend_from_slice(&layer.rows);
            words.extend_from_slice(&layer.starts);
            words.extend_from_slice(&layer.links);
        }
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Reads [`Self::to_bytes`]'s output for a graph over `n` rows; says what is wrong
    /// otherwise.
    pub fn from_bytes(bytes: &[u8], n: usize) -> Result<Self, String> {
        if !bytes.len().is_multiple_of(4) {
            return Err(format!("{} bytes is not a whole number of words", bytes.len()));
        }
        let words: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mut reader = Words { words: &words, at: 0 };
        let header = reader.take(6)?;
        if header[0] != MAGIC || header[1] != FORMAT {
            return Err(format!("not a frozen graph of format {FORMAT}"));
        }
        let (count, width, entry, layers) = (header[2] as usize, header[3] as usize, header[4], header[5] as usize);
        if count != n {
            return Err(format!("holds {count} rows, expected {n}"));
        }
        if width == 0 || width > MAX_WIDTH || layers > 64 || (n > 0 && entry as usize >= n) {
            return Err(format!("implausible header (width {width}, {layers} layers, entry {entry})"));
        }
        let link_ok = |r: &u32| (*r as usize) < n;
        let base = reader.take(n.checked_mul(width).ok_or("too many links")?)?.to_vec();
        if !base.iter().all(|r| *r == NO_LINK || link_ok(r)) {
            return Err("a base-layer link points past the last row".into());
        }
        let mut upper = Vec::with_capacity(layers);
        for layer in 1..=layers {
            let sizes = reader.take(2)?;
            let (rows, links) = (sizes[0] as usize, sizes[1] as usize);
            let layer_data = UpperLayer { rows: reader.take(rows)?.to_vec(), starts: reader.take(rows + 1)?.to_vec(), links: reader.take(links)?.to_vec() };
            let ascending = layer_data.rows.windows(2).all(|w| w[0] < w[1]) && layer_data.rows.iter().all(link_ok);
            let starts_ok = layer_data.starts.first() == Some(&0) && layer_data.starts.windows(2).all(|w| w[0] <= w[1]) && layer_data.starts.last() == Some(&(links as u32));
            if !ascending || !starts_ok || !layer_data.links.iter().all(link_ok) {
                return Err(format!("layer {layer} is inconsistent"));
            }
            upper.push(layer_data);
        }
        if let Some(top) = upper.last()
            && top.rows.binary_search(&entry).is_err()
        {
            return Err("the entry point is not on the top layer".into());
        }
        if reader.at != words.len() {
            return Err(format!("{} words after the last layer", words.len() - reader.at));
        }
        Ok(Self { n, entry, width, base, upper })
    }
}

/// Asks the CPU to start loading the first cache line of `data` (the hardware prefetcher
/// follows the rest; prefetching all 16 lines of a 256-d row measured slower).
#[inline(always)]
fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(data.as_ptr().cast::<i8>(), std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

#[inline(always)]
fn prefetch_all(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16).skip(1) {
        // SAFETY: a prefetch is a hint; it never faults, whatever the address.
        unsafe { std::arch::x86_64::_mm_prefetch(line.as_ptr().cast::<i8>(), std::arch::x86_64::_MM_HINT_T0) };
    }
}

/// Reads words in order, refusing to run past the end.
struct Words<'a> {
    words: &'a [u32],
    at: usize,
}

impl<'a> Words<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u32], String> {
        let end = self.at.checked_add(count).filter(|end| *end <= self.words.len()).ok_or_else(|| format!("ends after {} words", self.words.len()))?;
        let out = &self.words[self.at..end];
        self.at = end;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ann::synthetic::{clustered, queries_near};
    use crate::ann::{AnnParams, exact, graph};

    fn frozen(n: usize) -> (GarmentVectors, FrozenGraph) {
        let vectors = clustered(n, 32, 40, 3, 21);
        let graph = graph::build_hnsw(&vectors, &AnnParams::default());
        let frozen = FrozenGraph::freeze(&graph, &vectors);
        (vectors, frozen)
    }

    /// Unit vectors in the plane at these angles (degrees), one row each.
    fn at_angles(degrees: &[f64]) -> GarmentVectors {
        let mut vectors = GarmentVectors::new(2);
        for (i, d) in degrees.iter().enumerate() {
            let r = d.to_radians();
            vectors.push(i as u64, "c", &[r.cos() as f32, r.sin() as f32]).unwrap();
        }
        vectors
    }

    #[test]
    fn diversifying_keeps_a_link_from_each_direction_taken_from_the_rows_linking_in() {
        // Row 0 has two near twins (rows 1 and 2, 1° and 2.5° away), all it was given; row 3
        // lies the other way (-90°) and only links to row 0. Two slots per row.
        let vectors = at_angles(&[0.0, 1.0, 2.5, -90.0]);
        let base = [1, 2, 0, 2, 1, 0, 0, NO_LINK];
        let out = diversify(&base, 2, &vectors);
        // Row 0: its nearest twin, then the link that leads elsewhere (row 2 is nearer to
        // row 1 than to row 0: a direction already covered).
        assert_eq!(&out[0..2], &[1, 3]);
        // Rows 1 and 2: no candidate besides each other and row 0; every slot still used.
        assert_eq!(&out[2..4], &[0, 2]);
        assert_eq!(&out[4..6], &[1, 0]);
        // Row 3 had a free slot: only row 0 is a candidate.
        assert_eq!(&out[6..8], &[0, NO_LINK]);
        // No row links to itself or twice to one row, whatever the input held.
        let out = diversify(&[0, 1, 0, 1, 2, 2, 3, 3], 2, &vectors);
        for (row, links) in out.chunks(2).enumerate() {
            assert!(!links.contains(&(row as u32)), "row {row}: {links:?}");
            assert!(links[0] != links[1] || links[0] == NO_LINK, "row {row}: {links:?}");
        }
    }

    #[test]
    fn finds_what_exact_search_finds() {
        let (vectors, graph) = frozen(3000);
        let mut found = 0;
        let queries = queries_near(&vectors, 100, 22);
        for q in &queries {
            let truth: Vec<u32> = exact::top_k(vectors.as_slice(), vectors.dim(), q, 10, None).into_iter().map(|(r, _)| r).collect();
            let hits = graph.search(&vectors, q, 10, 64, None);
            assert_eq!(hits.len(), 10);
            assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1), "best first");
            // The index serves these scores as they are: they must be the exact path's.
            assert!(hits.iter().all(|&(r, score)| score.to_bits() == exact::dot(vectors.row(r as usize), q).to_bits()), "scores are the exact dot");
            found += hits.iter().filter(|(r, _)| truth.contains(r)).count();
        }
        let recall = found as f64 / 1000.0;
        assert!(recall >= 0.98, "recall@10 {recall}");
    }

    #[test]
    fn a_filter_keeps_only_accepted_rows() {
        let (vectors, graph) = frozen(2000);
        let q = &queries_near(&vectors, 1, 23)[0];
        let even = |r: u32| r.is_multiple_of(2);
        let hits = graph.search(&vectors, q, 10, 64, Some(&even));
        assert_eq!(hits.len(), 10);
        assert!(hits.iter().all(|(r, _)| r % 2 == 0));
    }

    #[test]
    fn bytes_round_trip_and_damage_is_refused() {
        let (vectors, graph) = frozen(1500);
        let bytes = graph.to_bytes();
        assert_eq!(FrozenGraph::from_bytes(&bytes, vectors.len()).unwrap(), graph);
        assert!(FrozenGraph::from_bytes(&bytes, vectors.len() + 1).is_err());
        assert!(FrozenGraph::from_bytes(&bytes[..bytes.len() - 4], vectors.len()).is_err());
        assert!(FrozenGraph::from_bytes(&bytes[..bytes.len() - 1], vectors.len()).is_err());
        // A link past the last row, anywhere in the base layer.
        let mut bad = bytes.clone();
        bad[6 * 4 + 40..6 * 4 + 44].copy_from_slice(&(vectors.len() as u32 + 7).to_le_bytes());
        assert!(FrozenGraph::from_bytes(&bad, vectors.len()).unwrap_err().contains("past the last row"));
        let mut extra = bytes;
        extra.extend_from_slice(&[0; 4]);
        assert!(FrozenGraph::from_bytes(&extra, vectors.len()).is_err());
    }
}
