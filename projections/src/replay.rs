//! Rebuilding a read model from the event store beside the live one, then swapping it in.
//!
//! A rebuild is a second version of the model (a schema, an index, a keyspace: see each
//! model's [`Versions`]) filled by its own projector, in three steps:
//!
//! 1. **Start.** The live model's stored offsets `S0` are copied into the rebuild, then the
//!    store's head `G` is read (the store makes positions visible in order, so every event up
//!    to `G` can be read). Every record up to `S0` carries an event at or below `G`: the live
//!    model had applied it, so it was committed before `G` was read. Every event above `G`
//!    was committed after, so its record is after `S0`. (The relay's checkpoint would not do:
//!    it is saved after Kafka acknowledges, so a projector may have applied events above it.)
//! 2. **History.** The store's events up to `G`, in pages of [`ReplayOptions::batch_size`],
//!    each applied as one batch whose only move is the [`REPLAY`] partition's offset: the last
//!    position applied. That move is stored with the effects, so an interrupted rebuild resumes
//!    where it stopped. The last batch sets the REPLAY watermark to `G`: history done.
//! 3. **Catch-up and swap.** A projector runtime of its own reads the bus from `S0` on,
//!    passing over events at or below `G` (they came from the store), until the rebuild has
//!    applied every partition at least as far as the live model and past a watermark of `G`
//!    (so past every record of an event up to `G`). Then the live model is
//!    paused ([`Versions::pause`]), the rebuild reaches where it stopped, and [`Paused::swap`]
//!    makes the rebuild live in one step. The live projectors, whose stored offsets are now the
//!    rebuild's, learn them on their next batch ([`ProjectionError::Moved`]) and go on.
//!
//! With [`Source::Bus`] (`--source kafka`) there is no history step: the rebuild starts with no
//! offsets, so its runtime reads every partition from its first record, as a new live projector
//! would, and catches up as in step 3 (past a watermark of the store's head when it began).
//! That needs the bus to still hold every record: [`Replay::run`] refuses a partition whose
//! first record is gone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use quikapp_bus::{EventBus, Partition};
use quikapp_commands::store::{EventStore, ReplayProgress};
use serde::Serialize;

use crate::audit::{History, Model, Verdict, compare};
use crate::runtime::{Runtime, RuntimeConfig, unknown_schema};
use crate::{Batch, Move, Progress, ProjectionError, Projector, Stored, applied_position};

/// The pseudo-partition a rebuild stores its place in the event store under: offset, the last
/// position applied; watermark, the position its history ends at once it is done (else 0).
/// A rebuild from the bus has one too, of index 1 and always zero, to tell it apart.
pub const REPLAY_TOPIC: &str = "replay";

fn replay_partition(source: Source) -> Partition {
    let index = match source {
        Source::Store => 0,
        Source::Bus => 1,
    };
    Partition { topic: REPLAY_TOPIC.into(), index }
}

/// Where a rebuild reads the history from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Source {
    /// The event store, the source of truth (the default).
    #[serde(rename = "store")]
    Store,
    /// The event topics from their first records (`--source kafka`).
    #[serde(rename = "kafka")]
    Bus,
}

/// A model's versions: the live one and a rebuild beside it.
#[async_trait]
pub trait Versions: Send + Sync {
    /// The live model.
    fn live(&self) -> Model;
    /// The rebuild, its storage made (empty, at this build's schema) if missing.
    async fn rebuild(&self) -> Result<Model, ProjectionError>;
    /// Drops the rebuild, if there is one.
    async fn discard(&self) -> Result<(), ProjectionError>;
    /// Makes the rebuild's secondary indexes, if [`Versions::rebuild`] left them out so that
    /// the history is written without them (a bulk load's index is built once over the rows
    /// for less than it costs to keep up to date row by row). Run once the history is in,
    /// before the catch-up; does nothing to indexes already there.
    async fn index(&self) -> Result<(), ProjectionError> {
        Ok(())
    }
    /// Events of history per batch this model needs at least: a store that rewrites a whole
    /// document on every update does better with the changes folded into fewer writes.
    fn history_batch(&self) -> u32 {
        0
    }
    /// Stops the live model's projectors from storing anything until the swap (or until the
    /// pause is dropped or lapses): their batches wait or are refused as unavailable.
    async fn pause(&self) -> Result<Box<dyn Paused>, ProjectionError>;
    /// Ends a pause this process can no longer end through its [`Paused`] (the replay was
    /// interrupted): the live projectors go on at once instead of when the pause lapses. A pause
    /// held by a transaction or connection ends with it, and needs nothing.
    async fn unpause(&self) -> Result<(), ProjectionError> {
        Ok(())
    }
}

/// The live model, paused.
#[async_trait]
pub trait Paused: Send {
    /// The live model's progress, which no longer moves.
    async fn live(&mut self) -> Result<Stored, ProjectionError>;
    /// Makes the rebuild the live model in one atomic step, unless it is behind the live model
    /// ([`SwapError::Behind`]: nothing changed, still paused), and ends the pause. The old
    /// version is dropped unless `keep_old`.
    async fn swap(&mut self, keep_old: bool) -> Result<(), SwapError>;
    /// Ends the pause without a swap.
    async fn resume(self: Box<Self>);
}

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("the rebuild is behind the live model on {0}")]
    Behind(String),
    #[error(transparent)]
    Store(#[from] ProjectionError),
}

/// Whether `rebuild` has applied every partition of the bus at least as far as `live`; the
/// first one it has not, if not.
pub fn behind(live: &Stored, rebuild: &Stored) -> Option<Partition> {
    live.partitions.iter().find_map(|(partition, progress)| {
        let ahead = partition.topic == REPLAY_TOPIC
            || rebuild.partitions.get(partition).is_some_and(|own| own.offset >= progress.offset);
        (!ahead).then(|| partition.clone())
    })
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub source: Source,
    /// Drop what an earlier, interrupted rebuild left and start over.
    pub restart: bool,
    pub keep_old: bool,
    /// Rebuild (and catch up) but leave the live model as it is.
    pub dry_run: bool,
    /// Compare the rebuild with the live model once it has caught up, before the swap.
    pub verify: bool,
    /// Events read from the store and applied per batch.
    pub batch_size: u32,
    /// The catch-up's runtime (its `group_prefix` and `skip_through` are set here).
    pub runtime: RuntimeConfig,
}

/// What a replay did, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub model: String,
    pub source: Source,
    /// Events of history applied by this run (from the bus: positions its watermarks passed).
    pub events: u64,
    /// Where this run started in the store's history (0: from the beginning).
    pub resumed_from: u64,
    /// The end of the history: the store's head when the rebuild began or this run resumed it.
    pub through: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    /// Whether the rebuild is now the live model.
    pub swapped: bool,
    /// With `--verify`: how the rebuild compared with the live model before the swap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

/// What a replay shows while it runs.
pub trait Report: Send + Sync {
    /// `done` of `total` events of history applied.
    fn progress(&self, model: &str, done: u64, total: u64);
    /// A step begins (`catching up with the live model`, `swapping`...).
    fn step(&self, model: &str, step: &str);
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the event store: {0}")]
    EventStore(String),
    #[error(transparent)]
    Model(#[from] ProjectionError),
    #[error("no swap: {0}")]
    NoSwap(String),
    #[error("the bus: {0}")]
    Bus(String),
}

pub struct Replay {
    pub model: &'static str,
    pub store: Arc<dyn EventStore>,
    /// The bus the live model follows; `None` for a rebuild with nothing to swap (the embedded
    /// default, whose models live in `quikapp dev`'s memory).
    pub bus: Option<Arc<dyn EventBus>>,
    pub versions: Arc<dyn Versions>,
    pub options: ReplayOptions,
}

impl Replay {
    pub async fn run(&self, report: &dyn Report) -> Result<Summary, ReplayError> {
        let progress = Arc::new(std::sync::Mutex::new(ReplayProgress::default()));
        let heartbeat = tokio::spawn(heartbeat(self.store.clone(), self.model, progress.clone()));
        let outcome = self.steps(&Shown { report, progress }).await;
        heartbeat.abort();
        let _ = heartbeat.await;
        if outcome.is_ok() {
            let _ = self.store.end_replay(self.model).await;
        }
        outcome
    }

    async fn steps(&self, shown: &Shown<'_>) -> Result<Summary, ReplayError> {
        let started = Instant::now();
        let source = self.options.source;
        if source == Source::Bus {
            self.bus_holds_everything().await?;
        }
        if self.options.restart {
            self.versions.discard().await?;
        }
        let mut rebuild = self.versions.rebuild().await?;
        let mark = replay_partition(source);
        let mut place = rebuild.projector.stored().await?.partitions.get(&mark).copied();
        if rebuild.projector.check_schema().await.is_err() {
            place = None; // begun by an older build: of no use to this one
        }
        if place.is_none() {
            // Not a rebuild begun by a replay from this source (an old version kept, a start
            // cut short, a rebuild from the other source): anew.
            self.versions.discard().await?;
            rebuild = self.versions.rebuild().await?;
            self.start(rebuild.projector.as_ref()).await?;
        }
        let place = place.unwrap_or_default();
        let head = || async { self.store.head().await.map_err(|e| ReplayError::EventStore(e.to_string())) };
        let (resumed_from, through) = match source {
            Source::Store if place.watermark > 0 => (place.offset, place.watermark),
            Source::Store => {
                let through = head().await?;
                self.history(rebuild.projector.as_ref(), place.offset, through, shown).await?;
                (place.offset, through)
            }
            Source::Bus => {
                let partitions = self.bus.as_ref().map(|bus| bus.partitions()).unwrap_or_default();
                (read_through(&rebuild.projector.stored().await?, &partitions), head().await?)
            }
        };
        shown.step(self.model, "building the indexes");
        self.versions.index().await?;
        let events = through.saturating_sub(resumed_from);
        let (swapped, verdict) = match &self.bus {
            Some(bus) => self.catch_up_and_swap(&rebuild, bus.clone(), through, shown).await?,
            None => (false, None),
        };
        let seconds = started.elapsed().as_secs_f64();
        Ok(Summary {
            model: self.model.into(),
            source,
            events,
            resumed_from,
            through,
            seconds,
            events_per_second: events as f64 / seconds.max(1e-9),
            swapped,
            verdict,
        })
    }

    /// Copies the live model's offsets into a new rebuild, with its place in the store at 0;
    /// from the bus, no offsets: it is read from the start.
    async fn start(&self, rebuild: &dyn Projector) -> Result<(), ReplayError> {
        let live = match (&self.bus, self.options.source) {
            (Some(_), Source::Store) => self.versions.live().projector.stored().await?,
            _ => Stored::default(),
        };
        let mut moves: Vec<Move> = live
            .partitions
            .iter()
            .filter(|(partition, _)| partition.topic != REPLAY_TOPIC)
            .map(|(partition, progress)| Move {
                partition: partition.clone(),
                from: None,
                to: Progress { offset: progress.offset, watermark: 0 },
            })
            .collect();
        moves.push(Move { partition: replay_partition(self.options.source), from: None, to: Progress::default() });
        rebuild.apply(&Batch { events: vec![], moves, dead_lettered: 0 }).await?;
        Ok(())
    }

    /// Refuses a bus that no longer holds the first record of every partition (retention
    /// dropped it): a rebuild from it would miss those events.
    async fn bus_holds_everything(&self) -> Result<(), ReplayError> {
        let Some(bus) = &self.bus else {
            return Err(ReplayError::Bus("there is no bus to read the history from".into()));
        };
        let partitions = bus.partitions();
        let firsts = partitions.iter().map(|partition| bus.read(partition, None, 1, Duration::from_secs(5)));
        let firsts = futures::future::try_join_all(firsts).await.map_err(|e| ReplayError::Bus(e.to_string()))?;
        for (partition, first) in partitions.iter().zip(firsts) {
            if let Some(record) = first.first()
                && record.offset() > 0
            {
                return Err(ReplayError::Bus(format!(
                    "{}/{} starts at offset {}, its earlier records dropped by retention: replay from the event store",
                    partition.topic,
                    partition.index,
                    record.offset()
                )));
            }
        }
        Ok(())
    }

    /// Applies the store's events after `from` up to `through`, a batch per page; the next
    /// pages are read while one is applied (positions have no gaps, so each page's range is
    /// known before it is read).
    async fn history(
        &self,
        rebuild: &dyn Projector,
        from: u64,
        through: u64,
        shown: &Shown<'_>,
    ) -> Result<(), ReplayError> {
        let total = through.saturating_sub(from);
        shown.progress(self.model, 0, total);
        let size = u64::from(self.options.batch_size.max(self.versions.history_batch()));
        let ranges: Vec<(u64, u64)> =
            (from..through).step_by(size as usize).map(|after| (after, (after + size).min(through))).collect();
        // A reader of its own, so that reading goes on while a batch is applied; large pages
        // (the timelines') are not read ahead further, for memory.
        let (pages_out, mut pages) = tokio::sync::mpsc::channel(if size > 100_000 { 1 } else { READ_AHEAD });
        let store = self.store.clone();
        let reader = tokio::spawn(async move {
            for (after, end) in ranges {
                let page = read_page(&store, after, end, READ_PIECE).await;
                let failed = page.is_err();
                if pages_out.send(page).await.is_err() || failed {
                    return;
                }
            }
        });
        let _stop_reading = AbortOnDrop(reader);
        let mut place = from;
        loop {
            let page = match pages.recv().await {
                Some(page) => page?,
                None if place == from => vec![], // nothing to read: the history is still marked done
                None => return Ok(()),
            };
            let last = page.last().map_or(place, |event| event.global_position);
            let done = last >= through;
            let mut batch = Batch { events: Vec::with_capacity(page.len()), moves: vec![], dead_lettered: 0 };
            for event in page {
                match unknown_schema(&event) {
                    Some(why) => {
                        tracing::warn!(model = self.model, position = event.global_position, why, "passed over");
                        batch.dead_lettered += 1;
                    }
                    None => batch.events.push(event),
                }
            }
            let watermark = if done { through } else { 0 };
            batch.moves.push(Move {
                partition: replay_partition(Source::Store),
                from: Some(place),
                to: Progress { offset: last, watermark },
            });
            self.apply(rebuild, &batch).await?;
            place = last;
            shown.progress(self.model, place - from, total);
            if done {
                return Ok(());
            }
        }
    }

    /// Applies `batch`, waiting out a store unavailable for a while.
    async fn apply(&self, rebuild: &dyn Projector, batch: &Batch) -> Result<(), ReplayError> {
        let mut backoff = Duration::from_millis(200);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rebuild.apply(batch).await {
                Err(ProjectionError::Unavailable(error)) if Instant::now() < deadline => {
                    tracing::warn!(model = self.model, error, retry_in = ?backoff, "the rebuild's store is unavailable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                outcome => return Ok(outcome?),
            }
        }
    }

    /// Follows the bus into the rebuild until it has what the live model has; then pauses the
    /// live model, lets the rebuild reach where it stopped, and swaps.
    async fn catch_up_and_swap(
        &self,
        rebuild: &Model,
        bus: Arc<dyn EventBus>,
        through: u64,
        shown: &Shown<'_>,
    ) -> Result<(bool, Option<Verdict>), ReplayError> {
        let live = self.versions.live();
        let partitions = bus.partitions();
        let skip_through = match self.options.source {
            Source::Store => through,
            Source::Bus => 0,
        };
        let config = RuntimeConfig { skip_through, ..self.options.runtime.clone() };
        let projector = rebuild.projector.clone();
        let follow =
            || Following::start(Runtime { projector: projector.clone(), bus: bus.clone(), config: config.clone() });
        shown.step(self.model, "catching up with the live model");
        let following = follow();
        let mut reached = self
            .reach(projector.as_ref(), &mut Live::Running(live.projector.as_ref()), &partitions, through, None, shown)
            .await;
        let mut verdict = None;
        if reached.is_ok() && self.options.verify {
            shown.step(self.model, "comparing the rebuild with the live model");
            match audit(self.store.as_ref(), &partitions, rebuild, &live).await {
                Ok(found) => verdict = Some(found),
                Err(error) => reached = Err(error),
            }
        }
        if reached.is_err() || self.options.dry_run {
            following.stop().await;
            return reached.map(|()| (false, verdict));
        }
        shown.step(self.model, "pausing the live model");
        let mut paused = match self.versions.pause().await {
            Ok(paused) => paused,
            Err(error) => {
                following.stop().await;
                return Err(error.into());
            }
        };
        let limit = Instant::now() + PAUSE_LIMIT;
        let mut following = Some(following);
        let outcome = loop {
            // Batches in flight when the pause began may still land: reach them too.
            let current = following.take().unwrap_or_else(follow);
            let paused_live = &mut Live::Paused(&mut paused);
            let reached = self.reach(projector.as_ref(), paused_live, &partitions, through, Some(limit), shown).await;
            current.stop().await;
            if let Err(error) = reached {
                break Err(error);
            }
            shown.step(self.model, "swapping");
            match paused.swap(self.options.keep_old).await {
                Ok(()) => break Ok((true, verdict.take())),
                Err(SwapError::Behind(why)) if Instant::now() < limit => {
                    tracing::info!(model = self.model, why, "the paused live model moved on; catching up again");
                }
                Err(SwapError::Behind(why)) => break Err(ReplayError::NoSwap(why)),
                Err(SwapError::Store(error)) => break Err(error.into()),
            }
        };
        if outcome.is_err() {
            paused.resume().await;
        }
        outcome
    }

    /// Waits until `rebuild` has applied every partition as far as `live` says, until `limit`.
    async fn reach(
        &self,
        rebuild: &dyn Projector,
        live: &mut Live<'_>,
        partitions: &[Partition],
        through: u64,
        limit: Option<Instant>,
        shown: &Shown<'_>,
    ) -> Result<(), ReplayError> {
        // The rebuild's offsets, and when they last moved.
        let mut moving = (0, Instant::now());
        loop {
            let live_now = match live {
                Live::Running(projector) => projector.stored().await?,
                Live::Paused(paused) => paused.live().await?,
            };
            let own = rebuild.stored().await?;
            if self.options.source == Source::Bus {
                // The history is what the bus holds up to `through`.
                let done = read_through(&own, partitions).min(through);
                shown.progress(self.model, done, through);
            }
            // Past a watermark of `through` on every partition, the rebuild is past every record
            // of the history (the relay publishes in commit order): the live projectors, once
            // they follow its offsets, never meet one of them again.
            let short = partitions.iter().find(|p| own.partitions.get(*p).is_none_or(|at| at.watermark < through));
            let Some(partition) = behind(&live_now, &own).or_else(|| short.cloned()) else { return Ok(()) };
            let at = format!("{}/{}", partition.topic, partition.index);
            if limit.is_some_and(|limit| Instant::now() > limit) {
                return Err(ReplayError::NoSwap(format!(
                    "the rebuild did not reach the paused live model on {at} within {PAUSE_LIMIT:?}"
                )));
            }
            let offsets: u64 = own.partitions.values().map(|p| p.offset).sum();
            if offsets != moving.0 {
                moving = (offsets, Instant::now());
            } else if moving.1.elapsed() > STALLED {
                return Err(ReplayError::NoSwap(format!(
                    "the rebuild has not moved for {STALLED:?} and is behind the live model on {at}: is Kafka reachable?"
                )));
            }
            tokio::select! {
                () = rebuild.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

/// What a replay shows: on the terminal, and in the store for GET /projections.
struct Shown<'a> {
    report: &'a dyn Report,
    /// What the heartbeat records.
    progress: Arc<std::sync::Mutex<ReplayProgress>>,
}

impl Shown<'_> {
    fn progress(&self, model: &str, done: u64, total: u64) {
        self.report.progress(model, done, total);
        *self.progress.lock().expect("not poisoned") = ReplayProgress { done, total };
    }

    fn step(&self, model: &str, step: &str) {
        self.report.step(model, step);
    }
}

/// How far a rebuild from the bus has read all of `partitions`: the lowest watermark it stored.
fn read_through(stored: &Stored, partitions: &[Partition]) -> u64 {
    let watermark = |partition| stored.partitions.get(partition).map_or(0, |progress| progress.watermark);
    partitions.iter().map(watermark).min().unwrap_or(0)
}

/// Records `progress` in the store every second, for GET /projections, until aborted.
async fn heartbeat(store: Arc<dyn EventStore>, model: &'static str, progress: Arc<std::sync::Mutex<ReplayProgress>>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        let now = *progress.lock().expect("not poisoned");
        if let Err(error) = store.record_replay(model, now).await {
            tracing::warn!(model, %error, "cannot record the replay's progress");
        }
    }
}

/// The rebuild's projector runtime, following the bus.
struct Following {
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<()>,
}

impl Following {
    fn start(runtime: Runtime) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(runtime.run(async {
            let _ = stopped.await;
        }));
        Following { stop, running }
    }

    /// Stops it, a batch in flight cut short (every projector stores a batch whole or not).
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.running.await;
    }
}

/// The live model, as a rebuild catching up reads its progress.
enum Live<'a> {
    Running(&'a dyn Projector),
    Paused(&'a mut Box<dyn Paused>),
}

/// Pages of history read ahead of the one being applied.
const READ_AHEAD: usize = 2;

/// Events of a page read by one query: a larger page is read in pieces, two at a time, each
/// on a task of its own (two server processes, and two threads decoding).
const READ_PIECE: u64 = 50_000;

/// The store's events after `after`, up to `end`: all of them, read in pieces of at most
/// `piece` events.
async fn read_page(
    store: &Arc<dyn EventStore>,
    after: u64,
    end: u64,
    piece: u64,
) -> Result<Vec<quikapp_domain::Envelope>, ReplayError> {
    use futures::StreamExt;
    let pieces = (after..end).step_by(piece as usize).map(|from| {
        let store = store.clone();
        let to = (from + piece).min(end);
        let piece = AbortOnDrop(tokio::spawn(async move { read_piece(store.as_ref(), from, to).await }));
        async move { piece.await.map_err(|e| ReplayError::EventStore(e.to_string()))? }
    });
    let mut pieces = futures::stream::iter(pieces).buffered(2);
    let mut page = Vec::with_capacity(usize::try_from(end - after).unwrap_or_default());
    while let Some(piece) = pieces.next().await {
        page.extend(piece?);
    }
    Ok(page)
}

async fn read_piece(
    store: &dyn EventStore,
    after: u64,
    end: u64,
) -> Result<Vec<quikapp_domain::Envelope>, ReplayError> {
    let limit = u32::try_from(end - after).unwrap_or(u32::MAX);
    let page = store.read_all(after, limit).await.map_err(|e| ReplayError::EventStore(e.to_string()))?;
    match page.last() {
        Some(last) if last.global_position == end => Ok(page),
        _ => Err(ReplayError::EventStore(format!("fewer events than positions between {after} and {end}"))),
    }
}

/// Aborts a task when dropped (a replay that fails or is stopped leaves no reader behind);
/// awaited, the task's outcome.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// The longest the rebuild following the bus may stand still while behind the live model.
const STALLED: Duration = Duration::from_secs(60);

/// The longest the live model stays paused while the rebuild reaches it.
const PAUSE_LIMIT: Duration = Duration::from_secs(30);

/// Compares `found` with `expected` (see [`crate::audit`]) on what both have applied of the
/// store's history as it is now.
pub async fn audit(
    store: &dyn EventStore,
    partitions: &[Partition],
    expected: &Model,
    found: &Model,
) -> Result<Verdict, ReplayError> {
    let failed = |e: String| ReplayError::EventStore(e);
    let head = store.head().await.map_err(|e| failed(e.to_string()))?;
    let history = History::read(store, head).await.map_err(failed)?;
    let applied = |stored: &Stored| applied_position(stored, partitions);
    let settled = applied(&expected.projector.stored().await?).min(applied(&found.projector.stored().await?)).min(head);
    let verdict = compare(&history, settled, expected.contents.as_ref(), found.contents.as_ref()).await?;
    let now = store.head().await.map_err(|e| failed(e.to_string()))?;
    Ok(verdict.without(&history.touched_after(store, now).await.map_err(failed)?))
}

/// Checks the live model against `reference`, a fresh model (in memory) that this folds the
/// store's history into first: `quikapp replay --verify --live-only`.
pub async fn audit_live(
    store: &dyn EventStore,
    partitions: &[Partition],
    live: &Model,
    reference: &Model,
    batch_size: u32,
) -> Result<Verdict, ReplayError> {
    let failed = |e: String| ReplayError::EventStore(e);
    let head = store.head().await.map_err(|e| failed(e.to_string()))?;
    let mut after = 0;
    while after < head {
        let events = store.read_all(after, batch_size).await.map_err(|e| failed(e.to_string()))?;
        let Some(last) = events.last().map(|e| e.global_position) else { break };
        let events: Vec<_> = events.into_iter().filter(|e| unknown_schema(e).is_none()).collect();
        let to = Progress { offset: last, watermark: 0 };
        let moves = vec![Move { partition: replay_partition(Source::Store), from: (after > 0).then_some(after), to }];
        reference.projector.apply(&Batch { events, moves, dead_lettered: 0 }).await?;
        after = last;
    }
    let history = History::read(store, head).await.map_err(failed)?;
    let settled = applied_position(&live.projector.stored().await?, partitions).min(head);
    let verdict = compare(&history, settled, reference.contents.as_ref(), live.contents.as_ref()).await?;
    let now = store.head().await.map_err(|e| failed(e.to_string()))?;
    Ok(verdict.without(&history.touched_after(store, now).await.map_err(failed)?))
}

#[cfg(test)]
mod tests {
    use quikapp_commands::store::contract;

    use super::*;

    #[tokio::test]
    async fn a_page_read_in_pieces_holds_every_event_in_order_and_one_past_the_head_is_refused() {
        let store: Arc<dyn EventStore> = contract::fresh_sqlite().await;
        let texts: Vec<String> = (0..23).map(|i| format!("event {i}")).collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        store.append(contract::append_to("pieces", 0, &texts)).await.unwrap();
        let page = read_page(&store, 2, 23, 5).await.unwrap();
        let positions: Vec<u64> = page.iter().map(|e| e.global_position).collect();
        assert_eq!(positions, (3..=23).collect::<Vec<_>>());
        assert!(read_page(&store, 2, 24, 5).await.is_err());
    }
}
