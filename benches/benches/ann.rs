//! ANN search: recall@10 beside queries/s, category filters, exact search, build time and
//! memory. `SHOPLENS_BENCH_N` sets the number of garments (default 20000; 100000 and
//! 1000000 are the sizes and take minutes to hours to build on 2 cores).

use std::collections::HashSet;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use shoplens::ann::synthetic::{clustered, queries_near};
use shoplens::ann::{AnnParams, GarmentIndex, SearchPath, graph};
use shoplens_benches::{env_usize, resident_bytes, short};

const DIM: usize = 256;
const K: usize = 10;

fn recall(index: &GarmentIndex, queries: &[Vec<f32>], category: Option<&str>, ef: usize) -> f64 {
    let mut found = 0;
    for q in queries {
        let truth: HashSet<u64> = index.search_exact(q, K, category).unwrap().iter().map(|h| h.garment).collect();
        let (hits, _) = index.search_with(q, K, category, Some(ef)).unwrap();
        found += hits.iter().filter(|h| truth.contains(&h.garment)).count();
    }
    found as f64 / (K * queries.len()) as f64
}

fn bench(c: &mut Criterion) {
    let n = env_usize("SHOPLENS_BENCH_N", 20_000);
    let tag = format!("n={},d={DIM}", short(n));
    // 10 categories: a category filter keeps 10% of the garments.
    let vectors = clustered(n, DIM, 1000.min(n / 10).max(1), 10, 42);
    let queries = queries_near(&vectors, 500, 43);

    let params = AnnParams { exact_below: 0, ..AnnParams::default() };
    let rss_before = resident_bytes().unwrap_or(0);
    let started = Instant::now();
    let index = GarmentIndex::build(1, vectors.clone(), params.clone()).unwrap();
    let build = started.elapsed();
    let rss_growth = resident_bytes().unwrap_or(0).saturating_sub(rss_before);
    eprintln!(
        "ann_build/{tag},M={},efc={}: {:.1} s ({:.0} inserts/s), RSS growth {} B/vector (raw vector {} B; includes the graph's own copy)",
        params.m,
        params.ef_construction,
        build.as_secs_f64(),
        n as f64 / build.as_secs_f64(),
        rss_growth / n as u64,
        DIM * 4
    );

    let mut group = c.benchmark_group("ann_search");
    for ef in [16, 32, 64, 128] {
        let r = recall(&index, &queries, None, ef);
        eprintln!("ann_search/{tag},M=16,ef={ef}: recall@10 {r:.4}");
        let mut i = 0;
        group.bench_function(BenchmarkId::from_parameter(format!("{tag},M=16,ef={ef}")), |b| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                index.search_with(&queries[i], K, None, Some(ef)).unwrap()
            })
        });
    }
    group.finish();

    // Category filter at 10% selectivity: each path of ours, and hnsw_rs's own filtered search.
    let mut group = c.benchmark_group("ann_search_filtered");
    let over_fetch = GarmentIndex::build(1, vectors.clone(), AnnParams { exact_below: 0, filter_exact_max: 0, ..AnnParams::default() }).unwrap();
    for (name, idx, want) in [("exact-category", &index, SearchPath::ExactCategory), ("over-fetch", &over_fetch, SearchPath::GraphOverFetch)] {
        let r = recall(idx, &queries, Some("cat3"), 64);
        eprintln!("ann_search_filtered/{tag},sel=10%,path={name},ef=64: recall@10 {r:.4}");
        let mut i = 0;
        group.bench_function(BenchmarkId::from_parameter(format!("{tag},sel=10%,path={name},ef=64")), |b| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                let (hits, path) = idx.search_with(&queries[i], K, Some("cat3"), Some(64)).unwrap();
                debug_assert!(path == want || path == SearchPath::GraphFiltered);
                hits
            })
        });
    }
    let raw = graph::build_hnsw(&vectors, &params);
    // hnsw_rs's own search gets the normalised queries our index would pass it.
    let unit_queries: Vec<Vec<f32>> = queries
        .iter()
        .map(|q| {
            let n = q.iter().map(|x| x * x).sum::<f32>().sqrt();
            q.iter().map(|x| x / n).collect()
        })
        .collect();
    let allowed: Vec<usize> = (0..vectors.len()).filter(|&r| vectors.category(r) == "cat3").collect();
    let mut i = 0;
    group.sample_size(10);
    group.bench_function(BenchmarkId::from_parameter(format!("{tag},sel=10%,path=hnsw_rs-filter,ef=64")), |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            raw.search_filter(&unit_queries[i], K, 64, Some(&allowed))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("exact_search");
    let mut i = 0;
    group.bench_function(BenchmarkId::from_parameter(&tag), |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            index.search_exact(&queries[i], K, None).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
