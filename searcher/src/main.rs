//! `searcher`: serves a Shoplens store over HTTP to shoppers (page and JSON API). A thin
//! shell: configuration, loading the networks, the actix app, and a watcher that swaps in
//! each generation the indexer publishes. `searcher demo` first builds an index of the
//! bundled CC0 demo catalog when none exists.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use shoplens::catalog::{CatalogSource, LabelMap};
use shoplens::indexing::{BuildOptions, Models, build_generation};
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::serving::engine::SearchEngine;
use shoplens::store::CatalogStore;
use shoplens::vision::DecodeLimits;

use shoplens_searcher::config::{Config, ServeArgs};
use shoplens_searcher::{pool, state};

/// Serves a Shoplens index: a page for shoppers and a JSON API under /v1.
#[derive(Debug, Parser)]
#[command(name = "searcher", version, about)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build an index of the bundled demo catalog (if the store has none) and serve it.
    Demo {
        /// The catalog to index.
        #[arg(long, default_value = "demo/catalog/catalog.csv")]
        catalog: PathBuf,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SHOPLENS_LOG").unwrap_or_else(|_| "info".into())).init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        None => serve(Config::resolve(&cli.serve, Some(&matches))?),
        Some(Command::Demo { catalog, serve: args }) => {
            let sub: &ArgMatches = matches.subcommand_matches("demo").expect("demo matched");
            let mut config = Config::resolve(&args, Some(sub))?;
            if args.db.is_none() && cli.serve.db.is_none() {
                config.db = PathBuf::from("target/shoplens-demo");
            }
            build_demo_if_missing(&config, &catalog)?;
            serve(config)
        }
    }
}

fn load_engine(config: &Config) -> Result<SearchEngine> {
    let device = shoplens::device::select_device(shoplens::device::DevicePreference::Auto)?;
    let embedder = GarmentEmbedder::load(&config.embedder, &device).with_context(|| format!("loading the embedder {}", config.embedder.display()))?;
    let detector = GarmentDetector::load(&config.detector, &device).with_context(|| format!("loading the detector {}", config.detector.display()))?;
    let limits = DecodeLimits { max_pixels: config.max_pixels, ..DecodeLimits::default() };
    Ok(SearchEngine { detector: Some(detector), embedder, limits })
}

fn build_demo_if_missing(config: &Config, catalog: &Path) -> Result<()> {
    if shoplens::serving::snapshot::current(&shoplens::store::StoreDir::new(&config.db).serving())?.is_some() {
        tracing::info!(db = %config.db.display(), "demo index exists");
        return Ok(());
    }
    tracing::info!(catalog = %catalog.display(), db = %config.db.display(), "building the demo index (once)");
    let engine = load_engine(config)?;
    // The store is opened, built and closed here: the server itself only reads snapshots.
    let store = CatalogStore::open(&config.db).with_context(|| format!("opening {}", config.db.display()))?;
    let source = CatalogSource::from_path(catalog)?;
    let report = build_generation(
        &store,
        &[source],
        &LabelMap::default(),
        Models { embedder: &engine.embedder, detector: engine.detector.as_ref() },
        &BuildOptions::default(),
        &mut |_| {},
    )?;
    store.flush()?;
    tracing::info!(items = report.items, garments = report.garments, failures = report.failures.len(), seconds = report.seconds, "demo index built");
    Ok(())
}

fn serve(config: Config) -> Result<()> {
    let engine = match load_engine(&config) {
        Ok(e) => Some(Arc::new(e)),
        Err(e) => {
            // Keep serving /healthz and /readyz (which says why) rather than exit.
            tracing::error!(error = format!("{e:#}"), "models not loaded; searches will answer 503");
            None
        }
    };
    let pool = pool::SearchPool::new(config.search_threads, config.queue);
    let state = Arc::new(state::SearcherState::new(engine, pool, config.upload_limits(), config.upload_memory_bytes));
    state::spawn_watcher(config.db.clone(), state.clone(), Duration::from_secs_f64(config.reload_seconds));
    shoplens_searcher::memory::spawn_trimmer(state.upload_budget.clone());
    tracing::info!(bind = %config.bind, db = %config.db.display(), search_threads = config.search_threads, queue = config.queue, "searcher listening on http://{}", config.bind);
    actix_web::rt::System::new().block_on(async move {
        let listener = std::net::TcpListener::bind(config.bind).with_context(|| format!("binding {}", config.bind))?;
        let settings = shoplens_searcher::server::ServerSettings { workers: config.workers, max_connections: config.max_connections };
        shoplens_searcher::server::http_server(listener, state, settings).context("starting the server")?.await.context("serving")
    })
}
