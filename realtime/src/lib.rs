//! The realtime gateway: every event a user may see, live over a WebSocket (API.md, Realtime).
//!
//! ```text
//! event topics ─▶ consumer group quikapp-realtime (Forwarder) ─▶ Redis stream (Fanout)
//!   ─▶ every gateway instance: Dispatcher (global order, who sees what) ─▶ its WebSockets
//! ```
//!
//! # Layout
//! - [`forwarder`]: the consumer group, one fan-out entry per poll of the bus.
//! - [`fanout`]: the Redis stream every instance reads, or a broadcast channel in one process.
//! - [`dispatcher`]: per instance, puts the partitions back into position order and offers
//!   each event to the connections that may see it.
//! - [`membership`]: who may see an event, from the membership events themselves.
//! - [`gateway`]: GET /v1/stream: authentication, hello, resume from the store, live frames,
//!   the bounded buffer per client.

pub mod dispatcher;
pub mod fanout;
pub mod forwarder;
pub mod gateway;
pub mod membership;
pub mod presence;
