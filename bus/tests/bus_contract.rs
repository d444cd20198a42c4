//! The EventBus contract against both adapters: the embedded bus over the SQLite store, and
//! Kafka fed by the relay from PostgreSQL. The same events, the same partitions.

use std::collections::BTreeMap;
use std::sync::Arc;

use quikapp_bus::embedded::EmbeddedBus;
use quikapp_bus::kafka::{KafkaBus, KafkaConfig, KafkaPublisher};
use quikapp_bus::testing;
use quikapp_bus::{EventBus, Topics};
use quikapp_commands::store::EventStore;
use quikapp_commands::store::contract::{self, append_to};
use quikapp_domain::Envelope;
use uuid::Uuid;

const PARTITIONS: i32 = 3;

/// Four channels' events and one workspace's: the workspaces topic carries one key, so two of
/// its partitions stay empty.
async fn fill(store: &dyn EventStore) -> Vec<Envelope> {
    let workspace = Uuid::now_v7();
    let channels: Vec<Option<Uuid>> = (0..4).map(|_| Some(Uuid::now_v7())).chain([None]).collect();
    for (i, channel) in channels.iter().enumerate() {
        for version in 0..6 {
            let mut request = append_to(&format!("test-{i}"), version, &["e"]);
            request.events[0].channel_id = *channel;
            request.events[0].workspace_id = Some(workspace);
            store.append(request).await.unwrap();
        }
    }
    store.read_all(0, 1_000).await.unwrap()
}

async fn check(bus: &dyn EventBus, store: &dyn EventStore, stored: &[Envelope], topics: &Topics) {
    testing::every_partition_delivers_its_events_in_order_then_a_watermark(bus, stored, topics, PARTITIONS).await;
    testing::reading_after_an_offset_delivers_what_follows(bus, stored).await;
    let append = async {
        let mut request = append_to(&format!("test-{}", Uuid::now_v7()), 0, &["later"]);
        request.events[0].channel_id = Some(Uuid::now_v7());
        store.append(request).await.unwrap();
        store.read_all(stored.last().unwrap().global_position, 1).await.unwrap().remove(0)
    };
    testing::a_group_from_now_reads_only_what_follows(bus, stored, append).await;
}

#[tokio::test]
async fn the_embedded_bus_keeps_the_contract() {
    let store = contract::fresh_sqlite().await;
    let stored = fill(store.as_ref()).await;
    let topics = testing::fresh_topics();
    let bus = EmbeddedBus::new(store.clone(), topics.clone(), PARTITIONS).scanning(5);
    check(&bus, store.as_ref(), &stored, &topics).await;
}

#[tokio::test]
async fn kafka_fed_by_the_relay_keeps_the_contract() {
    let Some(url) = contract::fresh_postgres_database().await else { return };
    let Some(brokers) = contract::service_url("QUIKAPP_KAFKA_BROKERS") else { return };
    let store = contract::open_postgres(&url, Default::default()).await;
    let stored = fill(store.as_ref()).await;
    let topics = testing::fresh_topics();
    let config = KafkaConfig {
        brokers: brokers.clone(),
        topics: topics.clone(),
        partitions: PARTITIONS,
        options: BTreeMap::new(),
    };
    let publisher = Arc::new(KafkaPublisher::connect(&config).await.expect("connect to Kafka"));
    let _relay = testing::spawn_relay(store.clone(), publisher);
    testing::checkpoint_reaches(store.pool(), stored.last().unwrap().global_position).await;
    let bus = KafkaBus { brokers, topics: topics.clone(), partitions: PARTITIONS };
    check(&bus, store.as_ref(), &stored, &topics).await;
    // The broker keeps a group's place; the embedded bus has one member per process, which
    // reads from the log's head whenever it starts.
    let publish = async {
        let mut request = append_to(&format!("test-{}", Uuid::now_v7()), 0, &["meanwhile"]);
        request.events[0].channel_id = Some(Uuid::now_v7());
        let quikapp_commands::store::AppendOutcome::Appended(appended) = store.append(request).await.unwrap() else {
            panic!("appended")
        };
        testing::checkpoint_reaches(store.pool(), appended.last_position).await;
        store.read_all(appended.last_position - 1, 1).await.unwrap().remove(0)
    };
    testing::a_group_from_now_goes_on_from_where_it_was_first_joined(&bus, publish).await;
}
