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
