//! A workspace and its members with their roles.

use std::collections::HashMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{WorkspaceCreated, WorkspaceMemberAdded};
use crate::{Aggregate, DomainError, Event, rules};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Admin,
    Owner,
}

#[derive(Debug, Clone, Default)]
pub struct Workspace {
    pub id: Option<Uuid>,
    pub name: String,
    pub owner_id: Uuid,
    pub members: HashMap<Uuid, Role>,
}

impl Aggregate for Workspace {
    fn apply(&mut self, event: &Event) {
        match event {
            Event::WorkspaceCreated(e) => {
                self.id = Some(e.workspace_id);
                self.name = e.name.clone();
                self.owner_id = e.owner_id;
                self.members.insert(e.owner_id, Role::Owner);
            }
            Event::WorkspaceMemberAdded(e) => {
                self.members.insert(e.user_id, e.role);
            }
            _ => {}
        }
    }
}

impl Workspace {
    pub fn create(workspace_id: Uuid, name: &str, owner_id: Uuid) -> Result<Vec<Event>, DomainError> {
        rules::display_text("name", name)?;
        Ok(vec![WorkspaceCreated { workspace_id, name: name.to_owned(), owner_id }.into()])
    }

    pub fn role_of(&self, user: Uuid) -> Option<Role> {
        self.members.get(&user).copied()
    }

    pub fn is_admin(&self, user: Uuid) -> bool {
        matches!(self.role_of(user), Some(Role::Admin | Role::Owner))
    }

    /// Outsiders are told the workspace does not exist.
    pub fn ensure_visible_to(&self, actor: Uuid) -> Result<(), DomainError> {
        match self.role_of(actor) {
            Some(_) if self.id.is_some() => Ok(()),
            _ => Err(DomainError::NotFound("workspace")),
        }
    }

    /// Adds a member, or changes a member's role; the owner's role never changes.
    pub fn add_member(&self, actor: Uuid, user: Uuid, role: Role) -> Result<Vec<Event>, DomainError> {
        self.ensure_visible_to(actor)?;
        if !self.is_admin(actor) {
            return Err(DomainError::Forbidden("only the workspace owner or an admin may add members"));
        }
        if role == Role::Owner {
            return Err(DomainError::invalid("role", "must be member or admin"));
        }
        match self.role_of(user) {
            Some(current) if current == role || current == Role::Owner => Ok(vec![]),
            _ => {
                let workspace_id = self.id.expect("visible workspaces exist");
                Ok(vec![WorkspaceMemberAdded { workspace_id, user_id: user, role, added_by: actor }.into()])
            }
        }
    }
}
