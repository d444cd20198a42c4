//! Message timelines and threads (API.md: GET /channels/{ch}/messages, .../{msg}, .../replies):
//! one document per message, on MongoDB or in memory for the embedded default.
//!
//! MongoDB here may be FerretDB, which has no transactions, so this model does not store its
//! progress atomically with its effects. Its writes are idempotent instead: [`ops_of`] turns
//! events into writes that each store applies as they say:
//! - a message is inserted at version 1, and an insert of one already there changes nothing;
//! - every later change to a message applies only while its stored version is below the
//!   event's, and sets it (a replayed or reordered event changes nothing);
//! - a thread root keeps the set of its replies not deleted (added when a reply is posted,
//!   removed when it is deleted), so replaying the events of a batch again in order ends the same.
//!
//! The progress (offsets and watermarks per partition) is written after the effects, in one
//! conditional update of one document, refused when it moved, so a crash in between replays a
//! batch whose effects are already there. On MongoDB that update is atomic, so two members of
//! the group applying the same batch at the same moment (a rebalance) are fenced. FerretDB
//! 1.24 reads and rewrites a document without a lock, so there they are not: both may apply
//! it, and an update of one may undo the other's on the same message. Run one `quikapp project
//! mongo` against FerretDB; one after the other, members are fenced there too (tested).

pub mod memory;
pub mod mongo;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use quikapp_domain::{Envelope, Event};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

use crate::ProjectionError;

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub message_id: Uuid,
    pub channel_id: Uuid,
    pub author_id: Uuid,
    pub text: String,
    pub thread_root_id: Option<Uuid>,
    /// Replies not deleted.
    pub replies: Vec<Uuid>,
    /// `(user, emoji)` pairs, in the order added.
    pub reactions: Vec<(Uuid, String)>,
    pub posted_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    pub position: u64,
    pub version: u64,
    pub deleted: bool,
}

/// One write to the timelines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new message (version 1); nothing when it is there already.
    Insert(Message),
    /// A change to a message, applied only while its stored version is below `version`.
    Change { message_id: Uuid, version: u64, change: Change },
    /// The reply joins its root's replies (nothing when it is there).
    AddReply { root: Uuid, reply: Uuid },
    /// The reply leaves its root's replies.
    RemoveReply { root: Uuid, reply: Uuid },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Edit { text: String, edited_at: DateTime<Utc> },
    Delete,
    React { user: Uuid, emoji: String },
    Unreact { user: Uuid, emoji: String },
}

impl Op {
    /// The message this write changes (the thread's root for replies).
    pub fn target(&self) -> Uuid {
        match self {
            Op::Insert(message) => message.message_id,
            Op::Change { message_id, .. } => *message_id,
            Op::AddReply { root, .. } | Op::RemoveReply { root, .. } => *root,
        }
    }
}

impl Message {
    /// Applies a write other than [`Op::Insert`] (which only ever adds a message not stored)
    /// as every store does (see the module); false when it changes nothing.
    pub fn apply(&mut self, op: Op) -> bool {
        match op {
            Op::Insert(_) => false,
            Op::Change { version, .. } if self.version >= version => false,
            Op::Change { version, change, .. } => {
                self.version = version;
                match change {
                    Change::Edit { text, edited_at } => {
                        self.text = text;
                        self.edited_at = Some(edited_at);
                    }
                    Change::Delete => self.deleted = true,
                    Change::React { user, emoji } => {
                        if !self.reactions.contains(&(user, emoji.clone())) {
                            self.reactions.push((user, emoji));
                        }
                    }
                    Change::Unreact { user, emoji } => self.reactions.retain(|r| *r != (user, emoji.clone())),
                }
                true
            }
            Op::AddReply { reply, .. } => {
                let absent = !self.replies.contains(&reply);
                if absent {
                    self.replies.push(reply);
                }
                absent
            }
            Op::RemoveReply { reply, .. } => {
                let present = self.replies.contains(&reply);
                self.replies.retain(|r| *r != reply);
                present
            }
        }
    }
}

/// The writes that apply `events`, in order.
pub fn ops_of(events: &[Envelope]) -> Vec<Op> {
    let mut ops = Vec::new();
    for envelope in events {
        let version = envelope.stream_version;
        let change = |message_id, change| Op::Change { message_id, version, change };
        match &envelope.event {
            Event::MessagePosted(e) => {
                ops.push(Op::Insert(Message {
                    message_id: e.message_id,
                    channel_id: e.channel_id,
                    author_id: e.author_id,
                    text: e.text.clone(),
                    thread_root_id: e.thread_root_id,
                    replies: vec![],
                    reactions: vec![],
                    posted_at: envelope.occurred_at,
                    edited_at: None,
                    position: envelope.global_position,
                    version,
                    deleted: false,
                }));
                if let Some(root) = e.thread_root_id {
                    ops.push(Op::AddReply { root, reply: e.message_id });
                }
            }
            Event::MessageEdited(e) => {
                ops.push(change(e.message_id, Change::Edit { text: e.text.clone(), edited_at: envelope.occurred_at }))
            }
            Event::MessageDeleted(e) => {
                ops.push(change(e.message_id, Change::Delete));
                if let Some(root) = e.thread_root_id {
                    ops.push(Op::RemoveReply { root, reply: e.message_id });
                }
            }
            Event::ReactionAdded(e) => {
                ops.push(change(e.message_id, Change::React { user: e.user_id, emoji: e.emoji.clone() }))
            }
            Event::ReactionRemoved(e) => {
                ops.push(change(e.message_id, Change::Unreact { user: e.user_id, emoji: e.emoji.clone() }))
            }
            _ => {}
        }
    }
    ops
}

/// A message as API.md serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct MessageView {
    pub message_id: Uuid,
    pub channel_id: Uuid,
    pub author_id: Uuid,
    pub text: String,
    pub thread_root_id: Option<Uuid>,
    pub reply_count: u64,
    /// Emoji → the users who reacted with it, in the order they did.
    pub reactions: BTreeMap<String, Vec<Uuid>>,
    #[serde(with = "quikapp_domain::event::timestamp")]
    #[schema(value_type = String)]
    pub posted_at: DateTime<Utc>,
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>)]
    pub edited_at: Option<DateTime<Utc>>,
    /// The global position of the MessagePosted event, as a decimal string.
    pub position: String,
    pub version: u64,
}

fn optional_timestamp<S: serde::Serializer>(at: &Option<DateTime<Utc>>, serializer: S) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => serializer.serialize_str(&quikapp_domain::event::timestamp::format(at)),
        None => serializer.serialize_none(),
    }
}

impl From<&Message> for MessageView {
    fn from(message: &Message) -> Self {
        let mut reactions: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
        for (user, emoji) in &message.reactions {
            reactions.entry(emoji.clone()).or_default().push(*user);
        }
        MessageView {
            message_id: message.message_id,
            channel_id: message.channel_id,
            author_id: message.author_id,
            text: message.text.clone(),
            thread_root_id: message.thread_root_id,
            reply_count: message.replies.len() as u64,
            reactions,
            posted_at: message.posted_at,
            edited_at: message.edited_at,
            position: message.position.to_string(),
            version: message.version,
        }
    }
}

/// What the read API asks of the timelines; every answer leaves deleted messages out.
#[async_trait]
pub trait Timelines: Send + Sync {
    /// Up to `limit` top-level messages of the channel before position `before` (all when
    /// `None`), newest first.
    async fn page(
        &self,
        channel_id: Uuid,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<MessageView>, ProjectionError>;
    async fn message(&self, channel_id: Uuid, message_id: Uuid) -> Result<Option<MessageView>, ProjectionError>;
    /// The replies of a thread, oldest first.
    async fn replies(&self, channel_id: Uuid, root: Uuid) -> Result<Vec<MessageView>, ProjectionError>;
}
