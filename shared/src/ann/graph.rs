//! The HNSW graph over a generation's garments (hnsw_rs), and its dump on disk.
//!
//! The graph is derived data. Each generation's dump has its own file names
//! (`gen-NNNNNNNNNN.hnsw.graph` / `.hnsw.data`, which hnsw_rs rewrites in place) and a side
//! file `gen-NNNNNNNNNN.ann.json` naming the parameters, dimension, the garments it holds
//! (fingerprint) and the blake3 hashes of both files. The side file is written last,
//! atomically, so a crash mid-dump leaves no side file or a side file whose hashes do not
//! match: either way the graph is rebuilt from the store, never trusted. A damaged dump never
//! reaches hnsw_rs's loader, which asserts (panics) on bad input.

use std::fs;
use std::path::{Path, PathBuf};

use hnsw_rs::prelude::*;
use serde::{Deserialize, Serialize};

use super::{AnnParams, GarmentVectors};
use crate::{Error, Result};

/// The graph type: dot-product distance on unit vectors (1 - cosine).
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

/// Format of the side file; bump when its meaning changes.
const SIDE_FILE_FORMAT: u32 = 1;
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
    pub data_blake3: String,
}

/// Builds a graph over every row, inserting in parallel on the current rayon pool.
/// Row numbers are the graph's data ids.
pub fn build(vectors: &GarmentVectors, params: &AnnParams) -> Graph {
    let graph = Hnsw::new(params.m, vectors.len().max(1), MAX_LAYER, params.ef_construction, UnitDot);
    let rows: Vec<(&[f32], usize)> = (0..vectors.len()).map(|r| (vectors.row(r), r)).collect();
    graph.parallel_insert_slice(&rows);
    graph
}

/// File base name of a generation's dump.
pub fn basename(generation: u64) -> String {
    format!("gen-{generation:010}")
}

fn paths(dir: &Path, generation: u64) -> (PathBuf, PathBuf, PathBuf) {
    let base = basename(generation);
    (dir.join(format!("{base}.hnsw.graph")), dir.join(format!("{base}.hnsw.data")), dir.join(format!("{base}.ann.json")))
}

fn hash_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hasher.finalize().to_hex().to_string())
}

fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Dumps `graph` for `generation` into `dir` and writes its side file last.
pub fn dump(graph: &Graph, dir: &Path, generation: u64, vectors: &GarmentVectors, params: &AnnParams) -> Result<SideFile> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (graph_path, data_path, side_path) = paths(dir, generation);
    // The old side file must not outlive the files it describes being rewritten.
    match fs::remove_file(&side_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&side_path, e)),
        _ => {}
    }
    let written = graph.file_dump(dir, &basename(generation)).map_err(|e| Error::AnnDump { path: graph_path.clone(), reason: e.to_string() })?;
    if written != basename(generation) {
        return Err(Error::AnnDump { path: graph_path, reason: format!("hnsw_rs wrote basename {written:?}") });
    }
    sync_file(&graph_path)?;
    sync_file(&data_path)?;
    let side = SideFile {
        format: SIDE_FILE_FORMAT,
        generation,
        dim: vectors.dim(),
        count: vectors.len(),
        m: params.m,
        ef_construction: params.ef_construction,
        fingerprint: vectors.fingerprint(),
        graph_blake3: hash_file(&graph_path)?,
        data_blake3: hash_file(&data_path)?,
    };
    crate::durable::write_atomically(&side_path, &serde_json::to_vec_pretty(&side).expect("side file serialises"))?;
    Ok(side)
}

/// Loads the dump of `generation` when its side file vouches for exactly these `vectors`
/// and `params`; otherwise says why it cannot be used.
pub fn load(dir: &Path, generation: u64, vectors: &GarmentVectors, params: &AnnParams) -> Result<Graph, String> {
    let (graph_path, data_path, side_path) = paths(dir, generation);
    let body = fs::read(&side_path).map_err(|e| format!("no usable side file {}: {e}", side_path.display()))?;
    let side: SideFile = serde_json::from_slice(&body).map_err(|e| format!("side file {} is damaged: {e}", side_path.display()))?;
    let expected = (SIDE_FILE_FORMAT, generation, vectors.dim(), vectors.len(), params.m, params.ef_construction);
    let found = (side.format, side.generation, side.dim, side.count, side.m, side.ef_construction);
    if expected != found {
        return Err(format!("side file says (format, generation, dim, count, m, ef_construction) = {found:?}, expected {expected:?}"));
    }
    if side.fingerprint != vectors.fingerprint() {
        return Err("the dump holds other garments than the store's generation".into());
    }
    for (path, want) in [(&graph_path, &side.graph_blake3), (&data_path, &side.data_blake3)] {
        let got = hash_file(path).map_err(|e| e.to_string())?;
        if &got != want {
            return Err(format!("{} is damaged (blake3 {got}, side file says {want})", path.display()));
        }
    }
    // hnsw_rs's loaded graph borrows its loader; leaking the small loader gives the graph a
    // 'static lifetime (hnswlib-rs issue #19). One loader is leaked per load.
    let io: &'static HnswIo = Box::leak(Box::new(HnswIo::new(dir, &basename(generation))));
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| io.load_hnsw_with_dist::<f32, UnitDot>(UnitDot)))
        .map_err(|_| "hnsw_rs panicked while reading the dump".to_string())?
        .map_err(|e| format!("hnsw_rs could not read the dump: {e}"))?;
    if loaded.get_nb_point() != vectors.len() {
        return Err(format!("the dump holds {} points, expected {}", loaded.get_nb_point(), vectors.len()));
    }
    Ok(loaded)
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
