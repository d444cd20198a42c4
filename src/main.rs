//! `quikapp`: every role of the QuikApp event platform in one binary (see API.md, One binary).
//!
//! # Layout
//! - `main.rs`: the command line, and how each role is put together from the crates.
//! - `config.rs`: configuration from a TOML file and `QUIKAPP_*` variables.

mod config;

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
    /// Publish every stored event to Kafka in commit order (one active relay; others stand by).
    Relay,
    /// Create or upgrade the schemas of every configured store.
    Migrate,
    /// Mint a bearer token for local use.
    Token {
        /// The user the token speaks for.
        user_id: Uuid,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
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
            Ok(())
        }
        Role::Dev => {
            init_tracing();
            let secret = config.jwt_secret.clone().unwrap_or_else(|| {
                println!("JWT secret: {DEV_JWT_SECRET:?} (the dev default; set QUIKAPP_JWT_SECRET to choose one)");
                DEV_JWT_SECRET.to_owned()
            });
            println!("event store: {}", store_description(&config));
            run_write_api(&config, &secret).await
        }
        Role::Relay => {
            init_tracing();
            run_relay(&config).await
        }
        Role::WriteApi => {
            init_tracing();
            let Some(secret) = config.jwt_secret.clone() else {
                bail!("QUIKAPP_JWT_SECRET (or jwt_secret in the config file) is required by every role but `dev`");
            };
            run_write_api(&config, &secret).await
        }
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

async fn run_write_api(config: &Config, secret: &str) -> Result<()> {
    let tokens = Tokens::new(secret)?;
    let store = open_event_store(config).await?;
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
    quikapp_write_api::serve(listener, quikapp_write_api::router(api), shutdown_signal()).await?;
    println!("write API stopped");
    Ok(())
}

async fn run_relay(config: &Config) -> Result<()> {
    let (Some(url), Some(brokers)) = (&config.postgres_url, &config.kafka_brokers) else {
        bail!("the relay needs QUIKAPP_POSTGRES_URL (the event store) and QUIKAPP_KAFKA_BROKERS");
    };
    let store =
        Arc::new(PostgresStore::connect_with(url, store_options(config)).await.context("connecting to PostgreSQL")?);
    store.migrate().await.context("migrating the PostgreSQL event store")?;
    let kafka = KafkaConfig {
        brokers: brokers.clone(),
        topics: Topics {
            messages: config.kafka_messages_topic.clone(),
            workspaces: config.kafka_workspaces_topic.clone(),
        },
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
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown_signal() => return Ok(()),
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
            }
        }
    };
    let relay = Relay {
        pool: store.pool().clone(),
        store: store.clone(),
        publisher: publisher.clone(),
        config: RelayConfig { batch_size: config.relay_batch_size, ..RelayConfig::default() },
    };
    let metrics = quikapp_write_api::ops::metrics_handle();
    let ops = axum::Router::new()
        .route("/healthz", axum::routing::get(quikapp_write_api::ops::healthz))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let (store, publisher) = (store.clone(), publisher.clone());
                async move {
                    let store_ready = store.ping().await.map_err(|e| e.to_string());
                    let ready = match store_ready {
                        Ok(()) => publisher.ping().await.map_err(|e| e.to_string()),
                        error => error,
                    };
                    quikapp_write_api::ops::readiness(ready)
                }
            }),
        )
        .route("/metrics", axum::routing::get(move || async move { quikapp_write_api::ops::render_metrics(&metrics) }));
    let listener = tokio::net::TcpListener::bind(config.relay_addr)
        .await
        .with_context(|| format!("binding {}", config.relay_addr))?;
    println!("relay listening on http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, ops)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
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
