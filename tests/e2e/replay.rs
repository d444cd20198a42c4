//! `quikapp replay` as an operator runs it: beside the separate processes of the pipeline, with
//! commands flowing and the read API answering, then compared with what the commands imply.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use super::pipeline::{Client, Pipeline, id};
use super::support::{Running, deadline};

/// The pipeline running with one projector per model in `models`, a workspace of `USERS`
/// members and some channels with members and messages.
struct World {
    pipeline: Pipeline,
    client: Arc<Client>,
    users: Vec<Uuid>,
    workspace: Uuid,
    /// channel → its members, as the commands imply.
    channels: Arc<Mutex<HashMap<Uuid, BTreeSet<Uuid>>>>,
}

const USERS: usize = 8;

impl World {
    /// The world, and its processes (stopped when dropped).
    async fn new(models: &[&str], env: &[(&'static str, String)]) -> Option<(Arc<World>, Vec<Running>)> {
        let mut pipeline = Pipeline::new().await?;
        for (name, value) in env {
            pipeline.set(name, value.clone());
        }
        let mut processes = vec![pipeline.start(&["relay"], "relay")];
        for model in models {
            processes.push(pipeline.start(&["project", model], "projector"));
        }
        let write = pipeline.start(&["write-api"], "write API");
        let read = pipeline.start(&["read-api"], "read API");
        let users: Vec<Uuid> = (0..USERS).map(|_| Uuid::now_v7()).collect();
        let mut tokens = HashMap::new();
        for user in &users {
            let output = pipeline.command(&["token", &user.to_string()]).output().unwrap();
            tokens.insert(*user, String::from_utf8(output.stdout).unwrap().trim().to_owned());
        }
        let client = Arc::new(Client {
            http: reqwest::Client::new(),
            write: write.url.clone(),
            read: read.url.clone(),
            tokens,
            expected: Mutex::default(),
        });
        processes.extend([write, read]);
        let owner = users[0];
        for (i, user) in users.iter().enumerate() {
            client.must(*user, Method::PUT, "/users/me", Some(json!({ "display_name": format!("user {i}") }))).await;
        }
        let workspace =
            id(&client.must(owner, Method::POST, "/workspaces", Some(json!({ "name": "acme" }))).await, "workspace_id");
        for user in &users[1..] {
            let body = json!({ "user_id": user, "role": "member" });
            client.must(owner, Method::POST, &format!("/workspaces/{workspace}/members"), Some(body)).await;
        }
        let world = World { pipeline, client, users, workspace, channels: Arc::default() };
        for i in 0..10 {
            world.channel_with_traffic(i).await;
        }
        Some((Arc::new(world), processes))
    }

    /// A channel, a few members and messages: what the load adds while a replay runs.
    async fn channel_with_traffic(&self, i: usize) {
        let owner = self.users[0];
        let body = json!({ "name": format!("channel-{i}"), "private": i % 3 == 0 });
        let created = self
            .client
            .must(owner, Method::POST, &format!("/workspaces/{}/channels", self.workspace), Some(body))
            .await;
        let channel = id(&created, "channel_id");
        let mut members = BTreeSet::from([owner]);
        for user in self.users.iter().skip(1 + i % 3).step_by(2) {
            let path = format!("/channels/{channel}/members");
            self.client.must(owner, Method::POST, &path, Some(json!({ "user_id": user }))).await;
            members.insert(*user);
        }
        for (n, author) in members.iter().enumerate() {
            self.client.post(*author, channel, format!("message {n} of channel {i}"), None).await;
        }
        self.channels.lock().unwrap().insert(channel, members);
    }

    /// Every channel's members, as the read API answers them once it has every command.
    async fn assert_directory_matches(&self) {
        let owner = self.users[0];
        let channels = self.channels.lock().unwrap().clone();
        for (channel, members) in channels {
            let body = self.client.read(owner, &format!("/channels/{channel}/members")).await;
            let read: BTreeSet<Uuid> = body["members"].as_array().unwrap().iter().map(|m| id(m, "user_id")).collect();
            assert_eq!(read, members, "members of {channel}");
        }
        let workspace = self.client.read(owner, &format!("/workspaces/{}", self.workspace)).await;
        assert_eq!(workspace["member_count"], json!(USERS));
        let listed = self.client.read(owner, &format!("/workspaces/{}/channels", self.workspace)).await;
        assert_eq!(listed["channels"].as_array().unwrap().len(), self.channels.lock().unwrap().len());
    }

    /// The value of `name` in every process's environment.
    fn env(&self, name: &str) -> String {
        self.pipeline.env.iter().find(|(n, _)| *n == name).expect("set by the pipeline").1.clone()
    }

    /// Runs `quikapp replay <args>` to its end (bounded).
    async fn replay(&self, args: &[&str]) -> std::process::Output {
        let mut command = self.pipeline.command(&[&["replay"], args].concat());
        let output = tokio::task::spawn_blocking(move || command.output().unwrap());
        let output =
            deadline(Duration::from_secs(240), output).await.expect("the replay ends within 4 minutes").unwrap();
        // Shown with --nocapture: what an operator sees.
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        output
    }
}

/// What a read of a channel made before the replay must answer, whenever it is made: a path
/// (`{ws}` and `{ch}` stand for the workspace and the channel) and the figure of the answer
/// that must be the channel's member count (each member posted one message).
type Check = (&'static str, fn(&Value) -> u64);

const MEMBER_COUNT: Check = ("/channels/{ch}", |channel| channel["member_count"].as_u64().unwrap());
const MESSAGE_COUNT: Check = ("/channels/{ch}/stats", |stats| stats["message_count"].as_u64().unwrap());
const TIMELINE: Check = ("/channels/{ch}/messages", |page| page["messages"].as_array().unwrap().len() as u64);
const SEARCH: Check = ("/workspaces/{ws}/search?q=message&channel={ch}", |hits| hits["total"].as_u64().unwrap());

fn path(world: &World, check: &Check, channel: Uuid) -> String {
    check.0.replace("{ws}", &world.workspace.to_string()).replace("{ch}", &channel.to_string())
}

/// Commands that keep coming, and reads of the channels that existed before, which must
/// answer their figures (one message per member) at every instant, until `stop`. Answers how
/// many reads it made.
async fn keep_busy(
    world: &Arc<World>,
    checks: &'static [Check],
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let (world, stop) = (world.clone(), stop.clone());
    let (first_round, started) = tokio::sync::oneshot::channel();
    let mut first_round = Some(first_round);
    let busy = tokio::spawn(async move {
        let known = world.channels.lock().unwrap().clone();
        let owner = world.users[0];
        // Every model has the known channels before the replay starts.
        for channel in known.keys() {
            for check in checks {
                world.client.read(owner, &path(&world, check, *channel)).await;
            }
        }
        let mut reads = 0;
        let mut i = 100;
        while !stop.load(Ordering::SeqCst) {
            world.channel_with_traffic(i).await;
            i += 1;
            for (channel, members) in &known {
                for check in checks {
                    let (path, figure) = (path(&world, check, *channel), check.1);
                    // No X-Min-Position: what a client sees at any instant, the swap included.
                    let response = world
                        .client
                        .http
                        .get(format!("{}/v1{path}", world.client.read))
                        .bearer_auth(&world.client.tokens[&owner])
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200, "{path} of a channel made before the replay");
                    let body: Value = response.json().await.unwrap();
                    assert_eq!(figure(&body), members.len() as u64, "{path} of {channel}: {body}");
                    reads += 1;
                }
            }
            if let Some(first_round) = first_round.take() {
                let _ = first_round.send(());
            }
        }
        reads
    });
    if started.await.is_err() {
        busy.await.expect("the first round of reads passes");
        unreachable!("the first round ended without a word");
    }
    busy
}

fn summary(output: &std::process::Output) -> Value {
    assert!(output.status.success(), "replay failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|_| panic!("JSON: {stdout}"))
}

/// Runs `quikapp replay <model>` while commands flow and reads are checked; answers its
/// summary of the model.
async fn replay_under_load(world: &Arc<World>, model: &str, checks: &'static [Check], more: &[&str]) -> Value {
    let stop = Arc::new(AtomicBool::new(false));
    let busy = keep_busy(world, checks, &stop).await;
    let output = world.replay(&[&[model, "--json", "--batch-size", "20"], more].concat()).await;
    stop.store(true, Ordering::SeqCst);
    let reads = busy.await.unwrap();
    let summary = summary(&output);
    let replayed = summary["models"][0].clone();
    assert_eq!(replayed["model"], model);
    assert_eq!(replayed["swapped"], true);
    assert!(replayed["events"].as_u64().unwrap() > 100, "{summary}");
    assert!(reads > 0);
    replayed
}

#[tokio::test]
async fn replay_swaps_in_a_rebuilt_directory_while_commands_flow_and_reads_never_fail() {
    let Some((world, _processes)) = World::new(&["postgres"], &[]).await else { return };
    replay_under_load(&world, "postgres", &[MEMBER_COUNT], &[]).await;
    world.assert_directory_matches().await;

    // The rebuild's schema became the live one; the old one is gone.
    let url = &world.env("QUIKAPP_POSTGRES_URL");
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let schemas: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'directory%' ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(schemas, ["directory"]);
    // With the indexes the rebuild made once its history was in.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'directory' AND indexname LIKE '%_by_%' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(indexes, ["channel_members_by_user", "channels_by_workspace"]);
}

#[tokio::test]
async fn replay_from_kafka_reads_the_topics_from_the_start_and_swaps_in_while_commands_flow() {
    let Some((world, _processes)) = World::new(&["postgres"], &[]).await else { return };
    // The rebuild has no offsets of the live model's: what it has of the history before the
    // load began, it read from the topics.
    let replayed = replay_under_load(&world, "postgres", &[MEMBER_COUNT], &["--source", "kafka"]).await;
    assert_eq!(replayed["source"], "kafka");
    world.assert_directory_matches().await;
}

#[tokio::test]
async fn replay_swaps_in_rebuilt_counters_while_commands_flow_and_reads_never_fail() {
    // SWAPDB swaps whole logical databases: this test has two of its own.
    let redis = super::support::service_url("QUIKAPP_REDIS_URL").map(|url| format!("{}/3", url.trim_end_matches('/')));
    let Some(redis) = redis else { return };
    // Those of earlier runs: a replay refuses databases that hold keys of another prefix.
    for db in ["3", "4"] {
        let url = redis.replace("/3", &format!("/{db}"));
        let mut connection = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
        redis::cmd("FLUSHDB").query_async::<()>(&mut connection).await.unwrap();
    }
    let env = [("QUIKAPP_REDIS_URL", redis), ("QUIKAPP_REDIS_REBUILD_DB", "4".to_owned())];
    let Some((world, _processes)) = World::new(&["postgres", "redis"], &env).await else { return };
    replay_under_load(&world, "redis", &[MEMBER_COUNT, MESSAGE_COUNT], &[]).await;
    let owner = world.users[0];
    let channels = world.channels.lock().unwrap().clone();
    for (channel, members) in channels {
        let stats = world.client.read(owner, &format!("/channels/{channel}/stats")).await;
        assert_eq!(stats["message_count"], json!(members.len()), "{channel}");
    }
    // Every channel of the owner's: unread are the others' messages (one each).
    let unread = world.client.read(owner, "/users/me/unread").await;
    for entry in unread["channels"].as_array().unwrap() {
        let members = world.channels.lock().unwrap()[&id(entry, "channel_id")].len();
        assert_eq!(entry["unread"], json!(members - 1));
    }
}

#[tokio::test]
async fn replay_swaps_in_a_rebuilt_search_index_while_commands_flow_and_searches_never_fail() {
    let Some((world, _processes)) = World::new(&["postgres", "search"], &[]).await else { return };
    replay_under_load(&world, "search", &[MEMBER_COUNT, SEARCH], &[]).await;
    let owner = world.users[0];
    let channels = world.channels.lock().unwrap().clone();
    for (channel, members) in channels {
        let hits = world
            .client
            .read(owner, &format!("/workspaces/{}/search?q=message&channel={channel}", world.workspace))
            .await;
        assert_eq!(hits["total"], json!(members.len()), "{channel}");
    }
    // The alias is on the rebuilt index, the first one is gone.
    let url = &world.env("QUIKAPP_ELASTICSEARCH_URL");
    let prefix = &world.env("QUIKAPP_SEARCH_INDEX_PREFIX");
    let aliases: Value = reqwest::get(format!("{url}/{prefix}messages/_alias")).await.unwrap().json().await.unwrap();
    let indexes: Vec<&String> = aliases.as_object().unwrap().keys().collect();
    assert_eq!(indexes, [&format!("{prefix}messages-2")]);
    let first = reqwest::get(format!("{url}/{prefix}messages-1")).await.unwrap();
    assert_eq!(first.status(), 404);
    // A role starting afterwards finds the alias where the swap left it.
    let migrate = world.pipeline.command(&["migrate"]).output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    let aliases: Value = reqwest::get(format!("{url}/{prefix}messages/_alias")).await.unwrap().json().await.unwrap();
    assert_eq!(aliases.as_object().unwrap().keys().collect::<Vec<_>>(), [&format!("{prefix}messages-2")]);
}

#[tokio::test]
async fn replay_swaps_in_rebuilt_timelines_while_commands_flow_and_reads_never_fail() {
    let Some((world, _processes)) = World::new(&["postgres", "mongo"], &[]).await else { return };
    replay_under_load(&world, "mongo", &[MEMBER_COUNT, TIMELINE], &[]).await;
    let owner = world.users[0];
    let channels = world.channels.lock().unwrap().clone();
    for (channel, members) in channels {
        let page = world.client.read(owner, &format!("/channels/{channel}/messages")).await;
        assert_eq!(page["messages"].as_array().unwrap().len(), members.len(), "{channel}");
    }
    // The rebuild's collection, live now, with the indexes made once its history was in.
    let mongo = mongodb::Client::with_uri_str(world.env("QUIKAPP_MONGO_URL")).await.unwrap();
    let messages = mongo.default_database().unwrap().collection::<mongodb::bson::Document>("messages_2");
    let mut indexes = messages.list_index_names().await.unwrap();
    indexes.sort();
    assert_eq!(indexes, ["_id_", "thread", "timeline"]);
}

#[tokio::test]
async fn a_replay_killed_midway_resumes_where_it_stopped_and_a_second_one_meanwhile_is_refused() {
    let Some((world, _processes)) = World::new(&["postgres"], &[]).await else { return };
    for i in 10..250 {
        world.channel_with_traffic(i).await;
    }
    let owner = world.users[0];
    // One event per batch, so that the replay is still at its history when killed.
    let mut first = world.pipeline.command(&["replay", "postgres", "--batch-size", "1"]).spawn().unwrap();
    // Without X-Min-Position: the models this test does not run never reach any.
    let postgres_status = || async {
        let url = format!("{}/v1/projections", world.client.read);
        let response = world.client.http.get(url).bearer_auth(&world.client.tokens[&owner]).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let projections: Value = response.json().await.unwrap();
        let postgres = projections["projections"].as_array().unwrap().iter().find(|p| p["name"] == "postgres");
        postgres.expect("the postgres model is listed").clone()
    };
    let rebuilding = deadline(Duration::from_secs(60), async {
        loop {
            let postgres = postgres_status().await;
            if postgres["state"] == "rebuilding" && postgres["rebuild"]["done"].as_u64().unwrap() > 0 {
                return postgres;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("GET /projections shows the replay's progress");
    assert!(rebuilding["rebuild"]["total"].as_u64().unwrap() > 1000, "{rebuilding}");

    let second = world.replay(&["postgres"]).await;
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another replay of the postgres model is running"), "{stderr}");

    assert!(first.try_wait().unwrap().is_none(), "the first replay was still running when it was killed");
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();

    let resumed = summary(&world.replay(&["postgres", "--json"]).await);
    let model = &resumed["models"][0];
    assert!(model["resumed_from"].as_u64().unwrap() > 0, "{resumed}");
    assert_eq!(model["swapped"], true);
    world.assert_directory_matches().await;
    assert_eq!(postgres_status().await["state"], "running");
}

#[tokio::test]
async fn verify_finds_a_corrupted_row_document_index_entry_and_redis_key() {
    let Some((world, _processes)) = World::new(&["postgres", "redis", "mongo", "search"], &[]).await else { return };
    let owner = world.users[0];
    let env = |name: &str| world.env(name);
    let channels: Vec<Uuid> = world.channels.lock().unwrap().keys().copied().collect();
    // Every model has every command before the audit.
    for check in [MEMBER_COUNT, MESSAGE_COUNT, TIMELINE, SEARCH] {
        world.client.read(owner, &path(&world, &check, channels[0])).await;
    }
    let clean = world.replay(&["all", "--verify", "--live-only", "--json"]).await;
    let verdicts = summary(&clean);
    for model in ["postgres", "redis", "mongo", "search"] {
        assert_eq!(verdicts[model]["differing"], 0, "{model}: {verdicts}");
        assert!(verdicts[model]["compared"].as_u64().unwrap() >= 10, "{model}: {verdicts}");
    }

    // One thing wrong in each store, each in another channel.
    let message_of = |channel: Uuid| {
        let expected = world.client.expected.lock().unwrap();
        *expected.messages.iter().find(|(_, posted)| posted.0 == channel).unwrap().0
    };
    let name = world.client.read(owner, &format!("/channels/{}", channels[1])).await["name"].clone();
    let pool = sqlx::PgPool::connect(&env("QUIKAPP_POSTGRES_URL")).await.unwrap();
    sqlx::query("UPDATE directory.channels SET name = 'tampered' WHERE channel_id = $1")
        .bind(channels[1])
        .execute(&pool)
        .await
        .unwrap();
    let redis = redis::Client::open(env("QUIKAPP_REDIS_URL")).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}ch:{}:all", env("QUIKAPP_REDIS_KEY_PREFIX"), channels[2]);
    let removed: i64 = redis::cmd("ZREM")
        .arg(&key)
        .arg(message_of(channels[2]).to_string())
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let mongo = mongodb::Client::with_uri_str(env("QUIKAPP_MONGO_URL")).await.unwrap();
    let messages = mongo.default_database().unwrap().collection::<mongodb::bson::Document>("messages");
    let tampered = mongodb::bson::doc! { "$set": { "text": "tampered" } };
    let id = message_of(channels[3]).to_string();
    let updated = messages.update_one(mongodb::bson::doc! { "_id": &id }, tampered).await.unwrap();
    assert_eq!(updated.matched_count, 1);
    let (search, prefix) = (env("QUIKAPP_ELASTICSEARCH_URL"), env("QUIKAPP_SEARCH_INDEX_PREFIX"));
    let entry = message_of(channels[4]);
    let update = reqwest::Client::new()
        .post(format!("{search}/{prefix}messages/_update/{entry}?refresh=true"))
        .json(&json!({ "doc": { "text": "tampered" } }))
        .send()
        .await
        .unwrap();
    assert!(update.status().is_success(), "{}", update.text().await.unwrap());

    let audit = world.replay(&["all", "--verify", "--live-only"]).await;
    assert_eq!(audit.status.code(), Some(1), "{}", String::from_utf8_lossy(&audit.stderr));
    let report = String::from_utf8_lossy(&audit.stdout);
    for (model, channel, what) in [
        ("postgres", channels[1], "tampered".to_owned()),
        ("redis", channels[2], "message_count".to_owned()),
        ("mongo", channels[3], id.clone()),
        ("search", channels[4], entry.to_string()),
    ] {
        let line = format!("{model}: channel {channel}:");
        assert!(report.contains(&line), "{line} in:\n{report}");
        assert!(
            report.lines().any(|l| l.starts_with(&format!("{model}:   ")) && l.contains(&what)),
            "{what}:\n{report}"
        );
    }
    assert!(String::from_utf8_lossy(&audit.stderr).contains("differs from the event store"));

    // A rebuild compared with the live model finds the same, and --dry-run leaves it alone.
    let dry = world.replay(&["postgres", "--verify", "--dry-run"]).await;
    assert_eq!(dry.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&dry.stdout).contains(&format!("postgres: channel {}:", channels[1])));
    let channel = world.client.read(owner, &format!("/channels/{}", channels[1])).await;
    assert_eq!(channel["name"], "tampered");
    // Swapped in, the rebuild mends it.
    let mended = world.replay(&["postgres", "--verify"]).await;
    assert_eq!(mended.status.code(), Some(1));
    let channel = world.client.read(owner, &format!("/channels/{}", channels[1])).await;
    assert_eq!(channel["name"], name);
    let audit = world.replay(&["postgres", "--verify", "--live-only"]).await;
    assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stdout));
}

#[tokio::test]
async fn a_projector_refuses_a_model_of_an_older_schema_version_until_a_replay_rebuilds_it() {
    let Some((world, _processes)) = World::new(&["postgres"], &[]).await else { return };
    let url = &world.env("QUIKAPP_POSTGRES_URL");
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query("UPDATE directory.model SET schema_version = 0").execute(&pool).await.unwrap();

    let mut refused = world.pipeline.command(&["project", "postgres"]);
    let refused = tokio::task::spawn_blocking(move || refused.output().unwrap());
    let refused = deadline(Duration::from_secs(60), refused).await.expect("the projector exits").unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("schema version 0") && stderr.contains("run `quikapp replay postgres`"), "{stderr}");

    summary(&world.replay(&["postgres", "--json"]).await);
    let version: i32 = sqlx::query_scalar("SELECT schema_version FROM directory.model").fetch_one(&pool).await.unwrap();
    assert!(version > 0);
    let projector = world.pipeline.start(&["project", "postgres"], "projector");
    world.channel_with_traffic(500).await;
    world.assert_directory_matches().await;
    drop(projector);
}
