//! Forward passes of the three networks at batch 1, 32 and 128 on the device a build
//! selects (a CUDA GPU in a `--features cuda` build on a GPU machine, else the CPU), for
//! `benches/gpu-check.sh` (issue 20). Prints one Markdown table row per network and batch.
//!
//!   gpu_forward [--models models] [--runs 10] [--batches 1,32,128]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use shoplens::device::{DevicePreference, describe, select_device};
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut models, mut runs, mut batches) = (PathBuf::from("models"), 10usize, vec![1usize, 32, 128]);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--models" => models = PathBuf::from(value),
            "--runs" => runs = value.parse()?,
            "--batches" => batches = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let device = select_device(DevicePreference::Auto)?;
    let detector = GarmentDetector::load(&models.join("detector-lite0.safetensors"), &device)?;
    let embedder = GarmentEmbedder::load(&models.join("embedder-lite0.safetensors"), &device)?;
    let (det_side, emb_side) = (detector.config().preprocess.size as usize, embedder.config().preprocess.size as usize);
    println!("device: {}", describe(&device));
    println!("| network | input | batch | ms per batch (median of {runs}) | images/s |");
    println!("|---|---|---|---|---|");
    for &batch in &batches {
        let det_input = Tensor::zeros((batch, 3, det_side, det_side), candle_core::DType::F32, &device)?;
        let emb_input = Tensor::zeros((batch, 3, emb_side, emb_side), candle_core::DType::F32, &device)?;
        let rows: [(&str, usize, Box<Pass<'_>>); 3] = [
            ("backbone (pooled features)", emb_side, Box::new(|| sync(&embedder.backbone().pooled(&emb_input)?))),
            ("detector (backbone + head)", det_side, Box::new(|| sync(&detector.forward(&det_input)?))),
            ("embedder (backbone + head)", emb_side, Box::new(|| embedder.embed_batch(&emb_input).map(|_| ()).map_err(Into::into))),
        ];
        for (name, side, run) in rows {
            run()?; // warm-up: kernels compiled and memory pooled before timing
            let mut times: Vec<f64> = (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    run().map(|_| t.elapsed().as_secs_f64() * 1000.0)
                })
                .collect::<Result<_>>()?;
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            println!("| {name} | {side}² | {batch} | {median:.2} | {:.0} |", batch as f64 * 1000.0 / median);
        }
    }
    Ok(())
}

/// One timed forward pass.
type Pass<'a> = dyn Fn() -> Result<()> + 'a;

/// Waits for `t` by reading it back: device work is asynchronous.
fn sync(t: &Tensor) -> Result<()> {
    t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(())
}
