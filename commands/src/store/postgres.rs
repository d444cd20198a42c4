//! The PostgreSQL event store. Appends go through [`GroupCommit`]; each batch takes a
//! transaction-scoped advisory lock before it reads the head, so batches assign positions one
//! after another and commit in position order (see migrations/postgres/0001_event_store.sql).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use quikapp_domain::Envelope;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, Postgres, Row, Transaction};
use uuid::Uuid;

use super::group_commit::{BatchError, BatchWriter, GroupCommit, Outcome};
use super::plan::{BatchPlan, CurrentState, Lookups};
use super::{
    AppendError, AppendOutcome, AppendRequest, EncodedEvent, EventStore, KEY_CLEANUP_CHUNK, MEMBERSHIP_TYPES,
    ReplayProgress, StoreError, StoreOptions, StoredEvent, StoredReply, delete_in_chunks,
};

/// The advisory lock every writer of the event log holds while it appends.
pub const WRITER_LOCK: i64 = 0x5155_494b_4150_5031; // "QUIKAPP1"

/// The current version of each named stream: one index probe per stream, whatever its length.
const STREAM_VERSIONS: &str = "SELECT s.stream_id, e.stream_version FROM unnest($1::text[]) AS s(stream_id) \
     CROSS JOIN LATERAL (SELECT stream_version FROM events WHERE events.stream_id = s.stream_id \
     ORDER BY stream_version DESC LIMIT 1) AS e";

/// The live replies of some idempotency keys ($1): created within the retention ($2 seconds)
/// by the database's clock. An expired key still in the table is replaced by the next append
/// that uses it.
const SELECT_REPLIES: &str = "SELECT key, request_hash, reply, position, stream_version FROM idempotency_keys \
     WHERE key = ANY($1) AND created_at > now() - make_interval(secs => $2::float8)";

const SELECT_EVENTS: &str = "SELECT global_position, stream_id, stream_version, event_id, event_type, \
     schema_version, workspace_id, channel_id, actor_id, occurred_at, correlation_id, causation_id, \
     data::text AS data FROM events";

pub struct PostgresStore {
    pool: PgPool,
    writer: GroupCommit,
    options: StoreOptions,
}

impl PostgresStore {
    /// The rows of [`EventStore::read_all`].
    async fn read_all_rows(&self, after_position: u64, limit: u32) -> Result<Vec<PgRow>, StoreError> {
        let sql = format!("{SELECT_EVENTS} WHERE global_position > $1 ORDER BY global_position LIMIT $2");
        Ok(sqlx::query(&sql).bind(after_position as i64).bind(i64::from(limit)).fetch_all(&self.pool).await?)
    }

    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, StoreOptions::default()).await
    }

    pub async fn connect_with(url: &str, options: StoreOptions) -> Result<Self, StoreError> {
        let pool =
            PgPoolOptions::new().max_connections(32).acquire_timeout(Duration::from_secs(5)).connect(url).await?;
        Ok(Self::new(pool, options))
    }

    pub fn new(pool: PgPool, options: StoreOptions) -> Self {
        let writer = PgBatchWriter { pool: pool.clone(), options };
        PostgresStore { writer: GroupCommit::start(writer, 1, options.commit_timeout), pool, options }
    }

    /// Creates or upgrades the event store's tables.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres").run(&self.pool).await.map_err(|e| StoreError::Failed(e.to_string()))
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        self.writer.append(request).await
    }

    async fn read_stream(&self, stream_id: &str, after_version: u64) -> Result<Vec<Envelope>, StoreError> {
        let sql = format!("{SELECT_EVENTS} WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version");
        let rows = sqlx::query(&sql).bind(stream_id).bind(after_version as i64).fetch_all(&self.pool).await?;
        rows.iter().map(decode_event).collect()
    }

    async fn read_all(&self, after_position: u64, limit: u32) -> Result<Vec<Envelope>, StoreError> {
        self.read_all_rows(after_position, limit).await?.iter().map(decode_event).collect()
    }

    async fn read_all_encoded(&self, after_position: u64, limit: u32) -> Result<Vec<EncodedEvent>, StoreError> {
        self.read_all_rows(after_position, limit).await?.iter().map(|row| stored_event(row)?.into_encoded()).collect()
    }

    async fn memberships(&self, user: Uuid, through: u64) -> Result<Vec<Envelope>, StoreError> {
        // The expression and the types are the index `events_membership`'s.
        let sql = format!(
            "{SELECT_EVENTS} WHERE event_type IN {MEMBERSHIP_TYPES} \
             AND coalesce(data->>'user_id', data->>'owner_id') = $1 AND global_position <= $2 ORDER BY global_position"
        );
        let rows = sqlx::query(&sql).bind(user.to_string()).bind(through as i64).fetch_all(&self.pool).await?;
        rows.iter().map(decode_event).collect()
    }

    async fn head(&self) -> Result<u64, StoreError> {
        let head: i64 =
            sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM events").fetch_one(&self.pool).await?;
        Ok(head as u64)
    }

    async fn idempotent_reply(&self, key: &str) -> Result<Option<StoredReply>, StoreError> {
        let rows = sqlx::query(SELECT_REPLIES)
            .bind(vec![key])
            .bind(self.options.retention_seconds())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.first().map(decode_reply).transpose()?.map(|(_, reply)| reply))
    }

    async fn forget_expired_idempotency_keys(&self) -> Result<u64, StoreError> {
        delete_in_chunks(|| async {
            let deleted = sqlx::query(
                // The outer test again: a key taken over meanwhile is live, and stays.
                "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys \
                 WHERE created_at <= now() - make_interval(secs => $1::float8) LIMIT $2) \
                 AND created_at <= now() - make_interval(secs => $1::float8)",
            )
            .bind(self.options.retention_seconds())
            .bind(KEY_CLEANUP_CHUNK)
            .execute(&self.pool)
            .await?;
            Ok(deleted.rows_affected())
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn record_replay(&self, model: &str, progress: ReplayProgress) -> Result<(), StoreError> {
        sqlx::query(super::RECORD_REPLAY)
            .bind(model)
            .bind(progress.done as i64)
            .bind(progress.total as i64)
            .bind(Utc::now().timestamp_millis())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn end_replay(&self, model: &str) -> Result<(), StoreError> {
        sqlx::query(super::END_REPLAY).bind(model).execute(&self.pool).await?;
        Ok(())
    }

    async fn replays(&self) -> Result<Vec<(String, ReplayProgress, DateTime<Utc>)>, StoreError> {
        let rows = sqlx::query(super::SELECT_REPLAYS).fetch_all(&self.pool).await?;
        rows.iter().map(super::replay_row).collect()
    }
}

fn decode_event(row: &PgRow) -> Result<Envelope, StoreError> {
    stored_event(row)?.into_envelope()
}

fn stored_event(row: &PgRow) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        global_position: row.try_get::<i64, _>("global_position")? as u64,
        stream_id: row.try_get("stream_id")?,
        stream_version: row.try_get::<i64, _>("stream_version")? as u64,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get::<i32, _>("schema_version")? as u32,
        workspace_id: row.try_get("workspace_id")?,
        channel_id: row.try_get("channel_id")?,
        actor_id: row.try_get("actor_id")?,
        occurred_at: row.try_get("occurred_at")?,
        correlation_id: row.try_get("correlation_id")?,
        causation_id: row.try_get("causation_id")?,
        data: row.try_get("data")?,
    })
}

fn decode_reply(row: &PgRow) -> Result<(String, StoredReply), sqlx::Error> {
    let reply = StoredReply {
        request_hash: row.try_get("request_hash")?,
        reply: row.try_get("reply")?,
        position: row.try_get::<i64, _>("position")? as u64,
        stream_version: row.try_get::<i64, _>("stream_version")? as u64,
    };
    Ok((row.try_get("key")?, reply))
}

struct PgBatchWriter {
    pool: PgPool,
    options: StoreOptions,
}

impl PgBatchWriter {
    /// Bounds every wait of the write transaction, takes the log's writer lock, and wakes the
    /// relay when the transaction commits (a notification is sent on commit only).
    fn lock_statement(&self) -> String {
        let ms = |d: Duration| d.as_millis();
        format!(
            "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}; \
             SET LOCAL idle_in_transaction_session_timeout = {}; SELECT pg_advisory_xact_lock({WRITER_LOCK}); \
             SELECT pg_notify('quikapp_events', '')",
            ms(self.options.lock_timeout),
            ms(self.options.statement_timeout),
            ms(self.options.statement_timeout),
        )
    }

    /// The append transaction. READ COMMITTED is what the ordering argument relies on: every
    /// statement after the lock sees everything committed before the lock was granted.
    async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin_with("BEGIN ISOLATION LEVEL READ COMMITTED").await?;
        let lock = self.lock_statement();
        tx.execute(lock.as_str()).await?;
        Ok(tx)
    }
}

#[async_trait]
impl BatchWriter for PgBatchWriter {
    async fn write_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Outcome>, BatchError> {
        let mut tx = self.begin().await?;
        let state = read_current_state(&mut tx, &Lookups::of(batch), self.options.retention_seconds()).await?;
        let (plan, outcomes) = BatchPlan::judge(state, batch);
        if plan.is_empty() {
            return Ok(outcomes); // nothing to write: the transaction rolls back on drop
        }
        write_plan(&mut tx, &plan).await.map_err(BatchError::from_write)?;
        match tx.commit().await {
            Ok(()) => Ok(outcomes),
            Err(error) => Err(BatchError::commit_failed(error, &plan, outcomes)),
        }
    }

    async fn is_stored(&self, event_id: Uuid) -> Result<bool, StoreError> {
        // Behind the writer lock: a transaction still committing holds it until it is done, and
        // one whose client is gone holds it until the server ends it as idle (statement_timeout):
        // wait that long, so that the answer is the final one.
        let patient = PgBatchWriter {
            pool: self.pool.clone(),
            options: StoreOptions {
                lock_timeout: self.options.lock_timeout + self.options.statement_timeout,
                statement_timeout: self.options.lock_timeout + self.options.statement_timeout,
                ..self.options
            },
        };
        let mut tx = patient.begin().await?;
        let stored = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE event_id = $1)")
            .bind(event_id)
            .fetch_one(&mut *tx)
            .await?;
        Ok(stored)
    }
}

async fn read_current_state(
    tx: &mut Transaction<'_, Postgres>,
    lookups: &Lookups,
    retention_seconds: i64,
) -> Result<CurrentState, StoreError> {
    let mut state = CurrentState::default();
    let head: i64 =
        sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM events").fetch_one(&mut **tx).await?;
    state.head = head as u64;
    let versions: Vec<(String, i64)> =
        sqlx::query_as(STREAM_VERSIONS).bind(&lookups.streams).fetch_all(&mut **tx).await?;
    state.stream_versions = versions.into_iter().map(|(stream, version)| (stream, version as u64)).collect();
    if !lookups.claims.is_empty() {
        let claims: Vec<(String, String)> =
            sqlx::query_as("SELECT claim, owner_stream FROM unique_claims WHERE claim = ANY($1)")
                .bind(&lookups.claims)
                .fetch_all(&mut **tx)
                .await?;
        state.claims = claims.into_iter().collect();
    }
    if !lookups.idempotency_keys.is_empty() {
        let rows = sqlx::query(SELECT_REPLIES)
            .bind(&lookups.idempotency_keys)
            .bind(retention_seconds)
            .fetch_all(&mut **tx)
            .await?;
        state.replies = rows.iter().map(decode_reply).collect::<Result<_, _>>()?;
    }
    Ok(state)
}

async fn write_plan(tx: &mut Transaction<'_, Postgres>, plan: &BatchPlan) -> Result<(), sqlx::Error> {
    let mut columns = EventColumns::default();
    for row in plan.events.iter().map(StoredEvent::from_envelope) {
        columns.push(row);
    }
    if plan.events.is_empty() {
        return write_claims_and_replies(tx, plan).await;
    }
    sqlx::query(
        "INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type, schema_version, \
         workspace_id, channel_id, actor_id, occurred_at, correlation_id, causation_id, data) \
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::int[], \
         $7::uuid[], $8::uuid[], $9::uuid[], $10::timestamptz[], $11::uuid[], $12::uuid[], $13::json[])",
    )
    .bind(columns.global_position)
    .bind(columns.stream_id)
    .bind(columns.stream_version)
    .bind(columns.event_id)
    .bind(columns.event_type)
    .bind(columns.schema_version)
    .bind(columns.workspace_id)
    .bind(columns.channel_id)
    .bind(columns.actor_id)
    .bind(columns.occurred_at)
    .bind(columns.correlation_id)
    .bind(columns.causation_id)
    .bind(columns.data)
    .execute(&mut **tx)
    .await?;
    write_claims_and_replies(tx, plan).await
}

async fn write_claims_and_replies(tx: &mut Transaction<'_, Postgres>, plan: &BatchPlan) -> Result<(), sqlx::Error> {
    if !plan.claims_released.is_empty() {
        sqlx::query("DELETE FROM unique_claims WHERE claim = ANY($1)")
            .bind(&plan.claims_released)
            .execute(&mut **tx)
            .await?;
    }
    if !plan.claims_set.is_empty() {
        let (claims, owners): (Vec<String>, Vec<String>) = plan.claims_set.iter().cloned().unzip();
        sqlx::query(
            "INSERT INTO unique_claims (claim, owner_stream) SELECT * FROM UNNEST($1::text[], $2::text[]) \
             ON CONFLICT (claim) DO UPDATE SET owner_stream = excluded.owner_stream",
        )
        .bind(claims)
        .bind(owners)
        .execute(&mut **tx)
        .await?;
    }
    if !plan.replies.is_empty() {
        sqlx::query(
            "INSERT INTO idempotency_keys (key, request_hash, reply, position, stream_version) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::jsonb[], $4::bigint[], $5::bigint[]) \
             ON CONFLICT (key) DO UPDATE SET request_hash = excluded.request_hash, reply = excluded.reply, \
             position = excluded.position, stream_version = excluded.stream_version, created_at = now()",
        )
        .bind(plan.replies.iter().map(|(key, _)| key.clone()).collect::<Vec<_>>())
        .bind(plan.replies.iter().map(|(_, r)| r.request_hash.clone()).collect::<Vec<_>>())
        .bind(plan.replies.iter().map(|(_, r)| r.reply.clone()).collect::<Vec<_>>())
        .bind(plan.replies.iter().map(|(_, r)| r.position as i64).collect::<Vec<_>>())
        .bind(plan.replies.iter().map(|(_, r)| r.stream_version as i64).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// A batch's events as one array per column, for a single `INSERT … SELECT FROM UNNEST`.
#[derive(Default)]
struct EventColumns {
    global_position: Vec<i64>,
    stream_id: Vec<String>,
    stream_version: Vec<i64>,
    event_id: Vec<Uuid>,
    event_type: Vec<String>,
    schema_version: Vec<i32>,
    workspace_id: Vec<Option<Uuid>>,
    channel_id: Vec<Option<Uuid>>,
    actor_id: Vec<Uuid>,
    occurred_at: Vec<chrono::DateTime<chrono::Utc>>,
    correlation_id: Vec<Uuid>,
    causation_id: Vec<Uuid>,
    /// The data as JSON text, stored as it is (a `json` column).
    data: Vec<String>,
}

impl EventColumns {
    fn push(&mut self, row: StoredEvent) {
        self.global_position.push(row.global_position as i64);
        self.stream_id.push(row.stream_id);
        self.stream_version.push(row.stream_version as i64);
        self.event_id.push(row.event_id);
        self.event_type.push(row.event_type);
        self.schema_version.push(row.schema_version as i32);
        self.workspace_id.push(row.workspace_id);
        self.channel_id.push(row.channel_id);
        self.actor_id.push(row.actor_id);
        self.occurred_at.push(row.occurred_at);
        self.correlation_id.push(row.correlation_id);
        self.causation_id.push(row.causation_id);
        self.data.push(row.data);
    }
}
