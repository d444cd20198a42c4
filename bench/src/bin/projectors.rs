//! Projector benchmark against the real Kafka, PostgreSQL and Redis, in one run so the ratios
//! compare like with like:
//!
//! 1. a backlog of `--events` events in fresh Kafka topics, written there directly (with a
//!    watermark of the last position on every partition after them): for the directory,
//!    channels and their member joins; for the counters, messages in 1,000 channels;
//! 2. each projector draining its backlog through the runtime (Kafka consumer group, batches,
//!    progress), next to a raw baseline into the same store with the same effect: multi-row
//!    INSERTs of the same member rows; pipelined ZADD and HSET commands of the same keys;
//! 3. live: the whole pipeline in this process (write API, relay, both projectors, read API,
//!    on loopback), `--rate` commands per second, and the time from each command's answer to
//!    the read API's answer with X-Min-Position, per read model.
//!
//! Run it with `bench/projectors` (release build, starts the services).

use quikapp_bench::{
    PARTITIONS, backlog, drain, envelope, fresh_topics, percentile, posted, read_api, unlimited_write_api,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use quikapp_bus::EventBus;
use quikapp_bus::kafka::{KafkaBus, KafkaConfig, KafkaPublisher};
use quikapp_commands::store::{PostgresStore, contract};
use quikapp_domain::Envelope;
use quikapp_domain::event::{ChannelCreated, ChannelMemberJoined, timestamp};
use quikapp_projections::Projector;
use quikapp_projections::counters::redis::RedisKeyspace;
use quikapp_projections::counters::{Counters, Keys};
use quikapp_projections::directory::postgres::PostgresDirectory;
use quikapp_projections::runtime::{Runtime, RuntimeConfig};
use uuid::Uuid;

/// PostgreSQL comes from QUIKAPP_POSTGRES_URL: the bench makes a database of its own there.
#[derive(Parser)]
struct Args {
    #[arg(long, env = "QUIKAPP_KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "QUIKAPP_REDIS_URL")]
    redis_url: String,
    #[arg(long, env = "QUIKAPP_MONGO_URL")]
    mongo_url: String,
    /// Events in the timelines' backlog (FerretDB is slow: see the README).
    #[arg(long, default_value_t = 100_000)]
    mongo_events: u64,
    /// Events in each backlog.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Commands per second in the live phase.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Seconds of the live phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Only the live phase.
    #[arg(long)]
    live_only: bool,
    /// Only the timelines' drain and pages.
    #[arg(long)]
    timelines_only: bool,
    /// Only timeline pages on the embedded default's in-memory model.
    #[arg(long)]
    embedded_pages: bool,
    /// Messages in the embedded model for `--embedded-pages`.
    #[arg(long, default_value_t = 1_000_000)]
    embedded_messages: u64,
    /// Records a projector applies per batch, at most.
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.live_only {
        return live(&args).await;
    }
    if args.timelines_only {
        return timelines(&args).await;
    }
    if args.embedded_pages {
        return embedded_pages(&args).await;
    }
    let url = contract::fresh_postgres_database().await.context("QUIKAPP_POSTGRES_URL names the server")?;

    // The directory: 10,000 channels, each created then joined by members.
    let channels = 10_000u64;
    let per_channel = (args.events / channels).max(1);
    let ids: Vec<Uuid> = (0..channels).map(|_| Uuid::now_v7()).collect();
    let users: Vec<Uuid> = (0..per_channel).map(|_| Uuid::now_v7()).collect();
    let directory_events = ids.iter().enumerate().flat_map(|(c, channel)| {
        let stream = format!("channel-{channel}");
        let base = c as u64 * (per_channel + 1);
        let created = ChannelCreated {
            channel_id: *channel,
            workspace_id: Uuid::nil(),
            name: format!("c{c}"),
            topic: None,
            private: false,
            created_by: users[0],
        };
        std::iter::once(envelope(base + 1, stream.clone(), 1, *channel, created.into())).chain(
            users.iter().enumerate().map(move |(u, user)| {
                let joined = ChannelMemberJoined { channel_id: *channel, user_id: *user, added_by: *user };
                envelope(base + 2 + u as u64, stream.clone(), 2 + u as u64, *channel, joined.into())
            }),
        )
    });
    let topics = fresh_topics();
    let started = Instant::now();
    let head = backlog(&args.kafka_brokers, &topics, directory_events).await?;
    println!("directory backlog: {head} events to Kafka in {:.1} s", started.elapsed().as_secs_f64());

    let directory = Arc::new(PostgresDirectory::connect(&url).await?);
    directory.migrate().await?;
    let pool = sqlx::PgPool::connect(&url).await?;
    // The same table as the model's, indexes included.
    sqlx::raw_sql("CREATE TABLE baseline_members (LIKE directory.channel_members INCLUDING ALL)")
        .execute(&pool)
        .await?;
    let started = Instant::now();
    let rows: Vec<(Uuid, Uuid)> = ids.iter().flat_map(|c| users.iter().map(move |u| (*c, *u))).collect();
    for chunk in rows.chunks(args.batch) {
        let now = timestamp::now();
        sqlx::query(
            "INSERT INTO baseline_members SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[])
             ON CONFLICT (channel_id, user_id) DO UPDATE SET joined_at = excluded.joined_at",
        )
        .bind(chunk.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind(vec![now; chunk.len()])
        .execute(&pool)
        .await?;
    }
    let raw = rows.len() as f64 / started.elapsed().as_secs_f64();
    println!("PostgreSQL raw: multi-row INSERT of the member rows      {raw:>9.0} rows/s");
    let projected = drain(&args.kafka_brokers, args.batch, &topics, directory, head).await?;
    println!("PostgreSQL projector: from Kafka, progress included     {projected:>9.0} records/s");
    println!("PostgreSQL projector / raw: {:.2}x (target >= 0.7)", projected / raw);

    // The counters: messages in 1,000 channels.
    let channel_ids: Vec<Uuid> = (0..1_000).map(|_| Uuid::now_v7()).collect();
    let authors: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    let messages: Vec<(Uuid, Uuid, Uuid)> = (0..args.events as usize)
        .map(|i| (Uuid::now_v7(), channel_ids[i % channel_ids.len()], authors[i % authors.len()]))
        .collect();
    let counter_events = messages
        .iter()
        .enumerate()
        .map(|(i, (message, channel, author))| posted(i as u64 + 1, *message, *channel, *author));
    let topics = fresh_topics();
    let started = Instant::now();
    let head = backlog(&args.kafka_brokers, &topics, counter_events).await?;
    println!("counters backlog: {head} events to Kafka in {:.1} s", started.elapsed().as_secs_f64());

    let client = redis::Client::open(args.redis_url.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let prefix = format!("bench:{}:", Uuid::now_v7());
    let started = Instant::now();
    for (i, chunk) in messages.chunks(args.batch).enumerate() {
        let mut pipeline = redis::pipe();
        for (j, (message, channel, author)) in chunk.iter().enumerate() {
            let score = (i * args.batch + j + 1) as u64;
            let member = message.to_string();
            pipeline.zadd(format!("{prefix}ch:{channel}:all"), &member, score).ignore();
            pipeline.zadd(format!("{prefix}ch:{channel}:top"), &member, score).ignore();
            pipeline.zadd(format!("{prefix}ch:{channel}:top:{author}"), &member, score).ignore();
            pipeline
                .hset_multiple(
                    format!("{prefix}msg:{message}"),
                    &[
                        ("author_id", author.to_string()),
                        ("preview", "Standup moved to 10:30, same room.".into()),
                        ("posted_at", timestamp::format(&timestamp::now())),
                    ],
                )
                .ignore();
        }
        pipeline.query_async::<()>(&mut connection).await?;
    }
    let raw = head as f64 / started.elapsed().as_secs_f64();
    println!("Redis raw: pipelined ZADD and HSET of the same keys      {raw:>9.0} events/s");
    let keys = Keys { prefix: format!("bench:{}:", Uuid::now_v7()) };
    let counters = Counters::new(Arc::new(RedisKeyspace::connect(&args.redis_url, keys.clone()).await?), keys);
    let projected = drain(&args.kafka_brokers, args.batch, &topics, Arc::new(counters), head).await?;
    println!("Redis projector: from Kafka, progress included          {projected:>9.0} records/s");
    println!("Redis projector / raw: {:.2}x (target >= 0.7)", projected / raw);

    timelines(&args).await?;
    live(&args).await
}

/// The timelines: MessagePosted events in 1,000 channels, against insert_many of the same
/// documents into the same collection (indexes included) on the same server.
async fn timelines(args: &Args) -> Result<()> {
    let channels: Vec<Uuid> = (0..1_000).map(|_| Uuid::now_v7()).collect();
    let author = Uuid::now_v7();
    let events: Vec<Envelope> = (0..args.mongo_events)
        .map(|i| posted(i + 1, Uuid::now_v7(), channels[i as usize % channels.len()], author))
        .collect();
    let topics = fresh_topics();
    let head = backlog(&args.kafka_brokers, &topics, events.iter().cloned()).await?;
    let database = |name: &str| {
        format!(
            "{}/bench_{name}_{}",
            args.mongo_url.split('?').next().unwrap_or("").trim_end_matches('/'),
            Uuid::now_v7().simple()
        )
    };

    // The same collection as the model's, indexes included.
    let raw_url = database("raw");
    quikapp_projections::timelines::mongo::MongoTimelines::connect(&raw_url).await?.migrate().await?;
    let client = mongodb::Client::with_uri_str(&raw_url).await?;
    let collection = client.default_database().context("a database")?.collection::<mongodb::bson::Document>("messages");
    let started = Instant::now();
    for chunk in events.chunks(args.batch) {
        let documents = chunk.iter().map(|event| {
            let quikapp_domain::Event::MessagePosted(posted) = &event.event else { unreachable!("posts only") };
            mongodb::bson::doc! {
                "_id": posted.message_id.to_string(), "channel_id": posted.channel_id.to_string(),
                "author_id": posted.author_id.to_string(), "text": &posted.text, "thread_root_id": mongodb::bson::Bson::Null,
                "replies": [], "reactions": [], "posted_at": timestamp::format(&event.occurred_at),
                "edited_at": mongodb::bson::Bson::Null, "position": event.global_position as i64, "version": 1_i64,
                "deleted": false,
            }
        });
        collection.insert_many(documents).ordered(false).await?;
    }
    let raw = head as f64 / started.elapsed().as_secs_f64();
    println!("MongoDB (FerretDB) raw: insert_many of the same documents {raw:>9.0} events/s");
    let model_url = database("model");
    let timelines = Arc::new(quikapp_projections::timelines::mongo::MongoTimelines::connect(&model_url).await?);
    timelines.migrate().await?;
    let projected = drain(&args.kafka_brokers, args.batch, &topics, timelines.clone(), head).await?;
    println!("MongoDB projector: from Kafka, progress included          {projected:>9.0} records/s");
    println!("MongoDB projector / raw: {:.2}x (target >= 0.7)", projected / raw);
    timeline_pages(Some(&model_url), timelines, &channels).await
}

/// Timeline pages over `--embedded-messages` messages in the in-memory model of `quikapp dev`.
async fn embedded_pages(args: &Args) -> Result<()> {
    use quikapp_projections::{Batch, Projector};
    let channels: Vec<Uuid> = (0..1_000).map(|_| Uuid::now_v7()).collect();
    let timelines = Arc::new(quikapp_projections::timelines::memory::MemoryTimelines::new());
    let author = Uuid::now_v7();
    let started = Instant::now();
    for chunk in (0..args.embedded_messages).collect::<Vec<_>>().chunks(10_000) {
        let events = chunk
            .iter()
            .map(|i| posted(i + 1, Uuid::now_v7(), channels[*i as usize % channels.len()], author))
            .collect();
        timelines.apply(&Batch { events, ..Batch::default() }).await?;
    }
    println!(
        "embedded timelines: {} messages applied in {:.1} s",
        args.embedded_messages,
        started.elapsed().as_secs_f64()
    );
    timeline_pages(None, timelines, &channels).await
}

/// Timeline pages (limit 50) from the drained model: through the read API over HTTP, and the
/// same query through the driver, 8 clients each, on the same server.
async fn timeline_pages(
    url: Option<&str>,
    timelines: Arc<dyn quikapp_projections::timelines::Timelines>,
    channels: &[Uuid],
) -> Result<()> {
    const REQUESTS: usize = 400;
    const CLIENTS: usize = 8;
    let (reader, workspace) = (Uuid::now_v7(), Uuid::now_v7());
    let search = Arc::new(quikapp_projections::search::sqlite::SqliteSearch::in_memory().await?);
    let (address, token) = read_api(reader, workspace, channels, timelines, search).await?;
    let http = reqwest::Client::new();
    let collection = match url {
        Some(url) => Some(
            mongodb::Client::with_uri_str(url)
                .await?
                .default_database()
                .context("a database")?
                .collection::<mongodb::bson::Document>("messages"),
        ),
        None => None,
    };

    let measure = |name: &'static str, via_http: bool| {
        let (http, token, collection, channels) = (http.clone(), token.clone(), collection.clone(), channels.to_vec());
        async move {
            let latencies = futures::future::try_join_all((0..CLIENTS).map(|c| {
                let (http, token, collection, channels) = (http.clone(), token.clone(), collection.clone(), channels.clone());
                async move {
                    let mut latencies = Vec::new();
                    for i in (c..REQUESTS).step_by(CLIENTS) {
                        let channel = channels[i * 7 % channels.len()];
                        let started = Instant::now();
                        if via_http {
                            let url = format!("http://{address}/v1/channels/{channel}/messages?limit=50");
                            let response = http.get(url).bearer_auth(&token).send().await?;
                            anyhow::ensure!(response.status().is_success(), "{}", response.status());
                            let page: serde_json::Value = response.json().await?;
                            anyhow::ensure!(page["messages"].as_array().is_some_and(|m| !m.is_empty()), "a page");
                        } else if let Some(collection) = &collection {
                            use futures::TryStreamExt;
                            let filter = mongodb::bson::doc! { "channel_id": channel.to_string(), "thread_root_id": mongodb::bson::Bson::Null, "deleted": false };
                            let page: Vec<mongodb::bson::Document> = collection
                                .find(filter)
                                .sort(mongodb::bson::doc! { "position": -1 })
                                .limit(51)
                                .await?
                                .try_collect()
                                .await?;
                            anyhow::ensure!(!page.is_empty(), "a page");
                        }
                        latencies.push(started.elapsed());
                    }
                    anyhow::Ok(latencies)
                }
            }))
            .await?;
            let mut latencies: Vec<Duration> = latencies.into_iter().flatten().collect();
            latencies.sort_unstable();
            let at = |p: f64| percentile(&latencies, p);
            println!("  {name:<28} p50 {:>7.2} ms   p99 {:>7.2} ms", at(0.5), at(0.99));
            anyhow::Ok(at(0.99))
        }
    };
    println!("timeline pages (limit 50), {CLIENTS} clients, {REQUESTS} requests per path:");
    let raw = match collection {
        Some(_) => Some(measure("driver find, same query", false).await?),
        None => None,
    };
    let served = measure("GET /channels/{ch}/messages", true).await?;
    match raw {
        Some(raw) => println!("  read API p99 / driver p99: {:.2}x (target <= 1.3)", served / raw),
        None => println!("  (target on the embedded default: p99 under 10 ms)"),
    }
    Ok(())
}

/// The whole pipeline in this process, and the time from a command's answer to the read
/// API's answer with X-Min-Position.
async fn live(args: &Args) -> Result<()> {
    let url = contract::fresh_postgres_database().await.context("QUIKAPP_POSTGRES_URL names the server")?;
    let store = Arc::new(PostgresStore::connect(&url).await?);
    store.migrate().await?;
    let topics = fresh_topics();
    let config = KafkaConfig {
        brokers: args.kafka_brokers.clone(),
        topics: topics.clone(),
        partitions: PARTITIONS,
        options: Default::default(),
    };
    let publisher = Arc::new(KafkaPublisher::connect(&config).await?);
    let relay = quikapp_bus::relay::Relay {
        pool: store.pool().clone(),
        store: store.clone(),
        publisher,
        config: quikapp_bus::relay::RelayConfig::default(),
    };
    tokio::spawn(async move { relay.run(std::future::pending()).await });
    let directory = Arc::new(PostgresDirectory::connect(&url).await?);
    directory.migrate().await?;
    let keys = Keys { prefix: format!("bench:{}:", Uuid::now_v7()) };
    let counters = Counters::new(Arc::new(RedisKeyspace::connect(&args.redis_url, keys.clone()).await?), keys);
    let bus: Arc<dyn EventBus> =
        Arc::new(KafkaBus { brokers: args.kafka_brokers.clone(), topics: topics.clone(), partitions: PARTITIONS });
    let group_prefix = format!("bench-{}-", Uuid::now_v7());
    let projectors: Vec<Arc<dyn Projector>> = vec![directory.clone(), Arc::new(counters.clone())];
    for projector in &projectors {
        let config =
            RuntimeConfig { batch_size: args.batch, group_prefix: group_prefix.clone(), ..RuntimeConfig::default() };
        tokio::spawn(Runtime { projector: projector.clone(), bus: bus.clone(), config }.run(std::future::pending()));
    }
    let (write, tokens) = unlimited_write_api(store.clone())?;
    let read_config = quikapp_read_api::ReadConfig {
        partitions: topics.partitions(PARTITIONS),
        min_position_wait: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
    };
    let timelines = Arc::new(quikapp_projections::timelines::memory::MemoryTimelines::new());
    let search = Arc::new(quikapp_projections::search::sqlite::SqliteSearch::in_memory().await?);
    let models = quikapp_read_api::Models {
        directory,
        counters,
        timelines,
        search,
        presence: Arc::new(quikapp_realtime::presence::MemoryPresence::new(None)),
        projectors,
    };
    let read = quikapp_read_api::ReadApi::new(models, store.clone(), tokens.clone(), read_config);
    let serve = |router: axum::Router| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, router).await });
        anyhow::Ok(format!("http://{address}"))
    };
    let write_url = serve(quikapp_write_api::router(write)).await?;
    let read_url = serve(quikapp_read_api::router(read)).await?;

    let http = reqwest::Client::new();
    let user = Uuid::now_v7();
    let token = tokens.mint(user);
    let workspace: serde_json::Value = http
        .post(format!("{write_url}/v1/workspaces"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "name": "bench" }))
        .send()
        .await?
        .json()
        .await?;
    let workspace = workspace["workspace_id"].as_str().context("a workspace")?.to_owned();
    let mut channels = Vec::new();
    for i in 0..20 {
        let channel: serde_json::Value = http
            .post(format!("{write_url}/v1/workspaces/{workspace}/channels"))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "name": format!("c{i}") }))
            .send()
            .await?
            .json()
            .await?;
        channels.push(channel["channel_id"].as_str().context("a channel")?.to_owned());
    }
    // Warm up: the consumer groups must be assigned before timing.
    let warm = http.get(format!("{read_url}/v1/users/me/unread")).bearer_auth(&token).header("x-min-position", "22");
    anyhow::ensure!(warm.send().await?.status().is_success(), "the pipeline warms up");

    // Open loop at `--rate`, but at most IN_FLIGHT commands waiting on their reads: a pipeline
    // that falls behind slows the sending (the achieved rate is printed) instead of piling up
    // connections until the process runs out of file descriptors.
    const IN_FLIGHT: usize = 2_000;
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let total = (args.rate * args.seconds) as usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate as u32);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let permit = permits.clone().acquire_owned().await?;
        let (http, token, write_url, read_url) = (http.clone(), token.clone(), write_url.clone(), read_url.clone());
        let channel = channels[i % channels.len()].clone();
        tasks.spawn(async move {
            let _permit = permit;
            let sent = Instant::now();
            let answer: serde_json::Value = http
                .post(format!("{write_url}/v1/channels/{channel}/messages"))
                .bearer_auth(&token)
                .json(&serde_json::json!({ "text": format!("message {i}") }))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let accepted = Instant::now();
            let position = answer["position"].as_str().context("a position")?.to_owned();
            let read = |path: String| {
                let request =
                    http.get(format!("{read_url}/v1{path}")).bearer_auth(&token).header("x-min-position", &position);
                async move {
                    let response = request.send().await?;
                    anyhow::ensure!(response.status().is_success(), "read answered {}", response.status());
                    anyhow::Ok(accepted.elapsed())
                }
            };
            // GET /channels/{ch} waits for the PostgreSQL model, /users/me/unread for Redis.
            let (postgres, redis) = tokio::join!(read(format!("/channels/{channel}")), read("/users/me/unread".into()));
            anyhow::Ok((accepted - sent, postgres, redis))
        });
    }
    let sending = started.elapsed();
    let mut command = Vec::with_capacity(total);
    let (mut postgres, mut redis) = (Vec::with_capacity(total), Vec::with_capacity(total));
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    let mut fail = |what: &str, error: anyhow::Error| *failures.entry(format!("{what}: {error}")).or_default() += 1;
    while let Some(result) = tasks.join_next().await {
        match result? {
            Ok((c, p, r)) => {
                command.push(c);
                match p {
                    Ok(p) => postgres.push(p),
                    Err(error) => fail("PostgreSQL model", error),
                }
                match r {
                    Ok(r) => redis.push(r),
                    Err(error) => fail("Redis model", error),
                }
            }
            Err(error) => fail("command", error),
        }
    }
    let rate = total as f64 / sending.as_secs_f64();
    println!("live: {total} commands at {rate:.0}/s (asked {}/s)", args.rate);
    for (name, latencies) in
        [("command answered", &mut command), ("PostgreSQL model", &mut postgres), ("Redis model", &mut redis)]
    {
        if latencies.is_empty() {
            println!("  {name:<17} nothing answered");
            continue;
        }
        latencies.sort_unstable();
        let at = |p: f64| percentile(latencies, p);
        let what = if name == "command answered" { "sent to answered" } else { "accepted to visible" };
        println!(
            "  {name:<17} {what:<20} p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>7.2} ms",
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
    for (failure, count) in &failures {
        println!("  failed {count} times: {failure}");
    }
    println!("  (target: accepted to visible p99 < 50 ms for both models)");
    Ok(())
}
