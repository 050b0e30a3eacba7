//! `indexer`: the catalog team's command. A thin shell over the `shoplens` engine: parses
//! arguments, reports progress, prints results.

mod commands;
mod progress;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Builds, inspects and maintains a Shoplens index.
#[derive(Debug, Parser)]
#[command(name = "indexer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build and publish a new index generation from catalogs (the nightly job):
    /// incremental, resumable after a crash, atomic for readers.
    Build(commands::build::BuildArgs),
    /// Show the published generation of a store.
    Status {
        /// Store directory.
        #[arg(long, env = "SHOPLENS_DB")]
        db: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also print a digest of the published generation's content (skus, image hashes,
        /// metadata, garments and embeddings; independent of internal ids). Reads every
        /// garment.
        #[arg(long)]
        digest: bool,
    },
    /// Check or generate DeepFashion2-format data.
    #[command(subcommand)]
    Dataset(commands::dataset::DatasetCommand),
    /// Verify (and rebuild when needed) the ANN graph of the published generation.
    #[command(subcommand)]
    Ann(commands::ann::AnnCommand),
    /// Rebuild the serving snapshot the searcher reads.
    #[command(subcommand)]
    Serving(commands::serving::ServingCommand),
    /// Measure retrieval accuracy (DeepFashion2 protocol).
    #[command(subcommand)]
    Eval(commands::eval::EvalCommand),
    /// Import pretrained weights.
    #[command(subcommand)]
    Weights(commands::weights::WeightsCommand),
    /// Train a network.
    #[command(subcommand)]
    Train(commands::train::TrainCommand),
    /// Detect the garments of photos with the shipped detector (boxes in pixels).
    Detect {
        /// Image files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[arg(long, env = "SHOPLENS_DETECTOR", default_value = "models/detector-lite0.safetensors")]
        detector: PathBuf,
        /// The embedder whose category head names each garment again (the second look, at
        /// the detector's configured share), as served and indexed.
        #[arg(long, env = "SHOPLENS_EMBEDDER", default_value = "models/embedder-lite0.safetensors")]
        embedder: PathBuf,
        /// Score threshold [default: the weights' own].
        #[arg(long)]
        min_score: Option<f32>,
        /// One JSON object per image.
        #[arg(long)]
        json: bool,
    },
    /// Remove old generations and the items and garments only they referenced.
    Prune {
        #[arg(long, env = "SHOPLENS_DB")]
        db: PathBuf,
        /// Generations to keep, the published one included.
        #[arg(long, default_value_t = shoplens::store::DEFAULT_RETAIN)]
        retain: usize,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SHOPLENS_LOG").unwrap_or_else(|_| "info".into())).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(args) => commands::build::run(args),
        Command::Status { db, json, digest } => commands::status::run(&db, json, digest),
        Command::Dataset(cmd) => commands::dataset::run(cmd),
        Command::Ann(cmd) => commands::ann::run(cmd),
        Command::Serving(cmd) => commands::serving::run(cmd),
        Command::Train(cmd) => commands::train::run(cmd),
        Command::Eval(cmd) => commands::eval::run(cmd),
        Command::Weights(cmd) => commands::weights::run(cmd),
        Command::Prune { db, retain } => commands::status::prune(&db, retain),
        Command::Detect { images, detector, embedder, min_score, json } => commands::detect::run(&images, &detector, &embedder, min_score, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
