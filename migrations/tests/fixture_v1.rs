//! The committed store written by format version 1 keeps opening as version 1.
//! (The engine's own compat test, `shared/tests/integration/compat.rs`, reads its records.)

use std::path::Path;

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
    let report = shoplens_migrations::upgrade(&db).unwrap();
    assert_eq!(report.found, Some(shoplens_migrations::FIRST_VERSION));
    assert_eq!(report.version, shoplens_migrations::CURRENT_VERSION);
    let generations = db.open_tree(shoplens_migrations::layout::GENERATIONS_TREE).unwrap();
    assert_eq!(generations.len(), 2);
}
