//! Search over one generation's garments, choosing between the graph and exact scans.

use std::collections::BTreeMap;
use std::path::Path;

use super::exact::top_k;
use super::frozen::FrozenGraph;
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
    graph: Option<FrozenGraph>,
}

impl std::fmt::Debug for GarmentIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GarmentIndex")
            .field("generation", &self.generation)
            .field("garments", &self.vectors.len())
            .field("dim", &self.vectors.dim())
            .field("graph", &self.graph.is_some())
            .finish()
    }
}

impl GarmentIndex {
    /// Builds the index in memory (a graph only from [`AnnParams::exact_below`] garments up).
    pub fn build(generation: u64, vectors: GarmentVectors, params: AnnParams) -> Result<Self> {
        params.validate()?;
        let graph = (vectors.len() >= params.exact_below).then(|| graph::build(&vectors, &params));
        Ok(Self::assemble(generation, vectors, params, graph))
    }

    fn assemble(generation: u64, vectors: GarmentVectors, params: AnnParams, graph: Option<FrozenGraph>) -> Self {
        Self { generation, categories: vectors.rows_by_category(), params, vectors, graph }
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
            return Ok((Self::assemble(generation, vectors, params, None), LoadOutcome::ExactOnly));
        }
        let reason = match dump_dir {
            None => "no dump directory".to_string(),
            Some(dir) => match graph::load(dir, generation, &vectors, &params) {
                Ok(graph) => return Ok((Self::assemble(generation, vectors, params, Some(graph)), LoadOutcome::Loaded)),
                Err(reason) => reason,
            },
        };
        tracing::info!(generation, garments = vectors.len(), %reason, "no usable graph dump; building the ANN graph");
        Ok((Self::build(generation, vectors, params)?, LoadOutcome::Built { reason }))
    }

    /// Dumps the graph (if any) under its generation's name in `dir`.
    pub fn dump(&self, dir: &Path) -> Result<()> {
        if let Some(graph) = &self.graph {
            graph::dump(graph, dir, self.generation, &self.vectors, &self.params)?;
        }
        Ok(())
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

    pub fn has_graph(&self) -> bool {
        self.graph.is_some()
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
        let rows = category.map(|c| self.category_rows(c)).transpose()?;
        let Some(graph) = &self.graph else {
            let path = if rows.is_some() { SearchPath::ExactCategory } else { SearchPath::Exact };
            return Ok((self.exact(&query, k, rows), path));
        };
        let Some(rows) = rows else {
            return Ok((self.hits(graph.search(&self.vectors, &query, k, ef, None), k), SearchPath::Graph));
        };
        if rows.len() <= self.params.filter_exact_max {
            return Ok((self.exact(&query, k, Some(rows)), SearchPath::ExactCategory));
        }
        // A large category: an enlarged result list filtered afterwards holds its nearest
        // garments. Fetching 4×k/selectivity keeps recall@10 ≥ 0.99 at 10% selectivity on
        // clustered data (1.5× gave 0.92; see benches/NOTES.md).
        let wanted_category = self.vectors.category(rows[0] as usize);
        let selectivity = rows.len() as f64 / self.vectors.len() as f64;
        let fetch = ((k as f64 / selectivity * 4.0).ceil() as usize + 10).min(self.vectors.len());
        let of_category = |row: u32| self.vectors.category(row as usize) == wanted_category;
        let found: Vec<(u32, f32)> = graph.search(&self.vectors, &query, fetch, ef.max(fetch), None).into_iter().filter(|&(row, _)| of_category(row)).collect();
        if found.len() >= k.min(rows.len()) {
            return Ok((self.hits(found, k), SearchPath::GraphOverFetch));
        }
        Ok((self.hits(graph.search(&self.vectors, &query, k, ef, Some(&of_category)), k), SearchPath::GraphFiltered))
    }

    /// Exact top-k over all garments (or one category): ground truth for recall.
    pub fn search_exact(&self, query: &[f32], k: usize, category: Option<&str>) -> Result<Vec<SearchHit>> {
        let query = self.prepare(query, k)?;
        let rows = category.map(|c| self.category_rows(c)).transpose()?;
        Ok(self.exact(&query, k, rows))
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

    fn exact(&self, query: &[f32], k: usize, rows: Option<&[u32]>) -> Vec<SearchHit> {
        top_k(self.vectors.as_slice(), self.vectors.dim(), query, k, rows).into_iter().map(|(row, score)| self.hit(row, score)).collect()
    }

    /// The first `k` of a graph search's results (best first, scored with the exact path's
    /// dot product, so scores agree whichever path answered).
    fn hits(&self, found: Vec<(u32, f32)>, k: usize) -> Vec<SearchHit> {
        found.into_iter().take(k).map(|(row, score)| self.hit(row, score)).collect()
    }

    fn hit(&self, row: u32, score: f32) -> SearchHit {
        SearchHit { garment: self.vectors.id(row as usize), row, score }
    }
}
