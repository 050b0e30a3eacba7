//! The HNSW graph over a generation's garments: built by hnsw_rs, served frozen
//! ([`FrozenGraph`]), and dumped on disk in the frozen form.
//!
//! The graph is derived data. Each generation's dump has its own file
//! (`gen-NNNNNNNNNN.graph`, written atomically) and a side file `gen-NNNNNNNNNN.ann.json`
//! naming the parameters, dimension, the garments it holds (fingerprint) and the blake3 hash
//! of the graph file. The side file is written last, atomically, so a crash mid-dump leaves
//! no side file or a side file whose hash does not match: either way the graph is rebuilt
//! from the store, never trusted. The frozen reader checks every field as well, so even a
//! file that matches its hash by design cannot make a search index out of bounds.

use std::fs;
use std::path::{Path, PathBuf};

use hnsw_rs::prelude::*;
use serde::{Deserialize, Serialize};

use super::frozen::FrozenGraph;
use super::{AnnParams, GarmentVectors};
use crate::{Error, Result};

/// hnsw_rs's graph type while building: dot-product distance on unit vectors (1 - cosine).
pub type Graph = Hnsw<'static, f32, UnitDot>;

/// `1 - a·b` for unit vectors, clamped at 0.
///
/// Our own rather than hnsw_rs's `DistDot`: that one asserts `dot <= 1.000002` and panics
/// when rounding (or an unnormalised vector) goes past it, which a server must never do.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnitDot;

impl Distance<f32> for UnitDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - super::exact::dot(a, b)).max(0.0)
    }
}

/// Format of the side file; bump when its meaning changes. 2: the dump is one frozen
/// graph file (format 1 named hnsw_rs's two dump files, which are rebuilt, not read).
const SIDE_FILE_FORMAT: u32 = 2;
/// hnsw_rs's own layer cap.
const MAX_LAYER: usize = 16;

/// What the side file promises about a dump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideFile {
    pub format: u32,
    pub generation: u64,
    pub dim: usize,
    pub count: usize,
    pub m: usize,
    pub ef_construction: usize,
    /// [`GarmentVectors::fingerprint`] of the vectors the graph was built from.
    pub fingerprint: String,
    pub graph_blake3: String,
}

/// Builds hnsw_rs's graph over every row, inserting in parallel on the current rayon pool.
/// Row numbers are the graph's data ids.
pub fn build_hnsw(vectors: &GarmentVectors, params: &AnnParams) -> Graph {
    let graph = Hnsw::new(params.m, vectors.len().max(1), MAX_LAYER, params.ef_construction, UnitDot);
    let rows: Vec<(&[f32], usize)> = (0..vectors.len()).map(|r| (vectors.row(r), r)).collect();
    graph.parallel_insert_slice(&rows);
    graph
}

/// Builds the graph with hnsw_rs and freezes it; hnsw_rs's own structure is dropped.
pub fn build(vectors: &GarmentVectors, params: &AnnParams) -> FrozenGraph {
    FrozenGraph::freeze(&build_hnsw(vectors, params), vectors)
}

/// File base name of a generation's dump.
pub fn basename(generation: u64) -> String {
    format!("gen-{generation:010}")
}

fn paths(dir: &Path, generation: u64) -> (PathBuf, PathBuf) {
    let base = basename(generation);
    (dir.join(format!("{base}.graph")), dir.join(format!("{base}.ann.json")))
}

/// Dumps `graph` for `generation` into `dir` and writes its side file last.
pub fn dump(graph: &FrozenGraph, dir: &Path, generation: u64, vectors: &GarmentVectors, params: &AnnParams) -> Result<SideFile> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (graph_path, side_path) = paths(dir, generation);
    // The old side file must not outlive the file it describes being rewritten.
    match fs::remove_file(&side_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&side_path, e)),
        _ => {}
    }
    let bytes = graph.to_bytes();
    crate::durable::write_atomically(&graph_path, &bytes)?;
    let side = SideFile {
        format: SIDE_FILE_FORMAT,
        generation,
        dim: vectors.dim(),
        count: vectors.len(),
        m: params.m,
        ef_construction: params.ef_construction,
        fingerprint: vectors.fingerprint(),
        graph_blake3: blake3::hash(&bytes).to_hex().to_string(),
    };
    crate::durable::write_atomically(&side_path, &serde_json::to_vec_pretty(&side).expect("side file serialises"))?;
    Ok(side)
}

/// Loads the dump of `generation` when its side file vouches for exactly these `vectors`
/// and `params`; otherwise says why it cannot be used.
pub fn load(dir: &Path, generation: u64, vectors: &GarmentVectors, params: &AnnParams) -> Result<FrozenGraph, String> {
    let (graph_path, side_path) = paths(dir, generation);
    let body = fs::read(&side_path).map_err(|e| format!("no usable side file {}: {e}", side_path.display()))?;
    let side: SideFile = serde_json::from_slice(&body).map_err(|e| format!("side file {} is damaged or of another format: {e}", side_path.display()))?;
    let expected = (SIDE_FILE_FORMAT, generation, vectors.dim(), vectors.len(), params.m, params.ef_construction);
    let found = (side.format, side.generation, side.dim, side.count, side.m, side.ef_construction);
    if expected != found {
        return Err(format!("side file says (format, generation, dim, count, m, ef_construction) = {found:?}, expected {expected:?}"));
    }
    if side.fingerprint != vectors.fingerprint() {
        return Err("the dump holds other garments than the store's generation".into());
    }
    let bytes = fs::read(&graph_path).map_err(|e| format!("{}: {e}", graph_path.display()))?;
    let got = blake3::hash(&bytes).to_hex().to_string();
    if got != side.graph_blake3 {
        return Err(format!("{} is damaged (blake3 {got}, side file says {})", graph_path.display(), side.graph_blake3));
    }
    FrozenGraph::from_bytes(&bytes, vectors.len()).map_err(|e| format!("{} is damaged: {e}", graph_path.display()))
}

/// Deletes the dumps of generations not in `keep`; returns how many generations' files went.
pub fn remove_dumps_except(dir: &Path, keep: &[u64]) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut removed = std::collections::BTreeSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(generation) = name.strip_prefix("gen-").and_then(|rest| rest.get(..10)).and_then(|digits| digits.parse::<u64>().ok()) else {
            continue;
        };
        if !keep.contains(&generation) {
            fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            removed.insert(generation);
        }
    }
    Ok(removed.len())
}
