//! Group commit. Concurrent appends queue up; one task takes everything queued (up to a bound)
//! and commits it as one transaction, so many appends share one durable commit. This is what
//! lets a store whose positions are assigned by a single lock holder still write tens of
//! thousands of events a second: the lock and the fsync are paid per batch, not per event.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{AppendError, AppendOutcome, AppendRequest, StoreError};

pub(crate) type Outcome = Result<AppendOutcome, AppendError>;

/// An adapter's write path: commits a batch in one transaction and answers each request in order.
#[async_trait]
pub(crate) trait BatchWriter: Send + Sync + 'static {
    /// `Err` means the transaction failed as a whole and wrote nothing.
    async fn write_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Outcome>, StoreError>;
}

/// The most requests committed in one transaction.
pub(crate) const MAX_BATCH: usize = 256;

pub(crate) struct GroupCommit {
    queue: mpsc::Sender<(AppendRequest, oneshot::Sender<Outcome>)>,
}

impl GroupCommit {
    /// Starts the committing task, with up to `in_flight` batches committing at once. Batches
    /// are taken only when a slot is free, so requests pile up into the next batch meanwhile.
    pub fn start(writer: impl BatchWriter, in_flight: usize) -> Self {
        let (queue, requests) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(run(Arc::new(writer), requests, Arc::new(Semaphore::new(in_flight))));
        GroupCommit { queue }
    }

    pub async fn append(&self, request: AppendRequest) -> Outcome {
        let stopped = || AppendError::Store(StoreError::Unavailable("the event store writer has stopped".into()));
        let (reply, answer) = oneshot::channel();
        self.queue.send((request, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(
    writer: Arc<dyn BatchWriter>,
    mut requests: mpsc::Receiver<(AppendRequest, oneshot::Sender<Outcome>)>,
    slots: Arc<Semaphore>,
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
        let writer = writer.clone();
        tokio::spawn(async move {
            let (batch, replies): (Vec<_>, Vec<_>) = queued.into_iter().unzip();
            let outcomes = commit(writer.as_ref(), &batch).await;
            drop(slot);
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // The caller may have gone away (a dropped request); the append stands regardless.
                let _ = reply.send(outcome);
            }
        });
    }
}

/// A batch the database refuses as a whole is retried one request at a time, so that a request
/// it cannot take fails alone instead of taking its batch-mates down with it.
async fn commit(writer: &dyn BatchWriter, batch: &[AppendRequest]) -> Vec<Outcome> {
    match writer.write_batch(batch).await {
        Ok(outcomes) => outcomes,
        Err(StoreError::Failed(_)) if batch.len() > 1 => {
            let mut outcomes = Vec::with_capacity(batch.len());
            for request in batch.chunks(1) {
                outcomes.push(match writer.write_batch(request).await {
                    Ok(mut single) => single.pop().expect("one outcome per request"),
                    Err(error) => Err(error.into()),
                });
            }
            outcomes
        }
        Err(error) => batch.iter().map(|_| Err(error.clone().into())).collect(),
    }
}
