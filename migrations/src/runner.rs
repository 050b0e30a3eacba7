//! Reads the store's format version and applies the steps that bring it to the current one.

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Db, IVec, Transactional, Tree};

use crate::layout::{ALL_TREES, FORMAT_VERSION_KEY, META_TREE};
use crate::{CURRENT_VERSION, Migration, MigrationError, StepError};

/// A tree's entries read before a step's transaction.
pub type Snapshot = Vec<(IVec, IVec)>;

/// The transactional view a step runs in, with the trees it reads captured beside it.
pub struct MigrationTx<'a> {
    trees: &'a [TransactionalTree],
    snapshots: &'a [(&'static str, Snapshot)],
}

impl<'a> MigrationTx<'a> {
    /// The transactional tree named `name` (one of [`ALL_TREES`]).
    ///
    /// # Panics
    /// On a name outside [`ALL_TREES`]: that is a bug in the step, caught by its test.
    pub fn tree(&self, name: &str) -> &TransactionalTree {
        let at = ALL_TREES.iter().position(|t| *t == name).unwrap_or_else(|| panic!("migration step asked for unknown tree {name:?}"));
        &self.trees[at]
    }

    /// The entries of a tree the step named in [`Migration::reads`], in key order, as they
    /// were just before the transaction. The store is locked by this process during an
    /// upgrade, so nothing else writes meanwhile.
    ///
    /// # Panics
    /// On a tree the step did not declare: a bug in the step, caught by its test.
    pub fn snapshot(&self, name: &str) -> &'a [(IVec, IVec)] {
        self.snapshots.iter().find(|(n, _)| *n == name).map(|(_, s)| s.as_slice()).unwrap_or_else(|| panic!("migration step reads tree {name:?} without declaring it in reads()"))
    }
}

/// What [`upgrade`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeReport {
    /// The version found on open; `None` for a fresh store.
    pub found: Option<u32>,
    /// The version the store has now.
    pub version: u32,
    /// Descriptions of the steps applied, in order.
    pub applied: Vec<&'static str>,
}

/// Reads the store's format version; `None` when the store has none.
pub fn read_version(db: &Db) -> Result<Option<u32>, MigrationError> {
    let meta = db.open_tree(META_TREE)?;
    match meta.get(FORMAT_VERSION_KEY)? {
        None => Ok(None),
        Some(bytes) => {
            let raw: [u8; 4] = bytes.as_ref().try_into().map_err(|_| MigrationError::DamagedVersion { len: bytes.len() })?;
            Ok(Some(u32::from_be_bytes(raw)))
        }
    }
}

/// Brings the store to [`CURRENT_VERSION`] with the shipped [`crate::steps::ALL`].
pub fn upgrade(db: &Db) -> Result<UpgradeReport, MigrationError> {
    upgrade_with(db, crate::steps::ALL, CURRENT_VERSION)
}

/// [`upgrade`] with an explicit step list and target, so the runner itself is testable.
pub fn upgrade_with(db: &Db, steps: &[&dyn Migration], current: u32) -> Result<UpgradeReport, MigrationError> {
    let trees: Vec<Tree> = ALL_TREES.iter().map(|name| db.open_tree(name)).collect::<Result<_, _>>()?;
    let found = read_version(db)?;
    let Some(mut version) = found else {
        if trees.iter().any(|t| !t.is_empty()) {
            return Err(MigrationError::Unversioned);
        }
        trees[0].insert(FORMAT_VERSION_KEY, &current.to_be_bytes())?;
        db.flush()?;
        return Ok(UpgradeReport { found: None, version: current, applied: Vec::new() });
    };
    if version > current {
        return Err(MigrationError::NewerStore { found: version, supported: current });
    }
    let mut applied = Vec::new();
    while version < current {
        let step = steps.iter().find(|s| s.applies_to(version)).ok_or(MigrationError::NoStep { from: version, current })?;
        let to = step.target_version();
        if to <= version || to > current {
            return Err(MigrationError::BadStep { description: step.description(), from: version, to });
        }
        tracing::info!(from = version, to, step = step.description(), "upgrading store");
        let snapshots: Vec<(&'static str, Snapshot)> =
            step.reads().iter().map(|name| Ok((*name, db.open_tree(name)?.iter().collect::<Result<Snapshot, _>>()?))).collect::<Result<_, sled::Error>>()?;
        let refs: Vec<&Tree> = trees.iter().collect();
        refs.as_slice()
            .transaction(|txs| {
                let tx = MigrationTx { trees: txs, snapshots: &snapshots };
                step.run(&tx)?;
                txs[0].insert(FORMAT_VERSION_KEY, &to.to_be_bytes())?;
                Ok(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(source) => MigrationError::Step { description: step.description(), from: version, source },
                TransactionError::Storage(e) => MigrationError::Storage(e),
            })?;
        db.flush()?;
        applied.push(step.description());
        version = to;
    }
    Ok(UpgradeReport { found, version, applied })
}

impl From<StepError> for ConflictableTransactionError<StepError> {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Storage(inner) => inner.into(),
            other => ConflictableTransactionError::Abort(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{ITEMS_TREE, id_key};

    fn temp_db() -> Db {
        sled::Config::new().temporary(true).open().unwrap()
    }

    /// A test step that doubles every `u64` value of the items tree.
    struct DoubleItems;
    impl Migration for DoubleItems {
        fn description(&self) -> &'static str {
            "test: double every item value"
        }
        fn applies_to(&self, version: u32) -> bool {
            version == 1
        }
        fn target_version(&self) -> u32 {
            2
        }
        fn reads(&self) -> &'static [&'static str] {
            &[ITEMS_TREE]
        }
        fn run(&self, tx: &MigrationTx<'_>) -> Result<(), StepError> {
            for (k, v) in tx.snapshot(ITEMS_TREE) {
                let raw: [u8; 8] = v.as_ref().try_into().map_err(|_| StepError::Record { tree: ITEMS_TREE, key: format!("{k:?}"), reason: "not 8 bytes".into() })?;
                let doubled = u64::from_be_bytes(raw) * 2;
                tx.tree(ITEMS_TREE).insert(k.clone(), &doubled.to_be_bytes())?;
            }
            Ok(())
        }
    }

    #[test]
    fn fresh_store_gets_the_current_version() {
        let db = temp_db();
        let report = upgrade(&db).unwrap();
        assert_eq!(report.found, None);
        assert_eq!(read_version(&db).unwrap(), Some(CURRENT_VERSION));
        // A second open finds it and does nothing.
        let again = upgrade(&db).unwrap();
        assert_eq!(again.found, Some(CURRENT_VERSION));
        assert!(again.applied.is_empty());
    }

    #[test]
    fn newer_store_is_refused_with_both_versions() {
        let db = temp_db();
        db.open_tree(META_TREE).unwrap().insert(FORMAT_VERSION_KEY, &(CURRENT_VERSION + 7).to_be_bytes()).unwrap();
        let err = upgrade(&db).unwrap_err();
        assert!(matches!(err, MigrationError::NewerStore { found, supported }
            if found == CURRENT_VERSION + 7 && supported == CURRENT_VERSION));
        assert!(err.to_string().contains("newer Shoplens"));
    }

    #[test]
    fn store_with_data_but_no_version_is_refused() {
        let db = temp_db();
        db.open_tree(ITEMS_TREE).unwrap().insert(b"x", b"y").unwrap();
        assert!(matches!(upgrade(&db), Err(MigrationError::Unversioned)));
    }

    #[test]
    fn damaged_version_record_is_reported() {
        let db = temp_db();
        db.open_tree(META_TREE).unwrap().insert(FORMAT_VERSION_KEY, b"xy").unwrap();
        assert!(matches!(upgrade(&db), Err(MigrationError::DamagedVersion { len: 2 })));
    }

    #[test]
    fn steps_run_in_order_and_write_the_version_with_the_data() {
        let db = temp_db();
        upgrade_with(&db, &[], 1).unwrap();
        let items = db.open_tree(ITEMS_TREE).unwrap();
        items.insert(id_key(1), &21u64.to_be_bytes()).unwrap();
        let report = upgrade_with(&db, &[&DoubleItems], 2).unwrap();
        assert_eq!(report.applied, vec!["test: double every item value"]);
        assert_eq!(read_version(&db).unwrap(), Some(2));
        assert_eq!(items.get(id_key(1)).unwrap().unwrap().as_ref(), &42u64.to_be_bytes());
    }

    #[test]
    fn failing_step_leaves_data_and_version_untouched() {
        let db = temp_db();
        upgrade_with(&db, &[], 1).unwrap();
        let items = db.open_tree(ITEMS_TREE).unwrap();
        items.insert(id_key(1), &5u64.to_be_bytes()).unwrap();
        items.insert(id_key(2), b"bad").unwrap();
        let err = upgrade_with(&db, &[&DoubleItems], 2).unwrap_err();
        assert!(matches!(err, MigrationError::Step { from: 1, .. }), "{err}");
        assert_eq!(read_version(&db).unwrap(), Some(1));
        assert_eq!(items.get(id_key(1)).unwrap().unwrap().as_ref(), &5u64.to_be_bytes());
    }

    #[test]
    fn missing_step_is_an_error_not_a_silent_skip() {
        let db = temp_db();
        upgrade_with(&db, &[], 1).unwrap();
        assert!(matches!(upgrade_with(&db, &[], 3), Err(MigrationError::NoStep { from: 1, current: 3 })));
    }
}
