//! The suite every [`Projector`] passes, embedded or on a real store: one scenario of a
//! workspace's life, cut into batches as the bus would deliver them, applied the way the
//! runtime and its failures apply them. Each check ends by comparing the model, read through
//! `snapshot`, with what the scenario implies.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use quikapp_bus::{Partition, Topics};
use quikapp_domain::event::*;
use quikapp_domain::workspace::Role;
use quikapp_domain::{Envelope, Event};
use serde_json::Value;
use uuid::Uuid;

use crate::{Batch, Move, Progress, ProjectionError, Projector};

/// The partitions of each topic in the scenario.
pub const PARTITIONS: i32 = 12;

/// The people, places and messages of the scenario.
#[derive(Debug, Clone, Copy)]
pub struct Cast {
    pub ada: Uuid,
    pub bob: Uuid,
    pub cy: Uuid,
    pub workspace: Uuid,
    /// Public; renamed from "general" to "town-square".
    pub general: Uuid,
    /// Private; Cy joins and leaves, Bob joins after its messages, then it is archived.
    pub secret: Uuid,
    /// In `general`: by Ada, by Bob (deleted), Bob's reply to m1, by Ada (edited); in `secret` by Ada;
    /// Cy's reply to m1 (deleted).
    pub m1: Uuid,
    pub m2: Uuid,
    pub m3: Uuid,
    pub m4: Uuid,
    pub m5: Uuid,
    /// Cy's reply to m1, deleted.
    pub m6: Uuid,
}

impl Cast {
    pub fn new() -> Cast {
        let id = Uuid::now_v7;
        Cast {
            ada: id(),
            bob: id(),
            cy: id(),
            workspace: id(),
            general: id(),
            secret: id(),
            m1: id(),
            m2: id(),
            m3: id(),
            m4: id(),
            m5: id(),
            m6: id(),
        }
    }
}

impl Default for Cast {
    fn default() -> Self {
        Cast::new()
    }
}

/// The scenario's events, positioned from 1, each stream versioned from 1.
pub fn scenario(c: &Cast) -> Vec<Envelope> {
    let mut log = Log::default();
    let (ws, general, secret) = (Some(c.workspace), Some(c.general), Some(c.secret));
    log.push(
        &format!("user-{}", c.ada),
        None,
        None,
        c.ada,
        UserProfileUpdated { user_id: c.ada, display_name: "Ada".into() },
    );
    log.push(
        &format!("user-{}", c.bob),
        None,
        None,
        c.bob,
        UserProfileUpdated { user_id: c.bob, display_name: "Bob".into() },
    );
    let workspace = format!("workspace-{}", c.workspace);
    log.push(
        &workspace,
        ws,
        None,
        c.ada,
        WorkspaceCreated { workspace_id: c.workspace, name: "acme".into(), owner_id: c.ada },
    );
    for (user, role) in [(c.bob, Role::Member), (c.cy, Role::Admin)] {
        log.push(
            &workspace,
            ws,
            None,
            c.ada,
            WorkspaceMemberAdded { workspace_id: c.workspace, user_id: user, role, added_by: c.ada },
        );
    }
    let (g, s) = (format!("channel-{}", c.general), format!("channel-{}", c.secret));
    let created = |channel_id, name: &str, private| ChannelCreated {
        channel_id,
        workspace_id: c.workspace,
        name: name.into(),
        topic: None,
        private,
        created_by: c.ada,
    };
    log.push(&g, ws, general, c.ada, created(c.general, "general", false));
    log.push(&g, ws, general, c.ada, ChannelMemberJoined { channel_id: c.general, user_id: c.ada, added_by: c.ada });
    log.push(&s, ws, secret, c.ada, created(c.secret, "secret", true));
    log.push(&s, ws, secret, c.ada, ChannelMemberJoined { channel_id: c.secret, user_id: c.ada, added_by: c.ada });
    log.push(&g, ws, general, c.bob, ChannelMemberJoined { channel_id: c.general, user_id: c.bob, added_by: c.bob });
    log.push(&s, ws, secret, c.ada, ChannelMemberJoined { channel_id: c.secret, user_id: c.cy, added_by: c.ada });
    let posted = |message_id, channel_id, author_id, text: &str, thread_root_id| MessagePosted {
        message_id,
        channel_id,
        author_id,
        text: text.into(),
        thread_root_id,
    };
    let m = |id: Uuid| format!("message-{id}");
    let p1 = log.push(&m(c.m1), ws, general, c.ada, posted(c.m1, c.general, c.ada, "hello", None));
    log.push(&m(c.m2), ws, general, c.bob, posted(c.m2, c.general, c.bob, "hi Ada", None));
    log.push(&m(c.m3), ws, general, c.bob, posted(c.m3, c.general, c.bob, "a reply", Some(c.m1)));
    log.push(
        &g,
        ws,
        general,
        c.ada,
        ChannelRenamed { channel_id: c.general, name: "town-square".into(), previous_name: "general".into() },
    );
    log.push(&m(c.m4), ws, general, c.ada, posted(c.m4, c.general, c.ada, "draft", None));
    log.push(&m(c.m5), ws, secret, c.ada, posted(c.m5, c.secret, c.ada, "psst", None));
    log.push(&s, ws, secret, c.ada, ChannelTopicChanged { channel_id: c.secret, topic: Some("plans".into()) });
    log.push(
        &m(c.m4),
        ws,
        general,
        c.ada,
        MessageEdited { message_id: c.m4, channel_id: c.general, text: "final words".into() },
    );
    log.push(
        &m(c.m1),
        ws,
        general,
        c.cy,
        ReactionAdded { message_id: c.m1, channel_id: c.general, user_id: c.cy, emoji: "tada".into() },
    );
    log.push(&m(c.m6), ws, general, c.cy, posted(c.m6, c.general, c.cy, "a reply, taken back", Some(c.m1)));
    log.push(
        &m(c.m6),
        ws,
        general,
        c.cy,
        MessageDeleted { message_id: c.m6, channel_id: c.general, author_id: c.cy, thread_root_id: Some(c.m1) },
    );
    log.push(
        &m(c.m2),
        ws,
        general,
        c.bob,
        MessageDeleted { message_id: c.m2, channel_id: c.general, author_id: c.bob, thread_root_id: None },
    );
    log.push(
        &format!("readmark-{}-{}", c.general, c.bob),
        ws,
        general,
        c.bob,
        ChannelReadMarked { channel_id: c.general, user_id: c.bob, message_id: c.m1, message_position: p1 },
    );
    // Bob joins after the channel's messages: they are not unread to him.
    log.push(&s, ws, secret, c.ada, ChannelMemberJoined { channel_id: c.secret, user_id: c.bob, added_by: c.ada });
    log.push(&s, ws, secret, c.cy, ChannelMemberLeft { channel_id: c.secret, user_id: c.cy, removed_by: c.cy });
    log.push(&s, ws, secret, c.ada, ChannelArchived { channel_id: c.secret });
    log.events
}

#[derive(Default)]
struct Log {
    events: Vec<Envelope>,
    versions: HashMap<String, u64>,
}

impl Log {
    fn push(
        &mut self,
        stream_id: &str,
        workspace_id: Option<Uuid>,
        channel_id: Option<Uuid>,
        actor_id: Uuid,
        event: impl Into<Event>,
    ) -> u64 {
        let event = event.into();
        let version = self.versions.entry(stream_id.to_owned()).or_default();
        *version += 1;
        let position = self.events.len() as u64 + 1;
        self.events.push(Envelope {
            event_id: Uuid::now_v7(),
            schema_version: event.schema_version(),
            event,
            stream_id: stream_id.to_owned(),
            stream_version: *version,
            global_position: position,
            workspace_id,
            channel_id,
            actor_id,
            occurred_at: timestamp::now(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
        });
        position
    }
}

/// The events cut into batches at `cuts` (indexes where a new batch starts), each with the
/// moves the runtime would give it when each batch ends with a watermark of its last position
/// P on every partition (offset 2P+1, as on the embedded bus).
pub fn batches(events: &[Envelope], cuts: &[usize]) -> Vec<Batch> {
    let topics = Topics::default();
    let mut applied: HashMap<Partition, Progress> = HashMap::new();
    let mut bounds: Vec<usize> = cuts.to_vec();
    bounds.push(events.len());
    let mut start = 0;
    let mut batches = Vec::new();
    for end in bounds {
        let chunk = &events[start..end];
        start = end;
        let Some(last) = chunk.last().map(|e| e.global_position) else { continue };
        let mut batch = Batch { events: chunk.to_vec(), ..Batch::default() };
        for partition in topics.partitions(PARTITIONS) {
            let from = applied.get(&partition).map(|p| p.offset);
            let to = Progress { offset: last * 2 + 1, watermark: last };
            batch.moves.push(Move { partition: partition.clone(), from, to });
            applied.insert(partition, to);
        }
        batches.push(batch);
    }
    batches
}

/// The cuts the checks use: three batches.
pub fn cuts(events: &[Envelope]) -> Vec<usize> {
    vec![events.len() / 3, 2 * events.len() / 3]
}

/// What a projector's store can promise, for the checks that depend on it.
#[derive(Debug, Clone, Copy)]
pub struct Store {
    /// One of two members applying the same batch at the same moment is refused (false only
    /// for a store without an atomic conditional write: FerretDB).
    pub fenced: bool,
    /// An apply can be interrupted part-way (false for the in-memory models, whose apply is
    /// one synchronous step).
    pub can_be_cut_short: bool,
    /// Effects and progress are stored in one atomic step (false for idempotent writes
    /// followed by the progress: the timelines on MongoDB).
    pub atomic: bool,
}

impl Store {
    /// A remote store with transactions or atomic scripts (PostgreSQL, Redis).
    pub const ATOMIC: Store = Store { fenced: true, can_be_cut_short: true, atomic: true };
    /// A model in this process's memory.
    pub const IN_MEMORY: Store = Store { fenced: true, can_be_cut_short: false, atomic: true };
}

/// How many checks [`check`] has.
pub const CHECKS: usize = 3;

/// Check number `n` (of [`CHECKS`]) on a fresh model: `first` and `second` are two members over
/// its store (they may be one object), `snapshot` reads the model, `expected` is what the
/// scenario implies.
pub async fn check<F, Fut>(
    n: usize,
    first: &dyn Projector,
    second: &dyn Projector,
    store: Store,
    events: &[Envelope],
    snapshot: F,
    expected: Value,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Value>,
{
    match n {
        0 => the_same_batch_twice_changes_nothing(first, events, snapshot, expected).await,
        1 => redelivery_after_a_rebalance_is_refused(first, second, store, events, snapshot, expected).await,
        _ => a_crash_while_applying_leaves_all_or_nothing(first, store, events, snapshot, expected).await,
    }
}

fn moved(result: Result<(), ProjectionError>, what: &str) {
    assert!(matches!(result, Err(ProjectionError::Moved(_))), "{what}: expected Moved, got {result:?}");
}

/// Every batch applied once in order, then each again: the repeats are refused and change
/// nothing. `snapshot` reads the model; `expected` is what the scenario implies.
pub async fn the_same_batch_twice_changes_nothing<F, Fut>(
    projector: &dyn Projector,
    events: &[Envelope],
    snapshot: F,
    expected: Value,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Value>,
{
    let batches = batches(events, &cuts(events));
    for batch in &batches {
        projector.apply(batch).await.expect("a batch applies");
    }
    assert_eq!(snapshot().await, expected, "the model the scenario implies");
    for (index, batch) in batches.iter().enumerate() {
        moved(projector.apply(batch).await, &format!("batch {index} again"));
    }
    assert_eq!(snapshot().await, expected, "unchanged by the repeats");
    let stored = projector.stored().await.unwrap();
    assert_eq!(stored.partitions.len(), 2 * PARTITIONS as usize, "progress of every partition");
    assert_eq!(crate::applied_position(&stored, &Topics::default().partitions(PARTITIONS)), events.len() as u64);
}

/// Two members of a group over one store, the partitions moving between them: a batch the
/// other already applied is refused, and the model ends as if each was applied once (both at
/// the same moment too, where the store is [`Store::fenced`]).
pub async fn redelivery_after_a_rebalance_is_refused<F, Fut>(
    first: &dyn Projector,
    second: &dyn Projector,
    store: Store,
    events: &[Envelope],
    snapshot: F,
    expected: Value,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Value>,
{
    let batches = batches(events, &cuts(events));
    if store.fenced {
        // Both members handed the first batch at once (a partition moving while it was read).
        let (one, other) = tokio::join!(first.apply(&batches[0]), second.apply(&batches[0]));
        let refused = match (one, other) {
            (Ok(()), refused) | (refused, Ok(())) => refused,
            (one, other) => panic!("neither member applied batch 0: {one:?}, {other:?}"),
        };
        moved(refused, "batch 0 applied by both members at once");
    } else {
        first.apply(&batches[0]).await.expect("the first member applies batch 0");
    }
    moved(second.apply(&batches[0]).await, "batch 0 redelivered to the second member");
    second.apply(&batches[1]).await.expect("the second member goes on from the stored offsets");
    moved(first.apply(&batches[1]).await, "batch 1 by the member that lost the partitions");
    first.apply(&batches[2]).await.expect("the first member, assigned again, goes on");
    assert_eq!(snapshot().await, expected);
}

/// A crash at any point of applying a batch: each attempt is cut short after a growing delay
/// (the process stops waiting and drops the work, as a crash does), then the store is read.
/// The progress of the batch's partitions moved all or none, and, where the store is
/// [`Store::atomic`], the model changed if and only if it moved; elsewhere the attempts that
/// follow end in the same model. Attempts are cut short only where [`Store::can_be_cut_short`].
pub async fn a_crash_while_applying_leaves_all_or_nothing<F, Fut>(
    projector: &dyn Projector,
    store: Store,
    events: &[Envelope],
    snapshot: F,
    expected: Value,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Value>,
{
    let batches = batches(events, &cuts(events));
    let mut cut_short = 0;
    for batch in &batches {
        let before = snapshot().await;
        let mut delay = Duration::ZERO;
        loop {
            // The first attempt is polled once and dropped; the next ones get a growing time.
            let attempt = if delay.is_zero() {
                let mut apply = std::pin::pin!(projector.apply(batch));
                match futures::poll!(apply.as_mut()) {
                    std::task::Poll::Ready(result) => Some(result),
                    std::task::Poll::Pending => None,
                }
            } else {
                tokio::time::timeout(delay, projector.apply(batch)).await.ok()
            };
            // The progress and the model as of one moment: read again if the progress moved
            // meanwhile (work of a dropped attempt may still land).
            let (stored, model) = loop {
                let stored = projector.stored().await.expect("read the progress");
                let model = snapshot().await;
                if projector.stored().await.expect("read the progress") == stored {
                    break (stored, model);
                }
            };
            let at: Vec<Option<u64>> =
                batch.moves.iter().map(|m| stored.partitions.get(&m.partition).map(|p| p.offset)).collect();
            let applied = batch.moves.iter().zip(&at).all(|(m, at)| *at == Some(m.to.offset));
            let untouched = batch.moves.iter().zip(&at).all(|(m, at)| *at == m.from);
            assert!(applied || untouched, "the batch's progress moved part-way: {at:?}");
            match attempt {
                Some(Ok(())) => {
                    assert!(applied);
                    break;
                }
                // An earlier attempt's commit landed after it was dropped: refused whole.
                Some(Err(ProjectionError::Moved(_))) if applied => break,
                Some(Err(error)) => panic!("an attempt that ran to its end failed: {error}"),
                None => {
                    cut_short += 1;
                    if applied {
                        break; // it reached the store before the cut, whole
                    }
                    if store.atomic {
                        assert_eq!(model, before, "a cut-short attempt changed the model");
                    }
                }
            }
            delay = delay * 2 + Duration::from_micros(50);
        }
    }
    assert_eq!(cut_short > 0, store.can_be_cut_short, "attempts cut short: {cut_short}");
    assert_eq!(snapshot().await, expected);
}
