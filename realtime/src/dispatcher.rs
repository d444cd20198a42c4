//! One per gateway instance: puts the slices of every partition back into the store's global
//! order, and offers each event to the connections that may see it.
//!
//! **Order.** An event at position `P` is released once every partition has shown a record at
//! or above `P` (an event, or a watermark: API.md, Kafka), so that every event below `P` has
//! come first; the released events then go out in position order. A client's last position is
//! therefore a safe place to resume from: it had every event it may see below it.
//!
//! **Duplicates.** The bus delivers at least once, and the realtime group may publish a batch
//! twice (a crash, a rebalance); an event at or below the released position is one already
//! released, and is dropped.
//!
//! **Joining the stream.** A connection attaches at a position `after` it had everything up
//! to from the event store. If the dispatcher has not released that far, the connection waits
//! until it has; if it has released further, the events in between are offered from a ring of
//! the latest released events; if the ring no longer reaches back that far, the connection is
//! told so ([`Refused::Behind`]) and catches up from the store again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, Utc};
use quikapp_bus::Partition;
use quikapp_domain::Envelope;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use uuid::Uuid;

use crate::fanout::{Fanout, FanoutError, Item, Slice};
use crate::membership::{Membership, joins_workspace, subject, subject_only};

/// An event frame as every recipient writes it.
#[derive(Debug)]
pub struct Delivery {
    pub position: u64,
    pub occurred_at: DateTime<Utc>,
    pub text: Utf8Bytes,
    /// The user the event makes a member of a workspace, and that workspace: their
    /// connections are then present there too.
    pub joins: Option<(Uuid, Uuid)>,
}

pub type Frame = Arc<Delivery>;

/// Why the gateway ends a connection, as a WebSocket close code; set once.
#[derive(Debug, Default)]
pub struct Closing {
    code: AtomicU16,
    notify: Notify,
}

impl Closing {
    pub fn close(&self, code: u16) {
        if self.code.compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            self.notify.notify_one();
        }
    }

    pub fn code(&self) -> Option<u16> {
        Some(self.code.load(Ordering::SeqCst)).filter(|code| *code != 0)
    }

    /// Resolves once [`Closing::close`] was called.
    pub async fn closed(&self) -> u16 {
        loop {
            if let Some(code) = self.code() {
                return code;
            }
            self.notify.notified().await;
        }
    }
}

/// The client could not keep up: its buffer of frames is full (RFC 6455 "try again later").
pub const TOO_SLOW: u16 = 1013;
/// The gateway lost part of the stream: reconnect and resume (RFC 6455 "service restart").
pub const RESTART: u16 = 1012;

/// What a connection hands the dispatcher.
pub struct Connection {
    pub membership: Membership,
    /// The connection has every event up to here (from the event store).
    pub after: u64,
    pub frames: mpsc::Sender<Frame>,
    pub closing: Arc<Closing>,
}

/// Why a connection could not attach.
#[derive(Debug)]
pub enum Refused {
    /// The dispatcher has released events past the connection's position and no longer holds
    /// them all (or more than its buffer takes at once): catch up from the store to a newer
    /// position and attach again.
    Behind,
    /// The dispatcher is gone.
    Gone,
}

enum Command {
    Attach(Connection, oneshot::Sender<Result<u64, Refused>>),
    Detach(u64),
    Typing(u64, Uuid, oneshot::Sender<bool>),
}

/// The shortest time between two typing frames of one connection in one channel.
const TYPING_INTERVAL: Duration = Duration::from_secs(2);

/// A handle on the dispatcher task.
#[derive(Clone)]
pub struct Dispatcher {
    commands: mpsc::UnboundedSender<Command>,
    released: watch::Receiver<Option<u64>>,
}

/// Released events kept for connections that attach at an older position.
const RING: usize = 20_000;

impl Dispatcher {
    /// Starts reading `fanout`, whose events belong to `partitions`.
    pub fn start(fanout: Arc<dyn Fanout>, partitions: Vec<Partition>) -> Dispatcher {
        let (commands, commands_in) = mpsc::unbounded_channel();
        let (released_out, released) = watch::channel(None);
        let (slices_out, slices) = mpsc::channel(64);
        tokio::spawn(read(fanout, slices_out));
        let state =
            State { frontier: partitions.into_iter().map(|p| (p, None)).collect(), released_out, ..State::default() };
        tokio::spawn(state.run(slices, commands_in));
        Dispatcher { commands, released }
    }

    /// Attaches `connection` (waiting until the dispatcher has released its position); answers
    /// its id.
    pub async fn attach(&self, connection: Connection) -> Result<u64, Refused> {
        let (reply, replied) = oneshot::channel();
        let _ = self.commands.send(Command::Attach(connection, reply));
        replied.await.unwrap_or(Err(Refused::Gone))
    }

    pub fn detach(&self, id: u64) {
        let _ = self.commands.send(Command::Detach(id));
    }

    /// Whether connection `id` may announce typing in `channel` now: its user is a member, and
    /// it has not announced it within [`TYPING_INTERVAL`].
    pub async fn may_type(&self, id: u64, channel: Uuid) -> bool {
        let (reply, replied) = oneshot::channel();
        let _ = self.commands.send(Command::Typing(id, channel, reply));
        replied.await.unwrap_or(false)
    }

    /// The position up to which every event was released; `None` until every partition has
    /// been heard from.
    pub fn released(&self) -> Option<u64> {
        *self.released.borrow()
    }
}

/// Reads the fan-out into `slices`, reconnecting as needed, until the dispatcher is gone.
async fn read(fanout: Arc<dyn Fanout>, slices: mpsc::Sender<Result<Vec<Slice>, FanoutError>>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut reader = match fanout.subscribe().await {
            Ok(reader) => reader,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot read the fan-out");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        loop {
            let next = reader.next().await;
            if matches!(&next, Ok(read) if read.is_empty()) {
                if slices.is_closed() {
                    return;
                }
                continue;
            }
            let failed = next.is_err();
            if let Err(FanoutError::Unavailable(error)) = &next {
                tracing::warn!(%error, "reading the fan-out failed; reading on");
                tokio::time::sleep(backoff).await;
                continue; // the reader keeps its place
            }
            if slices.send(next).await.is_err() {
                return;
            }
            if failed {
                break; // lost slices: a new reader, from what comes next
            }
        }
    }
}

struct Released {
    envelope: Envelope,
    frame: Frame,
}

struct Attached {
    membership: Membership,
    after: u64,
    frames: mpsc::Sender<Frame>,
    closing: Arc<Closing>,
    /// When it last announced typing, per channel.
    typed: HashMap<Uuid, std::time::Instant>,
}

#[derive(Default)]
struct State {
    /// Per partition, the highest position it has shown (an event's or a watermark's); `None`
    /// until it was heard from.
    frontier: HashMap<Partition, Option<u64>>,
    /// Events read but not yet released, by position.
    pending: BTreeMap<u64, Envelope>,
    /// Every event up to here was released (or came before the dispatcher started).
    released: u64,
    started: bool,
    released_out: watch::Sender<Option<u64>>,
    /// The latest released events, complete after `ring_from`.
    ring: VecDeque<Arc<Released>>,
    ring_from: u64,
    connections: HashMap<u64, Attached>,
    by_channel: HashMap<Uuid, HashSet<u64>>,
    by_workspace: HashMap<Uuid, HashSet<u64>>,
    by_user: HashMap<Uuid, HashSet<u64>>,
    /// Connections waiting for the dispatcher to release their position.
    parked: Vec<(Connection, oneshot::Sender<Result<u64, Refused>>)>,
    next_id: u64,
}

impl State {
    async fn run(
        mut self,
        mut slices: mpsc::Receiver<Result<Vec<Slice>, FanoutError>>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        loop {
            tokio::select! {
                read = slices.recv() => match read {
                    Some(Ok(read)) => read.into_iter().for_each(|slice| self.take(slice)),
                    Some(Err(error)) => self.lost(&error),
                    None => return,
                },
                command = commands.recv() => match command {
                    Some(Command::Attach(connection, reply)) => self.attach(connection, reply),
                    Some(Command::Detach(id)) => self.remove(id),
                    Some(Command::Typing(id, channel, reply)) => _ = reply.send(self.may_type(id, channel)),
                    None => return,
                },
            }
        }
    }

    fn take(&mut self, slice: Slice) {
        for item in slice.records {
            let (topic, partition, position) = match item {
                Item::Event { topic, partition, event } => {
                    let position = event.global_position;
                    if position > self.released {
                        self.pending.entry(position).or_insert(*event);
                    }
                    (topic, partition, position)
                }
                Item::Watermark { topic, partition, position } => (topic, partition, position),
                // Ephemeral frames come after the events the records before them release (a
                // user announced in a workspace they just joined: its members have the join).
                // Before the start nobody is attached to be told.
                Item::Presence { workspace_id, user_id, online } => {
                    if self.started {
                        self.release();
                    }
                    let status = if online { "online" } else { "offline" };
                    let frame = serde_json::json!({
                        "type": "presence", "workspace_id": workspace_id, "user_id": user_id, "status": status,
                    });
                    self.tell(self.by_workspace.get(&workspace_id), user_id, frame);
                    continue;
                }
                Item::Typing { channel_id, user_id } => {
                    if self.started {
                        self.release();
                    }
                    let frame = serde_json::json!({ "type": "typing", "channel_id": channel_id, "user_id": user_id });
                    self.tell(self.by_channel.get(&channel_id), user_id, frame);
                    continue;
                }
            };
            match self.frontier.get_mut(&Partition { topic, index: partition }) {
                Some(frontier) => *frontier = Some(frontier.unwrap_or(0).max(position)),
                None => tracing::error!(partition, "a record of a partition this gateway does not know: restart it"),
            }
        }
        self.release();
    }

    /// Sends an ephemeral `frame` about `user` to `connections`, theirs excepted, at once (it
    /// has no place in the order of events).
    fn tell(&self, connections: Option<&HashSet<u64>>, user: Uuid, frame: serde_json::Value) {
        let frame =
            Arc::new(Delivery { position: 0, occurred_at: Utc::now(), text: frame.to_string().into(), joins: None });
        for id in connections.into_iter().flatten() {
            if let Some(connection) = self.connections.get(id)
                && connection.membership.user != user
            {
                // A full buffer drops it: the next event's offer closes the connection.
                let _ = connection.frames.try_send(frame.clone());
            }
        }
    }

    fn release(&mut self) {
        // Every partition heard from, or nothing to release yet.
        let Some(floor) = self.frontier.values().copied().min().flatten() else { return };
        if self.started && floor <= self.released {
            return;
        }
        if !self.started {
            // What came before the first slices read is not all here: start after it.
            self.started = true;
            self.pending = self.pending.split_off(&(floor + 1));
            self.ring_from = floor.max(self.released);
        }
        while self.pending.first_key_value().is_some_and(|(position, _)| *position <= floor) {
            let (_, event) = self.pending.pop_first().expect("there is a first");
            self.deliver(event);
        }
        self.released = self.released.max(floor);
        self.released_out.send_replace(Some(self.released));
        for (connection, reply) in std::mem::take(&mut self.parked) {
            self.attach(connection, reply);
        }
    }

    fn deliver(&mut self, envelope: Envelope) {
        let text = serde_json::json!({ "type": "event", "event": &envelope }).to_string();
        let frame = Arc::new(Delivery {
            position: envelope.global_position,
            occurred_at: envelope.occurred_at,
            text: text.into(),
            joins: joins_workspace(&envelope),
        });
        let released = Arc::new(Released { envelope, frame });
        self.ring.push_back(released.clone());
        if self.ring.len() > RING
            && let Some(oldest) = self.ring.pop_front()
        {
            self.ring_from = oldest.envelope.global_position;
        }
        let event = &released.envelope;
        let mut ids: Vec<u64> = Vec::new();
        if !subject_only(event) {
            let members = match (event.channel_id, event.workspace_id) {
                // A new channel has no members yet: the workspace's see a public one.
                (Some(_), Some(workspace)) if matches!(event.event, quikapp_domain::Event::ChannelCreated(_)) => {
                    self.by_workspace.get(&workspace)
                }
                (Some(channel), _) => self.by_channel.get(&channel),
                (None, Some(workspace)) => self.by_workspace.get(&workspace),
                (None, None) => None,
            };
            ids.extend(members.into_iter().flatten());
        }
        if let Some(user) = subject(event) {
            ids.extend(self.by_user.get(&user).into_iter().flatten());
        }
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.offer(id, &released);
        }
    }

    /// Offers a released event to one connection, which takes it if it may see it.
    fn offer(&mut self, id: u64, released: &Released) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        let event = &released.envelope;
        if event.global_position <= connection.after {
            return;
        }
        let sees = connection.membership.sees(event);
        let user = connection.membership.user;
        let outcome = sees.then(|| connection.frames.try_send(released.frame.clone()));
        if subject(event) == Some(user) {
            self.index_membership(id, event);
        }
        match outcome {
            Some(Err(mpsc::error::TrySendError::Full(_))) => {
                metrics::counter!("quikapp_realtime_slow_closes_total").increment(1);
                if let Some(connection) = self.connections.get(&id) {
                    connection.closing.close(TOO_SLOW);
                }
                self.remove(id);
            }
            Some(Err(mpsc::error::TrySendError::Closed(_))) => self.remove(id),
            _ => {}
        }
    }

    /// Follows a membership `event` of the connection's user in the indexes.
    fn index_membership(&mut self, id: u64, event: &Envelope) {
        use quikapp_domain::Event;
        if let Some((_, workspace)) = joins_workspace(event) {
            self.by_workspace.entry(workspace).or_default().insert(id);
        }
        match &event.event {
            Event::ChannelMemberJoined(e) => _ = self.by_channel.entry(e.channel_id).or_default().insert(id),
            Event::ChannelMemberLeft(e) => unindex(&mut self.by_channel, e.channel_id, id),
            _ => {}
        }
    }

    fn attach(&mut self, connection: Connection, reply: oneshot::Sender<Result<u64, Refused>>) {
        if reply.is_closed() {
            return; // the connection gave up waiting
        }
        if !self.started || connection.after > self.released {
            self.parked.push((connection, reply));
            return;
        }
        let missed = self.ring.iter().filter(|released| released.envelope.global_position > connection.after).count();
        // The missed events go into the buffer at once: more than it takes would close the
        // connection as too slow before it read any.
        if connection.after < self.ring_from || missed > connection.frames.capacity() {
            let _ = reply.send(Err(Refused::Behind));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let membership = &connection.membership;
        for channel in &membership.channels {
            self.by_channel.entry(*channel).or_default().insert(id);
        }
        for workspace in &membership.workspaces {
            self.by_workspace.entry(*workspace).or_default().insert(id);
        }
        self.by_user.entry(membership.user).or_default().insert(id);
        let after = connection.after;
        self.connections.insert(
            id,
            Attached {
                membership: connection.membership,
                after,
                frames: connection.frames,
                closing: connection.closing,
                typed: HashMap::new(),
            },
        );
        if reply.send(Ok(id)).is_err() {
            self.remove(id);
            return;
        }
        let missed: Vec<Arc<Released>> =
            self.ring.iter().filter(|released| released.envelope.global_position > after).cloned().collect();
        for released in missed {
            self.offer(id, &released);
        }
    }

    fn may_type(&mut self, id: u64, channel: Uuid) -> bool {
        let Some(connection) = self.connections.get_mut(&id) else { return false };
        let now = std::time::Instant::now();
        let due = connection.typed.get(&channel).is_none_or(|last| now.duration_since(*last) >= TYPING_INTERVAL);
        let allowed = due && connection.membership.channels.contains(&channel);
        if allowed {
            connection.typed.insert(channel, now);
        }
        allowed
    }

    fn remove(&mut self, id: u64) {
        let Some(connection) = self.connections.remove(&id) else { return };
        for channel in &connection.membership.channels {
            unindex(&mut self.by_channel, *channel, id);
        }
        for workspace in &connection.membership.workspaces {
            unindex(&mut self.by_workspace, *workspace, id);
        }
        unindex(&mut self.by_user, connection.membership.user, id);
    }

    /// Slices were lost: what was released may have gaps from here on. Every connection is
    /// closed (its client resumes from the store) and the order starts again.
    fn lost(&mut self, error: &FanoutError) {
        tracing::error!(%error, connections = self.connections.len(), "closing every connection: part of the stream was lost");
        for connection in self.connections.values() {
            connection.closing.close(RESTART);
        }
        let ids: Vec<u64> = self.connections.keys().copied().collect();
        ids.into_iter().for_each(|id| self.remove(id));
        self.frontier.values_mut().for_each(|frontier| *frontier = None);
        self.pending.clear();
        self.ring.clear();
        self.started = false;
    }
}

fn unindex(index: &mut HashMap<Uuid, HashSet<u64>>, key: Uuid, id: u64) {
    if let Some(ids) = index.get_mut(&key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(&key);
        }
    }
}
