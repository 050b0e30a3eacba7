//! `indexer status` and `indexer prune`.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use shoplens::store::CatalogStore;

/// Opens an existing store; refuses to create one where the user meant to read one.
pub fn open_existing(db: &Path) -> Result<CatalogStore> {
    let dir = shoplens::store::StoreDir::new(db);
    if !dir.holds_a_store() {
        anyhow::bail!("{} holds no Shoplens store (no {} inside)", db.display(), dir.catalog().display());
    }
    CatalogStore::open(db).with_context(|| format!("opening store {}", db.display()))
}

/// blake3 over the published generation's content in sku order, ids left out, so two
/// stores built from the same catalog by different runs compare equal.
fn content_digest(store: &CatalogStore, generation: u64) -> Result<String> {
    let mut hasher = shoplens_digest::Hasher::default();
    for (sku, rev) in store.generation_members(generation)? {
        let item = store.item(rev)?;
        hasher.add(sku.as_bytes());
        hasher.add(&item.content_hash.0);
        hasher.add(serde_json::to_string(&item.metadata)?.as_bytes());
        for id in &item.garments {
            let g = store.garment(*id)?;
            hasher.add(&g.bbox.to_array().map(f32::to_le_bytes).concat());
            hasher.add(g.category.as_bytes());
            hasher.add(&g.embedding.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        }
    }
    Ok(hasher.finish())
}

mod shoplens_digest {
    /// Length-prefixed fields into one blake3 hash.
    #[derive(Default)]
    pub struct Hasher(blake3::Hasher);
    impl Hasher {
        pub fn add(&mut self, bytes: &[u8]) {
            self.0.update(&(bytes.len() as u64).to_le_bytes());
            self.0.update(bytes);
        }
        pub fn finish(self) -> String {
            self.0.finalize().to_hex().to_string()
        }
    }
}

pub fn run(db: &Path, as_json: bool, with_digest: bool) -> Result<()> {
    let store = open_existing(db)?;
    let published = store.published()?;
    let digest = match (&published, with_digest) {
        (Some(m), true) => Some(content_digest(&store, m.id)?),
        _ => None,
    };
    let building = store.generations()?.into_iter().find(|g| g.state == shoplens::store::GenerationState::Building);
    if as_json {
        let value = match &published {
            Some(m) => json!({
                "generation": m.id, "items": m.items, "garments": m.garments,
                "built_at": m.built_at, "models": m.spec.models, "dim": m.spec.dim,
                "format_version": store.format_version()?, "building": building.as_ref().map(|b| b.id),
                "digest": digest,
            }),
            None => json!({
                "generation": null, "items": 0, "garments": 0, "built_at": null, "models": {},
                "format_version": store.format_version()?, "building": building.as_ref().map(|b| b.id),
                "digest": null,
            }),
        };
        println!("{}", serde_json::to_string(&value)?);
        return Ok(());
    }
    println!("store          {} (format version {})", db.display(), store.format_version()?);
    match &published {
        None => println!("published      none yet"),
        Some(m) => {
            println!("published      generation {}", m.id);
            println!("built at       {}", m.built_at.as_deref().unwrap_or("?"));
            println!("items          {}", m.items);
            println!("garments       {} ({}-d embeddings)", m.garments, m.spec.dim);
            for (name, version) in &m.spec.models {
                println!("model          {name} {version}");
            }
        }
    }
    if let Some(d) = &digest {
        println!("digest         {d}");
    }
    if let Some(b) = building {
        println!("unfinished     generation {} started {} (the next build resumes it)", b.id, b.started_at);
    }
    println!("disk           {:.1} MiB", store.size_on_disk()? as f64 / (1 << 20) as f64);
    Ok(())
}

pub fn prune(db: &Path, retain: usize) -> Result<()> {
    let store = open_existing(db)?;
    let pruned = shoplens::indexing::prune(&store, retain)?;
    println!(
        "removed {} generations {:?}, {} item revisions, {} garments, {} graph dumps, {} serving snapshots; kept generations {:?}",
        pruned.store.generations.len(),
        pruned.store.generations,
        pruned.store.items,
        pruned.store.garments,
        pruned.graph_dumps,
        pruned.snapshots,
        pruned.kept
    );
    Ok(())
}
