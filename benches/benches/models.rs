//! Network forward passes on the CPU: the EfficientNet-Lite0 backbone at batch 1 and 8
//! (224×224, the shipped ImageNet weights), the garment embedder at batch 1 and 8, and the
//! garment detector on one real street photo scaled to 640 pixels on its long side
//! (`$SHOPLENS_DATA/street2shop-ccp/user/image/000001.jpg`, default `../shared/data`;
//! skipped with a message when the data is absent).

use std::path::Path;

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use shoplens::models::detector::GarmentDetector;
use shoplens::models::efficientnet_lite::EfficientNetLite;
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

    let data = std::env::var("SHOPLENS_DATA").map(std::path::PathBuf::from).unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    let photo = data.join("street2shop-ccp/user/image/000001.jpg");
    let Ok(original) = image::open(&photo) else {
        eprintln!("detector benchmark skipped: {} not found (set SHOPLENS_DATA)", photo.display());
        return;
    };
    let (w, h) = (original.width(), original.height());
    let scale = 640.0 / w.max(h) as f32;
    let image = original.resize_exact((w as f32 * scale).round() as u32, (h as f32 * scale).round() as u32, image::imageops::FilterType::Triangle).to_rgb8();
    let detector = GarmentDetector::load(&weights.with_file_name("detector-lite0.safetensors"), &Device::Cpu).unwrap();
    let mut jpeg = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    let mut group = c.benchmark_group("detector");
    group.sample_size(20);
    let size = detector.config().preprocess.size;
    let id = format!("{}x{},input={size},threads={}", image.width(), image.height(), rayon::current_num_threads());
    group.bench_function(BenchmarkId::new("detect", &id), |b| b.iter(|| detector.detect(&image).unwrap()));
    group.bench_function(BenchmarkId::new("decode_jpeg+detect", &id), |b| {
        b.iter(|| detector.detect(&shoplens::vision::decode_image(&jpeg, Default::default()).unwrap()).unwrap())
    });
    // Detection and the embedding of what it found: the engine's work for one photo
    // before the ANN search.
    group.bench_function(BenchmarkId::new("detect+embed_garments", &id), |b| {
        b.iter(|| {
            let found = detector.detect(&image).unwrap();
            let boxes: Vec<Option<shoplens::geometry::BBox>> = found.iter().map(|d| Some(d.bbox)).collect();
            embedder.embed_crops(&image, &boxes).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
