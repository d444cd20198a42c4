//! The command API through HTTP, without a socket, against both event stores: every endpoint,
//! status, header and error of API.md's write side. Every failure must append nothing, and
//! every event the commands produce must validate against its checked-in JSON Schema.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use quikapp_commands::CommandService;
use quikapp_commands::store::EventStore;
use quikapp_commands::store::contract;
use quikapp_write_api::auth::Tokens;
use quikapp_write_api::{Limits, RateLimit, WriteApi, router};
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

struct Api {
    router: Router,
    tokens: Tokens,
    store: Arc<dyn EventStore>,
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Answer {
    fn id(&self, name: &str) -> Uuid {
        Uuid::parse_str(self.body[name].as_str().unwrap_or_else(|| panic!("no {name} in {}", self.body))).unwrap()
    }

    fn position(&self) -> u64 {
        self.body["position"].as_str().expect("position is a string").parse().unwrap()
    }

    #[track_caller]
    fn expect(self, status: StatusCode) -> Self {
        assert_eq!(self.status, status, "{}", self.body);
        self
    }

    /// A problem+json answer with this status; for 422 naming `field`.
    #[track_caller]
    fn problem(self, status: StatusCode, field: Option<&str>) -> Self {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.headers["content-type"], "application/problem+json");
        assert_eq!(self.body["status"], status.as_u16());
        for key in ["type", "title", "detail"] {
            assert!(self.body[key].is_string(), "problem without {key}: {}", self.body);
        }
        if let Some(field) = field {
            assert_eq!(self.body["errors"][0]["field"], field, "{}", self.body);
        }
        self
    }
}

struct Call<'a> {
    api: &'a Api,
    request: axum::http::request::Builder,
    body: Body,
}

impl Call<'_> {
    fn header(mut self, name: &str, value: &str) -> Self {
        self.request = self.request.header(name, value);
        self
    }

    fn json(mut self, body: Value) -> Self {
        self.request = self.request.header("content-type", "application/json");
        self.body = Body::from(body.to_string());
        self
    }

    fn raw(mut self, content_type: &str, body: impl Into<Body>) -> Self {
        self.request = self.request.header("content-type", content_type);
        self.body = body.into();
        self
    }

    async fn send(self) -> Answer {
        let response = self.api.router.clone().oneshot(self.request.body(self.body).unwrap()).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Answer { status, headers, body }
    }
}

/// At least the 32 bytes HS256 asks for.
const SECRET: &str = "a test secret, long enough for HS256";

impl Api {
    fn new(store: Arc<dyn EventStore>, rate_limit: RateLimit) -> Self {
        Api::with_limits(store, Limits { rate_limit, ..Limits::default() })
    }

    fn with_limits(store: Arc<dyn EventStore>, limits: Limits) -> Self {
        let tokens = Tokens::new(SECRET).unwrap();
        let api = WriteApi::new(CommandService::new(store.clone()), tokens.clone(), limits);
        Api { router: router(api), tokens, store }
    }

    fn call(&self, method: Method, path: &str, user: Option<Uuid>) -> Call<'_> {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(user) = user {
            request = request.header("authorization", format!("Bearer {}", self.tokens.mint(user)));
        }
        Call { api: self, request, body: Body::empty() }
    }

    async fn head(&self) -> u64 {
        self.store.head().await.unwrap()
    }

    /// A workspace owned by `owner` with `members` added, and a public channel `general` that
    /// `owner` created; answers (workspace, channel).
    async fn workspace_with_channel(&self, owner: Uuid, members: &[Uuid]) -> (Uuid, Uuid) {
        let ws = self
            .call(Method::POST, "/v1/workspaces", Some(owner))
            .json(json!({"name": "Acme"}))
            .send()
            .await
            .expect(StatusCode::CREATED)
            .id("workspace_id");
        for member in members {
            self.call(Method::POST, &format!("/v1/workspaces/{ws}/members"), Some(owner))
                .json(json!({"user_id": member, "role": "member"}))
                .send()
                .await
                .expect(StatusCode::OK);
        }
        let channel = self
            .call(Method::POST, &format!("/v1/workspaces/{ws}/channels"), Some(owner))
            .json(json!({"name": "general"}))
            .send()
            .await
            .expect(StatusCode::CREATED)
            .id("channel_id");
        (ws, channel)
    }

    async fn post(&self, channel: Uuid, user: Uuid, text: &str) -> Answer {
        self.call(Method::POST, &format!("/v1/channels/{channel}/messages"), Some(user))
            .json(json!({"text": text}))
            .send()
            .await
    }

    /// Every stored event, each validated against its checked-in schema.
    async fn validate_all_events(&self) -> usize {
        let dir = std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../schemas");
        let events = self.store.read_all(0, 10_000).await.unwrap();
        for envelope in &events {
            let json = serde_json::to_value(envelope).unwrap();
            let schema: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(format!("{}.json", envelope.event.type_name()))).unwrap(),
            )
            .unwrap();
            let validator = jsonschema::validator_for(&schema).unwrap();
            let errors: Vec<String> = validator.iter_errors(&json).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{json} does not match its schema: {errors:?}");
        }
        events.len()
    }
}

async fn a_conversation_goes_through_every_command(api: Api) {
    let (owner, member) = (Uuid::now_v7(), Uuid::now_v7());
    let profile = api
        .call(Method::PUT, "/v1/users/me", Some(owner))
        .json(json!({"display_name": "Ada"}))
        .send()
        .await
        .expect(StatusCode::OK);
    assert_eq!(profile.body["version"], 1);

    let created = api
        .call(Method::POST, "/v1/workspaces", Some(owner))
        .json(json!({"name": "Acme"}))
        .send()
        .await
        .expect(StatusCode::CREATED);
    let ws = created.id("workspace_id");
    assert_eq!(created.headers["x-position"].to_str().unwrap(), created.body["position"].as_str().unwrap());
    assert_eq!(created.position(), 2);
    assert_eq!(created.body["version"], 1);

    api.call(Method::POST, &format!("/v1/workspaces/{ws}/members"), Some(owner))
        .json(json!({"user_id": member, "role": "admin"}))
        .send()
        .await
        .expect(StatusCode::OK);
    let channel = api
        .call(Method::POST, &format!("/v1/workspaces/{ws}/channels"), Some(owner))
        .json(json!({"name": "general", "topic": "all things", "private": false}))
        .send()
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(channel.body["version"], 2, "ChannelCreated and the creator's ChannelMemberJoined");
    let ch = channel.id("channel_id");
    api.call(Method::POST, &format!("/v1/channels/{ch}/members"), Some(member))
        .json(json!({"user_id": member}))
        .send()
        .await
        .expect(StatusCode::OK);
    api.call(Method::PATCH, &format!("/v1/channels/{ch}"), Some(member))
        .json(json!({"topic": "news"}))
        .send()
        .await
        .expect(StatusCode::OK);

    let posted = api.post(ch, owner, "hello").await.expect(StatusCode::CREATED);
    let msg = posted.id("message_id");
    assert_eq!(posted.body["version"], 1);
    let reply = api
        .call(Method::POST, &format!("/v1/channels/{ch}/messages"), Some(member))
        .json(json!({"text": "hi back", "thread_root_id": msg}))
        .send()
        .await
        .expect(StatusCode::CREATED);
    let edited = api
        .call(Method::PATCH, &format!("/v1/channels/{ch}/messages/{msg}"), Some(owner))
        .json(json!({"text": "hello!"}))
        .send()
        .await
        .expect(StatusCode::OK);
    assert_eq!(edited.body["version"], 2);

    let reaction = format!("/v1/channels/{ch}/messages/{msg}/reactions/tada");
    let reacted = api.call(Method::PUT, &reaction, Some(member)).send().await.expect(StatusCode::OK);
    let head = api.head().await;
    let again = api.call(Method::PUT, &reaction, Some(member)).send().await.expect(StatusCode::OK);
    assert_eq!(api.head().await, head, "a reaction already there appends nothing");
    assert_eq!((again.position(), &again.body["version"]), (head, &reacted.body["version"]));
    api.call(Method::DELETE, &reaction, Some(member)).send().await.expect(StatusCode::OK);
    let absent = api.call(Method::DELETE, &reaction, Some(member)).send().await.expect(StatusCode::OK);
    assert_eq!(absent.position(), api.head().await);

    api.call(Method::POST, &format!("/v1/channels/{ch}/read"), Some(member))
        .json(json!({"message_id": msg}))
        .send()
        .await
        .expect(StatusCode::OK);
    api.call(Method::DELETE, &format!("/v1/channels/{ch}/messages/{}", reply.id("message_id")), Some(owner))
        .send()
        .await
        .expect(StatusCode::OK);
    api.call(Method::POST, &format!("/v1/channels/{ch}/archive"), Some(owner)).send().await.expect(StatusCode::OK);
    api.post(ch, owner, "too late").await.problem(StatusCode::CONFLICT, None);
    api.call(Method::DELETE, &format!("/v1/channels/{ch}/members/{member}"), Some(member))
        .send()
        .await
        .expect(StatusCode::OK);

    let events = api.store.read_all(0, 100).await.unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event.type_name()).collect();
    assert_eq!(
        types,
        [
            "UserProfileUpdated",
            "WorkspaceCreated",
            "WorkspaceMemberAdded",
            "ChannelCreated",
            "ChannelMemberJoined",
            "ChannelMemberJoined",
            "ChannelTopicChanged",
            "MessagePosted",
            "MessagePosted",
            "MessageEdited",
            "ReactionAdded",
            "ReactionRemoved",
            "ChannelReadMarked",
            "MessageDeleted",
            "ChannelArchived",
            "ChannelMemberLeft",
        ]
    );
    for event in &events {
        let is_channel_event =
            !matches!(event.event.type_name(), "UserProfileUpdated" | "WorkspaceCreated" | "WorkspaceMemberAdded");
        assert_eq!(event.channel_id.is_some(), is_channel_event, "{event:?}");
        assert_eq!(event.workspace_id.is_some(), event.event.type_name() != "UserProfileUpdated", "{event:?}");
    }
    assert_eq!(events[7].actor_id, owner, "the actor comes from the token");
    assert_eq!(api.validate_all_events().await, 16);
}

async fn bad_requests_get_problems_naming_the_field_and_append_nothing(api: Api) {
    let (owner, outsider, member) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let (ws, ch) = api.workspace_with_channel(owner, &[member]).await;
    let head = api.head().await;
    let messages = format!("/v1/channels/{ch}/messages");

    api.call(Method::POST, &messages, None)
        .json(json!({"text": "x"}))
        .send()
        .await
        .problem(StatusCode::UNAUTHORIZED, None);
    api.call(Method::POST, &messages, None)
        .header("authorization", "Bearer not-a-token")
        .json(json!({"text": "x"}))
        .send()
        .await
        .problem(StatusCode::UNAUTHORIZED, None);
    let forged = Tokens::new("another secret, just as long as the first").unwrap().mint(owner);
    api.call(Method::POST, &messages, None)
        .header("authorization", &format!("Bearer {forged}"))
        .json(json!({"text": "x"}))
        .send()
        .await
        .problem(StatusCode::UNAUTHORIZED, None);
    api.call(Method::POST, &messages, Some(owner))
        .raw("text/plain", "hello")
        .send()
        .await
        .problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, None);
    api.call(Method::POST, &messages, Some(owner))
        .raw("application/json", "{\"text\": ")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST, None);
    api.call(Method::POST, &messages, Some(owner))
        .json(json!({}))
        .send()
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("text"));
    api.call(Method::POST, &messages, Some(owner))
        .json(json!({"text": 5}))
        .send()
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("text"));
    api.call(Method::POST, &messages, Some(owner))
        .json(json!({"text": "x", "colour": "red"}))
        .send()
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("colour"));
    api.call(Method::POST, &messages, Some(owner))
        .json(json!({"text": "x", "thread_root_id": "nope"}))
        .send()
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("thread_root_id"));
    api.post(ch, owner, "").await.problem(StatusCode::UNPROCESSABLE_ENTITY, Some("text"));
    api.post(ch, owner, &"x".repeat(40_001)).await.problem(StatusCode::UNPROCESSABLE_ENTITY, Some("text"));
    api.post(ch, owner, &"x".repeat(600_000)).await.problem(StatusCode::PAYLOAD_TOO_LARGE, None);
    // PostgreSQL cannot store U+0000 in JSON; no store may be asked to.
    api.post(ch, owner, "nul \u{0} inside").await.problem(StatusCode::UNPROCESSABLE_ENTITY, Some("text"));
    api.call(Method::POST, &messages, Some(owner))
        .json(json!({"text": "x", "thread_root_id": Uuid::now_v7()}))
        .send()
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("thread_root_id"));

    let channels = format!("/v1/workspaces/{ws}/channels");
    api.call(Method::POST, &channels, Some(owner))
        .json(json!({"name": "Has Caps"}))
        .send()
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("name"));
    api.call(Method::POST, &channels, Some(owner))
        .json(json!({"name": "general"}))
        .send()
        .await
        .problem(StatusCode::CONFLICT, None);
    api.call(Method::POST, &channels, Some(outsider))
        .json(json!({"name": "mine"}))
        .send()
        .await
        .problem(StatusCode::NOT_FOUND, None);
    api.call(Method::POST, &format!("/v1/workspaces/{ws}/members"), Some(member))
        .json(json!({"user_id": outsider, "role": "member"}))
        .send()
        .await
        .problem(StatusCode::FORBIDDEN, None);
    api.call(Method::POST, &format!("/v1/workspaces/{ws}/members"), Some(owner))
        .json(json!({"user_id": outsider, "role": "owner"}))
        .send()
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("role"));

    api.post(ch, outsider, "hi").await.problem(StatusCode::NOT_FOUND, None);
    api.post(ch, member, "not joined yet").await.problem(StatusCode::FORBIDDEN, None);
    api.post(Uuid::now_v7(), owner, "nowhere").await.problem(StatusCode::NOT_FOUND, None);
    api.call(Method::POST, "/v1/channels/not-a-uuid/messages", Some(owner))
        .json(json!({"text": "x"}))
        .send()
        .await
        .problem(StatusCode::NOT_FOUND, None);
    api.call(Method::PATCH, &format!("/v1/channels/{ch}/messages/{}", Uuid::now_v7()), Some(owner))
        .json(json!({"text": "x"}))
        .send()
        .await
        .problem(StatusCode::NOT_FOUND, None);
    api.call(Method::PATCH, &format!("/v1/channels/{ch}"), Some(owner))
        .header("if-match", "soon")
        .json(json!({"topic": "x"}))
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST, None);

    assert_eq!(api.head().await, head, "failed commands appended something");

    // A private channel is invisible to non-members; its owner invites, then the invitee sees it.
    let secret = api
        .call(Method::POST, &channels, Some(owner))
        .json(json!({"name": "secret", "private": true}))
        .send()
        .await
        .expect(StatusCode::CREATED)
        .id("channel_id");
    api.post(secret, member, "let me in").await.problem(StatusCode::NOT_FOUND, None);
    api.call(Method::POST, &format!("/v1/channels/{secret}/members"), Some(member))
        .json(json!({"user_id": member}))
        .send()
        .await
        .problem(StatusCode::NOT_FOUND, None);
    api.call(Method::POST, &format!("/v1/channels/{secret}/members"), Some(owner))
        .json(json!({"user_id": member}))
        .send()
        .await
        .expect(StatusCode::OK);
    api.post(secret, member, "thanks").await.expect(StatusCode::CREATED);
}

async fn an_idempotency_key_returns_the_first_answer_for_the_same_body_only(api: Api) {
    let owner = Uuid::now_v7();
    let (_, ch) = api.workspace_with_channel(owner, &[]).await;
    let path = format!("/v1/channels/{ch}/messages");
    let first = api
        .call(Method::POST, &path, Some(owner))
        .header("idempotency-key", "k1")
        .raw("application/json", r#"{"text":"once","thread_root_id":null}"#)
        .send()
        .await
        .expect(StatusCode::CREATED);
    let head = api.head().await;
    // The same body with its keys in another order, other spacing, or a null spelled as an
    // absent field, is the same request.
    let repeat = api
        .call(Method::POST, &path, Some(owner))
        .header("idempotency-key", "k1")
        .raw("application/json", r#"{ "thread_root_id" : null , "text" : "once" }"#)
        .send()
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(repeat.body, first.body);
    let repeat = api
        .call(Method::POST, &path, Some(owner))
        .header("idempotency-key", "k1")
        .raw("application/json", r#"{"text": "once"}"#)
        .send()
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(repeat.body, first.body);
    assert_eq!(repeat.headers["x-position"], first.headers["x-position"]);
    assert_eq!(api.head().await, head, "a repeat appends nothing");

    api.call(Method::POST, &path, Some(owner))
        .header("idempotency-key", "k1")
        .json(json!({"text": "twice"}))
        .send()
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("Idempotency-Key"));
    assert_eq!(api.head().await, head);

    let other_user = Uuid::now_v7();
    api.call(Method::POST, &path, Some(other_user))
        .header("idempotency-key", "k1")
        .json(json!({"text": "once"}))
        .send()
        .await
        .problem(StatusCode::NOT_FOUND, None);
    let failed = api
        .call(Method::POST, &path, Some(owner))
        .header("idempotency-key", "k2")
        .json(json!({"text": ""}))
        .send()
        .await;
    failed.problem(StatusCode::UNPROCESSABLE_ENTITY, Some("text"));
    api.call(Method::POST, &path, Some(owner))
        .header("idempotency-key", "k2")
        .json(json!({"text": "now valid"}))
        .send()
        .await
        .expect(StatusCode::CREATED);

    // Concurrent repeats of one key append once.
    let racers = (0..8).map(|_| {
        api.call(Method::POST, &path, Some(owner)).header("idempotency-key", "k3").json(json!({"text": "raced"})).send()
    });
    let answers = futures::future::join_all(racers).await;
    let ids: std::collections::HashSet<_> = answers.iter().map(|a| a.body["message_id"].clone()).collect();
    assert_eq!(ids.len(), 1, "every repeat answers the same message");
    assert!(answers.iter().all(|a| a.status == StatusCode::CREATED));
}

async fn if_match_makes_a_command_conditional_on_the_version(api: Api) {
    let owner = Uuid::now_v7();
    let (_, ch) = api.workspace_with_channel(owner, &[]).await;
    let path = format!("/v1/channels/{ch}");
    api.call(Method::PATCH, &path, Some(owner))
        .header("if-match", "\"1\"")
        .json(json!({"topic": "stale"}))
        .send()
        .await
        .problem(StatusCode::PRECONDITION_FAILED, None);
    let changed = api
        .call(Method::PATCH, &path, Some(owner))
        .header("if-match", "\"2\"")
        .json(json!({"topic": "fresh"}))
        .send()
        .await
        .expect(StatusCode::OK);
    assert_eq!(changed.body["version"], 3);

    // Many writers holding the same version: exactly one wins, the others learn it moved on.
    let racers = (0..12).map(|i| {
        api.call(Method::PATCH, &path, Some(owner))
            .header("if-match", "\"3\"")
            .json(json!({"topic": format!("topic {i}")}))
            .send()
    });
    let answers = futures::future::join_all(racers).await;
    let won = answers.iter().filter(|a| a.status == StatusCode::OK).count();
    let lost = answers.iter().filter(|a| a.status == StatusCode::PRECONDITION_FAILED).count();
    assert_eq!((won, lost), (1, 11));

    let msg = api.post(ch, owner, "v1").await.expect(StatusCode::CREATED).id("message_id");
    let message = format!("/v1/channels/{ch}/messages/{msg}");
    api.call(Method::PATCH, &message, Some(owner))
        .header("if-match", "\"1\"")
        .json(json!({"text": "v2"}))
        .send()
        .await
        .expect(StatusCode::OK);
    api.call(Method::PATCH, &message, Some(owner))
        .header("if-match", "\"1\"")
        .json(json!({"text": "v3"}))
        .send()
        .await
        .problem(StatusCode::PRECONDITION_FAILED, None);
}

async fn concurrent_posts_and_renames_to_one_name_are_all_decided_once(api: Api) {
    let owner = Uuid::now_v7();
    let (ws, ch) = api.workspace_with_channel(owner, &[]).await;
    let head = api.head().await;
    let texts: Vec<String> = (0..30).map(|i| format!("message {i}")).collect();
    let posts = texts.iter().map(|text| api.post(ch, owner, text));
    assert!(futures::future::join_all(posts).await.iter().all(|a| a.status == StatusCode::CREATED));
    assert_eq!(api.head().await, head + 30);

    let creations = (0..6).map(|_| {
        api.call(Method::POST, &format!("/v1/workspaces/{ws}/channels"), Some(owner))
            .json(json!({"name": "contested"}))
            .send()
    });
    let answers = futures::future::join_all(creations).await;
    assert_eq!(answers.iter().filter(|a| a.status == StatusCode::CREATED).count(), 1);
    assert_eq!(answers.iter().filter(|a| a.status == StatusCode::CONFLICT).count(), 5);

    // A renamed channel frees its old name.
    api.call(Method::PATCH, &format!("/v1/channels/{ch}"), Some(owner))
        .json(json!({"name": "lobby"}))
        .send()
        .await
        .expect(StatusCode::OK);
    api.call(Method::POST, &format!("/v1/workspaces/{ws}/channels"), Some(owner))
        .json(json!({"name": "general"}))
        .send()
        .await
        .expect(StatusCode::CREATED);
    api.call(Method::POST, &format!("/v1/workspaces/{ws}/channels"), Some(owner))
        .json(json!({"name": "lobby"}))
        .send()
        .await
        .problem(StatusCode::CONFLICT, None);
}

async fn the_service_documents_itself_and_reports_health(api: Api) {
    let openapi = api.call(Method::GET, "/openapi.json", None).send().await.expect(StatusCode::OK);
    let paths = openapi.body["paths"].as_object().expect("paths");
    for (path, methods) in [
        ("/v1/users/me", &["put"][..]),
        ("/v1/workspaces", &["post"]),
        ("/v1/workspaces/{workspace_id}/members", &["post"]),
        ("/v1/workspaces/{workspace_id}/channels", &["post"]),
        ("/v1/channels/{channel_id}", &["patch"]),
        ("/v1/channels/{channel_id}/archive", &["post"]),
        ("/v1/channels/{channel_id}/members", &["post"]),
        ("/v1/channels/{channel_id}/members/{user_id}", &["delete"]),
        ("/v1/channels/{channel_id}/messages", &["post"]),
        ("/v1/channels/{channel_id}/messages/{message_id}", &["patch", "delete"]),
        ("/v1/channels/{channel_id}/messages/{message_id}/reactions/{emoji}", &["put", "delete"]),
        ("/v1/channels/{channel_id}/read", &["post"]),
    ] {
        for method in methods {
            assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} is not documented");
        }
    }
    api.call(Method::GET, "/healthz", None).send().await.expect(StatusCode::OK);
    assert_eq!(api.call(Method::GET, "/readyz", None).send().await.expect(StatusCode::OK).body["status"], "ready");
    api.call(Method::POST, "/v1/workspaces", Some(Uuid::now_v7()))
        .json(json!({"name": "Metered"}))
        .send()
        .await
        .expect(StatusCode::CREATED);
    let metrics = api.call(Method::GET, "/metrics", None).send().await.expect(StatusCode::OK);
    assert!(metrics.body.as_str().unwrap().contains("quikapp_commands_total"), "{}", metrics.body);
    let answer = api.call(Method::GET, "/healthz", None).header("x-request-id", "trace-me").send().await;
    assert_eq!(answer.headers["x-request-id"], "trace-me");
}

async fn an_idempotency_key_is_scoped_by_route_and_decoded_parameters(api: Api) {
    let owner = Uuid::now_v7();
    let (_, ch) = api.workspace_with_channel(owner, &[]).await;
    let message = api.post(ch, owner, "react to me").await.id("message_id");
    let react = |path: String| api.call(Method::PUT, &path, Some(owner)).header("idempotency-key", "react-once").send();
    let first =
        react(format!("/v1/channels/{ch}/messages/{message}/reactions/%F0%9F%8E%89")).await.expect(StatusCode::OK);
    let head = api.head().await;
    api.post(ch, owner, "the head moves on").await;
    // The same route and parameters, spelled differently: the same scope, the first answer.
    let upper = format!("/v1/channels/{}/messages/{}/reactions/🎉", ch.to_string().to_uppercase(), message);
    assert_eq!(react(upper).await.expect(StatusCode::OK).body, first.body);
    // Another emoji is another scope: a new command, not a reuse of the key.
    let other = react(format!("/v1/channels/{ch}/messages/{message}/reactions/tada")).await.expect(StatusCode::OK);
    assert!(other.position() > head);
}

macro_rules! against_both_stores {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(Api::new(contract::fresh_sqlite().await, RateLimit::default())).await;
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(store) = contract::fresh_postgres().await else { return };
                    super::$case(Api::new(store, RateLimit::default())).await;
                }
            )*
        }
    };
}

against_both_stores!(
    a_conversation_goes_through_every_command,
    bad_requests_get_problems_naming_the_field_and_append_nothing,
    an_idempotency_key_returns_the_first_answer_for_the_same_body_only,
    if_match_makes_a_command_conditional_on_the_version,
    concurrent_posts_and_renames_to_one_name_are_all_decided_once,
    the_service_documents_itself_and_reports_health,
    an_idempotency_key_is_scoped_by_route_and_decoded_parameters,
);

#[tokio::test]
async fn a_user_over_the_rate_limit_gets_429_with_retry_after() {
    let api = Api::new(contract::fresh_sqlite().await, RateLimit { per_second: 1, burst: 2 });
    let user = Uuid::now_v7();
    for _ in 0..2 {
        api.call(Method::PUT, "/v1/users/me", Some(user))
            .json(json!({"display_name": "Quick"}))
            .send()
            .await
            .expect(StatusCode::OK);
    }
    let limited = api.call(Method::PUT, "/v1/users/me", Some(user)).json(json!({"display_name": "Quick"})).send().await;
    let limited = limited.problem(StatusCode::TOO_MANY_REQUESTS, None);
    assert!(limited.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    api.call(Method::PUT, "/v1/users/me", Some(Uuid::now_v7()))
        .json(json!({"display_name": "Other"}))
        .send()
        .await
        .expect(StatusCode::OK);
}

#[tokio::test]
async fn a_store_that_is_down_answers_503_with_retry_after_and_readyz_says_so() {
    let unreachable = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(2))
        .connect_lazy("postgres://quikapp@127.0.0.1:1/nowhere")
        .unwrap();
    let api = Api::new(
        Arc::new(quikapp_commands::store::PostgresStore::new(unreachable, Default::default())),
        RateLimit::default(),
    );
    let answer =
        api.call(Method::POST, "/v1/workspaces", Some(Uuid::now_v7())).json(json!({"name": "Acme"})).send().await;
    let answer = answer.problem(StatusCode::SERVICE_UNAVAILABLE, None);
    assert!(answer.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    api.call(Method::GET, "/readyz", None).send().await.expect(StatusCode::SERVICE_UNAVAILABLE);
    api.call(Method::GET, "/healthz", None).send().await.expect(StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_panics_answer_problems() {
    let api = Api::new(contract::fresh_sqlite().await, RateLimit::default());
    api.call(Method::GET, "/v1/nothing-here", Some(Uuid::now_v7())).send().await.problem(StatusCode::NOT_FOUND, None);
    api.call(Method::GET, "/v1/workspaces", Some(Uuid::now_v7()))
        .send()
        .await
        .problem(StatusCode::METHOD_NOT_ALLOWED, None);

    let panicking = axum::Router::new().route(
        "/boom",
        axum::routing::get(|| async {
            if std::hint::black_box(true) {
                panic!("a bug");
            }
            "unreachable"
        }),
    );
    let panicking = quikapp_write_api::with_common_layers(
        panicking,
        std::time::Duration::from_secs(5),
        quikapp_write_api::problem::ApiError::OutcomeUnknown,
    );
    let request = Request::builder().uri("/boom").body(Body::empty()).unwrap();
    let response = panicking.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn tokens_are_checked_by_signature_and_expiry_only() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let api = Api::new(contract::fresh_sqlite().await, RateLimit::default());
    let user = Uuid::now_v7();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let sign =
        |claims: Value| encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
    let profile = |authorization: String| {
        api.call(Method::PUT, "/v1/users/me", None)
            .header("authorization", &authorization)
            .json(json!({"display_name": "Quick"}))
            .send()
    };
    let with_audience = sign(json!({"sub": user, "exp": now + 60, "iat": now, "aud": "quikapp-clients"}));
    profile(format!("Bearer {with_audience}")).await.expect(StatusCode::OK);
    let without_iat = sign(json!({"sub": user, "exp": now + 60}));
    profile(format!("bearer {without_iat}")).await.expect(StatusCode::OK);
    profile(format!("BEARER {without_iat}")).await.expect(StatusCode::OK);
    let expired = sign(json!({"sub": user, "exp": now - 3600}));
    profile(format!("Bearer {expired}")).await.problem(StatusCode::UNAUTHORIZED, None);
    profile(format!("Basic {without_iat}")).await.problem(StatusCode::UNAUTHORIZED, None);
    assert!(Tokens::new("").is_err() && Tokens::new(&"x".repeat(31)).is_err() && Tokens::new(&"x".repeat(32)).is_ok());
}

#[tokio::test]
async fn a_request_the_store_cannot_answer_in_time_gets_503_outcome_unknown_not_a_hang() {
    let path = contract::scratch_dir().join("events.db");
    let patient = quikapp_commands::store::StoreOptions {
        lock_timeout: std::time::Duration::from_secs(60),
        commit_timeout: std::time::Duration::from_secs(60),
        ..Default::default()
    };
    let store = contract::open_sqlite(&path, patient).await;
    let limits = Limits { request_timeout: std::time::Duration::from_millis(300), ..Limits::default() };
    let api = Api::with_limits(store, limits);
    let other = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    let stalled = other.begin_with("BEGIN IMMEDIATE").await.unwrap();

    let create = api.call(Method::POST, "/v1/workspaces", Some(Uuid::now_v7())).json(json!({"name": "Acme"})).send();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(30), create).await.expect("answered, not hung");
    let answer = answer.problem(StatusCode::SERVICE_UNAVAILABLE, None);
    assert!(answer.headers.contains_key("retry-after"));
    // The command was taken into a batch that may still commit: the client is told so.
    assert_eq!(answer.body["type"], "urn:quikapp:problem:outcome-unknown");
    drop(stalled);
}

#[tokio::test]
async fn the_longest_text_fits_even_written_as_json_escapes() {
    let api = Api::new(contract::fresh_sqlite().await, RateLimit::default());
    let owner = Uuid::now_v7();
    let (_, ch) = api.workspace_with_channel(owner, &[]).await;
    // 40,000 astral characters as JSON writes them by default in many languages: 12 bytes each.
    let escaped = format!("{{\"text\": \"{}\"}}", "\\ud83c\\udf89".repeat(40_000));
    assert!(escaped.len() > 450 * 1024);
    let path = format!("/v1/channels/{ch}/messages");
    api.call(Method::POST, &path, Some(owner))
        .raw("application/json", escaped)
        .send()
        .await
        .expect(StatusCode::CREATED);
}
