//! Command handling: load the aggregates a command needs, let the domain decide, append what it
//! decided with optimistic concurrency, and start over on fresh state when another write got
//! there first.

use quikapp_domain::channel::{Channel, ChannelChanges, name_claims};
use quikapp_domain::event::timestamp;
use quikapp_domain::message::{Message, ReadMark};
use quikapp_domain::user::User;
use quikapp_domain::workspace::{Role, Workspace};
use quikapp_domain::{Aggregate, DomainError, Event, stream};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use thiserror::Error;
use uuid::Uuid;

use crate::store::{
    AppendError, AppendOutcome, AppendRequest, EventStore, IdempotencyEntry, NewEvent, StoreError, StoredReply,
    StreamCondition,
};

/// How often a command is decided again after losing a race, before it answers 409.
const MAX_ATTEMPTS: usize = 8;

/// Every command of the write API. The acting user is not part of it: it comes from the token.
#[derive(Debug, Clone)]
pub enum Command {
    UpdateProfile { display_name: String },
    CreateWorkspace { name: String },
    AddWorkspaceMember { workspace_id: Uuid, user_id: Uuid, role: Role },
    CreateChannel { workspace_id: Uuid, name: String, private: bool, topic: Option<String> },
    UpdateChannel { channel_id: Uuid, name: Option<String>, topic: Option<String> },
    ArchiveChannel { channel_id: Uuid },
    JoinChannel { channel_id: Uuid, user_id: Uuid },
    LeaveChannel { channel_id: Uuid, user_id: Uuid },
    PostMessage { channel_id: Uuid, text: String, thread_root_id: Option<Uuid> },
    EditMessage { channel_id: Uuid, message_id: Uuid, text: String },
    DeleteMessage { channel_id: Uuid, message_id: Uuid },
    AddReaction { channel_id: Uuid, message_id: Uuid, emoji: String },
    RemoveReaction { channel_id: Uuid, message_id: Uuid, emoji: String },
    MarkRead { channel_id: Uuid, message_id: Uuid },
}

impl Command {
    /// A stable name for logs and metrics.
    pub fn name(&self) -> &'static str {
        use Command::*;
        match self {
            UpdateProfile { .. } => "UpdateProfile",
            CreateWorkspace { .. } => "CreateWorkspace",
            AddWorkspaceMember { .. } => "AddWorkspaceMember",
            CreateChannel { .. } => "CreateChannel",
            UpdateChannel { .. } => "UpdateChannel",
            ArchiveChannel { .. } => "ArchiveChannel",
            JoinChannel { .. } => "JoinChannel",
            LeaveChannel { .. } => "LeaveChannel",
            PostMessage { .. } => "PostMessage",
            EditMessage { .. } => "EditMessage",
            DeleteMessage { .. } => "DeleteMessage",
            AddReaction { .. } => "AddReaction",
            RemoveReaction { .. } => "RemoveReaction",
            MarkRead { .. } => "MarkRead",
        }
    }
}

/// Who sends a command, and on what terms.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub actor: Uuid,
    pub correlation_id: Uuid,
    /// The version the caller saw of the stream the command changes (HTTP If-Match).
    pub if_match: Option<u64>,
    pub idempotency: Option<Idempotency>,
}

#[derive(Debug, Clone)]
pub struct Idempotency {
    /// Already scoped to the user and the endpoint.
    pub key: String,
    pub request_hash: String,
}

/// A successful command's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Whether the command created something (HTTP 201).
    pub created: bool,
    /// The ids it created, by name (`workspace_id`, `channel_id`, `message_id`).
    pub ids: Map<String, Value>,
    /// The global position of its last event, or the head when it changed nothing.
    pub position: u64,
    /// The version of the stream it changed.
    pub version: u64,
}

impl Reply {
    /// The JSON body: the created ids, `position` as a decimal string, and `version`.
    pub fn body(&self) -> Value {
        let mut body = self.ids.clone();
        body.insert("position".into(), self.position.to_string().into());
        body.insert("version".into(), self.version.into());
        Value::Object(body)
    }

    fn replayed(stored: StoredReply) -> Self {
        let ids = stored.reply.get("ids").and_then(Value::as_object).cloned().unwrap_or_default();
        let created = stored.reply.get("created").and_then(Value::as_bool).unwrap_or(false);
        Reply { created, ids, position: stored.position, version: stored.stream_version }
    }
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum CommandError {
    /// The domain refused: 404, 403, 409 or 422 by its kind.
    #[error(transparent)]
    Rejected(#[from] DomainError),
    /// If-Match named a version the stream has moved on from (412).
    #[error("the resource is at version {current}, not the one in If-Match")]
    PreconditionFailed { current: u64 },
    /// The channel name is taken in its workspace (409).
    #[error("a channel of that name exists in the workspace")]
    NameTaken,
    /// Concurrent writes kept winning the race (409).
    #[error("the resource kept changing concurrently; try again")]
    Contention,
    /// The idempotency key was used before with another body (422).
    #[error("the Idempotency-Key was used before with a different request")]
    IdempotencyKeyReused,
    /// The event store failed (503 when unavailable or the outcome is unknown, else 500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct CommandService {
    store: Arc<dyn EventStore>,
    cache: StateCache,
    keys_in_flight: KeyLocks,
}

/// One lock per idempotency key in use, so that the requests of one key run one at a time in
/// this process; an entry lives while someone holds or waits for it.
#[derive(Default)]
struct KeyLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

struct KeyTurn<'a> {
    locks: &'a KeyLocks,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyLocks {
    async fn lock(&self, key: &str) -> KeyTurn<'_> {
        let lock = self.0.lock().expect("never poisoned").entry(key.to_owned()).or_default().clone();
        let guard = Some(lock.clone().lock_owned().await);
        KeyTurn { locks: self, key: key.to_owned(), lock, guard }
    }
}

impl Drop for KeyTurn<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self.locks.0.lock().expect("never poisoned");
        // The map's reference and ours: nobody else holds or waits for this key.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.key);
        }
    }
}

/// Recently loaded channel and workspace states, so that a command on a busy channel does not
/// re-read the channel's membership each time. An entry may be stale when another process
/// wrote; that is safe because every append names the versions its decision relied on as
/// conditions (a stale entry costs a retry, never a wrong write), and an answer that appends
/// nothing (a refusal, a no-op, a failed If-Match) is decided again on fresh state first.
struct StateCache {
    channels: moka::sync::Cache<String, Arc<Loaded<Channel>>>,
    workspaces: moka::sync::Cache<String, Arc<Loaded<Workspace>>>,
}

/// Entries kept per cache.
const CACHED_STATES: u64 = 50_000;

impl StateCache {
    fn new() -> Self {
        StateCache {
            channels: moka::sync::Cache::new(CACHED_STATES),
            workspaces: moka::sync::Cache::new(CACHED_STATES),
        }
    }

    fn forget(&self, stream_id: &str) {
        self.channels.invalidate(stream_id);
        self.workspaces.invalidate(stream_id);
    }
}

/// A stream's state as of its version, and where its first event stands in the global order.
struct Loaded<A> {
    state: A,
    version: u64,
    first_position: u64,
}

/// What a command comes to, before it is appended.
struct Decision {
    stream_id: String,
    expected_version: u64,
    events: Vec<Event>,
    workspace_id: Option<Uuid>,
    channel_id: Option<Uuid>,
    /// The stream whose version If-Match is compared with.
    guard: StreamCondition,
    conditions: Vec<StreamCondition>,
    created: bool,
    ids: Map<String, Value>,
}

impl Decision {
    fn new(stream_id: String, expected_version: u64, events: Vec<Event>) -> Self {
        let guard = StreamCondition { stream_id: stream_id.clone(), version: expected_version };
        Decision {
            stream_id,
            expected_version,
            events,
            workspace_id: None,
            channel_id: None,
            guard,
            conditions: vec![],
            created: false,
            ids: Map::new(),
        }
    }

    fn in_workspace(mut self, workspace_id: Uuid) -> Self {
        self.workspace_id = Some(workspace_id);
        self
    }

    fn in_channel(mut self, channel: &Loaded<Channel>) -> Self {
        self.workspace_id = Some(channel.state.workspace_id);
        self.channel_id = channel.state.id;
        self
    }

    /// The append holds only while `stream_id` is still at `version`.
    fn provided<A>(mut self, stream_id: String, loaded: &Loaded<A>) -> Self {
        self.conditions.push(StreamCondition { stream_id, version: loaded.version });
        self
    }

    /// Like [`Decision::provided`], and If-Match refers to that stream.
    fn guarded_by<A>(mut self, stream_id: String, loaded: &Loaded<A>) -> Self {
        self.guard = StreamCondition { stream_id, version: loaded.version };
        self.conditions.push(self.guard.clone());
        self
    }

    /// A change to the channel's own stream, provided its workspace is unchanged.
    fn on_channel(channel: &Loaded<Channel>, workspace: &Loaded<Workspace>, events: Vec<Event>) -> Self {
        let channel_id = channel.state.id.expect("the domain refuses commands on absent channels");
        Decision::new(stream::channel(channel_id), channel.version, events)
            .in_channel(channel)
            .provided(stream::workspace(channel.state.workspace_id), workspace)
    }

    fn created(mut self, name: &str, id: Uuid) -> Self {
        self.created = true;
        self.ids.insert(name.into(), id.to_string().into());
        self
    }
}

impl CommandService {
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        CommandService { store, cache: StateCache::new(), keys_in_flight: KeyLocks::default() }
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    pub async fn execute(&self, context: &CommandContext, command: &Command) -> Result<Reply, CommandError> {
        let Some(idempotency) = &context.idempotency else { return self.decide_and_append(context, command).await };
        // A repeat that arrives while the first is in flight waits for its answer here; across
        // processes, the append itself settles which one wins (the other gets its reply).
        let _turn = self.keys_in_flight.lock(&idempotency.key).await;
        if let Some(stored) = self.store.idempotent_reply(&idempotency.key).await? {
            return replay(idempotency, stored);
        }
        match self.decide_and_append(context, command).await {
            // An answer that appended nothing may be to a repeat whose first try, in another
            // process, has succeeded meanwhile: that first answer is the one to give.
            Err(CommandError::Rejected(_) | CommandError::PreconditionFailed { .. } | CommandError::NameTaken)
                if let Some(stored) = self.store.idempotent_reply(&idempotency.key).await? =>
            {
                replay(idempotency, stored)
            }
            result => result,
        }
    }

    async fn decide_and_append(&self, context: &CommandContext, command: &Command) -> Result<Reply, CommandError> {
        let mut fresh = false;
        for _ in 0..MAX_ATTEMPTS {
            let decision = match self.decide(context.actor, command, fresh).await {
                // A field that is invalid is invalid whatever the state: no need to look again.
                Err(CommandError::Rejected(invalid @ DomainError::Invalid { .. })) => return Err(invalid.into()),
                Err(CommandError::Rejected(_)) if !fresh => {
                    fresh = true; // confirm the refusal on fresh state
                    continue;
                }
                decision => decision?,
            };
            if let Some(version) = context.if_match
                && version != decision.guard.version
            {
                if !fresh {
                    fresh = true;
                    continue;
                }
                return Err(CommandError::PreconditionFailed { current: decision.guard.version });
            }
            let (created, ids, expected_version) = (decision.created, decision.ids.clone(), decision.expected_version);
            if decision.events.is_empty() {
                if !fresh {
                    fresh = true; // "nothing to do" is an answer about state: confirm it too
                    continue;
                }
                if context.idempotency.is_none() {
                    let position = self.store.head().await?;
                    return Ok(Reply { created, ids, position, version: expected_version });
                }
                // A keyed no-op is remembered like any answer, on the state it was decided on.
            }
            let stream_id = decision.stream_id.clone();
            match self.store.append(append_request(context, decision)).await {
                Ok(AppendOutcome::Appended(appended)) => {
                    self.cache.forget(&stream_id);
                    return Ok(Reply {
                        created,
                        ids,
                        position: appended.last_position,
                        version: appended.stream_version,
                    });
                }
                Ok(AppendOutcome::Replayed(stored)) => {
                    return replay(context.idempotency.as_ref().expect("only keyed appends replay"), stored);
                }
                // Decide again on fresh state (cached states catch up from their version);
                // If-Match is checked against it above.
                Err(AppendError::WrongExpectedVersion { .. }) => fresh = true,
                Err(AppendError::ClaimTaken { .. }) => return Err(CommandError::NameTaken),
                Err(AppendError::IdempotencyKeyReused) => return Err(CommandError::IdempotencyKeyReused),
                Err(AppendError::Invalid(reason)) => return Err(StoreError::Failed(reason.into()).into()),
                Err(AppendError::Store(error)) => return Err(error.into()),
            }
        }
        Err(CommandError::Contention)
    }

    async fn load<A: Aggregate>(&self, stream_id: &str) -> Result<Loaded<A>, StoreError> {
        let empty = Loaded { state: A::default(), version: 0, first_position: 0 };
        self.catch_up(stream_id, empty).await
    }

    /// `loaded` with the stream's events after its version applied.
    async fn catch_up<A: Aggregate>(&self, stream_id: &str, mut loaded: Loaded<A>) -> Result<Loaded<A>, StoreError> {
        let events = self.store.read_stream(stream_id, loaded.version).await?;
        for envelope in &events {
            loaded.state.apply(&envelope.event);
        }
        if loaded.version == 0 {
            loaded.first_position = events.first().map_or(0, |e| e.global_position);
        }
        loaded.version = events.last().map_or(loaded.version, |e| e.stream_version);
        Ok(loaded)
    }

    /// Loads through `cache`; `fresh` asks for the store's current state, which a cached entry
    /// reaches by reading only the events after its version.
    async fn load_cached<A: Aggregate + Clone + Send + Sync + 'static>(
        &self,
        cache: &moka::sync::Cache<String, Arc<Loaded<A>>>,
        stream_id: String,
        fresh: bool,
    ) -> Result<Arc<Loaded<A>>, StoreError> {
        let cached = cache.get(&stream_id);
        if !fresh && let Some(loaded) = cached {
            return Ok(loaded);
        }
        let start = cached.map_or_else(
            || Loaded { state: A::default(), version: 0, first_position: 0 },
            |c| Loaded { state: c.state.clone(), version: c.version, first_position: c.first_position },
        );
        let loaded = Arc::new(self.catch_up(&stream_id, start).await?);
        if loaded.version > 0 {
            // A load that raced with a newer one must not put an older state back.
            cache.entry(stream_id).and_upsert_with(|cached| match cached {
                Some(cached) if cached.value().version > loaded.version => cached.into_value(),
                _ => loaded.clone(),
            });
        }
        Ok(loaded)
    }

    async fn workspace(&self, workspace_id: Uuid, fresh: bool) -> Result<Arc<Loaded<Workspace>>, StoreError> {
        self.load_cached(&self.cache.workspaces, stream::workspace(workspace_id), fresh).await
    }

    /// A channel and the workspace it belongs to (empty states when the channel does not exist).
    async fn channel(
        &self,
        channel_id: Uuid,
        fresh: bool,
    ) -> Result<(Arc<Loaded<Channel>>, Arc<Loaded<Workspace>>), StoreError> {
        let channel = self.load_cached(&self.cache.channels, stream::channel(channel_id), fresh).await?;
        let workspace = match channel.state.id {
            Some(_) => self.workspace(channel.state.workspace_id, fresh).await?,
            None => Arc::new(Loaded { state: Workspace::default(), version: 0, first_position: 0 }),
        };
        Ok((channel, workspace))
    }

    async fn decide(&self, actor: Uuid, command: &Command, fresh: bool) -> Result<Decision, CommandError> {
        use Command::*;
        let decision = match command {
            UpdateProfile { display_name } => {
                let stream_id = stream::user(actor);
                let user: Loaded<User> = self.load(&stream_id).await?;
                Decision::new(stream_id, user.version, user.state.update_profile(actor, display_name)?)
            }
            CreateWorkspace { name } => {
                let id = Uuid::now_v7();
                Decision::new(stream::workspace(id), 0, Workspace::create(id, name, actor)?)
                    .in_workspace(id)
                    .created("workspace_id", id)
            }
            AddWorkspaceMember { workspace_id, user_id, role } => {
                let workspace = self.workspace(*workspace_id, fresh).await?;
                let events = workspace.state.add_member(actor, *user_id, *role)?;
                Decision::new(stream::workspace(*workspace_id), workspace.version, events).in_workspace(*workspace_id)
            }
            CreateChannel { workspace_id, name, private, topic } => {
                let workspace = self.workspace(*workspace_id, fresh).await?;
                let id = Uuid::now_v7();
                let events = Channel::create(&workspace.state, actor, id, name, *private, topic.as_deref())?;
                let mut decision = Decision::new(stream::channel(id), 0, events)
                    .provided(stream::workspace(*workspace_id), &workspace)
                    .created("channel_id", id);
                decision.workspace_id = Some(*workspace_id);
                decision.channel_id = Some(id);
                decision
            }
            UpdateChannel { channel_id, name, topic } => {
                let (channel, workspace) = self.channel(*channel_id, fresh).await?;
                let changes = ChannelChanges { name: name.as_deref(), topic: topic.as_deref() };
                let events = channel.state.change(&workspace.state, actor, changes)?;
                Decision::on_channel(&channel, &workspace, events)
            }
            ArchiveChannel { channel_id } => {
                let (channel, workspace) = self.channel(*channel_id, fresh).await?;
                let events = channel.state.archive(&workspace.state, actor)?;
                Decision::on_channel(&channel, &workspace, events)
            }
            JoinChannel { channel_id, user_id } => {
                let (channel, workspace) = self.channel(*channel_id, fresh).await?;
                let events = channel.state.join(&workspace.state, actor, *user_id)?;
                Decision::on_channel(&channel, &workspace, events)
            }
            LeaveChannel { channel_id, user_id } => {
                let (channel, workspace) = self.channel(*channel_id, fresh).await?;
                let events = channel.state.leave(&workspace.state, actor, *user_id)?;
                Decision::on_channel(&channel, &workspace, events)
            }
            PostMessage { channel_id, text, thread_root_id } => {
                let (channel, workspace) = self.channel(*channel_id, fresh).await?;
                let root = match thread_root_id {
                    Some(root_id) => Some((*root_id, self.load::<Message>(&stream::message(*root_id)).await?)),
                    None => None,
                };
                let id = Uuid::now_v7();
                let root_state = root.as_ref().map(|(_, loaded)| &loaded.state);
                let events = Message::post(&channel.state, &workspace.state, actor, id, text, root_state)?;
                let decision = Decision::new(stream::message(id), 0, events)
                    .in_channel(&channel)
                    .guarded_by(stream::channel(*channel_id), &channel)
                    .provided(stream::workspace(channel.state.workspace_id), &workspace)
                    .created("message_id", id);
                match &root {
                    // A root deleted concurrently must not gain a reply.
                    Some((root_id, loaded)) => decision.provided(stream::message(*root_id), loaded),
                    None => decision,
                }
            }
            EditMessage { channel_id, message_id, text } => {
                self.decide_on_message(*channel_id, *message_id, fresh, |m, c, w| m.edit(c, w, actor, text)).await?
            }
            DeleteMessage { channel_id, message_id } => {
                self.decide_on_message(*channel_id, *message_id, fresh, |m, c, w| m.delete(c, w, actor)).await?
            }
            AddReaction { channel_id, message_id, emoji } => {
                self.decide_on_message(*channel_id, *message_id, fresh, |m, c, w| m.add_reaction(c, w, actor, emoji))
                    .await?
            }
            RemoveReaction { channel_id, message_id, emoji } => {
                self.decide_on_message(*channel_id, *message_id, fresh, |m, c, w| m.remove_reaction(c, w, actor, emoji))
                    .await?
            }
            MarkRead { channel_id, message_id } => {
                let (channel, workspace) = self.channel(*channel_id, fresh).await?;
                let message: Loaded<Message> = self.load(&stream::message(*message_id)).await?;
                let stream_id = stream::read_mark(*channel_id, actor);
                let mark: Loaded<ReadMark> = self.load(&stream_id).await?;
                let events =
                    mark.state.mark(&channel.state, &workspace.state, actor, &message.state, message.first_position)?;
                Decision::new(stream_id, mark.version, events)
                    .in_channel(&channel)
                    .guarded_by(stream::channel(*channel_id), &channel)
                    .provided(stream::workspace(channel.state.workspace_id), &workspace)
                    // A message deleted meanwhile is no read mark.
                    .provided(stream::message(*message_id), &message)
            }
        };
        Ok(decision)
    }

    /// Commands on an existing message: they change its stream, provided its channel and
    /// workspace are unchanged (an archive or a removal decided concurrently must not be overtaken).
    async fn decide_on_message(
        &self,
        channel_id: Uuid,
        message_id: Uuid,
        fresh: bool,
        decide: impl FnOnce(&Message, &Channel, &Workspace) -> Result<Vec<Event>, DomainError>,
    ) -> Result<Decision, CommandError> {
        let (channel, workspace) = self.channel(channel_id, fresh).await?;
        let message: Loaded<Message> = self.load(&stream::message(message_id)).await?;
        let events = decide(&message.state, &channel.state, &workspace.state)?;
        Ok(Decision::new(stream::message(message_id), message.version, events)
            .in_channel(&channel)
            .provided(stream::channel(channel_id), &channel)
            .provided(stream::workspace(channel.state.workspace_id), &workspace))
    }
}

fn replay(idempotency: &Idempotency, stored: StoredReply) -> Result<Reply, CommandError> {
    if stored.request_hash != idempotency.request_hash {
        return Err(CommandError::IdempotencyKeyReused);
    }
    Ok(Reply::replayed(stored))
}

fn append_request(context: &CommandContext, decision: Decision) -> AppendRequest {
    let (mut claims, mut releases) = (vec![], vec![]);
    if let Some(workspace_id) = decision.workspace_id {
        for event in &decision.events {
            let event_claims = name_claims(workspace_id, event);
            claims.extend(event_claims.take);
            releases.extend(event_claims.release);
        }
    }
    let command_id = Uuid::now_v7();
    let occurred_at = timestamp::now();
    let events = decision
        .events
        .into_iter()
        .map(|event| NewEvent {
            event_id: Uuid::now_v7(),
            event,
            workspace_id: decision.workspace_id,
            channel_id: decision.channel_id,
            actor_id: context.actor,
            occurred_at,
            correlation_id: context.correlation_id,
            causation_id: command_id,
        })
        .collect();
    let idempotency = context.idempotency.as_ref().map(|i| IdempotencyEntry {
        key: i.key.clone(),
        request_hash: i.request_hash.clone(),
        reply: json!({ "created": decision.created, "ids": decision.ids }),
    });
    AppendRequest {
        stream_id: decision.stream_id,
        expected_version: decision.expected_version,
        events,
        conditions: decision.conditions,
        claims,
        releases,
        idempotency,
    }
}
