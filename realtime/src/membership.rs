//! What one user may see of the event stream, from the events themselves.
//!
//! A user sees the events of the channels they are a member of, of their workspaces, and of
//! their own user stream. Membership is taken from the membership events (the event store's
//! [`EventStore::memberships`](quikapp_commands::store::EventStore::memberships) when a
//! connection opens, then the live events as they pass), so it is exact at every position:
//! a join is seen from the join on, and nothing of a channel after the user left it. The read
//! models are not asked; they may lag behind the stream.

use std::collections::HashSet;

use quikapp_domain::{Envelope, Event};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Membership {
    pub user: Uuid,
    pub workspaces: HashSet<Uuid>,
    pub channels: HashSet<Uuid>,
}

impl Membership {
    /// The user's memberships after `events` (in position order).
    pub fn of(user: Uuid, events: &[Envelope]) -> Membership {
        let mut membership = Membership { user, workspaces: HashSet::new(), channels: HashSet::new() };
        for event in events {
            membership.sees(event);
        }
        membership
    }

    /// Whether the user sees `event`, taking in the membership it begins or ends first: a
    /// join is seen by the joiner, and so is a leave, but nothing of the channel after it.
    pub fn sees(&mut self, event: &Envelope) -> bool {
        match &event.event {
            Event::WorkspaceCreated(e) if e.owner_id == self.user => {
                self.workspaces.insert(e.workspace_id);
            }
            Event::WorkspaceMemberAdded(e) if e.user_id == self.user => {
                self.workspaces.insert(e.workspace_id);
            }
            Event::ChannelMemberJoined(e) if e.user_id == self.user => {
                self.channels.insert(e.channel_id);
            }
            Event::ChannelMemberLeft(e) if e.user_id == self.user => {
                return self.channels.remove(&e.channel_id);
            }
            // A public channel is news to the whole workspace; a private one, to its creator
            // (whose join follows).
            Event::ChannelCreated(e) => {
                return if e.private { e.created_by == self.user } else { self.workspaces.contains(&e.workspace_id) };
            }
            // A read mark is its user's own business.
            Event::ChannelReadMarked(e) => return e.user_id == self.user && self.channels.contains(&e.channel_id),
            Event::UserProfileUpdated(e) => return e.user_id == self.user,
            _ => {}
        }
        match (event.channel_id, event.workspace_id) {
            (Some(channel), _) => self.channels.contains(&channel),
            (None, Some(workspace)) => self.workspaces.contains(&workspace),
            (None, None) => false,
        }
    }
}

/// Who may see `event` besides the members of its channel or workspace: the user it makes or
/// unmakes a member, or whose own event it is.
pub fn subject(event: &Envelope) -> Option<Uuid> {
    match &event.event {
        Event::WorkspaceCreated(e) => Some(e.owner_id),
        Event::ChannelCreated(e) => Some(e.created_by),
        Event::WorkspaceMemberAdded(e) => Some(e.user_id),
        Event::ChannelMemberJoined(e) => Some(e.user_id),
        Event::ChannelMemberLeft(e) => Some(e.user_id),
        Event::ChannelReadMarked(e) => Some(e.user_id),
        Event::UserProfileUpdated(e) => Some(e.user_id),
        _ => None,
    }
}

/// The user `event` makes a member of a workspace, and that workspace.
pub fn joins_workspace(event: &Envelope) -> Option<(Uuid, Uuid)> {
    match &event.event {
        Event::WorkspaceCreated(e) => Some((e.owner_id, e.workspace_id)),
        Event::WorkspaceMemberAdded(e) => Some((e.user_id, e.workspace_id)),
        _ => None,
    }
}

/// Whether only [`subject`] may see `event` (no other member of its channel or workspace).
pub fn subject_only(event: &Envelope) -> bool {
    matches!(event.event, Event::ChannelReadMarked(_) | Event::UserProfileUpdated(_))
}
