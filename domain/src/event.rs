//! The events of API.md: one struct per type, the [`Event`] enum that tags them, and the
//! [`Envelope`] every stored and published event travels in.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::workspace::Role;

/// Each event type's `data` layout has a version, 1 unless a type says otherwise (`Name (schema_version = 2) { … }`). Bump
/// a type's version when its fields change shape or meaning, and add the step that brings the
/// previous version's data up to date in [`crate::upcast`]: stored events are never rewritten.
///
/// Decoding ignores fields it does not know, so that during a rolling deploy an older reader
/// (relay, projector) does not stall on the events of a newer writer; the published schemas
/// still say exactly which fields each version has.
macro_rules! events {
    (@version) => { 1 };
    (@version $version:literal) => { $version };
    ($( $(#[$doc:meta])* $name:ident $((schema_version = $version:literal))? { $( $(#[$field_doc:meta])* $field:ident : $ty:ty ),* $(,)? } )*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
            #[schemars(deny_unknown_fields)]
            pub struct $name { $( $(#[$field_doc])* pub $field: $ty, )* }

            impl From<$name> for Event {
                fn from(data: $name) -> Self {
                    Event::$name(data)
                }
            }
        )*

        /// Every event type, tagged as `{"type": "...", "data": {...}}`.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(tag = "type", content = "data")]
        pub enum Event { $( $name($name), )* }

        impl Event {
            pub fn type_name(&self) -> &'static str {
                match self { $( Event::$name(_) => stringify!($name), )* }
            }

            /// The version of this event's data layout.
            pub fn schema_version(&self) -> u32 {
                match self { $( Event::$name(_) => events!(@version $($version)?), )* }
            }
        }

        /// The current data layout version of an event type, by name; `None` for an unknown type.
        pub fn schema_version_of(type_name: &str) -> Option<u32> {
            match type_name {
                $( stringify!($name) => Some(events!(@version $($version)?)), )*
                _ => None,
            }
        }

        /// The JSON Schema of each event type's whole envelope, by type name.
        pub fn schemas() -> Vec<(&'static str, serde_json::Value)> {
            vec![ $( (
                stringify!($name),
                envelope_schema::<$name>(stringify!($name), events!(@version $($version)?)),
            ), )* ]
        }
    };
}

events! {
    /// A user set their profile.
    UserProfileUpdated { user_id: Uuid, display_name: String }
    /// A workspace came to be; its creator is its owner.
    WorkspaceCreated { workspace_id: Uuid, name: String, owner_id: Uuid }
    /// A user joined a workspace, or an existing member's role changed.
    WorkspaceMemberAdded { workspace_id: Uuid, user_id: Uuid, role: Role, added_by: Uuid }
    /// A channel came to be; its creator joins it by the ChannelMemberJoined that follows.
    /// `topic` is null for none; version 1 could write none as "".
    ChannelCreated (schema_version = 2) {
        channel_id: Uuid,
        workspace_id: Uuid,
        name: String,
        #[schemars(required, extend("type" = ["string", "null"]))]
        topic: Option<String>,
        private: bool,
        created_by: Uuid,
    }
    ChannelRenamed { channel_id: Uuid, name: String, previous_name: String }
    /// `topic` is null when the topic was cleared. Version 1 wrote a cleared topic as "".
    ChannelTopicChanged (schema_version = 2) {
        channel_id: Uuid,
        #[schemars(required, extend("type" = ["string", "null"]))]
        topic: Option<String>,
    }
    ChannelArchived { channel_id: Uuid }
    /// `added_by` is the member who invited the user; equal to `user_id` when they joined themselves.
    ChannelMemberJoined { channel_id: Uuid, user_id: Uuid, added_by: Uuid }
    /// `removed_by` is the admin who removed the user; equal to `user_id` when they left.
    ChannelMemberLeft { channel_id: Uuid, user_id: Uuid, removed_by: Uuid }
    /// `thread_root_id` is set for a thread reply, and names a top-level message of the channel.
    MessagePosted { message_id: Uuid, channel_id: Uuid, author_id: Uuid, text: String, thread_root_id: Option<Uuid> }
    MessageEdited { message_id: Uuid, channel_id: Uuid, text: String }
    /// Carries the author and thread root so read models can undo what the post counted.
    MessageDeleted { message_id: Uuid, channel_id: Uuid, author_id: Uuid, thread_root_id: Option<Uuid> }
    ReactionAdded { message_id: Uuid, channel_id: Uuid, user_id: Uuid, emoji: String }
    ReactionRemoved { message_id: Uuid, channel_id: Uuid, user_id: Uuid, emoji: String }
    /// The member has read the channel up to `message_id`, whose MessagePosted event stands at
    /// global position `message_position`.
    ChannelReadMarked { channel_id: Uuid, user_id: Uuid, message_id: Uuid, message_position: u64 }
}

/// A stored event: what happened, where it stands, and who caused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// UUIDv7, unique across the store.
    pub event_id: Uuid,
    #[serde(flatten)]
    pub event: Event,
    pub schema_version: u32,
    pub stream_id: String,
    /// 1 for a stream's first event.
    pub stream_version: u64,
    /// Assigned by the store; gap-free and in commit order.
    pub global_position: u64,
    /// Absent for user events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<Uuid>,
    /// Absent for user and workspace events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<Uuid>,
    pub actor_id: Uuid,
    #[serde(with = "timestamp")]
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
}

// The envelope layout with one type's data, for schema generation only.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct TypedEnvelope<D> {
    event_id: Uuid,
    r#type: String,
    schema_version: u32,
    stream_id: String,
    stream_version: u64,
    global_position: u64,
    #[serde(default)]
    workspace_id: Option<Uuid>,
    #[serde(default)]
    channel_id: Option<Uuid>,
    actor_id: Uuid,
    occurred_at: DateTime<Utc>,
    correlation_id: Uuid,
    causation_id: Uuid,
    data: D,
}

fn envelope_schema<D: JsonSchema>(type_name: &str, schema_version: u32) -> serde_json::Value {
    let mut schema = schemars::schema_for!(TypedEnvelope<D>).to_value();
    schema["title"] = type_name.into();
    schema["description"] = format!("A QuikApp {type_name} event in its envelope (see API.md, Events).").into();
    schema["properties"]["type"] = serde_json::json!({ "const": type_name });
    schema["properties"]["schema_version"] = serde_json::json!({ "const": schema_version });
    schema
}

/// RFC 3339 in UTC with exactly six fractional digits, as API.md asks of every timestamp.
pub mod timestamp {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn format(at: &DateTime<Utc>) -> String {
        at.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(at))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&text).map(|at| at.with_timezone(&Utc)).map_err(serde::de::Error::custom)
    }

    /// Now, truncated to the microseconds that the format keeps.
    pub fn now() -> DateTime<Utc> {
        let now = Utc::now();
        DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
    }
}
