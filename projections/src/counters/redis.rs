//! The counters on Redis. A batch is one Lua script, which Redis runs atomically: it compares
//! the stored offsets with the batch's moves, runs every write, stores the new progress and
//! PUBLISHes it for the read APIs. One round trip per batch, whatever its size.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, PubSub};

use super::{Keys, Keyspace, Op};
use crate::{Move, Progress, ProjectionError, Stored, parse_partition_key, partition_key};

/// The pub/sub channel stored progress is announced on.
pub const PROGRESS_CHANNEL: &str = "quikapp:projection:redis";

/// KEYS: progress hash, totals hash. ARGV, flat (no JSON to build or decode): the channel to
/// announce on, the dead letters to count, the number of moves, each move as (partition, the
/// offset it starts after or "", "offset:watermark"), then the operations, each its name and
/// its arguments (`hset` gives its field count first). Offsets travel as decimal strings: Lua
/// numbers are doubles.
const COMMIT: &str = r#"
local moves = tonumber(ARGV[3])
for i = 4, 3 + moves * 3, 3 do
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  local offset = stored and string.match(stored, '^(%d+)') or ''
  if offset ~= ARGV[i + 1] then
    return redis.error_reply('QUIKMOVED ' .. ARGV[i] .. ' is at "' .. offset .. '", not "' .. ARGV[i + 1] .. '"')
  end
end
local i = 4 + moves * 3
while i <= #ARGV do
  local kind = ARGV[i]
  if kind == 'zadd' then redis.call('ZADD', ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]); i = i + 4
  elseif kind == 'zrem' then redis.call('ZREM', ARGV[i + 1], ARGV[i + 2]); i = i + 3
  elseif kind == 'hset' then
    local fields = tonumber(ARGV[i + 2])
    redis.call('HSET', ARGV[i + 1], unpack(ARGV, i + 3, i + 2 + fields * 2)); i = i + 3 + fields * 2
  elseif kind == 'hdel' then redis.call('HDEL', ARGV[i + 1], ARGV[i + 2]); i = i + 3
  elseif kind == 'del' then redis.call('DEL', ARGV[i + 1]); i = i + 2
  elseif kind == 'sadd' then redis.call('SADD', ARGV[i + 1], ARGV[i + 2]); i = i + 3
  elseif kind == 'srem' then redis.call('SREM', ARGV[i + 1], ARGV[i + 2]); i = i + 3
  else return redis.error_reply('QUIKOP unknown operation ' .. tostring(kind)) end
end
for i = 4, 3 + moves * 3, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
end
if ARGV[2] ~= '0' then redis.call('HINCRBY', KEYS[2], 'dead_lettered', ARGV[2]) end
redis.call('PUBLISH', ARGV[1], 'redis')
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

/// Adds `op` to the script's arguments.
fn push_op(invocation: &mut redis::ScriptInvocation<'_>, op: &Op) {
    match op {
        Op::ZAdd { key, score, member } => invocation.arg("zadd").arg(key).arg(score).arg(member),
        Op::ZRem { key, member } => invocation.arg("zrem").arg(key).arg(member),
        Op::HSet { key, fields } => {
            invocation.arg("hset").arg(key).arg(fields.len());
            fields.iter().fold(invocation, |invocation, (field, value)| invocation.arg(field).arg(value))
        }
        Op::HDel { key, field } => invocation.arg("hdel").arg(key).arg(field),
        Op::Del { key } => invocation.arg("del").arg(key),
        Op::SAdd { key, member } => invocation.arg("sadd").arg(key).arg(member),
        Op::SRem { key, member } => invocation.arg("srem").arg(key).arg(member),
    };
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
        let mut invocation = self.script.prepare_invoke();
        invocation.key(self.keys.progress()).key(self.keys.totals());
        invocation.arg(PROGRESS_CHANNEL).arg(dead_lettered).arg(moves.len());
        for step in moves {
            let from = step.from.map_or(String::new(), |offset| offset.to_string());
            invocation
                .arg(partition_key(&step.partition))
                .arg(from)
                .arg(format!("{}:{}", step.to.offset, step.to.watermark));
        }
        for op in ops {
            push_op(&mut invocation, op);
        }
        invocation.invoke_async::<i64>(&mut self.connection.clone()).await.map(|_| ()).map_err(unavailable)
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
