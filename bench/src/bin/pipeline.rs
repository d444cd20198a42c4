//! Sustained pipeline benchmark: the whole platform on this one machine (PostgreSQL event store,
//! relay, Kafka, the four projectors on PostgreSQL, Redis, FerretDB and OpenSearch, the write
//! and read APIs in this process, every service on loopback) under a steady PostMessage load.
//!
//! For each rate of `--rates` (each run on fresh databases, topics, keys and indexes): commands
//! at that rate for `--seconds`, and every second each model's lag as GET /projections reports
//! it (how long ago the first event it has not applied was stored). A rate holds when the
//! commands keep up with it and every model stays within `--max-lag` seconds of the head
//! throughout. The rates are tried in order until one does not hold; then the same with
//! `--changes-percent` of the commands being edits and reactions. Each run prints the lags
//! over time and which model lagged most.
//!
//! Run it with `bench/pipeline` (release build, starts the services).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use quikapp_bench::{PARTITIONS, fresh_topics, unlimited_write_api};
use quikapp_bus::EventBus;
use quikapp_bus::kafka::{KafkaBus, KafkaConfig, KafkaPublisher};
use quikapp_commands::store::{PostgresStore, contract};
use quikapp_projections::Projector;
use quikapp_projections::counters::redis::RedisKeyspace;
use quikapp_projections::counters::{Counters, Keys};
use quikapp_projections::directory::postgres::PostgresDirectory;
use quikapp_projections::runtime::{Runtime, RuntimeConfig};
use quikapp_projections::search::opensearch::OpenSearch;
use quikapp_projections::timelines::mongo::MongoTimelines;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use uuid::Uuid;

/// PostgreSQL comes from QUIKAPP_POSTGRES_URL: each run makes a database of its own there.
#[derive(Parser)]
struct Args {
    #[arg(long, env = "QUIKAPP_KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "QUIKAPP_REDIS_URL")]
    redis_url: String,
    #[arg(long, env = "QUIKAPP_MONGO_URL")]
    mongo_url: String,
    #[arg(long, env = "QUIKAPP_ELASTICSEARCH_URL")]
    elasticsearch_url: String,
    /// PostMessage rates to try, in order, in commands per second (multiples of 100).
    #[arg(long, value_delimiter = ',', default_value = "1500,2000,2500,3000")]
    rates: Vec<u64>,
    /// The rates to try with edits and reactions.
    #[arg(long, value_delimiter = ',', default_value = "200,500,1000,1500")]
    changes_rates: Vec<u64>,
    /// Seconds of load at each rate.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The lag every model must stay within, in seconds.
    #[arg(long, default_value_t = 2.0)]
    max_lag: f64,
    /// The share of commands that edit a message or react to one in the second series.
    #[arg(long, default_value_t = 5)]
    changes_percent: u64,
    /// Records a projector applies per batch, at most.
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
    /// Write an SVG plot of each run's lags and throughput into this directory.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

/// One second of a run: when, commands answered during it, each model's lag.
struct Sample {
    at: f64,
    rate: f64,
    lags: BTreeMap<String, f64>,
}

/// An SVG of each model's lag (left axis) and the commands answered per second (right axis,
/// dashed) over a run, with the lag limit as a red line.
fn plot(samples: &[Sample], asked: u64, max_lag: f64, title: &str) -> String {
    let (width, height, margin) = (900.0, 420.0, 60.0);
    let seconds = samples.last().map_or(1.0, |s| s.at).max(1.0);
    let top_lag = samples.iter().flat_map(|s| s.lags.values().copied()).fold(max_lag * 1.5, f64::max);
    let top_rate = asked as f64 * 1.5;
    let x = |at: f64| margin + at / seconds * (width - 2.0 * margin);
    let y = |value: f64, top: f64| height - margin - value / top * (height - 2.0 * margin);
    let line = |points: Vec<(f64, f64)>, style: &str| {
        let points: Vec<String> = points.iter().map(|(px, py)| format!("{px:.1},{py:.1}")).collect();
        format!("<polyline fill=\"none\" {style} points=\"{}\"/>\n", points.join(" "))
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{margin}\" y=\"24\" font-size=\"14\">{title}</text>\n\
         <text x=\"8\" y=\"{}\">lag s (max {top_lag:.1})</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">commands/s (max {top_rate:.0}), dashed</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">seconds (0 to {seconds:.0})</text>\n\
         <line x1=\"{margin}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        margin - 8.0,
        width - 8.0,
        margin - 8.0,
        width - margin,
        height - margin + 30.0,
        height - margin,
        width - margin,
        height - margin,
    );
    let limit = y(max_lag, top_lag);
    svg += &format!(
        "<line x1=\"{margin}\" y1=\"{limit:.1}\" x2=\"{}\" y2=\"{limit:.1}\" stroke=\"red\" stroke-dasharray=\"2,4\"/>\n",
        width - margin
    );
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"];
    for (i, (model, color)) in MODELS.iter().zip(colors).enumerate() {
        let points = samples.iter().map(|s| (x(s.at), y(*s.lags.get(*model).unwrap_or(&0.0), top_lag))).collect();
        svg += &line(points, &format!("stroke=\"{color}\" stroke-width=\"1.5\""));
        let legend_x = margin + 10.0 + i as f64 * 110.0;
        svg += &format!("<text x=\"{legend_x}\" y=\"44\" fill=\"{color}\">{model}</text>\n");
    }
    let rates = samples.iter().map(|s| (x(s.at), y(s.rate, top_rate))).collect();
    svg += &line(rates, "stroke=\"gray\" stroke-dasharray=\"5,3\"");
    svg + "</svg>\n"
}

const MODELS: [&str; 4] = ["postgres", "redis", "mongo", "search"];

/// The platform, started fresh in this process.
struct Platform {
    write: String,
    read: String,
    token: String,
    channels: Vec<String>,
    /// Where the setup's commands ended.
    position: String,
    tasks: JoinSet<()>,
}

async fn start(args: &Args) -> Result<Platform> {
    let url = contract::fresh_postgres_database().await.context("QUIKAPP_POSTGRES_URL names the server")?;
    let store = Arc::new(PostgresStore::connect(&url).await?);
    store.migrate().await?;
    let topics = fresh_topics();
    let kafka = KafkaConfig {
        brokers: args.kafka_brokers.clone(),
        topics: topics.clone(),
        partitions: PARTITIONS,
        options: Default::default(),
    };
    let relay = quikapp_bus::relay::Relay {
        pool: store.pool().clone(),
        store: store.clone(),
        publisher: Arc::new(KafkaPublisher::connect(&kafka).await?),
        config: quikapp_bus::relay::RelayConfig::default(),
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let _ = relay.run(std::future::pending()).await;
    });

    let run = Uuid::now_v7().simple().to_string();
    let directory = Arc::new(PostgresDirectory::connect(&url).await?);
    directory.migrate().await?;
    let keys = Keys { prefix: format!("bench:{run}:") };
    let counters = Counters::new(Arc::new(RedisKeyspace::connect(&args.redis_url, keys.clone()).await?), keys);
    let mongo = format!("{}/bench_{run}", args.mongo_url.split('?').next().unwrap_or("").trim_end_matches('/'));
    let timelines = Arc::new(MongoTimelines::connect(&mongo).await?);
    timelines.migrate().await?;
    let search = Arc::new(OpenSearch::connect(&args.elasticsearch_url, &format!("bench-{run}-"))?);
    search.migrate().await?;
    let projectors: Vec<Arc<dyn Projector>> =
        vec![directory.clone(), Arc::new(counters.clone()), timelines.clone(), search.clone()];
    let bus: Arc<dyn EventBus> =
        Arc::new(KafkaBus { brokers: args.kafka_brokers.clone(), topics: topics.clone(), partitions: PARTITIONS });
    for projector in &projectors {
        let config =
            RuntimeConfig { batch_size: args.batch, group_prefix: format!("bench-{run}-"), ..RuntimeConfig::default() };
        let runtime = Runtime { projector: projector.clone(), bus: bus.clone(), config };
        tasks.spawn(runtime.run(std::future::pending()));
    }

    let (write, tokens) = unlimited_write_api(store.clone())?;
    let read_config = quikapp_read_api::ReadConfig {
        partitions: topics.partitions(PARTITIONS),
        min_position_wait: Duration::from_secs(60),
        request_timeout: Duration::from_secs(90),
    };
    let models = quikapp_read_api::Models {
        directory,
        counters,
        timelines,
        search,
        presence: Arc::new(quikapp_realtime::presence::MemoryPresence::new(None)),
        projectors,
    };
    let read = quikapp_read_api::ReadApi::new(models, store.clone(), tokens.clone(), read_config);
    let mut serve = async |router: axum::Router| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tasks.spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        anyhow::Ok(format!("http://{address}"))
    };
    let write = serve(quikapp_write_api::router(write)).await?;
    let read = serve(quikapp_read_api::router(read)).await?;

    let http = reqwest::Client::new();
    let token = tokens.mint(Uuid::now_v7());
    let command = |path: String, body: Value| {
        let request = http.post(format!("{write}/v1{path}")).bearer_auth(&token).json(&body);
        async move {
            let answer: Value = request.send().await?.json().await?;
            anyhow::Ok(answer)
        }
    };
    let workspace = command("/workspaces".into(), json!({ "name": "bench" })).await?;
    let workspace = workspace["workspace_id"].as_str().context("a workspace")?.to_owned();
    let (mut channels, mut position) = (Vec::new(), String::new());
    for i in 0..20 {
        let channel = command(format!("/workspaces/{workspace}/channels"), json!({ "name": format!("c{i}") })).await?;
        channels.push(channel["channel_id"].as_str().context("a channel")?.to_owned());
        position = channel["position"].as_str().context("a position")?.to_owned();
    }
    Ok(Platform { write, read, token, channels, position, tasks })
}

/// Each model's lag in seconds, as GET /projections reports it.
async fn lags(
    http: &reqwest::Client,
    platform: &Platform,
    min_position: Option<&str>,
) -> Result<BTreeMap<String, f64>> {
    let mut request = http.get(format!("{}/v1/projections", platform.read)).bearer_auth(&platform.token);
    if let Some(position) = min_position {
        request = request.header("x-min-position", position);
    }
    let response = request.send().await?;
    anyhow::ensure!(response.status().is_success(), "GET /projections: {}", response.status());
    let answer: Value = response.json().await?;
    let projections = answer["projections"].as_array().context("projections")?;
    Ok(projections.iter().filter_map(|p| Some((p["name"].as_str()?.to_owned(), p["lag_seconds"].as_f64()?))).collect())
}

struct Outcome {
    /// Commands answered per second while the load was sent.
    achieved: f64,
    worst: BTreeMap<String, f64>,
}

/// One run at `rate` commands per second, `changes_percent` of them edits and reactions.
async fn run(args: &Args, rate: u64, changes_percent: u64) -> Result<Outcome> {
    let mut platform = start(args).await?;
    let http = reqwest::Client::new();
    // Every consumer group assigned and caught up with the setup before the clock starts.
    lags(&http, &platform, Some(&platform.position)).await.context("the pipeline warms up")?;

    let posted: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Answers other than 2xx, by status (0: no answer).
    let failures: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
    let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4_000));
    let load = {
        let (http, write, token, channels) =
            (http.clone(), platform.write.clone(), platform.token.clone(), platform.channels.clone());
        let (posted, answered, failures, in_flight, last) =
            (posted.clone(), answered.clone(), failures.clone(), in_flight.clone(), last.clone());
        let seconds = args.seconds;
        tokio::spawn(async move {
            let sending = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut requests = JoinSet::new();
            let mut sent = 0u64;
            for _ in 0..seconds * 100 {
                tick.tick().await;
                for _ in 0..rate / 100 {
                    sent += 1;
                    let permit = in_flight.clone().acquire_owned().await.expect("never closed");
                    let channel = channels[(sent % channels.len() as u64) as usize].clone();
                    // Every (100 / changes_percent)th command changes a message posted earlier.
                    let change = changes_percent > 0 && sent.is_multiple_of(100 / changes_percent);
                    let target = if change {
                        let posted = posted.lock().unwrap();
                        posted.get(posted.len().saturating_sub(1 + (sent as usize * 7) % 500)).cloned()
                    } else {
                        None
                    };
                    let request = match &target {
                        Some((channel, message)) if sent.is_multiple_of(2) => http
                            .patch(format!("{write}/v1/channels/{channel}/messages/{message}"))
                            .json(&json!({ "text": format!("edited at {sent}") })),
                        Some((channel, message)) => {
                            http.put(format!("{write}/v1/channels/{channel}/messages/{message}/reactions/tada"))
                        }
                        None => http
                            .post(format!("{write}/v1/channels/{channel}/messages"))
                            .json(&json!({ "text": format!("message {sent}: standup moved to 10:30") })),
                    }
                    .bearer_auth(&token);
                    let (posted, answered, failures, last) =
                        (posted.clone(), answered.clone(), failures.clone(), last.clone());
                    requests.spawn(async move {
                        let _permit = permit;
                        let (status, answer) = match request.send().await {
                            Ok(response) => (response.status().as_u16(), response.json::<Value>().await.ok()),
                            Err(_) => (0, None),
                        };
                        let Some(answer) = answer.filter(|_| (200..300).contains(&status)) else {
                            *failures.lock().unwrap().entry(status).or_default() += 1;
                            return;
                        };
                        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let position = answer["position"].as_str().and_then(|p| p.parse().ok()).unwrap_or(0);
                        last.fetch_max(position, std::sync::atomic::Ordering::Relaxed);
                        if target.is_none()
                            && let Some(message) = answer["message_id"].as_str()
                        {
                            posted.lock().unwrap().push((channel, message.to_owned()));
                        }
                    });
                    while requests.try_join_next().is_some() {}
                }
            }
            let sent_for = sending.elapsed();
            while requests.join_next().await.is_some() {}
            sent_for
        })
    };

    let started = Instant::now();
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut window = (Instant::now(), 0u64);
    let (mut samples, mut previous) = (Vec::new(), (Instant::now(), 0u64));
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    sample.tick().await;
    while !load.is_finished() {
        sample.tick().await;
        let now = lags(&http, &platform, None).await?;
        for (model, lag) in &now {
            let worst = worst.entry(model.clone()).or_default();
            *worst = worst.max(*lag);
        }
        let count = answered.load(std::sync::atomic::Ordering::Relaxed);
        let rate_now = (count - previous.1) as f64 / previous.0.elapsed().as_secs_f64();
        previous = (Instant::now(), count);
        samples.push(Sample { at: started.elapsed().as_secs_f64(), rate: rate_now, lags: now.clone() });
        let elapsed = started.elapsed().as_secs();
        if elapsed.is_multiple_of(5) {
            let count = answered.load(std::sync::atomic::Ordering::Relaxed);
            let window_rate = (count - window.1) as f64 / window.0.elapsed().as_secs_f64();
            window = (Instant::now(), count);
            let lags: Vec<String> =
                MODELS.iter().map(|m| format!("{m} {:>5.2}", now.get(*m).unwrap_or(&f64::NAN))).collect();
            println!("    t={elapsed:>3}s  {window_rate:>5.0} commands/s   lag s: {}", lags.join("  "));
        }
    }
    let sent_for = load.await?;
    let achieved = answered.load(std::sync::atomic::Ordering::Relaxed) as f64 / sent_for.as_secs_f64();
    let failed = failures.lock().unwrap().clone();
    // Every model at the last command's position: GET /projections waits for all of them.
    let drained = Instant::now();
    let last = last.load(std::sync::atomic::Ordering::Relaxed).to_string();
    let caught_up = lags(&http, &platform, Some(&last)).await.is_ok();
    println!(
        "    {achieved:.0} commands/s answered (others, by status: {failed:?}); worst lag s: {}; every model at the last command {}",
        MODELS.iter().map(|m| format!("{m} {:.2}", worst.get(*m).unwrap_or(&f64::NAN))).collect::<Vec<_>>().join(", "),
        match caught_up {
            true => format!("{:.1} s after the load", drained.elapsed().as_secs_f64()),
            false => "not within 60 s".into(),
        }
    );
    platform.tasks.abort_all();
    if let Some(directory) = &args.plot {
        let title = format!("{rate} commands/s asked, {changes_percent}% edits and reactions: lag per model");
        let file = directory.join(format!("pipeline-{rate}-{changes_percent}pct.svg"));
        std::fs::create_dir_all(directory)?;
        std::fs::write(&file, plot(&samples, rate, args.max_lag, &title))?;
        println!("    plot: {}", file.display());
    }
    Ok(Outcome { achieved, worst })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let series =
        [("PostMessage only", 0, &args.rates), ("with edits and reactions", args.changes_percent, &args.changes_rates)];
    for (name, changes, rates) in series {
        println!(
            "sustained pipeline, {name} ({changes}% changes), {} s per rate, lag limit {} s:",
            args.seconds, args.max_lag
        );
        let mut held = None;
        for rate in rates.iter().copied() {
            println!("  {rate} commands/s asked:");
            let outcome = run(&args, rate, changes).await?;
            let (bound, lag) = outcome
                .worst
                .iter()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(m, l)| (m.clone(), *l))
                .unwrap_or_default();
            let kept_up = outcome.achieved >= rate as f64 * 0.98;
            let holds = kept_up && lag <= args.max_lag;
            println!(
                "  {rate}/s: {} (commands {}, most lagging model: {bound} at {lag:.2} s)",
                if holds { "holds" } else { "does not hold" },
                if kept_up { "kept up" } else { "fell behind" }
            );
            if !holds {
                break;
            }
            held = Some(rate);
        }
        match held {
            Some(rate) => println!("  highest rate held: {rate} commands/s (target >= 1500 for PostMessage only)"),
            None => println!("  no rate held"),
        }
    }
    Ok(())
}
