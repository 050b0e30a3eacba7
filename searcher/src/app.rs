//! The HTTP routes. Handlers stay thin: they read the shared state and shape JSON.

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::state::SearcherState;

/// The app factory, shared by `main` and the in-process tests.
pub fn configure(state: Arc<SearcherState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::from(state))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz));
    }
}

/// Liveness: the process answers.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Readiness: an index generation is loaded.
async fn readyz(state: web::Data<SearcherState>) -> HttpResponse {
    match state.current.load_full() {
        Some(loaded) => HttpResponse::Ok().json(json!({
            "status": "ready",
            "generation": loaded.manifest.id,
            "garments": loaded.index.len(),
            "items": loaded.manifest.items,
        })),
        None => {
            let message = state
                .last_error
                .load_full()
                .map_or_else(|| "the index is loading".to_string(), |e| e.as_ref().clone());
            HttpResponse::ServiceUnavailable().json(json!({"error": {"code": "not_ready", "message": message}}))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use actix_web::{App, test};
    use shoplens::ann::{AnnParams, GarmentIndex, GarmentVectors};
    use shoplens::store::{GenerationManifest, GenerationSpec, GenerationState};

    use super::*;
    use crate::state::LoadedGeneration;

    #[actix_web::test]
    async fn readiness_follows_the_loaded_generation() {
        let state = Arc::new(SearcherState::default());
        let app = test::init_service(App::new().configure(configure(state.clone()))).await;
        let resp = test::call_service(&app, test::TestRequest::get().uri("/healthz").to_request()).await;
        assert_eq!(resp.status(), 200);
        let resp = test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
        assert_eq!(resp.status(), 503);
        let body: serde_json::Value = test::read_body_json(resp).await;
        assert_eq!(body["error"]["code"], "not_ready");

        let mut vectors = GarmentVectors::new(2);
        vectors.push(1, "top", &[1.0, 0.0]).unwrap();
        let manifest = GenerationManifest {
            id: 4,
            state: GenerationState::Published,
            spec: GenerationSpec { dim: 2, models: BTreeMap::new() },
            started_at: "2026-01-01T00:00:00Z".into(),
            built_at: None,
            items: 1,
            garments: 1,
        };
        let index = GarmentIndex::build(4, vectors, AnnParams::default()).unwrap();
        state.current.store(Some(Arc::new(LoadedGeneration { manifest, index })));
        let resp = test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = test::read_body_json(resp).await;
        assert_eq!((body["generation"].as_u64(), body["garments"].as_u64()), (Some(4), Some(1)));
    }
}
