//! Training our networks on DeepFashion2-format data, as a library: the binaries add
//! arguments and progress bars. Training reports progress through [`Progress`].

pub mod augment;
pub mod checkpoint;
pub mod detector;
pub mod embedder;
pub mod retrieval;
pub(crate) mod tagged;

use std::path::{Path, PathBuf};

use crate::Result;
use crate::catalog::{CatalogSource, LabelMap, read_catalog};
pub use crate::progress::{Progress, ProgressFn};

/// A photo of the CC0 catalog with its sender and taxonomy category.
pub(crate) struct CatalogPhoto {
    pub image: PathBuf,
    pub sender: u64,
    pub category: String,
}

/// Catalog rows with their category through the default label map, read by the indexer's own
/// catalog reader (`sender_id` is a free attribute there); rows it refuses, or without a
/// category, give no training photo.
pub(crate) fn catalog_photos(catalog: &Path) -> Result<Vec<CatalogPhoto>> {
    let source = CatalogSource::from_path(&catalog.join("catalog.csv"))?;
    let (entries, _refused) = read_catalog(&source, &LabelMap::default())?;
    Ok(entries
        .into_iter()
        .filter_map(|e| {
            let sender = e.metadata.attributes.get("sender_id").and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            Some(CatalogPhoto { category: e.metadata.category?, image: e.image_path, sender })
        })
        .collect())
}

/// The catalog's validation senders (`sender_id % 5` in {1, 3}): distractors in evaluation,
/// never trained on (a sender's shots are often near-duplicates).
pub(crate) fn is_validation_sender(sender: u64) -> bool {
    sender % 5 == 1 || sender % 5 == 3
}
