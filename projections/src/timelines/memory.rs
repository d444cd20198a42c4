//! The timelines of the embedded default, in memory, under one lock; like the other embedded
//! models, rebuilt from the log at each start.

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

use async_trait::async_trait;
use uuid::Uuid;

use super::{Change, Message, MessageView, Op, Timelines, ops_of};
use crate::{Batch, ProjectionError, Projector, Stored, check_moves};

#[derive(Default)]
pub struct MemoryTimelines {
    state: RwLock<State>,
    changed: crate::Changes,
}

#[derive(Default)]
struct State {
    stored: Stored,
    messages: HashMap<Uuid, Message>,
    /// Each channel's top-level messages not deleted, and each thread's replies not deleted,
    /// by position: a page is one range.
    timelines: HashMap<Uuid, BTreeSet<(u64, Uuid)>>,
    threads: HashMap<Uuid, BTreeSet<(u64, Uuid)>>,
}

impl MemoryTimelines {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("never poisoned")
    }
}

impl State {
    /// Where a message not deleted is listed: its channel's timeline or its thread.
    fn listing(&mut self, message: &Message) -> &mut BTreeSet<(u64, Uuid)> {
        match message.thread_root_id {
            Some(root) => self.threads.entry(root).or_default(),
            None => self.timelines.entry(message.channel_id).or_default(),
        }
    }

    /// Applies one write as every store does (see the module's documentation).
    fn apply(&mut self, op: Op) {
        match op {
            Op::Insert(message) => {
                if !self.messages.contains_key(&message.message_id) {
                    self.listing(&message).insert((message.position, message.message_id));
                    self.messages.insert(message.message_id, message);
                }
            }
            Op::Change { message_id, version, change } => {
                let Some(message) = self.messages.get_mut(&message_id).filter(|m| m.version < version) else { return };
                message.version = version;
                match change {
                    Change::Edit { text, edited_at } => {
                        message.text = text;
                        message.edited_at = Some(edited_at);
                    }
                    Change::Delete => {
                        message.deleted = true;
                        let message = message.clone();
                        self.listing(&message).remove(&(message.position, message.message_id));
                    }
                    Change::React { user, emoji } => {
                        if !message.reactions.contains(&(user, emoji.clone())) {
                            message.reactions.push((user, emoji));
                        }
                    }
                    Change::Unreact { user, emoji } => message.reactions.retain(|r| *r != (user, emoji.clone())),
                }
            }
            Op::AddReply { root, reply } => {
                if let Some(root) = self.messages.get_mut(&root)
                    && !root.replies.contains(&reply)
                {
                    root.replies.push(reply);
                }
            }
            Op::RemoveReply { root, reply } => {
                if let Some(root) = self.messages.get_mut(&root) {
                    root.replies.retain(|r| *r != reply);
                }
            }
        }
    }

    fn views<'a>(&self, listed: impl Iterator<Item = &'a (u64, Uuid)>) -> Vec<MessageView> {
        listed.filter_map(|(_, id)| self.messages.get(id)).map(MessageView::from).collect()
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
                state.apply(op);
            }
            state.stored.record(&batch.moves, batch.dead_lettered);
        }
        self.changed.announce();
        Ok(())
    }

    async fn changed(&self) {
        self.changed.next().await;
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
        let Some(timeline) = state.timelines.get(&channel_id) else { return Ok(vec![]) };
        let end = before.unwrap_or(u64::MAX);
        Ok(state.views(timeline.range(..(end, Uuid::nil())).rev().take(limit)))
    }

    async fn message(&self, channel_id: Uuid, message_id: Uuid) -> Result<Option<MessageView>, ProjectionError> {
        let state = self.read();
        let message = state.messages.get(&message_id).filter(|m| m.channel_id == channel_id && !m.deleted);
        Ok(message.map(MessageView::from))
    }

    async fn replies(&self, channel_id: Uuid, root: Uuid) -> Result<Vec<MessageView>, ProjectionError> {
        let state = self.read();
        let Some(thread) = state.threads.get(&root) else { return Ok(vec![]) };
        let replies = state.views(thread.iter());
        Ok(replies.into_iter().filter(|reply| reply.channel_id == channel_id).collect())
    }
}
