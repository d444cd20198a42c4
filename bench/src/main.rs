//! Write-path benchmark against a real PostgreSQL, in one run so the ratios compare like with like:
//!
//! 1. baseline: raw single-row INSERT, one transaction each, into a table shaped like `events`;
//! 2. ceiling: raw 100-row INSERTs, one transaction each;
//! 3. the event store: `EventStore::append`, one event per append, each writer on its own stream;
//! 4. the event store paced at half its measured peak, for latency;
//! 5. HTTP: PostMessage commands through the write API (served in this process).
//!
//! Every phase runs `--writers` concurrent writers for `--seconds`, with synchronous_commit on.
//! Run it with `bench/run` (release build, starts PostgreSQL).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use quikapp_commands::CommandService;
use quikapp_commands::store::{AppendOutcome, AppendRequest, EventStore, PostgresStore, contract};
use quikapp_domain::event::timestamp;
use quikapp_write_api::auth::Tokens;
use quikapp_write_api::{Limits, RateLimit, WriteApi};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// A PostgreSQL server URL; the bench creates and drops a database of its own on it.
    #[arg(long, env = "QUIKAPP_POSTGRES_URL")]
    postgres_url: String,
    #[arg(long, default_value_t = 64)]
    writers: usize,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
}

/// What one phase measured.
struct Figures {
    events: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        sorted
            .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }

    fn print(&self, name: &str) {
        println!(
            "{name:<44} {:>9.0} events/s   p50 {:>7.2} ms   p99 {:>7.2} ms   ({} in {:.1} s)",
            self.rate(),
            self.percentile(0.50).as_secs_f64() * 1e3,
            self.percentile(0.99).as_secs_f64() * 1e3,
            self.events,
            self.elapsed.as_secs_f64()
        );
    }
}

/// Runs `writers` copies of `operation` (each returns how many events it wrote) until `seconds`
/// pass; `pace` spaces each writer's operations when set.
async fn measure<F, Fut>(writers: usize, seconds: u64, pace: Option<Duration>, operation: F) -> Result<Figures>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64>> + Send,
{
    let operation = Arc::new(operation);
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..writers)
        .map(|writer| {
            let operation = operation.clone();
            tokio::spawn(async move {
                let (mut events, mut latencies) = (0, Vec::new());
                let mut ticker = pace.map(|every| {
                    let mut ticker = tokio::time::interval(every);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    ticker
                });
                let mut round = 0;
                while Instant::now() < end {
                    if let Some(ticker) = ticker.as_mut() {
                        ticker.tick().await;
                    }
                    let sent = Instant::now();
                    events += operation(writer, round).await?;
                    latencies.push(sent.elapsed());
                    round += 1;
                }
                anyhow::Ok((events, latencies))
            })
        })
        .collect();
    let mut figures = Figures { events: 0, elapsed: Duration::ZERO, latencies: Vec::new() };
    for task in tasks {
        let (events, latencies) = task.await??;
        figures.events += events;
        figures.latencies.extend(latencies);
    }
    figures.elapsed = started.elapsed();
    Ok(figures)
}

/// A table of the same shape as `events`, for the raw baselines.
async fn baseline_table(pool: &PgPool) -> Result<()> {
    sqlx::query("CREATE TABLE baseline (LIKE events INCLUDING ALL)").execute(pool).await?;
    Ok(())
}

const BASELINE_INSERT: &str = "INSERT INTO baseline (global_position, stream_id, stream_version, event_id, event_type, \
    schema_version, workspace_id, channel_id, actor_id, occurred_at, correlation_id, causation_id, data) \
    SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::int[], $7::uuid[], \
    $8::uuid[], $9::uuid[], $10::timestamptz[], $11::uuid[], $12::uuid[], $13::json[])";

/// Inserts `rows` rows in one transaction, positions taken from a shared counter.
async fn raw_insert(pool: &PgPool, counter: &std::sync::atomic::AtomicI64, rows: usize) -> Result<u64> {
    let first = counter.fetch_add(rows as i64, std::sync::atomic::Ordering::Relaxed) + 1;
    let ids = || (0..rows).map(|_| Uuid::now_v7()).collect::<Vec<_>>();
    let data: Vec<String> = (0..rows).map(|i| json!({"text": format!("baseline {i}")}).to_string()).collect();
    sqlx::query(BASELINE_INSERT)
        .bind((first..first + rows as i64).collect::<Vec<_>>())
        .bind((0..rows).map(|_| format!("message-{}", Uuid::now_v7())).collect::<Vec<_>>())
        .bind(vec![1i64; rows])
        .bind(ids())
        .bind(vec!["MessagePosted".to_owned(); rows])
        .bind(vec![1i32; rows])
        .bind(ids())
        .bind(ids())
        .bind(ids())
        .bind(vec![timestamp::now(); rows])
        .bind(ids())
        .bind(ids())
        .bind(data)
        .execute(pool)
        .await?;
    Ok(rows as u64)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let database = format!("quikapp_bench_{}", Uuid::now_v7().simple());
    let admin = PgPool::connect(&args.postgres_url).await.context("connecting to PostgreSQL")?;
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await?;
    let url = format!(
        "{}/{database}",
        args.postgres_url.rsplit_once('/').map_or(args.postgres_url.as_str(), |(server, _)| server)
    );
    let result = run(&args, &url).await;
    sqlx::query(&format!("DROP DATABASE {database} WITH (FORCE)")).execute(&admin).await?;
    result
}

async fn run(args: &Args, url: &str) -> Result<()> {
    let pool = PgPoolOptions::new().max_connections(args.writers as u32 + 8).connect(url).await?;
    let (synchronous_commit,): (String,) = sqlx::query_as("SHOW synchronous_commit").fetch_one(&pool).await?;
    println!(
        "writers: {}, seconds per phase: {}, synchronous_commit: {synchronous_commit}",
        args.writers, args.seconds
    );
    let store = Arc::new(PostgresStore::new(pool.clone(), Default::default()));
    store.migrate().await?;
    baseline_table(&pool).await?;

    let counter = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let (p, c) = (pool.clone(), counter.clone());
    let single = measure(args.writers, args.seconds, None, move |_, _| {
        let (p, c) = (p.clone(), c.clone());
        async move { raw_insert(&p, &c, 1).await }
    })
    .await?;
    let (p, c) = (pool.clone(), counter.clone());
    let hundred = measure(args.writers, args.seconds, None, move |_, _| {
        let (p, c) = (p.clone(), c.clone());
        async move { raw_insert(&p, &c, 100).await }
    })
    .await?;

    let append = |store: Arc<PostgresStore>| {
        // Each writer appends to a stream of its own, at the version its previous append left.
        let streams: Arc<Vec<String>> =
            Arc::new((0..args.writers).map(|_| format!("bench-{}", Uuid::now_v7())).collect());
        move |writer: usize, round: u64| {
            let (store, streams) = (store.clone(), streams.clone());
            async move {
                let request = AppendRequest {
                    stream_id: streams[writer].clone(),
                    expected_version: round,
                    events: vec![contract::new_event(&format!("message {round} of writer {writer}"))],
                    ..Default::default()
                };
                match store.append(request).await? {
                    AppendOutcome::Appended(_) => Ok(1),
                    AppendOutcome::Replayed(_) => anyhow::bail!("no idempotency key was sent"),
                }
            }
        }
    };
    let peak = measure(args.writers, args.seconds, None, append(store.clone())).await?;
    let half_rate = peak.rate() / 2.0;
    let every = Duration::from_secs_f64(args.writers as f64 / half_rate);
    let paced = measure(args.writers, args.seconds, Some(every), append(store.clone())).await?;

    let http = http_phase(args, store.clone()).await?;

    println!();
    single.print("raw INSERT, 1 row per transaction (baseline)");
    hundred.print("raw INSERT, 100 rows per transaction (ceiling)");
    peak.print("event store append, 1 event per append");
    paced.print(&format!("event store append at half peak ({half_rate:.0}/s)"));
    http.print("HTTP PostMessage (1 event per command)");
    println!();
    println!("event store / baseline: {:.2}x (target >= 2x)", peak.rate() / single.rate());
    println!("event store / ceiling:  {:.2}x", peak.rate() / hundred.rate());
    println!("event store peak: {:.0} events/s (target >= 20,000)", peak.rate());
    println!("p99 at half peak: {:.2} ms (target < 25 ms)", paced.percentile(0.99).as_secs_f64() * 1e3);
    println!(
        "HTTP PostMessage: {:.0} commands/s (target >= 5,000), p99 {:.2} ms (target < 50 ms)",
        http.rate(),
        http.percentile(0.99).as_secs_f64() * 1e3
    );
    Ok(())
}

/// PostMessage through the write API, each client posting into a channel of its own.
async fn http_phase(args: &Args, store: Arc<PostgresStore>) -> Result<Figures> {
    let tokens = Tokens::new("bench secret, long enough for HS256 keys").expect("a long secret");
    let rate_limit = RateLimit { per_second: 1_000_000, burst: 1_000_000 };
    let api = WriteApi::new(CommandService::new(store), tokens.clone(), Limits { rate_limit, ..Limits::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(quikapp_write_api::serve(listener, quikapp_write_api::router(api), std::future::pending()));

    let client = reqwest::Client::builder().pool_max_idle_per_host(args.writers * 2).build()?;
    // Creates something through the API and answers the id it names.
    let create = async |url: String, token: &str, id: &str| -> Result<String> {
        let answer: serde_json::Value =
            client.post(url).bearer_auth(token).json(&json!({"name": "bench"})).send().await?.json().await?;
        Ok(answer[id].as_str().with_context(|| format!("no {id} in {answer}"))?.to_owned())
    };
    let mut targets = Vec::new();
    for _ in 0..args.writers {
        let token = tokens.mint(Uuid::now_v7());
        let ws = create(format!("{base}/v1/workspaces"), &token, "workspace_id").await?;
        let channel = create(format!("{base}/v1/workspaces/{ws}/channels"), &token, "channel_id").await?;
        targets.push((token, format!("{base}/v1/channels/{channel}/messages")));
    }
    let targets = Arc::new(targets);
    measure(args.writers, args.seconds, None, move |writer, round| {
        let (client, targets) = (client.clone(), targets.clone());
        async move {
            let (token, url) = &targets[writer];
            let response =
                client.post(url).bearer_auth(token).json(&json!({"text": format!("message {round}")})).send().await?;
            anyhow::ensure!(response.status() == 201, "PostMessage answered {}", response.status());
            Ok(1)
        }
    })
    .await
}
