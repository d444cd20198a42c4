//! `quikapp replay`: rebuilds read models beside the live ones and swaps them in (API.md,
//! Replay). The steps are `quikapp_projections::replay`'s; this is the command around them:
//! which versions each model has, one replay per model at a time, progress on the terminal.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use quikapp_commands::store::EventStore;
use quikapp_projections::audit::Model;
use quikapp_projections::counters::redis::{RedisKeyspace, RedisVersions};
use quikapp_projections::counters::{Counters, Keys};
use quikapp_projections::directory::postgres::{PostgresDirectory, PostgresVersions};
use quikapp_projections::replay::{Paused, Replay, ReplayOptions, Report, Source, Summary, Versions};
use quikapp_projections::runtime::RuntimeConfig;
use quikapp_projections::search::opensearch::{OpenSearch, OpenSearchVersions};
use quikapp_projections::timelines::mongo::{MongoTimelines, MongoVersions};

use crate::config::Config;
use crate::models::{self, Selection};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// `postgres`, `redis`, `mongo`, `search`, or `all`.
    model: Selection,
    /// Drop what an interrupted replay of the model left and start over.
    #[arg(long)]
    restart: bool,
    /// Keep the old version after the swap (PostgreSQL's and Redis's next replay drops it; an
    /// old search index or pair of MongoDB collections stays until deleted by hand).
    #[arg(long)]
    keep_old: bool,
    /// Rebuild, catch up and compare (as --verify), but leave the live model in place.
    #[arg(long)]
    dry_run: bool,
    /// Compare the rebuild with the live model before the swap: per channel, workspace and
    /// user, counts and a digest, then each entry that differs. Exit status 1 if they differ.
    #[arg(long)]
    verify: bool,
    /// With --verify: no rebuild; compare the live model with a fold of the store in memory.
    #[arg(long, requires = "verify", conflicts_with_all = ["restart", "keep_old", "dry_run"])]
    live_only: bool,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Events read from the store and written per batch.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
    /// Where the history comes from: the event store, or the Kafka topics from their earliest
    /// offsets (refused if retention has dropped any).
    #[arg(long, value_enum, default_value_t = HistorySource::Store, conflicts_with = "live_only")]
    source: HistorySource,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum HistorySource {
    Store,
    Kafka,
}

pub async fn run(config: &Config, args: ReplayArgs) -> Result<()> {
    let store = crate::open_event_store(config).await?;
    let names: Vec<Selection> = match args.model {
        Selection::All => vec![Selection::Postgres, Selection::Redis, Selection::Mongo, Selection::Search],
        one => vec![one],
    };
    if args.live_only {
        return audit_live(config, &args, &store, &names).await;
    }
    let verify = args.verify || args.dry_run;
    if verify && config.kafka_brokers.is_none() {
        bail!("the embedded models live in the memory of `quikapp dev`: there is no live model to compare with");
    }
    let source = match args.source {
        HistorySource::Store => Source::Store,
        HistorySource::Kafka if config.kafka_brokers.is_none() => bail!("--source kafka needs QUIKAPP_KAFKA_BROKERS"),
        HistorySource::Kafka => Source::Bus,
    };
    // Every model's store answers before the first rebuild starts: `all` stops before doing
    // anything rather than after some models were swapped.
    let mut selected = Vec::new();
    for selection in names {
        let name = model_name(selection);
        let (versions, bus) = versions(config, selection, &store).await?;
        if bus.is_some() {
            versions.live().projector.stored().await.with_context(|| format!("reading the live {name} model"))?;
        }
        selected.push((name, versions, bus));
    }
    let started = Instant::now();
    let mut summaries = Vec::new();
    let mut differing = Vec::new();
    for (name, versions, bus) in selected {
        let _lock = lock(config, name).await?;
        let replay = Replay {
            model: name,
            store: store.clone(),
            bus,
            versions,
            options: ReplayOptions {
                source,
                restart: args.restart,
                keep_old: args.keep_old,
                dry_run: args.dry_run,
                verify,
                batch_size: args.batch_size,
                runtime: RuntimeConfig {
                    batch_size: config.projector_batch_size,
                    group_prefix: format!("{}replay-", config.kafka_group_prefix),
                    ..RuntimeConfig::default()
                },
            },
        };
        let report = Terminal::new();
        let summary = tokio::select! {
            summary = replay.run(&report) => summary.with_context(|| format!("replay of the {name} model"))?,
            () = crate::shutdown_signal() => {
                report.finish();
                if let Err(error) = replay.versions.unpause().await {
                    eprintln!("the live {name} model stays paused until the pause lapses (a minute): {error}");
                }
                bail!("interrupted: run the same command again to resume the rebuild, or with --restart to start over")
            }
        };
        report.finish();
        if !args.json {
            print_summary(&summary);
        }
        if let Some(verdict) = &summary.verdict {
            if !args.json {
                verdict.lines("rebuild", "live").iter().for_each(|line| println!("{name}: {line}"));
            }
            if !verdict.differences.is_empty() {
                differing.push(name);
            }
        }
        summaries.push(summary);
    }
    if args.json {
        let json = serde_json::json!({ "models": summaries, "seconds": started.elapsed().as_secs_f64() });
        println!("{json}");
    }
    match differing.as_slice() {
        [] => Ok(()),
        models => bail!("the live model differs from the rebuild: {}", models.join(", ")),
    }
}

/// `--verify --live-only`: each live model against a fold of the store in memory.
async fn audit_live(
    config: &Config,
    args: &ReplayArgs,
    store: &Arc<dyn EventStore>,
    names: &[Selection],
) -> Result<()> {
    let Some(_) = &config.kafka_brokers else {
        bail!(
            "the embedded models live in the memory of `quikapp dev`, which rebuilds them at each start: nothing to audit"
        )
    };
    let mut verdicts = serde_json::Map::new();
    let mut differing = Vec::new();
    for selection in names {
        let name = model_name(*selection);
        let (versions, bus) = versions(config, *selection, store).await?;
        let partitions = bus.expect("Kafka is configured").partitions();
        let reference = models::open_embedded(*selection).await?;
        let live = versions.live();
        let verdict =
            quikapp_projections::replay::audit_live(store.as_ref(), &partitions, &live, &reference, args.batch_size)
                .await
                .with_context(|| format!("auditing the {name} model"))?;
        if !args.json {
            verdict.lines("the event store", "live").iter().for_each(|line| println!("{name}: {line}"));
        }
        if !verdict.differences.is_empty() {
            differing.push(name);
        }
        verdicts.insert(name.into(), quikapp_projections::audit::summary(&verdict));
    }
    if args.json {
        println!("{}", serde_json::Value::Object(verdicts));
    }
    match differing.as_slice() {
        [] => Ok(()),
        models => bail!("the live model differs from the event store: {}", models.join(", ")),
    }
}

fn model_name(selection: Selection) -> &'static str {
    match selection {
        Selection::Postgres => "postgres",
        Selection::Redis => "redis",
        Selection::Mongo => "mongo",
        Selection::Search => "search",
        Selection::All => unreachable!("`all` is taken apart first"),
    }
}

fn print_summary(summary: &Summary) {
    let outcome = if summary.swapped { "swapped in" } else { "not swapped (dry run or embedded)" };
    let source = match summary.source {
        Source::Store => "the event store",
        Source::Bus => "Kafka",
    };
    println!(
        "{}: {} events from {source} through position {} in {:.1} s ({:.0} events/s), {outcome}",
        summary.model, summary.events, summary.through, summary.seconds, summary.events_per_second
    );
}

/// The live model and its rebuild, with the bus the live one follows (none on the embedded
/// default, whose models live in `quikapp dev`'s memory and are rebuilt at each start).
async fn versions(
    config: &Config,
    selection: Selection,
    store: &Arc<dyn EventStore>,
) -> Result<(Arc<dyn Versions>, Option<Arc<dyn quikapp_bus::EventBus>>)> {
    let bus = match &config.kafka_brokers {
        Some(_) => Some(models::open_bus(config, store.clone()).await?),
        None => None,
    };
    if bus.is_none() {
        return Ok((Arc::new(Embedded(models::open_embedded(selection).await?)), None));
    }
    let missing = |variable: &str| {
        anyhow::anyhow!("`quikapp replay {}` needs {variable} (the model's store)", model_name(selection))
    };
    let versions: Arc<dyn Versions> = match selection {
        Selection::Postgres => {
            let url = config.postgres_url.as_deref().ok_or_else(|| missing("QUIKAPP_POSTGRES_URL"))?;
            // Not migrated: a model of an older schema version is what a replay is for.
            let live = PostgresDirectory::connect(url).await.context("connecting to the PostgreSQL read model")?;
            Arc::new(PostgresVersions::new(Arc::new(live)))
        }
        Selection::Redis => {
            let url = config.redis_url.as_deref().ok_or_else(|| missing("QUIKAPP_REDIS_URL"))?;
            let keys = Keys { prefix: config.redis_key_prefix.clone() };
            let keyspace = RedisKeyspace::connect(url, keys.clone()).await.context("connecting to Redis")?;
            let live = Arc::new(Counters::new(Arc::new(keyspace), keys.clone()));
            Arc::new(RedisVersions::new(live, url, keys, config.redis_rebuild_db)?)
        }
        Selection::Search => {
            let url = config.elasticsearch_url.as_deref().ok_or_else(|| missing("QUIKAPP_ELASTICSEARCH_URL"))?;
            let live = OpenSearch::connect(url, &config.search_index_prefix).context("the search read model")?;
            Arc::new(OpenSearchVersions::new(Arc::new(live)))
        }
        Selection::Mongo => {
            let url = config.mongo_url.as_deref().ok_or_else(|| missing("QUIKAPP_MONGO_URL"))?;
            let live = MongoTimelines::connect(url).await.context("connecting to MongoDB")?;
            Arc::new(MongoVersions::new(Arc::new(live)))
        }
        Selection::All => unreachable!("`all` is taken apart first"),
    };
    Ok((versions, bus))
}

/// A model of the embedded default: rebuilt in memory, here only to be counted (`quikapp dev`
/// rebuilds its own at each start).
struct Embedded(Model);

#[async_trait::async_trait]
impl Versions for Embedded {
    fn live(&self) -> Model {
        self.0.clone()
    }
    async fn rebuild(&self) -> Result<Model, quikapp_projections::ProjectionError> {
        Ok(self.0.clone())
    }
    async fn discard(&self) -> Result<(), quikapp_projections::ProjectionError> {
        Ok(())
    }
    async fn pause(&self) -> Result<Box<dyn Paused>, quikapp_projections::ProjectionError> {
        Err(quikapp_projections::ProjectionError::Unfit("an embedded model has nothing to swap with".into()))
    }
}

/// Held while a model's replay runs: a PostgreSQL session lock on the event store's database,
/// or a lock on a file beside the embedded store. Both go with the process, however it ends.
enum Lock {
    Postgres(#[allow(dead_code)] sqlx::pool::PoolConnection<sqlx::Postgres>),
    File(#[allow(dead_code)] std::fs::File),
}

async fn lock(config: &Config, model: &str) -> Result<Lock> {
    let refused = || anyhow::anyhow!("another replay of the {model} model is running; wait for it to end");
    match &config.postgres_url {
        Some(url) => {
            let pool = sqlx::PgPool::connect(url).await.context("connecting to the event store")?;
            let mut connection = pool.acquire().await?;
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('quikapp-replay-' || $1))")
                .bind(model)
                .fetch_one(&mut *connection)
                .await?;
            if !locked {
                return Err(refused());
            }
            Ok(Lock::Postgres(connection))
        }
        None => {
            let path = config.data_dir.join(format!("replay-{model}.lock"));
            let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => Ok(Lock::File(file)),
                Err(std::fs::TryLockError::WouldBlock) => Err(refused()),
                Err(std::fs::TryLockError::Error(error)) => Err(error).context(format!("locking {}", path.display())),
            }
        }
    }
}

/// A progress bar on a terminal; on anything else, a line every few seconds.
struct Terminal {
    bar: Option<indicatif::ProgressBar>,
    last_line: Mutex<Option<Instant>>,
    started: Instant,
}

impl Terminal {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>8} [{bar:32}] {human_pos}/{human_len} events  {per_sec}  ETA {eta}  {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Terminal { bar, last_line: Mutex::new(None), started: Instant::now() }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Report for Terminal {
    fn progress(&self, model: &str, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_prefix(model.to_owned());
            bar.set_length(total);
            bar.set_position(done);
            return;
        }
        let mut last = self.last_line.lock().expect("not poisoned");
        if done < total && last.is_some_and(|at| at.elapsed() < Duration::from_secs(2)) {
            return;
        }
        *last = Some(Instant::now());
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / seconds;
        let eta = if rate > 0.0 { (total - done) as f64 / rate } else { 0.0 };
        eprintln!("replay {model}: {done}/{total} events, {rate:.0} events/s, ETA {eta:.0} s");
    }

    fn step(&self, model: &str, step: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(step.to_owned()),
            None => eprintln!("replay {model}: {step}"),
        }
    }
}
