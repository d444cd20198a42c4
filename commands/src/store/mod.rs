//! The event store port and its adapters.
//!
//! # Promises every adapter keeps
//! - An append is atomic: all of its events, claims and idempotency record, or nothing.
//! - An append succeeds only if its stream is at `expected_version` and every stream in
//!   `conditions` is at the version named there (optimistic concurrency).
//! - Global positions start at 1, have no gaps, and become visible in order: once a reader has
//!   seen position N it has seen every position below N. A follower of [`EventStore::read_all`]
//!   therefore never skips an event that commits late.
//! - A repeated idempotency key with the same request hash returns the first reply and appends
//!   nothing; with another hash it fails with [`AppendError::IdempotencyKeyReused`].
//!
//! `contract` (feature `contract`) holds the suite that checks these promises on any adapter.

mod group_commit;
mod plan;
pub mod postgres;
pub mod sqlite;

#[cfg(feature = "contract")]
pub mod contract;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use quikapp_domain::{Envelope, Event};
use thiserror::Error;
use uuid::Uuid;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `request.events` to `request.stream_id`, or fails leaving nothing behind.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError>;

    /// The events of one stream with a version above `after_version`, oldest first.
    async fn read_stream(&self, stream_id: &str, after_version: u64) -> Result<Vec<Envelope>, StoreError>;

    /// Up to `limit` events with a global position above `after_position`, in position order.
    async fn read_all(&self, after_position: u64, limit: u32) -> Result<Vec<Envelope>, StoreError>;

    /// [`EventStore::read_all`], encoded for the bus. An adapter that keeps the data as JSON text
    /// can encode it without decoding the data (the relay's hot path).
    async fn read_all_encoded(&self, after_position: u64, limit: u32) -> Result<Vec<EncodedEvent>, StoreError> {
        Ok(self.read_all(after_position, limit).await?.iter().map(EncodedEvent::of).collect())
    }

    /// The global position of the newest event, 0 for an empty store.
    async fn head(&self) -> Result<u64, StoreError>;

    /// The events up to `through` that begin or end a membership of `user`, in position order:
    /// WorkspaceCreated (as owner), WorkspaceMemberAdded, ChannelMemberJoined, ChannelMemberLeft.
    async fn memberships(&self, user: Uuid, through: u64) -> Result<Vec<Envelope>, StoreError>;

    /// The stored reply of an idempotency key, if a command with that key succeeded within the
    /// retention of [`StoreOptions::idempotency_retention`].
    async fn idempotent_reply(&self, key: &str) -> Result<Option<StoredReply>, StoreError>;

    /// Deletes the idempotency keys older than the retention; answers how many. Expired keys
    /// are already ignored by appends and look-ups: this only reclaims their space.
    async fn forget_expired_idempotency_keys(&self) -> Result<u64, StoreError>;

    /// A round trip to the backing store, for readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Records how far the replay of `model` has come (`quikapp replay` does, every second).
    async fn record_replay(&self, model: &str, progress: ReplayProgress) -> Result<(), StoreError>;

    /// Forgets the replay of `model`: it ended.
    async fn end_replay(&self, model: &str) -> Result<(), StoreError>;

    /// The replays recorded, each with when it was last recorded: one not recorded for a few
    /// seconds was interrupted.
    async fn replays(&self) -> Result<Vec<(String, ReplayProgress, DateTime<Utc>)>, StoreError>;
}

/// The event types [`EventStore::memberships`] answers, as SQL.
const MEMBERSHIP_TYPES: &str =
    "('WorkspaceCreated', 'WorkspaceMemberAdded', 'ChannelMemberJoined', 'ChannelMemberLeft')";

/// How far a replay has come: `done` of `total` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayProgress {
    pub done: u64,
    pub total: u64,
}

/// Stores a replay's progress, the same SQL on PostgreSQL and SQLite.
pub(crate) const RECORD_REPLAY: &str =
    "INSERT INTO replays (model, owner, done, total, renewed_ms) VALUES ($1, '', $2, $3, $4)
     ON CONFLICT (model) DO UPDATE SET done = excluded.done, total = excluded.total, renewed_ms = excluded.renewed_ms";
pub(crate) const END_REPLAY: &str = "DELETE FROM replays WHERE model = $1";
pub(crate) const SELECT_REPLAYS: &str = "SELECT model, done, total, renewed_ms FROM replays ORDER BY model";

pub(crate) fn replay_row<R: sqlx::Row>(row: &R) -> Result<(String, ReplayProgress, DateTime<Utc>), StoreError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let model: String = row.try_get("model")?;
    let done: i64 = row.try_get("done")?;
    let total: i64 = row.try_get("total")?;
    let renewed: i64 = row.try_get("renewed_ms")?;
    let at = DateTime::from_timestamp_millis(renewed).unwrap_or_default();
    Ok((model, ReplayProgress { done: done as u64, total: total as u64 }, at))
}

/// How an adapter bounds its waits and how long it remembers idempotency keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// The longest wait for a lock: PostgreSQL's lock_timeout (the log's writer lock
    /// included), SQLite's busy timeout. Past it the append fails as unavailable (503).
    pub lock_timeout: Duration,
    /// The longest a statement of the write transaction may run (PostgreSQL statement_timeout
    /// and idle_in_transaction_session_timeout).
    pub statement_timeout: Duration,
    /// The longest an append waits for its answer. Past it the answer is "unavailable" for a
    /// request still queued (it will not be written) and "outcome unknown" for one in a batch.
    pub commit_timeout: Duration,
    /// How long a successful reply stays bound to its idempotency key.
    pub idempotency_retention: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            lock_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            commit_timeout: Duration::from_secs(10),
            idempotency_retention: Duration::from_secs(24 * 3600),
        }
    }
}

impl StoreOptions {
    /// The retention in whole seconds, as the stores compare it with their own clock.
    pub(crate) fn retention_seconds(&self) -> i64 {
        const CENTURY: u64 = 100 * 365 * 24 * 3600;
        self.idempotency_retention.as_secs().min(CENTURY) as i64
    }
}

/// Expired idempotency keys are deleted this many at a time, so that a large cleanup never
/// holds the writers back for long.
pub(crate) const KEY_CLEANUP_CHUNK: i64 = 5_000;

/// Runs `delete_chunk` (which deletes at most [`KEY_CLEANUP_CHUNK`] rows) until a chunk comes
/// back short; answers how many rows went in all.
pub(crate) async fn delete_in_chunks<F, Fut>(mut delete_chunk: F) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>>,
{
    let mut deleted = 0;
    loop {
        let chunk = delete_chunk().await?;
        deleted += chunk;
        if chunk < KEY_CLEANUP_CHUNK as u64 {
            return Ok(deleted);
        }
    }
}

/// An event about to be stored: the store adds stream version and global position.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event: Event,
    pub workspace_id: Option<Uuid>,
    pub channel_id: Option<Uuid>,
    pub actor_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
}

#[derive(Debug, Clone, Default)]
pub struct AppendRequest {
    pub stream_id: String,
    /// The version the stream must be at: 0 when it must not exist yet.
    pub expected_version: u64,
    /// At least one event; none only to record a keyed no-op under `idempotency`, which
    /// then holds only while the stream and the conditions are at the versions named.
    pub events: Vec<NewEvent>,
    /// Other streams that must still be at the versions the decision was made on.
    pub conditions: Vec<StreamCondition>,
    /// Unique values this stream takes; taken by another stream they fail the append.
    pub claims: Vec<String>,
    /// Unique values this stream gives up.
    pub releases: Vec<String>,
    pub idempotency: Option<IdempotencyEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCondition {
    pub stream_id: String,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyEntry {
    pub key: String,
    /// A digest of the request, to tell a repeat from a reuse of the key.
    pub request_hash: String,
    /// What the caller wants back on a repeat; the store keeps position and version beside it.
    pub reply: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredReply {
    pub request_hash: String,
    pub reply: serde_json::Value,
    pub position: u64,
    pub stream_version: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AppendOutcome {
    Appended(Appended),
    /// The idempotency key was used before with the same request: nothing was appended.
    Replayed(StoredReply),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub first_position: u64,
    pub last_position: u64,
    pub stream_version: u64,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum AppendError {
    /// The stream, or a stream in the conditions, has moved on (retry on fresh state, or 412).
    #[error("stream {stream_id} is at version {actual}, not {expected}")]
    WrongExpectedVersion { stream_id: String, expected: u64, actual: u64 },
    /// A unique value is owned by another stream (409).
    #[error("{claim} is taken")]
    ClaimTaken { claim: String },
    /// The idempotency key was used before with a different request (422).
    #[error("the idempotency key was used before with a different request")]
    IdempotencyKeyReused,
    /// The request itself is malformed, e.g. without events (a bug in the caller).
    #[error("invalid append: {0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The backing store failed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum StoreError {
    /// Unreachable or overloaded, and nothing was written: worth retrying later (503).
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The append may or may not have been written: its commit could not be confirmed in
    /// time. Retrying with the same idempotency key tells which (503, a problem of its own).
    #[error("the append's outcome is unknown: {0}")]
    OutcomeUnknown(String),
    /// It answered, but with something this code cannot use (500).
    #[error("event store failure: {0}")]
    Failed(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match blame(&error) {
            Blame::Unavailable => StoreError::Unavailable(error.to_string()),
            Blame::Rows | Blame::Other => StoreError::Failed(error.to_string()),
        }
    }
}

/// What a backend error says about its cause, and so what the caller should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blame {
    /// The store cannot serve now (connection lost, overloaded, shutting down, a lock or
    /// statement timeout, a deadlock, SQLite busy): retry later, the request may be fine.
    Unavailable,
    /// A value written was refused (a constraint, bad data): one request of a batch is at fault.
    Rows,
    /// Anything else: a bug or a broken store.
    Other,
}

pub(crate) fn blame(error: &sqlx::Error) -> Blame {
    use sqlx::Error::*;
    match error {
        Io(_) | Tls(_) | Protocol(_) | PoolTimedOut | PoolClosed | WorkerCrashed => Blame::Unavailable,
        Database(db) => match db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
            Some(_) => sqlite_blame(db.code().as_deref()),
            None => postgres_blame(db.code().as_deref().unwrap_or("")),
        },
        _ => Blame::Other,
    }
}

/// By SQLSTATE: 08 connection exception, 53 insufficient resources, 57 operator intervention
/// (shutdown, a cancelled statement such as statement_timeout), 58 system error (I/O),
/// 40001/40P01 serialization failure and deadlock, 55P03 lock_timeout, 25006 a read-only
/// server (a failover in progress); 22 data exception and 23 integrity violation are the
/// rows' fault.
fn postgres_blame(sqlstate: &str) -> Blame {
    match sqlstate.get(..2) {
        Some("08" | "53" | "57" | "58") => Blame::Unavailable,
        _ if matches!(sqlstate, "40001" | "40P01" | "55P03" | "25006") => Blame::Unavailable,
        Some("22" | "23") => Blame::Rows,
        _ => Blame::Other,
    }
}

/// By SQLite's (extended) result code, whose low byte is the primary code: BUSY and LOCKED
/// mean another writer holds the file, IOERR and FULL a disk in trouble; TOOBIG, CONSTRAINT
/// and MISMATCH are the rows' fault.
fn sqlite_blame(code: Option<&str>) -> Blame {
    match code.and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff) {
        Some(5 | 6 | 10 | 13) => Blame::Unavailable,
        Some(18 | 19 | 20) => Blame::Rows,
        _ => Blame::Other,
    }
}

/// A stored event as the bus carries it: the envelope's JSON, and what a publisher routes and
/// labels the record by.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub global_position: u64,
    pub workspace_id: Option<Uuid>,
    pub channel_id: Option<Uuid>,
    pub actor_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    /// The envelope in API.md's layout: what serializing the [`Envelope`] gives, up to
    /// whitespace and the order of the data's fields.
    pub json: String,
}

impl EncodedEvent {
    pub fn of(envelope: &Envelope) -> Self {
        EncodedEvent {
            event_id: envelope.event_id,
            event_type: envelope.event.type_name().to_owned(),
            schema_version: envelope.schema_version,
            global_position: envelope.global_position,
            workspace_id: envelope.workspace_id,
            channel_id: envelope.channel_id,
            actor_id: envelope.actor_id,
            occurred_at: envelope.occurred_at,
            json: serde_json::to_string(envelope).expect("envelopes serialize"),
        }
    }
}

/// [`Envelope`]'s JSON layout over a stored event's columns and its data's text.
#[derive(serde::Serialize)]
struct EnvelopeLayout<'a> {
    event_id: Uuid,
    r#type: &'a str,
    data: &'a serde_json::value::RawValue,
    schema_version: u32,
    stream_id: &'a str,
    stream_version: u64,
    global_position: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    workspace_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel_id: Option<Uuid>,
    actor_id: Uuid,
    #[serde(with = "quikapp_domain::event::timestamp")]
    occurred_at: DateTime<Utc>,
    correlation_id: Uuid,
    causation_id: Uuid,
}

/// The parts of a stored event as the adapters keep them: typed columns plus the data document
/// as JSON text (stored as it is).
#[derive(Clone)]
pub(crate) struct StoredEvent {
    pub global_position: u64,
    pub stream_id: String,
    pub stream_version: u64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub workspace_id: Option<Uuid>,
    pub channel_id: Option<Uuid>,
    pub actor_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub data: String,
}

impl StoredEvent {
    /// Decodes the event, its data brought up to its type's current layout first. Data already
    /// in the current layout (nearly all of it) is decoded straight from its text, the rest
    /// goes through [`quikapp_domain::upcast`].
    pub fn into_envelope(self) -> Result<Envelope, StoreError> {
        let failed = |e| self.malformed(e);
        let current = quikapp_domain::event::schema_version_of(&self.event_type);
        let (event, schema_version): (Event, u32) = match current {
            Some(current) if self.schema_version < current => {
                let mut data: serde_json::Value = serde_json::from_str(&self.data).map_err(failed)?;
                let version = quikapp_domain::upcast::upcast(&self.event_type, self.schema_version, &mut data);
                let tagged = serde_json::json!({ "type": self.event_type, "data": data });
                (serde_json::from_value(tagged).map_err(failed)?, version)
            }
            // Current, or newer than this code (read as current), or of a type it does not know.
            _ => {
                let tagged =
                    format!(r#"{{"type":{},"data":{}}}"#, serde_json::Value::from(self.event_type.as_str()), self.data);
                (serde_json::from_str(&tagged).map_err(failed)?, current.unwrap_or(self.schema_version))
            }
        };
        Ok(Envelope {
            event_id: self.event_id,
            event,
            schema_version,
            stream_id: self.stream_id,
            stream_version: self.stream_version,
            global_position: self.global_position,
            workspace_id: self.workspace_id,
            channel_id: self.channel_id,
            actor_id: self.actor_id,
            occurred_at: self.occurred_at,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
        })
    }

    fn malformed(&self, error: serde_json::Error) -> StoreError {
        StoreError::Failed(format!("event at position {}: {error}", self.global_position))
    }

    /// Encodes the event for the bus. Data in its type's current layout (nearly all of it) goes
    /// into the envelope as stored, without being decoded; the rest is decoded and upcast first
    /// ([`StoredEvent::into_envelope`]).
    pub fn into_encoded(self) -> Result<EncodedEvent, StoreError> {
        if quikapp_domain::event::schema_version_of(&self.event_type) != Some(self.schema_version) {
            return Ok(EncodedEvent::of(&self.into_envelope()?));
        }
        let data = serde_json::from_str(&self.data).map_err(|e| self.malformed(e))?;
        let layout = EnvelopeLayout {
            event_id: self.event_id,
            r#type: &self.event_type,
            data,
            schema_version: self.schema_version,
            stream_id: &self.stream_id,
            stream_version: self.stream_version,
            global_position: self.global_position,
            workspace_id: self.workspace_id,
            channel_id: self.channel_id,
            actor_id: self.actor_id,
            occurred_at: self.occurred_at,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
        };
        let json = serde_json::to_string(&layout).expect("layouts serialize");
        Ok(EncodedEvent {
            event_id: self.event_id,
            event_type: self.event_type,
            schema_version: self.schema_version,
            global_position: self.global_position,
            workspace_id: self.workspace_id,
            channel_id: self.channel_id,
            actor_id: self.actor_id,
            occurred_at: self.occurred_at,
            json,
        })
    }

    pub fn from_envelope(envelope: &Envelope) -> Self {
        let data = match serde_json::to_value(&envelope.event) {
            Ok(serde_json::Value::Object(mut tagged)) => tagged.remove("data").unwrap_or_default(),
            _ => unreachable!("events serialize as tagged objects"),
        };
        StoredEvent {
            global_position: envelope.global_position,
            stream_id: envelope.stream_id.clone(),
            stream_version: envelope.stream_version,
            event_id: envelope.event_id,
            event_type: envelope.event.type_name().to_owned(),
            schema_version: envelope.schema_version,
            workspace_id: envelope.workspace_id,
            channel_id: envelope.channel_id,
            actor_id: envelope.actor_id,
            occurred_at: envelope.occurred_at,
            correlation_id: envelope.correlation_id,
            causation_id: envelope.causation_id,
            data: data.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use quikapp_domain::event::{ChannelTopicChanged, MessagePosted};

    use super::*;

    fn stored(event_type: &str, schema_version: u32, data: serde_json::Value) -> StoredEvent {
        StoredEvent {
            global_position: 7,
            stream_id: "channel-1".into(),
            stream_version: 2,
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version,
            workspace_id: None,
            channel_id: None,
            actor_id: Uuid::now_v7(),
            occurred_at: quikapp_domain::event::timestamp::now(), // the microseconds stores keep
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            data: data.to_string(),
        }
    }

    #[test]
    fn an_older_layout_is_upcast_on_read_and_reads_as_the_current_version() {
        let channel_id = Uuid::now_v7();
        let read = stored("ChannelTopicChanged", 1, serde_json::json!({ "channel_id": channel_id, "topic": "" }));
        let envelope = read.into_envelope().expect("decodes");
        assert_eq!(envelope.event, ChannelTopicChanged { channel_id, topic: None }.into());
        assert_eq!(envelope.schema_version, 2);
    }

    #[test]
    fn the_current_and_newer_layouts_decode_straight_from_the_text() {
        let channel_id = Uuid::now_v7();
        for version in [2, 3] {
            let data = serde_json::json!({ "channel_id": channel_id, "topic": "", "added_later": 1 });
            let envelope = stored("ChannelTopicChanged", version, data).into_envelope().expect("decodes");
            let expected = ChannelTopicChanged { channel_id, topic: Some(String::new()) };
            assert_eq!((envelope.event, envelope.schema_version), (expected.into(), 2));
        }
        let posted = MessagePosted {
            message_id: Uuid::now_v7(),
            channel_id,
            author_id: Uuid::now_v7(),
            text: "quote \" and \\ kept".into(),
            thread_root_id: None,
        };
        let data = serde_json::to_value(&posted).expect("serializes");
        assert_eq!(stored("MessagePosted", 1, data).into_envelope().expect("decodes").event, posted.into());
    }

    #[test]
    fn an_encoded_event_reads_back_as_its_envelope_whatever_its_layout() {
        let (channel_id, workspace_id) = (Uuid::now_v7(), Uuid::now_v7());
        let posted = MessagePosted {
            message_id: Uuid::now_v7(),
            channel_id,
            author_id: Uuid::now_v7(),
            text: "quote \" and \\ kept".into(),
            thread_root_id: None,
        };
        let mut current = stored("MessagePosted", 1, serde_json::to_value(&posted).expect("serializes"));
        (current.workspace_id, current.channel_id) = (Some(workspace_id), Some(channel_id));
        current.data = current.data.replace(',', ", "); // as jsonb gave it (stores before 0006)
        let old = stored("ChannelTopicChanged", 1, serde_json::json!({ "channel_id": channel_id, "topic": "" }));
        for read in [current, old] {
            let envelope = read.clone().into_envelope().expect("decodes");
            let encoded = read.into_encoded().expect("encodes");
            assert_eq!(encoded, EncodedEvent { json: encoded.json.clone(), ..EncodedEvent::of(&envelope) });
            let decoded: Envelope = serde_json::from_str(&encoded.json).expect("an envelope");
            assert_eq!(decoded, envelope);
            let as_serialized = serde_json::to_value(&envelope).expect("serializes");
            assert_eq!(serde_json::from_str::<serde_json::Value>(&encoded.json).expect("JSON"), as_serialized);
        }
    }

    #[test]
    fn an_unknown_type_or_broken_data_is_an_error_naming_the_position() {
        for (event_type, data) in [("NotAType", "{}"), ("MessagePosted", "{\"text\": 1}"), ("MessagePosted", "{")] {
            let mut read = stored(event_type, 1, serde_json::Value::Null);
            read.data = data.into();
            // Encoding checks the data is JSON, not that it fits its type: the store wrote it from
            // a typed event.
            let encoded = read.clone().into_encoded().map(drop);
            let errors = [Some(read.into_envelope().map(drop)), (data != "{\"text\": 1}").then_some(encoded)];
            for error in errors.into_iter().flatten() {
                let error = error.expect_err("refused").to_string();
                assert!(error.contains("position 7"), "{error}");
            }
        }
    }
}
