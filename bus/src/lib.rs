//! The event bus: how stored events reach Kafka (or, embedded, the in-process bus), and the
//! relay that publishes them in commit order.
//!
//! # Layout
//! - [`Publisher`]: the port the relay writes through; [`route`] says where each event goes
//!   (topic and key), the same for every adapter.
//! - [`kafka`]: the Kafka adapter: an idempotent producer, topics created when missing,
//!   watermark records to every partition.
//! - [`relay`]: follows the event store's global order from a checkpoint kept in the event
//!   store's database, one active relay at a time (a PostgreSQL session advisory lock), woken
//!   by the appends' NOTIFY.
//! - `testing` (feature `testing`): reading the topics back, for the tests of every crate.

pub mod kafka;
pub mod relay;
#[cfg(feature = "testing")]
pub mod testing;

use async_trait::async_trait;
use quikapp_domain::Envelope;
use thiserror::Error;
use uuid::Uuid;

/// The topics of API.md's Kafka section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Every event with a channel_id, keyed by it.
    pub messages: String,
    /// User and workspace events, keyed by workspace_id (by user_id for a user event with no
    /// workspace).
    pub workspaces: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics { messages: "quikapp.messages.events".into(), workspaces: "quikapp.workspaces.events".into() }
    }
}

/// Which of the two topics an event goes to, and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Messages { channel_id: Uuid },
    Workspaces { key: Uuid },
}

/// Where an event goes: events of a channel to the messages topic keyed by channel, so that one
/// channel's events share a partition in order; the rest to the workspaces topic.
pub fn route(event: &Envelope) -> Route {
    match (event.channel_id, event.workspace_id) {
        (Some(channel_id), _) => Route::Messages { channel_id },
        (None, Some(workspace_id)) => Route::Workspaces { key: workspace_id },
        (None, None) => Route::Workspaces { key: event.actor_id },
    }
}

/// The value of a watermark record: every event up to `position` has been written to the
/// partition it belongs to (API.md, Kafka).
pub fn watermark_value(position: u64) -> String {
    serde_json::json!({ "position": position.to_string() }).to_string()
}

#[derive(Debug, Error)]
pub enum BusError {
    /// The bus cannot take records now (broker down, timeouts): retry later.
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
}

/// Resolves once every record handed over by one [`Publisher::send`] is acknowledged.
pub type Acks = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BusError>> + Send>>;

/// Writes events to the bus.
///
/// An adapter MUST write each event to the partition its [`route`] names, in the order given
/// and after everything sent before, and MUST follow the events with a watermark of
/// `watermark` on every partition of both topics, so that a consumer that has read past it on
/// every partition has seen every event up to it. [`Acks`] resolve only once all of it is
/// durable on the bus. On error, some records may have been written: the caller sends the same
/// events again (duplicates carry the same event_id; consumers skip them by stream version).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Hands the records to the bus, in order, without waiting for their acknowledgement.
    async fn send(&self, events: &[Envelope], watermark: u64) -> Result<Acks, BusError>;

    /// [`Publisher::send`], then waits for the acknowledgement.
    async fn publish(&self, events: &[Envelope], watermark: u64) -> Result<(), BusError> {
        self.send(events, watermark).await?.await
    }

    /// A round trip to the bus, for readiness.
    async fn ping(&self) -> Result<(), BusError>;
}
