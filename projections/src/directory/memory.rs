//! The directory of the embedded default, in memory. Its progress lives with it, so a restart
//! starts both from nothing and the bus delivers the whole log again: still effectively once.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use quikapp_domain::workspace::Role;
use uuid::Uuid;

use super::{Changes, ChannelView, Directory, MemberView, WorkspaceView};
use crate::{Batch, ProjectionError, Projector, Stored, check_moves};

#[derive(Default)]
pub struct MemoryDirectory {
    state: RwLock<State>,
    changed: crate::Changes,
}

#[derive(Default)]
struct State {
    stored: Stored,
    users: HashMap<Uuid, String>,
    workspaces: HashMap<Uuid, Workspace>,
    channels: HashMap<Uuid, Channel>,
}

struct Workspace {
    name: String,
    owner_id: Uuid,
    version: u64,
    members: HashMap<Uuid, (Role, DateTime<Utc>)>,
}

struct Channel {
    view: ChannelView,
    members: BTreeMap<Uuid, DateTime<Utc>>,
}

impl MemoryDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("never poisoned")
    }
}

impl State {
    /// Refuses changes to workspaces and channels that are neither stored nor created by them.
    fn check(&self, changes: &Changes) -> Result<(), ProjectionError> {
        let workspace = |id: &Uuid| {
            self.workspaces.contains_key(id) || changes.workspaces.get(id).is_some_and(|w| w.created.is_some())
        };
        let channel =
            |id: &Uuid| self.channels.contains_key(id) || changes.channels.get(id).is_some_and(|c| c.created.is_some());
        let workspaces = changes.workspaces.keys().chain(changes.workspace_members.keys().map(|(w, _)| w));
        if let Some(id) = workspaces.into_iter().find(|id| !workspace(id)) {
            return Err(missing("workspace", *id));
        }
        if let Some(id) = changes.channels.keys().find(|id| !channel(id)) {
            return Err(missing("channel", *id));
        }
        Ok(())
    }

    /// Applies changes that passed [`State::check`].
    fn apply(&mut self, changes: Changes) {
        self.users.extend(changes.users);
        for (id, change) in changes.workspaces {
            let workspace = self.workspaces.entry(id).or_insert_with(|| {
                let (name, owner_id) = change.created.clone().expect("checked");
                Workspace { name, owner_id, version: 0, members: HashMap::new() }
            });
            workspace.version = workspace.version.max(change.version);
        }
        for ((workspace_id, user_id), (role, joined_at)) in changes.workspace_members {
            let workspace = self.workspaces.get_mut(&workspace_id).expect("checked");
            workspace.members.entry(user_id).and_modify(|(r, _)| *r = role).or_insert((role, joined_at));
        }
        for (id, change) in changes.channels {
            let channel = self.channels.entry(id).or_insert_with(|| {
                let (workspace_id, created_by, private) = change.created.expect("checked");
                let view = ChannelView {
                    channel_id: id,
                    workspace_id,
                    name: String::new(),
                    topic: None,
                    private,
                    archived: false,
                    created_by,
                    member_count: 0,
                    version: 0,
                };
                Channel { view, members: BTreeMap::new() }
            });
            if let Some(name) = change.name {
                channel.view.name = name;
            }
            if let Some(topic) = change.topic {
                channel.view.topic = topic;
            }
            channel.view.archived |= change.archived;
            channel.view.version = channel.view.version.max(change.version);
        }
        for ((channel_id, user_id), joined) in changes.channel_members {
            let channel = self.channels.get_mut(&channel_id).expect("checked: every member change names its channel");
            match joined {
                Some(at) => channel.members.insert(user_id, at),
                None => channel.members.remove(&user_id),
            };
            channel.view.member_count = channel.members.len() as u64;
        }
    }
}

fn missing(what: &str, id: Uuid) -> ProjectionError {
    ProjectionError::Rejected(format!("{what} {id} is not in the directory"))
}

#[async_trait]
impl Projector for MemoryDirectory {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn stored(&self) -> Result<Stored, ProjectionError> {
        Ok(self.read().stored.clone())
    }

    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        {
            let mut state = self.state.write().expect("never poisoned");
            check_moves(&batch.moves, |p| state.stored.partitions.get(p).map(|s| s.offset))?;
            let changes = Changes::of(&batch.events);
            state.check(&changes)?;
            state.apply(changes);
            state.stored.record(&batch.moves, batch.dead_lettered);
        }
        self.changed.announce();
        Ok(())
    }

    async fn changed(&self) {
        self.changed.next().await;
    }
}

#[async_trait]
impl Directory for MemoryDirectory {
    async fn workspace(&self, workspace_id: Uuid) -> Result<Option<WorkspaceView>, ProjectionError> {
        Ok(self.read().workspaces.get(&workspace_id).map(|w| WorkspaceView {
            workspace_id,
            name: w.name.clone(),
            owner_id: w.owner_id,
            member_count: w.members.len() as u64,
            version: w.version,
        }))
    }

    async fn role(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Option<Role>, ProjectionError> {
        Ok(self.read().workspaces.get(&workspace_id).and_then(|w| w.members.get(&user_id)).map(|(role, _)| *role))
    }

    async fn channels(&self, workspace_id: Uuid, viewer: Uuid) -> Result<Vec<ChannelView>, ProjectionError> {
        let state = self.read();
        let mut channels: Vec<ChannelView> = state
            .channels
            .values()
            .filter(|c| c.view.workspace_id == workspace_id && (!c.view.private || c.members.contains_key(&viewer)))
            .map(|c| c.view.clone())
            .collect();
        channels.sort_by(|a, b| a.name.cmp(&b.name).then(a.channel_id.cmp(&b.channel_id)));
        Ok(channels)
    }

    async fn private_channels(&self, workspace_id: Uuid, member: Uuid) -> Result<Vec<Uuid>, ProjectionError> {
        let state = self.read();
        let private = state
            .channels
            .values()
            .filter(|c| c.view.workspace_id == workspace_id && c.view.private && c.members.contains_key(&member));
        Ok(private.map(|c| c.view.channel_id).collect())
    }

    async fn channel(&self, channel_id: Uuid) -> Result<Option<ChannelView>, ProjectionError> {
        Ok(self.read().channels.get(&channel_id).map(|c| c.view.clone()))
    }

    async fn is_member(&self, channel_id: Uuid, user_id: Uuid) -> Result<bool, ProjectionError> {
        Ok(self.read().channels.get(&channel_id).is_some_and(|c| c.members.contains_key(&user_id)))
    }

    async fn members(&self, channel_id: Uuid) -> Result<Vec<MemberView>, ProjectionError> {
        let state = self.read();
        let Some(channel) = state.channels.get(&channel_id) else { return Ok(vec![]) };
        let mut members: Vec<MemberView> = channel
            .members
            .iter()
            .map(|(user_id, joined_at)| MemberView {
                user_id: *user_id,
                display_name: state.users.get(user_id).cloned(),
                joined_at: *joined_at,
            })
            .collect();
        members.sort_by_key(|m| (m.joined_at, m.user_id));
        Ok(members)
    }
}
