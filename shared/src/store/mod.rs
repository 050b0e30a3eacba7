//! The catalog store: shop items, their garments and embeddings, and index generations,
//! on sled.
//!
//! Layout and format version: see `shoplens_migrations::layout`. The rules this module keeps:
//! - item and garment records are immutable once written; a changed item is a new revision;
//! - a generation is the set `generation_items[(gen, sku)] → item revision`, written while
//!   the generation is `Building` and never changed after it is published;
//! - publishing is one transaction that marks the manifest `Published`, the previous one
//!   `Retired`, and moves `meta/published_generation`: readers see the old or the new
//!   generation, never a mixture;
//! - every multi-key change is one sled transaction, and is flushed before it is reported
//!   done.

mod dir;
mod generation;
mod records;

use std::fmt;
use std::path::{Path, PathBuf};

use shoplens_migrations::layout::{self, GARMENTS_TREE, GENERATION_ITEMS_TREE, GENERATIONS_TREE, ITEMS_TREE, META_TREE, PUBLISHED_GENERATION_KEY};
use sled::{Db, Tree};

pub use dir::StoreDir;
pub use generation::{GenerationBuilder, PruneReport};
pub use records::{ContentHash, GarmentId, GarmentRecord, GenerationManifest, GenerationSpec, GenerationState, ItemMetadata, ItemRecord, ItemRev, NewGarment};

use crate::{Error, Result};

/// How many generations [`CatalogStore::prune`] keeps when not told otherwise: the published
/// one and the two before it, so a reader still loading the previous one is never cut short.
pub const DEFAULT_RETAIN: usize = 3;

/// The sled-backed catalog store. One process opens a store at a time (sled's file lock).
///
/// A store directory holds `catalog/` (sled, the source of truth) and `ann/` (graph dumps
/// derived from it, safe to delete).
#[derive(Clone)]
pub struct CatalogStore {
    db: Db,
    path: Option<StoreDir>,
    meta: Tree,
    items: Tree,
    garments: Tree,
    generations: Tree,
    generation_items: Tree,
}

/// All garments of one generation, for building its ANN index.
#[derive(Debug, Clone)]
pub struct GenerationGarments {
    pub manifest: GenerationManifest,
    pub garments: Vec<(GarmentId, GarmentRecord)>,
}

/// Displays a u64 key in error messages.
struct IdKey(u64);
impl fmt::Display for IdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How long an open waits for the store's file lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens sled at `path`, waiting up to [`LOCK_WAIT`] for its exclusive file lock. A store
/// closed a moment ago may still be locked: sled's flusher thread holds the database until
/// its next wake-up (every 500 ms), so a reopen right after a close (a test, a script that
/// runs two builds back to back) failed with "could not acquire lock". Another process
/// holding the store still fails, after the wait.
fn open_waiting_for_the_lock(path: &Path) -> sled::Result<Db> {
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new().path(path).mode(sled::Mode::LowSpace).open() {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") && started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

impl CatalogStore {
    /// Opens (or creates) the store in directory `dir`, upgrading an older format.
    ///
    /// Fails with [`Error::StoreFormat`] on a store written by a newer Shoplens.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = StoreDir::new(dir.as_ref());
        let path = dir.catalog();
        let db = open_waiting_for_the_lock(&path).map_err(|e| match e {
            sled::Error::Io(source) => Error::io(&path, source),
            other => Error::Storage(other),
        })?;
        Self::from_db(db, Some(dir))
    }

    /// A store in memory that disappears when dropped (tests, benchmarks).
    pub fn open_temporary() -> Result<Self> {
        let db = sled::Config::new().temporary(true).open()?;
        Self::from_db(db, None)
    }

    fn from_db(db: Db, path: Option<StoreDir>) -> Result<Self> {
        let report = shoplens_migrations::upgrade(&db)?;
        if !report.applied.is_empty() {
            tracing::info!(from = ?report.found, to = report.version, steps = ?report.applied, "store upgraded");
        }
        Ok(Self {
            meta: db.open_tree(META_TREE)?,
            items: db.open_tree(ITEMS_TREE)?,
            garments: db.open_tree(GARMENTS_TREE)?,
            generations: db.open_tree(GENERATIONS_TREE)?,
            generation_items: db.open_tree(GENERATION_ITEMS_TREE)?,
            db,
            path,
        })
    }

    /// The store's directory; `None` for a temporary store.
    pub fn dir(&self) -> Option<&StoreDir> {
        self.path.as_ref()
    }

    /// Where the ANN graph dumps of this store go; `None` for a temporary store.
    pub fn ann_dir(&self) -> Option<PathBuf> {
        self.path.as_ref().map(StoreDir::ann)
    }

    /// Where the serving snapshots of this store go (read by the searcher); `None` for a
    /// temporary store.
    pub fn serving_dir(&self) -> Option<PathBuf> {
        self.path.as_ref().map(StoreDir::serving)
    }

    /// The store's format version (always the current one once opened).
    pub fn format_version(&self) -> Result<u32> {
        Ok(shoplens_migrations::read_version(&self.db)?.unwrap_or(shoplens_migrations::CURRENT_VERSION))
    }

    /// Makes every acknowledged write durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    /// The id of the generation readers see, if any was published.
    pub fn published_id(&self) -> Result<Option<u64>> {
        match self.meta.get(PUBLISHED_GENERATION_KEY)? {
            None => Ok(None),
            Some(bytes) => layout::decode_id(&bytes).map(Some).ok_or_else(|| Error::CorruptRecord {
                tree: META_TREE,
                key: "published_generation".into(),
                reason: format!("{} bytes, expected 8", bytes.len()),
            }),
        }
    }

    /// The published generation's manifest, if any.
    pub fn published(&self) -> Result<Option<GenerationManifest>> {
        match self.published_id()? {
            None => Ok(None),
            Some(id) => {
                let manifest = self.generation(id)?.ok_or_else(|| Error::CorruptRecord {
                    tree: META_TREE,
                    key: "published_generation".into(),
                    reason: format!("names generation {id}, which has no manifest"),
                })?;
                Ok(Some(manifest))
            }
        }
    }

    /// One generation's manifest.
    pub fn generation(&self, id: u64) -> Result<Option<GenerationManifest>> {
        self.generations.get(layout::id_key(id))?.map(|bytes| records::decode(GENERATIONS_TREE, &IdKey(id), &bytes)).transpose()
    }

    /// Every generation's manifest, oldest first.
    pub fn generations(&self) -> Result<Vec<GenerationManifest>> {
        self.generations
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                let id = layout::decode_id(&key).ok_or_else(|| Error::CorruptRecord { tree: GENERATIONS_TREE, key: format!("{key:?}"), reason: "key is not 8 bytes".into() })?;
                records::decode(GENERATIONS_TREE, &IdKey(id), &value)
            })
            .collect()
    }

    /// The (sku, item revision) members of a generation, in sku byte order.
    pub fn generation_members(&self, generation: u64) -> Result<Vec<(String, ItemRev)>> {
        self.generation_items
            .scan_prefix(layout::id_key(generation))
            .map(|entry| {
                let (key, value) = entry?;
                decode_member(&key, &value)
            })
            .collect()
    }

    /// The item revision `rev`.
    pub fn item(&self, rev: ItemRev) -> Result<ItemRecord> {
        let bytes = self.items.get(layout::id_key(rev))?.ok_or_else(|| Error::CorruptRecord { tree: ITEMS_TREE, key: rev.to_string(), reason: "referenced but missing".into() })?;
        records::decode(ITEMS_TREE, &IdKey(rev), &bytes)
    }

    /// The item `sku` as the given generation holds it.
    pub fn item_in_generation(&self, generation: u64, sku: &str) -> Result<Option<(ItemRev, ItemRecord)>> {
        let key = layout::generation_item_key(generation, sku);
        let Some(value) = self.generation_items.get(&key)? else {
            return Ok(None);
        };
        let (_, rev) = decode_member(&key, &value)?;
        Ok(Some((rev, self.item(rev)?)))
    }

    /// The item `sku` of the published generation.
    pub fn published_item(&self, sku: &str) -> Result<(ItemRev, ItemRecord)> {
        let generation = self.published_id()?.ok_or(Error::NoPublishedGeneration)?;
        self.item_in_generation(generation, sku)?.ok_or_else(|| Error::NotFound { what: "item", id: sku.to_string() })
    }

    /// The garment `id`.
    pub fn garment(&self, id: GarmentId) -> Result<GarmentRecord> {
        let bytes =
            self.garments.get(layout::id_key(id))?.ok_or_else(|| Error::CorruptRecord { tree: GARMENTS_TREE, key: id.to_string(), reason: "referenced but missing".into() })?;
        records::decode(GARMENTS_TREE, &IdKey(id), &bytes)
    }

    /// Every garment of a generation, each checked against the generation's dimension,
    /// in (sku, garment) order.
    pub fn generation_garments(&self, generation: u64) -> Result<GenerationGarments> {
        let manifest = self.generation(generation)?.ok_or_else(|| Error::NotFound { what: "generation", id: generation.to_string() })?;
        let dim = manifest.spec.dim as usize;
        let mut garments = Vec::new();
        for (sku, rev) in self.generation_members(generation)? {
            let item = self.item(rev)?;
            if item.metadata.sku != sku {
                return Err(Error::CorruptRecord {
                    tree: ITEMS_TREE,
                    key: rev.to_string(),
                    reason: format!("holds sku {:?} but generation {generation} files it under {sku:?}", item.metadata.sku),
                });
            }
            for &id in &item.garments {
                let garment = self.garment(id)?;
                if garment.embedding.len() != dim {
                    return Err(Error::CorruptRecord {
                        tree: GARMENTS_TREE,
                        key: id.to_string(),
                        reason: format!("embedding has {} values, generation {generation} holds {dim}-d embeddings", garment.embedding.len()),
                    });
                }
                garments.push((id, garment));
            }
        }
        Ok(GenerationGarments { manifest, garments })
    }

    /// Raw access for tests that plant damaged records.
    #[cfg(test)]
    pub(crate) fn raw_tree(&self, name: &str) -> &Tree {
        match name {
            META_TREE => &self.meta,
            ITEMS_TREE => &self.items,
            GARMENTS_TREE => &self.garments,
            GENERATIONS_TREE => &self.generations,
            GENERATION_ITEMS_TREE => &self.generation_items,
            other => panic!("no tree {other}"),
        }
    }
}

fn decode_member(key: &[u8], value: &[u8]) -> Result<(String, ItemRev)> {
    let corrupt = |reason: &str| Error::CorruptRecord { tree: GENERATION_ITEMS_TREE, key: String::from_utf8_lossy(key).into_owned(), reason: reason.to_string() };
    let (_, sku) = layout::decode_generation_item_key(key).ok_or_else(|| corrupt("key is not generation ++ utf-8 sku"))?;
    let rev = layout::decode_id(value).ok_or_else(|| corrupt("value is not an 8-byte item revision"))?;
    Ok((sku.to_string(), rev))
}

/// Now, as RFC 3339 UTC.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| "unknown".to_string())
}

#[cfg(test)]
mod tests;
