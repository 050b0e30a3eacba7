//! What the server serves: the loaded index of the published generation, swapped atomically.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use shoplens::ann::{AnnParams, GarmentIndex, LoadOutcome};
use shoplens::store::{CatalogStore, GenerationManifest};

/// A published generation ready to answer searches.
pub struct LoadedGeneration {
    pub manifest: GenerationManifest,
    pub index: GarmentIndex,
}

/// Shared by every worker; readers take a snapshot with `load_full` and never hold a guard
/// across an await.
#[derive(Default)]
pub struct SearcherState {
    pub current: ArcSwapOption<LoadedGeneration>,
    /// Why the last load failed, for /readyz.
    pub last_error: ArcSwapOption<String>,
}

/// Loads the published generation on its own thread: index building is CPU work that must
/// not run on an actix worker.
pub fn spawn_loader(db: PathBuf, state: Arc<SearcherState>) {
    std::thread::Builder::new()
        .name("index-loader".into())
        .spawn(move || match load(&db) {
            Ok(loaded) => {
                tracing::info!(generation = loaded.manifest.id, garments = loaded.index.len(), "index ready");
                state.current.store(Some(Arc::new(loaded)));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load the index");
                state.last_error.store(Some(Arc::new(e.to_string())));
            }
        })
        .expect("spawning the loader thread");
}

fn load(db: &std::path::Path) -> shoplens::Result<LoadedGeneration> {
    let store = CatalogStore::open(db)?;
    let manifest = store.published()?.ok_or(shoplens::Error::NoPublishedGeneration)?;
    let (index, outcome) = shoplens::ann::open_published(&store, AnnParams::default())?;
    if let LoadOutcome::Built { reason } = outcome {
        tracing::warn!(%reason, "ANN graph rebuilt from the store");
    }
    Ok(LoadedGeneration { manifest, index })
}
