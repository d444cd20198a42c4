//! What the benches share: backlogs written to Kafka as the relay writes them, draining one
//! through a projector's runtime, and percentiles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use quikapp_bus::kafka::{KafkaBus, KafkaConfig, KafkaPublisher};
use quikapp_bus::{EventBus, Topics, watermark_value};
use quikapp_domain::Envelope;
use quikapp_domain::event::{MessagePosted, timestamp};
use quikapp_projections::runtime::{Runtime, RuntimeConfig};
use quikapp_projections::{Projector, applied_position};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

pub const PARTITIONS: i32 = 12;

pub fn fresh_topics() -> Topics {
    let id = Uuid::now_v7().simple();
    Topics { messages: format!("bench-{id}-messages"), workspaces: format!("bench-{id}-workspaces") }
}

pub fn envelope(
    position: u64,
    stream_id: String,
    version: u64,
    channel: Uuid,
    event: quikapp_domain::Event,
) -> Envelope {
    Envelope {
        event_id: Uuid::now_v7(),
        schema_version: event.schema_version(),
        event,
        stream_id,
        stream_version: version,
        global_position: position,
        workspace_id: Some(Uuid::nil()),
        channel_id: Some(channel),
        actor_id: Uuid::nil(),
        occurred_at: timestamp::now(),
        correlation_id: Uuid::nil(),
        causation_id: Uuid::nil(),
    }
}

/// A MessagePosted of the bench's usual text at `position`.
pub fn posted(position: u64, message_id: Uuid, channel_id: Uuid, author_id: Uuid) -> Envelope {
    let text = "Standup moved to 10:30, same room.".into();
    let event = MessagePosted { message_id, channel_id, author_id, text, thread_root_id: None };
    envelope(position, format!("message-{message_id}"), 1, channel_id, event.into())
}

/// Writes `events` to the messages topic as the relay would (keyed by channel, headers), then a
/// watermark of the last position on every partition of both topics.
pub async fn backlog(brokers: &str, topics: &Topics, events: impl Iterator<Item = Envelope>) -> Result<u64> {
    let config = KafkaConfig {
        brokers: brokers.to_owned(),
        topics: topics.clone(),
        partitions: PARTITIONS,
        options: Default::default(),
    };
    KafkaPublisher::connect(&config).await?; // creates the topics
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("partitioner", "murmur2_random")
        .create()?;
    let mut last = 0;
    let mut deliveries = Vec::new();
    let mut send = |record: FutureRecord<'_, str, [u8]>| -> Result<()> {
        let mut record = record;
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    return Ok(());
                }
                Err((_, back)) => {
                    record = back;
                    // The queue is full: the producer's own thread drains it meanwhile.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    };
    for event in events {
        last = event.global_position;
        let key = event.channel_id.expect("channel events").to_string();
        let payload = serde_json::to_vec(&event)?;
        let (schema_version, event_id) = (event.schema_version.to_string(), event.event_id.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "type", value: Some(event.event.type_name()) })
            .insert(Header { key: "schema_version", value: Some(&schema_version) })
            .insert(Header { key: "event_id", value: Some(&event_id) });
        send(FutureRecord::to(&topics.messages).key(key.as_str()).payload(payload.as_slice()).headers(headers))?;
    }
    let value = watermark_value(last);
    for topic in [&topics.messages, &topics.workspaces] {
        for partition in 0..PARTITIONS {
            let headers = OwnedHeaders::new().insert(Header { key: "type", value: Some("Watermark") });
            send(FutureRecord::to(topic).partition(partition).payload(value.as_bytes()).headers(headers))?;
        }
    }
    for delivery in deliveries {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(last)
}

/// Runs `projector` over `topics` until it has applied `head`; answers records per second,
/// timed from the first batch stored (so that joining the consumer group, which a broker
/// delays by `group.initial.rebalance.delay.ms`, is not counted).
pub async fn drain(
    brokers: &str,
    batch_size: usize,
    topics: &Topics,
    projector: Arc<dyn Projector>,
    head: u64,
) -> Result<f64> {
    let bus: Arc<dyn EventBus> =
        Arc::new(KafkaBus { brokers: brokers.to_owned(), topics: topics.clone(), partitions: PARTITIONS });
    let config =
        RuntimeConfig { batch_size, group_prefix: format!("bench-{}-", Uuid::now_v7()), ..RuntimeConfig::default() };
    let running = tokio::spawn(Runtime { projector: projector.clone(), bus, config }.run(std::future::pending()));
    let partitions = topics.partitions(PARTITIONS);
    // Records applied so far: Kafka offsets count records, from 0 on each partition.
    let applied = |stored: &quikapp_projections::Stored| stored.partitions.values().map(|p| p.offset + 1).sum::<u64>();
    let (started, first) = loop {
        let stored = projector.stored().await?;
        if !stored.partitions.is_empty() {
            break (Instant::now(), applied(&stored));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let last = loop {
        let stored = projector.stored().await?;
        if applied_position(&stored, &partitions) >= head {
            break applied(&stored);
        }
        projector.changed().await;
    };
    let rate = (last - first) as f64 / started.elapsed().as_secs_f64();
    running.abort();
    Ok(rate)
}

/// The ChannelCreated of public channel `c{i}` of `workspace` at `position`.
pub fn channel_created(position: u64, i: usize, channel: Uuid, workspace: Uuid, by: Uuid) -> Envelope {
    let created = quikapp_domain::event::ChannelCreated {
        channel_id: channel,
        workspace_id: workspace,
        name: format!("c{i}"),
        topic: None,
        private: false,
        created_by: by,
    };
    let mut event = envelope(position, format!("channel-{channel}"), 1, channel, created.into());
    event.workspace_id = Some(workspace);
    event
}

/// A write API over `store` with no rate limit to speak of, and its tokens.
pub fn unlimited_write_api(
    store: Arc<dyn quikapp_commands::store::EventStore>,
) -> Result<(quikapp_write_api::WriteApi, quikapp_write_api::auth::Tokens)> {
    let tokens = quikapp_write_api::auth::Tokens::new("0123456789abcdef0123456789abcdef")?;
    let limits = quikapp_write_api::Limits {
        rate_limit: quikapp_write_api::RateLimit { per_second: 1_000_000, burst: 1_000_000 },
        ..Default::default()
    };
    let service = quikapp_commands::CommandService::new(store);
    Ok((quikapp_write_api::WriteApi::new(service, tokens.clone(), limits), tokens))
}

/// The `p` quantile (0 to 1) of sorted `latencies`, in milliseconds.
pub fn percentile(latencies: &[Duration], p: f64) -> f64 {
    latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e3
}

/// A read API on loopback over `timelines` and `search`, with a directory in memory where
/// `reader` owns `workspace` and its public `channels`: its address, and a token of `reader`.
pub async fn read_api(
    reader: Uuid,
    workspace: Uuid,
    channels: &[Uuid],
    timelines: Arc<dyn quikapp_projections::timelines::Timelines>,
    search: Arc<dyn quikapp_projections::search::Search>,
) -> Result<(std::net::SocketAddr, String)> {
    use quikapp_domain::event::WorkspaceCreated;
    use quikapp_projections::Batch;
    use quikapp_projections::counters::{Counters, Keys};
    use quikapp_projections::directory::memory::MemoryDirectory;
    let created = WorkspaceCreated { workspace_id: workspace, name: "bench".into(), owner_id: reader };
    let mut events = vec![envelope(1, format!("workspace-{workspace}"), 1, Uuid::nil(), created.into())];
    for (i, channel) in channels.iter().enumerate() {
        events.push(channel_created(i as u64 + 2, i, *channel, workspace, reader));
    }
    let directory = Arc::new(MemoryDirectory::new());
    directory.apply(&Batch { events, ..Batch::default() }).await?;
    let tokens = quikapp_write_api::auth::Tokens::new("0123456789abcdef0123456789abcdef")?;
    let counters =
        Counters::new(Arc::new(quikapp_projections::counters::memory::MemoryKeyspace::new()), Keys::default());
    let models = quikapp_read_api::Models {
        directory,
        counters,
        timelines,
        search,
        presence: Arc::new(quikapp_realtime::presence::MemoryPresence::new(None)),
        projectors: vec![],
    };
    let config = quikapp_read_api::ReadConfig {
        partitions: vec![],
        min_position_wait: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
    };
    let url = quikapp_commands::store::contract::fresh_postgres_database().await.context("QUIKAPP_POSTGRES_URL")?;
    let store = Arc::new(quikapp_commands::store::PostgresStore::connect(&url).await?);
    let read = quikapp_read_api::ReadApi::new(models, store, tokens.clone(), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, quikapp_read_api::router(read)).await });
    Ok((address, tokens.mint(reader)))
}
