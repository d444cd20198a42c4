//! The command endpoints of API.md, each documented for the OpenAPI document it is routed by.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use quikapp_commands::{Command, Reply};
use quikapp_domain::workspace::Role;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaType, Type};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::WriteApi;
use crate::auth::Actor;
use crate::problem::ApiError;
use crate::request::{CommandHeaders, IDEMPOTENCY_KEY_PATTERN, IF_MATCH_PATTERN, JsonBody};

pub fn commands() -> OpenApiRouter<WriteApi> {
    OpenApiRouter::new()
        .routes(routes!(update_profile))
        .routes(routes!(create_workspace))
        .routes(routes!(add_workspace_member))
        .routes(routes!(create_channel))
        .routes(routes!(update_channel))
        .routes(routes!(archive_channel))
        .routes(routes!(join_channel))
        .routes(routes!(leave_channel))
        .routes(routes!(post_message))
        .routes(routes!(edit_message, delete_message))
        .routes(routes!(add_reaction, remove_reaction))
        .routes(routes!(mark_read))
}

/// Path ids; one that is not a UUID names nothing that exists (404).
pub struct Ids<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Ids<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(ids)) => Ok(Ids(ids)),
            Err(_) => Err(ApiError::NotFound("no such resource".into())),
        }
    }
}

/// A command's success: 201 when it created something, else 200; `X-Position` and JSON with
/// the created ids, `position` and the stream's `version`.
pub struct CommandResponse(pub Reply);

impl IntoResponse for CommandResponse {
    fn into_response(self) -> Response {
        let status = if self.0.created { StatusCode::CREATED } else { StatusCode::OK };
        let mut response = (status, axum::Json(self.0.body())).into_response();
        response.headers_mut().insert("x-position", HeaderValue::from(self.0.position));
        response
    }
}

/// The answer to every successful command.
#[derive(ToSchema)]
#[allow(dead_code)]
struct CommandAnswer {
    /// Global position of the command's last event (or the head for a no-op), as a decimal
    /// string; pass it to the read API as X-Min-Position.
    position: String,
    /// The version of the stream the command changed; send it back in If-Match.
    version: u64,
    /// Present when a workspace was created.
    workspace_id: Option<Uuid>,
    /// Present when a channel was created.
    channel_id: Option<Uuid>,
    /// Present when a message was posted.
    message_id: Option<Uuid>,
}

/// An `application/problem+json` error (RFC 9457).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Problem {
    r#type: String,
    title: String,
    status: u16,
    detail: String,
    /// For 422: the invalid fields.
    errors: Option<Vec<FieldError>>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct FieldError {
    field: String,
    message: String,
}

// What the domain's value rules take, as JSON Schema (patterns in ECMA-262 syntax), so that
// clients and contract fuzzers generated from /openapi.json send only what the server accepts.
// Blanks are the characters Rust's `str::trim` removes (Unicode White_Space).
macro_rules! blanks {
    () => {
        "\\t\\n\\u000b\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
    };
}
/// Free text: something besides blanks, and no U+0000.
const NOT_BLANK: &str = concat!("^[^\\u0000]*[^\\u0000", blanks!(), "][^\\u0000]*$");
/// Free text that may be empty: no U+0000.
const NO_NUL: &str = "^[^\\u0000]*$";
const CHANNEL_NAME: &str = "^[a-z0-9_-]{1,80}$";
/// No blanks, control characters or slashes.
const EMOJI: &str = concat!("^[^\\u0000-\\u001f\\u007f-\\u009f/", blanks!(), "]+$");

fn text(description: &str, lengths: (Option<usize>, usize), pattern: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .min_length(lengths.0)
        .max_length(Some(lengths.1))
        .pattern(Some(pattern))
}

fn display_text() -> Object {
    text("1-80 characters, not only blanks.", (Some(1), 80), NOT_BLANK).build()
}

fn message_text() -> Object {
    text("1-40,000 characters, not only blanks.", (Some(1), 40_000), NOT_BLANK).build()
}

fn channel_name() -> Object {
    let description = "Lowercase, 1-80 characters of a-z, 0-9, - and _; unique in the workspace.";
    ObjectBuilder::new().schema_type(Type::String).description(Some(description)).pattern(Some(CHANNEL_NAME)).build()
}

fn topic() -> Object {
    text("At most 250 characters; empty is no topic.", (None, 250), NO_NUL).build()
}

fn nullable_topic() -> Object {
    text("At most 250 characters; empty or null is no topic.", (None, 250), NO_NUL)
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .build()
}

fn emoji() -> Object {
    text("An emoji's name or character: 1-64 characters without blanks or slashes.", (Some(1), 64), EMOJI).build()
}

fn idempotency_key() -> Object {
    let description = "Makes the command idempotent for this user and endpoint for the configured retention \
        (24 hours by default): a repeat with the same body returns the first successful answer.";
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .pattern(Some(IDEMPOTENCY_KEY_PATTERN))
        .build()
}

fn if_match() -> Object {
    let description = "The version the change is based on, as an entity tag such as \"3\"; 412 when the \
        stream has moved on.";
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .pattern(Some(IF_MATCH_PATTERN))
        .build()
}

/// The headers every command takes.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct CommandHeaderDocs {
    #[serde(rename = "Idempotency-Key")]
    #[param(schema_with = idempotency_key)]
    idempotency_key: Option<String>,
}

/// The headers of commands that can be made conditional on a stream's version.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct ConditionalHeaderDocs {
    #[serde(rename = "Idempotency-Key")]
    #[param(schema_with = idempotency_key)]
    idempotency_key: Option<String>,
    #[serde(rename = "If-Match")]
    #[param(schema_with = if_match)]
    if_match: Option<String>,
}

/// The path of a reaction.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct ReactionPath {
    channel_id: Uuid,
    message_id: Uuid,
    #[param(schema_with = emoji)]
    emoji: String,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileBody {
    #[schema(schema_with = display_text)]
    display_name: String,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceBody {
    #[schema(schema_with = display_text)]
    name: String,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    Member,
    Admin,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberBody {
    user_id: Uuid,
    role: MemberRole,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelBody {
    #[schema(schema_with = channel_name)]
    name: String,
    #[serde(default)]
    private: bool,
    #[schema(schema_with = nullable_topic)]
    topic: Option<String>,
}

/// At least one of the two; a field left out keeps its value.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelChangesBody {
    #[serde(default, deserialize_with = "not_null", skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = channel_name)]
    name: Option<String>,
    #[serde(default, deserialize_with = "not_null", skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = topic)]
    topic: Option<String>,
}

/// An optional field that may be left out but not sent as null.
fn not_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    user_id: Uuid,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostMessageBody {
    #[schema(schema_with = message_text)]
    text: String,
    /// Makes the message a reply in the thread of this top-level message.
    thread_root_id: Option<Uuid>,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextBody {
    #[schema(schema_with = message_text)]
    text: String,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadBody {
    message_id: Uuid,
}

/// Runs a command without a body.
async fn bodiless(
    api: WriteApi,
    actor: Actor,
    headers: CommandHeaders,
    command: Command,
) -> Result<CommandResponse, ApiError> {
    api.run(actor, headers, "", command).await
}

#[utoipa::path(put, path = "/v1/users/me", tag = "users", request_body = ProfileBody,
    params(CommandHeaderDocs),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn update_profile(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    body: JsonBody<ProfileBody>,
) -> Result<CommandResponse, ApiError> {
    api.run(actor, headers, &body.digest, Command::UpdateProfile { display_name: body.value.display_name }).await
}

#[utoipa::path(post, path = "/v1/workspaces", tag = "workspaces", request_body = WorkspaceBody,
    params(CommandHeaderDocs),
    responses((status = 201, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_workspace(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    body: JsonBody<WorkspaceBody>,
) -> Result<CommandResponse, ApiError> {
    api.run(actor, headers, &body.digest, Command::CreateWorkspace { name: body.value.name }).await
}

#[utoipa::path(post, path = "/v1/workspaces/{workspace_id}/members", tag = "workspaces", request_body = MemberBody,
    params(CommandHeaderDocs, ("workspace_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn add_workspace_member(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids(workspace_id): Ids<Uuid>,
    body: JsonBody<MemberBody>,
) -> Result<CommandResponse, ApiError> {
    let role = match body.value.role {
        MemberRole::Member => Role::Member,
        MemberRole::Admin => Role::Admin,
    };
    let command = Command::AddWorkspaceMember { workspace_id, user_id: body.value.user_id, role };
    api.run(actor, headers, &body.digest, command).await
}

#[utoipa::path(post, path = "/v1/workspaces/{workspace_id}/channels", tag = "channels", request_body = ChannelBody,
    params(CommandHeaderDocs, ("workspace_id" = Uuid, Path)),
    responses((status = 201, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_channel(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids(workspace_id): Ids<Uuid>,
    body: JsonBody<ChannelBody>,
) -> Result<CommandResponse, ApiError> {
    let ChannelBody { name, private, topic } = body.value;
    api.run(actor, headers, &body.digest, Command::CreateChannel { workspace_id, name, private, topic }).await
}

#[utoipa::path(patch, path = "/v1/channels/{channel_id}", tag = "channels", request_body = ChannelChangesBody,
    params(("channel_id" = Uuid, Path), ConditionalHeaderDocs),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn update_channel(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids(channel_id): Ids<Uuid>,
    body: JsonBody<ChannelChangesBody>,
) -> Result<CommandResponse, ApiError> {
    let ChannelChangesBody { name, topic } = body.value;
    api.run(actor, headers, &body.digest, Command::UpdateChannel { channel_id, name, topic }).await
}

#[utoipa::path(post, path = "/v1/channels/{channel_id}/archive", tag = "channels", params(CommandHeaderDocs, ("channel_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn archive_channel(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids(channel_id): Ids<Uuid>,
) -> Result<CommandResponse, ApiError> {
    bodiless(api, actor, headers, Command::ArchiveChannel { channel_id }).await
}

#[utoipa::path(post, path = "/v1/channels/{channel_id}/members", tag = "channels", request_body = UserBody,
    params(CommandHeaderDocs, ("channel_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn join_channel(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids(channel_id): Ids<Uuid>,
    body: JsonBody<UserBody>,
) -> Result<CommandResponse, ApiError> {
    api.run(actor, headers, &body.digest, Command::JoinChannel { channel_id, user_id: body.value.user_id }).await
}

#[utoipa::path(delete, path = "/v1/channels/{channel_id}/members/{user_id}", tag = "channels",
    params(CommandHeaderDocs, ("channel_id" = Uuid, Path), ("user_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn leave_channel(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids((channel_id, user_id)): Ids<(Uuid, Uuid)>,
) -> Result<CommandResponse, ApiError> {
    bodiless(api, actor, headers, Command::LeaveChannel { channel_id, user_id }).await
}

#[utoipa::path(post, path = "/v1/channels/{channel_id}/messages", tag = "messages", request_body = PostMessageBody,
    params(CommandHeaderDocs, ("channel_id" = Uuid, Path)),
    responses((status = 201, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn post_message(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids(channel_id): Ids<Uuid>,
    body: JsonBody<PostMessageBody>,
) -> Result<CommandResponse, ApiError> {
    let PostMessageBody { text, thread_root_id } = body.value;
    api.run(actor, headers, &body.digest, Command::PostMessage { channel_id, text, thread_root_id }).await
}

#[utoipa::path(patch, path = "/v1/channels/{channel_id}/messages/{message_id}", tag = "messages", request_body = TextBody,
    params(("channel_id" = Uuid, Path), ("message_id" = Uuid, Path), ConditionalHeaderDocs),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn edit_message(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids((channel_id, message_id)): Ids<(Uuid, Uuid)>,
    body: JsonBody<TextBody>,
) -> Result<CommandResponse, ApiError> {
    api.run(actor, headers, &body.digest, Command::EditMessage { channel_id, message_id, text: body.value.text }).await
}

#[utoipa::path(delete, path = "/v1/channels/{channel_id}/messages/{message_id}", tag = "messages",
    params(CommandHeaderDocs, ("channel_id" = Uuid, Path), ("message_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn delete_message(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids((channel_id, message_id)): Ids<(Uuid, Uuid)>,
) -> Result<CommandResponse, ApiError> {
    bodiless(api, actor, headers, Command::DeleteMessage { channel_id, message_id }).await
}

#[utoipa::path(put, path = "/v1/channels/{channel_id}/messages/{message_id}/reactions/{emoji}", tag = "messages",
    params(CommandHeaderDocs, ReactionPath),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn add_reaction(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids((channel_id, message_id, emoji)): Ids<(Uuid, Uuid, String)>,
) -> Result<CommandResponse, ApiError> {
    bodiless(api, actor, headers, Command::AddReaction { channel_id, message_id, emoji }).await
}

#[utoipa::path(delete, path = "/v1/channels/{channel_id}/messages/{message_id}/reactions/{emoji}", tag = "messages",
    params(CommandHeaderDocs, ReactionPath),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn remove_reaction(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids((channel_id, message_id, emoji)): Ids<(Uuid, Uuid, String)>,
) -> Result<CommandResponse, ApiError> {
    bodiless(api, actor, headers, Command::RemoveReaction { channel_id, message_id, emoji }).await
}

#[utoipa::path(post, path = "/v1/channels/{channel_id}/read", tag = "channels", request_body = ReadBody,
    params(CommandHeaderDocs, ("channel_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer, headers(("X-Position" = String, description = "the position of the command's last event, or the head"))), (status = "4XX", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", body = Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn mark_read(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids(channel_id): Ids<Uuid>,
    body: JsonBody<ReadBody>,
) -> Result<CommandResponse, ApiError> {
    api.run(actor, headers, &body.digest, Command::MarkRead { channel_id, message_id: body.value.message_id }).await
}
