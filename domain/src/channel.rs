//! A channel: its settings and its members. Its messages live in streams of their own.

use std::collections::HashSet;

use uuid::Uuid;

use crate::event::{
    ChannelArchived, ChannelCreated, ChannelMemberJoined, ChannelMemberLeft, ChannelRenamed, ChannelTopicChanged,
};
use crate::workspace::Workspace;
use crate::{Aggregate, DomainError, Event, rules};

#[derive(Debug, Clone, Default)]
pub struct Channel {
    pub id: Option<Uuid>,
    pub workspace_id: Uuid,
    pub name: String,
    pub topic: Option<String>,
    pub private: bool,
    pub archived: bool,
    pub created_by: Uuid,
    pub members: HashSet<Uuid>,
}

impl Aggregate for Channel {
    fn apply(&mut self, event: &Event) {
        match event {
            Event::ChannelCreated(e) => {
                self.id = Some(e.channel_id);
                self.workspace_id = e.workspace_id;
                self.name = e.name.clone();
                self.topic = e.topic.clone();
                self.private = e.private;
                self.created_by = e.created_by;
            }
            Event::ChannelRenamed(e) => self.name = e.name.clone(),
            Event::ChannelTopicChanged(e) => self.topic = e.topic.clone(),
            Event::ChannelArchived(_) => self.archived = true,
            Event::ChannelMemberJoined(e) => {
                self.members.insert(e.user_id);
            }
            Event::ChannelMemberLeft(e) => {
                self.members.remove(&e.user_id);
            }
            _ => {}
        }
    }
}

/// The unique values an event takes and gives up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    pub take: Vec<String>,
    pub release: Vec<String>,
}

/// Channel names are unique within their workspace. The rule spans channels, hence streams, so
/// the domain states it as claims that each event takes or gives up; the event store enforces
/// them atomically with the append, and a name another channel holds refuses the command (409).
pub fn name_claims(workspace_id: Uuid, event: &Event) -> Claims {
    let claim = |name: &str| format!("channel-name/{workspace_id}/{name}");
    match event {
        Event::ChannelCreated(e) => Claims { take: vec![claim(&e.name)], release: vec![] },
        Event::ChannelRenamed(e) => Claims { take: vec![claim(&e.name)], release: vec![claim(&e.previous_name)] },
        _ => Claims::default(),
    }
}

/// What a channel command may change; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct ChannelChanges<'a> {
    pub name: Option<&'a str>,
    pub topic: Option<&'a str>,
}

impl Channel {
    /// Creates a channel in `workspace`; its creator becomes its first member. Whether the name is
    /// free in the workspace is the event store's to enforce, atomically with the append.
    pub fn create(
        workspace: &Workspace,
        actor: Uuid,
        channel_id: Uuid,
        name: &str,
        private: bool,
        topic: Option<&str>,
    ) -> Result<Vec<Event>, DomainError> {
        workspace.ensure_visible_to(actor)?;
        rules::channel_name(name)?;
        if let Some(topic) = topic {
            rules::topic(topic)?;
        }
        let workspace_id = workspace.id.expect("visible workspaces exist");
        Ok(vec![
            ChannelCreated {
                channel_id,
                workspace_id,
                name: name.to_owned(),
                topic: topic.and_then(rules::optional_topic),
                private,
                created_by: actor,
            }
            .into(),
            ChannelMemberJoined { channel_id, user_id: actor, added_by: actor }.into(),
        ])
    }

    /// Non-members of a private channel, and outsiders of its workspace, are told it does not exist.
    pub fn ensure_visible_to(&self, workspace: &Workspace, actor: Uuid) -> Result<(), DomainError> {
        let in_workspace =
            self.id.is_some() && workspace.id == Some(self.workspace_id) && workspace.role_of(actor).is_some();
        if !in_workspace || (self.private && !self.members.contains(&actor)) {
            return Err(DomainError::NotFound("channel"));
        }
        Ok(())
    }

    /// What workspace admins may do to a private channel without being in it (archive it,
    /// remove its members, delete its messages): they see it for that purpose, while people
    /// outside the workspace are still told it does not exist.
    pub fn ensure_manageable_by(&self, workspace: &Workspace, actor: Uuid) -> Result<(), DomainError> {
        let admin_of_its_workspace =
            self.id.is_some() && workspace.id == Some(self.workspace_id) && workspace.is_admin(actor);
        if admin_of_its_workspace {
            return Ok(());
        }
        self.ensure_visible_to(workspace, actor)
    }

    pub fn ensure_member(&self, workspace: &Workspace, actor: Uuid) -> Result<(), DomainError> {
        self.ensure_visible_to(workspace, actor)?;
        if !self.members.contains(&actor) {
            return Err(DomainError::Forbidden("only channel members may do this"));
        }
        Ok(())
    }

    pub fn ensure_active(&self) -> Result<(), DomainError> {
        if self.archived {
            return Err(DomainError::Conflict("the channel is archived"));
        }
        Ok(())
    }

    fn id(&self) -> Uuid {
        self.id.expect("visible channels exist")
    }

    pub fn change(
        &self,
        workspace: &Workspace,
        actor: Uuid,
        changes: ChannelChanges,
    ) -> Result<Vec<Event>, DomainError> {
        self.ensure_member(workspace, actor)?;
        self.ensure_active()?;
        if changes.name.is_none() && changes.topic.is_none() {
            return Err(DomainError::invalid("name", "give a name or a topic to change"));
        }
        let mut events = Vec::new();
        if let Some(name) = changes.name.filter(|name| *name != self.name) {
            rules::channel_name(name)?;
            let previous_name = self.name.clone();
            events.push(ChannelRenamed { channel_id: self.id(), name: name.to_owned(), previous_name }.into());
        }
        if let Some(topic) = changes.topic {
            rules::topic(topic)?;
            let topic = rules::optional_topic(topic);
            if topic != self.topic {
                events.push(ChannelTopicChanged { channel_id: self.id(), topic }.into());
            }
        }
        Ok(events)
    }

    pub fn archive(&self, workspace: &Workspace, actor: Uuid) -> Result<Vec<Event>, DomainError> {
        self.ensure_manageable_by(workspace, actor)?;
        if actor != self.created_by && !workspace.is_admin(actor) {
            return Err(DomainError::Forbidden("only the channel's creator or a workspace admin may archive it"));
        }
        self.ensure_active()?;
        Ok(vec![ChannelArchived { channel_id: self.id() }.into()])
    }

    /// A workspace member may join a public channel; anyone else is added by a channel member.
    pub fn join(&self, workspace: &Workspace, actor: Uuid, user: Uuid) -> Result<Vec<Event>, DomainError> {
        self.ensure_visible_to(workspace, actor)?;
        if actor != user && !self.members.contains(&actor) {
            return Err(DomainError::Forbidden("only channel members may add others"));
        }
        self.ensure_active()?;
        if workspace.role_of(user).is_none() {
            return Err(DomainError::InvalidReference {
                field: "user_id",
                message: "is not a member of the workspace",
            });
        }
        if self.members.contains(&user) {
            return Ok(vec![]);
        }
        Ok(vec![ChannelMemberJoined { channel_id: self.id(), user_id: user, added_by: actor }.into()])
    }

    /// Members leave by themselves; workspace admins may remove anyone. Allowed when archived.
    /// Leaving a channel one is not in changes nothing (200), for any member of its workspace.
    pub fn leave(&self, workspace: &Workspace, actor: Uuid, user: Uuid) -> Result<Vec<Event>, DomainError> {
        let in_its_workspace = self.id.is_some() && workspace.id == Some(self.workspace_id);
        if actor == user && in_its_workspace && workspace.role_of(actor).is_some() && !self.members.contains(&user) {
            return Ok(vec![]); // a repeated leave, private channels included, is a no-op
        }
        self.ensure_manageable_by(workspace, actor)?;
        if actor != user && !workspace.is_admin(actor) {
            return Err(DomainError::Forbidden("only workspace admins may remove other members"));
        }
        if !self.members.contains(&user) {
            return Ok(vec![]);
        }
        Ok(vec![ChannelMemberLeft { channel_id: self.id(), user_id: user, removed_by: actor }.into()])
    }
}
