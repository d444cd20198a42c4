//! The compliance suite, run on every projector: the directory on PostgreSQL and in memory,
//! the counters on Redis and in memory.

use std::sync::Arc;

use quikapp_commands::store::contract::{fresh_postgres_database, service_url};
use quikapp_domain::event::timestamp;
use quikapp_domain::{Envelope, Event};
use quikapp_projections::compliance::{self, Cast, Store, scenario};
use quikapp_projections::counters::memory::MemoryKeyspace;
use quikapp_projections::counters::redis::RedisKeyspace;
use quikapp_projections::counters::{Counters, Keys};
use quikapp_projections::directory::Directory;
use quikapp_projections::directory::memory::MemoryDirectory;
use quikapp_projections::directory::postgres::{LIVE_SCHEMA, PostgresDirectory};
use quikapp_projections::search::opensearch::OpenSearch;
use quikapp_projections::search::sqlite::SqliteSearch;
use quikapp_projections::search::{Query, Search, words};
use quikapp_projections::timelines::Timelines;
use quikapp_projections::timelines::memory::MemoryTimelines;
use quikapp_projections::timelines::mongo::MongoTimelines;
use serde_json::{Value, json};
use uuid::Uuid;

// ------------------------------------------------------------------ the directory

async fn directory_snapshot(directory: &dyn Directory, c: &Cast) -> Value {
    let mut channels_seen = serde_json::Map::new();
    let mut roles = serde_json::Map::new();
    let mut private = serde_json::Map::new();
    for (name, user) in [("ada", c.ada), ("bob", c.bob), ("cy", c.cy)] {
        let seen: Vec<String> =
            directory.channels(c.workspace, user).await.unwrap().into_iter().map(|ch| ch.name).collect();
        channels_seen.insert(name.into(), json!(seen));
        roles.insert(name.into(), json!(directory.role(c.workspace, user).await.unwrap()));
        private.insert(name.into(), json!(directory.private_channels(c.workspace, user).await.unwrap()));
    }
    json!({
        "workspace": directory.workspace(c.workspace).await.unwrap(),
        "roles": roles,
        "channels_seen": channels_seen,
        "private_channels": private,
        "general": directory.channel(c.general).await.unwrap(),
        "secret": directory.channel(c.secret).await.unwrap(),
        "general_members": directory.members(c.general).await.unwrap(),
        "secret_members": directory.members(c.secret).await.unwrap(),
        "cy_in_secret": directory.is_member(c.secret, c.cy).await.unwrap(),
        "ada_in_secret": directory.is_member(c.secret, c.ada).await.unwrap(),
    })
}

fn joined_at(events: &[Envelope], channel: Uuid, user: Uuid) -> String {
    let joined = events
        .iter()
        .rev()
        .find(|e| matches!(&e.event, Event::ChannelMemberJoined(j) if j.channel_id == channel && j.user_id == user));
    timestamp::format(&joined.expect("a join").occurred_at)
}

fn expected_directory(c: &Cast, events: &[Envelope]) -> Value {
    json!({
        "workspace": { "workspace_id": c.workspace, "name": "acme", "owner_id": c.ada, "member_count": 3, "version": 3 },
        "roles": { "ada": "owner", "bob": "member", "cy": "admin" },
        "channels_seen": { "ada": ["secret", "town-square"], "bob": ["secret", "town-square"], "cy": ["town-square"] },
        "private_channels": { "ada": [c.secret], "bob": [c.secret], "cy": [] },
        "general": {
            "channel_id": c.general, "workspace_id": c.workspace, "name": "town-square", "topic": null,
            "private": false, "archived": false, "created_by": c.ada, "member_count": 2, "version": 4,
        },
        "secret": {
            "channel_id": c.secret, "workspace_id": c.workspace, "name": "secret", "topic": "plans",
            "private": true, "archived": true, "created_by": c.ada, "member_count": 2, "version": 7,
        },
        "general_members": [
            { "user_id": c.ada, "display_name": "Ada", "joined_at": joined_at(events, c.general, c.ada) },
            { "user_id": c.bob, "display_name": "Bob", "joined_at": joined_at(events, c.general, c.bob) },
        ],
        "secret_members": [
            { "user_id": c.ada, "display_name": "Ada", "joined_at": joined_at(events, c.secret, c.ada) },
            { "user_id": c.bob, "display_name": "Bob", "joined_at": joined_at(events, c.secret, c.bob) },
        ],
        "cy_in_secret": false,
        "ada_in_secret": true,
    })
}

async fn postgres_directory() -> Option<PostgresDirectory> {
    let url = fresh_postgres_database().await?;
    let directory = PostgresDirectory::connect(&url).await.expect("connect");
    directory.migrate().await.expect("migrate");
    directory.migrate().await.expect("migrating again changes nothing");
    Some(directory)
}

#[tokio::test]
async fn directory_in_memory_complies() {
    for check in 0..compliance::CHECKS {
        let (c, first) = (Cast::new(), Arc::new(MemoryDirectory::new()));
        let events = scenario(&c);
        let snapshot = || directory_snapshot(first.as_ref(), &c);
        let expected = expected_directory(&c, &events);
        compliance::check(check, first.as_ref(), first.as_ref(), Store::IN_MEMORY, &events, snapshot, expected).await;
    }
}

#[tokio::test]
async fn directory_on_postgres_complies() {
    for check in 0..compliance::CHECKS {
        let Some(first) = postgres_directory().await else { return };
        let c = Cast::new();
        let events = scenario(&c);
        let snapshot = || directory_snapshot(&first, &c);
        let expected = expected_directory(&c, &events);
        // A second member: another process's pool on the same database.
        let options = (*first.pool().connect_options()).clone();
        let second = PostgresDirectory::connect_with(options, LIVE_SCHEMA).await.unwrap();
        compliance::check(check, &first, &second, Store::ATOMIC, &events, snapshot, expected).await;
    }
}

// ------------------------------------------------------------------ the counters

async fn counters_snapshot(counters: &Counters, c: &Cast) -> Value {
    json!({
        "general": counters.stats(c.general).await.unwrap(),
        "secret": counters.stats(c.secret).await.unwrap(),
        "ada": counters.unread(c.ada).await.unwrap(),
        "bob": counters.unread(c.bob).await.unwrap(),
        "cy": counters.unread(c.cy).await.unwrap(),
    })
}

fn posted_at(events: &[Envelope], message: Uuid) -> String {
    let posted =
        events.iter().find(|e| matches!(&e.event, Event::MessagePosted(p) if p.message_id == message)).expect("posted");
    timestamp::format(&posted.occurred_at)
}

fn expected_counters(c: &Cast, events: &[Envelope]) -> Value {
    let by_channel = |mut unread: Vec<Value>| {
        unread.sort_by_key(|u| u["channel_id"].as_str().unwrap().to_owned());
        unread
    };
    let ada = by_channel(vec![
        json!({ "channel_id": c.general, "unread": 0 }),
        json!({ "channel_id": c.secret, "unread": 0 }),
    ]);
    // m5 came before Bob joined the secret channel: not unread.
    let bob = by_channel(vec![
        json!({ "channel_id": c.general, "unread": 1 }),
        json!({ "channel_id": c.secret, "unread": 0 }),
    ]);
    json!({
        "general": {
            "channel_id": c.general, "message_count": 3, "last_message_at": posted_at(events, c.m4),
            "last_message": { "message_id": c.m4, "author_id": c.ada, "preview": "final words" },
        },
        "secret": {
            "channel_id": c.secret, "message_count": 1, "last_message_at": posted_at(events, c.m5),
            "last_message": { "message_id": c.m5, "author_id": c.ada, "preview": "psst" },
        },
        "ada": ada,
        "bob": bob,
        "cy": [],
    })
}

async fn redis_counters() -> Option<Counters> {
    let url = service_url("QUIKAPP_REDIS_URL")?;
    let keys = Keys { prefix: format!("test:{}:", Uuid::now_v7()) };
    let keyspace = RedisKeyspace::connect(&url, keys.clone()).await.expect("connect to Redis");
    Some(Counters::new(Arc::new(keyspace), keys))
}

#[tokio::test]
async fn counters_in_memory_comply() {
    for check in 0..compliance::CHECKS {
        let c = Cast::new();
        let events = scenario(&c);
        let counters = Counters::new(Arc::new(MemoryKeyspace::new()), Keys::default());
        let snapshot = || counters_snapshot(&counters, &c);
        let expected = expected_counters(&c, &events);
        compliance::check(check, &counters, &counters, Store::IN_MEMORY, &events, snapshot, expected).await;
    }
}

#[tokio::test]
async fn counters_on_redis_comply() {
    for check in 0..compliance::CHECKS {
        let Some(counters) = redis_counters().await else { return };
        let c = Cast::new();
        let events = scenario(&c);
        let snapshot = || counters_snapshot(&counters, &c);
        let expected = expected_counters(&c, &events);
        // A second member: its own connection to the same keys.
        let url = service_url("QUIKAPP_REDIS_URL").unwrap();
        let keys = counters.keys().clone();
        let other = Counters::new(Arc::new(RedisKeyspace::connect(&url, keys.clone()).await.unwrap()), keys);
        compliance::check(check, &counters, &other, Store::ATOMIC, &events, snapshot, expected).await;
    }
}

// ------------------------------------------------------------------ the timelines

async fn timelines_snapshot(timelines: &dyn Timelines, c: &Cast) -> Value {
    json!({
        "general": timelines.page(c.general, None, 100).await.unwrap(),
        "general_before_m4": timelines.page(c.general, Some(position_of(timelines, c).await), 1).await.unwrap(),
        "secret": timelines.page(c.secret, None, 100).await.unwrap(),
        "m1": timelines.message(c.general, c.m1).await.unwrap(),
        "m2": timelines.message(c.general, c.m2).await.unwrap(),
        "m1_elsewhere": timelines.message(c.secret, c.m1).await.unwrap(),
        "thread": timelines.replies(c.general, c.m1).await.unwrap(),
    })
}

/// m4's position, read back (0 while m4 is not there).
async fn position_of(timelines: &dyn Timelines, c: &Cast) -> u64 {
    let m4 = timelines.message(c.general, c.m4).await.unwrap();
    m4.map_or(0, |m| m.position.parse().unwrap())
}

fn expected_timelines(c: &Cast, events: &[Envelope]) -> Value {
    let at = |message: Uuid, kind: &str| {
        let event = events
            .iter()
            .rev()
            .find(|e| e.stream_id == format!("message-{message}") && e.event.type_name() == kind)
            .expect("the event");
        (timestamp::format(&event.occurred_at), event.global_position)
    };
    let (m1_at, m1_position) = at(c.m1, "MessagePosted");
    let (m3_at, m3_position) = at(c.m3, "MessagePosted");
    let (m4_at, m4_position) = at(c.m4, "MessagePosted");
    let (m4_edited, _) = at(c.m4, "MessageEdited");
    let (m5_at, m5_position) = at(c.m5, "MessagePosted");
    let message = |id: Uuid,
                   author: Uuid,
                   text: &str,
                   root: Option<Uuid>,
                   replies: u64,
                   reactions: Value,
                   posted: &str,
                   edited: Option<&str>,
                   position: u64,
                   version: u64,
                   channel: Uuid| {
        json!({
            "message_id": id, "channel_id": channel, "author_id": author, "text": text, "thread_root_id": root,
            "reply_count": replies, "reactions": reactions, "posted_at": posted, "edited_at": edited,
            "position": position.to_string(), "version": version,
        })
    };
    let m1 = message(c.m1, c.ada, "hello", None, 1, json!({ "tada": [c.cy] }), &m1_at, None, m1_position, 2, c.general);
    let m3 = message(c.m3, c.bob, "a reply", Some(c.m1), 0, json!({}), &m3_at, None, m3_position, 1, c.general);
    let m4 =
        message(c.m4, c.ada, "final words", None, 0, json!({}), &m4_at, Some(&m4_edited), m4_position, 2, c.general);
    let m5 = message(c.m5, c.ada, "psst", None, 0, json!({}), &m5_at, None, m5_position, 1, c.secret);
    json!({
        "general": [m4, m1.clone()],
        "general_before_m4": [m1.clone()],
        "secret": [m5],
        "m1": m1,
        "m2": null,
        "m1_elsewhere": null,
        "thread": [m3],
    })
}

/// Timelines in a database of their own, and its URL.
async fn mongo_timelines() -> Option<(MongoTimelines, String)> {
    let url = service_url("QUIKAPP_MONGO_URL")?;
    let (base, _) = url.split_once("?").unwrap_or((&url, ""));
    let database = format!("{}/test_{}", base.trim_end_matches('/'), Uuid::now_v7().simple());
    let timelines = MongoTimelines::connect(&database).await.expect("connect to MongoDB");
    timelines.migrate().await.expect("migrate");
    timelines.migrate().await.expect("migrating again changes nothing");
    Some((timelines, database))
}

#[tokio::test]
async fn timelines_in_memory_comply() {
    for check in 0..compliance::CHECKS {
        let (c, first) = (Cast::new(), Arc::new(MemoryTimelines::new()));
        let events = scenario(&c);
        let snapshot = || timelines_snapshot(first.as_ref(), &c);
        let expected = expected_timelines(&c, &events);
        compliance::check(check, first.as_ref(), first.as_ref(), Store::IN_MEMORY, &events, snapshot, expected).await;
    }
}

#[tokio::test]
async fn timelines_on_mongo_comply() {
    for check in 0..compliance::CHECKS {
        let Some((first, first_url)) = mongo_timelines().await else { return };
        let c = Cast::new();
        let events = scenario(&c);
        let snapshot = || timelines_snapshot(&first, &c);
        let expected = expected_timelines(&c, &events);
        // Idempotent writes rather than one atomic step, and no fence for two members at the
        // same moment: FerretDB has no transactions and its conditional update is not atomic
        // (see the timelines module). One after the other, members are fenced.
        let second = MongoTimelines::connect(&first_url).await.unwrap();
        let store = Store { fenced: false, can_be_cut_short: true, atomic: false };
        compliance::check(check, &first, &second, store, &events, snapshot, expected).await;
    }
}

// ------------------------------------------------------------------ search

async fn search_snapshot(search: &dyn Search, c: &Cast) -> Value {
    // `private`: the private channels the caller is in.
    let find = |q: &'static str, channel: Option<Uuid>, private: Vec<Uuid>, author: Option<Uuid>| {
        let query = Query { workspace_id: c.workspace, channel, private, author, words: words(q), limit: 10 };
        async move { serde_json::to_value(search.search(&query).await.unwrap()).unwrap() }
    };
    let elsewhere = Query { workspace_id: Uuid::now_v7(), words: words("hello"), limit: 10, ..Query::default() };
    json!({
        // Porter stems: "replies" finds "reply"; the deleted reply m6 is gone.
        "replies": find("replies", None, vec![], None).await,
        "final_words": find("Final WORDS!", None, vec![], None).await,
        "diacritics": find("héllo", None, vec![], None).await,
        "every_word": find("hello words", None, vec![], None).await["total"],
        "edited_away": find("draft", None, vec![], None).await["total"],
        "deleted": find("hi", None, vec![], None).await["total"],
        "secret_elsewhere": find("psst", Some(c.general), vec![c.secret], None).await["total"],
        "secret_to_outsiders": find("psst", None, vec![], None).await["total"],
        "secret": find("psst", Some(c.secret), vec![c.secret], None).await,
        "secret_to_members": find("psst", None, vec![c.secret], None).await["total"],
        "by_ada": find("reply", None, vec![c.secret], Some(c.ada)).await["total"],
        "by_bob": find("reply", None, vec![], Some(c.bob)).await["total"],
        "other_workspace": search.search(&elsewhere).await.unwrap().total,
    })
}

fn expected_search(c: &Cast, events: &[Envelope]) -> Value {
    let messages = expected_timelines(c, events);
    let hit = |message: &Value, highlight: &str| {
        let mut hit = message.clone();
        hit["highlight"] = json!(highlight);
        json!({ "hits": [hit], "total": 1 })
    };
    json!({
        "replies": hit(&messages["thread"][0], "a <em>reply</em>"),
        "final_words": hit(&messages["general"][0], "<em>final</em> <em>words</em>"),
        "diacritics": hit(&messages["m1"], "<em>hello</em>"),
        "every_word": 0,
        "edited_away": 0,
        "deleted": 0,
        "secret_elsewhere": 0,
        "secret_to_outsiders": 0,
        "secret_to_members": 1,
        "secret": hit(&messages["secret"][0], "<em>psst</em>"),
        "by_ada": 0,
        "by_bob": 1,
        "other_workspace": 0,
    })
}

#[tokio::test]
async fn search_in_memory_complies() {
    for check in 0..compliance::CHECKS {
        let (c, first) = (Cast::new(), SqliteSearch::in_memory().await.unwrap());
        let events = scenario(&c);
        let snapshot = || search_snapshot(&first, &c);
        let expected = expected_search(&c, &events);
        compliance::check(check, &first, &first, Store::ATOMIC, &events, snapshot, expected).await;
    }
}

#[tokio::test]
async fn search_on_opensearch_complies() {
    let Some(url) = service_url("QUIKAPP_ELASTICSEARCH_URL") else { return };
    for check in 0..compliance::CHECKS {
        let prefix = format!("test-{}-", Uuid::now_v7().simple());
        let first = OpenSearch::connect(&url, &prefix).unwrap();
        first.migrate().await.expect("migrate");
        first.migrate().await.expect("migrating again changes nothing");
        let second = OpenSearch::connect(&url, &prefix).unwrap();
        let c = Cast::new();
        let events = scenario(&c);
        let snapshot = || search_snapshot(&first, &c);
        let expected = expected_search(&c, &events);
        // Versioned documents, then the progress in a compare-and-set: fenced, not atomic.
        let store = Store { fenced: true, can_be_cut_short: true, atomic: false };
        compliance::check(check, &first, &second, store, &events, snapshot, expected).await;
        first.delete().await.unwrap();
    }
}

// ------------------------------------------------------------------ the runtime

use std::time::Duration;

use quikapp_bus::embedded::EmbeddedBus;
use quikapp_bus::kafka::{KafkaBus, KafkaConfig, KafkaPublisher};
use quikapp_bus::{EventBus, Partition, Topics};
use quikapp_commands::store::contract::{fresh_postgres, fresh_sqlite};
use quikapp_commands::store::{AppendRequest, EventStore, NewEvent};
use quikapp_projections::compliance::PARTITIONS;
use quikapp_projections::runtime::{Runtime, RuntimeConfig};
use quikapp_projections::{Projector, applied_position};

/// Appends `events` as they are, each after its stream's previous one.
async fn append_all(store: &dyn EventStore, events: &[Envelope]) {
    for e in events {
        let event = NewEvent {
            event_id: e.event_id,
            event: e.event.clone(),
            workspace_id: e.workspace_id,
            channel_id: e.channel_id,
            actor_id: e.actor_id,
            occurred_at: e.occurred_at,
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
        };
        let request = AppendRequest {
            stream_id: e.stream_id.clone(),
            expected_version: e.stream_version - 1,
            events: vec![event],
            ..Default::default()
        };
        store.append(request).await.expect("append");
    }
}

/// `count` messages by `author` in a channel of their own, after the scenario.
fn noise(c: &Cast, count: usize) -> (Uuid, Vec<Envelope>) {
    let channel = Uuid::now_v7();
    let events = (0..count)
        .map(|i| {
            let message_id = Uuid::now_v7();
            Envelope {
                event_id: Uuid::now_v7(),
                event: quikapp_domain::event::MessagePosted {
                    message_id,
                    channel_id: channel,
                    author_id: c.bob,
                    text: format!("noise {i}"),
                    thread_root_id: None,
                }
                .into(),
                schema_version: 1,
                stream_id: format!("message-{message_id}"),
                stream_version: 1,
                global_position: 0,
                workspace_id: Some(c.workspace),
                channel_id: Some(channel),
                actor_id: c.bob,
                occurred_at: timestamp::now(),
                correlation_id: Uuid::now_v7(),
                causation_id: Uuid::now_v7(),
            }
        })
        .collect();
    (channel, events)
}

fn runtime(projector: Arc<dyn Projector>, bus: Arc<dyn EventBus>, group_prefix: &str) -> tokio::task::JoinHandle<()> {
    let config = RuntimeConfig {
        batch_size: 50,
        max_backoff: Duration::from_millis(500),
        group_prefix: group_prefix.into(),
        ..RuntimeConfig::default()
    };
    tokio::spawn(Runtime { projector, bus, config }.run(std::future::pending()))
}

/// Waits (bounded) until `projector` has applied `head` on every partition.
async fn caught_up(projector: &dyn Projector, partitions: &[Partition], head: u64) {
    let waiting = async {
        while applied_position(&projector.stored().await.unwrap(), partitions) < head {
            projector.changed().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(90), waiting).await.expect("the model reached the head");
}

#[tokio::test]
async fn the_runtime_builds_both_models_from_the_embedded_bus_and_resumes_after_a_restart() {
    let store = fresh_sqlite().await;
    let c = Cast::new();
    let events = scenario(&c);
    let bus: Arc<dyn EventBus> = Arc::new(EmbeddedBus::new(store.clone(), Topics::default(), PARTITIONS));
    let partitions = Topics::default().partitions(PARTITIONS);
    let directory = Arc::new(MemoryDirectory::new());
    let counters = Counters::new(Arc::new(MemoryKeyspace::new()), Keys::default());
    let projectors: [Arc<dyn Projector>; 2] = [directory.clone(), Arc::new(counters.clone())];

    let half = events.len() / 2;
    append_all(store.as_ref(), &events[..half]).await;
    let running: Vec<_> = projectors.iter().map(|p| runtime(p.clone(), bus.clone(), "")).collect();
    for projector in &projectors {
        caught_up(projector.as_ref(), &partitions, half as u64).await;
    }
    // A restart: new runtimes over the same models, which read their stored offsets.
    running.iter().for_each(|task| task.abort());
    append_all(store.as_ref(), &events[half..]).await;
    let (noise_channel, noise) = noise(&c, 120);
    append_all(store.as_ref(), &noise).await;
    let head = store.head().await.unwrap();
    let _running: Vec<_> = projectors.iter().map(|p| runtime(p.clone(), bus.clone(), "")).collect();
    for projector in &projectors {
        caught_up(projector.as_ref(), &partitions, head).await;
    }
    assert_eq!(directory_snapshot(directory.as_ref(), &c).await, expected_directory(&c, &events));
    assert_eq!(counters_snapshot(&counters, &c).await, expected_counters(&c, &events));
    assert_eq!(counters.stats(noise_channel).await.unwrap().message_count, 120, "each message counted once");
}

struct KafkaFixture {
    brokers: String,
    topics: Topics,
    store: Arc<quikapp_commands::store::PostgresStore>,
    bus: Arc<dyn EventBus>,
    _relay: quikapp_bus::testing::RunningRelay,
}

async fn kafka_fixture() -> Option<KafkaFixture> {
    let brokers = service_url("QUIKAPP_KAFKA_BROKERS")?;
    let store = fresh_postgres().await?;
    let topics = quikapp_bus::testing::fresh_topics();
    let config = KafkaConfig {
        brokers: brokers.clone(),
        topics: topics.clone(),
        partitions: PARTITIONS,
        options: Default::default(),
    };
    let publisher = Arc::new(KafkaPublisher::connect(&config).await.expect("connect to Kafka"));
    let relay = quikapp_bus::testing::spawn_relay(store.clone(), publisher);
    let bus = Arc::new(KafkaBus { brokers: brokers.clone(), topics: topics.clone(), partitions: PARTITIONS });
    Some(KafkaFixture { brokers, topics, store, bus, _relay: relay })
}

#[tokio::test]
async fn two_members_of_a_group_share_the_partitions_and_one_leaving_loses_and_doubles_nothing() {
    let Some(kafka) = kafka_fixture().await else { return };
    let Some(redis) = service_url("QUIKAPP_REDIS_URL") else { return };
    let group = format!("test-{}-", Uuid::now_v7());
    let partitions = kafka.topics.partitions(PARTITIONS);
    let directory = Arc::new(
        PostgresDirectory::connect_with((*kafka.store.pool().connect_options()).clone(), LIVE_SCHEMA).await.unwrap(),
    );
    directory.migrate().await.unwrap();
    let keys = Keys { prefix: format!("test:{}:", Uuid::now_v7()) };
    let counters = Counters::new(Arc::new(RedisKeyspace::connect(&redis, keys.clone()).await.unwrap()), keys);
    let projectors: [Arc<dyn Projector>; 2] = [directory.clone(), Arc::new(counters.clone())];

    let c = Cast::new();
    let events = scenario(&c);
    let (noise_channel, noise) = noise(&c, 600);
    append_all(kafka.store.as_ref(), &events).await;
    let first: Vec<_> = projectors.iter().map(|p| runtime(p.clone(), kafka.bus.clone(), &group)).collect();
    append_all(kafka.store.as_ref(), &noise[..300]).await;
    let second: Vec<_> = projectors.iter().map(|p| runtime(p.clone(), kafka.bus.clone(), &group)).collect();
    append_all(kafka.store.as_ref(), &noise[300..450]).await;
    // The first members go away mid-stream; the group gives their partitions to the others.
    first.iter().for_each(|task| task.abort());
    append_all(kafka.store.as_ref(), &noise[450..]).await;
    let head = kafka.store.head().await.unwrap();
    for projector in &projectors {
        caught_up(projector.as_ref(), &partitions, head).await;
    }
    assert_eq!(directory_snapshot(directory.as_ref(), &c).await, expected_directory(&c, &events));
    assert_eq!(counters_snapshot(&counters, &c).await, expected_counters(&c, &events));
    assert_eq!(counters.stats(noise_channel).await.unwrap().message_count, 600, "each message counted once");
    drop(second);
}

#[tokio::test]
async fn poison_records_go_to_the_dead_letter_topic_and_the_rest_applies() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some(kafka) = kafka_fixture().await else { return };
    let partitions = kafka.topics.partitions(PARTITIONS);
    let c = Cast::new();
    let events = scenario(&c);
    append_all(kafka.store.as_ref(), &events).await;
    quikapp_bus::testing::checkpoint_reaches(kafka.store.pool(), events.len() as u64).await;

    // Two records this build cannot apply, on the general channel's partition: one that is not
    // an event at all, and one of a schema_version from the future.
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &kafka.brokers).create().unwrap();
    let mut future = serde_json::to_value(&events[12]).unwrap();
    future["schema_version"] = json!(99);
    let key = c.general.to_string();
    for payload in [b"{not json".to_vec(), serde_json::to_vec(&future).unwrap()] {
        let headers = OwnedHeaders::new().insert(Header { key: "type", value: Some("MessagePosted") });
        let record = FutureRecord::to(&kafka.topics.messages).key(&key).payload(&payload).headers(headers);
        producer.send(record, Duration::from_secs(10)).await.expect("produce");
    }
    let (noise_channel, noise) = noise(&c, 30);
    append_all(kafka.store.as_ref(), &noise).await;
    let head = kafka.store.head().await.unwrap();

    let directory = Arc::new(MemoryDirectory::new());
    let counters = Counters::new(Arc::new(MemoryKeyspace::new()), Keys::default());
    let group = format!("test-{}-", Uuid::now_v7());
    let _running = [
        runtime(directory.clone(), kafka.bus.clone(), &group),
        runtime(Arc::new(counters.clone()), kafka.bus.clone(), &group),
    ];
    caught_up(directory.as_ref(), &partitions, head).await;
    caught_up(&counters, &partitions, head).await;
    assert_eq!(directory.stored().await.unwrap().dead_lettered, 2);
    assert_eq!(counters.stored().await.unwrap().dead_lettered, 2);
    assert_eq!(directory_snapshot(directory.as_ref(), &c).await, expected_directory(&c, &events));
    assert_eq!(counters.stats(noise_channel).await.unwrap().message_count, 30);

    // Each model set both aside, keyed by channel, with its name and the error in headers.
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("test-{}", Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&kafka.topics.dead_letters()]).unwrap();
    let mut letters = Vec::new();
    while letters.len() < 4 {
        let message =
            tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("4 dead letters").unwrap();
        let header = |name: &str| {
            message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == name))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(message.key(), Some(key.as_bytes()));
        assert!(!header("error").unwrap_or_default().is_empty(), "the error in a header");
        letters.push(header("model").expect("the model in a header"));
    }
    letters.sort();
    assert_eq!(letters, ["postgres", "postgres", "redis", "redis"]);
}

#[tokio::test]
async fn a_reader_whose_offset_is_gone_from_the_topic_is_told_rather_than_skipped_ahead() {
    let Some(kafka) = kafka_fixture().await else { return };
    let c = Cast::new();
    append_all(kafka.store.as_ref(), &scenario(&c)).await;
    let mut subscription = kafka.bus.subscribe(&format!("test-{}", Uuid::now_v7())).await.unwrap();
    let reading = async {
        // The first partition read is sought past its end, as a model kept from a topic made
        // again would have it: Kafka answers from the start, which the reader must not take.
        let partition = loop {
            if let Some((partition, _)) = subscription.poll(10, Duration::from_secs(1)).await.unwrap().first() {
                break partition.clone();
            }
        };
        subscription.seek(&partition, Some(1_000_000)).await.unwrap();
        loop {
            match subscription.poll(100, Duration::from_secs(1)).await {
                Ok(records) => assert!(records.iter().all(|(p, _)| *p != partition), "a record from before the offset"),
                Err(error) => break error.to_string(),
            }
        }
    };
    let error = tokio::time::timeout(Duration::from_secs(60), reading).await.expect("the reader is told");
    assert!(error.contains("records were deleted"), "{error}");
}
