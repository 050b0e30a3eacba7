//! Format 1 → 2: a generation describes itself, and an item revision knows its image file.
//!
//! - every generation manifest gains `ann: Option<AnnParams>` (the parameters its graph was
//!   built with) and `catalogs: Vec<String>` (what it was built from), so a reader loads the
//!   graph dump as it was written instead of rebuilding it with its own defaults;
//! - every item record gains `image_path: Option<String>`, so a serving snapshot can be
//!   rebuilt from the store alone.
//!
//! Records are postcard: a struct is its fields in order with nothing between them, so an
//! appended field is appended bytes. Old records get the values that mean "not recorded":
//! `None` (one zero byte) and an empty list (length 0: one zero byte). The next build
//! records the real values (an item whose path is unknown gets a new revision with the same
//! embeddings; nothing is embedded again).

use crate::layout::{GENERATIONS_TREE, ITEMS_TREE};
use crate::{Migration, MigrationTx, StepError};

/// postcard of `None` (an `Option`'s tag 0).
const NONE: u8 = 0;
/// postcard of an empty sequence (its varint length 0).
const EMPTY_LIST: u8 = 0;

pub struct SelfDescribingGenerations;

impl Migration for SelfDescribingGenerations {
    fn description(&self) -> &'static str {
        "generations record their ANN parameters and catalogs; item revisions their image file"
    }

    fn applies_to(&self, version: u32) -> bool {
        version == 1
    }

    fn target_version(&self) -> u32 {
        2
    }

    fn reads(&self) -> &'static [&'static str] {
        &[ITEMS_TREE, GENERATIONS_TREE]
    }

    fn run(&self, tx: &MigrationTx<'_>) -> Result<(), StepError> {
        append(tx, ITEMS_TREE, &[NONE])?;
        append(tx, GENERATIONS_TREE, &[NONE, EMPTY_LIST])
    }
}

/// Appends `suffix` to every record of `tree`.
fn append(tx: &MigrationTx<'_>, tree: &'static str, suffix: &[u8]) -> Result<(), StepError> {
    for (key, value) in tx.snapshot(tree) {
        if value.is_empty() {
            return Err(StepError::Record { tree, key: format!("{key:?}"), reason: "empty record".into() });
        }
        let mut upgraded = Vec::with_capacity(value.len() + suffix.len());
        upgraded.extend_from_slice(value);
        upgraded.extend_from_slice(suffix);
        tx.tree(tree).insert(key.clone(), upgraded)?;
    }
    Ok(())
}
