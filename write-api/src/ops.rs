//! What every role serves besides its API: `/healthz` (alive), `/readyz` (its stores
//! reachable) and `/metrics` (Prometheus text format).

use std::sync::OnceLock;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

/// The process-wide metrics recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().expect("no other metrics recorder is installed"))
        .clone()
}

pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "alive" }))
}

/// 200 when `check` succeeds, else 503 naming what failed.
pub fn readiness(check: Result<(), String>) -> Response {
    match check {
        Ok(()) => (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response(),
        Err(error) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "unavailable", "error": error }))).into_response()
        }
    }
}

pub fn render_metrics(handle: &PrometheusHandle) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
