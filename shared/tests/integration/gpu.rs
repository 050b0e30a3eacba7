//! The networks on a CUDA GPU against the CPU (issue 20): the same weights and inputs give
//! the same features, detections and embeddings within float tolerance. On a GPU our CPU
//! kernels are replaced by candle's own operations, so only a tolerance can hold, not bits.
//!
//! Runs only in a `--features cuda` build on a machine with a GPU (`benches/gpu-check.sh`);
//! elsewhere each test prints why it checked nothing and passes.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use shoplens::models::Backbone;
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::pipeline::GarmentPipeline;
use shoplens::vision::{DecodeLimits, decode_image};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The GPU, or `None` with the reason printed.
fn gpu() -> Option<Device> {
    match Device::cuda_if_available(0) {
        Ok(device @ Device::Cuda(_)) => Some(device),
        Ok(_) if !shoplens::device::cuda_compiled() => {
            eprintln!("skipped: this build has no `cuda` feature (benches/gpu-check.sh runs these tests on a GPU)");
            None
        }
        Ok(_) => {
            eprintln!("skipped: a `cuda` build, but no CUDA GPU is present");
            None
        }
        Err(e) => {
            eprintln!("skipped: the CUDA device did not open: {e}");
            None
        }
    }
}

fn photos() -> Vec<image::RgbImage> {
    ["shared/tests/fixtures/cutouts/pants.jpg", "shared/tests/fixtures/lite0/catalog-t-shirt-00003aeb.jpg"]
        .iter()
        .map(|p| decode_image(&std::fs::read(repo().join(p)).unwrap(), DecodeLimits::default()).unwrap())
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn the_backbone_on_the_gpu_gives_the_cpus_features_at_batch_1_and_3() {
    let Some(gpu) = gpu() else { return };
    let path = repo().join("models/efficientnet-lite0.safetensors");
    let (cpu_net, gpu_net) = (Backbone::load(&path, &Device::Cpu).unwrap(), Backbone::load(&path, &gpu).unwrap());
    let pre = cpu_net.embedding_preprocess();
    let inputs: Vec<Tensor> = photos().iter().map(|p| pre.crop_to_tensor(p, None, &Device::Cpu).unwrap()).collect();
    for batch in [Tensor::stack(&inputs[..1], 0).unwrap(), Tensor::stack(&[&inputs[0], &inputs[1], &inputs[0]], 0).unwrap()] {
        let on_cpu = cpu_net.pooled(&batch).unwrap().to_vec2::<f32>().unwrap();
        let on_gpu = gpu_net.pooled(&batch.to_device(&gpu).unwrap()).unwrap().to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        for (c, g) in on_cpu.iter().zip(&on_gpu) {
            assert!(cosine(c, g) > 0.9999, "pooled features: cosine {}", cosine(c, g));
        }
    }
}

#[test]
fn detection_and_embedding_on_the_gpu_give_the_cpus_garments() {
    let Some(gpu) = gpu() else { return };
    let load = |device: &Device| {
        (
            GarmentDetector::load(&repo().join("models/detector-lite0.safetensors"), device).unwrap(),
            GarmentEmbedder::load(&repo().join("models/embedder-lite0.safetensors"), device).unwrap(),
        )
    };
    let ((cpu_det, cpu_emb), (gpu_det, gpu_emb)) = (load(&Device::Cpu), load(&gpu));
    let cpu = GarmentPipeline { detector: Some(&cpu_det), embedder: &cpu_emb, limits: DecodeLimits::default() };
    let gpu = GarmentPipeline { detector: Some(&gpu_det), embedder: &gpu_emb, limits: DecodeLimits::default() };
    for photo in photos() {
        let (a, b) = (cpu.find_garments(&photo).unwrap(), gpu.find_garments(&photo).unwrap());
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.detection.category, y.detection.category);
            assert!(x.detection.bbox.iou(&y.detection.bbox) > 0.99, "{:?} vs {:?}", x.detection, y.detection);
            assert!((x.detection.score - y.detection.score).abs() < 1e-3);
            assert!(cosine(&x.embedding, &y.embedding) > 0.9999);
        }
        let whole = [None];
        assert!(cosine(&cpu.embed(&photo, &whole).unwrap()[0], &gpu.embed(&photo, &whole).unwrap()[0]) > 0.9999);
    }
}
