//! The projector runtime: one consumer-group member that keeps one read model up to date.
//!
//! - **Effectively once.** The bus delivers at least once and the group may move partitions at
//!   any time. The runtime hands the projector each batch with the offsets it starts after (as
//!   last read from the model's store), and the projector stores effects and new offsets in
//!   one step, refused when the stored offsets moved ([`ProjectionError::Moved`]). On a
//!   partition it has not read yet (a start, an assignment, a refusal) the runtime reads the
//!   model's stored offset and seeks the bus there, whatever the group had committed.
//! - **Poison events.** Events of a type or schema_version this build does not know, and events
//!   the store keeps refusing after [`RuntimeConfig::retries`] attempts (found by applying the
//!   batch one record at a time), go to the dead-letter topic with the error and the model's
//!   name, are counted in the model's progress, and reading goes on.
//! - **Faults of the store** ([`ProjectionError::Unavailable`]) are retried with backoff for as
//!   long as they last; faults of the bus end the membership, and a new one is started.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use quikapp_bus::{BusError, EventBus, Partition, Record, Subscription};
use quikapp_domain::event::schema_version_of;

use crate::{Batch, Move, Progress, ProjectionError, Projector};

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Records read and applied per batch, at most.
    pub batch_size: usize,
    /// Attempts at a batch the store refuses before looking for the event at fault.
    pub retries: u32,
    /// The longest pause between attempts while a store or the bus is down.
    pub max_backoff: Duration,
    /// The consumer group is this followed by the model's name.
    pub group_prefix: String,
    /// Events at or below this global position are passed over (a rebuild took them from the
    /// event store); their offsets and watermarks still move.
    pub skip_through: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            batch_size: 2_000,
            retries: 3,
            max_backoff: Duration::from_secs(10),
            group_prefix: "quikapp-projector-".into(),
            skip_through: 0,
        }
    }
}

pub struct Runtime {
    pub projector: Arc<dyn Projector>,
    pub bus: Arc<dyn EventBus>,
    pub config: RuntimeConfig,
}

/// Why a membership ended.
enum Stop {
    Bus(BusError),
}

/// What the member knows of a partition.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// The model's stored progress (offset `None`: nothing stored).
    applied: Option<u64>,
    watermark: u64,
    /// Whether the bus reads this partition from `applied` (a seek happened, or the first
    /// record read came right after it).
    positioned: bool,
}

impl Runtime {
    /// Runs until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            () = self.forever() => {}
            () = shutdown => {}
        }
    }

    async fn forever(&self) {
        let model = self.projector.name();
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.bus.subscribe(&format!("{}{model}", self.config.group_prefix)).await {
                Ok(subscription) => {
                    let joined = std::time::Instant::now();
                    let Stop::Bus(error) = self.member(subscription).await;
                    // A membership that ended at once (a gone offset, a broker refusing) waits
                    // longer each time; one that served a while starts over.
                    if joined.elapsed() > self.config.max_backoff {
                        backoff = Duration::from_millis(500);
                    }
                    tracing::warn!(model, %error, retry_in = ?backoff, "the event bus failed; joining the group again");
                }
                Err(error) => tracing::warn!(model, %error, retry_in = ?backoff, "cannot join the consumer group"),
            }
            metrics::counter!("quikapp_projector_errors_total", "model" => model, "kind" => "bus").increment(1);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// One membership of the group, until the bus fails. Each batch's first attempt at the
    /// store runs while the next records are read, so reading and writing overlap; what was
    /// read is then sorted out against what the store has, exactly as if read afterwards.
    async fn member(&self, mut subscription: Box<dyn Subscription>) -> Stop {
        let mut known: HashMap<Partition, Known> = HashMap::new();
        let mut polled = match subscription.poll(self.config.batch_size, Duration::from_secs(1)).await {
            Ok(polled) => polled,
            Err(error) => return Stop::Bus(error),
        };
        loop {
            for partition in subscription.revoked() {
                known.remove(&partition);
            }
            let records = self.new_records(subscription.as_mut(), &mut known, polled).await;
            let next = if records.is_empty() {
                subscription.poll(self.config.batch_size, Duration::from_secs(1)).await
            } else {
                let batch = match self.batch(subscription.as_mut(), &known, &records, true).await {
                    Ok(batch) => batch,
                    Err(Stop::Bus(error)) => return Stop::Bus(error),
                };
                let (first, next) = tokio::join!(
                    self.projector.apply(&batch),
                    subscription.poll(self.config.batch_size, Duration::from_secs(1))
                );
                if let Err(Stop::Bus(error)) =
                    self.settle(subscription.as_mut(), &mut known, &records, &batch, first).await
                {
                    return Stop::Bus(error);
                }
                next
            };
            polled = match next {
                Ok(polled) => polled,
                Err(error) => return Stop::Bus(error),
            };
        }
    }

    /// The records of `polled` the model does not have yet, each partition's in offset order
    /// right after what it has. A partition met for the first time (a start, an assignment,
    /// a refusal) is sought to the model's own offset first, and the rest of what this poll
    /// read of it is dropped.
    async fn new_records(
        &self,
        subscription: &mut dyn Subscription,
        known: &mut HashMap<Partition, Known>,
        polled: Vec<(Partition, Record)>,
    ) -> Vec<(Partition, Record)> {
        if polled.iter().any(|(partition, _)| !known.contains_key(partition)) {
            let stored = self.stored().await;
            for (partition, _) in &polled {
                let progress = stored.partitions.get(partition);
                known.entry(partition.clone()).or_insert(Known {
                    applied: progress.map(|p| p.offset),
                    watermark: progress.map_or(0, |p| p.watermark),
                    positioned: false,
                });
            }
        }
        let mut records = Vec::with_capacity(polled.len());
        let mut sought = std::collections::HashSet::new();
        for (partition, record) in polled {
            if sought.contains(&partition) {
                continue;
            }
            let Some(state) = known.get_mut(&partition) else { continue };
            if !state.positioned {
                state.positioned = true;
                let follows = state.applied.is_some_and(|applied| record.offset() == applied + 1);
                if !follows {
                    // Read again from the model's own offset; drop what was read from elsewhere.
                    if let Err(error) = subscription.seek(&partition, state.applied).await {
                        // Most likely taken away by a rebalance meanwhile; if not, the next
                        // record read from it starts over.
                        let model = self.projector.name();
                        tracing::info!(model, ?partition, %error, "could not seek; forgetting the partition");
                        known.remove(&partition);
                    }
                    sought.insert(partition);
                    continue;
                }
            }
            if state.applied.is_some_and(|applied| record.offset() <= applied) {
                continue;
            }
            records.push((partition, record));
        }
        records
    }

    async fn stored(&self) -> crate::Stored {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.projector.stored().await {
                Ok(stored) => return stored,
                Err(error) => {
                    tracing::warn!(model = self.projector.name(), %error, "cannot read the model's progress");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    /// Applies `records` (each partition's in offset order, right after what the model has).
    async fn apply(
        &self,
        subscription: &mut dyn Subscription,
        known: &mut HashMap<Partition, Known>,
        records: &[(Partition, Record)],
        send_dead_letters: bool,
    ) -> Result<(), Stop> {
        let batch = self.batch(subscription, known, records, send_dead_letters).await?;
        let first = self.projector.apply(&batch).await;
        self.settle(subscription, known, records, &batch, first).await
    }

    /// The batch of `records`: their events and moves; the poison ones are set aside (on the
    /// dead-letter topic when `send_dead_letters`) and counted.
    async fn batch(
        &self,
        subscription: &mut dyn Subscription,
        known: &HashMap<Partition, Known>,
        records: &[(Partition, Record)],
        send_dead_letters: bool,
    ) -> Result<Batch, Stop> {
        let mut batch = Batch::default();
        for (partition, record) in records {
            if let Some(error) = poison(record) {
                if send_dead_letters {
                    self.dead_letter(subscription, partition, record, &error).await?;
                }
                batch.dead_lettered += 1;
            } else if let Record::Event { event, .. } = record
                && event.global_position > self.config.skip_through
            {
                batch.events.push(event.clone());
            }
            let watermark = match record {
                Record::Watermark { position, .. } => *position,
                _ => 0,
            };
            match batch.moves.iter_mut().find(|m| m.partition == *partition) {
                Some(step) => {
                    step.to.offset = record.offset();
                    step.to.watermark = step.to.watermark.max(watermark);
                }
                None => {
                    let state = known[partition];
                    batch.moves.push(Move {
                        partition: partition.clone(),
                        from: state.applied,
                        to: Progress { offset: record.offset(), watermark: state.watermark.max(watermark) },
                    });
                }
            }
        }
        Ok(batch)
    }

    /// Sees `batch` stored, given the outcome of a first attempt: waits out store outages,
    /// retries refusals, and past [`RuntimeConfig::retries`] of them looks for the record at
    /// fault.
    async fn settle(
        &self,
        subscription: &mut dyn Subscription,
        known: &mut HashMap<Partition, Known>,
        records: &[(Partition, Record)],
        batch: &Batch,
        first: Result<(), ProjectionError>,
    ) -> Result<(), Stop> {
        let model = self.projector.name();
        let mut outcome = first;
        let mut backoff = Duration::from_millis(200);
        for attempt in 1.. {
            let Some(error) = self.store(subscription, known, batch, outcome).await else { return Ok(()) };
            metrics::counter!("quikapp_projector_errors_total", "model" => model, "kind" => "rejected").increment(1);
            tracing::warn!(model, error, attempt, "the store refused a batch");
            if attempt >= self.config.retries {
                return self.isolate(subscription, known, records, &error).await;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
            outcome = self.projector.apply(batch).await;
        }
        unreachable!("the attempts above end in a return")
    }

    /// Acts on the outcome of applying `batch`, applying it again while the store is
    /// unavailable; answers the store's refusal, if it refuses.
    async fn store(
        &self,
        subscription: &mut dyn Subscription,
        known: &mut HashMap<Partition, Known>,
        batch: &Batch,
        mut outcome: Result<(), ProjectionError>,
    ) -> Option<String> {
        let model = self.projector.name();
        let mut backoff = Duration::from_millis(200);
        loop {
            match outcome {
                Ok(()) => {
                    for step in &batch.moves {
                        let state = known.get_mut(&step.partition).expect("known");
                        state.applied = Some(step.to.offset);
                        state.watermark = step.to.watermark;
                    }
                    let done: Vec<(Partition, u64)> =
                        batch.moves.iter().map(|m| (m.partition.clone(), m.to.offset)).collect();
                    subscription.commit(&done);
                    metrics::counter!("quikapp_projector_events_total", "model" => model)
                        .increment(batch.events.len() as u64);
                    metrics::counter!("quikapp_projector_batches_total", "model" => model).increment(1);
                    metrics::counter!("quikapp_projector_dead_lettered_total", "model" => model)
                        .increment(batch.dead_lettered);
                    return None;
                }
                Err(ProjectionError::Moved(why)) => {
                    // Another member applied these partitions: learn their offsets again.
                    tracing::info!(model, why, "the stored progress moved; reading it again");
                    for step in &batch.moves {
                        known.remove(&step.partition);
                    }
                    return None;
                }
                Err(ProjectionError::Rejected(error) | ProjectionError::Unfit(error)) => return Some(error),
                Err(ProjectionError::Unavailable(error)) => {
                    metrics::counter!("quikapp_projector_errors_total", "model" => model, "kind" => "store")
                        .increment(1);
                    tracing::warn!(model, error, retry_in = ?backoff, "the read model's store is unavailable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
            outcome = self.projector.apply(batch).await;
        }
    }

    /// A batch the store keeps refusing: one record at a time, so that only the one at fault
    /// is set aside.
    async fn isolate(
        &self,
        subscription: &mut dyn Subscription,
        known: &mut HashMap<Partition, Known>,
        records: &[(Partition, Record)],
        error: &str,
    ) -> Result<(), Stop> {
        let [(partition, record)] = records else {
            for (partition, record) in records {
                // A partition whose progress moved meanwhile is skipped: it is read again.
                if known.get(partition).is_none_or(|k| k.applied.is_some_and(|a| a >= record.offset())) {
                    continue;
                }
                let one = [(partition.clone(), record.clone())];
                Box::pin(self.apply(subscription, known, &one, false)).await?;
            }
            return Ok(());
        };
        if poison(record).is_none() {
            self.dead_letter(subscription, partition, record, error).await?;
        }
        let state = known[partition];
        let batch = Batch {
            events: vec![],
            moves: vec![Move {
                partition: partition.clone(),
                from: state.applied,
                to: Progress { offset: record.offset(), watermark: state.watermark },
            }],
            dead_lettered: 1,
        };
        loop {
            let outcome = self.projector.apply(&batch).await;
            let Some(error) = self.store(subscription, known, &batch, outcome).await else { break };
            tracing::error!(model = self.projector.name(), error, "the store refuses to record a dead letter");
            tokio::time::sleep(self.config.max_backoff).await;
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        subscription: &mut dyn Subscription,
        partition: &Partition,
        record: &Record,
        error: &str,
    ) -> Result<(), Stop> {
        let model = self.projector.name();
        subscription.dead_letter(partition, record, model, error).await.map_err(Stop::Bus)?;
        tracing::warn!(model, ?partition, offset = record.offset(), error, "dead-lettered an event");
        Ok(())
    }
}

/// Why a record cannot be applied by this build, if it cannot.
fn poison(record: &Record) -> Option<String> {
    match record {
        Record::Undecodable { error, .. } => Some(format!("undecodable: {error}")),
        Record::Event { event, .. } => unknown_schema(event),
        Record::Watermark { .. } => None,
    }
}

/// Why this build cannot apply `event`: a schema_version newer than it knows.
pub(crate) fn unknown_schema(event: &quikapp_domain::Envelope) -> Option<String> {
    let type_name = event.event.type_name();
    let known = schema_version_of(type_name).unwrap_or(0);
    (event.schema_version > known)
        .then(|| format!("{type_name} schema_version {} is newer than this build's {known}", event.schema_version))
}
