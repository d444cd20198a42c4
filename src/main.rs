//! `quikapp`: every role of the QuikApp event platform in one binary (see API.md, One binary).
//!
//! # Layout
//! - `main.rs`: the command line, and how each role is put together from the crates.
//! - `config.rs`: configuration from a TOML file and `QUIKAPP_*` variables.
//! - `models.rs`: the read models, the bus and the projectors, real or embedded.

mod config;
mod models;
mod replay;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use quikapp_bus::kafka::{KafkaConfig, KafkaPublisher};
use quikapp_bus::relay::{Relay, RelayConfig};
use quikapp_bus::{Publisher, Topics};
use quikapp_commands::CommandService;
use quikapp_commands::store::{EventStore, PostgresStore, SqliteStore, StoreOptions};
use quikapp_realtime::dispatcher::Dispatcher;
use quikapp_realtime::fanout::{Fanout, MemoryFanout, RedisFanout};
use quikapp_realtime::forwarder::Forwarder;
use quikapp_realtime::gateway::{Gateway, GatewayConfig};
use quikapp_realtime::presence::{MemoryPresence, Presence, RedisPresence};
use quikapp_write_api::auth::Tokens;
use quikapp_write_api::{Limits, RateLimit, WriteApi};
use uuid::Uuid;

use crate::config::Config;

/// The secret `quikapp dev` signs tokens with when none is configured. Public by design.
const DEV_JWT_SECRET: &str = "quikapp-dev-secret-not-for-production";

#[derive(Parser)]
#[command(name = "quikapp", version, about = "QuikApp event platform: every role in one binary")]
struct Cli {
    /// A TOML configuration file (see quikapp.example.toml); QUIKAPP_* variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Every role in one process, on the embedded default unless store URLs are configured.
    Dev,
    /// The command REST API.
    WriteApi,
    /// The query REST API.
    ReadApi,
    /// Publish every stored event to Kafka in commit order (one active relay; others stand by).
    Relay,
    /// The WebSocket gateway: every event a user may see, live (consumer group quikapp-realtime
    /// to Redis, Redis to every gateway).
    Realtime,
    /// Keep read models up to date from Kafka: one consumer group each.
    Project {
        /// `postgres`, `redis`, `mongo`, `search`, or `all`.
        model: models::Selection,
    },
    /// Rebuild read models from the event store beside the live ones, then swap them in.
    Replay(replay::ReplayArgs),
    /// Create or upgrade the schemas of every configured store.
    Migrate,
    /// Mint a bearer token for local use.
    Token {
        /// The user the token speaks for.
        user_id: Uuid,
    },
}

/// Errors end the process with one line, its causes joined by colons.
#[tokio::main]
async fn main() {
    if let Err(error) = run(Cli::parse()).await {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let config = Config::load(cli.config.as_deref()).context("reading the configuration")?;
    match cli.role {
        Role::Token { user_id } => {
            let secret = config.jwt_secret.clone().unwrap_or_else(|| {
                eprintln!("QUIKAPP_JWT_SECRET is not set: signing with the dev secret of `quikapp dev`");
                DEV_JWT_SECRET.to_owned()
            });
            println!("{}", Tokens::new(&secret)?.mint(user_id));
            Ok(())
        }
        Role::Migrate => {
            init_tracing();
            open_event_store(&config).await?;
            println!("migrated the event store ({})", store_description(&config));
            if config.postgres_url.is_some() {
                models::open_directory(&config).await?;
                println!("migrated the PostgreSQL read model");
            }
            if config.mongo_url.is_some() {
                models::open_timelines(&config).await?;
                println!("made the MongoDB read model's indexes");
            }
            if config.elasticsearch_url.is_some() {
                models::open_search(&config).await?;
                println!("made the search read model's template and index");
            }
            Ok(())
        }
        Role::Dev => {
            init_tracing();
            let secret = config.jwt_secret.clone().unwrap_or_else(|| {
                println!("JWT secret: {DEV_JWT_SECRET:?} (the dev default; set QUIKAPP_JWT_SECRET to choose one)");
                DEV_JWT_SECRET.to_owned()
            });
            println!("event store: {}", store_description(&config));
            run_dev(&config, &secret).await
        }
        Role::Relay => {
            init_tracing();
            run_relay(&config).await
        }
        Role::WriteApi => {
            init_tracing();
            let store = open_event_store(&config).await?;
            run_write_api(&config, &required_secret(&config)?, store, shutdown_signal()).await
        }
        Role::ReadApi => {
            init_tracing();
            let urls = (&config.postgres_url, &config.redis_url, &config.mongo_url, &config.elasticsearch_url);
            let (Some(_), Some(_), Some(_), Some(_)) = urls else {
                bail!(
                    "the read API needs QUIKAPP_POSTGRES_URL, QUIKAPP_REDIS_URL, QUIKAPP_MONGO_URL and \
                     QUIKAPP_ELASTICSEARCH_URL (its read models)"
                );
            };
            let store = open_event_store(&config).await?;
            let models = models::ReadModels::open(&config).await?;
            let redis = config.redis_url.as_deref().expect("checked above");
            let presence = redis_presence(&config, redis, None).await?;
            run_read_api(&config, &required_secret(&config)?, store, &models, presence, shutdown_signal()).await
        }
        Role::Replay(args) => {
            init_tracing();
            replay::run(&config, args).await
        }
        Role::Project { model } => {
            init_tracing();
            run_projectors(&config, model).await
        }
        Role::Realtime => {
            init_tracing();
            let (Some(_), Some(brokers), Some(redis)) =
                (&config.postgres_url, &config.kafka_brokers, &config.redis_url)
            else {
                bail!("the realtime gateway needs QUIKAPP_POSTGRES_URL, QUIKAPP_KAFKA_BROKERS and QUIKAPP_REDIS_URL");
            };
            let secret = required_secret(&config)?;
            let store = open_event_store(&config).await?;
            let bus: Arc<dyn quikapp_bus::EventBus> = Arc::new(quikapp_bus::kafka::KafkaBus {
                brokers: brokers.clone(),
                topics: topics(&config),
                partitions: config.kafka_partitions,
            });
            let fanout = redis_fanout(&config, redis).await?;
            let presence = redis_presence(&config, redis, Some(fanout.clone())).await?;
            run_realtime(&config, &secret, store, bus, (fanout, presence), shutdown_signal()).await
        }
    }
}

fn required_secret(config: &Config) -> Result<String> {
    match &config.jwt_secret {
        Some(secret) => Ok(secret.clone()),
        None => bail!("QUIKAPP_JWT_SECRET (or jwt_secret in the config file) is required by every role but `dev`"),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn store_description(config: &Config) -> String {
    match &config.postgres_url {
        Some(_) => "PostgreSQL (QUIKAPP_POSTGRES_URL)".into(),
        None => format!("embedded SQLite at {}", config.data_dir.join("events.db").display()),
    }
}

/// The configured event store, migrated to the current schema.
async fn open_event_store(config: &Config) -> Result<Arc<dyn EventStore>> {
    match &config.postgres_url {
        Some(url) => {
            let store =
                PostgresStore::connect_with(url, store_options(config)).await.context("connecting to PostgreSQL")?;
            store.migrate().await.context("migrating the PostgreSQL event store")?;
            Ok(Arc::new(store))
        }
        None => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("creating {}", config.data_dir.display()))?;
            let store = SqliteStore::open_with(&config.data_dir.join("events.db"), store_options(config))
                .await
                .context("opening the embedded store")?;
            store.migrate().await.context("migrating the embedded event store")?;
            Ok(Arc::new(store))
        }
    }
}

fn store_options(config: &Config) -> StoreOptions {
    let idempotency_retention = Duration::from_secs(config.idempotency_retention_hours * 3600);
    StoreOptions { idempotency_retention, ..StoreOptions::default() }
}

async fn run_write_api(
    config: &Config,
    secret: &str,
    store: Arc<dyn EventStore>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let tokens = Tokens::new(secret)?;
    let limits = Limits {
        rate_limit: RateLimit { per_second: config.rate_limit_per_second, burst: config.rate_limit_burst },
        request_timeout: Duration::from_secs(config.request_timeout_seconds),
        ..Limits::default()
    };
    let api = WriteApi::new(CommandService::new(store), tokens, limits);
    let listener = tokio::net::TcpListener::bind(config.write_addr)
        .await
        .with_context(|| format!("binding {}", config.write_addr))?;
    // Tests and scripts read this line to find a port chosen by the system (address :0).
    println!("write API listening on http://{}", listener.local_addr()?);
    quikapp_write_api::serve(listener, quikapp_write_api::router(api), shutdown).await?;
    println!("write API stopped");
    Ok(())
}

async fn run_read_api(
    config: &Config,
    secret: &str,
    store: Arc<dyn EventStore>,
    models: &models::ReadModels,
    presence: Arc<dyn Presence>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let read_config = quikapp_read_api::ReadConfig {
        partitions: models::partitions(config).await,
        min_position_wait: Duration::from_secs(config.min_position_wait_seconds),
        request_timeout: Duration::from_secs(config.request_timeout_seconds),
    };
    let api = quikapp_read_api::ReadApi::new(models.served(presence), store, Tokens::new(secret)?, read_config);
    let listener = tokio::net::TcpListener::bind(config.read_addr)
        .await
        .with_context(|| format!("binding {}", config.read_addr))?;
    println!("read API listening on http://{}", listener.local_addr()?);
    quikapp_read_api::serve(listener, quikapp_read_api::router(api), shutdown).await?;
    println!("read API stopped");
    Ok(())
}

/// The realtime fan-out over Redis: a stream under the key prefix.
async fn redis_fanout(config: &Config, url: &str) -> Result<Arc<dyn Fanout>> {
    let key = format!("{}realtime", config.redis_key_prefix);
    let fanout = RedisFanout::connect(url, config.realtime_redis_db, key, REALTIME_STREAM_LENGTH)
        .await
        .context("connecting to Redis")?;
    Ok(Arc::new(fanout))
}

/// Presence in Redis; announced through `fanout` (none for a reader).
async fn redis_presence(config: &Config, url: &str, fanout: Option<Arc<dyn Fanout>>) -> Result<Arc<dyn Presence>> {
    let ttl = Duration::from_secs(config.realtime_presence_ttl_seconds);
    let presence = RedisPresence::connect(url, config.realtime_redis_db, config.redis_key_prefix.clone(), ttl, fanout)
        .await
        .context("connecting to Redis")?;
    Ok(Arc::new(presence))
}

/// Slices (one per poll of the bus) the realtime stream in Redis keeps, about.
const REALTIME_STREAM_LENGTH: usize = 100_000;

/// The realtime gateway: a member of the realtime consumer group publishing to `fanout`, and
/// the WebSocket endpoint reading it, until `shutdown`; then every connection is closed with
/// 1001.
async fn run_realtime(
    config: &Config,
    secret: &str,
    store: Arc<dyn EventStore>,
    bus: Arc<dyn quikapp_bus::EventBus>,
    (fanout, presence): (Arc<dyn Fanout>, Arc<dyn Presence>),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let forwarder = Forwarder {
        bus: bus.clone(),
        fanout: fanout.clone(),
        group: config.realtime_group.clone(),
        // A poll is a burst for the clients it concerns, all offered at once to their buffers.
        batch_size: config.projector_batch_size.min(500),
    };
    // The partitions the topics have on the broker, which the relay writes to.
    let dispatcher = Dispatcher::start(fanout.clone(), models::partitions(config).await);
    let (stopping, stopping_seen) = tokio::sync::watch::channel(false);
    let gateway_config = GatewayConfig { send_buffer: config.realtime_send_buffer, ..GatewayConfig::default() };
    let gateway =
        Gateway::new(store, Tokens::new(secret)?, (dispatcher, fanout), presence, gateway_config, stopping_seen);
    let presence_kept = gateway.clone();
    let keeping_presence = tokio::spawn(async move { presence_kept.keep_presence().await });
    let ready = gateway.clone();
    let router = quikapp_realtime::gateway::routes(gateway.clone()).merge(ops_router(move || {
        let ready = ready.clone();
        async move { ready.ready() }
    }));
    let listener = tokio::net::TcpListener::bind(config.realtime_addr)
        .await
        .with_context(|| format!("binding {}", config.realtime_addr))?;
    println!("realtime gateway listening on http://{}", listener.local_addr()?);
    let (stop_publishing, publishing_stopped) = tokio::sync::oneshot::channel::<()>();
    let publishing = tokio::spawn(forwarder.run(async {
        let _ = publishing_stopped.await;
    }));
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stopping.send(true);
        })
        .await?;
    gateway.drained(Duration::from_secs(12)).await;
    let _ = keeping_presence.await;
    let _ = stop_publishing.send(());
    let _ = publishing.await;
    println!("realtime gateway stopped");
    Ok(())
}

/// Every role in one process: the write API, the bus (the store's own log, or the relay and
/// Kafka when configured), the projectors, the read API and the realtime gateway.
async fn run_dev(config: &Config, secret: &str) -> Result<()> {
    let store = open_event_store(config).await?;
    let models = models::ReadModels::open(config).await?;
    let bus = models::open_bus(config, store.clone()).await?;
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopped = |stop: &tokio::sync::broadcast::Sender<()>| {
        let mut receiver = stop.subscribe();
        async move {
            let _ = receiver.recv().await;
        }
    };
    let mut background = tokio::task::JoinSet::new();
    if config.kafka_brokers.is_some() {
        let relay = relay(config).await?;
        let until = stopped(&stop);
        background.spawn(async move { relay.run(until).await });
    }
    models.check_schemas().await?;
    for projector in models.projectors() {
        let runtime = models::runtime(config, projector, bus.clone());
        let until = stopped(&stop);
        background.spawn(async move { runtime.run(until).await });
    }
    let (fanout, presence): (Arc<dyn Fanout>, Arc<dyn Presence>) = match &config.redis_url {
        Some(url) if config.kafka_brokers.is_some() => {
            let fanout = redis_fanout(config, url).await?;
            (fanout.clone(), redis_presence(config, url, Some(fanout)).await?)
        }
        _ => {
            let fanout: Arc<dyn Fanout> = Arc::new(MemoryFanout::new(4_096));
            (fanout.clone(), Arc::new(MemoryPresence::new(Some(fanout))))
        }
    };
    let write = run_write_api(config, secret, store.clone(), stopped(&stop));
    let realtime = run_realtime(config, secret, store.clone(), bus.clone(), (fanout, presence.clone()), stopped(&stop));
    let read = run_read_api(config, secret, store, &models, presence, stopped(&stop));
    // The APIs until a signal; any failing (a port taken) stops everything.
    let apis = async { tokio::try_join!(write, read, realtime).map(|_| ()) };
    tokio::pin!(apis);
    let result = tokio::select! {
        result = &mut apis => result,
        () = shutdown_signal() => {
            let _ = stop.send(());
            apis.await
        }
    };
    let _ = stop.send(());
    background.join_all().await;
    result
}

/// The projectors of `selection`, on Kafka, each with its ops endpoint.
async fn run_projectors(config: &Config, selection: models::Selection) -> Result<()> {
    let Some(brokers) = &config.kafka_brokers else { bail!("projectors read Kafka: set QUIKAPP_KAFKA_BROKERS") };
    // Outside `dev`, a model in memory would be lost with the process while the group's
    // offsets move on: a projector needs its store.
    let needs = |model: models::Selection| selection == model || selection == models::Selection::All;
    if needs(models::Selection::Postgres) && config.postgres_url.is_none() {
        bail!("the postgres projector needs QUIKAPP_POSTGRES_URL");
    }
    if needs(models::Selection::Redis) && config.redis_url.is_none() {
        bail!("the redis projector needs QUIKAPP_REDIS_URL");
    }
    if needs(models::Selection::Mongo) && config.mongo_url.is_none() {
        bail!("the mongo projector needs QUIKAPP_MONGO_URL");
    }
    if needs(models::Selection::Search) && config.elasticsearch_url.is_none() {
        bail!("the search projector needs QUIKAPP_ELASTICSEARCH_URL");
    }
    let models = models::ReadModels::open_selected(config, selection).await?;
    let bus: Arc<dyn quikapp_bus::EventBus> = Arc::new(quikapp_bus::kafka::KafkaBus {
        brokers: brokers.clone(),
        topics: topics(config),
        partitions: config.kafka_partitions,
    });
    models.check_schemas().await?;
    let projectors = models.projectors();
    let check = projectors.clone();
    let readiness = move || {
        let projectors = check.clone();
        async move {
            for projector in projectors {
                projector.stored().await.map_err(|e| format!("{}: {e}", projector.name()))?;
            }
            Ok(())
        }
    };
    let (stop, server) = serve_ops("projector", config.projector_addr, ops_router(readiness)).await?;
    let (signal, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut running = tokio::task::JoinSet::new();
    for projector in projectors {
        let runtime = models::runtime(config, projector, bus.clone());
        let mut until = signal.subscribe();
        running.spawn(async move {
            runtime
                .run(async move {
                    let _ = until.recv().await;
                })
                .await
        });
    }
    shutdown_signal().await;
    let _ = signal.send(());
    running.join_all().await;
    let _ = stop.send(());
    server.await??;
    println!("projector stopped");
    Ok(())
}

/// Serves `ops` on `address` (printing `<role> listening on <url>`) until the sender is used.
/// The router is built by the caller before the role starts: building it installs the metrics
/// recorder, which must exist before the first metric is set.
async fn serve_ops(
    role: &str,
    address: std::net::SocketAddr,
    ops: axum::Router,
) -> Result<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding {address}"))?;
    println!("{role} listening on http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, ops)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok((stop, server))
}

/// `/healthz`, `/readyz` (answered by `readiness`) and `/metrics`, for roles without an API.
fn ops_router<F, Fut>(readiness: F) -> axum::Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let metrics = quikapp_write_api::ops::metrics_handle();
    axum::Router::new()
        .route("/healthz", axum::routing::get(quikapp_write_api::ops::healthz))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let readiness = readiness.clone();
                async move { quikapp_write_api::ops::readiness(readiness().await) }
            }),
        )
        .route("/metrics", axum::routing::get(move || async move { quikapp_write_api::ops::render_metrics(&metrics) }))
}

fn topics(config: &Config) -> Topics {
    Topics { messages: config.kafka_messages_topic.clone(), workspaces: config.kafka_workspaces_topic.clone() }
}

/// The relay, connected to the event store and (retrying until it answers) to Kafka.
async fn relay(config: &Config) -> Result<Relay> {
    let (Some(url), Some(brokers)) = (&config.postgres_url, &config.kafka_brokers) else {
        bail!("the relay needs QUIKAPP_POSTGRES_URL (the event store) and QUIKAPP_KAFKA_BROKERS");
    };
    let store =
        Arc::new(PostgresStore::connect_with(url, store_options(config)).await.context("connecting to PostgreSQL")?);
    store.migrate().await.context("migrating the PostgreSQL event store")?;
    let kafka = KafkaConfig {
        brokers: brokers.clone(),
        topics: topics(config),
        partitions: config.kafka_partitions,
        options: config.kafka_options.clone(),
    };
    // Kafka may be down when the relay starts: keep trying, as the relay does once running.
    let mut backoff = std::time::Duration::from_secs(1);
    let publisher: Arc<dyn Publisher> = loop {
        match KafkaPublisher::connect(&kafka).await {
            Ok(publisher) => break Arc::new(publisher),
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot reach Kafka yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
            }
        }
    };
    Ok(Relay {
        pool: store.pool().clone(),
        store,
        publisher,
        config: RelayConfig { batch_size: config.relay_batch_size, ..RelayConfig::default() },
    })
}

async fn run_relay(config: &Config) -> Result<()> {
    let relay = tokio::select! {
        relay = relay(config) => relay?,
        () = shutdown_signal() => return Ok(()),
    };
    let (store, publisher) = (relay.store.clone(), relay.publisher.clone());
    let readiness = move || {
        let (store, publisher) = (store.clone(), publisher.clone());
        async move {
            store.ping().await.map_err(|e| e.to_string())?;
            publisher.ping().await.map_err(|e| e.to_string())
        }
    };
    let (stop, server) = serve_ops("relay", config.relay_addr, ops_router(readiness)).await?;
    relay.run(shutdown_signal()).await;
    let _ = stop.send(());
    server.await??;
    println!("relay stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async { tokio::signal::ctrl_c().await.expect("listening for Ctrl-C") };
    let terminate = async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("listening for SIGTERM")
            .recv()
            .await;
    };
    tokio::select! {
        () = interrupt => {}
        _ = terminate => {}
    }
}
