//! Training our networks on DeepFashion2-format data, as a library: the binaries add
//! arguments and progress bars. Training reports progress through [`Progress`].

pub mod augment;
pub mod embedder;
pub mod retrieval;

/// What a training run reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A stage starts with `total` units of work.
    Stage { name: String, total: u64 },
    /// `n` more units of the current stage are done.
    Advance(u64),
    /// A line worth showing (epoch results, decisions).
    Message(String),
}

/// Sink for [`Progress`] events.
pub type ProgressFn<'a> = &'a mut dyn FnMut(Progress);
