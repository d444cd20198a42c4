//! Relay benchmark against the real PostgreSQL and Kafka, in one run so the ratio compares like
//! with like:
//!
//! 1. a backlog of `--events` stored events (MessagePosted envelopes of about 700 bytes, in 1,000
//!    channels);
//! 2. reading the backlog as the relay does, and as typed envelopes serialized to JSON;
//! 3. baseline: a raw rdkafka producer with the relay's settings sending the same payloads,
//!    already serialized in memory, to fresh topics;
//! 4. the relay draining the backlog into other fresh topics, watermarks and checkpoints
//!    included;
//! 5. live: appends at `--rate` per second with the relay running, and the time from each
//!    append's acknowledgement to a consumer reading its record; next to it, a raw producer
//!    sending the same payload at the same rate, timed from each send to the consumer.
//!
//! Run it with `bench/relay` (release build, starts PostgreSQL and Kafka).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use quikapp_bus::kafka::{KafkaConfig, KafkaPublisher};
use quikapp_bus::relay::{Relay, RelayConfig, checkpoint};
use quikapp_bus::{Route, Topics, route};
use quikapp_commands::store::{AppendRequest, EventStore, NewEvent, PostgresStore, contract};
use quikapp_domain::event::{MessagePosted, timestamp};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

/// PostgreSQL comes from QUIKAPP_POSTGRES_URL: the bench makes a database of its own there.
#[derive(Parser)]
struct Args {
    #[arg(long, env = "QUIKAPP_KAFKA_BROKERS")]
    kafka_brokers: String,
    /// Events in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Appends per second in the live phase.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Seconds of the live phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

const PARTITIONS: i32 = 12;
const CHANNELS: usize = 1_000;

fn fresh_topics() -> Topics {
    let id = Uuid::now_v7().simple();
    Topics { messages: format!("bench-{id}-messages"), workspaces: format!("bench-{id}-workspaces") }
}

fn message(channel_id: Uuid, workspace_id: Uuid) -> NewEvent {
    let text = "Standup moved to 10:30, same room.";
    let author = Uuid::now_v7();
    NewEvent {
        event_id: Uuid::now_v7(),
        event: MessagePosted {
            message_id: Uuid::now_v7(),
            channel_id,
            author_id: author,
            text: text.into(),
            thread_root_id: None,
        }
        .into(),
        workspace_id: Some(workspace_id),
        channel_id: Some(channel_id),
        actor_id: author,
        occurred_at: timestamp::now(),
        correlation_id: Uuid::now_v7(),
        causation_id: Uuid::now_v7(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let url = contract::fresh_postgres_database().await.context("QUIKAPP_POSTGRES_URL names the server")?;
    let store = Arc::new(PostgresStore::connect(&url).await?);
    store.migrate().await?;
    let workspace = Uuid::now_v7();
    let channels: Vec<Uuid> = (0..CHANNELS).map(|_| Uuid::now_v7()).collect();

    // 1. The backlog: appends of 100 events, each to a stream of its own, many at a time.
    let started = Instant::now();
    let appends = args.events.div_ceil(100);
    let writers = 16;
    let tasks = (0..writers).map(|w| {
        let (store, channels) = (store.clone(), channels.clone());
        tokio::spawn(async move {
            for i in (w..appends).step_by(writers as usize) {
                let channel = channels[i as usize % CHANNELS];
                let request = AppendRequest {
                    stream_id: format!("bench-{i}"),
                    expected_version: 0,
                    events: (0..100).map(|_| message(channel, workspace)).collect(),
                    ..Default::default()
                };
                store.append(request).await.expect("append");
            }
        })
    });
    for task in futures::future::join_all(tasks).await {
        task?;
    }
    let head = store.head().await?;
    println!("backlog: {head} events stored in {:.1} s", started.elapsed().as_secs_f64());

    // 2. Reading the backlog, the part of the relay's work that the raw producer does not do:
    // encoded as the relay reads it, and decoded into typed envelopes and serialized (as the
    // relay did before 2026-12-02). Twice each, alternating, best of two.
    let (mut encoded, mut typed) = (0f64, 0f64);
    for _ in 0..2 {
        encoded = encoded.max(reading_rate(&store, head, true).await?);
        typed = typed.max(reading_rate(&store, head, false).await?);
    }
    println!("reading the store, encoded (the relay)      {encoded:>9.0} events/s");
    println!("reading the store, decoded and serialized   {typed:>9.0} events/s");

    // 3. The raw producer, on the same payloads.
    let mut payloads = Vec::with_capacity(head as usize);
    let mut after = 0;
    while after < head {
        let page = store.read_all_encoded(after, 10_000).await?;
        after = page.last().map_or(head, |e| e.global_position);
        for event in page {
            let key = match route(event.channel_id, event.workspace_id, event.actor_id) {
                Route::Messages { channel_id } => channel_id,
                Route::Workspaces { key } => key,
            };
            payloads.push((key.to_string(), event.json.into_bytes()));
        }
    }
    let bytes: usize = payloads.iter().map(|(_, p)| p.len()).sum();
    println!("payloads: {} bytes on average", bytes / payloads.len().max(1));
    let raw_topics = fresh_topics();
    let kafka = |topics: &Topics| KafkaConfig {
        brokers: args.kafka_brokers.clone(),
        topics: topics.clone(),
        partitions: PARTITIONS,
        options: BTreeMap::new(),
    };
    KafkaPublisher::connect(&kafka(&raw_topics)).await?; // creates the topics
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "2")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("partitioner", "murmur2_random")
        .create()?;
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(payloads.len());
    for (key, payload) in &payloads {
        let mut record = FutureRecord::to(&raw_topics.messages).key(key.as_str()).payload(payload.as_slice());
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break deliveries.push(delivery),
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for delivery in deliveries {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    let raw = head as f64 / started.elapsed().as_secs_f64();
    println!("raw producer, same payloads and settings   {raw:>9.0} events/s");
    let sample = payloads[0].1.clone(); // a stored envelope, for the live baseline
    drop(payloads);

    // 4. The relay, draining the backlog.
    let topics = fresh_topics();
    let publisher = Arc::new(KafkaPublisher::connect(&kafka(&topics)).await?);
    let relay =
        Arc::new(Relay { pool: store.pool().clone(), store: store.clone(), publisher, config: RelayConfig::default() });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let relay = relay.clone();
        async move {
            relay
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let started = Instant::now();
    while checkpoint(store.pool(), "kafka").await? < head {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let relayed = head as f64 / started.elapsed().as_secs_f64();
    println!("relay, backlog to Kafka                    {relayed:>9.0} events/s");
    println!("relay / raw producer: {:.2}x (target >= 0.7)", relayed / raw);

    // 5. Live: the relay keeps running; a consumer times each appended event from its append's
    // acknowledgement. Next to it, the floor: a raw producer with the same settings sending one
    // record at a time at the same rate, timed from the send.
    let relay_live = time_live(&args.kafka_brokers, &topics.messages, args.rate, args.seconds, None, |i| {
        let (store, channel) = (store.clone(), channels[i as usize % CHANNELS]);
        async move {
            let event = message(channel, workspace);
            let id = event.event_id.to_string();
            let request = AppendRequest {
                stream_id: format!("live-{i}"),
                expected_version: 0,
                events: vec![event],
                ..Default::default()
            };
            store.append(request).await.expect("append");
            (id, Instant::now())
        }
    })
    .await?;
    let _ = stop.send(());
    running.await?;
    let raw_topics = fresh_topics();
    KafkaPublisher::connect(&kafka(&raw_topics)).await?;
    let raw_live =
        time_live(&args.kafka_brokers, &raw_topics.messages, args.rate, args.seconds, Some(&producer), |i| {
            let (producer, topic, channel) =
                (producer.clone(), raw_topics.messages.clone(), channels[i as usize % CHANNELS]);
            let payload = sample.clone();
            async move {
                let id = Uuid::now_v7().to_string();
                let (key, sent) = (channel.to_string(), Instant::now());
                let headers = OwnedHeaders::new().insert(Header { key: "event_id", value: Some(&id) });
                let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
                let delivery = producer.send_result(record).map_err(|(e, _)| e).expect("the queue has room");
                drop(delivery); // timed to the consumer, not to the acknowledgement
                (id, sent)
            }
        })
        .await?;
    // The same appends, each followed by the raw producer sending its record: what the relay's
    // latency would be if it cost nothing, on a machine as busy with the appends as in the run
    // above.
    let direct_topics = fresh_topics();
    KafkaPublisher::connect(&kafka(&direct_topics)).await?;
    let direct_live =
        time_live(&args.kafka_brokers, &direct_topics.messages, args.rate, args.seconds, Some(&producer), |i| {
            let (producer, topic, store) = (producer.clone(), direct_topics.messages.clone(), store.clone());
            let (channel, payload) = (channels[i as usize % CHANNELS], sample.clone());
            async move {
                let event = message(channel, workspace);
                let id = event.event_id.to_string();
                let request = AppendRequest {
                    stream_id: format!("direct-{i}"),
                    expected_version: 0,
                    events: vec![event],
                    ..Default::default()
                };
                store.append(request).await.expect("append");
                let (key, appended) = (channel.to_string(), Instant::now());
                let headers = OwnedHeaders::new().insert(Header { key: "event_id", value: Some(&id) });
                let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
                drop(producer.send_result(record).map_err(|(e, _)| e).expect("the queue has room"));
                (id, appended)
            }
        })
        .await?;
    let line = |name: &str, latencies: &[Duration]| {
        let at = |p| percentile(latencies, p);
        println!(
            "{name:<50} p50 {:>6.2} ms   p90 {:>6.2} ms   p99 {:>6.2} ms   max {:>6.2} ms",
            at(0.5),
            at(0.9),
            at(0.99),
            at(1.0)
        );
    };
    println!("live, {} records/s:", args.rate);
    line("  raw producer: sent to record consumed", &raw_live);
    line("  append, then the raw producer: appended to consumed", &direct_live);
    line("  relay: append acknowledged to record consumed", &relay_live);
    println!(
        "relay p99 {:.2} ms (target < 25 ms), {:.2}x the p99 of appending then producing directly",
        percentile(&relay_live, 0.99),
        percentile(&relay_live, 0.99) / percentile(&direct_live, 0.99)
    );
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// Events per second read from the store in pages of 10,000, encoded for the bus or as typed
/// envelopes serialized to JSON.
async fn reading_rate(store: &PostgresStore, head: u64, encoded: bool) -> Result<f64> {
    let started = Instant::now();
    let (mut after, mut bytes) = (0, 0);
    while after < head {
        if encoded {
            let page = store.read_all_encoded(after, 10_000).await?;
            after = page.last().map_or(head, |e| e.global_position);
            bytes += page.iter().map(|e| e.json.len()).sum::<usize>();
        } else {
            let page = store.read_all(after, 10_000).await?;
            after = page.last().map_or(head, |e| e.global_position);
            bytes += page.iter().map(|e| serde_json::to_vec(e).map(|json| json.len())).sum::<Result<usize, _>>()?;
        }
    }
    std::hint::black_box(bytes);
    Ok(head as f64 / started.elapsed().as_secs_f64())
}

/// Starts `send(i)` for i in 0..rate×seconds at `rate` per second, each resolving to a record's
/// event_id and the instant it counts from, and times each from then to a consumer of `topic`
/// reading it. The consumer starts at the topic's end and counts as ready once it has read a
/// record from every partition: the relay's watermarks, or probes sent with `prober`.
async fn time_live<F, Fut>(
    brokers: &str,
    topic: &str,
    rate: u64,
    seconds: u64,
    prober: Option<&FutureProducer>,
    send: F,
) -> Result<Vec<Duration>>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = (String, Instant)> + Send + 'static,
{
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-{}", Uuid::now_v7()))
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut heard = HashSet::new();
    while heard.len() < PARTITIONS as usize {
        if let Some(producer) = prober {
            for partition in 0..PARTITIONS {
                let record = FutureRecord::<str, [u8]>::to(topic).partition(partition).payload(b"probe".as_slice());
                drop(producer.send_result(record).map_err(|(e, _)| e)?);
            }
        }
        if let Ok(message) = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await {
            heard.insert(message?.partition());
        }
    }
    let acknowledged: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let total = rate * seconds;
    let reader = tokio::spawn({
        let acknowledged = acknowledged.clone();
        async move {
            let mut latencies = Vec::with_capacity(total as usize);
            while (latencies.len() as u64) < total {
                let message = consumer.recv().await.expect("consume");
                let received = Instant::now();
                let Some(id) =
                    message.headers().and_then(|h| h.iter().find(|h| h.key == "event_id")).and_then(|h| h.value)
                else {
                    continue;
                };
                let id = String::from_utf8_lossy(id).into_owned();
                // The start is recorded right after the send returns; give it a moment.
                loop {
                    if let Some(at) = acknowledged.lock().unwrap().get(&id) {
                        latencies.push(received.saturating_duration_since(*at));
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }
            latencies
        }
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
    for i in 0..total {
        tick.tick().await;
        let (started, acknowledged) = (send(i), acknowledged.clone());
        tokio::spawn(async move {
            let (id, at) = started.await;
            acknowledged.lock().unwrap().insert(id, at);
        });
    }
    let mut latencies =
        tokio::time::timeout(Duration::from_secs(60), reader).await.context("the consumer caught up")??;
    latencies.sort_unstable();
    Ok(latencies)
}
