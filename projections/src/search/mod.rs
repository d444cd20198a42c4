//! Full-text search over messages (API.md: GET /workspaces/{ws}/search): one document per
//! message, on OpenSearch/Elasticsearch or, for the embedded default, on SQLite FTS5.
//!
//! A document holds the whole [`Message`] (what the timelines hold) and the global position of
//! the last event that changed it, `applied`, which is its version in the store: a write of a
//! document is refused unless its `applied` is above the stored one (OpenSearch's external
//! versioning), so a replayed, repeated or stale write changes nothing. Deleted messages stay
//! as documents marked deleted and never match: a tombstone that outlives any replay.
//!
//! A batch is applied by reading what its events need that they do not bring themselves (the
//! documents they change but do not post, whether the channels they post in are private:
//! [`to_read`]), folding the events into them with the timelines' own rules ([`fold`]), and
//! writing each changed document whole. The stores keep the progress after the effects
//! (OpenSearch, like the timelines on MongoDB, writes it in a compare-and-set of one document)
//! or with them (SQLite, one transaction).
//!
//! Visibility fails closed: each document says whether its channel is private, as the
//! channel's ChannelCreated (on the same partition, before its messages) said, and a message
//! of a channel the model does not know is taken as private. A search matches public channels'
//! messages and those of the private channels the directory says the caller is in, so a
//! channel the directory has not caught up with is searched by no one.

pub mod opensearch;
pub mod sqlite;

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use quikapp_domain::{Envelope, Event};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ProjectionError;
use crate::timelines::{Message, MessageView, Op, ops_of};

/// One message as the search model stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub workspace_id: Uuid,
    /// Its channel is private (or unknown to the model).
    pub private: bool,
    /// The global position of the last event that changed it: its version.
    pub applied: u64,
    pub message: Message,
}

/// What a store reads before [`fold`]: the messages `events` change but do not post, and the
/// channels they post in but do not create.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reads {
    pub messages: Vec<Uuid>,
    pub channels: Vec<Uuid>,
}

pub fn to_read(events: &[Envelope]) -> Reads {
    let (mut posted, mut created, mut listed) = (HashSet::new(), HashSet::new(), HashSet::new());
    let mut reads = Reads::default();
    for envelope in events {
        if let Event::ChannelCreated(created_now) = &envelope.event {
            created.insert(created_now.channel_id);
        }
        for op in ops_of(std::slice::from_ref(envelope)) {
            let id = op.target();
            match op {
                Op::Insert(message) => {
                    posted.insert(id);
                    if !created.contains(&message.channel_id) && listed.insert(message.channel_id) {
                        reads.channels.push(message.channel_id);
                    }
                }
                _ if !posted.contains(&id) && listed.insert(id) => reads.messages.push(id),
                _ => {}
            }
        }
    }
    reads
}

/// What a store knows before [`fold`]: the stored documents and channels among [`to_read`]'s
/// (channel → private).
#[derive(Debug, Default)]
pub struct Known {
    pub documents: HashMap<Uuid, Document>,
    pub channels: HashMap<Uuid, bool>,
}

/// What [`fold`] leaves to write.
#[derive(Debug, Default)]
pub struct Folded {
    /// The documents changed, each once, each at the position of the last event that changed it.
    pub changed: Vec<Uuid>,
    /// The channels created: (channel, private, the position of its ChannelCreated).
    pub channels: Vec<(Uuid, bool, u64)>,
    /// Some event met a stored document that has it already: the batch is being applied again.
    pub again: bool,
}

/// Folds `events` into `known`.
pub fn fold(events: &[Envelope], known: &mut Known) -> Folded {
    let mut folded = Folded::default();
    let mut listed = HashSet::new();
    for envelope in events {
        if let Event::ChannelCreated(created) = &envelope.event {
            known.channels.insert(created.channel_id, created.private);
            folded.channels.push((created.channel_id, created.private, envelope.global_position));
        }
        for op in ops_of(std::slice::from_ref(envelope)) {
            let id = op.target();
            let applied = envelope.global_position;
            let changes = match op {
                Op::Insert(mut message) if !known.documents.contains_key(&id) => {
                    let workspace_id = envelope.workspace_id.unwrap_or_default();
                    let private = known.channels.get(&message.channel_id).copied().unwrap_or(true);
                    message.text = indexed_text(&message.text);
                    known.documents.insert(id, Document { workspace_id, private, applied, message });
                    true
                }
                op => known.documents.get_mut(&id).is_some_and(|document| {
                    let changes = document.message.apply(op);
                    if changes {
                        document.applied = document.applied.max(applied);
                        document.message.text = indexed_text(&document.message.text);
                    } else {
                        folded.again = true;
                    }
                    changes
                }),
            };
            if changes && listed.insert(id) {
                folded.changed.push(id);
            }
        }
    }
    folded
}

/// A message's text as the search model keeps it: the highlight marks it may hold (private-use
/// characters) are blanked, so that every mark in a highlight is the store's.
pub fn indexed_text(text: &str) -> String {
    text.replace([MARK_START, MARK_END], " ")
}

/// A search, once the read API has decided which channels the caller may read: the
/// workspace's public channels and the private ones in `private`, or only `channel` of those.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub workspace_id: Uuid,
    pub channel: Option<Uuid>,
    /// The workspace's private channels the caller is in: usually few, whereas the public ones
    /// may be thousands.
    pub private: Vec<Uuid>,
    pub author: Option<Uuid>,
    /// Every one of these must match (see [`words`]).
    pub words: Vec<String>,
    pub limit: usize,
}

/// The words of a query: its parts between blanks and control characters that hold a letter or
/// digit.
pub fn words(q: &str) -> Vec<String> {
    let parts = q.split(|c: char| c.is_whitespace() || c.is_control());
    parts.filter(|word| word.chars().any(char::is_alphanumeric)).map(str::to_owned).collect()
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
    /// Every document of `channel`, deleted ones included, oldest first (for audits).
    async fn documents(&self, channel: Uuid) -> Result<Vec<Document>, ProjectionError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_the_parts_with_a_letter_or_digit() {
        assert_eq!(words("  héllo, wörld !! 42\u{0}x "), ["héllo,", "wörld", "42", "x"]);
        assert!(words(" ?! ").is_empty());
    }

    #[test]
    fn a_message_is_private_unless_its_channel_was_created_public() {
        use quikapp_domain::event::{ChannelCreated, MessagePosted, timestamp};
        let (public, unknown) = (Uuid::now_v7(), Uuid::now_v7());
        let envelope = |position: u64, channel: Uuid, event: Event| Envelope {
            event_id: Uuid::now_v7(),
            schema_version: event.schema_version(),
            event,
            stream_id: format!("s-{position}"),
            stream_version: 1,
            global_position: position,
            workspace_id: Some(Uuid::nil()),
            channel_id: Some(channel),
            actor_id: Uuid::nil(),
            occurred_at: timestamp::now(),
            correlation_id: Uuid::nil(),
            causation_id: Uuid::nil(),
        };
        let created = ChannelCreated {
            channel_id: public,
            workspace_id: Uuid::nil(),
            name: "general".into(),
            topic: None,
            private: false,
            created_by: Uuid::nil(),
        };
        let post = |channel: Uuid| MessagePosted {
            message_id: Uuid::now_v7(),
            channel_id: channel,
            author_id: Uuid::nil(),
            text: format!("hi {MARK_START}there"),
            thread_root_id: None,
        };
        let (in_public, in_unknown) = (post(public), post(unknown));
        let events = [
            envelope(1, public, created.into()),
            envelope(2, public, in_public.clone().into()),
            envelope(3, unknown, in_unknown.clone().into()),
        ];
        assert_eq!(to_read(&events), Reads { messages: vec![], channels: vec![unknown] });
        let mut known = Known::default();
        let folded = fold(&events, &mut known);
        assert_eq!(folded.channels, [(public, false, 1)]);
        assert_eq!(folded.changed, [in_public.message_id, in_unknown.message_id]);
        assert!(!known.documents[&in_public.message_id].private);
        assert!(known.documents[&in_unknown.message_id].private, "unknown channels fail closed");
        assert_eq!(known.documents[&in_public.message_id].message.text, "hi  there", "marks blanked");
    }

    #[test]
    fn highlights_escape_the_text_and_mark_the_matches() {
        let marked = format!("a <b> & {MARK_START}\"quoted\"{MARK_END} 'x'");
        assert_eq!(highlight(&marked), "a &lt;b&gt; &amp; <em>&quot;quoted&quot;</em> &#39;x&#39;");
    }
}
