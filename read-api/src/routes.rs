//! One handler per query endpoint, each documented for `/openapi.json`.

use axum::Json;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use quikapp_projections::counters::{ChannelStats, Unread};
use quikapp_projections::directory::{ChannelView, MemberView, WorkspaceView};
use quikapp_projections::search::{self, Hits};
use quikapp_projections::timelines::MessageView;
use quikapp_write_api::auth::Actor;
use quikapp_write_api::problem::ApiError;
use quikapp_write_api::routes::{Ids, Problem};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::{ReadApi, store_error};

pub(crate) fn queries() -> OpenApiRouter<ReadApi> {
    OpenApiRouter::new()
        .routes(routes!(workspace))
        .routes(routes!(channels))
        .routes(routes!(channel))
        .routes(routes!(members))
        .routes(routes!(unread))
        .routes(routes!(stats))
        .routes(routes!(presence))
        .routes(routes!(messages))
        .routes(routes!(message))
        .routes(routes!(replies))
        .routes(routes!(search))
        .routes(routes!(projections))
}

/// The models each kind of request reads; X-Min-Position waits for all of them.
const DIRECTORY: &[&str] = &["postgres"];
const COUNTERS_WITH_VISIBILITY: &[&str] = &["postgres", "redis"];
const COUNTERS: &[&str] = &["redis"];
const TIMELINES_WITH_VISIBILITY: &[&str] = &["postgres", "mongo"];
const SEARCH_WITH_VISIBILITY: &[&str] = &["postgres", "search"];

/// `X-Min-Position`: a position the read models must have applied first.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct MinPositionHeader {
    /// Wait (bounded) until the models this request reads have applied this position (a
    /// command's `position`); 503 if they have not in time.
    #[param(rename = "X-Min-Position", pattern = "^[0-9]{1,19}$", nullable = false)]
    x_min_position: Option<String>,
}

/// `?min_position=`: the same as `X-Min-Position`, for clients that cannot set headers.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct MinPositionQueryDocs {
    /// As the `X-Min-Position` header; the header wins when both are given.
    #[param(pattern = "^[0-9]{1,19}$", nullable = false)]
    min_position: Option<String>,
}

/// The longest position written out: 19 digits always fit in a u64.
const MAX_POSITION_DIGITS: usize = 19;

pub(crate) struct MinPosition(Option<u64>);

#[derive(Deserialize)]
struct MinPositionQuery {
    min_position: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for MinPosition {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let parse = |field: &str, value: &str| {
            let digits = (1..=MAX_POSITION_DIGITS).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit());
            match digits.then(|| value.parse::<u64>()) {
                Some(Ok(position)) => Ok(MinPosition(Some(position))),
                _ => {
                    Err(ApiError::invalid(field, "must be a position: up to 19 digits, as a command's answer gives it"))
                }
            }
        };
        let query =
            Query::<MinPositionQuery>::try_from_uri(&parts.uri).map_err(|e| ApiError::BadRequest(e.body_text()))?;
        let from_query = match query.0.min_position {
            Some(value) => parse("min_position", &value)?,
            None => MinPosition(None),
        };
        match parts.headers.get("x-min-position") {
            Some(header) => parse("X-Min-Position", header.to_str().unwrap_or("?")),
            None => Ok(from_query),
        }
    }
}

fn not_found(what: &str) -> ApiError {
    ApiError::NotFound(format!("{what} not found"))
}

impl ReadApi {
    /// The channel, if `user` may see it: a member of its workspace, and of the channel when it
    /// is private (API.md: invisible is 404, as if it did not exist).
    async fn visible_channel(&self, user: Uuid, channel_id: Uuid) -> Result<ChannelView, ApiError> {
        let directory = &self.inner.models.directory;
        let channel = directory.channel(channel_id).await.map_err(store_error)?.ok_or_else(|| not_found("channel"))?;
        let in_workspace = directory.role(channel.workspace_id, user).await.map_err(store_error)?.is_some();
        let may_read =
            in_workspace && (!channel.private || directory.is_member(channel_id, user).await.map_err(store_error)?);
        if may_read { Ok(channel) } else { Err(not_found("channel")) }
    }

    async fn visible_workspace(&self, user: Uuid, workspace_id: Uuid) -> Result<WorkspaceView, ApiError> {
        let directory = &self.inner.models.directory;
        if directory.role(workspace_id, user).await.map_err(store_error)?.is_none() {
            return Err(not_found("workspace"));
        }
        directory.workspace(workspace_id).await.map_err(store_error)?.ok_or_else(|| not_found("workspace"))
    }
}

#[utoipa::path(get, path = "/v1/workspaces/{workspace_id}", tag = "workspaces",
    params(("workspace_id" = Uuid, Path), MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = WorkspaceView), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn workspace(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
    Ids(workspace_id): Ids<Uuid>,
) -> Result<Json<WorkspaceView>, ApiError> {
    api.reached(DIRECTORY, min).await?;
    Ok(Json(api.visible_workspace(actor.0, workspace_id).await?))
}

#[derive(Serialize, ToSchema)]
struct ChannelList {
    channels: Vec<ChannelView>,
}

#[utoipa::path(get, path = "/v1/workspaces/{workspace_id}/channels", tag = "workspaces",
    params(("workspace_id" = Uuid, Path), MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = ChannelList, description = "public channels and the private ones the caller is in, by name"),
        (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn channels(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
    Ids(workspace_id): Ids<Uuid>,
) -> Result<Json<ChannelList>, ApiError> {
    api.reached(DIRECTORY, min).await?;
    api.visible_workspace(actor.0, workspace_id).await?;
    let channels = api.inner.models.directory.channels(workspace_id, actor.0).await.map_err(store_error)?;
    Ok(Json(ChannelList { channels }))
}

#[utoipa::path(get, path = "/v1/channels/{channel_id}", tag = "channels",
    params(("channel_id" = Uuid, Path), MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = ChannelView), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn channel(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
    Ids(channel_id): Ids<Uuid>,
) -> Result<Json<ChannelView>, ApiError> {
    api.reached(DIRECTORY, min).await?;
    Ok(Json(api.visible_channel(actor.0, channel_id).await?))
}

#[derive(Serialize, ToSchema)]
struct MemberList {
    members: Vec<MemberView>,
}

#[utoipa::path(get, path = "/v1/channels/{channel_id}/members", tag = "channels",
    params(("channel_id" = Uuid, Path), MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = MemberList, description = "by join time"),
        (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn members(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
    Ids(channel_id): Ids<Uuid>,
) -> Result<Json<MemberList>, ApiError> {
    api.reached(DIRECTORY, min).await?;
    api.visible_channel(actor.0, channel_id).await?;
    let members = api.inner.models.directory.members(channel_id).await.map_err(store_error)?;
    Ok(Json(MemberList { members }))
}

#[derive(Serialize, ToSchema)]
struct UnreadList {
    channels: Vec<Unread>,
}

#[utoipa::path(get, path = "/v1/users/me/unread", tag = "users",
    params(MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = UnreadList, description = "every channel the caller is a member of"),
        (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn unread(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
) -> Result<Json<UnreadList>, ApiError> {
    api.reached(COUNTERS, min).await?;
    let channels = api.inner.models.counters.unread(actor.0).await.map_err(store_error)?;
    Ok(Json(UnreadList { channels }))
}

#[utoipa::path(get, path = "/v1/channels/{channel_id}/stats", tag = "channels",
    params(("channel_id" = Uuid, Path), MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = ChannelStats), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn stats(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
    Ids(channel_id): Ids<Uuid>,
) -> Result<Json<ChannelStats>, ApiError> {
    api.reached(COUNTERS_WITH_VISIBILITY, min).await?;
    api.visible_channel(actor.0, channel_id).await?;
    Ok(Json(api.inner.models.counters.stats(channel_id).await.map_err(store_error)?))
}

#[derive(Serialize, ToSchema)]
struct Online {
    /// Members of the workspace with an open realtime stream.
    online: Vec<Uuid>,
}

#[utoipa::path(get, path = "/v1/workspaces/{workspace_id}/presence", tag = "workspaces",
    params(("workspace_id" = Uuid, Path), MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = Online, description = "members of the workspace with an open connection"),
        (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn presence(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
    Ids(workspace_id): Ids<Uuid>,
) -> Result<Json<Online>, ApiError> {
    api.reached(DIRECTORY, min).await?;
    api.visible_workspace(actor.0, workspace_id).await?;
    let online = api.inner.models.presence.online(workspace_id).await.map_err(|error| {
        tracing::error!(%error, "presence failure");
        ApiError::Unavailable
    })?;
    Ok(Json(Online { online }))
}

/// A timeline page's size when none is asked for, and the most one may ask for.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 200;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// The previous page's `next_cursor`; the newest messages when absent.
    #[param(pattern = "^[0-9]{1,19}$", nullable = false)]
    before: Option<String>,
    /// Messages per page, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200, nullable = false)]
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct MessagePage {
    messages: Vec<MessageView>,
    /// Pass as `before` for the next page; null on the last page.
    next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/channels/{channel_id}/messages", tag = "messages",
    params(("channel_id" = Uuid, Path), PageQuery, MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = MessagePage, description = "top-level messages, newest first, deleted ones absent"),
        (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn messages(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
    Ids(channel_id): Ids<Uuid>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MessagePage>, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::invalid("limit", "must be from 1 to 200"))?;
    let before = match query.before.as_deref() {
        Some("") | None => None,
        Some(cursor) => Some(digits(cursor).ok_or_else(|| ApiError::invalid("before", "must be a next_cursor"))?),
    };
    let limit = match query.limit.map(|n| n as usize) {
        Some(limit) if (1..=MAX_PAGE).contains(&limit) => limit,
        Some(_) => return Err(ApiError::invalid("limit", "must be from 1 to 200")),
        None => DEFAULT_PAGE,
    };
    api.reached(TIMELINES_WITH_VISIBILITY, min).await?;
    api.visible_channel(actor.0, channel_id).await?;
    // One more than asked, to know whether a next page exists.
    let mut messages = api.inner.models.timelines.page(channel_id, before, limit + 1).await.map_err(store_error)?;
    let next_cursor = (messages.len() > limit).then(|| messages[limit - 1].position.clone());
    messages.truncate(limit);
    Ok(Json(MessagePage { messages, next_cursor }))
}

/// A decimal integer of at most 19 digits (which always fits in a u64).
fn digits(value: &str) -> Option<u64> {
    let valid = (1..=19).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit());
    valid.then(|| value.parse().ok()).flatten()
}

#[utoipa::path(get, path = "/v1/channels/{channel_id}/messages/{message_id}", tag = "messages",
    params(("channel_id" = Uuid, Path), ("message_id" = Uuid, Path), MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = MessageView), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn message(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
    Ids((channel_id, message_id)): Ids<(Uuid, Uuid)>,
) -> Result<Json<MessageView>, ApiError> {
    api.reached(TIMELINES_WITH_VISIBILITY, min).await?;
    api.visible_channel(actor.0, channel_id).await?;
    let message = api.inner.models.timelines.message(channel_id, message_id).await.map_err(store_error)?;
    message.map(Json).ok_or_else(|| not_found("message"))
}

#[derive(Serialize, ToSchema)]
struct ReplyList {
    replies: Vec<MessageView>,
}

#[utoipa::path(get, path = "/v1/channels/{channel_id}/messages/{message_id}/replies", tag = "messages",
    params(("channel_id" = Uuid, Path), ("message_id" = Uuid, Path), MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = ReplyList, description = "the thread's replies, oldest first, the root not included"),
        (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn replies(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
    Ids((channel_id, message_id)): Ids<(Uuid, Uuid)>,
) -> Result<Json<ReplyList>, ApiError> {
    api.reached(TIMELINES_WITH_VISIBILITY, min).await?;
    api.visible_channel(actor.0, channel_id).await?;
    let timelines = &api.inner.models.timelines;
    timelines.message(channel_id, message_id).await.map_err(store_error)?.ok_or_else(|| not_found("message"))?;
    let replies = timelines.replies(channel_id, message_id).await.map_err(store_error)?;
    Ok(Json(ReplyList { replies }))
}

/// The query of a search, as documented (read through [`SearchQuery`]).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct SearchParams {
    /// Words, every one of which must match (case, accents and English endings aside); a query
    /// with no word (letters or digits) matches nothing.
    #[param(min_length = 1, max_length = 1000, pattern = "\\S")]
    q: String,
    /// Only this channel.
    channel: Option<Uuid>,
    /// Only this author.
    author: Option<Uuid>,
    /// From 1 to 100; 20 when absent.
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
    channel: Option<String>,
    author: Option<String>,
    limit: Option<String>,
}

const DEFAULT_HITS: usize = 20;
const MAX_HITS: usize = 100;
const MAX_QUERY_LENGTH: usize = 1000;

/// An optional id, named `field` in the error.
fn optional_id(field: &str, value: Option<&str>, what: &str) -> Result<Option<Uuid>, ApiError> {
    value.map(|v| v.parse().map_err(|_| ApiError::invalid(field, format!("must be {what}")))).transpose()
}

#[utoipa::path(get, path = "/v1/workspaces/{workspace_id}/search", tag = "search",
    params(("workspace_id" = Uuid, Path), SearchParams, MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = Hits, description = "messages of the channels the caller may read"),
        (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn search(
    State(api): State<ReadApi>,
    actor: Actor,
    MinPosition(min): MinPosition,
    Ids(workspace_id): Ids<Uuid>,
    query: Result<Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Hits>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let q = query.q.unwrap_or_default();
    if q.trim().is_empty() || q.chars().count() > MAX_QUERY_LENGTH {
        return Err(ApiError::invalid("q", "must hold the words to search for, in at most 1000 characters"));
    }
    let channel = optional_id("channel", query.channel.as_deref(), "a channel id")?;
    let author = optional_id("author", query.author.as_deref(), "a user id")?;
    let limit = match query.limit.as_deref().map(digits) {
        None => DEFAULT_HITS,
        Some(Some(limit)) if (1..=MAX_HITS as u64).contains(&limit) => limit as usize,
        Some(_) => return Err(ApiError::invalid("limit", "must be from 1 to 100")),
    };
    api.reached(SEARCH_WITH_VISIBILITY, min).await?;
    api.visible_workspace(actor.0, workspace_id).await?;
    // Decided now, from the directory: the workspace's public channels and the private ones
    // the caller is in (a channel the directory does not know yet is searched by no one), or
    // the one channel asked for if the caller may read it.
    if let Some(channel) = channel {
        let visible = api.visible_channel(actor.0, channel).await?;
        if visible.workspace_id != workspace_id {
            return Err(not_found("channel"));
        }
    }
    let directory = &api.inner.models.directory;
    let private = directory.private_channels(workspace_id, actor.0).await.map_err(store_error)?;
    let words = search::words(&q);
    if words.is_empty() {
        return Ok(Json(Hits { hits: vec![], total: 0 }));
    }
    let query = search::Query { workspace_id, channel, private, author, words, limit };
    Ok(Json(api.inner.models.search.search(&query).await.map_err(store_error)?))
}

#[derive(Serialize, ToSchema)]
struct ProjectionList {
    projections: Vec<ProjectionStatus>,
}

#[derive(Serialize, ToSchema)]
struct ProjectionStatus {
    name: String,
    /// The position the model has applied, as a decimal string.
    position: String,
    /// Events in the store beyond it.
    lag_events: u64,
    /// How long ago the first event it has not applied was stored; 0 when it has them all.
    lag_seconds: f64,
    /// `running`, or `rebuilding` while `quikapp replay` rebuilds it beside the live model
    /// (which keeps serving).
    state: String,
    /// Events set aside on the dead-letter topic.
    dead_lettered: u64,
    /// While rebuilding: the events of history applied so far, of how many.
    #[serde(skip_serializing_if = "Option::is_none")]
    rebuild: Option<RebuildProgress>,
}

#[derive(Serialize, ToSchema)]
struct RebuildProgress {
    done: u64,
    total: u64,
}

/// A replay records its progress every second while it runs: one silent for longer was
/// interrupted (and resumes when run again).
const REPLAY_SILENCE: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

#[utoipa::path(get, path = "/v1/projections", tag = "projections",
    params(MinPositionHeader, MinPositionQueryDocs),
    responses((status = 200, body = ProjectionList), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn projections(
    State(api): State<ReadApi>,
    _actor: Actor,
    MinPosition(min): MinPosition,
) -> Result<Json<ProjectionList>, ApiError> {
    // Every model answers here: X-Min-Position waits for them all.
    let models: Vec<&'static str> = api.inner.progress.keys().copied().collect();
    api.reached(&models, min).await?;
    let store = &api.inner.store;
    let head = store.head().await?;
    let replays = store.replays().await?;
    let mut projections = Vec::new();
    for (name, progress) in &api.inner.progress {
        let applied = *progress.borrow();
        let lag_events = head.saturating_sub(applied.position);
        let lag_seconds = match lag_events {
            0 => 0.0,
            _ => store.read_all(applied.position, 1).await?.first().map_or(0.0, |next| {
                let behind = chrono::Utc::now() - next.occurred_at;
                (behind.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0)
            }),
        };
        let rebuild = replays
            .iter()
            .find(|(model, _, at)| model == name && chrono::Utc::now() - *at < REPLAY_SILENCE)
            .map(|(_, progress, _)| RebuildProgress { done: progress.done, total: progress.total });
        projections.push(ProjectionStatus {
            name: name.to_string(),
            position: applied.position.to_string(),
            lag_events,
            lag_seconds,
            state: if rebuild.is_some() { "rebuilding" } else { "running" }.into(),
            dead_lettered: applied.dead_lettered,
            rebuild,
        });
    }
    Ok(Json(ProjectionList { projections }))
}
