//! Network forward passes on the CPU: the EfficientNet-Lite0 backbone at batch 1 and 8
//! (224×224, the shipped ImageNet weights) and the garment embedder at batch 1 and 8.

use std::path::Path;

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
