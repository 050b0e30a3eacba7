//! End-to-end latency of `POST /v1/search` against a running searcher: `clients` threads,
//! each with one keep-alive connection, send the same photo `requests` times in all and
//! the latencies are reported as p50/p95/p99, with the server's own per-stage split
//! (`timings_ms`) averaged over the successful answers and the 503s counted apart.
//!
//! ```text
//! cargo run --release -p shoplens-benches --bin search_load -- \
//!     --addr 127.0.0.1:8080 --photo PHOTO.jpg --clients 16 --requests 400
//! ```
//!
//! `--seconds S` runs the clients for S seconds instead of a request count.
//!
//! `--pause-ms N` makes each client wait N ms after every answer: a quiet server, whose
//! shoppers' requests arrive apart, pays a wake-up cost a back-to-back run never sees
//! (`benches/NOTES.md`, 2026-12-05).
//!
//! `--photos DIR` cycles through the photos of a folder (`.jpg`, `.jpeg`, `.png`, `.webp`,
//! in name order, at most `--max-photos`) instead of one `--photo`: request `i` sends photo
//! `i mod n`, so a run measures the mix of sizes and garment counts real uploads have, not
//! one photo's. The served timings of README and `benches/RESULTS.md` come from
//! `--photos ../shared/data/ccp-unlabelled/image`.
//!
//! A plain HTTP/1.1 client over `TcpStream`: enough for one route, and no client library's
//! pooling or retries between us and what the server does.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Answer {
    status: u16,
    body: Vec<u8>,
}

fn post(stream: &mut BufReader<TcpStream>, addr: &str, path: &str, body: &[u8]) -> std::io::Result<Answer> {
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", body.len());
    let s = stream.get_mut();
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut line = String::new();
    stream.read_line(&mut line)?;
    let status: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        stream.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    Ok(Answer { status, body })
}

/// The photos of `dir` in name order, at most `max`.
fn read_folder(dir: &str, max: usize) -> Vec<Vec<u8>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("--photos {dir:?}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|x| x.to_str()).is_some_and(|x| ["jpg", "jpeg", "png", "webp"].contains(&x.to_ascii_lowercase().as_str())))
        .collect();
    paths.sort();
    paths.truncate(max);
    paths.iter().map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "search_load --addr HOST:PORT (--photo FILE | --photos DIR [--max-photos N]) [--clients N] [--requests N | --seconds S] [--pause-ms N] [--warmup N] [--query QS]\n\
             Latency of POST /v1/search against a running searcher: p50/p95/p99 and the server's own stages."
        );
        return;
    }
    let arg = |name: &str, default: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string());
    let addr = arg("--addr", "127.0.0.1:8080");
    let photo = arg("--photo", "");
    let clients: usize = arg("--clients", "1").parse().expect("--clients N");
    let requests: usize = arg("--requests", "100").parse().expect("--requests N");
    // With --seconds the clients run for that long instead of a request count.
    let seconds: f64 = arg("--seconds", "0").parse().expect("--seconds S");
    let warmup: usize = arg("--warmup", "5").parse().expect("--warmup N");
    let query = arg("--query", "k=10");
    let folder = arg("--photos", "");
    let max_photos: usize = arg("--max-photos", "10000").parse().expect("--max-photos N");
    let pause = Duration::from_millis(arg("--pause-ms", "0").parse().expect("--pause-ms N"));
    let bodies: Arc<Vec<Vec<u8>>> =
        Arc::new(if folder.is_empty() { vec![std::fs::read(&photo).unwrap_or_else(|e| panic!("--photo {photo:?}: {e}"))] } else { read_folder(&folder, max_photos) });
    assert!(!bodies.is_empty(), "no photos to send (give --photo FILE or --photos DIR)");
    let path = format!("/v1/search?{query}");

    // Warm-up on one connection (first-touch allocations, caches).
    let mut conn = BufReader::new(TcpStream::connect(&addr).expect("connect"));
    for i in 0..warmup {
        post(&mut conn, &addr, &path, &bodies[i % bodies.len()]).expect("warm-up request");
    }
    drop(conn);

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, path, bodies, next) = (addr.clone(), path.clone(), bodies.clone(), next.clone());
            std::thread::spawn(move || {
                let mut conn = BufReader::new(TcpStream::connect(&addr).expect("connect"));
                let mut out = Vec::new();
                let until = (seconds > 0.0).then(|| Instant::now() + Duration::from_secs_f64(seconds));
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let more = match until {
                        Some(t) => Instant::now() < t,
                        None => i < requests,
                    };
                    if !more {
                        break;
                    }
                    let t = Instant::now();
                    let answer = match post(&mut conn, &addr, &path, &bodies[i % bodies.len()]) {
                        Ok(a) => a,
                        Err(e) => {
                            eprintln!("request failed: {e}; reconnecting");
                            conn = BufReader::new(TcpStream::connect(&addr).expect("reconnect"));
                            continue;
                        }
                    };
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    if answer.status == 503 {
                        // The server shed load; back off as Retry-After asks (1 s would
                        // idle the benchmark: a short pause keeps the pressure on).
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    out.push((answer.status, ms, answer.body));
                    std::thread::sleep(pause);
                }
                out
            })
        })
        .collect();
    let results: Vec<(u16, f64, Vec<u8>)> = handles.into_iter().flat_map(|h| h.join().expect("client thread")).collect();
    let wall = started.elapsed().as_secs_f64();

    let mut ok: Vec<f64> = results.iter().filter(|r| r.0 == 200).map(|r| r.1).collect();
    ok.sort_by(f64::total_cmp);
    let busy = results.iter().filter(|r| r.0 == 503).count();
    let other: Vec<u16> = results.iter().filter(|r| r.0 != 200 && r.0 != 503).map(|r| r.0).collect();
    let mut stages = std::collections::BTreeMap::<String, f64>::new();
    let mut garments = 0usize;
    let mut served = Vec::new();
    for (_, _, body) in results.iter().filter(|r| r.0 == 200) {
        let v: serde_json::Value = serde_json::from_slice(body).expect("JSON answer");
        served.extend(v["timings_ms"]["total"].as_f64());
        if let Some(t) = v["timings_ms"].as_object() {
            for (k, x) in t {
                *stages.entry(k.clone()).or_default() += x.as_f64().unwrap_or(0.0);
            }
        }
        garments += v["garments"].as_array().map_or(0, Vec::len);
    }
    let n = ok.len().max(1) as f64;
    println!("{} distinct photo(s), {:.0} KiB on average", bodies.len(), bodies.iter().map(Vec::len).sum::<usize>() as f64 / bodies.len() as f64 / 1024.0);
    println!(
        "clients {clients}: {} answered 200, {busy} answered 503, {} other {:?}; {:.1} searches/s",
        ok.len(),
        other.len(),
        other.iter().take(5).collect::<Vec<_>>(),
        ok.len() as f64 / wall
    );
    println!(
        "latency ms (200s): p50 {:.1}  p95 {:.1}  p99 {:.1}  mean {:.1}  max {:.1}",
        percentile(&ok, 50.0),
        percentile(&ok, 95.0),
        percentile(&ok, 99.0),
        ok.iter().sum::<f64>() / n,
        ok.last().copied().unwrap_or(f64::NAN)
    );
    served.sort_by(f64::total_cmp);
    // The server's own total leaves out reading the upload and writing the answer, and the
    // wait for a search thread: the gap to the latency above is what HTTP and queueing cost.
    println!("server total ms: p50 {:.1}  p95 {:.1}", percentile(&served, 50.0), percentile(&served, 95.0));
    println!("server stages, mean ms: {}; garments per photo {:.1}", stages.iter().map(|(k, v)| format!("{k} {:.1}", v / n)).collect::<Vec<_>>().join(", "), garments as f64 / n);
}
