//! The DeepFashion2 retrieval protocol end to end on the synthetic set: build the gallery
//! index from its shop folder, query with its consumer folder.

use std::path::Path;

use candle_core::Device;
use shoplens::ann::{AnnParams, LoadOutcome};
use shoplens::catalog::{CatalogSource, LabelMap};
use shoplens::datasets::synth::{self, SynthConfig};
use shoplens::datasets::{Df2Folder, read_gallery_gt, read_query_gt};
use shoplens::evaluation::retrieval::{RetrievalInputs, evaluate_with_gt_boxes};
use shoplens::indexing::{BoxMode, BuildOptions, Models, build_generation};
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::serving::engine::{SearchEngine, ServingIndex};
use shoplens::store::CatalogStore;

#[test]
fn retrieval_protocol_on_the_synthetic_set() {
    let dir = tempfile::tempdir().unwrap();
    synth::generate(dir.path(), &SynthConfig { images: 8, seed: 21, ..SynthConfig::default() }).unwrap();
    let embedder = GarmentEmbedder::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/embedder-lite0.safetensors"), &Device::Cpu).unwrap();
    let store = CatalogStore::open(dir.path().join("db")).unwrap();
    // Non-default ANN parameters, and a graph even for this small gallery: the evaluation
    // must load the generation's dump as the searcher does, not rebuild it with defaults.
    let ann = AnnParams { m: 24, exact_below: 1, ..AnnParams::default() };
    let opts = BuildOptions { boxes: BoxMode::Gt, ann, ..BuildOptions::default() };
    build_generation(
        &store,
        &[CatalogSource::from_path(&dir.path().join("shop")).unwrap()],
        &LabelMap::default(),
        Models { embedder: &embedder, detector: None },
        &opts,
        &mut |_| {},
    )
    .unwrap();
    drop(store);
    let index = ServingIndex::load_current(&dir.path().join("db")).unwrap().unwrap();
    assert_eq!(index.outcome, LoadOutcome::Loaded);
    let engine = SearchEngine { detector: None, embedder, limits: Default::default() };
    let folder = Df2Folder::open(dir.path().join("user")).unwrap();
    let query_gt = read_query_gt(&dir.path().join("query_gt.json")).unwrap();
    let gallery_gt = read_gallery_gt(&dir.path().join("gallery_gt.json")).unwrap();
    assert!(gallery_gt.len() <= 20, "a gallery this small is returned whole");
    let inputs = RetrievalInputs { engine: &engine, index: &index, queries: &folder, query_gt: &query_gt, gallery_gt: &gallery_gt };
    let (report, submission) = evaluate_with_gt_boxes(&inputs, &mut |_| {}).unwrap();
    assert_eq!(report.queries, query_gt.len());
    assert_eq!((report.misses, submission.len()), (0, query_gt.len()));
    // Every shop garment comes back within the top 20, and its box is the annotated one:
    // so top-20 is 1 exactly when the sku → gallery image mapping and the IoU test work.
    assert_eq!(report.top_k["20"], 1.0, "{report:?}");
    let k: Vec<f64> = ["1", "5", "10", "15", "20"].iter().map(|k| report.top_k[*k]).collect();
    assert!(k.windows(2).all(|w| w[0] <= w[1]), "{k:?}");
    assert!(report.top_k["1"] > 1.0 / gallery_gt.len() as f64, "better than chance: {k:?}");
    assert_eq!(report.per_category.values().map(|g| g.queries).sum::<usize>(), report.queries);
    assert!(submission.iter().all(|s| s.gallery_image_id.len() == gallery_gt.len().min(20)));
}
