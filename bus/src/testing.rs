//! What tests of the bus share: reading both topics back as a consumer would.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::Value;
use uuid::Uuid;

use crate::Topics;

/// What a consumer read back from both topics.
#[derive(Default)]
pub struct Read {
    /// (topic, partition, key, envelope) in the order each partition delivered them.
    pub events: Vec<(String, i32, Option<String>, Value)>,
    /// The highest watermark seen on each (topic, partition).
    pub watermarks: HashMap<(String, i32), u64>,
    /// Every watermark as read: (topic, partition, events read before it, position).
    pub watermark_log: Vec<(String, i32, usize, u64)>,
}

/// Reads both topics from the start until every partition has a watermark of at least `head`.
pub async fn read_until(brokers: &str, topics: &Topics, partitions: i32, head: u64) -> Read {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{}", Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topics.messages, &topics.workspaces]).unwrap();
    let mut read = Read::default();
    let all_partitions = |read: &Read| {
        [&topics.messages, &topics.workspaces].iter().all(|topic| {
            (0..partitions).all(|p| read.watermarks.get(&(topic.to_string(), p)).is_some_and(|w| *w >= head))
        })
    };
    let reading = async {
        while !all_partitions(&read) {
            let message = consumer.recv().await.expect("consume");
            let header = |name: &str| {
                message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == name))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            let value: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
            let at = (message.topic().to_owned(), message.partition());
            if header("type").as_deref() == Some("Watermark") {
                assert!(message.key().is_none(), "watermarks have no key");
                let position: u64 = value["position"].as_str().unwrap().parse().unwrap();
                read.watermark_log.push((at.0.clone(), at.1, read.events.len(), position));
                let highest = read.watermarks.entry(at).or_default();
                *highest = (*highest).max(position);
            } else {
                assert_eq!(header("event_id").as_deref(), value["event_id"].as_str(), "event_id header");
                assert_eq!(header("type").as_deref(), value["type"].as_str(), "type header");
                assert_eq!(
                    header("schema_version"),
                    Some(value["schema_version"].to_string()),
                    "schema_version header"
                );
                let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned());
                read.events.push((at.0, at.1, key, value));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(90), reading).await.expect("every partition reached the head");
    read
}

impl Read {
    /// API.md's watermark promise: when a watermark of W is read on a partition, every event of
    /// that partition with a position up to W has been read there before it.
    pub fn assert_watermarks_follow_their_events(&self) {
        let mut on_partition: HashMap<(&str, i32), Vec<(usize, u64)>> = HashMap::new();
        for (index, (topic, partition, _, event)) in self.events.iter().enumerate() {
            let position = event["global_position"].as_u64().expect("a position");
            on_partition.entry((topic.as_str(), *partition)).or_default().push((index, position));
        }
        for (topic, partition, read_before, watermark) in &self.watermark_log {
            for (index, position) in on_partition.get(&(topic.as_str(), *partition)).into_iter().flatten() {
                if *position <= *watermark {
                    let earlier = on_partition[&(topic.as_str(), *partition)]
                        .iter()
                        .any(|(i, p)| p == position && i < read_before);
                    assert!(
                        earlier,
                        "{topic}/{partition}: watermark {watermark} read before event {position} (at {index})"
                    );
                }
            }
        }
    }
}

// ------------------------------------------------------------------ the EventBus contract

/// Records per read in the contract: small, so that reads end mid-partition.
const PAGE: usize = 7;

/// Everything a partition delivers from `after` until a watermark of at least `head`; offsets
/// must grow.
async fn drain(
    bus: &dyn crate::EventBus,
    partition: &crate::Partition,
    after: Option<u64>,
    head: u64,
) -> Vec<crate::Record> {
    let mut records: Vec<crate::Record> = Vec::new();
    let mut offset = after;
    let reading = async {
        loop {
            let page = bus.read(partition, offset, PAGE, Duration::from_secs(2)).await.expect("read the bus");
            assert!(page.len() <= PAGE, "a read returns at most what was asked");
            for record in &page {
                assert!(offset.is_none_or(|o| record.offset() > o), "{partition:?}: offsets grow");
                offset = Some(record.offset());
            }
            let done = page.iter().any(|r| matches!(r, crate::Record::Watermark { position, .. } if *position >= head));
            records.extend(page);
            if done {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(90), reading).await.expect("the partition reached the head");
    records
}

/// Every partition delivers its events (and only its own, as Kafka's partitioner puts them) in
/// position order, every stored event at least once, and no watermark before an event it
/// covers; a partition without events still reaches the head.
pub async fn every_partition_delivers_its_events_in_order_then_a_watermark(
    bus: &dyn crate::EventBus,
    stored: &[quikapp_domain::Envelope],
    topics: &Topics,
    partitions: i32,
) {
    let head = stored.last().expect("events").global_position;
    let mut delivered = std::collections::HashSet::new();
    for partition in bus.partitions() {
        let mut seen = std::collections::HashSet::new();
        let mut last = 0;
        for record in drain(bus, &partition, None, head).await {
            match record {
                crate::Record::Event { event, .. } => {
                    assert_eq!(crate::partition_of(&event, topics, partitions), partition, "the event's partition");
                    if seen.insert(event.global_position) {
                        assert!(event.global_position > last, "{partition:?}: {} after {last}", event.global_position);
                        last = event.global_position;
                    }
                    delivered.insert(event.event_id);
                }
                crate::Record::Undecodable { offset, error, .. } => panic!("{partition:?}: {offset}: {error}"),
                crate::Record::Watermark { position, .. } => {
                    let missing = stored.iter().find(|e| {
                        e.global_position <= position
                            && crate::partition_of(e, topics, partitions) == partition
                            && !seen.contains(&e.global_position)
                    });
                    assert!(missing.is_none(), "{partition:?}: watermark {position} before {missing:?}");
                }
            }
        }
    }
    let stored_ids: std::collections::HashSet<Uuid> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(delivered, stored_ids, "every stored event, nothing else");
}

/// Reading after an offset delivers the records that follow it: a reader that restarts from
/// its checkpoint misses nothing.
pub async fn reading_after_an_offset_delivers_what_follows(
    bus: &dyn crate::EventBus,
    stored: &[quikapp_domain::Envelope],
) {
    let head = stored.last().expect("events").global_position;
    for partition in bus.partitions() {
        let events = |records: Vec<crate::Record>| -> Vec<Uuid> {
            records
                .into_iter()
                .filter_map(|r| match r {
                    crate::Record::Event { event, .. } => Some(event.event_id),
                    crate::Record::Watermark { .. } | crate::Record::Undecodable { .. } => None,
                })
                .collect()
        };
        let all = drain(bus, &partition, None, head).await;
        let event_offsets: Vec<u64> =
            all.iter().filter(|r| matches!(r, crate::Record::Event { .. })).map(crate::Record::offset).collect();
        // From the middle event, and from the last one: the rest, then a watermark of the head.
        for at in [event_offsets.len() / 2, event_offsets.len().saturating_sub(1)] {
            let Some(&checkpoint) = event_offsets.get(at) else { continue };
            let expected: Vec<Uuid> = events(all.clone()).into_iter().skip(at + 1).collect();
            assert_eq!(events(drain(bus, &partition, Some(checkpoint), head).await), expected, "{partition:?}");
        }
    }
}

/// A group subscribed from now reads nothing stored before it joined, and what is stored after:
/// `append` stores one more event (published by the relay, if there is one) and answers it.
pub async fn a_group_from_now_reads_only_what_follows<F: std::future::Future<Output = quikapp_domain::Envelope>>(
    bus: &dyn crate::EventBus,
    stored: &[quikapp_domain::Envelope],
    append: F,
) {
    let head = stored.last().expect("events").global_position;
    let mut subscription = bus.subscribe_from_now(&format!("test-{}", Uuid::now_v7())).await.unwrap();
    let mut heard = std::collections::HashSet::new();
    let next = async |subscription: &mut Box<dyn crate::Subscription>| {
        let polled = tokio::time::timeout(Duration::from_secs(60), subscription.poll(100, Duration::from_secs(1)));
        let records = polled.await.expect("a poll within a minute").unwrap();
        for (_, record) in &records {
            if let crate::Record::Event { event, .. } = record {
                assert!(event.global_position > head, "{} was stored before the group joined", event.global_position);
            }
        }
        records
    };
    // Every partition placed at its end (a watermark read on each) before the next event.
    while heard.len() < bus.partitions().len() {
        heard.extend(next(&mut subscription).await.into_iter().map(|(partition, _)| partition));
    }
    let appended = append.await;
    loop {
        let records = next(&mut subscription).await;
        if records
            .iter()
            .any(|(_, r)| matches!(r, crate::Record::Event { event, .. } if event.event_id == appended.event_id))
        {
            return;
        }
    }
}

/// A group subscribed from now starts where it was first joined, and the broker keeps that
/// place: a member joining after the first one left without reading anything reads what was
/// published meanwhile (a new member's own "now" would skip it). `publish` stores one more
/// event, waits for it to be on the bus, and answers it.
pub async fn a_group_from_now_goes_on_from_where_it_was_first_joined<F>(bus: &dyn crate::EventBus, publish: F)
where
    F: std::future::Future<Output = quikapp_domain::Envelope>,
{
    let group = format!("test-{}", Uuid::now_v7());
    drop(bus.subscribe_from_now(&group).await.unwrap());
    let published = publish.await;
    let mut subscription = bus.subscribe_from_now(&group).await.unwrap();
    let read = async {
        loop {
            let records = subscription.poll(100, Duration::from_secs(1)).await.unwrap();
            if records
                .iter()
                .any(|(_, r)| matches!(r, crate::Record::Event { event, .. } if event.event_id == published.event_id))
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("the event published meanwhile, within a minute");
}

// ------------------------------------------------------------------ an in-process relay

/// Topics of a name no other test uses.
pub fn fresh_topics() -> Topics {
    let id = Uuid::now_v7().simple();
    Topics { messages: format!("test-{id}-messages"), workspaces: format!("test-{id}-workspaces") }
}

/// A relay running in this process; it stops when this is dropped or its task is aborted.
pub struct RunningRelay {
    _stop: tokio::sync::oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts a relay over `store` publishing through `publisher`, ticking every 200 ms.
pub fn spawn_relay(
    store: std::sync::Arc<quikapp_commands::store::PostgresStore>,
    publisher: std::sync::Arc<dyn crate::Publisher>,
) -> RunningRelay {
    let relay = crate::relay::Relay {
        pool: store.pool().clone(),
        store,
        publisher,
        config: crate::relay::RelayConfig { tick: Duration::from_millis(200), ..Default::default() },
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    RunningRelay { _stop: stop, task }
}

/// Waits (bounded) until the relay's checkpoint in `pool` reaches `position`.
pub async fn checkpoint_reaches(pool: &sqlx::PgPool, position: u64) {
    let reached = async {
        while crate::relay::checkpoint(pool, "kafka").await.unwrap() < position {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), reached).await.expect("the relay reached the position");
}
