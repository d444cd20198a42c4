//! Read models and the runtime that keeps them up to date from the event bus.
//!
//! # Layout
//! - [`Projector`]: what a read model's writer promises; [`Batch`] is what it is handed.
//! - [`runtime`]: one consumer-group member per read model: reads the bus, skips what the model
//!   already has, applies batches, sets poison events aside on the dead-letter topic.
//! - [`directory`]: the relational model (users, workspaces, channels, members), on PostgreSQL
//!   or in memory for the embedded default.
//! - [`counters`]: unread counts and channel stats, on Redis or in memory.
//! - [`timelines`]: message timelines and threads, on MongoDB or in memory.
//! - [`search`]: full-text search over messages, on OpenSearch/Elasticsearch or SQLite FTS5.
//! - `compliance` (feature `compliance`): the suite every projector passes.
//!
//! # Progress
//! Each model stores, per partition of both topics and together with its effects, the offset
//! it has applied up to and the highest watermark among the records applied. A model has
//! applied position P when every partition's watermark is at least P (API.md, Kafka), which is
//! what [`applied_position`] computes and what the read API answers X-Min-Position with.

pub mod audit;
pub mod counters;
pub mod directory;
pub mod replay;
pub mod runtime;
pub mod search;
pub mod timelines;

#[cfg(feature = "compliance")]
pub mod compliance;

use std::collections::HashMap;

use async_trait::async_trait;
use quikapp_bus::Partition;
use quikapp_domain::Envelope;
use thiserror::Error;

/// How far a model has applied one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// The offset of the last record applied (events and watermarks both move it).
    pub offset: u64,
    /// The highest watermark position among the records applied; 0 before the first.
    pub watermark: u64,
}

/// What a model has stored of its progress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    pub partitions: HashMap<Partition, Progress>,
    /// Events set aside on the dead-letter topic, in all.
    pub dead_lettered: u64,
}

impl Stored {
    /// Takes in the moves of a batch and the events it set aside.
    pub fn record(&mut self, moves: &[Move], dead_lettered: u64) {
        for step in moves {
            self.partitions.insert(step.partition.clone(), step.to);
        }
        self.dead_lettered += dead_lettered;
    }
}

/// One partition's step in a batch: from the offset the batch was read after (as the model
/// stored it: `None` when it has nothing for the partition) to where it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub partition: Partition,
    pub from: Option<u64>,
    pub to: Progress,
}

/// What a projector applies in one step.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// In the order read: each partition's in offset order, so each stream's in version order.
    pub events: Vec<Envelope>,
    pub moves: Vec<Move>,
    /// Events of these moves that were set aside instead of applied.
    pub dead_lettered: u64,
}

#[derive(Debug, Error)]
pub enum ProjectionError {
    /// The store cannot be reached or is overloaded: try the same batch again later.
    #[error("read model store unavailable: {0}")]
    Unavailable(String),
    /// A partition's stored offset is not the batch's `from`: another member applied it (the
    /// partition was reassigned). Nothing was written.
    #[error("the stored progress moved: {0}")]
    Moved(String),
    /// The store refused the batch for what is in it (a constraint, a value out of range).
    /// Nothing was written. Applying the events one at a time finds the one at fault.
    #[error("the batch cannot be applied: {0}")]
    Rejected(String),
    /// The store is not fit for the model: a schema version older than this build's, a Redis
    /// database shared with other data. An operator has to act (the message says how).
    #[error("{0}")]
    Unfit(String),
}

/// A read model's writer.
///
/// The runtime hands batches read from the bus, which delivers every event at least once. A
/// projector MUST:
/// - apply a batch's effects and its [`Move`]s (offsets, watermarks, dead-letter count) in one
///   atomic step: after a crash at any point, either all of it is stored or none. A store
///   without transactions MAY instead make every effect idempotent (applying a batch again, in
///   order, ends the same) and store the moves after the effects (the timelines on MongoDB);
/// - refuse the whole batch with [`ProjectionError::Moved`] unless, for every move, the stored
///   offset of its partition is still its `from` (so that a batch delivered twice, or applied by
///   a member that lost the partition, changes nothing);
/// - apply each stream's events in the order given, and stay correct whatever order events of
///   different partitions come in (a workspace's events and its channels' are on different
///   topics);
/// - answer [`ProjectionError::Unavailable`] only for faults that a retry may cure, and
///   [`ProjectionError::Rejected`] when the batch itself is at fault.
///
/// It SHOULD apply a batch in a few round trips to its store, whatever its size (multi-row
/// statements, pipelines, scripts), and SHOULD make its stored progress observable to other
/// processes ([`Projector::stored`]) as soon as it commits.
#[async_trait]
pub trait Projector: Send + Sync {
    /// The model's name: `postgres`, `redis`, `mongo` or `search`.
    fn name(&self) -> &'static str;

    /// The stored progress.
    async fn stored(&self) -> Result<Stored, ProjectionError>;

    /// Applies `batch` as described above.
    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError>;

    /// Resolves when the stored progress may have changed (a notification from the store), or
    /// after a while at the latest.
    async fn changed(&self);

    /// Refuses a stored model whose schema version is older than this build's (its shape
    /// changed: `quikapp replay` rebuilds it). Projectors check before they run; readers read
    /// what is there. A model kept in memory has nothing stored to refuse.
    async fn check_schema(&self) -> Result<(), ProjectionError> {
        Ok(())
    }
}

/// The refusal of a model of schema version `found` where this build needs `needed`.
pub fn older_schema(model: &str, found: impl std::fmt::Display, needed: impl std::fmt::Display) -> ProjectionError {
    ProjectionError::Unfit(format!(
        "the {model} read model has schema version {found}, this build needs {needed}: \
         run `quikapp replay {model}` to rebuild it"
    ))
}

/// How an in-memory model tells the read API's tracker that its progress changed.
#[derive(Default)]
pub(crate) struct Changes(tokio::sync::Notify);

impl Changes {
    /// One permit is kept when no one waits, so the tracker misses no change.
    pub(crate) fn announce(&self) {
        self.0.notify_one();
    }

    /// Until the next change, or a second at most.
    pub(crate) async fn next(&self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.0.notified()).await;
    }
}

/// The position a model has applied: the lowest watermark among `partitions` (0 for one it
/// has nothing of).
pub fn applied_position(stored: &Stored, partitions: &[Partition]) -> u64 {
    partitions.iter().map(|p| stored.partitions.get(p).map_or(0, |progress| progress.watermark)).min().unwrap_or(0)
}

/// Checks the [`Move`]s of a batch against stored offsets, for stores that read them first.
pub fn check_moves<'a>(moves: &[Move], stored: impl Fn(&Partition) -> Option<u64> + 'a) -> Result<(), ProjectionError> {
    for step in moves {
        let now = stored(&step.partition);
        if now != step.from {
            return Err(ProjectionError::Moved(format!(
                "{}/{}: stored {now:?}, the batch starts after {:?}",
                step.partition.topic, step.partition.index, step.from
            )));
        }
    }
    Ok(())
}

/// The text of a partition as a store key: `topic/index`.
pub fn partition_key(partition: &Partition) -> String {
    format!("{}/{}", partition.topic, partition.index)
}

/// The partition a [`partition_key`] names.
pub fn parse_partition_key(key: &str) -> Option<Partition> {
    let (topic, index) = key.rsplit_once('/')?;
    Some(Partition { topic: topic.to_owned(), index: index.parse().ok()? })
}
