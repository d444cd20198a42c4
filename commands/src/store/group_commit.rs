//! Group commit. Concurrent appends queue up; one task takes everything queued (up to a bound)
//! and commits it as one transaction, so many appends share one durable commit. This is what
//! lets a store whose positions are assigned by a single lock holder still write tens of
//! thousands of events a second: the lock and the fsync are paid per batch, not per event.
//!
//! Failures are answered by what they say about the batch:
//! - a row refused by the database (a constraint, bad data): one request is at fault, so the
//!   batch is retried one request at a time and only that request fails;
//! - anything unrelated to the rows (BEGIN, the lock, a lost connection, a timeout): the batch
//!   fails as a whole with that error, without retries that would only fail again;
//! - a COMMIT whose answer was lost, or a batch that took longer than the timeout (a stalled
//!   server, a connection that went silent): the batch may have been written. The adapter is
//!   asked whether its events are stored (waiting out any transaction still holding the log),
//!   and every request gets the true outcome, or, when even that cannot be settled, an
//!   explicit "outcome unknown". A client that retries after a success it never heard of would
//!   otherwise append twice.
//!
//! A request whose caller has stopped waiting (a timeout, a dropped HTTP request) before it
//! was taken into a batch is never written: a timeout while queued really means "not written".

use std::sync::Arc;
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

    /// Whether any of the events is stored, waiting first for any transaction still writing
    /// the log.
    async fn is_stored(&self, event_ids: &[Uuid]) -> Result<bool, StoreError>;
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

/// The batch's write did not finish in time; what it did is settled by its events.
struct TimedOut;

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
    /// For the statements that write rows: a refused value blames the rows.
    pub fn from_write(error: sqlx::Error) -> Self {
        match super::blame(&error) {
            super::Blame::Rows => BatchError::Rows(error.into()),
            _ => BatchError::Whole(error.into()),
        }
    }
}

/// The most requests committed in one transaction.
pub(crate) const MAX_BATCH: usize = 256;

pub(crate) struct GroupCommit {
    queue: mpsc::Sender<(AppendRequest, oneshot::Sender<Outcome>)>,
    timeout: Duration,
}

impl GroupCommit {
    /// Starts the committing task, with up to `in_flight` batches committing at once. Batches
    /// are taken only when a slot is free, so requests pile up into the next batch meanwhile.
    /// An append that has no answer within `timeout` (queueing included) fails as unavailable.
    pub fn start(writer: impl BatchWriter, in_flight: usize, timeout: Duration) -> Self {
        let (queue, requests) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(run(Arc::new(writer), requests, Arc::new(Semaphore::new(in_flight)), timeout));
        GroupCommit { queue, timeout }
    }

    /// The append's outcome. A batch answers within about twice the timeout (its write, then
    /// settling what it did); past three times, the waiter stops with "outcome unknown".
    pub async fn append(&self, request: AppendRequest) -> Outcome {
        let stopped = || AppendError::Store(StoreError::Unavailable("the event store writer has stopped".into()));
        let answered = async {
            let (reply, answer) = oneshot::channel();
            self.queue.send((request, reply)).await.map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?
        };
        tokio::time::timeout(self.timeout * 3, answered).await.unwrap_or_else(|_| {
            let why = format!("the append had no answer within {:?}", self.timeout * 3);
            Err(AppendError::Store(StoreError::OutcomeUnknown(why)))
        })
    }
}

async fn run(
    writer: Arc<dyn BatchWriter>,
    mut requests: mpsc::Receiver<(AppendRequest, oneshot::Sender<Outcome>)>,
    slots: Arc<Semaphore>,
    timeout: Duration,
) {
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
        queued.retain(|(_, reply)| !reply.is_closed()); // nobody waits for these: write nothing
        if queued.is_empty() {
            continue;
        }
        let writer = writer.clone();
        tokio::spawn(async move {
            let (batch, replies): (Vec<_>, Vec<_>) = queued.into_iter().unzip();
            let outcomes = commit(writer.as_ref(), &batch, timeout).await;
            drop(slot);
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // The caller may have gone away (a dropped request); the append stands regardless.
                let _ = reply.send(outcome);
            }
        });
    }
}

async fn commit(writer: &dyn BatchWriter, batch: &[AppendRequest], timeout: Duration) -> Vec<Outcome> {
    match write(writer, batch, timeout).await {
        Ok(outcomes) => outcomes,
        Err(BatchError::Rows(_)) if batch.len() > 1 => {
            let mut outcomes = Vec::with_capacity(batch.len());
            for request in batch.chunks(1) {
                match write(writer, request, timeout).await {
                    Ok(mut single) => outcomes.push(single.pop().expect("one outcome per request")),
                    Err(BatchError::Rows(error)) => outcomes.push(Err(error.into())),
                    // The store itself failed: the rest would only wait for the same failure.
                    Err(error) => {
                        let error = error.into_store_error();
                        outcomes.resize_with(batch.len(), || Err(error.clone().into()));
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

/// Writes the batch within `timeout`, and settles a write whose outcome is in doubt.
async fn write(
    writer: &dyn BatchWriter,
    batch: &[AppendRequest],
    timeout: Duration,
) -> Result<Vec<Outcome>, BatchError> {
    let written = tokio::time::timeout(timeout, writer.write_batch(batch)).await.map_err(|_| TimedOut);
    let (error, events, outcomes) = match written {
        Ok(Err(BatchError::CommitUnknown { error, first_event, outcomes })) => {
            (error, first_event.into_iter().collect(), Some(outcomes))
        }
        Ok(written) => return written,
        Err(TimedOut) => {
            let error = StoreError::Unavailable(format!("the batch took longer than {timeout:?}"));
            (error, batch.iter().filter_map(|r| r.events.first().map(|e| e.event_id)).collect(), None)
        }
    };
    let events: Vec<Uuid> = events;
    if events.is_empty() {
        return Err(BatchError::Whole(unknown(&error)));
    }
    match writer.is_stored(&events).await {
        Ok(true) => match outcomes {
            Some(outcomes) => {
                tracing::warn!(%error, "COMMIT did not answer, but the batch is stored");
                Ok(outcomes)
            }
            None => Err(BatchError::Whole(unknown(&error))),
        },
        Ok(false) => Err(BatchError::Whole(error)),
        Err(lookup) => {
            tracing::error!(%error, %lookup, "the batch's outcome cannot be settled");
            Err(BatchError::Whole(unknown(&error)))
        }
    }
}

fn unknown(error: &StoreError) -> StoreError {
    StoreError::OutcomeUnknown(format!("{error}; retry with the same Idempotency-Key to learn the outcome"))
}

impl BatchError {
    fn into_store_error(self) -> StoreError {
        match self {
            BatchError::Rows(error) | BatchError::Whole(error) => error,
            BatchError::CommitUnknown { error, .. } => unknown(&error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::contract::append_to;

    /// Fails the first `write_batch` with `first`, then writes everything.
    struct Scripted {
        first: Mutex<Option<BatchError>>,
        calls: Mutex<Vec<usize>>,
        stored: bool,
    }

    #[async_trait]
    impl BatchWriter for Scripted {
        async fn write_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Outcome>, BatchError> {
            self.calls.lock().unwrap().push(batch.len());
            match self.first.lock().unwrap().take() {
                Some(error) => Err(error),
                None => Ok(batch.iter().map(|_| Err(AppendError::Invalid("written"))).collect()),
            }
        }

        async fn is_stored(&self, _: &[Uuid]) -> Result<bool, StoreError> {
            Ok(self.stored)
        }
    }

    fn scripted(first: BatchError) -> Scripted {
        Scripted { first: Mutex::new(Some(first)), calls: Mutex::new(vec![]), stored: false }
    }

    fn batch() -> Vec<AppendRequest> {
        (0..3).map(|_| append_to(&Uuid::now_v7().to_string(), 0, &["e"])).collect()
    }

    #[tokio::test]
    async fn a_batch_refused_for_its_rows_is_retried_one_request_at_a_time() {
        let writer = scripted(BatchError::Rows(StoreError::Failed("unique violation".into())));
        let outcomes = commit(&writer, &batch(), Duration::from_secs(5)).await;
        assert_eq!(*writer.calls.lock().unwrap(), vec![3, 1, 1, 1]);
        assert!(outcomes.iter().all(|o| *o == Err(AppendError::Invalid("written"))), "{outcomes:?}");
    }

    #[tokio::test]
    async fn a_batch_that_failed_whatever_it_held_is_not_retried() {
        let writer = scripted(BatchError::Whole(StoreError::Unavailable("lock timeout".into())));
        let outcomes = commit(&writer, &batch(), Duration::from_secs(5)).await;
        assert_eq!(*writer.calls.lock().unwrap(), vec![3]);
        let expected = Err(AppendError::Store(StoreError::Unavailable("lock timeout".into())));
        assert!(outcomes.iter().all(|o| *o == expected), "{outcomes:?}");
    }

    /// Writes nothing and never finishes.
    struct Stalled {
        stored: bool,
    }

    #[async_trait]
    impl BatchWriter for Stalled {
        async fn write_batch(&self, _: &[AppendRequest]) -> Result<Vec<Outcome>, BatchError> {
            std::future::pending().await
        }

        async fn is_stored(&self, _: &[Uuid]) -> Result<bool, StoreError> {
            Ok(self.stored)
        }
    }

    #[tokio::test]
    async fn a_batch_past_its_timeout_is_settled_by_whether_its_events_are_stored() {
        let timeout = Duration::from_millis(50);
        let outcomes = commit(&Stalled { stored: false }, &batch(), timeout).await;
        assert!(
            outcomes.iter().all(|o| matches!(o, Err(AppendError::Store(StoreError::Unavailable(_))))),
            "{outcomes:?}"
        );
        let outcomes = commit(&Stalled { stored: true }, &batch(), timeout).await;
        let unknown = |o: &Outcome| matches!(o, Err(AppendError::Store(StoreError::OutcomeUnknown(_))));
        assert!(outcomes.iter().all(unknown), "{outcomes:?}");
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

        async fn is_stored(&self, _: &[Uuid]) -> Result<bool, StoreError> {
            Ok(false)
        }
    }

    #[tokio::test]
    async fn a_request_given_up_on_while_queued_is_never_written() {
        let gated = Arc::new(Gated { release: tokio::sync::Notify::new(), batches: Mutex::new(vec![]) });
        let commits = Arc::new(GroupCommit::start(gated.clone(), 1, Duration::from_secs(30)));
        let first = tokio::spawn({
            let commits = commits.clone();
            async move { commits.append(append_to("a", 0, &["first"])).await }
        });
        while gated.batches.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // Queued behind the stalled batch, then given up on by its caller.
        let abandoned = append_to("b", 0, &["abandoned"]);
        let abandoned_id = abandoned.events[0].event_id;
        let gave_up = tokio::time::timeout(Duration::from_millis(20), commits.append(abandoned)).await;
        assert!(gave_up.is_err());
        gated.release.notify_one();
        first.await.unwrap().unwrap_err();
        commits.append(append_to("c", 0, &["later"])).await.unwrap_err();
        let written: Vec<Uuid> = gated.batches.lock().unwrap().concat();
        assert_eq!(written.len(), 2, "the first and the later request only");
        assert!(!written.contains(&abandoned_id));
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
        let outcomes = commit(&writer, &batch(), Duration::from_secs(5)).await;
        assert_eq!(*writer.calls.lock().unwrap(), vec![3], "a stored batch is not written again");
        assert!(outcomes.iter().all(|o| *o == Err(AppendError::Invalid("committed"))), "{outcomes:?}");

        let writer = scripted(lost());
        let outcomes = commit(&writer, &batch(), Duration::from_secs(5)).await;
        assert_eq!(*writer.calls.lock().unwrap(), vec![3], "a lost batch is not retried on a broken connection");
        let expected = Err(AppendError::Store(StoreError::Unavailable("connection reset".into())));
        assert!(outcomes.iter().all(|o| *o == expected), "{outcomes:?}");
    }
}
