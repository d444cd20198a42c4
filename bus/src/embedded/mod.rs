//! The embedded bus of `quikapp dev`: the event store's own log, seen through the same
//! partitions as Kafka's topics. Nothing is copied and no relay runs: a partition's records
//! are the log's events that [`partition_of`] puts there, followed by a watermark of the last
//! position scanned. An event at position P has offset 2P and a watermark of P has offset
//! 2P+1, so offsets grow along a partition and a reader that stored the offset of the head's
//! event is still handed the watermark that follows it. It keeps every promise of
//! [`EventBus`], with no duplicates at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use quikapp_commands::store::{EventStore, StoreError};

use crate::{BusError, EventBus, Partition, Record, Subscription, Topics, partition_of};

pub struct EmbeddedBus {
    store: Arc<dyn EventStore>,
    topics: Topics,
    partitions: i32,
    /// Events scanned per read, across all partitions.
    scan: u32,
}

impl EmbeddedBus {
    pub fn new(store: Arc<dyn EventStore>, topics: Topics, partitions: i32) -> Self {
        EmbeddedBus { store, topics, partitions, scan: 5_000 }
    }

    /// Scans `scan` events per read (small values let tests cross many pages).
    pub fn scanning(mut self, scan: u32) -> Self {
        self.scan = scan.max(1);
        self
    }
}

fn event_offset(position: u64) -> u64 {
    position * 2
}

fn watermark(position: u64) -> Record {
    Record::Watermark { offset: position * 2 + 1, position }
}

#[async_trait]
impl EventBus for EmbeddedBus {
    fn partitions(&self) -> Vec<Partition> {
        self.topics.partitions(self.partitions)
    }

    async fn read(
        &self,
        partition: &Partition,
        after: Option<u64>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>, BusError> {
        let unavailable = |e: StoreError| BusError::Unavailable(e.to_string());
        let max = max.max(1);
        // The position read up to, and whether its watermark is still owed.
        let from = after.map_or(0, |offset| offset / 2);
        let watermark_owed = after.is_some_and(|offset| offset % 2 == 0);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let scanned = self.store.read_all(from, self.scan).await.map_err(unavailable)?;
            let Some(last) = scanned.last().map(|e| e.global_position) else {
                if watermark_owed {
                    return Ok(vec![watermark(from)]);
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
                .map(|event| Record::Event { offset: event_offset(event.global_position), event })
                .collect();
            // Everything of this partition up to `last` is in the page, unless `max` cut it.
            if records.len() < max {
                records.push(watermark(last));
            }
            return Ok(records);
        }
    }

    /// The one member of every group: all partitions, read in one pass over the log.
    async fn subscribe(&self, _group: &str) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(self.subscription(HashMap::new())))
    }

    /// From the log's head, its events delivered as if to a reader already there.
    async fn subscribe_from_now(&self, _group: &str) -> Result<Box<dyn Subscription>, BusError> {
        let head = self.store.head().await.map_err(|e| BusError::Unavailable(e.to_string()))?;
        let delivered = self.partitions().into_iter().map(|partition| (partition, event_offset(head))).collect();
        Ok(Box::new(self.subscription(delivered)))
    }
}

impl EmbeddedBus {
    fn subscription(&self, delivered: HashMap<Partition, u64>) -> EmbeddedSubscription {
        EmbeddedSubscription {
            store: self.store.clone(),
            partitions: self.partitions(),
            topics: self.topics.clone(),
            count: self.partitions,
            delivered,
        }
    }
}

/// Reads the log once for every partition; remembers the last offset delivered on each.
struct EmbeddedSubscription {
    store: Arc<dyn EventStore>,
    partitions: Vec<Partition>,
    topics: Topics,
    count: i32,
    delivered: HashMap<Partition, u64>,
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<(Partition, Record)>, BusError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // The position every partition has been delivered up to.
            let from = self.partitions.iter().map(|p| self.delivered.get(p).map_or(0, |offset| offset / 2)).min();
            let from = from.unwrap_or(0);
            let scanned =
                self.store.read_all(from, max.max(1) as u32).await.map_err(|e| BusError::Unavailable(e.to_string()))?;
            let head = scanned.last().map_or(from, |e| e.global_position);
            let mut records = Vec::new();
            for event in scanned {
                let partition = partition_of(&event, &self.topics, self.count);
                let offset = event_offset(event.global_position);
                if self.delivered.get(&partition).is_none_or(|done| offset > *done) {
                    self.delivered.insert(partition.clone(), offset);
                    records.push((partition, Record::Event { offset, event }));
                }
            }
            if head > 0 {
                for partition in &self.partitions {
                    let mark = watermark(head);
                    if self.delivered.get(partition).is_none_or(|done| mark.offset() > *done) {
                        self.delivered.insert(partition.clone(), mark.offset());
                        records.push((partition.clone(), mark));
                    }
                }
            }
            if !records.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(records);
            }
            // The embedded store has no notification: look again shortly, until the deadline.
            tokio::time::sleep(Duration::from_millis(10).min(wait)).await;
        }
    }

    async fn seek(&mut self, partition: &Partition, after: Option<u64>) -> Result<(), BusError> {
        match after {
            Some(offset) => self.delivered.insert(partition.clone(), offset),
            None => self.delivered.remove(partition),
        };
        Ok(())
    }

    fn commit(&mut self, _done: &[(Partition, u64)]) {}

    fn revoked(&mut self) -> Vec<Partition> {
        Vec::new() // the only member keeps every partition
    }

    async fn dead_letter(
        &mut self,
        partition: &Partition,
        record: &Record,
        model: &str,
        error: &str,
    ) -> Result<(), BusError> {
        // The embedded default has no dead-letter topic: the log keeps the event, this says which.
        tracing::error!(?partition, offset = record.offset(), model, error, "dead-lettered an event");
        Ok(())
    }
}
