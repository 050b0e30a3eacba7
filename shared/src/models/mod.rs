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

/// Runs a forward pass on a worker of rayon's global pool (directly when already on one),
/// marked as a pass (`kernels::ForwardPass`) while it runs.
///
/// A pass that has the cores to itself runs its kernels' loops on the kernels' own team of
/// helper threads, which watch for the next loop instead of sleeping between them
/// (`kernels::team`); a pass beside another one (a photo's crops, one per core) runs them on
/// rayon. Called from a thread outside the pool, each of rayon's ~100 loops of a pass would
/// hand its work to the pool and put the caller to sleep until done; on a worker, a loop's
/// first half runs where it is and only the rest is stolen.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let counted = || {
        let _pass = kernels::ForwardPass::begin();
        f()
    };
    if rayon::current_thread_index().is_some() { counted() } else { rayon::scope(|_| counted()) }
}
