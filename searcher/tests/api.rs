//! The HTTP API in process, with the shipped models and a small index of demo catalog
//! photos built here: searches, every client mistake as a 4xx, load shedding, items and
//! images with caching, metrics, and the switch to a newly published generation.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix_web::test;
use serde_json::Value;
use shoplens::catalog::{CatalogSource, LabelMap};
use shoplens::indexing::{BuildOptions, Models, build_generation};
use shoplens::models::detector::GarmentDetector;
use shoplens::models::embedder::GarmentEmbedder;
use shoplens::serving::engine::{SearchEngine, ServingIndex};
use shoplens::store::CatalogStore;
use shoplens::vision::DecodeLimits;
use shoplens_searcher::app;
use shoplens_searcher::pool::SearchPool;
use shoplens_searcher::state::{SearcherState, Watcher};
use shoplens_searcher::upload::UploadLimits;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Networks, loaded once for all tests.
fn engine() -> Arc<SearchEngine> {
    static ENGINE: OnceLock<Arc<SearchEngine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let dev = candle_core::Device::Cpu;
            let embedder = GarmentEmbedder::load(&repo().join("models/embedder-lite0.safetensors"), &dev).unwrap();
            let detector = GarmentDetector::load(&repo().join("models/detector-lite0.safetensors"), &dev).unwrap();
            // A low pixel cap so that the decompression-bomb test needs only a small file.
            Arc::new(SearchEngine { detector: Some(detector), embedder, limits: DecodeLimits { max_pixels: 4_000_000, ..DecodeLimits::default() } })
        })
        .clone()
}

/// The same networks under the server's default decode limits (40 MP).
fn engine_with_default_limits() -> Arc<SearchEngine> {
    let e = engine();
    Arc::new(SearchEngine { detector: e.detector.clone(), embedder: e.embedder.clone(), limits: DecodeLimits::default() })
}

/// The first `n` photos of the demo catalog, copied with a CSV into `dir`.
fn small_catalog(dir: &Path, n: usize) -> Vec<(String, PathBuf)> {
    let demo = repo().join("demo/catalog");
    let text = std::fs::read_to_string(demo.join("catalog.csv")).unwrap();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut csv = String::from("sku,image,label,title,price\n");
    let mut items = Vec::new();
    // Spread over the labels: every 25th row.
    for line in text.lines().skip(1).step_by(25).take(n) {
        let f: Vec<&str> = line.split(',').collect();
        std::fs::copy(demo.join(f[1]), dir.join(f[1])).unwrap();
        csv.push_str(&format!("{},{},{},{},19.90\n", f[0], f[1], f[2], f[3]));
        items.push((f[0].to_string(), dir.join(f[1])));
    }
    std::fs::write(dir.join("catalog.csv"), csv).unwrap();
    items
}

fn build(db: &Path, catalog: &Path) {
    let engine = engine();
    let store = CatalogStore::open(db).unwrap();
    let report = build_generation(
        &store,
        &[CatalogSource::from_path(catalog).unwrap()],
        &LabelMap::default(),
        Models { embedder: &engine.embedder, detector: engine.detector.as_ref() },
        &BuildOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

struct Fixture {
    _dir: tempfile::TempDir,
    db: PathBuf,
    items: Vec<(String, PathBuf)>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let items = small_catalog(&dir.path().join("catalog"), 8);
        let db = dir.path().join("db");
        build(&db, &dir.path().join("catalog/catalog.csv"));
        Fixture { db, items, _dir: dir }
    })
}

fn state_with(pool: SearchPool) -> Arc<SearcherState> {
    state_of(engine(), pool)
}

fn state_of(engine: Arc<SearchEngine>, pool: SearchPool) -> Arc<SearcherState> {
    let state = Arc::new(SearcherState::new(Some(engine), pool, UploadLimits::of_size(2 << 20), 64 << 20));
    state.install(ServingIndex::load_current(&fixture().db).unwrap().expect("a published generation"));
    state
}

macro_rules! app {
    ($state:expr) => {
        test::init_service(app::build($state.clone())).await
    };
}

/// Puts a job on the pool's only thread and returns once it runs; it holds the thread
/// until the sender is used (or 30 s pass).
fn occupy_the_only_search_thread(state: &SearcherState) -> (std::sync::mpsc::Sender<()>, shoplens_searcher::pool::Pending<Result<(), std::sync::mpsc::RecvTimeoutError>>) {
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (running_tx, running) = std::sync::mpsc::channel::<()>();
    let blocker = state
        .pool
        .submit(move || {
            running_tx.send(()).unwrap();
            released.recv_timeout(Duration::from_secs(30))
        })
        .unwrap();
    running.recv().unwrap();
    (release, blocker)
}

/// A POST of `photo` as the `image` field of a multipart form sent as `media_type`.
fn multipart_search(uri: &str, media_type: &str, photo: &[u8]) -> test::TestRequest {
    let boundary = "XyZ";
    let mut form = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").into_bytes();
    form.extend(photo);
    form.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    test::TestRequest::post().uri(uri).insert_header(("content-type", format!("{media_type}; boundary={boundary}"))).set_payload(form)
}

fn jpeg_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[actix_web::test]
async fn a_shop_photo_finds_its_own_item_first() {
    let state = state_with(SearchPool::new(2, 8));
    let app = app!(state);
    let (sku, path) = &fixture().items[3];
    let req = test::TestRequest::post().uri("/v1/search?k=5").set_payload(jpeg_bytes(path)).to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), 200);
    let body: Value = test::read_body_json(resp).await;
    let garments = body["garments"].as_array().unwrap();
    assert!(!garments.is_empty());
    let top: Vec<&str> = garments.iter().map(|g| g["results"][0]["sku"].as_str().unwrap()).collect();
    assert!(top.contains(&sku.as_str()), "{sku} not first for any garment: {body}");
    let first = &garments[0]["results"][0];
    assert!(first["image_url"].as_str().unwrap().starts_with("/v1/items/"));
    assert_eq!(first["price"].as_f64(), Some(19.9));
    assert!(body["timings_ms"]["detect"].as_f64().unwrap() > 0.0);
    assert!(body["image"]["width"].as_u64().unwrap() > 0);

    // The same photo as a multipart upload, with the shopper's own box.
    let req = multipart_search("/v1/search?k=3&box=0,0,100,100", "multipart/form-data", &jpeg_bytes(path)).to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), 200);
    let body: Value = test::read_body_json(resp).await;
    assert_eq!(body["garments"].as_array().unwrap().len(), 1);
    assert_eq!(body["garments"][0]["source"], "region");
    assert_eq!(body["garments"][0]["box"], serde_json::json!([0.0, 0.0, 100.0, 100.0]));
    assert_eq!(body["garments"][0]["results"].as_array().unwrap().len(), 3);
    // Media types are case-insensitive: the same form in upper case is a form too.
    let req = multipart_search("/v1/search?k=3&box=0,0,100,100", "MULTIPART/FORM-DATA", &jpeg_bytes(path)).to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), 200, "upper-case multipart");
    // A drawn box's category comes from the embedder's category head; its kind is listed
    // first when the shop has it.
    assert_eq!(body["garments"][0]["category_source"], "classifier");
    assert!(body["garments"][0]["category_probability"].as_f64().is_some_and(|p| p > 0.0 && p <= 1.0), "{body}");
    let first = &body["garments"][0]["ranked_first"];
    if !first.is_null() {
        let kind = first["category"].as_str().unwrap();
        let listed = first["results"].as_u64().unwrap() as usize;
        let results = body["garments"][0]["results"].as_array().unwrap();
        assert!(results[..listed].iter().all(|r| r["category"] == kind), "{body}");
    }
}

#[actix_web::test]
async fn detected_garments_say_where_their_category_came_from_and_rank_can_be_similarity() {
    let state = state_with(SearchPool::new(1, 4));
    let app = app!(state);
    let photo = jpeg_bytes(&fixture().items[0].1);
    for (uri, ranked_first_null) in [("/v1/search?k=3", false), ("/v1/search?k=3&rank=similarity", true)] {
        let resp = test::call_service(&app, test::TestRequest::post().uri(uri).set_payload(photo.clone()).to_request()).await;
        assert_eq!(resp.status(), 200, "{uri}");
        let body: Value = test::read_body_json(resp).await;
        for g in body["garments"].as_array().unwrap() {
            let expected = if g["source"] == "detected" { "detector" } else { "classifier" };
            assert_eq!(g["category_source"], expected, "{uri}: {g}");
            if ranked_first_null {
                assert!(g["ranked_first"].is_null(), "{uri}: {g}");
            }
        }
    }
}

/// `(status, error code)` of a POST.
macro_rules! error_of {
    ($app:expr, $uri:expr, $body:expr) => {{
        let resp = test::call_service(&$app, test::TestRequest::post().uri($uri).set_payload($body).to_request()).await;
        let status = resp.status().as_u16();
        let body: Value = test::read_body_json(resp).await;
        (status, body["error"]["code"].as_str().unwrap_or_default().to_string())
    }};
}

#[actix_web::test]
async fn client_mistakes_are_4xx_with_a_code() {
    let state = state_with(SearchPool::new(1, 4));
    let app = app!(state);
    let photo = jpeg_bytes(&fixture().items[0].1);
    let mut png = Vec::new();
    // A decompression bomb: 5000 × 5000 pixels (over the 4 M cap) in a small file, under
    // the 2 MB body limit so that the pixel check is what refuses it.
    image::GrayImage::new(5000, 5000).write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    assert!(png.len() < 2 << 20, "{} bytes", png.len());
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/v1/search", Vec::new(), 400, "empty_body"),
        ("/v1/search", b"hello, not an image".to_vec(), 400, "invalid_image"),
        ("/v1/search", photo[..photo.len() / 3].to_vec(), 400, "invalid_image"),
        ("/v1/search", b"BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00".to_vec(), 415, "unsupported_image_format"),
        ("/v1/search", vec![0xFF; (2 << 20) + 10], 413, "body_too_large"),
        ("/v1/search", png, 413, "image_too_large"),
        ("/v1/search?k=0", photo.clone(), 400, "invalid_k"),
        ("/v1/search?k=101", photo.clone(), 400, "invalid_k"),
        ("/v1/search?k=ten", photo.clone(), 400, "invalid_k"),
        ("/v1/search?category=spacesuit", photo.clone(), 400, "unknown_category"),
        ("/v1/search?box=1,2,3", photo.clone(), 400, "invalid_box"),
        ("/v1/search?box=50,50,10,10", photo.clone(), 400, "invalid_box"),
        ("/v1/search?box=1e9,1e9,2e9,2e9", photo.clone(), 400, "invalid_box"),
        ("/v1/search?colour=red", photo.clone(), 400, "invalid_query"),
        ("/v1/search?rank=popularity", photo.clone(), 400, "invalid_rank"),
    ];
    for (uri, body, status, code) in cases {
        let (s, c) = error_of!(app, uri, body);
        assert_eq!((s, c.as_str()), (status, code), "{uri}");
    }
    let resp = test::call_service(&app, test::TestRequest::get().uri("/v1/nothing").to_request()).await;
    assert_eq!(resp.status(), 404);
    // After all that, the server still searches.
    let (s, _) = error_of!(app, "/v1/search", photo);
    assert_eq!(s, 200);
}

#[actix_web::test]
async fn a_full_pool_answers_503_with_retry_after_at_once() {
    let state = state_with(SearchPool::new(1, 0));
    let app = app!(state);
    let (tx, blocker) = occupy_the_only_search_thread(&state);
    let started = std::time::Instant::now();
    let req = test::TestRequest::post().uri("/v1/search").set_payload(jpeg_bytes(&fixture().items[0].1)).to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    assert!(started.elapsed() < Duration::from_secs(5));
    tx.send(()).unwrap();
    let _ = blocker.outcome().await;
    let text = String::from_utf8(test::call_and_read_body(&app, test::TestRequest::get().uri("/metrics").to_request()).await.to_vec()).unwrap();
    assert!(text.contains("shoplens_search_rejected_total 1"), "{text}");
    assert!(text.contains("route=\"/v1/search\",status=\"503\""), "{text}");
}

#[actix_web::test]
async fn an_upload_over_the_memory_budget_is_503_and_counted_apart_from_a_full_pool() {
    let state = Arc::new(SearcherState::new(Some(engine()), SearchPool::new(1, 4), UploadLimits::of_size(2 << 20), 1000));
    state.install(ServingIndex::load_current(&fixture().db).unwrap().unwrap());
    let app = app!(state);
    let resp = test::call_service(&app, test::TestRequest::post().uri("/v1/search").set_payload(vec![0u8; 2000]).to_request()).await;
    assert_eq!(resp.status(), 503);
    let body: Value = test::read_body_json(resp).await;
    assert_eq!(body["error"]["code"], "busy");
    assert_eq!(state.upload_budget.used(), 0);
    let text = String::from_utf8(test::call_and_read_body(&app, test::TestRequest::get().uri("/metrics").to_request()).await.to_vec()).unwrap();
    assert!(text.contains("shoplens_upload_over_budget_total 1"), "{text}");
    assert!(text.contains("shoplens_search_rejected_total 0"), "{text}");
}

#[actix_web::test]
async fn items_images_metrics_and_docs() {
    let state = state_with(SearchPool::new(1, 4));
    let app = app!(state);
    let (sku, _) = &fixture().items[1];
    let body: Value = test::call_and_read_body_json(&app, test::TestRequest::get().uri(&format!("/v1/items/{sku}")).to_request()).await;
    assert_eq!(body["sku"], sku.as_str());
    assert!(!body["garments"].as_array().unwrap().is_empty());
    let resp = test::call_service(&app, test::TestRequest::get().uri(&format!("/v1/items/{sku}/image")).to_request()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-type").unwrap(), "image/jpeg");
    assert!(resp.headers().get("cache-control").unwrap().to_str().unwrap().contains("max-age"));
    let etag = resp.headers().get("etag").unwrap().clone();
    let resp = test::call_service(&app, test::TestRequest::get().uri(&format!("/v1/items/{sku}/image")).insert_header(("if-none-match", etag)).to_request()).await;
    assert_eq!(resp.status(), 304);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/v1/items/no-such-sku").to_request()).await;
    assert_eq!(resp.status(), 404);

    let spec: Value = test::call_and_read_body_json(&app, test::TestRequest::get().uri("/v1/openapi.json").to_request()).await;
    assert!(spec["paths"]["/v1/search"]["post"].is_object());
    let page = test::call_and_read_body(&app, test::TestRequest::get().uri("/").to_request()).await;
    assert!(String::from_utf8_lossy(&page).contains("/v1/search"));
    // The app under test is the one `main` serves: its page is compressed for a client that asks.
    let resp = test::call_service(&app, test::TestRequest::get().uri("/").insert_header(("accept-encoding", "gzip")).to_request()).await;
    assert_eq!(resp.headers().get("content-encoding").map(|v| v.to_str().unwrap()), Some("gzip"));
    let cats: Value = test::call_and_read_body_json(&app, test::TestRequest::get().uri("/v1/categories").to_request()).await;
    assert!(cats["detector"].as_array().unwrap().iter().any(|c| c == "top"));
    let text = String::from_utf8(test::call_and_read_body(&app, test::TestRequest::get().uri("/metrics").to_request()).await.to_vec()).unwrap();
    assert!(text.contains("route=\"/v1/items/{sku}\",status=\"200\""), "{text}");
    assert!(text.contains("route=\"/v1/items/{sku}\",status=\"404\""), "{text}");
    assert!(!text.contains("no-such-sku"), "raw paths must not become labels");
}

#[actix_web::test]
async fn a_newly_published_generation_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let items = small_catalog(&dir.path().join("catalog"), 4);
    let db = dir.path().join("db");
    let state = Arc::new(SearcherState::new(Some(engine()), SearchPool::new(1, 4), UploadLimits::of_size(2 << 20), 64 << 20));
    let mut watcher = Watcher::new(db.clone());
    let app = app!(state);
    assert_eq!(watcher.poll(&state), None);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(resp.status(), 503);
    build(&db, &dir.path().join("catalog/catalog.csv"));
    assert_eq!(watcher.poll(&state), Some(1));
    let held = state.current.load_full().unwrap();
    // Drop one item from the catalog and rebuild: generation 2 replaces it.
    let csv = std::fs::read_to_string(dir.path().join("catalog/catalog.csv")).unwrap();
    let kept: Vec<&str> = csv.lines().filter(|l| !l.starts_with(&items[0].0)).collect();
    std::fs::write(dir.path().join("catalog/catalog.csv"), kept.join("\n") + "\n").unwrap();
    build(&db, &dir.path().join("catalog/catalog.csv"));
    assert_eq!(watcher.poll(&state), Some(2));
    // A search that held generation 1 still completes on it.
    let photo = image::open(&items[1].1).unwrap().to_rgb8();
    let request = shoplens::serving::engine::SearchRequest { k: 3, category: None, region: None, ranking: Default::default() };
    assert_eq!(engine().search_image(&held, &photo, &request).unwrap().generation, 1);
    let resp = test::call_service(&app, test::TestRequest::get().uri(&format!("/v1/items/{}", items[0].0)).to_request()).await;
    assert_eq!(resp.status(), 404, "the removed item is gone from generation 2");
    let body: Value = test::call_and_read_body_json(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(body["generation"], 2);
}

/// The committed hostile-input corpus (`tests/hostile/`, written by its `make.py`) and
/// hostile requests built here: each gets its status and stable error code, and the server
/// keeps serving.
#[actix_web::test]
async fn the_hostile_corpus_gets_4xx_and_the_server_keeps_serving() {
    let state = state_of(engine_with_default_limits(), SearchPool::new(1, 4));
    let app = app!(state);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile");
    let file = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let files: [(&str, &str, u16, &str); 17] = [
        ("zero.bin", "/v1/search", 400, "empty_body"),
        ("random.bin", "/v1/search", 400, "invalid_image"),
        ("truncated.jpg", "/v1/search", 400, "invalid_image"),
        ("truncated.png", "/v1/search", 400, "invalid_image"),
        ("bomb-100000x100000.png", "/v1/search", 413, "image_too_large"),
        ("fake.heic", "/v1/search", 415, "unsupported_image_format"),
        ("small.gif", "/v1/search", 200, ""),
        ("small.webp", "/v1/search", 200, ""),
        ("small.tiff", "/v1/search", 200, ""),
        ("photo.jpg", "/v1/search?k=-1", 400, "invalid_k"),
        ("photo.jpg", "/v1/search?k=99999999999999999999999", 400, "invalid_k"),
        ("photo.jpg", "/v1/search?box=1e39,0,2e39,10", 400, "invalid_box"),
        // The second hostile run: cost amplification refused before any decoding, a cut
        // scan with an end marker glued on, formats named rather than "not an image".
        ("gif-screen-6000x6000.gif", "/v1/search", 413, "decode_budget"),
        ("jpeg-declares-16384x2441.jpg", "/v1/search", 413, "decode_budget"),
        ("truncated-with-eoi.jpg", "/v1/search", 400, "invalid_image"),
        ("bigtiff.tif", "/v1/search", 415, "unsupported_image_format"),
        ("webp-canvas-20000x20000.webp", "/v1/search", 413, "image_too_large"),
    ];
    for (name, uri, status, code) in files {
        let got = error_of!(app, uri, file(name));
        assert_eq!(got, (status, code.to_string()), "{name} {uri}");
    }
    let more: [(&str, u16, &str); 3] =
        [("/v1/search?box=5000,5000,6000,6000", 400, "invalid_box"), ("/v1/search?category=", 200, ""), ("/v1/search?k=3&k=4&category=top&category=dress", 200, "")];
    for (uri, status, code) in more {
        assert_eq!(error_of!(app, uri, file("photo.jpg")), (status, code.to_string()), "{uri}");
    }

    // EXIF orientation 6: stored 64×80, searched upright as 80×64.
    let body: Value = test::call_and_read_body_json(&app, test::TestRequest::post().uri("/v1/search?k=1").set_payload(file("exif-rotated.jpg")).to_request()).await;
    assert_eq!((body["image"]["width"].as_u64(), body["image"]["height"].as_u64()), (Some(80), Some(64)));
    // A wrong content type does not matter: the bytes are sniffed.
    let req = test::TestRequest::post().uri("/v1/search?k=1").insert_header(("content-type", "text/plain")).set_payload(file("photo.jpg")).to_request();
    assert_eq!(test::call_service(&app, req).await.status(), 200);

    let multipart = |parts: Vec<(String, Vec<u8>)>| {
        let mut body = Vec::new();
        for (disposition, data) in parts {
            body.extend(format!("--B\r\nContent-Disposition: form-data; {disposition}\r\n\r\n").into_bytes());
            body.extend(data);
            body.extend(b"\r\n");
        }
        body.extend(b"--B--\r\n");
        test::TestRequest::post().uri("/v1/search").insert_header(("content-type", "multipart/form-data; boundary=B")).set_payload(body).to_request()
    };
    // A file part over the 2 MB limit.
    let resp = test::call_service(&app, multipart(vec![("name=\"image\"; filename=\"a.jpg\"".into(), vec![0xFF; (2 << 20) + 1])])).await;
    assert_eq!(resp.status(), 413);
    // A thousand tiny text parts and no file.
    let parts = (0..1000).map(|i| (format!("name=\"f{i}\""), b"x".to_vec())).collect();
    let resp = test::call_service(&app, multipart(parts)).await;
    assert_eq!(resp.status(), 400);
    let body: Value = test::read_body_json(resp).await;
    assert_eq!(body["error"]["code"], "invalid_multipart");
    // Broken multipart bodies, the first the one that panicked actix-multipart 0.7.2.
    for (content_type, body) in
        [("multipart/form-data; boundary=C", &b"\n--C--\r\n"[..]), ("multipart/form-data; boundary=B", b"--B\r\ngarbage"), ("multipart/form-data", b"--B\r\n\r\nx\r\n--B--\r\n")]
    {
        let req = test::TestRequest::post().uri("/v1/search").insert_header(("content-type", content_type)).set_payload(body.to_vec()).to_request();
        let resp = test::call_service(&app, req).await;
        assert_eq!(resp.status(), 400, "{body:?}");
        let answer: Value = test::read_body_json(resp).await;
        assert_eq!(answer["error"]["code"], "invalid_multipart", "{body:?}");
    }

    // Still serving.
    assert_eq!(error_of!(app, "/v1/search", file("photo.jpg")).0, 200);
}

#[cfg(unix)]
#[actix_web::test]
async fn an_item_image_is_served_only_as_it_was_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let items = small_catalog(&dir.path().join("catalog"), 2);
    let db = dir.path().join("db");
    build(&db, &dir.path().join("catalog/catalog.csv"));
    let state = Arc::new(SearcherState::new(Some(engine()), SearchPool::new(1, 4), UploadLimits::of_size(2 << 20), 64 << 20));
    state.install(ServingIndex::load_current(&db).unwrap().unwrap());
    let app = app!(state);
    let (sku, path) = &items[0];
    let uri = format!("/v1/items/{sku}/image");
    assert_eq!(test::call_service(&app, test::TestRequest::get().uri(&uri).to_request()).await.status().as_u16(), 200);
    let original = std::fs::read(path).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"root:x:0:0:root:/root:/bin/bash\n").unwrap();
    // Replaced by a link (to a secret, to an endless device), or by other bytes: not served.
    for target in [secret.as_path(), Path::new("/dev/zero")] {
        std::fs::remove_file(path).unwrap();
        std::os::unix::fs::symlink(target, path).unwrap();
        let resp = test::call_service(&app, test::TestRequest::get().uri(&uri).to_request()).await;
        assert_eq!(resp.status(), 404, "{}", target.display());
        let body: Value = test::read_body_json(resp).await;
        assert_eq!(body["error"]["code"], "image_missing");
    }
    std::fs::remove_file(path).unwrap();
    std::fs::write(path, &original[..original.len() / 2]).unwrap();
    assert_eq!(test::call_service(&app, test::TestRequest::get().uri(&uri).to_request()).await.status().as_u16(), 404);
    std::fs::write(path, &original).unwrap();
    assert_eq!(test::call_service(&app, test::TestRequest::get().uri(&uri).to_request()).await.status().as_u16(), 200);
}

#[actix_web::test]
async fn a_photo_too_small_for_a_garment_is_one_whole_image_search() {
    // A 1×1 photo (and a 3×2 one) once came back as six detected "garments".
    let engine = engine();
    let index = ServingIndex::load_current(&fixture().db).unwrap().unwrap();
    for (w, h) in [(1, 1), (3, 2)] {
        // Red: the colour that gave four "outer" garments at 1×1 before the minimum size.
        let image = image::RgbImage::from_pixel(w, h, image::Rgb([200, 30, 30]));
        assert!(engine.detector.as_ref().unwrap().detect(&image).unwrap().is_empty(), "{w}×{h}");
        let req = shoplens::serving::engine::SearchRequest { k: 2, category: None, region: None, ranking: Default::default() };
        let outcome = engine.search_image(&index, &image, &req).unwrap();
        assert_eq!(outcome.garments.len(), 1);
        assert_eq!(outcome.garments[0].source, "whole_image");
    }
}

#[actix_web::test]
async fn wrong_methods_are_405_with_allow_head_works_and_weak_etags_match() {
    let state = state_with(SearchPool::new(1, 4));
    let app = app!(state);
    for (method, uri, allow) in [
        (actix_web::http::Method::GET, "/v1/search", "POST"),
        (actix_web::http::Method::POST, "/healthz", "GET, HEAD"),
        (actix_web::http::Method::DELETE, "/v1/items/x", "GET, HEAD"),
    ] {
        let resp = test::call_service(&app, test::TestRequest::default().method(method.clone()).uri(uri).to_request()).await;
        assert_eq!(resp.status(), 405, "{method} {uri}");
        assert_eq!(resp.headers().get("allow").unwrap(), allow);
        let body: Value = test::read_body_json(resp).await;
        assert_eq!(body["error"]["code"], "method_not_allowed");
    }
    let resp = test::call_service(&app, test::TestRequest::default().method(actix_web::http::Method::HEAD).uri("/healthz").to_request()).await;
    assert_eq!(resp.status(), 200);
    let (sku, _) = &fixture().items[2];
    let uri = format!("/v1/items/{sku}/image");
    let resp = test::call_service(&app, test::TestRequest::get().uri(&uri).to_request()).await;
    let etag = resp.headers().get("etag").unwrap().to_str().unwrap().to_string();
    let weak = format!("W/{etag}");
    let resp = test::call_service(&app, test::TestRequest::get().uri(&uri).insert_header(("if-none-match", weak.as_str())).to_request()).await;
    assert_eq!(resp.status(), 304, "{weak}");
    // A request target of 60 KB: 414 with the error JSON, counted like any request.
    let long = format!("/v1/items/{}", "x".repeat(60_000));
    let resp = test::call_service(&app, test::TestRequest::get().uri(&long).to_request()).await;
    assert_eq!(resp.status(), 414);
    let body: Value = test::read_body_json(resp).await;
    assert_eq!(body["error"]["code"], "uri_too_long");
    assert!(state.metrics.render().contains("status=\"414\""));
}

/// A real server on a loopback port, as `main` builds it (the socket probe included).
fn serve_on_loopback(state: Arc<SearcherState>) -> (std::net::SocketAddr, actix_web::dev::ServerHandle) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = shoplens_searcher::server::ServerSettings { workers: 1, max_connections: 64 };
    let server = shoplens_searcher::server::http_server(listener, state, settings).unwrap();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (addr, handle)
}

/// Polls `done` every 20 ms for up to 20 s (a wait for another thread, not a timing).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

#[cfg(unix)]
#[actix_web::test]
async fn a_search_whose_client_has_gone_is_not_run_and_a_trickled_upload_is_cut_off() {
    use std::io::{Read, Write};
    let state = Arc::new(SearcherState::new(
        Some(engine()),
        SearchPool::new(1, 4),
        UploadLimits { max_bytes: 2 << 20, deadline: Duration::from_secs(2), idle: Duration::from_secs(1) },
        64 << 20,
    ));
    state.install(ServingIndex::load_current(&fixture().db).unwrap().expect("a published generation"));
    let (addr, server) = serve_on_loopback(state.clone());

    // The only search thread is busy; a client sends a whole search and hangs up.
    let (release, blocker) = occupy_the_only_search_thread(&state);
    let photo = jpeg_bytes(&fixture().items[0].1);
    let mut request = format!("POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", photo.len()).into_bytes();
    request.extend_from_slice(&photo);
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    client.write_all(&request).unwrap();
    eventually("the search is queued", || state.pool.waiting() == 1).await;
    client.shutdown(std::net::Shutdown::Both).unwrap();
    drop(client);
    release.send(()).unwrap();
    let _ = blocker.outcome().await;
    eventually("the search is counted as abandoned", || state.metrics.render().contains("shoplens_search_abandoned_total 1")).await;
    eventually("the request is recorded as 499", || state.metrics.render().contains("route=\"/v1/search\",status=\"499\"")).await;
    assert!(!state.metrics.render().contains("stage=\"detect\""), "the abandoned search ran");

    // One byte every 300 ms of a declared 1,000: cut off at the 2 s deadline with a 408,
    // and the connection closed.
    let answer = actix_web::rt::task::spawn_blocking(move || {
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        slow.write_all(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n").unwrap();
        slow.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..100 {
            if slow.write_all(b"x").is_err() {
                break;
            }
            match slow.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert_eq!(state.upload_budget.used(), 0);
    // And the server still searches.
    let ok = actix_web::rt::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(&request).unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        String::from_utf8_lossy(&head).into_owned()
    })
    .await
    .unwrap();
    assert_eq!(ok, "HTTP/1.1 200");
    server.stop(false).await;
}

#[actix_web::test]
async fn the_watcher_retries_a_repaired_generation_and_refuses_mislabelled_or_oversized_pointers() {
    let dir = tempfile::tempdir().unwrap();
    small_catalog(&dir.path().join("catalog"), 3);
    let db = dir.path().join("db");
    let csv = dir.path().join("catalog/catalog.csv");
    let state = Arc::new(SearcherState::new(Some(engine()), SearchPool::new(1, 4), UploadLimits::of_size(2 << 20), 64 << 20));
    let failures = |state: &SearcherState| {
        let text = state.metrics.render();
        text.lines().find_map(|l| l.strip_prefix("shoplens_index_load_failures_total ")).unwrap().trim().parse::<u64>().unwrap()
    };
    let mut watcher = Watcher::new(db.clone());
    build(&db, &csv);
    assert_eq!(watcher.poll(&state), Some(1));
    // Generation 2 is published damaged: refused once, and not reloaded every poll.
    std::fs::write(&csv, std::fs::read_to_string(&csv).unwrap().lines().take(3).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    build(&db, &csv);
    let serving = db.join("serving");
    let good = std::fs::read(serving.join("gen-2.snapshot")).unwrap();
    std::fs::write(serving.join("gen-2.snapshot"), b"SLSNAP damaged").unwrap();
    assert_eq!(watcher.poll(&state), Some(1));
    assert_eq!(watcher.poll(&state), Some(1));
    assert_eq!(failures(&state), 1);
    // Repaired: served at the next poll, without a new publish.
    std::fs::write(serving.join("gen-2.snapshot"), &good).unwrap();
    assert_eq!(watcher.poll(&state), Some(2));
    // A snapshot whose name disagrees with the generation it holds is refused, once.
    std::fs::write(serving.join("gen-3.snapshot"), &good).unwrap();
    std::fs::write(serving.join("CURRENT"), "3\n").unwrap();
    assert_eq!(watcher.poll(&state), Some(2));
    assert_eq!(watcher.poll(&state), Some(2));
    assert_eq!(failures(&state), 2);
    assert!(state.last_error.load_full().unwrap().contains("holds generation 2"), "{:?}", state.last_error.load_full());
    // A pointer of a megabyte is not read, and reported once.
    std::fs::write(serving.join("CURRENT"), vec![b'7'; 1 << 20]).unwrap();
    assert_eq!(watcher.poll(&state), Some(2));
    assert_eq!(watcher.poll(&state), Some(2));
    assert_eq!(failures(&state), 3);
    assert!(state.last_error.load_full().unwrap().contains("over the 64-byte limit"), "{:?}", state.last_error.load_full());
}

#[actix_web::test]
async fn a_search_stops_between_stages_once_it_is_cancelled() {
    let index = ServingIndex::load_current(&fixture().db).unwrap().unwrap();
    let photo = jpeg_bytes(&fixture().items[0].1);
    let request = shoplens::serving::engine::SearchRequest { k: 3, category: None, region: None, ranking: Default::default() };
    let stopped = engine().search_unless(&index, &photo, &request, &|| true).unwrap_err();
    assert!(matches!(stopped, shoplens::Error::Cancelled { stage: "decoding" }), "{stopped}");
    // Gone while the detector ran: stopped before the embedder.
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let later = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1;
    let stopped = engine().search_unless(&index, &photo, &request, &later).unwrap_err();
    assert!(matches!(stopped, shoplens::Error::Cancelled { stage: "detection" }), "{stopped}");
    assert!(engine().search_unless(&index, &photo, &request, &|| false).is_ok());
}

/// Writes `request` on a fresh loopback connection and reads until the server closes it.
fn exchange(addr: std::net::SocketAddr, request: Vec<u8>) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(&request).unwrap();
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[actix_web::test]
async fn a_request_target_too_long_for_actix_is_414_with_the_error_json_after_the_requests_before_it() {
    let state = state_with(SearchPool::new(1, 4));
    let (addr, server) = serve_on_loopback(state.clone());
    let long_get = |len: usize| format!("GET /v1/items/{} HTTP/1.1\r\nHost: x\r\n\r\n", "x".repeat(len)).into_bytes();
    // 100 KB (actix's empty 400) and 200 KB (its 431): 414, the error JSON, then the close.
    for len in [100_000, 200_000] {
        let answer = actix_web::rt::task::spawn_blocking(move || exchange(addr, long_get(len))).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 414"), "{len}: {answer}");
        let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "uri_too_long");
    }
    eventually("the refusals are counted", || state.metrics.render().contains("route=\"unmatched\",status=\"414\"} 2")).await;

    // A search whose upload holds 20 KB without a line end, sent by length and then chunked,
    // a health check and the long target, pipelined on one connection: the requests before
    // the long one are answered in order, then the 414.
    let photo = jpeg_bytes(&fixture().items[0].1);
    let mut with_comment = photo[..2].to_vec();
    let comment = vec![b'x'; 20_000];
    with_comment.extend([0xFF, 0xFE]);
    with_comment.extend(((comment.len() + 2) as u16).to_be_bytes());
    with_comment.extend(&comment);
    with_comment.extend(&photo[2..]);
    let mut pipelined = format!("POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", with_comment.len()).into_bytes();
    pipelined.extend(&with_comment);
    pipelined.extend(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n");
    for piece in with_comment.chunks(15_000) {
        pipelined.extend(format!("{:X}\r\n", piece.len()).into_bytes());
        pipelined.extend(piece);
        pipelined.extend(b"\r\n");
    }
    pipelined.extend(b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    pipelined.extend(long_get(100_000));
    let answer = actix_web::rt::task::spawn_blocking(move || exchange(addr, pipelined)).await.unwrap();
    let statuses: Vec<&str> = answer.match_indices("HTTP/1.1 ").map(|(i, _)| &answer[i + 9..i + 12]).collect();
    assert_eq!(statuses, ["200", "200", "200", "414"], "{answer}");
    assert_eq!(answer.matches("\"garments\"").count(), 2, "the searches ran: {answer}");
    server.stop(false).await;
}
