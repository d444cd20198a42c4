//! The embedded event store: one SQLite file, for `quikapp dev` and for anyone who wants no
//! server. Appends go through [`GroupCommit`] and each batch runs in a `BEGIN IMMEDIATE`
//! transaction, which SQLite grants to one writer at a time, so positions are assigned and
//! committed in order, as in PostgreSQL.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use quikapp_domain::Envelope;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::group_commit::{BatchWriter, GroupCommit, Outcome};
use super::plan::{BatchPlan, CurrentState, Lookups};
use super::{AppendError, AppendOutcome, AppendRequest, EventStore, StoreError, StoredEvent, StoredReply};

const SELECT_EVENTS: &str = "SELECT global_position, stream_id, stream_version, event_id, event_type, \
     schema_version, workspace_id, channel_id, actor_id, occurred_at, correlation_id, causation_id, data \
     FROM events";

pub struct SqliteStore {
    pool: SqlitePool,
    writer: GroupCommit,
}

impl SqliteStore {
    /// Opens (creating if needed) the store's file.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        // One batch at a time: a second would only poll SQLite's busy handler.
        let writer = GroupCommit::start(SqliteBatchWriter { pool: pool.clone() }, 1);
        Ok(SqliteStore { pool, writer })
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

    async fn head(&self) -> Result<u64, StoreError> {
        let head: i64 =
            sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM events").fetch_one(&self.pool).await?;
        Ok(head as u64)
    }

    async fn idempotent_reply(&self, key: &str) -> Result<Option<StoredReply>, StoreError> {
        let row = sqlx::query(
            "SELECT key, request_hash, reply, position, stream_version FROM idempotency_keys WHERE key = ?",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(decode_reply).transpose()?.map(|(_, reply)| reply))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
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
    let data: String = row.try_get("data")?;
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
        data: serde_json::from_str(&data).map_err(|e| StoreError::Failed(format!("data: {e}")))?,
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
}

#[async_trait]
impl BatchWriter for SqliteBatchWriter {
    async fn write_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Outcome>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        let written = write_in_transaction(&mut conn, batch).await;
        let end = if matches!(written, Ok((_, true))) { "COMMIT" } else { "ROLLBACK" };
        sqlx::query(end).execute(&mut *conn).await?;
        written.map(|(outcomes, _)| outcomes)
    }
}

/// Plans and writes the batch; answers the outcomes and whether there is anything to commit.
async fn write_in_transaction(
    conn: &mut SqliteConnection,
    batch: &[AppendRequest],
) -> Result<(Vec<Outcome>, bool), StoreError> {
    let state = read_current_state(conn, &Lookups::of(batch)).await?;
    let mut plan = BatchPlan::new(state);
    let outcomes: Vec<Outcome> = batch.iter().cloned().map(|request| plan.add(request)).collect();
    let plan = plan.finish();
    if plan.events.is_empty() {
        return Ok((outcomes, false));
    }
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
                .push_bind(e.data.to_string());
        });
        insert.build().execute(&mut *conn).await?;
    }
    for claim in &plan.claims_released {
        sqlx::query("DELETE FROM unique_claims WHERE claim = ?").bind(claim).execute(&mut *conn).await?;
    }
    for (claim, owner) in &plan.claims_set {
        sqlx::query("INSERT INTO unique_claims (claim, owner_stream) VALUES (?, ?) ON CONFLICT (claim) DO UPDATE SET owner_stream = excluded.owner_stream")
            .bind(claim)
            .bind(owner)
            .execute(&mut *conn)
            .await?;
    }
    for (key, reply) in &plan.replies {
        sqlx::query(
            "INSERT INTO idempotency_keys (key, request_hash, reply, position, stream_version) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(key)
        .bind(&reply.request_hash)
        .bind(reply.reply.to_string())
        .bind(reply.position as i64)
        .bind(reply.stream_version as i64)
        .execute(&mut *conn)
        .await?;
    }
    Ok((outcomes, true))
}

async fn read_current_state(conn: &mut SqliteConnection, lookups: &Lookups) -> Result<CurrentState, StoreError> {
    let mut state = CurrentState::default();
    let head: i64 =
        sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM events").fetch_one(&mut *conn).await?;
    state.head = head as u64;
    for stream in &lookups.streams {
        let version: Option<i64> = sqlx::query_scalar("SELECT max(stream_version) FROM events WHERE stream_id = ?")
            .bind(stream)
            .fetch_one(&mut *conn)
            .await?;
        if let Some(version) = version {
            state.stream_versions.insert(stream.clone(), version as u64);
        }
    }
    for claim in &lookups.claims {
        let owner: Option<String> = sqlx::query_scalar("SELECT owner_stream FROM unique_claims WHERE claim = ?")
            .bind(claim)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(owner) = owner {
            state.claims.insert(claim.clone(), owner);
        }
    }
    for key in &lookups.idempotency_keys {
        let row = sqlx::query(
            "SELECT key, request_hash, reply, position, stream_version FROM idempotency_keys WHERE key = ?",
        )
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = row {
            let (key, reply) = decode_reply(&row)?;
            state.replies.insert(key, reply);
        }
    }
    Ok(state)
}
