//! The committed store written by format version 1 upgrades to the current version.
//! (The engine's own compat test, `shared/tests/integration/compat.rs`, reads its records.)

use std::path::Path;

use shoplens_migrations::layout;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn fixture_store_is_format_version_1_and_upgrades_cleanly() {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/store-v1/catalog"), copy.path());
    let db = sled::open(copy.path()).unwrap();
    assert_eq!(shoplens_migrations::read_version(&db).unwrap(), Some(shoplens_migrations::FIRST_VERSION));
    let values = |tree: &str| -> Vec<Vec<u8>> { db.open_tree(tree).unwrap().iter().values().map(|v| v.unwrap().to_vec()).collect() };
    let (items, generations) = (values(layout::ITEMS_TREE), values(layout::GENERATIONS_TREE));
    let report = shoplens_migrations::upgrade(&db).unwrap();
    assert_eq!(report.found, Some(shoplens_migrations::FIRST_VERSION));
    assert_eq!(report.version, shoplens_migrations::CURRENT_VERSION);
    assert_eq!(report.applied.len(), 1, "{:?}", report.applied);
    assert_eq!(generations.len(), 2);
    // 1 → 2 appends "not recorded" to every record: an item's image path (None), a
    // generation's ANN parameters (None) and catalogs (empty); nothing else changes.
    let with = |old: &[Vec<u8>], suffix: &[u8]| -> Vec<Vec<u8>> { old.iter().map(|v| [v.as_slice(), suffix].concat()).collect() };
    assert_eq!(values(layout::ITEMS_TREE), with(&items, &[0]));
    assert_eq!(values(layout::GENERATIONS_TREE), with(&generations, &[0, 0]));
    assert_eq!(shoplens_migrations::upgrade(&db).unwrap().applied.len(), 0, "a second open does nothing");
}
