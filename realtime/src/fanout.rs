//! How the events the realtime group reads reach every gateway: a Redis stream, or in one
//! process a broadcast channel.
//!
//! A Redis stream rather than pub/sub: a gateway reads it from the last entry it had, so a
//! dropped connection to Redis loses nothing (pub/sub forgets what a subscriber missed). Each
//! entry is a [`Slice`], what one poll of the bus read (events and watermarks), so a busy
//! stream costs one entry per batch, not per event. The stream is capped (`MAXLEN ~`); a
//! gateway that falls that far behind has lost entries and closes its connections
//! ([`FanoutError::Lost`]) so that clients resume from the event store.

use std::time::Duration;

use async_trait::async_trait;
use quikapp_domain::Envelope;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What one poll of the bus read, in each partition's order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Slice {
    pub records: Vec<Item>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Item {
    Event {
        topic: String,
        partition: i32,
        event: Box<Envelope>,
    },
    /// Every event up to `position` of this partition came before.
    Watermark {
        topic: String,
        partition: i32,
        position: u64,
    },
    /// A user came online or went offline (ephemeral: not in the event store).
    Presence {
        workspace_id: Uuid,
        user_id: Uuid,
        online: bool,
    },
    /// A user is typing in a channel (ephemeral).
    Typing {
        channel_id: Uuid,
        user_id: Uuid,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("the fan-out is unavailable: {0}")]
    Unavailable(String),
    /// Slices were dropped before this reader had them.
    #[error("slices were lost: {0}")]
    Lost(String),
}

#[async_trait]
pub trait Fanout: Send + Sync {
    async fn publish(&self, slice: &Slice) -> Result<(), FanoutError>;
    /// A reader of the slices published from now on.
    async fn subscribe(&self) -> Result<Box<dyn Slices>, FanoutError>;
}

#[async_trait]
pub trait Slices: Send {
    /// The next slices, waiting up to about a second for one (none: nothing came).
    async fn next(&mut self) -> Result<Vec<Slice>, FanoutError>;
}

// ------------------------------------------------------------------ Redis

pub struct RedisFanout {
    client: redis::Client,
    publisher: redis::aio::MultiplexedConnection,
    key: String,
    max_len: usize,
}

/// How long a Redis command may take, the blocking read's second included.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// Entries per read: a reader this many entries behind checks that none it has not read was
/// trimmed.
const READ_COUNT: usize = 64;

/// A client of logical database `db` of the Redis at `url`: realtime keeps to a database of its
/// own, since a replay of the counters swaps and empties theirs.
pub fn redis_client(url: &str, db: i64) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?;
    let settings = info.redis_settings().clone().set_db(db);
    redis::Client::open(info.set_redis_settings(settings))
}

fn unavailable(error: redis::RedisError) -> FanoutError {
    FanoutError::Unavailable(error.to_string())
}

async fn connect(client: &redis::Client) -> Result<redis::aio::MultiplexedConnection, FanoutError> {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(REDIS_TIMEOUT));
    client.get_multiplexed_async_connection_with_config(&config).await.map_err(unavailable)
}

impl RedisFanout {
    /// The stream `key` in database `db`, capped at about `max_len` slices.
    pub async fn connect(url: &str, db: i64, key: String, max_len: usize) -> Result<Self, FanoutError> {
        let client = redis_client(url, db).map_err(unavailable)?;
        let publisher = connect(&client).await?;
        Ok(RedisFanout { client, publisher, key, max_len })
    }
}

#[async_trait]
impl Fanout for RedisFanout {
    async fn publish(&self, slice: &Slice) -> Result<(), FanoutError> {
        let payload = serde_json::to_vec(slice).expect("slices serialize");
        redis::cmd("XADD")
            .arg(&self.key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_len)
            .arg("*")
            .arg("s")
            .arg(payload)
            .query_async::<String>(&mut self.publisher.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn subscribe(&self) -> Result<Box<dyn Slices>, FanoutError> {
        // Its own connection: a blocking read holds it.
        let connection = connect(&self.client).await?;
        Ok(Box::new(RedisSlices {
            client: self.client.clone(),
            connection,
            key: self.key.clone(),
            last: "$".into(),
            behind: false,
        }))
    }
}

struct RedisSlices {
    client: redis::Client,
    connection: redis::aio::MultiplexedConnection,
    key: String,
    /// The id of the last entry read (`$` before the first: only what comes next).
    last: String,
    /// Whether the last read may have left entries behind (it was full, or failed).
    behind: bool,
}

/// A stream entry id's two numbers, for comparing.
fn entry_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

impl RedisSlices {
    /// Whether the stream dropped an entry after the last one read (trimmed by its cap while
    /// this reader was behind): Redis 7 keeps the highest id it ever deleted.
    async fn trimmed(&mut self) -> Result<bool, FanoutError> {
        let info: redis::Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&self.key)
            .query_async(&mut self.connection)
            .await
            .map_err(unavailable)?;
        let fields: Vec<(String, redis::Value)> = match info {
            redis::Value::Map(pairs) => pairs
                .into_iter()
                .filter_map(|(k, v)| redis::from_redis_value::<String>(k).ok().map(|k| (k, v)))
                .collect(),
            redis::Value::Array(items) => items
                .chunks(2)
                .filter_map(|pair| redis::from_redis_value_ref::<String>(&pair[0]).ok().map(|k| (k, pair[1].clone())))
                .collect(),
            _ => vec![],
        };
        let deleted = fields.into_iter().find(|(k, _)| k == "max-deleted-entry-id");
        let deleted = deleted.and_then(|(_, v)| redis::from_redis_value::<String>(v).ok()).unwrap_or_default();
        Ok(entry_id(&deleted) > entry_id(&self.last))
    }
}

#[async_trait]
impl Slices for RedisSlices {
    async fn next(&mut self) -> Result<Vec<Slice>, FanoutError> {
        use redis::streams::{StreamReadOptions, StreamReadReply};
        if self.behind && self.last != "$" && self.trimmed().await? {
            let lost = format!("entries after {} were trimmed before this gateway read them", self.last);
            self.last = "$".into();
            self.behind = false;
            return Err(FanoutError::Lost(lost));
        }
        let options = StreamReadOptions::default().block(1_000).count(READ_COUNT);
        let read: Result<Option<StreamReadReply>, _> =
            redis::AsyncCommands::xread_options(&mut self.connection, &[&self.key], &[&self.last], &options).await;
        let reply = match read {
            Ok(reply) => reply,
            Err(error) => {
                // Reconnect for the next call; the place in the stream is kept.
                if let Ok(connection) = connect(&self.client).await {
                    self.connection = connection;
                }
                self.behind = true;
                return Err(unavailable(error));
            }
        };
        let mut slices = Vec::new();
        let mut entries = 0;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            entries += key.ids.len();
            for entry in key.ids {
                let slice = entry.get::<Vec<u8>>("s").and_then(|bytes| serde_json::from_slice::<Slice>(&bytes).ok());
                match slice {
                    Some(slice) => slices.push(slice),
                    None => tracing::warn!(id = entry.id, "passed over a stream entry that is not a slice"),
                }
                self.last = entry.id;
            }
        }
        self.behind = entries >= READ_COUNT;
        Ok(slices)
    }
}

// ------------------------------------------------------------------ in process

/// The fan-out of `quikapp dev`: one process, so a broadcast channel.
pub struct MemoryFanout {
    sender: tokio::sync::broadcast::Sender<std::sync::Arc<Slice>>,
}

impl MemoryFanout {
    pub fn new(capacity: usize) -> Self {
        MemoryFanout { sender: tokio::sync::broadcast::channel(capacity).0 }
    }
}

#[async_trait]
impl Fanout for MemoryFanout {
    async fn publish(&self, slice: &Slice) -> Result<(), FanoutError> {
        // No receiver yet is no error: nobody was listening.
        let _ = self.sender.send(std::sync::Arc::new(slice.clone()));
        Ok(())
    }

    async fn subscribe(&self) -> Result<Box<dyn Slices>, FanoutError> {
        Ok(Box::new(MemorySlices(self.sender.subscribe())))
    }
}

struct MemorySlices(tokio::sync::broadcast::Receiver<std::sync::Arc<Slice>>);

#[async_trait]
impl Slices for MemorySlices {
    async fn next(&mut self) -> Result<Vec<Slice>, FanoutError> {
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        let first = match tokio::time::timeout(Duration::from_secs(1), self.0.recv()).await {
            Err(_) => return Ok(vec![]),
            Ok(Ok(slice)) => slice,
            Ok(Err(RecvError::Lagged(missed))) => return Err(FanoutError::Lost(format!("{missed} slices"))),
            Ok(Err(RecvError::Closed)) => return Err(FanoutError::Unavailable("the fan-out stopped".into())),
        };
        let mut slices = vec![(*first).clone()];
        loop {
            match self.0.try_recv() {
                Ok(slice) => slices.push((*slice).clone()),
                Err(TryRecvError::Lagged(missed)) => return Err(FanoutError::Lost(format!("{missed} slices"))),
                Err(TryRecvError::Empty | TryRecvError::Closed) => return Ok(slices),
            }
        }
    }
}
