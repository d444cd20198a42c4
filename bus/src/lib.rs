//! The event bus: how stored events reach Kafka (or, embedded, the in-process bus), and the
//! relay that publishes them in commit order.
//!
//! # Layout
//! - [`Publisher`]: the port the relay writes through; [`route`] says where each event goes
//!   (topic and key), the same for every adapter.
//! - [`EventBus`]: the port consumers read through, one partition at a time from an offset they
//!   keep; [`partition_of`] is Kafka's partitioning, shared by every adapter.
//! - [`kafka`]: the Kafka adapter: an idempotent producer, topics created when missing,
//!   watermark records to every partition; and [`kafka::KafkaBus`], the reading side.
//! - [`embedded`]: the bus of `quikapp dev`: the event store's own log, partitioned the same way.
//! - [`relay`]: follows the event store's global order from a checkpoint kept in the event
//!   store's database, one active relay at a time (a PostgreSQL session advisory lock), woken
//!   by the appends' NOTIFY.
//! - `testing` (feature `testing`): reading the topics back, for the tests of every crate.

pub mod embedded;
pub mod kafka;
pub mod relay;
#[cfg(feature = "testing")]
pub mod testing;

use async_trait::async_trait;
use quikapp_commands::store::EncodedEvent;
use quikapp_domain::Envelope;
use thiserror::Error;
use uuid::Uuid;

/// The topics of API.md's Kafka section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Every event with a channel_id, keyed by it.
    pub messages: String,
    /// User and workspace events, keyed by workspace_id (by user_id for a user event with no
    /// workspace).
    pub workspaces: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics { messages: "quikapp.messages.events".into(), workspaces: "quikapp.workspaces.events".into() }
    }
}

impl Topics {
    /// Where projectors set aside the events they cannot apply.
    pub fn dead_letters(&self) -> String {
        format!("{}.dlq", self.messages)
    }

    /// Every partition of both topics, `partitions` each.
    pub fn partitions(&self, partitions: i32) -> Vec<Partition> {
        [&self.messages, &self.workspaces]
            .into_iter()
            .flat_map(|topic| (0..partitions).map(|index| Partition { topic: topic.clone(), index }))
            .collect()
    }
}

/// Which of the two topics an event goes to, and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Messages { channel_id: Uuid },
    Workspaces { key: Uuid },
}

/// Where an event goes: events of a channel to the messages topic keyed by channel, so that one
/// channel's events share a partition in order; the rest to the workspaces topic.
/// `actor_id` keys an event of neither (a user's own event, whose actor is the user).
pub fn route(channel_id: Option<Uuid>, workspace_id: Option<Uuid>, actor_id: Uuid) -> Route {
    match (channel_id, workspace_id) {
        (Some(channel_id), _) => Route::Messages { channel_id },
        (None, Some(workspace_id)) => Route::Workspaces { key: workspace_id },
        (None, None) => Route::Workspaces { key: actor_id },
    }
}

/// The value of a watermark record: every event up to `position` has been written to the
/// partition it belongs to (API.md, Kafka).
pub fn watermark_value(position: u64) -> String {
    serde_json::json!({ "position": position.to_string() }).to_string()
}

#[derive(Debug, Error)]
pub enum BusError {
    /// The bus cannot take records now (broker down, timeouts): retry later.
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
}

/// Resolves once every record handed over by one [`Publisher::send`] is acknowledged.
pub type Acks = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BusError>> + Send>>;

/// Writes events to the bus.
///
/// An adapter MUST write each event to the partition its [`route`] names, in the order given
/// and after everything sent before, and, given a `watermark`, MUST follow the events with a
/// watermark of that position on every partition of both topics, so that a consumer that has
/// read past it on every partition has seen every event up to it. [`Acks`] resolve only once all
/// of it is
/// durable on the bus. On error, some records may have been written: the caller sends the same
/// events again (duplicates carry the same event_id; consumers skip them by stream version).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Hands the records to the bus, in order, without waiting for their acknowledgement.
    async fn send(&self, events: &[EncodedEvent], watermark: Option<u64>) -> Result<Acks, BusError>;

    /// [`Publisher::send`], then waits for the acknowledgement.
    async fn publish(&self, events: &[EncodedEvent], watermark: Option<u64>) -> Result<(), BusError> {
        self.send(events, watermark).await?.await
    }

    /// A round trip to the bus, for readiness.
    async fn ping(&self) -> Result<(), BusError>;
}

/// A partition of one of the two event topics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    pub topic: String,
    pub index: i32,
}

/// What a consumer of the bus reads from a partition. Offsets grow along a partition; their
/// values are the adapter's own (Kafka offsets, or global positions for the embedded bus).
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Event {
        offset: u64,
        event: Envelope,
    },
    /// Every event up to `position` that belongs to this partition was read before this.
    Watermark {
        offset: u64,
        position: u64,
    },
    /// A record that is neither a known event nor a watermark (an unknown type, a malformed
    /// value): kept as read, so that a consumer can set it aside rather than stop.
    Undecodable {
        offset: u64,
        key: Option<String>,
        payload: Vec<u8>,
        error: String,
    },
}

impl Record {
    pub fn offset(&self) -> u64 {
        match self {
            Record::Event { offset, .. } | Record::Watermark { offset, .. } | Record::Undecodable { offset, .. } => {
                *offset
            }
        }
    }
}

/// Reads the bus, one partition at a time, from an offset the reader keeps (a projector keeps
/// it with its effects, so that a restart resumes where its effects end).
///
/// An adapter MUST deliver each partition's records in offset order; every event of a channel
/// on the partition [`partition_of`] names; each event at least once (after a crash of the
/// relay, a batch may come twice with the same event_id); and a watermark of `P` on a
/// partition only after every event of that partition up to `P`. Reading after an offset MUST
/// deliver exactly the records that follow it.
#[async_trait]
pub trait EventBus: Send + Sync {
    /// The partitions of both topics.
    fn partitions(&self) -> Vec<Partition>;

    /// Up to `max` records of `partition` after `after` (from the start when `None`), waiting
    /// at most `wait` for the first.
    async fn read(
        &self,
        partition: &Partition,
        after: Option<u64>,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<Vec<Record>, BusError>;

    /// Joins the consumer group `group` (one per read model), which shares the partitions of
    /// both topics among its members.
    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, BusError>;

    /// As [`EventBus::subscribe`], for a group with no use for what was published before it
    /// first joined (the realtime group: its clients catch up from the store): a partition the
    /// group has no offset for is read from where it ended when the group was first joined, not
    /// from its start (on Kafka, that place is committed for the group then, so that a member
    /// joining later, or taking over a partition, reads on from it).
    async fn subscribe_from_now(&self, group: &str) -> Result<Box<dyn Subscription>, BusError> {
        self.subscribe(group).await
    }
}

/// One member of a consumer group: reads the partitions the group assigns it.
///
/// The member's reader keeps its offsets with its effects; the group's own committed offsets
/// are only where reading starts after an assignment, so a reader MUST [`Subscription::seek`]
/// each partition to its own offset before trusting what it reads there. Partitions can be
/// taken away at any time (another member joined): [`Subscription::revoked`] says which, and a
/// reader also learns it when its stored offsets turn out to have moved.
#[async_trait]
pub trait Subscription: Send {
    /// Up to `max` records of the assigned partitions, each partition's in offset order,
    /// waiting at most `wait` for the first.
    async fn poll(&mut self, max: usize, wait: std::time::Duration) -> Result<Vec<(Partition, Record)>, BusError>;

    /// Partitions the group took away since this was last asked (their records may still be
    /// in the last poll). A reader forgets what it knew of them: when one comes back, another
    /// member may have moved it on.
    fn revoked(&mut self) -> Vec<Partition>;

    /// Reads `partition` again from the record after `after` (from its start when `None`);
    /// records of that partition read before this call are not delivered again.
    async fn seek(&mut self, partition: &Partition, after: Option<u64>) -> Result<(), BusError>;

    /// Tells the group that `partition` is done up to `offset`, so that a member that takes it
    /// over starts reading near there. A hint only.
    fn commit(&mut self, done: &[(Partition, u64)]);

    /// Sets a record aside on the dead-letter topic, with `model` and `error` in its headers;
    /// resolves once the bus has it.
    async fn dead_letter(
        &mut self,
        partition: &Partition,
        record: &Record,
        model: &str,
        error: &str,
    ) -> Result<(), BusError>;
}

/// The partition of a key among `partitions`, as Kafka's Java clients and librdkafka's
/// `murmur2_random` partitioner compute it: murmur2 of the key's bytes, sign bit cleared.
pub fn partition_for_key(key: &str, partitions: i32) -> i32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions
}

/// Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2).
fn murmur2(data: &[u8]) -> i32 {
    const M: i32 = 0x5bd1_e995;
    let length = data.len();
    let mut h: i32 = 0x9747_b28c_u32 as i32 ^ length as i32;
    for chunk in data.chunks_exact(4) {
        let mut k = i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= ((k as u32) >> 24) as i32;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = &data[length & !3..];
    if tail.len() >= 3 {
        h ^= (tail[2] as i32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as i32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as i32;
        h = h.wrapping_mul(M);
    }
    h ^= ((h as u32) >> 13) as i32;
    h = h.wrapping_mul(M);
    h ^= ((h as u32) >> 15) as i32;
    h
}

/// The topic and partition an event goes to among `partitions` per topic.
pub fn partition_of(event: &Envelope, topics: &Topics, partitions: i32) -> Partition {
    let (topic, key) = match route(event.channel_id, event.workspace_id, event.actor_id) {
        Route::Messages { channel_id } => (&topics.messages, channel_id),
        Route::Workspaces { key } => (&topics.workspaces, key),
    };
    Partition { topic: topic.clone(), index: partition_for_key(&key.to_string(), partitions) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from Kafka's own test of the partitioner (DefaultPartitionerTest and
    /// UtilsTest.testMurmur2), so that a channel lands where Java clients put it.
    #[test]
    fn murmur2_matches_kafka() {
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"), -58897971);
        assert_eq!(murmur2(&[b'a', b'b', b'c']), 479470107);
    }
}
