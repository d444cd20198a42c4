//! The read models, the bus and the projector runtimes, as the configuration names them: the
//! real stores when their URLs are set, the embedded ones otherwise.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use quikapp_bus::EventBus;
use quikapp_bus::embedded::EmbeddedBus;
use quikapp_bus::kafka::KafkaBus;
use quikapp_commands::store::EventStore;
use quikapp_projections::Projector;
use quikapp_projections::audit::{CountersContents, DirectoryContents, Model, SearchContents, TimelinesContents};
use quikapp_projections::counters::memory::MemoryKeyspace;
use quikapp_projections::counters::redis::RedisKeyspace;
use quikapp_projections::counters::{Counters, Keys};
use quikapp_projections::directory::Directory;
use quikapp_projections::directory::memory::MemoryDirectory;
use quikapp_projections::directory::postgres::PostgresDirectory;
use quikapp_projections::runtime::{Runtime, RuntimeConfig};
use quikapp_projections::search::Search;
use quikapp_projections::search::opensearch::OpenSearch;
use quikapp_projections::search::sqlite::SqliteSearch;
use quikapp_projections::timelines::Timelines;
use quikapp_projections::timelines::memory::MemoryTimelines;
use quikapp_projections::timelines::mongo::MongoTimelines;

use crate::config::Config;
use crate::topics;

/// Which read models `quikapp project` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Selection {
    Postgres,
    Redis,
    Mongo,
    Search,
    All,
}

/// The directory (PostgreSQL), counters (Redis), timelines (MongoDB) and search
/// (Elasticsearch API) models, each with its projector.
pub struct ReadModels {
    directory: Option<(Arc<dyn Directory>, Arc<dyn Projector>)>,
    counters: Option<Counters>,
    timelines: Option<(Arc<dyn Timelines>, Arc<dyn Projector>)>,
    search: Option<(Arc<dyn Search>, Arc<dyn Projector>)>,
}

impl ReadModels {
    /// Every model.
    pub async fn open(config: &Config) -> Result<Self> {
        Self::open_selected(config, Selection::All).await
    }

    pub async fn open_selected(config: &Config, selection: Selection) -> Result<Self> {
        let directory = match selection {
            Selection::Postgres | Selection::All => Some(open_directory(config).await?),
            _ => None,
        };
        let counters = match selection {
            Selection::Redis | Selection::All => Some(open_counters(config).await?),
            _ => None,
        };
        let timelines = match selection {
            Selection::Mongo | Selection::All => Some(open_timelines(config).await?),
            _ => None,
        };
        let search = match selection {
            Selection::Search | Selection::All => Some(open_search(config).await?),
            _ => None,
        };
        Ok(ReadModels { directory, counters, timelines, search })
    }

    pub fn projectors(&self) -> Vec<Arc<dyn Projector>> {
        let directory = self.directory.iter().map(|(_, projector)| projector.clone());
        let counters = self.counters.iter().map(|counters| Arc::new(counters.clone()) as Arc<dyn Projector>);
        let timelines = self.timelines.iter().map(|(_, projector)| projector.clone());
        let search = self.search.iter().map(|(_, projector)| projector.clone());
        directory.chain(counters).chain(timelines).chain(search).collect()
    }

    /// Refuses to project into a model of an older schema version (the read API serves it
    /// meanwhile; `quikapp replay` rebuilds it).
    pub async fn check_schemas(&self) -> Result<()> {
        for projector in self.projectors() {
            projector.check_schema().await?;
        }
        Ok(())
    }

    /// What the read API serves (every model is open when it runs).
    pub fn served(&self, presence: Arc<dyn quikapp_realtime::presence::Presence>) -> quikapp_read_api::Models {
        let (directory, _) = self.directory.clone().expect("the read API opens every model");
        let counters = self.counters.clone().expect("the read API opens every model");
        let (timelines, _) = self.timelines.clone().expect("the read API opens every model");
        let (search, _) = self.search.clone().expect("the read API opens every model");
        quikapp_read_api::Models { directory, counters, timelines, search, presence, projectors: self.projectors() }
    }
}

/// The directory on PostgreSQL (migrated) when `postgres_url` is set, else in memory.
pub async fn open_directory(config: &Config) -> Result<(Arc<dyn Directory>, Arc<dyn Projector>)> {
    match &config.postgres_url {
        Some(url) => {
            let directory = Arc::new(PostgresDirectory::connect(url).await.context("connecting to PostgreSQL")?);
            directory.migrate().await.context("migrating the PostgreSQL read model")?;
            Ok((directory.clone(), directory))
        }
        None => {
            let directory = Arc::new(MemoryDirectory::new());
            Ok((directory.clone(), directory))
        }
    }
}

/// The timelines on MongoDB (indexes made) when `mongo_url` is set, else in memory.
pub async fn open_timelines(config: &Config) -> Result<(Arc<dyn Timelines>, Arc<dyn Projector>)> {
    match &config.mongo_url {
        Some(url) => {
            let timelines = Arc::new(MongoTimelines::connect(url).await.context("connecting to MongoDB")?);
            timelines.migrate().await.context("preparing the MongoDB read model")?;
            Ok((timelines.clone(), timelines))
        }
        None => {
            let timelines = Arc::new(MemoryTimelines::new());
            Ok((timelines.clone(), timelines))
        }
    }
}

/// Search on the Elasticsearch API (template and index made) when `elasticsearch_url` is set,
/// else on SQLite FTS5 in memory.
pub async fn open_search(config: &Config) -> Result<(Arc<dyn Search>, Arc<dyn Projector>)> {
    match &config.elasticsearch_url {
        Some(url) => {
            let search = Arc::new(OpenSearch::connect(url, &config.search_index_prefix)?);
            search.migrate().await.context("preparing the search read model")?;
            Ok((search.clone(), search))
        }
        None => {
            let search = Arc::new(SqliteSearch::in_memory().await?);
            Ok((search.clone(), search))
        }
    }
}

/// A new, empty embedded model of `selection` (one model, not `all`).
pub async fn open_embedded(selection: Selection) -> Result<Model> {
    Ok(match selection {
        Selection::Postgres => {
            let directory = Arc::new(MemoryDirectory::new());
            Model { projector: directory.clone(), contents: Arc::new(DirectoryContents(directory)) }
        }
        Selection::Redis => {
            let counters = Counters::new(Arc::new(MemoryKeyspace::new()), Keys::default());
            Model { projector: Arc::new(counters.clone()), contents: Arc::new(CountersContents(counters)) }
        }
        Selection::Mongo => {
            let timelines = Arc::new(MemoryTimelines::new());
            Model { projector: timelines.clone(), contents: Arc::new(TimelinesContents(timelines)) }
        }
        Selection::Search => {
            let search = Arc::new(SqliteSearch::in_memory().await?);
            Model { projector: search.clone(), contents: Arc::new(SearchContents(search)) }
        }
        Selection::All => anyhow::bail!("one model at a time"),
    })
}

pub async fn open_counters(config: &Config) -> Result<Counters> {
    let keys = Keys { prefix: config.redis_key_prefix.clone() };
    Ok(match &config.redis_url {
        Some(url) => {
            let keyspace = RedisKeyspace::connect(url, keys.clone()).await.context("connecting to Redis")?;
            keyspace.migrate().await.context("preparing the Redis read model")?;
            Counters::new(Arc::new(keyspace), keys)
        }
        None => Counters::new(Arc::new(MemoryKeyspace::new()), keys),
    })
}

/// Kafka when `kafka_brokers` is set, else the event store's own log.
pub async fn open_bus(config: &Config, store: Arc<dyn EventStore>) -> Result<Arc<dyn EventBus>> {
    Ok(match &config.kafka_brokers {
        Some(brokers) => {
            Arc::new(KafkaBus { brokers: brokers.clone(), topics: topics(config), partitions: config.kafka_partitions })
        }
        None => Arc::new(EmbeddedBus::new(store, topics(config), config.kafka_partitions)),
    })
}

/// Every partition of both topics: as Kafka has them when it is configured (waiting for it to
/// answer, as the other roles do), else `kafka_partitions` each (the embedded bus's). Read once
/// at start: a partition added to a topic later needs a restart of the read API.
pub async fn partitions(config: &Config) -> Vec<quikapp_bus::Partition> {
    let topics = topics(config);
    let Some(brokers) = &config.kafka_brokers else { return topics.partitions(config.kafka_partitions) };
    let bus = KafkaBus { brokers: brokers.clone(), topics, partitions: config.kafka_partitions };
    let mut backoff = Duration::from_secs(1);
    loop {
        match bus.partitions_on_broker().await {
            Ok(partitions) => return partitions,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot read the topics' partitions from Kafka yet")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

pub fn runtime(config: &Config, projector: Arc<dyn Projector>, bus: Arc<dyn EventBus>) -> Runtime {
    let runtime_config = RuntimeConfig {
        batch_size: config.projector_batch_size,
        max_backoff: Duration::from_secs(10),
        group_prefix: config.kafka_group_prefix.clone(),
        ..RuntimeConfig::default()
    };
    Runtime { projector, bus, config: runtime_config }
}
