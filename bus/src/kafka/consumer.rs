//! Reading Kafka: decoding records, and the consumer-group member projectors read through.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{KafkaBus, create_topics, unavailable};
use crate::{BusError, Partition, Record, Topics};

/// A record as the relay wrote it: a watermark (header `type: Watermark`) or an event envelope.
/// Anything else is [`Record::Undecodable`], for the reader to set aside.
pub(super) fn record_of(message: &BorrowedMessage<'_>) -> Record {
    let offset = message.offset() as u64;
    let payload = message.payload().unwrap_or_default();
    let kind = message.headers().and_then(|h| h.iter().find(|h| h.key == "type")).and_then(|h| h.value);
    let decoded = match kind {
        Some(b"Watermark") => serde_json::from_slice::<serde_json::Value>(payload)
            .map_err(|e| e.to_string())
            .and_then(|value| {
                let position = value["position"].as_str().and_then(|p| p.parse().ok());
                position.ok_or_else(|| "a watermark without a position".to_owned())
            })
            .map(|position| Record::Watermark { offset, position }),
        _ => serde_json::from_slice(payload).map(|event| Record::Event { offset, event }).map_err(|e| e.to_string()),
    };
    decoded.unwrap_or_else(|error| Record::Undecodable {
        offset,
        key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: payload.to_vec(),
        error,
    })
}

/// A member of a consumer group over both event topics, with a producer for dead letters.
pub(super) struct KafkaSubscription {
    consumer: Arc<StreamConsumer<Rebalances>>,
    dead_letters: FutureProducer,
    topics: Topics,
    /// The offset each partition's next record must have: the one after the last delivered,
    /// or the one sought. The relay's topics have no gaps (an idempotent producer, no
    /// transactions, no compaction), so another offset means records were deleted (retention)
    /// or the topic was made again, and reading on would skip events or stall silently.
    /// Unknown after an assignment, where reading starts at the group's committed offset.
    next: std::collections::HashMap<Partition, u64>,
    /// Partitions taken away since [`crate::Subscription::revoked`] was last asked.
    revoked: Vec<Partition>,
}

/// Partitions the group assigned or took away, as librdkafka reports them during a poll.
#[derive(Default)]
struct Rebalances {
    changed: std::sync::Mutex<Vec<(Partition, bool)>>,
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (list, assigned) = match rebalance {
            Rebalance::Assign(list) => (list, true),
            Rebalance::Revoke(list) => (list, false),
            Rebalance::Error(_) => return,
        };
        let mut changed = self.changed.lock().expect("never poisoned");
        for element in list.elements() {
            changed.push((Partition { topic: element.topic().to_owned(), index: element.partition() }, assigned));
        }
    }
}

/// After the first record of a poll, how long the poll goes on collecting records.
const LINGER: Duration = Duration::from_millis(5);

impl KafkaSubscription {
    /// Joins `group`; a partition the group has no offset for starts at its start, or at its
    /// end when `from_now` (see [`start_group_at_end`]).
    pub(super) async fn join(bus: &KafkaBus, group: &str, from_now: bool) -> Result<Self, BusError> {
        let dead_letter_topic = bus.topics.dead_letters();
        create_topics(
            &bus.brokers,
            &[&bus.topics.messages, &bus.topics.workspaces, &dead_letter_topic],
            bus.partitions,
        )
        .await?;
        if from_now {
            // Best effort: without it, the group's members read a partition it has no offset
            // for from its end as they find it, as Kafka does by default.
            match tokio::time::timeout(GROUP_START_WAIT, start_group_at_end(bus, group)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(group, %error, "cannot commit the group's starting offsets"),
                Err(_) => tracing::warn!(group, "the group's starting offsets were not committed in time"),
            }
        }
        let reset = if from_now { "latest" } else { "earliest" };
        let consumer: StreamConsumer<Rebalances> = ClientConfig::new()
            .set("bootstrap.servers", &bus.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            // Where reading starts when the group has no offset; a projector seeks to its own.
            .set("auto.offset.reset", reset)
            .set("partition.assignment.strategy", "cooperative-sticky")
            // A dead member's partitions move to the others within this.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .create_with_context(Rebalances::default())
            .map_err(unavailable)?;
        consumer.subscribe(&[&bus.topics.messages, &bus.topics.workspaces]).map_err(unavailable)?;
        let dead_letters: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bus.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .create()
            .map_err(unavailable)?;
        Ok(KafkaSubscription {
            consumer: Arc::new(consumer),
            dead_letters,
            topics: bus.topics.clone(),
            next: Default::default(),
            revoked: Vec::new(),
        })
    }
}

/// Gives `group` a committed offset, the partition's end, on each partition it has none for,
/// unless it has members (the broker refuses a commit from outside then, and the members own
/// the offsets). A group read from now then starts where it was first joined, kept by the
/// broker: a partition that moves to another member before its first member committed anything
/// is read on from there, not from the end as it is when the new member gets it (which would
/// skip what was published in between).
pub(super) async fn start_group_at_end(bus: &KafkaBus, group: &str) -> Result<(), BusError> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bus.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(unavailable)?;
    let mut all = TopicPartitionList::new();
    for partition in bus.partitions_on_broker().await? {
        all.add_partition(&partition.topic, partition.index);
    }
    let group = group.to_owned();
    // The client's calls block: not on this runtime's threads.
    tokio::task::spawn_blocking(move || {
        let committed = consumer.committed_offsets(all, super::TIMEOUT).map_err(unavailable)?;
        let mut ends = TopicPartitionList::new();
        for element in committed.elements().iter().filter(|e| e.error().is_ok() && e.offset() == Offset::Invalid) {
            let (topic, index) = (element.topic(), element.partition());
            let (_, end) = consumer.fetch_watermarks(topic, index, super::TIMEOUT).map_err(unavailable)?;
            ends.add_partition_offset(topic, index, Offset::Offset(end)).map_err(unavailable)?;
        }
        if ends.count() == 0 {
            return Ok(());
        }
        match consumer.commit(&ends, CommitMode::Sync) {
            Ok(()) => Ok(()),
            // The group has members: they own its offsets.
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress,
            )) => {
                tracing::debug!(group, "the group has members: its starting offsets are theirs");
                Ok(())
            }
            Err(error) => Err(unavailable(error)),
        }
    })
    .await
    .map_err(unavailable)?
}

/// How long joining a group read from now waits for its starting offsets to be committed.
const GROUP_START_WAIT: Duration = Duration::from_secs(15);

#[async_trait]
impl crate::Subscription for KafkaSubscription {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<(Partition, Record)>, BusError> {
        let mut records = Vec::new();
        // The first record may take `wait`; the rest must come within LINGER of it, so that a
        // steady trickle of records does not hold a batch back until it is full.
        let mut deadline = tokio::time::Instant::now() + wait;
        while records.len() < max {
            let Ok(message) = tokio::time::timeout_at(deadline, self.consumer.recv()).await else { break };
            let message = message.map_err(unavailable)?;
            // A partition assigned or taken away starts over from the group's offset.
            for (partition, assigned) in self.consumer.context().changed.lock().expect("never poisoned").drain(..) {
                self.next.remove(&partition);
                if !assigned {
                    self.revoked.push(partition);
                }
            }
            let partition = Partition { topic: message.topic().to_owned(), index: message.partition() };
            let offset = message.offset() as u64;
            if let Some(expected) = self.next.insert(partition.clone(), offset + 1)
                && offset != expected
            {
                self.next.remove(&partition);
                return Err(BusError::Unavailable(format!(
                    "{}/{}: expected offset {expected}, read {offset}: records were deleted (retention) or the \
                     topic was made again; the read model must be rebuilt",
                    partition.topic, partition.index
                )));
            }
            records.push((partition, record_of(&message)));
            if records.len() == 1 {
                deadline = tokio::time::Instant::now() + LINGER;
            }
        }
        Ok(records)
    }

    fn revoked(&mut self) -> Vec<Partition> {
        std::mem::take(&mut self.revoked)
    }

    async fn seek(&mut self, partition: &Partition, after: Option<u64>) -> Result<(), BusError> {
        let offset = after.map_or(Offset::Beginning, |offset| Offset::Offset(offset as i64 + 1));
        let (consumer, sought) = (self.consumer.clone(), partition.clone());
        // A seek waits for the fetcher to restart there (and so drops what it fetched before).
        tokio::task::spawn_blocking(move || {
            consumer.seek(&sought.topic, sought.index, offset, Duration::from_secs(10))
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        match after {
            Some(after) => self.next.insert(partition.clone(), after + 1),
            None => self.next.remove(partition),
        };
        Ok(())
    }

    fn commit(&mut self, done: &[(Partition, u64)]) {
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in done {
            // Kafka's committed offset is the next one to read.
            let next = Offset::Offset(*offset as i64 + 1);
            if offsets.add_partition_offset(&partition.topic, partition.index, next).is_err() {
                return;
            }
        }
        if let Err(error) = self.consumer.commit(&offsets, CommitMode::Async) {
            tracing::debug!(%error, "could not commit offsets to the group (a hint only)");
        }
    }

    async fn dead_letter(
        &mut self,
        partition: &Partition,
        record: &Record,
        model: &str,
        error: &str,
    ) -> Result<(), BusError> {
        let (key, payload, event_type, event_id) = match record {
            Record::Event { event, .. } => (
                Some(event.channel_id.map_or(event.stream_id.clone(), |c| c.to_string())),
                serde_json::to_vec(event).expect("envelopes serialize"),
                event.event.type_name().to_owned(),
                event.event_id.to_string(),
            ),
            Record::Undecodable { key, payload, .. } => (key.clone(), payload.clone(), String::new(), String::new()),
            Record::Watermark { .. } => return Ok(()),
        };
        let (source_partition, source_offset) = (partition.index.to_string(), record.offset().to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "error", value: Some(error) })
            .insert(Header { key: "model", value: Some(model) })
            .insert(Header { key: "type", value: Some(&event_type) })
            .insert(Header { key: "event_id", value: Some(&event_id) })
            .insert(Header { key: "source_topic", value: Some(&partition.topic) })
            .insert(Header { key: "source_partition", value: Some(&source_partition) })
            .insert(Header { key: "source_offset", value: Some(&source_offset) });
        let topic = self.topics.dead_letters();
        let mut letter = FutureRecord::<str, [u8]>::to(&topic).payload(payload.as_slice()).headers(headers);
        if let Some(key) = &key {
            letter = letter.key(key.as_str());
        }
        self.dead_letters.send(letter, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| unavailable(e))
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        // Leaving the group waits for the broker: not on the runtime's threads.
        let consumer = self.consumer.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || drop(consumer));
        }
    }
}
