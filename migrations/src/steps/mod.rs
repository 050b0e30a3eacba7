//! The ordered upgrade steps, one file each.
//!
//! To change the format: bump [`crate::CURRENT_VERSION`], add `steps/vN_to_vN+1.rs` with a
//! unit struct implementing [`crate::Migration`], list it here, and commit a fixture store
//! written by the old version under `migrations/fixtures/` so the upgrade stays tested.
//! A shipped step is never edited.

mod v1_to_v2;

use crate::Migration;

/// Every shipped step, oldest first.
pub static ALL: &[&dyn Migration] = &[&v1_to_v2::SelfDescribingGenerations];
