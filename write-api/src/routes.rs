//! The command endpoints of API.md, each documented for the OpenAPI document it is routed by.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use quikapp_commands::{Command, Reply};
use quikapp_domain::workspace::Role;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::WriteApi;
use crate::auth::Actor;
use crate::problem::ApiError;
use crate::request::{CommandHeaders, JsonBody};

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
pub struct Ids<T>(T);

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

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileBody {
    display_name: String,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceBody {
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
    /// Lowercase, 1-80 characters of a-z, 0-9, - and _; unique in the workspace.
    name: String,
    #[serde(default)]
    private: bool,
    topic: Option<String>,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelChangesBody {
    name: Option<String>,
    topic: Option<String>,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    user_id: Uuid,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostMessageBody {
    /// 1-40,000 characters.
    text: String,
    /// Makes the message a reply in the thread of this top-level message.
    thread_root_id: Option<Uuid>,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextBody {
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
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
async fn update_profile(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    body: JsonBody<ProfileBody>,
) -> Result<CommandResponse, ApiError> {
    api.run(actor, headers, &body.digest, Command::UpdateProfile { display_name: body.value.display_name }).await
}

#[utoipa::path(post, path = "/v1/workspaces", tag = "workspaces", request_body = WorkspaceBody,
    responses((status = 201, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
async fn create_workspace(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    body: JsonBody<WorkspaceBody>,
) -> Result<CommandResponse, ApiError> {
    api.run(actor, headers, &body.digest, Command::CreateWorkspace { name: body.value.name }).await
}

#[utoipa::path(post, path = "/v1/workspaces/{workspace_id}/members", tag = "workspaces", request_body = MemberBody,
    params(("workspace_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
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
    params(("workspace_id" = Uuid, Path)),
    responses((status = 201, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
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
    params(("channel_id" = Uuid, Path), ("If-Match" = Option<String>, Header, description = "the channel's version, quoted")),
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
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

#[utoipa::path(post, path = "/v1/channels/{channel_id}/archive", tag = "channels", params(("channel_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
async fn archive_channel(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids(channel_id): Ids<Uuid>,
) -> Result<CommandResponse, ApiError> {
    bodiless(api, actor, headers, Command::ArchiveChannel { channel_id }).await
}

#[utoipa::path(post, path = "/v1/channels/{channel_id}/members", tag = "channels", request_body = UserBody,
    params(("channel_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
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
    params(("channel_id" = Uuid, Path), ("user_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
async fn leave_channel(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids((channel_id, user_id)): Ids<(Uuid, Uuid)>,
) -> Result<CommandResponse, ApiError> {
    bodiless(api, actor, headers, Command::LeaveChannel { channel_id, user_id }).await
}

#[utoipa::path(post, path = "/v1/channels/{channel_id}/messages", tag = "messages", request_body = PostMessageBody,
    params(("channel_id" = Uuid, Path)),
    responses((status = 201, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
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
    params(("channel_id" = Uuid, Path), ("message_id" = Uuid, Path), ("If-Match" = Option<String>, Header, description = "the message's version, quoted")),
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
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
    params(("channel_id" = Uuid, Path), ("message_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
async fn delete_message(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids((channel_id, message_id)): Ids<(Uuid, Uuid)>,
) -> Result<CommandResponse, ApiError> {
    bodiless(api, actor, headers, Command::DeleteMessage { channel_id, message_id }).await
}

#[utoipa::path(put, path = "/v1/channels/{channel_id}/messages/{message_id}/reactions/{emoji}", tag = "messages",
    params(("channel_id" = Uuid, Path), ("message_id" = Uuid, Path), ("emoji" = String, Path)),
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
async fn add_reaction(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids((channel_id, message_id, emoji)): Ids<(Uuid, Uuid, String)>,
) -> Result<CommandResponse, ApiError> {
    bodiless(api, actor, headers, Command::AddReaction { channel_id, message_id, emoji }).await
}

#[utoipa::path(delete, path = "/v1/channels/{channel_id}/messages/{message_id}/reactions/{emoji}", tag = "messages",
    params(("channel_id" = Uuid, Path), ("message_id" = Uuid, Path), ("emoji" = String, Path)),
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
async fn remove_reaction(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids((channel_id, message_id, emoji)): Ids<(Uuid, Uuid, String)>,
) -> Result<CommandResponse, ApiError> {
    bodiless(api, actor, headers, Command::RemoveReaction { channel_id, message_id, emoji }).await
}

#[utoipa::path(post, path = "/v1/channels/{channel_id}/read", tag = "channels", request_body = ReadBody,
    params(("channel_id" = Uuid, Path)),
    responses((status = 200, body = CommandAnswer), (status = "4XX", body = Problem)), security(("bearer" = [])))]
async fn mark_read(
    State(api): State<WriteApi>,
    actor: Actor,
    headers: CommandHeaders,
    Ids(channel_id): Ids<Uuid>,
    body: JsonBody<ReadBody>,
) -> Result<CommandResponse, ApiError> {
    api.run(actor, headers, &body.digest, Command::MarkRead { channel_id, message_id: body.value.message_id }).await
}
