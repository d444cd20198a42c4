//! The Kafka adapter of [`Publisher`]: librdkafka's idempotent producer with the gapless
//! guarantee (acks=all, so a retry inside the producer never duplicates, reorders or skips
//! within a partition), lz4 batches, and Java's murmur2 partitioner, so that every client
//! computes the same partition for a channel.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use quikapp_commands::store::EncodedEvent;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::{Acks, BusError, Publisher, Route, Topics, route, watermark_value};

mod consumer;

/// How to reach Kafka and what to create there.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    pub topics: Topics,
    /// Partitions of each topic when the relay creates it (an existing topic keeps its own).
    pub partitions: i32,
    /// librdkafka producer options, applied over the defaults here.
    pub options: BTreeMap<String, String>,
}

pub struct KafkaPublisher {
    /// Replaced by a new one after a fatal error (see [`KafkaPublisher::usable_producer`]).
    producer: std::sync::RwLock<FutureProducer>,
    config: KafkaConfig,
    /// Partitions of (messages, workspaces), as the broker reports them.
    partitions: (i32, i32),
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Settings the relay's promises rest on, which `options` may not change.
const FIXED: [&str; 5] =
    ["enable.idempotence", "acks", "partitioner", "enable.gapless.guarantee", "message.timeout.ms"];

impl KafkaPublisher {
    /// Connects, creates the topics when missing, and reads their partition counts.
    pub async fn connect(config: &KafkaConfig) -> Result<Self, BusError> {
        if let Some(key) = config.options.keys().find(|k| FIXED.contains(&k.as_str()) || *k == "delivery.timeout.ms") {
            return Err(BusError::Unavailable(format!("the relay's Kafka option {key} cannot be changed")));
        }
        let producer = create_producer(config)?;
        create_topics(&config.brokers, &[&config.topics.messages, &config.topics.workspaces], config.partitions)
            .await?;
        let mut publisher =
            KafkaPublisher { producer: std::sync::RwLock::new(producer), config: config.clone(), partitions: (0, 0) };
        publisher.partitions = (publisher.partition_count(&config.topics.messages).await?, {
            publisher.partition_count(&config.topics.workspaces).await?
        });
        Ok(publisher)
    }

    /// The producer, unless it hit a fatal error (which fails every record after it). Then it
    /// is replaced and this call fails, so that nothing goes out on the new producer while
    /// records of the old one may still be pending: a watermark or a later event sent there
    /// could overtake them. The caller starts over from its checkpoint.
    fn usable_producer(&self) -> Result<FutureProducer, BusError> {
        let current = self.producer.read().expect("never poisoned").clone();
        let Some((code, reason)) = current.client().fatal_error() else { return Ok(current) };
        tracing::warn!(?code, %reason, "the Kafka producer failed fatally; starting a new one");
        *self.producer.write().expect("never poisoned") = create_producer(&self.config)?;
        Err(BusError::Unavailable(format!("the Kafka producer failed fatally: {reason}")))
    }

    /// Makes the current producer fail fatally, as an idempotence error from the broker would.
    #[cfg(feature = "testing")]
    pub fn fail_fatally(&self) {
        let producer = self.producer.read().expect("never poisoned").clone();
        let error = rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER;
        // SAFETY: the client lives through the call, and librdkafka copies the reason.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(producer.client().native_ptr(), error, c"a test".as_ptr());
        }
    }

    /// The topic's partitions, waiting (within [`TIMEOUT`]) for a just-created topic's metadata.
    async fn partition_count(&self, topic: &str) -> Result<i32, BusError> {
        let (producer, topic) = (self.usable_producer()?, topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + TIMEOUT;
            loop {
                let metadata = producer.client().fetch_metadata(Some(&topic), TIMEOUT).map_err(unavailable)?;
                let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len() as i32);
                match partitions {
                    0 if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    0 => return Err(BusError::Unavailable(format!("topic {topic} has no partitions"))),
                    n => return Ok(n),
                }
            }
        })
        .await
        .map_err(|e| BusError::Unavailable(e.to_string()))?
    }

    /// Hands a record to the producer's queue, waiting while the queue is full.
    async fn enqueue(
        &self,
        producer: &FutureProducer,
        mut record: FutureRecord<'_, str, [u8]>,
    ) -> Result<DeliveryFuture, BusError> {
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await; // the producer drains meanwhile
                }
                Err((error, _)) => return Err(unavailable(error)),
            }
        }
    }
}

async fn acknowledged(deliveries: Vec<DeliveryFuture>) -> Result<(), BusError> {
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => return Err(unavailable(error)),
            Err(_) => return Err(BusError::Unavailable("the producer dropped a record".into())),
        }
    }
    Ok(())
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn send(&self, events: &[EncodedEvent], watermark: Option<u64>) -> Result<Acks, BusError> {
        let producer = self.usable_producer()?;
        let mut deliveries = Vec::with_capacity(events.len() + 2 * PARTITIONS_HINT);
        for event in events {
            let (topic, key) = match route(event.channel_id, event.workspace_id, event.actor_id) {
                Route::Messages { channel_id } => (&self.config.topics.messages, channel_id.to_string()),
                Route::Workspaces { key } => (&self.config.topics.workspaces, key.to_string()),
            };
            let (schema_version, event_id) = (event.schema_version.to_string(), event.event_id.to_string());
            let headers = OwnedHeaders::new()
                .insert(Header { key: "type", value: Some(&event.event_type) })
                .insert(Header { key: "schema_version", value: Some(&schema_version) })
                .insert(Header { key: "event_id", value: Some(&event_id) });
            let record = FutureRecord::to(topic).key(key.as_str()).payload(event.json.as_bytes()).headers(headers);
            deliveries.push(self.enqueue(&producer, record).await?);
        }
        // The idempotent producer keeps each partition in the order records were handed over,
        // so a watermark handed over after the events never overtakes them on their partition.
        let Some(watermark) = watermark else { return Ok(Box::pin(acknowledged(deliveries))) };
        let value = watermark_value(watermark);
        let topics =
            [(&self.config.topics.messages, self.partitions.0), (&self.config.topics.workspaces, self.partitions.1)];
        for (topic, partitions) in topics {
            for partition in 0..partitions {
                let headers = OwnedHeaders::new().insert(Header { key: "type", value: Some("Watermark") });
                let record = FutureRecord::<str, [u8]>::to(topic)
                    .partition(partition)
                    .payload(value.as_bytes())
                    .headers(headers);
                deliveries.push(self.enqueue(&producer, record).await?);
            }
        }
        Ok(Box::pin(acknowledged(deliveries)))
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.partition_count(&self.config.topics.messages).await.map(|_| ())
    }
}

/// Creates the topics that do not exist yet, with `partitions` each.
async fn create_topics(brokers: &str, names: &[&str], partitions: i32) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().map_err(unavailable)?;
    // Replication -1: the broker's default.replication.factor.
    let topics: Vec<NewTopic> =
        names.iter().map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(-1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    for result in admin.create_topics(&topics, &options).await.map_err(unavailable)? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(BusError::Unavailable(format!("creating {topic}: {code}"))),
        }
    }
    Ok(())
}

/// Room for the watermarks of two 12-partition topics.
const PARTITIONS_HINT: usize = 12;

/// The idempotent producer with the gapless guarantee and no delivery timeout: librdkafka
/// retries a record until it is delivered, in order, and a record it cannot deliver fails the
/// producer fatally rather than leaving a hole that later records and watermarks would cover.
fn create_producer(config: &KafkaConfig) -> Result<FutureProducer, BusError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("enable.gapless.guarantee", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("compression.type", "lz4")
        .set("linger.ms", "2")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("partitioner", "murmur2_random");
    for (key, value) in &config.options {
        client.set(key, value);
    }
    client.create().map_err(unavailable)
}

fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(error.to_string())
}

/// The consumer side of the Kafka adapter: [`crate::EventBus::read`] reads one partition from
/// an offset with a consumer of its own (no group, nothing committed), which suits occasional
/// reads; [`crate::EventBus::subscribe`] joins a consumer group, which projectors use.
pub struct KafkaBus {
    pub brokers: String,
    pub topics: Topics,
    pub partitions: i32,
}

impl KafkaBus {
    /// Every partition of both topics, as the broker reports them (an error if a topic is
    /// missing): what a reader must have watermarks from before it has applied a position.
    pub async fn partitions_on_broker(&self) -> Result<Vec<crate::Partition>, BusError> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create().map_err(unavailable)?;
        let topics = [self.topics.messages.clone(), self.topics.workspaces.clone()];
        tokio::task::spawn_blocking(move || {
            let mut partitions = Vec::new();
            for topic in topics {
                let metadata = consumer.fetch_metadata(Some(&topic), TIMEOUT).map_err(unavailable)?;
                let count = metadata.topics().first().map_or(0, |t| t.partitions().len() as i32);
                if count == 0 {
                    return Err(BusError::Unavailable(format!("topic {topic} does not exist yet")));
                }
                partitions.extend((0..count).map(|index| crate::Partition { topic: topic.clone(), index }));
            }
            Ok(partitions)
        })
        .await
        .map_err(unavailable)?
    }
}

#[async_trait]
impl crate::EventBus for KafkaBus {
    fn partitions(&self) -> Vec<crate::Partition> {
        self.topics.partitions(self.partitions)
    }

    async fn read(
        &self,
        partition: &crate::Partition,
        after: Option<u64>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<crate::Record>, BusError> {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::{Offset, TopicPartitionList};

        // The partition is assigned and the offsets are the reader's (nothing is committed to
        // the group). An offset out of range is an error, never a silent jump to the end.
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", "quikapp-reader")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "error")
            .create()
            .map_err(unavailable)?;
        let start = after.map_or(Offset::Beginning, |offset| Offset::Offset(offset as i64 + 1));
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&partition.topic, partition.index, start).map_err(unavailable)?;
        consumer.assign(&assignment).map_err(unavailable)?;
        let mut records = Vec::new();
        // The first record may take up to `wait`; once records flow, a short pause ends the read.
        let mut patience = wait;
        while records.len() < max {
            let Ok(message) = tokio::time::timeout(patience, consumer.recv()).await else { break };
            records.push(consumer::record_of(&message.map_err(unavailable)?));
            patience = Duration::from_millis(100);
        }
        // Closing a consumer may wait for the broker: not on this runtime's threads.
        tokio::task::spawn_blocking(move || drop(consumer));
        Ok(records)
    }

    async fn subscribe(&self, group: &str) -> Result<Box<dyn crate::Subscription>, BusError> {
        Ok(Box::new(consumer::KafkaSubscription::join(self, group, false).await?))
    }

    async fn subscribe_from_now(&self, group: &str) -> Result<Box<dyn crate::Subscription>, BusError> {
        Ok(Box::new(consumer::KafkaSubscription::join(self, group, true).await?))
    }
}
