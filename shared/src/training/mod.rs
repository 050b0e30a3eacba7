//! Training our networks on DeepFashion2-format data, as a library: the binaries add
//! arguments and progress bars. Training reports progress through [`Progress`].


pub mod augment;
pub mod checkpoint;
pub mod detector;
pub mod embedder;
pub mod retrieval;

pub use crate::progress::{Progress, ProgressFn};
