//! The relay: publishes every stored event, in global order, from a checkpoint.
//!
//! - **One active relay.** Any number may run; each stands by until it holds a PostgreSQL
//!   session advisory lock on a connection of its own, which it keeps for as long as it
//!   publishes. When that process or connection dies, PostgreSQL releases the lock and a
//!   standby takes over within its retry period (one second), from the checkpoint.
//! - **Checkpoint.** The highest position whose events and watermarks Kafka acknowledged, kept
//!   in the event store's database and written through the lock's connection only after the
//!   acknowledgement. A restart resumes there, so duplicates can only come from the batch in
//!   flight, and carry the same event_id.
//! - **Never skipping.** The store makes positions visible in order (see commands), so reading
//!   `position > checkpoint` never passes over a late commit.
//! - **Wake-ups.** Appends NOTIFY `quikapp_events` on commit; the relay listens, and polls every
//!   second as a safety net. While idle it publishes a watermark of its checkpoint every second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quikapp_commands::store::EventStore;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Connection, PgConnection};

use crate::{BusError, Publisher};

/// The session advisory lock that makes one relay the active one.
pub const RELAY_LOCK: i64 = 0x5155_494b_5245_4c31; // "QUIKREL1"

/// The channel appends NOTIFY on commit.
pub const WAKE_CHANNEL: &str = "quikapp_events";

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The checkpoint's name: relays of one name share one checkpoint and one lock.
    pub name: String,
    /// Events published per batch.
    pub batch_size: u32,
    /// Watermarks while idle, and the safety-net poll.
    pub tick: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig { name: "kafka".into(), batch_size: 2_000, tick: Duration::from_secs(1) }
    }
}

pub struct Relay {
    pub pool: PgPool,
    pub store: Arc<dyn EventStore>,
    pub publisher: Arc<dyn Publisher>,
    pub config: RelayConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("event store: {0}")]
    Store(String),
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl From<sqlx::Error> for RelayError {
    fn from(error: sqlx::Error) -> Self {
        RelayError::Store(error.to_string())
    }
}

impl From<quikapp_commands::store::StoreError> for RelayError {
    fn from(error: quikapp_commands::store::StoreError) -> Self {
        RelayError::Store(error.to_string())
    }
}

impl Relay {
    /// Stands by, leads while it holds the lock, and stands by again when it loses it, until
    /// `shutdown` resolves.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let attempt = async {
                let mut lock = self.take_the_lead().await?;
                tracing::info!(relay = %self.config.name, "this relay is now the active one");
                metrics::gauge!("quikapp_relay_active").set(1.0);
                let led = self.lead(&mut lock).await;
                metrics::gauge!("quikapp_relay_active").set(0.0);
                led
            };
            tokio::select! {
                result = attempt => match result {
                    Ok(()) => {}
                    Err(error) => {
                        metrics::counter!("quikapp_relay_errors_total").increment(1);
                        tracing::warn!(%error, "relay stopped leading; standing by");
                    }
                },
                () = &mut shutdown => return,
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.tick) => {}
                () = &mut shutdown => return,
            }
        }
    }

    /// A connection holding the relay lock, once this relay gets it.
    async fn take_the_lead(&self) -> Result<PgConnection, RelayError> {
        let mut connection = self.pool.acquire().await?.detach();
        loop {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(RELAY_LOCK)
                .fetch_one(&mut connection)
                .await?;
            if locked {
                return Ok(connection);
            }
            tokio::time::sleep(self.config.tick).await;
        }
    }

    /// Publishes until an error; the caller stands by again.
    async fn lead(&self, lock: &mut PgConnection) -> Result<(), RelayError> {
        let mut wake = PgListener::connect_with(&self.pool).await?;
        wake.listen(WAKE_CHANNEL).await?;
        let mut checkpoint = self.load_checkpoint(lock).await?;
        let mut last_watermark = Instant::now() - self.config.tick;
        loop {
            let events = self.store.read_all(checkpoint, self.config.batch_size).await?;
            let head = events.last().map_or(checkpoint, |e| e.global_position);
            metrics::gauge!("quikapp_relay_lag_seconds")
                .set(events.first().map_or(0.0, |e| (chrono::Utc::now() - e.occurred_at).as_seconds_f64().max(0.0)));
            if events.is_empty() {
                if last_watermark.elapsed() >= self.config.tick {
                    self.publish(&[], checkpoint).await?;
                    last_watermark = Instant::now();
                }
                self.record_lag(checkpoint).await;
                let wait = self.config.tick.saturating_sub(last_watermark.elapsed());
                tokio::select! {
                    notified = wake.recv() => { notified?; }
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            // Still the active relay? A lost lock connection means another may be leading.
            sqlx::query("SELECT 1").execute(&mut *lock).await?;
            self.publish(&events, head).await?;
            self.save_checkpoint(lock, head).await?;
            checkpoint = head;
            last_watermark = Instant::now();
            metrics::counter!("quikapp_relay_published_events_total").increment(events.len() as u64);
            metrics::counter!("quikapp_relay_batches_total").increment(1);
            self.record_lag(checkpoint).await;
        }
    }

    /// Publishes, retrying with backoff while the bus is down: the store keeps the events.
    async fn publish(&self, events: &[quikapp_domain::Envelope], watermark: u64) -> Result<(), RelayError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.publisher.publish(events, watermark).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    metrics::counter!("quikapp_relay_kafka_errors_total").increment(1);
                    tracing::warn!(%error, retry_in = ?backoff, "publishing failed; retrying the batch");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn record_lag(&self, checkpoint: u64) {
        if let Ok(head) = self.store.head().await {
            metrics::gauge!("quikapp_relay_lag_events").set(head.saturating_sub(checkpoint) as f64);
        }
    }

    async fn load_checkpoint(&self, lock: &mut PgConnection) -> Result<u64, RelayError> {
        let position: Option<i64> = sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE relay = $1")
            .bind(&self.config.name)
            .fetch_optional(&mut *lock)
            .await?;
        Ok(position.unwrap_or(0) as u64)
    }

    async fn save_checkpoint(&self, lock: &mut PgConnection, position: u64) -> Result<(), RelayError> {
        sqlx::query(
            "INSERT INTO relay_checkpoints (relay, position) VALUES ($1, $2) \
             ON CONFLICT (relay) DO UPDATE SET position = excluded.position",
        )
        .bind(&self.config.name)
        .bind(position as i64)
        .execute(&mut *lock)
        .await?;
        Ok(())
    }
}

/// Where the relay named `name` stands, for tests and operators.
pub async fn checkpoint(pool: &PgPool, name: &str) -> Result<u64, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let position: Option<i64> = sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE relay = $1")
        .bind(name)
        .fetch_optional(&mut *connection)
        .await?;
    let _ = connection.ping().await;
    Ok(position.unwrap_or(0) as u64)
}
