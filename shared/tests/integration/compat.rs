//! Stores written by every earlier format version (committed under
//! `migrations/fixtures/store-vN`) must open, upgrade and read the same with every later
//! build.
//!
//! A fixture is written once, by the build whose format it records, never regenerated to
//! make a test pass: `cargo test -p shoplens-shared --test integration -- --ignored
//! write_store_v2_fixture` wrote `store-v2` (format 2); `store-v1` was written the same way
//! by the format 1 build (its writer was the v1 test below before format 2).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use shoplens::ann::AnnParams;
use shoplens::geometry::BBox;
use shoplens::store::{CatalogStore, ContentHash, GenerationSpec, GenerationState, ItemMetadata, NewGarment};

fn fixture_dir(version: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../migrations/fixtures/store-v{version}"))
}

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

fn embedding(seed: usize) -> Vec<f32> {
    (0..8).map(|i| ((seed * 8 + i) as f32 * 0.37).sin()).collect()
}

fn item(sku: &str, title: &str) -> ItemMetadata {
    ItemMetadata {
        sku: sku.into(),
        title: Some(title.into()),
        label: Some("T-Shirt".into()),
        category: Some("top".into()),
        image: format!("images/{sku}.jpg"),
        price: Some(12.5),
        currency: Some("EUR".into()),
        url: Some(format!("https://shop.example/{sku}")),
        attributes: BTreeMap::from([("colour".into(), "blue".into())]),
    }
}

fn garment(seed: usize) -> NewGarment {
    NewGarment {
        bbox: BBox::new(seed as f32, 2.0, 50.0 + seed as f32, 80.0),
        category: if seed.is_multiple_of(2) { "top".into() } else { "pants".into() },
        score: 0.5 + seed as f32 / 100.0,
        embedding: embedding(seed),
    }
}

fn spec() -> GenerationSpec {
    GenerationSpec { dim: 8, models: BTreeMap::from([("detector".into(), "det-v1".into()), ("embedder".into(), "emb-v1".into())]) }
}

fn ann() -> AnnParams {
    AnnParams { m: 24, ef_construction: 150, ..AnnParams::default() }
}

/// Writes the format 2 fixture: generation 1 with items a, b; generation 2 carrying a,
/// changing b, adding c, published; image paths and ANN parameters recorded.
#[test]
#[ignore = "writes the committed fixture; run by hand only when creating a new format version"]
fn write_store_v2_fixture() {
    let dir = fixture_dir(2);
    let _ = std::fs::remove_dir_all(&dir);
    let store = CatalogStore::open(&dir).unwrap();
    let path = |sku: &str| Some(format!("/shop/images/{sku}.jpg"));
    let mut g1 = store.begin_generation(spec()).unwrap();
    let rev_a = g1.put_item_with_image(item("a", "Blue tee"), ContentHash::of_bytes(b"a"), path("a"), vec![garment(1)]).unwrap();
    g1.put_item_with_image(item("b", "Old title"), ContentHash::of_bytes(b"b"), path("b"), vec![garment(2)]).unwrap();
    g1.describe(AnnParams::default(), vec!["/shop/catalog.csv".into()]);
    g1.publish().unwrap();
    let mut g2 = store.begin_generation(spec()).unwrap();
    g2.carry_item("a", rev_a).unwrap();
    g2.put_item_with_image(item("b", "New title"), ContentHash::of_bytes(b"b2"), path("b"), vec![garment(3), garment(4)]).unwrap();
    g2.put_item_with_image(item("c", "Trousers"), ContentHash::of_bytes(b"c"), path("c"), vec![]).unwrap();
    g2.describe(ann(), vec!["/shop/catalog.csv".into()]);
    g2.publish().unwrap();
    store.flush().unwrap();
}

/// The content both fixtures hold (see the writer).
fn assert_fixture_content(store: &CatalogStore) {
    let gens = store.generations().unwrap();
    assert_eq!(gens.iter().map(|g| (g.id, g.state)).collect::<Vec<_>>(), vec![(1, GenerationState::Retired), (2, GenerationState::Published)]);
    let published = store.published().unwrap().unwrap();
    assert_eq!((published.id, published.items, published.garments), (2, 3, 3));
    assert_eq!(published.spec, spec());
    assert!(published.built_at.is_some());

    let (rev_a, a) = store.published_item("a").unwrap();
    assert_eq!(a.metadata, item("a", "Blue tee"));
    assert_eq!(a.content_hash, ContentHash::of_bytes(b"a"));
    assert_eq!(store.item_in_generation(1, "a").unwrap().unwrap().0, rev_a, "a was carried, not rewritten");
    let (_, b) = store.published_item("b").unwrap();
    assert_eq!(b.metadata.title.as_deref(), Some("New title"));
    assert_eq!(store.item_in_generation(1, "b").unwrap().unwrap().1.metadata.title.as_deref(), Some("Old title"));
    assert!(store.published_item("c").unwrap().1.garments.is_empty());

    let garments = store.generation_garments(2).unwrap().garments;
    let seeds: Vec<usize> = vec![1, 3, 4];
    assert_eq!(garments.len(), 3);
    for ((_, g), seed) in garments.iter().zip(seeds) {
        let want = garment(seed);
        assert_eq!((g.bbox, &g.category, g.score, &g.embedding), (want.bbox, &want.category, want.score, &want.embedding));
        assert_eq!(g.model_version, "emb-v1");
    }
}

fn open_copy(version: u32) -> (tempfile::TempDir, CatalogStore) {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir(version), copy.path());
    let store = CatalogStore::open(copy.path()).unwrap();
    (copy, store)
}

#[test]
fn store_written_by_format_version_1_upgrades_and_reads_the_same() {
    let (_dir, store) = open_copy(1);
    assert_eq!(store.format_version().unwrap(), shoplens_migrations::CURRENT_VERSION);
    assert_fixture_content(&store);
    // What format 1 did not record reads as not recorded.
    let published = store.published().unwrap().unwrap();
    assert_eq!((published.ann, published.catalogs.len()), (None, 0));
    assert_eq!(store.published_item("a").unwrap().1.image_path, None);
}

#[test]
fn store_written_by_format_version_2_reads_the_same_with_what_it_recorded() {
    let (_dir, store) = open_copy(2);
    assert_eq!(store.format_version().unwrap(), shoplens_migrations::CURRENT_VERSION);
    assert_fixture_content(&store);
    let published = store.published().unwrap().unwrap();
    assert_eq!(published.ann, Some(ann()));
    assert_eq!(published.catalogs, vec!["/shop/catalog.csv".to_string()]);
    assert_eq!(store.generation(1).unwrap().unwrap().ann, Some(AnnParams::default()));
    assert_eq!(store.published_item("c").unwrap().1.image_path.as_deref(), Some("/shop/images/c.jpg"));
}
