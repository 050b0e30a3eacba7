//! Crash test of `indexer build`: SIGKILL at 20 moments spread over a build of a small
//! generated catalog. After every kill the store opens and its published generation (if
//! any) is complete; a final rerun converges to exactly what an uninterrupted build gives.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const INDEXER: &str = env!("CARGO_BIN_EXE_indexer");

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn indexer(args: &[&str]) -> Command {
    let mut cmd = Command::new(INDEXER);
    cmd.args(args).current_dir(repo()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn build_args<'a>(data: &'a str, db: &'a str) -> Vec<&'a str> {
    vec!["build", "--catalog", data, "--boxes", "gt", "--db", db, "--json"]
}

/// The published generation's content digest, or `None` when nothing is published.
fn published_digest(db: &str) -> Option<String> {
    let out = indexer(&["status", "--db", db, "--json", "--digest"]).output().unwrap();
    assert!(out.status.success(), "the store must open after a kill: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["digest"].as_str().map(str::to_string)
}

#[test]
fn sigkill_at_any_moment_never_damages_the_published_generation_and_a_rerun_converges() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let status = indexer(&["dataset", "synth", "--out", data.to_str().unwrap(), "--images", "30", "--seed", "11"]).status().unwrap();
    assert!(status.success());
    let shop = data.join("shop");
    let shop = shop.to_str().unwrap();
    let (clean, crash) = (dir.path().join("clean"), dir.path().join("crash"));
    let (clean, crash) = (clean.to_str().unwrap(), crash.to_str().unwrap());

    let out = indexer(&build_args(shop, clean)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = published_digest(clean).expect("a clean build publishes");

    let mut published_seen = 0;
    for i in 0..20u64 {
        let mut child = indexer(&build_args(shop, crash)).spawn().unwrap();
        // Spread over model loading, embedding, graph dump and publishing (a build of this
        // catalog takes about 2 s here); a few kills land after the build has finished.
        let delay = Duration::from_millis(40 + (i * 7919 % 2600));
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        if crash_store_exists(crash)
            && let Some(got) = published_digest(crash) {
                assert_eq!(got, want, "kill {i} after {delay:?}: the published generation is not a complete build");
                published_seen += 1;
            }
    }
    let out = indexer(&build_args(shop, crash)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(published_digest(crash).as_deref(), Some(want.as_str()), "after 20 kills and a rerun");
    eprintln!("20 kills, {published_seen} of them after a generation had been published; rerun converged");
}

fn crash_store_exists(db: &str) -> bool {
    Path::new(db).join("catalog").is_dir()
}
