//! A message with its reactions, and a member's read mark. Each message is a stream of its own.

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

use crate::channel::Channel;
use crate::event::{ChannelReadMarked, MessageDeleted, MessageEdited, MessagePosted, ReactionAdded, ReactionRemoved};
use crate::workspace::Workspace;
use crate::{Aggregate, DomainError, Event, rules};

#[derive(Debug, Clone, Default)]
pub struct Message {
    pub id: Option<Uuid>,
    pub channel_id: Uuid,
    pub author_id: Uuid,
    pub text: String,
    pub thread_root_id: Option<Uuid>,
    pub deleted: bool,
    pub reactions: BTreeMap<String, BTreeSet<Uuid>>,
}

impl Aggregate for Message {
    fn apply(&mut self, event: &Event) {
        match event {
            Event::MessagePosted(e) => {
                self.id = Some(e.message_id);
                self.channel_id = e.channel_id;
                self.author_id = e.author_id;
                self.text = e.text.clone();
                self.thread_root_id = e.thread_root_id;
            }
            Event::MessageEdited(e) => self.text = e.text.clone(),
            Event::MessageDeleted(_) => self.deleted = true,
            Event::ReactionAdded(e) => {
                self.reactions.entry(e.emoji.clone()).or_default().insert(e.user_id);
            }
            Event::ReactionRemoved(e) => {
                if let Some(users) = self.reactions.get_mut(&e.emoji) {
                    users.remove(&e.user_id);
                    if users.is_empty() {
                        self.reactions.remove(&e.emoji);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Message {
    /// Whether this is a live message of `channel` (not deleted).
    pub fn is_in(&self, channel: &Channel) -> bool {
        self.id.is_some() && Some(self.channel_id) == channel.id && !self.deleted
    }

    fn id(&self) -> Uuid {
        self.id.expect("checked messages exist")
    }

    /// `thread_root` is the loaded root message when the post is a thread reply.
    pub fn post(
        channel: &Channel,
        workspace: &Workspace,
        actor: Uuid,
        message_id: Uuid,
        text: &str,
        thread_root: Option<&Message>,
    ) -> Result<Vec<Event>, DomainError> {
        channel.ensure_member(workspace, actor)?;
        channel.ensure_active()?;
        rules::message_text(text)?;
        let thread_root_id = match thread_root {
            None => None,
            Some(root) if !root.is_in(channel) => {
                return Err(DomainError::InvalidReference {
                    field: "thread_root_id",
                    message: "is not a message of this channel",
                });
            }
            Some(root) if root.thread_root_id.is_some() => {
                return Err(DomainError::InvalidReference {
                    field: "thread_root_id",
                    message: "is a reply; threads have one level",
                });
            }
            Some(root) => Some(root.id()),
        };
        let channel_id = channel.id.expect("visible channels exist");
        Ok(vec![
            MessagePosted { message_id, channel_id, author_id: actor, text: text.to_owned(), thread_root_id }.into(),
        ])
    }

    /// The checks every command on an existing message starts with.
    fn ensure_reachable(&self, channel: &Channel, workspace: &Workspace, actor: Uuid) -> Result<(), DomainError> {
        channel.ensure_visible_to(workspace, actor)?;
        self.ensure_in(channel)
    }

    fn ensure_in(&self, channel: &Channel) -> Result<(), DomainError> {
        if !self.is_in(channel) {
            return Err(DomainError::NotFound("message"));
        }
        Ok(())
    }

    pub fn edit(
        &self,
        channel: &Channel,
        workspace: &Workspace,
        actor: Uuid,
        text: &str,
    ) -> Result<Vec<Event>, DomainError> {
        self.ensure_reachable(channel, workspace, actor)?;
        if actor != self.author_id {
            return Err(DomainError::Forbidden("only the author may edit a message"));
        }
        channel.ensure_active()?;
        rules::message_text(text)?;
        if text == self.text {
            return Ok(vec![]);
        }
        Ok(vec![MessageEdited { message_id: self.id(), channel_id: self.channel_id, text: text.to_owned() }.into()])
    }

    /// Workspace admins may delete messages of private channels they are not in.
    pub fn delete(&self, channel: &Channel, workspace: &Workspace, actor: Uuid) -> Result<Vec<Event>, DomainError> {
        channel.ensure_manageable_by(workspace, actor)?;
        self.ensure_in(channel)?;
        if actor != self.author_id && !workspace.is_admin(actor) {
            return Err(DomainError::Forbidden("only the author or a workspace admin may delete a message"));
        }
        channel.ensure_active()?;
        Ok(vec![
            MessageDeleted {
                message_id: self.id(),
                channel_id: self.channel_id,
                author_id: self.author_id,
                thread_root_id: self.thread_root_id,
            }
            .into(),
        ])
    }

    pub fn add_reaction(
        &self,
        channel: &Channel,
        workspace: &Workspace,
        actor: Uuid,
        emoji: &str,
    ) -> Result<Vec<Event>, DomainError> {
        self.ensure_reaction_allowed(channel, workspace, actor, emoji)?;
        if self.reactions.get(emoji).is_some_and(|users| users.contains(&actor)) {
            return Ok(vec![]);
        }
        let (message_id, channel_id) = (self.id(), self.channel_id);
        Ok(vec![ReactionAdded { message_id, channel_id, user_id: actor, emoji: emoji.to_owned() }.into()])
    }

    pub fn remove_reaction(
        &self,
        channel: &Channel,
        workspace: &Workspace,
        actor: Uuid,
        emoji: &str,
    ) -> Result<Vec<Event>, DomainError> {
        self.ensure_reaction_allowed(channel, workspace, actor, emoji)?;
        if !self.reactions.get(emoji).is_some_and(|users| users.contains(&actor)) {
            return Ok(vec![]);
        }
        let (message_id, channel_id) = (self.id(), self.channel_id);
        Ok(vec![ReactionRemoved { message_id, channel_id, user_id: actor, emoji: emoji.to_owned() }.into()])
    }

    fn ensure_reaction_allowed(
        &self,
        channel: &Channel,
        workspace: &Workspace,
        actor: Uuid,
        emoji: &str,
    ) -> Result<(), DomainError> {
        self.ensure_reachable(channel, workspace, actor)?;
        channel.ensure_member(workspace, actor)?;
        channel.ensure_active()?;
        rules::emoji(emoji)
    }
}

/// A member's read mark in one channel.
#[derive(Debug, Clone, Default)]
pub struct ReadMark {
    pub message_id: Option<Uuid>,
}

impl Aggregate for ReadMark {
    fn apply(&mut self, event: &Event) {
        if let Event::ChannelReadMarked(e) = event {
            self.message_id = Some(e.message_id);
        }
    }
}

impl ReadMark {
    /// `message_position` is the global position of the message's MessagePosted event.
    pub fn mark(
        &self,
        channel: &Channel,
        workspace: &Workspace,
        actor: Uuid,
        message: &Message,
        message_position: u64,
    ) -> Result<Vec<Event>, DomainError> {
        channel.ensure_member(workspace, actor)?;
        channel.ensure_active()?;
        if !message.is_in(channel) {
            return Err(DomainError::InvalidReference {
                field: "message_id",
                message: "is not a message of this channel",
            });
        }
        if self.message_id == message.id {
            return Ok(vec![]);
        }
        let channel_id = channel.id.expect("visible channels exist");
        Ok(vec![ChannelReadMarked { channel_id, user_id: actor, message_id: message.id(), message_position }.into()])
    }
}
