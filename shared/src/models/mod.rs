//! Neural networks in candle, in three kinds of module:
//! - families: the [`backbone`] (the seam every network's features come through; one file
//!   per family behind it), the [`detector`] and the [`embedder`] built on it;
//! - [`kernels`]: the layers and the CPU custom ops they run on;
//! - [`formats`]: weights files, the tensor reader every loader goes through, and the import
//!   of the PyTorch checkpoints we start from.

pub mod backbone;
pub mod detector;
pub mod embedder;
pub mod formats;
pub mod fusion;
pub mod kernels;

pub use self::backbone::{Backbone, backbone_tag};

/// Runs a forward pass on a worker of rayon's global pool (directly when already on one).
///
/// Our kernels and gemm parallelise each operation with rayon. Called from a thread outside
/// the pool, every one of the ~100 operations of a pass would hand its work to the pool and
/// put the caller to sleep until done: a cross-thread wake-up per operation, which the
/// profile showed as scheduler time and which kept two threads no faster than one. On a
/// worker, an operation's first half runs where it is and only the rest is stolen.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() { f() } else { rayon::scope(|_| f()) }
}
