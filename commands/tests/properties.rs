//! Property: whatever commands several users send, concurrently, the events the store holds
//! fold to a history in which every rule of API.md's write table held when each event was
//! appended, and no two events share an event_id or a (stream, version). Checked against both
//! stores by an independent fold of the log, not by the domain's own code.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;
use quikapp_commands::store::{EventStore, contract};
use quikapp_commands::{Command, CommandContext, CommandError, CommandService};
use quikapp_domain::workspace::Role;
use quikapp_domain::{Envelope, Event};
use uuid::Uuid;

const USERS: usize = 4;
const NAMES: [&str; 3] = ["general", "random", "ops"];
const EMOJI: [&str; 2] = ["tada", "eyes"];

/// A command with its targets as indices into what exists when it runs.
#[derive(Debug, Clone)]
enum Op {
    AddMember { actor: usize, user: usize, admin: bool },
    CreateChannel { actor: usize, name: usize, private: bool },
    Rename { actor: usize, channel: usize, name: usize },
    Archive { actor: usize, channel: usize },
    Join { actor: usize, channel: usize, user: usize },
    Leave { actor: usize, channel: usize, user: usize },
    Post { actor: usize, channel: usize, reply_to: Option<usize> },
    Edit { actor: usize, message: usize },
    Delete { actor: usize, message: usize },
    React { actor: usize, message: usize, emoji: usize, add: bool },
    MarkRead { actor: usize, message: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let u = || 0..USERS;
    let i = || 0..6usize;
    prop_oneof![
        1 => (u(), u(), any::<bool>()).prop_map(|(actor, user, admin)| Op::AddMember { actor, user, admin }),
        1 => (u(), 0..NAMES.len(), any::<bool>()).prop_map(|(actor, name, private)| Op::CreateChannel { actor, name, private }),
        1 => (u(), i(), 0..NAMES.len()).prop_map(|(actor, channel, name)| Op::Rename { actor, channel, name }),
        1 => (u(), i()).prop_map(|(actor, channel)| Op::Archive { actor, channel }),
        3 => (u(), i(), u()).prop_map(|(actor, channel, user)| Op::Join { actor, channel, user }),
        2 => (u(), i(), u()).prop_map(|(actor, channel, user)| Op::Leave { actor, channel, user }),
        8 => (u(), i(), proptest::option::of(i())).prop_map(|(actor, channel, reply_to)| Op::Post { actor, channel, reply_to }),
        3 => (u(), i()).prop_map(|(actor, message)| Op::Edit { actor, message }),
        2 => (u(), i()).prop_map(|(actor, message)| Op::Delete { actor, message }),
        5 => (u(), i(), 0..EMOJI.len(), any::<bool>()).prop_map(|(actor, message, emoji, add)| Op::React {
            actor,
            message,
            emoji,
            add
        }),
        2 => (u(), i()).prop_map(|(actor, message)| Op::MarkRead { actor, message }),
    ]
}

/// What exists so far, by creation order, so that indices name real ids most of the time.
#[derive(Default)]
struct Created {
    channels: Vec<Uuid>,
    messages: Vec<(Uuid, Uuid)>,
}

fn pick<T: Copy>(items: &[T], index: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[index % items.len()])
}

fn command(op: &Op, workspace_id: Uuid, users: &[Uuid], created: &Created) -> Option<(usize, Command)> {
    let channel = |i| pick(&created.channels, i);
    let message = |i| pick(&created.messages, i);
    Some(match *op {
        Op::AddMember { actor, user, admin } => {
            let role = if admin { Role::Admin } else { Role::Member };
            (actor, Command::AddWorkspaceMember { workspace_id, user_id: users[user], role })
        }
        Op::CreateChannel { actor, name, private } => {
            let name = NAMES[name].into();
            (actor, Command::CreateChannel { workspace_id, name, private, topic: None })
        }
        Op::Rename { actor, channel: c, name } => {
            (actor, Command::UpdateChannel { channel_id: channel(c)?, name: Some(NAMES[name].into()), topic: None })
        }
        Op::Archive { actor, channel: c } => (actor, Command::ArchiveChannel { channel_id: channel(c)? }),
        Op::Join { actor, channel: c, user } => {
            (actor, Command::JoinChannel { channel_id: channel(c)?, user_id: users[user] })
        }
        Op::Leave { actor, channel: c, user } => {
            (actor, Command::LeaveChannel { channel_id: channel(c)?, user_id: users[user] })
        }
        Op::Post { actor, channel: c, reply_to } => {
            let thread_root_id = reply_to.and_then(message).map(|(_, m)| m);
            (actor, Command::PostMessage { channel_id: channel(c)?, text: "hello".into(), thread_root_id })
        }
        Op::Edit { actor, message: m } => {
            let (channel_id, message_id) = message(m)?;
            (actor, Command::EditMessage { channel_id, message_id, text: format!("edit {}", Uuid::now_v7()) })
        }
        Op::Delete { actor, message: m } => {
            let (channel_id, message_id) = message(m)?;
            (actor, Command::DeleteMessage { channel_id, message_id })
        }
        Op::React { actor, message: m, emoji, add } => {
            let (channel_id, message_id) = message(m)?;
            let emoji = EMOJI[emoji].into();
            match add {
                true => (actor, Command::AddReaction { channel_id, message_id, emoji }),
                false => (actor, Command::RemoveReaction { channel_id, message_id, emoji }),
            }
        }
        Op::MarkRead { actor, message: m } => {
            let (channel_id, message_id) = message(m)?;
            (actor, Command::MarkRead { channel_id, message_id })
        }
    })
}

/// Runs the operations in rounds of up to four at once, as several users would.
async fn run(store: Arc<dyn EventStore>, ops: Vec<Op>) {
    // Two services over one store, as two processes with caches of their own.
    let services = [Arc::new(CommandService::new(store.clone())), Arc::new(CommandService::new(store.clone()))];
    let users: Vec<Uuid> = (0..USERS).map(|_| Uuid::now_v7()).collect();
    let context = |actor: usize| CommandContext {
        actor: users[actor],
        correlation_id: Uuid::now_v7(),
        if_match: None,
        idempotency: None,
    };
    let created = services[0].execute(&context(0), &Command::CreateWorkspace { name: "Acme".into() }).await.unwrap();
    let workspace_id = Uuid::parse_str(created.ids["workspace_id"].as_str().unwrap()).unwrap();
    let mut known = Created::default();
    // A start that gives most operations something to act on: an admin, a member and an
    // outsider, a public and a private channel.
    let prelude = [
        Op::AddMember { actor: 0, user: 1, admin: true },
        Op::AddMember { actor: 0, user: 2, admin: false },
        Op::CreateChannel { actor: 2, name: 0, private: false },
        Op::CreateChannel { actor: 0, name: 2, private: true },
    ];
    for round in [&prelude[..2], &prelude[2..]].into_iter().chain(ops.chunks(4)) {
        let commands = round.iter().filter_map(|op| command(op, workspace_id, &users, &known));
        let tries = commands.enumerate().map(|(i, (actor, command))| {
            let (service, context) = (services[i % 2].clone(), context(actor));
            async move { (service.execute(&context, &command).await, command) }
        });
        for (answer, command) in futures::future::join_all(tries).await {
            // Refusals are the domain's to make; a store failure or lost race is a defect here.
            let reply = match answer {
                Ok(reply) => reply,
                Err(CommandError::Rejected(_) | CommandError::NameTaken) => continue,
                Err(other) => panic!("{command:?} failed: {other:?}"),
            };
            if let Some(id) = reply.ids.get("channel_id") {
                known.channels.push(Uuid::parse_str(id.as_str().unwrap()).unwrap());
            }
            if let (Some(id), Command::PostMessage { channel_id, .. }) = (reply.ids.get("message_id"), &command) {
                known.messages.push((*channel_id, Uuid::parse_str(id.as_str().unwrap()).unwrap()));
            }
        }
    }
    check_history(&store.read_all(0, 100_000).await.unwrap());
}

// ------------------------------------------------------------------ the independent fold

#[derive(Default)]
struct WorkspaceState {
    roles: HashMap<Uuid, Role>,
}

struct ChannelState {
    workspace: Uuid,
    name: String,
    private: bool,
    archived: bool,
    created_by: Uuid,
    members: HashSet<Uuid>,
}

struct MessageState {
    channel: Uuid,
    author: Uuid,
    root: Option<Uuid>,
    deleted: bool,
    reactions: HashSet<(String, Uuid)>,
}

#[track_caller]
fn rule(holds: bool, what: &str, event: &Envelope) {
    assert!(holds, "broken rule: {what}, by {event:?}");
}

fn check_history(log: &[Envelope]) {
    let mut ids = HashSet::new();
    let mut versions: HashMap<&str, u64> = HashMap::new();
    let mut workspaces: HashMap<Uuid, WorkspaceState> = HashMap::new();
    let mut channels: HashMap<Uuid, ChannelState> = HashMap::new();
    let mut messages: HashMap<Uuid, MessageState> = HashMap::new();
    for (i, e) in log.iter().enumerate() {
        rule(e.global_position == i as u64 + 1, "positions are gap-free", e);
        rule(ids.insert(e.event_id), "event ids are unique", e);
        let version = versions.entry(e.stream_id.as_str()).or_default();
        *version += 1;
        rule(e.stream_version == *version, "stream versions are gap-free and unique", e);
        let actor = e.actor_id;
        let admin = |ws: &Uuid| matches!(workspaces[ws].roles.get(&actor), Some(Role::Admin | Role::Owner));
        match &e.event {
            Event::WorkspaceCreated(d) => {
                workspaces.insert(d.workspace_id, WorkspaceState { roles: HashMap::from([(actor, Role::Owner)]) });
            }
            Event::WorkspaceMemberAdded(d) => {
                rule(admin(&d.workspace_id), "only admins add members", e);
                rule(
                    workspaces[&d.workspace_id].roles.get(&d.user_id) != Some(&Role::Owner),
                    "the owner stays owner",
                    e,
                );
                workspaces.get_mut(&d.workspace_id).unwrap().roles.insert(d.user_id, d.role);
            }
            Event::ChannelCreated(d) => {
                rule(workspaces[&d.workspace_id].roles.contains_key(&actor), "workspace members create channels", e);
                let taken = channels.values().any(|c| c.workspace == d.workspace_id && c.name == d.name);
                rule(!taken, "channel names are unique in a workspace", e);
                let state = ChannelState {
                    workspace: d.workspace_id,
                    name: d.name.clone(),
                    private: d.private,
                    archived: false,
                    created_by: actor,
                    members: HashSet::new(),
                };
                channels.insert(d.channel_id, state);
            }
            Event::ChannelRenamed(d) => {
                let c = &channels[&d.channel_id];
                rule(c.members.contains(&actor) && !c.archived, "members rename active channels", e);
                let taken = channels.values().any(|o| o.workspace == c.workspace && o.name == d.name);
                rule(!taken, "channel names are unique in a workspace", e);
                channels.get_mut(&d.channel_id).unwrap().name = d.name.clone();
            }
            Event::ChannelTopicChanged(d) => {
                let c = &channels[&d.channel_id];
                rule(c.members.contains(&actor) && !c.archived, "members change the topic of active channels", e);
            }
            Event::ChannelArchived(d) => {
                let c = &channels[&d.channel_id];
                rule(actor == c.created_by || admin(&c.workspace), "the creator or an admin archives", e);
                rule(!c.archived, "archived once", e);
                channels.get_mut(&d.channel_id).unwrap().archived = true;
            }
            Event::ChannelMemberJoined(d) => {
                let c = &channels[&d.channel_id];
                let creating = c.members.is_empty() && d.user_id == c.created_by;
                rule(!c.archived, "archived channels take no members", e);
                rule(workspaces[&c.workspace].roles.contains_key(&d.user_id), "only workspace members join", e);
                rule(!c.members.contains(&d.user_id), "joining twice appends nothing", e);
                let may_add = c.members.contains(&actor) || (actor == d.user_id && !c.private) || creating;
                rule(may_add, "self-join of public channels, or invited by a member", e);
                channels.get_mut(&d.channel_id).unwrap().members.insert(d.user_id);
            }
            Event::ChannelMemberLeft(d) => {
                let c = &channels[&d.channel_id];
                rule(c.members.contains(&d.user_id), "only members leave", e);
                rule(actor == d.user_id || admin(&c.workspace), "self, or an admin removes", e);
                channels.get_mut(&d.channel_id).unwrap().members.remove(&d.user_id);
            }
            Event::MessagePosted(d) => {
                let c = &channels[&d.channel_id];
                rule(c.members.contains(&actor) && !c.archived, "members post in active channels", e);
                if let Some(root) = d.thread_root_id {
                    let r = &messages[&root];
                    rule(r.channel == d.channel_id && !r.deleted && r.root.is_none(), "replies go to live roots", e);
                }
                let state = MessageState {
                    channel: d.channel_id,
                    author: actor,
                    root: d.thread_root_id,
                    deleted: false,
                    reactions: HashSet::new(),
                };
                messages.insert(d.message_id, state);
            }
            Event::MessageEdited(d) => {
                let m = &messages[&d.message_id];
                rule(m.author == actor && !m.deleted, "authors edit live messages", e);
                rule(!channels[&m.channel].archived, "archived channels refuse edits", e);
            }
            Event::MessageDeleted(d) => {
                let m = &messages[&d.message_id];
                let c = &channels[&m.channel];
                rule((m.author == actor || admin(&c.workspace)) && !m.deleted, "the author or an admin deletes", e);
                rule(!c.archived, "archived channels refuse deletions", e);
                messages.get_mut(&d.message_id).unwrap().deleted = true;
            }
            Event::ReactionAdded(d) => {
                let m = &messages[&d.message_id];
                let c = &channels[&m.channel];
                rule(c.members.contains(&actor) && !c.archived && !m.deleted, "members react to live messages", e);
                let fresh = messages.get_mut(&d.message_id).unwrap().reactions.insert((d.emoji.clone(), actor));
                rule(fresh, "a reaction is added once", e);
            }
            Event::ReactionRemoved(d) => {
                let m = &messages[&d.message_id];
                let c = &channels[&m.channel];
                rule(c.members.contains(&actor) && !c.archived && !m.deleted, "members unreact to live messages", e);
                let gone = messages.get_mut(&d.message_id).unwrap().reactions.remove(&(d.emoji.clone(), actor));
                rule(gone, "only present reactions are removed", e);
            }
            Event::ChannelReadMarked(d) => {
                let c = &channels[&d.channel_id];
                rule(c.members.contains(&actor) && !c.archived, "members mark active channels read", e);
                rule(!messages[&d.message_id].deleted, "read marks name live messages", e);
                rule(messages[&d.message_id].channel == d.channel_id, "read marks name messages of the channel", e);
            }
            Event::UserProfileUpdated(d) => rule(d.user_id == actor, "users update their own profile", e),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_history_keeps_the_write_rules_on_sqlite(ops in proptest::collection::vec(op(), 1..80)) {
        runtime().block_on(async { run(contract::fresh_sqlite().await, ops).await });
    }

    #[test]
    fn every_history_keeps_the_write_rules_on_postgres(ops in proptest::collection::vec(op(), 1..80)) {
        runtime().block_on(async {
            if let Some(store) = contract::fresh_postgres().await {
                run(store, ops).await;
            }
        });
    }
}
