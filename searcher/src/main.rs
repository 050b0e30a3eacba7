//! `searcher`: serves a Shoplens store over HTTP. A thin shell: configuration, the actix
//! app, and loading the engine's index off the request workers.

mod app;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

/// Serves a Shoplens index.
#[derive(Debug, Parser)]
#[command(name = "searcher", version, about)]
struct Opt {
    /// Store directory written by `indexer`.
    #[arg(long, env = "SHOPLENS_DB")]
    db: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "SHOPLENS_BIND", default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// HTTP worker threads (CPU-heavy work never runs on them).
    #[arg(long, env = "SHOPLENS_WORKERS", default_value_t = 2)]
    workers: usize,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SHOPLENS_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let opt = Opt::parse();
    let state = Arc::new(state::SearcherState::default());
    state::spawn_loader(opt.db.clone(), state.clone());
    tracing::info!(bind = %opt.bind, db = %opt.db.display(), "searcher listening");
    actix_web::HttpServer::new({
        let state = state.clone();
        move || actix_web::App::new().configure(app::configure(state.clone()))
    })
    .workers(opt.workers.max(1))
    .bind(opt.bind)
    .with_context(|| format!("binding {}", opt.bind))?
    .run()
    .await?;
    Ok(())
}
