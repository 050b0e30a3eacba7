//! The networks on a CUDA GPU against the CPU (issue 20): our GPU kernels (depthwise
//! convolution, epilogue) give the CPU kernels' bits; the whole networks, whose matrix
//! products are cuBLAS's on the GPU, give the same features, detections and embeddings
//! within float tolerance; a batched build on the GPU gives the same bits every time.
//!
//! Runs only in a `--features cuda` build on a machine with a GPU (`benches/gpu-check.sh`);
//! elsewhere each test prints why it checked nothing and passes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use shoplens::catalog::{CatalogSource, LabelMap};
use shoplens::indexing::{BuildOptions, Models, build_generation};
use shoplens::models::Backbone;
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::models::formats::tensors::NamedTensors;
use shoplens::models::kernels::depthwise::DepthwiseConvBn;
use shoplens::models::kernels::layers::ConvBn;
use shoplens::pipeline::GarmentPipeline;
use shoplens::store::CatalogStore;
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

/// Random BatchNorm statistics `{prefix}.*` of `c` channels into `w`.
fn batchnorm(w: &mut HashMap<String, Tensor>, prefix: &str, c: usize) {
    let dev = Device::Cpu;
    w.insert(format!("{prefix}.weight"), Tensor::rand(0.5f32, 1.5, c, &dev).unwrap());
    w.insert(format!("{prefix}.bias"), Tensor::randn(0f32, 1., c, &dev).unwrap());
    w.insert(format!("{prefix}.running_mean"), Tensor::randn(0f32, 1., c, &dev).unwrap());
    w.insert(format!("{prefix}.running_var"), Tensor::rand(0.5f32, 2., c, &dev).unwrap());
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn our_gpu_depthwise_kernel_gives_the_cpu_kernels_bits_and_the_epilogue_candles_values() {
    let Some(gpu) = gpu() else { return };
    let dev = Device::Cpu;
    for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
        for (n, c, h, w) in [(1, 5, 7, 7), (2, 6, 9, 6), (3, 4, 1, 5), (1, 32, 112, 112), (2, 5, 11, 13)] {
            let mut weights = HashMap::from([("d.weight".to_string(), Tensor::randn(0f32, 1., (c, 1, k, k), &dev).unwrap())]);
            batchnorm(&mut weights, "b", c);
            let relu6 = k == 3;
            let layer = DepthwiseConvBn::load(&NamedTensors::new(weights, &dev, "test"), "d", "b", c, k, s, relu6, 1e-3).unwrap();
            let x = Tensor::randn(0f32, 2., (n, c, h, w), &dev).unwrap();
            let on_cpu = layer.forward(&x).unwrap();
            let on_gpu = layer.to_device(&gpu).unwrap().forward(&x.to_device(&gpu).unwrap()).unwrap();
            assert_eq!(on_cpu.dims(), on_gpu.dims());
            assert!(values(&on_cpu) == values(&on_gpu), "depthwise k={k} s={s} {:?}: the GPU's values differ from the CPU's", (n, c, h, w));
        }
    }
    // The epilogue after a 1×1 convolution (bias, residual, ReLU6), against candle's own ops
    // on the same GPU product.
    for (n, cin, cout, hw) in [(1, 16, 24, 56), (2, 40, 40, 7)] {
        let mut weights = HashMap::from([("p.weight".to_string(), Tensor::randn(0f32, 0.3, (cout, cin, 1, 1), &dev).unwrap())]);
        batchnorm(&mut weights, "pb", cout);
        let conv = ConvBn::load(&NamedTensors::new(weights, &dev, "test"), "p", "pb", cin, cout, 1, 1, 1e-3).unwrap().to_device(&gpu).unwrap();
        let x = Tensor::randn(0f32, 1., (n, cin, hw, hw), &gpu).unwrap();
        let residual = Tensor::randn(0f32, 1., (n, cout, hw, hw), &gpu).unwrap();
        for relu6 in [false, true] {
            for r in [None, Some(&residual)] {
                let got = values(&conv.forward_with(&x, relu6, r).unwrap());
                let mut want = conv.forward(&x).unwrap();
                if let Some(r) = r {
                    want = (want + r).unwrap();
                }
                let want = values(&if relu6 { want.clamp(0f32, 6f32).unwrap() } else { want });
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "epilogue relu6={relu6} residual={}: {worst}", r.is_some());
            }
        }
    }
}

/// A batched build on the GPU (the GPU's default way): two builds give the same bits, and
/// the CPU's garments, embeddings to cosine 0.9999.
#[test]
fn a_batched_build_on_the_gpu_repeats_bit_for_bit_and_gives_the_cpus_garments() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    let demo = std::fs::read_to_string(repo().join("demo/catalog/catalog.csv")).unwrap();
    let mut csv: Vec<&str> = vec![demo.lines().next().unwrap()];
    csv.extend(demo.lines().skip(1).step_by(25).take(12));
    for row in &csv[1..] {
        let image = row.split(',').nth(1).unwrap();
        std::fs::copy(repo().join("demo/catalog").join(image), dir.path().join(image)).unwrap();
    }
    std::fs::write(dir.path().join("catalog.csv"), csv.join("\n") + "\n").unwrap();
    let sources = [CatalogSource::from_path(&dir.path().join("catalog.csv")).unwrap()];
    let build = |device: &Device, name: &str, batch: usize| {
        let detector = GarmentDetector::load(&repo().join("models/detector-lite0.safetensors"), device).unwrap();
        let embedder = GarmentEmbedder::load(&repo().join("models/embedder-lite0.safetensors"), device).unwrap();
        let store = CatalogStore::open(dir.path().join(name)).unwrap();
        let opts = BuildOptions { batch, ..BuildOptions::default() };
        let report = build_generation(&store, &sources, &LabelMap::default(), Models { embedder: &embedder, detector: Some(&detector) }, &opts, &mut |_| {}).unwrap();
        assert_eq!((report.items, report.failures.len()), (12, 0));
        let generation = store.published_id().unwrap().unwrap();
        let garments: BTreeMap<String, Vec<(String, Vec<f32>)>> = store
            .generation_members(generation)
            .unwrap()
            .into_iter()
            .map(|(sku, rev)| {
                let item = store.item(rev).unwrap();
                (sku, item.garments.iter().map(|g| store.garment(*g).unwrap()).map(|g| (g.category, g.embedding)).collect())
            })
            .collect();
        garments
    };
    let first = build(&gpu, "gpu-1", 8);
    assert_eq!(build(&gpu, "gpu-2", 8), first, "two batched GPU builds differ");
    let on_cpu = build(&Device::Cpu, "cpu", 1);
    for (sku, garments) in &first {
        let cpu = &on_cpu[sku];
        assert_eq!(garments.iter().map(|g| &g.0).collect::<Vec<_>>(), cpu.iter().map(|g| &g.0).collect::<Vec<_>>(), "{sku}");
        for ((_, a), (_, b)) in garments.iter().zip(cpu) {
            assert!(cosine(a, b) > 0.9999, "{sku}: cosine {}", cosine(a, b));
        }
    }
}
