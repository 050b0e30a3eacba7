//! The garment index: which shop garments lie closest to a query embedding.
//!
//! - [`GarmentVectors`]: one generation's garments as a flat, L2-normalised matrix with
//!   their ids and categories (derived from the store, never the source of truth);
//! - [`exact`]: brute-force top-k over all rows or a subset, parallel with rayon: ground
//!   truth for recall, and the fast path for small catalogs and selective filters;
//! - [`graph`]: the HNSW graph, built in parallel by hnsw_rs and frozen into flat link
//!   arrays ([`frozen`]) for serving, dumped per generation with a side file that names its
//!   parameters and hash; on any mismatch it is rebuilt;
//! - [`backend`]: the seam between the index and the ways of searching it
//!   ([`backend::NeighbourSearch`]: exact scans, the frozen graph; another backend plugs in
//!   there);
//! - [`GarmentIndex`]: search with an optional category filter, through its backend.
//!
//! Scores are cosine similarities (dot products of unit vectors), higher is closer.

pub mod backend;
pub mod exact;
pub mod frozen;
pub mod graph;
mod index;
pub mod synthetic;
mod vectors;

pub use index::{GarmentIndex, LoadOutcome, SearchPath};
pub use vectors::GarmentVectors;

use serde::{Deserialize, Serialize};

use crate::store::GarmentId;
use crate::{Error, Result};

/// Largest `k` a search accepts.
pub const MAX_K: usize = 1000;

/// Tuning of the garment index, with defaults measured in `benches/` (see
/// `../shared/STACK-NOTES.md` §2 for the hnsw_rs figures they rest on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnnParams {
    /// HNSW links per node (M). 16 gave recall 0.998 at ef 32 on clustered 256-d data;
    /// 32 cost 1.6× the build time for no recall gain.
    pub m: usize,
    /// Candidate list size while inserting.
    pub ef_construction: usize,
    /// Candidate list size while searching (raised to k when k is larger).
    pub ef_search: usize,
    /// Below this many garments the whole index is searched exactly and no graph is built:
    /// at 20k the exact scan took 587 µs against 771 µs for the graph at ef 64
    /// (benches/NOTES.md).
    pub exact_below: usize,
    /// A category filter whose category holds at most this many garments is answered by
    /// exact search over that category alone.
    pub filter_exact_max: usize,
}

impl Default for AnnParams {
    fn default() -> Self {
        Self { m: 16, ef_construction: 200, ef_search: 64, exact_below: 10_000, filter_exact_max: 50_000 }
    }
}

impl AnnParams {
    /// Checks the parameters are usable (hnsw_rs exits the process on M > 256).
    pub fn validate(&self) -> Result<()> {
        let bad = |name, reason: &str| Err(Error::InvalidSetting { name, reason: reason.to_string() });
        if !(2..=256).contains(&self.m) {
            return bad("m", "must be between 2 and 256");
        }
        if self.ef_construction == 0 || self.ef_construction > 10_000 {
            return bad("ef_construction", "must be between 1 and 10000");
        }
        if self.ef_search == 0 || self.ef_search > 10_000 {
            return bad("ef_search", "must be between 1 and 10000");
        }
        Ok(())
    }
}

/// One garment found by a search.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SearchHit {
    pub garment: GarmentId,
    /// Row of the garment in [`GarmentVectors`].
    pub row: u32,
    /// Cosine similarity to the query.
    pub score: f32,
}

pub(crate) fn check_k(k: usize) -> Result<()> {
    if k == 0 || k > MAX_K {
        return Err(Error::InvalidK { k, max: MAX_K });
    }
    Ok(())
}

/// Opens the garment index of the store's published generation with the parameters it was
/// built with: its dump when valid, otherwise built from the store (and dumped next to it).
pub fn open_published(store: &crate::store::CatalogStore) -> Result<(GarmentIndex, LoadOutcome)> {
    let manifest = store.published()?.ok_or(Error::NoPublishedGeneration)?;
    let vectors = GarmentVectors::from_generation(&store.generation_garments(manifest.id)?)?;
    GarmentIndex::open(store.ann_dir().as_deref(), manifest.id, vectors, manifest.ann.unwrap_or_default())
}
