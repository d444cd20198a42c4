//! Deciding a batch of appends against the store's current state, without I/O: the one piece of
//! concurrency logic both adapters share. An adapter reads what the batch touches (stream
//! versions, claims, idempotency keys, head) inside its write transaction, lets [`BatchPlan`]
//! judge each request in order, then writes what the plan accepted.

use std::collections::HashMap;

use quikapp_domain::Envelope;

use super::{AppendError, AppendOutcome, AppendRequest, Appended, StoredReply};

/// What the store holds now for the keys a batch touches.
#[derive(Debug, Default)]
pub struct CurrentState {
    pub head: u64,
    pub stream_versions: HashMap<String, u64>,
    pub claims: HashMap<String, String>,
    pub replies: HashMap<String, StoredReply>,
}

/// The keys whose current state a batch needs.
pub struct Lookups {
    pub streams: Vec<String>,
    pub claims: Vec<String>,
    pub idempotency_keys: Vec<String>,
}

impl Lookups {
    pub fn of(batch: &[AppendRequest]) -> Self {
        let mut lookups = Lookups { streams: vec![], claims: vec![], idempotency_keys: vec![] };
        for request in batch {
            lookups.streams.push(request.stream_id.clone());
            lookups.streams.extend(request.conditions.iter().map(|c| c.stream_id.clone()));
            lookups.claims.extend(request.claims.iter().chain(&request.releases).cloned());
            lookups.idempotency_keys.extend(request.idempotency.iter().map(|i| i.key.clone()));
        }
        for keys in [&mut lookups.streams, &mut lookups.claims, &mut lookups.idempotency_keys] {
            keys.sort_unstable();
            keys.dedup();
        }
        lookups
    }
}

/// The writes a batch comes to.
#[derive(Debug, Default)]
pub struct BatchPlan {
    pub events: Vec<Envelope>,
    /// Claims to insert or hand to a new owner.
    pub claims_set: Vec<(String, String)>,
    pub claims_released: Vec<String>,
    pub replies: Vec<(String, StoredReply)>,
    initial_claims: HashMap<String, String>,
    state: CurrentState,
}

impl BatchPlan {
    pub fn new(state: CurrentState) -> Self {
        BatchPlan { initial_claims: state.claims.clone(), state, ..Default::default() }
    }

    /// Judges every request of `batch` in order against `state`: what to write, and each
    /// request's outcome should it be written.
    pub fn judge(state: CurrentState, batch: &[AppendRequest]) -> (Self, Vec<Result<AppendOutcome, AppendError>>) {
        let mut plan = BatchPlan::new(state);
        let outcomes = batch.iter().cloned().map(|request| plan.add(request)).collect();
        (plan.finish(), outcomes)
    }

    /// Judges one request against the state as earlier requests of the batch left it.
    pub fn add(&mut self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        if request.events.is_empty() && request.idempotency.is_none() {
            return Err(AppendError::Invalid("an append needs at least one event, or an idempotency key to record"));
        }
        if let Some(entry) = &request.idempotency
            && let Some(stored) = self.state.replies.get(&entry.key)
        {
            return match stored.request_hash == entry.request_hash {
                true => Ok(AppendOutcome::Replayed(stored.clone())),
                false => Err(AppendError::IdempotencyKeyReused),
            };
        }
        let expectations = std::iter::once((&request.stream_id, request.expected_version))
            .chain(request.conditions.iter().map(|c| (&c.stream_id, c.version)));
        for (stream_id, expected) in expectations {
            let actual = self.version_of(stream_id);
            if actual != expected {
                return Err(AppendError::WrongExpectedVersion { stream_id: stream_id.clone(), expected, actual });
            }
        }
        for claim in &request.claims {
            match self.state.claims.get(claim) {
                Some(owner) if *owner != request.stream_id => {
                    return Err(AppendError::ClaimTaken { claim: claim.clone() });
                }
                _ => {}
            }
        }

        let first_position = self.state.head + 1;
        let mut version = request.expected_version;
        for new in request.events {
            version += 1;
            self.state.head += 1;
            self.events.push(Envelope {
                event_id: new.event_id,
                schema_version: new.event.schema_version(),
                event: new.event,
                stream_id: request.stream_id.clone(),
                stream_version: version,
                global_position: self.state.head,
                workspace_id: new.workspace_id,
                channel_id: new.channel_id,
                actor_id: new.actor_id,
                occurred_at: new.occurred_at,
                correlation_id: new.correlation_id,
                causation_id: new.causation_id,
            });
        }
        if version > 0 {
            self.state.stream_versions.insert(request.stream_id.clone(), version);
        }
        for released in request.releases {
            if self.state.claims.get(&released) == Some(&request.stream_id) {
                self.state.claims.remove(&released);
            }
        }
        for claim in request.claims {
            self.state.claims.insert(claim, request.stream_id.clone());
        }
        // A keyed request without events records a no-op: its reply names the current head.
        let appended = Appended { first_position, last_position: self.state.head, stream_version: version };
        if let Some(entry) = request.idempotency {
            let stored = StoredReply {
                request_hash: entry.request_hash,
                reply: entry.reply,
                position: appended.last_position,
                stream_version: version,
            };
            self.state.replies.insert(entry.key.clone(), stored.clone());
            self.replies.push((entry.key, stored));
        }
        Ok(AppendOutcome::Appended(appended))
    }

    /// Whether the plan writes anything at all.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.replies.is_empty()
            && self.claims_set.is_empty()
            && self.claims_released.is_empty()
    }

    fn version_of(&self, stream_id: &str) -> u64 {
        self.state.stream_versions.get(stream_id).copied().unwrap_or(0)
    }

    /// Settles the claim changes as differences from what the store held at the start.
    pub fn finish(mut self) -> Self {
        for (claim, owner) in &self.state.claims {
            if self.initial_claims.get(claim) != Some(owner) {
                self.claims_set.push((claim.clone(), owner.clone()));
            }
        }
        for claim in self.initial_claims.keys() {
            if !self.state.claims.contains_key(claim) {
                self.claims_released.push(claim.clone());
            }
        }
        self
    }
}
