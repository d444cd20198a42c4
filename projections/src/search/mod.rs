//! Full-text search over messages (API.md: GET /workspaces/{ws}/search): one document per
//! message, on OpenSearch/Elasticsearch or, for the embedded default, on SQLite FTS5.
//!
//! A document holds the whole [`Message`] (what the timelines hold) and the global position of
//! the last event that changed it, `applied`, which is its version in the store: a write of a
//! document is refused unless its `applied` is above the stored one (OpenSearch's external
//! versioning), so a replayed, repeated or stale write changes nothing. Deleted messages stay
//! as documents marked deleted and never match: a tombstone that outlives any replay.
//!
//! A batch is applied by reading the documents its events change that it does not post itself,
//! folding the events into them with the timelines' own rules ([`fold`]), and writing each
//! changed document whole. The stores keep the progress after the effects (OpenSearch, like the
//! timelines on MongoDB, writes it in a compare-and-set of one document) or with them (SQLite,
//! one transaction).

pub mod opensearch;
pub mod sqlite;

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use quikapp_domain::Envelope;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ProjectionError;
use crate::timelines::{Message, MessageView, Op, ops_of};

/// One message as the search model stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub workspace_id: Uuid,
    /// The global position of the last event that changed it: its version.
    pub applied: u64,
    pub message: Message,
}

/// The messages that `events` change but do not post: those a store reads before [`fold`].
pub fn to_read(events: &[Envelope]) -> Vec<Uuid> {
    let mut posted = HashSet::new();
    let mut read = Vec::new();
    for op in ops_of(events) {
        let id = op.target();
        match op {
            Op::Insert(_) => {
                posted.insert(id);
            }
            _ if !posted.contains(&id) && !read.contains(&id) => read.push(id),
            _ => {}
        }
    }
    read
}

/// Folds `events` into `documents`, which holds the stored documents among [`to_read`]'s. Each
/// changed document ends with the position of the last event that changed it; the ids of the
/// changed ones are returned, each once.
pub fn fold(events: &[Envelope], documents: &mut HashMap<Uuid, Document>) -> Vec<Uuid> {
    let mut changed = Vec::new();
    for envelope in events {
        for op in ops_of(std::slice::from_ref(envelope)) {
            let id = op.target();
            let applied = envelope.global_position;
            let changes = match op {
                Op::Insert(message) if !documents.contains_key(&id) => {
                    let workspace_id = envelope.workspace_id.unwrap_or_default();
                    documents.insert(id, Document { workspace_id, applied, message });
                    true
                }
                op => documents.get_mut(&id).is_some_and(|document| {
                    let changes = document.message.apply(op);
                    if changes {
                        document.applied = document.applied.max(applied);
                    }
                    changes
                }),
            };
            if changes && !changed.contains(&id) {
                changed.push(id);
            }
        }
    }
    changed
}

/// A search, once the read API has decided which channels the caller may read: the
/// workspace's, or only `channel`, less the `hidden` ones.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub workspace_id: Uuid,
    pub channel: Option<Uuid>,
    /// The workspace's private channels the caller is not in: usually few, whereas the public
    /// ones may be thousands.
    pub hidden: Vec<Uuid>,
    pub author: Option<Uuid>,
    /// Every one of these must match (see [`words`]).
    pub words: Vec<String>,
    pub limit: usize,
}

/// The words of a query: its blank-separated parts that hold a letter or digit.
pub fn words(q: &str) -> Vec<String> {
    q.split_whitespace().filter(|word| word.chars().any(char::is_alphanumeric)).map(str::to_owned).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Hit {
    #[serde(flatten)]
    pub message: MessageView,
    /// The text, HTML-escaped, with the matching words in `<em>…</em>`.
    pub highlight: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Hits {
    /// The best matches first, newest first among equals.
    pub hits: Vec<Hit>,
    /// How many messages match in all.
    pub total: u64,
}

/// Marks the stores put around matched words in highlights: private-use characters, which
/// [`highlight`] turns into `<em>` and `</em>` once the rest is escaped.
pub const MARK_START: char = '\u{E000}';
pub const MARK_END: char = '\u{E001}';

/// The HTML of a text marked with [`MARK_START`] and [`MARK_END`].
pub fn highlight(marked: &str) -> String {
    let mut html = String::with_capacity(marked.len() + 16);
    for c in marked.chars() {
        match c {
            MARK_START => html.push_str("<em>"),
            MARK_END => html.push_str("</em>"),
            '&' => html.push_str("&amp;"),
            '<' => html.push_str("&lt;"),
            '>' => html.push_str("&gt;"),
            '"' => html.push_str("&quot;"),
            '\'' => html.push_str("&#39;"),
            c => html.push(c),
        }
    }
    html
}

/// What the read API asks of the search model; deleted messages never match.
#[async_trait]
pub trait Search: Send + Sync {
    async fn search(&self, query: &Query) -> Result<Hits, ProjectionError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_the_parts_with_a_letter_or_digit() {
        assert_eq!(words("  héllo, wörld !! 42 "), ["héllo,", "wörld", "42"]);
        assert!(words(" ?! ").is_empty());
    }

    #[test]
    fn highlights_escape_the_text_and_mark_the_matches() {
        let marked = format!("a <b> & {MARK_START}\"quoted\"{MARK_END} 'x'");
        assert_eq!(highlight(&marked), "a &lt;b&gt; &amp; <em>&quot;quoted&quot;</em> &#39;x&#39;");
    }
}
