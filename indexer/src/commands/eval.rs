//! `indexer eval ...`: measuring with the DeepFashion2 protocol.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use shoplens::datasets::{Df2Folder, read_gallery_gt, read_query_gt};
use shoplens::device::{DevicePreference, select_device};
use shoplens::evaluation::detection::evaluate_detector;
use shoplens::evaluation::relevance::{RelevanceBoxes, RelevanceInputs, evaluate_relevance};
use shoplens::evaluation::retrieval::{QueryBoxes, RetrievalInputs, TOP_K, evaluate};
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::pipeline::GarmentPipeline;
use shoplens::serving::engine::{Ranking, SearchEngine, ServingIndex};
use shoplens::vision::DecodeLimits;

use crate::progress::Reporter;
use crate::report;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EvalBoxes {
    /// Garments found by the detector (`--detector`).
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
        /// Detector weights for `--boxes detected`.
        #[arg(long, default_value = "models/detector-lite0.safetensors")]
        detector: PathBuf,
        /// Where the report goes.
        #[arg(long, default_value = "report.json")]
        out: PathBuf,
        /// Where the DeepFashion2 submission file (top-20 per detected query) goes
        /// [default: beside --out, `*-submission.json`].
        #[arg(long)]
        submission: Option<PathBuf>,
    },
    /// COCO-style box AP (0.50:0.95), AP50 and AP75 of the garment detector, per category,
    /// on a DeepFashion2-format folder.
    Detection {
        /// DeepFashion2-format folder (image/ + annos/).
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "models/detector-lite0.safetensors")]
        weights: PathBuf,
        /// The embedder whose category head gives detected garments their second look.
        #[arg(long, default_value = "models/embedder-lite0.safetensors")]
        embedder: PathBuf,
        /// Also measure the second look at these shares of the category head (e.g.
        /// `0,0.3,0.5`), to choose the shipped one on validation.
        #[arg(long, value_delimiter = ',')]
        second_look: Vec<f32>,
        #[arg(long, value_enum, default_value = "all")]
        split: Split,
        #[arg(long, default_value = "report.json")]
        out: PathBuf,
    },
    /// Category precision: the share of each labelled garment's first k shop items that are
    /// of its category, searched as a shopper's request is (no category parameter). Run it
    /// against a catalog without the exact items (e.g. the validation distractors alone).
    Relevance {
        /// Store built from a labelled catalog (CSV/JSONL with labels, through the label map).
        #[arg(long, env = "SHOPLENS_DB")]
        db: PathBuf,
        /// DeepFashion2-format folder of labelled photos (image/ + annos/).
        #[arg(long)]
        queries: PathBuf,
        /// `gt`: each annotated box searched as a drawn box (category from the embedder's
        /// category head); `detected`: the photo searched as uploaded.
        #[arg(long, value_enum, default_value = "gt")]
        boxes: EvalBoxes,
        #[arg(long, value_enum, default_value = "all")]
        split: Split,
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// Rank by similarity alone instead of the default (items of the garment's category
        /// first): what the embedding achieves by itself.
        #[arg(long)]
        similarity_only: bool,
        #[arg(long, default_value = "models/embedder-lite0.safetensors")]
        embedder: PathBuf,
        #[arg(long, default_value = "models/detector-lite0.safetensors")]
        detector: PathBuf,
        #[arg(long, default_value = "report.json")]
        out: PathBuf,
    },
    /// Two reports of the same protocol side by side, with differences (b − a).
    Compare { a: PathBuf, b: PathBuf },
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Retrieval { db, queries, query_gt, gallery_gt, boxes, split, embedder, detector, out, submission } => {
            retrieval(db, queries, query_gt, gallery_gt, boxes, split, embedder, detector, out, submission)
        }
        EvalCommand::Detection { data, weights, embedder, second_look, split, out } => detection(data, weights, embedder, &second_look, split, out),
        EvalCommand::Relevance { db, queries, boxes, split, k, similarity_only, embedder, detector, out } => {
            relevance(RelevanceArgs { db, queries, boxes, split, k, similarity_only, embedder, detector, out })
        }
        EvalCommand::Compare { a, b } => {
            print!("{}", report::compare(&a, &b)?);
            Ok(())
        }
    }
}

/// Creates the directory `out` goes into.
fn prepare_out(out: &std::path::Path) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

fn detection(data: PathBuf, weights: PathBuf, embedder: PathBuf, shares: &[f32], split: Split, out: PathBuf) -> Result<()> {
    prepare_out(&out)?;
    if let Some(bad) = shares.iter().find(|s| !(0.0..=1.0).contains(*s)) {
        bail!("--second-look shares lie in [0, 1], got {bad}");
    }
    let device = select_device(DevicePreference::Auto)?;
    let detector = GarmentDetector::load(&weights, &device).context("loading the detector")?;
    let embedder = GarmentEmbedder::load(&embedder, &device).context("loading the embedder")?;
    let pipeline = GarmentPipeline { detector: Some(&detector), embedder: &embedder, limits: DecodeLimits::default() };
    let folder = Df2Folder::open(&data)?;
    let keep = |pair_id: u64| matches!(split, Split::All) || pair_id % 5 == 1;
    let mut reporter = Reporter::default();
    let report = evaluate_detector(&pipeline, &folder, &keep, shares, &mut |e| reporter.handle(e))?;
    reporter.finish();
    std::fs::write(&out, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", out.display()))?;
    let written = report::detection(&out, &report, &command_line())?;
    println!("{} images, detector {} at {}²: AP {:.3}, AP50 {:.3}, AP75 {:.3}", report.images, report.detector, report.input_size, report.ap, report.ap50, report.ap75);
    for (name, c) in &report.per_category {
        println!("  {name:<12} {:>5} instances  AP {:.3}  AP50 {:.3}  AP75 {:.3}", c.instances, c.ap, c.ap50, c.ap75);
    }
    if let Some(h) = report.headline_ap50 {
        println!("mean AP50 over top, outer, dress, pants, skirt, shorts, footwear, bag: {h:.3}");
    }
    println!("class-agnostic AP50 (framing alone): {:.3}", report.class_agnostic_ap50);
    for p in report.served.iter().filter(|p| p.configured) {
        println!(
            "served (min score {:.2}): precision {:.3}, recall {:.3}, F1 {:.3}, {:.2} garments per image ({:.2} annotated)",
            p.min_score, p.precision, p.recall, p.f1, p.garments_per_image, p.annotated_per_image
        );
    }
    for p in &report.second_look {
        println!(
            "second look, category head share {:.2}{}: headline AP50 {}, class-agnostic AP50 {:.3}, served precision {:.3}, recall {:.3}, F1 {:.3}, {:.2} garments per image",
            p.share,
            if p.configured { " (shipped)" } else { "" },
            p.headline_ap50.map_or("-".to_string(), |a| format!("{a:.3}")),
            p.class_agnostic_ap50,
            p.served.precision,
            p.served.recall,
            p.served.f1,
            p.served.garments_per_image
        );
    }
    println!(
        "{:.1} ms per image (decode, detect, second-look embeddings); report: {}; also {}",
        report.ms_per_image,
        out.display(),
        written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn retrieval(
    db: PathBuf,
    queries: PathBuf,
    query_gt: PathBuf,
    gallery_gt: PathBuf,
    boxes: EvalBoxes,
    split: Split,
    embedder: PathBuf,
    detector: PathBuf,
    out: PathBuf,
    submission: Option<PathBuf>,
) -> Result<()> {
    prepare_out(&out)?;
    let device = select_device(DevicePreference::Auto)?;
    let embedder = GarmentEmbedder::load(&embedder, &device).context("loading the embedder")?;
    let detector = match boxes {
        EvalBoxes::Detected => Some(GarmentDetector::load(&detector, &device).context("loading the detector")?),
        EvalBoxes::Gt => None,
    };
    // Exactly what the searcher serves: the published generation's snapshot and graph.
    let index = ServingIndex::load_current(&db)?.with_context(|| format!("{} has no published generation", db.display()))?;
    let indexed_with = index.snapshot().models.get("embedder").cloned();
    if indexed_with.as_deref() != Some(embedder.version()) {
        bail!(
            "the index was built with embedder {indexed_with:?}, this evaluation embeds queries with {:?}: rebuild the index or pass the matching --embedder",
            embedder.version()
        );
    }
    let query_boxes = if detector.is_some() { QueryBoxes::Detected } else { QueryBoxes::GroundTruth };
    let engine = SearchEngine { detector, embedder, limits: DecodeLimits::default() };
    let folder = Df2Folder::open(&queries)?;
    let mut query_gt = read_query_gt(&query_gt)?;
    if matches!(split, Split::Val) {
        query_gt.retain(|q| q.query_image_id % 5 == 1);
    }
    let gallery_gt = read_gallery_gt(&gallery_gt)?;
    let inputs = RetrievalInputs { engine: &engine, index: &index, queries: &folder, query_gt: &query_gt, gallery_gt: &gallery_gt };
    let mut reporter = Reporter::default();
    let output = evaluate(&inputs, query_boxes, &mut |e| reporter.handle(e))?;
    reporter.finish();
    let report = &output.report;
    std::fs::write(&out, serde_json::to_vec_pretty(report)?).with_context(|| format!("writing {}", out.display()))?;
    let submission = submission.unwrap_or_else(|| report::sibling(&out, "-submission.json"));
    std::fs::write(&submission, serde_json::to_vec(&output.submission)?).with_context(|| format!("writing {}", submission.display()))?;
    let mut written = report::retrieval(&out, report, &command_line())?;
    // Gallery images by sku come from the generation's serving snapshot.
    let gallery: std::collections::HashMap<String, PathBuf> = index.snapshot().items.iter().map(|i| (i.metadata.sku.clone(), i.image_path.clone())).collect();
    written.push(report::worst_queries(&out, &output.details, &|id| folder.image(id).map(|i| i.image.clone()), &|sku| gallery.get(sku).cloned(), 40)?);
    written.push(submission);
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
    println!("report: {}; also {}", out.display(), written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    Ok(())
}

struct RelevanceArgs {
    db: PathBuf,
    queries: PathBuf,
    boxes: EvalBoxes,
    split: Split,
    k: usize,
    similarity_only: bool,
    embedder: PathBuf,
    detector: PathBuf,
    out: PathBuf,
}

fn relevance(args: RelevanceArgs) -> Result<()> {
    prepare_out(&args.out)?;
    let device = select_device(DevicePreference::Auto)?;
    let embedder = GarmentEmbedder::load(&args.embedder, &device).context("loading the embedder")?;
    let detector = match args.boxes {
        EvalBoxes::Detected => Some(GarmentDetector::load(&args.detector, &device).context("loading the detector")?),
        EvalBoxes::Gt => None,
    };
    // Exactly what the searcher serves: the published generation's snapshot and graph.
    let index = ServingIndex::load_current(&args.db)?.with_context(|| format!("{} has no published generation", args.db.display()))?;
    let indexed_with = index.snapshot().models.get("embedder").cloned();
    if indexed_with.as_deref() != Some(embedder.version()) {
        bail!(
            "the index was built with embedder {indexed_with:?}, this evaluation embeds queries with {:?}: rebuild the index or pass the matching --embedder",
            embedder.version()
        );
    }
    let engine = SearchEngine { detector, embedder, limits: DecodeLimits::default() };
    let folder = Df2Folder::open(&args.queries)?;
    let keep = |id: u64| matches!(args.split, Split::All) || id % 5 == 1;
    let inputs = RelevanceInputs {
        engine: &engine,
        index: &index,
        queries: &folder,
        keep: &keep,
        boxes: match args.boxes {
            EvalBoxes::Gt => RelevanceBoxes::GroundTruth,
            EvalBoxes::Detected => RelevanceBoxes::Detected,
        },
        ranking: if args.similarity_only { Ranking::Similarity } else { Ranking::SameKindFirst },
        k: args.k,
    };
    let mut reporter = Reporter::default();
    let report = evaluate_relevance(&inputs, &mut |e| reporter.handle(e))?;
    reporter.finish();
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", args.out.display()))?;
    let written = report::relevance(&args.out, &report, &command_line())?;
    println!(
        "{} garments ({} scored, {} of categories the catalog lacks), {} boxes, ranking by {}: category precision@{} {:.3}, category accuracy {:.3}{}",
        report.garments,
        report.overall.queries,
        report.absent.values().sum::<usize>(),
        report.boxes,
        report.ranking,
        report.k,
        report.overall.precision,
        report.overall.category_accuracy,
        if report.overall.misses > 0 { format!(", {} missed by the detector", report.overall.misses) } else { String::new() }
    );
    for (category, row) in &report.per_category {
        println!("  {category:<12} {:>5} garments  precision {:.3}  category accuracy {:.3}", row.queries, row.precision, row.category_accuracy);
    }
    println!("report: {}; also {}", args.out.display(), written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    Ok(())
}

/// The command as typed, for the reports.
fn command_line() -> String {
    let mut args = std::env::args();
    let program = args.next().map(|p| PathBuf::from(&p).file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or(p)).unwrap_or_default();
    std::iter::once(program).chain(args).collect::<Vec<_>>().join(" ")
}
