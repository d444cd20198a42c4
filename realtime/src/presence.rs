//! Presence: a user is online while at least one of their streams is open, on any instance.
//!
//! Kept in Redis so that every gateway instance and the read API share it (in one process,
//! [`MemoryPresence`]). Under the key prefix:
//! - `presence:conns:{user}`: the user's open connections (`{instance}:{id}`), each scored by
//!   when it lapses (ms); each instance renews its own every third of the TTL.
//! - `presence:users`: the users announced online, scored by when their last connection lapses.
//!   A user enters it with their first connection (announced online) and leaves it, by the
//!   script [`CLAIM_OFFLINE`], once no connection of theirs is left (announced offline, once).
//! - `presence:ws:{workspace}`: the workspace's users with a connection, scored the same way;
//!   GET /v1/workspaces/{ws}/presence reads it.
//! - `presence:of:{user}`: the workspaces the user was announced in.
//!
//! An instance that dies stops renewing: its connections lapse within the TTL, and the next
//! sweep of any instance (every third of the TTL) announces their users offline.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::fanout::{Fanout, Item, Slice};

#[derive(Debug, thiserror::Error)]
#[error("presence is unavailable: {0}")]
pub struct PresenceError(String);

#[async_trait]
pub trait Presence: Send + Sync {
    /// Connection `id` of `user`, a member of `workspaces`, opened.
    async fn opened(&self, id: u64, user: Uuid, workspaces: &[Uuid]) -> Result<(), PresenceError>;
    /// Connection `id` of `user` has seen them join `workspace`: they are present there too.
    async fn joined(&self, id: u64, user: Uuid, workspace: Uuid) -> Result<(), PresenceError>;
    /// Connection `id` of `user` closed.
    async fn closed(&self, id: u64, user: Uuid) -> Result<(), PresenceError>;
    /// Renews this instance's connections and announces the users whose connections all lapsed
    /// (their instance died); called every [`Presence::every`].
    async fn tick(&self) -> Result<(), PresenceError>;
    fn every(&self) -> Duration;
    /// The users of `workspace` with an open connection.
    async fn online(&self, workspace: Uuid) -> Result<Vec<Uuid>, PresenceError>;
}

/// Publishes that `user` came online or went offline in `workspaces`.
async fn announce(fanout: &Option<Arc<dyn Fanout>>, user: Uuid, workspaces: &[Uuid], online: bool) {
    let Some(fanout) = fanout else { return };
    let records =
        workspaces.iter().map(|workspace| Item::Presence { workspace_id: *workspace, user_id: user, online }).collect();
    if let Err(error) = fanout.publish(&Slice { records }).await {
        tracing::warn!(%error, %user, online, "cannot announce a presence");
    }
}

// ------------------------------------------------------------------ Redis

pub struct RedisPresence {
    connection: redis::aio::MultiplexedConnection,
    prefix: String,
    instance: Uuid,
    ttl: Duration,
    /// Where announcements go; none for a reader (the read API).
    fanout: Option<Arc<dyn Fanout>>,
    /// This instance's open connections: id → (user, workspaces).
    local: Mutex<HashMap<u64, (Uuid, Vec<Uuid>)>>,
}

/// Removes `user` from the users announced online if no connection of theirs is left, and from
/// their workspaces' sets; answers those workspaces when it did (the caller announces them
/// offline there), nothing otherwise. One script, so that a connection opening meanwhile
/// either keeps the user online or comes after.
const CLAIM_OFFLINE: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) > 0 then return {} end
if redis.call('ZREM', KEYS[2], ARGV[2]) == 0 then return {} end
local workspaces = redis.call('SMEMBERS', KEYS[3])
for _, workspace in ipairs(workspaces) do
    redis.call('ZREM', ARGV[3] .. workspace, ARGV[2])
end
redis.call('DEL', KEYS[3])
return workspaces
";

fn failed(error: redis::RedisError) -> PresenceError {
    PresenceError(error.to_string())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl RedisPresence {
    pub async fn connect(
        url: &str,
        db: i64,
        prefix: String,
        ttl: Duration,
        fanout: Option<Arc<dyn Fanout>>,
    ) -> Result<Self, PresenceError> {
        let client = crate::fanout::redis_client(url, db).map_err(failed)?;
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
        let connection = client.get_multiplexed_async_connection_with_config(&config).await.map_err(failed)?;
        Ok(RedisPresence { connection, prefix, instance: Uuid::now_v7(), ttl, fanout, local: Mutex::default() })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}presence:{rest}", self.prefix)
    }

    fn member(&self, id: u64) -> String {
        format!("{}:{id}", self.instance)
    }

    /// Marks the connections alive for another TTL in their workspaces; answers each user to
    /// announce online with the workspaces to announce them in: all of their connection's if they
    /// were not announced online (new, or a sweep took them meanwhile), else those they were not
    /// present in yet (joined since). A connection that closed while this ran (renewed after its
    /// end) is taken out again.
    async fn renew(&self, connections: &[(u64, Uuid, Vec<Uuid>)]) -> Result<Vec<(Uuid, Vec<Uuid>)>, PresenceError> {
        let lapses = now_ms() + self.ttl.as_millis() as i64;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (id, user, workspaces) in connections {
            pipe.zadd(self.key(&format!("conns:{user}")), self.member(*id), lapses).ignore();
            pipe.cmd("ZADD").arg(self.key("users")).arg("GT").arg(lapses).arg(user.to_string());
            for workspace in workspaces {
                let key = self.key(&format!("ws:{workspace}"));
                pipe.cmd("ZADD").arg(key).arg("GT").arg(lapses).arg(user.to_string());
                pipe.sadd(self.key(&format!("of:{user}")), workspace.to_string()).ignore();
            }
        }
        // Per connection: whether the user was added, then whether to each workspace.
        let mut added = pipe.query_async::<Vec<i64>>(&mut self.connection.clone()).await.map_err(failed)?.into_iter();
        let mut online = Vec::new();
        for (id, user, workspaces) in connections {
            let user_added = added.next() == Some(1);
            let added_to: Vec<Uuid> =
                workspaces.iter().zip(added.by_ref()).filter(|(_, added)| *added == 1).map(|(w, _)| *w).collect();
            let open = self.local.lock().expect("not poisoned").contains_key(id);
            if !open {
                let conns = self.key(&format!("conns:{user}"));
                let _: i64 = redis::cmd("ZREM")
                    .arg(conns)
                    .arg(self.member(*id))
                    .query_async(&mut self.connection.clone())
                    .await
                    .map_err(failed)?;
                if user_added {
                    self.claim_offline(*user).await?; // announced offline by its close already
                }
            } else if user_added {
                online.push((*user, workspaces.clone()));
            } else if !added_to.is_empty() {
                online.push((*user, added_to));
            }
        }
        Ok(online)
    }

    /// Takes `user` offline if no connection of theirs is left; answers the workspaces to
    /// announce it in.
    async fn claim_offline(&self, user: Uuid) -> Result<Vec<Uuid>, PresenceError> {
        let workspaces: Vec<String> = redis::Script::new(CLAIM_OFFLINE)
            .key(self.key(&format!("conns:{user}")))
            .key(self.key("users"))
            .key(self.key(&format!("of:{user}")))
            .arg(now_ms())
            .arg(user.to_string())
            .arg(self.key("ws:"))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(failed)?;
        Ok(workspaces.iter().filter_map(|w| w.parse().ok()).collect())
    }

    /// Takes `user` offline if no connection of theirs is left, and announces it.
    async fn offline_if_gone(&self, user: Uuid) -> Result<(), PresenceError> {
        let workspaces = self.claim_offline(user).await?;
        if !workspaces.is_empty() {
            announce(&self.fanout, user, &workspaces, false).await;
        }
        Ok(())
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn opened(&self, id: u64, user: Uuid, workspaces: &[Uuid]) -> Result<(), PresenceError> {
        self.local.lock().expect("not poisoned").insert(id, (user, workspaces.to_vec()));
        for (user, workspaces) in self.renew(&[(id, user, workspaces.to_vec())]).await? {
            announce(&self.fanout, user, &workspaces, true).await;
        }
        Ok(())
    }

    async fn joined(&self, id: u64, user: Uuid, workspace: Uuid) -> Result<(), PresenceError> {
        {
            let mut local = self.local.lock().expect("not poisoned");
            let Some((_, workspaces)) = local.get_mut(&id) else { return Ok(()) };
            if workspaces.contains(&workspace) {
                return Ok(());
            }
            workspaces.push(workspace);
        }
        for (user, workspaces) in self.renew(&[(id, user, vec![workspace])]).await? {
            announce(&self.fanout, user, &workspaces, true).await;
        }
        Ok(())
    }

    async fn closed(&self, id: u64, user: Uuid) -> Result<(), PresenceError> {
        self.local.lock().expect("not poisoned").remove(&id);
        let conns = self.key(&format!("conns:{user}"));
        let () = redis::cmd("ZREM")
            .arg(conns)
            .arg(self.member(id))
            .query_async::<i64>(&mut self.connection.clone())
            .await
            .map(|_| ())
            .map_err(failed)?;
        self.offline_if_gone(user).await
    }

    async fn tick(&self) -> Result<(), PresenceError> {
        let local: Vec<(u64, Uuid, Vec<Uuid>)> = self
            .local
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(id, (user, workspaces))| (*id, *user, workspaces.clone()))
            .collect();
        for chunk in local.chunks(1_000) {
            for (user, workspaces) in self.renew(chunk).await? {
                announce(&self.fanout, user, &workspaces, true).await;
            }
        }
        // Users of instances that died, a thousand at a time, for at most a third of the TTL.
        let until = std::time::Instant::now() + self.ttl / 3;
        while std::time::Instant::now() < until {
            let lapsed: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.key("users"))
                .arg("-inf")
                .arg(now_ms())
                .arg("LIMIT")
                .arg(0)
                .arg(1_000)
                .query_async(&mut self.connection.clone())
                .await
                .map_err(failed)?;
            if lapsed.is_empty() {
                break;
            }
            for user in lapsed.iter().filter_map(|user| user.parse().ok()) {
                self.offline_if_gone(user).await?;
            }
        }
        Ok(())
    }

    fn every(&self) -> Duration {
        self.ttl / 3
    }

    async fn online(&self, workspace: Uuid) -> Result<Vec<Uuid>, PresenceError> {
        let users: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.key(&format!("ws:{workspace}")))
            .arg(now_ms())
            .arg("+inf")
            .query_async(&mut self.connection.clone())
            .await
            .map_err(failed)?;
        let mut users: Vec<Uuid> = users.iter().filter_map(|user| user.parse().ok()).collect();
        users.sort();
        Ok(users)
    }
}

// ------------------------------------------------------------------ in process

/// A user's open connections and workspaces.
type Online = (HashSet<u64>, Vec<Uuid>);

/// Presence in one process (`quikapp dev`): nothing lapses, every close is seen.
pub struct MemoryPresence {
    fanout: Option<Arc<dyn Fanout>>,
    users: Mutex<HashMap<Uuid, Online>>,
}

impl MemoryPresence {
    pub fn new(fanout: Option<Arc<dyn Fanout>>) -> Self {
        MemoryPresence { fanout, users: Mutex::default() }
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn opened(&self, id: u64, user: Uuid, workspaces: &[Uuid]) -> Result<(), PresenceError> {
        let new = {
            let mut users = self.users.lock().expect("not poisoned");
            let (connections, present) = users.entry(user).or_default();
            connections.insert(id);
            let new: Vec<Uuid> = workspaces.iter().filter(|w| !present.contains(w)).copied().collect();
            present.extend(&new);
            new
        };
        if !new.is_empty() {
            announce(&self.fanout, user, &new, true).await;
        }
        Ok(())
    }

    async fn joined(&self, id: u64, user: Uuid, workspace: Uuid) -> Result<(), PresenceError> {
        let new = {
            let mut users = self.users.lock().expect("not poisoned");
            match users.get_mut(&user) {
                Some((connections, present)) if connections.contains(&id) && !present.contains(&workspace) => {
                    present.push(workspace);
                    true
                }
                _ => false,
            }
        };
        if new {
            announce(&self.fanout, user, &[workspace], true).await;
        }
        Ok(())
    }

    async fn closed(&self, id: u64, user: Uuid) -> Result<(), PresenceError> {
        let gone = {
            let mut users = self.users.lock().expect("not poisoned");
            let Some((connections, _)) = users.get_mut(&user) else { return Ok(()) };
            connections.remove(&id);
            if connections.is_empty() { users.remove(&user).map(|(_, workspaces)| workspaces) } else { None }
        };
        if let Some(workspaces) = gone {
            announce(&self.fanout, user, &workspaces, false).await;
        }
        Ok(())
    }

    async fn tick(&self) -> Result<(), PresenceError> {
        Ok(())
    }

    fn every(&self) -> Duration {
        Duration::from_secs(3600)
    }

    async fn online(&self, workspace: Uuid) -> Result<Vec<Uuid>, PresenceError> {
        let users = self.users.lock().expect("not poisoned");
        let mut online: Vec<Uuid> = users
            .iter()
            .filter(|(_, (_, workspaces))| workspaces.contains(&workspace))
            .map(|(user, _)| *user)
            .collect();
        online.sort();
        Ok(online)
    }
}
