//! The embedded event store: one SQLite file, for `quikapp dev` and for anyone who wants no
//! server. Appends go through [`GroupCommit`] and each batch runs in a `BEGIN IMMEDIATE`
//! transaction, which SQLite grants to one writer at a time, so positions are assigned and
//! committed in order, as in PostgreSQL.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use quikapp_domain::Envelope;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::group_commit::{BatchError, BatchWriter, GroupCommit, Outcome};
use super::plan::{BatchPlan, CurrentState, Lookups};
use super::{
    AppendError, AppendOutcome, AppendRequest, EventStore, KEY_CLEANUP_CHUNK, MEMBERSHIP_TYPES, ReplayProgress,
    StoreError, StoreOptions, StoredEvent, StoredReply, delete_in_chunks,
};

const SELECT_EVENTS: &str = "SELECT global_position, stream_id, stream_version, event_id, event_type, \
     schema_version, workspace_id, channel_id, actor_id, occurred_at, correlation_id, causation_id, data \
     FROM events";

pub struct SqliteStore {
    pool: SqlitePool,
    writer: GroupCommit,
    options: StoreOptions,
}

impl SqliteStore {
    /// Opens (creating if needed) the store's file.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default()).await
    }

    pub async fn open_with(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(options.lock_timeout);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(connect).await?;
        // One batch at a time: a second would only poll SQLite's busy handler.
        let writer = GroupCommit::start(SqliteBatchWriter { pool: pool.clone(), options }, 1, options.commit_timeout);
        Ok(SqliteStore { pool, writer, options })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite").run(&self.pool).await.map_err(|e| StoreError::Failed(e.to_string()))
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        self.writer.append(request).await
    }

    async fn read_stream(&self, stream_id: &str, after_version: u64) -> Result<Vec<Envelope>, StoreError> {
        let sql = format!("{SELECT_EVENTS} WHERE stream_id = ? AND stream_version > ? ORDER BY stream_version");
        let rows = sqlx::query(&sql).bind(stream_id).bind(after_version as i64).fetch_all(&self.pool).await?;
        rows.iter().map(decode_event).collect()
    }

    async fn read_all(&self, after_position: u64, limit: u32) -> Result<Vec<Envelope>, StoreError> {
        let sql = format!("{SELECT_EVENTS} WHERE global_position > ? ORDER BY global_position LIMIT ?");
        let rows = sqlx::query(&sql).bind(after_position as i64).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map(decode_event).collect()
    }

    async fn memberships(&self, user: Uuid, through: u64) -> Result<Vec<Envelope>, StoreError> {
        // The expression and the types are the index `events_membership`'s.
        let sql = format!(
            "{SELECT_EVENTS} WHERE event_type IN {MEMBERSHIP_TYPES} \
             AND coalesce(json_extract(data, '$.user_id'), json_extract(data, '$.owner_id')) = ? AND global_position <= ? ORDER BY global_position"
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
        let mut conn = self.pool.acquire().await?;
        let mut replies = read_replies(&mut conn, &[key.to_owned()], self.options.retention_seconds()).await?;
        Ok(replies.remove(key))
    }

    async fn forget_expired_idempotency_keys(&self) -> Result<u64, StoreError> {
        delete_in_chunks(|| async {
            let deleted = sqlx::query(
                "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys \
                 WHERE created_at <= datetime('now', ?) LIMIT ?)",
            )
            .bind(retention_modifier(self.options.retention_seconds()))
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

fn uuid_column(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    let text: String = row.try_get(column)?;
    Uuid::from_str(&text).map_err(|e| StoreError::Failed(format!("{column}: {e}")))
}

fn optional_uuid_column(row: &SqliteRow, column: &str) -> Result<Option<Uuid>, StoreError> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| Uuid::from_str(&t).map_err(|e| StoreError::Failed(format!("{column}: {e}")))).transpose()
}

fn decode_event(row: &SqliteRow) -> Result<Envelope, StoreError> {
    let occurred_at: String = row.try_get("occurred_at")?;
    let stored = StoredEvent {
        global_position: row.try_get::<i64, _>("global_position")? as u64,
        stream_id: row.try_get("stream_id")?,
        stream_version: row.try_get::<i64, _>("stream_version")? as u64,
        event_id: uuid_column(row, "event_id")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get::<i64, _>("schema_version")? as u32,
        workspace_id: optional_uuid_column(row, "workspace_id")?,
        channel_id: optional_uuid_column(row, "channel_id")?,
        actor_id: uuid_column(row, "actor_id")?,
        occurred_at: DateTime::parse_from_rfc3339(&occurred_at)
            .map_err(|e| StoreError::Failed(format!("occurred_at: {e}")))?
            .with_timezone(&Utc),
        correlation_id: uuid_column(row, "correlation_id")?,
        causation_id: uuid_column(row, "causation_id")?,
        data: row.try_get("data")?,
    };
    stored.into_envelope()
}

fn decode_reply(row: &SqliteRow) -> Result<(String, StoredReply), StoreError> {
    let reply: String = row.try_get("reply")?;
    let stored = StoredReply {
        request_hash: row.try_get("request_hash")?,
        reply: serde_json::from_str(&reply).map_err(|e| StoreError::Failed(format!("reply: {e}")))?,
        position: row.try_get::<i64, _>("position")? as u64,
        stream_version: row.try_get::<i64, _>("stream_version")? as u64,
    };
    Ok((row.try_get("key")?, stored))
}

struct SqliteBatchWriter {
    pool: SqlitePool,
    options: StoreOptions,
}

#[async_trait]
impl BatchWriter for SqliteBatchWriter {
    async fn write_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Outcome>, BatchError> {
        // IMMEDIATE takes the write lock up front, so the look-ups below are what the batch
        // writes over. sqlx's transaction rolls back a transaction that failed to COMMIT before
        // its connection is used again, so no connection goes back to the pool inside one.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let state = read_current_state(&mut tx, &Lookups::of(batch), self.options.retention_seconds()).await?;
        let (plan, outcomes) = BatchPlan::judge(state, batch);
        if plan.is_empty() {
            return Ok(outcomes);
        }
        write_plan(&mut tx, &plan).await.map_err(BatchError::from_write)?;
        match tx.commit().await {
            Ok(()) => Ok(outcomes),
            Err(error) => Err(BatchError::commit_failed(error, &plan, outcomes)),
        }
    }

    async fn is_stored(&self, event_id: Uuid) -> Result<bool, StoreError> {
        // One process writes the file, one batch at a time: no commit can be in flight here.
        let stored = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE event_id = ?)")
            .bind(event_id.to_string())
            .fetch_one(&self.pool)
            .await?;
        Ok(stored)
    }
}

async fn write_plan(conn: &mut SqliteConnection, plan: &BatchPlan) -> Result<(), sqlx::Error> {
    // SQLite takes at most 32,766 parameters a statement; 13 a row.
    for chunk in plan.events.chunks(2_000) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type, schema_version, \
             workspace_id, channel_id, actor_id, occurred_at, correlation_id, causation_id, data) ",
        );
        insert.push_values(chunk.iter().map(StoredEvent::from_envelope), |mut row, e| {
            row.push_bind(e.global_position as i64)
                .push_bind(e.stream_id)
                .push_bind(e.stream_version as i64)
                .push_bind(e.event_id.to_string())
                .push_bind(e.event_type)
                .push_bind(i64::from(e.schema_version))
                .push_bind(e.workspace_id.map(|id| id.to_string()))
                .push_bind(e.channel_id.map(|id| id.to_string()))
                .push_bind(e.actor_id.to_string())
                .push_bind(quikapp_domain::event::timestamp::format(&e.occurred_at))
                .push_bind(e.correlation_id.to_string())
                .push_bind(e.causation_id.to_string())
                .push_bind(e.data);
        });
        insert.build().execute(&mut *conn).await?;
    }
    if !plan.claims_released.is_empty() {
        sqlx::query("DELETE FROM unique_claims WHERE claim IN (SELECT value FROM json_each(?))")
            .bind(json_array(&plan.claims_released))
            .execute(&mut *conn)
            .await?;
    }
    if !plan.claims_set.is_empty() {
        let mut upsert = QueryBuilder::<Sqlite>::new("INSERT INTO unique_claims (claim, owner_stream) ");
        upsert.push_values(&plan.claims_set, |mut row, (claim, owner)| {
            row.push_bind(claim).push_bind(owner);
        });
        upsert.push(" ON CONFLICT (claim) DO UPDATE SET owner_stream = excluded.owner_stream");
        upsert.build().execute(&mut *conn).await?;
    }
    if !plan.replies.is_empty() {
        let mut upsert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO idempotency_keys (key, request_hash, reply, position, stream_version) ",
        );
        upsert.push_values(&plan.replies, |mut row, (key, reply)| {
            row.push_bind(key)
                .push_bind(&reply.request_hash)
                .push_bind(reply.reply.to_string())
                .push_bind(reply.position as i64)
                .push_bind(reply.stream_version as i64);
        });
        // An expired key still in the table is taken over.
        upsert.push(
            " ON CONFLICT (key) DO UPDATE SET request_hash = excluded.request_hash, reply = excluded.reply, \
             position = excluded.position, stream_version = excluded.stream_version, created_at = CURRENT_TIMESTAMP",
        );
        upsert.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// One query per kind of key, each taking its keys as a JSON array.
async fn read_current_state(
    conn: &mut SqliteConnection,
    lookups: &Lookups,
    retention_seconds: i64,
) -> Result<CurrentState, StoreError> {
    let mut state = CurrentState::default();
    let head: i64 =
        sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM events").fetch_one(&mut *conn).await?;
    state.head = head as u64;
    let versions: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stream_id, version FROM (SELECT s.value AS stream_id, \
         (SELECT max(stream_version) FROM events WHERE events.stream_id = s.value) AS version \
         FROM json_each(?) AS s) WHERE version IS NOT NULL",
    )
    .bind(json_array(&lookups.streams))
    .fetch_all(&mut *conn)
    .await?;
    state.stream_versions = versions.into_iter().map(|(stream, version)| (stream, version as u64)).collect();
    if !lookups.claims.is_empty() {
        let claims: Vec<(String, String)> = sqlx::query_as(
            "SELECT claim, owner_stream FROM unique_claims WHERE claim IN (SELECT value FROM json_each(?))",
        )
        .bind(json_array(&lookups.claims))
        .fetch_all(&mut *conn)
        .await?;
        state.claims = claims.into_iter().collect();
    }
    if !lookups.idempotency_keys.is_empty() {
        state.replies = read_replies(conn, &lookups.idempotency_keys, retention_seconds).await?;
    }
    Ok(state)
}

async fn read_replies(
    conn: &mut SqliteConnection,
    keys: &[String],
    retention_seconds: i64,
) -> Result<HashMap<String, StoredReply>, StoreError> {
    // created_at is SQLite's CURRENT_TIMESTAMP, compared with the same clock and format.
    let rows = sqlx::query(
        "SELECT key, request_hash, reply, position, stream_version FROM idempotency_keys \
         WHERE key IN (SELECT value FROM json_each(?)) AND created_at > datetime('now', ?)",
    )
    .bind(json_array(keys))
    .bind(retention_modifier(retention_seconds))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(decode_reply).collect()
}

fn json_array(values: &[String]) -> String {
    serde_json::Value::from(values).to_string()
}

/// A `datetime('now', …)` modifier going back over the retention.
fn retention_modifier(seconds: i64) -> String {
    format!("-{seconds} seconds")
}
