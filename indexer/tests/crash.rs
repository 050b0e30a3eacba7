//! Crash tests of `indexer build` on a small generated catalog: SIGKILL while items are
//! being embedded (the build's log says when), and at 20 moments spread over whole
//! builds. After every kill the store opens and its published generation (if any) is
//! complete; a final rerun converges to exactly what an uninterrupted build gives.

use std::io::{BufRead, BufReader};
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

/// Saves every 3 items, so that the 30-item catalog's build logs (at each tenth) exactly
/// when a save has landed.
fn build_args<'a>(data: &'a str, db: &'a str) -> Vec<&'a str> {
    vec!["build", "--catalog", data, "--boxes", "gt", "--db", db, "--json", "--save-every", "3"]
}

/// The published generation's content digest, or `None` when nothing is published.
fn published_digest(db: &str) -> Option<String> {
    let out = indexer(&["status", "--db", db, "--json", "--digest"]).output().unwrap();
    assert!(out.status.success(), "the store must open after a kill: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["digest"].as_str().map(str::to_string)
}

/// A generated catalog and the digest of its uninterrupted build.
struct Setup {
    dir: tempfile::TempDir,
    shop: String,
    want: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let status = indexer(&["dataset", "synth", "--out", data.to_str().unwrap(), "--images", "30", "--seed", "11"]).status().unwrap();
    assert!(status.success());
    let shop = data.join("shop").to_str().unwrap().to_string();
    let clean = dir.path().join("clean");
    let clean = clean.to_str().unwrap();
    let out = indexer(&build_args(&shop, clean)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = published_digest(clean).expect("a clean build publishes");
    Setup { dir, shop, want }
}

/// Whether `line` is the build's log of an embedding stage not yet at its end
/// (`embedding 3/30`).
fn embedding_under_way(line: &str) -> bool {
    let Some(count) = line.strip_prefix("embedding ") else { return false };
    match count.split_once('/').map(|(d, t)| (d.parse::<u64>(), t.parse::<u64>())) {
        Some((Ok(done), Ok(total))) => done < total,
        _ => false,
    }
}

/// Runs one build and kills it as soon as its log shows embedding under way. Returns
/// whether the kill landed there; `false` when the build ran to its end instead.
fn build_killed_while_embedding(shop: &str, db: &str) -> bool {
    let mut child = indexer(&build_args(shop, db)).spawn().unwrap();
    let log = BufReader::new(child.stderr.take().unwrap());
    for line in log.lines() {
        if embedding_under_way(&line.unwrap()) {
            assert!(child.try_wait().unwrap().is_none(), "the build is still running when killed");
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            return true;
        }
    }
    assert!(child.wait().unwrap().success(), "an uninterrupted build succeeds");
    false
}

#[test]
fn sigkill_while_embedding_leaves_nothing_published_and_each_rerun_resumes() {
    let setup = setup();
    let db = setup.dir.path().join("embedding");
    let db = db.to_str().unwrap();
    let mut kills = 0;
    // Each run is killed once its log says a save landed, and keeps what it saved, so the
    // runs converge; 40 bounds a build that would not resume.
    while kills < 40 && build_killed_while_embedding(&setup.shop, db) {
        kills += 1;
        assert_eq!(published_digest(db), None, "kill {kills} landed while embedding: nothing may be published yet");
    }
    assert!(kills >= 3, "only {kills} kills landed while embedding");
    assert!(kills < 40, "the builds never finished: they do not resume");
    assert_eq!(published_digest(db).as_deref(), Some(setup.want.as_str()), "after {kills} kills while embedding and a rerun");
    eprintln!("{kills} kills while embedding; the rerun converged");
}

#[test]
fn sigkill_at_any_moment_never_damages_the_published_generation_and_a_rerun_converges() {
    let Setup { dir, shop, want } = setup();
    let shop = shop.as_str();
    let crash = dir.path().join("crash");
    let crash = crash.to_str().unwrap();

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
            && let Some(got) = published_digest(crash)
        {
            assert_eq!(got, want, "kill {i} after {delay:?}: the published generation is not a complete build");
            published_seen += 1;
        }
    }
    assert!(published_seen > 0, "no kill came after a publish: the spread no longer covers a whole build");
    let out = indexer(&build_args(shop, crash)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(published_digest(crash).as_deref(), Some(want.as_str()), "after 20 kills and a rerun");
    eprintln!("20 kills, {published_seen} of them after a generation had been published; rerun converged");
}

fn crash_store_exists(db: &str) -> bool {
    Path::new(db).join("catalog").is_dir()
}
