//! `indexer serving ...`: the serving snapshot the searcher reads.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;

use super::status::open_existing;

#[derive(Debug, Subcommand)]
pub enum ServingCommand {
    /// Rewrite the published generation's serving snapshot from the store alone and point
    /// `serving/CURRENT` at it (after a lost or damaged snapshot, or to upgrade its format).
    Rebuild {
        #[arg(long, env = "SHOPLENS_DB")]
        db: PathBuf,
    },
}

pub fn run(cmd: ServingCommand) -> Result<()> {
    match cmd {
        ServingCommand::Rebuild { db } => {
            let store = open_existing(&db)?;
            let Some(generation) = shoplens::indexing::write_serving_snapshot(&store)? else {
                bail!("{} is a store without a serving directory", db.display());
            };
            println!("serving snapshot of generation {generation} rewritten from the store; serving/CURRENT points at it");
            Ok(())
        }
    }
}
