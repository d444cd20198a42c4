//! The local services that `infra/local/up` starts, probed through the same client crates the
//! project uses, with a real round trip each. `./test` starts the services and exports their URLs.

mod support;

use std::time::Duration;

use futures::StreamExt;
use support::{deadline, service_url};

#[tokio::test]
async fn postgres_answers_a_query() {
    let Some(url) = service_url("QUIKAPP_POSTGRES_URL") else {
        return;
    };
    let pool = sqlx::PgPool::connect(&url).await.expect("connect to PostgreSQL");
    let (answer,): (i32,) = sqlx::query_as("SELECT 40 + 2").fetch_one(&pool).await.unwrap();
    assert_eq!(answer, 42);
}

#[tokio::test]
async fn redis_answers_ping_and_keeps_a_value() {
    let Some(url) = service_url("QUIKAPP_REDIS_URL") else {
        return;
    };
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.expect("connect to Redis");
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let key = format!("quikapp:probe:{}", uuid::Uuid::now_v7());
    let () = redis::cmd("SET").arg(&key).arg("there").arg("EX").arg(60).query_async(&mut con).await.unwrap();
    let back: String = redis::cmd("GET").arg(&key).query_async(&mut con).await.unwrap();
    assert_eq!(back, "there");
}

#[tokio::test]
async fn kafka_has_the_topics_and_round_trips_a_record_through_a_consumer_group() {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

    let Some(brokers) = service_url("QUIKAPP_KAFKA_BROKERS") else {
        return;
    };
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("producer");

    let metadata = producer.client().fetch_metadata(None, Duration::from_secs(10)).expect("metadata");
    for name in ["quikapp.messages.events", "quikapp.workspaces.events", "quikapp.messages.events.dlq"] {
        let topic = metadata.topics().iter().find(|t| t.name() == name);
        let topic = topic.unwrap_or_else(|| panic!("topic {name} is missing"));
        assert_eq!(topic.partitions().len(), 12, "partitions of {name}");
    }

    let topic = format!("quikapp.probe.{}", uuid::Uuid::now_v7());
    let token = uuid::Uuid::now_v7().to_string();
    producer
        .send(FutureRecord::to(&topic).key("probe").payload(&token), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("quikapp-probe-{token}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).unwrap();
    let received = deadline(Duration::from_secs(60), async {
        let mut stream = consumer.stream();
        loop {
            let message = stream.next().await.unwrap().expect("consume");
            if message.payload() == Some(token.as_bytes()) {
                return;
            }
        }
    })
    .await;
    assert!(received.is_some(), "the produced record never reached the consumer group");
}

#[tokio::test]
async fn opensearch_serves_the_elasticsearch_api() {
    use elasticsearch::http::Url;
    use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
    use elasticsearch::{Elasticsearch, GetParts, IndexParts, cluster::ClusterHealthParts};

    let Some(url) = service_url("QUIKAPP_ELASTICSEARCH_URL") else {
        return;
    };
    let pool = SingleNodeConnectionPool::new(Url::parse(&url).unwrap());
    let transport = TransportBuilder::new(pool).enable_meta_header(false).build().unwrap();
    let client = Elasticsearch::new(transport);

    let health: serde_json::Value =
        client.cluster().health(ClusterHealthParts::None).send().await.unwrap().json().await.unwrap();
    assert!(matches!(health["status"].as_str(), Some("green" | "yellow")), "health: {health}");

    let index = format!("quikapp-probe-{}", uuid::Uuid::now_v7());
    let stored = client
        .index(IndexParts::IndexId(&index, "1"))
        .body(serde_json::json!({"text": "hello search"}))
        .send()
        .await
        .unwrap();
    assert!(stored.status_code().is_success(), "index: {}", stored.status_code());
    let fetched: serde_json::Value =
        client.get(GetParts::IndexId(&index, "1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(fetched["_source"]["text"], "hello search");
}

#[tokio::test]
async fn ferretdb_speaks_the_mongodb_protocol() {
    use mongodb::bson::{Document, doc};

    let Some(url) = service_url("QUIKAPP_MONGO_URL") else {
        return;
    };
    let client = mongodb::Client::with_uri_str(&url).await.expect("MongoDB client");
    let db = client.database("quikapp_probe");
    let pong = db.run_command(doc! {"ping": 1}).await.expect("ping");
    assert_eq!(pong.get_f64("ok").ok().or(pong.get_i32("ok").ok().map(f64::from)), Some(1.0));

    let collection = db.collection::<Document>(&format!("probe_{}", uuid::Uuid::now_v7().simple()));
    collection.insert_one(doc! {"_id": "m1", "text": "hello"}).await.expect("insert");
    let found = collection.find_one(doc! {"_id": "m1"}).await.expect("find").expect("the document");
    assert_eq!(found.get_str("text").unwrap(), "hello");
    collection.drop().await.unwrap();
}

#[test]
fn status_reports_all_five_services_healthy() {
    if service_url("QUIKAPP_POSTGRES_URL").is_none() {
        return;
    }
    let script = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("infra/local/status");
    let output = std::process::Command::new(script).output().expect("run infra/local/status");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "status failed:\n{text}");
    for service in ["postgres", "redis", "kafka", "opensearch", "ferretdb"] {
        let line =
            text.lines().find(|l| l.starts_with(service)).unwrap_or_else(|| panic!("no line for {service}:\n{text}"));
        assert!(line.ends_with(" healthy"), "{line}");
    }
}

/// `infra/compose.yaml` must be a valid compose file publishing the same loopback ports as
/// `infra/local`. Checked with `docker compose` or `docker-compose`, where either exists.
#[test]
fn the_compose_file_validates_and_publishes_the_local_ports() {
    let root = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    );
    let file = root.join("infra/compose.yaml").display().to_string();
    let clients: [&[&str]; 2] = [&["docker", "compose"], &["docker-compose"]];
    let works = |client: &&&[&str]| {
        let version = std::process::Command::new(client[0]).args(&client[1..]).arg("version").output();
        version.is_ok_and(|output| output.status.success())
    };
    let config = clients.iter().find(works).map(|client| {
        std::process::Command::new(client[0]).args(&client[1..]).args(["-f", &file, "config"]).output().unwrap()
    });
    let Some(config) = config else {
        eprintln!("skipped: no compose client on this machine");
        return;
    };
    let text = String::from_utf8_lossy(&config.stdout);
    assert!(config.status.success(), "{}", String::from_utf8_lossy(&config.stderr));

    let lib = std::fs::read_to_string(root.join("infra/local/lib.sh")).unwrap();
    for variable in ["PG_PORT", "REDIS_PORT", "KAFKA_PORT", "OPENSEARCH_PORT", "FERRETDB_PORT"] {
        let line = lib.lines().find(|l| l.starts_with(&format!("{variable}="))).expect(variable);
        let port = line.split(":-").nth(1).and_then(|rest| rest.strip_suffix('}')).expect(line);
        assert!(text.contains(&format!("127.0.0.1:{port}:")), "compose does not publish {variable} {port}:\n{text}");
    }
}
