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
    async fn new(models: &[&str]) -> Option<(Arc<World>, Vec<Running>)> {
        let pipeline = Pipeline::new().await?;
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

    /// Runs `quikapp replay <args>` to its end (bounded).
    async fn replay(&self, args: &[&str]) -> std::process::Output {
        let mut command = self.pipeline.command(&[&["replay"], args].concat());
        let output = tokio::task::spawn_blocking(move || command.output().unwrap());
        deadline(Duration::from_secs(240), output).await.expect("the replay ends within 4 minutes").unwrap()
    }
}

/// Commands that keep coming, and reads of what existed before that must never fail, until
/// `stop`. Answers how many reads it made.
fn keep_busy(world: &Arc<World>, stop: &Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let (world, stop) = (world.clone(), stop.clone());
    tokio::spawn(async move {
        let known: Vec<Uuid> = world.channels.lock().unwrap().keys().copied().collect();
        let owner = world.users[0];
        let mut reads = 0;
        let mut i = 100;
        while !stop.load(Ordering::SeqCst) {
            world.channel_with_traffic(i).await;
            i += 1;
            for channel in &known {
                // No X-Min-Position: what a client sees at any instant, the swap included.
                let response = world
                    .client
                    .http
                    .get(format!("{}/v1/channels/{channel}", world.client.read))
                    .bearer_auth(&world.client.tokens[&owner])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "a channel made before the replay, read during it");
                reads += 1;
            }
        }
        reads
    })
}

fn summary(output: &std::process::Output) -> Value {
    assert!(output.status.success(), "replay failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|_| panic!("JSON: {stdout}"))
}

#[tokio::test]
async fn replay_swaps_in_a_rebuilt_directory_while_commands_flow_and_reads_never_fail() {
    let Some((world, _processes)) = World::new(&["postgres"]).await else { return };
    let stop = Arc::new(AtomicBool::new(false));
    let busy = keep_busy(&world, &stop);
    let output = world.replay(&["postgres", "--json", "--batch-size", "20"]).await;
    stop.store(true, Ordering::SeqCst);
    let reads = busy.await.unwrap();
    let summary = summary(&output);
    let model = &summary["models"][0];
    assert_eq!(model["model"], "postgres");
    assert_eq!(model["swapped"], true);
    assert!(model["events"].as_u64().unwrap() > 100, "{summary}");
    assert!(reads > 0);
    world.assert_directory_matches().await;

    // The rebuild's schema became the live one; the old one is gone.
    let url = &world.pipeline.env.iter().find(|(name, _)| *name == "QUIKAPP_POSTGRES_URL").unwrap().1;
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let schemas: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'directory%' ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(schemas, ["directory"]);
}
