//! The embedded bus of `quikapp dev`: the event store's own log, seen through the same
//! partitions as Kafka's topics. Nothing is copied and no relay runs: a partition's records
//! are the log's events that [`partition_of`] puts there, each at its global position as its
//! offset, followed by a watermark of the last position scanned. It keeps every promise of
//! [`EventBus`], with no duplicates at all.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use quikapp_commands::store::EventStore;

use crate::{BusError, EventBus, Partition, Record, Topics, partition_of};

/// Events scanned per read, across all partitions.
const SCAN: u32 = 5_000;

pub struct EmbeddedBus {
    store: Arc<dyn EventStore>,
    topics: Topics,
    partitions: i32,
}

impl EmbeddedBus {
    pub fn new(store: Arc<dyn EventStore>, topics: Topics, partitions: i32) -> Self {
        EmbeddedBus { store, topics, partitions }
    }
}

#[async_trait]
impl EventBus for EmbeddedBus {
    fn partitions(&self) -> Vec<Partition> {
        [&self.topics.messages, &self.topics.workspaces]
            .into_iter()
            .flat_map(|topic| (0..self.partitions).map(|index| Partition { topic: topic.clone(), index }))
            .collect()
    }

    async fn read(
        &self,
        partition: &Partition,
        after: Option<u64>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>, BusError> {
        let unavailable = |e: quikapp_commands::store::StoreError| BusError::Unavailable(e.to_string());
        let from = after.unwrap_or(0);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let scanned = self.store.read_all(from, SCAN).await.map_err(unavailable)?;
            let Some(last) = scanned.last().map(|e| e.global_position) else {
                // Nothing new in the log: the watermark is the head, if it moved past `after`.
                let head = self.store.head().await.map_err(unavailable)?;
                if head > from {
                    continue; // appended meanwhile
                }
                if after.is_none_or(|after| head > after) && head > 0 {
                    return Ok(vec![Record::Watermark { offset: head, position: head }]);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(vec![]);
                }
                // The embedded store has no notification: look again shortly, until the deadline.
                tokio::time::sleep(Duration::from_millis(20).min(wait)).await;
                continue;
            };
            let mut records: Vec<Record> = scanned
                .into_iter()
                .filter(|event| partition_of(event, &self.topics, self.partitions) == *partition)
                .take(max)
                .map(|event| Record::Event { offset: event.global_position, event })
                .collect();
            // Scanned up to `last` (or, when `max` cut it short, up to the last event kept).
            let watermark = match records.len() == max {
                true => records.last().map_or(last, Record::offset),
                false => last,
            };
            if records.len() < max {
                records.push(Record::Watermark { offset: watermark, position: watermark });
            }
            return Ok(records);
        }
    }
}
