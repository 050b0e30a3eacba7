//! `build_generation`: a catalog becomes a published generation; reruns are incremental;
//! bad rows are skipped with reasons; an interrupted build resumes to the same result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use image::{Rgb, RgbImage};
use shoplens::ann::{AnnParams, LoadOutcome};
use shoplens::catalog::{CatalogSource, LabelMap};
use shoplens::datasets::synth::{self, SynthConfig};
use shoplens::indexing::{BoxMode, BuildOptions, BuildReport, Models, build_generation, write_serving_snapshot};
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::progress::Progress;
use shoplens::serving::engine::ServingIndex;
use shoplens::serving::snapshot;
use shoplens::store::{CatalogStore, ContentHash, GenerationState};

fn embedder() -> GarmentEmbedder {
    GarmentEmbedder::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/embedder-lite0.safetensors"), &Device::Cpu).unwrap()
}

fn write_image(path: &Path, seed: u32) {
    let img = RgbImage::from_fn(64, 80, |x, y| Rgb([(x * 3 + seed * 40) as u8, (y * 2 + seed * 90) as u8, ((x + y) * seed) as u8]));
    img.save(path).unwrap();
}

/// A CSV catalog of `n` generated images.
fn catalog(dir: &Path, n: u32) -> PathBuf {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut csv = String::from("sku,image,label,title,price\n");
    for i in 0..n {
        write_image(&dir.join(format!("images/{i}.jpg")), i);
        csv.push_str(&format!("sku{i},images/{i}.jpg,{},Item {i},{}.5\n", if i % 2 == 0 { "T-Shirt" } else { "Pants" }, i));
    }
    let path = dir.join("catalog.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

fn build(store: &CatalogStore, sources: &[CatalogSource], embedder: &GarmentEmbedder, boxes: BoxMode) -> BuildReport {
    let opts = BuildOptions { boxes, ..BuildOptions::default() };
    build_generation(store, sources, &LabelMap::default(), Models { embedder, detector: None }, &opts, &mut |_| {}).unwrap()
}

/// An item's content: image hash, title, garment embeddings.
type Content = (ContentHash, Option<String>, Vec<Vec<f32>>);

/// What a published generation holds, independent of ids: sku → content.
fn contents(store: &CatalogStore) -> BTreeMap<String, Content> {
    let generation = store.published_id().unwrap().unwrap();
    store
        .generation_members(generation)
        .unwrap()
        .into_iter()
        .map(|(sku, rev)| {
            let item = store.item(rev).unwrap();
            let embeddings = item.garments.iter().map(|g| store.garment(*g).unwrap().embedding).collect();
            (sku, (item.content_hash, item.metadata.title.clone(), embeddings))
        })
        .collect()
}

#[test]
fn a_catalog_is_indexed_then_rebuilt_incrementally() {
    let dir = tempfile::tempdir().unwrap();
    let csv = catalog(&dir.path().join("shop"), 6);
    let store = CatalogStore::open(dir.path().join("db")).unwrap();
    let embedder = embedder();
    let sources = [CatalogSource::from_path(&csv).unwrap()];

    let first = build(&store, &sources, &embedder, BoxMode::Detected);
    assert_eq!((first.added, first.items, first.garments, first.embedded_items), (6, 6, 6, 6));
    assert!(first.failures.is_empty(), "{:?}", first.failures);
    let (_, item) = store.published_item("sku1").unwrap();
    assert_eq!(item.metadata.category.as_deref(), Some("pants"));
    let garment = store.garment(item.garments[0]).unwrap();
    assert_eq!(garment.category, "pants");
    assert_eq!(garment.bbox.to_array(), [0.0, 0.0, 64.0, 80.0], "a whole-image garment keeps the image's box");

    // Nothing changed: nothing is embedded again.
    let again = build(&store, &sources, &embedder, BoxMode::Detected);
    assert_eq!((again.unchanged, again.embedded_items, again.added, again.updated, again.removed), (6, 0, 0, 0, 0));
    assert_eq!(again.generation, first.generation + 1);

    // One image changed, one title changed, one row deleted, one row added.
    write_image(&dir.path().join("shop/images/2.jpg"), 99);
    write_image(&dir.path().join("shop/images/new.jpg"), 7);
    let text = std::fs::read_to_string(&csv).unwrap();
    let text = text.replace("Item 3,", "Item three,").replace("sku5,images/5.jpg,Pants,Item 5,5.5\n", "") + "skuN,images/new.jpg,Dress,New,1\n";
    std::fs::write(&csv, text).unwrap();
    let before = contents(&store);
    let third = build(&store, &sources, &embedder, BoxMode::Detected);
    assert_eq!((third.added, third.updated, third.unchanged, third.removed), (1, 2, 3, 1));
    assert_eq!(third.embedded_items, 2, "the new item and the changed image; a title change reuses the embeddings");
    let after = contents(&store);
    assert!(!after.contains_key("sku5"));
    assert_eq!(after["sku3"].1.as_deref(), Some("Item three"));
    assert_eq!(after["sku3"].2, before["sku3"].2);
    assert_ne!(after["sku2"].0, before["sku2"].0);
    assert_eq!(after["sku0"], before["sku0"]);
    // Retention (3) pruned the oldest generation.
    assert_eq!(store.generations().unwrap().len(), 3);
}

#[test]
fn bad_rows_and_files_are_skipped_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("shop");
    let csv = catalog(&root, 2);
    std::fs::write(root.join("images/corrupt.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    std::fs::write(root.join("images/empty.jpg"), b"").unwrap();
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("bad1,images/corrupt.jpg,Pants,,\nbad2,images/missing.jpg,Pants,,\nbad3,../secret.jpg,Pants,,\nbad4,images/empty.jpg,Pants,,\nsku0,images/1.jpg,Pants,dup,\nbad5,images/0.jpg,Pants,,not-a-price\n");
    std::fs::write(&csv, text).unwrap();
    let store = CatalogStore::open(dir.path().join("db")).unwrap();
    let report = build(&store, &[CatalogSource::from_path(&csv).unwrap()], &embedder(), BoxMode::Detected);
    assert_eq!(report.items, 2);
    let mut skus: Vec<String> = report.failures.iter().map(|f| f.sku.clone().unwrap_or_default()).collect();
    skus.sort();
    assert_eq!(skus, ["bad1", "bad2", "bad3", "bad4", "bad5", "sku0"], "{:?}", report.failures);
    assert!(report.failures.iter().any(|f| f.reason.contains("duplicate sku")));
    assert!(report.failures.iter().all(|f| f.origin.contains("catalog.csv")));
}

#[test]
fn an_interrupted_build_resumes_where_it_stopped_to_the_same_index() {
    let dir = tempfile::tempdir().unwrap();
    let csv = catalog(&dir.path().join("shop"), 5);
    let sources = [CatalogSource::from_path(&csv).unwrap()];
    let embedder = embedder();

    let clean = CatalogStore::open(dir.path().join("clean")).unwrap();
    build(&clean, &sources, &embedder, BoxMode::Detected);

    // A build that dies while embedding, after its third item (saved one by one): its
    // generation stays Building, unseen by readers, with three items written.
    let crashed = CatalogStore::open(dir.path().join("crashed")).unwrap();
    let (mut embedding, mut embedded) = (false, 0);
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let opts = BuildOptions { save_every: 1, ..BuildOptions::default() };
        build_generation(&crashed, &sources, &LabelMap::default(), Models { embedder: &embedder, detector: None }, &opts, &mut |p| match p {
            Progress::Stage { name, .. } => embedding = name == "embedding",
            Progress::Advance(_) if embedding => {
                embedded += 1;
                if embedded == 3 {
                    panic!("killed while embedding");
                }
            }
            _ => {}
        })
    }));
    assert!(died.is_err() && embedded == 3, "the build died in the embedding stage");
    assert_eq!(crashed.published_id().unwrap(), None);
    assert!(crashed.generations().unwrap().iter().any(|g| g.state == GenerationState::Building));

    // The rerun embeds only the two items the dead build had not reached.
    let resumed = build(&crashed, &sources, &embedder, BoxMode::Detected);
    assert!(resumed.resumed);
    assert_eq!((resumed.embedded_items, resumed.added, resumed.items), (2, 5, 5));
    assert_eq!(contents(&crashed), contents(&clean));
}

/// A CSV catalog of six CC0 photos of different kinds (every 50th row of the label-sorted
/// demo catalog) in `dir`, and the shipped detector.
fn cc0_catalog(dir: &Path) -> ([CatalogSource; 1], GarmentDetector) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::create_dir_all(dir.join("shop/images")).unwrap();
    let demo = std::fs::read_to_string(repo.join("demo/catalog/catalog.csv")).unwrap();
    let mut csv: Vec<&str> = vec![demo.lines().next().unwrap()];
    csv.extend(demo.lines().skip(1).step_by(50).take(6));
    for row in &csv[1..] {
        let image = row.split(',').nth(1).unwrap();
        std::fs::copy(repo.join("demo/catalog").join(image), dir.join("shop").join(image)).unwrap();
    }
    std::fs::write(dir.join("shop/catalog.csv"), csv.join("\n") + "\n").unwrap();
    let detector = GarmentDetector::load(&repo.join("models/detector-lite0.safetensors"), &Device::Cpu).unwrap();
    ([CatalogSource::from_path(&dir.join("shop/catalog.csv")).unwrap()], detector)
}

/// Items go through the networks side by side (a chunk at a time): with the detector and its
/// second look on real CC0 photos, the index equals one built an item at a time, bit for bit.
#[test]
fn items_embedded_side_by_side_equal_items_embedded_one_by_one_with_the_detector() {
    let dir = tempfile::tempdir().unwrap();
    let (sources, detector) = cc0_catalog(dir.path());
    let embedder = embedder();
    assert!(detector.config().postprocess.category_fusion > 0.0);
    let models = Models { embedder: &embedder, detector: Some(&detector) };
    let build_with = |name: &str, save_every: usize| {
        let store = CatalogStore::open(dir.path().join(name)).unwrap();
        let report = build_generation(&store, &sources, &LabelMap::default(), models, &BuildOptions { save_every, ..BuildOptions::default() }, &mut |_| {}).unwrap();
        assert_eq!((report.items, report.failures.len()), (6, 0));
        contents(&store)
    };
    let one_by_one = build_with("one-by-one", 1);
    assert_eq!(build_with("side-by-side", 6), one_by_one);
}

/// A stored garment's box, category and embedding.
type Garment = ([f32; 4], String, Vec<f32>);

/// Every garment of a published generation, independent of ids, by sku.
fn garments(store: &CatalogStore) -> BTreeMap<String, Vec<Garment>> {
    let generation = store.published_id().unwrap().unwrap();
    let members = store.generation_members(generation).unwrap();
    let garment = |id| {
        let g = store.garment(id).unwrap();
        ([g.bbox.x1, g.bbox.y1, g.bbox.x2, g.bbox.y2], g.category, g.embedding)
    };
    members.into_iter().map(|(sku, rev)| (sku, store.item(rev).unwrap().garments.into_iter().map(garment).collect())).collect()
}

/// Batched builds (the GPU's way, run here on the CPU with the detector and its second look):
/// a build killed after a batch, or one whose dead run wrote part of a batch at another
/// batch size, resumes to the uninterrupted build bit for bit (the unfinished batch is
/// re-done whole); and its garments are the unbatched build's, embeddings to 1e-5.
#[test]
fn a_batched_build_resumes_to_the_same_index_and_matches_the_unbatched_one() {
    let dir = tempfile::tempdir().unwrap();
    let (sources, detector) = cc0_catalog(dir.path());
    let embedder = embedder();
    let models = Models { embedder: &embedder, detector: Some(&detector) };
    let opts = |batch: usize| BuildOptions { batch, save_every: 1, ..BuildOptions::default() };
    // Builds in `name`, killed after `kill_after` progress steps of the embedding stage.
    let build_killed = |name: &str, batch: usize, kill_after: u64| {
        let store = CatalogStore::open(dir.path().join(name)).unwrap();
        let (mut embedding, mut steps) = (false, 0);
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            build_generation(&store, &sources, &LabelMap::default(), models, &opts(batch), &mut |p| match p {
                Progress::Stage { name, .. } => embedding = name == "embedding",
                Progress::Advance(_) if embedding => {
                    steps += 1;
                    if steps == kill_after {
                        panic!("killed while embedding");
                    }
                }
                _ => {}
            })
        }));
        assert!(died.is_err() && steps == kill_after, "the build died in the embedding stage");
        store
    };
    let build = |store: &CatalogStore, batch: usize| {
        let report = build_generation(store, &sources, &LabelMap::default(), models, &opts(batch), &mut |_| {}).unwrap();
        assert_eq!((report.items, report.failures.len(), report.batch), (6, 0, batch));
        report
    };
    let clean = CatalogStore::open(dir.path().join("clean")).unwrap();
    build(&clean, 4);
    let unbatched = CatalogStore::open(dir.path().join("unbatched")).unwrap();
    build(&unbatched, 1);

    // Killed after its first batch of four: the rerun embeds the last two.
    let crashed = build_killed("after-a-batch", 4, 1);
    let resumed = build(&crashed, 4);
    assert!(resumed.resumed);
    assert_eq!(resumed.embedded_items, 2);
    assert_eq!(contents(&crashed), contents(&clean));

    // The dead run wrote two items of the first batch, at batch 1: the batch of four is
    // formed again and re-done whole, so those two get the batched bits too.
    let partial = build_killed("inside-a-batch", 1, 2);
    let resumed = build(&partial, 4);
    assert_eq!(resumed.embedded_items, 4);
    assert_eq!(contents(&partial), contents(&clean));
    assert_ne!(contents(&unbatched), contents(&clean), "batch sizes move the last bits here, or this test could not see a batch re-done in part");

    // Batched or not, the same garments, embeddings equal to float rounding.
    let (a, b) = (garments(&clean), garments(&unbatched));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (sku, batched) in &a {
        let single = &b[sku];
        assert_eq!(batched.len(), single.len(), "{sku}");
        for ((box_a, cat_a, e_a), (box_b, cat_b, e_b)) in batched.iter().zip(single) {
            assert_eq!(cat_a, cat_b, "{sku}");
            assert!(box_a.iter().zip(box_b).all(|(x, y)| (x - y).abs() < 0.01), "{sku}: {box_a:?} against {box_b:?}");
            let cosine: f32 = e_a.iter().zip(e_b).map(|(x, y)| x * y).sum();
            assert!(cosine > 1.0 - 1e-5, "{sku}: cosine {cosine}");
        }
    }
}

#[test]
fn a_generation_records_its_ann_parameters_and_its_snapshot_rebuilds_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let csv = catalog(&dir.path().join("shop"), 6);
    let db = dir.path().join("db");
    let store = CatalogStore::open(&db).unwrap();
    // Non-default parameters, and a graph even for six garments.
    let ann = AnnParams { m: 24, ef_construction: 120, exact_below: 1, ..AnnParams::default() };
    let opts = BuildOptions { ann: ann.clone(), ..BuildOptions::default() };
    let sources = [CatalogSource::from_path(&csv).unwrap()];
    let report = build_generation(&store, &sources, &LabelMap::default(), Models { embedder: &embedder(), detector: None }, &opts, &mut |_| {}).unwrap();
    let manifest = store.published().unwrap().unwrap();
    assert_eq!(manifest.ann, Some(ann.clone()));
    assert_eq!(manifest.catalogs, vec![csv.display().to_string()]);
    let (_, item) = store.published_item("sku4").unwrap();
    assert_eq!(item.image_path.as_deref().map(Path::new), Some(dir.path().join("shop/images/4.jpg").as_path()));

    // Readers load the dump built with those parameters rather than rebuild it.
    let index = ServingIndex::load_current(&db).unwrap().unwrap();
    assert_eq!(index.outcome, LoadOutcome::Loaded);
    assert_eq!(index.snapshot().ann, Some(ann));
    assert_eq!(index.item("sku4").unwrap().image_path, dir.path().join("shop/images/4.jpg"));

    // The snapshot is derived data: rewritten from the store alone, byte for byte.
    let file = db.join("serving").join(snapshot::file_name(report.generation));
    let written = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    std::fs::remove_file(db.join("serving").join(snapshot::CURRENT)).unwrap();
    assert_eq!(write_serving_snapshot(&store).unwrap(), Some(report.generation));
    assert_eq!(std::fs::read(&file).unwrap(), written);
    assert_eq!(snapshot::current(&db.join("serving")).unwrap(), Some(report.generation));
}

#[test]
fn a_moved_image_file_gets_a_new_revision_without_new_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let csv = catalog(&dir.path().join("shop"), 2);
    let store = CatalogStore::open(dir.path().join("db")).unwrap();
    let embedder = embedder();
    let sources = [CatalogSource::from_path(&csv).unwrap()];
    build(&store, &sources, &embedder, BoxMode::Detected);
    let before = contents(&store);
    std::fs::rename(dir.path().join("shop/images/1.jpg"), dir.path().join("shop/images/moved.jpg")).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap().replace("images/1.jpg", "images/moved.jpg");
    std::fs::write(&csv, text).unwrap();
    let again = build(&store, &sources, &embedder, BoxMode::Detected);
    assert_eq!((again.updated, again.unchanged, again.embedded_items), (1, 1, 0));
    assert_eq!(contents(&store), before);
    let (_, item) = store.published_item("sku1").unwrap();
    assert!(item.image_path.unwrap().ends_with("moved.jpg"));
}

#[test]
fn deepfashion2_shop_folders_index_their_annotated_boxes() {
    let dir = tempfile::tempdir().unwrap();
    synth::generate(dir.path(), &SynthConfig { images: 3, seed: 5, ..SynthConfig::default() }).unwrap();
    let store = CatalogStore::open(dir.path().join("db")).unwrap();
    let source = CatalogSource::from_path(&dir.path().join("shop")).unwrap();
    let report = build(&store, &[source], &embedder(), BoxMode::Gt);
    let shop_images = std::fs::read_dir(dir.path().join("shop/image")).unwrap().count() as u64;
    assert_eq!((report.items, report.garments), (shop_images, shop_images));
    let (_, item) = store.published_item("000001").unwrap();
    let garment = store.garment(item.garments[0]).unwrap();
    assert!(garment.bbox.is_valid(), "the annotated box, not the whole image");
    assert_eq!(item.metadata.attributes["pair_id"], "1");
}

#[cfg(unix)]
#[test]
fn links_devices_and_fifos_in_a_catalog_are_refused_rows_not_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let shop = dir.path().join("shop");
    let csv = catalog(&shop, 2);
    let secret = dir.path().join("secret.jpg");
    write_image(&secret, 9);
    std::os::unix::fs::symlink(&secret, shop.join("images/link.jpg")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", shop.join("images/zero.jpg")).unwrap();
    std::os::unix::fs::symlink(dir.path(), shop.join("up")).unwrap();
    let fifo = std::ffi::CString::new(shop.join("images/fifo.jpg").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let mut text = std::fs::read_to_string(&csv).unwrap();
    for (sku, image) in [("link", "images/link.jpg"), ("zero", "images/zero.jpg"), ("fifo", "images/fifo.jpg"), ("up", "up/secret.jpg")] {
        text.push_str(&format!("{sku},{image},T-Shirt,Hostile,1\n"));
    }
    std::fs::write(&csv, text).unwrap();
    let store = CatalogStore::open(dir.path().join("db")).unwrap();
    let report = build(&store, &[CatalogSource::from_path(&csv).unwrap()], &embedder(), BoxMode::Detected);
    // The two real images are indexed; each hostile row is a failure naming why.
    assert_eq!(contents(&store).keys().cloned().collect::<Vec<_>>(), ["sku0", "sku1"]);
    let reason = |sku: &str| report.failures.iter().find(|f| f.sku.as_deref() == Some(sku)).map(|f| f.reason.clone()).unwrap_or_default();
    assert!(reason("link").contains("outside"), "{}", reason("link"));
    assert!(reason("up").contains("outside"), "{}", reason("up"));
    assert!(reason("zero").contains("outside") || reason("zero").contains("not a regular file"), "{}", reason("zero"));
    assert!(reason("fifo").contains("not a regular file"), "{}", reason("fifo"));
}
