//! Our side of `benches/side_by_side.py`: each call measures one thing and prints one JSON
//! line, so the script can put it beside onnxruntime, hnswlib and faiss measured on the same
//! inputs, and so each case's peak memory is its own process's high-water mark.
//!
//! - `models --case backbone-plain|backbone|embedder|detector --batch B [--dump DIR]`:
//!   forward passes on a fixed pseudo-random input; `--dump` writes the input and output
//!   (raw little-endian f32 plus a shape file) for the script's parity check.
//! - `photo --photo FILE`: the engine's work for one street photo: decode, detect, embed
//!   every garment found.
//! - `ann --n N --data DIR [--graph-dir DIR]`: writes the clustered vectors, queries and exact top-10 once
//!   (the peers read the same files), builds our index and searches it on one thread at
//!   several `ef`.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde_json::json;
use shoplens::ann::synthetic::{clustered, queries_near};
use shoplens::ann::{AnnParams, GarmentIndex, LoadOutcome};
use shoplens::models::backbone::efficientnet_lite::EfficientNetLite;
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;
use shoplens_benches::{resident_bytes, short};

const K: usize = 10;

/// One network's forward pass on a prepared input.
type Forward = Box<dyn Fn(&Tensor) -> Result<Tensor>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        bail!("usage: side_by_side models|photo|ann [options]");
    };
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let num = |name: &str, default: usize| -> Result<usize> { opt(name).map_or(Ok(default), |v| v.parse().with_context(|| format!("{name} {v}"))) };
    let models = opt("--models").map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"), PathBuf::from);
    let line = match command.as_str() {
        "models" => models_case(&models, &opt("--case").context("--case")?, num("--batch", 1)?, num("--runs", 10)?, opt("--dump").map(PathBuf::from))?,
        "photo" => photo_case(&models, Path::new(&opt("--photo").context("--photo")?), num("--runs", 10)?)?,
        "ann" => ann_case(
            num("--n", 100_000)?,
            num("--dim", 256)?,
            num("--queries", 1000)?,
            Path::new(&opt("--data").context("--data")?),
            &opt("--ef").unwrap_or_else(|| "10,16,24,32,48,64,96,128,256".into()),
            opt("--graph-dir").as_deref().map(Path::new),
        )?,
        other => bail!("unknown command {other}"),
    };
    println!("{line}");
    Ok(())
}

/// Peak resident memory of this process (`VmHWM`), bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Median and minimum of `runs` timed calls (after two warm-up calls), in ms.
fn time_it(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    for _ in 0..2 {
        f()?;
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], ms[0]))
}

/// A fixed input in [-1, 1) from a small LCG: the same bytes on every machine.
fn fixed_input(shape: (usize, usize, usize, usize)) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn dump(dir: &Path, name: &str, t: &Tensor) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(dir.join(format!("{name}.f32")), bytes)?;
    std::fs::write(dir.join(format!("{name}.shape.json")), serde_json::to_string(t.dims())?)?;
    Ok(())
}

fn models_case(models: &Path, case: &str, batch: usize, runs: usize, dump_dir: Option<PathBuf>) -> Result<String> {
    let cpu = Device::Cpu;
    let backbone = models.join("efficientnet-lite0.safetensors");
    let size = if case.starts_with("detector") { 320 } else { 224 };
    let x = fixed_input((batch, 3, size, size))?;
    let rss_before = resident_bytes().unwrap_or(0);
    let forward: Forward = match case {
        "backbone-plain" => {
            let net = EfficientNetLite::load(&backbone, &cpu)?;
            Box::new(move |x| Ok(net.feature_map_reference(x)?.mean(3)?.mean(2)?))
        }
        "backbone" => {
            let net = EfficientNetLite::load(&backbone, &cpu)?;
            Box::new(move |x| Ok(net.pooled(x)?))
        }
        "embedder" => {
            let e = GarmentEmbedder::load(&models.join("embedder-lite0.safetensors"), &cpu)?;
            Box::new(move |x| {
                let rows = e.embed_batch(x)?;
                let n = rows.len();
                Ok(Tensor::from_vec(rows.concat(), (n, e.dim()), &Device::Cpu)?)
            })
        }
        "detector" => {
            let d = GarmentDetector::load(&models.join("detector-lite0.safetensors"), &cpu)?;
            Box::new(move |x| Ok(d.forward(x)?))
        }
        "detector-pyramid" => {
            // The detector's backbone alone (its pyramid levels), to split a detection's time.
            let d = GarmentDetector::load(&models.join("detector-lite0.safetensors"), &cpu)?;
            Box::new(move |x| Ok(rayon::scope(|_| d.backbone().pyramid(x))?.remove(0)))
        }
        other => bail!("unknown case {other}: backbone-plain, backbone, embedder, detector or detector-pyramid"),
    };
    let (median, min) = time_it(runs, || forward(&x).map(|_| ()))?;
    if let Some(dir) = dump_dir {
        let name = format!("{case}-b{batch}");
        dump(&dir, &format!("{name}.input"), &x)?;
        dump(&dir, &format!("{name}.output"), &forward(&x)?)?;
    }
    Ok(json!({
        "case": case, "batch": batch, "size": size, "threads": rayon::current_num_threads(), "runs": runs,
        "median_ms": median, "min_ms": min, "peak_rss": peak_rss(), "rss_before": rss_before,
    })
    .to_string())
}

fn photo_case(models: &Path, photo: &Path, runs: usize) -> Result<String> {
    let cpu = Device::Cpu;
    let detector = GarmentDetector::load(&models.join("detector-lite0.safetensors"), &cpu)?;
    let embedder = GarmentEmbedder::load(&models.join("embedder-lite0.safetensors"), &cpu)?;
    let bytes = std::fs::read(photo).with_context(|| photo.display().to_string())?;
    let mut garments = 0;
    let pipeline = shoplens::pipeline::GarmentPipeline { detector: Some(&detector), embedder: &embedder, limits: Default::default() };
    // The two stages' own times too (as the server reports them): a change can move one
    // and not the other.
    let (mut detect_ms, mut embed_ms) = (Vec::new(), Vec::new());
    let (median, min) = time_it(runs, || {
        let image = pipeline.decode(&bytes)?;
        let start = Instant::now();
        let detections = detector.detect(&image)?;
        let detected = Instant::now();
        garments = pipeline.second_look(&image, detections, &detector.config().postprocess)?.len();
        detect_ms.push((detected - start).as_secs_f64() * 1e3);
        embed_ms.push(detected.elapsed().as_secs_f64() * 1e3);
        Ok(())
    })?;
    let median_of = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let image = shoplens::vision::decode_image(&bytes, Default::default())?;
    Ok(json!({
        "case": "photo", "photo": photo.display().to_string(), "width": image.width(), "height": image.height(),
        "garments": garments, "threads": rayon::current_num_threads(), "runs": runs, "median_ms": median, "min_ms": min,
        "detect_median_ms": median_of(detect_ms), "embed_median_ms": median_of(embed_ms),
        "peak_rss": peak_rss(),
    })
    .to_string())
}

fn write_f32(path: &Path, rows: impl Iterator<Item = f32>) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for v in rows {
        out.write_all(&v.to_le_bytes())?;
    }
    Ok(out.flush()?)
}

fn ann_case(n: usize, dim: usize, nq: usize, data: &Path, efs: &str, graph_dir: Option<&Path>) -> Result<String> {
    // Memory is counted from before the vectors exist: the index holds them (the graph
    // scores against them), as hnswlib and faiss hold their own copies.
    let rss_before = resident_bytes().unwrap_or(0);
    // The same generator and seeds as the criterion benchmark (`benches/ann.rs`).
    let vectors = clustered(n, dim, 1000.min(n / 10).max(1), 10, 42);
    let queries = queries_near(&vectors, nq, 43);
    let tag = format!("n{}-d{dim}-q{nq}", short(n));
    let dir = data.join(&tag);
    if !dir.join("truth.u32").is_file() {
        std::fs::create_dir_all(&dir)?;
        write_f32(&dir.join("base.f32"), vectors.as_slice().iter().copied())?;
        write_f32(&dir.join("queries.f32"), queries.iter().flatten().copied())?;
        let truth: Vec<u32> = queries.iter().flat_map(|q| shoplens::ann::exact::top_k(vectors.as_slice(), dim, q, K, None).into_iter().map(|(row, _)| row)).collect();
        std::fs::write(dir.join("truth.u32"), truth.iter().flat_map(|r| r.to_le_bytes()).collect::<Vec<u8>>())?;
    }
    let truth: Vec<u32> = std::fs::read(dir.join("truth.u32"))?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();

    let params = AnnParams { exact_below: 0, ..AnnParams::default() };
    let started = Instant::now();
    // With --graph-dir a graph dumped by an earlier run is reused (sweeps while tuning the
    // search); the build time is then that of loading, and reported as null.
    let (index, outcome) = GarmentIndex::open(graph_dir, 1, vectors, params.clone())?;
    let build_s = matches!(outcome, LoadOutcome::Built { .. }).then(|| started.elapsed().as_secs_f64());
    // hnsw_rs's own graph was dropped after freezing; what the allocator kept of it is free
    // memory, not the index's, so it is handed back before measuring.
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe { libc::malloc_trim(0) };
    let rss_growth = resident_bytes().unwrap_or(0).saturating_sub(rss_before);

    // One query at a time on this thread: the "one core" of the comparison.
    let mut points = Vec::new();
    for ef in efs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let ef: usize = ef.parse().with_context(|| format!("ef {ef}"))?;
        let mut found = 0usize;
        let started = Instant::now();
        for (i, q) in queries.iter().enumerate() {
            let (hits, _) = index.search_with(q, K, None, Some(ef))?;
            let want: HashSet<u32> = truth[i * K..(i + 1) * K].iter().copied().collect();
            found += hits.iter().filter(|h| want.contains(&h.row)).count();
        }
        let secs = started.elapsed().as_secs_f64();
        points.push(json!({"ef": ef, "recall": found as f64 / (K * queries.len()) as f64, "qps": queries.len() as f64 / secs}));
    }
    Ok(json!({
        "case": "ann", "engine": "shoplens (hnsw_rs built, frozen)", "n": n, "dim": dim, "queries": nq, "data": dir.display().to_string(),
        "m": params.m, "ef_construction": params.ef_construction, "build_threads": rayon::current_num_threads(),
        "build_s": build_s, "bytes_per_vector": rss_growth as f64 / n as f64, "points": points, "peak_rss": peak_rss(),
    })
    .to_string())
}
