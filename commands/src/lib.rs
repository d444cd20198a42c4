//! The write side: the event store and the handling of commands.
//!
//! # Layout
//! - [`store`]: the [`store::EventStore`] port, its PostgreSQL and embedded SQLite adapters, the
//!   group commit they share, and (feature `contract`) the contract suite both must pass.
//! - [`handler`]: [`handler::CommandService`] loads the aggregates a command needs, lets the
//!   domain decide, and appends the outcome with optimistic concurrency and idempotency.

pub mod handler;
pub mod store;

pub use handler::{Command, CommandContext, CommandError, CommandService, Idempotency, Reply};
