//! The HTTP routes. Handlers stay thin: they parse and check the request, hand the work to
//! the search pool, and shape JSON. Every client mistake is a 4xx with
//! `{"error":{"code","message"}}`; nothing a client sends can panic a worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::{Compress, Next, from_fn};
use actix_web::{App, HttpRequest, HttpResponse, ResponseError, web};
use serde_json::{Value, json};
use shoplens::geometry::BBox;
use shoplens::serving::engine::{MAX_RESULTS, Ranking, SearchOutcome, SearchRequest};

use crate::client::ClientSocket;
use crate::multipart;
use crate::pool::{Busy, JobError};
use crate::state::SearcherState;
use crate::upload::{self, Upload, UploadError, UploadLimits};

const PAGE: &str = include_str!("../static/index.html");
const OPENAPI: &str = include_str!("../static/openapi.json");

/// What nginx records for a request whose client closed the connection before the answer
/// (no standard code exists); it is counted in `/metrics`, though nobody reads the body.
fn client_closed_request() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Close the connection after answering (the request's body was left unread).
    close: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), close: false }
    }

    fn closing(self) -> Self {
        Self { close: true, ..self }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.insert_header((header::RETRY_AFTER, "1"));
        }
        if self.close {
            resp.force_close();
        }
        resp.json(error_json(self.code, &self.message))
    }
}

/// The body of every error answer: `{"error": {"code", "message"}}`.
pub fn error_json(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message}})
}

impl From<shoplens::Error> for ApiError {
    fn from(e: shoplens::Error) -> Self {
        let status = status_of(&e);
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            // The details are for the operator's log, not for the client.
            tracing::error!(error = %e, code = e.code(), "internal error");
            return Self::new(status, "internal", "the search failed on our side; it has been logged");
        }
        Self::new(status, e.code(), e.to_string())
    }
}

/// The HTTP status of each engine error. Exhaustive on purpose: a new variant does not
/// compile until someone decides what a client is told.
pub fn status_of(e: &shoplens::Error) -> StatusCode {
    use shoplens::Error as E;
    match e {
        E::ImageTooLarge { .. } | E::DecodeBudget { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        E::Cancelled { .. } => client_closed_request(),
        E::UnsupportedImageFormat { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        E::NotFound { .. } => StatusCode::NOT_FOUND,
        E::NoPublishedGeneration => StatusCode::SERVICE_UNAVAILABLE,
        E::ImageDecode { .. } | E::InvalidBox { .. } | E::InvalidK { .. } | E::UnknownCategory(_) | E::DimensionMismatch { .. } | E::InvalidVector { .. } => {
            StatusCode::BAD_REQUEST
        }
        // Operator-side inputs (datasets, settings) reaching a request are our failure.
        E::MalformedDataset { .. }
        | E::InvalidDatasetLayout { .. }
        | E::InvalidSetting { .. }
        | E::StoreFormat(_)
        | E::CorruptRecord { .. }
        | E::GenerationConflict { .. }
        | E::AnnDump { .. }
        | E::Snapshot { .. }
        | E::Storage(_)
        | E::Io { .. }
        | E::InvalidWeights { .. }
        | E::Candle(_)
        | E::ImageWrite { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The app factory, shared by `main` and the in-process tests.
/// A read-only resource: GET and HEAD (same handler; the server sends no body for HEAD),
/// anything else 405 with `Allow`.
macro_rules! readable {
    ($path:expr, $handler:expr) => {
        web::resource($path)
            .route(web::get().to($handler))
            .route(web::head().to($handler))
            .default_service(web::to(|req: HttpRequest| async move { method_not_allowed(&req, "GET, HEAD") }))
    };
}

/// The application as the server runs it: the middleware in their order, then the routes.
/// `main` and the HTTP tests both build it here, so the tests exercise what is served.
pub fn build(
    state: Arc<SearcherState>,
) -> App<impl ServiceFactory<ServiceRequest, Config = (), Response = ServiceResponse<impl MessageBody>, Error = actix_web::Error, InitError = ()>> {
    App::new().wrap(from_fn(refuse_long_uris)).wrap(from_fn(record_metrics)).wrap(Compress::default()).configure(configure(state))
}

fn configure(state: Arc<SearcherState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::from(state))
            .service(readable!("/", page))
            .service(readable!("/healthz", healthz))
            .service(readable!("/readyz", readyz))
            .service(readable!("/metrics", metrics))
            .service(readable!("/v1/openapi.json", openapi))
            .service(web::resource("/v1/search").route(web::post().to(search)).default_service(web::to(|req: HttpRequest| async move { method_not_allowed(&req, "POST") })))
            .service(readable!("/v1/categories", categories))
            .service(readable!("/v1/items/{sku}", item))
            .service(readable!("/v1/items/{sku}/image", item_image))
            .default_service(web::to(not_found));
    }
}

/// A 405 naming the methods the route has (`Allow`), with the error JSON.
fn method_not_allowed(req: &HttpRequest, allow: &'static str) -> HttpResponse {
    let mut resp = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{} {} is not allowed; use {allow}", req.method(), req.path())).error_response();
    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// Longest request target (path and query) answered; longer ones get 414. The longest a
/// shopper's client sends is a few hundred bytes (`/v1/items/{sku}/image`, a search's
/// query string).
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Refuses request targets over [`MAX_URI_BYTES`] with 414 and the error JSON, before any
/// route sees them. (Request lines a little longer never reach the app: the connection
/// answers them the same way, see `connection.rs`, since actix-http cannot hold a target
/// over 64 KiB.)
async fn refuse_long_uris(req: ServiceRequest, next: Next<impl MessageBody + 'static>) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if len > MAX_URI_BYTES {
        let resp = ApiError::new(StatusCode::URI_TOO_LONG, "uri_too_long", format!("the request target is {len} bytes, over the {MAX_URI_BYTES}-byte limit")).error_response();
        return Ok(req.into_response(resp));
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// Counts every request under its route template, with its status and latency.
async fn record_metrics(req: ServiceRequest, next: Next<impl MessageBody>) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let state = req.app_data::<web::Data<SearcherState>>().cloned();
    let resp = next.call(req).await?;
    if let Some(state) = state {
        state.metrics.request(&route, resp.status().as_u16(), started.elapsed().as_secs_f64());
    }
    Ok(resp)
}

async fn page() -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(PAGE)
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(OPENAPI)
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route {} {}", req.method(), req.path())).error_response()
}

/// Liveness: the process answers.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Readiness: models loaded and an index generation served.
async fn readyz(state: web::Data<SearcherState>) -> HttpResponse {
    match (state.current.load_full(), &state.engine) {
        (Some(index), Some(_)) => HttpResponse::Ok().json(json!({
            "status": "ready",
            "generation": index.generation(),
            "items": index.items(),
            "garments": index.garments(),
            "search_threads": state.pool.threads(),
            "queue": state.pool.queue(),
            "waiting": state.pool.waiting(),
        })),
        (_, None) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the models are not loaded").error_response(),
        (None, _) => {
            let message = state.last_error.load_full().map_or_else(|| "the index is loading".to_string(), |e| e.as_ref().clone());
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message).error_response()
        }
    }
}

async fn metrics(state: web::Data<SearcherState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}

fn ready(state: &SearcherState) -> Result<Arc<shoplens::serving::engine::ServingIndex>, ApiError> {
    state.current.load_full().ok_or_else(|| {
        let message = state.last_error.load_full().map_or_else(|| "the index is loading".to_string(), |e| e.as_ref().clone());
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message)
    })
}

/// Parses the query string of `/v1/search`, refusing anything unknown or out of range.
pub fn parse_search_query(query: &str) -> Result<SearchRequest, ApiError> {
    let mut req = SearchRequest { k: 10, category: None, region: None, ranking: Default::default() };
    let pairs: Vec<(String, String)> =
        web::Query::<Vec<(String, String)>>::from_query(query).map_err(|e| ApiError::bad_request("invalid_query", format!("cannot read the query string: {e}")))?.into_inner();
    for (key, value) in pairs {
        match key.as_str() {
            "k" => {
                req.k = value
                    .parse()
                    .ok()
                    .filter(|k| (1..=MAX_RESULTS).contains(k))
                    .ok_or_else(|| ApiError::bad_request("invalid_k", format!("k must be a whole number from 1 to {MAX_RESULTS}, got {value:?}")))?;
            }
            "category" if !value.is_empty() => req.category = Some(value),
            "category" => {}
            "rank" => {
                req.ranking = match value.as_str() {
                    "category" => Ranking::SameKindFirst,
                    "similarity" => Ranking::Similarity,
                    _ => return Err(ApiError::bad_request("invalid_rank", format!("rank must be category or similarity, got {value:?}"))),
                }
            }
            "box" => {
                let v: Vec<f32> = value
                    .split(',')
                    .map(|p| p.trim().parse::<f32>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| ApiError::bad_request("invalid_box", format!("box must be x1,y1,x2,y2 in pixels, got {value:?}")))?;
                let b = match v.as_slice() {
                    [x1, y1, x2, y2] => BBox::new(*x1, *y1, *x2, *y2),
                    _ => return Err(ApiError::bad_request("invalid_box", format!("box needs 4 numbers x1,y1,x2,y2, got {}", v.len()))),
                };
                if !b.is_valid() {
                    return Err(ApiError::bad_request("invalid_box", format!("box {value:?} needs x1 < x2 and y1 < y2, all finite")));
                }
                req.region = Some(b);
            }
            other => return Err(ApiError::bad_request("invalid_query", format!("unknown parameter {other:?}; known: k, category, box, rank"))),
        }
    }
    Ok(req)
}

/// Reads the photo under the upload limits: the raw body, or the photo's part of a
/// multipart form (read whole first, then parsed by our own reader, which cannot panic).
async fn read_photo(req: &HttpRequest, payload: web::Payload, state: &SearcherState) -> Result<Upload, ApiError> {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<usize>().ok());
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let form_boundary = match multipart::is_form_data(content_type) {
        true => Some(multipart::boundary(content_type).map_err(|e| ApiError::bad_request("invalid_multipart", e.to_string()))?),
        false => None,
    };
    // A form's headers and boundaries come on top of the photo itself.
    let limits = UploadLimits { max_bytes: state.upload_limits.max_bytes + form_boundary.as_ref().map_or(0, |_| 64 * 1024), ..state.upload_limits };
    let mut upload = upload::read_body(payload, declared, limits, &state.upload_budget).await.map_err(|e| upload_error(e, state))?;
    if let Some(boundary) = form_boundary {
        let part = multipart::photo_part(&upload.bytes, &boundary).map_err(|e| ApiError::bad_request("invalid_multipart", e.to_string()))?;
        // In place: no second buffer of the photo's size.
        upload.bytes.truncate(part.end);
        upload.bytes.drain(..part.start);
        if upload.bytes.len() > state.upload_limits.max_bytes {
            return Err(upload_error(UploadError::TooLarge { limit: state.upload_limits.max_bytes }, state));
        }
    }
    if upload.bytes.is_empty() {
        return Err(ApiError::bad_request("empty_body", "send the photo as the request body or as a multipart file field named image"));
    }
    Ok(upload)
}

/// What a client is told when its upload breaks a limit. The connection is closed after
/// the answer: the rest of a refused body is not worth reading.
fn upload_error(e: UploadError, state: &SearcherState) -> ApiError {
    let error = match e {
        UploadError::TooLarge { limit } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("the upload is over the {limit}-byte limit")),
        UploadError::Deadline { seconds } => ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", format!("the upload took over {seconds} s; send the photo in one go")),
        UploadError::Idle { seconds } => ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", format!("the upload stalled for {seconds} s")),
        UploadError::MemoryBusy => {
            state.metrics.upload_over_budget();
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "the server is receiving too many uploads at once; retry shortly")
        }
        UploadError::Payload(reason) => ApiError::bad_request("invalid_body", format!("reading the upload failed: {reason}")),
    };
    error.closing()
}

fn image_url(sku: &str) -> String {
    let mut encoded = String::new();
    for b in sku.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("/v1/items/{encoded}/image")
}

fn outcome_json(o: &SearchOutcome) -> Value {
    let garments: Vec<Value> = o
        .garments
        .iter()
        .map(|g| {
            let results: Vec<Value> = g
                .results
                .iter()
                .map(|r| {
                    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
                    v["image_url"] = Value::String(image_url(&r.sku));
                    v
                })
                .collect();
            json!({
                "box": g.bbox, "category": g.category, "category_source": g.category_source,
                "category_probability": g.category_probability, "score": g.score, "source": g.source,
                "ranked_first": g.ranked_first, "results": results,
            })
        })
        .collect();
    json!({
        "image": {"width": o.width, "height": o.height},
        "generation": o.generation,
        "garments": garments,
        "timings_ms": o.timings_ms,
    })
}

async fn search(req: HttpRequest, payload: web::Payload, state: web::Data<SearcherState>) -> Result<HttpResponse, ApiError> {
    let request = parse_search_query(req.query_string())?;
    let upload = read_photo(&req, payload, &state).await?;
    let index = ready(&state)?;
    let engine = state.engine.clone().ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the models are not loaded"))?;
    engine.validate(&index, &request)?;
    let client = req.conn_data::<Arc<ClientSocket>>().cloned();
    let gone = move || client.as_ref().is_some_and(|c| c.has_gone());
    let still_gone = gone.clone();
    // The upload (and its share of the memory budget) lives until the search is done. The
    // client is asked before the search starts and between its stages.
    let pending = state.pool.submit_unless(gone, move || engine.search_unless(&index, &upload.bytes, &request, &still_gone)).map_err(|Busy| {
        state.metrics.rejected();
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "every search thread is busy and the queue is full; retry shortly")
    })?;
    let outcome = match pending.outcome().await {
        Ok(Err(shoplens::Error::Cancelled { stage })) => {
            state.metrics.abandoned();
            return Err(ApiError::new(client_closed_request(), "client_closed_request", format!("the connection was closed; the search stopped after {stage}")));
        }
        Ok(result) => result?,
        Err(JobError::Abandoned) => {
            state.metrics.abandoned();
            return Err(ApiError::new(client_closed_request(), "client_closed_request", "the connection was closed before the search started; it was not run"));
        }
        Err(JobError::Panicked(panic)) => {
            tracing::error!(%panic, "a search panicked");
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the search failed on our side; it has been logged"));
        }
        Err(JobError::Lost) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the search thread went away")),
    };
    let t = outcome.timings_ms;
    for (stage, ms) in [("decode", t.decode), ("detect", t.detect), ("embed", t.embed), ("search", t.search), ("fetch", t.fetch)] {
        state.metrics.stage(stage, ms);
    }
    Ok(HttpResponse::Ok().json(outcome_json(&outcome)))
}

async fn categories(state: web::Data<SearcherState>) -> Result<HttpResponse, ApiError> {
    let index = ready(&state)?;
    let taxonomy: Vec<String> = state.engine.as_ref().and_then(|e| e.detector.as_ref()).map(|d| d.config().categories.iter().map(|c| c.name.clone()).collect()).unwrap_or_default();
    let indexed: HashMap<String, usize> = index.categories().into_iter().collect();
    Ok(HttpResponse::Ok().json(json!({"detector": taxonomy, "indexed": indexed})))
}

async fn item(path: web::Path<String>, state: web::Data<SearcherState>) -> Result<HttpResponse, ApiError> {
    let sku = path.into_inner();
    let index = ready(&state)?;
    let item = index.item(&sku).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no item with sku {sku:?}")))?;
    let garments: Vec<Value> = index.item_garments(&sku).iter().map(|g| json!({"box": g.bbox.to_array(), "category": g.category, "score": g.score})).collect();
    let m = &item.metadata;
    Ok(HttpResponse::Ok().json(json!({
        "sku": m.sku, "title": m.title, "label": m.label, "category": m.category, "price": m.price,
        "currency": m.currency, "url": m.url, "attributes": m.attributes, "image_url": image_url(&m.sku),
        "garments": garments, "generation": index.generation(),
    })))
}

async fn item_image(req: HttpRequest, path: web::Path<String>, state: web::Data<SearcherState>) -> Result<HttpResponse, ApiError> {
    let sku = path.into_inner();
    let index = ready(&state)?;
    let item = index.item(&sku).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no item with sku {sku:?}")))?;
    let etag = format!("\"{}\"", item.content_hash);
    // If-None-Match compares weakly (RFC 9110 §13.1.2): `W/"…"` matches our strong tag.
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').map(str::trim).any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag))
    {
        return Ok(HttpResponse::NotModified().insert_header((header::ETAG, etag)).finish());
    }
    // Serve what was indexed, and only that: the same link-, device- and FIFO-refusing read
    // as the indexer's, and the bytes must still hash to the indexed content (a file
    // replaced since — by a link to /etc/passwd or a new photo — is not served).
    let file = item.image_path.clone();
    let expected = item.content_hash.clone();
    let bytes = web::block(move || {
        let bytes = shoplens::catalog::files::read_catalog_file(&file, None, shoplens::indexing::MAX_IMAGE_BYTES)?;
        if shoplens::store::ContentHash::of_bytes(&bytes).to_string() != expected {
            return Err(format!("{} changed since it was indexed", file.display()));
        }
        Ok(bytes)
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "reading the image failed"))?
    .map_err(|reason| {
        tracing::warn!(sku = %sku, %reason, "item image not served");
        ApiError::new(StatusCode::NOT_FOUND, "image_missing", format!("the image of {sku:?} is no longer on disk as it was indexed"))
    })?;
    let mime = match image::guess_format(&bytes) {
        Ok(image::ImageFormat::Png) => "image/png",
        Ok(image::ImageFormat::WebP) => "image/webp",
        Ok(image::ImageFormat::Gif) => "image/gif",
        Ok(image::ImageFormat::Tiff) => "image/tiff",
        _ => "image/jpeg",
    };
    Ok(HttpResponse::Ok()
        .content_type(mime)
        .insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=86400")))
        .body(bytes))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use shoplens::Error as E;

    use super::*;

    /// One error of each kind with what a client gets: its status and code. A new
    /// variant fails to compile in `status_of`; this table says what was decided.
    #[test]
    fn every_engine_error_has_a_status_and_a_code() {
        let io = || std::io::Error::other("disk");
        let path = || PathBuf::from("x");
        let table: Vec<(E, u16, &str)> = vec![
            (E::ImageTooLarge { width: 9000, height: 9000, max_pixels: 1 }, 413, "image_too_large"),
            (E::DecodeBudget { width: 6000, height: 6000, bytes: 35, reason: "r".into() }, 413, "decode_budget"),
            (E::Cancelled { stage: "detection" }, 499, "client_closed_request"),
            (E::UnsupportedImageFormat { format: "tiff".into() }, 415, "unsupported_image_format"),
            (E::NotFound { what: "item", id: "a".into() }, 404, "not_found"),
            (E::NoPublishedGeneration, 503, "no_index"),
            (E::ImageDecode { reason: "truncated".into() }, 400, "invalid_image"),
            (E::InvalidBox { reason: "empty".into() }, 400, "invalid_box"),
            (E::InvalidK { k: 0, max: 100 }, 400, "invalid_k"),
            (E::UnknownCategory("cape".into()), 400, "unknown_category"),
            (E::DimensionMismatch { expected: 2, found: 3 }, 400, "dimension_mismatch"),
            (E::InvalidVector { what: "q".into(), reason: "zero".into() }, 400, "invalid_vector"),
            (E::MalformedDataset { file: path(), field: "f".into(), reason: "r".into() }, 500, "internal"),
            (E::InvalidDatasetLayout { path: path(), reason: "r".into() }, 500, "internal"),
            (E::InvalidSetting { name: "k", reason: "r".into() }, 500, "internal"),
            (E::StoreFormat(shoplens_migrations::MigrationError::Unversioned), 500, "internal"),
            (E::CorruptRecord { tree: "items", key: "a".into(), reason: "r".into() }, 500, "internal"),
            (E::GenerationConflict { generation: 1, reason: "r".into() }, 500, "internal"),
            (E::AnnDump { path: path(), reason: "r".into() }, 500, "internal"),
            (E::Snapshot { path: path(), reason: "r".into() }, 500, "internal"),
            (E::Storage(sled::Error::Unsupported("r".into())), 500, "internal"),
            (E::Io { path: path(), source: io() }, 500, "internal"),
            (E::InvalidWeights { reason: "r".into() }, 500, "internal"),
            (E::Candle(candle_core::Error::Msg("r".into())), 500, "internal"),
            (E::ImageWrite { path: path(), source: image::ImageError::IoError(io()) }, 500, "internal"),
        ];
        for (error, status, code) in table {
            let what = format!("{error:?}");
            let api = ApiError::from(error);
            assert_eq!((api.status.as_u16(), api.code), (status, code), "{what}");
        }
    }
}
