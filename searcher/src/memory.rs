//! Giving freed upload memory back to the system without slowing every search down.
//!
//! glibc keeps freed blocks in its arenas for reuse. That reuse is what makes a search
//! cheap: the detector's and embedder's activations (1–20 MB each, about a hundred per
//! search) come back from the arena without a page fault. A fixed mmap threshold of 1 MiB,
//! tried first against slow-upload attacks, put every one of those activations in its own
//! mapping, and each search then paid a page fault per 4 KiB touched and a TLB shootdown
//! per unmap: a photo took 158 ms instead of 82 ms (benches/NOTES.md, 2026-12-02).
//!
//! So the allocator keeps its defaults and the server trims instead: when uploads have given
//! back [`TRIM_AFTER_BYTES`] since the last trim, a background thread asks glibc to return
//! the free pages of every arena (`malloc_trim`). Ordinary traffic (photos of tens of KB)
//! trims once in thousands of searches; a crowd of large or slow uploads is trimmed away
//! within [`TRIM_EVERY`] of leaving.

use std::sync::Arc;
use std::time::Duration;

use crate::upload::MemoryBudget;

/// Bytes of uploads released that make a trim worthwhile.
pub const TRIM_AFTER_BYTES: usize = 64 << 20;

/// How often the trimmer looks.
pub const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Starts the thread that trims the heap after large amounts of upload memory were freed.
pub fn spawn_trimmer(budget: Arc<MemoryBudget>) {
    std::thread::Builder::new()
        .name("heap-trimmer".into())
        .spawn(move || {
            loop {
                std::thread::sleep(TRIM_EVERY);
                if budget.take_released(TRIM_AFTER_BYTES) {
                    let returned = return_free_heap_pages();
                    tracing::debug!(returned, "heap trimmed after uploads were freed");
                }
            }
        })
        .expect("spawning the heap trimmer");
}

/// Asks the allocator to hand free pages of all its arenas back to the system; whether it
/// could return any. Only glibc has such a call; elsewhere nothing is done.
pub fn return_free_heap_pages() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists under its locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
