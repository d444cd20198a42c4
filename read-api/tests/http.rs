//! The query API through HTTP, without a socket, on the embedded default: commands through the
//! write API, the embedded bus and projectors, reads through the read API with X-Min-Position.
//! The same answers from the real stores are checked end to end by the binary's tests.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use quikapp_bus::Topics;
use quikapp_bus::embedded::EmbeddedBus;
use quikapp_commands::CommandService;
use quikapp_commands::store::contract::fresh_sqlite;
use quikapp_projections::Projector;
use quikapp_projections::counters::memory::MemoryKeyspace;
use quikapp_projections::counters::{Counters, Keys};
use quikapp_projections::directory::memory::MemoryDirectory;
use quikapp_projections::runtime::{Runtime, RuntimeConfig};
use quikapp_projections::search::sqlite::SqliteSearch;
use quikapp_projections::timelines::memory::MemoryTimelines;
use quikapp_read_api::{Models, ReadApi, ReadConfig};
use quikapp_write_api::auth::Tokens;
use quikapp_write_api::{Limits, WriteApi};
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

const PARTITIONS: i32 = 12;

struct App {
    write: Router,
    read: Router,
    tokens: Tokens,
    _runtimes: Vec<tokio::task::JoinHandle<()>>,
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Answer {
    #[track_caller]
    fn ok(self) -> Value {
        assert!(self.status.is_success(), "{}: {}", self.status, self.body);
        self.body
    }

    #[track_caller]
    fn problem(self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.headers["content-type"], "application/problem+json");
        self.body
    }
}

async fn app(min_position_wait: Duration) -> App {
    let store = fresh_sqlite().await;
    let bus = Arc::new(EmbeddedBus::new(store.clone(), Topics::default(), PARTITIONS));
    let directory = Arc::new(MemoryDirectory::new());
    let counters = Counters::new(Arc::new(MemoryKeyspace::new()), Keys::default());
    let timelines = Arc::new(MemoryTimelines::new());
    let search = Arc::new(SqliteSearch::in_memory().await.unwrap());
    let projectors: Vec<Arc<dyn Projector>> =
        vec![directory.clone(), Arc::new(counters.clone()), timelines.clone(), search.clone()];
    let runtimes = projectors
        .iter()
        .map(|projector| {
            let runtime = Runtime { projector: projector.clone(), bus: bus.clone(), config: RuntimeConfig::default() };
            tokio::spawn(runtime.run(std::future::pending()))
        })
        .collect();
    let tokens = Tokens::new("a test secret that is long enough for HS256").unwrap();
    let write =
        quikapp_write_api::router(WriteApi::new(CommandService::new(store.clone()), tokens.clone(), Limits::default()));
    let config = ReadConfig {
        partitions: Topics::default().partitions(PARTITIONS),
        min_position_wait,
        request_timeout: Duration::from_secs(30),
    };
    let models = Models {
        directory,
        counters,
        timelines,
        search,
        presence: Arc::new(quikapp_realtime::presence::MemoryPresence::new(None)),
        projectors,
    };
    let read = quikapp_read_api::router(ReadApi::new(models, store, tokens.clone(), config));
    App { write, read, tokens, _runtimes: runtimes }
}

impl App {
    async fn call(
        &self,
        router: &Router,
        method: Method,
        path: &str,
        user: Option<Uuid>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(user) = user {
            request = request.header("authorization", format!("Bearer {}", self.tokens.mint(user)));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let response = router.clone().oneshot(request.body(body).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        Answer { status: parts.status, headers: parts.headers, body }
    }

    /// A command; answers its body.
    async fn command(&self, user: Uuid, method: Method, path: &str, body: Option<Value>) -> Value {
        self.call(&self.write, method, &format!("/v1{path}"), Some(user), body, &[]).await.ok()
    }

    /// A channel of `ws` created by `user` with `body` (name, topic, private); answers its id.
    async fn create_channel(&self, user: Uuid, ws: &str, body: Value) -> String {
        id(&self.command(user, Method::POST, &format!("/workspaces/{ws}/channels"), Some(body)).await, "channel_id")
    }

    /// A query that waits for `position`.
    async fn query(&self, user: Uuid, path: &str, position: &str) -> Answer {
        self.call(&self.read, Method::GET, &format!("/v1{path}"), Some(user), None, &[("x-min-position", position)])
            .await
    }
}

fn id(body: &Value, name: &str) -> String {
    body[name].as_str().unwrap_or_else(|| panic!("no {name} in {body}")).to_owned()
}

#[tokio::test]
async fn a_client_reads_back_what_it_wrote_and_only_what_it_may_see() {
    let app = app(Duration::from_secs(10)).await;
    let (ada, bob, eve) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    app.command(ada, Method::PUT, "/users/me", Some(json!({ "display_name": "Ada" }))).await;
    app.command(bob, Method::PUT, "/users/me", Some(json!({ "display_name": "Bob" }))).await;
    let ws = id(&app.command(ada, Method::POST, "/workspaces", Some(json!({ "name": "acme" }))).await, "workspace_id");
    app.command(
        ada,
        Method::POST,
        &format!("/workspaces/{ws}/members"),
        Some(json!({ "user_id": bob, "role": "member" })),
    )
    .await;
    let general = app.create_channel(ada, &ws, json!({ "name": "general", "topic": "all" })).await;
    let secret = app.create_channel(ada, &ws, json!({ "name": "secret", "private": true })).await;
    app.command(bob, Method::POST, &format!("/channels/{general}/members"), Some(json!({ "user_id": bob }))).await;
    let mut ada_messages = Vec::new();
    for text in ["one", "two", "three"] {
        ada_messages.push(id(
            &app.command(ada, Method::POST, &format!("/channels/{general}/messages"), Some(json!({ "text": text })))
                .await,
            "message_id",
        ));
    }
    app.command(bob, Method::POST, &format!("/channels/{general}/messages"), Some(json!({ "text": "mine" }))).await;
    app.command(
        bob,
        Method::POST,
        &format!("/channels/{general}/messages"),
        Some(json!({ "text": "a reply", "thread_root_id": ada_messages[0] })),
    )
    .await;
    app.command(
        ada,
        Method::PATCH,
        &format!("/channels/{general}/messages/{}", ada_messages[2]),
        Some(json!({ "text": "three, edited" })),
    )
    .await;
    app.command(ada, Method::DELETE, &format!("/channels/{general}/messages/{}", ada_messages[1]), None).await;
    app.command(ada, Method::POST, &format!("/channels/{secret}/messages"), Some(json!({ "text": "psst" }))).await;
    let last = app
        .command(
            bob,
            Method::POST,
            &format!("/channels/{general}/read"),
            Some(json!({ "message_id": ada_messages[0] })),
        )
        .await;
    let at = last["position"].as_str().unwrap().to_owned();

    let workspace = app.query(bob, &format!("/workspaces/{ws}"), &at).await.ok();
    assert_eq!(
        workspace,
        json!({ "workspace_id": ws, "name": "acme", "owner_id": ada, "member_count": 2, "version": 2 })
    );
    let names =
        |body: Value| body["channels"].as_array().unwrap().iter().map(|c| c["name"].clone()).collect::<Vec<_>>();
    assert_eq!(
        names(app.query(ada, &format!("/workspaces/{ws}/channels"), &at).await.ok()),
        [json!("general"), json!("secret")]
    );
    assert_eq!(names(app.query(bob, &format!("/workspaces/{ws}/channels"), &at).await.ok()), [json!("general")]);
    let channel = app.query(bob, &format!("/channels/{general}"), &at).await.ok();
    assert_eq!(
        (channel["topic"].clone(), channel["member_count"].clone(), channel["private"].clone()),
        (json!("all"), json!(2), json!(false))
    );
    let members = app.query(bob, &format!("/channels/{general}/members"), &at).await.ok();
    let members: Vec<_> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["user_id"].clone(), m["display_name"].clone()))
        .collect();
    assert_eq!(members, [(json!(ada), json!("Ada")), (json!(bob), json!("Bob"))]);

    // Stats count messages and replies not deleted, the last by position (an edit does not move
    // it); unread counts top-level messages by others after the read mark.
    let stats = app.query(bob, &format!("/channels/{general}/stats"), &at).await.ok();
    assert_eq!(stats["message_count"], 4, "{stats}");
    assert_eq!(stats["last_message"]["preview"], "a reply");
    assert!(stats["last_message_at"].as_str().unwrap().ends_with('Z'));
    let unread = app.query(bob, "/users/me/unread", &at).await.ok();
    assert_eq!(
        unread,
        json!({ "channels": [{ "channel_id": general, "unread": 1 }] }),
        "three, edited: after the mark"
    );
    let mut expected =
        vec![json!({ "channel_id": general, "unread": 1 }), json!({ "channel_id": secret, "unread": 0 })];
    expected.sort_by_key(|c| c["channel_id"].as_str().unwrap().to_owned());
    assert_eq!(app.query(ada, "/users/me/unread", &at).await.ok(), json!({ "channels": expected }), "Bob's message");

    // Invisible is 404: a private channel to a non-member, a workspace to an outsider.
    for path in
        [format!("/channels/{secret}"), format!("/channels/{secret}/members"), format!("/channels/{secret}/stats")]
    {
        app.query(bob, &path, &at).await.problem(StatusCode::NOT_FOUND);
    }
    for path in [format!("/workspaces/{ws}"), format!("/workspaces/{ws}/channels"), format!("/channels/{general}")] {
        app.query(eve, &path, &at).await.problem(StatusCode::NOT_FOUND);
    }
    app.query(bob, "/channels/not-a-uuid", &at).await.problem(StatusCode::NOT_FOUND);
    let anonymous = app.call(&app.read, Method::GET, &format!("/v1/workspaces/{ws}"), None, None, &[]).await;
    anonymous.problem(StatusCode::UNAUTHORIZED);

    let projections = app.query(bob, "/projections", &at).await.ok();
    let names: Vec<_> = projections["projections"].as_array().unwrap().iter().map(|p| p["name"].clone()).collect();
    assert_eq!(names, [json!("mongo"), json!("postgres"), json!("redis"), json!("search")]);
    for projection in projections["projections"].as_array().unwrap() {
        let position: u64 = projection["position"].as_str().unwrap().parse().unwrap();
        assert!(position >= at.parse().unwrap(), "{projection}");
        assert_eq!(
            (projection["lag_events"].clone(), projection["state"].clone(), projection["dead_lettered"].clone()),
            (json!(0), json!("running"), json!(0))
        );
    }
}

#[tokio::test]
async fn a_position_not_reached_in_time_is_503_with_retry_after() {
    let app = app(Duration::from_millis(300)).await;
    let ada = Uuid::now_v7();
    let ws = id(&app.command(ada, Method::POST, "/workspaces", Some(json!({ "name": "acme" }))).await, "workspace_id");
    let answer = app.query(ada, &format!("/workspaces/{ws}"), "1000000000").await;
    assert_eq!(answer.headers["retry-after"], "1");
    let problem = answer.problem(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem["type"], "urn:quikapp:problem:position-not-reached");
    // The query parameter works as the header does.
    let path = format!("/v1/workspaces/{ws}?min_position=1000000000");
    app.call(&app.read, Method::GET, &path, Some(ada), None, &[]).await.problem(StatusCode::SERVICE_UNAVAILABLE);
    let path = format!("/v1/workspaces/{ws}?min_position=1");
    app.call(&app.read, Method::GET, &path, Some(ada), None, &[]).await.ok();
}

#[tokio::test]
async fn a_malformed_position_is_422_naming_where_it_came_from() {
    let app = app(Duration::from_secs(1)).await;
    let user = Uuid::now_v7();
    let problem = app.query(user, "/users/me/unread", "soon").await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["errors"][0]["field"], "X-Min-Position");
    let answer = app.call(&app.read, Method::GET, "/v1/users/me/unread?min_position=-1", Some(user), None, &[]).await;
    assert_eq!(answer.problem(StatusCode::UNPROCESSABLE_ENTITY)["errors"][0]["field"], "min_position");
}

#[tokio::test]
async fn the_openapi_document_lists_every_query() {
    let app = app(Duration::from_secs(1)).await;
    let document = app.call(&app.read, Method::GET, "/openapi.json", None, None, &[]).await.ok();
    let mut paths: Vec<&String> = document["paths"].as_object().unwrap().keys().collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/v1/channels/{channel_id}",
            "/v1/channels/{channel_id}/members",
            "/v1/channels/{channel_id}/messages",
            "/v1/channels/{channel_id}/messages/{message_id}",
            "/v1/channels/{channel_id}/messages/{message_id}/replies",
            "/v1/channels/{channel_id}/stats",
            "/v1/projections",
            "/v1/users/me/unread",
            "/v1/workspaces/{workspace_id}",
            "/v1/workspaces/{workspace_id}/channels",
            "/v1/workspaces/{workspace_id}/presence",
            "/v1/workspaces/{workspace_id}/search",
        ]
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(app.call(&app.read, Method::GET, path, None, None, &[]).await.status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn timelines_page_newest_first_across_cursors_with_threads_reactions_edits_and_deletions() {
    let app = app(Duration::from_secs(10)).await;
    let (ada, bob, eve) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let ws = id(&app.command(ada, Method::POST, "/workspaces", Some(json!({ "name": "acme" }))).await, "workspace_id");
    app.command(
        ada,
        Method::POST,
        &format!("/workspaces/{ws}/members"),
        Some(json!({ "user_id": bob, "role": "member" })),
    )
    .await;
    let general = app.create_channel(ada, &ws, json!({ "name": "general" })).await;
    let secret = app.create_channel(ada, &ws, json!({ "name": "secret", "private": true })).await;
    app.command(bob, Method::POST, &format!("/channels/{general}/members"), Some(json!({ "user_id": bob }))).await;
    let mut posted = Vec::new();
    for i in 0..7 {
        let body = json!({ "text": format!("message {i}") });
        posted.push(id(
            &app.command(ada, Method::POST, &format!("/channels/{general}/messages"), Some(body)).await,
            "message_id",
        ));
    }
    let root = posted[0].clone();
    for text in ["first reply", "second reply"] {
        let body = json!({ "text": text, "thread_root_id": root });
        app.command(bob, Method::POST, &format!("/channels/{general}/messages"), Some(body)).await;
    }
    let message = |m: &str| format!("/channels/{general}/messages/{m}");
    app.command(bob, Method::PUT, &format!("{}/reactions/tada", message(&root)), None).await;
    app.command(ada, Method::PUT, &format!("{}/reactions/tada", message(&root)), None).await;
    app.command(ada, Method::PATCH, &message(&posted[6]), Some(json!({ "text": "message 6, edited" }))).await;
    app.command(ada, Method::DELETE, &message(&posted[3]), None).await;
    let secret_message = id(
        &app.command(ada, Method::POST, &format!("/channels/{secret}/messages"), Some(json!({ "text": "psst" }))).await,
        "message_id",
    );
    let last = app.command(ada, Method::DELETE, &format!("{}/reactions/tada", message(&root)), None).await;
    let at = last["position"].as_str().unwrap().to_owned();

    // Pages of 2, newest first, top-level only, the deleted one absent, across the cursors.
    let mut texts = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(before) => format!("/channels/{general}/messages?limit=2&before={before}"),
            None => format!("/channels/{general}/messages?limit=2"),
        };
        let page = app.query(bob, &path, &at).await.ok();
        let messages = page["messages"].as_array().unwrap();
        assert!(messages.len() <= 2 && !messages.is_empty(), "{page}");
        texts.extend(messages.iter().map(|m| m["text"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(texts, ["message 6, edited", "message 5", "message 4", "message 2", "message 1", "message 0"]);
    let default_page = app.query(bob, &format!("/channels/{general}/messages"), &at).await.ok();
    assert_eq!(
        (default_page["messages"].as_array().unwrap().len(), default_page["next_cursor"].clone()),
        (6, Value::Null)
    );

    let root_view = app.query(bob, &message(&root), &at).await.ok();
    assert_eq!(root_view["reply_count"], 2);
    assert_eq!(root_view["reactions"], json!({ "tada": [bob] }), "Ada's reaction was removed");
    assert_eq!(root_view["edited_at"], Value::Null);
    let edited = app.query(bob, &message(&posted[6]), &at).await.ok();
    assert!(edited["edited_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(edited["version"], 2);
    let thread = app.query(bob, &format!("{}/replies", message(&root)), &at).await.ok();
    let replies: Vec<_> = thread["replies"].as_array().unwrap().iter().map(|r| r["text"].clone()).collect();
    assert_eq!(replies, [json!("first reply"), json!("second reply")]);

    // Gone, elsewhere or invisible is 404; a page size out of range or a bad cursor is 422.
    app.query(bob, &message(&posted[3]), &at).await.problem(StatusCode::NOT_FOUND);
    app.query(bob, &format!("/channels/{secret}/messages/{root}"), &at).await.problem(StatusCode::NOT_FOUND);
    app.query(ada, &format!("/channels/{general}/messages/{secret_message}"), &at).await.problem(StatusCode::NOT_FOUND);
    for path in [format!("/channels/{secret}/messages"), format!("/channels/{secret}/messages/{secret_message}")] {
        app.query(bob, &path, &at).await.problem(StatusCode::NOT_FOUND);
    }
    app.query(eve, &format!("/channels/{general}/messages"), &at).await.problem(StatusCode::NOT_FOUND);
    for (query, field) in
        [("limit=0", "limit"), ("limit=201", "limit"), ("limit=ten", "limit"), ("before=soon", "before")]
    {
        let problem = app
            .query(bob, &format!("/channels/{general}/messages?{query}"), &at)
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(problem["errors"][0]["field"], field, "{query}");
    }
}

#[tokio::test]
async fn search_matches_every_word_in_the_channels_the_caller_may_read() {
    let app = app(Duration::from_secs(10)).await;
    let (ada, bob, eve) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let ws = id(&app.command(ada, Method::POST, "/workspaces", Some(json!({ "name": "acme" }))).await, "workspace_id");
    let member = json!({ "user_id": bob, "role": "member" });
    app.command(ada, Method::POST, &format!("/workspaces/{ws}/members"), Some(member)).await;
    let general = app.create_channel(ada, &ws, json!({ "name": "general" })).await;
    let secret = app.create_channel(ada, &ws, json!({ "name": "secret", "private": true })).await;
    app.command(bob, Method::POST, &format!("/channels/{general}/members"), Some(json!({ "user_id": bob }))).await;
    let post = |user: Uuid, channel: String, text: &'static str| {
        let app = &app;
        async move {
            let path = format!("/channels/{channel}/messages");
            id(&app.command(user, Method::POST, &path, Some(json!({ "text": text }))).await, "message_id")
        }
    };
    let deploying = post(ada, general.clone(), "Deploying the new <search> service").await;
    let slow = post(ada, general.clone(), "the search is slow").await;
    post(ada, general.clone(), "Café opening hours").await;
    post(bob, general.clone(), "search results look great").await;
    post(ada, secret.clone(), "secret search plans").await;
    let gone = post(ada, general.clone(), "a search to take back").await;
    let edit = json!({ "text": "the index is fast" });
    app.command(ada, Method::PATCH, &format!("/channels/{general}/messages/{slow}"), Some(edit)).await;
    let last = app.command(ada, Method::DELETE, &format!("/channels/{general}/messages/{gone}"), None).await;
    let at = last["position"].as_str().unwrap().to_owned();
    let ws = ws.as_str();
    let search = |user: Uuid, query: String| {
        let (app, at) = (&app, at.clone());
        async move { app.query(user, &format!("/workspaces/{ws}/search?{query}"), &at).await }
    };
    let texts = |hits: &Value| -> Vec<String> {
        let mut texts: Vec<String> =
            hits["hits"].as_array().unwrap().iter().map(|h| h["text"].as_str().unwrap().to_owned()).collect();
        texts.sort();
        texts
    };

    // Edits reflected, deletions gone, the private channel only for its member.
    let bob_sees = search(bob, "q=search".into()).await.ok();
    assert_eq!(texts(&bob_sees), ["Deploying the new <search> service", "search results look great"]);
    assert_eq!(bob_sees["total"], 2);
    let ada_sees = search(ada, "q=search".into()).await.ok();
    assert_eq!(ada_sees["total"], 3, "{ada_sees}");
    assert!(texts(&ada_sees).contains(&"secret search plans".to_owned()));
    // Every word must match; stems, case and accents aside; highlights escape the text.
    let hit = search(bob, "q=SEARCH%20deploy".into()).await.ok();
    assert_eq!(hit["total"], 1);
    assert_eq!(hit["hits"][0]["message_id"], deploying.as_str());
    assert_eq!(hit["hits"][0]["highlight"], "<em>Deploying</em> the new &lt;<em>search</em>&gt; service");
    assert_eq!(search(bob, "q=search%20fast".into()).await.ok()["total"], 0);
    assert_eq!(search(bob, "q=!!".into()).await.ok(), json!({ "hits": [], "total": 0 }), "no word, no match");
    assert_eq!(texts(&search(bob, "q=index%20fast".into()).await.ok()), ["the index is fast"]);
    let cafe = search(bob, "q=cafe".into()).await.ok();
    assert_eq!(cafe["hits"][0]["highlight"], "<em>Café</em> opening hours");
    // Filters.
    assert_eq!(texts(&search(ada, format!("q=search&author={bob}")).await.ok()), ["search results look great"]);
    assert_eq!(search(ada, format!("q=search&channel={general}")).await.ok()["total"], 2);
    assert_eq!(search(ada, "q=search&limit=1".into()).await.ok()["hits"].as_array().unwrap().len(), 1);
    // Invisible is 404; bad input is 422 naming the field.
    search(bob, format!("q=search&channel={secret}")).await.problem(StatusCode::NOT_FOUND);
    search(eve, "q=search".into()).await.problem(StatusCode::NOT_FOUND);
    for (query, field) in [
        ("", "q"),
        ("q=%20%20", "q"),
        ("q=search&limit=0", "limit"),
        ("q=search&limit=101", "limit"),
        ("q=search&channel=general", "channel"),
        ("q=search&author=bob", "author"),
    ] {
        let problem = search(bob, query.into()).await.problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(problem["errors"][0]["field"], field, "{query}");
    }
}
