//! The relay: publishes every stored event, in global order, from a checkpoint.
//!
//! - **One active relay.** Any number may run; each stands by until it holds a PostgreSQL
//!   session advisory lock on a connection of its own, which it keeps for as long as it
//!   publishes. When that process or connection dies, PostgreSQL releases the lock and a
//!   standby takes over within its retry period (one second), from the checkpoint.
//! - **Checkpoint.** The highest position whose events and watermarks Kafka acknowledged, kept
//!   in the event store's database and written through the lock's connection only after the
//!   acknowledgement. A restart resumes there, so duplicates can only come from the events
//!   handed over beyond it (at most [`IN_FLIGHT`] batches' worth), and carry the same event_id.
//! - **Never skipping.** The store makes positions visible in order (see commands), so reading
//!   `position > checkpoint` never passes over a late commit.
//! - **Wake-ups.** Appends NOTIFY `quikapp_events` on commit; the relay listens, and polls every
//!   second as a safety net. While idle it publishes a watermark of its checkpoint every second.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use quikapp_commands::store::{EncodedEvent, EventStore};
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::mpsc;

use crate::{Acks, BusError, Publisher};

/// The longest pause between attempts while Kafka or PostgreSQL is down.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Events handed to the bus beyond the checkpoint, at most, in batches' worth (of
/// [`RelayConfig::batch_size`]): a crash publishes at most that many events twice. Counted in
/// events rather than pages, so that the small pages of live traffic never wait for an
/// acknowledgement.
pub const IN_FLIGHT: usize = 4;

/// The session advisory lock that makes one relay the active one.
pub const RELAY_LOCK: i64 = 0x5155_494b_5245_4c31; // "QUIKREL1"

/// Server-side keepalives for the lock's session.
const KEEPALIVES: &str = "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
     SET tcp_keepalives_count = 3; SET tcp_user_timeout = 30000";

/// The longest a statement on the lock's connection may take before this relay steps down.
const LOCK_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel appends NOTIFY on commit.
pub const WAKE_CHANNEL: &str = "quikapp_events";

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The checkpoint's name. All relays of a database share one lock ([`RELAY_LOCK`]).
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
        let mut backoff = self.config.tick;
        loop {
            let started = Instant::now();
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
                    Ok(()) => backoff = self.config.tick,
                    Err(error) => {
                        if started.elapsed() > MAX_BACKOFF {
                            backoff = self.config.tick; // a new outage, after a good run
                        }
                        // Kafka or PostgreSQL down: try again, less often while it lasts. The
                        // events wait in the store; the next leader starts from the checkpoint.
                        if matches!(error, RelayError::Bus(_)) {
                            metrics::counter!("quikapp_relay_kafka_errors_total").increment(1);
                        }
                        metrics::counter!("quikapp_relay_errors_total").increment(1);
                        tracing::warn!(%error, retry_in = ?backoff, "relay stopped leading; standing by");
                    }
                },
                () = &mut shutdown => return,
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = &mut shutdown => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A connection holding the relay lock, once this relay gets it.
    async fn take_the_lead(&self) -> Result<PgConnection, RelayError> {
        let mut connection = self.pool.acquire().await?.detach();
        // Let the server notice within about 30 s that this relay's host or network is gone, so
        // that the lock, which lives as long as this session, passes to a standby.
        connection.execute(KEEPALIVES).await?;
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

    /// Publishes until an error; the caller stands by again. A reader task reads pages ahead
    /// (so PostgreSQL's work overlaps the relay's), and up to [`IN_FLIGHT`] batches' worth of
    /// events beyond the checkpoint are handed to the bus. One set of watermarks is in flight at
    /// a time: a page sent meanwhile goes without, and the next set, sent as soon as the
    /// previous one is acknowledged, covers it. Under load that is one set per bus round trip
    /// rather than one per page (24 records each, on two 12-partition topics), and a consumer
    /// still hears of every position within about a round trip of its events. The checkpoint
    /// follows the acknowledged watermarks, so it always means "these events and a watermark
    /// covering them are on the bus".
    async fn lead(&self, lock: &mut PgConnection) -> Result<(), RelayError> {
        // Losing the last checkpoint in a database crash only means publishing its batch again.
        sqlx::query("SET synchronous_commit = off").execute(&mut *lock).await?;
        let mut wake = PgListener::connect_with(&self.pool).await?;
        wake.listen(WAKE_CHANNEL).await?;
        let mut checkpoint = self.load_checkpoint(lock).await?;
        let (pages_in, mut pages) = mpsc::channel(2);
        let reader = tokio::spawn(read_ahead(self.store.clone(), checkpoint, self.config.clone(), wake, pages_in));
        let _reader = AbortOnDrop(reader);
        let mut in_flight: VecDeque<Sent> = VecDeque::new();
        // The newest position handed to the bus, and the newest a watermark handed over says.
        let (mut published, mut watermarked) = (checkpoint, checkpoint);
        let mut next_watermark = Instant::now();
        let mut next_lag = Instant::now();
        let batch = self.config.batch_size as usize;
        loop {
            let watermark_in_flight = in_flight.iter().any(|sent| sent.watermarked);
            // Positions have no gaps: this is the count of events handed over beyond the checkpoint.
            let room = (IN_FLIGHT * batch).saturating_sub((published - checkpoint) as usize);
            tokio::select! {
                biased;
                acked = async { (&mut in_flight.front_mut().expect("not empty").acks).await }, if !in_flight.is_empty() => {
                    acked?;
                    let mut done = vec![in_flight.pop_front().expect("not empty")];
                    // Whatever else is acknowledged already goes into the same checkpoint.
                    while let Some(acked) = in_flight.front_mut().and_then(|sent| (&mut sent.acks).now_or_never()) {
                        acked?;
                        done.extend(in_flight.pop_front());
                    }
                    let covered = done.iter().rev().find(|sent| sent.watermarked).map(|sent| sent.head);
                    if let Some(head) = covered.filter(|head| *head > checkpoint) {
                        self.save_checkpoint(lock, head).await?;
                        checkpoint = head;
                    }
                    let events: usize = done.iter().map(|sent| sent.events).sum();
                    metrics::counter!("quikapp_relay_published_events_total").increment(events as u64);
                    metrics::counter!("quikapp_relay_batches_total").increment(done.iter().filter(|s| s.events > 0).count() as u64);
                    if Instant::now() >= next_lag {
                        self.record_lag(checkpoint).await;
                        next_lag = Instant::now() + self.config.tick;
                    }
                }
                () = std::future::ready(()), if !watermark_in_flight && watermarked < published => {
                    // The pages sent while the last set was in flight. (A watermark only speaks of
                    // records handed over before it, so it needs no check of the lock.)
                    let acks = self.publisher.send(&[], Some(published)).await?;
                    in_flight.push_back(Sent { head: published, events: 0, watermarked: true, acks });
                    watermarked = published;
                }
                page = pages.recv(), if room >= batch => {
                    let events = page.ok_or_else(|| RelayError::Store("the reader stopped".into()))??;
                    still_leading(lock).await?;
                    let lag = (chrono::Utc::now() - events[0].occurred_at).as_seconds_f64().max(0.0);
                    metrics::gauge!("quikapp_relay_lag_seconds").set(lag);
                    let head = events.last().expect("pages are not empty").global_position;
                    let watermark = (!watermark_in_flight).then_some(head);
                    let acks = self.publisher.send(&events, watermark).await?;
                    in_flight.push_back(Sent { head, events: events.len(), watermarked: watermark.is_some(), acks });
                    published = head;
                    watermarked = watermark.unwrap_or(watermarked);
                    next_watermark = Instant::now() + self.config.tick;
                }
                () = tokio::time::sleep_until(next_watermark.into()), if in_flight.is_empty() => {
                    // Idle: everything read is acknowledged; say so on every partition.
                    metrics::gauge!("quikapp_relay_lag_seconds").set(0.0);
                    self.record_lag(checkpoint).await;
                    still_leading(lock).await?;
                    self.publisher.publish(&[], Some(checkpoint)).await?;
                    next_watermark = Instant::now() + self.config.tick;
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
        let save = sqlx::query(
            "INSERT INTO relay_checkpoints (relay, position) VALUES ($1, $2) \
             ON CONFLICT (relay) DO UPDATE SET position = excluded.position \
             WHERE relay_checkpoints.position < excluded.position",
        )
        .bind(&self.config.name)
        .bind(position as i64)
        .execute(&mut *lock);
        bounded(save).await?;
        Ok(())
    }
}

/// Reads the log from `after` and hands on every non-empty page, waiting for a wake-up (or a
/// tick) when there is nothing new.
async fn read_ahead(
    store: Arc<dyn EventStore>,
    mut after: u64,
    config: RelayConfig,
    mut wake: PgListener,
    pages: mpsc::Sender<Result<Vec<EncodedEvent>, RelayError>>,
) {
    loop {
        let page = match store.read_all_encoded(after, config.batch_size).await {
            Ok(events) if events.is_empty() => {
                tokio::select! {
                    notified = wake.recv() => if let Err(error) = notified {
                        let _ = pages.send(Err(error.into())).await;
                        return;
                    },
                    () = tokio::time::sleep(config.tick) => {}
                }
                while wake.next_buffered().is_some() {} // one read answers every pending wake-up
                continue;
            }
            Ok(events) => {
                after = events.last().expect("not empty").global_position;
                Ok(events)
            }
            Err(error) => Err(error.into()),
        };
        let failed = page.is_err();
        if pages.send(page).await.is_err() || failed {
            return;
        }
    }
}

/// Records handed to the bus by one [`Publisher::send`] and not yet acknowledged.
struct Sent {
    /// The newest position they carry (a watermark's, when they are only watermarks).
    head: u64,
    events: usize,
    /// Whether they end with a watermark of `head` on every partition.
    watermarked: bool,
    acks: Acks,
}

/// Ends a task when its owner is done with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether the lock's connection still answers: if it does not, the lock may be gone and
/// another relay leading.
async fn still_leading(lock: &mut PgConnection) -> Result<(), RelayError> {
    bounded(sqlx::query("SELECT 1").execute(&mut *lock)).await?;
    Ok(())
}

async fn bounded<T>(statement: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, RelayError> {
    match tokio::time::timeout(LOCK_STATEMENT_TIMEOUT, statement).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RelayError::Store("the lock's connection did not answer in time".into())),
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
