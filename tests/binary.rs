//! The real `quikapp` binary, on port 0, through its public HTTP API only: the README's
//! walk-through on the embedded default, and the rules every role starts by.

#[path = "e2e/pipeline.rs"]
mod pipeline;
#[path = "e2e/realtime.rs"]
mod realtime;
#[path = "e2e/replay.rs"]
mod replay;
mod support;

use serde_json::{Value, json};
use support::{Running, quikapp, scratch_dir};
use uuid::Uuid;

fn token(data_dir: &std::path::Path, user: Uuid) -> String {
    let output = quikapp(&["token", &user.to_string()]).env("QUIKAPP_DATA_DIR", data_dir).output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = client.request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

fn dev(data_dir: &std::path::Path) -> Running {
    let mut command = quikapp(&["dev"]);
    command
        .env("QUIKAPP_DATA_DIR", data_dir)
        .env("QUIKAPP_WRITE_ADDR", "127.0.0.1:0")
        .env("QUIKAPP_READ_ADDR", "127.0.0.1:0")
        .env("QUIKAPP_REALTIME_ADDR", "127.0.0.1:0")
        .env("QUIKAPP_MIN_POSITION_WAIT_SECONDS", "60")
        .env("QUIKAPP_REQUEST_TIMEOUT_SECONDS", "90");
    Running::start_all(command, &["write API", "read API", "realtime gateway"])
}

#[tokio::test]
async fn dev_runs_the_readme_walk_through_on_the_embedded_default_and_keeps_its_data() {
    let data_dir = scratch_dir();
    let server = dev(&data_dir);
    let (alice, client) = (Uuid::now_v7(), reqwest::Client::new());
    let alice_token = token(&data_dir, alice);
    let base = server.url.clone();
    use reqwest::Method;

    let (status, workspace) =
        send(&client, Method::POST, format!("{base}/v1/workspaces"), &alice_token, Some(json!({"name": "Acme"}))).await;
    assert_eq!(status, 201, "{workspace}");
    let ws = workspace["workspace_id"].as_str().unwrap();
    let (status, channel) = send(
        &client,
        Method::POST,
        format!("{base}/v1/workspaces/{ws}/channels"),
        &alice_token,
        Some(json!({"name": "general"})),
    )
    .await;
    assert_eq!(status, 201, "{channel}");
    let ch = channel["channel_id"].as_str().unwrap().to_owned();
    let (status, message) = send(
        &client,
        Method::POST,
        format!("{base}/v1/channels/{ch}/messages"),
        &alice_token,
        Some(json!({"text": "hello, world"})),
    )
    .await;
    assert_eq!(status, 201, "{message}");
    // WorkspaceCreated, ChannelCreated, ChannelMemberJoined, then this MessagePosted.
    assert_eq!(message["position"], "4");
    assert_eq!(client.get(format!("{base}/readyz")).send().await.unwrap().status(), 200);

    // The read API of the same process answers once its models have the message.
    let read = &server.urls["read API"];
    let stats = client
        .get(format!("{read}/v1/channels/{ch}/stats"))
        .bearer_auth(&alice_token)
        .header("x-min-position", "4")
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), 200);
    let stats: Value = stats.json().await.unwrap();
    assert_eq!(
        (stats["message_count"].clone(), stats["last_message"]["preview"].clone()),
        (json!(1), json!("hello, world"))
    );
    // The timeline and search, from the embedded default's in-memory timelines and FTS5.
    let get =
        |path: String| client.get(format!("{read}/v1{path}")).bearer_auth(&alice_token).header("x-min-position", "4");
    let page: Value = get(format!("/channels/{ch}/messages")).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["messages"][0]["text"], "hello, world", "{page}");
    let found: Value = get(format!("/workspaces/{ws}/search?q=World")).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (found["total"].clone(), found["hits"][0]["highlight"].clone()),
        (json!(1), json!("hello, <em>world</em>"))
    );
    assert_eq!(client.get(format!("{read}/readyz")).send().await.unwrap().status(), 200);

    assert!(server.stop().success(), "dev stops cleanly on SIGTERM");
    assert!(data_dir.join("events.db").exists(), "the embedded store lives under QUIKAPP_DATA_DIR");

    // The channel survives a restart: posting into it works again.
    let server = dev(&data_dir);
    let (status, again) = send(
        &client,
        Method::POST,
        format!("{}/v1/channels/{ch}/messages", server.url),
        &alice_token,
        Some(json!({"text": "still here"})),
    )
    .await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["position"], "5", "the store continued where it stopped");
}

/// A secret as long as HS256 asks for.
const SECRET: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn a_jwt_secret_shorter_than_32_bytes_is_refused_at_start() {
    for role in [&["write-api"][..], &["dev"], &["token", "0190a000-0000-7000-8000-000000000001"]] {
        let output = quikapp(role)
            .env("QUIKAPP_JWT_SECRET", "s3cret")
            .env("QUIKAPP_DATA_DIR", scratch_dir())
            .env("QUIKAPP_WRITE_ADDR", "127.0.0.1:0")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{role:?} started with a short secret");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("at least 32 bytes"), "{role:?}: {stderr}");
    }
}

#[test]
fn every_role_but_dev_refuses_to_start_without_a_jwt_secret() {
    let output = quikapp(&["write-api"])
        .env("QUIKAPP_DATA_DIR", scratch_dir())
        .env("QUIKAPP_WRITE_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("QUIKAPP_JWT_SECRET"));
}

#[test]
fn an_unknown_config_key_stops_the_binary_with_its_name() {
    let dir = scratch_dir();
    std::fs::write(dir.join("bad.toml"), "wirte_addr = \"127.0.0.1:1\"\n").unwrap();
    let output = quikapp(&["--config", dir.join("bad.toml").to_str().unwrap(), "migrate"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("wirte_addr"));
}

#[tokio::test]
async fn the_write_api_role_serves_on_postgres_after_migrate() {
    let Some(url) = support::fresh_postgres_database().await else {
        return;
    };
    let migrate = quikapp(&["migrate"]).env("QUIKAPP_POSTGRES_URL", &url).output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));

    let mut command = quikapp(&["write-api"]);
    command
        .env("QUIKAPP_POSTGRES_URL", &url)
        .env("QUIKAPP_JWT_SECRET", SECRET)
        .env("QUIKAPP_WRITE_ADDR", "127.0.0.1:0");
    let server = Running::start(command, "write API");
    let client = reqwest::Client::new();
    assert_eq!(client.get(format!("{}/readyz", server.url)).send().await.unwrap().status(), 200);
    let token = quikapp(&["token", &Uuid::now_v7().to_string()]).env("QUIKAPP_JWT_SECRET", SECRET).output().unwrap();
    let token = String::from_utf8(token.stdout).unwrap();
    let (status, body) = send(
        &client,
        reqwest::Method::POST,
        format!("{}/v1/workspaces", server.url),
        token.trim(),
        Some(json!({"name": "On Postgres"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM events WHERE event_type = 'WorkspaceCreated'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

/// Clients generated from /openapi.json and contract fuzzers must agree with the server: a
/// schemathesis run (every check, a bounded number of cases per operation) against each API of
/// `quikapp dev` finds no failure. `tests/fuzz/schemathesis` installs it in a cached venv from PyPI.
#[test]
fn the_served_openapi_document_holds_up_to_contract_fuzzing() {
    let data_dir = scratch_dir();
    let server = dev(&data_dir);
    let token = token(&data_dir, Uuid::now_v7());
    let script = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/fuzz/schemathesis");
    for api in ["write API", "read API"] {
        let url = &server.urls[api];
        let output = std::process::Command::new(&script).args([url, &token]).output().expect("run schemathesis");
        let report = String::from_utf8_lossy(&output.stdout);
        let errors = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "schemathesis failed on the {api}:\n{report}\n{errors}");
        assert!(report.contains(" passed"), "schemathesis ran no case on the {api}:\n{report}");
    }
}

/// A PostgreSQL event store with a backlog of 10,000 events in 20 channels, fresh topics, and
/// `quikapp relay` processes over them.
struct RelayFixture {
    url: String,
    brokers: String,
    topics: quikapp_bus::Topics,
    store: std::sync::Arc<quikapp_commands::store::PostgresStore>,
    head: u64,
}

/// Events per relay batch in these tests: small, so that a backlog takes many batches.
const RELAY_BATCH: u64 = 100;

impl RelayFixture {
    async fn new() -> Option<Self> {
        use quikapp_commands::store::EventStore;
        use quikapp_commands::store::contract::{append_to, open_postgres};
        let url = support::fresh_postgres_database().await?;
        let brokers = support::service_url("QUIKAPP_KAFKA_BROKERS")?;
        let store = open_postgres(&url, Default::default()).await;
        for i in 0..20 {
            let channel = Uuid::now_v7();
            let mut request = append_to(&format!("test-{i}"), 0, &["e"; 500]);
            request.events.iter_mut().for_each(|e| e.channel_id = Some(channel));
            store.append(request).await.unwrap();
        }
        let head = store.head().await.unwrap();
        let id = Uuid::now_v7().simple();
        let topics = quikapp_bus::Topics {
            messages: format!("test-{id}-messages"),
            workspaces: format!("test-{id}-workspaces"),
        };
        Some(RelayFixture { url, brokers, topics, store, head })
    }

    fn relay(&self) -> Running {
        let mut command = quikapp(&["relay"]);
        command
            .env("QUIKAPP_POSTGRES_URL", &self.url)
            .env("QUIKAPP_KAFKA_BROKERS", &self.brokers)
            .env("QUIKAPP_KAFKA_MESSAGES_TOPIC", &self.topics.messages)
            .env("QUIKAPP_KAFKA_WORKSPACES_TOPIC", &self.topics.workspaces)
            .env("QUIKAPP_KAFKA_PARTITIONS", "3")
            .env("QUIKAPP_RELAY_BATCH_SIZE", RELAY_BATCH.to_string())
            .env("QUIKAPP_RELAY_ADDR", "127.0.0.1:0");
        Running::start(command, "relay")
    }

    async fn checkpoint(&self) -> u64 {
        quikapp_bus::relay::checkpoint(self.store.pool(), "kafka").await.unwrap()
    }

    async fn reaches(&self, position: u64) {
        quikapp_bus::testing::checkpoint_reaches(self.store.pool(), position).await;
    }

    /// Reads the topics back and checks them against the store: every event, watermarks behind
    /// their events, first occurrences in stream order, and duplicates only after `crash_at`
    /// and no more than the batches in flight.
    async fn check(&self, crash_at: u64) {
        use quikapp_commands::store::EventStore;
        let read = quikapp_bus::testing::read_until(&self.brokers, &self.topics, 3, self.head).await;
        read.assert_watermarks_follow_their_events();
        let stored: std::collections::HashSet<String> =
            self.store.read_all(0, 100_000).await.unwrap().iter().map(|e| e.event_id.to_string()).collect();
        let mut seen = std::collections::HashSet::new();
        let mut versions = std::collections::HashMap::new();
        let mut duplicates = 0;
        for (.., event) in &read.events {
            if !seen.insert(event["event_id"].as_str().unwrap().to_owned()) {
                duplicates += 1;
                assert!(
                    event["global_position"].as_u64().unwrap() > crash_at,
                    "a duplicate from before the checkpoint"
                );
                continue;
            }
            let version = event["stream_version"].as_u64().unwrap();
            let previous = versions.insert(event["stream_id"].as_str().unwrap().to_owned(), version);
            assert_eq!(previous.unwrap_or(0) + 1, version, "each stream in order");
        }
        assert_eq!(seen, stored, "every stored event is on Kafka");
        let in_flight = RELAY_BATCH * quikapp_bus::relay::IN_FLIGHT as u64;
        assert!(duplicates <= in_flight, "{duplicates} duplicates: more than the batches in flight");
    }
}

/// `quikapp relay` killed with SIGKILL in the middle of a backlog, then started again: every
/// stored event is on Kafka, and the only duplicates are of the batches that were in flight.
#[tokio::test]
async fn a_relay_killed_mid_backlog_resumes_and_loses_nothing() {
    let Some(fixture) = RelayFixture::new().await else { return };
    let first = fixture.relay();
    fixture.reaches(1).await;
    drop(first); // SIGKILL
    let killed_at = fixture.checkpoint().await;
    assert!(killed_at < fixture.head, "killed mid-backlog (at {killed_at} of {})", fixture.head);
    let _second = fixture.relay();
    fixture.reaches(fixture.head).await;
    fixture.check(killed_at).await;
}

/// Two `quikapp relay` processes: one publishes, the other stands by; SIGKILL the active one
/// mid-backlog and the other takes over, with nothing lost and every stream still in order.
#[tokio::test]
async fn a_standby_relay_process_takes_over_when_the_active_one_is_killed() {
    let Some(fixture) = RelayFixture::new().await else { return };
    let relays = [fixture.relay(), fixture.relay()];
    fixture.reaches(1).await;
    let client = reqwest::Client::new();
    let active = |relay: &Running| {
        let request = client.get(format!("{}/metrics", relay.url)).send();
        async move { request.await.unwrap().text().await.unwrap().contains("quikapp_relay_active 1") }
    };
    // Under a loaded machine the active one may step down and lead again: wait (bounded) for
    // a moment when exactly one leads.
    let one_leads = async {
        loop {
            let (first, second) = (active(&relays[0]).await, active(&relays[1]).await);
            if first ^ second {
                return first;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let Some(first) = support::deadline(std::time::Duration::from_secs(30), one_leads).await else {
        let metrics = |relay: &Running| {
            let request = client.get(format!("{}/metrics", relay.url)).send();
            async move { request.await.unwrap().text().await.unwrap() }
        };
        let text = (metrics(&relays[0]).await, metrics(&relays[1]).await);
        panic!("exactly one relay is active: {text:?}");
    };
    let [a, b] = relays;
    let (active, standby) = if first { (a, b) } else { (b, a) };
    drop(active); // SIGKILL
    let killed_at = fixture.checkpoint().await;
    assert!(killed_at < fixture.head, "killed mid-backlog (at {killed_at} of {})", fixture.head);
    fixture.reaches(fixture.head).await;
    drop(standby);
    fixture.check(killed_at).await;
}

#[tokio::test]
async fn replay_rebuilds_the_embedded_models_from_the_data_dir_and_refuses_bad_arguments_in_one_line() {
    let data_dir = scratch_dir();
    let server = dev(&data_dir);
    let (alice, client) = (Uuid::now_v7(), reqwest::Client::new());
    let alice_token = token(&data_dir, alice);
    let body = Some(json!({"name": "Acme"}));
    let (status, _) =
        send(&client, reqwest::Method::POST, format!("{}/v1/workspaces", server.url), &alice_token, body).await;
    assert_eq!(status, 201);
    drop(server);

    let replay =
        |args: &[&str]| quikapp(&[&["replay"], args].concat()).env("QUIKAPP_DATA_DIR", &data_dir).output().unwrap();
    let output = replay(&["all", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: Value = serde_json::from_slice(output.stdout.trim_ascii()).unwrap();
    let models = summary["models"].as_array().unwrap();
    assert_eq!(models.len(), 4);
    for model in models {
        assert_eq!(model["events"], 1, "{model}"); // the workspace's creation
        assert_eq!(model["through"], 1, "{model}");
        assert_eq!(model["swapped"], false);
    }

    let unknown = replay(&["mysql"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("invalid value 'mysql'"));
    let no_kafka = replay(&["all", "--source", "kafka"]);
    assert_eq!(no_kafka.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&no_kafka.stderr), "error: --source kafka needs QUIKAPP_KAFKA_BROKERS\n");
    let down = quikapp(&["replay", "postgres"])
        .env("QUIKAPP_POSTGRES_URL", "postgres://quikapp@127.0.0.1:1/quikapp")
        .env("QUIKAPP_KAFKA_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.trim_end().lines().count() == 1 && stderr.contains("PostgreSQL"),
        "{stderr}"
    );
}
