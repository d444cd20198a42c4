//! Stream names. Each aggregate instance owns one stream; its events are versioned 1, 2, …

use uuid::Uuid;

pub fn user(id: Uuid) -> String {
    format!("user-{id}")
}

pub fn workspace(id: Uuid) -> String {
    format!("workspace-{id}")
}

/// A channel's settings and membership, never its messages.
pub fn channel(id: Uuid) -> String {
    format!("channel-{id}")
}

pub fn message(id: Uuid) -> String {
    format!("message-{id}")
}

/// One member's read mark in one channel: kept apart so that reading never moves the channel's
/// version (which clients use with If-Match).
pub fn read_mark(channel: Uuid, user: Uuid) -> String {
    format!("readmark-{channel}-{user}")
}
