//! The realtime consumer group: carries what it reads of the event topics to the fan-out,
//! one slice per poll. Its members share the partitions, so each record is published by one
//! of them (twice at most around a crash or a rebalance: the gateways drop the repeats).

use std::sync::Arc;
use std::time::Duration;

use quikapp_bus::{BusError, EventBus, Partition, Record, Subscription};

use crate::fanout::{Fanout, Item, Slice};

pub struct Forwarder {
    pub bus: Arc<dyn EventBus>,
    pub fanout: Arc<dyn Fanout>,
    /// The consumer group (`quikapp-realtime`).
    pub group: String,
    /// Records per poll, at most.
    pub batch_size: usize,
}

impl Forwarder {
    /// Runs until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            () = self.forever() => {}
            () = shutdown => {}
        }
    }

    async fn forever(&self) {
        let mut backoff = Duration::from_millis(500);
        loop {
            // A new group starts at the end: what came before is the store's to replay.
            match self.bus.subscribe_from_now(&self.group).await {
                Ok(subscription) => {
                    let error = self.member(subscription).await;
                    tracing::warn!(group = self.group, %error, "the event bus failed; joining the group again");
                }
                Err(error) => tracing::warn!(group = self.group, %error, "cannot join the consumer group"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn member(&self, mut subscription: Box<dyn Subscription>) -> BusError {
        loop {
            let records = match subscription.poll(self.batch_size, Duration::from_secs(1)).await {
                Ok(records) => records,
                Err(error) => return error,
            };
            subscription.revoked(); // nothing kept per partition: at least once is enough here
            if records.is_empty() {
                continue;
            }
            let mut done: Vec<(Partition, u64)> = Vec::new();
            let mut slice = Slice::default();
            for (partition, record) in records {
                let offset = record.offset();
                let (topic, index) = (partition.topic.clone(), partition.index);
                match record {
                    Record::Event { event, .. } => {
                        slice.records.push(Item::Event { topic, partition: index, event: Box::new(event) })
                    }
                    Record::Watermark { position, .. } => {
                        slice.records.push(Item::Watermark { topic, partition: index, position })
                    }
                    Record::Undecodable { error, .. } => {
                        tracing::warn!(?partition, offset, error, "passed over a record that is not an event");
                    }
                }
                match done.iter_mut().find(|(p, _)| *p == partition) {
                    Some(entry) => entry.1 = offset,
                    None => done.push((partition, offset)),
                }
            }
            self.publish(&slice).await;
            metrics::counter!("quikapp_realtime_published_total").increment(slice.records.len() as u64);
            subscription.commit(&done);
        }
    }

    /// Publishes `slice`, waiting out a fan-out that is down (the bus keeps what comes next).
    async fn publish(&self, slice: &Slice) {
        let mut backoff = Duration::from_millis(100);
        while let Err(error) = self.fanout.publish(slice).await {
            tracing::warn!(%error, retry_in = ?backoff, "cannot publish to the fan-out");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
