//! Serving snapshots: what a searcher needs of one published generation, in one file.
//!
//! Why a file and not the store: sled holds an exclusive lock on its directory, so the
//! searcher cannot open the store the indexer writes (`../shared/STACK-NOTES.md`). After
//! each publish the indexer writes `serving/gen-N.snapshot` (items with their metadata and
//! image paths, garments with boxes, categories and embeddings) and then moves the
//! `serving/CURRENT` pointer to it by an atomic rename. The searcher watches `CURRENT`
//! and swaps generations without a restart. The ANN graph dump of the generation
//! (`ann/gen-N.*`) is written before the snapshot, so a searcher finds it ready.
//!
//! File layout: magic `SLSNAP`, format version (u32 LE), blake3 of the body (32 bytes),
//! body (postcard). A damaged or truncated file is refused, never half-read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ann::{AnnParams, GarmentVectors};
use crate::geometry::BBox;
use crate::store::{CatalogStore, GarmentId, ItemMetadata};
use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"SLSNAP";
/// Bump on any change of [`Snapshot`]'s encoding; older searchers refuse newer files.
/// Format 2 appended [`Snapshot::ann`]; format 1 files are still read (see [`Snapshot::read`]).
pub const SNAPSHOT_FORMAT: u32 = 2;
/// Name of the pointer file inside the serving directory.
pub const CURRENT: &str = "CURRENT";

/// An item as the searcher shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedItem {
    pub metadata: ItemMetadata,
    /// The image file at build time (served by `/v1/items/{sku}/image`).
    pub image_path: PathBuf,
    /// blake3 of the image bytes, hex (an HTTP entity tag).
    pub content_hash: String,
}

/// A garment as the searcher needs it (its embedding lives in the vector block).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedGarment {
    pub id: GarmentId,
    /// Index into [`Snapshot::items`].
    pub item: u32,
    pub bbox: BBox,
    pub category: String,
    pub score: f32,
}

/// One generation, ready to serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub generation: u64,
    pub built_at: Option<String>,
    pub models: BTreeMap<String, String>,
    pub dim: u32,
    pub items: Vec<ServedItem>,
    pub garments: Vec<ServedGarment>,
    /// Row-major embeddings, one row per garment, in [`Snapshot::garments`] order.
    pub embeddings: Vec<f32>,
    /// The parameters the generation's graph dump was built with, so the searcher loads it
    /// rather than rebuild it; `None`: unknown (a generation of store format 1), the defaults.
    pub ann: Option<AnnParams>,
}

impl Snapshot {
    /// The published generation of `store`, from the store alone: a snapshot is derived
    /// data, and rebuilding it gives the same bytes.
    pub fn from_store(store: &CatalogStore) -> Result<Self> {
        let generation = store.published_id()?.ok_or(Error::NoPublishedGeneration)?;
        let all = store.generation_garments(generation)?;
        let mut items = Vec::new();
        let mut item_of_sku: BTreeMap<String, u32> = BTreeMap::new();
        for (sku, rev) in store.generation_members(generation)? {
            let record = store.item(rev)?;
            item_of_sku.insert(sku, items.len() as u32);
            // A revision of store format 1 has no recorded path: its image is not served
            // until the next build records it.
            let image_path = record.image_path.map(PathBuf::from).unwrap_or_default();
            items.push(ServedItem { content_hash: record.content_hash.to_string(), metadata: record.metadata, image_path });
        }
        let mut garments = Vec::with_capacity(all.garments.len());
        let mut embeddings = Vec::with_capacity(all.garments.len() * all.manifest.spec.dim as usize);
        for (id, g) in all.garments {
            let item = *item_of_sku
                .get(&g.sku)
                .ok_or_else(|| Error::GenerationConflict { generation, reason: format!("garment {id} belongs to sku {:?}, which is not a member", g.sku) })?;
            garments.push(ServedGarment { id, item, bbox: g.bbox, category: g.category, score: g.score });
            embeddings.extend_from_slice(&g.embedding);
        }
        let m = all.manifest;
        Ok(Self { generation, built_at: m.built_at, models: m.spec.models, dim: m.spec.dim, items, garments, embeddings, ann: m.ann })
    }

    /// The vectors for [`crate::ann::GarmentIndex`], rows in garment order.
    pub fn vectors(&self) -> Result<GarmentVectors> {
        let dim = self.dim as usize;
        let mut v = GarmentVectors::new(dim);
        for (i, g) in self.garments.iter().enumerate() {
            v.push(g.id, &g.category, &self.embeddings[i * dim..(i + 1) * dim])?;
        }
        Ok(v)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Err(Error::Snapshot { path: path.to_path_buf(), reason });
        if self.embeddings.len() != self.garments.len() * self.dim as usize {
            return bad(format!("{} embedding values for {} garments of {} dimensions", self.embeddings.len(), self.garments.len(), self.dim));
        }
        if let Some(g) = self.garments.iter().find(|g| g.item as usize >= self.items.len()) {
            return bad(format!("garment {} points at item {} of {}", g.id, g.item, self.items.len()));
        }
        Ok(())
    }

    /// Writes `dir/gen-N.snapshot` (temp file, fsync, rename) and returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(file_name(self.generation));
        let body = postcard::to_allocvec(self).map_err(|e| Error::Snapshot { path: path.clone(), reason: e.to_string() })?;
        let mut bytes = Vec::with_capacity(body.len() + 42);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
        bytes.extend_from_slice(blake3::hash(&body).as_bytes());
        bytes.extend_from_slice(&body);
        crate::durable::write_atomically(&path, &bytes)?;
        Ok(path)
    }

    /// Reads and checks a snapshot file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: &str| Error::Snapshot { path: path.to_path_buf(), reason: reason.to_string() };
        if bytes.len() < 42 || &bytes[..6] != MAGIC {
            return Err(bad("not a Shoplens serving snapshot"));
        }
        let format = u32::from_le_bytes(bytes[6..10].try_into().expect("4 bytes"));
        if format == 0 || format > SNAPSHOT_FORMAT {
            return Err(bad(&format!(
                "format {format}; this searcher reads formats 1 to {SNAPSHOT_FORMAT}: run the matching searcher, or `indexer serving rebuild` to rewrite it"
            )));
        }
        let body = &bytes[42..];
        if blake3::hash(body).as_bytes() != &bytes[10..42] {
            return Err(bad("checksum mismatch: the file is damaged or truncated"));
        }
        // postcard writes fields in order with nothing between them, so a format 1 body is a
        // format 2 body without its last field: `ann = None`, encoded as one zero byte.
        let body = if format == 1 { [body, &[0u8][..]].concat() } else { body.to_vec() };
        let snapshot: Snapshot = postcard::from_bytes(&body).map_err(|e| bad(&e.to_string()))?;
        snapshot.check(path)?;
        Ok(snapshot)
    }
}

/// `gen-N.snapshot`.
pub fn file_name(generation: u64) -> String {
    format!("gen-{generation}.snapshot")
}

/// Points `dir/CURRENT` at `generation` (atomic rename: readers see the old or the new).
pub fn set_current(dir: &Path, generation: u64) -> Result<()> {
    crate::durable::write_atomically(&dir.join(CURRENT), format!("{generation}\n").as_bytes())
}

/// Longest `CURRENT` accepted: a generation number and a newline need 21 bytes.
const MAX_CURRENT_BYTES: u64 = 64;

/// The generation `dir/CURRENT` points at, `None` when there is no pointer yet. The read is
/// bounded, and a FIFO or device in its place is refused without blocking: the searcher
/// polls this file forever and must not be stalled or fed gigabytes by it.
pub fn current(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(CURRENT);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
        Ok(_) => {}
    }
    let bytes = crate::catalog::files::read_catalog_file(&path, None, MAX_CURRENT_BYTES).map_err(|reason| Error::Snapshot { path: path.clone(), reason })?;
    let text = String::from_utf8_lossy(&bytes);
    text.trim().parse().map(Some).map_err(|_| Error::Snapshot { path, reason: format!("holds {:?}, not a generation number", text.trim()) })
}

/// Deletes snapshots of generations not in `keep`; returns how many went.
pub fn remove_except(dir: &Path, keep: &[u64]) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_prefix("gen-")).and_then(|n| n.strip_suffix(".snapshot")).and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        if !keep.contains(&id) {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            generation: 7,
            built_at: Some("2026-11-27T00:00:00Z".into()),
            models: BTreeMap::from([("embedder".into(), "e1".into())]),
            dim: 2,
            items: vec![ServedItem {
                metadata: ItemMetadata { sku: "a".into(), image: "a.jpg".into(), ..Default::default() },
                image_path: "/x/a.jpg".into(),
                content_hash: "ab".into(),
            }],
            garments: vec![ServedGarment { id: 3, item: 0, bbox: BBox::new(0.0, 0.0, 1.0, 1.0), category: "top".into(), score: 0.9 }],
            embeddings: vec![0.6, 0.8],
            ann: Some(AnnParams { m: 24, ..AnnParams::default() }),
        }
    }

    #[test]
    fn round_trip_pointer_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(current(dir.path()).unwrap(), None);
        let path = sample().write(dir.path()).unwrap();
        set_current(dir.path(), 7).unwrap();
        assert_eq!(current(dir.path()).unwrap(), Some(7));
        assert_eq!(Snapshot::read(&path).unwrap(), sample());
        assert_eq!(sample().vectors().unwrap().len(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(Snapshot::read(&path).unwrap_err().to_string().contains("checksum"));
        std::fs::write(&path, &bytes[..20]).unwrap();
        assert!(Snapshot::read(&path).is_err());
        std::fs::write(dir.path().join(CURRENT), "x").unwrap();
        assert!(current(dir.path()).is_err());
        assert_eq!(remove_except(dir.path(), &[]).unwrap(), 1);
    }

    #[test]
    fn format_1_files_still_read_with_unknown_ann_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let old = Snapshot { ann: None, ..sample() };
        // A format 1 body is today's body without the trailing `ann = None` byte.
        let mut body = postcard::to_allocvec(&old).unwrap();
        assert_eq!(body.pop(), Some(0));
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(blake3::hash(&body).as_bytes());
        bytes.extend_from_slice(&body);
        let path = dir.path().join(file_name(7));
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Snapshot::read(&path).unwrap(), old);
        bytes[6..10].copy_from_slice(&(SNAPSHOT_FORMAT + 1).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(Snapshot::read(&path).unwrap_err().to_string().contains("reads formats 1 to"));
    }

    #[test]
    fn inconsistent_snapshots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sample();
        s.embeddings.push(1.0);
        let path = s.write(dir.path()).unwrap();
        assert!(Snapshot::read(&path).unwrap_err().to_string().contains("embedding values"));
    }
}
