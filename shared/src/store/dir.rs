//! The layout of a store directory: the one place that knows its parts' names.

use std::path::{Path, PathBuf};

/// A store directory: `catalog/` (sled, the source of truth), `ann/` (graph dumps, derived,
/// safe to delete) and `serving/` (the snapshots a searcher reads, derived: rebuilt from
/// the store by `indexer serving rebuild`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDir {
    root: PathBuf,
}

impl StoreDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sled database.
    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog")
    }

    /// The ANN graph dumps.
    pub fn ann(&self) -> PathBuf {
        self.root.join("ann")
    }

    /// The serving snapshots and the `CURRENT` pointer.
    pub fn serving(&self) -> PathBuf {
        self.root.join("serving")
    }

    /// Whether a store was ever created here.
    pub fn holds_a_store(&self) -> bool {
        self.catalog().is_dir()
    }
}
