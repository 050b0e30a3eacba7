use std::collections::HashSet;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use shoplens::Error;
use shoplens::ann::synthetic::{clustered, queries_near, unit};
use shoplens::ann::{AnnParams, GarmentIndex, LoadOutcome, SearchPath, graph};

const DIM: usize = 64;

fn params() -> AnnParams {
    AnnParams { exact_below: 100, filter_exact_max: 500, ..AnnParams::default() }
}

fn near_queries(index: &GarmentIndex, n: usize, seed: u64) -> Vec<Vec<f32>> {
    queries_near(index.vectors(), n, seed)
}

fn recall_at_10(index: &GarmentIndex, queries: &[Vec<f32>], category: Option<&str>) -> f64 {
    let mut found = 0;
    for q in queries {
        let truth: HashSet<u64> = index.search_exact(q, 10, category).unwrap().iter().map(|h| h.garment).collect();
        found += index.search(q, 10, category).unwrap().iter().filter(|h| truth.contains(&h.garment)).count();
    }
    found as f64 / (10 * queries.len()) as f64
}

#[test]
fn hnsw_recall_at_10_against_exact_search() {
    let index = GarmentIndex::build(1, clustered(4000, DIM, 100, 4, 1), params()).unwrap();
    assert!(index.has_graph());
    let qs = near_queries(&index, 200, 2);
    let recall = recall_at_10(&index, &qs, None);
    assert!(recall >= 0.95, "recall@10 {recall}");
    let (_, path) = index.search_with(&qs[0], 10, None, None).unwrap();
    assert_eq!(path, SearchPath::Graph);
}

#[test]
fn category_filter_returns_only_that_category_on_every_path() {
    // 4 categories of 1000: with filter_exact_max 500 the graph over-fetch path answers;
    // raising it answers exactly over the category.
    let vectors = clustered(4000, DIM, 100, 4, 3);
    let index = GarmentIndex::build(1, vectors.clone(), params()).unwrap();
    let qs = near_queries(&index, 50, 4);
    for q in &qs {
        let (hits, path) = index.search_with(q, 10, Some("cat2"), None).unwrap();
        assert_eq!(hits.len(), 10);
        assert!(matches!(path, SearchPath::GraphOverFetch | SearchPath::GraphFiltered));
        assert!(hits.iter().all(|h| index.vectors().category(h.row as usize) == "cat2"));
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }
    assert!(recall_at_10(&index, &qs, Some("cat2")) >= 0.95);
    let exact = GarmentIndex::build(1, vectors, AnnParams { filter_exact_max: 5000, ..params() }).unwrap();
    let (hits, path) = exact.search_with(&qs[0], 10, Some("cat1"), None).unwrap();
    assert_eq!(path, SearchPath::ExactCategory);
    assert!(hits.iter().all(|h| exact.vectors().category(h.row as usize) == "cat1"));
    assert!(matches!(index.search(&qs[0], 10, Some("hats")), Err(Error::UnknownCategory(_))));
}

#[test]
fn small_indexes_are_exact_and_bad_queries_are_user_errors() {
    let index = GarmentIndex::build(1, clustered(50, 8, 5, 2, 5), params()).unwrap();
    assert!(!index.has_graph());
    let q = &unit(&mut ChaCha8Rng::seed_from_u64(6), 8);
    let (hits, path) = index.search_with(q, 100, None, None).unwrap();
    assert_eq!((hits.len(), path), (50, SearchPath::Exact));
    for err in [
        index.search(&[1.0; 7], 5, None).unwrap_err(),
        index.search(&[0.0; 8], 5, None).unwrap_err(),
        index.search(&[f32::NAN; 8], 5, None).unwrap_err(),
        index.search(q, 0, None).unwrap_err(),
        index.search(q, 5000, None).unwrap_err(),
    ] {
        assert!(err.is_user_error(), "{err}");
    }
}

#[test]
fn dump_then_reload_gives_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = clustered(3000, DIM, 80, 3, 7);
    let (built, outcome) = GarmentIndex::open(Some(dir.path()), 5, vectors.clone(), params()).unwrap();
    assert!(matches!(outcome, LoadOutcome::Built { .. }));
    assert!(dir.path().join(format!("{}.ann.json", graph::basename(5))).is_file());
    let (loaded, outcome) = GarmentIndex::open(Some(dir.path()), 5, vectors, params()).unwrap();
    assert_eq!(outcome, LoadOutcome::Loaded);
    for q in near_queries(&built, 100, 8) {
        assert_eq!(built.search(&q, 10, None).unwrap(), loaded.search(&q, 10, None).unwrap());
    }
}

#[test]
fn a_damaged_or_stale_dump_is_rebuilt_never_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = clustered(1500, DIM, 40, 3, 9);
    GarmentIndex::open(Some(dir.path()), 2, vectors.clone(), params()).unwrap();
    let base = dir.path().join(graph::basename(2));

    // Flip bytes in the graph file: the hash catches it.
    let graph_file = base.with_extension("graph");
    let good = std::fs::read(&graph_file).unwrap();
    let mut bytes = good.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&graph_file, &bytes).unwrap();
    let (_, outcome) = GarmentIndex::open(Some(dir.path()), 2, vectors.clone(), params()).unwrap();
    assert!(matches!(&outcome, LoadOutcome::Built { reason } if reason.contains("damaged")), "{outcome:?}");

    // A truncated graph whose side file was rewritten to vouch for it: the reader's own
    // checks refuse it.
    std::fs::write(&graph_file, &good[..good.len() / 12 * 4]).unwrap();
    let side_file = base.with_extension("ann.json");
    let mut side: serde_json::Value = serde_json::from_slice(&std::fs::read(&side_file).unwrap()).unwrap();
    side["graph_blake3"] = blake3::hash(&good[..good.len() / 12 * 4]).to_hex().to_string().into();
    std::fs::write(&side_file, serde_json::to_vec(&side).unwrap()).unwrap();
    let (_, outcome) = GarmentIndex::open(Some(dir.path()), 2, vectors.clone(), params()).unwrap();
    assert!(matches!(&outcome, LoadOutcome::Built { reason } if reason.contains("ends after")), "{outcome:?}");

    // Other parameters, other garments, or a garbage side file: rebuilt.
    let other = AnnParams { m: 24, ..params() };
    assert!(matches!(GarmentIndex::open(Some(dir.path()), 2, vectors.clone(), other).unwrap().1, LoadOutcome::Built { .. }));
    let (_, outcome) = GarmentIndex::open(Some(dir.path()), 2, clustered(1500, DIM, 40, 3, 10), params()).unwrap();
    assert!(matches!(outcome, LoadOutcome::Built { .. }));
    std::fs::write(base.with_extension("ann.json"), b"{oops").unwrap();
    let (index, outcome) = GarmentIndex::open(Some(dir.path()), 2, vectors.clone(), params()).unwrap();
    assert!(matches!(outcome, LoadOutcome::Built { .. }));
    assert_eq!(index.len(), 1500);
    // And after the rebuild the dump is good again.
    assert_eq!(GarmentIndex::open(Some(dir.path()), 2, vectors, params()).unwrap().1, LoadOutcome::Loaded);
}

#[test]
fn each_generation_has_its_own_dump_and_old_ones_can_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = clustered(600, 16, 20, 2, 11);
    let v2 = clustered(700, 16, 20, 2, 12);
    GarmentIndex::open(Some(dir.path()), 1, v1.clone(), params()).unwrap();
    GarmentIndex::open(Some(dir.path()), 2, v2.clone(), params()).unwrap();
    // Writing generation 2 did not touch generation 1's dump.
    assert_eq!(GarmentIndex::open(Some(dir.path()), 1, v1.clone(), params()).unwrap().1, LoadOutcome::Loaded);
    assert_eq!(graph::remove_dumps_except(dir.path(), &[2]).unwrap(), 1);
    assert!(matches!(GarmentIndex::open(Some(dir.path()), 1, v1, params()).unwrap().1, LoadOutcome::Built { .. }));
    assert_eq!(GarmentIndex::open(Some(dir.path()), 2, v2, params()).unwrap().1, LoadOutcome::Loaded);
}
