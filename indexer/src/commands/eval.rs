//! `indexer eval ...`: measuring with the DeepFashion2 protocol.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use shoplens::ann::{AnnParams, open_published};
use shoplens::datasets::{Df2Folder, read_gallery_gt, read_query_gt};
use shoplens::device::{DevicePreference, select_device};
use shoplens::evaluation::retrieval::{RetrievalInputs, TOP_K, evaluate_with_gt_boxes};
use shoplens::models::embedder::GarmentEmbedder;

use super::status::open_existing;
use crate::progress::Reporter;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EvalBoxes {
    /// Detected garments (needs the garment detector, not shipped yet).
    Detected,
    /// Ground-truth boxes as detections: retrieval alone.
    Gt,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Split {
    All,
    /// Only query images with `id % 5 == 1` (the validation split of our training).
    Val,
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Top-k consumer-to-shop retrieval accuracy by the DeepFashion2 rule.
    Retrieval {
        /// Store built from the gallery (`indexer build --catalog SHOP_FOLDER`).
        #[arg(long, env = "SHOPLENS_DB")]
        db: PathBuf,
        /// DeepFashion2-format consumer folder (image/ + annos/).
        #[arg(long)]
        queries: PathBuf,
        #[arg(long)]
        query_gt: PathBuf,
        #[arg(long)]
        gallery_gt: PathBuf,
        #[arg(long, value_enum, default_value = "gt")]
        boxes: EvalBoxes,
        #[arg(long, value_enum, default_value = "all")]
        split: Split,
        #[arg(long, default_value = "models/embedder-lite0.safetensors")]
        embedder: PathBuf,
        /// Where the report goes.
        #[arg(long, default_value = "report.json")]
        out: PathBuf,
        /// Also write the DeepFashion2 submission file (top-20 per detected query).
        #[arg(long)]
        submission: Option<PathBuf>,
    },
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    let EvalCommand::Retrieval { db, queries, query_gt, gallery_gt, boxes, split, embedder, out, submission } = cmd;
    if matches!(boxes, EvalBoxes::Detected) {
        bail!("--boxes detected needs the garment detector, which is not shipped yet; use --boxes gt");
    }
    let store = open_existing(&db)?;
    let embedder = GarmentEmbedder::load(&embedder, &select_device(DevicePreference::Auto)?).context("loading the embedder")?;
    let generation = store.published()?.context("the store has no published generation")?;
    if generation.spec.models.get("embedder").map(String::as_str) != Some(embedder.version()) {
        bail!(
            "the index was built with embedder {:?}, this evaluation embeds queries with {:?}: rebuild the index or pass the matching --embedder",
            generation.spec.models.get("embedder"),
            embedder.version()
        );
    }
    let (index, _) = open_published(&store, AnnParams::default())?;
    let folder = Df2Folder::open(&queries)?;
    let mut query_gt = read_query_gt(&query_gt)?;
    if matches!(split, Split::Val) {
        query_gt.retain(|q| q.query_image_id % 5 == 1);
    }
    let gallery_gt = read_gallery_gt(&gallery_gt)?;
    let inputs = RetrievalInputs { store: &store, index: &index, embedder: &embedder, queries: &folder, query_gt: &query_gt, gallery_gt: &gallery_gt };
    let mut reporter = Reporter::default();
    let (report, entries) = evaluate_with_gt_boxes(&inputs, &mut |e| reporter.handle(e))?;
    reporter.finish();
    std::fs::write(&out, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", out.display()))?;
    if let Some(path) = submission {
        std::fs::write(&path, serde_json::to_vec(&entries)?).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "{} queries ({} missed) against {} gallery garments: {}",
        report.queries,
        report.misses,
        report.gallery_garments,
        TOP_K.iter().map(|k| format!("top-{k} {:.3}", report.top_k[&k.to_string()])).collect::<Vec<_>>().join(", ")
    );
    for (category, g) in &report.per_category {
        println!("  {category:<12} {:>5} queries  top-1 {:.3}  top-20 {:.3}", g.queries, g.top_k["1"], g.top_k["20"]);
    }
    println!("report: {}", out.display());
    Ok(())
}
