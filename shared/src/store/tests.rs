use std::collections::BTreeMap;

use super::*;
use crate::geometry::BBox;

fn spec(dim: u32, embedder: &str) -> GenerationSpec {
    GenerationSpec { dim, models: BTreeMap::from([("embedder".to_string(), embedder.to_string())]) }
}

fn metadata(sku: &str) -> ItemMetadata {
    ItemMetadata {
        sku: sku.to_string(),
        title: Some(format!("title of {sku}")),
        label: Some("T-Shirt".into()),
        category: Some("top".into()),
        image: format!("images/{sku}.jpg"),
        price: Some(19.5),
        currency: Some("EUR".into()),
        url: None,
        attributes: BTreeMap::from([("colour".to_string(), "red".to_string())]),
    }
}

fn garment(dim: usize, seed: f32) -> NewGarment {
    NewGarment { bbox: BBox::new(1.0, 2.0, 30.0, 40.0), category: "top".into(), score: 0.8, embedding: (0..dim).map(|i| seed + i as f32).collect() }
}

fn publish_items(store: &CatalogStore, skus: &[&str], dim: u32) -> GenerationManifest {
    let builder = store.begin_generation(spec(dim, "e1")).unwrap();
    for (i, sku) in skus.iter().enumerate() {
        builder.put_item(metadata(sku), ContentHash::of_bytes(sku.as_bytes()), vec![garment(dim as usize, i as f32), garment(dim as usize, 10.0 + i as f32)]).unwrap();
    }
    builder.publish().unwrap()
}

#[test]
fn published_generation_holds_items_and_garments() {
    let store = CatalogStore::open_temporary().unwrap();
    assert!(store.published().unwrap().is_none());
    assert!(matches!(store.published_item("a"), Err(Error::NoPublishedGeneration)));
    let m = publish_items(&store, &["a", "b", "c"], 4);
    assert_eq!((m.items, m.garments, m.state), (3, 6, GenerationState::Published));
    assert!(m.built_at.is_some());
    assert_eq!(store.published().unwrap().unwrap(), m);
    let (_, item) = store.published_item("b").unwrap();
    assert_eq!(item.metadata, metadata("b"));
    assert_eq!(item.garments.len(), 2);
    let g = store.garment(item.garments[0]).unwrap();
    assert_eq!((g.sku.as_str(), g.embedding.len(), g.model_version.as_str()), ("b", 4, "e1"));
    let all = store.generation_garments(m.id).unwrap();
    assert_eq!(all.garments.len(), 6);
    assert!(matches!(store.published_item("zzz"), Err(Error::NotFound { .. })));
}

#[test]
fn readers_see_the_old_generation_until_publish() {
    let store = CatalogStore::open_temporary().unwrap();
    let first = publish_items(&store, &["a", "b"], 4);
    let builder = store.begin_generation(spec(4, "e1")).unwrap();
    assert!(builder.member("a").unwrap().is_none(), "a new generation starts empty");
    builder.put_item(metadata("new"), ContentHash::of_bytes(b"n"), vec![garment(4, 1.0)]).unwrap();
    assert_eq!(store.published_id().unwrap(), Some(first.id));
    assert!(store.item_in_generation(first.id, "new").unwrap().is_none());
    assert_eq!(store.generation_members(first.id).unwrap().len(), 2);
    let second = builder.publish().unwrap();
    assert_eq!(store.published_id().unwrap(), Some(second.id));
    assert_eq!(second.items, 1);
    assert_eq!(store.generation(first.id).unwrap().unwrap().state, GenerationState::Retired);
}

#[test]
fn carry_keeps_unchanged_items_without_rewriting_them() {
    let store = CatalogStore::open_temporary().unwrap();
    let first = publish_items(&store, &["a", "b"], 4);
    let (rev_a, item_a) = store.item_in_generation(first.id, "a").unwrap().unwrap();
    let builder = store.begin_generation(spec(4, "e1")).unwrap();
    builder.carry_item("a", rev_a).unwrap();
    assert!(matches!(builder.carry_item("b", rev_a), Err(Error::GenerationConflict { .. })));
    let second = builder.publish().unwrap();
    let (rev_again, item_again) = store.item_in_generation(second.id, "a").unwrap().unwrap();
    assert_eq!((rev_again, item_again), (rev_a, item_a));
    assert_eq!((second.items, second.garments), (1, 2));
}

#[test]
fn embeddings_of_the_wrong_length_are_refused() {
    let store = CatalogStore::open_temporary().unwrap();
    let first = publish_items(&store, &["a"], 4);
    let (rev_a, _) = store.item_in_generation(first.id, "a").unwrap().unwrap();
    let builder = store.begin_generation(spec(8, "e2")).unwrap();
    let err = builder.put_item(metadata("x"), ContentHash::of_bytes(b"x"), vec![garment(4, 0.0)]).unwrap_err();
    assert!(matches!(err, Error::DimensionMismatch { expected: 8, found: 4 }));
    assert!(matches!(builder.carry_item("a", rev_a), Err(Error::GenerationConflict { .. })));
    let mut nan = garment(8, 0.0);
    nan.embedding[3] = f32::NAN;
    assert!(matches!(builder.put_item(metadata("y"), ContentHash::of_bytes(b"y"), vec![nan]), Err(Error::InvalidVector { .. })));
    assert!(store.begin_generation(spec(0, "e")).is_err());
}

#[test]
fn an_interrupted_build_is_resumed_with_the_same_spec_and_discarded_otherwise() {
    let store = CatalogStore::open_temporary().unwrap();
    let builder = store.begin_generation(spec(4, "e1")).unwrap();
    builder.put_item(metadata("a"), ContentHash::of_bytes(b"a"), vec![garment(4, 0.0)]).unwrap();
    let id = builder.id();
    drop(builder); // the build "crashes"
    let resumed = store.begin_generation(spec(4, "e1")).unwrap();
    assert!(resumed.resumed());
    assert_eq!(resumed.id(), id);
    assert!(resumed.member("a").unwrap().is_some());
    drop(resumed);
    let other = store.begin_generation(spec(4, "e2")).unwrap();
    assert!(!other.resumed());
    assert!(other.id() > id);
    assert_eq!(store.generation(id).unwrap().unwrap().state, GenerationState::Removing);
    other.publish().unwrap();
    let report = store.prune(DEFAULT_RETAIN).unwrap();
    assert_eq!(report.generations, vec![id]);
    assert_eq!((report.items, report.garments), (1, 1));
}

#[test]
fn prune_keeps_the_published_and_recent_generations_and_drops_orphans() {
    let store = CatalogStore::open_temporary().unwrap();
    let gens: Vec<_> = (0..4).map(|i| publish_items(&store, &[&format!("s{i}")], 4)).collect();
    assert!(store.prune(0).is_err());
    let report = store.prune(2).unwrap();
    assert_eq!(report.generations, vec![gens[1].id, gens[0].id]);
    assert_eq!((report.items, report.garments), (2, 4));
    let left: Vec<u64> = store.generations().unwrap().iter().map(|g| g.id).collect();
    assert_eq!(left, vec![gens[2].id, gens[3].id]);
    assert_eq!(store.published_id().unwrap(), Some(gens[3].id));
    assert_eq!(store.generation_garments(gens[3].id).unwrap().garments.len(), 2);
    assert_eq!(store.generation_garments(gens[2].id).unwrap().garments.len(), 2);
    // Nothing left to prune.
    assert_eq!(store.prune(2).unwrap(), PruneReport::default());
}

#[test]
fn damaged_records_name_their_key() {
    let store = CatalogStore::open_temporary().unwrap();
    let m = publish_items(&store, &["a"], 4);
    let (_, item) = store.published_item("a").unwrap();
    let gid = item.garments[0];
    let garments = store.raw_tree(GARMENTS_TREE);
    let good = garments.get(layout::id_key(gid)).unwrap().unwrap();

    garments.insert(layout::id_key(gid), &good[..good.len() / 2]).unwrap();
    let err = store.generation_garments(m.id).unwrap_err();
    assert!(matches!(err, Error::CorruptRecord { tree: "garments", .. }), "{err}");
    assert!(err.to_string().contains(&format!("garments/{gid}")), "{err}");

    // A well-formed record whose embedding has the wrong length.
    let mut wrong: GarmentRecord = records::decode(GARMENTS_TREE, &IdKey(gid), &good).unwrap();
    wrong.embedding.push(1.0);
    garments.insert(layout::id_key(gid), records::encode(GARMENTS_TREE, &IdKey(gid), &wrong).unwrap()).unwrap();
    let err = store.generation_garments(m.id).unwrap_err();
    assert!(err.to_string().contains(&gid.to_string()) && err.to_string().contains("5 values"), "{err}");

    store.raw_tree(META_TREE).insert(PUBLISHED_GENERATION_KEY, &[1u8, 2]).unwrap();
    assert!(matches!(store.published(), Err(Error::CorruptRecord { tree: "meta", .. })));
}

#[test]
fn a_store_from_a_newer_version_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = CatalogStore::open(dir.path()).unwrap();
        publish_items(&store, &["a"], 4);
        store.raw_tree(META_TREE).insert(layout::FORMAT_VERSION_KEY, &(shoplens_migrations::CURRENT_VERSION + 1).to_be_bytes()).unwrap();
        store.flush().unwrap();
    }
    let err = CatalogStore::open(dir.path()).err().expect("newer store must be refused");
    assert!(matches!(err, Error::StoreFormat(shoplens_migrations::MigrationError::NewerStore { .. })), "{err:?}");
    assert!(err.to_string().contains("newer Shoplens"), "{err}");
}

#[test]
fn a_store_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = CatalogStore::open(dir.path()).unwrap();
        publish_items(&store, &["a", "b"], 4).id
    };
    let store = CatalogStore::open(dir.path()).unwrap();
    assert_eq!(store.published_id().unwrap(), Some(id));
    assert_eq!(store.generation_garments(id).unwrap().garments.len(), 4);
    assert_eq!(store.format_version().unwrap(), shoplens_migrations::CURRENT_VERSION);
}

#[test]
fn a_store_closed_a_moment_ago_opens_once_its_lock_is_released() {
    // The first handle is dropped 300 ms into the second open: the open waits for the
    // lock instead of failing with "could not acquire lock".
    let dir = tempfile::tempdir().unwrap();
    let store = CatalogStore::open(dir.path()).unwrap();
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(store);
    });
    let reopened = CatalogStore::open(dir.path());
    holder.join().unwrap();
    assert!(reopened.is_ok(), "{:?}", reopened.err());
}
