//! Catalog store: fetching the k items of a result list, reading a generation's garments
//! (what the searcher does on load), and publishing a generation.

use std::collections::BTreeMap;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use shoplens::geometry::BBox;
use shoplens::store::{CatalogStore, ContentHash, GenerationSpec, ItemMetadata, NewGarment};
use shoplens_benches::{env_usize, short};

const DIM: usize = 256;

fn bench(c: &mut Criterion) {
    let n = env_usize("SHOPLENS_BENCH_ITEMS", 5_000);
    let dir = std::env::temp_dir().join(format!("shoplens-bench-store-{}", std::process::id()));
    let store = CatalogStore::open(&dir).unwrap();
    let spec = GenerationSpec { dim: DIM as u32, models: BTreeMap::from([("embedder".into(), "bench".into())]) };
    let started = Instant::now();
    let builder = store.begin_generation(spec).unwrap();
    for i in 0..n {
        let metadata = ItemMetadata { sku: format!("sku-{i:07}"), title: Some(format!("Item {i}")), image: format!("images/{i}.jpg"), ..Default::default() };
        let garment = NewGarment { bbox: BBox::new(0.0, 0.0, 100.0, 120.0), category: "top".into(), score: 1.0, embedding: vec![(i % 7) as f32 + 1.0; DIM] };
        builder.put_item(metadata, ContentHash::of_bytes(&i.to_le_bytes()), vec![garment]).unwrap();
    }
    let generation = builder.publish().unwrap().id;
    eprintln!("store_write/items={},d={DIM}: {:.2} s ({:.0} items/s, one transaction each)", short(n), started.elapsed().as_secs_f64(), n as f64 / started.elapsed().as_secs_f64());

    let mut group = c.benchmark_group("store");
    for k in [10usize, 100] {
        let mut at = 0;
        group.bench_function(BenchmarkId::from_parameter(format!("fetch_items/items={},k={k}", short(n))), |b| {
            b.iter(|| {
                for _ in 0..k {
                    at = (at + 7919) % n;
                    store.published_item(&format!("sku-{at:07}")).unwrap();
                }
            })
        });
    }
    group.sample_size(10);
    group.bench_function(BenchmarkId::from_parameter(format!("read_generation/items={},d={DIM}", short(n))), |b| {
        b.iter(|| store.generation_garments(generation).unwrap().garments.len())
    });
    group.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
