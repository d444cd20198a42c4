//! The counters on Redis. A batch is one transaction on a connection of the committer's own:
//! WATCH the progress and the pause flag, compare the stored offsets with the batch's moves,
//! then MULTI, every write, the new progress, a PUBLISH for the read APIs, EXEC (which does
//! nothing if a watched key changed meanwhile). One round trip for the writes, whatever their
//! number, and no script: Redis runs commands of a transaction faster than the same commands
//! called from Lua.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, MultiplexedConnection, PubSub};

use super::{Counters, Keys, Keyspace, Op};
use crate::audit::{CountersContents, Model};
use crate::{Move, Progress, ProjectionError, Stored, parse_partition_key, partition_key};

/// The pub/sub channel stored progress is announced on.
pub const PROGRESS_CHANNEL: &str = "quikapp:projection:redis";

pub struct RedisKeyspace {
    client: redis::Client,
    connection: ConnectionManager,
    /// The committer's connection (WATCH belongs to a connection), made again after a fault.
    committer: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    keys: Keys,
    pubsub: tokio::sync::Mutex<Option<PubSub>>,
}

/// A key of the wrong type is the batch's fault; anything else (connection, timeout, a server
/// loading or out of memory) may pass.
fn unavailable(error: redis::RedisError) -> ProjectionError {
    match error.code() {
        Some("WRONGTYPE") => ProjectionError::Rejected(error.to_string()),
        _ => ProjectionError::Unavailable(error.to_string()),
    }
}

/// The shape of the keys this build reads and writes; see [`RedisKeyspace::check_schema`].
pub const SCHEMA_VERSION: u32 = 1;

impl RedisKeyspace {
    pub async fn connect(url: &str, keys: Keys) -> Result<Self, ProjectionError> {
        Self::connect_to(redis::Client::open(url).map_err(unavailable)?, keys).await
    }

    async fn connect_to(client: redis::Client, keys: Keys) -> Result<Self, ProjectionError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let connection = client.get_connection_manager_with_config(config).await.map_err(unavailable)?;
        Ok(RedisKeyspace { client, connection, committer: Default::default(), keys, pubsub: Default::default() })
    }

    /// Records this build's schema version in a keyspace that has none.
    pub async fn migrate(&self) -> Result<(), ProjectionError> {
        let _: bool =
            self.connection.clone().set_nx(self.keys.schema_version(), SCHEMA_VERSION).await.map_err(unavailable)?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), ProjectionError> {
        redis::cmd("PING").query_async::<String>(&mut self.connection.clone()).await.map(|_| ()).map_err(unavailable)
    }
}

/// Adds `op` to `pipeline`.
fn push_op(pipeline: &mut redis::Pipeline, op: &Op) {
    match op {
        Op::ZAdd { key, score, member } => pipeline.zadd(key, member, score),
        Op::ZRem { key, member } => pipeline.zrem(key, member),
        Op::HSet { key, fields } => pipeline.hset_multiple(key, fields),
        Op::HDel { key, field } => pipeline.hdel(key, field),
        Op::Del { key } => pipeline.del(key),
        Op::SAdd { key, member } => pipeline.sadd(key, member),
        Op::SRem { key, member } => pipeline.srem(key, member),
    }
    .ignore();
}

impl RedisKeyspace {
    /// Runs the transaction of [`Keyspace::commit`] on `connection`.
    async fn transaction(
        &self,
        connection: &mut MultiplexedConnection,
        moves: &[Move],
        dead_lettered: u64,
        ops: &[Op],
    ) -> Result<(), ProjectionError> {
        let (progress, paused) = (self.keys.progress(), self.keys.paused());
        redis::cmd("WATCH").arg(&progress).arg(&paused).query_async::<()>(connection).await.map_err(unavailable)?;
        let fields: Vec<String> = moves.iter().map(|step| partition_key(&step.partition)).collect();
        let (is_paused, stored): (bool, Vec<Option<String>>) = redis::pipe()
            .exists(&paused)
            .cmd("HMGET")
            .arg(&progress)
            .arg(&fields)
            .query_async(connection)
            .await
            .map_err(unavailable)?;
        let refusal = if is_paused {
            Some(ProjectionError::Unavailable("paused for a replay to swap in its rebuild".into()))
        } else {
            moves.iter().zip(&stored).find_map(|(step, stored)| {
                let offset = stored.as_deref().and_then(|s| s.split(':').next()).and_then(|o| o.parse().ok());
                (offset != step.from).then(|| {
                    let key = partition_key(&step.partition);
                    ProjectionError::Moved(format!("{key} is at {offset:?}, not {:?}", step.from))
                })
            })
        };
        if let Some(refusal) = refusal {
            let _: Result<(), _> = redis::cmd("UNWATCH").query_async(connection).await;
            return Err(refusal);
        }
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        for op in ops {
            push_op(&mut pipeline, op);
        }
        for (field, step) in fields.iter().zip(moves) {
            pipeline.hset(&progress, field, format!("{}:{}", step.to.offset, step.to.watermark)).ignore();
        }
        if dead_lettered > 0 {
            pipeline.hincr(self.keys.totals(), "dead_lettered", dead_lettered).ignore();
        }
        pipeline.publish(PROGRESS_CHANNEL, "redis").ignore();
        // EXEC answers nil when a watched key changed since the WATCH.
        match pipeline.query_async::<Option<()>>(connection).await.map_err(unavailable)? {
            Some(()) => Ok(()),
            None => Err(ProjectionError::Moved("the progress or the pause changed during the commit".into())),
        }
    }
}

#[async_trait]
impl Keyspace for RedisKeyspace {
    async fn stored(&self) -> Result<Stored, ProjectionError> {
        let mut connection = self.connection.clone();
        let progress: HashMap<String, String> = connection.hgetall(self.keys.progress()).await.map_err(unavailable)?;
        let dead_lettered: Option<u64> =
            connection.hget(self.keys.totals(), "dead_lettered").await.map_err(unavailable)?;
        Ok(Stored { partitions: progress_of(&progress), dead_lettered: dead_lettered.unwrap_or(0) })
    }

    async fn commit(&self, moves: &[Move], dead_lettered: u64, ops: &[Op]) -> Result<(), ProjectionError> {
        let mut committer = self.committer.lock().await;
        if committer.is_none() {
            *committer = Some(connection(&self.client).await?);
        }
        let connection = committer.as_mut().expect("connected");
        let outcome = self.transaction(connection, moves, dead_lettered, ops).await;
        if matches!(outcome, Err(ProjectionError::Unavailable(_))) {
            *committer = None; // its WATCH or MULTI state is unknown: a fresh connection next time
        }
        outcome
    }

    async fn check_schema(&self) -> Result<(), ProjectionError> {
        let version: Option<u32> =
            self.connection.clone().get(self.keys.schema_version()).await.map_err(unavailable)?;
        match version.unwrap_or(1) {
            version if version < SCHEMA_VERSION => Err(crate::older_schema("redis", version, SCHEMA_VERSION)),
            _ => Ok(()),
        }
    }

    async fn changed(&self) {
        let waiting = async {
            let mut pubsub = self.pubsub.lock().await;
            if pubsub.is_none() {
                let mut fresh = self.client.get_async_pubsub().await.ok()?;
                fresh.subscribe(PROGRESS_CHANNEL).await.ok()?;
                *pubsub = Some(fresh);
            }
            let message = pubsub.as_mut()?.on_message().next().await;
            if message.is_none() {
                *pubsub = None; // the connection closed: subscribe again next time
            }
            Some(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), waiting).await;
    }

    async fn zcard(&self, key: &str) -> Result<u64, ProjectionError> {
        self.connection.clone().zcard(key).await.map_err(unavailable)
    }

    async fn zlast(&self, key: &str) -> Result<Option<String>, ProjectionError> {
        let last: Vec<String> = self.connection.clone().zrange(key, -1, -1).await.map_err(unavailable)?;
        Ok(last.into_iter().next())
    }

    async fn zcounts(&self, queries: &[(String, u64)]) -> Result<Vec<u64>, ProjectionError> {
        if queries.is_empty() {
            return Ok(vec![]);
        }
        let mut pipeline = redis::pipe();
        for (key, min) in queries {
            pipeline.zcount(key, format!("({min}"), "+inf");
        }
        pipeline.query_async(&mut self.connection.clone()).await.map_err(unavailable)
    }

    async fn hgetall(&self, key: &str) -> Result<HashMap<String, String>, ProjectionError> {
        self.connection.clone().hgetall(key).await.map_err(unavailable)
    }

    async fn smembers(&self, key: &str) -> Result<Vec<String>, ProjectionError> {
        self.connection.clone().smembers(key).await.map_err(unavailable)
    }
}

/// The live counters in the logical database of their URL, and a rebuild in another one
/// (`rebuild_db`) under the same key prefix. A swap is one SWAPDB, so the counters need their
/// logical database to themselves; it is refused (under WATCH) when the live progress moved
/// after the comparison.
pub struct RedisVersions {
    live: Arc<Counters>,
    client: redis::Client,
    keys: Keys,
    live_db: i64,
    rebuild_db: i64,
}

impl RedisVersions {
    pub fn new(live: Arc<Counters>, url: &str, keys: Keys, rebuild_db: i64) -> Result<Self, ProjectionError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let live_db = client.get_connection_info().redis_settings().db();
        if live_db == rebuild_db {
            return Err(ProjectionError::Unfit(format!(
                "the rebuild's logical database ({rebuild_db}) is the live one: choose another (redis_rebuild_db)"
            )));
        }
        Ok(RedisVersions { live, client, keys, live_db, rebuild_db })
    }

    fn rebuild_client(&self) -> Result<redis::Client, ProjectionError> {
        let info = self.client.get_connection_info().clone();
        let settings = info.redis_settings().clone().set_db(self.rebuild_db);
        redis::Client::open(info.set_redis_settings(settings)).map_err(unavailable)
    }
}

#[async_trait]
impl crate::replay::Versions for RedisVersions {
    fn live(&self) -> Model {
        model((*self.live).clone())
    }

    async fn rebuild(&self) -> Result<Model, ProjectionError> {
        // A swap moves whole databases and the old one is emptied: nothing else may be there.
        for (db, client) in [(self.live_db, self.client.clone()), (self.rebuild_db, self.rebuild_client()?)] {
            if let Some(key) = foreign_key(&client, &self.keys.prefix).await? {
                return Err(ProjectionError::Unfit(format!(
                    "the Redis logical database {db} holds `{key}`, outside the prefix `{}`: a replay swaps and \
                     empties whole databases, so the counters need two of their own (redis_url's and redis_rebuild_db)",
                    self.keys.prefix
                )));
            }
        }
        let keyspace = RedisKeyspace::connect_to(self.rebuild_client()?, self.keys.clone()).await?;
        keyspace.migrate().await?;
        Ok(model(Counters::new(Arc::new(keyspace), self.keys.clone())))
    }

    async fn discard(&self) -> Result<(), ProjectionError> {
        flush(&self.rebuild_client()?).await
    }

    async fn unpause(&self) -> Result<(), ProjectionError> {
        let mut connection = connection(&self.client).await?;
        connection.del(self.keys.paused()).await.map_err(unavailable)
    }

    async fn pause(&self) -> Result<Box<dyn crate::replay::Paused>, ProjectionError> {
        // A connection of its own: WATCH and SELECT belong to it.
        let mut connection = connection(&self.client).await?;
        // Every commit watches this key and refuses while it lives; it lapses if the replay dies.
        let _: () = connection.set_ex(self.keys.paused(), "replay", 60).await.map_err(unavailable)?;
        Ok(Box::new(PausedCounters {
            connection,
            keys: self.keys.clone(),
            live_db: self.live_db,
            rebuild_db: self.rebuild_db,
            rebuild: self.rebuild_client()?,
        }))
    }
}

/// The live counters, paused.
struct PausedCounters {
    connection: redis::aio::MultiplexedConnection,
    keys: Keys,
    live_db: i64,
    rebuild_db: i64,
    rebuild: redis::Client,
}

#[async_trait]
impl crate::replay::Paused for PausedCounters {
    async fn live(&mut self) -> Result<Stored, ProjectionError> {
        read_progress(&mut self.connection, &self.keys.progress()).await
    }

    async fn swap(&mut self, keep_old: bool) -> Result<(), crate::replay::SwapError> {
        let (progress, paused) = (self.keys.progress(), self.keys.paused());
        let connection = &mut self.connection;
        // Should the pause lapse, the live progress may move: then EXEC does nothing.
        redis::cmd("WATCH").arg(&progress).arg(&paused).query_async::<()>(connection).await.map_err(unavailable)?;
        let live = read_progress(connection, &progress).await?;
        redis::cmd("SELECT").arg(self.rebuild_db).query_async::<()>(connection).await.map_err(unavailable)?;
        let rebuilt = read_progress(connection, &progress).await?;
        redis::cmd("SELECT").arg(self.live_db).query_async::<()>(connection).await.map_err(unavailable)?;
        if let Some(partition) = crate::replay::behind(&live, &rebuilt) {
            let _: () = redis::cmd("UNWATCH").query_async(connection).await.map_err(unavailable)?;
            return Err(crate::replay::SwapError::Behind(partition_key(&partition)));
        }
        // EXEC answers nil when a watched key changed. The pause key goes with the old version.
        let swapped: Option<(String, i64)> = redis::pipe()
            .atomic()
            .cmd("SWAPDB")
            .arg(self.live_db)
            .arg(self.rebuild_db)
            .cmd("PUBLISH")
            .arg(PROGRESS_CHANNEL)
            .arg("redis")
            .query_async(connection)
            .await
            .map_err(unavailable)?;
        if swapped.is_none() {
            return Err(crate::replay::SwapError::Behind("the live progress moved during the swap".into()));
        }
        if !keep_old && let Err(error) = flush(&self.rebuild).await {
            tracing::warn!(%error, db = self.rebuild_db, "swapped; the old version is left to empty by hand");
        }
        Ok(())
    }

    async fn resume(mut self: Box<Self>) {
        let _: Result<(), _> = self.connection.del(self.keys.paused()).await;
    }
}

/// A key of the database `client` names that is not under `prefix`, if there is one.
async fn foreign_key(client: &redis::Client, prefix: &str) -> Result<Option<String>, ProjectionError> {
    let mut connection = connection(client).await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        if let Some(key) = keys.into_iter().find(|key| !key.starts_with(prefix)) {
            return Ok(Some(key));
        }
        if next == 0 {
            return Ok(None);
        }
        cursor = next;
    }
}

/// A connection of its own to `client`'s database, with the same bounds as the shared one
/// (a batch's transaction may take a while to answer).
async fn connection(client: &redis::Client) -> Result<MultiplexedConnection, ProjectionError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client.get_multiplexed_async_connection_with_config(&config).await.map_err(unavailable)
}

async fn flush(client: &redis::Client) -> Result<(), ProjectionError> {
    let mut connection = connection(client).await?;
    redis::cmd("FLUSHDB").arg("ASYNC").query_async::<()>(&mut connection).await.map_err(unavailable)
}

fn model(counters: Counters) -> Model {
    Model { projector: Arc::new(counters.clone()), contents: Arc::new(CountersContents(counters)) }
}

async fn read_progress(
    connection: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Result<Stored, ProjectionError> {
    let progress: HashMap<String, String> = connection.hgetall(key).await.map_err(unavailable)?;
    Ok(Stored { partitions: progress_of(&progress), dead_lettered: 0 })
}

fn progress_of(progress: &HashMap<String, String>) -> HashMap<quikapp_bus::Partition, Progress> {
    progress
        .iter()
        .filter_map(|(key, value)| {
            let (offset, watermark) = value.split_once(':')?;
            Some((
                parse_partition_key(key)?,
                Progress { offset: offset.parse().ok()?, watermark: watermark.parse().ok()? },
            ))
        })
        .collect()
}
