//! The directory: users, workspaces, channels and their members, as the read API serves them
//! (API.md: GET /workspaces/{ws}, /workspaces/{ws}/channels, /channels/{ch}, .../members).
//!
//! [`Changes::of`] folds a batch of events into the rows it changes, once for every store:
//! [`postgres::PostgresDirectory`] writes them with one multi-row statement per table, and
//! [`memory::MemoryDirectory`] (the embedded default) applies them to maps. Every row is
//! derived from the events of one stream (a user's, a workspace's, a channel's), which one
//! partition carries in order, so the order between partitions does not matter.

pub mod memory;
pub mod postgres;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use quikapp_domain::workspace::Role;
use quikapp_domain::{Envelope, Event};
use serde::Serialize;
use uuid::Uuid;

use crate::ProjectionError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WorkspaceView {
    pub workspace_id: Uuid,
    pub name: String,
    pub owner_id: Uuid,
    pub member_count: u64,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ChannelView {
    pub channel_id: Uuid,
    pub workspace_id: Uuid,
    pub name: String,
    pub topic: Option<String>,
    pub private: bool,
    pub archived: bool,
    pub created_by: Uuid,
    pub member_count: u64,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct MemberView {
    pub user_id: Uuid,
    /// `None` until the user sets a profile.
    pub display_name: Option<String>,
    #[serde(with = "quikapp_domain::event::timestamp")]
    pub joined_at: DateTime<Utc>,
}

/// What the read API asks of the directory. Visibility rules are the read API's; this only
/// answers what is stored.
#[async_trait]
pub trait Directory: Send + Sync {
    async fn workspace(&self, workspace_id: Uuid) -> Result<Option<WorkspaceView>, ProjectionError>;
    /// The user's role in the workspace, `None` for a non-member.
    async fn role(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Option<Role>, ProjectionError>;
    /// The workspace's public channels and the private ones `viewer` is a member of, by name.
    async fn channels(&self, workspace_id: Uuid, viewer: Uuid) -> Result<Vec<ChannelView>, ProjectionError>;
    /// The workspace's private channels that `member` is in.
    async fn private_channels(&self, workspace_id: Uuid, member: Uuid) -> Result<Vec<Uuid>, ProjectionError>;
    async fn channel(&self, channel_id: Uuid) -> Result<Option<ChannelView>, ProjectionError>;
    async fn is_member(&self, channel_id: Uuid, user_id: Uuid) -> Result<bool, ProjectionError>;
    /// The channel's members, by join time.
    async fn members(&self, channel_id: Uuid) -> Result<Vec<MemberView>, ProjectionError>;
}

/// A workspace's rows as a batch changes them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkspaceChange {
    /// Name and owner, when the batch creates the workspace.
    pub created: Option<(String, Uuid)>,
    pub version: u64,
}

/// A channel as a batch changes it; fields the batch does not touch are `None`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChannelChange {
    /// Workspace, creator and privacy, when the batch creates the channel.
    pub created: Option<(Uuid, Uuid, bool)>,
    pub name: Option<String>,
    /// `Some(None)`: the topic was cleared.
    pub topic: Option<Option<String>>,
    pub archived: bool,
    pub version: u64,
}

/// The rows a batch of events changes, each in its final state for the batch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Changes {
    /// Display names.
    pub users: BTreeMap<Uuid, String>,
    pub workspaces: BTreeMap<Uuid, WorkspaceChange>,
    /// (workspace, user) → role and first join time.
    pub workspace_members: BTreeMap<(Uuid, Uuid), (Role, DateTime<Utc>)>,
    pub channels: BTreeMap<Uuid, ChannelChange>,
    /// (channel, user) → joined at, or `None` when the user left.
    pub channel_members: BTreeMap<(Uuid, Uuid), Option<DateTime<Utc>>>,
}

impl Changes {
    pub fn of(events: &[Envelope]) -> Changes {
        let mut changes = Changes::default();
        for envelope in events {
            changes.add(envelope);
        }
        changes
    }

    fn add(&mut self, envelope: &Envelope) {
        let version = envelope.stream_version;
        fn touch(channels: &mut BTreeMap<Uuid, ChannelChange>, id: Uuid, version: u64) -> &mut ChannelChange {
            let change = channels.entry(id).or_default();
            change.version = change.version.max(version);
            change
        }
        match &envelope.event {
            Event::UserProfileUpdated(e) => {
                self.users.insert(e.user_id, e.display_name.clone());
            }
            Event::WorkspaceCreated(e) => {
                let change = self.workspaces.entry(e.workspace_id).or_default();
                change.created = Some((e.name.clone(), e.owner_id));
                change.version = change.version.max(version);
                self.workspace_members.insert((e.workspace_id, e.owner_id), (Role::Owner, envelope.occurred_at));
            }
            Event::WorkspaceMemberAdded(e) => {
                let change = self.workspaces.entry(e.workspace_id).or_default();
                change.version = change.version.max(version);
                let joined_at = self.workspace_members.get(&(e.workspace_id, e.user_id)).map(|(_, at)| *at);
                self.workspace_members
                    .insert((e.workspace_id, e.user_id), (e.role, joined_at.unwrap_or(envelope.occurred_at)));
            }
            Event::ChannelCreated(e) => {
                let change = touch(&mut self.channels, e.channel_id, version);
                change.created = Some((e.workspace_id, e.created_by, e.private));
                change.name = Some(e.name.clone());
                change.topic = Some(e.topic.clone());
            }
            Event::ChannelRenamed(e) => touch(&mut self.channels, e.channel_id, version).name = Some(e.name.clone()),
            Event::ChannelTopicChanged(e) => {
                touch(&mut self.channels, e.channel_id, version).topic = Some(e.topic.clone())
            }
            Event::ChannelArchived(e) => touch(&mut self.channels, e.channel_id, version).archived = true,
            Event::ChannelMemberJoined(e) => {
                touch(&mut self.channels, e.channel_id, version);
                self.channel_members.insert((e.channel_id, e.user_id), Some(envelope.occurred_at));
            }
            Event::ChannelMemberLeft(e) => {
                touch(&mut self.channels, e.channel_id, version);
                self.channel_members.insert((e.channel_id, e.user_id), None);
            }
            Event::MessagePosted(_)
            | Event::MessageEdited(_)
            | Event::MessageDeleted(_)
            | Event::ReactionAdded(_)
            | Event::ReactionRemoved(_)
            | Event::ChannelReadMarked(_) => {}
        }
    }
}

pub(crate) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Member => "member",
        Role::Admin => "admin",
        Role::Owner => "owner",
    }
}

pub(crate) fn role_of(name: &str) -> Option<Role> {
    match name {
        "member" => Some(Role::Member),
        "admin" => Some(Role::Admin),
        "owner" => Some(Role::Owner),
        _ => None,
    }
}
