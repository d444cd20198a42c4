//! The whole pipeline as separate processes of the real binary, on the real services: write
//! API, relay, one projector process per model, read API. Clients drive it through HTTP only;
//! every read waits for the last command's position with X-Min-Position (no fixed sleeps), and
//! both projectors are SIGKILLed and restarted in the middle of the run.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use super::support::{Running, deadline, fresh_postgres_database, quikapp, service_url};

pub(crate) const SECRET: &str = "0123456789abcdef0123456789abcdef";
const MESSAGES: usize = 2_000;

pub(crate) struct Pipeline {
    pub(crate) env: Vec<(&'static str, String)>,
}

impl Pipeline {
    pub(crate) async fn new() -> Option<Pipeline> {
        let brokers = service_url("QUIKAPP_KAFKA_BROKERS")?;
        let redis = service_url("QUIKAPP_REDIS_URL")?;
        let postgres = fresh_postgres_database().await?;
        let mongo = service_url("QUIKAPP_MONGO_URL")?;
        let elasticsearch = service_url("QUIKAPP_ELASTICSEARCH_URL")?;
        let run = Uuid::now_v7().simple().to_string();
        let env = vec![
            ("QUIKAPP_POSTGRES_URL", postgres),
            ("QUIKAPP_KAFKA_BROKERS", brokers),
            ("QUIKAPP_REDIS_URL", redis),
            ("QUIKAPP_MONGO_URL", format!("{}/test_{run}", mongo.split('?').next().unwrap().trim_end_matches('/'))),
            ("QUIKAPP_ELASTICSEARCH_URL", elasticsearch),
            ("QUIKAPP_SEARCH_INDEX_PREFIX", format!("test-{run}-")),
            ("QUIKAPP_KAFKA_MESSAGES_TOPIC", format!("test-{run}-messages")),
            ("QUIKAPP_KAFKA_WORKSPACES_TOPIC", format!("test-{run}-workspaces")),
            ("QUIKAPP_KAFKA_PARTITIONS", "4".into()),
            ("QUIKAPP_KAFKA_GROUP_PREFIX", format!("test-{run}-")),
            ("QUIKAPP_REDIS_KEY_PREFIX", format!("test:{run}:")),
            ("QUIKAPP_JWT_SECRET", SECRET.into()),
            ("QUIKAPP_MIN_POSITION_WAIT_SECONDS", "90".into()),
            // A query's wait for its X-Min-Position is bounded by the request timeout too.
            ("QUIKAPP_REQUEST_TIMEOUT_SECONDS", "120".into()),
            ("QUIKAPP_RATE_LIMIT_PER_SECOND", "100000".into()),
            ("QUIKAPP_RATE_LIMIT_BURST", "100000".into()),
            ("QUIKAPP_WRITE_ADDR", "127.0.0.1:0".into()),
            ("QUIKAPP_READ_ADDR", "127.0.0.1:0".into()),
            ("QUIKAPP_RELAY_ADDR", "127.0.0.1:0".into()),
            ("QUIKAPP_PROJECTOR_ADDR", "127.0.0.1:0".into()),
            ("QUIKAPP_REALTIME_ADDR", "127.0.0.1:0".into()),
            ("QUIKAPP_REALTIME_GROUP", format!("test-{run}-realtime")),
        ];
        let pipeline = Pipeline { env };
        let migrate = pipeline.command(&["migrate"]).output().unwrap();
        assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
        Some(pipeline)
    }

    pub(crate) fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = quikapp(args);
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command
    }

    /// Sets one variable of every process started from now on.
    pub(crate) fn set(&mut self, name: &'static str, value: String) {
        self.env.retain(|(n, _)| *n != name);
        self.env.push((name, value));
    }

    pub(crate) fn start(&self, args: &[&str], what: &str) -> Running {
        Running::start(self.command(args), what)
    }
}

/// A message as the commands imply it: (channel, author, global position, top-level, text,
/// deleted).
type Posted = (Uuid, Uuid, u64, bool, String, bool);

/// What the commands imply, kept as their answers come.
#[derive(Default)]
pub(crate) struct Expected {
    pub(crate) messages: HashMap<Uuid, Posted>,
    /// (user, channel) → (position of the mark command, position of the marked message)
    marks: HashMap<(Uuid, Uuid), (u64, u64)>,
    pub(crate) last_position: u64,
}

pub(crate) struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) write: String,
    pub(crate) read: String,
    pub(crate) tokens: HashMap<Uuid, String>,
    pub(crate) expected: Mutex<Expected>,
}

impl Client {
    /// A command; answers its body when it succeeded, and notes its position.
    pub(crate) async fn command(
        &self,
        user: Uuid,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, (u16, Value)> {
        let mut request =
            self.http.request(method, format!("{}/v1{path}", self.write)).bearer_auth(&self.tokens[&user]);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the write API answers");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            return Err((status, body));
        }
        let position: u64 = body["position"].as_str().unwrap().parse().unwrap();
        let mut expected = self.expected.lock().unwrap();
        expected.last_position = expected.last_position.max(position);
        Ok(body)
    }

    pub(crate) async fn must(&self, user: Uuid, method: Method, path: &str, body: Option<Value>) -> Value {
        self.command(user, method, path, body).await.unwrap_or_else(|(status, body)| panic!("{path}: {status} {body}"))
    }

    pub(crate) async fn post(&self, author: Uuid, channel: Uuid, text: String, root: Option<Uuid>) -> Uuid {
        let body = self
            .must(
                author,
                Method::POST,
                &format!("/channels/{channel}/messages"),
                Some(json!({ "text": text, "thread_root_id": root })),
            )
            .await;
        let id: Uuid = body["message_id"].as_str().unwrap().parse().unwrap();
        let position = body["position"].as_str().unwrap().parse().unwrap();
        self.expected.lock().unwrap().messages.insert(id, (channel, author, position, root.is_none(), text, false));
        id
    }

    /// A query as `user`, waiting for every command so far.
    pub(crate) async fn query(&self, user: Uuid, path: &str) -> (u16, Value) {
        let at = self.expected.lock().unwrap().last_position.to_string();
        let response = self
            .http
            .get(format!("{}/v1{path}", self.read))
            .bearer_auth(&self.tokens[&user])
            .header("x-min-position", at)
            .send()
            .await
            .expect("the read API answers");
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn read(&self, user: Uuid, path: &str) -> Value {
        let (status, body) = self.query(user, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }
}

pub(crate) fn id(body: &Value, name: &str) -> Uuid {
    body[name].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn separate_processes_answer_what_the_commands_imply_through_a_projector_crash() {
    let Some(pipeline) = Pipeline::new().await else { return };
    let write = pipeline.start(&["write-api"], "write API");
    let _relay = pipeline.start(&["relay"], "relay");
    let start_projectors =
        || ["postgres", "redis", "mongo", "search"].map(|model| pipeline.start(&["project", model], "projector"));
    let mut projectors = start_projectors();
    let read = pipeline.start(&["read-api"], "read API");

    let users: [Uuid; 4] = std::array::from_fn(|_| Uuid::now_v7());
    let [ada, bob, cy, dan] = users;
    let mut tokens = HashMap::new();
    for user in users {
        let output = pipeline.command(&["token", &user.to_string()]).output().unwrap();
        tokens.insert(user, String::from_utf8(output.stdout).unwrap().trim().to_owned());
    }
    let client = Arc::new(Client {
        http: reqwest::Client::new(),
        write: write.url.clone(),
        read: read.url.clone(),
        tokens,
        expected: Mutex::default(),
    });

    for (user, name) in users.iter().zip(["Ada", "Bob", "Cy", "Dan"]) {
        client.must(*user, Method::PUT, "/users/me", Some(json!({ "display_name": name }))).await;
    }
    let ws = id(&client.must(ada, Method::POST, "/workspaces", Some(json!({ "name": "acme" }))).await, "workspace_id");
    for (user, role) in [(bob, "member"), (cy, "admin"), (dan, "member")] {
        client
            .must(
                ada,
                Method::POST,
                &format!("/workspaces/{ws}/members"),
                Some(json!({ "user_id": user, "role": role })),
            )
            .await;
    }
    // A member's read mark starts where they joined (the creator joins with the creation).
    let join = |user: Uuid, channel: Uuid, by: Uuid| {
        let client = client.clone();
        async move {
            let path = format!("/channels/{channel}/members");
            let answer = client.must(by, Method::POST, &path, Some(json!({ "user_id": user }))).await;
            let at: u64 = answer["position"].as_str().unwrap().parse().unwrap();
            client.expected.lock().unwrap().marks.insert((user, channel), (at, at));
        }
    };
    let mut channels = Vec::new();
    for (name, private) in [("general", false), ("random", false), ("secret", true)] {
        let body = json!({ "name": name, "private": private });
        let created = client.must(ada, Method::POST, &format!("/workspaces/{ws}/channels"), Some(body)).await;
        let at: u64 = created["position"].as_str().unwrap().parse().unwrap();
        client.expected.lock().unwrap().marks.insert((ada, id(&created, "channel_id")), (at, at));
        channels.push(id(&created, "channel_id"));
    }
    let [general, random, secret] = [channels[0], channels[1], channels[2]];
    let joins = [(general, bob, bob), (general, cy, cy), (general, dan, dan), (random, bob, bob), (secret, bob, ada)];
    for (channel, user, by) in joins {
        join(user, channel, by).await;
    }
    let members: HashMap<Uuid, Vec<Uuid>> =
        HashMap::from([(general, vec![ada, bob, cy, dan]), (random, vec![ada, bob]), (secret, vec![ada, bob])]);
    let mut roots = HashMap::new();
    for channel in [general, random, secret] {
        roots.insert(channel, client.post(ada, channel, format!("root of {channel}"), None).await);
    }

    // Thousands of messages from concurrent clients; both projectors killed half-way.
    let post = |i: usize| {
        let client = client.clone();
        let channel = [general, general, random, secret][i % 4];
        let author = members[&channel][i % members[&channel].len()];
        let root = (i % 10 == 9).then(|| roots[&channel]);
        async move { client.post(author, channel, format!("message {i}"), root).await }
    };
    let first: Vec<Uuid> = futures::stream::iter(0..MESSAGES / 2).map(post).buffered(16).collect().await;
    for projector in &mut projectors {
        projector.child.kill().expect("SIGKILL");
        projector.child.wait().unwrap();
    }
    projectors = start_projectors();
    let second: Vec<Uuid> = futures::stream::iter(MESSAGES / 2..MESSAGES).map(post).buffered(16).collect().await;
    let posted: Vec<Uuid> = first.into_iter().chain(second).collect();
    // Reactions on each root: Bob's and Ada's, then Ada takes hers back.
    for channel in [general, random, secret] {
        let reactions = format!("/channels/{channel}/messages/{}/reactions", roots[&channel]);
        client.must(bob, Method::PUT, &format!("{reactions}/tada"), None).await;
        client.must(ada, Method::PUT, &format!("{reactions}/tada"), None).await;
        client.must(ada, Method::PUT, &format!("{reactions}/eyes"), None).await;
        client.must(ada, Method::DELETE, &format!("{reactions}/tada"), None).await;
    }
    // Cy joins a channel with history: none of it is unread to Cy.
    join(cy, random, cy).await;

    // Edits and deletions by their authors, read marks from concurrent clients, a leave.
    let changes = futures::stream::iter(posted.iter().enumerate().filter(|(i, _)| i % 20 == 3 || i % 20 == 7))
        .map(|(i, message)| {
            let client = client.clone();
            async move {
                let (channel, author) = {
                    let expected = client.expected.lock().unwrap();
                    let (channel, author, ..) = expected.messages[message];
                    (channel, author)
                };
                let path = format!("/channels/{channel}/messages/{message}");
                if i % 20 == 3 {
                    client.must(author, Method::DELETE, &path, None).await;
                    client.expected.lock().unwrap().messages.get_mut(message).unwrap().5 = true;
                } else {
                    let text = format!("edited {i}");
                    client.must(author, Method::PATCH, &path, Some(json!({ "text": text }))).await;
                    client.expected.lock().unwrap().messages.get_mut(message).unwrap().4 = text;
                }
            }
        })
        .buffer_unordered(16);
    changes.collect::<Vec<()>>().await;
    let marks = futures::stream::iter((0..40).map(|i| (users[1 + i % 3], posted[i * 37 % posted.len()])))
        .map(|(user, message)| {
            let (client, members) = (client.clone(), &members);
            async move {
                let (channel, marked_at, deleted) = {
                    let expected = client.expected.lock().unwrap();
                    let (channel, _, position, _, _, deleted) = expected.messages[&message];
                    (channel, position, deleted)
                };
                if deleted || !members[&channel].contains(&user) {
                    return;
                }
                let body = json!({ "message_id": message });
                if let Ok(answer) =
                    client.command(user, Method::POST, &format!("/channels/{channel}/read"), Some(body)).await
                {
                    let at: u64 = answer["position"].as_str().unwrap().parse().unwrap();
                    let mut expected = client.expected.lock().unwrap();
                    let mark = expected.marks.entry((user, channel)).or_insert((0, 0));
                    if at > mark.0 {
                        *mark = (at, marked_at);
                    }
                }
            }
        })
        .buffer_unordered(8);
    marks.collect::<Vec<()>>().await;
    client.must(dan, Method::DELETE, &format!("/channels/{general}/members/{dan}"), None).await;
    let mut members = members;
    members.get_mut(&general).unwrap().retain(|user| *user != dan);
    members.get_mut(&random).unwrap().push(cy);

    // Every figure, as the commands imply it.
    let expected = client.expected.lock().unwrap().messages.clone();
    let marks = client.expected.lock().unwrap().marks.clone();
    let workspace = client.read(bob, &format!("/workspaces/{ws}")).await;
    assert_eq!((workspace["member_count"].clone(), workspace["owner_id"].clone()), (json!(4), json!(ada)));
    let names = |body: Value| -> Vec<String> {
        body["channels"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names(client.read(bob, &format!("/workspaces/{ws}/channels")).await), ["general", "random", "secret"]);
    assert_eq!(names(client.read(cy, &format!("/workspaces/{ws}/channels")).await), ["general", "random"]);
    for who in [cy, dan] {
        for path in
            [format!("/channels/{secret}"), format!("/channels/{secret}/members"), format!("/channels/{secret}/stats")]
        {
            assert_eq!(client.query(who, &path).await.0, 404, "{path} is invisible to a non-member");
        }
    }
    for channel in [general, random, secret] {
        let view = client.read(ada, &format!("/channels/{channel}")).await;
        assert_eq!(view["member_count"], members[&channel].len(), "{view}");
        let listed = client.read(ada, &format!("/channels/{channel}/members")).await;
        let listed: BTreeSet<Uuid> = listed["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["user_id"].as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(listed, members[&channel].iter().copied().collect());

        let alive: Vec<_> = expected.iter().filter(|(_, m)| m.0 == channel && !m.5).collect();
        let (last_id, last) = alive.iter().max_by_key(|(_, m)| m.2).unwrap();
        let stats = client.read(ada, &format!("/channels/{channel}/stats")).await;
        assert_eq!(stats["message_count"], alive.len(), "{stats}");
        assert_eq!(stats["last_message"], json!({ "message_id": last_id, "author_id": last.1, "preview": last.4 }));
    }
    for user in users {
        let mut want: Vec<Value> = [general, random, secret]
            .into_iter()
            .filter(|channel| members[channel].contains(&user))
            .map(|channel| {
                let mark = marks.get(&(user, channel)).map_or(0, |m| m.1);
                let unread =
                    expected.values().filter(|m| m.0 == channel && m.3 && !m.5 && m.1 != user && m.2 > mark).count();
                json!({ "channel_id": channel, "unread": unread })
            })
            .collect();
        want.sort_by_key(|c| c["channel_id"].as_str().unwrap().to_owned());
        assert_eq!(client.read(user, "/users/me/unread").await, json!({ "channels": want }), "unread of {user}");
    }
    // Timelines: every page across the cursors, newest first, top-level and not deleted; each
    // thread's replies oldest first; a deleted message is gone.
    for channel in [general, random, secret] {
        let mut want: Vec<(&Uuid, &Posted)> = expected.iter().filter(|(_, m)| m.0 == channel && m.3 && !m.5).collect();
        want.sort_by_key(|(_, m)| std::cmp::Reverse(m.2));
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(before) => format!("/channels/{channel}/messages?limit=50&before={before}"),
                None => format!("/channels/{channel}/messages?limit=50"),
            };
            let page = client.read(bob, &path).await;
            for message in page["messages"].as_array().unwrap() {
                seen.push((message["message_id"].as_str().unwrap().parse::<Uuid>().unwrap(), message["text"].clone()));
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        let want_seen: Vec<(Uuid, Value)> = want.iter().map(|(id, m)| (**id, json!(m.4))).collect();
        assert_eq!(seen, want_seen, "the timeline of {channel}");
        let root = roots[&channel];
        let mut replies: Vec<(&Uuid, &Posted)> =
            expected.iter().filter(|(_, m)| m.0 == channel && !m.3 && !m.5).collect();
        replies.sort_by_key(|(_, m)| m.2);
        let thread = client.read(bob, &format!("/channels/{channel}/messages/{root}/replies")).await;
        let thread: Vec<Uuid> = thread["replies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["message_id"].as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(thread, replies.iter().map(|(id, _)| **id).collect::<Vec<_>>(), "the thread in {channel}");
        let root_view = client.read(bob, &format!("/channels/{channel}/messages/{root}")).await;
        assert_eq!(root_view["reply_count"], replies.len());
        assert_eq!(root_view["reactions"], json!({ "eyes": [ada], "tada": [bob] }), "{root_view}");
    }
    let deleted = expected.iter().find(|(_, m)| m.5).map(|(id, m)| (*id, m.0)).unwrap();
    assert_eq!(client.query(ada, &format!("/channels/{}/messages/{}", deleted.1, deleted.0)).await.0, 404);
    assert_eq!(client.query(cy, &format!("/channels/{secret}/messages")).await.0, 404, "a private timeline");

    // Search: every word must match, edits reflected, deletions gone, and only the channels the
    // caller may read.
    for user in [bob, cy] {
        let readable: Vec<Uuid> =
            [general, random, secret].into_iter().filter(|c| members[c].contains(&user)).collect();
        let count = |matches: &dyn Fn(&Posted) -> bool| {
            expected.values().filter(|m| readable.contains(&m.0) && !m.5 && matches(m)).count()
        };
        let found = client.read(user, &format!("/workspaces/{ws}/search?q=message&limit=5")).await;
        assert_eq!(found["total"], count(&|m| m.4.starts_with("message ")), "{user}: {found}");
        let edited = client.read(user, &format!("/workspaces/{ws}/search?q=edited")).await;
        assert_eq!(edited["total"], count(&|m| m.4.starts_with("edited ")));
        let by_ada = client.read(user, &format!("/workspaces/{ws}/search?q=message&author={ada}")).await;
        assert_eq!(by_ada["total"], count(&|m| m.4.starts_with("message ") && m.1 == ada));
    }
    // A public channel's messages are found by any member of the workspace, in it or not (Dan
    // left general).
    let in_general = expected.values().filter(|m| m.0 == general && !m.5 && m.4.starts_with("message ")).count();
    let found = client.read(dan, &format!("/workspaces/{ws}/search?q=message&channel={general}")).await;
    assert_eq!(found["total"], in_general, "{found}");
    let (one, (channel, ..)) =
        expected.iter().find(|(_, m)| m.0 == secret && !m.5 && m.4.starts_with("message ")).unwrap();
    let words = expected[one].4.replace(' ', "%20");
    let hit = client.read(bob, &format!("/workspaces/{ws}/search?q={words}&channel={channel}")).await;
    assert_eq!(hit["total"], 1, "{hit}");
    assert_eq!(hit["hits"][0]["message_id"], json!(one));
    assert_eq!(
        hit["hits"][0]["highlight"],
        expected[one].4.split(' ').map(|w| format!("<em>{w}</em>")).collect::<Vec<_>>().join(" ")
    );
    assert_eq!(client.query(cy, &format!("/workspaces/{ws}/search?q={words}&channel={secret}")).await.0, 404);

    let projections = client.read(ada, "/projections").await;
    let last = client.expected.lock().unwrap().last_position;
    for projection in projections["projections"].as_array().unwrap() {
        assert!(projection["position"].as_str().unwrap().parse::<u64>().unwrap() >= last, "{projection}");
        assert_eq!(projection["dead_lettered"], 0, "{projection}");
    }
    drop(projectors);
}

/// With every store URL set, `quikapp dev` runs every role in one process on the real services:
/// the relay to Kafka, both projectors, both APIs.
#[tokio::test]
async fn dev_with_every_store_url_set_runs_every_role_on_the_real_services() {
    let Some(pipeline) = Pipeline::new().await else { return };
    let dev = Running::start_all(pipeline.command(&["dev"]), &["write API", "read API"]);
    let user = Uuid::now_v7();
    let output = pipeline.command(&["token", &user.to_string()]).output().unwrap();
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let client = Client {
        http: reqwest::Client::new(),
        write: dev.urls["write API"].clone(),
        read: dev.urls["read API"].clone(),
        tokens: HashMap::from([(user, token)]),
        expected: Mutex::default(),
    };
    let ws = id(&client.must(user, Method::POST, "/workspaces", Some(json!({ "name": "acme" }))).await, "workspace_id");
    let body = json!({ "name": "general" });
    let channel =
        id(&client.must(user, Method::POST, &format!("/workspaces/{ws}/channels"), Some(body)).await, "channel_id");
    client.post(user, channel, "hello".into(), None).await;

    let stats = client.read(user, &format!("/channels/{channel}/stats")).await;
    assert_eq!(stats["message_count"], 1, "{stats}");
    let found = client.read(user, &format!("/workspaces/{ws}/search?q=hello")).await;
    assert_eq!(found["total"], 1, "{found}");
    // The models are the real stores: the directory's table and the counters' keys.
    let postgres = sqlx::PgPool::connect(&pipeline.env[0].1).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM directory.channels WHERE channel_id = $1")
        .bind(channel)
        .fetch_one(&postgres)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    let prefix = &pipeline.env.iter().find(|(name, _)| *name == "QUIKAPP_REDIS_KEY_PREFIX").unwrap().1;
    let redis = redis::Client::open(pipeline.env[2].1.as_str()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let count: u64 =
        redis::cmd("ZCARD").arg(format!("{prefix}ch:{channel}:all")).query_async(&mut connection).await.unwrap();
    assert_eq!(count, 1);
    assert!(dev.stop().success(), "dev stops cleanly on SIGTERM");
}

/// A FerretDB server of the test's own (infra/local/ferretdb-instance), over the shared one's
/// PostgreSQL backend; killed when dropped.
struct FerretDb(std::process::Child);

impl FerretDb {
    async fn start(port: u16) -> FerretDb {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/local/ferretdb-instance");
        let child = std::process::Command::new(script)
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start FerretDB");
        let accepting = async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        deadline(std::time::Duration::from_secs(30), accepting).await.expect("FerretDB accepts connections");
        FerretDb(child)
    }
}

impl Drop for FerretDb {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The timelines' store stopped for a while mid-run (a FerretDB server of the test's own,
/// SIGKILLed): the other models keep up meanwhile, and once it is back the mongo projector
/// catches up with every message the event store holds.
#[tokio::test]
async fn a_read_model_store_stopped_mid_run_catches_up_and_loses_nothing() {
    let Some(mut pipeline) = Pipeline::new().await else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut ferretdb = FerretDb::start(port).await;
    pipeline.set("QUIKAPP_MONGO_URL", format!("mongodb://127.0.0.1:{port}/test_{}", Uuid::now_v7().simple()));
    let write = pipeline.start(&["write-api"], "write API");
    let _relay = pipeline.start(&["relay"], "relay");
    let _projectors =
        ["postgres", "redis", "mongo", "search"].map(|model| pipeline.start(&["project", model], "projector"));
    let read = pipeline.start(&["read-api"], "read API");
    let ada = Uuid::now_v7();
    let output = pipeline.command(&["token", &ada.to_string()]).output().unwrap();
    let client = Arc::new(Client {
        http: reqwest::Client::new(),
        write: write.url.clone(),
        read: read.url.clone(),
        tokens: HashMap::from([(ada, String::from_utf8(output.stdout).unwrap().trim().to_owned())]),
        expected: Mutex::default(),
    });
    let ws = id(&client.must(ada, Method::POST, "/workspaces", Some(json!({ "name": "acme" }))).await, "workspace_id");
    let body = json!({ "name": "general" });
    let general =
        id(&client.must(ada, Method::POST, &format!("/workspaces/{ws}/channels"), Some(body)).await, "channel_id");
    let post = |i: usize| {
        let client = client.clone();
        async move { client.post(ada, general, format!("message {i}"), None).await }
    };
    futures::stream::iter(0..200).map(post).buffered(16).collect::<Vec<_>>().await;
    client.read(ada, &format!("/channels/{general}/messages?limit=1")).await;

    drop(ferretdb);
    futures::stream::iter(200..400).map(post).buffered(16).collect::<Vec<_>>().await;
    let last = client.expected.lock().unwrap().last_position;
    // The other models keep up while the timelines' store is down.
    let stats = client.read(ada, &format!("/channels/{general}/stats")).await;
    assert_eq!(stats["message_count"], 400, "{stats}");
    let found = client.read(ada, &format!("/workspaces/{ws}/search?q=message&limit=1")).await;
    assert_eq!(found["total"], 400, "{found}");
    let projections: Value = client
        .http
        .get(format!("{}/v1/projections", client.read))
        .bearer_auth(&client.tokens[&ada])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mongo = projections["projections"].as_array().unwrap().iter().find(|p| p["name"] == "mongo").unwrap().clone();
    assert!(mongo["position"].as_str().unwrap().parse::<u64>().unwrap() < last, "{mongo}");

    ferretdb = FerretDb::start(port).await;
    // Caught up: the whole timeline, page by page, is every message the event store holds.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = client.read(ada, &format!("/channels/{general}/messages?limit=200&before={cursor}")).await;
        seen.extend(page["messages"].as_array().unwrap().iter().map(|m| m["message_id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    let store = sqlx::PgPool::connect(&pipeline.env[0].1).await.unwrap();
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT data->>'message_id' FROM events WHERE event_type = 'MessagePosted' AND channel_id = $1 \
         ORDER BY global_position DESC",
    )
    .bind(general)
    .fetch_all(&store)
    .await
    .unwrap();
    assert_eq!(stored.len(), 400);
    assert_eq!(seen, stored, "the timeline after the outage, newest first");
    drop(ferretdb);
}
