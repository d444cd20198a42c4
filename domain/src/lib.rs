//! The QuikApp domain: what may happen in a workspace, and what it takes for it to happen.
//!
//! # Layout
//! - [`event`]: the fifteen event types, their envelope, and the JSON Schema of each.
//! - [`stream`]: which stream each aggregate's events live in.
//! - [`user`], [`workspace`], [`channel`], [`message`]: one aggregate each, as pure
//!   `decide(state, command) -> events` and `apply(state, event)` functions.
//! - [`upcast`]: the steps that bring stored events of older layout versions up to date.
//! - [`rules`]: value rules shared by several aggregates (names, text, emoji).
//! - [`error`]: why a command is refused.
//!
//! Nothing here does I/O or is async. What a decision needs from elsewhere (the workspace a
//! channel belongs to, the root of a thread) is loaded by the command handler and passed in.
//!
//! Large channels stay cheap: every message is a stream of its own (its edits, reactions and
//! deletion), so deciding a command never replays a channel's message history; a channel's
//! stream holds only its settings and membership.

pub mod channel;
pub mod error;
pub mod event;
pub mod message;
pub mod rules;
pub mod stream;
pub mod upcast;
pub mod user;
pub mod workspace;

pub use error::DomainError;
pub use event::{Envelope, Event};

/// State rebuilt from a stream's events, oldest first.
pub trait Aggregate: Default {
    fn apply(&mut self, event: &Event);
}
