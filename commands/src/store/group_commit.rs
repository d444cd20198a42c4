//! Group commit. Concurrent appends queue up; one task takes everything queued (up to a bound)
//! and commits it as one transaction, so many appends share one durable commit. This is what
//! lets a store whose positions are assigned by a single lock holder still write tens of
//! thousands of events a second: the lock and the fsync are paid per batch, not per event.
//!
//! Failures are answered by what they say about the batch:
//! - a row refused by the database (a constraint, bad data): one request is at fault, so the
//!   batch is retried one request at a time and only that request fails;
//! - anything unrelated to the rows (BEGIN, the lock, a lost connection, a server-side
//!   timeout): the batch fails as a whole with that error, without retries that would only
//!   fail again;
//! - a COMMIT whose answer was lost: the batch may have been written. The adapter is asked
//!   whether its first event is stored (waiting out any transaction still holding the log),
//!   and every request gets the true outcome, or, when even that cannot be settled, an
//!   explicit "outcome unknown". A client that retries after a success it never heard of would
//!   otherwise append twice.
//!
//! A batch is never cancelled half-way (a cancelled COMMIT may still complete, and a cancelled
//! BEGIN can leave a connection inside a transaction): the stores' own timeouts end a stalled
//! one. A caller that stops waiting is answered by where its request was: still queued, it is
//! never written ("unavailable"); taken into a batch, "outcome unknown".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

use super::{AppendError, AppendOutcome, AppendRequest, StoreError};

pub(crate) type Outcome = Result<AppendOutcome, AppendError>;

/// An adapter's write path: commits a batch in one transaction and answers each request in order.
#[async_trait]
pub(crate) trait BatchWriter: Send + Sync + 'static {
    async fn write_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Outcome>, BatchError>;

    /// Whether the event is stored, waiting first for any transaction still writing the log.
    async fn is_stored(&self, event_id: Uuid) -> Result<bool, StoreError>;
}

#[derive(Debug)]
pub(crate) enum BatchError {
    /// A row of the batch was refused; nothing was written.
    Rows(StoreError),
    /// The batch could not be written whatever it held; nothing was written.
    Whole(StoreError),
    /// COMMIT was sent but did not answer: `outcomes` hold if `first_event` is stored.
    CommitUnknown { error: StoreError, first_event: Option<Uuid>, outcomes: Vec<Outcome> },
}

impl From<sqlx::Error> for BatchError {
    fn from(error: sqlx::Error) -> Self {
        BatchError::Whole(error.into())
    }
}

impl From<StoreError> for BatchError {
    fn from(error: StoreError) -> Self {
        BatchError::Whole(error)
    }
}

impl BatchError {
    /// A COMMIT of `plan` that failed: whether it happened is settled by its first event.
    pub fn commit_failed(error: sqlx::Error, plan: &super::plan::BatchPlan, outcomes: Vec<Outcome>) -> Self {
        BatchError::CommitUnknown {
            error: error.into(),
            first_event: plan.events.first().map(|e| e.event_id),
            outcomes,
        }
    }

    /// For the statements that write rows: a refused value blames the rows.
    pub fn from_write(error: sqlx::Error) -> Self {
        match super::blame(&error) {
            super::Blame::Rows => BatchError::Rows(error.into()),
            _ => BatchError::Whole(error.into()),
        }
    }

    fn into_store_error(self) -> StoreError {
        match self {
            BatchError::Rows(error) | BatchError::Whole(error) => error,
            BatchError::CommitUnknown { error, .. } => unknown(&error),
        }
    }
}

/// The most requests committed in one transaction.
pub(crate) const MAX_BATCH: usize = 256;

/// A queued append: the request, where its answer goes, and whether a batch has taken it.
struct Queued {
    request: AppendRequest,
    reply: oneshot::Sender<Outcome>,
    taken: Arc<AtomicBool>,
}

pub(crate) struct GroupCommit {
    queue: mpsc::Sender<Queued>,
    wait: Duration,
}

impl GroupCommit {
    /// Starts the committing task, with up to `in_flight` batches committing at once. Batches
    /// are taken only when a slot is free, so requests pile up into the next batch meanwhile.
    /// A caller waits at most `wait` for its answer.
    pub fn start(writer: impl BatchWriter, in_flight: usize, wait: Duration) -> Self {
        let (queue, requests) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(run(Arc::new(writer), requests, Arc::new(Semaphore::new(in_flight))));
        GroupCommit { queue, wait }
    }

    pub async fn append(&self, request: AppendRequest) -> Outcome {
        let taken = Arc::new(AtomicBool::new(false));
        let (reply, answer) = oneshot::channel();
        let queued = Queued { request, reply, taken: taken.clone() };
        let stopped = || AppendError::Store(StoreError::Unavailable("the event store writer has stopped".into()));
        let answered = async {
            self.queue.send(queued).await.ok()?;
            answer.await.ok()
        };
        let waited = tokio::time::timeout(self.wait, answered).await;
        // The answer's receiver is gone from here on: a batch that has not taken the request
        // yet never will (see `run`), so `taken` says whether it may have been written.
        match waited {
            Ok(Some(outcome)) => outcome,
            _ if taken.load(Ordering::SeqCst) => {
                let why = format!("no answer from its batch within {:?}", self.wait);
                Err(AppendError::Store(StoreError::OutcomeUnknown(why)))
            }
            Ok(None) => Err(stopped()),
            Err(_) => {
                let why = format!("the append waited {:?} in the queue and was not written", self.wait);
                Err(AppendError::Store(StoreError::Unavailable(why)))
            }
        }
    }
}

async fn run(writer: Arc<dyn BatchWriter>, mut requests: mpsc::Receiver<Queued>, slots: Arc<Semaphore>) {
    loop {
        let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let mut queued = Vec::with_capacity(MAX_BATCH);
        if requests.recv_many(&mut queued, MAX_BATCH).await == 0 {
            return; // every handle is gone
        }
        // The replies to the last batch woke its writers; let them queue their next appends
        // before this batch is closed, or the first of them would commit alone.
        tokio::task::yield_now().await;
        while queued.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => queued.push(request),
                Err(_) => break,
            }
        }
        // Mark first, then look: a caller that gave up before the mark has already dropped its
        // receiver and is skipped; one that gives up after it is told the outcome is unknown.
        queued.retain(|q| {
            q.taken.store(true, Ordering::SeqCst);
            !q.reply.is_closed()
        });
        if queued.is_empty() {
            continue;
        }
        let writer = writer.clone();
        tokio::spawn(async move {
            let (batch, replies): (Vec<_>, Vec<_>) = queued.into_iter().map(|q| (q.request, q.reply)).unzip();
            let outcomes = commit(writer.as_ref(), &batch).await;
            drop(slot);
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // The caller may have gone away (a dropped request); the append stands regardless.
                let _ = reply.send(outcome);
            }
        });
    }
}

async fn commit(writer: &dyn BatchWriter, batch: &[AppendRequest]) -> Vec<Outcome> {
    match settled(writer, writer.write_batch(batch).await).await {
        Ok(outcomes) => outcomes,
        Err(BatchError::Rows(_)) if batch.len() > 1 => {
            let mut outcomes = Vec::with_capacity(batch.len());
            for request in batch.chunks(1) {
                match settled(writer, writer.write_batch(request).await).await {
                    Ok(mut single) => outcomes.push(single.pop().expect("one outcome per request")),
                    Err(BatchError::Rows(error)) => outcomes.push(Err(error.into())),
                    // The store itself failed: the requests not tried yet are not written.
                    Err(error) => {
                        outcomes.push(Err(error.into_store_error().into()));
                        let untried =
                            StoreError::Unavailable("not written: the store failed on an earlier request".into());
                        outcomes.resize_with(batch.len(), || Err(untried.clone().into()));
                        break;
                    }
                }
            }
            outcomes
        }
        Err(error) => {
            let error = error.into_store_error();
            batch.iter().map(|_| Err(error.clone().into())).collect()
        }
    }
}

/// Settles a COMMIT that did not answer by asking the store whether the batch is there.
async fn settled(
    writer: &dyn BatchWriter,
    written: Result<Vec<Outcome>, BatchError>,
) -> Result<Vec<Outcome>, BatchError> {
    let Err(BatchError::CommitUnknown { error, first_event, outcomes }) = written else { return written };
    let Some(first_event) = first_event else { return Err(BatchError::Whole(unknown(&error))) };
    match writer.is_stored(first_event).await {
        Ok(true) => {
            tracing::warn!(%error, "COMMIT did not answer, but the batch is stored");
            Ok(outcomes)
        }
        Ok(false) => Err(BatchError::Whole(error)),
        Err(lookup) => {
            tracing::error!(%error, %lookup, "COMMIT did not answer and the store cannot say whether it happened");
            Err(BatchError::Whole(unknown(&error)))
        }
    }
}

fn unknown(error: &StoreError) -> StoreError {
    StoreError::OutcomeUnknown(format!("{error}; retry with the same Idempotency-Key to learn the outcome"))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::contract::append_to;

    /// Fails its first calls of `write_batch` with the errors of `script`, in order, then
    /// writes everything.
    struct Scripted {
        script: Mutex<Vec<BatchError>>,
        calls: Mutex<Vec<usize>>,
        stored: bool,
    }

    #[async_trait]
    impl BatchWriter for Scripted {
        async fn write_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Outcome>, BatchError> {
            self.calls.lock().unwrap().push(batch.len());
            let mut script = self.script.lock().unwrap();
            match script.is_empty() {
                false => Err(script.remove(0)),
                true => Ok(batch.iter().map(|_| Err(AppendError::Invalid("written"))).collect()),
            }
        }

        async fn is_stored(&self, _: Uuid) -> Result<bool, StoreError> {
            Ok(self.stored)
        }
    }

    fn scripted(first: BatchError) -> Scripted {
        Scripted { script: Mutex::new(vec![first]), calls: Mutex::new(vec![]), stored: false }
    }

    fn batch() -> Vec<AppendRequest> {
        (0..3).map(|_| append_to(&Uuid::now_v7().to_string(), 0, &["e"])).collect()
    }

    #[tokio::test]
    async fn a_batch_refused_for_its_rows_is_retried_one_request_at_a_time() {
        let writer = scripted(BatchError::Rows(StoreError::Failed("unique violation".into())));
        let outcomes = commit(&writer, &batch()).await;
        assert_eq!(*writer.calls.lock().unwrap(), vec![3, 1, 1, 1]);
        assert!(outcomes.iter().all(|o| *o == Err(AppendError::Invalid("written"))), "{outcomes:?}");
    }

    #[tokio::test]
    async fn the_one_by_one_retry_stops_at_the_first_failure_of_the_store() {
        let rows = BatchError::Rows(StoreError::Failed("unique violation".into()));
        let down = BatchError::Whole(StoreError::Unavailable("connection refused".into()));
        let writer = Scripted { script: Mutex::new(vec![rows, down]), calls: Mutex::new(vec![]), stored: false };
        let outcomes = commit(&writer, &batch()).await;
        assert_eq!(*writer.calls.lock().unwrap(), vec![3, 1], "no write after the store failed");
        assert_eq!(outcomes[0], Err(AppendError::Store(StoreError::Unavailable("connection refused".into()))));
        let untried = |o: &Outcome| matches!(o, Err(AppendError::Store(StoreError::Unavailable(_))));
        assert!(outcomes.len() == 3 && outcomes[1..].iter().all(untried), "{outcomes:?}");
    }

    #[tokio::test]
    async fn a_batch_that_failed_whatever_it_held_is_not_retried() {
        let writer = scripted(BatchError::Whole(StoreError::Unavailable("lock timeout".into())));
        let outcomes = commit(&writer, &batch()).await;
        assert_eq!(*writer.calls.lock().unwrap(), vec![3]);
        let expected = Err(AppendError::Store(StoreError::Unavailable("lock timeout".into())));
        assert!(outcomes.iter().all(|o| *o == expected), "{outcomes:?}");
    }

    /// Records the batches it writes; the first one waits for `release`.
    struct Gated {
        release: tokio::sync::Notify,
        batches: Mutex<Vec<Vec<Uuid>>>,
    }

    #[async_trait]
    impl BatchWriter for Arc<Gated> {
        async fn write_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Outcome>, BatchError> {
            let first = self.batches.lock().unwrap().is_empty();
            self.batches.lock().unwrap().push(batch.iter().map(|r| r.events[0].event_id).collect());
            if first {
                self.release.notified().await;
            }
            Ok(batch.iter().map(|_| Err(AppendError::Invalid("written"))).collect())
        }

        async fn is_stored(&self, _: Uuid) -> Result<bool, StoreError> {
            Ok(false)
        }
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_is_told_whether_its_request_may_have_been_written() {
        let gated = Arc::new(Gated { release: tokio::sync::Notify::new(), batches: Mutex::new(vec![]) });
        let commits = Arc::new(GroupCommit::start(gated.clone(), 1, Duration::from_millis(200)));
        let in_batch = tokio::spawn({
            let commits = commits.clone();
            async move { commits.append(append_to("a", 0, &["in a stalled batch"])).await }
        });
        while gated.batches.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // Queued behind the stalled batch until its caller gives up.
        let queued = append_to("b", 0, &["queued"]);
        let queued_id = queued.events[0].event_id;
        let gave_up = commits.append(queued).await;
        assert!(matches!(gave_up, Err(AppendError::Store(StoreError::Unavailable(_)))), "{gave_up:?}");
        let unknown = in_batch.await.unwrap();
        assert!(matches!(unknown, Err(AppendError::Store(StoreError::OutcomeUnknown(_)))), "{unknown:?}");

        gated.release.notify_one();
        commits.append(append_to("c", 0, &["later"])).await.unwrap_err();
        let written: Vec<Uuid> = gated.batches.lock().unwrap().concat();
        assert_eq!(written.len(), 2, "the stalled batch's request and the later one");
        assert!(!written.contains(&queued_id), "what nobody waits for is never written");
    }

    #[tokio::test]
    async fn a_commit_without_answer_is_answered_by_whether_the_batch_is_stored() {
        let lost = || BatchError::CommitUnknown {
            error: StoreError::Unavailable("connection reset".into()),
            first_event: Some(Uuid::now_v7()),
            outcomes: vec![Err(AppendError::Invalid("committed")); 3],
        };
        let mut writer = scripted(lost());
        writer.stored = true;
        let outcomes = commit(&writer, &batch()).await;
        assert_eq!(*writer.calls.lock().unwrap(), vec![3], "a stored batch is not written again");
        assert!(outcomes.iter().all(|o| *o == Err(AppendError::Invalid("committed"))), "{outcomes:?}");

        let writer = scripted(lost());
        let outcomes = commit(&writer, &batch()).await;
        assert_eq!(*writer.calls.lock().unwrap(), vec![3], "a lost batch is not retried on a broken connection");
        let expected = Err(AppendError::Store(StoreError::Unavailable("connection reset".into())));
        assert!(outcomes.iter().all(|o| *o == expected), "{outcomes:?}");
    }
}
