//! GET /v1/stream: the WebSocket of API.md's Realtime section.
//!
//! A connection authenticates before the upgrade (401 otherwise), then:
//! 1. takes the client's resume position from `?after_position=` or from a first `resume`
//!    frame sent within [`GatewayConfig::resume_grace`] of the upgrade (a `resume` that comes
//!    later starts the stream over: a new hello, then the same steps);
//! 2. reads the store's head `H` and the user's memberships up to `H`, says hello, and (when
//!    resuming after `G`) sends every event in `(G, H]` the user may see, from the store;
//! 3. attaches to the [`Dispatcher`] at `H`, which sends every later event the user may see
//!    (in position order, none twice: see the dispatcher).
//!
//! Frames wait for the client in a bounded buffer; a client that lets it fill is closed with
//! 1013 and costs the others nothing. A gateway shutting down closes with 1001.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use quikapp_commands::store::EventStore;
use quikapp_domain::Envelope;
use quikapp_write_api::auth::{Tokens, bearer};
use quikapp_write_api::problem::ApiError;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::dispatcher::{Closing, Connection, Dispatcher, Frame, Refused};
use crate::fanout::{Fanout, Item, Slice};
use crate::membership::Membership;
use crate::presence::Presence;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Frames waiting for one client, at most.
    pub send_buffer: usize,
    /// How long a new connection waits for a `resume` frame before it streams from the head.
    pub resume_grace: Duration,
    /// How long a connection waits for the dispatcher to reach the store's head.
    pub attach_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            send_buffer: 1_024,
            resume_grace: Duration::from_millis(250),
            // Long enough for the realtime group to hand a dead member's partitions over.
            attach_timeout: Duration::from_secs(60),
        }
    }
}

/// A gateway that is going away (RFC 6455): clients reconnect elsewhere.
pub const GOING_AWAY: u16 = 1001;
/// The stream cannot be served now (the store is down, the dispatcher is not ready).
pub const UNAVAILABLE: u16 = 1011;

/// How long the close frame may wait for a client to read what is before it.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// How often a quiet client is pinged; one that sends nothing (not even a pong) for two of
/// these is gone.
const PING_EVERY: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Gateway(Arc<Inner>);

struct Inner {
    store: Arc<dyn EventStore>,
    tokens: Tokens,
    dispatcher: Dispatcher,
    presence: Arc<dyn Presence>,
    /// Where typing frames go to every instance.
    fanout: Arc<dyn Fanout>,
    config: GatewayConfig,
    stopping: watch::Receiver<bool>,
    open: AtomicUsize,
}

impl Gateway {
    /// A gateway whose connections close with 1001 once `stopping` turns true.
    pub fn new(
        store: Arc<dyn EventStore>,
        tokens: Tokens,
        (dispatcher, fanout): (Dispatcher, Arc<dyn Fanout>),
        presence: Arc<dyn Presence>,
        config: GatewayConfig,
        stopping: watch::Receiver<bool>,
    ) -> Gateway {
        let inner = Inner { store, tokens, dispatcher, presence, fanout, config, stopping, open: AtomicUsize::new(0) };
        Gateway(Arc::new(inner))
    }

    /// Renews this instance's presence and sweeps lapsed users until `stopping` turns true.
    pub async fn keep_presence(&self) {
        let presence = &self.0.presence;
        let mut every = tokio::time::interval(presence.every());
        let stopping = stopped(self.0.stopping.clone());
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                _ = every.tick() => {
                    if let Err(error) = presence.tick().await {
                        tracing::warn!(%error, "cannot renew presence");
                    }
                }
                () = &mut stopping => return,
            }
        }
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::SeqCst)
    }

    /// Whether the dispatcher is following the stream.
    pub fn ready(&self) -> Result<(), String> {
        match self.0.dispatcher.released() {
            Some(_) => Ok(()),
            None => Err("the stream has not been heard from on every partition yet".into()),
        }
    }

    /// Waits up to `limit` for every connection to end (after `stopping` turned true).
    pub async fn drained(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// GET /v1/stream.
pub fn routes(gateway: Gateway) -> Router {
    Router::new().route("/v1/stream", get(stream)).with_state(gateway)
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    access_token: Option<String>,
    after_position: Option<u64>,
}

async fn stream(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let token = bearer(&headers).or(query.access_token.as_deref());
    let Some(user) = token.and_then(|token| gateway.0.tokens.verify(token)) else {
        return ApiError::Unauthorized.into_response();
    };
    // Small buffers: what a connection costs is mostly these (tungstenite's default reads into
    // 128 kB), and each frame is flushed as it is written.
    let upgrade = upgrade.read_buffer_size(4 * 1024).write_buffer_size(0);
    upgrade.on_upgrade(move |socket| async move {
        gateway.0.open.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!("quikapp_realtime_connections").increment(1);
        serve(&gateway, user, query.after_position, socket).await;
        metrics::gauge!("quikapp_realtime_connections").decrement(1);
        gateway.0.open.fetch_sub(1, Ordering::SeqCst);
    })
}

/// What a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientFrame {
    Resume {
        #[serde(deserialize_with = "position")]
        after_position: u64,
    },
    Typing {
        channel_id: Uuid,
    },
}

/// A position as API.md writes it (a string), or as a number.
fn position<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Number(u64),
    }
    match Either::deserialize(deserializer)? {
        Either::Number(n) => Ok(n),
        Either::Text(text) => text.parse().map_err(serde::de::Error::custom),
    }
}

type Sink = futures::stream::SplitSink<WebSocket, Message>;

/// Why a connection ends early.
enum End {
    /// The client went away: nothing more to send.
    Gone,
    /// Close with this code and reason.
    Close(u16, String),
}

async fn serve(gateway: &Gateway, user: Uuid, after_position: Option<u64>, socket: WebSocket) {
    let (mut sink, mut incoming) = socket.split();
    let mut resume = match after_position {
        Some(after) => Ok(Some(after)),
        None => first_resume(&mut incoming, gateway.0.config.resume_grace).await,
    };
    let presence = &gateway.0.presence;
    let end = loop {
        let after = match resume {
            Ok(after) => after,
            Err(end) => break end,
        };
        let (frames_in, frames) = mpsc::channel(gateway.0.config.send_buffer);
        let closing = Arc::new(Closing::default());
        let joined = tokio::select! {
            joined = join(gateway, user, after, &mut sink, frames_in, &closing) => joined,
            () = stopped(gateway.0.stopping.clone()) => Err(End::Close(GOING_AWAY, reason(GOING_AWAY).into())),
        };
        let (id, workspaces) = match joined {
            Ok(joined) => joined,
            Err(end) => break end,
        };
        if let Err(error) = presence.opened(id, user, &workspaces).await {
            tracing::warn!(%error, %user, "cannot record a connection's presence");
        }
        let ended = live(gateway, user, id, &mut sink, &mut incoming, frames, &closing).await;
        gateway.0.dispatcher.detach(id);
        // The close frame first: the client need not wait on presence.
        if let Err(end) = &ended {
            send_close(&mut sink, end).await;
        }
        if let Err(error) = presence.closed(id, user).await {
            tracing::warn!(%error, %user, "cannot record a connection's end");
        }
        match ended {
            // A `resume` after live frames began: the stream starts over after it, with a
            // hello of its own.
            Ok(after) => resume = Ok(Some(after)),
            Err(_) => return,
        }
    };
    send_close(&mut sink, &end).await;
}

async fn send_close(sink: &mut Sink, end: &End) {
    if let End::Close(code, reason) = end {
        let close = Message::Close(Some(CloseFrame { code: *code, reason: reason.as_str().into() }));
        // A client that reads nothing may never take the close frame: not waited on forever.
        let _ = tokio::time::timeout(CLOSE_WAIT, sink.send(close)).await;
    }
}

/// The `after_position` of a `resume` frame the client sends first, within `grace`.
async fn first_resume(
    incoming: &mut futures::stream::SplitStream<WebSocket>,
    grace: Duration,
) -> Result<Option<u64>, End> {
    match tokio::time::timeout(grace, incoming.next()).await {
        Err(_) => Ok(None),
        Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => Err(End::Gone),
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<ClientFrame>(&text) {
            Ok(ClientFrame::Resume { after_position }) => Ok(Some(after_position)),
            Ok(ClientFrame::Typing { .. }) => Ok(None),
            Err(error) => Err(End::Close(1008, format!("not a frame of this stream: {error}"))),
        },
        Ok(Some(Ok(_))) => Ok(None),
    }
}

/// Says hello, sends what the client missed after `resume` from the store, and attaches to
/// the dispatcher; answers the attachment's id and the user's workspaces.
async fn join(
    gateway: &Gateway,
    user: Uuid,
    resume: Option<u64>,
    sink: &mut Sink,
    frames: mpsc::Sender<Frame>,
    closing: &Arc<Closing>,
) -> Result<(u64, Vec<Uuid>), End> {
    let store = gateway.0.store.as_ref();
    let unavailable = |error: quikapp_commands::store::StoreError| End::Close(UNAVAILABLE, error.to_string());
    let mut from = resume;
    let mut hello = true;
    loop {
        let head = store.head().await.map_err(unavailable)?;
        let memberships = store.memberships(user, head).await.map_err(unavailable)?;
        if hello {
            hello = false;
            let position = from.unwrap_or(head).to_string();
            let frame = serde_json::json!({ "type": "hello", "position": position, "user_id": user });
            sink.send(Message::Text(frame.to_string().into())).await.map_err(|_| End::Gone)?;
        }
        if let Some(after) = from.filter(|after| *after < head) {
            backfill(store, sink, user, after, head, &memberships).await?;
        }
        let membership = Membership::of(user, &memberships);
        let workspaces = membership.workspaces.iter().copied().collect();
        let connection = Connection { membership, after: head, frames: frames.clone(), closing: closing.clone() };
        let attached = tokio::time::timeout(gateway.0.config.attach_timeout, gateway.0.dispatcher.attach(connection));
        match attached.await {
            Ok(Ok(id)) => return Ok((id, workspaces)),
            // The dispatcher no longer holds what came after `head`: from the store again.
            Ok(Err(Refused::Behind)) => from = Some(head),
            Ok(Err(Refused::Gone)) => return Err(End::Close(UNAVAILABLE, "the gateway is failing".into())),
            Err(_) => return Err(End::Close(UNAVAILABLE, "the stream is not ready; try again".into())),
        }
    }
}

/// Sends every event in `(after, through]` that `user` may see, from the store;
/// `memberships` are the user's up to `through`.
async fn backfill(
    store: &dyn EventStore,
    sink: &mut Sink,
    user: Uuid,
    after: u64,
    through: u64,
    memberships: &[Envelope],
) -> Result<(), End> {
    let before: Vec<Envelope> = memberships.iter().filter(|e| e.global_position <= after).cloned().collect();
    let mut membership = Membership::of(user, &before);
    let mut place = after;
    while place < through {
        let limit = u32::try_from(through - place).unwrap_or(u32::MAX).min(1_000);
        let page = store.read_all(place, limit).await.map_err(|e| End::Close(UNAVAILABLE, e.to_string()))?;
        let Some(last) = page.last().map(|e| e.global_position) else { break };
        for event in page.iter().filter(|e| e.global_position <= through) {
            if membership.sees(event) {
                let frame = serde_json::json!({ "type": "event", "event": event });
                sink.send(Message::Text(frame.to_string().into())).await.map_err(|_| End::Gone)?;
            }
        }
        place = last;
    }
    Ok(())
}

/// Writes the dispatcher's frames until the client, the dispatcher or the gateway ends it, or
/// the client resumes after a position (answered).
async fn live(
    gateway: &Gateway,
    user: Uuid,
    id: u64,
    sink: &mut Sink,
    incoming: &mut futures::stream::SplitStream<WebSocket>,
    mut frames: mpsc::Receiver<Frame>,
    closing: &Closing,
) -> Result<u64, End> {
    let stopping = stopped(gateway.0.stopping.clone());
    tokio::pin!(stopping);
    // A client that went away without closing (a phone off the network) answers no ping.
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let Some(frame) = frame else {
                    // The dispatcher let go of this connection, and says why.
                    let code = closing.code().unwrap_or(UNAVAILABLE);
                    return Err(End::Close(code, reason(code).into()));
                };
                // A client that reads nothing blocks the send: the dispatcher then closes it.
                tokio::select! {
                    sent = sink.send(Message::Text(frame.text.clone())) => sent.map_err(|_| End::Gone)?,
                    code = closing.closed() => return Err(End::Close(code, reason(code).into())),
                }
                metrics::counter!("quikapp_realtime_frames_sent_total").increment(1);
                if let Some((member, workspace)) = frame.joins
                    && member == user
                    && let Err(error) = gateway.0.presence.joined(id, user, workspace).await
                {
                    tracing::warn!(%error, %user, %workspace, "cannot record a presence in a workspace joined");
                }
                if frame.position > 0 {
                    let delay = (chrono::Utc::now() - frame.occurred_at).to_std().unwrap_or_default();
                    metrics::histogram!("quikapp_realtime_delivery_seconds").record(delay.as_secs_f64());
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > 2 * PING_EVERY {
                    return Err(End::Gone);
                }
                let _ = tokio::time::timeout(PING_EVERY, sink.send(Message::Ping(Default::default()))).await;
            }
            code = closing.closed() => return Err(End::Close(code, reason(code).into())),
            message = incoming.next() => {
                heard = tokio::time::Instant::now();
                match message {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(End::Gone),
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientFrame>(&text) {
                        Ok(ClientFrame::Typing { channel_id }) => typing(gateway, user, id, channel_id).await,
                        Ok(ClientFrame::Resume { after_position }) => return Ok(after_position),
                        Err(error) => return Err(End::Close(1008, format!("not a frame of this stream: {error}"))),
                    },
                    Some(Ok(_)) => {}
                }
            }
            () = &mut stopping => {
                return Err(End::Close(GOING_AWAY, reason(GOING_AWAY).into()));
            }
        }
    }
}

/// Announces that `user` is typing in `channel` to its other members, on every instance, if
/// they are a member and within the rate (else nothing: typing is best effort).
async fn typing(gateway: &Gateway, user: Uuid, id: u64, channel: Uuid) {
    if gateway.0.dispatcher.may_type(id, channel).await {
        let slice = Slice { records: vec![Item::Typing { channel_id: channel, user_id: user }] };
        if let Err(error) = gateway.0.fanout.publish(&slice).await {
            tracing::warn!(%error, "cannot announce typing");
        }
    }
}

/// Resolves once `stopping` turns true.
async fn stopped(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stopping| *stopping).await;
}

fn reason(code: u16) -> &'static str {
    match code {
        crate::dispatcher::TOO_SLOW => "too slow: the send buffer is full",
        crate::dispatcher::RESTART => "part of the stream was lost: reconnect and resume",
        GOING_AWAY => "the gateway is shutting down: reconnect and resume",
        _ => "the stream is unavailable",
    }
}
