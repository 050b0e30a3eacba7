//! Progress reporting from long engine jobs (training, indexing) to whatever shows it: the
//! engine emits events, the binaries draw bars or log lines.

/// What a long job reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A stage starts with `total` units of work.
    Stage { name: String, total: u64 },
    /// `n` more units of the current stage are done.
    Advance(u64),
    /// A line worth showing (results, decisions, skipped inputs).
    Message(String),
}

/// Sink for [`Progress`] events.
pub type ProgressFn<'a> = &'a mut dyn FnMut(Progress);
