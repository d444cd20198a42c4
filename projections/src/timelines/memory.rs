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
    /// Applies one write as every store does (see the module's documentation), keeping each
    /// listing to the messages not deleted.
    fn apply(&mut self, op: Op) {
        let id = op.target();
        let (lists, unlists) = (matches!(op, Op::Insert(_)), matches!(op, Op::Change { change: Change::Delete, .. }));
        let changed = match op {
            Op::Insert(message) => !self.messages.contains_key(&id) && self.messages.insert(id, message).is_none(),
            op => self.messages.get_mut(&id).is_some_and(|message| message.apply(op)),
        };
        if changed && (lists || unlists) {
            let message = &self.messages[&id];
            let listing = match message.thread_root_id {
                Some(root) => self.threads.entry(root).or_default(),
                None => self.timelines.entry(message.channel_id).or_default(),
            };
            let key = (message.position, message.message_id);
            if lists {
                listing.insert(key);
            } else {
                listing.remove(&key);
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
