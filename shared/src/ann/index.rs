//! Search over one generation's garments: what every backend shares (query checks, the
//! category table, hits), the rows from the backend behind the seam ([`super::backend`]).

use std::collections::BTreeMap;
use std::path::Path;

use super::backend::{ExactScan, GraphSearch, NeighbourSearch, Request};
use super::graph;
use super::vectors::normalise;
use super::{AnnParams, GarmentVectors, SearchHit, check_k};
use crate::{Error, Result};

/// How [`GarmentIndex::open`] got its graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Small index: exact search only, no graph.
    ExactOnly,
    /// The dump on disk was valid and loaded.
    Loaded,
    /// The graph was built from the store (and dumped when a directory was given).
    Built { reason: String },
}

/// Which path answered a search (for metrics and benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchPath {
    /// Brute force over all garments.
    Exact,
    /// Brute force over one category's garments.
    ExactCategory,
    /// The HNSW graph, unfiltered.
    Graph,
    /// The graph with an enlarged result list, filtered afterwards.
    GraphOverFetch,
    /// The graph walked with the filter applied to its results (the slow fallback).
    GraphFiltered,
}

/// One generation's garment index.
pub struct GarmentIndex {
    generation: u64,
    params: AnnParams,
    vectors: GarmentVectors,
    categories: BTreeMap<String, Vec<u32>>,
    backend: Box<dyn NeighbourSearch>,
}

impl std::fmt::Debug for GarmentIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GarmentIndex")
            .field("generation", &self.generation)
            .field("garments", &self.vectors.len())
            .field("dim", &self.vectors.dim())
            .field("approximate", &self.backend.approximate())
            .finish()
    }
}

impl GarmentIndex {
    /// Builds the index in memory (a graph only from [`AnnParams::exact_below`] garments up).
    pub fn build(generation: u64, vectors: GarmentVectors, params: AnnParams) -> Result<Self> {
        params.validate()?;
        let backend: Box<dyn NeighbourSearch> =
            if vectors.len() >= params.exact_below { Box::new(GraphSearch::new(graph::build(&vectors, &params), &params)) } else { Box::new(ExactScan) };
        Ok(Self::assemble(generation, vectors, params, backend))
    }

    /// An index searched through `backend`: the one place another way of searching (an
    /// external vector database) plugs in.
    pub fn with_backend(generation: u64, vectors: GarmentVectors, params: AnnParams, backend: Box<dyn NeighbourSearch>) -> Result<Self> {
        params.validate()?;
        Ok(Self::assemble(generation, vectors, params, backend))
    }

    fn assemble(generation: u64, vectors: GarmentVectors, params: AnnParams, backend: Box<dyn NeighbourSearch>) -> Self {
        Self { generation, categories: vectors.rows_by_category(), params, vectors, backend }
    }

    /// Loads the generation's graph from `dump_dir` when its dump is valid for these vectors
    /// and parameters; otherwise builds it and (with a directory) dumps it.
    pub fn open(dump_dir: Option<&Path>, generation: u64, vectors: GarmentVectors, params: AnnParams) -> Result<(Self, LoadOutcome)> {
        let (index, outcome) = Self::open_read_only(dump_dir, generation, vectors, params)?;
        if let (LoadOutcome::Built { .. }, Some(dir)) = (&outcome, dump_dir) {
            index.dump(dir)?;
        }
        Ok((index, outcome))
    }

    /// Like [`Self::open`] but never writes: a reader (the searcher) loads the dump the
    /// indexer wrote, or builds the graph in memory when it is missing or stale.
    pub fn open_read_only(dump_dir: Option<&Path>, generation: u64, vectors: GarmentVectors, params: AnnParams) -> Result<(Self, LoadOutcome)> {
        params.validate()?;
        if vectors.len() < params.exact_below {
            return Ok((Self::assemble(generation, vectors, params, Box::new(ExactScan)), LoadOutcome::ExactOnly));
        }
        let reason = match dump_dir {
            None => "no dump directory".to_string(),
            Some(dir) => match graph::load(dir, generation, &vectors, &params) {
                Ok(graph) => {
                    let backend = Box::new(GraphSearch::new(graph, &params));
                    return Ok((Self::assemble(generation, vectors, params, backend), LoadOutcome::Loaded));
                }
                Err(reason) => reason,
            },
        };
        tracing::info!(generation, garments = vectors.len(), %reason, "no usable graph dump; building the ANN graph");
        Ok((Self::build(generation, vectors, params)?, LoadOutcome::Built { reason }))
    }

    /// Dumps what the backend derived (the graph, if any) under its generation's name in `dir`.
    pub fn dump(&self, dir: &Path) -> Result<()> {
        self.backend.dump(dir, self.generation, &self.vectors, &self.params)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.vectors.dim()
    }

    pub fn params(&self) -> &AnnParams {
        &self.params
    }

    /// Whether an approximate backend (the graph) answers, rather than exact scans.
    pub fn has_graph(&self) -> bool {
        self.backend.approximate()
    }

    pub fn vectors(&self) -> &GarmentVectors {
        &self.vectors
    }

    /// Category names with their garment counts.
    pub fn categories(&self) -> impl Iterator<Item = (&str, usize)> {
        self.categories.iter().map(|(name, rows)| (name.as_str(), rows.len()))
    }

    /// The `k` garments closest to `query`, of `category` only when given.
    pub fn search(&self, query: &[f32], k: usize, category: Option<&str>) -> Result<Vec<SearchHit>> {
        Ok(self.search_with(query, k, category, None)?.0)
    }

    /// [`search`](Self::search) with an explicit `ef`, reporting the path taken.
    pub fn search_with(&self, query: &[f32], k: usize, category: Option<&str>, ef: Option<usize>) -> Result<(Vec<SearchHit>, SearchPath)> {
        let query = self.prepare(query, k)?;
        let ef = ef.unwrap_or(self.params.ef_search).max(k);
        let category = category.map(|c| self.category_rows(c)).transpose()?;
        let (found, path) = self.backend.search(&self.vectors, &Request { query: &query, k, ef, category });
        Ok((self.hits(found, k), path))
    }

    /// Exact top-k over all garments (or one category): ground truth for recall.
    pub fn search_exact(&self, query: &[f32], k: usize, category: Option<&str>) -> Result<Vec<SearchHit>> {
        let query = self.prepare(query, k)?;
        let category = category.map(|c| self.category_rows(c)).transpose()?;
        Ok(self.hits(ExactScan.search(&self.vectors, &Request { query: &query, k, ef: k, category }).0, k))
    }

    fn prepare(&self, query: &[f32], k: usize) -> Result<Vec<f32>> {
        check_k(k)?;
        if query.len() != self.vectors.dim() {
            return Err(Error::DimensionMismatch { expected: self.vectors.dim(), found: query.len() });
        }
        let mut query = query.to_vec();
        normalise(&mut query).ok_or_else(|| Error::InvalidVector { what: "query".into(), reason: "zero length or not finite".into() })?;
        Ok(query)
    }

    fn category_rows(&self, category: &str) -> Result<&[u32]> {
        self.categories.get(category).map(Vec::as_slice).ok_or_else(|| Error::UnknownCategory(category.to_string()))
    }

    /// The first `k` of a backend's rows as hits. A row the vectors do not hold is dropped,
    /// not indexed: a plugged-in backend that breaks its contract must not panic a server.
    fn hits(&self, found: Vec<(u32, f32)>, k: usize) -> Vec<SearchHit> {
        found
            .into_iter()
            .filter(|&(row, _)| (row as usize) < self.vectors.len())
            .take(k)
            .map(|(row, score)| SearchHit { garment: self.vectors.id(row as usize), row, score })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ann::SearchPath;
    use crate::ann::synthetic::{clustered, queries_near};

    /// A backend that answers every search with the last rows, whatever the query.
    struct LastRow;

    impl NeighbourSearch for LastRow {
        fn search(&self, vectors: &GarmentVectors, _request: &Request<'_>) -> (Vec<(u32, f32)>, SearchPath) {
            let last = vectors.len() as u32 - 1;
            // Breaks the contract twice: a row past the end, and more than k rows.
            (vec![(last + 1, 0.9), (last, 0.5), (last - 1, 0.4), (last - 2, 0.3)], SearchPath::Graph)
        }

        fn dump(&self, _dir: &Path, _generation: u64, _vectors: &GarmentVectors, _params: &AnnParams) -> Result<()> {
            Ok(())
        }

        fn approximate(&self) -> bool {
            true
        }
    }

    #[test]
    fn searches_go_through_the_backend_and_exact_searches_do_not() {
        let vectors = clustered(200, 16, 4, 2, 7);
        let last = vectors.id(199);
        let query = queries_near(&vectors, 1, 8).remove(0);
        let index = GarmentIndex::with_backend(1, vectors, AnnParams::default(), Box::new(LastRow)).unwrap();
        let (hits, path) = index.search_with(&query, 2, None, None).unwrap();
        assert_eq!((hits.len(), hits[0].garment, hits[0].row, path), (2, last, 199, SearchPath::Graph), "a row past the end is dropped, the rest cut at k");
        assert!(index.has_graph());
        let exact = index.search_exact(&query, 10, None).unwrap();
        assert_eq!(exact.len(), 10, "the exact path is the ground truth, never the backend");
    }
}
