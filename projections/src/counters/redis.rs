//! The counters on Redis. A batch is one Lua script, which Redis runs atomically: it compares
//! the stored offsets with the batch's moves, runs every write, stores the new progress and
//! PUBLISHes it for the read APIs. One round trip per batch, whatever its size.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, PubSub};
use serde_json::{Value, json};

use super::{Keys, Keyspace, Op};
use crate::{Move, Progress, ProjectionError, Stored, parse_partition_key, partition_key};

/// The pub/sub channel stored progress is announced on.
pub const PROGRESS_CHANNEL: &str = "quikapp:projection:redis";

/// KEYS: progress hash, totals hash. ARGV: the batch as JSON, the channel to announce on.
/// Offsets travel as decimal strings: Lua numbers are doubles.
const COMMIT: &str = r#"
local batch = cjson.decode(ARGV[1])
for _, move in ipairs(batch.moves) do
  local stored = redis.call('HGET', KEYS[1], move[1])
  local offset = stored and string.match(stored, '^(%d+)') or ''
  if offset ~= move[2] then
    return redis.error_reply('QUIKMOVED ' .. move[1] .. ' is at "' .. offset .. '", not "' .. move[2] .. '"')
  end
end
for _, op in ipairs(batch.ops) do
  local kind = op[1]
  if kind == 'zadd' then redis.call('ZADD', op[2], op[3], op[4])
  elseif kind == 'zrem' then redis.call('ZREM', op[2], op[3])
  elseif kind == 'hset' then redis.call('HSET', op[2], unpack(op[3]))
  elseif kind == 'hdel' then redis.call('HDEL', op[2], op[3])
  elseif kind == 'del' then redis.call('DEL', op[2])
  elseif kind == 'sadd' then redis.call('SADD', op[2], op[3])
  elseif kind == 'srem' then redis.call('SREM', op[2], op[3])
  else return redis.error_reply('QUIKOP unknown operation ' .. tostring(kind)) end
end
for _, move in ipairs(batch.moves) do
  redis.call('HSET', KEYS[1], move[1], move[3])
end
if batch.dead ~= '0' then redis.call('HINCRBY', KEYS[2], 'dead_lettered', batch.dead) end
redis.call('PUBLISH', ARGV[2], 'redis')
return 1
"#;

pub struct RedisKeyspace {
    client: redis::Client,
    connection: ConnectionManager,
    keys: Keys,
    script: redis::Script,
    pubsub: tokio::sync::Mutex<Option<PubSub>>,
}

/// The script's refusal on moved offsets; a key of the wrong type or an unknown operation is
/// the batch's fault; anything else (connection, timeout, a server loading or out of memory)
/// may pass.
fn unavailable(error: redis::RedisError) -> ProjectionError {
    match error.code() {
        Some("QUIKMOVED") => ProjectionError::Moved(error.to_string()),
        Some("WRONGTYPE" | "QUIKOP") => ProjectionError::Rejected(error.to_string()),
        _ => ProjectionError::Unavailable(error.to_string()),
    }
}

impl RedisKeyspace {
    pub async fn connect(url: &str, keys: Keys) -> Result<Self, ProjectionError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let connection = client.get_connection_manager_with_config(config).await.map_err(unavailable)?;
        Ok(RedisKeyspace { client, connection, keys, script: redis::Script::new(COMMIT), pubsub: Default::default() })
    }

    pub async fn ping(&self) -> Result<(), ProjectionError> {
        redis::cmd("PING").query_async::<String>(&mut self.connection.clone()).await.map(|_| ()).map_err(unavailable)
    }
}

fn op_json(op: &Op) -> Value {
    match op {
        Op::ZAdd { key, score, member } => json!(["zadd", key, score.to_string(), member]),
        Op::ZRem { key, member } => json!(["zrem", key, member]),
        Op::HSet { key, fields } => {
            json!(["hset", key, fields.iter().flat_map(|(f, v)| [f.as_str(), v.as_str()]).collect::<Vec<_>>()])
        }
        Op::HDel { key, field } => json!(["hdel", key, field]),
        Op::Del { key } => json!(["del", key]),
        Op::SAdd { key, member } => json!(["sadd", key, member]),
        Op::SRem { key, member } => json!(["srem", key, member]),
    }
}

#[async_trait]
impl Keyspace for RedisKeyspace {
    async fn stored(&self) -> Result<Stored, ProjectionError> {
        let mut connection = self.connection.clone();
        let progress: HashMap<String, String> = connection.hgetall(self.keys.progress()).await.map_err(unavailable)?;
        let dead_lettered: Option<u64> =
            connection.hget(self.keys.totals(), "dead_lettered").await.map_err(unavailable)?;
        let partitions = progress
            .iter()
            .filter_map(|(key, value)| {
                let (offset, watermark) = value.split_once(':')?;
                Some((
                    parse_partition_key(key)?,
                    Progress { offset: offset.parse().ok()?, watermark: watermark.parse().ok()? },
                ))
            })
            .collect();
        Ok(Stored { partitions, dead_lettered: dead_lettered.unwrap_or(0) })
    }

    async fn commit(&self, moves: &[Move], dead_lettered: u64, ops: &[Op]) -> Result<(), ProjectionError> {
        let moves: Vec<Value> = moves
            .iter()
            .map(|m| {
                let from = m.from.map_or(String::new(), |offset| offset.to_string());
                json!([partition_key(&m.partition), from, format!("{}:{}", m.to.offset, m.to.watermark)])
            })
            .collect();
        let batch = json!({ "moves": moves, "dead": dead_lettered.to_string(), "ops": ops.iter().map(op_json).collect::<Vec<_>>() });
        self.script
            .key(self.keys.progress())
            .key(self.keys.totals())
            .arg(batch.to_string())
            .arg(PROGRESS_CHANNEL)
            .invoke_async::<i64>(&mut self.connection.clone())
            .await
            .map(|_| ())
            .map_err(unavailable)
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
