//! Search for the embedded default: SQLite FTS5 in this process's memory (like the other
//! embedded models, rebuilt from the log at each start). Table `documents` holds each
//! [`Document`] whole, `channels` whether each channel is private; the FTS5 table `matches`
//! holds, under the same rowid, the text of each message not deleted and the columns a search
//! filters on. Its tokenizer is `porter unicode61
//! remove_diacritics 2`: Unicode words, case and diacritics folded, English stems, as the
//! OpenSearch analyzer does. A batch is one transaction, progress included.

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{SqliteConnection, SqlitePool};
use uuid::Uuid;

use super::{Document, Hit, Hits, Known, MARK_END, MARK_START, Query, Search, fold, highlight, to_read};
use crate::timelines::MessageView;
use crate::{
    Batch, Changes, Progress, ProjectionError, Projector, Stored, check_moves, parse_partition_key, partition_key,
};

const SCHEMA: &str = r#"
CREATE TABLE documents (id INTEGER PRIMARY KEY, message_id TEXT NOT NULL UNIQUE, applied INTEGER NOT NULL, body TEXT NOT NULL);
CREATE VIRTUAL TABLE matches USING fts5(
    text, workspace_id UNINDEXED, channel_id UNINDEXED, author_id UNINDEXED, position UNINDEXED, private UNINDEXED,
    tokenize = 'porter unicode61 remove_diacritics 2'
);
CREATE TABLE channels (channel_id TEXT PRIMARY KEY, private INTEGER NOT NULL);
CREATE TABLE progress (partition TEXT PRIMARY KEY, "offset" INTEGER NOT NULL, watermark INTEGER NOT NULL);
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY CHECK (id = 1), count INTEGER NOT NULL);
INSERT INTO dead_letters VALUES (1, 0);
"#;

/// What a search matches: the FTS5 table `matches` as the read API filters it.
const MATCHING: &str = "matches MATCH ?1 AND matches.workspace_id = ?2 \
     AND (?3 IS NULL OR matches.channel_id = ?3) AND (?4 IS NULL OR matches.author_id = ?4) \
     AND (matches.private = 0 OR matches.channel_id IN (SELECT value FROM json_each(?5)))";

pub struct SqliteSearch {
    /// One connection: an in-memory database lives as long as its connection.
    pool: SqlitePool,
    changed: Changes,
}

fn unavailable(error: sqlx::Error) -> ProjectionError {
    ProjectionError::Unavailable(error.to_string())
}

impl SqliteSearch {
    pub async fn in_memory() -> Result<Self, ProjectionError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(unavailable)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await.map_err(unavailable)?;
        Ok(SqliteSearch { pool, changed: Changes::default() })
    }
}

async fn stored(connection: &mut SqliteConnection) -> Result<Stored, ProjectionError> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(r#"SELECT partition, "offset", watermark FROM progress"#)
        .fetch_all(&mut *connection)
        .await
        .map_err(unavailable)?;
    let partitions = rows
        .into_iter()
        .filter_map(|(key, offset, watermark)| {
            Some((parse_partition_key(&key)?, Progress { offset: offset as u64, watermark: watermark as u64 }))
        })
        .collect();
    let dead_lettered: i64 =
        sqlx::query_scalar("SELECT count FROM dead_letters").fetch_one(connection).await.map_err(unavailable)?;
    Ok(Stored { partitions, dead_lettered: dead_lettered as u64 })
}

/// Writes a document unless the stored one is as recent, and its row of `matches` with it.
async fn write(connection: &mut SqliteConnection, document: &Document) -> Result<(), ProjectionError> {
    let message = &document.message;
    let body = serde_json::to_string(document).expect("a document serializes");
    let written: Option<i64> = sqlx::query_scalar(
        "INSERT INTO documents (message_id, applied, body) VALUES (?1, ?2, ?3) \
         ON CONFLICT (message_id) DO UPDATE SET applied = excluded.applied, body = excluded.body \
         WHERE documents.applied < excluded.applied RETURNING id",
    )
    .bind(message.message_id.to_string())
    .bind(document.applied as i64)
    .bind(body)
    .fetch_optional(&mut *connection)
    .await
    .map_err(unavailable)?;
    let Some(id) = written else { return Ok(()) };
    sqlx::query("DELETE FROM matches WHERE rowid = ?1")
        .bind(id)
        .execute(&mut *connection)
        .await
        .map_err(unavailable)?;
    if !message.deleted {
        sqlx::query(
            "INSERT INTO matches (rowid, text, workspace_id, channel_id, author_id, position, private) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(id)
        .bind(&message.text)
        .bind(document.workspace_id.to_string())
        .bind(message.channel_id.to_string())
        .bind(message.author_id.to_string())
        .bind(message.position as i64)
        .bind(document.private)
        .execute(connection)
        .await
        .map_err(unavailable)?;
    }
    Ok(())
}

#[async_trait]
impl Projector for SqliteSearch {
    fn name(&self) -> &'static str {
        "search"
    }

    async fn stored(&self) -> Result<Stored, ProjectionError> {
        stored(&mut *self.pool.acquire().await.map_err(unavailable)?).await
    }

    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        let mut transaction = self.pool.begin().await.map_err(unavailable)?;
        let now = stored(&mut transaction).await?;
        check_moves(&batch.moves, |p| now.partitions.get(p).map(|s| s.offset))?;
        let reads = to_read(&batch.events);
        let mut known = Known::default();
        // One query each for the documents and the channels the batch needs.
        let ids = |ids: &[Uuid]| serde_json::to_string(ids).expect("ids serialize");
        let bodies: Vec<String> =
            sqlx::query_scalar("SELECT body FROM documents WHERE message_id IN (SELECT value FROM json_each(?1))")
                .bind(ids(&reads.messages))
                .fetch_all(&mut *transaction)
                .await
                .map_err(unavailable)?;
        for body in bodies {
            let document: Document =
                serde_json::from_str(&body).map_err(|e| ProjectionError::Rejected(e.to_string()))?;
            known.documents.insert(document.message.message_id, document);
        }
        let channels: Vec<(String, bool)> = sqlx::query_as(
            "SELECT channel_id, private FROM channels WHERE channel_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(ids(&reads.channels))
        .fetch_all(&mut *transaction)
        .await
        .map_err(unavailable)?;
        for (channel, private) in channels {
            let channel = channel.parse().map_err(|_| ProjectionError::Rejected(format!("channel id {channel}")))?;
            known.channels.insert(channel, private);
        }
        let folded = fold(&batch.events, &mut known);
        for (channel, private, _) in folded.channels {
            sqlx::query("INSERT INTO channels VALUES (?1, ?2) ON CONFLICT DO NOTHING")
                .bind(channel.to_string())
                .bind(private)
                .execute(&mut *transaction)
                .await
                .map_err(unavailable)?;
        }
        for id in folded.changed {
            write(&mut transaction, &known.documents[&id]).await?;
        }
        for step in &batch.moves {
            sqlx::query(
                r#"INSERT INTO progress (partition, "offset", watermark) VALUES (?1, ?2, ?3)
                   ON CONFLICT (partition) DO UPDATE SET "offset" = excluded."offset", watermark = excluded.watermark"#,
            )
            .bind(partition_key(&step.partition))
            .bind(step.to.offset as i64)
            .bind(step.to.watermark as i64)
            .execute(&mut *transaction)
            .await
            .map_err(unavailable)?;
        }
        sqlx::query("UPDATE dead_letters SET count = count + ?1")
            .bind(batch.dead_lettered as i64)
            .execute(&mut *transaction)
            .await
            .map_err(unavailable)?;
        transaction.commit().await.map_err(unavailable)?;
        self.changed.announce();
        Ok(())
    }

    async fn changed(&self) {
        self.changed.next().await;
    }
}

/// An FTS5 query where every word must match, each quoted as a phrase of its tokens.
fn fts_query(words: &[String]) -> String {
    words.iter().map(|word| format!("\"{}\"", word.replace('"', "\"\""))).collect::<Vec<_>>().join(" ")
}

#[async_trait]
impl Search for SqliteSearch {
    async fn search(&self, query: &Query) -> Result<Hits, ProjectionError> {
        let matching = fts_query(&query.words);
        let channel = query.channel.map(|c| c.to_string());
        let private = serde_json::to_string(&query.private).expect("ids serialize");
        let author = query.author.map(|a| a.to_string());
        let mut connection = self.pool.acquire().await.map_err(unavailable)?;
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT documents.body, highlight(matches, 0, ?6, ?7) FROM matches \
             JOIN documents ON documents.id = matches.rowid WHERE {MATCHING} \
             ORDER BY matches.rank, matches.position DESC LIMIT ?8"
        ))
        .bind(&matching)
        .bind(query.workspace_id.to_string())
        .bind(&channel)
        .bind(&author)
        .bind(&private)
        .bind(MARK_START.to_string())
        .bind(MARK_END.to_string())
        .bind(query.limit as i64)
        .fetch_all(&mut *connection)
        .await
        .map_err(unavailable)?;
        let total: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM matches WHERE {MATCHING}"))
            .bind(&matching)
            .bind(query.workspace_id.to_string())
            .bind(&channel)
            .bind(&author)
            .bind(&private)
            .fetch_one(&mut *connection)
            .await
            .map_err(unavailable)?;
        let hits = rows
            .iter()
            .filter_map(|(body, marked)| {
                let document: Document = serde_json::from_str(body).ok()?;
                Some(Hit { message: MessageView::from(&document.message), highlight: highlight(marked) })
            })
            .collect();
        Ok(Hits { hits, total: total as u64 })
    }
    async fn documents(&self, channel: Uuid) -> Result<Vec<Document>, ProjectionError> {
        let bodies: Vec<String> = sqlx::query_scalar(
            "SELECT body FROM documents WHERE json_extract(body, '$.message.channel_id') = ?1
             ORDER BY json_extract(body, '$.message.position')",
        )
        .bind(channel.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        bodies
            .iter()
            .map(|body| serde_json::from_str(body).map_err(|e| ProjectionError::Unavailable(e.to_string())))
            .collect()
    }
}
