//! The command REST API of API.md.
//!
//! # Layout
//! - [`routes`]: one handler per command endpoint, each documented for `/openapi.json`.
//! - [`request`]: the JSON body and command headers (Idempotency-Key, If-Match, X-Request-Id).
//! - [`auth`]: HS256 bearer tokens and the [`auth::Actor`] they name.
//! - [`problem`]: every error as `application/problem+json`.
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics`, shared by every role.
//!
//! [`router`] builds the whole service from a [`WriteApi`] without a socket, so tests call it
//! directly; [`serve`] runs it on a listener until a shutdown future resolves.

pub mod auth;
pub mod ops;
pub mod problem;
pub mod request;
pub mod routes;

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, Request};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{BoxError, Router};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use metrics_exporter_prometheus::PrometheusHandle;
use quikapp_commands::{Command, CommandContext, CommandService, Idempotency};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use uuid::Uuid;

use crate::auth::{Actor, HasTokens, Tokens};
use crate::problem::ApiError;
use crate::routes::CommandResponse;

/// Request bodies above this size are refused with 413 (a 40,000-character message is at most
/// 160 KB of UTF-8, and 480 KB written as JSON `\u` escapes of astral characters).
pub const BODY_LIMIT_BYTES: usize = 512 * 1024;

/// Per-user command rate: a sustained rate and the burst above it.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit { per_second: 200, burst: 400 }
    }
}

/// How the API bounds what one request may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub rate_limit: RateLimit,
    /// A request still unanswered after this is answered 503 "outcome unknown" (its command may
    /// still complete: retry with the same Idempotency-Key to learn which). Keep it above three
    /// times the store's commit timeout, within which the store answers.
    pub request_timeout: Duration,
    /// How often expired idempotency keys are deleted.
    pub idempotency_cleanup_every: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rate_limit: RateLimit::default(),
            request_timeout: Duration::from_secs(30),
            idempotency_cleanup_every: Duration::from_secs(600),
        }
    }
}

/// Everything the write API's handlers share.
#[derive(Clone)]
pub struct WriteApi {
    inner: Arc<Inner>,
}

struct Inner {
    service: CommandService,
    tokens: Tokens,
    limiter: DefaultKeyedRateLimiter<Uuid>,
    metrics: PrometheusHandle,
    request_timeout: Duration,
}

impl HasTokens for WriteApi {
    fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }
}

impl WriteApi {
    pub fn new(service: CommandService, tokens: Tokens, limits: Limits) -> Self {
        let RateLimit { per_second, burst } = limits.rate_limit;
        let per_second = NonZeroU32::new(per_second.max(1)).expect("positive");
        let burst = NonZeroU32::new(burst.max(per_second.get())).expect("positive");
        let limiter = RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst));
        let inner = Arc::new(Inner {
            service,
            tokens,
            limiter,
            metrics: ops::metrics_handle(),
            request_timeout: limits.request_timeout,
        });
        tokio::spawn(housekeeping(Arc::downgrade(&inner), limits.idempotency_cleanup_every));
        WriteApi { inner }
    }

    /// Runs one command for `actor`: rate limit, idempotency scope, execution, metrics.
    async fn run(
        &self,
        actor: Actor,
        headers: request::CommandHeaders,
        digest: &str,
        command: Command,
    ) -> Result<CommandResponse, ApiError> {
        if let Err(not_until) = self.inner.limiter.check_key(&actor.0) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(ApiError::TooManyRequests { retry_after_seconds: wait.as_secs().max(1) });
        }
        let context = CommandContext {
            actor: actor.0,
            correlation_id: headers.request_id,
            if_match: headers.if_match,
            idempotency: headers.idempotency_key.map(|key| Idempotency {
                // As a JSON array, so that no choice of key or path parts makes two scopes meet.
                key: serde_json::json!([actor.0, headers.endpoint, key]).to_string(),
                request_hash: digest.to_owned(),
            }),
        };
        let started = Instant::now();
        let result = self.inner.service.execute(&context, &command).await;
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        metrics::counter!("quikapp_commands_total", "command" => command.name(), "outcome" => outcome).increment(1);
        metrics::histogram!("quikapp_command_duration_seconds", "command" => command.name())
            .record(started.elapsed().as_secs_f64());
        Ok(CommandResponse(result?))
    }
}

/// Until the API is dropped: forgets the rate-limit state of users whose bucket has refilled
/// (so memory follows the active users, not every user ever seen), and deletes expired
/// idempotency keys.
async fn housekeeping(inner: std::sync::Weak<Inner>, cleanup_every: Duration) {
    let mut every_minute = tokio::time::interval(Duration::from_secs(60));
    let mut cleanup = tokio::time::interval(cleanup_every);
    loop {
        tokio::select! {
            _ = every_minute.tick() => {
                let Some(inner) = inner.upgrade() else { break };
                inner.limiter.retain_recent();
                inner.limiter.shrink_to_fit();
            }
            _ = cleanup.tick() => {
                let Some(inner) = inner.upgrade() else { break };
                match inner.service.store().forget_expired_idempotency_keys().await {
                    Ok(0) => {}
                    Ok(forgotten) => tracing::info!(forgotten, "deleted expired idempotency keys"),
                    Err(error) => tracing::warn!(%error, "could not delete expired idempotency keys"),
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "QuikApp command API", description = "Commands of the QuikApp event platform; see API.md."),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Declares the bearer JWT security scheme of API.md's Identity section.
pub struct BearerAuth;

/// A PATCH of a channel needs a field to change. utoipa 5 writes `min_properties` as
/// maxProperties, so the constraint is set here.
struct ChannelChangesNeedAField;

impl utoipa::Modify for ChannelChangesNeedAField {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let schemas = openapi.components.as_mut().map(|c| &mut c.schemas);
        if let Some(utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(changes))) =
            schemas.and_then(|s| s.get_mut("ChannelChangesBody"))
        {
            changes.min_properties = Some(1);
        }
    }
}

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The whole write API: commands, `/openapi.json`, health, readiness and metrics.
pub fn router(api: WriteApi) -> Router {
    let (commands, mut openapi) =
        utoipa_axum::router::OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(routes::commands()).split_for_parts();
    utoipa::Modify::modify(&ChannelChangesNeedAField, &mut openapi);
    let openapi = Arc::new(openapi);
    let request_timeout = api.inner.request_timeout;
    let routes = commands
        .route("/openapi.json", get(move || async move { axum::Json(openapi.as_ref().clone()) }))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|State(api): State<WriteApi>| async move { ops::render_metrics(&api.inner.metrics) }))
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .with_state(api);
    // A command past its time may still commit: the client learns which by retrying it.
    with_common_layers(routes, request_timeout, ApiError::OutcomeUnknown)
}

/// What every route of an API gets: problem+json for unknown routes (404), wrong methods
/// (405), panics (500) and requests over the time limit (503, `on_timeout`); request ids and
/// traces.
pub fn with_common_layers(routes: Router, request_timeout: Duration, on_timeout: ApiError) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    routes
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(
            tower::ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |_: BoxError| {
                    let error = on_timeout.clone();
                    async move { error }
                }))
                .timeout(request_timeout),
        )
        .layer(CatchPanicLayer::custom(|_| ApiError::Internal.into_response()))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

async fn readyz(State(api): State<WriteApi>) -> axum::response::Response {
    ops::readiness(api.inner.service.store().ping().await.map_err(|e| e.to_string()))
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}
