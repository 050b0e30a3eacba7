//! Writing, publishing and pruning index generations.

use std::collections::HashSet;

use shoplens_migrations::layout::{self, GARMENTS_TREE, GENERATIONS_TREE, ITEMS_TREE, PUBLISHED_GENERATION_KEY};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::records::{self, encode};
use super::{CatalogStore, ContentHash, GarmentRecord, GenerationManifest, GenerationSpec, GenerationState, IdKey, ItemMetadata, ItemRecord, ItemRev, NewGarment, now_rfc3339};
use crate::ann::AnnParams;
use crate::{Error, Result};

/// Writes one generation. Nothing it writes is visible to readers until [`publish`].
///
/// A build killed mid-way leaves its generation `Building`; the next
/// [`CatalogStore::begin_generation`] with the same spec resumes it, so the items already
/// written need not be embedded again.
///
/// [`publish`]: GenerationBuilder::publish
pub struct GenerationBuilder {
    store: CatalogStore,
    manifest: GenerationManifest,
    resumed: bool,
}

/// What [`CatalogStore::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub generations: Vec<u64>,
    pub items: u64,
    pub garments: u64,
}

fn abort_to_error(e: TransactionError<Error>) -> Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => Error::Storage(e),
    }
}

impl CatalogStore {
    /// Starts a generation for `spec`, or resumes the one a killed build left behind.
    ///
    /// A leftover `Building` generation with another spec (a model changed since) is
    /// discarded: its items would have to be embedded again anyway.
    pub fn begin_generation(&self, spec: GenerationSpec) -> Result<GenerationBuilder> {
        if spec.dim == 0 {
            return Err(Error::InvalidSetting { name: "dim", reason: "a generation's embeddings need at least one value".into() });
        }
        let all = self.generations()?;
        if let Some(leftover) = all.iter().find(|g| g.state == GenerationState::Building) {
            if leftover.spec == spec {
                tracing::info!(generation = leftover.id, "resuming an unfinished build");
                return Ok(GenerationBuilder { store: self.clone(), manifest: leftover.clone(), resumed: true });
            }
            tracing::info!(generation = leftover.id, "discarding an unfinished build made with other models");
            self.mark_removing(leftover.id)?;
        }
        let id = all.iter().map(|g| g.id).max().unwrap_or(0) + 1;
        let manifest =
            GenerationManifest { id, state: GenerationState::Building, spec, started_at: now_rfc3339(), built_at: None, items: 0, garments: 0, ann: None, catalogs: Vec::new() };
        let bytes = encode(GENERATIONS_TREE, &IdKey(id), &manifest)?;
        self.generations.insert(layout::id_key(id), bytes)?;
        self.flush()?;
        Ok(GenerationBuilder { store: self.clone(), manifest, resumed: false })
    }

    fn mark_removing(&self, id: u64) -> Result<()> {
        let Some(mut manifest) = self.generation(id)? else {
            return Ok(());
        };
        if manifest.state == GenerationState::Published {
            return Err(Error::GenerationConflict { generation: id, reason: "the published generation cannot be removed".into() });
        }
        manifest.state = GenerationState::Removing;
        let bytes = encode(GENERATIONS_TREE, &IdKey(id), &manifest)?;
        self.generations.insert(layout::id_key(id), bytes)?;
        Ok(())
    }

    /// Removes generations beyond the newest `retain` published or retired ones (the
    /// published one is always kept, and so is a build in progress), then every item
    /// revision and garment no kept generation references.
    ///
    /// Each step is crash-safe: a generation is first marked `Removing` (invisible to
    /// readers), its members deleted in batches, its manifest last; an item revision goes
    /// together with its garments in one transaction.
    pub fn prune(&self, retain: usize) -> Result<PruneReport> {
        if retain == 0 {
            return Err(Error::InvalidSetting { name: "retain", reason: "at least the published generation must be kept".into() });
        }
        let published = self.published_id()?;
        let mut report = PruneReport::default();
        // The published generation always stays; `retain - 1` slots go to the newest
        // retired ones.
        let mut retired_slots = retain - 1;
        for g in self.generations()?.iter().rev() {
            let keep = match g.state {
                GenerationState::Building => true,
                GenerationState::Removing => false,
                GenerationState::Published if Some(g.id) == published => true,
                GenerationState::Published | GenerationState::Retired => {
                    let keep = retired_slots > 0;
                    retired_slots = retired_slots.saturating_sub(1);
                    keep
                }
            };
            if !keep {
                self.mark_removing(g.id)?;
                self.remove_generation_members(g.id)?;
                self.generations.remove(layout::id_key(g.id))?;
                report.generations.push(g.id);
            }
        }
        self.flush()?;

        let mut live: HashSet<ItemRev> = HashSet::new();
        for entry in self.generation_items.iter() {
            let (_, value) = entry?;
            if let Some(rev) = layout::decode_id(&value) {
                live.insert(rev);
            }
        }
        let dead: Vec<ItemRev> = self.items.iter().keys().filter_map(|k| k.ok().and_then(|k| layout::decode_id(&k))).filter(|rev| !live.contains(rev)).collect();
        for rev in dead {
            // A damaged record is removed all the same; its garments stay as orphans
            // rather than block the prune.
            let garments = self.item(rev).map(|item| item.garments).unwrap_or_default();
            (&self.items, &self.garments)
                .transaction(|(items, garment_tree)| {
                    items.remove(&layout::id_key(rev))?;
                    for id in &garments {
                        garment_tree.remove(&layout::id_key(*id))?;
                    }
                    Ok(())
                })
                .map_err(|e: TransactionError<Error>| abort_to_error(e))?;
            report.items += 1;
            report.garments += garments.len() as u64;
        }
        self.flush()?;
        Ok(report)
    }

    fn remove_generation_members(&self, generation: u64) -> Result<()> {
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for key in self.generation_items.scan_prefix(layout::id_key(generation)).keys().take(10_000) {
                batch.remove(key?);
                n += 1;
            }
            if n == 0 {
                return Ok(());
            }
            self.generation_items.apply_batch(batch)?;
        }
    }
}

impl GenerationBuilder {
    /// Makes everything written so far durable: a build killed later resumes from here.
    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    /// The generation being written.
    pub fn id(&self) -> u64 {
        self.manifest.id
    }

    pub fn spec(&self) -> &GenerationSpec {
        &self.manifest.spec
    }

    /// True when this build continues one that was interrupted.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The item `sku` as this generation holds it so far (a resumed build skips it).
    pub fn member(&self, sku: &str) -> Result<Option<(ItemRev, ItemRecord)>> {
        self.store.item_in_generation(self.id(), sku)
    }

    /// The (sku, revision) members written so far.
    pub fn members(&self) -> Result<Vec<(String, ItemRev)>> {
        self.store.generation_members(self.id())
    }

    /// Writes a new revision of an item with its garments and files it under this
    /// generation, all in one transaction. Replaces an earlier member with the same sku.
    pub fn put_item(&self, metadata: ItemMetadata, content_hash: ContentHash, garments: Vec<NewGarment>) -> Result<ItemRev> {
        self.put_item_with_image(metadata, content_hash, None, garments)
    }

    /// [`put_item`](Self::put_item), recording the image file the item was read from.
    pub fn put_item_with_image(&self, metadata: ItemMetadata, content_hash: ContentHash, image_path: Option<String>, garments: Vec<NewGarment>) -> Result<ItemRev> {
        let dim = self.manifest.spec.dim as usize;
        for g in &garments {
            if g.embedding.len() != dim {
                return Err(Error::DimensionMismatch { expected: dim, found: g.embedding.len() });
            }
            if !g.embedding.iter().all(|v| v.is_finite()) {
                return Err(Error::InvalidVector { what: format!("of a garment of sku {:?}", metadata.sku), reason: "holds a value that is not finite".into() });
            }
        }
        let rev = self.store.db.generate_id()?;
        let ids: Vec<u64> = garments.iter().map(|_| self.store.db.generate_id()).collect::<Result<_, _>>()?;
        let embedder = self.manifest.spec.models.get("embedder").cloned().unwrap_or_default();
        let mut garment_values = Vec::with_capacity(garments.len());
        for (id, g) in ids.iter().zip(garments) {
            let record = GarmentRecord {
                item_rev: rev,
                sku: metadata.sku.clone(),
                bbox: g.bbox,
                category: g.category,
                score: g.score,
                model_version: embedder.clone(),
                embedding: g.embedding,
            };
            garment_values.push((layout::id_key(*id), encode(GARMENTS_TREE, &IdKey(*id), &record)?));
        }
        let member_key = layout::generation_item_key(self.id(), &metadata.sku);
        let item = ItemRecord { metadata, content_hash, models: self.manifest.spec.models.clone(), dim: dim as u32, garments: ids, image_path };
        let item_value = encode(ITEMS_TREE, &IdKey(rev), &item)?;
        (&self.store.items, &self.store.garments, &self.store.generation_items)
            .transaction(|(items, garment_tree, members)| {
                items.insert(&layout::id_key(rev), item_value.as_slice())?;
                for (key, value) in &garment_values {
                    garment_tree.insert(key, value.as_slice())?;
                }
                members.insert(member_key.as_slice(), &layout::id_key(rev))?;
                Ok(())
            })
            .map_err(|e: TransactionError<Error>| abort_to_error(e))?;
        Ok(rev)
    }

    /// Files an unchanged item revision from an earlier generation under this one, without
    /// re-embedding it. Refused when its embeddings do not fit this generation.
    pub fn carry_item(&self, sku: &str, rev: ItemRev) -> Result<()> {
        let item = self.store.item(rev)?;
        if item.metadata.sku != sku {
            return Err(Error::GenerationConflict { generation: self.id(), reason: format!("item revision {rev} holds sku {:?}, not {sku:?}", item.metadata.sku) });
        }
        if item.dim != self.manifest.spec.dim {
            return Err(Error::GenerationConflict {
                generation: self.id(),
                reason: format!("item {sku:?} has {}-d embeddings, this generation holds {}-d", item.dim, self.manifest.spec.dim),
            });
        }
        self.store.generation_items.insert(layout::generation_item_key(self.id(), sku), &layout::id_key(rev))?;
        Ok(())
    }

    /// Drops `sku` from this generation (an item deleted from the catalog while a resumed
    /// build was down).
    pub fn remove_item(&self, sku: &str) -> Result<()> {
        self.store.generation_items.remove(layout::generation_item_key(self.id(), sku))?;
        Ok(())
    }

    /// Records how the generation's graph is built and what it was built from; written
    /// with the manifest on [`publish`](Self::publish).
    pub fn describe(&mut self, ann: AnnParams, catalogs: Vec<String>) {
        self.manifest.ann = Some(ann);
        self.manifest.catalogs = catalogs;
    }

    /// Publishes the generation: one transaction marks it `Published`, the previous one
    /// `Retired`, and points readers at it; then flushes. Returns the final manifest.
    pub fn publish(self) -> Result<GenerationManifest> {
        let members = self.members()?;
        let mut garments = 0u64;
        for (_, rev) in &members {
            garments += self.store.item(*rev)?.garments.len() as u64;
        }
        let mut manifest = self.manifest.clone();
        manifest.state = GenerationState::Published;
        manifest.built_at = Some(now_rfc3339());
        manifest.items = members.len() as u64;
        manifest.garments = garments;
        let id = manifest.id;
        let new_value = encode(GENERATIONS_TREE, &IdKey(id), &manifest)?;
        (&self.store.meta, &self.store.generations)
            .transaction(|(meta, generations)| {
                let current = generations.get(layout::id_key(id))?;
                let still_building = current
                    .as_deref()
                    .and_then(|b| records::decode::<GenerationManifest>(GENERATIONS_TREE, &IdKey(id), b).ok())
                    .is_some_and(|m| m.state == GenerationState::Building);
                if !still_building {
                    return Err(ConflictableTransactionError::Abort(Error::GenerationConflict {
                        generation: id,
                        reason: "is no longer being built (pruned or published by another builder)".into(),
                    }));
                }
                if let Some(previous) = meta.get(PUBLISHED_GENERATION_KEY)?.as_deref().and_then(layout::decode_id) {
                    if previous > id {
                        return Err(ConflictableTransactionError::Abort(Error::GenerationConflict {
                            generation: id,
                            reason: format!("a newer generation {previous} is already published"),
                        }));
                    }
                    if let Some(bytes) = generations.get(layout::id_key(previous))? {
                        let mut old: GenerationManifest = records::decode(GENERATIONS_TREE, &IdKey(previous), &bytes).map_err(ConflictableTransactionError::Abort)?;
                        old.state = GenerationState::Retired;
                        let old_value = encode(GENERATIONS_TREE, &IdKey(previous), &old).map_err(ConflictableTransactionError::Abort)?;
                        generations.insert(&layout::id_key(previous), old_value)?;
                    }
                }
                generations.insert(&layout::id_key(id), new_value.as_slice())?;
                meta.insert(PUBLISHED_GENERATION_KEY, &layout::id_key(id))?;
                Ok(())
            })
            .map_err(|e: TransactionError<Error>| abort_to_error(e))?;
        self.store.flush()?;
        Ok(manifest)
    }
}
