//! `indexer ann ...`: the ANN graph of the published generation.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;
use shoplens::ann::LoadOutcome;

use super::status::open_existing;

#[derive(Debug, Subcommand)]
pub enum AnnCommand {
    /// Load the published generation's graph dump with the parameters the generation
    /// records, rebuilding and re-dumping it when it is missing or damaged.
    Verify {
        #[arg(long, env = "SHOPLENS_DB")]
        db: PathBuf,
    },
}

pub fn run(cmd: AnnCommand) -> Result<()> {
    match cmd {
        AnnCommand::Verify { db } => {
            let store = open_existing(&db)?;
            let started = Instant::now();
            let (index, outcome) = shoplens::ann::open_published(&store)?;
            let what = match outcome {
                LoadOutcome::ExactOnly => "small index: exact search, no graph".to_string(),
                LoadOutcome::Loaded => "graph dump valid, loaded".to_string(),
                LoadOutcome::Built { reason } => format!("graph rebuilt and dumped ({reason})"),
            };
            println!("generation {}: {} garments, {}-d, opened in {:.2?}; {what}", index.generation(), index.len(), index.dim(), started.elapsed());
            Ok(())
        }
    }
}
