//! `indexer build`: the nightly job. Reads the catalogs, re-embeds what changed, publishes
//! a new generation atomically, prunes old ones.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use shoplens::ann::AnnParams;
use shoplens::catalog::{CatalogSource, LabelMap};
use shoplens::device::{DevicePreference, select_device};
use shoplens::indexing::{BoxMode, BuildOptions, Models, build_generation};
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::store::CatalogStore;

use crate::progress::Reporter;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Boxes {
    /// The detector's garments (`--detector`); items without a confident one are indexed
    /// as one whole-image garment with their catalog category.
    Detected,
    /// The annotated boxes of DeepFashion2 folders (CSV/JSONL catalogs are detected).
    Gt,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// A catalog: a .csv or .jsonl file (image paths relative to it), or a DeepFashion2
    /// shop folder. Repeat for several; they form one index.
    #[arg(long = "catalog", required = true)]
    catalogs: Vec<PathBuf>,
    /// Store directory (created if missing).
    #[arg(long, env = "SHOPLENS_DB")]
    db: PathBuf,
    #[arg(long, value_enum, default_value = "detected")]
    boxes: Boxes,
    /// JSON object of catalog label → category, extending the built-in map.
    #[arg(long)]
    label_map: Option<PathBuf>,
    /// The embedder weights.
    #[arg(long, env = "SHOPLENS_EMBEDDER", default_value = "models/embedder-lite0.safetensors")]
    embedder: PathBuf,
    /// The detector weights, for `--boxes detected`.
    #[arg(long, env = "SHOPLENS_DETECTOR", default_value = "models/detector-lite0.safetensors")]
    detector: PathBuf,
    /// Index every item as one whole-image garment (no detection): faster, for catalogs
    /// of single-garment product shots.
    #[arg(long)]
    no_detector: bool,
    /// Generations kept after publishing (the published one included).
    #[arg(long, default_value_t = shoplens::store::DEFAULT_RETAIN)]
    retain: usize,
    /// HNSW links per node.
    #[arg(long, default_value_t = AnnParams::default().m)]
    m: usize,
    /// HNSW candidate list while building.
    #[arg(long, default_value_t = AnnParams::default().ef_construction)]
    ef_construction: usize,
    /// Items embedded between two saves of the store: a killed build resumes from the
    /// last save. Smaller saves more often, at the cost of a flush each.
    #[arg(long, default_value_t = shoplens::indexing::SAVE_EVERY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    save_every: usize,
    /// Items per forward pass: 1 runs each item alone, items side by side on the cores;
    /// N > 1 forms fixed batches of N items in catalog order (a resumed build re-does at
    /// most its unfinished batch). Default: 1 on the CPU, 64 on a GPU.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    batch: Option<usize>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    cpu: bool,
}

pub fn run(args: BuildArgs) -> Result<()> {
    let sources = args.catalogs.iter().map(|c| CatalogSource::from_path(c)).collect::<shoplens::Result<Vec<_>>>()?;
    let labels = match &args.label_map {
        Some(path) => LabelMap::with_file(path)?,
        None => LabelMap::default(),
    };
    let device = select_device(if args.cpu { DevicePreference::Cpu } else { DevicePreference::Auto })?;
    let embedder = GarmentEmbedder::load(&args.embedder, &device).with_context(|| format!("loading the embedder {}", args.embedder.display()))?;
    // With --boxes gt the detector still serves the catalogs without annotated boxes.
    let detector = match (args.boxes, args.no_detector) {
        (_, false) => Some(GarmentDetector::load(&args.detector, &device).with_context(|| format!("loading the detector {} (or pass --no-detector)", args.detector.display()))?),
        _ => None,
    };
    let store = CatalogStore::open(&args.db).with_context(|| format!("opening store {}", args.db.display()))?;
    let opts = BuildOptions {
        boxes: match args.boxes {
            Boxes::Detected => BoxMode::Detected,
            Boxes::Gt => BoxMode::Gt,
        },
        retain: args.retain,
        ann: AnnParams { m: args.m, ef_construction: args.ef_construction, ..AnnParams::default() },
        save_every: args.save_every,
        batch: args.batch.unwrap_or(if device.is_cpu() { 1 } else { shoplens::indexing::GPU_BATCH }),
        ..BuildOptions::default()
    };
    let mut reporter = Reporter::default();
    let report = build_generation(&store, &sources, &labels, Models { embedder: &embedder, detector: detector.as_ref() }, &opts, &mut |e| reporter.handle(e))?;
    reporter.finish();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "published generation {}{}: {} items, {} garments; added {}, updated {}, unchanged {}, removed {}; {} failures",
            report.generation,
            if report.resumed { " (resumed)" } else { "" },
            report.items,
            report.garments,
            report.added,
            report.updated,
            report.unchanged,
            report.removed,
            report.failures.len()
        );
        println!(
            "embedded {} items at {:.1} items/s; {}; total {:.1} s; pruned generations {:?}",
            report.embedded_items, report.embed_items_per_second, report.ann, report.seconds, report.pruned_generations
        );
    }
    Ok(())
}
