//! Helpers of the Shoplens benchmarks (`benches/benches/*.rs`, run with `cargo bench -p
//! shoplens-benches`).

/// Resident memory of this process in bytes (Linux `/proc/self/statm`), for memory per
/// vector beside build time; `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A size from the environment (`SHOPLENS_BENCH_N=100000`), or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `20000` → `20k`, for benchmark names that carry their parameters.
pub fn short(n: usize) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}
