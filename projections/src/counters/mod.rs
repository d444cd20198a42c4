//! Unread counts and channel stats (API.md: GET /users/me/unread, GET /channels/{ch}/stats),
//! kept as Redis keeps them: sorted sets of message ids by position, so that every figure is a
//! count over a range, computed when read, and every write is a set operation.
//!
//! - `ch:{c}:all`: the channel's messages and replies that are not deleted: `message_count` is
//!   its size and the last message its highest member.
//! - `ch:{c}:top` and `ch:{c}:top:{u}`: top-level messages not deleted, all and by author `u`.
//!   A member's unread count is those of `top` after their read mark, less their own.
//! - `msg:{m}`: author, preview and time of a message not deleted.
//! - `user:{u}:channels` (a set) and `user:{u}:marks` (channel → position of the read mark:
//!   set at the join, moved by each ChannelReadMarked, dropped at a leave).
//!
//! [`ops_of`] turns events into these writes, once for every store: [`redis::RedisKeyspace`]
//! runs them with the batch's progress in one transaction, [`memory::MemoryKeyspace`] (the
//! embedded default) applies them to maps under one lock.

pub mod memory;
pub mod redis;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use quikapp_domain::{Envelope, Event};
use serde::Serialize;
use uuid::Uuid;

use crate::{Batch, Move, ProjectionError, Projector, Stored};

/// Characters of a message's text kept as its preview.
pub const PREVIEW_CHARS: usize = 100;

/// One write to the keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    ZAdd { key: String, score: u64, member: String },
    ZRem { key: String, member: String },
    HSet { key: String, fields: Vec<(String, String)> },
    HDel { key: String, field: String },
    Del { key: String },
    SAdd { key: String, member: String },
    SRem { key: String, member: String },
}

/// A Redis-like store of sorted sets, hashes and sets, with the progress of the model.
#[async_trait]
pub trait Keyspace: Send + Sync {
    async fn stored(&self) -> Result<Stored, ProjectionError>;
    /// Runs `ops` and stores `moves` and `dead_lettered` in one atomic step, refused with
    /// [`ProjectionError::Moved`] (writing nothing) unless every move's `from` is stored.
    async fn commit(&self, moves: &[Move], dead_lettered: u64, ops: &[Op]) -> Result<(), ProjectionError>;
    /// Resolves when the progress may have changed, or after a second.
    async fn changed(&self);
    /// See [`Projector::check_schema`]; a keyspace in memory has nothing stored to refuse.
    async fn check_schema(&self) -> Result<(), ProjectionError> {
        Ok(())
    }

    async fn zcard(&self, key: &str) -> Result<u64, ProjectionError>;
    /// The member with the highest score.
    async fn zlast(&self, key: &str) -> Result<Option<String>, ProjectionError>;
    /// For each (key, min): members scored above `min`.
    async fn zcounts(&self, queries: &[(String, u64)]) -> Result<Vec<u64>, ProjectionError>;
    async fn hgetall(&self, key: &str) -> Result<HashMap<String, String>, ProjectionError>;
    async fn smembers(&self, key: &str) -> Result<Vec<String>, ProjectionError>;
}

/// Key names, all under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    pub prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys { prefix: "quikapp:".into() }
    }
}

impl Keys {
    fn all(&self, channel: Uuid) -> String {
        format!("{}ch:{channel}:all", self.prefix)
    }
    fn top(&self, channel: Uuid) -> String {
        format!("{}ch:{channel}:top", self.prefix)
    }
    fn top_by(&self, channel: Uuid, author: Uuid) -> String {
        format!("{}ch:{channel}:top:{author}", self.prefix)
    }
    fn message(&self, message: Uuid) -> String {
        format!("{}msg:{message}", self.prefix)
    }
    fn channels_of(&self, user: Uuid) -> String {
        format!("{}user:{user}:channels", self.prefix)
    }
    fn marks_of(&self, user: Uuid) -> String {
        format!("{}user:{user}:marks", self.prefix)
    }
    pub fn progress(&self) -> String {
        format!("{}progress", self.prefix)
    }
    pub fn totals(&self) -> String {
        format!("{}totals", self.prefix)
    }
    pub fn paused(&self) -> String {
        format!("{}paused", self.prefix)
    }
    pub fn schema_version(&self) -> String {
        format!("{}schema_version", self.prefix)
    }
}

/// The writes that apply `events`, in order.
pub fn ops_of(keys: &Keys, events: &[Envelope]) -> Vec<Op> {
    let mut ops = Vec::new();
    for envelope in events {
        match &envelope.event {
            Event::MessagePosted(e) => {
                let (score, member) = (envelope.global_position, e.message_id.to_string());
                ops.push(Op::ZAdd { key: keys.all(e.channel_id), score, member: member.clone() });
                if e.thread_root_id.is_none() {
                    ops.push(Op::ZAdd { key: keys.top(e.channel_id), score, member: member.clone() });
                    ops.push(Op::ZAdd { key: keys.top_by(e.channel_id, e.author_id), score, member });
                }
                ops.push(Op::HSet {
                    key: keys.message(e.message_id),
                    fields: vec![
                        ("author_id".into(), e.author_id.to_string()),
                        ("preview".into(), preview(&e.text)),
                        ("posted_at".into(), quikapp_domain::event::timestamp::format(&envelope.occurred_at)),
                    ],
                });
            }
            Event::MessageEdited(e) => ops
                .push(Op::HSet { key: keys.message(e.message_id), fields: vec![("preview".into(), preview(&e.text))] }),
            Event::MessageDeleted(e) => {
                let member = e.message_id.to_string();
                ops.push(Op::ZRem { key: keys.all(e.channel_id), member: member.clone() });
                ops.push(Op::ZRem { key: keys.top(e.channel_id), member: member.clone() });
                ops.push(Op::ZRem { key: keys.top_by(e.channel_id, e.author_id), member });
                ops.push(Op::Del { key: keys.message(e.message_id) });
            }
            Event::ChannelMemberJoined(e) => {
                ops.push(Op::SAdd { key: keys.channels_of(e.user_id), member: e.channel_id.to_string() });
                // What was posted before the member joined is not unread to them.
                ops.push(Op::HSet {
                    key: keys.marks_of(e.user_id),
                    fields: vec![(e.channel_id.to_string(), envelope.global_position.to_string())],
                });
            }
            Event::ChannelMemberLeft(e) => {
                ops.push(Op::SRem { key: keys.channels_of(e.user_id), member: e.channel_id.to_string() });
                ops.push(Op::HDel { key: keys.marks_of(e.user_id), field: e.channel_id.to_string() });
            }
            Event::ChannelReadMarked(e) => ops.push(Op::HSet {
                key: keys.marks_of(e.user_id),
                fields: vec![(e.channel_id.to_string(), e.message_position.to_string())],
            }),
            Event::UserProfileUpdated(_)
            | Event::WorkspaceCreated(_)
            | Event::WorkspaceMemberAdded(_)
            | Event::ChannelCreated(_)
            | Event::ChannelRenamed(_)
            | Event::ChannelTopicChanged(_)
            | Event::ChannelArchived(_)
            | Event::ReactionAdded(_)
            | Event::ReactionRemoved(_) => {}
        }
    }
    ops
}

fn preview(text: &str) -> String {
    text.chars().take(PREVIEW_CHARS).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LastMessage {
    pub message_id: Uuid,
    pub author_id: Uuid,
    pub preview: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ChannelStats {
    pub channel_id: Uuid,
    pub message_count: u64,
    /// RFC 3339, as stored.
    pub last_message_at: Option<String>,
    pub last_message: Option<LastMessage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Unread {
    pub channel_id: Uuid,
    pub unread: u64,
}

/// The model: its projector and its reads, over a [`Keyspace`].
#[derive(Clone)]
pub struct Counters {
    keyspace: Arc<dyn Keyspace>,
    keys: Keys,
}

impl Counters {
    pub fn new(keyspace: Arc<dyn Keyspace>, keys: Keys) -> Self {
        Counters { keyspace, keys }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub async fn stats(&self, channel_id: Uuid) -> Result<ChannelStats, ProjectionError> {
        let all = self.keys.all(channel_id);
        let message_count = self.keyspace.zcard(&all).await?;
        let last = match self.keyspace.zlast(&all).await? {
            Some(id) => {
                let fields = self.keyspace.hgetall(&self.keys.message(id.parse().unwrap_or_default())).await?;
                let author = fields.get("author_id").and_then(|a| a.parse().ok());
                match (id.parse(), author) {
                    (Ok(message_id), Some(author_id)) => Some((
                        LastMessage { message_id, author_id, preview: fields["preview"].clone() },
                        fields.get("posted_at").cloned(),
                    )),
                    _ => None,
                }
            }
            None => None,
        };
        let (last_message, last_message_at) = last.map_or((None, None), |(m, at)| (Some(m), at));
        Ok(ChannelStats { channel_id, message_count, last_message_at, last_message })
    }

    /// Every channel `user_id` is a member of, with its unread count, by channel id.
    pub async fn unread(&self, user_id: Uuid) -> Result<Vec<Unread>, ProjectionError> {
        let mut channels: Vec<Uuid> = self
            .keyspace
            .smembers(&self.keys.channels_of(user_id))
            .await?
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        channels.sort();
        let marks = self.keyspace.hgetall(&self.keys.marks_of(user_id)).await?;
        let queries: Vec<(String, u64)> = channels
            .iter()
            .flat_map(|channel| {
                let mark = marks.get(&channel.to_string()).and_then(|m| m.parse().ok()).unwrap_or(0);
                [(self.keys.top(*channel), mark), (self.keys.top_by(*channel, user_id), mark)]
            })
            .collect();
        let counts = self.keyspace.zcounts(&queries).await?;
        Ok(channels
            .iter()
            .zip(counts.chunks(2))
            .map(|(channel, pair)| Unread { channel_id: *channel, unread: pair[0].saturating_sub(pair[1]) })
            .collect())
    }
}

#[async_trait]
impl Projector for Counters {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn stored(&self) -> Result<Stored, ProjectionError> {
        self.keyspace.stored().await
    }

    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        self.keyspace.commit(&batch.moves, batch.dead_lettered, &ops_of(&self.keys, &batch.events)).await
    }

    async fn changed(&self) {
        self.keyspace.changed().await
    }

    async fn check_schema(&self) -> Result<(), ProjectionError> {
        self.keyspace.check_schema().await
    }
}
