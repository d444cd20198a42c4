//! The timelines of the embedded default, in memory, under one lock; like the other embedded
//! models, rebuilt from the log at each start.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{Change, Message, MessageView, Op, Timelines, ops_of};
use crate::{Batch, ProjectionError, Projector, Stored, check_moves};

#[derive(Default)]
pub struct MemoryTimelines {
    state: RwLock<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    stored: Stored,
    messages: HashMap<Uuid, Message>,
}

impl MemoryTimelines {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("never poisoned")
    }
}

/// Applies one write as every store does (see the module's documentation).
pub(crate) fn apply_op(messages: &mut HashMap<Uuid, Message>, op: Op) {
    match op {
        Op::Insert(message) => {
            messages.entry(message.message_id).or_insert(message);
        }
        Op::Change { message_id, version, change } => {
            let Some(message) = messages.get_mut(&message_id).filter(|m| m.version < version) else { return };
            message.version = version;
            match change {
                Change::Edit { text, edited_at } => {
                    message.text = text;
                    message.edited_at = Some(edited_at);
                }
                Change::Delete => message.deleted = true,
                Change::React { user, emoji } => {
                    if !message.reactions.contains(&(user, emoji.clone())) {
                        message.reactions.push((user, emoji));
                    }
                }
                Change::Unreact { user, emoji } => message.reactions.retain(|r| *r != (user, emoji.clone())),
            }
        }
        Op::AddReply { root, reply } => {
            if let Some(root) = messages.get_mut(&root)
                && !root.replies.contains(&reply)
            {
                root.replies.push(reply);
            }
        }
        Op::RemoveReply { root, reply } => {
            if let Some(root) = messages.get_mut(&root) {
                root.replies.retain(|r| *r != reply);
            }
        }
    }
}

#[async_trait]
impl Projector for MemoryTimelines {
    fn name(&self) -> &'static str {
        "mongo"
    }

    async fn stored(&self) -> Result<Stored, ProjectionError> {
        Ok(self.read().stored.clone())
    }

    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        {
            let mut state = self.state.write().expect("never poisoned");
            check_moves(&batch.moves, |p| state.stored.partitions.get(p).map(|s| s.offset))?;
            for op in ops_of(&batch.events) {
                apply_op(&mut state.messages, op);
            }
            state.stored.record(&batch.moves, batch.dead_lettered);
        }
        // One permit kept when no one waits: the read API's tracker misses no change.
        self.changed.notify_one();
        Ok(())
    }

    async fn changed(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.changed.notified()).await;
    }
}

#[async_trait]
impl Timelines for MemoryTimelines {
    async fn page(
        &self,
        channel_id: Uuid,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<MessageView>, ProjectionError> {
        let state = self.read();
        let mut page: Vec<&Message> = state
            .messages
            .values()
            .filter(|m| m.channel_id == channel_id && m.thread_root_id.is_none() && !m.deleted)
            .filter(|m| before.is_none_or(|before| m.position < before))
            .collect();
        page.sort_by_key(|m| std::cmp::Reverse(m.position));
        Ok(page.into_iter().take(limit).map(MessageView::from).collect())
    }

    async fn message(&self, channel_id: Uuid, message_id: Uuid) -> Result<Option<MessageView>, ProjectionError> {
        let state = self.read();
        let message = state.messages.get(&message_id).filter(|m| m.channel_id == channel_id && !m.deleted);
        Ok(message.map(MessageView::from))
    }

    async fn replies(&self, channel_id: Uuid, root: Uuid) -> Result<Vec<MessageView>, ProjectionError> {
        let state = self.read();
        let mut replies: Vec<&Message> = state
            .messages
            .values()
            .filter(|m| m.channel_id == channel_id && m.thread_root_id == Some(root) && !m.deleted)
            .collect();
        replies.sort_by_key(|m| m.position);
        Ok(replies.into_iter().map(MessageView::from).collect())
    }
}
