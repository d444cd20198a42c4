//! The query REST API of API.md (prefix /v1), served from the read models.
//!
//! # What a read may miss, and X-Min-Position
//! Read models follow the event store asynchronously (relay, Kafka, projectors), so a read can
//! answer from a model that has not yet applied the caller's own last command: a channel just
//! created may be absent (404), a message just posted not yet counted, a member just removed
//! still listed, and the visibility checks themselves (workspace membership, private-channel
//! membership, read from the PostgreSQL model) may lag the same way: a user just added to a
//! workspace may get 404 for a moment, and a user just removed may still see it. A command's
//! answer carries its `position`; sending it back as `X-Min-Position` (or `?min_position=`)
//! makes the request wait, at most [`ReadConfig::min_position_wait`], until every model the
//! request reads (the visibility checks' included) has applied it, then answer; else 503 with
//! Retry-After. Applied positions come from the progress each projector stores with its
//! effects (see quikapp-projections), watched here through the store's notifications, so
//! any instance answers for every model without talking to the projectors.

mod routes;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use quikapp_bus::Partition;
use quikapp_commands::store::EventStore;
use quikapp_projections::counters::Counters;
use quikapp_projections::directory::Directory;
use quikapp_projections::search::Search;
use quikapp_projections::timelines::Timelines;
use quikapp_projections::{ProjectionError, Projector, applied_position};
use quikapp_realtime::presence::Presence;
use quikapp_write_api::BearerAuth;
use quikapp_write_api::auth::{HasTokens, Tokens};
use quikapp_write_api::ops;
use quikapp_write_api::problem::ApiError;
use tokio::sync::watch;
use utoipa::OpenApi;

/// The read models an instance serves.
pub struct Models {
    pub directory: Arc<dyn Directory>,
    pub counters: Counters,
    pub timelines: Arc<dyn Timelines>,
    pub search: Arc<dyn Search>,
    /// Who has a realtime stream open (Redis, shared with the gateways).
    pub presence: Arc<dyn Presence>,
    /// The writer side of each model, for its stored progress: `postgres` (the directory),
    /// `redis` (the counters), `mongo` (the timelines) and `search`.
    pub projectors: Vec<Arc<dyn Projector>>,
}

#[derive(Debug, Clone)]
pub struct ReadConfig {
    /// Every partition of both topics: a model has applied P when its watermark on each is P.
    pub partitions: Vec<Partition>,
    /// The longest a request waits for X-Min-Position.
    pub min_position_wait: Duration,
    pub request_timeout: Duration,
}

/// A model's progress as last read from its store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Applied {
    position: u64,
    dead_lettered: u64,
}

#[derive(Clone)]
pub struct ReadApi {
    inner: Arc<Inner>,
}

struct Inner {
    tokens: Tokens,
    models: Models,
    store: Arc<dyn EventStore>,
    progress: BTreeMap<&'static str, watch::Receiver<Applied>>,
    config: ReadConfig,
    metrics: PrometheusHandle,
}

impl HasTokens for ReadApi {
    fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }
}

impl ReadApi {
    /// Starts watching each model's progress (until the API is dropped).
    pub fn new(models: Models, store: Arc<dyn EventStore>, tokens: Tokens, config: ReadConfig) -> Self {
        let mut progress = BTreeMap::new();
        for projector in &models.projectors {
            let (sender, receiver) = watch::channel(Applied::default());
            tokio::spawn(track(projector.clone(), config.partitions.clone(), sender));
            progress.insert(projector.name(), receiver);
        }
        ReadApi { inner: Arc::new(Inner { tokens, models, store, progress, config, metrics: ops::metrics_handle() }) }
    }

    /// Waits until every one of `models` has applied `min` (when given), within the configured wait.
    async fn reached(&self, models: &[&'static str], min: Option<u64>) -> Result<(), ApiError> {
        let Some(min) = min else { return Ok(()) };
        let deadline = tokio::time::Instant::now() + self.inner.config.min_position_wait;
        for model in models {
            let mut progress = self.inner.progress.get(model).expect("a served model").clone();
            let reached = tokio::time::timeout_at(deadline, progress.wait_for(|applied| applied.position >= min))
                .await
                .is_ok_and(|waited| waited.is_ok());
            if !reached {
                let at = progress.borrow().position;
                metrics::counter!("quikapp_read_min_position_timeouts_total", "model" => *model).increment(1);
                return Err(ApiError::Lagging(format!(
                    "the {model} read model has applied position {at}, not yet {min}; retry shortly"
                )));
            }
        }
        Ok(())
    }
}

/// Keeps `sender` at the model's stored progress: read again on each notification of the
/// store, and at least every second.
async fn track(projector: Arc<dyn Projector>, partitions: Vec<Partition>, sender: watch::Sender<Applied>) {
    while !sender.is_closed() {
        match projector.stored().await {
            Ok(stored) => {
                let applied =
                    Applied { position: applied_position(&stored, &partitions), dead_lettered: stored.dead_lettered };
                sender.send_if_modified(|current| std::mem::replace(current, applied) != applied);
            }
            Err(error) => tracing::warn!(model = projector.name(), %error, "cannot read the model's progress"),
        }
        projector.changed().await;
    }
}

pub(crate) fn store_error(error: ProjectionError) -> ApiError {
    tracing::error!(%error, "read model failure");
    match error {
        ProjectionError::Unavailable(_) => ApiError::Unavailable,
        ProjectionError::Moved(_) | ProjectionError::Rejected(_) | ProjectionError::Unfit(_) => ApiError::Internal,
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "QuikApp query API", description = "Queries of the QuikApp event platform; see API.md."),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// The whole read API: queries, `/openapi.json`, health, readiness and metrics.
pub fn router(api: ReadApi) -> Router {
    let (queries, openapi) =
        utoipa_axum::router::OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(routes::queries()).split_for_parts();
    let openapi = Arc::new(openapi);
    let request_timeout = api.inner.config.request_timeout;
    let routes = queries
        .route("/openapi.json", get(move || async move { axum::Json(openapi.as_ref().clone()) }))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|State(api): State<ReadApi>| async move { ops::render_metrics(&api.inner.metrics) }))
        .with_state(api);
    // A query past its time changed nothing: plainly unavailable.
    quikapp_write_api::with_common_layers(routes, request_timeout, ApiError::Unavailable)
}

/// Ready when the event store and every model's store answer.
async fn readyz(State(api): State<ReadApi>) -> axum::response::Response {
    let mut check = api.inner.store.ping().await.map_err(|e| e.to_string());
    for projector in &api.inner.models.projectors {
        if check.is_ok() {
            check = projector.stored().await.map(|_| ()).map_err(|e| format!("{}: {e}", projector.name()));
        }
    }
    ops::readiness(check)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}
