//! The directory on PostgreSQL, in a schema of its own (`directory`), beside or apart from the
//! event store. A batch is one transaction: the progress rows of its partitions are locked and
//! compared with the batch's moves, then each table gets one multi-row statement, then the
//! progress, then a NOTIFY that read APIs wait on.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use quikapp_domain::workspace::Role;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Executor, Postgres, Row, Transaction};
use uuid::Uuid;

use super::{Changes, ChannelView, Directory, MemberView, WorkspaceView, role_name, role_of};
use crate::audit::{DirectoryContents, Model};
use crate::{Batch, Progress, ProjectionError, Projector, Stored, check_moves, parse_partition_key, partition_key};

/// The channel stored progress is announced on; the payload is the model's name.
pub const PROGRESS_CHANNEL: &str = "quikapp_projection";

/// The schema, created or brought up to date by [`PostgresDirectory::migrate`]. Every statement
/// can run again; a change adds statements at the end, never edits one.
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS users (
    user_id uuid PRIMARY KEY,
    display_name text NOT NULL
);
CREATE TABLE IF NOT EXISTS workspaces (
    workspace_id uuid PRIMARY KEY,
    name text NOT NULL,
    owner_id uuid NOT NULL,
    version bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS workspace_members (
    workspace_id uuid NOT NULL,
    user_id uuid NOT NULL,
    role text NOT NULL,
    joined_at timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, user_id)
);
CREATE TABLE IF NOT EXISTS channels (
    channel_id uuid PRIMARY KEY,
    workspace_id uuid NOT NULL,
    name text NOT NULL,
    topic text,
    private boolean NOT NULL,
    archived boolean NOT NULL,
    created_by uuid NOT NULL,
    version bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS channel_members (
    channel_id uuid NOT NULL,
    user_id uuid NOT NULL,
    joined_at timestamptz NOT NULL,
    PRIMARY KEY (channel_id, user_id)
);
CREATE TABLE IF NOT EXISTS progress (
    partition text PRIMARY KEY,
    "offset" bigint NOT NULL,
    watermark bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS totals (
    model text PRIMARY KEY,
    dead_lettered bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS model (
    schema_version integer NOT NULL
);
"#;

/// The indexes the reads need beside the primary keys (which the writes need). A rebuild makes
/// them once its history is written: one index built over the rows costs less than one kept up
/// to date row by row.
const INDEXES: &str = r#"
CREATE INDEX IF NOT EXISTS channels_by_workspace ON channels (workspace_id, name);
CREATE INDEX IF NOT EXISTS channel_members_by_user ON channel_members (user_id);
"#;

/// The shape of the tables this build reads and writes. A change to it that the statements of
/// [`SCHEMA`] cannot bring existing rows up to (a new column filled from history) raises it,
/// and a model of an older version is then rebuilt by `quikapp replay postgres`.
pub const SCHEMA_VERSION: i32 = 1;

/// The schema the live model is in; a rebuild fills another one beside it.
pub const LIVE_SCHEMA: &str = "directory";

/// Serializes concurrent migrations of the schema.
const MIGRATION_LOCK: i64 = 0x5155_494b_4449_5231; // "QUIKDIR1"

pub struct PostgresDirectory {
    pool: PgPool,
    /// The schema of the tables (every connection's search_path).
    schema: String,
    listener: tokio::sync::Mutex<Option<PgListener>>,
}

impl PostgresDirectory {
    /// The live model.
    pub async fn connect(url: &str) -> Result<Self, ProjectionError> {
        Self::connect_in(url, LIVE_SCHEMA).await
    }

    /// The model whose tables are in `schema`: the live one, or a rebuild beside it.
    pub async fn connect_in(url: &str, schema: &str) -> Result<Self, ProjectionError> {
        Self::connect_with(url.parse().map_err(classify)?, schema).await
    }

    /// The model in `schema`, on the database `options` name.
    pub async fn connect_with(options: PgConnectOptions, schema: &str) -> Result<Self, ProjectionError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.options([("search_path", schema)]))
            .await
            .map_err(classify)?;
        Ok(PostgresDirectory { pool, schema: schema.to_owned(), listener: tokio::sync::Mutex::new(None) })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), ProjectionError> {
        self.run_schema(&[SCHEMA, INDEXES]).await
    }

    /// Runs `statements` (of [`SCHEMA`] and [`INDEXES`]) in the model's schema, made if missing.
    async fn run_schema(&self, statements: &[&str]) -> Result<(), ProjectionError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let schema = self.schema.clone();
        let prepare = format!(
            "SET LOCAL client_min_messages = warning; CREATE SCHEMA IF NOT EXISTS {schema}; \
             SET LOCAL search_path TO {schema};"
        );
        (&mut *tx).execute(prepare.as_str()).await.map_err(classify)?;
        for statements in statements {
            (&mut *tx).execute(*statements).await.map_err(classify)?;
        }
        sqlx::query("INSERT INTO model (schema_version) SELECT $1 WHERE NOT EXISTS (SELECT 1 FROM model)")
            .bind(SCHEMA_VERSION)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    async fn schema_version(&self) -> Result<i32, ProjectionError> {
        let version: Option<i32> = sqlx::query_scalar("SELECT schema_version FROM model")
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(version.unwrap_or(1))
    }

    pub async fn ping(&self) -> Result<(), ProjectionError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(classify)
    }
}

/// The live directory and a rebuild of it in schema `{live}_rebuild`; a swap moves the live
/// tables to `{live}_old` and the rebuild's into the live schema, in one transaction.
pub struct PostgresVersions {
    live: Arc<PostgresDirectory>,
    options: PgConnectOptions,
}

impl PostgresVersions {
    pub fn new(live: Arc<PostgresDirectory>) -> Self {
        let options = (*live.pool.connect_options()).clone();
        PostgresVersions { live, options }
    }

    fn rebuild_schema(&self) -> String {
        format!("{}_rebuild", self.live.schema)
    }

    fn old_schema(&self) -> String {
        format!("{}_old", self.live.schema)
    }

    /// The directory in the rebuild's schema (which may not exist yet).
    pub async fn rebuilt(&self) -> Result<PostgresDirectory, ProjectionError> {
        PostgresDirectory::connect_with(self.options.clone(), &self.rebuild_schema()).await
    }
}

#[async_trait]
impl crate::replay::Versions for PostgresVersions {
    fn live(&self) -> Model {
        model(self.live.clone())
    }

    async fn rebuild(&self) -> Result<Model, ProjectionError> {
        let rebuild = self.rebuilt().await?;
        rebuild.run_schema(&[SCHEMA]).await?;
        Ok(model(Arc::new(rebuild)))
    }

    /// Not under the migration lock, which the live model's roles take when they start: one
    /// replay of the model runs at a time, so nothing else makes these indexes.
    async fn index(&self) -> Result<(), ProjectionError> {
        let rebuilt = self.rebuilt().await?;
        let indexes = format!("SET client_min_messages = warning; {INDEXES}");
        sqlx::raw_sql(&indexes).execute(&rebuilt.pool).await.map_err(classify)?;
        Ok(())
    }

    async fn discard(&self) -> Result<(), ProjectionError> {
        let sql = format!("SET client_min_messages = warning; DROP SCHEMA IF EXISTS {} CASCADE", self.rebuild_schema());
        sqlx::raw_sql(&sql).execute(&self.live.pool).await.map_err(classify)?;
        Ok(())
    }

    async fn pause(&self) -> Result<Box<dyn crate::replay::Paused>, ProjectionError> {
        let live = self.live.schema.clone();
        let mut tx = self.live.pool.begin().await.map_err(classify)?;
        // Every batch writes the live progress first: the batches in flight end, the next ones
        // wait for the swap (and then find the rebuild's progress). Reads go on.
        let pause = format!(
            "SET LOCAL lock_timeout = '10s'; SET LOCAL client_min_messages = warning;
             LOCK TABLE {live}.progress IN EXCLUSIVE MODE"
        );
        (&mut *tx).execute(pause.as_str()).await.map_err(classify)?;
        Ok(Box::new(PausedDirectory { tx: Some(tx), live, rebuild: self.rebuild_schema(), old: self.old_schema() }))
    }
}

fn model(directory: Arc<PostgresDirectory>) -> Model {
    Model { projector: directory.clone(), contents: Arc::new(DirectoryContents(directory)) }
}

/// The live directory paused: a transaction holding its progress table.
struct PausedDirectory {
    /// `None` once swapped.
    tx: Option<Transaction<'static, Postgres>>,
    live: String,
    rebuild: String,
    old: String,
}

#[async_trait]
impl crate::replay::Paused for PausedDirectory {
    async fn live(&mut self) -> Result<Stored, ProjectionError> {
        let live = self.live.clone();
        read_stored(self.tx.as_mut().expect("not swapped"), &live).await
    }

    async fn swap(&mut self, keep_old: bool) -> Result<(), crate::replay::SwapError> {
        let (live, rebuild, old) = (self.live.clone(), self.rebuild.clone(), self.old.clone());
        let tx = self.tx.as_mut().expect("not swapped");
        let live_now = read_stored(tx, &live).await?;
        let rebuilt = read_stored(tx, &rebuild).await?;
        if let Some(partition) = crate::replay::behind(&live_now, &rebuilt) {
            return Err(crate::replay::SwapError::Behind(partition_key(&partition)));
        }
        let tables = |schema: String| {
            sqlx::query_scalar::<_, String>("SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1")
                .bind(schema)
        };
        let live_tables = tables(live.clone()).fetch_all(&mut **tx).await.map_err(classify)?;
        let rebuild_tables = tables(rebuild.clone()).fetch_all(&mut **tx).await.map_err(classify)?;
        lock_all(
            tx,
            live_tables
                .iter()
                .map(|t| format!("{live}.{t}"))
                .chain(rebuild_tables.iter().map(|t| format!("{rebuild}.{t}"))),
        )
        .await?;
        let mut moves = format!("DROP SCHEMA IF EXISTS {old} CASCADE; CREATE SCHEMA {old};");
        for table in &live_tables {
            moves.push_str(&format!("ALTER TABLE {live}.{table} SET SCHEMA {old};"));
        }
        for table in &rebuild_tables {
            moves.push_str(&format!("ALTER TABLE {rebuild}.{table} SET SCHEMA {live};"));
        }
        moves.push_str(&format!("DROP SCHEMA {rebuild};"));
        if !keep_old {
            moves.push_str(&format!("DROP SCHEMA {old} CASCADE;"));
        }
        let mut tx = self.tx.take().expect("not swapped");
        (&mut *tx).execute(moves.as_str()).await.map_err(classify)?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(PROGRESS_CHANNEL)
            .bind("postgres")
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(())
    }

    async fn resume(self: Box<Self>) {
        if let Some(tx) = self.tx {
            let _ = tx.rollback().await;
        }
    }
}

/// Faults of the batch itself (SQLSTATE classes 22, data, and 23, constraints) refuse it; the
/// rest may pass with time.
pub(crate) fn classify(error: sqlx::Error) -> ProjectionError {
    let code = error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned()).unwrap_or_default();
    if code.starts_with("22") || code.starts_with("23") {
        ProjectionError::Rejected(error.to_string())
    } else {
        ProjectionError::Unavailable(error.to_string())
    }
}

async fn write_changes(tx: &mut Transaction<'_, Postgres>, changes: Changes) -> Result<(), ProjectionError> {
    if !changes.users.is_empty() {
        let (ids, names): (Vec<Uuid>, Vec<String>) = changes.users.into_iter().unzip();
        sqlx::query(
            "INSERT INTO users (user_id, display_name) SELECT * FROM UNNEST($1::uuid[], $2::text[])
             ON CONFLICT (user_id) DO UPDATE SET display_name = excluded.display_name",
        )
        .bind(ids)
        .bind(names)
        .execute(&mut **tx)
        .await?;
    }

    let created: Vec<(Uuid, String, Uuid, i64)> = changes
        .workspaces
        .iter()
        .filter_map(|(id, w)| w.created.clone().map(|(name, owner)| (*id, name, owner, w.version as i64)))
        .collect();
    if !created.is_empty() {
        sqlx::query(
            "INSERT INTO workspaces (workspace_id, name, owner_id, version)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::bigint[])",
        )
        .bind(created.iter().map(|c| c.0).collect::<Vec<_>>())
        .bind(created.iter().map(|c| c.1.clone()).collect::<Vec<_>>())
        .bind(created.iter().map(|c| c.2).collect::<Vec<_>>())
        .bind(created.iter().map(|c| c.3).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    let versions: Vec<(Uuid, i64)> =
        changes.workspaces.iter().filter(|(_, w)| w.created.is_none()).map(|(id, w)| (*id, w.version as i64)).collect();
    if !versions.is_empty() {
        let updated = sqlx::query(
            "UPDATE workspaces w SET version = GREATEST(w.version, v.version)
             FROM UNNEST($1::uuid[], $2::bigint[]) AS v(id, version) WHERE w.workspace_id = v.id",
        )
        .bind(versions.iter().map(|v| v.0).collect::<Vec<_>>())
        .bind(versions.iter().map(|v| v.1).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        refuse_unless(updated.rows_affected() == versions.len() as u64, "a workspace that is not in the directory")?;
    }
    if !changes.workspace_members.is_empty() {
        let members: Vec<_> = changes.workspace_members.into_iter().collect();
        sqlx::query(
            "INSERT INTO workspace_members (workspace_id, user_id, role, joined_at)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[])
             ON CONFLICT (workspace_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(members.iter().map(|((w, _), _)| *w).collect::<Vec<_>>())
        .bind(members.iter().map(|((_, u), _)| *u).collect::<Vec<_>>())
        .bind(members.iter().map(|(_, (role, _))| role_name(*role)).collect::<Vec<_>>())
        .bind(members.iter().map(|(_, (_, at))| *at).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }

    let (created, updated): (Vec<_>, Vec<_>) = changes.channels.into_iter().partition(|(_, c)| c.created.is_some());
    if !created.is_empty() {
        sqlx::query(
            "INSERT INTO channels (channel_id, workspace_id, name, topic, private, archived, created_by, version)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bool[], $6::bool[], $7::uuid[],
                                  $8::bigint[])",
        )
        .bind(created.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(created.iter().map(|(_, c)| c.created.expect("created").0).collect::<Vec<_>>())
        .bind(created.iter().map(|(_, c)| c.name.clone().unwrap_or_default()).collect::<Vec<_>>())
        .bind(created.iter().map(|(_, c)| c.topic.clone().flatten()).collect::<Vec<_>>())
        .bind(created.iter().map(|(_, c)| c.created.expect("created").2).collect::<Vec<_>>())
        .bind(created.iter().map(|(_, c)| c.archived).collect::<Vec<_>>())
        .bind(created.iter().map(|(_, c)| c.created.expect("created").1).collect::<Vec<_>>())
        .bind(created.iter().map(|(_, c)| c.version as i64).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !updated.is_empty() {
        let rows = sqlx::query(
            "UPDATE channels c SET
                name = COALESCE(v.name, c.name),
                topic = CASE WHEN v.topic_changed THEN v.topic ELSE c.topic END,
                archived = c.archived OR v.archived,
                version = GREATEST(c.version, v.version)
             FROM UNNEST($1::uuid[], $2::text[], $3::bool[], $4::text[], $5::bool[], $6::bigint[])
                  AS v(id, name, topic_changed, topic, archived, version)
             WHERE c.channel_id = v.id",
        )
        .bind(updated.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(updated.iter().map(|(_, c)| c.name.clone()).collect::<Vec<_>>())
        .bind(updated.iter().map(|(_, c)| c.topic.is_some()).collect::<Vec<_>>())
        .bind(updated.iter().map(|(_, c)| c.topic.clone().flatten()).collect::<Vec<_>>())
        .bind(updated.iter().map(|(_, c)| c.archived).collect::<Vec<_>>())
        .bind(updated.iter().map(|(_, c)| c.version as i64).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        refuse_unless(rows.rows_affected() == updated.len() as u64, "a channel that is not in the directory")?;
    }
    let (joined, left): (Vec<_>, Vec<_>) = changes.channel_members.into_iter().partition(|(_, at)| at.is_some());
    if !left.is_empty() {
        sqlx::query(
            "DELETE FROM channel_members m USING UNNEST($1::uuid[], $2::uuid[]) AS v(channel_id, user_id)
             WHERE m.channel_id = v.channel_id AND m.user_id = v.user_id",
        )
        .bind(left.iter().map(|((c, _), _)| *c).collect::<Vec<_>>())
        .bind(left.iter().map(|((_, u), _)| *u).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !joined.is_empty() {
        sqlx::query(
            "INSERT INTO channel_members (channel_id, user_id, joined_at)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[])
             ON CONFLICT (channel_id, user_id) DO UPDATE SET joined_at = excluded.joined_at",
        )
        .bind(joined.iter().map(|((c, _), _)| *c).collect::<Vec<_>>())
        .bind(joined.iter().map(|((_, u), _)| *u).collect::<Vec<_>>())
        .bind(joined.iter().map(|(_, at)| at.expect("joined")).collect::<Vec<DateTime<Utc>>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn refuse_unless(holds: bool, what: &str) -> Result<(), ProjectionError> {
    if holds { Ok(()) } else { Err(ProjectionError::Rejected(format!("the batch changes {what}"))) }
}

impl From<sqlx::Error> for ProjectionError {
    fn from(error: sqlx::Error) -> Self {
        classify(error)
    }
}

#[async_trait]
impl Projector for PostgresDirectory {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn stored(&self) -> Result<Stored, ProjectionError> {
        stored(&self.pool, self.name()).await
    }

    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let keys: Vec<String> = batch.moves.iter().map(|m| partition_key(&m.partition)).collect();
        // The batch's progress rows, locked (a row is made first for a partition met for the
        // first time, offset -1: so that two members starting a partition at once are
        // serialized on it too), and their offsets.
        let rows = sqlx::query(
            r#"INSERT INTO progress (partition, "offset", watermark)
               SELECT key, -1, 0 FROM UNNEST($1::text[]) AS key ORDER BY key
               ON CONFLICT (partition) DO UPDATE SET "offset" = progress."offset"
               RETURNING partition, "offset""#,
        )
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        let offsets: std::collections::HashMap<String, u64> = rows
            .iter()
            .filter(|r| r.get::<i64, _>(1) >= 0)
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1) as u64))
            .collect();
        check_moves(&batch.moves, |p| offsets.get(&partition_key(p)).copied())?;

        write_changes(&mut tx, Changes::of(&batch.events)).await?;
        // The new progress, the notification read APIs wait on, and no fsync for this commit:
        // effects and progress are lost together if the server crashes before flushing them,
        // and come again from the bus.
        sqlx::query(
            r#"WITH saved AS (
                   INSERT INTO progress (partition, "offset", watermark)
                   SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[])
                   ON CONFLICT (partition) DO UPDATE SET "offset" = excluded."offset", watermark = excluded.watermark
                   RETURNING 1)
               SELECT pg_notify($4, $5), set_config('synchronous_commit', 'off', true), (SELECT count(*) FROM saved)"#,
        )
        .bind(&keys)
        .bind(batch.moves.iter().map(|m| m.to.offset as i64).collect::<Vec<_>>())
        .bind(batch.moves.iter().map(|m| m.to.watermark as i64).collect::<Vec<_>>())
        .bind(PROGRESS_CHANNEL)
        .bind(self.name())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if batch.dead_lettered > 0 {
            add_dead_letters(&mut tx, self.name(), batch.dead_lettered).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }

    async fn changed(&self) {
        wait_for_notification(&self.pool, &self.listener, self.name()).await
    }

    async fn check_schema(&self) -> Result<(), ProjectionError> {
        match self.schema_version().await? {
            version if version < SCHEMA_VERSION => Err(crate::older_schema("postgres", version, SCHEMA_VERSION)),
            _ => Ok(()),
        }
    }
}

pub(crate) async fn add_dead_letters(
    tx: &mut Transaction<'_, Postgres>,
    model: &str,
    count: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO totals (model, dead_lettered) VALUES ($1, $2)
         ON CONFLICT (model) DO UPDATE SET dead_lettered = totals.dead_lettered + excluded.dead_lettered",
    )
    .bind(model)
    .bind(count as i64)
    .execute(&mut **tx)
    .await
    .map(|_| ())
}

/// Takes every one of `tables` for a swap. Readers take the tables of a query in their own
/// order, so waiting for one table while holding another could deadlock with them: each
/// attempt waits a moment at most, then lets go of all and tries again, for ten seconds.
async fn lock_all(
    tx: &mut Transaction<'_, Postgres>,
    tables: impl Iterator<Item = String>,
) -> Result<(), ProjectionError> {
    let lock = format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", tables.collect::<Vec<_>>().join(", "));
    for _attempt in 0..50 {
        (&mut **tx).execute("SAVEPOINT locking; SET LOCAL lock_timeout = '200ms'").await.map_err(classify)?;
        match (&mut **tx).execute(lock.as_str()).await {
            Ok(_) => return Ok(()),
            Err(error) => {
                let code = error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
                if !matches!(code.as_deref(), Some("55P03" | "40P01")) {
                    return Err(classify(error));
                }
                (&mut **tx).execute("ROLLBACK TO SAVEPOINT locking").await.map_err(classify)?;
            }
        }
    }
    Err(ProjectionError::Unavailable("the tables stayed busy for ten seconds".into()))
}

/// The progress stored in `schema`, read on `connection` (in a swap's transaction).
async fn read_stored(tx: &mut Transaction<'_, Postgres>, schema: &str) -> Result<Stored, ProjectionError> {
    let sql = format!(r#"SELECT partition, "offset", watermark FROM {schema}.progress WHERE "offset" >= 0"#);
    let rows = sqlx::query(&sql).fetch_all(&mut **tx).await.map_err(classify)?;
    Ok(Stored { partitions: progress_of(&rows), dead_lettered: 0 })
}

fn progress_of(rows: &[sqlx::postgres::PgRow]) -> std::collections::HashMap<quikapp_bus::Partition, Progress> {
    rows.iter()
        .filter_map(|row| {
            let partition = parse_partition_key(row.get::<&str, _>(0))?;
            Some((partition, Progress { offset: row.get::<i64, _>(1) as u64, watermark: row.get::<i64, _>(2) as u64 }))
        })
        .collect()
}

pub(crate) async fn stored(pool: &PgPool, model: &str) -> Result<Stored, ProjectionError> {
    let rows = sqlx::query(r#"SELECT partition, "offset", watermark FROM progress WHERE "offset" >= 0"#)
        .fetch_all(pool)
        .await
        .map_err(classify)?;
    let partitions = progress_of(&rows);
    let dead_lettered: Option<i64> = sqlx::query_scalar("SELECT dead_lettered FROM totals WHERE model = $1")
        .bind(model)
        .fetch_optional(pool)
        .await
        .map_err(classify)?;
    Ok(Stored { partitions, dead_lettered: dead_lettered.unwrap_or(0) as u64 })
}

/// Waits for a NOTIFY of `model`'s progress (at most a second), listening on a connection kept
/// between calls.
pub(crate) async fn wait_for_notification(
    pool: &PgPool,
    listener: &tokio::sync::Mutex<Option<PgListener>>,
    model: &str,
) {
    let waiting = async {
        let mut listener = listener.lock().await;
        if listener.is_none() {
            let mut fresh = PgListener::connect_with(pool).await.ok()?;
            fresh.listen(PROGRESS_CHANNEL).await.ok()?;
            *listener = Some(fresh);
        }
        loop {
            match listener.as_mut()?.recv().await {
                Ok(notification) if notification.payload() == model => return Some(()),
                Ok(_) => {}
                Err(_) => {
                    *listener = None;
                    return None;
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), waiting).await;
}

fn workspace_view(row: &sqlx::postgres::PgRow) -> WorkspaceView {
    WorkspaceView {
        workspace_id: row.get("workspace_id"),
        name: row.get("name"),
        owner_id: row.get("owner_id"),
        member_count: row.get::<i64, _>("member_count") as u64,
        version: row.get::<i64, _>("version") as u64,
    }
}

fn channel_view(row: &sqlx::postgres::PgRow) -> ChannelView {
    ChannelView {
        channel_id: row.get("channel_id"),
        workspace_id: row.get("workspace_id"),
        name: row.get("name"),
        topic: row.get("topic"),
        private: row.get("private"),
        archived: row.get("archived"),
        created_by: row.get("created_by"),
        member_count: row.get::<i64, _>("member_count") as u64,
        version: row.get::<i64, _>("version") as u64,
    }
}

const CHANNEL_COLUMNS: &str = "c.channel_id, c.workspace_id, c.name, c.topic, c.private, c.archived, c.created_by,
     c.version, (SELECT count(*) FROM channel_members m WHERE m.channel_id = c.channel_id) AS member_count";

#[async_trait]
impl Directory for PostgresDirectory {
    async fn workspace(&self, workspace_id: Uuid) -> Result<Option<WorkspaceView>, ProjectionError> {
        let row = sqlx::query(
            "SELECT w.workspace_id, w.name, w.owner_id, w.version,
                    (SELECT count(*) FROM workspace_members m WHERE m.workspace_id = w.workspace_id)
                        AS member_count
             FROM workspaces w WHERE w.workspace_id = $1",
        )
        .bind(workspace_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.as_ref().map(workspace_view))
    }

    async fn role(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Option<Role>, ProjectionError> {
        let role: Option<String> =
            sqlx::query_scalar("SELECT role FROM workspace_members WHERE workspace_id = $1 AND user_id = $2")
                .bind(workspace_id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
        Ok(role.as_deref().and_then(role_of))
    }

    async fn channels(&self, workspace_id: Uuid, viewer: Uuid) -> Result<Vec<ChannelView>, ProjectionError> {
        let rows = sqlx::query(&format!(
            "SELECT {CHANNEL_COLUMNS} FROM channels c
             WHERE c.workspace_id = $1 AND (NOT c.private OR EXISTS (
                 SELECT 1 FROM channel_members m WHERE m.channel_id = c.channel_id AND m.user_id = $2))
             ORDER BY c.name, c.channel_id"
        ))
        .bind(workspace_id)
        .bind(viewer)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(rows.iter().map(channel_view).collect())
    }

    async fn private_channels(&self, workspace_id: Uuid, member: Uuid) -> Result<Vec<Uuid>, ProjectionError> {
        sqlx::query_scalar(
            "SELECT c.channel_id FROM channels c
             JOIN channel_members m ON m.channel_id = c.channel_id AND m.user_id = $2
             WHERE c.workspace_id = $1 AND c.private ORDER BY c.channel_id",
        )
        .bind(workspace_id)
        .bind(member)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)
    }

    async fn channel(&self, channel_id: Uuid) -> Result<Option<ChannelView>, ProjectionError> {
        let row = sqlx::query(&format!("SELECT {CHANNEL_COLUMNS} FROM channels c WHERE c.channel_id = $1"))
            .bind(channel_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(row.as_ref().map(channel_view))
    }

    async fn is_member(&self, channel_id: Uuid, user_id: Uuid) -> Result<bool, ProjectionError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM channel_members WHERE channel_id = $1 AND user_id = $2)")
            .bind(channel_id)
            .bind(user_id)
            .fetch_one(&self.pool)
            .await
            .map_err(classify)
    }

    async fn members(&self, channel_id: Uuid) -> Result<Vec<MemberView>, ProjectionError> {
        let rows = sqlx::query(
            "SELECT m.user_id, u.display_name, m.joined_at FROM channel_members m
             LEFT JOIN users u ON u.user_id = m.user_id
             WHERE m.channel_id = $1 ORDER BY m.joined_at, m.user_id",
        )
        .bind(channel_id)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(rows
            .iter()
            .map(|row| MemberView {
                user_id: row.get("user_id"),
                display_name: row.get("display_name"),
                joined_at: row.get("joined_at"),
            })
            .collect())
    }
}
