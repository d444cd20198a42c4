//! Comparing a read model with another version of it, or with a fresh fold of the event store
//! (`quikapp replay --verify`).
//!
//! Both sides are read the way the read API reads them ([`Contents`]), group by group: a
//! workspace, a channel (its directory entry and members, stats, timeline, search documents),
//! a user (unread counts). Models that keep up with a live stream differ while an event is
//! applied by one and not yet by the other, so a group is compared only when it is *settled*:
//! its last event is at or below the position both sides have applied, and no event touched it
//! while it was being read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use quikapp_commands::store::EventStore;
use quikapp_domain::Event;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::counters::Counters;
use crate::directory::Directory;
use crate::search::Search;
use crate::timelines::Timelines;
use crate::{ProjectionError, Projector};

/// A part of a model that is compared as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    Workspace(Uuid),
    Channel(Uuid),
    User(Uuid),
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Group::Workspace(id) => write!(f, "workspace {id}"),
            Group::Channel(id) => write!(f, "channel {id}"),
            Group::User(id) => write!(f, "user {id}"),
        }
    }
}

/// What a model holds about a group, by key, as its read side answers it.
#[async_trait]
pub trait Contents: Send + Sync {
    async fn group(&self, group: Group) -> Result<BTreeMap<String, Value>, ProjectionError>;
}

/// A model: its writer and its read side.
#[derive(Clone)]
pub struct Model {
    pub projector: Arc<dyn Projector>,
    pub contents: Arc<dyn Contents>,
}

fn value(view: impl Serialize) -> Value {
    serde_json::to_value(view).expect("a view serializes")
}

/// The directory: a workspace's entry; a channel's entry and members.
pub struct DirectoryContents(pub Arc<dyn Directory>);

#[async_trait]
impl Contents for DirectoryContents {
    async fn group(&self, group: Group) -> Result<BTreeMap<String, Value>, ProjectionError> {
        let mut contents = BTreeMap::new();
        match group {
            Group::Workspace(id) => {
                contents.insert("workspace".into(), value(self.0.workspace(id).await?));
            }
            Group::Channel(id) => {
                contents.insert("channel".into(), value(self.0.channel(id).await?));
                contents.insert("members".into(), value(self.0.members(id).await?));
            }
            Group::User(_) => {}
        }
        Ok(contents)
    }
}

/// The counters: a channel's stats; a user's unread counts.
pub struct CountersContents(pub Counters);

#[async_trait]
impl Contents for CountersContents {
    async fn group(&self, group: Group) -> Result<BTreeMap<String, Value>, ProjectionError> {
        let mut contents = BTreeMap::new();
        match group {
            Group::Channel(id) => drop(contents.insert("stats".into(), value(self.0.stats(id).await?))),
            Group::User(id) => drop(contents.insert("unread".into(), value(self.0.unread(id).await?))),
            Group::Workspace(_) => {}
        }
        Ok(contents)
    }
}

/// The timelines: every message of a channel not deleted, replies included, by id.
pub struct TimelinesContents(pub Arc<dyn Timelines>);

#[async_trait]
impl Contents for TimelinesContents {
    async fn group(&self, group: Group) -> Result<BTreeMap<String, Value>, ProjectionError> {
        let mut contents = BTreeMap::new();
        let Group::Channel(channel) = group else { return Ok(contents) };
        let mut before = None;
        loop {
            let page = self.0.page(channel, before, 200).await?;
            for message in &page {
                if message.reply_count > 0 {
                    for reply in self.0.replies(channel, message.message_id).await? {
                        contents.insert(reply.message_id.to_string(), value(&reply));
                    }
                }
                contents.insert(message.message_id.to_string(), value(message));
            }
            match page.last() {
                Some(last) if page.len() == 200 => {
                    let position = last.position.parse().map_err(|_| unreadable(&last.position))?;
                    before = Some(position);
                }
                _ => return Ok(contents),
            }
        }
    }
}

fn unreadable(what: &str) -> ProjectionError {
    ProjectionError::Unavailable(format!("unreadable: {what}"))
}

/// Search: every document of a channel, deleted ones included, by message id.
pub struct SearchContents(pub Arc<dyn Search>);

#[async_trait]
impl Contents for SearchContents {
    async fn group(&self, group: Group) -> Result<BTreeMap<String, Value>, ProjectionError> {
        let Group::Channel(channel) = group else { return Ok(BTreeMap::new()) };
        let documents = self.0.documents(channel).await?;
        Ok(documents.iter().map(|d| (d.message.message_id.to_string(), value(d))).collect())
    }
}

/// The groups of the store's history up to a position, each with the position of the last
/// event that can change what a model holds about it.
#[derive(Debug, Default)]
pub struct History {
    pub through: u64,
    pub last: BTreeMap<Group, u64>,
    /// Everyone who joined each channel.
    members: HashMap<Uuid, BTreeSet<Uuid>>,
}

impl History {
    /// Reads the store up to `through`.
    pub async fn read(store: &dyn EventStore, through: u64) -> Result<History, String> {
        let mut history = History { through, ..History::default() };
        // A channel's member list shows display names; a user's unread counts follow the
        // channels they have been in.
        let mut members: HashMap<Uuid, BTreeSet<Uuid>> = HashMap::new();
        let mut channels_of: HashMap<Uuid, BTreeSet<Uuid>> = HashMap::new();
        let mut profiles: HashMap<Uuid, u64> = HashMap::new();
        let mut after = 0;
        while after < through {
            let page = store.read_all(after, 10_000).await.map_err(|e| e.to_string())?;
            let Some(last) = page.last() else { break };
            after = last.global_position;
            for event in page.iter().filter(|e| e.global_position <= through) {
                let at = event.global_position;
                let mut touch = |group| {
                    history.last.insert(group, at);
                };
                match (&event.event, event.channel_id, event.workspace_id) {
                    (Event::UserProfileUpdated(e), _, _) => {
                        profiles.insert(e.user_id, at);
                        touch(Group::User(e.user_id));
                    }
                    (_, Some(channel), _) => {
                        touch(Group::Channel(channel));
                        if let Event::ChannelMemberJoined(e) = &event.event {
                            members.entry(channel).or_default().insert(e.user_id);
                            channels_of.entry(e.user_id).or_default().insert(channel);
                        }
                    }
                    (_, None, Some(workspace)) => touch(Group::Workspace(workspace)),
                    _ => {}
                }
            }
        }
        let last = |group, history: &History| history.last.get(&group).copied().unwrap_or(0);
        for (channel, users) in &members {
            let latest = users.iter().filter_map(|u| profiles.get(u)).copied().max().unwrap_or(0);
            let group = Group::Channel(*channel);
            history.last.insert(group, last(group, &history).max(latest));
        }
        for (user, channels) in &channels_of {
            let latest = channels.iter().map(|c| last(Group::Channel(*c), &history)).max().unwrap_or(0);
            history.last.insert(Group::User(*user), last(Group::User(*user), &history).max(latest));
        }
        history.members = members;
        Ok(history)
    }

    /// The groups that the events after this history, up to `through`, change: a channel's
    /// events change it and its members' unread counts; a profile changes the user and the
    /// member lists they are in.
    pub async fn touched_after(&self, store: &dyn EventStore, through: u64) -> Result<BTreeSet<Group>, String> {
        let mut touched = BTreeSet::new();
        let mut from = self.through;
        while from < through {
            let page = store.read_all(from, 10_000).await.map_err(|e| e.to_string())?;
            let Some(last) = page.last() else { break };
            from = last.global_position;
            for event in &page {
                match (&event.event, event.channel_id, event.workspace_id) {
                    (Event::UserProfileUpdated(e), _, _) => {
                        touched.insert(Group::User(e.user_id));
                        let theirs = self.members.iter().filter(|(_, users)| users.contains(&e.user_id));
                        touched.extend(theirs.map(|(channel, _)| Group::Channel(*channel)));
                    }
                    (_, Some(channel), _) => {
                        touched.insert(Group::Channel(channel));
                        touched.extend(self.members.get(&channel).into_iter().flatten().map(|u| Group::User(*u)));
                        if let Event::ChannelMemberJoined(e) = &event.event {
                            touched.insert(Group::User(e.user_id));
                        }
                    }
                    (_, None, Some(workspace)) => drop(touched.insert(Group::Workspace(workspace))),
                    _ => {}
                }
            }
        }
        Ok(touched)
    }
}

/// What a comparison found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// Groups compared (settled on both sides).
    pub compared: u64,
    /// Groups left out: an event at or above what one side has applied, or during the reading.
    pub unsettled: u64,
    /// The groups that differ, each with what differs.
    pub differences: Vec<Difference>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub group: String,
    /// Entries on each side and the digest of each side's entries.
    pub expected: Side,
    pub found: Side,
    /// Each entry that differs: its key, and each side's value (`null`: absent).
    pub entries: Vec<(String, Value, Value)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub entries: usize,
    pub digest: String,
}

fn side(contents: &BTreeMap<String, Value>) -> Side {
    let mut hash = Sha256::new();
    for (key, value) in contents {
        hash.update(key.as_bytes());
        hash.update(value.to_string().as_bytes());
    }
    let digest = hash.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    Side { entries: contents.len(), digest }
}

/// Compares `found` with `expected` on every group of `history` settled at `applied` (the
/// lowest position both have applied). `changed` tells, after the reading, which groups an
/// event touched meanwhile: their differences are left out.
pub async fn compare(
    history: &History,
    applied: u64,
    expected: &dyn Contents,
    found: &dyn Contents,
) -> Result<Verdict, ProjectionError> {
    let mut verdict = Verdict::default();
    for (group, last) in &history.last {
        if *last > applied {
            verdict.unsettled += 1;
            continue;
        }
        verdict.compared += 1;
        let (want, have) = (expected.group(*group).await?, found.group(*group).await?);
        if want == have {
            continue;
        }
        let keys: BTreeSet<&String> = want.keys().chain(have.keys()).collect();
        let entries = keys
            .into_iter()
            .filter(|key| want.get(*key) != have.get(*key))
            .map(|key| {
                let side = |contents: &BTreeMap<String, Value>| contents.get(key).cloned().unwrap_or(Value::Null);
                (key.clone(), side(&want), side(&have))
            })
            .collect();
        verdict.differences.push(Difference {
            group: group.to_string(),
            expected: side(&want),
            found: side(&have),
            entries,
        });
    }
    Ok(verdict)
}

impl Verdict {
    /// Leaves out the differences of groups an event touched after `history` was read.
    pub fn without(mut self, touched: &BTreeSet<Group>) -> Self {
        let touched: BTreeSet<String> = touched.iter().map(Group::to_string).collect();
        let before = self.differences.len();
        self.differences.retain(|d| !touched.contains(&d.group));
        let left_out = (before - self.differences.len()) as u64;
        self.compared -= left_out;
        self.unsettled += left_out;
        self
    }

    /// The report an operator reads: one line per group that differs, one per entry.
    pub fn lines(&self, expected: &str, found: &str) -> Vec<String> {
        let mut lines = vec![format!(
            "{} groups compared, {} differ, {} not settled (changing while compared)",
            self.compared,
            self.differences.len(),
            self.unsettled
        )];
        for difference in &self.differences {
            lines.push(format!(
                "{}: {expected} has {} entries (digest {}), {found} has {} (digest {})",
                difference.group,
                difference.expected.entries,
                difference.expected.digest,
                difference.found.entries,
                difference.found.digest
            ));
            for (key, want, have) in &difference.entries {
                lines.push(format!("  {key}: {expected} {}, {found} {}", short(want), short(have)));
            }
        }
        lines
    }
}

fn short(value: &Value) -> String {
    let text = if value.is_null() { "absent".to_owned() } else { value.to_string() };
    match text.char_indices().nth(300) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

/// The JSON an operator's scripts read (`--json`).
pub fn summary(verdict: &Verdict) -> Value {
    json!({
        "compared": verdict.compared,
        "unsettled": verdict.unsettled,
        "differing": verdict.differences.len(),
        "differences": verdict.differences,
    })
}
