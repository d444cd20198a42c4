//! The relay against the real PostgreSQL and Kafka: every stored event reaches its topic, keyed
//! and partitioned by channel, in commit order, with watermarks on every partition; a standby
//! relay takes over from a dead one without loss or reordering. Each test has topics and a
//! database of its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use quikapp_bus::Topics;
use quikapp_bus::kafka::{KafkaConfig, KafkaPublisher};
use quikapp_bus::testing::{Read, RunningRelay, checkpoint_reaches, fresh_topics, read_until, spawn_relay};
use quikapp_commands::store::contract::{self, append_to};
use quikapp_commands::store::{EventStore, PostgresStore};
use uuid::Uuid;

const PARTITIONS: i32 = 4;

#[derive(Clone)]
struct Setup {
    store: Arc<PostgresStore>,
    brokers: String,
    topics: Topics,
}

async fn setup() -> Option<Setup> {
    let url = contract::fresh_postgres_database().await?;
    let brokers = contract::service_url("QUIKAPP_KAFKA_BROKERS")?;
    let store = contract::open_postgres(&url, Default::default()).await;
    let topics = fresh_topics();
    Some(Setup { store, brokers, topics })
}

impl Setup {
    async fn publisher(&self) -> Arc<KafkaPublisher> {
        let config = KafkaConfig {
            brokers: self.brokers.clone(),
            topics: self.topics.clone(),
            partitions: PARTITIONS,
            options: BTreeMap::new(),
        };
        Arc::new(KafkaPublisher::connect(&config).await.expect("connect to Kafka"))
    }

    /// Starts a relay; it stops when the handle is dropped.
    async fn relay(&self) -> RunningRelay {
        spawn_relay(self.store.clone(), self.publisher().await)
    }

    /// Appends `per_writer` events from each of `writers` concurrent writers, each to a stream
    /// of its own in one of three channels (writer 0 writes workspace events, with no channel).
    async fn append(&self, writers: usize, per_writer: u64) {
        let channels: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let tasks = (0..writers).map(|w| {
            let store = self.store.clone();
            let channel = (w > 0).then(|| channels[w % 3]);
            let workspace = Some(Uuid::now_v7());
            tokio::spawn(async move {
                let stream = format!("test-{}", Uuid::now_v7());
                for version in 0..per_writer {
                    let mut request = append_to(&stream, version, &["e"]);
                    request.events[0].channel_id = channel;
                    request.events[0].workspace_id = workspace;
                    store.append(request).await.expect("append");
                }
            })
        });
        for task in futures::future::join_all(tasks).await {
            task.unwrap();
        }
    }
}

/// Checks what was read against the store: every event once (or, with `duplicates`, at least
/// once), each channel on one partition keyed by its id, every stream in version order.
async fn check(setup: &Setup, read: &Read, duplicates: bool) {
    read.assert_watermarks_follow_their_events();
    let stored = setup.store.read_all(0, 1_000_000).await.unwrap();
    let stored_ids: HashSet<String> = stored.iter().map(|e| e.event_id.to_string()).collect();
    let read_ids: Vec<String> = read.events.iter().map(|(.., v)| v["event_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(read_ids.iter().cloned().collect::<HashSet<_>>(), stored_ids, "every stored event, nothing else");
    if !duplicates {
        assert_eq!(read_ids.len(), stored_ids.len(), "no event twice");
    }
    let mut channel_partition: HashMap<String, i32> = HashMap::new();
    let mut partition_position: HashMap<(String, i32), u64> = HashMap::new();
    let mut stream_version: HashMap<String, u64> = HashMap::new();
    let mut seen = HashSet::new();
    for (topic, partition, key, event) in &read.events {
        let first_time = seen.insert(event["event_id"].as_str().unwrap().to_owned());
        let position = event["global_position"].as_u64().unwrap();
        let last = partition_position.entry((topic.clone(), *partition)).or_default();
        match first_time {
            true => assert!(position > *last, "{topic}/{partition}: position {position} after {last}"),
            // A duplicate repeats the batch in flight: it may go back, never past what follows.
            false => assert!(duplicates, "event {position} came twice"),
        }
        *last = (*last).max(position);
        match event["channel_id"].as_str() {
            Some(channel) => {
                assert_eq!(topic, &setup.topics.messages);
                assert_eq!(key.as_deref(), Some(channel), "keyed by channel");
                let on = *channel_partition.entry(channel.to_owned()).or_insert(*partition);
                assert_eq!(on, *partition, "a channel's events share one partition");
            }
            None => {
                assert_eq!(topic, &setup.topics.workspaces);
                assert_eq!(key.as_deref(), event["workspace_id"].as_str(), "keyed by workspace");
            }
        }
        if first_time {
            let version = event["stream_version"].as_u64().unwrap();
            let previous = stream_version.insert(event["stream_id"].as_str().unwrap().to_owned(), version);
            assert_eq!(previous.unwrap_or(0) + 1, version, "a stream's events in version order");
        }
    }
}

#[tokio::test]
async fn every_event_reaches_its_partition_in_order_and_watermarks_reach_every_partition() {
    let Some(setup) = setup().await else { return };
    let _relay = setup.relay().await;
    setup.append(8, 25).await;
    let head = setup.store.head().await.unwrap();
    assert_eq!(head, 200);
    let read = read_until(&setup.brokers, &setup.topics, PARTITIONS, head).await;
    check(&setup, &read, false).await;
    // Four partitions, three channels: at least one partition of the messages topic carries no
    // event, and three of the workspaces topic; their watermarks still reached the head.
    let busy: HashSet<(String, i32)> = read.events.iter().map(|(t, p, ..)| (t.clone(), *p)).collect();
    assert!(busy.len() < 2 * PARTITIONS as usize);
}

#[tokio::test]
async fn a_standby_relay_takes_over_from_a_dead_one_without_loss_or_reordering() {
    let Some(setup) = setup().await else { return };
    let first = setup.relay().await;
    setup.append(4, 20).await;
    checkpoint_reaches(setup.store.pool(), setup.store.head().await.unwrap()).await; // the first one leads
    let _second = setup.relay().await;
    // Kill the active relay while commands keep coming: its lock connection closes with it.
    let more = tokio::spawn({
        let setup = setup.clone();
        async move { setup.append(4, 20).await }
    });
    first.task.abort();
    let _ = first.task.await;
    more.await.unwrap();
    let head = setup.store.head().await.unwrap();
    assert_eq!(head, 160);
    checkpoint_reaches(setup.store.pool(), head).await; // the standby took over
    let read = read_until(&setup.brokers, &setup.topics, PARTITIONS, head).await;
    check(&setup, &read, true).await;
}

#[tokio::test]
async fn a_producer_that_fails_fatally_is_replaced_and_nothing_overtakes_what_it_held() {
    let Some(setup) = setup().await else { return };
    let publisher = setup.publisher().await;
    let _relay = spawn_relay(setup.store.clone(), publisher.clone());
    setup.append(4, 10).await;
    checkpoint_reaches(setup.store.pool(), setup.store.head().await.unwrap()).await;
    // Fail the producer while commands keep coming: records it holds fail, and the relay starts
    // over from its checkpoint on a new one.
    let more = tokio::spawn({
        let setup = setup.clone();
        async move { setup.append(4, 40).await }
    });
    while setup.store.head().await.unwrap() < 80 {
        tokio::task::yield_now().await;
    }
    publisher.fail_fatally();
    more.await.unwrap();
    let head = setup.store.head().await.unwrap();
    assert_eq!(head, 200);
    checkpoint_reaches(setup.store.pool(), head).await;
    let read = read_until(&setup.brokers, &setup.topics, PARTITIONS, head).await;
    check(&setup, &read, true).await;
}
