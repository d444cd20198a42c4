//! Replay benchmark: `quikapp replay`'s engine rebuilding each read model from a PostgreSQL
//! event store of `--events` events, next to a raw bulk write of the same final rows,
//! documents or keys into the same store, in the same run.
//!
//! - **postgres**: a history of channels and member joins (what the directory keeps); raw:
//!   multi-row INSERTs of the final users, channels and members.
//! - **redis**, **search**, **mongo**: a history of messages in 1,000 channels (a tenth of them
//!   thread replies, then edits and reactions); raw: pipelined ZADD/HSET of the same keys, `_bulk`
//!   of the same folded documents, `insert_many` of the same folded messages (two at a time,
//!   as the model sends them).
//!
//! The rebuild is the whole history phase of a replay (store pages read ahead, one batch per
//! page, progress stored with each) and the indexes made after it; catch-up and swap follow
//! the live head and take a moment.
//! Run it with `bench/replay` (release build, starts the services).

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use futures::StreamExt;
use mongodb::bson::{Document as Bson, doc};
use quikapp_bench::{channel_created, envelope, posted};
use quikapp_commands::store::{EventStore, PostgresStore, contract};
use quikapp_domain::Envelope;
use quikapp_domain::event::{
    ChannelMemberJoined, MessageEdited, MessagePosted, ReactionAdded, WorkspaceCreated, WorkspaceMemberAdded,
};
use quikapp_domain::workspace::Role;
use quikapp_projections::counters::redis::{RedisKeyspace, RedisVersions};
use quikapp_projections::counters::{Counters, Keys, Op, ops_of};
use quikapp_projections::directory::postgres::{PostgresDirectory, PostgresVersions};
use quikapp_projections::replay::{Replay, ReplayOptions, Report, Source, Summary, Versions};
use quikapp_projections::search::opensearch::{OpenSearch, OpenSearchVersions, source};
use quikapp_projections::search::{Known, fold};
use quikapp_projections::timelines::mongo::{MongoTimelines, MongoVersions};
use serde_json::json;
use uuid::Uuid;

/// PostgreSQL comes from QUIKAPP_POSTGRES_URL: the bench makes two databases of its own there.
#[derive(Parser)]
struct Args {
    #[arg(long, env = "QUIKAPP_REDIS_URL")]
    redis_url: String,
    #[arg(long, env = "QUIKAPP_MONGO_URL")]
    mongo_url: String,
    #[arg(long, env = "QUIKAPP_ELASTICSEARCH_URL")]
    elasticsearch_url: String,
    /// Events in each history.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events per batch (a replay's --batch-size).
    #[arg(long, default_value_t = 10_000)]
    batch: u32,
    /// The Redis logical databases of the live counters, the rebuild and the raw writes:
    /// emptied by the bench.
    #[arg(long, default_value_t = 13)]
    redis_db: i64,
    /// Only these models (postgres, redis, search, mongo).
    #[arg(long, value_delimiter = ',', default_value = "postgres,redis,search,mongo")]
    models: Vec<String>,
}

const CHANNELS: usize = 1_000;
const USERS: usize = 1_000;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut results = Vec::new();
    if args.models.iter().any(|m| m == "postgres") {
        results.push(directory(&args).await.context("postgres")?);
    }
    let wants = |model: &str| args.models.iter().any(|m| m == model);
    if wants("redis") || wants("search") || wants("mongo") {
        let (store, events) = seeded(messages_history(args.events)).await?;
        println!("messages history: {} events", events.len());
        if wants("redis") {
            results.push(counters(&args, &store, &events).await.context("redis")?);
        }
        if wants("search") {
            results.push(search(&args, &store, &events).await.context("search")?);
        }
        if wants("mongo") {
            results.push(timelines(&args, &store, &events).await.context("mongo")?);
        }
    }
    println!();
    println!("model     events   rebuild s   events/s     raw s   rebuild/raw (target >= 0.7)");
    for (summary, raw) in &results {
        println!(
            "{:<8} {:>7} {:>11.1} {:>10.0} {:>9.1} {:>8.2}x",
            summary.model,
            summary.events,
            summary.seconds,
            summary.events_per_second,
            raw,
            raw / summary.seconds
        );
    }
    let all: f64 = results.iter().map(|(summary, _)| summary.seconds).sum();
    println!("rebuilding all {} models one after another (as `quikapp replay all`): {all:.1} s", results.len());
    Ok(())
}

/// A fresh event store holding `events`, written in pages as the store writes them.
async fn seeded(events: Vec<Envelope>) -> Result<(Arc<dyn EventStore>, Vec<Envelope>)> {
    let url = contract::fresh_postgres_database().await.context("QUIKAPP_POSTGRES_URL")?;
    let store = PostgresStore::connect(&url).await?;
    store.migrate().await?;
    let started = Instant::now();
    for page in events.chunks(10_000) {
        insert(store.pool(), page).await?;
    }
    println!("seeded {} events in {:.1} s", events.len(), started.elapsed().as_secs_f64());
    // As history sits in a store up for a while: vacuumed (hint bits set, statistics known).
    sqlx::query("VACUUM ANALYZE events").execute(store.pool()).await?;
    Ok((Arc::new(store), events))
}

async fn insert(pool: &sqlx::PgPool, events: &[Envelope]) -> Result<()> {
    let data: Vec<String> =
        events.iter().map(|e| serde_json::to_value(&e.event).unwrap()["data"].to_string()).collect();
    sqlx::query(
        "INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type, schema_version,
             workspace_id, channel_id, actor_id, occurred_at, correlation_id, causation_id, data)
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::int[],
             $7::uuid[], $8::uuid[], $9::uuid[], $10::timestamptz[], $11::uuid[], $12::uuid[], $13::json[])",
    )
    .bind(events.iter().map(|e| e.global_position as i64).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.stream_id.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.stream_version as i64).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.event.type_name().to_owned()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.schema_version as i32).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.workspace_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.channel_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.actor_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.correlation_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.causation_id).collect::<Vec<_>>())
    .bind(data)
    .execute(pool)
    .await?;
    Ok(())
}

/// Prints nothing: the bench times the whole.
struct Quiet;

impl Report for Quiet {
    fn progress(&self, _: &str, _: u64, _: u64) {}
    fn step(&self, _: &str, _: &str) {}
}

/// The history phase of a replay of `model` into `versions`' rebuild.
async fn rebuild(
    model: &'static str,
    store: &Arc<dyn EventStore>,
    versions: Arc<dyn Versions>,
    args: &Args,
) -> Result<Summary> {
    let options = ReplayOptions {
        source: Source::Store,
        restart: true,
        keep_old: false,
        dry_run: true,
        verify: false,
        batch_size: args.batch,
        runtime: Default::default(),
    };
    let replay = Replay { model, store: store.clone(), bus: None, versions, options };
    checkpoint(&args.redis_url).await?;
    let summary = replay.run(&Quiet).await?;
    println!("{model}: rebuilt from {} events in {:.1} s", summary.events, summary.seconds);
    Ok(summary)
}

/// Flushes what the phases before left dirty in PostgreSQL (the event store's seeding, a
/// rebuild's rows, FerretDB's tables), and waits out a rewrite of Redis's append-only file the
/// phase before started, so that a timed phase does not pay for them.
async fn checkpoint(redis_url: &str) -> Result<()> {
    use sqlx::Connection;
    let url = std::env::var("QUIKAPP_POSTGRES_URL").context("QUIKAPP_POSTGRES_URL")?;
    let mut connection = sqlx::PgConnection::connect(&url).await?;
    sqlx::query("CHECKPOINT").execute(&mut connection).await?;
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(std::time::Duration::from_secs(60)));
    let mut redis = redis::Client::open(redis_url)?.get_multiplexed_async_connection_with_config(&config).await?;
    let persisting = |info: &str| {
        info.lines().any(|line| ["aof_rewrite_in_progress:1", "rdb_bgsave_in_progress:1"].contains(&line.trim()))
    };
    let started = Instant::now();
    while persisting(&redis::cmd("INFO").arg("persistence").query_async::<String>(&mut redis).await?) {
        ensure!(started.elapsed() < std::time::Duration::from_secs(300), "Redis still persisting after 5 minutes");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}

fn timed(started: Instant, what: &str) -> f64 {
    let seconds = started.elapsed().as_secs_f64();
    println!("{what}: {seconds:.1} s");
    seconds
}

// ------------------------------------------------------------------ the directory

/// A workspace of USERS members, then channels, each created and joined by 9 members.
fn directory_history(events: u64) -> Vec<Envelope> {
    let (workspace, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let users: Vec<Uuid> = (0..USERS).map(|_| Uuid::now_v7()).collect();
    let mut history = Vec::with_capacity(events as usize);
    let created = WorkspaceCreated { workspace_id: workspace, name: "acme".into(), owner_id: owner };
    let mut first = envelope(1, format!("workspace-{workspace}"), 1, Uuid::nil(), created.into());
    (first.workspace_id, first.channel_id) = (Some(workspace), None);
    history.push(first);
    for (i, user) in users.iter().enumerate() {
        let added =
            WorkspaceMemberAdded { workspace_id: workspace, user_id: *user, role: Role::Member, added_by: owner };
        let position = history.len() as u64 + 1;
        let mut event = envelope(position, format!("workspace-{workspace}"), i as u64 + 2, Uuid::nil(), added.into());
        (event.workspace_id, event.channel_id) = (Some(workspace), None);
        history.push(event);
    }
    let mut i = 0;
    while (history.len() as u64) < events {
        let channel = Uuid::now_v7();
        history.push(channel_created(history.len() as u64 + 1, i, channel, workspace, owner));
        for (version, user) in users.iter().cycle().skip(i * 9).take(9).enumerate() {
            let joined = ChannelMemberJoined { channel_id: channel, user_id: *user, added_by: *user };
            let mut event = envelope(
                history.len() as u64 + 1,
                format!("channel-{channel}"),
                version as u64 + 2,
                channel,
                joined.into(),
            );
            event.workspace_id = Some(workspace);
            history.push(event);
        }
        i += 1;
    }
    history.truncate(events as usize);
    history
}

async fn directory(args: &Args) -> Result<(Summary, f64)> {
    let (store, events) = seeded(directory_history(args.events)).await?;
    let url = contract::fresh_postgres_database().await.context("QUIKAPP_POSTGRES_URL")?;
    let live = Arc::new(PostgresDirectory::connect(&url).await?);
    live.migrate().await?;
    let summary = rebuild("postgres", &store, Arc::new(PostgresVersions::new(live.clone())), args).await?;

    // Raw: the same final rows, into tables made like the model's.
    let pool = live.pool();
    sqlx::raw_sql(
        "CREATE SCHEMA raw;
         CREATE TABLE raw.workspace_members (LIKE directory.workspace_members INCLUDING ALL);
         CREATE TABLE raw.channels (LIKE directory.channels INCLUDING ALL);
         CREATE TABLE raw.channel_members (LIKE directory.channel_members INCLUDING ALL);",
    )
    .execute(pool)
    .await?;
    checkpoint(&args.redis_url).await?;
    let started = Instant::now();
    let (mut members, mut channels, mut joins) = (vec![], vec![], vec![]);
    for event in &events {
        match &event.event {
            quikapp_domain::Event::WorkspaceCreated(e) => members.push((e.workspace_id, e.owner_id, event.occurred_at)),
            quikapp_domain::Event::WorkspaceMemberAdded(e) => {
                members.push((e.workspace_id, e.user_id, event.occurred_at))
            }
            quikapp_domain::Event::ChannelCreated(e) => {
                channels.push((e.channel_id, e.workspace_id, e.name.clone(), e.created_by))
            }
            quikapp_domain::Event::ChannelMemberJoined(e) => joins.push((e.channel_id, e.user_id, event.occurred_at)),
            _ => {}
        }
    }
    for chunk in members.chunks(10_000) {
        sqlx::query(
            "INSERT INTO raw.workspace_members SELECT w, u, 'member', at
             FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[]) AS t(w, u, at)",
        )
        .bind(chunk.iter().map(|m| m.0).collect::<Vec<_>>())
        .bind(chunk.iter().map(|m| m.1).collect::<Vec<_>>())
        .bind(chunk.iter().map(|m| m.2).collect::<Vec<_>>())
        .execute(pool)
        .await?;
    }
    for chunk in channels.chunks(10_000) {
        sqlx::query(
            "INSERT INTO raw.channels SELECT c, w, n, NULL, false, false, b, 1
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::uuid[]) AS t(c, w, n, b)",
        )
        .bind(chunk.iter().map(|c| c.0).collect::<Vec<_>>())
        .bind(chunk.iter().map(|c| c.1).collect::<Vec<_>>())
        .bind(chunk.iter().map(|c| c.2.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|c| c.3).collect::<Vec<_>>())
        .execute(pool)
        .await?;
    }
    for chunk in joins.chunks(10_000) {
        sqlx::query("INSERT INTO raw.channel_members SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[])")
            .bind(chunk.iter().map(|j| j.0).collect::<Vec<_>>())
            .bind(chunk.iter().map(|j| j.1).collect::<Vec<_>>())
            .bind(chunk.iter().map(|j| j.2).collect::<Vec<_>>())
            .execute(pool)
            .await?;
    }
    let raw = timed(started, "postgres raw: the same rows by multi-row INSERTs");
    let count = |table: &str| format!("SELECT count(*) FROM {table}");
    for table in ["channels", "channel_members", "workspace_members"] {
        let rebuilt: i64 = sqlx::query_scalar(&count(&format!("directory_rebuild.{table}"))).fetch_one(pool).await?;
        let written: i64 = sqlx::query_scalar(&count(&format!("raw.{table}"))).fetch_one(pool).await?;
        ensure!(rebuilt == written, "{table}: {rebuilt} rebuilt, {written} raw");
    }
    // The rebuild made its indexes after its history (in its time); the raw tables have them
    // all along.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'directory_rebuild' AND indexname LIKE '%_by_%'
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    ensure!(indexes == ["channel_members_by_user", "channels_by_workspace"], "rebuilt with {indexes:?}");
    Ok((summary, raw))
}

// ------------------------------------------------------------------ messages

/// Channels of 10 members each, then messages: every tenth a reply to the channel's latest
/// top-level one, every twentieth event an edit of the latest message, every twentieth a
/// reaction to it.
fn messages_history(events: u64) -> Vec<Envelope> {
    let (workspace, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let users: Vec<Uuid> = (0..USERS).map(|_| Uuid::now_v7()).collect();
    let channels: Vec<Uuid> = (0..CHANNELS).map(|_| Uuid::now_v7()).collect();
    let mut history: Vec<Envelope> = Vec::with_capacity(events as usize);
    let mut stream_versions: HashMap<Uuid, u64> = HashMap::new();
    for (i, channel) in channels.iter().enumerate() {
        history.push(channel_created(history.len() as u64 + 1, i, *channel, workspace, owner));
        for (version, user) in users.iter().skip(i % 100 * 10).take(10).enumerate() {
            let joined = ChannelMemberJoined { channel_id: *channel, user_id: *user, added_by: *user };
            let mut event = envelope(
                history.len() as u64 + 1,
                format!("channel-{channel}"),
                version as u64 + 2,
                *channel,
                joined.into(),
            );
            event.workspace_id = Some(workspace);
            history.push(event);
        }
    }
    let mut latest: HashMap<Uuid, (Uuid, Uuid)> = HashMap::new(); // channel → (latest message, latest root)
    let mut n = 0usize;
    while (history.len() as u64) < events {
        n += 1;
        let channel = channels[n % CHANNELS];
        let author = users[n % CHANNELS % 100 * 10 + n % 10];
        let position = history.len() as u64 + 1;
        let event = match (n % 20, latest.get(&channel)) {
            (0, Some((message, _))) => {
                let version = stream_versions.entry(*message).or_insert(1);
                *version += 1;
                let edited = MessageEdited { message_id: *message, channel_id: channel, text: format!("edited {n}") };
                envelope(position, format!("message-{message}"), *version, channel, edited.into())
            }
            (10, Some((message, _))) => {
                let version = stream_versions.entry(*message).or_insert(1);
                *version += 1;
                let reaction =
                    ReactionAdded { message_id: *message, channel_id: channel, user_id: author, emoji: "tada".into() };
                envelope(position, format!("message-{message}"), *version, channel, reaction.into())
            }
            (_, found) => {
                let message = Uuid::now_v7();
                let root = found.map(|(_, root)| *root).filter(|_| n % 10 == 3);
                let mut event = posted(position, message, channel, author);
                if let Some(root) = root {
                    let text = format!("reply {n}");
                    let reply = MessagePosted {
                        message_id: message,
                        channel_id: channel,
                        author_id: author,
                        text,
                        thread_root_id: Some(root),
                    };
                    event.event = reply.into();
                }
                let root_now = if root.is_some() { found.map(|(_, r)| *r).unwrap() } else { message };
                latest.insert(channel, (message, root_now));
                event
            }
        };
        history.push(event);
    }
    for event in &mut history {
        event.workspace_id = Some(workspace);
    }
    history
}

async fn counters(args: &Args, store: &Arc<dyn EventStore>, events: &[Envelope]) -> Result<(Summary, f64)> {
    let base = args.redis_url.trim_end_matches('/');
    let (live_url, raw_url) = (format!("{base}/{}", args.redis_db), format!("{base}/{}", args.redis_db + 2));
    let keys = Keys { prefix: "bench:".into() };
    let keyspace = RedisKeyspace::connect(&live_url, keys.clone()).await?;
    let live = Arc::new(Counters::new(Arc::new(keyspace), keys.clone()));
    let versions = RedisVersions::new(live, &live_url, keys.clone(), args.redis_db + 1)?;
    let summary = rebuild("redis", store, Arc::new(versions), args).await?;

    // Raw: the same writes as plain commands, pipelined a batch at a time.
    let client = redis::Client::open(raw_url)?;
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(std::time::Duration::from_secs(60)));
    let mut connection = client.get_multiplexed_async_connection_with_config(&config).await?;
    redis::cmd("FLUSHDB").arg("ASYNC").query_async::<()>(&mut connection).await?;
    checkpoint(&args.redis_url).await?;
    let started = Instant::now();
    for chunk in events.chunks(args.batch as usize) {
        let mut pipeline = redis::pipe();
        for op in ops_of(&keys, chunk) {
            match op {
                Op::ZAdd { key, score, member } => pipeline.zadd(key, member, score).ignore(),
                Op::ZRem { key, member } => pipeline.zrem(key, member).ignore(),
                Op::HSet { key, fields } => pipeline.hset_multiple(key, &fields).ignore(),
                Op::HDel { key, field } => pipeline.hdel(key, field).ignore(),
                Op::Del { key } => pipeline.del(key).ignore(),
                Op::SAdd { key, member } => pipeline.sadd(key, member).ignore(),
                Op::SRem { key, member } => pipeline.srem(key, member).ignore(),
            };
        }
        pipeline.query_async::<()>(&mut connection).await?;
    }
    let raw = timed(started, "redis raw: the same writes, pipelined");
    let size = |url: String| async move {
        let mut connection = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
        anyhow::Ok(redis::cmd("DBSIZE").query_async::<u64>(&mut connection).await?)
    };
    let (rebuilt, written) =
        (size(format!("{base}/{}", args.redis_db + 1)).await?, size(format!("{base}/{}", args.redis_db + 2)).await?);
    // The rebuild also holds its progress and schema version (and totals, with dead letters).
    ensure!((written + 2..=written + 3).contains(&rebuilt), "{rebuilt} keys rebuilt, {written} written raw");
    // Not left for Redis to carry through every later rewrite of its append-only file.
    for db in args.redis_db..=args.redis_db + 2 {
        let mut connection = redis::Client::open(format!("{base}/{db}"))?.get_multiplexed_async_connection().await?;
        redis::cmd("FLUSHDB").arg("ASYNC").query_async::<()>(&mut connection).await?;
    }
    Ok((summary, raw))
}

async fn search(args: &Args, store: &Arc<dyn EventStore>, events: &[Envelope]) -> Result<(Summary, f64)> {
    let prefix = format!("bench-{}-", Uuid::now_v7().simple());
    let live = Arc::new(OpenSearch::connect(&args.elasticsearch_url, &prefix)?);
    live.migrate().await?;
    let summary = rebuild("search", store, Arc::new(OpenSearchVersions::new(live.clone())), args).await?;

    // Raw: the documents folded in memory (not timed), `_bulk` into an index of the same
    // template, as the model writes them (external versions), then a refresh.
    let mut known = Known::default();
    fold(events, &mut known);
    let http = reqwest::Client::new();
    let base = args.elasticsearch_url.trim_end_matches('/');
    let raw_index = format!("{}-raw", live.messages());
    let created = http.put(format!("{base}/{raw_index}")).send().await?;
    ensure!(created.status().is_success(), "create {raw_index}: {}", created.text().await?);
    let documents: Vec<_> = known.documents.values().collect();
    checkpoint(&args.redis_url).await?;
    let started = Instant::now();
    for chunk in documents.chunks(args.batch as usize) {
        let mut body = String::new();
        for document in chunk {
            let id = document.message.message_id;
            let action = json!({ "index": { "_id": id, "version": document.applied, "version_type": "external" } });
            body.push_str(&format!("{action}\n{}\n", source(document)));
        }
        let response = http
            .post(format!("{base}/{raw_index}/_bulk?refresh=wait_for"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        let answer: serde_json::Value = response.json().await?;
        ensure!(answer["errors"] == false, "raw bulk: {}", answer["items"][0]);
    }
    let raw = timed(started, "search raw: _bulk of the same documents");
    let count = |index: String| {
        let http = http.clone();
        async move {
            anyhow::Ok(
                http.get(format!("{base}/{index}/_count")).send().await?.json::<serde_json::Value>().await?["count"]
                    .as_u64(),
            )
        }
    };
    let rebuilt = count(format!("{}-2", live.messages())).await?.unwrap_or(0);
    // The rebuild also holds its progress and a document per channel.
    ensure!(rebuilt == documents.len() as u64 + 1 + CHANNELS as u64, "{rebuilt} rebuilt, {} raw", documents.len());
    live.delete().await?;
    Ok((summary, raw))
}

async fn timelines(args: &Args, store: &Arc<dyn EventStore>, events: &[Envelope]) -> Result<(Summary, f64)> {
    let database = format!("bench_{}", Uuid::now_v7().simple());
    let url = format!("{}/{database}", args.mongo_url.split('?').next().unwrap_or_default().trim_end_matches('/'));
    let live = Arc::new(MongoTimelines::connect(&url).await?);
    live.migrate().await?;
    let summary = rebuild("mongo", store, Arc::new(MongoVersions::new(live)), args).await?;

    // Raw: the final messages, folded in memory (not timed), by unordered insert_many.
    let mut messages: HashMap<Uuid, Bson> = HashMap::new();
    let mut order = Vec::new();
    for event in events {
        match &event.event {
            quikapp_domain::Event::MessagePosted(e) => {
                order.push(e.message_id);
                messages.insert(
                    e.message_id,
                    doc! {
                        "_id": e.message_id.to_string(), "channel_id": e.channel_id.to_string(),
                        "author_id": e.author_id.to_string(), "text": &e.text,
                        "thread_root_id": e.thread_root_id.map(|r| r.to_string()), "replies": [], "reactions": [],
                        "posted_at": quikapp_domain::event::timestamp::format(&event.occurred_at),
                        "edited_at": null, "position": event.global_position as i64, "version": 1_i64, "deleted": false,
                    },
                );
                if let Some(root) = e.thread_root_id
                    && let Some(root) = messages.get_mut(&root)
                {
                    root.get_array_mut("replies")?.push(e.message_id.to_string().into());
                }
            }
            quikapp_domain::Event::MessageEdited(e) => {
                let message = messages.get_mut(&e.message_id).context("edited")?;
                message.insert("text", &e.text);
                message.insert("version", event.stream_version as i64);
            }
            quikapp_domain::Event::ReactionAdded(e) => {
                let message = messages.get_mut(&e.message_id).context("reacted")?;
                message.get_array_mut("reactions")?.push(format!("{}:{}", e.emoji, e.user_id).into());
                message.insert("version", event.stream_version as i64);
            }
            _ => {}
        }
    }
    let client = mongodb::Client::with_uri_str(&url).await?;
    let raw_collection = client.database(&database).collection::<Bson>("raw");
    let documents: Vec<Bson> = order.iter().map(|id| messages.remove(id).expect("folded")).collect();
    let written = documents.len() as u64;
    checkpoint(&args.redis_url).await?;
    let started = Instant::now();
    // Two inserts at once, as the model sends them.
    let inserts =
        documents.chunks(10_000).map(|chunk| raw_collection.insert_many(chunk.to_vec()).ordered(false).into_future());
    let inserted: Vec<_> = futures::stream::iter(inserts).buffer_unordered(2).collect().await;
    inserted.into_iter().collect::<Result<Vec<_>, _>>()?;
    let raw = timed(started, "mongo raw: insert_many of the same messages, two at a time");
    let rebuilt = client.database(&database).collection::<Bson>("messages_2").estimated_document_count().await?;
    ensure!(rebuilt == written, "{rebuilt} rebuilt, {written} raw");
    // The rebuild made its indexes after its history (in its time); the raw collection has none.
    let indexes = client.database(&database).collection::<Bson>("messages_2").list_index_names().await?;
    ensure!(["timeline", "thread"].iter().all(|name| indexes.iter().any(|i| i == name)), "rebuilt with {indexes:?}");
    client.database(&database).drop().await?;
    Ok((summary, raw))
}
