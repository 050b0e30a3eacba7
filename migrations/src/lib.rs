//! Store format versions of Shoplens and the ordered steps that upgrade an older store.
//!
//! The catalog store (`shoplens::store`) keeps its format version inside sled, in the
//! [`layout::META_TREE`] tree under [`layout::FORMAT_VERSION_KEY`]. Opening a store runs
//! [`upgrade`], which
//! - writes [`CURRENT_VERSION`] into a fresh (empty) store,
//! - refuses a store written by a newer build ([`MigrationError::NewerStore`]),
//! - otherwise applies the [`steps::ALL`] that apply, one sled transaction each, the new
//!   version written in the same transaction as the data it describes.
//!
//! This crate knows the store's layout (tree names, key encodings, version numbers) and
//! nothing else of the engine. A shipped step is never edited: a later format change adds a
//! new file under `steps/`.

pub mod layout;
mod runner;
pub mod steps;

pub use runner::{MigrationTx, UpgradeReport, read_version, upgrade, upgrade_with};

/// The first store format ever written by Shoplens.
pub const FIRST_VERSION: u32 = 1;

/// The format this build writes. Stores at an older version are upgraded on open.
/// 2: generations record their ANN parameters and catalogs, item revisions their image file.
pub const CURRENT_VERSION: u32 = 2;

/// One ordered upgrade step from one store format version to the next.
///
/// Each step lives in its own file under `steps/` and is listed in [`steps::ALL`].
pub trait Migration: Sync {
    /// One line saying what the step changes, shown when it runs.
    fn description(&self) -> &'static str;
    /// Whether this step upgrades a store currently at `version`.
    fn applies_to(&self, version: u32) -> bool;
    /// The version the store has after this step.
    fn target_version(&self) -> u32;
    /// Trees whose whole content the step reads: sled transactions cannot iterate, so the
    /// runner reads them just before the transaction ([`MigrationTx::snapshot`]).
    fn reads(&self) -> &'static [&'static str] {
        &[]
    }
    /// Rewrites the store inside one transaction over all trees of [`layout::ALL_TREES`].
    ///
    /// The closure may run several times on conflict: it must not have side effects
    /// outside `tx`.
    fn run(&self, tx: &MigrationTx<'_>) -> Result<(), StepError>;
}

/// Why a step could not rewrite the store; aborts the step's transaction.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A record the step must rewrite cannot be read in the old format.
    #[error("record {tree}/{key} cannot be upgraded: {reason}")]
    Record { tree: &'static str, key: String, reason: String },
    /// sled failed inside the transaction (conflicts are retried by sled itself).
    #[error(transparent)]
    Storage(#[from] sled::transaction::UnabortableTransactionError),
}

/// Why a store cannot be brought to [`CURRENT_VERSION`].
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "the store has format version {found}, written by a newer Shoplens; this build reads versions up to {supported}. \
         Run a newer Shoplens, or rebuild the store with `indexer build` into an empty --db directory"
    )]
    NewerStore { found: u32, supported: u32 },
    #[error("the store holds data but no format version: it was not written by Shoplens, or its meta tree is damaged")]
    Unversioned,
    #[error("the store's format version record is damaged ({len} bytes, expected 4)")]
    DamagedVersion { len: usize },
    #[error("no migration step upgrades format version {from} (this build writes {current})")]
    NoStep { from: u32, current: u32 },
    #[error("migration step {description:?} does not move the version forward ({from} -> {to})")]
    BadStep { description: &'static str, from: u32, to: u32 },
    #[error("migration step {description:?} from version {from} failed: {source}")]
    Step {
        description: &'static str,
        from: u32,
        #[source]
        source: StepError,
    },
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
}
