//! Kafka stopped and started again while commands keep coming: appends keep succeeding, the
//! relay says it is not ready while the broker is away, and catches up when it is back with
//! nothing lost and every partition in order. A test binary of its own, because it stops the
//! broker the other tests use (cargo runs test binaries one after another).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use quikapp_bus::Publisher;
use quikapp_bus::kafka::{KafkaConfig, KafkaPublisher};
use quikapp_bus::testing::{checkpoint_reaches, fresh_topics, read_until, spawn_relay};
use quikapp_commands::store::EventStore;
use quikapp_commands::store::contract::{self, append_to};
use uuid::Uuid;

async fn infra(action: &str) {
    let script = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../infra/local")
    .join(action);
    let status = tokio::process::Command::new(script).arg("kafka").status().await.expect("run infra/local");
    assert!(status.success(), "infra/local/{action} kafka failed");
}

#[tokio::test]
async fn commands_keep_succeeding_while_kafka_is_down_and_the_relay_catches_up_after() {
    let Some(url) = contract::fresh_postgres_database().await else { return };
    let Some(brokers) = contract::service_url("QUIKAPP_KAFKA_BROKERS") else { return };
    let store = contract::open_postgres(&url, Default::default()).await;
    let topics = fresh_topics();
    let config =
        KafkaConfig { brokers: brokers.clone(), topics: topics.clone(), partitions: 3, options: BTreeMap::new() };
    let publisher = Arc::new(KafkaPublisher::connect(&config).await.expect("connect to Kafka"));
    let _relay = spawn_relay(store.clone(), publisher.clone());

    // Commands keep coming, to four channels, until told to stop; every append must succeed.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = tokio::spawn({
        let (store, writing) = (store.clone(), writing.clone());
        async move {
            let channels: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
            let mut appended = 0u64;
            while writing.load(Ordering::SeqCst) {
                let mut request = append_to(&format!("test-{appended}"), 0, &["e"]);
                request.events[0].channel_id = Some(channels[appended as usize % 4]);
                store.append(request).await.expect("commands succeed whatever Kafka does");
                appended += 1;
                tokio::time::sleep(Duration::from_millis(10)).await; // a steady trickle of commands
            }
            appended
        }
    });
    checkpoint_reaches(store.pool(), 10).await; // the relay publishes

    infra("down").await;
    let during = store.head().await.unwrap();
    assert!(publisher.ping().await.is_err(), "not ready while Kafka is down");
    // Commands still land in the store while the broker is away.
    let grown = async {
        while store.head().await.unwrap() < during + 50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), grown).await.expect("appends go on without Kafka");
    infra("up").await;

    writing.store(false, Ordering::SeqCst);
    let appended = writer.await.unwrap();
    let head = store.head().await.unwrap();
    assert_eq!(head, appended);
    checkpoint_reaches(store.pool(), head).await; // the relay caught up
    let read = read_until(&brokers, &topics, 3, head).await;
    read.assert_watermarks_follow_their_events();
    let stored: HashSet<String> =
        store.read_all(0, 100_000).await.unwrap().iter().map(|e| e.event_id.to_string()).collect();
    let mut seen = HashSet::new();
    let mut last_on_partition = std::collections::HashMap::new();
    for (topic, partition, _, event) in &read.events {
        if seen.insert(event["event_id"].as_str().unwrap().to_owned()) {
            let position = event["global_position"].as_u64().unwrap();
            let last = last_on_partition.entry((topic.clone(), *partition)).or_insert(0);
            assert!(position > *last, "{topic}/{partition}: {position} after {last}");
            *last = position;
        }
    }
    assert_eq!(seen, stored, "nothing lost");
}
