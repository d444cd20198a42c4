//! Configuration: defaults, then a TOML file (`--config`), then `QUIKAPP_*` environment
//! variables, the environment winning. `quikapp.example.toml` documents every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The `QUIKAPP_*` variables read into [`Config`] (other `QUIKAPP_*` variables, such as the test
/// suite's, are not configuration).
const KEYS: &[&str] = &[
    "postgres_url",
    "kafka_brokers",
    "mongo_url",
    "elasticsearch_url",
    "redis_url",
    "data_dir",
    "write_addr",
    "read_addr",
    "jwt_secret",
    "rate_limit_per_second",
    "rate_limit_burst",
    "request_timeout_seconds",
    "relay_addr",
    "relay_batch_size",
    "kafka_partitions",
    "kafka_messages_topic",
    "kafka_workspaces_topic",
    "idempotency_retention_hours",
    "projector_addr",
    "projector_batch_size",
    "realtime_addr",
    "realtime_group",
    "realtime_send_buffer",
    "realtime_presence_ttl_seconds",
    "realtime_redis_db",
    "min_position_wait_seconds",
    "redis_key_prefix",
    "redis_rebuild_db",
    "search_index_prefix",
    "kafka_group_prefix",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The event store's PostgreSQL URL. Unset: the embedded SQLite store under `data_dir`.
    #[serde(default)]
    pub postgres_url: Option<String>,
    /// Kafka bootstrap servers, comma-separated (for the relay and projectors).
    #[serde(default)]
    pub kafka_brokers: Option<String>,
    /// MongoDB URL of the timeline read model.
    #[serde(default)]
    pub mongo_url: Option<String>,
    /// Elasticsearch-API URL of the search read model.
    #[serde(default)]
    pub elasticsearch_url: Option<String>,
    /// Redis URL of the counters read model.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Where the embedded default keeps its files.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Listen address of the command API.
    #[serde(default = "default_write_addr")]
    pub write_addr: SocketAddr,
    /// Listen address of the query API.
    #[serde(default = "default_read_addr")]
    pub read_addr: SocketAddr,
    /// HS256 secret of bearer tokens. Required by every role but `dev`, which falls back to a
    /// fixed, printed development secret.
    #[serde(default)]
    pub jwt_secret: Option<String>,
    /// Commands each user may send per second, sustained.
    #[serde(default = "default_rate_limit_per_second")]
    pub rate_limit_per_second: u32,
    /// Commands each user may send in a burst above the sustained rate.
    #[serde(default = "default_rate_limit_burst")]
    pub rate_limit_burst: u32,
    /// Listen address of the relay's /healthz, /readyz and /metrics.
    #[serde(default = "default_relay_addr")]
    pub relay_addr: SocketAddr,
    /// Events the relay publishes per batch (and so the most a crash can publish twice).
    #[serde(default = "default_relay_batch_size")]
    pub relay_batch_size: u32,
    /// The topic of every event with a channel, keyed by channel.
    #[serde(default = "default_kafka_messages_topic")]
    pub kafka_messages_topic: String,
    /// The topic of user and workspace events, keyed by workspace.
    #[serde(default = "default_kafka_workspaces_topic")]
    pub kafka_workspaces_topic: String,
    /// Partitions of each event topic when the relay creates it.
    #[serde(default = "default_kafka_partitions")]
    pub kafka_partitions: i32,
    /// librdkafka options for the relay's producer, over its defaults (TOML only).
    #[serde(default)]
    pub kafka_options: std::collections::BTreeMap<String, String>,
    /// A command request unanswered after this many seconds is answered 503.
    #[serde(default = "default_request_timeout_seconds")]
    pub request_timeout_seconds: u64,
    /// How long an Idempotency-Key keeps its first answer; older keys are deleted.
    #[serde(default = "default_idempotency_retention_hours")]
    pub idempotency_retention_hours: u64,
    /// Listen address of a projector's /healthz, /readyz and /metrics.
    #[serde(default = "default_projector_addr")]
    pub projector_addr: SocketAddr,
    /// Records a projector reads and applies per batch, at most.
    #[serde(default = "default_projector_batch_size")]
    pub projector_batch_size: usize,
    /// The longest a query waits for the position of X-Min-Position before answering 503.
    #[serde(default = "default_min_position_wait_seconds")]
    pub min_position_wait_seconds: u64,
    /// Every key of the Redis read model starts with this.
    #[serde(default = "default_redis_key_prefix")]
    pub redis_key_prefix: String,
    /// The logical database `quikapp replay redis` rebuilds the counters in, then swaps with
    /// the live one (the URL's): both are the counters' alone.
    #[serde(default = "default_redis_rebuild_db")]
    pub redis_rebuild_db: i64,
    /// The search read model's indexes and template are named from this.
    #[serde(default = "default_search_index_prefix")]
    pub search_index_prefix: String,
    /// A projector's consumer group is this followed by its model's name.
    #[serde(default = "default_kafka_group_prefix")]
    pub kafka_group_prefix: String,
    /// Listen address of the WebSocket gateway (`quikapp realtime`, and inside `quikapp dev`).
    #[serde(default = "default_realtime_addr")]
    pub realtime_addr: SocketAddr,
    /// The consumer group that carries the event topics to Redis for every gateway.
    #[serde(default = "default_realtime_group")]
    pub realtime_group: String,
    /// Frames waiting for one WebSocket client, at most; a client further behind is closed
    /// with 1013.
    #[serde(default = "default_realtime_send_buffer")]
    pub realtime_send_buffer: usize,
    /// A user with a stream open is online; a gateway that dies stops renewing its users, who
    /// go offline within this (renewed every third of it).
    #[serde(default = "default_realtime_presence_ttl_seconds")]
    pub realtime_presence_ttl_seconds: u64,
    /// The Redis logical database of the realtime stream and presence: not the counters' (a
    /// replay of the counters swaps and empties theirs) nor `redis_rebuild_db`.
    #[serde(default = "default_realtime_redis_db")]
    pub realtime_redis_db: i64,
}

fn default_realtime_redis_db() -> i64 {
    2
}

fn default_realtime_presence_ttl_seconds() -> u64 {
    30
}

fn default_realtime_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8082))
}

fn default_realtime_group() -> String {
    "quikapp-realtime".into()
}

fn default_realtime_send_buffer() -> usize {
    1_024
}

fn default_search_index_prefix() -> String {
    "quikapp-".into()
}

fn default_redis_rebuild_db() -> i64 {
    1
}

fn default_redis_key_prefix() -> String {
    "quikapp:".into()
}

fn default_kafka_group_prefix() -> String {
    "quikapp-projector-".into()
}

fn default_projector_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8084))
}

fn default_projector_batch_size() -> usize {
    2_000
}

fn default_min_position_wait_seconds() -> u64 {
    5
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./quikapp-data")
}

fn default_write_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_read_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}

fn default_relay_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8083))
}

fn default_relay_batch_size() -> u32 {
    2_000
}

fn default_kafka_messages_topic() -> String {
    "quikapp.messages.events".into()
}

fn default_kafka_workspaces_topic() -> String {
    "quikapp.workspaces.events".into()
}

fn default_kafka_partitions() -> i32 {
    12
}

fn default_rate_limit_per_second() -> u32 {
    200
}

fn default_rate_limit_burst() -> u32 {
    400
}

fn default_request_timeout_seconds() -> u64 {
    30
}

fn default_idempotency_retention_hours() -> u64 {
    24
}

impl Default for Config {
    fn default() -> Self {
        Config {
            postgres_url: None,
            kafka_brokers: None,
            mongo_url: None,
            elasticsearch_url: None,
            redis_url: None,
            redis_rebuild_db: default_redis_rebuild_db(),
            data_dir: default_data_dir(),
            write_addr: default_write_addr(),
            read_addr: default_read_addr(),
            jwt_secret: None,
            rate_limit_per_second: default_rate_limit_per_second(),
            rate_limit_burst: default_rate_limit_burst(),
            relay_addr: default_relay_addr(),
            relay_batch_size: default_relay_batch_size(),
            kafka_messages_topic: default_kafka_messages_topic(),
            kafka_workspaces_topic: default_kafka_workspaces_topic(),
            kafka_partitions: default_kafka_partitions(),
            kafka_options: Default::default(),
            request_timeout_seconds: default_request_timeout_seconds(),
            idempotency_retention_hours: default_idempotency_retention_hours(),
            projector_addr: default_projector_addr(),
            projector_batch_size: default_projector_batch_size(),
            min_position_wait_seconds: default_min_position_wait_seconds(),
            redis_key_prefix: default_redis_key_prefix(),
            search_index_prefix: default_search_index_prefix(),
            kafka_group_prefix: default_kafka_group_prefix(),
            realtime_addr: default_realtime_addr(),
            realtime_group: default_realtime_group(),
            realtime_send_buffer: default_realtime_send_buffer(),
            realtime_presence_ttl_seconds: default_realtime_presence_ttl_seconds(),
            realtime_redis_db: default_realtime_redis_db(),
        }
    }
}

impl Config {
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let config: Config = figment.merge(Env::prefixed("QUIKAPP_").only(KEYS)).extract()?;
        config.validate()?;
        Ok(config)
    }

    /// Values that parse but cannot work.
    fn validate(&self) -> anyhow::Result<()> {
        if self.relay_batch_size == 0 || self.kafka_partitions < 1 || self.projector_batch_size == 0 {
            anyhow::bail!("relay_batch_size, projector_batch_size and kafka_partitions must be at least 1");
        }
        if self.request_timeout_seconds == 0 {
            anyhow::bail!("request_timeout_seconds must be at least 1");
        }
        // A query waiting for its X-Min-Position is still a request: its timeout would cut the
        // wait short, answering 503 sooner than configured.
        if self.min_position_wait_seconds >= self.request_timeout_seconds {
            anyhow::bail!(
                "min_position_wait_seconds ({}) must be less than request_timeout_seconds ({})",
                self.min_position_wait_seconds,
                self.request_timeout_seconds
            );
        }
        if !(1..=24 * 365 * 10).contains(&self.idempotency_retention_hours) {
            anyhow::bail!("idempotency_retention_hours must be from 1 to 87600 (ten years)");
        }
        // A gateway's users go offline within the TTL and a third (the sweep): within 60 s.
        if self.realtime_send_buffer == 0 || !(3..=45).contains(&self.realtime_presence_ttl_seconds) {
            anyhow::bail!("realtime_send_buffer must be at least 1 and realtime_presence_ttl_seconds from 3 to 45");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_config_parses_and_sets_every_key() {
        let example = std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("quikapp.example.toml");
        let config: Config = Figment::from(Toml::file_exact(&example)).extract().expect("the example parses");
        let text = std::fs::read_to_string(&example).unwrap();
        for key in KEYS {
            let documented = text.lines().any(|l| l.trim_start_matches(['#', ' ']).starts_with(&format!("{key} =")));
            assert!(documented, "the example omits {key}");
        }
        assert_eq!(config.write_addr, default_write_addr());
    }

    #[test]
    fn values_that_cannot_work_are_refused() {
        let zero = Config { request_timeout_seconds: 0, ..Config::default() };
        assert!(zero.validate().unwrap_err().to_string().contains("request_timeout_seconds"));
        let cut_short = Config { min_position_wait_seconds: 30, request_timeout_seconds: 30, ..Config::default() };
        assert!(cut_short.validate().unwrap_err().to_string().contains("min_position_wait_seconds"));
        let forever = Config { idempotency_retention_hours: u64::MAX, ..Config::default() };
        assert!(forever.validate().unwrap_err().to_string().contains("idempotency_retention_hours"));
        Config::default().validate().unwrap();
    }

    #[test]
    fn an_unknown_key_is_an_error() {
        let error = Figment::from(Toml::string("postgress_url = \"x\"")).extract::<Config>().unwrap_err();
        assert!(error.to_string().contains("postgress_url"), "{error}");
    }
}
