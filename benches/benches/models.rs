//! Network forward passes on the CPU: the EfficientNet-Lite0 backbone at batch 1 and 8
//! (224×224, the shipped ImageNet weights; also candle's plain convolutions at batch 1, the
//! path before issue 5), the garment embedder and the detector network at batch 1 and 8;
//! then, on one real street photo scaled to 640 pixels on its long side
//! (`$SHOPLENS_DATA/street2shop-ccp/user/image/000001.jpg`, default `../shared/data`;
//! skipped with a message when the data is absent): preprocessing (decode, letterbox,
//! normalise), detection, detection + embedding, and a whole in-process search against a
//! 20k-garment synthetic index (`SearchEngine::search`, what `/v1/search` runs).

use std::path::Path;

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use shoplens::models::backbone::efficientnet_lite::EfficientNetLite;
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;

fn bench(c: &mut Criterion) {
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/efficientnet-lite0.safetensors");
    let net = EfficientNetLite::load(&weights, &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("backbone_forward");
    group.sample_size(10);
    for batch in [1usize, 8] {
        let x = Tensor::randn(0f32, 1., (batch, 3, 224, 224), &Device::Cpu).unwrap();
        group.bench_function(BenchmarkId::from_parameter(format!("efficientnet-lite0,size=224,batch={batch},threads={}", rayon::current_num_threads())), |b| {
            b.iter(|| net.pooled(&x).unwrap())
        });
    }
    let x = Tensor::randn(0f32, 1., (1, 3, 224, 224), &Device::Cpu).unwrap();
    group.bench_function(BenchmarkId::from_parameter(format!("efficientnet-lite0,size=224,batch=1,threads={},path=candle-plain", rayon::current_num_threads())), |b| {
        b.iter(|| net.feature_map_reference(&x).unwrap())
    });
    group.finish();

    // The embedding of garment crops: backbone + GeM + projection, inputs already
    // preprocessed (preprocessing is measured on its own).
    let embedder = GarmentEmbedder::load(&weights.with_file_name("embedder-lite0.safetensors"), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("embedder_forward");
    group.sample_size(10);
    for batch in [1usize, 8] {
        let x = Tensor::randn(0f32, 1., (batch, 3, 224, 224), &Device::Cpu).unwrap();
        group.bench_function(BenchmarkId::from_parameter(format!("embedder-lite0,dim=256,batch={batch},threads={}", rayon::current_num_threads())), |b| {
            b.iter(|| embedder.embed_batch(&x).unwrap())
        });
    }
    group.finish();

    let detector = GarmentDetector::load(&weights.with_file_name("detector-lite0.safetensors"), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("detector_forward");
    group.sample_size(10);
    let size = detector.config().preprocess.size as usize;
    for batch in [1usize, 8] {
        let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &Device::Cpu).unwrap();
        group.bench_function(BenchmarkId::from_parameter(format!("detector-lite0,size={size},batch={batch},threads={}", rayon::current_num_threads())), |b| {
            b.iter(|| detector.forward(&x).unwrap())
        });
    }
    group.finish();

    let data = std::env::var("SHOPLENS_DATA").map(std::path::PathBuf::from).unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    let photo = data.join("street2shop-ccp/user/image/000001.jpg");
    let Ok(original) = image::open(&photo) else {
        eprintln!("detector benchmark skipped: {} not found (set SHOPLENS_DATA)", photo.display());
        return;
    };
    let (w, h) = (original.width(), original.height());
    let scale = 640.0 / w.max(h) as f32;
    let image = original.resize_exact((w as f32 * scale).round() as u32, (h as f32 * scale).round() as u32, image::imageops::FilterType::Triangle).to_rgb8();
    let mut jpeg = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    let mut group = c.benchmark_group("preprocess");
    for size in [224u32, 320] {
        let pre = shoplens::vision::Preprocess { size, ..shoplens::vision::Preprocess::LITE0 };
        let id = format!("decode+letterbox+normalise,photo={}x{},jpeg,size={size}", image.width(), image.height());
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| pre.crop_to_tensor(&shoplens::vision::decode_image(&jpeg, Default::default()).unwrap(), None, &Device::Cpu).unwrap())
        });
    }
    // The packshot test every detected photo goes through: a street photo stops at its
    // border; a cut-out on white is scanned whole for its product's extent.
    let cutout = image::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tests/fixtures/cutouts/pants.jpg")).unwrap().to_rgb8();
    for (name, photo) in [("street", &image), ("cutout", &cutout)] {
        group.bench_function(BenchmarkId::new("product_extent", format!("{name},{}x{}", photo.width(), photo.height())), |b| b.iter(|| shoplens::vision::product_extent(photo)));
    }
    group.finish();

    let mut group = c.benchmark_group("detector");
    group.sample_size(20);
    let size = detector.config().preprocess.size;
    let id = format!("{}x{},input={size},threads={}", image.width(), image.height(), rayon::current_num_threads());
    group.bench_function(BenchmarkId::new("detect", &id), |b| b.iter(|| detector.detect(&image).unwrap()));
    group.bench_function(BenchmarkId::new("decode_jpeg+detect", &id), |b| b.iter(|| detector.detect(&shoplens::vision::decode_image(&jpeg, Default::default()).unwrap()).unwrap()));
    // Detection and the embedding of what it found (with the second look): the engine's
    // work for one photo before the ANN search.
    group.bench_function(BenchmarkId::new("detect+embed_garments", &id), |b| {
        b.iter(|| {
            let pipeline = shoplens::pipeline::GarmentPipeline { detector: Some(&detector), embedder: &embedder, limits: Default::default() };
            pipeline.find_garments(&image).unwrap()
        })
    });
    group.finish();

    // The whole search of one photo in process: decode, detect, embed each garment, ANN
    // search, fetch; a synthetic 20k-garment index over the detector's categories.
    let index = synthetic_index(20_000, embedder.dim(), &detector);
    let engine = shoplens::serving::engine::SearchEngine { detector: Some(detector), embedder, limits: Default::default() };
    let request = shoplens::serving::engine::SearchRequest { k: 10, category: None, region: None, ranking: Default::default() };
    let mut group = c.benchmark_group("search");
    group.sample_size(20);
    group.bench_function(BenchmarkId::new("engine", format!("{id},garments=20k,k=10")), |b| b.iter(|| engine.search(&index, &jpeg, &request).unwrap()));
    group.finish();
}

/// A serving index of `n` clustered synthetic garments, one item each, spread over the
/// detector's categories.
fn synthetic_index(n: usize, dim: usize, detector: &GarmentDetector) -> shoplens::serving::engine::ServingIndex {
    use shoplens::serving::snapshot::{ServedGarment, ServedItem, Snapshot};
    let vectors = shoplens::ann::synthetic::clustered(n, dim, 1000, 1, 42);
    let categories: Vec<String> = detector.config().categories.iter().map(|c| c.name.clone()).collect();
    let items = (0..n)
        .map(|i| ServedItem {
            metadata: shoplens::store::ItemMetadata { sku: format!("sku-{i}"), category: Some(categories[i % categories.len()].clone()), ..Default::default() },
            image_path: format!("{i}.jpg").into(),
            content_hash: String::new(),
        })
        .collect();
    let garments = (0..n)
        .map(|i| ServedGarment {
            id: i as u64,
            item: i as u32,
            bbox: shoplens::geometry::BBox::new(0., 0., 10., 10.),
            category: categories[i % categories.len()].clone(),
            score: 1.0,
        })
        .collect();
    let snapshot = Snapshot { generation: 1, built_at: None, models: Default::default(), dim: dim as u32, items, garments, embeddings: vectors.as_slice().to_vec(), ann: None };
    shoplens::serving::engine::ServingIndex::from_snapshot(snapshot, None).unwrap()
}

criterion_group!(benches, bench);
criterion_main!(benches);
