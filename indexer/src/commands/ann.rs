//! `indexer ann ...`: the ANN graph of the published generation.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;
use shoplens::ann::{AnnParams, LoadOutcome};

use super::status::open_existing;

#[derive(Debug, Subcommand)]
pub enum AnnCommand {
    /// Load the published generation's graph dump, rebuilding and re-dumping it when it is
    /// missing, damaged or made with other parameters.
    Verify {
        #[arg(long, env = "SHOPLENS_DB")]
        db: PathBuf,
        /// HNSW links per node.
        #[arg(long, default_value_t = AnnParams::default().m)]
        m: usize,
        /// HNSW candidate list while building.
        #[arg(long, default_value_t = AnnParams::default().ef_construction)]
        ef_construction: usize,
    },
}

pub fn run(cmd: AnnCommand) -> Result<()> {
    match cmd {
        AnnCommand::Verify { db, m, ef_construction } => {
            let store = open_existing(&db)?;
            let started = Instant::now();
            let params = AnnParams { m, ef_construction, ..AnnParams::default() };
            let (index, outcome) = shoplens::ann::open_published(&store, params)?;
            let what = match outcome {
                LoadOutcome::ExactOnly => "small index: exact search, no graph".to_string(),
                LoadOutcome::Loaded => "graph dump valid, loaded".to_string(),
                LoadOutcome::Built { reason } => format!("graph rebuilt and dumped ({reason})"),
            };
            println!(
                "generation {}: {} garments, {}-d, opened in {:.2?}; {what}",
                index.generation(),
                index.len(),
                index.dim(),
                started.elapsed()
            );
            Ok(())
        }
    }
}
