//! What the server shares between workers: the engine (networks), the generation being
//! served (swapped atomically when the indexer publishes a new one), the search pool and
//! the metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use shoplens::ann::LoadOutcome;
use shoplens::serving::engine::{SearchEngine, ServingIndex};
use shoplens::serving::snapshot;

use crate::metrics::Metrics;
use crate::pool::SearchPool;
use crate::upload::{MemoryBudget, UploadLimits};

/// Shared by every worker. Readers take the current generation with `load_full` and keep
/// their `Arc` for the whole request: a swap never pulls an index from under a search.
pub struct SearcherState {
    pub current: ArcSwapOption<ServingIndex>,
    /// Why the last load failed, for /readyz.
    pub last_error: ArcSwapOption<String>,
    pub engine: Option<Arc<SearchEngine>>,
    pub pool: SearchPool,
    pub metrics: Metrics,
    pub upload_limits: UploadLimits,
    /// Shared by every upload in flight, whatever its connection.
    pub upload_budget: Arc<MemoryBudget>,
}

impl SearcherState {
    pub fn new(engine: Option<Arc<SearchEngine>>, pool: SearchPool, upload_limits: UploadLimits, upload_memory_bytes: usize) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            last_error: ArcSwapOption::empty(),
            engine,
            pool,
            metrics: Metrics::default(),
            upload_limits,
            upload_budget: MemoryBudget::new(upload_memory_bytes),
        }
    }

    /// Serves `index` from now on.
    pub fn install(&self, index: ServingIndex) {
        self.metrics.index(index.generation(), index.items(), index.garments());
        self.current.store(Some(Arc::new(index)));
        self.last_error.store(None);
    }

    fn fail(&self, message: String) {
        self.metrics.reload_failed();
        self.last_error.store(Some(Arc::new(message)));
    }
}

/// Watches `db/serving/CURRENT` on its own thread and loads each newly published
/// generation there (loading a graph is CPU work that must not run on an actix worker).
/// A generation that fails to load is reported and the previous one keeps serving.
pub fn spawn_watcher(db: PathBuf, state: Arc<SearcherState>, every: Duration) {
    std::thread::Builder::new()
        .name("index-watcher".into())
        .spawn(move || {
            let mut watcher = Watcher::new(db);
            loop {
                watcher.poll(&state);
                std::thread::sleep(every);
            }
        })
        .expect("spawning the index watcher");
}

/// One look at `serving/CURRENT` per `poll`; the watcher thread polls on a timer, tests
/// poll when they have published, so no test waits on a clock.
pub struct Watcher {
    db: PathBuf,
    /// The generation that last failed to load, with its snapshot file as it was then: it
    /// is tried again once the file changes (repaired, or rewritten by the indexer), and
    /// not before.
    failed: Option<(u64, Option<FileStamp>)>,
    /// The last error reading `CURRENT` itself, reported once rather than every poll.
    pointer_error: Option<String>,
}

/// What tells a changed file from the same one: size, modification time and inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp(u64, Option<std::time::SystemTime>, u64);

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Self(meta.len(), meta.modified().ok(), inode))
    }
}

impl Watcher {
    pub fn new(db: PathBuf) -> Self {
        Self { db, failed: None, pointer_error: None }
    }

    /// Installs the published generation when it is new; returns the generation served.
    pub fn poll(&mut self, state: &SearcherState) -> Option<u64> {
        let served = state.current.load().as_ref().map(|i| i.generation());
        let dir = shoplens::store::StoreDir::new(&self.db).serving();
        let generation = match snapshot::current(&dir) {
            Ok(generation) => {
                self.pointer_error = None;
                generation
            }
            Err(e) => {
                let message = e.to_string();
                if self.pointer_error.as_ref() != Some(&message) {
                    tracing::error!(error = %message, "cannot read the published generation; the current one keeps serving");
                    state.fail(message.clone());
                    self.pointer_error = Some(message);
                }
                return served;
            }
        };
        match generation {
            Some(generation) if Some(generation) != served => self.try_install(state, generation).or(served),
            None if served.is_none() => {
                let db = self.db.display();
                state.last_error.store(Some(Arc::new(format!("no index published in {db} yet: run `indexer build --db {db}`"))));
                served
            }
            _ => served,
        }
    }

    fn try_install(&mut self, state: &SearcherState, generation: u64) -> Option<u64> {
        let stamp = FileStamp::of(&shoplens::store::StoreDir::new(&self.db).serving().join(snapshot::file_name(generation)));
        if self.failed.as_ref() == Some(&(generation, stamp.clone())) {
            return None;
        }
        match load(&self.db, generation) {
            Ok(index) => {
                tracing::info!(generation, items = index.items(), garments = index.garments(), "serving generation");
                state.install(index);
                self.failed = None;
                Some(generation)
            }
            Err(e) => {
                tracing::error!(generation, error = %e, "cannot load the generation; the previous one keeps serving");
                state.fail(format!("generation {generation}: {e}"));
                self.failed = Some((generation, stamp));
                None
            }
        }
    }
}

fn load(db: &Path, generation: u64) -> shoplens::Result<ServingIndex> {
    let index = ServingIndex::load(db, generation)?;
    if let LoadOutcome::Built { reason } = &index.outcome {
        tracing::warn!(%reason, "ANN graph built in memory");
    }
    Ok(index)
}
